"""What the chain tests share: asserting a refusal by the contracts' decoded custom error."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from swarmnode.chain.reverts import Revert
from swarmnode.errors import ContractReverted


@contextmanager
def refused(cls: type[ContractReverted], name: str, **args: Any) -> Iterator[Any]:
    """The call inside reverts with the contract's custom error ``name`` (decoded by selector),
    raised as ``cls``, with the typed arguments ``args`` (those given)."""
    with pytest.raises(ContractReverted) as exc:
        yield exc
    reason = exc.value.reason
    assert isinstance(reason, Revert), f"not a decoded custom error: {exc.value}"
    assert reason.name == name, str(exc.value)
    assert type(exc.value) is cls, (type(exc.value), str(exc.value))
    for key, value in args.items():
        assert reason.args[key] == value, (key, reason.args)
