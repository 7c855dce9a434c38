"""X.509 identity: CAs, node certificates, trust bundles, and the files a TLS endpoint loads.

A node's chain address is bound to ``fingerprint(cert)`` (SHA-256 of the certificate's DER), which
the contract stores when the admin authorises the node.
"""

from __future__ import annotations

from swarmnode.identity.certs import (
    CertInfo,
    create_ca,
    describe,
    describe_all,
    fingerprint,
    issue_node_cert,
    load_certs,
    load_private_key,
    make_bundle,
)
from swarmnode.identity.tls import TlsFiles, check_validity

__all__ = [
    "CertInfo",
    "TlsFiles",
    "check_validity",
    "create_ca",
    "describe",
    "describe_all",
    "fingerprint",
    "issue_node_cert",
    "load_certs",
    "load_private_key",
    "make_bundle",
]
