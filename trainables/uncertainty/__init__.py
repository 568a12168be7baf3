"""Post-hoc uncertainty for a frozen pool member (paper §2.3–2.4; docs/uncertainty.md, docs/architecture.md
"Uncertainty"): the δ family.

* ``trainables.uncertainty.delta``     the net δ({ŷ, x}) and its equations (Eq. 5, 7, 8);
* ``trainables.uncertainty.baselines`` the Table-4 baselines (BayesCap, TTA, MC dropout);
* ``trainables.uncertainty.config``    ``DeltaConfig``, a δ fit's config;
* ``trainables.uncertainty.scoring``   Otsu areas, error ranking, scoring a member and writing its records;
* ``trainables.uncertainty.fit``       ``fit_uncertainty``: δ of one member;
* ``trainables.uncertainty.group``     ``fit_group``: δ of several members one after another in one process (one
  Ray Train run fits a group), each recorded as soon as it is scored.

The names of ``fit`` (``fit.__all__``) and ``fit_group`` are importable from the package itself (``from trainables.uncertainty
import fit_uncertainty``); they are loaded on first use, so that importing ``trainables.uncertainty.config``
(the spec's schema does) does not import torch's nets.
"""
from __future__ import annotations

import importlib


def __getattr__(name: str):
    if name == "fit_group":
        return importlib.import_module(".group", __name__).fit_group
    fit = importlib.import_module(".fit", __name__)
    if name in fit.__all__:
        return getattr(fit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
