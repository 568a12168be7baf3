"""The helpers that check a spec mapping: ``${VAR}`` expansion, paths, and ``Checker`` (keys, numbers,
choices, searchable parameters), whose every error names the file, the key, the value and the fix."""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .spec_schema import DISTRIBUTIONS, Param, SpecError

#: A spec file larger than this is refused unread (a spec is a few kB; the study's is under 4 kB).
MAX_SPEC_BYTES = 1 << 20
#: Mappings and lists nested deeper than this are refused (a spec nests four levels).
MAX_SPEC_DEPTH = 32


class _Refused(Exception):
    """Internal: the YAML uses an alias or nests too deeply (raised while composing, before any value is built)."""

    def __init__(self, msg: str, mark) -> None:
        super().__init__(msg)
        self.line = mark.line + 1 if mark is not None else None


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases and with a depth limit.

    An alias (``*name``) makes the composed tree share nodes, and nested aliases grow it exponentially (the
    "billion laughs": 700 bytes that become 10^9 strings). PyYAML has no option for that, so the composer
    refuses the alias event itself, before a node is built, and ``${VAR}`` expansion and the key checks never
    see a shared tree. Anchors alone (``&name``) are harmless and accepted.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise _Refused(f"the YAML alias *{ev.anchor} (a reference to the anchor &{ev.anchor})", ev.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_SPEC_DEPTH:
                raise _Refused(f"mappings and lists nested more than {MAX_SPEC_DEPTH} deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(path: Path, what: str = "spec") -> Any:
    """The YAML document of a spec file (``what`` names it in messages), read safely: at most
    ``MAX_SPEC_BYTES``, UTF-8, no aliases, at most ``MAX_SPEC_DEPTH`` levels. Errors are ``SpecError``s
    naming the file, the line and the fix."""
    path = Path(path)
    with open(path, "rb") as f:  # read at most the cap (a FIFO or a device never ends)
        data = f.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: the {what} file is larger than {MAX_SPEC_BYTES // 2**20} MiB (a spec is a few kB); "
                        f"is it the right file? (see sweeps/presets/demo.yaml)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: the {what} file is not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"save it as UTF-8 YAML (see sweeps/presets/demo.yaml)") from None
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a SafeLoader subclass)
    except _Refused as e:
        at = f" at line {e.line}" if e.line else ""
        raise SpecError(f"{path}{at}: {e} is not allowed in a {what} file (aliases can expand a few bytes into "
                        f"gigabytes); write the value out where it is used, or use ${{VAR}} for a value "
                        f"repeated in several places") from None

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

