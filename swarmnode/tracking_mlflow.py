"""Experiment tracking in MLflow: the callback's per-round swarm metrics on an MLflow tracking
server, over MLflow's REST API (``/api/2.0/mlflow/...``) with the standard library only (no
``mlflow`` package: ``mlflow-skinny`` alone pulls ~78 MB).

A site asks for it with ``SwarmCallback(..., mlflow_experiment="swarm-mnist")`` or, without
editing the script (a container site's ``.env``), with ``SWARMNODE_MLFLOW_EXPERIMENT``; the
argument wins. The server is ``mlflow_tracking_uri=`` or MLflow's own ``MLFLOW_TRACKING_URI``
(``http://`` or ``https://``: a tracking server; a local ``./mlruns`` or ``databricks`` URI is
refused with what to use instead). Credentials and TLS as MLflow reads them:
``MLFLOW_TRACKING_TOKEN`` (a bearer token), ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` (basic auth), ``MLFLOW_TRACKING_SERVER_CERT_PATH`` (a CA bundle),
``MLFLOW_TRACKING_CLIENT_CERT_PATH`` (a client certificate) and ``MLFLOW_TRACKING_INSECURE_TLS``.

One run per trainer (a restarted trainer starts a new one) in the experiment (created if
missing), named after the site, tagged ``swarmnode.site`` / ``swarmnode.address``, with the
site's swarm settings as params. At each merge, at step = the swarm round: the metrics
``swarm/loss``, ``swarm/metric``, ``swarm/round``, ``swarm/sync_seconds``,
``swarm/update_bytes`` and, at a DP site, ``swarm/epsilon``; the merged model's digest as the
tag ``swarm.digest``. At the end ``swarm/final_round``, the tag ``swarm.final_digest``, the run
marked FINISHED, then ``swarm/final_loss`` / ``swarm/final_metric`` when the callback validates.

Tracking never stops training. A server that refuses (an HTTP 4xx: credentials, a deleted
experiment) logs one warning naming what to check and tracking is off. A server that does not
answer (down, 5xx, timeout: ``timeout`` seconds per request, 5 by default) logs one warning; the
round's values are kept and sent with the next round's, and after :data:`TRIES` rounds in a row
without an answer tracking is off (a second warning says so).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from swarmnode.errors import ConfigError

__all__ = ["ENV_MLFLOW_EXPERIMENT", "ENV_MLFLOW_URI", "TRIES", "MLflowTracker"]

log = logging.getLogger("swarmnode.callback")

ENV_MLFLOW_EXPERIMENT = "SWARMNODE_MLFLOW_EXPERIMENT"
ENV_MLFLOW_URI = "MLFLOW_TRACKING_URI"
#: rounds in a row a silent server is retried before tracking is off
TRIES = 3
_API = "/api/2.0/mlflow/"
_MAX_PENDING = 1000  # MLflow's limit on metrics in one log-batch request


class _Refused(Exception):
    """The server answered, and not with success: retrying the same request will not help."""


class MLflowTracker:
    """One site's MLflow run (the talking rank's). Every method swallows a failure to log."""

    def __init__(self, experiment: str, tracking_uri: str | None = None, *,
                 timeout: float = 5.0) -> None:
        self.experiment = str(experiment).strip()
        if not self.experiment:
            raise ConfigError(f"mlflow_experiment / {ENV_MLFLOW_EXPERIMENT} is empty: name the "
                              "MLflow experiment the site's runs go to")
        uri = (tracking_uri or os.environ.get(ENV_MLFLOW_URI, "")).strip().rstrip("/")
        parts = urllib.parse.urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"MLflow tracking (experiment {self.experiment!r}) needs a tracking server's "
                f"URL in mlflow_tracking_uri or {ENV_MLFLOW_URI} (e.g. http://mlflow.example:5000"
                f"), got {uri or 'nothing'!r}; swarmnode talks to MLflow's REST API only (no "
                f"local ./mlruns or databricks URI): run `mlflow server`, or unset "
                f"{ENV_MLFLOW_EXPERIMENT}"
            )
        self.uri, self.timeout = uri, float(timeout)
        self._headers = {"Content-Type": "application/json", **_auth_headers()}
        self._tls = _tls_context() if parts.scheme == "https" else None
        self.run_id: str | None = None
        self.run_name, self._tags, self._params = "swarmnode site", {}, {}  # from joined()
        self._metrics: list[dict[str, Any]] = []  # not yet sent (a silent server)
        self._run_tags: dict[str, str] = {}
        self._finished_at: int | None = None  # end time of a finished run not yet marked so
        self.failed = False
        self._misses = 0  # rounds in a row without an answer

    @classmethod
    def from_settings(cls, experiment: str | None,
                      tracking_uri: str | None = None) -> MLflowTracker | None:
        """A tracker for the argument, else for ``SWARMNODE_MLFLOW_EXPERIMENT``; None when
        neither asks for one."""
        name = experiment or os.environ.get(ENV_MLFLOW_EXPERIMENT, "").strip()
        return cls(name, tracking_uri) if name else None

    # -- what the callback tells it ----------------------------------------------------------------
    def joined(self, info: dict[str, Any], settings: dict[str, Any]) -> None:
        """The node's hello (the site's name and address) and the site's swarm settings: the
        run's name, tags and params (the run itself is created with the first values)."""
        name, address = str(info.get("name") or ""), str(info.get("address") or "")
        if name:
            self.run_name = name
        self._tags = {k: v for k, v in (("swarmnode.site", name), ("swarmnode.address", address))
                      if v}
        self._params = {k: str(v) for k, v in settings.items() if v is not None}

    def merged(self, round: int, *, loss: float | None, metric: float | None, digest: str,
               seconds: float | None, update_bytes: int | None,
               epsilon: float | None = None) -> None:
        """One sync's outcome: what the site reported for ``round`` and what the round merged."""
        self._log(round, {"swarm/round": round, "swarm/loss": loss, "swarm/metric": metric,
                          "swarm/sync_seconds": seconds, "swarm/update_bytes": update_bytes,
                          "swarm/epsilon": epsilon}, {"swarm.digest": digest})

    def finished(self, round: int, digest: str) -> None:
        """The swarm's final round and the final model's digest; the run is marked FINISHED."""
        self._finished_at = _now_ms()
        self._log(round, {"swarm/final_round": round}, {"swarm.final_digest": digest})

    def final_metrics(self, round: int, loss: float | None, metric: float | None) -> None:
        """The final model's validation loss and metric (what the node records on chain)."""
        self._log(round, {"swarm/final_loss": loss, "swarm/final_metric": metric}, {})

    # -- the REST calls ----------------------------------------------------------------------------
    def _log(self, step: int, metrics: dict[str, float | int | None],
             tags: dict[str, str]) -> None:
        if self.failed:
            return
        now = _now_ms()
        self._metrics += [{"key": k, "value": float(v), "timestamp": now, "step": int(step)}
                          for k, v in metrics.items()
                          if v is not None and math.isfinite(float(v))]
        del self._metrics[:-_MAX_PENDING]  # a long silence keeps the newest values
        self._run_tags.update({k: v for k, v in tags.items() if v})
        try:
            self._send()
        except _Refused as exc:
            self.failed = True
            log.warning("MLflow tracking to %s (experiment %r) refused: %s; check %s, the "
                        "credentials (MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD)"
                        " and the experiment; training goes on without it", self.uri,
                        self.experiment, exc, ENV_MLFLOW_URI)
        except OSError as exc:  # no answer: URLError, timeouts, resets
            self._misses += 1
            reason = getattr(exc, "reason", None) or exc
            if self._misses == 1:
                log.warning("MLflow tracking server %s does not answer (%s); check that it runs "
                            "and that %s points to it; the values are kept and sent with the "
                            "next round's, training goes on", self.uri, reason, ENV_MLFLOW_URI)
            if self._misses >= TRIES:
                self.failed = True
                log.warning("MLflow tracking to %s is off: no answer in %d rounds in a row (%s)",
                            self.uri, TRIES, reason)
        except Exception as exc:  # noqa: BLE001 - an answer not MLflow's: tracking never stops
            self.failed = True  # training
            log.warning("MLflow tracking to %s failed (%s: %s; is it an MLflow tracking server?); "
                        "training goes on without it", self.uri, type(exc).__name__, exc)
        else:
            if self._misses:
                log.info("MLflow tracking server %s answers again", self.uri)
            self._misses = 0

    def _send(self) -> None:
        if self.run_id is None:
            self.run_id = self._start_run()
        if self._metrics or self._run_tags:
            self._call("runs/log-batch", {
                "run_id": self.run_id, "metrics": self._metrics,
                "tags": [{"key": k, "value": v} for k, v in self._run_tags.items()]})
            self._metrics, self._run_tags = [], {}
        if self._finished_at is not None:
            self._call("runs/update", {"run_id": self.run_id, "status": "FINISHED",
                                       "end_time": self._finished_at})
            self._finished_at = None

    def _start_run(self) -> str:
        try:
            found = self._call("experiments/get-by-name", {"experiment_name": self.experiment},
                               method="GET")
            experiment_id = str(found["experiment"]["experiment_id"])
        except _Refused as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                raise
            try:
                experiment_id = str(self._call("experiments/create",
                                               {"name": self.experiment})["experiment_id"])
            except _Refused as again:  # another site created it meanwhile
                if "RESOURCE_ALREADY_EXISTS" not in str(again):
                    raise
                found = self._call("experiments/get-by-name",
                                   {"experiment_name": self.experiment}, method="GET")
                experiment_id = str(found["experiment"]["experiment_id"])
        tags = {"mlflow.runName": self.run_name, "mlflow.source.name": "swarmnode",
                **self._tags}
        run = self._call("runs/create", {
            "experiment_id": experiment_id, "run_name": self.run_name, "start_time": _now_ms(),
            "tags": [{"key": k, "value": v} for k, v in tags.items()]})
        run_id = str(run["run"]["info"]["run_id"])
        if self._params:
            self._call("runs/log-batch", {"run_id": run_id, "params": [
                {"key": k, "value": v} for k, v in self._params.items()]})
        return run_id

    def _call(self, endpoint: str, body: dict[str, Any], method: str = "POST") -> Any:
        """One REST call; its JSON answer. :class:`_Refused` for an HTTP error that retrying
        does not cure (4xx but 429), OSError when the server does not answer (or answers 5xx,
        429, or something that is not MLflow's JSON)."""
        url = self.uri + _API + endpoint
        data = None
        if method == "GET":
            url += "?" + urllib.parse.urlencode(body)
        else:
            data = json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self._tls) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if 400 <= exc.code < 500 and exc.code != 429:
                raise _Refused(f"{endpoint}: HTTP {exc.code} {detail}") from None
            raise OSError(f"{endpoint}: HTTP {exc.code} {detail}") from None
        except TimeoutError:
            raise OSError(f"{endpoint}: no answer in {self.timeout:g} s") from None
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise OSError(f"{endpoint}: the answer is not JSON (is {self.uri} an MLflow "
                          "tracking server?)") from None


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """MLflow's ``error_code: message`` from an error answer, else the HTTP reason."""
    try:
        body = json.loads(exc.read(4096) or b"{}")
        return f"{body.get('error_code', '')}: {body.get('message', '')}".strip(": ")
    except (ValueError, OSError, AttributeError):
        return str(exc.reason)


def _auth_headers() -> dict[str, str]:
    """MLflow's own variables: a bearer token, else basic auth."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN", "").strip()
    if token:
        return {"Authorization": f"Bearer {token}"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user or password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def _tls_context() -> ssl.SSLContext:
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").strip().lower()
    if insecure in ("1", "true", "yes"):
        return ssl._create_unverified_context()  # noqa: S323 - the site asked for it
    cafile = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None
    client = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None
    try:
        context = ssl.create_default_context(cafile=cafile)
        if client:
            context.load_cert_chain(client)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"MLflow TLS files (MLFLOW_TRACKING_SERVER_CERT_PATH={cafile}, "
            f"MLFLOW_TRACKING_CLIENT_CERT_PATH={client}) cannot be read: {exc}"
        ) from None
    return context


def _now_ms() -> int:
    return int(time.time() * 1000)
