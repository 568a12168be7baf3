"""The analysis stage: reads an experiment's records, writes correlations, tables and plots.

Imports only ``trainables.records`` from the project (docs/architecture.md "Rooms"); never Ray or torch.

The public names are loaded on first use (PEP 562), so that reading the indicator registry (the spec
checks ``analysis.indicators`` against it) does not import pandas' plotting and matplotlib.
"""
from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_WHERE = {"INDICATORS": "analysis.indicators", "INDICATOR_GROUPS": "analysis.indicators",
          "joint_tables": "analysis.run", "run_analysis": "analysis.run"}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
