"""JSON-RPC connection and the translation of web3 failures into swarmnode errors.

Everything here uses standard ``eth_*`` calls only. Reverts surface as web3's
``ContractLogicError`` over HTTP and as eth-tester's ``TransactionFailed`` in-process; both become
:class:`~swarmnode.errors.ContractReverted` in :mod:`swarmnode.chain.client`.
"""

from __future__ import annotations

import ast
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests
from web3 import HTTPProvider, Web3
from web3.exceptions import ContractLogicError, ProviderConnectionError, TimeExhausted, Web3RPCError

from swarmnode.errors import ChainError, ChainTimeout, ChainUnavailable, ConfigError

__all__ = ["ChainTls", "chain_id", "chain_tls", "connect", "describe", "revert_reason",
           "rpc_calls", "rpc_guard", "rpc_stats", "use_chain_tls"]

_REVERT_PREFIXES = ("execution reverted: ", "execution reverted:", "VM Exception while processing")

try:  # eth-tester is only there with web3[tester]
    from eth_tester.exceptions import TransactionFailed as _TesterFailed
except ImportError:  # pragma: no cover - the lock installs it
    _TesterFailed = None


class _CountingProvider(HTTPProvider):
    """An HTTPProvider that counts its JSON-RPC requests (the round benchmark reports them)."""

    calls = 0

    def make_request(self, method, params):  # type: ignore[no-untyped-def,override]
        self.calls += 1
        by = self.__dict__.setdefault("by_method", {})
        by[str(method)] = by.get(str(method), 0) + 1
        t0 = time.monotonic()
        try:
            return super().make_request(method, params)
        except Exception:
            self.__dict__["errors"] = self.__dict__.get("errors", 0) + 1
            raise
        finally:  # what a node's metrics report: the chain's latency
            self.__dict__["seconds"] = self.__dict__.get("seconds", 0.0) + time.monotonic() - t0


def rpc_calls(w3: Web3) -> int:
    """JSON-RPC requests sent through ``w3`` so far (0 for other providers)."""
    return int(getattr(w3.provider, "calls", 0))


def rpc_stats(w3: Web3) -> tuple[int, float, int]:
    """(requests, seconds spent in them, requests that failed) through ``w3`` so far."""
    p = w3.provider
    return (int(getattr(p, "calls", 0)), float(p.__dict__.get("seconds", 0.0)),
            int(p.__dict__.get("errors", 0)))


def rpc_calls_by_method(w3: Web3) -> dict[str, int]:
    """JSON-RPC requests sent through ``w3`` so far, by method."""
    return dict(getattr(w3.provider, "by_method", {}))


@dataclass(frozen=True)
class ChainTls:
    """TLS files for an ``https://`` chain URL: this site's client certificate and key (the
    sentinel's chain gateway asks for one from the consortium's CA) and the CA bundle that the
    server's certificate must chain to (None: the system's CAs, for a public HTTPS endpoint)."""

    cert: Path | None = None
    key: Path | None = None
    trust: Path | None = None

    def request_kwargs(self) -> dict[str, object]:
        """``requests`` arguments, after checking that the files exist and fit together."""
        if (self.cert is None) != (self.key is None):
            given, missing = ("CERT", "KEY") if self.key is None else ("KEY", "CERT")
            raise ConfigError(f"SWARMNODE_CHAIN_{given} is set but SWARMNODE_CHAIN_{missing} is "
                              "not: a client certificate for the chain needs both (the site's "
                              "node certificate and its key)")
        out: dict[str, object] = {}
        if self.cert is not None and self.key is not None:
            from swarmnode.identity.certs import check_cert_matches_key

            for what, path in (("SWARMNODE_CHAIN_CERT", self.cert),
                               ("SWARMNODE_CHAIN_KEY", self.key)):
                if not Path(path).is_file():
                    raise ConfigError(f"{what} {path} does not exist; for the sentinel's chain "
                                      "gateway use this site's node certificate and key")
            check_cert_matches_key(Path(self.cert), Path(self.key))
            out["cert"] = (str(self.cert), str(self.key))
        if self.trust is not None:
            if not Path(self.trust).is_file():
                raise ConfigError(f"SWARMNODE_CHAIN_TRUST {self.trust} does not exist; for the "
                                  "sentinel's chain gateway use the consortium's trust bundle "
                                  "(trust.pem)")
            out["verify"] = str(self.trust)
        return out


_default_tls: ChainTls | None = None


def use_chain_tls(tls: ChainTls | None) -> None:
    """The TLS files :func:`connect` uses for ``https://`` URLs when it is given none (``swarmnode
    run`` could set them from a node config; containers set the environment)."""
    global _default_tls
    _default_tls = tls


def chain_tls(env: Mapping[str, str] | None = None) -> ChainTls | None:
    """What :func:`use_chain_tls` set, else ``SWARMNODE_CHAIN_CERT`` / ``SWARMNODE_CHAIN_KEY`` /
    ``SWARMNODE_CHAIN_TRUST`` from the environment, else None."""
    if _default_tls is not None:
        return _default_tls
    env = os.environ if env is None else env
    files = {k: (Path(v) if (v := env.get(f"SWARMNODE_CHAIN_{k.upper()}", "").strip()) else None)
             for k in ("cert", "key", "trust")}
    return ChainTls(**files) if any(files.values()) else None


def connect(rpc_url: str, timeout: float = 10.0, tls: ChainTls | None = None) -> Web3:
    """A Web3 on ``rpc_url`` (http or https) after checking that the chain answers.

    An ``https://`` URL uses ``tls`` (default: :func:`chain_tls`): a client certificate for the
    sentinel's chain gateway, and the CA bundle that the server's certificate chains to.
    """
    parsed = urlparse(rpc_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(
            f"RPC URL {rpc_url!r} is not an http(s) URL; pass e.g. --rpc-url http://127.0.0.1:8545"
        )
    kwargs: dict[str, object] = {"timeout": timeout}
    if parsed.scheme == "https":
        tls = tls if tls is not None else chain_tls()
        if tls is not None:
            kwargs.update(tls.request_kwargs())
    provider = _CountingProvider(
        rpc_url, request_kwargs=kwargs, exception_retry_configuration=None
    )
    w3 = Web3(provider)
    # web3's validation middleware asks for the chain id before and after every call (3 RPCs per
    # contract read); transactions are signed here with the chain id read once (chain.tx), and
    # addresses are never ENS names. Without both, one read is one RPC.
    for name in ("validation", "ens_name_to_address"):
        try:
            w3.middleware_onion.remove(name)
        except ValueError:
            pass
    with rpc_guard(w3, "asking for the chain id"):
        w3.eth.chain_id  # noqa: B018 - readiness probe
    return w3


def describe(w3: Web3) -> str:
    """Where ``w3`` points, for messages."""
    uri = getattr(w3.provider, "endpoint_uri", None)
    return str(uri) if uri else f"the in-process chain ({type(w3.provider).__name__})"


def chain_id(w3: Web3) -> int:
    with rpc_guard(w3, "asking for the chain id"):
        return int(w3.eth.chain_id)


def revert_reason(exc: BaseException) -> str | None:
    """The contract's revert reason if ``exc`` is a revert (HTTP or in-process), else None.

    A custom error of swarmnode's contracts comes back decoded (a
    :class:`~swarmnode.chain.reverts.Revert`: the message, plus the error's name and arguments).
    """
    from swarmnode.chain.reverts import decode_revert

    for data in _revert_data(exc):
        decoded = decode_revert(data)
        if decoded is not None:
            return decoded
    if isinstance(exc, ContractLogicError):
        text = exc.message or str(exc)
    elif _TesterFailed is not None and isinstance(exc, _TesterFailed):
        text = str(exc.args[0]) if exc.args else str(exc)
    elif isinstance(exc, Web3RPCError) and "revert" in str(exc).lower():
        text = getattr(exc, "message", None) or str(exc)
    else:
        return None
    for prefix in _REVERT_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    text = text.strip()
    if text in ("", "execution reverted", "b''", 'b""'):
        return "reverted without a reason"
    return text


def _revert_data(exc: BaseException) -> Iterator[bytes | str]:
    """The candidates for raw revert data that web3 (HTTP) and eth-tester attach to a revert."""
    data = getattr(exc, "data", None)
    if isinstance(data, bytes | str):
        yield data
    elif isinstance(data, Mapping) and isinstance(data.get("data"), str):
        yield data["data"]
    # Hardhat's node with automine answers eth_sendRawTransaction of a reverting transaction with
    # an error (a Web3RPCError, not a ContractLogicError) whose data is {message, txHash, data}
    response = getattr(exc, "rpc_response", None)
    error = response.get("error") if isinstance(response, Mapping) else None
    nested = error.get("data") if isinstance(error, Mapping) else None
    if isinstance(nested, Mapping) and isinstance(nested.get("data"), str):
        yield nested["data"]
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, bytes):
            yield arg
        elif isinstance(arg, str):
            text = arg.split("execution reverted: ", 1)[-1].strip()
            if text[:2] in ("b'", 'b"'):  # eth-tester shows the revert data as a bytes literal
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(value, bytes):
                    yield value
            else:
                yield text


@contextmanager
def rpc_guard(w3: Web3, what: str) -> Iterator[None]:
    """Turn connection failures into ChainUnavailable and other RPC errors into ChainError.

    Reverts pass through untouched: the caller knows which contract function they belong to.
    """
    try:
        yield
    except TimeExhausted as exc:
        raise ChainTimeout(
            f"timed out {what} on {describe(w3)} ({exc}); is the chain mining blocks?"
        ) from None
    except (OSError, ProviderConnectionError) as exc:
        reason = _tls_failure(exc)
        if reason is not None:
            raise ChainUnavailable(
                f"the TLS connection to {describe(w3)} failed while {what} ({reason}); the "
                "sentinel's chain gateway takes this site's certificate from the consortium's "
                "CA: set SWARMNODE_CHAIN_CERT, SWARMNODE_CHAIN_KEY and SWARMNODE_CHAIN_TRUST to "
                "the site's node certificate, its key and the consortium's trust bundle"
            ) from None
        raise ChainUnavailable(
            f"no JSON-RPC answer at {describe(w3)} while {what} ({type(exc).__name__}); is the "
            "chain running? start one with `swarmnode chain up`"
        ) from None
    except Web3RPCError as exc:
        if revert_reason(exc) is not None:
            raise
        message = getattr(exc, "message", None) or str(exc)
        raise ChainError(f"the chain at {describe(w3)} refused {what}: {message}") from None


def _tls_failure(exc: BaseException) -> str | None:
    """The TLS reason (e.g. CERTIFICATE_VERIFY_FAILED, certificate required) behind a
    connection failure, or None when it was not TLS."""
    import ssl

    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo and len(seen) < 32:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return str(getattr(e, "reason", None) or e)
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        todo += [c for c in (e.__cause__, e.__context__, getattr(e, "reason", None))
                 if isinstance(c, BaseException)]
    if isinstance(exc, requests.exceptions.SSLError):
        return str(exc)
    return None
