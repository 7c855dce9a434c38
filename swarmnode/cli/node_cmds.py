"""`swarmnode run` (the node service), `swarmnode demo` and `swarmnode spec`."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from swarmnode.cli.common import SiteContract, SiteRpcUrl, command, console, site_defaults

__all__ = ["register"]


STOP_GRACE_S = 8.0  # SIGTERM to exit, at most (docker stop waits 10 s before SIGKILL)


def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Node config (YAML).")] = (
        None
    ),
    rpc_url: Annotated[str | None, typer.Option("--rpc-url", help="Chain JSON-RPC URL.")] = None,
    contract: Annotated[str | None, typer.Option("--contract", help="Contract address.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Node name.")] = None,
    peer_listen: Annotated[str | None, typer.Option("--peer-listen", help="host:port.")] = None,
    peer_endpoint: Annotated[str | None, typer.Option("--peer-endpoint")] = None,
    local_api: Annotated[str | None, typer.Option("--local-api")] = None,
    key_index: Annotated[int | None, typer.Option("--key-index")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir")] = None,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
    log_format: Annotated[str | None, typer.Option(
        "--log-format", help="plain or json: one line per event with site, round and stage "
        "(env SWARMNODE_LOG_FORMAT).")] = None,
) -> None:
    """Run this site's swarm node service until interrupted."""

    @command
    def body() -> None:
        from swarmnode.config import load_config
        from swarmnode.logs import setup_logging
        from swarmnode.node.service import NodeService, StartupInterrupted

        overrides: dict[str, Any] = dict(
            rpc_url=rpc_url, contract=contract, name=name, peer_listen=peer_listen,
            peer_endpoint=peer_endpoint, local_api=local_api, key_index=key_index,
            data_dir=data_dir, log_level=log_level, log_format=log_format,
        )
        cfg = load_config(config, overrides)
        context = setup_logging(cfg.log_level, cfg.log_format, cfg.name)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:  # waits for the chain, the contract and its authorisation; SIGTERM ends the wait
            node = NodeService(cfg, stop)
            context.progress = node  # every line from now on: its round and stage
            node.start()
        except StartupInterrupted as exc:
            logging.getLogger("swarmnode.node").info("%s; exiting", exc)
            return
        try:
            stop.wait()
        finally:
            # Rounds in progress end at their next step; a call blocked on a peer or the chain
            # must not keep the process: whatever still runs after STOP_GRACE_S is cut short
            # (the latest model is on disk by then: stop() flushes the store first).
            watchdog = threading.Timer(STOP_GRACE_S, os._exit, (0,))
            watchdog.daemon = True
            watchdog.start()
            node.stop()

    body()


def demo(
    nodes: Annotated[int, typer.Option("--nodes", "-n", min=2, max=8, help="Hospitals.")] = 3,
    merge: Annotated[str, typer.Option("--merge", help="Merge rule.")] = "mean",
    topology: Annotated[str, typer.Option(
        "--topology", help="leader (the round's leader merges every update) or sharded (each "
        "site merges one slice of the parameters; the same merged model).")] = "leader",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the summary.")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", help="Certificates, logs, models.")] = Path(
        "demo-run"
    ),
    seed: Annotated[int, typer.Option("--seed")] = 0,
    example: Annotated[str | None, typer.Option(
        "--example", help="What the hospitals train: digits (a CNN; each hospital holds only "
        "some of the digits; the default) or breast-cancer (tabular; the container demo's)."
    )] = None,
    kill_leader_round: Annotated[
        int | None,
        typer.Option("--kill-leader-round", help="Kill this round's leader before it commits."),
    ] = None,
    containers: Annotated[bool, typer.Option(
        "--containers", help="Run each hospital as containers (compose/hospital.yaml) on a Docker "
        "engine, the sentinel's chain too; needs a checkout of the repository.")] = False,
    secure_aggregation: Annotated[bool, typer.Option(
        "--secure-aggregation", help="Train with secure aggregation: each round's leader "
        "receives only masked updates and learns only their sum (needs 3 or more hospitals; "
        "with the processes or --containers).")] = False,
) -> None:
    """A whole swarm on this machine: chain, certificates, N node services, N trainers."""

    @command
    def body() -> None:
        from swarmnode.demo.orchestrator import (
            demo_options,
            run_demo,
            run_demo_containers,
            show_summary,
        )

        run = run_demo_containers if containers else run_demo
        summary = run(
            demo_options(containers=containers, nodes=nodes, merge=merge, topology=topology,
                         example=example, secure_aggregation=secure_aggregation,
                         workdir=workdir, seed=seed, kill_leader_round=kill_leader_round),
            console=console,
        )
        show_summary(summary, console)
        if json_path is not None:
            import json

            json_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
            console.print(f"summary written to {json_path}")
        secure = summary["secure_aggregation"]
        if not summary["all_nodes_agree"] or (secure is not None and (
                secure["plain_updates_received"] or not secure["masked_updates_received"])):
            raise typer.Exit(1)

    body()


def spec(
    weights: Annotated[Path, typer.Argument(help="The model's initial weights (.safetensors).")],
    sync_frequency: Annotated[int, typer.Option("--sync-frequency", min=1)],
    min_peers: Annotated[int, typer.Option("--min-peers", min=1)],
    merge_method: Annotated[str, typer.Option("--merge", help="Merge rule.")] = "mean",
    out: Annotated[Path, typer.Option("--out", help="Where to write the spec JSON.")] = Path(
        "spec.json"
    ),
    max_weight: Annotated[int | None, typer.Option(
        "--max-weight", min=1, help="The largest weight (samples x node_weight) one site may "
        "check in with; the contract refuses heavier check-ins. Default: no cap.")] = None,
    compression: Annotated[str, typer.Option(
        "--compression", help="How members send their updates to the leader: none (the whole "
        "float32 model), bf16 or fp16 (the change from the round's starting model, half the "
        "bytes), int8 (8-bit with error feedback, about a quarter).")] = "none",
    topology: Annotated[str, typer.Option(
        "--topology", help="leader (the round's leader merges every update) or sharded (each "
        "participant merges one slice of the parameters: the same merged model, 2(N-1)/N "
        "models per site a round instead of 2(N-1) at the leader; mean, coordmedian, "
        "trimmedmean).")] = "leader",
    clip_norm: Annotated[float | None, typer.Option(
        "--clip-norm", help="Clip each site's change per round to this "
        "L2 norm (merge option clip_norm). Default: no clipping.")] = None,
    secure_aggregation: Annotated[bool, typer.Option(
        "--secure-aggregation", help="Pin secure aggregation (the leader learns only the sum; "
        "needs --merge mean, --min-peers >= 3, --clip-norm and --max-weight). Not yet run by "
        "the round engine: deployment refuses such a spec.")] = False,
    noise_multiplier: Annotated[float | None, typer.Option(
        "--noise-multiplier", help="With --secure-aggregation: distributed noise on the masked "
        "sum (each site adds its share of discrete Gaussian noise; the sum's sigma is this x "
        "max_weight x clip_norm) and the swarm's epsilon per round in the logs and `swarmnode "
        "report`. Default: no noise.")] = None,
    dp_delta: Annotated[float, typer.Option(
        "--dp-delta", help="The delta the swarm's epsilon is reported at (with "
        "--noise-multiplier).")] = 1e-5,
) -> None:
    """Write the training spec (for `contract deploy --spec`) from a model's weights file.

    In Python: ``SwarmCallback(model, ...).training_spec().to_json()`` gives the same JSON.
    """

    @command
    def body() -> None:
        from swarmnode import merge
        from swarmnode.errors import ConfigError
        from swarmnode.spec import TrainingSpec
        from swarmnode.transport import serde

        merge.get(merge_method)
        if clip_norm is not None and not 0 < clip_norm < float("inf"):
            raise ConfigError(f"--clip-norm {clip_norm} must be a positive number")
        try:
            data = weights.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read weights file {weights}: {exc.strerror}") from None
        state = serde.decode(data, expected_digest=None, spec=None, max_bytes=len(data),
                             reject_nonfinite=False)
        ts = TrainingSpec.from_state(state, sync_frequency=sync_frequency, min_peers=min_peers,
                                     merge_method=merge_method, merge_options=None
                                     if clip_norm is None else {"clip_norm": clip_norm})
        if max_weight is not None:
            import dataclasses

            ts = TrainingSpec.from_json(
                dataclasses.replace(ts, max_weight=max_weight).to_json(), "--max-weight")
        if compression != "none":
            import dataclasses

            from swarmnode.transport import compression as codec

            try:
                codec.check_mode(compression)
            except ValueError as exc:
                raise ConfigError(f"--compression: {exc}") from None
            ts = TrainingSpec.from_json(
                dataclasses.replace(ts, compression=compression).to_json(), "--compression")
            codec.layout({n: (p.shape, p.dtype) for n, p in ts.params.items()}, compression)
        if topology != "leader":
            import dataclasses

            ts = dataclasses.replace(ts, topology=topology)  # ConfigError: what to change
        if secure_aggregation:
            import dataclasses

            ts = dataclasses.replace(ts, secure_aggregation=True)  # ConfigError: what to change
            from swarmnode.privacy.guards import check_initial

            norm = sum(float(t.double().square().sum()) for t in state.values()
                       if t.is_floating_point()) ** 0.5
            try:  # round 1 encodes the parameters whole: they must fit its bound
                check_initial(norm, int(ts.max_weight or 1))
            except ValueError as exc:
                raise ConfigError(f"--secure-aggregation: {exc}") from None
        if noise_multiplier is not None:
            import dataclasses

            from swarmnode.privacy.noise import DistributedNoise

            try:
                noise = DistributedNoise(noise_multiplier, dp_delta)
            except ValueError as exc:
                raise ConfigError(f"--noise-multiplier/--dp-delta: {exc}") from None
            ts = dataclasses.replace(ts, distributed_noise=noise)  # ConfigError: what to change
        out.write_text(ts.to_json() + "\n")
        console.print(f"wrote {out}: {len(ts.params)} tensors, spec hash {ts.digest.hex()}")

    body()


def audit(
    contract: SiteContract = None,
    rpc_url: SiteRpcUrl = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="A model file to check against the final digest: "
                     "safetensors, or a torch.save'd state dict."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    round_: Annotated[int | None, typer.Option(
        "--round", help="Secure aggregation: check committed round N's masked sum through this "
        "site's running node (it fetches the leader's evidence and checks it against the "
        "hashes and digest on chain) instead of replaying the log.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="With --round: the node's config (its local API).")] = None,
    local_api: Annotated[str | None, typer.Option(
        "--local-api", help="With --round: the node's local API (default: the config's, "
        "else unix socket swarm-data/node.sock).")] = None,
) -> None:
    """Replay the training's on-chain audit log and check it (and optionally a model file);
    with --round N (secure aggregation), have this site's node check round N's masked sum."""
    if round_ is not None:
        audit_round(round_, config, local_api, fmt)
        return

    @command
    def body() -> None:
        from swarmnode.chain.audit import audit as run_audit
        from swarmnode.chain.audit import tensors_digest
        from swarmnode.chain.client import SwarmContract
        from swarmnode.errors import ConfigError
        from swarmnode.transport import serde

        digest = None
        if model is not None:
            try:
                raw = model.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read model file {model}: {exc.strerror}") from None
            digest = serde.digest(raw)
        # a registry's address: its one running training (else its newest)
        w3, address, _ = site_defaults(rpc_url, contract)  # in a site folder: its kit's
        report = run_audit(SwarmContract.resolve(w3, address), digest)
        if model is not None and report.model_matches is False and report.final_digest:
            # the same tensors written by another writer (safetensors.torch.save_file, another
            # header order or metadata, a torch.save'd state dict): compare the tensors, through
            # the canonical layout
            try:
                report.model_matches = tensors_digest(raw, str(model)) == report.final_digest
            except ConfigError as exc:
                report.problems.append(str(exc))
        if fmt == "json":
            import json

            print(json.dumps(report.to_json(), indent=2))
        else:
            final = report.final_digest.hex() if report.final_digest else "-"
            console.print(f"rounds committed {report.rounds_committed}, abandoned "
                          f"{report.rounds_abandoned}, re-elections {report.reelections}; "
                          f"final round {report.final_round or '-'}, digest {final}")
            if report.model_matches is not None:
                console.print(f"{model}: " + ("[green]is the swarm's final model[/]"
                                              if report.model_matches
                                              else "[red]is NOT the swarm's final model[/]"))
            for p in report.problems:
                console.print(f"[red]problem:[/] {p}")
            console.print("[green]audit log consistent[/]" if report.ok else "[red]audit failed[/]")
        if not report.ok:
            raise typer.Exit(1)

    body()


def audit_round(round_: int, config: Path | None, local_api: str | None, fmt: str) -> None:
    """``swarmnode audit --round N``: the site's node checks committed round N's masked sum
    (node.secaudit) and says what differed, if anything."""

    @command
    def body() -> None:
        from swarmnode.errors import ConfigError
        from swarmnode.transport.local import LocalClient

        if round_ < 1:
            raise ConfigError(f"--round {round_}: rounds are numbered from 1")
        target = local_api
        if target is None:
            if config is not None:
                from swarmnode.config import load_config

                target = load_config(config, {}).local_target
            else:
                target = f"unix://{(Path('swarm-data') / 'node.sock').resolve()}"
        client = LocalClient(target)
        try:
            result, _ = client.call("audit_round", {"round": round_}, timeout=600.0)
        finally:
            client.close()
        if fmt == "json":
            import json

            print(json.dumps(result, indent=2))
        elif result.get("kept_starting_model"):
            console.print(f"round {round_}: fewer than 3 sites added weight, no sum was formed; "
                          "the starting model was committed again")
        else:
            console.print(f"round {round_}: [green]the leader's sum checks out[/]: "
                          f"{len(result['summed'])} masked updates as hashed on chain, "
                          f"{len(result['dropouts'])} dropouts' masks removed, digest "
                          f"{result['digest']} is their mean")

    body()


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
    app.command("run")(run)
    app.command("demo")(demo)
    app.command("spec")(spec)
