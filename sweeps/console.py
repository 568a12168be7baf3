"""The driver's console: one line per event, prefixed so that it stands out among Ray's logs."""
from __future__ import annotations


def log(msg: str) -> None:
    print(f"[oodsweep] {msg}", flush=True)


def command(*words) -> str:
    """A command line for the user to copy, each word shell-quoted (a path with a space stays one word)."""
    import shlex

    return " ".join(shlex.quote(str(w)) for w in words)
