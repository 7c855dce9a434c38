"""TlsFiles: the checks that run before any socket opens, each naming the file and the cause."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from swarmnode.errors import IdentityError
from swarmnode.identity import TlsFiles, create_ca, describe, issue_node_cert, make_bundle

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture()
def pki(tmp_path: Path) -> tuple[tuple[Path, Path], Path]:
    ca = create_ca(tmp_path / "ca", "CA")
    return ca, make_bundle([ca[0]], tmp_path / "trust.pem")


def _node(tmp_path: Path, ca: tuple[Path, Path], name: str, **kw: object) -> tuple[Path, Path]:
    return issue_node_cert(*ca, tmp_path / name, name, dns=["localhost"], ips=[], **kw)


def test_load_returns_the_pems(pki, tmp_path: Path) -> None:
    ca, trust = pki
    cert, key = _node(tmp_path, ca, "n")
    files = TlsFiles(cert, key, trust)
    assert files.load() == (cert.read_bytes(), key.read_bytes(), trust.read_bytes())
    assert files.fingerprint() == describe(cert).fingerprint


def test_missing_files_are_named(pki, tmp_path: Path) -> None:
    ca, trust = pki
    cert, key = _node(tmp_path, ca, "n")
    with pytest.raises(IdentityError, match=r"TLS key file .*nope\.key does not exist"):
        TlsFiles(cert, tmp_path / "nope.key", trust).load()
    with pytest.raises(IdentityError, match=r"TLS trust file .*none\.pem does not exist.*bundle"):
        TlsFiles(cert, key, tmp_path / "none.pem").load()
    with pytest.raises(IdentityError, match=r"TLS certificate file .*x\.pem does not exist"):
        TlsFiles(tmp_path / "x.pem", key, trust).load()


def test_key_of_another_certificate(pki, tmp_path: Path) -> None:
    ca, trust = pki
    cert, _ = _node(tmp_path, ca, "a")
    _, other_key = _node(tmp_path, ca, "b")
    with pytest.raises(IdentityError, match=r"b\.key does not belong to certificate .*a\.pem"):
        TlsFiles(cert, other_key, trust).load()


def test_expired_and_not_yet_valid(pki, tmp_path: Path) -> None:
    ca, trust = pki
    old = _node(tmp_path, ca, "old", not_before=NOW - dt.timedelta(days=30),
                not_after=NOW - dt.timedelta(days=2))
    expiry = describe(old[0]).not_after
    with pytest.raises(IdentityError, match=rf"old\.pem expired on {expiry:%Y-%m-%d %H:%M:%S} UTC"):
        TlsFiles(*old, trust).load()
    future = _node(tmp_path, ca, "future", not_before=NOW + dt.timedelta(days=3),
                   not_after=NOW + dt.timedelta(days=30))
    start = describe(future[0]).not_before
    msg = rf"future\.pem is not valid yet: valid from {start:%Y-%m-%d %H:%M:%S} UTC"
    with pytest.raises(IdentityError, match=msg):
        TlsFiles(*future, trust).load()


def test_encrypted_key_and_wrong_contents(pki, tmp_path: Path) -> None:
    ca, trust = pki
    cert, key = _node(tmp_path, ca, "n")
    enc = tmp_path / "enc.key"
    enc.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    with pytest.raises(IdentityError, match=r"enc\.key is encrypted"):
        TlsFiles(cert, enc, trust).load()
    with pytest.raises(IdentityError, match=r"trust bundle file .*n\.key holds no PEM certificate"):
        TlsFiles(cert, key, key).load()
    with pytest.raises(IdentityError, match=r"n\.pem is not a PEM private key"):
        TlsFiles(cert, cert, trust).load()
