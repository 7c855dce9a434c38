"""A 3-site consortium provisioned from one consortium file, as its people would do it: the admin
makes the CA and the kits, each site makes its keys in its own folder and sends only its request,
installs its kit and runs `docker-compose up -d` in its folder (no flags: the kit's .env names the
compose files and profile). The sites train to the chain's final model, each signing with the
chain account it made itself (funded and authorised by the sentinel's deploy service). Then the
consortium's next two trainings on the same registry, back to back with the first and at the same
time as each other (`swarmnode consortium training`, the kits sent again; B in each site's own
project, C beside it as a project of its own: `swarmnode site training`), with no authorisation
between them; a revocation in the registry stops hospital-3 in both while the other two finish
both. (The same with real node processes, and a third training after them:
tests/node/test_trainings_on_one_registry.py.)"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
import urllib.request
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


def _compose(folder: Path, *args: str, timeout: float = 600,
             **env: str) -> subprocess.CompletedProcess[str]:
    # exactly what the site's admin types, in the site's folder (``env``: what the shell's
    # environment sets over the .env's values)
    return subprocess.run([compose_binary(), *args], cwd=folder, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def _scrape(client, project: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The node's metrics, as the site's monitoring reads them: its published metrics port."""
    node = _container(client, project, "node")
    node.reload()
    port = node.attrs["NetworkSettings"]["Ports"]["7443/tcp"][0]["HostPort"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in text.splitlines()
                                        if line and not line.startswith("#"))}


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


def _two_trainings_at_once(tmp_path: Path, conf: Path, folders: dict[str, Path], client: Any,
                           rpc_url: str, first: SwarmContract, script: str) -> None:
    """The consortium's next two trainings on its registry, at the same sites at the same time,
    as its people do it. The admin deploys B (`swarmnode consortium training`: no authorisation)
    and sends the kits; each site installs its kit (B follows A in the site's own project). The
    admin deploys C and sends the kits again; each site runs C beside B as its own compose project
    (`swarmnode site training KIT --project c`: the same certificate and account). While both
    run (each one's trainers paused once it merged hospital-3, so that neither ends before the
    other started), the admin revokes hospital-3 in the registry: it is set aside in both at once,
    and hospital-1 and -2 finish both, each training to its own final model."""
    registry = first.registry
    authorised = len(registry.events(names={"Authorized"}))
    admin = conf.parent / "admin"
    trainings: dict[str, SwarmContract] = {}
    # B merges every 2 batches for 6 epochs, C every 3 for 6: two trainings, two final models
    for tag, sync, epochs in (("b", 2, 6), ("c", 3, 6)):
        spec = TrainingSpec.from_state(make_model(30, seed=0).state_dict(), sync_frequency=sync,
                                       min_peers=2, merge_method="mean")
        (tmp_path / f"{tag}-spec.json").write_text(spec.to_json())
        out = cli("consortium", "training", conf, "--spec", tmp_path / f"{tag}-spec.json",
                  "--rpc-url", rpc_url, "--grace", "2", "--deadline", "10")
        assert "no site authorised again" in out
        trainings[tag] = SwarmContract(connect(rpc_url), registry.trainings()[-1])
        for name in SITES:
            kit = admin / "kits" / name
            if tag == "b":  # B in the site's own project (after A)
                cli("site", "install", kit, "--dir", folders[name])
                app = folders[name] / "app"
            else:  # C beside it, its own project
                cli("site", "training", kit, "--dir", folders[name], "--project", "c")
                app = folders[name] / "c" / "app"
            (app / "train.py").write_text(
                script.replace("SYNC_FREQUENCY = 4 ", f"SYNC_FREQUENCY = {sync} ")
                .replace("EPOCHS = 20\n", f"EPOCHS = {epochs}\n"))
    b, c = trainings["b"], trainings["c"]
    assert len({first.address, b.address, c.address}) == 3
    assert b.registry.address == c.registry.address == registry.address
    started = {n: _container(client, n, "ml").attrs["State"]["StartedAt"] for n in SITES}
    address = {n: json.loads((folders[n] / f"{n}.request.json").read_text())["address"]
               for n in SITES}
    revoked = address["hospital-3"]

    def merged_in(t: SwarmContract) -> set[str]:
        return set().union(*(ev.args["members"] for ev in t.events(names={"MergeCommitted"})))

    def up(projects: list[tuple[str, Path]], t: SwarmContract, running: list[SwarmContract]):
        """``docker-compose up -d`` in each site's folder at once, as separate hospitals would;
        then wait until ``t`` merged hospital-3, with every training in ``running`` unfinished
        (the trainings overlap), and pause the trainers (``docker pause``: the training stays
        unfinished, its nodes serving, however long the next project takes to start)."""
        # hospital-1 first (the sentinel, whose project also re-runs the deploy service: the
        # slowest to start), then the others at once: with min_peers 2, two sites up before it
        # could train the whole training without it
        ups = {projects[0][0]: _compose(projects[0][1], "up", "-d")}
        with ThreadPoolExecutor(len(projects)) as pool:
            ups.update(zip([p for p, _ in projects[1:]],
                           pool.map(lambda pf: _compose(pf[1], "up", "-d"), projects[1:]),
                           strict=True))
        for (project, done), (_, folder) in zip(ups.items(), projects, strict=True):
            assert done.returncode == 0, (project, done.stderr[-2000:], _compose(
                folder, "logs", "chain-check", "node").stdout[-6000:])

        def merged_hospital_3() -> bool:
            finished = [x.address for x in running if x.training_finished()]
            assert not finished, f"{finished} finished before the revocation: not overlapping"
            return revoked in merged_in(t)

        wait_until(merged_hospital_3, 600, f"hospital-3 merged in {t.address}", poll=0.5,
                   describe=lambda: "\n".join(
                       f"{p}: {_container(client, p, 'node').logs(tail=3).decode(errors='replace')}"
                       for p, _ in projects))
        for project, _ in projects:
            _container(client, project, "ml").pause()

    # B in each site's own project (its node container recreated for the new CONTRACT, its
    # trainer started again), then C beside it, each site's project of its own
    up([(n, folders[n]) for n in SITES], b, [b])
    up([(f"{n}-c", folders[n] / "c") for n in SITES], c, [b, c])
    # no authorisation between the trainings: the registry's three, once
    assert len(registry.events(names={"Authorized"})) == authorised == 3

    assert not b.training_finished() and not c.training_finished()
    # the admin revokes hospital-3 in the registry: set aside in both running trainings at once
    cli("revoke", revoked, "--contract", registry.address, "--rpc-url", rpc_url, "--keystore",
        admin / "chain" / "admin.keystore.json", "--password-file",
        admin / "chain" / "admin.keystore.password")
    at = {}
    for t in (b, c):
        assert t.node(revoked).state == "revoked", t.address
        (event,) = t.events(names={"NodeRevoked"})
        assert event.args["node"] == revoked
        at[t.address] = event.block
    for project in [*SITES, *(f"{n}-c" for n in SITES)]:  # the trainers go on
        _container(client, project, "ml").unpause()
    # hospital-1 and -2 finish both, each to that training's final model
    for name in SITES[:2]:
        wait_until(lambda name=name: _container(client, name, "ml").attrs["State"]["StartedAt"]
                   != started[name], 300, f"{name}'s trainer started again for B", poll=1.0)
    ours = [(n, b) for n in SITES[:2]] + [(f"{n}-c", c) for n in SITES[:2]]
    codes = {p: _container(client, p, "ml").wait(timeout=600)["StatusCode"] for p, _ in ours}
    logs = {p: _container(client, p, "ml").logs(tail=20).decode(errors="replace")
            for p, _ in ours}
    assert all(code == 0 for code in codes.values()), (codes, logs)
    finals = {}
    for project, t in ours:
        final = finals.setdefault(t.address, bytes(t.events(names={"TrainingFinished"})[-1]
                                                   .args["digest"]))
        ml, node = _container(client, project, "ml"), _container(client, project, "node")
        assert serde.digest(_read(ml.get_archive("/workspace/out/final.safetensors")[0])) == \
            final, project
        assert serde.digest(_read(node.get_archive(
            "/var/lib/swarmnode/latest.safetensors")[0])) == final, project
    for t in (b, c):
        late = [e for e in t.events(names={"MergeCommitted"})
                if e.block > at[t.address] and revoked in e.args["members"]]
        assert late == [], f"{t.address} merged hospital-3 after its revocation"
        if not merged_in(t) >= {address["hospital-1"], address["hospital-2"]}:
            project = {b.address: "", c.address: "-c"}[t.address]
            said = tmp_path / "not-every-site-merged.txt"
            said.write_text("\n".join([
                f"training {t.address} ({'b' if project == '' else 'c'}); sites {address}",
                *(f"round {e.args['round']}: {e.args['members']}"
                  for e in t.events(names={"MergeCommitted"})),
                *(f"--- {n}{project} {svc}\n"
                  + _container(client, f"{n}{project}", svc).logs(tail=60).decode(
                      errors="replace") for n in SITES[:2] for svc in ("node", "ml"))]))
            pytest.fail(f"{t.address}: hospital-1 or -2 never merged in it; see {said}")
    assert len(set(finals.values())) == 2  # B and C: two final models
    assert bytes(first.events(names={"TrainingFinished"})[-1].args["digest"]) not in \
        finals.values()
    # each site's two node containers took turns with its one account through one lock folder
    for name in SITES:
        assert list((folders[name] / "chain" / "tx-lock").glob("*.lock")), name
    assert len(registry.events(names={"Authorized"})) == authorised


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
            if name == order[-1]:
                # a chain URL this site cannot reach: `up` fails fast, naming the check, whose
                # log names the setting to fix (not a node waiting and an `up` saying "Waiting")
                began = time.monotonic()
                bad = _compose(folders[name], "up", "-d", RPC_URL="http://127.0.0.1:9",
                               CHAIN_CHECK_WAIT_S="3")
                assert bad.returncode != 0 and "chain-check" in bad.stderr, bad.stderr[-2000:]
                assert time.monotonic() - began < 90
                why = _compose(folders[name], "logs", "chain-check").stdout
                assert "no JSON-RPC answer at http://127.0.0.1:9" in why and "check RPC_URL" in \
                    why, why[-2000:]
            done = _compose(folders[name], "up", "-d")
            assert done.returncode == 0 and "dependency failed" not in done.stderr, \
                done.stderr[-2000:] + _compose(folders[name], "logs", "deploy", "chain-check",
                                               "node").stdout[-6000:]
            ups[name] = done.stdout[-2000:] + done.stderr[-3000:]
        chain = _container(client, "hospital-1", "chain")
        chain.reload()
        port = chain.attrs["NetworkSettings"]["Ports"]["8545/tcp"][0]["HostPort"]
        env = dict(line.split("=", 1) for line in (folders["hospital-1"] / ".env").read_text()
                   .splitlines() if line and not line.startswith("#"))
        contract = SwarmContract(connect(f"http://127.0.0.1:{port}"), env["CONTRACT"])
        # the site's monitoring (the kit turns metrics on): the round advances, the bytes grow
        first = wait_until(lambda: (m := _scrape(client, "hospital-2"))["swarmnode_rounds_total"]
                           >= 1 and m, 300, "a round on hospital-2's metrics port", poll=1.0)
        later = wait_until(lambda: (m := _scrape(client, "hospital-2"))["swarmnode_rounds_total"]
                           >= first["swarmnode_rounds_total"] + 2 and m, 300,
                           "two more rounds on hospital-2's metrics port", poll=1.0)
        assert later["swarmnode_round"] > first["swarmnode_round"]
        for way in ("sent", "received"):
            key = f'swarmnode_peer_bytes_total{{direction="{way}"}}'
            assert later[key] > first[key] > 0, (way, first[key], later[key])
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
        _two_trainings_at_once(tmp_path, conf, folders, client, f"http://127.0.0.1:{port}",
                               contract, script.read_text())
    finally:
        for paused in client.containers.list(filters={"status": "paused"}):
            paused.unpause()  # a failure while the trainings' trainers were paused
        for name in reversed(order):  # the trainings beside the sites' own projects first
            if (folders[name] / "c" / ".env").exists():
                _compose(folders[name] / "c", "down", "-v", "--remove-orphans", "-t", "5")
        for name in reversed(order):
            _compose(folders[name], "down", "-v", "--remove-orphans", "-t", "5")
        client.close()
    for name, folder in folders.items():
        for secret in secrets_of(folder):
            for path in tmp_path.rglob("*"):
                if path.is_file() and folder not in path.parents:
                    assert secret.strip() not in path.read_bytes(), (name, path)
