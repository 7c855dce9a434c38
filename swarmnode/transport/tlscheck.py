"""A TLS handshake of our own with a peer: pin its certificate, and explain refused handshakes.

gRPC Python gives a client no access to the server's certificate, and reports a refused handshake
only as ``UNAVAILABLE: Socket closed``. So before it trusts a peer endpoint, :class:`PeerClient`
runs :func:`probe`: a TLS handshake with the Python ``ssl`` module using the same certificate, key
and trust bundle as its gRPC channel. The probe

* verifies the server's chain against our trust bundle and its SAN against the endpoint's host (as
  gRPC does on each of its connections),
* returns the SHA-256 fingerprint of the server certificate, which the caller compares with the
  fingerprint the contract holds for the peer's address, and
* waits for the server's first HTTP/2 frame, which a gRPC server sends only after it accepted our
  certificate: a server that closes the connection instead refused us, and :func:`own_problems`
  says what is likely wrong on our side (expired or not-yet-valid certificate, an issuer outside
  the swarm's bundle, no certificate at all).
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from swarmnode.errors import IdentityError, PeerRefused, PeerUnavailable
from swarmnode.identity import fingerprint, load_certs
from swarmnode.transport._rpc import host_port

__all__ = ["Probe", "own_problems", "probe"]


@dataclass(frozen=True)
class Probe:
    fingerprint: bytes  # SHA-256 of the server certificate's DER
    subject: str


def own_problems(cert: Path | None, trust: Path) -> list[str]:
    """What may make a peer refuse our certificate, as far as this side can tell."""
    if cert is None:
        return ["we sent no client certificate, and every swarm peer requires one"]
    try:
        leaf = load_certs(cert, "TLS certificate")[0]
        roots = load_certs(trust, "trust bundle")
    except IdentityError as exc:
        return [str(exc)]
    problems = []
    now = dt.datetime.now(dt.UTC)
    if now > leaf.not_valid_after_utc:
        problems.append(
            f"our certificate {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if now < leaf.not_valid_before_utc:
        problems.append(
            f"our certificate {cert} is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)"
        )
    if not any(_issued_by(leaf, root) for root in roots):
        problems.append(
            f"our certificate's issuer {leaf.issuer.rfc4514_string()} is not in our trust bundle "
            f"{trust}: peers that use the swarm's bundle do not trust it (foreign CA?)"
        )
    return problems


def _issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
        return True
    except Exception:  # wrong issuer name, wrong key, unsupported key type
        return False


def refused_message(who: str, cert: Path | None, trust: Path) -> str:
    problems = own_problems(cert, trust)
    why = "; ".join(problems) if problems else (
        "our certificate looks valid here, so the peer's trust bundle probably lacks our CA or "
        "its clock is off"
    )
    return (
        f"{who} closed the TLS handshake: our certificate is not trusted by it (foreign CA?) or "
        f"expired; {why}"
    )


def probe(
    endpoint: str,
    cert: Path | None,
    key: Path | None,
    trust: Path,
    timeout: float = 5.0,
    who: str | None = None,
) -> Probe:
    """Handshake with ``endpoint`` as a swarm peer would; raise what went wrong, named."""
    who = who or f"the peer at {endpoint}"
    host, port = host_port(endpoint)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(trust))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    ctx.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise PeerUnavailable(
            f"cannot reach {who} at {endpoint}: {exc.strerror or exc}; is its node service "
            "running, and is the endpoint it enrolled with current?"
        ) from None
    with raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raise PeerRefused(
                f"{who} presented a certificate we do not trust: {exc.verify_message}; it must "
                f"be issued by a CA in our trust bundle {trust}, be valid now, and name "
                f"{host} in its SANs"
            ) from None
        except ssl.SSLError as exc:
            raise PeerRefused(
                f"TLS handshake with {who} failed ({exc.reason or exc}). "
                + refused_message(who, cert, trust)
            ) from None
        except OSError as exc:
            raise PeerUnavailable(f"{who} broke off the TLS handshake: {exc}") from None
        with tls:
            der = tls.getpeercert(binary_form=True)
            try:
                first = tls.recv(1)  # a gRPC server's SETTINGS frame: it accepted our certificate
            except TimeoutError:
                first = b"?"  # no verdict in time: gRPC's own handshake will tell
            except (ssl.SSLError, OSError):
                first = b""
            if not first:
                raise PeerRefused(refused_message(who, cert, trust))
    assert der is not None
    parsed = x509.load_der_x509_certificate(der)
    return Probe(fingerprint(der), parsed.subject.rfc4514_string())
