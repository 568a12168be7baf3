"""Train one segmentation run and record its pool members (docs/architecture.md "Rooms", "Models and data"): the
dispatch between loops.

``train_segmenter(config, report=None)`` is a plain function: it runs with or without Ray.
Under Ray Tune, ``sweeps.pool`` passes a ``report`` callable that forwards each epoch's
metrics (and, at snapshot and ``checkpoint_every`` epochs, a checkpoint folder) to ``ray.tune.report``.

One run trains to ``max(snapshots)`` epochs; at every snapshot epoch it freezes a pool member:
its weights (``records/checkpoints``), its per-slice confusion counts on the source test split
and every target site (``records/parts``) and its packed predicted masks (``records/predictions``).

The architecture's registry entry (``trainables.models.ModelSpec.loop``) names its loop: ``"dense"``
(``trainables.dense``: smp, TransUNet) or ``"prompted"`` (``trainables.sam.loop``: the SAM family).
This is the one module that imports both; neither imports the other, and what they share (splits,
member records, reports) is ``trainables.member``'s. The trial's dict becomes a ``MemberConfig``
(``trainables.config``) here, once; the loops take the dataclass.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .config import MemberConfig
from .dense import load_dense_member, train_dense
from .member import ReportFn
from .models import resolve_model
from .sam.frozen import load_medsam_member
from .sam.loop import train_medsam

#: loop name (``ModelSpec.loop``) -> (train a run, rebuild a frozen member from its checkpoint dict)
LOOPS: dict[str, tuple[Callable[..., list[dict]], Callable[..., torch.nn.Module]]] = {
    "dense": (train_dense, load_dense_member),
    "prompted": (train_medsam, load_medsam_member),
}

__all__ = ["LOOPS", "load_member", "train_segmenter"]


def _loop(arch: str, defs: dict | None = None) -> str:
    try:
        return resolve_model(arch, defs).loop
    except KeyError:
        return "dense"


def train_segmenter(config: dict | MemberConfig, report: ReportFn | None = None) -> list[dict]:
    """Train one run; write a pool member at each snapshot epoch; return the member records.

    Args:
        config: a ``MemberConfig`` or its flat dict (``MemberConfig.keys()``; box-prompted architectures
            also take the ``SamOptions`` keys), converted here once. ``cache`` is a slice-cache folder,
            ``source`` and ``targets`` are site names in it, ``experiment_dir`` an absolute path.
        report: called after every epoch with the epoch's metrics and, at snapshot and ``checkpoint_every``
            epochs, a folder holding the resumable training state (None at other epochs).

    Returns:
        The member dicts written (schema ``records.MEMBER_COLUMNS``).
    """
    cfg = config if isinstance(config, MemberConfig) else MemberConfig.from_dict(config)
    train, _ = LOOPS[_loop(cfg.arch, cfg.model_defs)]
    return train(cfg, report)


def load_member(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a frozen pool member from its ``records/checkpoints/<member>.pt`` file."""
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    defs = {state["arch"]: state["model_def"]} if state.get("model_def") else None  # an open architecture
    _, load = LOOPS[_loop(state["arch"], defs)]  # MedSAM members store the decoder and where the frozen encoders are
    return load(state, device)
