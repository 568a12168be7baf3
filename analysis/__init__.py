"""The analysis stage: reads an experiment's records, writes correlations, tables and plots.

Imports only ``trainables.records`` from the project (DESIGN §2); never Ray or torch.
"""
from __future__ import annotations

from analysis.indicators import INDICATOR_GROUPS, INDICATORS
from analysis.run import joint_tables, run_analysis

__all__ = ["INDICATORS", "INDICATOR_GROUPS", "joint_tables", "run_analysis"]
