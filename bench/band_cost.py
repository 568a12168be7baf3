"""What does the error band add to scoring a site? The whole-image ranking alone against the whole-image plus
the band ranking, as ``score_member`` runs them, on a synthetic split, in both scoring modes.

Per mode: ``--methods`` uncertainty maps (variance-like: a ring of high values at the prediction's edge, a
near-zero background) of ``--slices`` slices of ``--size`` squared pixels, the prediction a disc and the truth
a shifted disc. "before": ``error_ranking`` per map (the records before the band). "after": the band
(``error_band``: once per site on the exact path; a batch at a time inside the ranking on the binned path)
and ``error_rankings`` per map. Printed: seconds of each (the fastest of ``--repeat`` alternated runs), their
ratio, and one map's numbers. CPU time of this process (time.process_time: other processes on a shared machine count less than in wall
time); the ratio is the number to read.

    python bench/band_cost.py                          # 128 slices of 128², 5 maps
    python bench/band_cost.py --slices 64 --size 64    # a quick check
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_site(slices: int, size: int, methods: int, seed: int = 0):
    """(maps ``methods x slices x size x size`` float32, pred, truth ``slices x size x size`` bool)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    cy, cx = rng.uniform(0.3, 0.7, (2, slices, 1, 1)).astype(np.float32)
    r = rng.uniform(0.05, 0.25, (slices, 1, 1)).astype(np.float32)
    dy, dx = rng.normal(0, 0.02, (2, slices, 1, 1)).astype(np.float32)
    truth = np.hypot(yy - cy, xx - cx) < r
    d = (np.hypot(yy - cy - dy, xx - cx - dx) - r) * size
    pred = d < 0
    maps = np.stack([(np.exp(-np.abs(d)) * rng.lognormal(0, 1, (slices, 1, 1))
                      + rng.exponential(1e-4, d.shape)).astype(np.float32) for _ in range(methods)])
    return maps, pred, truth


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=128)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--methods", type=int, default=5)
    ap.add_argument("--band-px", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    from trainables.uncertainty.scoring import error_band, error_ranking, error_rankings

    maps, pred, truth = make_site(args.slices, args.size, args.methods)
    error = pred != truth
    print(f"{args.methods} maps x {args.slices} slices of {args.size}² ({error.size / 1e6:.1f} M pixels per map), "
          f"band {args.band_px} px", flush=True)
    error_rankings(maps[0, :2], error[:2], error_band(pred[:2], truth[:2], args.band_px), "binned")  # warm-up
    for mode in ("exact", "binned"):
        def band_of(i: int, j: int) -> np.ndarray:
            return error_band(pred[i:j], truth[i:j], args.band_px)

        t_before, t_after = [], []
        for _ in range(args.repeat):  # alternated, the fastest of each kept (a shared machine's noise)
            t = time.process_time()
            before = [error_ranking(m, error, mode) for m in maps]
            t_before.append(time.process_time() - t)
            t = time.process_time()
            band = band_of(0, len(error)) if mode == "exact" else band_of
            after = [error_rankings(m, error, band, mode) for m in maps]
            t_after.append(time.process_time() - t)
        assert all(a[0] == b for a, b in zip(after, before)), "whole-image numbers changed"
        (auroc, ap_), b = after[0]
        print(f"{mode}: before {min(t_before):.2f} s, after {min(t_after):.2f} s, ratio "
              f"{min(t_after) / min(t_before):.2f} (fastest of {args.repeat}); map 0: AUROC {auroc:.4f} AP {ap_:.4f}, "
              f"band AUROC {b.auroc:.4f} AP {b.ap:.4f} ({b.px} px, error fraction {b.error_frac:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
