"""A compressed update over real mutual-TLS sockets: the leader's servers (data plane, and gRPC
when the data plane is gone) check a pushed update against the training spec's two layouts
(whole, or the compressed change) and hand it over parsed; a mix of the two is refused."""

from __future__ import annotations

import pytest
import torch
from transport_support import MemoryAuthority, MemoryHandler, Pki, model_state

from swarmnode.errors import PayloadRejected
from swarmnode.transport import compression, serde
from swarmnode.transport.peer import PeerClient, PeerServer

LEADER, ALICE = ("0x" + c * 40 for c in "12")


@pytest.mark.parametrize("over", ["data plane", "grpc"])
def test_the_leaders_servers_take_a_compressed_update_and_refuse_a_mixed_one(
        pki: Pki, over: str) -> None:
    tls = {LEADER: pki.node(f"c-leader-{over[0]}"), ALICE: pki.node(f"c-alice-{over[0]}")}
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={1: {LEADER, ALICE}})
    handler = MemoryHandler()
    base, state = model_state(0), model_state(3)
    params = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in base.items()}
    spec = compression.UpdateSpec(params, "bf16")
    srv = PeerServer("127.0.0.1:0", tls[LEADER], authority, handler, spec, max_bytes=1 << 24)
    port = srv.start()
    try:
        if over == "grpc":
            assert srv.data is not None
            srv.data.stop()
        wire, _ = compression.encode(state, base, "bf16")  # type: ignore[misc]
        with PeerClient(f"127.0.0.1:{port}", tls[ALICE], ALICE, LEADER, authority) as alice:
            mixed = serde.encode({**wire, "fc.bias": state["fc.bias"]})
            with pytest.raises(PayloadRejected, match="bf16-compressed update"):
                alice.push_update(1, 5, mixed, timeout=20)
            alice.push_update(1, 5, serde.encode(wire), timeout=20)
            assert (alice._data is not None) == (over == "data plane")
        _, got, _ = handler.updates[(1, ALICE)]
        assert got["fc.weight"].dtype == torch.bfloat16
        assert got["bn.num_batches"].dtype == torch.int64
        full = compression.decode(got, base, spec.params, "bf16")
        torch.testing.assert_close(full["fc.weight"], state["fc.weight"], rtol=0, atol=2e-2)
    finally:
        srv.stop(0)
