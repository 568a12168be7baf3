"""The records are the truth (docs/architecture.md "Records"): what each stage still owes, read from the
experiment folder.

Ray Tune's experiment state only says what to schedule. Before a stage runs (and for `status` and
`analyze`), every pool member and δ record the spec calls for is checked here; one that is missing
or unreadable is owed, whatever Tune's state says, and the driver redoes it. Damaged files are moved
to ``records/.damaged/<time>/`` (not deleted) so that a trial never takes them for finished work.

Also here: an experiment folder that was moved or renamed since its last run (``relocated``), and
retiring a stage's Tune state when it can no longer be restored as it is (``retire_tune_state``).
"""
from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

from trainables import records

from . import objstore
from .experiment import DONE_MARKER, SPEC_FILE, UNCERTAINTY_STAGE
from .spec import SweepSpec

LOCATION_FILE = ".oodsweep-location"
SUPERSEDED = ".superseded"


def expected_members(spec: SweepSpec) -> list[str] | None:
    """Every pool member id a grid spec calls for (None for a search: its samples are not known ahead)."""
    from trainables.member import member_id

    p = spec.pool
    if spec.imported is not None:  # a pool trained elsewhere: its members table's ids
        return list(spec.imported.member_ids) or None
    if spec.search is not None:
        return None
    return [member_id(arch, float(lr), int(seed), int(e)) for arch, lr, seed in p.runs() for e in p.epochs.values]


def _checkpoint_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"its checkpoint {path} is missing"
    if not zipfile.is_zipfile(path):
        return f"its checkpoint {path} is damaged (not a torch checkpoint)"
    try:  # mmap: reads the archive's index and tensor headers, not the weights
        import torch

        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (torch's message suggests unsafe loading: not passed on)
        return f"its checkpoint {path} is damaged ({type(e).__name__})"
    return None


def member_problem(exp: Path, mid: str, sites: list[str]) -> tuple[str | None, list[Path]]:
    """Why member ``mid``'s record is not usable (None when it is), and its files that exist."""
    parts = records.records_dir(exp) / "parts"
    mj, sp = parts / f"{mid}.member.json", parts / f"{mid}.slices.parquet"
    present = [f for f in (mj, sp) if f.exists()]
    if not mj.exists():
        return f"its record {mj} is missing", present
    try:
        member = json.loads(mj.read_text())
        ckpt = records.resolve_checkpoint(exp, member["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its record {mj} is damaged ({type(e).__name__})", present
    if not sp.exists():
        return f"its slice counts {sp} are missing", present
    try:
        import pyarrow.parquet as pq

        pq.read_metadata(sp)
    except Exception as e:  # noqa: BLE001
        return f"its slice counts {sp} are damaged ({type(e).__name__})", present
    # an imported member (``oodsweep import``) has predicted masks and no weights
    problem = None if member.get("imported") else _checkpoint_problem(ckpt)
    if problem:
        return problem, present + [ckpt] * ckpt.exists()
    for site in sites:
        pred = records.records_dir(exp) / "predictions" / mid / f"{site}.npz"
        if not pred.exists():
            return f"its predictions {pred} are missing", present
        if not zipfile.is_zipfile(pred):
            return f"its predictions {pred} are damaged", present
    surf = records.records_dir(exp) / "surface" / f"{mid}.parquet"
    if surf.exists():  # missing is fine (records written before it, or data.surface_tolerance_mm: null)
        try:
            pq.read_metadata(surf)
        except Exception as e:  # noqa: BLE001
            return f"its surface metrics {surf} are damaged ({type(e).__name__})", present + [surf]
    return None, present


def pool_gaps(spec: SweepSpec) -> dict[str, str]:
    """Member id -> what is wrong with its record, for every member the spec calls for that is not usable."""
    objstore.refresh(spec)  # on object storage: the trials' uploads, from one listing
    exp = spec.experiment_dir
    sites = [spec.data.source, *spec.data.targets]
    want = expected_members(spec)
    have = records.member_part_ids(exp)
    out = {}
    for mid in (want if want is not None else have):
        problem, _ = member_problem(exp, mid, sites)
        if problem:
            out[mid] = problem
    if want is None and spec.n_members() and len(have) < spec.n_members():
        out["(search)"] = f"{len(have)} of {spec.n_members()} members recorded"
    return out


def uncertainty_gaps(spec: SweepSpec, member_ids) -> dict[str, str]:
    """Member id -> what is wrong with its δ record, for every member without a usable one."""
    import pyarrow.parquet as pq

    objstore.refresh(spec)

    pdir = records.records_dir(spec.experiment_dir) / "uncertainty" / "parts"
    out = {}
    for mid in member_ids:
        part = pdir / f"{mid}.parquet"
        if not part.exists():
            out[mid] = f"its δ record {part} is missing"
            continue
        try:
            pq.read_metadata(part)
        except Exception as e:  # noqa: BLE001
            out[mid] = f"its δ record {part} is damaged ({type(e).__name__})"
    return out


def quarantine(exp: Path, files) -> Path | None:
    """Move damaged files to ``records/.damaged/<time>/`` (kept for a look, never read again)."""
    files = [Path(f) for f in files if Path(f).exists()]
    if not files:
        return None
    dest = records.records_dir(exp) / ".damaged" / time.strftime("%Y%m%dT%H%M%S")
    for f in files:
        rel = f.relative_to(records.records_dir(exp)) if f.is_relative_to(records.records_dir(exp)) else Path(f.name)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(dest / rel))
    return dest


def invalidate_members(spec: SweepSpec, gaps: dict[str, str]) -> None:
    """Set owed members up to be trained again: their damaged files and stale δ records are moved away."""
    exp = spec.experiment_dir
    sites = [spec.data.source, *spec.data.targets]
    rdir = records.records_dir(exp)
    move = []
    for mid in gaps:
        _, present = member_problem(exp, mid, sites)
        move += present
    # the whole training run is done again, rewriting every member of it: their δ records go stale
    runs = {m.rsplit("-ep", 1)[0] for m in gaps}
    for mid in set(records.member_part_ids(exp)) | set(gaps):
        if mid.rsplit("-ep", 1)[0] in runs:
            move += [rdir / "uncertainty" / "parts" / f"{mid}.parquet"]
    quarantine(exp, move)


def invalidate_uncertainty(spec: SweepSpec, gaps: dict[str, str]) -> None:
    """Move damaged δ records away, and the finished (checkpoint-pruned) Ray Train runs of owed members.

    A Train run whose checkpoints were removed after it scored its member cannot be resumed (Ray
    Train refuses a run folder whose checkpoints are gone); the δ fit starts again instead.
    """
    exp = spec.experiment_dir
    quarantine(exp, [records.records_dir(exp) / "uncertainty" / "parts" / f"{m}.parquet" for m in gaps])
    train = exp / UNCERTAINTY_STAGE / "train"
    runs = [train / f"delta-{mid}" for mid in gaps]  # a one-member run, and each group holding an owed member
    runs += [train / f"delta-{name}" for name, ids in train_groups(train).items() if set(ids) & set(gaps)]
    for run in dict.fromkeys(runs):
        if run.is_dir() and not any(p.is_dir() for p in run.glob("checkpoint_*")):  # (not the snapshot .json)
            _supersede(exp / UNCERTAINTY_STAGE, [run])


def train_groups(train_dir: Path) -> dict[str, list[str]]:
    """The δ groups' Train runs under ``train_dir`` and their members: ``{name: member ids}`` from the
    ``delta-<name>.members`` list each trial writes beside its run (``sweeps.uncertainty.members_file``)."""
    import json

    out = {}
    for listing in sorted(train_dir.glob("delta-*.members")) if train_dir.is_dir() else []:
        try:
            out[listing.name[len("delta-"): -len(".members")]] = [str(m) for m in json.loads(listing.read_text())]
        except (OSError, ValueError):
            continue
    return out


def _supersede(stage_dir: Path, paths, dest: Path | None = None) -> Path:
    dest = dest or stage_dir / SUPERSEDED / time.strftime("%Y%m%dT%H%M%S")
    for p in paths:
        rel = p.relative_to(stage_dir)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(p), str(dest / rel))
    return dest


def retire_tune_state(stage_dir: Path) -> Path | None:
    """Move a stage's Tune experiment (state files and trial folders) to ``<stage>/.superseded/<time>/``.

    Used when Tune's state cannot be restored as it is: it says a trial finished whose record is
    gone, or it holds the paths of the folder's old location. The next Tuner starts afresh; finished
    members are found in the records and skipped. The δ Train runs (``uncertainty/train``, which
    carry their own resume checkpoints) and the stage's done marker stay. On object storage Tune's state
    is in the bucket, not in the driver's working copy: it is moved there (``objstore.move_remote``).
    """
    keep = {"train", SUPERSEDED, DONE_MARKER}
    dest = stage_dir / SUPERSEDED / time.strftime("%Y%m%dT%H%M%S")
    moved = objstore.move_remote(stage_dir.parent, stage_dir.name,
                                 f"{stage_dir.name}/{dest.relative_to(stage_dir).as_posix()}",
                                 lambda below: below.split("/")[0] in keep)
    paths = [p for p in stage_dir.iterdir() if p.name not in keep] if stage_dir.is_dir() else []
    if paths:
        return _supersede(stage_dir, paths, dest)
    return dest if moved else None


def relocated(spec: SweepSpec) -> str | None:
    """The folder this experiment last ran from, when that is not where it is now (moved or renamed)."""
    exp = spec.experiment_dir
    f = exp / LOCATION_FILE
    try:
        old = f.read_text().strip() if f.exists() else None
    except OSError:
        old = None
    if old is None:  # experiments from before the location file: the frozen spec's storage and name
        import yaml

        try:
            frozen = yaml.safe_load((exp / SPEC_FILE).read_text())
            old = str(Path(frozen["storage"]) / frozen["name"])
        except Exception:  # noqa: BLE001  (a first run: nothing frozen yet)
            return None
    if spec.remote:  # object storage: its URI, not the working copy's temporary folder
        return old if old != spec.remote else None
    return old if Path(old).resolve() != exp.resolve() else None  # (the same folder through a symlink is not a move)


def record_location(spec: SweepSpec) -> None:
    (spec.experiment_dir / LOCATION_FILE).write_text(str(spec.remote or spec.experiment_dir) + "\n")


def prune_checkpoints(folders) -> int:
    """Delete the ``checkpoint_*`` folders under each local folder; return the bytes freed.

    A finished trial's checkpoints only serve to resume it: the pool member weights live in
    ``records/checkpoints`` and δ's results in ``records/uncertainty``. They hold optimizer
    state (a few hundred MB per trial) and would otherwise fill the disk of a large sweep.
    """
    freed = 0
    for folder in folders:
        folder = Path(folder)
        if "://" in str(folder) or not folder.is_dir():
            continue  # remote storage: Ray's own retention (num_to_keep) applies
        for ckpt in folder.glob("checkpoint_*"):
            if ckpt.is_dir():
                freed += sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
                shutil.rmtree(ckpt, ignore_errors=True)
    return freed
