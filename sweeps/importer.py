"""``oodsweep import``: an experiment folder from a pool trained elsewhere (predicted masks, no models).

Input: a spec with an ``imported:`` section instead of ``pool:`` (``imported.members``: the members table,
``sweeps.import_table``; ``imported.predictions``: ``<DIR>/<member_id>/<site>/<case_id>.nii.gz``, ``.png`` for
photographs), and the usual ``data:`` section for the images and the ground truth. Each member's masks are
checked against the ground truth and put on the slice cache's grid (``trainables.data.predictions``), then
written as the records a trained pool writes, through ``trainables.records``' writers: per-slice counts
(``records/parts``), packed predictions of the scored splits (``records/predictions``), ``members.parquet``
(each member marked ``imported``, with no checkpoint). The pool stage is then done; ``status``, ``resume``
(δ and the analysis), ``analyze`` and ``report`` read the folder as any other.

Which predictions are needed, per member (the cache's split of the source decides, as for a trained pool):

* the source's test cases (ID) and every target's ``data.target_split`` cases: always;
* the source's validation cases (``data.val_fraction`` > 0): always (they choose configurations, and the
  Table-4 baselines' members);
* the source's training cases (less the validation ones): optional; δ is fitted on them when every member
  has them (``uncertainty.fit_split: train``, the paper's), else on the validation cases (``fit_split: val``).
  A spec that sets ``uncertainty.fit_split`` itself gets what it asks for, or an error naming what is missing.

Extra prediction files (other cases of a site) are read only to check their name: a file or folder that
matches no case or site of the dataset is an error. ``records/import.json`` says what was imported.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from trainables import records

from .console import log
from .experiment import DONE_MARKER, POOL_STAGE, check_frozen, driver_lock, freeze
from .spec import SpecError, SweepSpec

__all__ = ["import_pool", "member_folder", "needed_cases", "resolve_fit_split", "scan_member"]


def member_folder(spec: SweepSpec, row: pd.Series) -> Path:
    """A member's prediction folder: the table's ``predictions`` entry, else ``<imported.predictions>/<member_id>``."""
    return Path(row["predictions"]) if row["predictions"] else Path(spec.imported.predictions) / row["member_id"]


def needed_cases(spec: SweepSpec, cache) -> dict[str, tuple[str, str, np.ndarray]]:
    """The source's and targets' splits an import reads, by name: ``id``, ``ood:<site>``, ``val``, ``train``, each
    ``(site, split name, cache rows)`` (``val`` and ``train`` only when they have rows)."""
    from trainables.member import train_val_rows

    d = spec.data
    out = {"id": (d.source, "test", cache.rows(d.source, "test"))}
    for t in d.targets:
        out[f"ood:{t}"] = (t, d.target_split, cache.rows(t, d.target_split))
    train, val = train_val_rows(cache, d.source, d.val_fraction, d.split_seed)
    if len(val):
        out["val"] = (d.source, "val", val)
    if len(train):
        out["train"] = (d.source, "train", train)
    return out


def _cases(cache, rows: np.ndarray) -> list[str]:
    return list(dict.fromkeys(cache.index["case_id"].to_numpy()[rows].astype(str)))


def scan_member(spec: SweepSpec, row: pd.Series, cache, sets: dict, dataset_cases: dict[str, set[str]]
                ) -> tuple[dict[tuple[str, str], Path], bool]:
    """Check one member's prediction folder before anything is read: ``(site, case) -> file`` for every case the
    import needs, and whether the source's training split is there too.

    Raises:
        DataError: the folder or a needed case is missing, a site folder or file names no site or case of the
            dataset, a case has two files, or the training split is there in part (each names the member, the
            site, the case and the file or folder).
    """
    from trainables.data.base import DataError
    from trainables.data.predictions import PREDICTION_SUFFIXES, case_of

    mid = row["member_id"]
    folder = member_folder(spec, row)
    if not folder.is_dir():
        raise DataError(f"member {mid}: its prediction folder {folder} does not exist; write its masks as "
                        f"{folder}/<site>/<case_id>.nii.gz (.png for photographs), or give its folder in the "
                        f"members table's `predictions` column")
    files: dict[tuple[str, str], Path] = {}
    for sub in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if not sub.is_dir() or sub.name not in dataset_cases:
            raise DataError(f"member {mid}: {sub} is not a site of this experiment (sites: "
                            f"{sorted(dataset_cases)}); each folder under {folder} is named by a site of "
                            f"data.source / data.targets and holds that site's masks")
        for f in sorted(p for p in sub.iterdir() if not p.name.startswith(".")):
            case = case_of(f)
            if case is None or case not in dataset_cases[sub.name]:
                what = (f"{case!r} is not a case of site {sub.name}" if case is not None
                        else f"not a prediction file (expected <case_id>{' or <case_id>'.join(PREDICTION_SUFFIXES)})")
                raise DataError(f"member {mid}, site {sub.name}: {f}: {what}; name each file by its case as the "
                                f"dataset names it (e.g. {sorted(dataset_cases[sub.name])[0]}.nii.gz)")
            if (sub.name, case) in files:
                raise DataError(f"member {mid}, site {sub.name}, case {case}: two files, {files[(sub.name, case)]} "
                                f"and {f}; keep one")
            files[(sub.name, case)] = f
    have_train = False
    for name, (site, split, rows) in sets.items():
        cases = _cases(cache, rows)
        missing = [c for c in cases if (site, c) not in files]
        if name == "train":
            if missing and len(missing) < len(cases):
                raise DataError(f"member {mid}, site {site}: predictions for {len(cases) - len(missing)} of the "
                                f"{len(cases)} training-split cases; δ is fitted on all of them or none: add "
                                f"{folder / site / (missing[0] + '.nii.gz')} (and {len(missing) - 1} more), or "
                                f"remove the training-split files to fit δ on the validation split")
            have_train = not missing
            continue
        if missing:
            raise DataError(f"member {mid}, site {site}, case {missing[0]}: no prediction "
                            f"({folder / site / missing[0]}.nii.gz, .nii or .png)" +
                            (f", and {len(missing) - 1} more case(s) of its {split} split" if len(missing) > 1 else "")
                            + f"; the {split} split of {site} is scored, so every one of its cases needs a mask")
    needed = {(s, c) for s, _, r in sets.values() for c in _cases(cache, r)}
    return {k: v for k, v in files.items() if k in needed}, have_train


def resolve_fit_split(spec: SweepSpec, have_train: dict[str, bool], sets: dict) -> SweepSpec:
    """The spec with ``uncertainty.fit_split`` decided for an imported pool: ``train`` when every member brought
    its training-split predictions, else ``val``; a spec that sets it itself is checked instead."""
    u = spec.uncertainty
    if u is None:
        return spec
    explicit = "fit_split" in (spec.raw.get("uncertainty") or {})
    lacking = sorted(m for m, has in have_train.items() if not has)
    if explicit and u.fit_split == "train" and lacking:
        raise SpecError(f"uncertainty.fit_split is 'train' but member {lacking[0]} (and {len(lacking) - 1} more) "
                        f"has no predictions for the source's training-split cases; add them, or set "
                        f"`fit_split: val` to fit δ on the validation split")
    split = u.fit_split if explicit else ("train" if not lacking else "val")
    if split == "val" and "val" not in sets:
        raise SpecError(f"δ needs predictions on a split of the source other than its test split: member "
                        f"{lacking[0]} has none for the training split, and data.val_fraction is "
                        f"{spec.data.val_fraction} (no validation split); add the training-split predictions, "
                        f"or set data.val_fraction (e.g. 0.1) and give the validation cases' predictions")
    if split == u.fit_split:
        return spec
    raw = json.loads(json.dumps(spec.raw))
    raw["uncertainty"] = {**(raw.get("uncertainty") or {}), "fit_split": split}
    return dataclasses.replace(spec, uncertainty=dataclasses.replace(u, fit_split=split), raw=raw)


def _member_records(spec: SweepSpec, row: pd.Series, cache, sets: dict, files: dict, case_files: dict,
                    slices_of: dict) -> tuple[pd.DataFrame, dict[str, np.ndarray], list[str]]:
    """Read one member's masks onto the cache grid: its per-slice counts (``records.SLICE_COLUMNS`` less
    ``member_id``), its masks per split name (rows as ``sets``), and the header warnings."""
    import torch

    from trainables.data.base import DataError
    from trainables.data.cache import resize_masks
    from trainables.data.predictions import read_prediction
    from trainables.metrics import confusion_counts

    mid, size = row["member_id"], spec.data.image_size
    on_grid: dict[tuple[str, str], np.ndarray] = {}
    warnings: list[str] = []
    for (site, case), path in files.items():
        where = f"member {mid}, site {site}, case {case}"
        arr, warn = read_prediction(path, case_files[(site, case)], where)
        warnings += warn
        grid = resize_masks(arr, size)  # the cache's own nearest-neighbour resampling of the ground truth
        if len(grid) != len(slices_of[(site, case)]):
            raise DataError(f"{where}: {path} has {len(grid)} slices but the case has {len(slices_of[(site, case)])} "
                            f"in the slice cache; write the prediction on the ground truth's grid")
        on_grid[(site, case)] = grid
    frames, masks = [], {}
    area = int(np.prod(cache.masks.shape[-2:]))
    for name, (site, _, rows) in sets.items():
        if name == "train" and not all((site, c) in on_grid for c in _cases(cache, rows)):
            continue
        idx = cache.index.iloc[rows]
        pred = np.stack([on_grid[(site, c)][int(z)] for c, z in zip(idx["case_id"].astype(str), idx["slice_idx"])])
        masks[name] = pred.astype(bool)
        if name == "train":
            continue  # δ's fit only: a trained pool records no counts there either
        c = confusion_counts(torch.from_numpy(pred), torch.from_numpy(np.asarray(cache.masks[rows]))).numpy()
        frames.append(pd.DataFrame({"site": site, "role": {"id": "id", "val": "val"}.get(name, "ood"),
                                    "case_id": idx["case_id"].to_numpy(), "slice_idx": idx["slice_idx"].to_numpy(),
                                    "tp": c[:, 0], "fp": c[:, 1], "fn": c[:, 2], "tn": c[:, 3], "area_px": area}))
    return pd.concat(frames, ignore_index=True), masks, warnings


def _track(spec: SweepSpec, table: pd.DataFrame, summaries: dict[str, dict]) -> None:
    """MLflow: the ``pool`` stage run, and a child run per imported member with its settings and ID/OOD scores."""
    from .tracking import MEMBER_TAG, finish_tracking, tracker_for

    tracker = tracker_for(spec)
    parent = tracker.stage_run(POOL_STAGE)
    tracker.log_params(parent, {"imported": True, "members_table": str(spec.imported.members),
                                "n_runs": spec.n_runs(), "n_members": len(table), "source": spec.data.source,
                                "targets": ",".join(spec.data.targets), "image_size": spec.data.image_size})
    for _, r in table.iterrows():
        # queued like a trained member's run (sweeps.callbacks): found by its tags on a rerun, params already
        # on it and metric steps it has are not logged twice
        rid = tracker.run_ref(r["member_id"], {MEMBER_TAG: r["member_id"]}, parent=parent)
        tracker.log_params(rid, {"arch": r["arch"], "lr": r["lr"], "seed": r["seed"], "epochs": r["epochs"],
                                 "run_id": r["run_id"], "source": spec.data.source, "imported": True,
                                 "targets": ",".join(spec.data.targets)})
        tracker.log_metrics(rid, summaries[r["member_id"]])
        tracker.end(rid, "FINISHED")
    tracker.end(parent, "FINISHED")
    finish_tracking(tracker)


def import_pool(spec: SweepSpec, track: bool = True) -> SweepSpec:
    """Write the records of the pool ``spec.imported`` describes into the experiment folder, freeze the spec and
    mark the pool stage done; return the spec as frozen (``uncertainty.fit_split`` decided). An experiment whose
    import is complete is left as it is. ``track``: log the pool and its members to MLflow (the CLI does)."""
    from trainables.data.base import DataError
    from trainables.data.cache import open_slice_cache, resolve_sources, scan_sources
    from trainables.member import summarize
    from trainables.surface import write_member_surface

    from . import reconcile
    from .driver import prepare_data
    from .import_table import read_members_table

    if spec.imported is None:
        raise SpecError(f"{spec.source_file or 'the spec'}: has no `imported:` section; `oodsweep import` needs "
                        f"`imported: {{members: members.csv, predictions: DIR}}` (or --members and --predictions)")
    table = read_members_table(spec.imported.members)
    exp = spec.experiment_dir
    cache_dir = prepare_data(spec)
    cache = open_slice_cache(cache_dir)
    if len(cache.labels) > 1:
        raise DataError(f"data: the cache holds {len(cache.labels)} label channels {cache.labels}; an imported pool "
                        f"brings one mask per case: choose one (data.lesions: [{cache.labels[0]}])")
    d = spec.data
    sites = [d.source, *d.targets]
    found, _ = scan_sources(resolve_sources(d.layout, d.root, sites, d.site_sources()), d.layout_options)
    case_files = {(cf.site, cf.case_id): cf for cf in found}
    dataset_cases = {s: {c for (site, c) in case_files if site == s} for s in sites}
    slices_of = {k: g.index.to_numpy() for k, g in cache.index.groupby(["site", "case_id"], sort=False)}
    slices_of = {(str(s), str(c)): v for (s, c), v in slices_of.items()}
    sets = needed_cases(spec, cache)
    scans = {r["member_id"]: scan_member(spec, r, cache, sets, dataset_cases) for _, r in table.iterrows()}
    spec = resolve_fit_split(spec, {m: s[1] for m, s in scans.items()}, sets)
    exp.mkdir(parents=True, exist_ok=True)
    lock = driver_lock(exp)
    try:
        frozen, changes = check_frozen(spec)
        marker = exp / POOL_STAGE / DONE_MARKER
        if marker.exists() and not reconcile.pool_gaps(spec):
            log(f"{exp}: the pool is imported already ({len(table)} members): kept as it is")
            return spec
        freeze(spec, frozen, changes)
        reconcile.record_location(spec)
        t0, summaries = time.time(), {}
        for _, r in table.iterrows():
            mid = r["member_id"]
            slices, masks, warnings = _member_records(spec, r, cache, sets, scans[mid][0], case_files, slices_of)
            for w in warnings:
                log(f"WARNING: {w}")
            for name, m in masks.items():
                site, _, rows = sets[name]
                idx = cache.index.iloc[rows]
                split = name if name in ("train", "val") else None  # δ's fit splits: predictions/<m>/splits/
                records.save_predictions(exp, mid, site, m, idx["case_id"].tolist(), idx["slice_idx"].to_numpy(),
                                         split=split)
            scored = [(sets[n][0], "id" if n == "id" else "ood", sets[n][2]) for n in masks if n not in ("train", "val")]
            write_member_surface(exp, mid, cache, scored, {sets[n][0]: masks[n] for n in masks
                                                           if n not in ("train", "val")}, d.surface_tolerance_mm)
            member = {"member_id": mid, "run_id": r["run_id"], "arch": r["arch"], "lr": float(r["lr"]),
                      "epochs": int(r["epochs"]), "seed": int(r["seed"]), "batch_size": 0, "source": d.source,
                      # no weights: the member was trained elsewhere; its ŷ is its stored predictions
                      "checkpoint": "", "oracle_prompt": bool(r["oracle_prompt"]), "imported": True}
            records.write_member_part(exp, member, slices.assign(member_id=mid))
            summaries[mid] = summarize(slices)
        records.merge_parts(exp)
        info = {"members_table": str(spec.imported.members), "predictions": str(spec.imported.predictions or ""),
                "members": len(table), "fit_split": spec.uncertainty.fit_split if spec.uncertainty else None,
                "splits": {name: {"site": s, "split": sp, "cases": _cases(cache, rows)}
                           for name, (s, sp, rows) in sets.items()},
                "training_split_given": sorted(m for m, s in scans.items() if s[1]),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = records.records_dir(exp) / "import.json"
        path.write_text(json.dumps(info, indent=1))
        if track:
            _track(spec, table, summaries)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        log(f"imported {len(table)} members ({spec.n_runs()} runs) into {exp} in {time.time() - t0:.1f}s"
            + (f"; δ will be fitted on the source's {spec.uncertainty.fit_split} split" if spec.uncertainty else ""))
        return spec
    finally:
        os.close(lock)
