"""CAs, node certificates, trust bundles: real keys and certificates in tmp dirs."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from swarmnode.errors import IdentityError
from swarmnode.identity import (
    create_ca,
    describe,
    describe_all,
    fingerprint,
    issue_node_cert,
    load_certs,
    make_bundle,
)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def ca(tmp_path: Path) -> tuple[Path, Path]:
    return create_ca(tmp_path / "ca", "Hospital A CA", org="Hospital A", days=30)


def test_create_ca(ca: tuple[Path, Path]) -> None:
    cert_path, key_path = ca
    assert cert_path.name == "Hospital-A-CA.pem" and key_path.name == "Hospital-A-CA.key"
    cert = _cert(cert_path)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    cert.verify_directly_issued_by(cert)  # self-signed
    assert cert.subject.rfc4514_string() == "CN=Hospital A CA,O=Hospital A"
    life = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < life <= dt.timedelta(days=30)
    assert _mode(key_path) == 0o600


def test_issue_node_cert(ca: tuple[Path, Path], tmp_path: Path) -> None:
    cert_path, key_path = issue_node_cert(
        *ca, tmp_path / "n1", "node-1", dns=["node1.example.org", "localhost"],
        ips=["127.0.0.1", "::1"],
    )
    cert = _cert(cert_path)
    cert.verify_directly_issued_by(_cert(ca[0]))
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[attr-defined]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node1.example.org", "localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.rfc4514_string() == "CN=node-1,O=Hospital A"  # organisation of the CA
    # capped at the CA's expiry: a node certificate never outlives its issuer
    assert cert.not_valid_after_utc == _cert(ca[0]).not_valid_after_utc
    assert _mode(key_path) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key() == cert.public_key()


def test_key_mode_is_0600_whatever_the_umask(ca: tuple[Path, Path], tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        _, key = issue_node_cert(*ca, tmp_path / "n", "n", dns=["localhost"], ips=[])
    finally:
        os.umask(old)
    assert _mode(key) == 0o600


def test_describe_and_fingerprint(ca: tuple[Path, Path], tmp_path: Path) -> None:
    cert_path, _ = issue_node_cert(*ca, tmp_path / "n", "n", dns=["h.example"], ips=["10.0.0.7"])
    info = describe(cert_path)
    der = _cert(cert_path).public_bytes(serialization.Encoding.DER)
    assert info.fingerprint == hashlib.sha256(der).digest() == fingerprint(der)
    assert fingerprint(cert_path.read_bytes()) == info.fingerprint  # PEM
    assert (info.dns, info.ips, info.is_ca) == (("h.example",), ("10.0.0.7",), False)
    assert info.issuer == "CN=Hospital A CA,O=Hospital A"
    assert info.to_json()["sha256"] == info.fingerprint.hex()
    assert describe(ca[0]).is_ca


def test_no_overwrite_without_force(ca: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "n"
    cert_path, key_path = issue_node_cert(*ca, out, "n", dns=["localhost"], ips=[])
    before = key_path.read_bytes()
    with pytest.raises(IdentityError, match=r"n\.key already exists.*--force"):
        issue_node_cert(*ca, out, "n", dns=["localhost"], ips=[])
    assert key_path.read_bytes() == before
    with pytest.raises(IdentityError, match="already exists"):
        create_ca(ca[0].parent, "Hospital A CA")
    old_fp = describe(cert_path).fingerprint
    issue_node_cert(*ca, out, "n", dns=["localhost"], ips=[], force=True)
    assert key_path.read_bytes() != before and describe(cert_path).fingerprint != old_fp
    assert _mode(key_path) == 0o600


def test_issue_refuses_bad_input(ca: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="not an IP address.*--dns"):
        issue_node_cert(*ca, tmp_path / "a", "a", dns=[], ips=["node1.example"])
    with pytest.raises(IdentityError, match="at least one --dns or --ip"):
        issue_node_cert(*ca, tmp_path / "b", "b", dns=[], ips=[])
    with pytest.raises(IdentityError, match="at least one day"):
        issue_node_cert(*ca, tmp_path / "c", "c", dns=["x"], ips=[], days=0)
    node_cert, node_key = issue_node_cert(*ca, tmp_path / "d", "d", dns=["x"], ips=[])
    with pytest.raises(IdentityError, match="not a CA certificate"):
        issue_node_cert(node_cert, node_key, tmp_path / "e", "e", dns=["x"], ips=[])
    other_ca = create_ca(tmp_path / "other", "Other CA")
    with pytest.raises(IdentityError, match="does not belong to CA certificate"):
        issue_node_cert(ca[0], other_ca[1], tmp_path / "f", "f", dns=["x"], ips=[])
    with pytest.raises(IdentityError, match="missing.pem does not exist"):
        issue_node_cert(tmp_path / "missing.pem", ca[1], tmp_path / "g", "g", dns=["x"], ips=[])
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_bundle_of_two_organisations(tmp_path: Path) -> None:
    a = create_ca(tmp_path / "a", "Org A CA", org="Org A")
    b = create_ca(tmp_path / "b", "Org B CA", org="Org B")
    bundle = make_bundle([a[0], b[0], a[0]], tmp_path / "trust.pem")
    assert [c.subject.rfc4514_string() for c in load_certs(bundle)] == [
        "CN=Org A CA,O=Org A", "CN=Org B CA,O=Org B"
    ]  # deduplicated
    again = make_bundle([bundle], tmp_path / "again.pem")  # a bundle is a valid input
    assert again.read_bytes() == bundle.read_bytes()
    assert len(describe_all(bundle)) == 2
    node, _ = issue_node_cert(*a, tmp_path / "n", "n", dns=["x"], ips=[])
    with pytest.raises(IdentityError, match="not a CA certificate"):
        make_bundle([a[0], node], tmp_path / "bad.pem")


def _tls_pair(bundle: Path, server: tuple[Path, Path], client: tuple[Path, Path]) -> bytes:
    """A real mutual-TLS handshake over loopback; returns the server's view of the client cert."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*server)
    sctx.load_verify_locations(bundle)
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_cert_chain(*client)
    cctx.load_verify_locations(bundle)
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes | Exception] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with sctx.wrap_socket(conn, server_side=True) as tls:
                seen.append(tls.getpeercert(binary_form=True) or b"")
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    got = b""
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with cctx.wrap_socket(raw, server_hostname="localhost") as tls:
                got = tls.recv(2)
    except (ssl.SSLError, OSError):
        pass  # the server's side of the story is the one asserted on
    finally:
        thread.join(5)
        listener.close()
    result = seen[0]
    if isinstance(result, Exception):
        raise result
    assert got == b"ok"
    return result


def test_two_organisations_trust_each_other_through_the_bundle(tmp_path: Path) -> None:
    a = create_ca(tmp_path / "a", "Org A CA", org="Org A")
    b = create_ca(tmp_path / "b", "Org B CA", org="Org B")
    node_a = issue_node_cert(*a, tmp_path / "na", "a", dns=["localhost"], ips=["127.0.0.1"])
    node_b = issue_node_cert(*b, tmp_path / "nb", "b", dns=["localhost"], ips=["127.0.0.1"])
    bundle = make_bundle([a[0], b[0]], tmp_path / "trust.pem")
    client_der = _tls_pair(bundle, node_a, node_b)
    assert fingerprint(client_der) == describe(node_b[0]).fingerprint
    _tls_pair(bundle, node_b, node_a)  # and the other way round
    only_a = make_bundle([a[0]], tmp_path / "only-a.pem")
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        _tls_pair(only_a, node_a, node_b)  # without B's CA in the bundle, A's server refuses B
