"""Fixtures of the transport tests: a CA and trust bundle made in a tmp dir per module."""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # hide the handshake failures we provoke

import pytest  # noqa: E402
from transport_support import Pki  # noqa: E402

from swarmnode.identity import create_ca, make_bundle  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = create_ca(root / "ca", "Swarm CA", org="Consortium")
    return Pki(root, ca, make_bundle([ca[0]], root / "trust.pem"))
