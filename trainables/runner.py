"""One epoch runner for every training loop (docs/architecture.md "Models and data"): seeding, resume replay,
the epoch loop, snapshots and reports.

``run_epochs(loop, epochs, ...)`` runs a loop that implements ``EpochLoop``: the dense pool loop
(``trainables.dense``), the prompted pool loop (``trainables.sam.loop``) and δ's fit
(``trainables.uncertainty``). A loop says how to draw an epoch's randomness from its own generators
(``draw``: shuffling, box jitter), train an epoch, evaluate after it (writing a pool member at a
snapshot), and what its resumable state is; the runner owns the order: reseed torch's global
generator per epoch (``epoch_seed``), replay the draws of the epochs a resumed run skips (so that its
generators stand where the uninterrupted run's stood), log the attempt, save the resumable state into
a fresh scratch folder when the loop asks for a checkpoint and someone is reporting, print and report.
(nnU-Net's ``nnUNetTrainer`` is the model: one loop with hooks.)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from . import records
from .member import load_state, save_state


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of torch's global generator for ``epoch`` of a run seeded ``seed``.

    Stochastic layers (EfficientNet's drop-connect, dropout) draw from torch's global generator. A run
    resumed at epoch e rebuilds its model (which draws its initialisation from that generator), so
    without a reseed its draws continued from there, not from where the uninterrupted run stood: a
    resumed ``unet_effb0`` run ended with other weights than the uninterrupted one. Reseeding at every
    epoch from (seed, epoch) makes the draws of epoch e the same however the run got there. numpy's
    ``SeedSequence`` derives the seed, so that it is independent of the flips' (seed, epoch) generator.
    """
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


class EpochLoop(Protocol):
    """What ``run_epochs`` asks of a training loop."""

    #: torch's global generator is reseeded with ``epoch_seed(seed, e)`` before epoch e.
    seed: int
    #: the resumable state's file in a checkpoint folder, and the folder's name prefix
    state_file: str
    ckpt_prefix: str
    device: torch.device

    def load_state(self, state: dict) -> int:
        """Restore a saved state; return the epoch it was saved after."""

    def draw(self, epoch: int) -> Any:
        """Epoch ``epoch``'s draws from the loop's own generators (shuffling, jitter), in the order the
        epoch consumes them; a resumed run calls it for every epoch it skips."""

    def train(self, epoch: int, draws: Any) -> dict:
        """Train one epoch with ``draws``; its metrics (``epoch``, losses, seconds)."""

    def score(self, epoch: int, metrics: dict) -> dict:
        """Score after the epoch (a pool loop writes a member at a snapshot epoch); the epoch's metrics."""

    def checkpoint(self, epoch: int) -> bool:
        """Whether the resumable state is saved after ``epoch`` (when there is a reporter)."""

    def state(self, epoch: int) -> dict:
        """The resumable state after ``epoch``."""

    def log(self, metrics: dict) -> None:
        """The epoch's line, if the loop is verbose."""


def run_epochs(loop: EpochLoop, epochs: int, experiment_dir: str | os.PathLike,
               report: Callable[[dict, "str | None"], None] | None = None,
               resume_from: str | os.PathLike | None = None, attempt: tuple[str, str] | None = None) -> int:
    """Run ``loop`` from its resume point (``resume_from``: a checkpoint folder it reported) to ``epochs``.

    Args:
        experiment_dir: the experiment; checkpoint folders go to its scratch folder (the reporter owns and
            removes them), the attempt to its attempts log.
        report: called after every epoch with the metrics and a checkpoint folder (None when the loop
            asked for none after that epoch).
        attempt: ``(stage, name)`` logged with the start epoch (``records.log_attempt``); None: not logged.

    Returns:
        The epoch the run started after (0 unless resumed).
    """
    start = 0
    if resume_from:
        start = loop.load_state(load_state(resume_from, loop.device, loop.state_file))
        for epoch in range(1, start + 1):  # keep the loop's generators where the uninterrupted run had them
            loop.draw(epoch)
    if attempt is not None:
        records.log_attempt(experiment_dir, attempt[0], attempt[1], start)
    for epoch in range(start + 1, epochs + 1):
        torch.manual_seed(epoch_seed(loop.seed, epoch))
        metrics = loop.score(epoch, loop.train(epoch, loop.draw(epoch)))
        ckpt_dir = None
        if report is not None and loop.checkpoint(epoch):  # the reporter owns (and removes) this folder
            ckpt_dir = tempfile.mkdtemp(prefix=loop.ckpt_prefix, dir=records.scratch_dir(experiment_dir))
            save_state(Path(ckpt_dir) / loop.state_file, loop.state(epoch))
        loop.log(metrics)
        if report is not None:
            report(metrics, ckpt_dir)
    return start
