"""The consortium exchange of `swarmnode consortium` / `swarmnode site`, as its people do it, for
the provisioning tests: the admin's desk and each site's folder under one temporary folder, and
only what the README says travels between them (requests one way, kits the other)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from swarmnode.cli import app

runner = CliRunner()
SITES = ["hospital-1", "hospital-2", "hospital-3"]


def cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


def write_consortium(desk: Path, sites: list[str] = SITES, *,
                     initial: dict[str, torch.Tensor] | None = None,
                     training: dict[str, object] | None = None, **extra: object) -> Path:
    """The admin's consortium file (and the initial weights it names) on the admin's desk."""
    desk.mkdir(parents=True, exist_ok=True)
    state = initial if initial is not None else {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(desk / "initial.safetensors"))
    conf = {
        "consortium": "study",
        "training": {"initial": "initial.safetensors", "sync_frequency": 4, "min_peers": 2,
                     **(training or {})},
        "sites": [{"name": s} for s in sites],
        "one_host": True,  # every site on this machine's Docker engine
        **extra,
    }
    path = desk / "consortium.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def provision(tmp: Path, sites: list[str] = SITES,
              **consortium: object) -> tuple[Path, dict[str, Path]]:
    """The whole exchange: init, requests (in each site's folder), sign, kits installed."""
    conf = write_consortium(tmp / "admin-desk", sites, **consortium)  # type: ignore[arg-type]
    cli("consortium", "init", conf)
    folders = {s: tmp / s for s in sites}
    requests = tmp / "admin-desk" / "requests"
    requests.mkdir()
    for s, folder in folders.items():
        cli("site", "request", "--name", s, "--dir", folder)
        shutil.copy(folder / f"{s}.request.json", requests)  # what the site sends
    cli("consortium", "sign", conf, *sorted(requests.iterdir()))
    for s, folder in folders.items():  # what the admin sends back
        shutil.copytree(tmp / "admin-desk" / "admin" / "kits" / s, folder / "kit")
        cli("site", "install", folder / "kit", "--dir", folder)
    return conf, folders


def secrets_of(folder: Path) -> list[bytes]:
    """The private material a site made: its TLS key, its keystore, its keystore password."""
    out = [p.read_bytes() for p in (folder / "certs").glob("*.key")]
    out += [(folder / "chain" / f).read_bytes() for f in ("keystore.json", "keystore.password")]
    return out
