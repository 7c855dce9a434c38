"""MLflow tracking servers for the tracking tests, and a reader of what they hold.

:class:`RestServer` is a small real HTTP server (a thread of the test process, a port of its own)
that implements the handful of MLflow REST endpoints swarmnode's tracker calls, per MLflow's REST
API reference (``/api/2.0/mlflow/experiments/get-by-name``, ``experiments/create``,
``runs/create``, ``runs/log-batch``, ``runs/update``), with MLflow's error answers
(``{"error_code": "RESOURCE_DOES_NOT_EXIST", ...}`` with 404 and so on), plus ``runs/get`` and
``metrics/get-history`` to read back; it records every request (headers too) and can be told to
refuse (401) or to fail (503). CI has no ``mlflow`` package (~860 MB with its server's
dependencies): :func:`real_server` starts a real ``mlflow server`` only where one is installed
(``SWARMNODE_TEST_MLFLOW``: its executable, else ``mlflow`` on PATH), and the same reader checks
both.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from swarmnode.demo.swarm import wait_until

API = "/api/2.0/mlflow/"


class RestServer:
    """MLflow's tracking REST endpoints, in memory. ``answer``: None (serve), or an HTTP status
    every request gets instead (401: refuse, 503: fail)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []  # method, path, headers
        self.answer: int | None = None
        self.experiments: dict[str, str] = {}  # name -> id
        self.runs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                self._reply(*server.handle("GET", url.path, dict(self.headers), query))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                self._reply(*server.handle("POST", self.path, dict(self.headers), body))

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RestServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, method: str, path: str, headers: dict[str, str],
               body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append((method, path, headers, body))
            if self.answer is not None:
                return self.answer, {"error_code": "UNAUTHENTICATED" if self.answer == 401
                                     else "TEMPORARILY_UNAVAILABLE", "message": "as told"}
            endpoint = path.removeprefix(API)
            try:
                return 200, getattr(self, "_" + endpoint.replace("/", "_").replace("-", "_"))(
                    body)
            except AttributeError:
                return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": path}
            except KeyError as exc:
                return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": f"{exc}"}
            except LookupError as exc:
                return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": str(exc)}
            except ValueError as exc:
                return 400, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": str(exc)}

    # -- the endpoints (request and response fields as MLflow documents them) -------------------
    def _experiments_get_by_name(self, q: dict[str, Any]) -> dict[str, Any]:
        name = q["experiment_name"]
        if name not in self.experiments:
            raise LookupError(f"Could not find experiment with name '{name}'")
        return {"experiment": {"experiment_id": self.experiments[name], "name": name,
                               "lifecycle_stage": "active"}}

    def _experiments_create(self, body: dict[str, Any]) -> dict[str, Any]:
        if body["name"] in self.experiments:
            raise ValueError(f"Experiment '{body['name']}' already exists.")
        self.experiments[body["name"]] = str(len(self.experiments) + 1)
        return {"experiment_id": self.experiments[body["name"]]}

    def _runs_create(self, body: dict[str, Any]) -> dict[str, Any]:
        if body["experiment_id"] not in self.experiments.values():
            raise LookupError(f"No Experiment with id={body['experiment_id']} exists")
        run_id = uuid.uuid4().hex
        info = {"run_id": run_id, "run_uuid": run_id, "experiment_id": body["experiment_id"],
                "run_name": body.get("run_name", ""), "status": "RUNNING",
                "start_time": int(body["start_time"]), "lifecycle_stage": "active"}
        self.runs[run_id] = {"info": info, "metrics": [], "params": {},
                             "tags": {t["key"]: t["value"] for t in body.get("tags", [])}}
        return {"run": self._run(run_id)}

    def _runs_log_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        run = self._get(body["run_id"])
        for m in body.get("metrics", []):
            run["metrics"].append({"key": m["key"], "value": float(m["value"]),
                                   "timestamp": int(m["timestamp"]), "step": int(m["step"])})
        for p in body.get("params", []):
            if run["params"].get(p["key"], p["value"]) != p["value"]:
                raise KeyError(f"param {p['key']} changed")
            run["params"][p["key"]] = p["value"]
        run["tags"].update({t["key"]: t["value"] for t in body.get("tags", [])})
        return {}

    def _runs_update(self, body: dict[str, Any]) -> dict[str, Any]:
        info = self._get(body["run_id"])["info"]
        info["status"] = body["status"]
        if "end_time" in body:
            info["end_time"] = int(body["end_time"])
        return {"run_info": info}

    def _runs_get(self, q: dict[str, Any]) -> dict[str, Any]:
        return {"run": self._run(q["run_id"])}

    def _metrics_get_history(self, q: dict[str, Any]) -> dict[str, Any]:
        return {"metrics": [m for m in self._get(q["run_id"])["metrics"]
                            if m["key"] == q["metric_key"]]}

    def _get(self, run_id: str) -> dict[str, Any]:
        if run_id not in self.runs:
            raise LookupError(f"Run '{run_id}' not found")
        return self.runs[run_id]

    def _run(self, run_id: str) -> dict[str, Any]:
        run = self.runs[run_id]
        return {"info": run["info"], "data": {
            "params": [{"key": k, "value": v} for k, v in run["params"].items()],
            "tags": [{"key": k, "value": v} for k, v in run["tags"].items()]}}


def mlflow_executable() -> str | None:
    """A real ``mlflow`` where one is installed (``SWARMNODE_TEST_MLFLOW``, else PATH)."""
    given = os.environ.get("SWARMNODE_TEST_MLFLOW", "").strip()
    return given if given and os.access(given, os.X_OK) else shutil.which("mlflow")


@contextmanager
def real_server(workdir: Path) -> Iterator[str]:
    """A real ``mlflow server`` (sqlite store in ``workdir``, a free port); its URI."""
    exe = mlflow_executable()
    assert exe, "no mlflow executable"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "mlflow-server.log", "wb")
    proc = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
         "--default-artifact-root", str(workdir / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                assert proc.poll() is None, (workdir / "mlflow-server.log").read_text()[-2000:]
                return False
        wait_until(answers, 120, "mlflow server to answer", poll=0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def read_run(uri: str, run_id: str) -> dict[str, Any]:
    """A run as MLflow's REST API returns it: info, params and tags (dicts), and every logged
    metric's history (``{key: [(step, value), ...]}``)."""
    def get(endpoint: str, **query: str) -> Any:
        url = f"{uri}{API}{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)

    run = get("runs/get", run_id=run_id)["run"]
    data = run["data"]
    keys = {m["key"] for m in data.get("metrics", [])} or {
        "swarm/loss", "swarm/metric", "swarm/round", "swarm/update_bytes", "swarm/epsilon",
        "swarm/final_round", "swarm/final_loss", "swarm/final_metric", "swarm/sync_seconds"}
    history = {}
    for key in keys:
        points = get("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
        if points:
            history[key] = sorted((int(m["step"]), float(m["value"])) for m in points)
    return {"info": run["info"], "metrics": history,
            "params": {p["key"]: p["value"] for p in data.get("params", [])},
            "tags": {t["key"]: t["value"] for t in data.get("tags", [])}}
