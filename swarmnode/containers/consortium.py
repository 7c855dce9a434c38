"""A consortium of hospitals as containers on one Docker engine, each run as the hospital runs it.

Every hospital is its own compose project of ``compose/hospital.yaml`` with its own ``.env``
(written here, as a site admin writes it); the first hospital is also the sentinel
(``--profile sentinel``: the dev chain and the contract deployment). On one host the hospitals
share one consortium network, made here and declared external in every project; each hospital's
ml <-> node traffic stays on its own internal network and socket volume.

The Docker SDK drives what a person would otherwise type: it finds the containers, reads the
chain's published port, kills, pauses, restarts and disconnects containers (the fault tests), and
reads the trainers' results from their own volumes. ``close`` takes every project down with its
volumes and removes the network, leaving nothing behind.

Each trainer gets the swarm's settings its script must match (``SWARM_MIN_PEERS``,
``SWARM_CLIP_NORM``) from
``<site>/ml.env`` (the compose file's ``ML_ENV_FILE``). Two options for the failure tests:
``secure_aggregation`` (the spec turns it on, with the demo's clip norm and weight cap) and
``faults`` (a site's test-only ``faults:`` node.yaml section, see :mod:`swarmnode.node.faults`):
such a site's node runs ``swarmnode run --config`` with that node.yaml mounted, through a compose
override file of its own (``<site>/faults.compose.yaml``) that also turns its restart policy off,
so an exit fault ends the node until :meth:`ContainerConsortium.start_node` starts it again, as
``docker kill`` does. Every other setting still comes from the site's ``.env``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from swarmnode import __version__
from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract, connect
from swarmnode.config import FaultSettings
from swarmnode.containers.engine import compose_binary
from swarmnode.containers.images import repo_root
from swarmnode.demo import model as demo_model
from swarmnode.demo.data import DemoData, hospital_splits, save_shard
from swarmnode.demo.swarm import SECURE_CLIP_NORM, SECURE_MAX_WEIGHT
from swarmnode.errors import NodeError
from swarmnode.identity import create_ca, issue_node_cert, make_bundle
from swarmnode.spec import TrainingSpec

__all__ = ["NODE_UID", "ContainerConsortium", "contract_address_for"]

log = logging.getLogger("swarmnode.containers")

NODE_UID = 10001  # the node image's user: it must be able to read the node's key (a secret)
PEER_PORT = 7441
_LABEL = "org.swarmnode.consortium"


def contract_address_for(deployer: str, nonce: int = 0) -> str:
    """The address a contract deployed by ``deployer`` with ``nonce`` gets (CREATE)."""
    import rlp
    from eth_utils import keccak, to_canonical_address, to_checksum_address

    return to_checksum_address(keccak(rlp.encode([to_canonical_address(deployer), nonce]))[12:])


class ContainerConsortium:
    """``nodes`` hospitals (``ml`` + ``node`` each) and the sentinel's chain, as containers.

    Use as a context manager: ``__enter__`` writes certificates, data and each site's ``.env``
    under ``workdir``; :meth:`up` starts the projects; ``__exit__`` tears everything down.

    ``secure_aggregation``: the training's spec turns it on (merge option ``clip_norm``
    SECURE_CLIP_NORM, ``max_weight`` SECURE_MAX_WEIGHT; it needs ``min_peers`` >= 3 and merge
    ``mean``). ``faults``: by hospital index (0-based), the test-only ``faults:`` section of
    that hospital's node.yaml (``{"exit": "before-push:4+"}``, ``{"stall_commit": "6:1"}``);
    its node runs without a restart policy (see the module docstring).
    """

    def __init__(
        self,
        workdir: Path,
        nodes: int = 3,
        *,
        prefix: str = "swarmnode-demo",
        merge: str = "mean",
        sync_frequency: int = demo_model.SYNC_FREQUENCY,
        min_peers: int = 2,
        grace_s: int = 2,
        deadline_s: int = 6,
        seed: int = 0,
        example: str = "breast_cancer",
        secure_aggregation: bool = False,
        faults: Mapping[int, Mapping[str, str]] | None = None,
    ) -> None:
        import docker

        self.faults = {i: FaultSettings(**f) for i, f in (faults or {}).items()}  # validated
        if any(not 0 <= i < nodes for i in self.faults):
            raise NodeError(f"faults name hospitals {sorted(self.faults)}; there are {nodes} "
                            f"(indices 0..{nodes - 1})")
        self.secure_aggregation = secure_aggregation

        self.work = Path(workdir).resolve()
        self.n, self.prefix, self.merge, self.seed = nodes, prefix, merge, seed
        self.sync_frequency, self.min_peers = sync_frequency, min_peers
        self.grace_s, self.deadline_s = grace_s, deadline_s
        self.epochs: int | None = None  # the example script's own EPOCHS
        self.names = [f"hospital-{i + 1}" for i in range(nodes)]
        self.accounts = [dev_account(i + 1) for i in range(nodes)]
        self.root = repo_root()
        self.compose_file = self.root / "compose" / "hospital.yaml"
        self.script_dir = self.root / "examples" / example
        # not the kits' default network (swarmnode-consortium): a demo and a consortium's own
        # sites on one engine must not share, or take down, each other's network
        self.network = f"{prefix}-consortium"
        self.docker = docker.from_env(timeout=300)
        # dev account 0's first transaction deploys the registry, its second the training
        self.contract_address = contract_address_for(dev_account(0).address, 1)
        self.data: DemoData
        self.contract: SwarmContract
        self.rpc_url = ""
        self._results: dict[int, dict[str, Any]] = {}

    # -- naming -----------------------------------------------------------------------------------
    def project(self, i: int) -> str:
        return f"{self.prefix}-{self.names[i]}"

    def env_file(self, i: int) -> Path:
        return self.work / self.names[i] / ".env"

    def container(self, i: int, service: str):  # type: ignore[no-untyped-def]
        """The container of ``service`` (node, ml, chain, deploy) in hospital ``i``'s project."""
        found = self.docker.containers.list(all=True, filters={"label": [
            f"com.docker.compose.project={self.project(i)}",
            f"com.docker.compose.service={service}",
        ]})
        if not found:
            raise NodeError(f"no {service} container in compose project {self.project(i)}")
        return found[0]

    # -- set-up -----------------------------------------------------------------------------------
    def __enter__(self) -> ContainerConsortium:
        if self.work.exists():
            shutil.rmtree(self.work)
        (self.work / "logs").mkdir(parents=True)
        try:
            self._write_sites()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_sites(self) -> None:
        consortium = self.work / "consortium"  # what the sentinel's deploy step reads
        certs = self.work / "admin" / "ca"
        ca_cert, ca_key = create_ca(certs, "swarm-consortium-ca", org="swarmnode consortium")
        trust = make_bundle([ca_cert], consortium / "trust.pem")
        self.data = hospital_splits(self.n, seed=self.seed)
        rows = ["name,address,cert"]
        for i, name in enumerate(self.names):
            site = self.work / name
            # Each site's key is made in its own folder; only its certificate leaves it.
            cert, key = issue_node_cert(ca_cert, ca_key, site / "certs", name, dns=[name],
                                        ips=[])
            os.chown(key, NODE_UID, -1)  # the node container's user reads it (mode stays 0600)
            shutil.copy(cert, consortium / f"{name}.pem")
            rows.append(f"{name},{self.accounts[i].address},{name}.pem")
            save_shard(site / "data" / "train.npz", *self.data.hospitals[i])
            save_shard(site / "data" / "test.npz", self.data.X_test, self.data.y_test)
            env = {
                "SITE": name,
                "SWARMNODE_VERSION": __version__,
                "RPC_URL": "http://chain:8545",
                "CONTRACT": self.contract_address,
                "KEY_INDEX": str(i + 1),
                "PEER_ENDPOINT": f"{name}:{PEER_PORT}",
                "CERT_FILE": str(cert),
                "KEY_FILE": str(key),
                "TRUST_FILE": str(trust),
                "DATA_DIR": str(site / "data"),
                "SCRIPT_DIR": str(self.script_dir),
                "TRAIN_SEED": str(self.seed),
                "CONSORTIUM_NETWORK": self.network,
                "CONSORTIUM_EXTERNAL": "true",
                # the sentinel's settings (read by its chain and deploy services only)
                "CONSORTIUM_DIR": str(consortium),
                "MIN_PEERS": str(self.min_peers),
                "GRACE_S": str(self.grace_s),
                "DEADLINE_S": str(self.deadline_s),
                # the trainer's own settings file (the swarm's settings its script must match)
                "ML_ENV_FILE": str(site / "ml.env"),
            }
            self.env_file(i).write_text("".join(f"{k}={v}\n" for k, v in env.items()))
            trainer = {"SWARM_MIN_PEERS": str(self.min_peers)}
            if self.secure_aggregation:
                trainer["SWARM_CLIP_NORM"] = str(SECURE_CLIP_NORM)
            (site / "ml.env").write_text("".join(f"{k}={v}\n" for k, v in trainer.items()))
            if i in self.faults:
                self._write_faults(i)
        (consortium / "sites.csv").write_text("\n".join(rows) + "\n")
        model = demo_model.make_model(self.data.X_test.shape[1], seed=self.seed)
        self.spec = TrainingSpec.from_state(
            model.state_dict(), sync_frequency=self.sync_frequency, min_peers=self.min_peers,
            merge_method=self.merge,
            merge_options={"clip_norm": SECURE_CLIP_NORM} if self.secure_aggregation else None,
        )
        if self.secure_aggregation:  # the spec's own checks say what else it needs
            self.spec = dataclasses.replace(self.spec, max_weight=SECURE_MAX_WEIGHT,
                                            secure_aggregation=True)
        (consortium / "spec.json").write_text(self.spec.to_json())

    def fault_override(self, i: int) -> Path:
        """Hospital ``i``'s compose override file for its faults (see the module docstring)."""
        return self.work / self.names[i] / "faults.compose.yaml"

    def _write_faults(self, i: int) -> None:
        site = self.work / self.names[i]
        config = site / "node.yaml"  # only the faults: the rest comes from the .env, as always
        config.write_text(yaml.safe_dump({"faults": self.faults[i].model_dump()}))
        config.chmod(0o644)  # the node image's user reads it
        override = {"services": {"node": {
            "command": ["run", "--config", "/etc/swarmnode/node.yaml"],
            "restart": "no",
            "volumes": [{"type": "bind", "source": str(config),
                         "target": "/etc/swarmnode/node.yaml", "read_only": True}],
        }}}
        self.fault_override(i).write_text(yaml.safe_dump(override, sort_keys=False))

    def compose(self, i: int, *args: str, check: bool = True,
                timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``docker-compose`` for hospital ``i``'s project, as its admin would run it."""
        cmd = [compose_binary(), "-p", self.project(i), "--env-file", str(self.env_file(i)),
               "-f", str(self.compose_file)]
        if i in self.faults:
            cmd += ["-f", str(self.fault_override(i))]
        if i == 0:
            cmd += ["--profile", "sentinel"]
        done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise NodeError(f"`docker-compose -p {self.project(i)} {' '.join(args)}` failed: "
                            f"{(done.stderr or done.stdout).strip()[-1500:]}")
        return done

    # -- running ----------------------------------------------------------------------------------
    def up(self, timeout: float = 600, *, trainers_together: bool = False) -> None:
        """Start every hospital's project (the sentinel first); returns once every node is
        healthy (enrolled, serving) and every trainer started. ``trainers_together``: first
        every node, then, once all are healthy, every trainer at once (as admins who agreed on
        a start time): the first rounds then have every hospital, not only those whose node
        came up first (a hospital's trainer otherwise starts when its own node is healthy, a
        minute or more apart on a loaded host, and the others' rounds go on without it)."""
        self._clear_stale_network()
        self.docker.networks.create(self.network, driver="bridge", labels={_LABEL: self.prefix})
        self.compose(0, "up", "-d", "chain")
        self.rpc_url = self._chain_url()
        if trainers_together:
            self._up_all(timeout, "node")
            deadline = time.monotonic() + timeout
            while (sick := [i for i in range(self.n) if self.health(i) != "healthy"]):
                if time.monotonic() > deadline:
                    self.save_logs()
                    raise NodeError(f"the nodes of {', '.join(self.names[i] for i in sick)} "
                                    f"were not healthy within {timeout:.0f} s; logs under "
                                    f"{self.work / 'logs'}")
                time.sleep(1.0)
            # the trainers alone: an `up` of every service would run the sentinel's one-shot
            # deploy (and its chain check) again before its trainer, a minute on a loaded host
            self._up_all(timeout, "--no-deps", "ml")
        else:
            self._up_all(timeout)
        self.contract = SwarmContract(connect(self.rpc_url), self.contract_address)

    def _up_all(self, timeout: float, *args: str) -> None:
        """``docker-compose up -d [args]`` in every hospital's project at once."""
        errors: list[BaseException] = []

        def up_one(i: int) -> None:
            try:
                self.compose(i, "up", "-d", *args, timeout=timeout)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=up_one, args=(i,)) for i in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.save_logs()
            raise errors[0]

    def _chain_url(self, timeout: float = 60.0) -> str:
        chain = self.container(0, "chain")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chain.reload()
            ports = (chain.attrs["NetworkSettings"]["Ports"] or {}).get("8545/tcp")
            if ports:
                return f"http://127.0.0.1:{ports[0]['HostPort']}"
            time.sleep(0.2)
        raise NodeError("the chain container publishes no port for 8545")

    def trainer_indices(self) -> list[int]:
        return list(range(self.n))

    def trainer_exit(self, i: int) -> int | None:
        ml = self.container(i, "ml")
        ml.reload()
        if ml.status in ("exited", "dead"):
            return int(ml.attrs["State"]["ExitCode"])
        return None

    def trainer_failure(self, i: int) -> str:
        tail = self.container(i, "ml").logs(tail=8).decode(errors="replace").strip()
        return f"{' | '.join(tail.splitlines())}; logs under {self.work / 'logs'}"

    def wait_trainers(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [self.trainer_exit(i) for i in range(self.n)]
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                self.save_logs()
                raise NodeError(f"trainer of {self.names[bad[0]]} failed (exit {codes[bad[0]]}): "
                                f"{self.trainer_failure(bad[0])}")
            if all(c == 0 for c in codes):
                return
            time.sleep(1.0)
        self.save_logs()
        raise NodeError(f"the trainers did not finish within {timeout:.0f} s; logs under "
                        f"{self.work / 'logs'}")

    def health(self, i: int, service: str = "node") -> str:
        """The container's health status (starting, healthy, unhealthy) or its state."""
        box = self.container(i, service)
        state = box.attrs["State"]
        return str(state.get("Health", {}).get("Status") or state.get("Status"))

    # -- faults (the Docker SDK, as a person would use docker kill / start / pause) ---------------
    def kill_node(self, i: int) -> None:
        self.container(i, "node").kill()

    def start_node(self, i: int) -> None:
        self.container(i, "node").start()

    def pause(self, i: int, service: str = "node") -> None:
        self.container(i, service).pause()

    def unpause(self, i: int, service: str = "node") -> None:
        self.container(i, service).unpause()

    def disconnect(self, i: int) -> None:
        """Cut hospital ``i``'s node off the consortium network (peers and chain)."""
        self.docker.networks.get(self.network).disconnect(self.container(i, "node"))

    def reconnect(self, i: int) -> None:
        self.docker.networks.get(self.network).connect(
            self.container(i, "node"), aliases=[self.names[i]])

    # -- results ----------------------------------------------------------------------------------
    def read_file(self, i: int, service: str, path: str) -> bytes:
        """A file from a (running or stopped) container of hospital ``i``, volumes included."""
        stream, _ = self.container(i, service).get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise NodeError(f"{path} in {self.project(i)}'s {service} is not a file")
            data = tar.extractfile(member)
            assert data is not None
            return data.read()

    def result(self, i: int) -> dict[str, Any]:
        if i not in self._results:
            self._results[i] = json.loads(self.read_file(i, "ml", "/workspace/out/scores.json"))
        return self._results[i]

    def _clear_stale_network(self) -> None:
        """Docker lets two networks share a name, and compose then refuses both ("multiple
        networks with name ..."): a network of this name left by a run that was killed before
        its teardown is removed when it is ours (our label) and nothing is attached to it; any
        other is reported with what to do."""
        for net in self.docker.networks.list(names=[self.network]):
            if net.name != self.network:  # the engine matches names by prefix
                continue
            net.reload()
            if net.attrs.get("Labels", {}).get(_LABEL) == self.prefix and not net.containers:
                log.info("removing network %s left by an earlier run", self.network)
                net.remove()
                continue
            raise NodeError(
                f"a Docker network named {self.network} already exists ({net.short_id}, "
                f"{len(net.containers)} containers attached): another swarm with this prefix runs "
                f"on this engine, or one was left by hand. Stop that swarm (`docker-compose -p "
                f"{self.project(0)} down -v`, and the other hospitals' projects), or remove the "
                f"network (`docker network rm {net.short_id}`), then start again")

    def log(self, i: int, service: str) -> Path:
        """Hospital ``i``'s ``service`` log as it stands now, written to
        ``logs/<hospital>-<service>.log`` (where LocalSwarm keeps its processes' logs; the demo
        reads them there); not written when the service has no container."""
        path = self.work / "logs" / f"{self.names[i]}-{service}.log"
        try:
            logs = self.container(i, service).logs()
        except Exception:  # noqa: BLE001 - a service this hospital does not run
            return path
        path.write_bytes(logs)
        return path

    def save_logs(self) -> None:
        for i in range(self.n):
            for service in ("node", "ml", "chain", "deploy"):
                self.log(i, service)

    def close(self) -> None:
        """Take every project down with its volumes and remove the consortium network."""
        try:
            self.save_logs()
        except Exception as exc:  # noqa: BLE001 - teardown goes on regardless
            log.warning("could not save the container logs: %s", exc)
        for i in reversed(range(self.n)):
            try:
                self.compose(i, "down", "-v", "--remove-orphans", "-t", "5", check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("docker-compose down of %s failed: %s", self.project(i), exc)
        for net in self.docker.networks.list(filters={"label": f"{_LABEL}={self.prefix}"}):
            try:
                net.remove()
            except Exception as exc:  # noqa: BLE001
                log.warning("could not remove network %s: %s", net.name, exc)
        self.docker.close()
