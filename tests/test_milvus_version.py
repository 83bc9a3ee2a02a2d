"""What dedup builds on each Milvus version it claims, from the version string the server
reports. Only Milvus Lite and a 2.3.5 server run here (test_milvus_server.py builds real
collections on both); these pin the choices for the versions that do not: 2.4 and 2.5
(INVERTED scalar indexes), 2.6 (fields added in place, Strong first looks) and anything
before 2.3 (refused at start, naming the version)."""

import pytest

from dedup.core.errors import StoreError
from dedup.gallery.milvus.version import ServerVersion

# reported version -> (Lite?, number, scalar index for VARCHAR / INT64, session first look,
# fields added in place)
CLAIMED = {
    "milvus_lite-3.2.2": (True, (3, 2, 2), "INVERTED", "INVERTED", True, False),
    "v2.3.5-lite": (False, (2, 3, 5), "Trie", "STL_SORT", True, False),
    "v2.3.21": (False, (2, 3, 21), "Trie", "STL_SORT", True, False),
    "v2.4.9": (False, (2, 4, 9), "INVERTED", "INVERTED", True, False),
    "2.5.4": (False, (2, 5, 4), "INVERTED", "INVERTED", True, False),
    "v2.6.0": (False, (2, 6, 0), "INVERTED", "INVERTED", False, True),
    "v2.6.3-gpu": (False, (2, 6, 3), "INVERTED", "INVERTED", False, True),
}


@pytest.mark.parametrize("reported", sorted(CLAIMED))
def test_each_claimed_version_gets_what_it_supports(reported):
    lite, number, varchar_index, int_index, session_first_look, add_field = CLAIMED[reported]
    version = ServerVersion.parse(reported)

    assert (version.lite, version.number) == (lite, number)
    assert version.scalar_index("VARCHAR") == varchar_index
    assert version.scalar_index("INT64") == int_index
    assert version.orders_writes_by_timestamp is session_first_look
    assert version.can_add_field is add_field
    assert version.name.startswith("Milvus Lite" if lite else "Milvus 2.")


@pytest.mark.parametrize("reported", ["v2.2.16", "2.1.0", "v1.1.1"])
def test_a_server_older_than_2_3_is_refused_naming_its_version(reported):
    with pytest.raises(StoreError, match=rf"the server is {reported}; dedup needs Milvus 2\.3"):
        ServerVersion.parse(reported)


@pytest.mark.parametrize("reported", ["", "unknown", "None"])
def test_an_unreadable_version_is_refused_naming_it(reported):
    with pytest.raises(StoreError, match="cannot read the server version"):
        ServerVersion.parse(reported)
