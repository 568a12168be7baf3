"""trainables.runner.run_epochs with a hand-made loop (no model): the order it owns, checked in milliseconds.

The real loops' "resumed equals uninterrupted" runs are in test_train, test_medsam, test_determinism
and test_accel; this one pins the runner's own contract: per-epoch reseeding of torch's global
generator, the replay of a resumed run's skipped draws, checkpoint folders only when asked for and
reported, and one attempts line per start.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from trainables import records
from trainables.runner import epoch_seed, run_epochs


class CountingLoop:
    """A loop whose "weight" sums its draws (from its own generator) and one global-RNG draw per epoch."""

    state_file = "state.pt"
    ckpt_prefix = "ckpt-"
    device = torch.device("cpu")
    seed = 7

    def __init__(self):
        self.gen = torch.Generator().manual_seed(0)
        self.w = 0.0
        self.logged: list[int] = []

    def load_state(self, state: dict) -> int:
        self.w = float(state["w"])
        return int(state["epoch"])

    def draw(self, epoch: int) -> list[int]:
        return torch.randint(0, 1000, (3,), generator=self.gen).tolist()

    def train(self, epoch: int, draws: list[int]) -> dict:
        noise = float(torch.rand(()))  # torch's global generator, as dropout draws from it
        self.w += sum(draws) + noise
        return {"epoch": epoch, "draws": draws, "noise": noise}

    def score(self, epoch: int, metrics: dict) -> dict:
        return {**metrics, "w": self.w}

    def checkpoint(self, epoch: int) -> bool:
        return epoch % 2 == 0

    def state(self, epoch: int) -> dict:
        return {"w": self.w, "epoch": epoch}

    def log(self, metrics: dict) -> None:
        self.logged.append(metrics["epoch"])


def test_resumed_run_replays_draws_and_equals_the_uninterrupted_one(tmp_path):
    seen, kept = [], {}

    def report(metrics, ckpt):
        seen.append((metrics, ckpt))
        if ckpt is not None:  # the reporter owns the folder
            kept[metrics["epoch"]] = shutil.copytree(ckpt, tmp_path / f"kept-{metrics['epoch']}")
            shutil.rmtree(ckpt)

    full = CountingLoop()
    assert run_epochs(full, 4, tmp_path / "a", report, attempt=("pool", "run")) == 0
    assert [m["epoch"] for m, _ in seen] == [1, 2, 3, 4] and full.logged == [1, 2, 3, 4]
    assert [c is not None for _, c in seen] == [False, True, False, True]  # checkpoint() said epochs 2 and 4
    assert all(Path(c).parent == records.scratch_dir(tmp_path / "a") for _, c in seen if c)
    # the global generator is reseeded per epoch from (seed, epoch)
    torch.manual_seed(epoch_seed(7, 3))
    assert seen[2][0]["noise"] == float(torch.rand(()))

    resumed, again = CountingLoop(), []
    start = run_epochs(resumed, 4, tmp_path / "b", lambda m, c: again.append(m), resume_from=kept[2],
                       attempt=("pool", "run"))
    assert start == 2 and [m["epoch"] for m in again] == [3, 4]
    assert again == [m for m, _ in seen[2:]]  # the same draws, noise and weight as the uninterrupted run
    assert records.load_attempts(tmp_path / "b")["start_epoch"].tolist() == [2]
    assert records.load_attempts(tmp_path / "a")["start_epoch"].tolist() == [0]


def test_without_a_reporter_no_checkpoint_folder_is_written(tmp_path):
    loop = CountingLoop()
    run_epochs(loop, 2, tmp_path)
    assert loop.logged == [1, 2]
    assert not (tmp_path / ".scratch").exists() and not (tmp_path / "records").exists()  # nor an attempts line
