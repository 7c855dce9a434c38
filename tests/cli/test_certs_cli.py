"""`swarmnode certs ca / issue / show / bundle` through typer's CliRunner."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from typer.testing import CliRunner

from swarmnode.cli import app
from swarmnode.identity import describe, load_certs

runner = CliRunner()


def _ok(*args: str) -> str:
    result = runner.invoke(app, ["certs", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_ca_issue_show_bundle(tmp_path: Path) -> None:
    out = _ok("ca", "--out", str(tmp_path / "ca-a"), "--name", "Org A CA", "--org", "Org A",
              "--days", "100")
    ca_cert, ca_key = tmp_path / "ca-a" / "Org-A-CA.pem", tmp_path / "ca-a" / "Org-A-CA.key"
    assert describe(ca_cert).fingerprint.hex() in out
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600

    out = _ok("issue", "node-1", "--ca-cert", str(ca_cert), "--ca-key", str(ca_key),
              "--out", str(tmp_path / "n1"), "--dns", "node1.example.org", "--dns", "localhost",
              "--ip", "127.0.0.1", "--days", "30")
    node = tmp_path / "n1" / "node-1.pem"
    info = describe(node)
    assert info.fingerprint.hex() in out and "swarmnode authorize" in out
    assert info.dns == ("node1.example.org", "localhost") and info.ips == ("127.0.0.1",)
    assert stat.S_IMODE((tmp_path / "n1" / "node-1.key").stat().st_mode) == 0o600

    shown = json.loads(_ok("show", str(node), "--format", "json"))
    assert shown["sha256"] == info.fingerprint.hex()
    assert shown["subject"] == "CN=node-1,O=Org A" and shown["issuer"] == "CN=Org A CA,O=Org A"
    assert shown["dns"] == ["node1.example.org", "localhost"] and shown["ips"] == ["127.0.0.1"]
    assert shown["not_after"] == info.not_after.isoformat() and shown["is_ca"] is False

    table = _ok("show", str(node))
    for text in ("CN=node-1,O=Org A", "node1.example.org", "127.0.0.1", info.fingerprint.hex(),
                 "days left"):
        assert text in table

    _ok("ca", "--out", str(tmp_path / "ca-b"), "--name", "Org B CA")
    bundle = tmp_path / "trust.pem"
    out = _ok("bundle", str(ca_cert), str(tmp_path / "ca-b" / "Org-B-CA.pem"), "--out",
              str(bundle))
    assert "2 CA(s)" in out
    assert [c.subject.rfc4514_string() for c in load_certs(bundle)] == [
        "CN=Org A CA,O=Org A", "CN=Org B CA",
    ]
    both = json.loads(_ok("show", str(bundle), "--format", "json"))
    assert [b["is_ca"] for b in both] == [True, True]


def test_errors_exit_with_the_identity_band(tmp_path: Path) -> None:
    _ok("ca", "--out", str(tmp_path / "ca"), "--name", "CA")
    again = runner.invoke(app, ["certs", "ca", "--out", str(tmp_path / "ca"), "--name", "CA"])
    assert again.exit_code == 30
    assert "already exists" in again.output and "--force" in again.output
    _ok("ca", "--out", str(tmp_path / "ca"), "--name", "CA", "--force")

    no_san = runner.invoke(app, [
        "certs", "issue", "n", "--ca-cert", str(tmp_path / "ca" / "CA.pem"),
        "--ca-key", str(tmp_path / "ca" / "CA.key"), "--out", str(tmp_path / "n"),
    ])
    assert no_san.exit_code == 30 and "at least one --dns or --ip" in no_san.output

    missing = runner.invoke(app, ["certs", "show", str(tmp_path / "missing.pem")])
    assert missing.exit_code == 30 and "missing.pem does not exist" in missing.output
    assert "Traceback" not in missing.output
