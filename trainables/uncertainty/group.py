"""δ for a group of pool members in one process (docs/uncertainty.md "Groups"; docs/performance.md).

A Ray Train run costs seconds to start (its controller, the worker group, the process group) and a
member's δ fit at demo size costs about as much, so ``sweeps.uncertainty`` fits a *group* of members
(by default the snapshot members of one training run) in one Train run: ``fit_group`` runs
``fit_uncertainty`` for each of them, one after another, in the same worker process, keeping the
open slice cache (and so the device and its context) between members.

What stays as it was for one member:

* each member's fit is ``fit_uncertainty`` itself: its ``DeltaFit`` seeds torch's generator, its own
  shuffling generator and its held-out draw from the member's config alone, so a member gets the same
  random draws in any group, at any place in it;
* each member's records are written as soon as it is scored (the slice part last, the member's done
  marker); a member whose slice part exists is skipped, so a group killed part-way resumes at its
  first unrecorded member;
* a resumable checkpoint names its member (``MEMBER_FILE`` in the checkpoint folder): a restarted
  group resumes that member's fit from it, and no other member's.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from torch import nn

from .. import records
from ..data.cache import open_slice_cache
from .config import DeltaConfig
from .fit import fit_uncertainty

#: the file in a δ checkpoint folder that names the member it belongs to
MEMBER_FILE = "member.txt"

Report = Callable[[dict, "str | None"], None]


def recorded_members(experiment_dir: str | os.PathLike, folder: str = records.DEFAULT_DELTA_RECORDS) -> set[str]:
    """The members whose δ is recorded: their slice part (``records/uncertainty/parts/<member>.parquet``,
    written last by ``score_member``) exists; ``folder``: the records' folder (``DeltaConfig.records_folder``)."""
    parts = records.records_dir(experiment_dir) / folder / "parts"
    return {p.name[: -len(".parquet")] for p in parts.glob("*.parquet")} if parts.is_dir() else set()


def checkpoint_member(folder: str | os.PathLike | None) -> str | None:
    """The member a δ checkpoint folder belongs to (``MEMBER_FILE``); None when there is none or it has no
    such file (a checkpoint of a one-member run written before groups)."""
    if not folder or not (Path(folder) / MEMBER_FILE).is_file():
        return None
    return (Path(folder) / MEMBER_FILE).read_text().strip()


def _tagged(report: Report | None, member_id: str) -> Report | None:
    """``report`` with the member's id in every result and in every checkpoint folder (``MEMBER_FILE``)."""
    if report is None:
        return None

    def tag(metrics: dict, ckpt_dir: str | None) -> None:
        if ckpt_dir:
            (Path(ckpt_dir) / MEMBER_FILE).write_text(member_id)
        report({**metrics, "member_id": member_id}, ckpt_dir)
    return tag


def fit_group(configs: list[dict | DeltaConfig], report: Report | None = None,
              wrap_model: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0, world_size: int = 1,
              resume_from: str | os.PathLike | None = None, stored_yhat: bool = True) -> dict[str, dict]:
    """Fit and score δ for each member of ``configs`` in turn (``fit_uncertainty``), skipping recorded ones.

    Args:
        configs: one δ config per member (a ``DeltaConfig`` or its flat dict), in the order they are fitted;
            all of one experiment and slice cache.
        report: as ``fit_uncertainty``'s; every result carries ``member_id``, and every checkpoint folder
            names its member; a member recorded before is reported once, ``{"epoch", "scored", "skipped"}``. Ranks > 0 report ``{"epoch", "scored", "member_id"}`` once after each member,
            so that every rank reports as often as rank 0 (Ray Train's reports are collective).
        wrap_model, rank, world_size: as ``fit_uncertainty``'s (DDP across the Train workers).
        resume_from: a checkpoint folder the group reported before; it resumes the member it names
            (``checkpoint_member``; a folder without a name resumes a one-member group) when that member is
            still unrecorded, and is ignored otherwise.
        stored_yhat: as ``fit_uncertainty``'s.

    Returns:
        ``{member_id: summary}`` of the members fitted now (rank 0; empty on other ranks).
    """
    cfgs = [c if isinstance(c, DeltaConfig) else DeltaConfig.from_dict(c) for c in configs]
    if not cfgs:
        return {}
    done = recorded_members(cfgs[0].experiment_dir, cfgs[0].records_folder)  # once, before this rank writes anything: every rank agrees
    todo = [c for c in cfgs if c.member_id not in done]
    for cfg in cfgs:  # a recorded member's result says so (a tracker ends its run: it may have missed the first)
        if cfg.member_id in done and report is not None:
            report({"epoch": cfg.epochs, "scored": 1, "skipped": 1, "member_id": cfg.member_id}, None)
    owner = checkpoint_member(resume_from) or (cfgs[0].member_id if len(cfgs) == 1 else None)
    cache = open_slice_cache(cfgs[0].cache) if todo else None
    out: dict[str, dict] = {}
    for cfg in todo:
        if cfg.cache != cfgs[0].cache:
            raise ValueError(f"δ group: member {cfg.member_id} reads the slice cache {cfg.cache}, the group's first "
                             f"member {cfgs[0].cache}; one group fits the members of one experiment")
        resume = str(resume_from) if resume_from and owner == cfg.member_id else None
        member_report = _tagged(report, cfg.member_id)
        summary = fit_uncertainty(dataclasses.replace(cfg, resume_from=resume), report=member_report,
                                  wrap_model=wrap_model, rank=rank, world_size=world_size, cache=cache,
                                  stored_yhat=stored_yhat)
        if summary is None:  # ranks > 0 meet rank 0's final report
            if member_report is not None:
                member_report({"epoch": cfg.epochs, "scored": 1}, None)
        else:
            out[cfg.member_id] = summary
    return out
