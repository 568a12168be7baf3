"""How long does the analysis stage take on a large pool? A synthetic record set, timed end to end.

Builds, in a temporary directory, the records a finished experiment would hold (no training): a pool
of ``--members`` members (five architectures) evaluated on a source test split and ``--targets``
target sites of ``--slices`` slices each (``--image-size`` squared pixels), with

* per-slice confusion counts (``records/parts`` merged into members.parquet / slices.parquet),
* packed predicted masks for every member and site (``records/predictions``),
* uncertainty records for every member, method (ggd, bayescap, tta_noise, tta_color, mc_dropout),
  site and slice (``records/uncertainty/parts``), and qualitative examples for a few members,

then times one ``run_analysis`` call on it (the goal: under 60 s for 200 members x 4 targets
x 2,000 slices on the 2-core development machine) and prints the stage's own breakdown.

Masks: one ellipse "organ" per slice (in 70% of the slices) per site; a member's prediction is the
truth shifted by an offset that grows with the member's weakness and the site's shift severity,
emptied on some slices, with sparse false-positive speckle. Only the timing is the point; the
correlations it prints are those of this toy generator.

    python bench/analysis.py [--members 200] [--targets 4] [--slices 2000] [--image-size 64] [--keep DIR]
                             [--compare OTHER_CHECKOUT] [--memory-gib 2]

A large pool: ``--members 500 --slices 500`` and ``--members 2000 --slices 500`` (64², 4 targets) with
``--memory-gib 2`` (the agreement in blocks of cases, ``run_analysis``' ``memory_gib``; the goal: a peak RSS
of at most 2.5 GiB at 2,000 members). The records are built in a child process, so the printed peak RSS
(``ru_maxrss``) is the analysis' own process: its imports, the records it reads and what it computes.

``--compare`` times another checkout's ``run_analysis`` (its own defaults, e.g. the analysis before
the run-level bootstrap: ``git worktree add /tmp/old 533f3d0``) on the same records, right after this
one, in a subprocess with that checkout first on the path, and prints the ratio of the wall times.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

# Run as ``python bench/analysis.py``, this file's folder comes first on sys.path and its own name
# would shadow the ``analysis`` package: drop that folder before importing the project.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from analysis import run_analysis  # noqa: E402
from analysis.correlate import N_RESAMPLES  # noqa: E402
from trainables import records  # noqa: E402

ARCHS = ("unet_r50", "unetpp_r50", "unet_effb0", "unetpp_effb0", "medsam")
METHODS = records.UNCERTAINTY_METHODS
SLICES_PER_CASE = 20


def _truth(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n x size x size`` bool: an ellipse in 70% of the slices."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7, (2, n)) * size
    ry, rx = rng.uniform(0.06, 0.2, (2, n)) * size
    present = rng.random(n) < 0.7
    d = (((yy[None] - cy[:, None, None]) / ry[:, None, None]) ** 2
         + ((xx[None] - cx[:, None, None]) / rx[:, None, None]) ** 2)
    return (d < 1.0) & present[:, None, None]


def _predict(rng: np.random.Generator, truth: np.ndarray, weakness: float, severity: float) -> np.ndarray:
    """A member's masks: the truth shifted, emptied on some slices, with speckle."""
    n, h, w = truth.shape
    shift = max(1, int(round(1 + 6 * weakness * (0.5 + severity))))
    pred = np.roll(truth, (int(rng.integers(-shift, shift + 1)), int(rng.integers(-shift, shift + 1))), axis=(1, 2))
    pred[rng.random(n) < 0.4 * weakness * severity] = False
    flat = pred.reshape(-1)
    flat[rng.integers(0, flat.size, rng.binomial(flat.size, 2e-4 * (1 + severity)))] = True
    return pred


def build(root: Path, n_members: int, n_targets: int, n_slices: int, size: int, seed: int = 0) -> None:
    """Write a synthetic experiment's records under ``root`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    sites = {"Source": ("id", 0.0)} | {f"Target{i + 1}": ("ood", (i + 1) / n_targets) for i in range(n_targets)}
    truths = {s: _truth(rng, n_slices, size) for s in sites}
    case_ids = np.array([f"Case{i // SLICES_PER_CASE:03d}" for i in range(n_slices)])
    slice_idx = np.arange(n_slices) % SLICES_PER_CASE
    area = size * size
    method_noise = {"ggd": 0.2, "bayescap": 0.3, "tta_noise": 1.5, "tta_color": 1.2, "mc_dropout": 1.0}
    for m in range(n_members):
        arch = ARCHS[m % len(ARCHS)]
        lr = (1e-4, 3e-4, 1e-3)[(m // len(ARCHS)) % 3]
        epochs = (10, 20, 40)[(m // (3 * len(ARCHS))) % 3]
        mseed = m // (9 * len(ARCHS))
        mid = f"{arch}-lr{lr:g}-ep{epochs}-s{mseed}-m{m:03d}"
        weakness = float(np.clip(0.15 * (m % len(ARCHS)) / len(ARCHS) + rng.uniform(0.05, 0.9), 0, 1))
        parts, unc = [], []
        for site, (role, severity) in sites.items():
            truth = truths[site]
            pred = _predict(rng, truth, weakness, severity)
            tp = (truth & pred).sum(axis=(1, 2))
            fp = (~truth & pred).sum(axis=(1, 2))
            fn = (truth & ~pred).sum(axis=(1, 2))
            parts.append(pd.DataFrame({"member_id": mid, "site": site, "role": role, "case_id": case_ids,
                                       "slice_idx": slice_idx, "tp": tp, "fp": fp, "fn": fn,
                                       "tn": area - tp - fp - fn, "area_px": area}))
            records.save_predictions(root, mid, site, pred, list(case_ids), slice_idx)
            err = fp + fn
            for method, noise in method_noise.items():
                unc_px = np.clip(err * rng.lognormal(0, noise, n_slices) + rng.poisson(5, n_slices), 0, area)
                unc.append(pd.DataFrame({"member_id": mid, "method": method, "site": site, "role": role,
                                         "case_id": case_ids, "slice_idx": slice_idx,
                                         "uncertain_px": unc_px.astype(np.int64), "error_px": err, "area_px": area,
                                         "mean_uncertainty": unc_px / area}))
        # a training run is (arch, lr, seed): its snapshot epochs are members of one run
        member = {"member_id": mid, "run_id": f"{arch}-lr{lr:g}-s{mseed}", "arch": arch, "lr": lr, "epochs": epochs,
                  "seed": mseed, "batch_size": 8, "source": "Source", "checkpoint": f"/nowhere/{mid}.pt",
                  "oracle_prompt": arch == "medsam"}
        records.write_member_part(root, member, pd.concat(parts, ignore_index=True))
        records.write_uncertainty_part(root, mid, pd.concat(unc, ignore_index=True))
        if m < 12:  # qualitative examples: three slices of the last target
            site = list(sites)[-1]
            k = np.flatnonzero(truths[site].any(axis=(1, 2)))[:3]
            truth = truths[site][k]
            pred = _predict(rng, truth, weakness, 1.0)
            error = truth ^ pred
            image = (0.6 * truth + rng.normal(0.2, 0.1, truth.shape)).astype(np.float32)
            unc_map = (error * rng.uniform(0.5, 1.0, truth.shape) + rng.uniform(0, 0.2, truth.shape)).astype(np.float32)
            path = records.records_dir(root) / "uncertainty" / "examples" / f"{mid}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, image=image, truth=truth, pred=pred, error=error, mu=pred.astype(np.float32),
                     uncertainty=unc_map, site=np.array(site), case_id=case_ids[k], slice_idx=slice_idx[k])
    records.merge_parts(root)
    records.load_uncertainty(root)  # merges the uncertainty parts, as the driver will after the stage


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=200)
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--slices", type=int, default=2000, help="slices per site")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--metric", default="iou_3d", choices=records.METRICS)
    ap.add_argument("--compare", help="another checkout of the project whose analysis to time on the same records")
    ap.add_argument("--keep", help="build the records in this folder and keep them (default: a temporary one); "
                                   "a folder that holds them already is reused")
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="run_analysis' memory_gib (the agreement in blocks of cases); default: no bound")
    ap.add_argument("--build-only", help=argparse.SUPPRESS)  # the child process that writes the records
    args = ap.parse_args()
    if args.build_only:
        build(Path(args.build_only), args.members, args.targets, args.slices, args.image_size)
        return 0
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="oodsweep-bench-analysis-"))
    try:
        t = time.perf_counter()
        if (tmp / "records" / "members.parquet").exists():  # --keep DIR from an earlier run: its records again
            print(f"records of an earlier run in {tmp}: not built again (the sizes given are ignored)")
        else:
            subprocess.run([sys.executable, __file__, "--build-only", str(tmp), "--members", str(args.members),
                            "--targets", str(args.targets), "--slices", str(args.slices),
                            "--image-size", str(args.image_size)], check=True)
            print(f"built {args.members} members x (1 source + {args.targets} targets) x {args.slices} slices of "
                  f"{args.image_size}x{args.image_size} px in {time.perf_counter() - t:.1f} s (not timed below)",
                  flush=True)
        t = time.perf_counter()
        res = run_analysis(tmp, metric=args.metric, memory_gib=args.memory_gib)
        wall = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux
        parts = json.loads((Path(res["out_dir"]) / "summary.json").read_text())["seconds"]
        print("run_analysis: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items() if k != "total"))
        print(f"run_analysis wall time: {wall:.1f} s (goal: under 60 s, {N_RESAMPLES} resamples of "
              f"{res['correlations'][0]['resample'] if res['correlations'] else '?'}s); {len(res['files'])} files, "
              f"{len(res['correlations'])} correlation rows", flush=True)
        print(f"peak RSS of the analysis process: {peak:.2f} GiB (memory_gib {args.memory_gib}; records built in a "
              f"child process)", flush=True)
        if args.compare:
            code = ("import sys, time; from analysis import run_analysis; t = time.perf_counter(); "
                    f"run_analysis({str(tmp)!r}, metric={args.metric!r}, out_dir={str(tmp / 'analysis_compare')!r}); "
                    "print(time.perf_counter() - t)")
            env = {**os.environ, "PYTHONPATH": str(Path(args.compare).resolve())}
            r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=args.compare,
                               capture_output=True, text=True, check=True)
            other = float(r.stdout.strip().splitlines()[-1])
            print(f"{args.compare} run_analysis wall time on the same records: {other:.1f} s; "
                  f"ratio this / that: {wall / other:.2f}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
