"""The driver's console: one line per event, prefixed so that it stands out among Ray's logs."""
from __future__ import annotations


def log(msg: str) -> None:
    print(f"[oodsweep] {msg}", flush=True)
