"""The Milvus collections as stored: their schemas and indexes, creating and loading them,
and a registration row's form (Row, its entity, its key).

Milvus needs a vector field in every collection: the audit and adjudication collections
hold a 2-d placeholder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dedup.core.errors import StoreError
from dedup.core.policy import Scored
from dedup.core.records import Registration
from dedup.core.settings import MilvusConfig
from dedup.core.vectors import Vector
from dedup.gallery.milvus.version import ServerVersion, server_version

log = logging.getLogger("dedup.milvus")

# A registration row's state: an enrolment being confirmed, then an acknowledged one.
PENDING, ACTIVE = 0, 1
PLACEHOLDER = [1.0, 0.0]
REGISTRATION_FIELDS = ["registration_id", "id_number", "msisdn", "carrier", "region",
                       "enrolled_at_us", "embedding_model", "enrolled_by", "quality",
                       "client_quality"]
ROW_FIELDS = ["key", *REGISTRATION_FIELDS, "state", "claimed_at_us"]
# Scalar fields the backend filters on by equality: indexed as the server supports (see
# version.py; Milvus Lite scans either way: 17 ms a lookup at 20,000 rows, measured).
LOOKUP_FIELDS = ["registration_id", "id_number", "msisdn", "state"]
# VARCHAR lengths in bytes: the request limits in characters, four bytes each in UTF-8.
VARCHAR_BYTES = {"registration_id": 512, "id_number": 256, "msisdn": 128, "carrier": 256,
                 "region": 256, "embedding_model": 256, "enrolled_by": 1024}
# Added after the first release: collections made before it lack the field (see RowShape).
ENROLLED_BY = "enrolled_by"
# The enrolment's unified qualities (FLOAT), added later still (see RowShape); NOT_MEASURED
# stands for None (Milvus before 2.5 has no nullable field).
QUALITY_FIELDS = ["quality", "client_quality"]
NOT_MEASURED = -1.0
MAX_RECORD_BYTES = 65_535
LOAD_TIMEOUT_S, LOAD_POLL_S = 600.0, 0.05
PARTY_BYTES = 2 + VARCHAR_BYTES["registration_id"]  # "p:" and a registration_id


@dataclass(frozen=True)
class Collections:
    """The names of a deployment's collections, from its configured prefix."""

    registrations: str
    audit: str
    adjudications: str  # settled pairs, keyed by the registrations' keys

    @classmethod
    def named(cls, prefix: str) -> Collections:
        return cls(f"{prefix}_registrations", f"{prefix}_audit", f"{prefix}_settlements")

    @property
    def all(self) -> list[str]:
        return [self.registrations, self.audit, self.adjudications]

    @property
    def legacy_adjudications(self) -> str:
        """Settled pairs keyed by registration_id strings, as kept before settlements were
        keyed by registration: converted and dropped when a node opens the collections."""
        return self.adjudications.removesuffix("_settlements") + "_adjudications"


def open_collections(client: Any, config: MilvusConfig, dimension: int,
                     version: ServerVersion) -> tuple[Collections, MilvusConfig]:
    """Creates the collections that are missing (as `version` supports them), loads them
    all and checks that the registrations hold `dimension`-d embeddings; with them, the
    configuration to search them with (as_served)."""
    from pymilvus import DataType

    names = create_collections(client, config, dimension, version)
    try:
        load_collections(client, names.all)
    except StoreError:
        raise
    except Exception as error:
        raise StoreError(f"milvus at {config.uri} ({version.name}): cannot load the "
                         f"collections ({error})") from error
    _check_dimension(client, names.registrations, dimension)
    described_type = _check_embedding_index(client, names.registrations, config)
    _add_enrolled_by(client, names.registrations, DataType, version)
    _add_quality_fields(client, names.registrations, DataType, version)
    return names, as_served(config, described_type)


def _check_embedding_index(client: Any, name: str, config: MilvusConfig) -> str | None:
    """Refuses a node configured for another index than the collection was created with:
    its search parameters would be another index's (Milvus rejects or ignores them).
    Returns the described index type (None: not described)."""
    try:
        described = client.describe_index(name, "embedding") or {}
    except Exception as error:  # e.g. a role without DescribeIndex: serve, unchecked
        log.warning("cannot describe the index of %s (%s): not checked against "
                    "--milvus-index-type", name, error)
        return None
    differing = _index_differences(described, config)
    if differing:
        raise StoreError(
            f"milvus at {config.uri}: the collection {name} has an embedding index of "
            f"{', '.join(differing)}: start the node with the collection's "
            "--milvus-index-type and --milvus-index-params, or use another --milvus-prefix")
    return str(described.get("index_type", config.index_type)).upper()


def as_served(config: MilvusConfig, described_type: str | None) -> MilvusConfig:
    """The configuration the node searches with: a collection whose index Milvus chose
    (AUTOINDEX) may quantise and is never complete, so its candidates are re-scored
    whatever type the node was started with (FLAT would take them as exact and complete)."""
    if described_type != "AUTOINDEX" or config.index_type == "AUTOINDEX":
        return config
    log.warning("the collection's embedding index is AUTOINDEX (Milvus's choice), not %s: "
                "its candidates are re-scored from their embeddings", config.index_type)
    return dataclasses.replace(config, index_type="AUTOINDEX")


def _index_differences(described: dict[str, Any], config: MilvusConfig) -> list[str]:
    """What a described index has other than `config` asks: its type (unless Milvus chose
    it: AUTOINDEX), its metric (dedup searches by inner product) and any build parameter
    the description names (Milvus Lite and 2.3 keep them under "params", a server may also
    list them beside the type)."""
    built = dict(described)
    nested = _loaded(built.pop("params", None))
    if isinstance(nested, dict):
        built |= nested
    differing = [f"{key} {built[key]} (this node: {value})"
                 for key, value in config.index_params.items()
                 if key in built and _as_json(built[key]) != _as_json(value)]
    kind = str(built.get("index_type", config.index_type)).upper()
    if kind not in (config.index_type, "AUTOINDEX"):
        differing.insert(0, f"type {kind} (this node: {config.index_type})")
    metric = str(built.get("metric_type", "IP")).upper()
    if metric != "IP":
        differing.append(f"metric {metric} (dedup scores by IP)")
    return differing


def _loaded(value: Any) -> Any:
    """A string as the JSON it holds, if it holds JSON; anything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _as_json(value: Any) -> Any:
    """A described value as the JSON it holds ("16" -> 16.0, '{"a": 1}' -> {"a": 1.0}), so
    that a server's strings compare equal to the numbers a node was given."""
    value = _loaded(value)
    if isinstance(value, bool) or not isinstance(value, int | float | dict | list):
        return value
    if isinstance(value, dict):
        return {key: _as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_json(item) for item in value]
    return float(value)


def create_collections(client: Any, config: MilvusConfig, dimension: int,
                       version: ServerVersion) -> Collections:
    """Creates the collections of `config.prefix` that are missing, without loading them."""
    from pymilvus import DataType

    names = Collections.named(config.prefix)
    try:
        _warn_of_other_prefixes(client, names)
        _create(client, names.registrations, _registration_schema(client, DataType, dimension),
                "embedding", config.index_type, config.index_params, LOOKUP_FIELDS, version,
                load=False)
        _create(client, names.audit, _audit_schema(client, DataType), "placeholder",
                "FLAT", {}, [], version, load=False)
        _create(client, names.adjudications, _adjudication_schema(client, DataType),
                "placeholder", "FLAT", {}, ["first", "second"], version, load=False)
    except Exception as error:
        raise StoreError(f"milvus at {config.uri} ({version.name}): cannot create the "
                         f"collections ({error})") from error
    return names


def _warn_of_other_prefixes(client: Any, names: Collections) -> None:
    """A mistyped --milvus-prefix would serve empty collections beside the filled ones, and
    answer CLEAR for everyone: said when the registrations are about to be created."""
    try:
        existing = client.list_collections()
    except Exception as error:  # only a warning: never a reason not to start
        log.debug("cannot list the collections to compare prefixes: %s", error)
        return
    suffix = "_registrations"
    others = sorted(name.removesuffix(suffix) for name in existing if name.endswith(suffix))
    if names.registrations not in existing and others:
        log.warning("creating the empty collection %s, while this Milvus holds the "
                    "registrations of the prefix(es) %s: is --milvus-prefix meant?",
                    names.registrations, ", ".join(others))


def _create(client: Any, name: str, schema: Any, vector_field: str, index_type: str,
            params: dict[str, Any], lookups: list[str],
            version: ServerVersion | None = None, load: bool = True) -> None:
    """Makes the collection and its indexes where missing. Nodes started together make them
    at once, and a node may have died between the collection and its indexes: what another
    node made meanwhile is taken as made, and a collection without its embedding index gets
    every index."""
    made = not client.has_collection(name) and _create_collection(client, name, schema)
    # The embedding's index last: a collection that has it has every index.
    fields = [*lookups, vector_field]
    missing = fields if made else _unindexed(client, name, vector_field, fields)
    if missing:
        version = version or server_version(client)
        types = {field.name: field.dtype.name for field in schema.fields}
        # Lookups: equality filters on them, on every call.
        indexes: dict[str, dict[str, Any]] = {
            field: {"index_type": version.scalar_index(types[field])} for field in lookups}
        # Nested under "params": Milvus Lite drops build parameters given beside the type.
        indexes[vector_field] = {"index_type": index_type, "metric_type": "IP",
                                 "params": {"params": params} if params else {}}
        for field in missing:
            _create_index(client, name, field, indexes[field])
    if load:
        client.load_collection(name)


def _create_collection(client: Any, name: str, schema: Any) -> bool:
    """Whether this node made it (False: another node made it meanwhile)."""
    try:
        client.create_collection(name, schema=schema, consistency_level="Strong")
    except Exception as error:
        if not _comes_about(lambda: client.has_collection(name)):
            raise
        # Milvus Lite refuses a second creation ("already exists", or "File exists" while the
        # first is still writing its schema).
        log.info("the Milvus collection %s was made by another node meanwhile (%s)", name,
                 error)
        return False
    log.info("created the Milvus collection %s", name)
    return True


def _unindexed(client: Any, name: str, vector_field: str, fields: list[str]) -> list[str]:
    """The fields to index on a collection this node did not make: every one without an
    index when it has no embedding index (made last: its maker stopped before it, or is
    indexing it now), none otherwise, so that a collection made before its lookups were
    indexed is served as it was made (indexing them would build on every row while the
    node starts). None either when the indexes cannot be listed (a role without
    DescribeIndex), as _check_embedding_index serves such a collection unchecked."""
    try:
        if client.list_indexes(name, field_name=vector_field):
            return []
        missing = [field for field in fields if not client.list_indexes(name, field_name=field)]
    except Exception as error:
        log.warning("cannot list the indexes of %s (%s): not checked for missing ones (a "
                    "collection without them fails to load on a Milvus server)", name, error)
        return []
    if missing:
        log.info("the Milvus collection %s has no embedding index yet (its maker stopped "
                 "before it, or is indexing it now): indexing %s", name, ", ".join(missing))
    return missing


def _create_index(client: Any, name: str, field: str, index: dict[str, Any]) -> None:
    """One field's index (`index`: add_index's arguments)."""
    spec = client.prepare_index_params()
    spec.add_index(field, **index)
    try:
        # Not waited for here (pymilvus would poll every 0.5 s): load_collections waits
        # until the collections are loaded, which takes their indexes built.
        client.create_index(name, spec, sync=False)
    except Exception as error:
        if not _comes_about(lambda: client.list_indexes(name, field_name=field)):
            raise
        log.info("the index of %s on %s was made by another node meanwhile (%s)", name,
                 field, error)


def _comes_about(condition: Callable[[], Any], within_s: float = 5.0) -> bool:
    """Whether `condition` holds within `within_s`: what another node is making shows once
    it has written it."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def load_collections(client: Any, names: list[str],
                     timeout_s: float = LOAD_TIMEOUT_S) -> None:
    """Loads the collections at once: a Milvus server takes seconds for each (2 s on 2.3),
    mostly its query coordinator's polling, so waiting for one after another adds up."""
    for name in names:
        client.load_collection(name, _async=True)
    deadline = time.monotonic() + timeout_s
    waiting = list(names)
    while waiting:
        waiting = [name for name in waiting
                   if client.get_load_state(name)["state"].name != "Loaded"]
        if waiting and time.monotonic() > deadline:
            raise StoreError(f"milvus: {', '.join(waiting)} not loaded after {timeout_s:.0f} s")
        if waiting:
            time.sleep(LOAD_POLL_S)


def _registration_schema(client: Any, types: Any, dimension: int) -> Any:
    schema = client.create_schema(auto_id=False)
    schema.add_field("key", types.INT64, is_primary=True)
    for name, size in VARCHAR_BYTES.items():
        schema.add_field(name, types.VARCHAR, max_length=size)
    schema.add_field("enrolled_at_us", types.INT64)
    for name in QUALITY_FIELDS:
        schema.add_field(name, types.FLOAT)
    schema.add_field("state", types.INT8)
    schema.add_field("claimed_at_us", types.INT64)
    schema.add_field("embedding", types.FLOAT_VECTOR, dim=dimension)
    return schema


def _audit_schema(client: Any, types: Any) -> Any:
    schema = client.create_schema(auto_id=False)
    schema.add_field("key", types.INT64, is_primary=True)
    schema.add_field("chain", types.VARCHAR, max_length=256)
    schema.add_field("seq", types.INT64)
    schema.add_field("record", types.VARCHAR, max_length=MAX_RECORD_BYTES)
    schema.add_field("placeholder", types.FLOAT_VECTOR, dim=len(PLACEHOLDER))
    return schema


def _adjudication_schema(client: Any, types: Any) -> Any:
    """A row per order of a settled pair: `first` and `second` are parties ("k:<key>" of a
    registration, "p:<registration_id>" of an application never enrolled)."""
    schema = client.create_schema(auto_id=False)
    schema.add_field("key", types.INT64, is_primary=True)
    schema.add_field("first", types.VARCHAR, max_length=PARTY_BYTES)
    schema.add_field("second", types.VARCHAR, max_length=PARTY_BYTES)
    schema.add_field("record", types.VARCHAR, max_length=MAX_RECORD_BYTES)
    schema.add_field("placeholder", types.FLOAT_VECTOR, dim=len(PLACEHOLDER))
    return schema


def _add_enrolled_by(client: Any, registrations: str, types: Any,
                     version: ServerVersion) -> None:
    """Adds `enrolled_by` to a registrations collection made before it, where Milvus can
    (2.6 and later; its rows read ""). Milvus Lite and older servers cannot: see RowShape."""
    if ENROLLED_BY in row_shape(client, registrations).fields:
        return
    if not version.can_add_field:
        log.warning("the Milvus collection %s predates the field %s and %s cannot add it: "
                    "who enrolled each registration is not recorded, and registration "
                    "desks' GetRegistration finds nothing", registrations, ENROLLED_BY,
                    version.name)
        return
    try:
        client.add_collection_field(registrations, field_name=ENROLLED_BY,
                                    data_type=types.VARCHAR,
                                    max_length=VARCHAR_BYTES[ENROLLED_BY], nullable=True,
                                    default_value="")
        log.info("added the field %s to the Milvus collection %s", ENROLLED_BY, registrations)
    except Exception as error:
        log.warning("the Milvus collection %s predates the field %s and this Milvus cannot "
                    "add it (%s): who enrolled each registration is not recorded, and "
                    "registration desks' GetRegistration finds nothing",
                    registrations, ENROLLED_BY, error)


def _add_quality_fields(client: Any, registrations: str, types: Any,
                        version: ServerVersion) -> None:
    """Adds the quality fields to a registrations collection made before them, where Milvus
    can (2.6 and later; its rows read NOT_MEASURED). Elsewhere see RowShape."""
    missing = [name for name in QUALITY_FIELDS
               if name not in row_shape(client, registrations).fields]
    if not missing:
        return
    if not version.can_add_field:
        log.warning("the Milvus collection %s predates the fields %s and %s cannot add them: "
                    "the enrolments' face image qualities are not recorded", registrations,
                    ", ".join(missing), version.name)
        return
    try:
        for name in missing:
            client.add_collection_field(registrations, field_name=name,
                                        data_type=types.FLOAT, nullable=True,
                                        default_value=NOT_MEASURED)
            log.info("added the field %s to the Milvus collection %s", name, registrations)
    except Exception as error:
        log.warning("the Milvus collection %s predates the fields %s and this Milvus cannot "
                    "add them (%s): the enrolments' face image qualities are not recorded",
                    registrations, ", ".join(missing), error)


def _check_dimension(client: Any, registrations: str, dimension: int) -> None:
    described = client.describe_collection(registrations)
    for column in described["fields"]:
        if column["name"] == "embedding":
            stored = int(column["params"]["dim"])
            if stored != dimension:
                raise StoreError(f"milvus collection {registrations} holds {stored}-d "
                                 f"embeddings, the model makes {dimension}-d ones")


def now_us() -> int:
    return time.time_ns() // 1000


def new_key() -> int:
    return secrets.randbits(63) or 1


def stable_key(*parts: str) -> int:
    """A primary key derived from `parts`, so that writing the same thing again upserts it."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Row:
    """A registration row: its key, the registration, its state and claim time; a search's
    score and the embedding when read."""

    key: int
    registration: Registration
    state: int
    claimed_at_us: int
    score: float = 0.0
    vector: Vector | None = None

    @classmethod
    def of(cls, entity: dict[str, Any], score: float = 0.0) -> Row:
        """The row of a Milvus entity (with ROW_FIELDS, and perhaps the embedding)."""
        vector = entity.get("embedding")
        fields = {name: entity[name] for name in REGISTRATION_FIELDS if name in entity}
        # Rows written before the field was added read None, or lack it (see RowShape).
        fields[ENROLLED_BY] = fields.get(ENROLLED_BY) or ""
        for name in QUALITY_FIELDS:
            fields[name] = _measured(fields.get(name))
        registration = Registration(**fields)
        return cls(int(entity["key"]), registration, int(entity["state"]),
                   int(entity["claimed_at_us"]), score,
                   None if vector is None else np.asarray(vector, np.float32))

    def before(self, other: Row) -> bool:
        """The earlier claim wins a conflict between two pending enrolments."""
        return (self.claimed_at_us, self.key) < (other.claimed_at_us, other.key)

    def scored(self) -> Scored:
        return Scored(self.key, self.registration, self.score)


def _measured(value: float | None) -> float | None:
    return None if value is None or value < 0 else float(value)


def to_entity(key: int, registration: Registration, state: int, claimed_at_us: int,
           vector: Vector) -> dict[str, Any]:
    """The Milvus entity of a registration row."""
    qualities = {name: NOT_MEASURED if getattr(registration, name) is None
                 else getattr(registration, name) for name in QUALITY_FIELDS}
    return dataclasses.asdict(registration) | qualities | {
        "key": key, "state": state, "claimed_at_us": claimed_at_us,
        "embedding": vector.tolist()}


@dataclass(frozen=True)
class RowShape:
    """The fields of one registrations collection: ROW_FIELDS, or all but `enrolled_by` in a
    collection made before it on a Milvus that cannot add a field (Milvus Lite); there the
    enrolling principal is not recorded, and a registration desk's GetRegistration finds
    nothing (see api/face_dedup.py). Likewise a collection made before the quality fields
    lacks them: there the enrolments' qualities are not recorded, and read as None."""

    fields: list[str]

    def entity(self, key: int, registration: Registration, state: int, claimed_at_us: int,
               vector: Vector) -> dict[str, Any]:
        entity = to_entity(key, registration, state, claimed_at_us, vector)
        for name in [ENROLLED_BY, *QUALITY_FIELDS]:
            if name not in self.fields:
                del entity[name]
        return entity


def row_shape(client: Any, registrations: str) -> RowShape:
    described = client.describe_collection(registrations)
    present = {column["name"] for column in described["fields"]}
    return RowShape([name for name in ROW_FIELDS if name in present])


# The names tests/test_milvus.py plants an abandoned claim with.
_Row, _new_key, _now_us = Row, new_key, now_us
