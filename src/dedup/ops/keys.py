"""`dedup keys`: a test CA, server and client certificates, tokens and a security file, for
local use and tests. Production deployments bring their own CA and tokens.

Every secret is created with O_CREAT|O_EXCL and mode 0600 inside a directory created 0700, so
no other user can read it at any moment (a file chmod'ed after writing was readable between
the two), and an existing file or a planted symlink is refused rather than written through.
The CA's private key goes to a directory of its own, apart from the files the server reads:
whoever holds it can mint a certificate of any role; it belongs offline, not on the server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dedup.core.audit_chain import KEY_BYTES
from dedup.core.security import ROLES, token_digest

_VALID_DAYS = 365
AUDIT_KEY_FILE = "audit.key"


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dedup (test keys)"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days)))


def make_ca(common_name: str = "dedup test CA", days: int = _VALID_DAYS) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (_builder(common_name, _name(common_name), key.public_key(), days)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(key, hashes.SHA256()))
    return Issued(key, certificate)


def issue(ca: Issued, common_name: str, server: bool, hosts: tuple[str, ...] = (),
          days: int = _VALID_DAYS) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(common_name, ca.certificate.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]),
                                        critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_pair(issued: Issued, directory: Path, stem: str, key_directory: Path | None = None
               ) -> None:
    """`stem.crt` into `directory`, `stem.key` into `key_directory` (default: the same)."""
    _write(directory / f"{stem}.crt", issued.certificate.public_bytes(serialization.Encoding.PEM))
    _write((key_directory or directory) / f"{stem}.key", issued.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _write(path: Path, data: bytes) -> None:
    """A new file, readable by its owner only from the moment it exists."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def private_directory(path: Path) -> Path:
    """`path` as a directory of mode 0700: created so, or an existing empty directory of
    this user's (not a symlink) narrowed to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if path.is_symlink() or not path.is_dir() or any(path.iterdir()) \
                or path.stat().st_uid != os.getuid():
            raise FileExistsError(f"{path}: exists and is not an empty directory of this "
                                  "user's; give a new directory") from None
    os.chmod(path, 0o700)  # mkdir's mode is cut by the umask; 0700 only ever narrows it
    return path


def default_ca_dir(out: Path) -> Path:
    return out.parent / f"{out.name}-ca"


def make_keys(out: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
              token_address: str = "127.0.0.1:50052", token_days: int = 90,
              ca_dir: Path | None = None) -> list[Path]:
    """Writes into a new directory `out` (mode 0700): ca.crt, server.crt/.key,
    <role>.crt/.key per role, tokens.txt (the tokens themselves, for the clients),
    audit.key (authenticates the audit trail) and security.toml (the tokens' hashes only);
    and ca.key into a new directory `ca_dir` (default `<out>-ca`). Returns the files
    written, ca.key last."""
    private_directory(out)
    ca_dir = private_directory(ca_dir or default_ca_dir(out))
    ca = make_ca()
    write_pair(ca, out, "ca", key_directory=ca_dir)
    write_pair(issue(ca, "dedup server", server=True, hosts=hosts), out, "server")
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=token_days)).replace(microsecond=0)
    clients, tokens, token_lines = [], [], []
    for role in ROLES:
        write_pair(issue(ca, f"{role}-client", server=False), out, role)
        clients.append(f'[[clients]]\ncommon_name = "{role}-client"\nrole = "{role}"\n')
        token = secrets.token_urlsafe(32)
        token_lines.append(f"{role} {token}\n")
        tokens.append(f'[[tokens]]\nname = "{role}-token"\nrole = "{role}"\n'
                      f'sha256 = "{token_digest(token)}"\nexpires = {expires.isoformat()}\n')
    _write(out / "tokens.txt", "".join(token_lines).encode())
    _write(out / AUDIT_KEY_FILE, (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode())
    security = (
        "# dedup security file (made by `dedup keys`; for local use and tests)\n"
        '[tls]\ncertificate = "server.crt"\nprivate_key = "server.key"\n'
        'client_ca = "ca.crt"\n\n'
        f'[listen]\n# bearer tokens over server TLS\ntoken_address = "{token_address}"\n\n'
        "# mutual TLS: client certificate common name -> role\n" + "\n".join(clients) + "\n"
        "# bearer tokens: only their SHA-256 is kept here\n" + "\n".join(tokens) + "\n"
        "# authenticates the audit trail and pseudonymises the ID numbers and phone numbers\n"
        "# in it; keep it out of the data directory (and a copy with the auditors)\n"
        f'[audit]\nkey_file = "{AUDIT_KEY_FILE}"\n')
    _write(out / "security.toml", security.encode())
    return [*sorted(out.iterdir()), ca_dir / "ca.key"]
