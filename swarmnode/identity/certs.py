"""X.509 material for a swarm: consortium/organisation CAs, node certificates, trust bundles.

Every key is EC P-256. A node certificate carries the DNS names and IP addresses other sites use to
reach it (gRPC checks them against the endpoint the contract publishes) and the extended key usages
serverAuth and clientAuth (the same certificate serves the peer API and calls other peers). The
chain binds a node's address to ``fingerprint(cert)``: the SHA-256 of the certificate's DER.

Private keys are written with mode 0600 through ``O_CREAT | O_EXCL``; nothing here overwrites an
existing file unless ``force`` is given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from swarmnode.errors import IdentityError

__all__ = [
    "CertInfo",
    "check_cert_matches_key",
    "create_ca",
    "describe",
    "describe_all",
    "fingerprint",
    "issue_node_cert",
    "load_certs",
    "load_private_key",
    "make_bundle",
    "make_key_and_csr",
    "sign_csr",
]

_SKEW = dt.timedelta(minutes=5)  # back-date not_before a little: clocks of sites differ


@dataclass(frozen=True)
class CertInfo:
    """What ``swarmnode certs show`` prints about one certificate."""

    subject: str
    issuer: str
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: bytes  # SHA-256 of the DER: what the contract stores per node address
    is_ca: bool

    def to_json(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "dns": list(self.dns),
            "ips": list(self.ips),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "sha256": self.fingerprint.hex(),
            "is_ca": self.is_ca,
        }


# -- reading -------------------------------------------------------------------------------------
def fingerprint(cert: x509.Certificate | bytes) -> bytes:
    """SHA-256 (32 bytes) of a certificate's DER; ``cert`` may be parsed, PEM or DER."""
    if isinstance(cert, x509.Certificate):
        der = cert.public_bytes(serialization.Encoding.DER)
    elif cert.lstrip().startswith(b"-----BEGIN"):
        der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    else:
        der = bytes(cert)
    return hashlib.sha256(der).digest()


def load_certs(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    """Every certificate in a PEM file; IdentityError naming the file if there is none."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(
            f"{what} file {path} does not exist; create it with `swarmnode certs`"
        ) from None
    except PermissionError:
        uid = os.getuid()
        raise IdentityError(
            f"cannot read {what} file {path}: permission denied for uid {uid}, the user this "
            f"process runs as; make it readable by that user (`chown {uid} {path}` on the host "
            "for a compose secret; the mode stays 0600)"
        ) from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} file {path}: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise IdentityError(f"{what} file {path} holds no PEM certificate; is it a key or empty?")
    return certs


def load_private_key(path: Path, what: str = "key") -> ec.EllipticCurvePrivateKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} file {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise IdentityError(
            f"{what} file {path} is encrypted; swarmnode needs an unencrypted PEM key "
            "(protect it with file mode 0600 instead)"
        ) from None
    except ValueError:
        raise IdentityError(f"{what} file {path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{what} file {path} is not an EC key; swarmnode uses EC P-256 keys")
    return key


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def describe(cert_path: Path) -> CertInfo:
    """Subject, issuer, SANs, validity, fingerprint of the first certificate in ``cert_path``."""
    return _info(load_certs(cert_path)[0])


def describe_all(path: Path) -> list[CertInfo]:
    """Every certificate in a PEM file (a node certificate with its chain, or a bundle)."""
    return [_info(c) for c in load_certs(path)]


def _info(cert: x509.Certificate) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        dns=dns,
        ips=ips,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=fingerprint(cert),
        is_ca=_is_ca(cert),
    )


# -- writing -------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-.")
    if not slug:
        raise IdentityError(f"name {name!r} gives no usable file name; use letters and digits")
    return slug


def _targets(out_dir: Path, name: str, force: bool) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = _slug(name)
    cert_path, key_path = out_dir / f"{slug}.pem", out_dir / f"{slug}.key"
    if not force:
        for path in (key_path, cert_path):
            if path.exists():
                raise IdentityError(
                    f"{path} already exists; refusing to overwrite it (pass --force / force=True "
                    "to replace it; the old key is then lost)"
                )
    return cert_path, key_path


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` (a leftover is removed first: callers checked)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _name(cn: str, org: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _check_days(days: int) -> None:
    if days <= 0:
        raise IdentityError(f"validity must be at least one day, got days={days}")


def create_ca(
    out_dir: Path, name: str, org: str | None = None, days: int = 3650, force: bool = False
) -> tuple[Path, Path]:
    """A self-signed CA (EC P-256, CA:true, keyCertSign) as ``out_dir/<name>.pem`` and ``.key``."""
    _check_days(days)
    cert_path, key_path = _targets(out_dir, name, force)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = _name(name, org)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def _sans(dns: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise IdentityError(
                f"{ip!r} is not an IP address; pass host names with --dns instead of --ip"
            ) from None
    if not names:
        raise IdentityError(
            "a node certificate needs at least one --dns or --ip: the host name or address the "
            "other sites use to reach this node"
        )
    return names


def issue_node_cert(
    ca_cert: Path,
    ca_key: Path,
    out_dir: Path,
    name: str,
    dns: Sequence[str],
    ips: Sequence[str],
    days: int = 825,
    force: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """A node certificate signed by the CA: EC P-256, SANs, EKU serverAuth + clientAuth.

    Its validity ends at the CA's at the latest (unless ``not_after`` is given explicitly: tests
    make expired and not-yet-valid certificates that way). Its organisation is the CA's.
    """
    _check_days(days)
    ca, signer = _load_ca(ca_cert, ca_key)
    sans = _sans(dns, ips)
    cert_path, key_path = _targets(out_dir, name, force)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start = not_before if not_before is not None else now - _SKEW
    end = not_after if not_after is not None else min(
        now + dt.timedelta(days=days), ca.not_valid_after_utc
    )
    cert = _node_certificate(ca, signer, key.public_key(), name, sans, start, end)
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def _load_ca(ca_cert: Path, ca_key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and its key, checked to be a CA and to belong together."""
    ca = load_certs(ca_cert, "CA certificate")[0]
    if not _is_ca(ca):
        raise IdentityError(
            f"{ca_cert} is not a CA certificate (basicConstraints CA:false); pass the CA made "
            "by `swarmnode certs ca`"
        )
    signer = load_private_key(ca_key, "CA key")
    if _spki_of(signer.public_key()) != _spki_of(ca.public_key()):
        raise IdentityError(f"CA key {ca_key} does not belong to CA certificate {ca_cert}")
    return ca, signer


def _spki_of(public_key: Any) -> bytes:
    return public_key.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _node_certificate(
    ca: x509.Certificate, signer: ec.EllipticCurvePrivateKey, public_key: Any, name: str,
    sans: list[x509.GeneralName], start: dt.datetime, end: dt.datetime,
) -> x509.Certificate:
    """A node certificate for ``public_key``: EKU serverAuth + clientAuth, the CA's organisation."""
    orgs = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    org = str(orgs[0].value) if orgs else None
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(_name(name, org))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(signer, hashes.SHA256())
    )


def make_key_and_csr(key_path: Path, name: str, dns: Sequence[str]) -> bytes:
    """A node key (EC P-256, written to ``key_path`` with mode 0600) and a certificate request
    for it (PEM, returned): what a site makes itself, so its key never leaves it."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(name, None))
        .add_extension(x509.SubjectAlternativeName(_sans(dns, [])), critical=False)
        .sign(key, hashes.SHA256())
    )
    Path(key_path).parent.mkdir(parents=True, exist_ok=True)
    _write(Path(key_path), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_csr(ca_cert: Path, ca_key: Path, csr_pem: bytes, name: str, dns: Sequence[str],
             days: int = 825) -> bytes:
    """A node certificate (PEM) for the key of a site's request, signed by the CA. The request
    must be signed by that key and name ``name``; the SANs are ``dns`` (the consortium file's),
    not whatever the request asks for."""
    _check_days(days)
    ca, signer = _load_ca(ca_cert, ca_key)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise IdentityError(
            f"the request of {name} is not a PEM certificate request: {exc}"
        ) from None
    if not csr.is_signature_valid:
        raise IdentityError(f"the request of {name} is not signed by the key it carries: refused")
    cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or cn[0].value != name:
        asked = cn[0].value if cn else "(none)"
        raise IdentityError(f"the request of {name} names {asked!r}: a site's request must name "
                            "the site (swarmnode site request --name SITE)")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise IdentityError(f"the request of {name} is not for an EC key; make it with "
                            "`swarmnode site request`")
    now = dt.datetime.now(dt.UTC)
    end = min(now + dt.timedelta(days=days), ca.not_valid_after_utc)
    cert = _node_certificate(ca, signer, csr.public_key(), name, _sans(dns, []), now - _SKEW, end)
    return cert.public_bytes(serialization.Encoding.PEM)


def check_cert_matches_key(cert_path: Path, key_path: Path) -> None:
    """IdentityError unless the certificate is for this private key."""
    cert = load_certs(cert_path)[0]
    key = load_private_key(key_path)
    if _spki_of(cert.public_key()) != _spki_of(key.public_key()):
        raise IdentityError(f"{cert_path} does not belong to this site's key {key_path}: it was "
                            "signed for another key (keys made again after the request?); send "
                            "the admin a new request")


def make_bundle(ca_certs: Sequence[Path], out: Path) -> Path:
    """A trust bundle: the CA certificates of every organisation of the swarm, in one PEM file.

    Each input may itself be a bundle; duplicates are dropped; a non-CA certificate is refused.
    """
    if not ca_certs:
        raise IdentityError("a trust bundle needs at least one CA certificate")
    seen: set[bytes] = set()
    pems: list[bytes] = []
    for path in ca_certs:
        for cert in load_certs(path, "CA certificate"):
            if not _is_ca(cert):
                raise IdentityError(
                    f"{path} holds {cert.subject.rfc4514_string()}, which is not a CA certificate; "
                    "a trust bundle holds the CAs that issued the node certificates"
                )
            fp = fingerprint(cert)
            if fp not in seen:
                seen.add(fp)
                pems.append(cert.public_bytes(serialization.Encoding.PEM))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"".join(pems))
    return out
