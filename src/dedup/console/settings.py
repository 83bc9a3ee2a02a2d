"""What `dedup console` is started with: the server it calls and how, where it listens and how,
and the limits of its pages. Checked once at start (ConfigError naming the option)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from dedup.core.errors import ConfigError
from dedup.core.security import is_loopback
from dedup.core.settings import CaptureRules

# An uploaded photo may be as large as Face.image may be (the server refuses more anyway).
DEFAULT_MAX_UPLOAD_BYTES = CaptureRules().max_image_bytes


@dataclass(frozen=True)
class AuditSource:
    """Where the admin pages read the audit trail (`dedup audit verify|export` beside the
    server): an embedded data directory or a Milvus URI, the audit key and an anchor file."""

    data_dir: Path | None = None
    milvus_uri: str = ""
    key: Path | None = None
    anchor: Path | None = None

    @property
    def configured(self) -> bool:
        return self.data_dir is not None or bool(self.milvus_uri)

    def trail_arguments(self) -> list[str]:
        return [str(self.data_dir)] if self.data_dir is not None else [
            "--milvus-uri", self.milvus_uri]


@dataclass(frozen=True)
class ConsoleSettings:
    server: str = "127.0.0.1:50051"
    # The CA certificate that signed the server's; None: a plain channel to an
    # unauthenticated (loopback, development) server, where sign-in takes no token.
    ca: Path | None = None
    address: str = "127.0.0.1:8080"
    certificate: Path | None = None
    private_key: Path | None = None
    # e.g. "https://bss.example/photos/{registration_id}": the browser fetches each photo.
    photo_url_template: str = ""
    idle_timeout_s: float = 15 * 60
    session_lifetime_s: float = 12 * 3600
    call_timeout_s: float = 30.0
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    audit: AuditSource = AuditSource()

    @property
    def https(self) -> bool:
        return self.certificate is not None

    @property
    def authenticated(self) -> bool:
        return self.ca is not None

    def check(self) -> None:
        """ConfigError for options that do not go together."""
        if (self.certificate is None) != (self.private_key is None):
            raise ConfigError("--certificate and --private-key go together")
        if not self.https and not is_loopback(self.address):
            raise ConfigError(f"--address {self.address}: plain HTTP only on loopback (the "
                              "session cookie and the pages would cross the network in clear); "
                              "give --certificate and --private-key to serve HTTPS")
        if not self.authenticated and not is_loopback(self.address):
            raise ConfigError(f"--address {self.address}: without --ca the server is an "
                              "unauthenticated development server and anyone signing in is "
                              "its admin; the console then listens on loopback only")
        if self.photo_url_template:
            photo_origin(self.photo_url_template)
        if self.max_upload_bytes <= 0 or self.idle_timeout_s <= 0:
            raise ConfigError("--max-upload-bytes and --idle-timeout must be positive")

    def photo_url(self, registration_id: str) -> str:
        if not self.photo_url_template:
            return ""
        return self.photo_url_template.replace("{registration_id}",
                                               quote(registration_id, safe=""))


def photo_origin(template: str) -> str:
    """The origin (scheme://host[:port]) the carrier's photos come from, for the page's CSP."""
    parts = urlsplit(template.replace("{registration_id}", "x"))
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ConfigError(f"--photo-url-template {template!r}: an absolute http(s) URL")
    if "{registration_id}" not in template:
        raise ConfigError("--photo-url-template must contain {registration_id}")
    if any(char in parts.netloc for char in " ;'\"*"):
        raise ConfigError(f"--photo-url-template {template!r}: not a plain host name")
    return f"{parts.scheme}://{parts.netloc}"



def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r}: give HOST:PORT")
    return host.strip("[]"), int(port)
