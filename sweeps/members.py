"""Pool members as the driver sees them: which members a pool trial's config yields and the trial's name.

The ids themselves are the trainables' (``trainables.segment.member_id``, ``run_name``): a training run
``<arch>-lr<lr>-s<seed>-ep<last epoch>`` yields one member per snapshot epoch. Shared by the pool stage
(``sweeps.pool``), its MLflow callback (``sweeps.callbacks``) and ``oodsweep status``.
"""
from __future__ import annotations


def member_epochs(config: dict) -> list[int]:
    """The epochs at which a pool trial's config freezes a member (snapshot mode), else its one epoch count."""
    return sorted(config["snapshots"]) if config.get("snapshots") else [int(config["epochs"])]


def trial_member_ids(config: dict) -> list[str]:
    """The member ids a pool trial's config yields, one per member epoch."""
    from trainables.member import member_id

    return [member_id(config["arch"], float(config["lr"]), int(config["seed"]), e) for e in member_epochs(config)]


def trial_name(config: dict) -> str:
    """The training run of a pool trial's config (the records' ``run_id``), which names its Tune trial."""
    from trainables.member import run_name

    return run_name(config["arch"], float(config["lr"]), int(config["seed"]), max(member_epochs(config)))
