"""The ``exit`` fault fires once per data folder: a node started again on the folder where it
fired (a container's restart policy, a test starting it again) runs without it. Before, a node
restarted with "POINT:ROUND+" in its node.yaml died again at every later round (the container
test of secure aggregation restarts such a site)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from swarmnode.config import FaultSettings
from swarmnode.node.faults import FIRED_FILE, ExitAt, Faults, Stall
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm, Site


def test_an_exit_fault_that_fired_in_a_data_folder_does_not_fire_there_again(
        tmp_path: Path) -> None:
    plan = Faults.parse(exit="before-push:2+").once_in(tmp_path)
    assert plan.exit == ExitAt("before-push", 2, True) and plan.record == tmp_path / FIRED_FILE
    assert not plan.exits("before-push", 1) and not (tmp_path / FIRED_FILE).exists()
    assert plan.exits("before-push", 3)  # the process dies now: the record is written first
    assert (tmp_path / FIRED_FILE).read_text() == "before-push:2+\n"
    again = Faults.parse("4:1", "before-push:2+").once_in(tmp_path)
    assert again.exit is None and again.stalls == (Stall(4, 1, None),)  # stalls stay
    assert not again.exits("before-push", 5)
    # another exit fault in the config is a new one: it fires (once)
    other = Faults.parse(exit="after-commit:6").once_in(tmp_path)
    assert other.exit == ExitAt("after-commit", 6) and other.exits("after-commit", 6)
    # a plan without a record (parsed, not yet given a folder) writes nothing
    assert Faults.parse(exit="before-checkin:1").exits("before-checkin", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FIRED_FILE]


INITIAL = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}


def _step(site: Site, k: int, model: Mapping[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
    if k >= 4:
        return None
    base = model if model is not None else INITIAL
    return {n: t + 0.1 * (site.index + 1) for n, t in base.items()}, 10


def test_a_node_started_again_on_its_folder_runs_without_the_fault_that_fired(
        tmp_path: Path) -> None:
    """In a real node service (the in-process swarm): the site dies at its exit fault and the
    record is in its data folder; the same config on that folder (the restarted node's) has no
    exit fault left, while a fresh folder still has it."""
    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=2, merge_method="mean")
    faults = {"exit": "after-push:2+"}
    with InProcessSwarm(3, spec, grace_s=2, deadline_s=5, workdir=tmp_path / "swarm",
                        faults={2: faults}) as swarm:
        sites = swarm.run(_step, timeout=180)
        config = sites[2].service.config
    died = sites[2].died
    assert died is not None and died >= 2
    assert (config.data_dir / FIRED_FILE).read_text() == "after-push:2+\n"
    assert config.fault_plan.exit is None  # what a node started again on that folder runs
    fresh = config.model_copy(update={"data_dir": tmp_path / "fresh",
                                      "faults": FaultSettings(**faults)})
    assert fresh.fault_plan.exit == ExitAt("after-push", 2, True)
