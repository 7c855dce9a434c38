"""The demo's hospital splits, shard files, model, and an in-process swarm's quality on seed 0."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from swarmnode.demo import model as demo_model
from swarmnode.demo.data import (
    MALIGNANT,
    DemoData,
    Shard,
    hospital_splits,
    load_shard,
    preprocess,
    save_shard,
)
from swarmnode.errors import ConfigError
from swarmnode.transport import serde

SYNC_FREQUENCY = demo_model.SYNC_FREQUENCY


def rows(X: np.ndarray) -> list[bytes]:
    return [np.ascontiguousarray(r).tobytes() for r in X]


# ---------------------------------------------------------------- the splits


@pytest.mark.parametrize("n_hospitals", [2, 3, 5, 8])
def test_shards_and_test_set_are_disjoint_and_use_every_sample(n_hospitals: int) -> None:
    data = hospital_splits(n_hospitals, seed=0)
    everything = preprocess(load_breast_cancer().data)
    assert len(set(rows(everything))) == len(everything)  # rows identify samples
    parts = [rows(h.X) for h in data.hospitals] + [rows(data.X_test)]
    seen = [r for part in parts for r in part]
    assert len(seen) == len(set(seen)) == len(everything)
    assert set(seen) == set(rows(everything))
    assert len(data.hospitals) == len(data.names) == n_hospitals
    pooled = data.pooled()
    assert (
        len(pooled.y) == sum(len(h.y) for h in data.hospitals) == len(everything) - len(data.y_test)
    )


@pytest.mark.parametrize("n_hospitals", [2, 3, 5, 8])
def test_shard_sizes_are_uneven_and_the_smallest_has_almost_no_malignant_cases(
    n_hospitals: int,
) -> None:
    data = hospital_splits(n_hospitals, seed=0)
    sizes = [len(h.y) for h in data.hospitals]
    assert all(a > b for a, b in itertools.pairwise(sizes))  # all different, largest first
    assert sizes[0] >= 2 * sizes[-1]
    scarce = data.hospitals[data.scarce]
    assert data.scarce == n_hospitals - 1 and len(scarce.y) == min(sizes)
    assert scarce.malignant in range(1, 4)  # almost no malignant cases, but not none
    for i, h in enumerate(data.hospitals):
        if i != data.scarce:  # the others see plenty of both classes
            assert 0.3 < h.malignant / len(h.y) < 0.6
    assert {int(v) for h in data.hospitals for v in np.unique(h.y)} == {0, 1}


def test_default_split_for_three_hospitals() -> None:
    data = hospital_splits()
    assert [len(h.y) for h in data.hospitals] == [213, 142, 71]  # 1/2, 1/3, 1/6 of 426
    assert [h.malignant for h in data.hospitals] == [95, 63, 1]
    assert data.names == ("hospital-1", "hospital-2", "hospital-3")
    X, y = data.hospitals[0]  # a shard unpacks as (X, y)
    assert X.dtype == np.float32 and X.shape == (213, 30) and y.dtype == np.int64


def test_shared_test_set_is_stratified() -> None:
    y_all = load_breast_cancer().target == 0  # scikit-learn: 0 = malignant
    for seed in (0, 1, 2):
        data = hospital_splits(3, seed=seed, test_fraction=0.25)
        assert len(data.y_test) == math.ceil(0.25 * len(y_all))
        expected = y_all.mean() * len(data.y_test)
        assert abs((data.y_test == MALIGNANT).sum() - expected) <= 1


def test_labels_mark_malignant_as_one() -> None:
    bunch = load_breast_cancer()
    data = hospital_splits(3, seed=0)
    lookup = dict(zip(rows(preprocess(bunch.data)), bunch.target, strict=True))
    for shard in (*data.hospitals, data.test):
        for row, label in zip(rows(shard.X), shard.y, strict=True):
            assert label == (1 if lookup[row] == 0 else 0)


def test_splits_are_reproducible_per_seed_and_differ_across_seeds() -> None:
    a, b, c = hospital_splits(3, seed=0), hospital_splits(3, seed=0), hospital_splits(3, seed=1)
    for x, y in zip(a.hospitals, b.hospitals, strict=True):
        assert np.array_equal(x.X, y.X) and np.array_equal(x.y, y.y)
    assert not np.array_equal(a.X_test, c.X_test)


def test_preprocessing_is_fixed_per_sample() -> None:
    """No statistic of other samples leaks in: each row is log1p of that row alone."""
    raw = load_breast_cancer().data
    data = hospital_splits(3, seed=0)
    transformed = {r: i for i, r in enumerate(rows(preprocess(raw)))}
    shard = data.hospitals[2]
    for row in shard.X[:10]:
        i = transformed[np.ascontiguousarray(row).tobytes()]
        np.testing.assert_array_equal(preprocess(raw[i : i + 1])[0], row)
        np.testing.assert_allclose(row, np.log1p(raw[i]), rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_hospitals": 1}, "at least 2 hospitals"),
        ({"n_hospitals": 9}, "use at most 8 hospitals"),
        ({"test_fraction": 0.9}, "test_fraction=0.9 is out of range"),
    ],
)
def test_bad_split_settings_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        hospital_splits(**kwargs)


# ---------------------------------------------------------------- shard files


def test_npz_round_trip_without_pickle(tmp_path) -> None:
    data = hospital_splits(3, seed=0)
    path = save_shard(tmp_path / "h1.npz", *data.hospitals[0])
    with np.load(path, allow_pickle=False) as archive:  # plain arrays only
        assert sorted(archive.files) == ["X", "y"]
    X, y = load_shard(path)
    assert isinstance(load_shard(path), Shard)
    assert np.array_equal(X, data.hospitals[0].X) and X.dtype == np.float32
    assert np.array_equal(y, data.hospitals[0].y) and y.dtype == np.int64


def test_load_shard_refuses_pickled_objects_and_bad_files(tmp_path) -> None:
    pickled = tmp_path / "evil.npz"
    np.savez(pickled, X=np.array([{"a": 1}], dtype=object), y=np.zeros(1, dtype=np.int64))
    with pytest.raises(ConfigError, match="no pickled objects"):
        load_shard(pickled)
    with pytest.raises(ConfigError, match="does not exist"):
        load_shard(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="is not a demo shard"):
        load_shard(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ConfigError, match="is not a demo shard"):
        load_shard(tmp_path / "other.npz")
    np.savez(tmp_path / "shape.npz", X=np.zeros(3, dtype=np.float32), y=np.zeros(3, dtype=np.int64))
    with pytest.raises(ConfigError, match="a shard needs float X"):
        load_shard(tmp_path / "shape.npz")
    with pytest.raises(ConfigError, match="a shard needs X of shape"):
        save_shard(tmp_path / "bad.npz", np.zeros((3, 2)), np.zeros(2))


# ---------------------------------------------------------------- the model


def test_model_init_is_deterministic_per_seed() -> None:
    state = lambda seed: demo_model.make_model(30, seed).state_dict()  # noqa: E731
    a, b, c = state(0), state(0), state(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["linear.weight"], c["linear.weight"])
    assert a["norm.num_batches_tracked"].dtype == torch.int64  # an int buffer the merge keeps
    assert sum(p.numel() for p in demo_model.make_model(30, 0).parameters()) == 31


def test_train_epoch_calls_the_hooks_and_stops_when_asked() -> None:
    data = hospital_splits(3, seed=0)
    X, y = data.hospitals[2]
    model = demo_model.make_model(30, 0)
    loader = demo_model.make_loader(X, y, batch_size=16, seed=0)
    calls: list[int] = []
    loss = demo_model.train_epoch(
        model, loader, demo_model.make_optimizer(model), on_batch_end=lambda: calls.append(1)
    )
    assert len(calls) == math.ceil(len(y) / 16) and loss > 0
    calls.clear()
    demo_model.train_epoch(
        model,
        loader,
        demo_model.make_optimizer(model),
        on_batch_end=lambda: calls.append(1),
        should_stop=lambda: len(calls) >= 2,
    )
    assert len(calls) == 2


def test_a_batch_of_one_sample_trains() -> None:
    model = demo_model.make_model(30, 0)
    X, y = hospital_splits(3, seed=0).hospitals[0]
    loader = demo_model.make_loader(X[:17], y[:17], batch_size=16, seed=0)  # last batch: 1 sample
    assert math.isfinite(demo_model.train_epoch(model, loader, demo_model.make_optimizer(model)))


def test_evaluate_needs_both_classes() -> None:
    data = hospital_splits(3, seed=0)
    model = demo_model.make_model(30, 0)
    scores = demo_model.evaluate(model, data.X_test, data.y_test)
    assert set(scores) >= {"auc", "accuracy", "loss"}
    with pytest.raises(ConfigError, match="both classes"):
        demo_model.evaluate(model, data.X_test[:3], np.zeros(3, dtype=np.int64))


# ---------------------------------------------------------------- swarm quality


def simulate_swarm(data: DemoData, seed: int) -> tuple[torch.nn.Module, int]:
    """The demo's swarm in one process (swarmnode.testing.inproc): real node services on the
    real contracts (in-process EVM), models moving as safetensors bytes in memory.

    Every hospital starts from the same weights and runs EPOCHS epochs over its own shard; every
    SYNC_FREQUENCY batches it syncs (weight = sample count) and continues from the merged model.
    A hospital whose data is used up syncs its last partial block, then finishes with the
    ``inactive`` end-of-training policy. Returns the swarm's final model (the chain's final
    digest) and the number of rounds the last hospital to finish synced in.
    """
    from swarmnode.spec import TrainingSpec
    from swarmnode.testing.inproc import InProcessSwarm, Site

    n_features = data.X_test.shape[1]
    models = [demo_model.make_model(n_features, seed) for _ in data.hospitals]
    optimizers = [demo_model.make_optimizer(m, demo_model.LR) for m in models]

    def batches(shard: Shard) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = demo_model.make_loader(shard.X, shard.y, demo_model.BATCH_SIZE, seed)
        for _ in range(demo_model.EPOCHS):
            yield from loader

    streams = [batches(h) for h in data.hospitals]

    def step(site: Site, k: int, merged: dict[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
        model = models[site.index]
        if merged is not None:
            model.load_state_dict(merged)
        block = list(itertools.islice(streams[site.index], SYNC_FREQUENCY))
        if not block:
            return None
        demo_model.train_epoch(model, block, optimizers[site.index])  # type: ignore[arg-type]
        return model.state_dict(), len(data.hospitals[site.index].y)

    spec = TrainingSpec.from_state(models[0].state_dict(), sync_frequency=SYNC_FREQUENCY,
                                   min_peers=2, merge_method="mean")
    with InProcessSwarm(len(data.hospitals), spec, min_peers=2) as swarm:
        sites = swarm.run(step, timeout=600)
        final = sites[0].final
        assert final is not None and final.data is not None
        assert all(s.final_digest == swarm.final_digest() for s in sites)
        rounds = max(len(s.syncs) for s in sites)
        state = {k: v.clone() for k, v in
                 serde.view_state(final.data, spec=None, reject_nonfinite=True).items()}
    model = demo_model.make_model(n_features, seed)
    model.load_state_dict(state)
    model.eval()
    return model, rounds


def test_swarm_matches_central_and_beats_the_scarce_hospital_on_seed_0() -> None:
    data = hospital_splits(3, seed=0)
    local = [
        demo_model.evaluate(demo_model.train_local(X, y, seed=0), data.X_test, data.y_test)
        for X, y in data.hospitals
    ]
    X_all, y_all = data.pooled()
    central = demo_model.evaluate(
        demo_model.train_local(X_all, y_all, seed=0), data.X_test, data.y_test
    )
    model, rounds = simulate_swarm(data, seed=0)
    swarm = demo_model.evaluate(model, data.X_test, data.y_test)
    print(
        "AUC local",
        [round(s["auc"], 4) for s in local],
        "swarm",
        round(swarm["auc"], 4),
        "central",
        round(central["auc"], 4),
        "rounds",
        rounds,
    )
    best_local = max(s["auc"] for s in local)
    scarce = local[data.scarce]
    assert central["auc"] >= 0.99
    assert scarce["auc"] <= central["auc"] - 0.015  # clearly worse alone ...
    assert scarce["sensitivity"] <= central["sensitivity"] - 0.1  # ... it misses malignant cases
    assert abs(swarm["auc"] - central["auc"]) <= 0.02
    assert swarm["auc"] >= best_local - 0.01
    assert swarm["sensitivity"] >= central["sensitivity"] - 0.05
    largest = math.ceil(len(data.hospitals[0].y) / demo_model.BATCH_SIZE) * demo_model.EPOCHS
    assert rounds == math.ceil(largest / SYNC_FREQUENCY)  # until the largest hospital is done
