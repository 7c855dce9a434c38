"""The quality study (benchmarks/quality.py) runs its swarm cells through the real runtime in
process: one tiny cell here, through the same function the study's worker processes call."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_study", ROOT / "benchmarks"
                                                  / "quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_split_and_seed_runs_each_rule_and_each_policy(quality: ModuleType) -> None:
    cells = quality._cells(2)
    splits = [(t.name, s) for t in quality.TASKS.values() for s in t.splits]
    assert len(cells) == len(set(cells)) == len(splits) * 2 * 6
    for example, split in splits:
        for seed in (0, 1):
            mine = {(r, p) for e, s, k, r, p in cells if (e, s, k) == (example, split, seed)}
            assert mine == {(r, "inactive") for r in quality.RULES} | {
                ("mean", p) for p in quality.POLICIES}


def test_a_swarm_cell_trains_through_the_in_process_runtime(quality: ModuleType) -> None:
    """Three node services on eth-tester, geomedian, three syncs each, then the snapshot policy:
    the cell's score is the chain's final model's, better than the untrained model's."""
    task = quality.TASKS["breast-cancer"]
    data = task.split(3, 0, "uneven-scarce")
    untrained = task.make_model(data.X_test.shape[1], 0)
    untrained.eval()
    before = task.evaluate(untrained, data.X_test, data.y_test)["auc"]
    got = quality.swarm_cell("breast-cancer", "uneven-scarce", 0, "geomedian", "snapshot",
                             syncs=3)
    assert got["rule"] == "geomedian" and got["policy"] == "snapshot"
    assert got["rounds"] >= 3  # every sync is a round on chain (and a final round may follow)
    assert before + 0.05 < got["score"] <= 1.0, (before, got)
