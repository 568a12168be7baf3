"""The record store: where the records live in an experiment folder, writing and merging them
(docs/architecture.md "Records").

Everything downstream of the pool stage (the uncertainty stage, the analysis) reads these files
and nothing else. Trials write one part per pool member (concurrent trials never share a file);
the driver (or the first reader) merges the parts into ``members.parquet`` and ``slices.parquet``.
Every write is atomic (a temporary file renamed into place), so a reader never sees a half-written
record. The tables' columns are :mod:`.schema`'s.

Layout under ``<experiment>/records/``::

    parts/<member_id>.member.json     one pool member (MEMBER_COLUMNS)
    parts/<member_id>.slices.parquet  its per-slice confusion counts (SLICE_COLUMNS)
    checkpoints/<member_id>.pt        its model weights (state_dict + arch kwargs)
    predictions/<member_id>/<site>.npz packed-bit predicted masks (see ``save_predictions``)
    predictions/<member_id>/splits/<site>.<split>.npz   an imported member's source train/val masks (δ's fit)
    members.parquet                   merged members
    slices.parquet                    merged slices
    uncertainty/{parts,sites,fits,examples}/<member_id>.*   the uncertainty stage's (schema.py)
    uncertainty.parquet, uncertainty_sites.parquet          merged likewise
    uncertainty_budget/{parts,sites,fits,examples}/...      δ refitted at a longer budget on a subset of members
    uncertainty_budget.parquet                              (``uncertainty.sensitivity``; merged likewise)
    surface/<member_id>.parquet       its per-case HD95 and NSD (SURFACE_COLUMNS), before its member.json
    surface.parquet                   merged likewise
    attempts.jsonl                    every training start (``log_attempt``)
    attempts/<stage>-<run>-<ns>-<pid>.json  the same, one file each, when the folder exists (object storage)
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .schema import (MEMBER_COLUMNS, RECORDS_DIR, SLICE_COLUMNS, SURFACE_COLUMNS, UNCERTAINTY_COLUMNS,
                     UNCERTAINTY_SITE_COLUMNS, conform, derive_oracle_prompt, with_later_columns,
                     with_later_site_columns)


def records_dir(experiment_dir: str | os.PathLike) -> Path:
    """``<experiment>/records``: where every stage writes its records."""
    return Path(experiment_dir) / RECORDS_DIR


def scratch_dir(experiment_dir: str | os.PathLike) -> Path:
    """Where trials stage checkpoint folders before Ray copies them into its storage.

    Inside the experiment rather than the system temp folder so that a folder left by a killed
    trial is found and removed by the driver when the next stage starts (``clear_scratch``).
    """
    path = Path(experiment_dir) / ".scratch"
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_scratch(experiment_dir: str | os.PathLike) -> None:
    """Remove staged checkpoint folders; call only while no trial of this experiment runs."""
    shutil.rmtree(Path(experiment_dir) / ".scratch", ignore_errors=True)


def log_attempt(experiment_dir: str | os.PathLike, stage: str, run: str, start_epoch: int) -> None:
    """Append one line to ``records/attempts.jsonl``: a training run (re)starting at an epoch.

    The audit trail of a sweep that was interrupted: a run that resumed from a checkpoint shows a
    second line with ``start_epoch > 0``; a finished run never shows up again. One short
    ``O_APPEND`` write per line, so concurrent trials do not interleave.
    """
    path = records_dir(experiment_dir) / "attempts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"stage": stage, "run": run, "start_epoch": int(start_epoch), "pid": os.getpid(),
                       "time": round(time.time(), 3)}) + "\n"
    folder = path.parent / "attempts"
    if folder.is_dir():  # an experiment on object storage (no appends there): one small file per attempt
        _atomic_write_bytes(folder / f"{stage}-{run}-{time.time_ns()}-{os.getpid()}.json", line.encode())
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def load_attempts(experiment_dir: str | os.PathLike) -> pd.DataFrame:
    """The attempts log as a table (empty when nothing has started yet)."""
    path = records_dir(experiment_dir) / "attempts.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    files = sorted((path.parent / "attempts").glob("*.json"))  # per-attempt files (object storage)
    rows += sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["time"])
    return pd.DataFrame(rows, columns=["stage", "run", "start_epoch", "pid", "time"])


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    """Write ``df`` to ``path`` atomically (a reader never sees a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def write_member_part(experiment_dir: str | os.PathLike, member: dict, slices: pd.DataFrame) -> None:
    """Write one pool member's record and its slice counts (atomically, slices first)."""
    rdir = records_dir(experiment_dir) / "parts"
    mid = member["member_id"]
    slices = conform(slices, SLICE_COLUMNS, f"slices of {mid}")
    _write_parquet(slices, rdir / f"{mid}.slices.parquet")
    _atomic_write_bytes(rdir / f"{mid}.member.json", json.dumps(member, indent=1, default=str).encode())


def member_part_ids(experiment_dir: str | os.PathLike) -> list[str]:
    rdir = records_dir(experiment_dir) / "parts"
    return sorted(p.name[: -len(".member.json")] for p in rdir.glob("*.member.json"))


def resolve_checkpoint(experiment_dir: str | os.PathLike, checkpoint: str) -> Path:
    """The file a member record's ``checkpoint`` names, in the experiment's current location.

    New records store ``records/checkpoints/<member>.pt`` relative to the experiment, so a moved or
    renamed experiment folder still finds its members. Records written before that hold an absolute
    path: one ending in ``records/checkpoints/<file>`` is re-resolved under the experiment when that
    file is there (the folder was moved); any other absolute path (a URI) is taken as it is.
    """
    exp = Path(experiment_dir)
    path = Path(str(checkpoint))
    if not path.is_absolute():
        return exp / path
    parts = path.parts
    if len(parts) >= 3 and parts[-3:-1] == (RECORDS_DIR, "checkpoints"):
        here = records_dir(exp) / "checkpoints" / parts[-1]
        if here.exists() or not path.exists():
            return here
    return path


class RecordsError(RuntimeError):
    """A records file that cannot be read, with what to do about it."""


def _stale(merged: Path, parts: list[Path]) -> bool:
    """A merged table older than one of its parts (a part was redone since the merge)."""
    t = merged.stat().st_mtime_ns
    return any(p.stat().st_mtime_ns > t for p in parts if p.exists())


def _read_merged(path: Path, ids: list[str], note: str):
    """Read a merged table; None (with a note on stderr) when it is unreadable and ``parts/`` can rebuild it."""
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a damaged file)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        if not ids:
            raise RecordsError(f"{path} is damaged ({reason}) and {note} holds no parts to rebuild it from; "
                               f"delete it and run `oodsweep resume {shlex.quote(str(path.parent.parent))}` to redo the stage "
                               f"that writes it") from None
        print(f"[oodsweep] {path} is damaged ({reason}); rebuilt it from {note} ({len(ids)} parts)",
              file=sys.stderr, flush=True)
        return None


def merge_parts(experiment_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge every member part into members.parquet and slices.parquet; return both tables."""
    rdir = records_dir(experiment_dir)
    ids = member_part_ids(experiment_dir)
    if not ids:
        raise FileNotFoundError(f"no pool members recorded under {rdir / 'parts'}: has the pool stage run?")
    rows = []
    for i in ids:
        part = rdir / "parts" / f"{i}.member.json"
        try:
            rows.append(json.loads(part.read_text()))
        except (OSError, ValueError) as e:
            raise RecordsError(f"{part} is damaged ({type(e).__name__}: {e}); delete it and run `oodsweep resume "
                               f"{shlex.quote(str(experiment_dir))}` to train that member again") from None
    members = pd.DataFrame(rows)
    members = conform(members, MEMBER_COLUMNS, "members")
    frames = []
    for i in ids:
        part = rdir / "parts" / f"{i}.slices.parquet"
        try:
            frames.append(pd.read_parquet(part))
        except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a damaged file)
            raise RecordsError(f"{part} is damaged ({type(e).__name__}); delete it and "
                               f"{rdir / 'parts' / f'{i}.member.json'}, then run `oodsweep resume "
                               f"{shlex.quote(str(experiment_dir))}` to train that member again") from None
    slices = pd.concat(frames, ignore_index=True)
    slices = conform(slices, SLICE_COLUMNS, "slices")
    _write_parquet(members, rdir / "members.parquet")
    _write_parquet(slices, rdir / "slices.parquet")
    return members, slices


def load_records(experiment_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read (members, slices) from an experiment directory, merging parts if needed."""
    rdir = records_dir(experiment_dir)
    mp, sp = rdir / "members.parquet", rdir / "slices.parquet"
    parts = member_part_ids(experiment_dir)
    if mp.exists() and sp.exists():
        # the parts are the truth: a merged table is used only while it holds exactly them, and is
        # newer than every one of them (a member redone since the merge is merged again)
        files = [rdir / "parts" / f"{i}.member.json" for i in parts]
        members = _read_merged(mp, parts, str(rdir / "parts"))
        slices = _read_merged(sp, parts, str(rdir / "parts")) if members is not None else None
        if slices is not None and (not parts or (set(members["member_id"].unique()) == set(parts)
                                                 and not _stale(mp, files))):
            return derive_oracle_prompt(members, str(mp)), slices
    return merge_parts(experiment_dir)


def predictions_path(experiment_dir: str | os.PathLike, member_id: str, site: str, split: str | None = None) -> Path:
    """``predictions/<member>/<site>.npz`` (the scored split of a site), or, with ``split``, the source's other
    splits an imported member brings for δ's fit: ``predictions/<member>/splits/<site>.<split>.npz``."""
    base = records_dir(experiment_dir) / "predictions" / member_id
    return base / f"{site}.npz" if split is None else base / "splits" / f"{site}.{split}.npz"


def save_predictions(experiment_dir: str | os.PathLike, member_id: str, site: str,
                     masks: np.ndarray, case_ids: list[str], slice_idx: np.ndarray, split: str | None = None) -> Path:
    """Store binary predicted masks (N x H x W) as packed bits with their slice keys (``predictions_path``)."""
    masks = np.asarray(masks, dtype=bool)
    path = predictions_path(experiment_dir, member_id, site, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, bits=np.packbits(masks.reshape(len(masks), -1), axis=1), shape=np.array(masks.shape),
             case_id=np.asarray(case_ids, dtype=str), slice_idx=np.asarray(slice_idx, dtype=np.int64))
    os.replace(tmp, path)
    return path


def load_predictions(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (masks N x H x W bool, case_ids, slice_idx) from ``save_predictions``' file."""
    with np.load(path) as z:
        shape = tuple(int(s) for s in z["shape"])
        n_px = int(np.prod(shape[1:]))
        masks = np.unpackbits(z["bits"], axis=1, count=n_px).astype(bool).reshape(shape)
        return masks, z["case_id"], z["slice_idx"]


#: The folders (under ``records/``) of δ's records: the default fit's, and the longer budget's of the δ-budget
#: sensitivity (``uncertainty.sensitivity``: a second δ per member of a subset, recorded apart so that the default
#: records stay as they are).
DEFAULT_DELTA_RECORDS, BUDGET_DELTA_RECORDS = "uncertainty", "uncertainty_budget"
DELTA_RECORDS = (DEFAULT_DELTA_RECORDS, BUDGET_DELTA_RECORDS)


def _part_path(experiment_dir: str | os.PathLike, kind: str, member_id: str, suffix: str = ".parquet",
               folder: str = DEFAULT_DELTA_RECORDS) -> Path:
    return records_dir(experiment_dir) / folder / kind / f"{member_id}{suffix}"


def write_uncertainty_sites(experiment_dir: str | os.PathLike, member_id: str, rows: pd.DataFrame,
                            folder: str = DEFAULT_DELTA_RECORDS) -> Path:
    rows = conform(rows, UNCERTAINTY_SITE_COLUMNS, f"uncertainty sites of {member_id}")
    return _write_parquet(rows, _part_path(experiment_dir, "sites", member_id, folder=folder))


def write_uncertainty_fit(experiment_dir: str | os.PathLike, member_id: str, fit: dict,
                          folder: str = DEFAULT_DELTA_RECORDS) -> Path:
    """The member's δ fit record (JSON): settings, loss per epoch, held-out Dice(μ > 0.5, ŷ) per epoch."""
    path = _part_path(experiment_dir, "fits", member_id, ".json", folder)
    _atomic_write_bytes(path, json.dumps({"member_id": member_id, **fit}, indent=1, default=float).encode())
    return path


def load_uncertainty_fits(experiment_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per member's δ fit (the JSON records as columns; lists stay lists); empty if none."""
    pdir = records_dir(experiment_dir) / "uncertainty" / "fits"
    rows = [json.loads(p.read_text()) for p in sorted(pdir.glob("*.json"))] if pdir.is_dir() else []
    return pd.DataFrame(rows)


def load_uncertainty_sites(experiment_dir: str | os.PathLike) -> pd.DataFrame | None:
    """The per member x method x site table (merging the parts if needed), or None if there is none."""
    rdir = records_dir(experiment_dir)
    return _load_merged_parts(experiment_dir, rdir / "uncertainty_sites.parquet", rdir / "uncertainty" / "sites",
                              UNCERTAINTY_SITE_COLUMNS, "uncertainty sites", fill=with_later_site_columns)


def write_uncertainty_part(experiment_dir: str | os.PathLike, member_id: str, rows: pd.DataFrame,
                           folder: str = DEFAULT_DELTA_RECORDS) -> Path:
    rows = conform(with_later_columns(rows.copy()), UNCERTAINTY_COLUMNS, f"uncertainty of {member_id}")
    return _write_parquet(rows, _part_path(experiment_dir, "parts", member_id, folder=folder))


def uncertainty_part_ids(experiment_dir: str | os.PathLike) -> list[str]:
    pdir = records_dir(experiment_dir) / "uncertainty" / "parts"
    return sorted(p.stem for p in pdir.glob("*.parquet"))


#: What to do about a damaged δ part (``_load_merged_parts``' ``fix``).
DELTA_FIX = "delete it and run `oodsweep resume {exp}` to fit that member's δ again"


def _load_merged_parts(experiment_dir: str | os.PathLike, merged: Path, pdir: Path, columns: dict[str, str],
                       what: str, fill=lambda df: df, fix: str = DELTA_FIX) -> pd.DataFrame | None:
    """A merged table of per-member parts (``pdir/<member_id>.parquet``: the uncertainty stage's, the surface
    records).

    The parts are the truth: the merged file is used only while it holds exactly their members and is
    newer than each of them (else it is rebuilt, and written back); a damaged part is a ``RecordsError``
    that says how to redo it (``fix``; ``{exp}``: the experiment). None when there are no parts. ``fill`` adds
    columns older records lack.
    """
    ids = sorted(p.stem for p in pdir.glob("*.parquet"))
    if merged.exists():
        df = _read_merged(merged, ids, str(pdir))
        # unique() first: iterating millions of Arrow-backed strings into a set took 10-30 s (bench/analysis.py)
        if df is not None and (not ids or (set(df["member_id"].unique()) == set(ids)
                                           and not _stale(merged, [pdir / f"{i}.parquet" for i in ids]))):
            return fill(df)
    if not ids:
        return None
    frames = []
    for i in ids:
        part = pdir / f"{i}.parquet"
        try:
            frames.append(pd.read_parquet(part))
        except Exception as e:  # noqa: BLE001
            exp = shlex.quote(str(experiment_dir))
            raise RecordsError(f"{part} is damaged ({type(e).__name__}); {fix.format(exp=exp)}") from None
    df = conform(fill(pd.concat(frames, ignore_index=True)), columns, what)
    _write_parquet(df, merged)
    return df


def load_uncertainty(experiment_dir: str | os.PathLike) -> pd.DataFrame | None:
    """The merged uncertainty table (merging the parts if needed), or None if the stage never ran."""
    rdir = records_dir(experiment_dir)
    return _load_merged_parts(experiment_dir, rdir / "uncertainty.parquet", rdir / "uncertainty" / "parts",
                              UNCERTAINTY_COLUMNS, "uncertainty", fill=with_later_columns)


def load_uncertainty_budget(experiment_dir: str | os.PathLike) -> pd.DataFrame | None:
    """The δ-budget sensitivity's merged slice table (``records/uncertainty_budget.parquet``, from its parts:
    δ refitted with ``uncertainty.sensitivity``'s epochs), or None when there is none."""
    rdir = records_dir(experiment_dir)
    return _load_merged_parts(experiment_dir, rdir / f"{BUDGET_DELTA_RECORDS}.parquet",
                              rdir / BUDGET_DELTA_RECORDS / "parts", UNCERTAINTY_COLUMNS, "uncertainty (δ budget)",
                              fill=with_later_columns)


def load_uncertainty_budget_fits(experiment_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per δ-budget fit (``load_uncertainty_fits``' columns); empty if none."""
    pdir = records_dir(experiment_dir) / BUDGET_DELTA_RECORDS / "fits"
    rows = [json.loads(p.read_text()) for p in sorted(pdir.glob("*.json"))] if pdir.is_dir() else []
    return pd.DataFrame(rows)


def write_surface_part(experiment_dir: str | os.PathLike, member_id: str, rows: pd.DataFrame) -> Path:
    """A pool member's per-case surface metrics (``SURFACE_COLUMNS``); written before its member record."""
    rows = conform(rows, SURFACE_COLUMNS, f"surface metrics of {member_id}")
    return _write_parquet(rows, records_dir(experiment_dir) / "surface" / f"{member_id}.parquet")


def load_surface(experiment_dir: str | os.PathLike) -> pd.DataFrame | None:
    """The merged surface table (merging the parts if needed), or None when no member has one."""
    rdir = records_dir(experiment_dir)
    return _load_merged_parts(experiment_dir, rdir / "surface.parquet", rdir / "surface", SURFACE_COLUMNS,
                              "surface", fix="run `oodsweep resume {exp}`: it moves the damaged part aside and "
                                             "trains that member again")
