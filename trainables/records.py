"""The experiment-directory record schema: the contract between stages (DESIGN §3).

Everything downstream of the pool stage (the uncertainty stage, the analysis) reads these
files and nothing else. Trials write one part per pool member (concurrent trials never share
a file); the driver merges the parts into ``members.parquet`` and ``slices.parquet``.

Layout under ``<experiment>/records/``::

    parts/<member_id>.member.json     one pool member (MEMBER_COLUMNS)
    parts/<member_id>.slices.parquet  its per-slice confusion counts (SLICE_COLUMNS)
    checkpoints/<member_id>.pt        its model weights (state_dict + arch kwargs)
    predictions/<member_id>/<site>.npz packed-bit predicted masks (see ``save_predictions``)
    members.parquet                   merged members
    slices.parquet                    merged slices
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

RECORDS_DIR = "records"

#: The box-prompted archs of the model registry when ``oracle_prompt`` was added to MEMBER_COLUMNS:
#: records written before then lack the column, and it is derived from these names (with a warning).
LEGACY_PROMPTED_ARCHS = ("medsam", "medsam_tiny")

#: One row per pool member.
MEMBER_COLUMNS = {
    "member_id": "string",   # unique in the experiment, e.g. "unet_r18-lr0.001-s0-ep4"
    "run_id": "string",      # the training run (one run gives a member per snapshot epoch)
    "arch": "string",        # model registry name
    "lr": "float64",
    "epochs": "int64",       # the epoch this member was taken at
    "seed": "int64",
    "batch_size": "int64",
    "source": "string",      # source site name
    "checkpoint": "string",  # the member's weights, relative to the experiment (resolve_checkpoint)
    # True when the member's evaluation used labels: box-prompted members (models.MODELS[arch].prompted)
    # are prompted with each evaluated slice's ground-truth box, so their predictions (and every
    # "label-free" indicator computed from them) encode the target labels.
    "oracle_prompt": "bool",
}

#: One row per member x site x case x slice. Every metric derives from these counts.
#: Multi-label tasks (the fundus lesions, one mask channel each) add a ``label`` column (LABEL_COLUMN):
#: one row per slice and lesion, so that ``metric_by`` scores each lesion and averages them (MONAI's
#: per-channel mean); ``<metric>_micro`` pools the lesions' counts first. Records written before the
#: column existed hold one row per slice with the counts summed over the channels (micro only).
SLICE_COLUMNS = {
    "member_id": "string",
    "site": "string",        # site name as the spec names it
    "role": "string",        # "id" (source test split) or "ood" (a target site)
    "case_id": "string",
    "slice_idx": "int64",    # index of the 2D slice in its volume (last axis)
    "tp": "int64",
    "fp": "int64",
    "fn": "int64",
    "tn": "int64",
    "area_px": "int64",      # pixels in the evaluated slice (H*W, x L labels); tp+fp+fn+tn == area_px
}


def records_dir(experiment_dir: str | os.PathLike) -> Path:
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
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def load_attempts(experiment_dir: str | os.PathLike) -> pd.DataFrame:
    """The attempts log as a table (empty when nothing has started yet)."""
    path = records_dir(experiment_dir) / "attempts.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
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


def _derive_oracle_prompt(members: pd.DataFrame, what: str) -> pd.DataFrame:
    """Records written before ``oracle_prompt`` existed: derive it from the arch, with a warning.

    The records module may not import the model registry (the analysis imports ``trainables.records``
    only, without torch), so the derivation uses ``LEGACY_PROMPTED_ARCHS``: records without the column
    predate it, and these were the registry's box-prompted models then (newer ones always write it).
    """
    import warnings

    if "oracle_prompt" in members.columns or "arch" not in members.columns:
        return members
    derived = members["arch"].astype(str).isin(LEGACY_PROMPTED_ARCHS)
    warnings.warn(f"{what}: no 'oracle_prompt' column (records written before it existed); derived it from "
                  f"the arch (box-prompted medsam* members: {int(derived.sum())} of {len(members)}). Rewrite "
                  f"the records with the current pool stage to store it", UserWarning, stacklevel=3)
    return members.assign(oracle_prompt=derived)


def _conform(df: pd.DataFrame, columns: dict[str, str], what: str) -> pd.DataFrame:
    if columns is MEMBER_COLUMNS:
        df = _derive_oracle_prompt(df, what)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}; expected {list(columns)}")
    extra = [c for c in df.columns if c not in columns]
    return df[list(columns) + extra].astype(columns)


def write_member_part(experiment_dir: str | os.PathLike, member: dict, slices: pd.DataFrame) -> None:
    """Write one pool member's record and its slice counts (atomically, slices first)."""
    rdir = records_dir(experiment_dir) / "parts"
    mid = member["member_id"]
    slices = _conform(slices, SLICE_COLUMNS, f"slices of {mid}")
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
                               f"delete it and run `oodsweep resume {path.parent.parent}` to redo the stage "
                               f"that writes it") from None
        import sys

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
                               f"{Path(experiment_dir)}` to train that member again") from None
    members = pd.DataFrame(rows)
    members = _conform(members, MEMBER_COLUMNS, "members")
    frames = []
    for i in ids:
        part = rdir / "parts" / f"{i}.slices.parquet"
        try:
            frames.append(pd.read_parquet(part))
        except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a damaged file)
            raise RecordsError(f"{part} is damaged ({type(e).__name__}); delete it and "
                               f"{rdir / 'parts' / f'{i}.member.json'}, then run `oodsweep resume "
                               f"{Path(experiment_dir)}` to train that member again") from None
    slices = pd.concat(frames, ignore_index=True)
    slices = _conform(slices, SLICE_COLUMNS, "slices")
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
            return _derive_oracle_prompt(members, str(mp)), slices
    return merge_parts(experiment_dir)


def save_predictions(experiment_dir: str | os.PathLike, member_id: str, site: str,
                     masks: np.ndarray, case_ids: list[str], slice_idx: np.ndarray) -> Path:
    """Store binary predicted masks (N x H x W) as packed bits with their slice keys."""
    masks = np.asarray(masks, dtype=bool)
    path = records_dir(experiment_dir) / "predictions" / member_id / f"{site}.npz"
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


# --- metrics from confusion counts -------------------------------------------------------
# They live beside the schema because every stage (the trial's per-epoch report, the analysis)
# must aggregate the same counts the same way. Conventions (checked against MONAI in tests):
#   dice_2d     mean over slices whose ground truth is non-empty of 2tp / (2tp + fp + fn)
#               (MONAI DiceMetric(ignore_empty=True) leaves empty-truth slices out of the mean)
#   iou_3d      per case: TP / (TP + FP + FN) over all its slices; mean over cases
#   dice_global 2 TP / (2 TP + FP + FN) summed over every slice of the split
METRICS = ("iou_3d", "dice_2d", "dice_global")


#: The same metrics on the counts summed over the label channels (the micro average) first.
MICRO_METRICS = tuple(f"{m}_micro" for m in METRICS)
#: Every name ``metric_by`` takes.
ALL_METRICS = METRICS + MICRO_METRICS
#: The optional per-lesion column of the slice records (multi-label tasks).
LABEL_COLUMN = "label"


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def metric_by(slices: pd.DataFrame, metric: str, by: list[str] | tuple[str, ...] = ("member_id", "site")) -> pd.Series:
    """Aggregate per-slice confusion counts into ``metric`` per group of ``by`` columns.

    Multi-label records (a ``label`` column with more than one value): ``metric`` is computed per
    label and averaged over the labels where it is defined, as MONAI's ``DiceMetric`` averages per
    channel (``reduction="mean_batch"`` then the mean over channels); a missed 10-pixel lesion beside
    a perfect 1000-pixel one then scores 0.5, not 0.995. ``<metric>_micro`` sums the labels' counts
    per slice first (one pooled mask).

    Args:
        slices: rows with at least ``by``, ``case_id``, ``tp``, ``fp``, ``fn`` (and optionally ``label``).
        metric: one of ``ALL_METRICS``.
        by: grouping columns (default one value per member and site).

    Returns:
        A Series indexed by ``by`` with values in [0, 1] (NaN where undefined).
    """
    by = list(by)
    if metric not in ALL_METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(ALL_METRICS)}")
    multi = LABEL_COLUMN in slices.columns and LABEL_COLUMN not in by and slices[LABEL_COLUMN].nunique() > 1
    if metric.endswith("_micro"):
        metric = metric[: -len("_micro")]
        if multi:
            keys = [c for c in slices.columns if c not in ("tp", "fp", "fn", "tn", "area_px", LABEL_COLUMN)]
            slices = slices.groupby(keys, sort=False, dropna=False)[["tp", "fp", "fn"]].sum().reset_index()
        out = metric_by(slices, metric, by)
        out.name = f"{metric}_micro"
        return out
    if multi:
        per_label = metric_by(slices, metric, by + [LABEL_COLUMN])
        out = per_label.groupby(level=list(range(len(by)))).mean()  # NaN (lesion absent) left out
        out.name = metric
        return out
    if metric == "dice_2d":
        s = slices[slices["tp"] + slices["fn"] > 0]
        per = pd.Series(_ratio(2 * s["tp"], 2 * s["tp"] + s["fp"] + s["fn"]), index=s.index)
        out = per.groupby([s[c] for c in by]).mean()
    elif metric == "iou_3d":
        case = slices.groupby(by + ["case_id"])[["tp", "fp", "fn"]].sum()
        case = case[case["tp"] + case["fn"] > 0]
        per = pd.Series(_ratio(case["tp"], case["tp"] + case["fp"] + case["fn"]), index=case.index)
        out = per.groupby(level=list(range(len(by)))).mean()
    else:  # dice_global
        tot = slices.groupby(by)[["tp", "fp", "fn"]].sum()
        out = pd.Series(_ratio(2 * tot["tp"], 2 * tot["tp"] + tot["fp"] + tot["fn"]), index=tot.index)
    out.name = metric
    return out


# --- the uncertainty stage's records (DESIGN §3, §6) -------------------------------------------
# One row per member x method x site x case x slice. ``method`` is "ggd" (the paper's delta net on
# {y_hat, x}), "bayescap" (BayesCap as published, on y_hat only), "tta_noise", "tta_color", "mc_dropout"
# or "ggd_yhat_only" (the ablation: our delta without the image). The
# DESIGN's ``uncertain_px`` column of slices.parquet is the "ggd" rows here: several methods score
# the same slice, so they live in their own long table instead of widening slices.parquet.
#
#   records/uncertainty/parts/<member_id>.parquet   per slice (UNCERTAINTY_COLUMNS), written by one
#                                                   uncertainty trial, last (the trial's done marker)
#   records/uncertainty/sites/<member_id>.parquet   per method x site (UNCERTAINTY_SITE_COLUMNS)
#   records/uncertainty/fits/<member_id>.json       the member's δ fit: settings and convergence
#                                                   (loss per epoch, Dice(μ > 0.5, ŷ) on held-out slices)
#   records/uncertainty.parquet                     merged by the driver (or the first reader)
#   records/uncertainty_sites.parquet               merged likewise
#   records/uncertainty/examples/<member_id>.npz    a few slices for the qualitative figure:
#       image (K x H x W float), truth, pred, error (K x H x W bool), mu, uncertainty (K x H x W float),
#       site, case_id (K str), slice_idx (K int)
UNCERTAINTY_METHODS = ("ggd", "bayescap", "tta_noise", "tta_color", "mc_dropout", "ggd_yhat_only")
UNCERTAINTY_COLUMNS = {
    "member_id": "string",
    "method": "string",
    "site": "string",
    "role": "string",
    "case_id": "string",
    "slice_idx": "int64",
    "uncertain_px": "int64",     # pixels above the Otsu threshold of this slice's uncertainty map
    "error_px": "int64",         # fp + fn of the frozen member's prediction on this slice
    "area_px": "int64",
    "mean_uncertainty": "float64",
    "uncertain_error_px": "Int64",  # pixels both uncertain (Otsu, as uncertain_px) and wrong (error_px)
    "fixed_px": "Int64",         # pixels above the member's source threshold (Otsu fitted once on every
                                 # source test map of this method); <NA> where the method did not score the source
    "map_ptp": "float64",        # max - min of the slice's map (the flatness guard reads it)
}
#: Columns added after the first release: records written before them read as <NA> / NaN there.
_UNCERTAINTY_LATER = ("uncertain_error_px", "fixed_px", "map_ptp")

#: One row per member x method x site: how well the map ranks the member's error pixels.
UNCERTAINTY_SITE_COLUMNS = {
    "member_id": "string",
    "method": "string",
    "site": "string",
    "role": "string",
    "prompted": "bool",          # the member is box-prompted (SAM family): the paper's Table 4 is for these
    "auroc": "float64",          # sklearn roc_auc_score(error mask, map) over every pixel of the site; NaN if
    "ap": "float64",             # the site has no error pixel or no correct one; average_precision_score likewise
    "error_px": "int64",         # error pixels of the site (the positives)
    "area_px": "int64",          # pixels of the site
    "source_threshold": "float64",  # the threshold behind fixed_px (NaN: no source maps)
}


def _part_path(experiment_dir: str | os.PathLike, kind: str, member_id: str, suffix: str = ".parquet") -> Path:
    return records_dir(experiment_dir) / "uncertainty" / kind / f"{member_id}{suffix}"


def write_uncertainty_sites(experiment_dir: str | os.PathLike, member_id: str, rows: pd.DataFrame) -> Path:
    rows = _conform(rows, UNCERTAINTY_SITE_COLUMNS, f"uncertainty sites of {member_id}")
    return _write_parquet(rows, _part_path(experiment_dir, "sites", member_id))


def write_uncertainty_fit(experiment_dir: str | os.PathLike, member_id: str, fit: dict) -> Path:
    """The member's δ fit record (JSON): settings, loss per epoch, held-out Dice(μ > 0.5, ŷ) per epoch."""
    path = _part_path(experiment_dir, "fits", member_id, ".json")
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
                              UNCERTAINTY_SITE_COLUMNS, "uncertainty sites")


def write_uncertainty_part(experiment_dir: str | os.PathLike, member_id: str, rows: pd.DataFrame) -> Path:
    rows = _conform(_with_later_columns(rows.copy()), UNCERTAINTY_COLUMNS, f"uncertainty of {member_id}")
    return _write_parquet(rows, records_dir(experiment_dir) / "uncertainty" / "parts" / f"{member_id}.parquet")


def uncertainty_part_ids(experiment_dir: str | os.PathLike) -> list[str]:
    pdir = records_dir(experiment_dir) / "uncertainty" / "parts"
    return sorted(p.stem for p in pdir.glob("*.parquet"))


def _with_later_columns(df: pd.DataFrame) -> pd.DataFrame:
    """An experiment scored before ``_UNCERTAINTY_LATER`` existed: those columns as <NA> / NaN."""
    for c in _UNCERTAINTY_LATER:
        if c not in df.columns:
            dtype = UNCERTAINTY_COLUMNS[c]
            df[c] = pd.Series(pd.NA if dtype == "Int64" else np.nan, index=df.index, dtype=dtype)
    return df


def _load_merged_parts(experiment_dir: str | os.PathLike, merged: Path, pdir: Path, columns: dict[str, str],
                       what: str, fill=lambda df: df) -> pd.DataFrame | None:
    """A merged table of the uncertainty stage's per-member parts (``pdir/<member_id>.parquet``).

    The parts are the truth: the merged file is used only while it holds exactly their members and is
    newer than each of them (else it is rebuilt, and written back); a damaged part is a ``RecordsError``
    that says how to redo it. None when there are no parts. ``fill`` adds columns older records lack.
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
            raise RecordsError(f"{part} is damaged ({type(e).__name__}); delete it and run `oodsweep resume "
                               f"{Path(experiment_dir)}` to fit that member's δ again") from None
    df = _conform(fill(pd.concat(frames, ignore_index=True)), columns, what)
    _write_parquet(df, merged)
    return df


def load_uncertainty(experiment_dir: str | os.PathLike) -> pd.DataFrame | None:
    """The merged uncertainty table (merging the parts if needed), or None if the stage never ran."""
    rdir = records_dir(experiment_dir)
    return _load_merged_parts(experiment_dir, rdir / "uncertainty.parquet", rdir / "uncertainty" / "parts",
                              UNCERTAINTY_COLUMNS, "uncertainty", fill=_with_later_columns)


def uncertain_area(unc: pd.DataFrame, method: str = "ggd",
                   by: list[str] | tuple[str, ...] = ("member_id", "site")) -> pd.Series:
    """A model's uncertainty score on a split: the mean over its images of uncertain_px / area_px."""
    u = unc[unc["method"] == method]
    frac = u["uncertain_px"] / u["area_px"]
    out = frac.groupby([u[c] for c in by]).mean()
    out.name = "uncertain_area"
    return out


#: Table 4's readings of the paper's "MSE between the uncertainty values and the actual errors".
TABLE4_READINGS = ("area", "pixel")


def table4(unc: pd.DataFrame, by: list[str] | tuple[str, ...] = ("method", "site"), reading: str = "area") -> pd.Series:
    """Table 4: the mean over images of a squared error between the uncertain mask and the error mask.

    ``reading="area"``: (uncertain-area fraction - pixel-error fraction)^2 per image (where they are
    does not count); ``"pixel"``: the pixel-wise MSE between the binary uncertain mask and the binary
    error mask, (uncertain_px + error_px - 2 uncertain_error_px) / area_px per image (location counts).

    Only members scored by every method present are counted, so that the methods are compared on
    the same images (the baselines may run on a subset of the pool: uncertainty.baseline_members).
    """
    if reading not in TABLE4_READINGS:
        raise ValueError(f"unknown Table 4 reading {reading!r}; valid: {', '.join(TABLE4_READINGS)}")
    methods = unc.groupby("member_id")["method"].nunique()
    unc = unc[unc["member_id"].isin(methods[methods == unc["method"].nunique()].index)]
    if reading == "area":
        sq = ((unc["uncertain_px"] - unc["error_px"]) / unc["area_px"]) ** 2
    else:
        sq = (unc["uncertain_px"] + unc["error_px"] - 2 * unc["uncertain_error_px"]) / unc["area_px"]
    out = sq.groupby([unc[c] for c in by]).mean()
    out.name = "mse"
    return out
