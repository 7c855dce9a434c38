"""The leader's collector (sealing, replays) and the node's model store (restart, ordering)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swarmnode import merge
from swarmnode.errors import DuplicateUpdate, MergeError, RoundError
from swarmnode.node.collector import Collector
from swarmnode.node.store import ModelStore
from swarmnode.transport import serde
from swarmnode.types import Update


def _u(value: float, weight: float, node: str) -> Update:
    return Update({"w": torch.full((3,), value)}, weight, node)


@pytest.mark.parametrize("method", ["mean", "coordmedian"])
def test_seal_merges_once_and_refuses_later_updates(method: str) -> None:
    c = Collector(1, 1, method, {})
    c.add(_u(1.0, 1, "a"))
    c.add(_u(3.0, 3, "b"))
    with pytest.raises(DuplicateUpdate, match="already sent its update"):
        c.add(_u(9.0, 3, "b"))
    merged, senders, total = c.seal()
    assert senders == {"a", "b"} and total == 4
    expected = 2.5 if method == "mean" else 3.0
    assert merged is not None and torch.allclose(merged["w"], torch.full((3,), expected))
    with pytest.raises(RoundError, match="already merged"):
        c.add(_u(5.0, 1, "c"))
    assert c.seal()[1] == senders  # idempotent: the same members every time


def test_seal_with_only_zero_weights_gives_no_model() -> None:
    c = Collector(1, 1, "mean", {})
    c.add(_u(1.0, 0, "a"))
    merged, senders, total = c.seal()
    assert merged is None and senders == {"a"} and total == 0


def _blob(value: float) -> tuple[bytes, bytes]:
    data = serde.encode({"w": torch.full((2,), value)})
    return data, serde.digest(data)


def test_store_survives_a_restart_and_never_goes_back(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    d5, h5 = _blob(5.0)
    d4, h4 = _blob(4.0)
    store.put(5, h5, d5)
    store.put(4, h4, d4)  # an older round finishing later must not replace the latest on disk
    assert store.flush()  # the disk copy is written off the round's critical path
    again = ModelStore(tmp_path)
    latest = again.latest()
    assert latest is not None and (latest.round, latest.digest) == (5, h5)


def test_a_next_training_on_the_same_folder_starts_afresh(tmp_path: Path) -> None:
    first, second = "0x" + "aa" * 20, "0x" + "bb" * 20
    d9, h9 = _blob(9.0)
    store = ModelStore(tmp_path, training=first)
    store.put(9, h9, d9)
    assert store.flush()
    kept = ModelStore(tmp_path, training=first).latest()  # a restart: the same training's
    assert kept is not None and kept.round == 9
    nxt = ModelStore(tmp_path, training=second)  # the site's next training, same volume
    assert nxt.latest() is None
    d1, h1 = _blob(1.0)
    nxt.put(1, h1, d1)  # its round 1 is its latest, on disk too (not held back by round 9)
    assert nxt.flush()
    assert json.loads((tmp_path / "latest.json").read_text())["round"] == 1
    latest = ModelStore(tmp_path, training=second).latest()
    assert latest is not None and (latest.round, latest.digest) == (1, h1)


def test_store_ignores_a_torn_write(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    d, h = _blob(1.0)
    store.put(3, h, d)
    assert store.flush()
    (tmp_path / "latest.json").write_text(json.dumps({"round": 3, "digest": "00" * 32}))
    assert ModelStore(tmp_path).latest() is None


def _mixed(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(6, 5, generator=g),
            "fc.half": torch.randn(7, generator=g).half(),
            "fc.double": torch.randn(3, generator=g, dtype=torch.float64),
            "bn.count": torch.randint(0, 9, (2,), generator=g),
            "mask": torch.rand(4, generator=g) > 0.5}


@pytest.mark.parametrize("weights", [(1, 3, 2), (0, 5, 1), (0, 0, 0)])
def test_the_mean_accumulated_in_place_is_the_mean_encoded(weights: tuple[int, ...]) -> None:
    """With the training spec the leader sums inside the merged payload itself: the bytes it
    commits are exactly serde.encode(mean(updates)), for every dtype and the zero-weight cases."""
    from swarmnode import merge

    updates = [Update(_mixed(i), float(w), f"n{i}") for i, w in enumerate(weights)]
    c = Collector(1, 1, "mean", {}, spec=serde.ParamSpec.from_state(_mixed(0)))
    for u in updates:
        c.add(u)
    merged, _, total = c.seal()
    if total == 0:  # no positive weight: the leader re-commits or merges equally (driver)
        assert merged is None and c.encoded() is None
        assert serde.encode(c.result()) == serde.encode(merge.mean(updates))
        return
    data, digest = c.encoded()
    expected = serde.encode(merge.mean(updates))
    assert bytes(data) == expected and digest == serde.digest(expected)
    c.release()
    assert c.encoded() is None and bytes(data) == expected  # the bytes outlive the collector


def test_merge_options_keep_their_types_from_the_spec_json() -> None:
    """The spec's JSON turns max_iter=10 into 10.0; geomedian still gets an int (it failed at every
    leader before), and a fractional count is refused with the option named."""
    from swarmnode.errors import ConfigError
    from swarmnode.spec import TrainingSpec

    spec = TrainingSpec.from_state(_mixed(0), sync_frequency=1, min_peers=2,
                                   merge_method="geomedian", merge_options={"max_iter": 10})
    options = TrainingSpec.from_json(spec.to_json(), "test").merge_options
    c = Collector(1, 1, "geomedian", options)
    for i in range(3):
        c.add(Update({"w": torch.full((3,), float(i))}, 1.0, f"n{i}"))
    merged, _, _ = c.seal()
    assert merged is not None and torch.allclose(merged["w"], torch.full((3,), 1.0), atol=1e-3)
    with pytest.raises(ConfigError, match="'max_iter' must be a whole number"):
        Collector(1, 1, "geomedian", {"max_iter": 2.5})


def test_clip_norm_clips_against_the_rounds_starting_model() -> None:
    from swarmnode import merge

    reference = {"w": torch.zeros(4)}
    updates = [Update({"w": torch.full((4,), 0.1)}, 1.0, "a"),
               Update({"w": torch.full((4,), 100.0)}, 1.0, "b")]  # a far-away update
    c = Collector(2, 1, "mean", {"clip_norm": 1.0})
    for u in updates:
        c.add(u)
    merged, _, _ = c.seal(reference)
    expected = merge.merge("mean", updates, clip_norm=1.0, reference=reference)
    assert merged is not None and torch.equal(merged["w"], expected["w"])
    assert float(merged["w"].norm()) < 1.0  # b's pull is bounded by the clip, not 100
    first = Collector(1, 1, "mean", {"clip_norm": 1.0})  # round 1: nothing to clip against
    for u in updates:
        first.add(u)
    assert torch.allclose(first.seal()[0]["w"], torch.full((4,), 50.05))


def test_an_update_that_would_overflow_the_sum_is_refused_by_name() -> None:
    from swarmnode.errors import NonFiniteValues

    c = Collector(1, 1, "mean", {})
    c.add(Update({"w": torch.full((3,), 1e36)}, 10.0, "ok"))
    with pytest.raises(NonFiniteValues, match="the update of evil holds values up to 3e"):
        c.add(Update({"w": torch.full((3,), 3e37)}, 100.0, "evil"))
    c.add(Update({"w": torch.full((3,), 2.0)}, 10.0, "fine"))
    merged, senders, _ = c.seal()
    assert senders == {"ok", "fine"} and bool(torch.isfinite(merged["w"]).all())


# ---------------------------------------------------------------- fold order (reproducible rounds)


def _order_sensitive(seed: int) -> list[Update]:
    """Five updates whose float32 weighted sum depends on the order it is taken in: values of
    very different magnitudes, so a different order rounds differently."""
    g = torch.Generator().manual_seed(seed)
    nodes = ["0xE1", "0xa2", "0xC3", "0xb4", "0x05"]
    out = []
    for i, node in enumerate(nodes):
        scale = 10.0 ** (4 * (i % 3) - 4)
        state = {"w": torch.randn(4096, generator=g) * scale, "b": torch.randn(7, generator=g)}
        out.append(Update(state, float(3 + 7 * i), node))
    return out


def _merged_bytes(updates: list[Update], arrival: list[int], method: str = "mean",
                  expect: bool = True, expect_after: int = 0) -> bytes:
    c = Collector(1, 1, method, {}, spec=serde.ParamSpec.from_state(updates[0].state))
    for k, i in enumerate(arrival):
        if expect and k == expect_after:
            c.expect(u.node for u in updates)
        c.add(updates[i])
    merged, _, _ = c.seal()
    done = c.encoded()
    if done is not None:
        return bytes(done[0])
    assert merged is not None
    return serde.encode(merged)


@pytest.mark.parametrize("method", ["mean", "trimmedmean", "coordmedian"])
def test_the_merged_bytes_do_not_depend_on_the_order_updates_arrive_in(method: str) -> None:
    updates = _order_sensitive(1)
    by_site = sorted(range(5), key=lambda i: updates[i].node.lower())
    expected = _merged_bytes(updates, by_site, method)
    g = torch.Generator().manual_seed(7)
    for trial in range(12):
        arrival = torch.randperm(5, generator=g).tolist()
        # the contributors become known before, during, or never before the seal
        got = _merged_bytes(updates, arrival, method, expect=trial % 3 != 2,
                            expect_after=trial % 3 * 2)
        assert got == expected, (method, arrival)


def test_the_order_matters_to_float32_so_the_fixed_order_is_what_makes_it_reproducible() -> None:
    # The check above can fail: folding the same updates by arrival gives other bytes.
    updates = _order_sensitive(1)
    results = set()
    for arrival in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        acc = merge.StreamingMean()
        for i in arrival:
            acc.add(updates[i])
        results.add(serde.encode(acc.result()))
    assert len(results) > 1


def test_an_early_update_waits_for_its_turn_and_the_seal_folds_what_still_waits() -> None:
    a, b, c = (Update({"w": torch.full((2,), float(v))}, 1.0, n)
               for v, n in ((1, "0xa"), (2, "0xb"), (4, "0xc")))
    col = Collector(1, 1, "mean", {})
    col.expect(["0xc", "0xa", "0xb"])
    col.add(c)
    assert col._stream is not None and col._stream.count == 0  # 0xc waits for 0xa and 0xb
    col.add(a)
    assert col._stream.nodes == ("0xa",)
    assert col.senders == {"0xa", "0xc"}  # accepted, whether folded yet or not
    merged, senders, total = col.seal()  # 0xb never came: the seal folds 0xc
    assert senders == {"0xa", "0xc"} and total == 2
    assert merged is not None and torch.equal(merged["w"], torch.full((2,), 2.5))


def test_a_mismatching_update_is_refused_when_it_arrives_not_when_its_turn_comes() -> None:
    col = Collector(1, 1, "mean", {})
    col.expect(["0xa", "0xb"])
    col.add(Update({"w": torch.ones(2)}, 1.0, "0xb"))  # waits for 0xa
    with pytest.raises(MergeError, match="0xa"):
        col.add(Update({"w": torch.ones(3)}, 1.0, "0xa"))
    assert col.senders == {"0xb"}
    merged, senders, _ = col.seal()
    assert senders == {"0xb"} and merged is not None and torch.equal(merged["w"], torch.ones(2))


def test_the_store_keeps_models_on_disk_and_serves_them_from_there(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=2)
    blobs = {r: _blob(float(r)) for r in (1, 2, 3)}
    for r, (data, digest) in blobs.items():  # rounds seconds apart: each is written
        store.put(r, digest, bytearray(data))
        assert store.flush()
    assert all(e.data is None for e in store._models.values())  # nothing kept in memory
    assert sorted(p.name for p in tmp_path.glob("round-*")) == [
        "round-2.safetensors", "round-3.safetensors"]  # round 1 fell out of keep=2
    for r in (2, 3):
        held = store.get(r)
        assert held is not None and isinstance(held.data, serde.SpillMap)
        assert bytes(held.data) == blobs[r][0] and held.digest == blobs[r][1]
    assert store.get(1) is None
    assert (tmp_path / "latest.safetensors").read_bytes() == blobs[3][0]
    early = store.get(3)
    d4, h4 = _blob(4.0)
    store.put(4, h4, d4)
    assert store.flush()
    assert early is not None and bytes(early.data) == blobs[3][0]  # a mapping keeps its bytes
    assert (tmp_path / "latest.safetensors").read_bytes() == d4


def test_updates_set_aside_or_folded_are_evicted_once_read() -> None:
    """The leader drops an update's bytes from memory when it is done reading them for now:
    an early one once checked and set aside, each one once folded."""
    evicted: list[str] = []

    def update(value: float, node: str) -> Update:
        return Update({"w": torch.full((2,), value)}, 1.0, node,
                      evict=lambda: evicted.append(node))

    col = Collector(1, 1, "mean", {})
    col.expect(["0xa", "0xb"])
    col.add(update(2.0, "0xb"))  # early: checked, set aside
    assert evicted == ["0xb"]
    col.add(update(4.0, "0xa"))  # its turn: folded (not evicted first), then 0xb's turn
    assert evicted == ["0xb", "0xa", "0xb"]
    merged, _, _ = col.seal()
    assert merged is not None and torch.equal(merged["w"], torch.full((2,), 3.0))
