"""A trainer's call that meets a stopping node service gets NodeUnavailable (which its callback
waits out and retries after the restart), never an internal error that ends the training: the
race CI once hit (SIGTERM while a sync arrived: the digest thread pool was already shut down)."""

from __future__ import annotations

import pytest
import torch

from swarmnode.errors import NodeUnavailable
from swarmnode.node.service import _LocalApi
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm
from swarmnode.transport import serde

STATE = {"w": torch.zeros(3, 2)}


@pytest.fixture()
def swarm():  # type: ignore[no-untyped-def]
    spec = TrainingSpec.from_state(STATE, sync_frequency=1, min_peers=2, merge_method="mean")
    with InProcessSwarm(2, spec, min_peers=2) as s:
        yield s


def test_a_call_after_stop_began_answers_node_unavailable(swarm) -> None:  # type: ignore[no-untyped-def]
    service = swarm.sites[0].service
    service.stop()
    with pytest.raises(NodeUnavailable, match="stopping"):
        _LocalApi(service).call("sync", {"weight": 1}, serde.encode(STATE))


def test_a_sync_that_stop_overtakes_answers_node_unavailable(swarm) -> None:  # type: ignore[no-untyped-def]
    """stop() runs between the call's admission and its first use of the driver (the exact
    interleaving is forced: stop() inside prehash, before it hands the digest to the pool)."""
    service = swarm.sites[0].service
    prehash = service.driver.prehash

    def stop_then_prehash(payload):  # type: ignore[no-untyped-def]
        service.stop()
        prehash(payload)

    service.driver.prehash = stop_then_prehash
    with pytest.raises(NodeUnavailable):
        _LocalApi(service).call("sync", {"weight": 1}, serde.encode(STATE))
