"""The three files a TLS endpoint needs, checked before any socket opens."""

from __future__ import annotations

import datetime as dt
import logging
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from swarmnode.errors import IdentityError
from swarmnode.identity.certs import fingerprint, load_certs, load_private_key

__all__ = ["TlsFiles", "check_validity"]

log = logging.getLogger("swarmnode.identity")


def check_validity(cert: x509.Certificate, path: Path, now: dt.datetime | None = None) -> None:
    """IdentityError naming the dates and the file if ``cert`` is expired or not yet valid."""
    now = now or dt.datetime.now(dt.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        raise IdentityError(
            f"certificate {path} is not valid yet: valid from {start:%Y-%m-%d %H:%M:%S} UTC "
            f"(now {now:%Y-%m-%d %H:%M:%S} UTC); check this machine's clock or reissue it"
        )
    if now > end:
        raise IdentityError(
            f"certificate {path} expired on {end:%Y-%m-%d %H:%M:%S} UTC (now "
            f"{now:%Y-%m-%d %H:%M:%S} UTC); issue a new one with `swarmnode certs issue` and ask "
            "the swarm admin to authorise its fingerprint"
        )


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class TlsFiles:
    """This node's certificate (leaf first, chain may follow), its key, and the trust bundle."""

    cert: Path
    key: Path
    trust: Path

    def load(self) -> tuple[bytes, bytes, bytes]:
        """(cert_pem, key_pem, trust_pem), after checking that they fit together and are valid."""
        cert_path, key_path, trust_path = Path(self.cert), Path(self.key), Path(self.trust)
        for role, path in (("certificate", cert_path), ("key", key_path), ("trust", trust_path)):
            if not path.is_file():
                raise IdentityError(
                    f"TLS {role} file {path} does not exist; create it with `swarmnode certs "
                    f"{'bundle' if role == 'trust' else 'issue'}` or fix the path in the config"
                )
        leaf = load_certs(cert_path, "TLS certificate")[0]
        key = load_private_key(key_path, "TLS key")
        if _spki(key.public_key()) != _spki(leaf.public_key()):
            raise IdentityError(
                f"key {key_path} does not belong to certificate {cert_path}; use the key file "
                "written next to the certificate by `swarmnode certs issue`"
            )
        check_validity(leaf, cert_path)
        load_certs(trust_path, "trust bundle")
        mode = key_path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("key %s is readable by others (mode %o); chmod 600 it", key_path,
                        stat.S_IMODE(mode))
        return cert_path.read_bytes(), key_path.read_bytes(), trust_path.read_bytes()

    def fingerprint(self) -> bytes:
        """SHA-256 of this node's certificate DER (what the contract must hold for it)."""
        return fingerprint(load_certs(Path(self.cert), "TLS certificate")[0])
