"""Merge rules by name: ``register`` adds one, ``get`` looks one up, ``names`` lists them.

A rule is a pure function ``rule(updates: Sequence[Update], **options) -> StateDict``; its options
are keyword-only parameters with defaults. Names are lower-case; look-ups ignore case and spaces.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from swarmnode.errors import ConfigError
from swarmnode.types import StateDict

__all__ = ["MergeRule", "check_options", "get", "names", "options_of", "register"]

MergeRule = Callable[..., StateDict]

_RULES: dict[str, MergeRule] = {}


def _normalise(name: str) -> str:
    return name.strip().lower()


def register(name: str) -> Callable[[MergeRule], MergeRule]:
    """Decorator: register ``rule`` under ``name`` (lower-case); ConfigError if already taken."""
    key = _normalise(name)
    if not key or key != name:
        raise ConfigError(f"merge rule name {name!r} must be a non-empty lower-case word")

    def decorator(rule: MergeRule) -> MergeRule:
        if key in _RULES and _RULES[key] is not rule:
            raise ConfigError(
                f"merge rule '{key}' is already registered (by {_RULES[key].__module__}); "
                "pick another name"
            )
        _RULES[key] = rule
        return rule

    return decorator


def names() -> list[str]:
    """The registered rule names, sorted."""
    return sorted(_RULES)


def get(name: str) -> MergeRule:
    """The rule called ``name``; ConfigError with a "did you mean" and the known rules otherwise."""
    key = _normalise(str(name))
    if key in _RULES:
        return _RULES[key]
    close = difflib.get_close_matches(key, names(), n=1, cutoff=0.5)
    hint = f"Did you mean '{close[0]}'? " if close else ""
    raise ConfigError(
        f"unknown merge rule {name!r}. {hint}Known rules: {', '.join(names())}. "
        "Set merge_method to one of them."
    )


def options_of(rule: MergeRule) -> dict[str, Any]:
    """A rule's options and their defaults (its keyword-only parameters)."""
    return {
        p.name: p.default
        for p in inspect.signature(rule).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """ConfigError naming the option (with a "did you mean") if rule ``name`` does not take it."""
    known = options_of(get(name))
    for option in options:
        if option in known:
            continue
        close = difflib.get_close_matches(option, list(known), n=1, cutoff=0.5)
        hint = f"Did you mean '{close[0]}'? " if close else ""
        listed = ", ".join(sorted(known)) if known else "none"
        raise ConfigError(
            f"merge rule '{_normalise(name)}' has no option '{option}'. {hint}"
            f"Its options: {listed}. Fix merge_options in the training settings."
        )


def coerce_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with each value of the type of the rule's default: the training spec travels
    as JSON, where ``max_iter: 10`` may arrive as ``10.0``. ConfigError for an option the rule
    does not take, or a fractional value for an integer option."""
    check_options(name, options)
    known = options_of(get(name))
    out: dict[str, Any] = {}
    for option, value in options.items():
        default = known[option]
        if isinstance(default, bool):
            out[option] = bool(value)
        elif isinstance(default, int):
            number = float(value)
            if not number.is_integer():
                raise ConfigError(
                    f"merge rule '{_normalise(name)}': option '{option}' must be a whole number, "
                    f"got {value!r}. Fix merge_options in the training settings."
                )
            out[option] = int(number)
        elif isinstance(default, float):
            out[option] = float(value)
        else:
            out[option] = value
    return out

