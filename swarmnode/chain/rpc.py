"""JSON-RPC connection and the translation of web3 failures into swarmnode errors.

Everything here uses standard ``eth_*`` calls only. Reverts surface as web3's
``ContractLogicError`` over HTTP and as eth-tester's ``TransactionFailed`` in-process; both become
:class:`~swarmnode.errors.ContractReverted` in :mod:`swarmnode.chain.client`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from web3 import HTTPProvider, Web3
from web3.exceptions import ContractLogicError, ProviderConnectionError, TimeExhausted, Web3RPCError

from swarmnode.errors import ChainError, ChainTimeout, ChainUnavailable, ConfigError

__all__ = ["chain_id", "connect", "describe", "revert_reason", "rpc_calls", "rpc_guard"]

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
        return super().make_request(method, params)


def rpc_calls(w3: Web3) -> int:
    """JSON-RPC requests sent through ``w3`` so far (0 for other providers)."""
    return int(getattr(w3.provider, "calls", 0))


def rpc_calls_by_method(w3: Web3) -> dict[str, int]:
    """JSON-RPC requests sent through ``w3`` so far, by method."""
    return dict(getattr(w3.provider, "by_method", {}))


def connect(rpc_url: str, timeout: float = 10.0) -> Web3:
    """A Web3 on ``rpc_url`` (http or https) after checking that the chain answers."""
    parsed = urlparse(rpc_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(
            f"RPC URL {rpc_url!r} is not an http(s) URL; pass e.g. --rpc-url http://127.0.0.1:8545"
        )
    provider = _CountingProvider(
        rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None
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
    """The contract's revert reason if ``exc`` is a revert (HTTP or in-process), else None."""
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
    if text in ("", "execution reverted"):
        return "reverted without a reason"
    return text


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
        raise ChainUnavailable(
            f"no JSON-RPC answer at {describe(w3)} while {what} ({type(exc).__name__}); is the "
            "chain running? start one with `swarmnode chain up`"
        ) from None
    except Web3RPCError as exc:
        if revert_reason(exc) is not None:
            raise
        message = getattr(exc, "message", None) or str(exc)
        raise ChainError(f"the chain at {describe(w3)} refused {what}: {message}") from None
