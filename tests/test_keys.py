"""`dedup keys` writes secrets that no other user can read at any moment."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dedup.ops.keys import make_keys

PRIVATE = {"server.key", "registration.key", "investigator.key", "admin.key", "tokens.txt",
           "audit.key"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def open_umask():
    """The worst case: a umask that lets every new file be read and written by anyone."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_directories_are_0700_and_secrets_0600_even_with_an_open_umask(tmp_path: Path,
                                                                       open_umask) -> None:
    out = tmp_path / "keys"
    files = make_keys(out, token_address="127.0.0.1:0")
    assert mode(out) == 0o700
    ca_key = tmp_path / "keys-ca" / "ca.key"
    assert ca_key in files and mode(ca_key.parent) == 0o700 and mode(ca_key) == 0o600
    for name in PRIVATE:
        assert mode(out / name) == 0o600, name
    # Nothing in the server's directory is readable or writable by group or others.
    assert all(mode(path) & 0o077 == 0 for path in out.iterdir())


def test_the_ca_key_is_not_among_the_files_the_server_reads(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    make_keys(out, token_address="127.0.0.1:0")
    assert not (out / "ca.key").exists()
    assert "ca.key" not in (out / "security.toml").read_text()


def test_a_planted_symlink_is_refused_not_written_through(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    out.mkdir()
    victim = tmp_path / "elsewhere"
    (out / "server.key").symlink_to(victim)
    with pytest.raises(FileExistsError):
        make_keys(out, token_address="127.0.0.1:0")
    assert not victim.exists()


def test_an_existing_empty_directory_is_narrowed_to_0700(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    out.mkdir(mode=0o755)
    make_keys(out, token_address="127.0.0.1:0", ca_dir=tmp_path / "offline-ca")
    assert mode(out) == 0o700 and (tmp_path / "offline-ca" / "ca.key").exists()
