"""A 3-site consortium provisioned from one consortium file, as its people would do it: the admin
makes the CA and the kits, each site makes its keys in its own folder and sends only its request,
installs its kit and runs `docker-compose up -d` in its folder (no flags: the kit's .env names the
compose files and profile). The sites train to the chain's final model, each signing with the
chain account it made itself (funded and authorised by the sentinel's deploy service). Then the
consortium's next training on the same registry (`swarmnode consortium training`, the kits sent
again, `docker-compose up -d`): trained to its own final model with no authorisation between the
two. (Two trainings at once, and a revocation stopping a site in both: with real node processes,
tests/node/test_trainings_on_one_registry.py.)"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from provision_support import cli, provision, secrets_of

from swarmnode.chain.client import SwarmContract, connect
from swarmnode.containers.engine import compose_binary
from swarmnode.containers.images import repo_root
from swarmnode.demo.data import hospital_splits, save_shard
from swarmnode.demo.model import make_model
from swarmnode.demo.swarm import wait_until
from swarmnode.spec import TrainingSpec
from swarmnode.transport import serde

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SITES = ["hospital-1", "hospital-2", "hospital-3"]


def _compose(folder: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # exactly what the site's admin types, in the site's folder
    return subprocess.run([compose_binary(), *args], cwd=folder, capture_output=True, text=True,
                          timeout=timeout)


def _container(docker_client, project: str, service: str):  # type: ignore[no-untyped-def]
    found = docker_client.containers.list(all=True, filters={"label": [
        f"com.docker.compose.project={project}", f"com.docker.compose.service={service}"]})
    assert found, f"no {service} container in project {project}"
    return found[0]


def _read(stream) -> bytes:  # type: ignore[no-untyped-def]
    """The one file of a container archive (``get_archive``)."""
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.next()
        assert member is not None
        return tar.extractfile(member).read()  # type: ignore[union-attr]


def _the_next_training(tmp_path: Path, conf: Path, folders: dict[str, Path], client: Any,
                       rpc_url: str, first: SwarmContract, script: str) -> None:
    """The consortium's next training on its registry, as its people do it: the admin deploys
    it (`swarmnode consortium training`: no authorisation) and sends the kits again; each site
    installs its kit, puts the training's script in app/ and runs `docker-compose up -d`. The
    three train it to its final model with no new authorisation; each node's latest model is
    this training's, not the first's."""
    registry = first.registry
    authorised = len(registry.events(names={"Authorized"}))
    # the next training: the same model, merged every 2 batches, 1 epoch (a short one)
    spec = TrainingSpec.from_state(make_model(30, seed=0).state_dict(), sync_frequency=2,
                                   min_peers=3, merge_method="mean")
    (tmp_path / "next-spec.json").write_text(spec.to_json())
    out = cli("consortium", "training", conf, "--spec", tmp_path / "next-spec.json",
              "--rpc-url", rpc_url, "--grace", "2", "--deadline", "10")
    assert "no site authorised again" in out
    nxt = SwarmContract(connect(rpc_url), registry.trainings()[-1])
    assert nxt.address != first.address and nxt.registry.address == registry.address
    started = {n: _container(client, n, "ml").attrs["State"]["StartedAt"] for n in SITES}
    for name in SITES:
        cli("site", "install", conf.parent / "admin" / "kits" / name, "--dir", folders[name])
        (folders[name] / "app" / "train.py").write_text(
            script.replace("MIN_PEERS = 2\n", "MIN_PEERS = 3\n")
            .replace("SYNC_FREQUENCY = 4 ", "SYNC_FREQUENCY = 2 ").replace("EPOCHS = 20\n",
                                                                          "EPOCHS = 1\n"))
    # each site on its own (the chain runs on; each node container is recreated for its new
    # CONTRACT, each trainer started again): at once, as separate hospitals would
    with ThreadPoolExecutor(len(SITES)) as pool:
        ups = dict(zip(SITES, pool.map(lambda n: _compose(folders[n], "up", "-d"), SITES),
                       strict=True))
    for name, done in ups.items():
        assert done.returncode == 0, (name, done.stderr[-2000:])

    def restarted(name: str):  # type: ignore[no-untyped-def]
        ml = _container(client, name, "ml")
        return ml if ml.attrs["State"]["StartedAt"] != started[name] else None

    for name in SITES:
        wait_until(lambda name=name: restarted(name), 300, f"{name}'s trainer started again",
                   poll=1.0)
    codes = {n: restarted(n).wait(timeout=600)["StatusCode"] for n in SITES}
    logs = {n: _container(client, n, "ml").logs(tail=20).decode(errors="replace")
            for n in SITES}
    assert all(c == 0 for c in codes.values()), (codes, logs)
    final = bytes(nxt.events(names={"TrainingFinished"})[-1].args["digest"])
    assert final != bytes(first.events(names={"TrainingFinished"})[-1].args["digest"])
    for name in SITES:
        ml, node = _container(client, name, "ml"), _container(client, name, "node")
        assert serde.digest(_read(ml.get_archive("/workspace/out/final.safetensors")[0])) == final
        assert serde.digest(_read(node.get_archive(
            "/var/lib/swarmnode/latest.safetensors")[0])) == final, name
    members = set().union(*(ev.args["members"] for ev in nxt.events(names={"MergeCommitted"})))
    assert len(members) == 3
    # no authorisation between the two trainings (the deploy service's re-run sent none)
    assert len(registry.events(names={"Authorized"})) == authorised == 3


def test_three_sites_from_one_consortium_file_train_to_the_final_model(
    tmp_path: Path, images: list  # noqa: ARG001 - built (and an engine running)
) -> None:

    import docker

    # the training the admin describes: the breast-cancer model and its initial weights
    data = hospital_splits(3, seed=0)
    conf, folders = provision(tmp_path, SITES, initial=make_model(30, seed=0).state_dict(),
                               # min_peers 3: the first round waits for every site (with 2,
                               # the first two up can finish the training before the third
                               # enrolled; its node is then refused, rightly)
                               training={"grace_s": 2, "deadline_s": 10, "min_peers": 3})
    # no private key ever left its folder (checked again after the run, on everything written)
    script = repo_root() / "examples" / "breast_cancer" / "train.py"
    for i, folder in enumerate(folders.values()):
        (folder / "app").mkdir(exist_ok=True)
        # the script states the swarm's settings (as in HPE); this consortium's min_peers is 3
        (folder / "app" / "train.py").write_text(
            script.read_text().replace("MIN_PEERS = 2\n", "MIN_PEERS = 3\n"))
        save_shard(folder / "data" / "train.npz", *data.hospitals[i])
        save_shard(folder / "data" / "test.npz", data.X_test, data.y_test)
    client = docker.from_env(timeout=300)
    order = SITES  # the sentinel (first) makes the consortium network and the chain
    try:
        ups = {}
        for name in order:
            done = _compose(folders[name], "up", "-d")
            assert done.returncode == 0 and "dependency failed" not in done.stderr, \
                done.stderr[-2000:]
            ups[name] = done.stdout[-2000:] + done.stderr[-3000:]
        chain = _container(client, "hospital-1", "chain")
        chain.reload()
        port = chain.attrs["NetworkSettings"]["Ports"]["8545/tcp"][0]["HostPort"]
        env = dict(line.split("=", 1) for line in (folders["hospital-1"] / ".env").read_text()
                   .splitlines() if line and not line.startswith("#"))
        contract = SwarmContract(connect(f"http://127.0.0.1:{port}"), env["CONTRACT"])
        deadline = time.monotonic() + 900
        codes = {name: _container(client, name, "ml").wait(  # blocks until the trainer exits
            timeout=max(deadline - time.monotonic(), 1))["StatusCode"] for name in SITES}
        logs = {n: {s: _container(client, n, s).logs(tail=40).decode(errors="replace")
                    for s in ("node", "ml")} for n in SITES}
        states = {n: _container(client, n, "ml").attrs["State"] for n in SITES}
        assert all(c == 0 for c in codes.values()), (codes, states, logs)
        # a trainer that never started would pass the wait with status 0 too
        if not all(s["StartedAt"][:4] != "0001" for s in states.values()):
            pytest.fail("a trainer never started:\n" + "\n".join(
                f"--- {n}: {states[n]}\nup: {ups[n]}\nnode: {logs[n]['node']}" for n in SITES))
        final = contract.events(names={"TrainingFinished"})[-1].args["digest"]
        for name in SITES:
            try:
                stream, _ = _container(client, name, "ml").get_archive(
                    "/workspace/out/final.safetensors")
            except docker.errors.NotFound:
                pytest.fail(f"{name}'s trainer exited 0 without a final model: "
                            f"{states[name]} {logs[name]}")
            assert serde.digest(_read(stream)) == bytes(final), name
        # every site took part in the merges
        members = set().union(*(ev.args["members"] for ev in
                                contract.events(names={"MergeCommitted"})))
        # every site signed with the account it made itself
        requests = {n: json.loads((folders[n] / f"{n}.request.json").read_text())
                    for n in SITES}
        enrolled = {contract.node(requests[n]["address"]).endpoint for n in SITES}
        assert enrolled == {f"{n}:7441" for n in SITES}
        assert members == {requests[n]["address"] for n in SITES}
        _the_next_training(tmp_path, conf, folders, client, f"http://127.0.0.1:{port}",
                           contract, script.read_text())
    finally:
        for name in reversed(order):
            _compose(folders[name], "down", "-v", "--remove-orphans", "-t", "5")
        client.close()
    for name, folder in folders.items():
        for secret in secrets_of(folder):
            for path in tmp_path.rglob("*"):
                if path.is_file() and folder not in path.parents:
                    assert secret.strip() not in path.read_bytes(), (name, path)
