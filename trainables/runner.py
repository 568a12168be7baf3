"""One epoch runner for every training loop (DESIGN §5): seeding, resume replay, the epoch loop,
snapshots and reports."""
from __future__ import annotations

import numpy as np


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
