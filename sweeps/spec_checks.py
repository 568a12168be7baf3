"""The helpers that check a spec mapping: ``${VAR}`` expansion, paths, and ``Checker`` (keys, numbers,
choices, searchable parameters), whose every error names the file, the key, the value and the fix."""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .spec_schema import DISTRIBUTIONS, Param, SpecError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, key: str, where: str, env: Mapping[str, str]) -> Any:
    """``value`` with ``${VAR}`` / ``${VAR:-default}`` replaced from ``env`` (the caller's environment,
    passed in: a command that puts its experiments elsewhere does not rewrite ``os.environ``)."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in env:
                return env[var]
            if default is not None:
                return default
            raise SpecError(f"{where}: {key} uses ${{{var}}} but the environment variable {var} is not set; "
                            f"export {var}=... or write ${{{var}:-default}}")
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, f"{key}.{k}" if key else k, where, env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{key}[{i}]", where, env) for i, v in enumerate(value)]
    return value


class Checker:
    """Checks one spec file's values; every error is a ``SpecError`` starting with ``where`` and the key."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, msg: str) -> SpecError:
        return SpecError(f"{self.where}: {key}: {msg}")

    def keys(self, d: Any, key: str, allowed: dict[str, bool]) -> dict:
        """``allowed`` maps a key to whether it is required."""
        if not isinstance(d, dict):
            raise self.fail(key or "(top level)", f"expected a mapping, got {type(d).__name__} {d!r}")
        for k in d:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(f"{key}.{k}" if key else str(k),
                                f"unknown key{hint}; valid keys here: {', '.join(allowed)}")
        for k, required in allowed.items():
            if required and k not in d:
                raise self.fail(f"{key}.{k}" if key else k, "is required but missing")
        return d

    def number(self, v: Any, key: str, *, positive: bool = False, integer: bool = False,
               nonneg: bool = False, maximum: float | None = None) -> float | int:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            try:
                v = float(v) if not integer else int(v)  # YAML reads 1e-4 (no dot) as a string
            except (TypeError, ValueError):
                raise self.fail(key, f"expected a number, got {v!r}") from None
        if integer and float(v) != int(v):
            raise self.fail(key, f"expected an integer, got {v!r}")
        if positive and not v > 0:
            raise self.fail(key, f"must be > 0, got {v!r}")
        if nonneg and v < 0:
            raise self.fail(key, f"must be >= 0, got {v!r}")
        if maximum is not None and v > maximum:
            raise self.fail(key, f"must be <= {maximum}, got {v!r}")
        return int(v) if integer else float(v)

    def choice(self, v: Any, key: str, valid: tuple | list) -> Any:
        if v not in valid:
            close = difflib.get_close_matches(str(v), [str(x) for x in valid], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.fail(key, f"unknown value {v!r}{hint}; valid choices: {', '.join(map(str, valid))}")
        return v

    def param(self, v: Any, key: str, check_one) -> Param:
        if not isinstance(v, dict):
            v = {"grid": v if isinstance(v, list) else [v]}
        if len(v) != 1 or next(iter(v)) not in DISTRIBUTIONS:
            raise self.fail(key, f"expected one of {{{', '.join(k + ': ...' for k in DISTRIBUTIONS)}}}, got {v!r}")
        kind, vals = next(iter(v.items()))
        if not isinstance(vals, list) or not vals:
            raise self.fail(f"{key}.{kind}", f"expected a non-empty list, got {vals!r}")
        if kind in ("loguniform", "uniform"):
            if len(vals) != 2:
                raise self.fail(f"{key}.{kind}", f"expected [low, high], got {vals!r}")
            vals = [check_one(x, f"{key}.{kind}[{i}]") for i, x in enumerate(vals)]
            if not vals[0] < vals[1]:
                raise self.fail(f"{key}.{kind}", f"low must be < high, got {vals!r}")
        else:
            vals = [check_one(x, f"{key}.{kind}[{i}]") for i, x in enumerate(vals)]
            if len(set(vals)) != len(vals):
                raise self.fail(f"{key}.{kind}", f"has repeated values {vals!r}")
        return Param(kind, tuple(vals))


def resolve_path(v: str, base: Path) -> Path:
    """``v`` with ``~`` expanded, relative to ``base`` unless absolute."""
    p = Path(os.path.expanduser(str(v)))
    return p if p.is_absolute() else (base / p).resolve()

