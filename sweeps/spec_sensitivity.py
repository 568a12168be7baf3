"""``uncertainty.sensitivity``: the δ-budget sensitivity's spec key (docs/uncertainty.md "δ's training budget").

    uncertainty:
      epochs: 3
      sensitivity:
        epochs_factor: 3     # or `epochs: 9`; one of the two (default: epochs_factor 3)
        members: per_run     # per_run (default) | per_config | all | N (the first N of per_run)

δ is fitted a second time, ``epochs`` long, for a subset of the δ stage's members (``sweeps.uncertainty_budget``),
and recorded apart (``records/uncertainty_budget``); the analysis reads C4 at both budgets on that subset.
"""
from __future__ import annotations

from typing import Any

from .spec_checks import Checker
from .spec_schema import SensitivitySpec

KEY = "uncertainty.sensitivity"
#: the subset rules besides a number (``sweeps.uncertainty_budget.budget_members``)
MEMBER_RULES = ("per_run", "per_config", "all")
DEFAULT_FACTOR = 3


def parse_sensitivity(c: Checker, raw: Any, epochs: int) -> SensitivitySpec | None:
    """Validate ``uncertainty.sensitivity`` against the default δ's ``epochs`` (None: no sensitivity)."""
    if raw is None:
        return None
    s = c.keys(raw, KEY, {"epochs": False, "epochs_factor": False, "members": False})
    if "epochs" in s and "epochs_factor" in s:
        raise c.fail(KEY, f"gives both epochs ({s['epochs']!r}) and epochs_factor ({s['epochs_factor']!r}); "
                          f"give one: epochs (the longer fit's epochs) or epochs_factor (a multiple of "
                          f"uncertainty.epochs, {epochs})")
    if "epochs" in s:
        n = c.number(s["epochs"], f"{KEY}.epochs", integer=True, positive=True)
        if n <= epochs:
            raise c.fail(f"{KEY}.epochs", f"{n} is not longer than uncertainty.epochs ({epochs}): the sensitivity "
                                          f"refits δ with a longer budget; use e.g. {DEFAULT_FACTOR * epochs} "
                                          f"({DEFAULT_FACTOR}x)")
    else:
        f = c.number(s.get("epochs_factor", DEFAULT_FACTOR), f"{KEY}.epochs_factor", integer=True, positive=True)
        if f < 2:
            raise c.fail(f"{KEY}.epochs_factor", f"must be >= 2 (the longer fit is epochs_factor x uncertainty.epochs "
                                                 f"= {f * epochs} epochs, no longer than the default's), got {f!r}; "
                                                 f"e.g. {DEFAULT_FACTOR}")
        n = f * epochs
    m = s.get("members", "per_run")
    if isinstance(m, str):
        m = c.choice(m, f"{KEY}.members", MEMBER_RULES)
    else:
        try:
            m = c.number(m, f"{KEY}.members", integer=True, positive=True)
        except Exception as e:  # a list, a mapping, a float: say what is valid
            raise c.fail(f"{KEY}.members", f"expected 'per_run', 'per_config', 'all' or a number of members "
                                          f">= 1, got {m!r}") from e
    return SensitivitySpec(epochs=int(n), members=m)
