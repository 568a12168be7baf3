"""The pool-member contract (docs/architecture.md "Records"): what every training loop of the pool shares.

A training *run* (``run_name``) trains one configuration to ``max(snapshots)`` epochs and freezes a
pool *member* (``member_id``) at each snapshot epoch. This module owns the pool-member contract around the
trial's config (``MemberConfig``, defined in ``trainables.config``), the splits a run reads (``train_val_rows``,
``eval_sets``, ``val_set``, ``epoch_sets``), the per-epoch summary (``summarize``), the report
(``end_epoch``), writing a member (``write_member``: its checkpoint, predictions and records) and the
resumable training state (``save_state`` / ``load_state``). The dense loop (``trainables.dense``) and
the prompted loop (``trainables.sam.loop``) both use it; neither imports the other.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import torch

from . import records
from .config import MemberConfig
from .data.cache import SliceCache
from .exclusive import ExclusiveClasses
from .models import resolve_model
from .surface import write_member_surface

if TYPE_CHECKING:
    from .uncertainty.config import DeltaConfig

ReportFn = Callable[[dict, "str | None"], None]
#: The resumable training state's file in a reported checkpoint folder.
STATE_FILE = "state.pt"


def member_id(arch: str, lr: float, seed: int, epoch: int) -> str:
    return f"{arch}-lr{lr:.6g}-s{seed}-ep{epoch}"


def run_name(arch: str, lr: float, seed: int, last_epoch: int) -> str:
    """A training run (its members are ``member_id(..., epoch)`` at each snapshot up to ``last_epoch``)."""
    return f"{arch}-lr{lr:.6g}-s{seed}-E{last_epoch}"


def end_epoch(cfg: MemberConfig, run_id: str, metrics: dict, report: ReportFn | None, ckpt_dir: str | None) -> None:
    """Print the epoch's line (``verbose``) and hand its metrics and checkpoint folder to the reporter."""
    if cfg.verbose:
        print_epoch(run_id, metrics)
    if report is not None:
        report(metrics, ckpt_dir)


def print_epoch(run_id: str, metrics: dict) -> None:
    """The epoch's line: ``[run] epoch e: loss l val_iou_3d v id_iou_3d i ood_mean_iou_3d o``."""
    scores = " ".join(f"{k} {metrics[k]:.3f}" for k in ("val_iou_3d", "id_iou_3d", "ood_mean_iou_3d")
                      if k in metrics and not math.isnan(metrics[k]))
    print(f"[{run_id}] epoch {metrics['epoch']}: loss {metrics['train_loss']:.4f} {scores}")


def train_val_rows(cache: SliceCache, source: str, val_fraction: float,
                   split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``source``'s training rows split by case into (train, validation) rows.

    ``val_fraction`` of the training cases (rounded; at least one when the fraction is positive and
    the source has three or more training cases; never all of them), drawn with ``split_seed``. The
    validation cases are scored every epoch (role ``"val"``) and choose configurations; they are never
    trained on and never reported as a result. Computed here rather than in the slice cache so that
    the cache (shared by experiments with other fractions) keeps the dataset's train/test split.
    """
    rows = cache.rows(source, "train")
    frac = val_fraction or 0.0
    cases = cache.index["case_id"].to_numpy()[rows].astype(str)
    uniq = np.unique(cases)
    n_val = int(round(frac * len(uniq)))
    if n_val == 0 and frac > 0 and len(uniq) >= 3:
        n_val = 1
    n_val = min(n_val, len(uniq) - 1)
    if n_val <= 0:
        return rows, rows[:0]
    val_cases = np.random.default_rng(split_seed or 0).permutation(uniq)[:n_val]
    is_val = np.isin(cases, val_cases)
    return rows[~is_val], rows[is_val]


def val_set(cache: SliceCache, cfg: MemberConfig) -> list[tuple[str, str, np.ndarray]]:
    """``[(source, "val", rows)]`` for the validation split (empty when there is none)."""
    val_rows = train_val_rows(cache, cfg.source, cfg.val_fraction, cfg.split_seed)[1]
    return [(cfg.source, "val", val_rows)] if len(val_rows) else []


def epoch_sets(cfg: MemberConfig, sets: list, epoch: int) -> list:
    """The eval sets scored at ``epoch``: all of them at a snapshot epoch (or with ``eval_every_epoch``), only
    the validation split in between, when there is one. A member is frozen only at snapshots, so the test
    splits scored in between fed nothing but the learning curves (with 7 targets, most of an epoch's time);
    the validation split drives the search and stays in every epoch's report."""
    if cfg.eval_every_epoch or epoch in cfg.snapshots:
        return sets
    val = [s for s in sets if s[1] == "val"]
    return val or sets


def eval_sets(cache: SliceCache, cfg: MemberConfig | DeltaConfig) -> list[tuple[str, str, np.ndarray]]:
    """(site, role, rows): the source's test split (role "id") then each target (role "ood")."""
    sets = [(cfg.source, "id", cache.rows(cfg.source, "test"))]
    sets += [(t, "ood", cache.rows(t, cfg.target_split)) for t in cfg.targets]
    return sets


def summarize(slices: pd.DataFrame) -> dict[str, float]:
    """Per-epoch scalars: ``id_<metric>``, ``val_<metric>`` (the validation split, when scored),
    ``ood_<site>_<metric>`` and ``ood_mean_<metric>``."""
    out: dict[str, float] = {}
    for metric in ("iou_3d", "dice_2d"):
        per = records.metric_by(slices, metric, by=("site", "role"))
        ood = []
        for (site, role), v in per.items():
            v = float(v) if not math.isnan(v) else 0.0
            if role in ("id", "val"):
                out[f"{role}_{metric}"] = v
            else:
                out[f"ood_{site}_{metric}"] = v
                ood.append(v)
        out[f"ood_mean_{metric}"] = float(np.mean(ood)) if ood else float("nan")
    return out


def model_in_channels(model: torch.nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return int(first.in_channels)


def save_state(path: Path, state: dict) -> None:
    """Write a run's resumable training state (model, optimizer, epoch, ...) to ``path``."""
    torch.save(state, path)


def restore_state(module: torch.nn.Module, opt: torch.optim.Optimizer, accel, state: dict) -> int:
    """Load a pool loop's trained module, optimizer and gradient scaler from ``state``; its epoch."""
    module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    accel.load_scaler(state)
    return int(state["epoch"])


def load_state(folder: str | os.PathLike, device: torch.device, name: str = STATE_FILE) -> dict:
    """The resumable training state in a reported checkpoint folder (``weights_only``: no code runs)."""
    return torch.load(Path(folder) / name, map_location=device, weights_only=True)


def write_member(exp: Path, cfg: MemberConfig, run_id: str, epoch: int, model, slices: pd.DataFrame,
                 preds: dict[str, torch.Tensor], cache: SliceCache, sets, state: dict | None = None,
                 extra: dict | None = None) -> dict:
    """Write a member's checkpoint, predictions and records. ``state`` replaces the default checkpoint
    dict (MedSAM stores its decoder only); ``extra`` adds fields to the member record."""
    mid = member_id(cfg.arch, cfg.lr, cfg.seed, epoch)
    ckpt = records.records_dir(exp) / "checkpoints" / f"{mid}.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    spec = resolve_model(cfg.arch, cfg.model_defs)
    if state is None:
        state = {"model": model.state_dict(), "arch": cfg.arch, "in_channels": model_in_channels(model),
                 "classes": len(cache.labels), "epoch": epoch}
        if isinstance(model, ExclusiveClasses):  # load_dense_member rebuilds the wrapper around L + 1 logits
            state.update(classes=len(cache.labels) + 1, label_kind="exclusive")
        if spec.definition is not None:  # an open architecture: the member is rebuilt from its definition
            state["model_def"] = spec.definition
    torch.save(state, tmp)
    os.replace(tmp, ckpt)
    for site, role, rows in sets:
        if role == "val":
            continue
        idx = cache.index.iloc[rows]
        records.save_predictions(exp, mid, site, preds[site].numpy(), idx["case_id"].tolist(),
                                 idx["slice_idx"].to_numpy())
    # the per-case surface metrics, before the member record (its done marker)
    write_member_surface(exp, mid, cache, sets, preds, cfg.surface_tolerance_mm)
    member = {"member_id": mid, "run_id": run_id, "arch": cfg.arch, "lr": cfg.lr, "epochs": epoch,
              "seed": cfg.seed, "batch_size": cfg.batch_size, "source": cfg.source,
              # relative to the experiment, so that a moved experiment folder still finds it
              "checkpoint": ckpt.relative_to(exp).as_posix(),
              # box-prompted members are prompted with each slice's ground-truth box (labels used)
              "oracle_prompt": bool(spec.prompted), **(extra or {})}
    records.write_member_part(exp, member, slices.assign(member_id=mid))
    return {**member, "checkpoint": str(ckpt)}  # to the caller: the file itself


class PoolRun:
    """What the dense and the prompted pool loops share as ``trainables.runner.EpochLoop``s: the run's
    name and experiment, its members, a checkpoint (the resumable state) at every snapshot epoch and every
    ``checkpoint_every`` epochs, and
    the verbose epoch line. A subclass sets ``device`` and implements ``load_state``, ``draw``,
    ``train``, ``score`` (calling ``snapshot`` at snapshot epochs) and ``state``."""

    state_file = STATE_FILE
    ckpt_prefix = "ckpt-"

    def __init__(self, cfg: MemberConfig):
        self.cfg = cfg
        self.seed = cfg.seed
        self.exp = Path(cfg.experiment_dir)
        self.run_id = run_name(cfg.arch, cfg.lr, cfg.seed, cfg.last_epoch)
        self.members: list[dict] = []

    @property
    def epochs(self) -> int:
        return self.cfg.last_epoch

    def is_snapshot(self, epoch: int) -> bool:
        return epoch in self.cfg.snapshots

    def checkpoint(self, epoch: int) -> bool:
        """At every snapshot and every ``checkpoint_every`` epochs: a restarted trial resumes from the latest.
        Saving reads the model and optimizer state only; the run's draws and arithmetic stay the same."""
        return self.is_snapshot(epoch) or epoch % self.cfg.checkpoint_every == 0

    def snapshot(self, epoch: int, metrics: dict, model, slices: pd.DataFrame, preds: dict[str, torch.Tensor],
                 cache: SliceCache, sets, **kw) -> None:
        """Write the pool member of ``epoch`` (``write_member``) and name it in the epoch's metrics."""
        member = write_member(self.exp, self.cfg, self.run_id, epoch, model, slices, preds, cache, sets, **kw)
        self.members.append(member)
        metrics["member_id"] = member["member_id"]

    def log(self, metrics: dict) -> None:
        if self.cfg.verbose:
            print_epoch(self.run_id, metrics)
