"""A 3-site consortium provisioned from one consortium file, as its people would do it: the admin
makes the CA and the kits, each site makes its keys in its own folder and sends only its request,
installs its kit and runs `docker-compose up -d` in its folder (no flags: the kit's .env names the
compose files and profile). The sites train to the chain's final model, each signing with the
chain account it made itself (funded and authorised by the sentinel's deploy service)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from provision_support import provision, secrets_of

from swarmnode.chain.client import SwarmContract, connect
from swarmnode.containers.engine import compose_binary
from swarmnode.containers.images import repo_root
from swarmnode.demo.data import hospital_splits, save_shard
from swarmnode.demo.model import make_model
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


def test_three_sites_from_one_consortium_file_train_to_the_final_model(
    tmp_path: Path, images: list  # noqa: ARG001 - built (and an engine running)
) -> None:

    import docker

    # the training the admin describes: the breast-cancer model and its initial weights
    data = hospital_splits(3, seed=0)
    _conf, folders = provision(tmp_path, SITES, initial=make_model(30, seed=0).state_dict(),
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
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                member = tar.next()
                assert member is not None
                payload = tar.extractfile(member).read()  # type: ignore[union-attr]
            assert serde.digest(payload) == bytes(final), name
        # every site took part in the merges
        members = set().union(*(ev.args["members"] for ev in
                                contract.events(names={"MergeCommitted"})))
        # every site signed with the account it made itself
        requests = {n: json.loads((folders[n] / f"{n}.request.json").read_text())
                    for n in SITES}
        enrolled = {contract.node(requests[n]["address"]).endpoint for n in SITES}
        assert enrolled == {f"{n}:7441" for n in SITES}
        assert members == {requests[n]["address"] for n in SITES}
    finally:
        for name in reversed(order):
            _compose(folders[name], "down", "-v", "--remove-orphans", "-t", "5")
        client.close()
    for name, folder in folders.items():
        for secret in secrets_of(folder):
            for path in tmp_path.rglob("*"):
                if path.is_file() and folder not in path.parents:
                    assert secret.strip() not in path.read_bytes(), (name, path)
