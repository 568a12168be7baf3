"""Does the snapshot mode pay? The same small pool trained both ways, wall times compared in one run.

    snapshots:    one run per (arch, lr, seed) to max(E), a pool member frozen at each epoch in E
    independent:  one run per (arch, lr, seed, e) for each e in E, a member at its end

Both produce the same pool members. The snapshot mode must cost no more than
max(E) / sum(E) x 1.2 of the independent runs (the bound). Runs call the trainable directly
(no Ray: per-trial Ray start-up would only favour the snapshot mode further), one after another on
one thread, alternating the two modes so that drift in machine speed hits both alike.

    python bench/snapshots.py [--epochs 2 4] [--lrs 1e-3 3e-4] [--arch unet_r18] [--image-size 64]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainables import records
from trainables.data.cache import build_slice_cache
from trainables.data.synthetic import write_synthetic_sites
from trainables.segment import train_segmenter

SITES = ["SiteA", "SiteB", "SiteC", "SiteD"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-4])
    ap.add_argument("--arch", default="unet_r18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--cases", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    epochs = sorted(set(args.epochs))
    with tempfile.TemporaryDirectory(prefix="oodsweep-bench-") as tmp:
        tmp = Path(tmp)
        write_synthetic_sites(tmp / "data", sites=SITES, cases_per_site=args.cases)
        cache = build_slice_cache("prostate_multisite", tmp / "data", SITES, args.image_size, tmp / "cache",
                                  test_fraction=0.3, progress=False)
        base = {"arch": args.arch, "seed": 0, "cache": str(cache), "source": "SiteA", "targets": SITES[1:],
                "batch_size": 8, "num_threads": 1}
        wall = {"snapshots": 0.0, "independent": 0.0}
        for lr in args.lrs:
            t = time.perf_counter()
            train_segmenter({**base, "lr": lr, "snapshots": epochs, "experiment_dir": str(tmp / "snap")})
            wall["snapshots"] += time.perf_counter() - t
            for e in epochs:
                t = time.perf_counter()
                train_segmenter({**base, "lr": lr, "epochs": e, "experiment_dir": str(tmp / "indep")})
                wall["independent"] += time.perf_counter() - t
            print(f"lr {lr:g}: snapshots {wall['snapshots']:.1f}s, independent {wall['independent']:.1f}s "
                  f"(cumulative)", flush=True)
        n_snap = len(records.member_part_ids(tmp / "snap"))
        n_ind = len(records.member_part_ids(tmp / "indep"))
    ratio = wall["snapshots"] / wall["independent"]
    bound = max(epochs) / sum(epochs) * 1.2
    print(f"pool: {args.arch} x lr {args.lrs} x epochs {epochs} at {args.image_size}px "
          f"-> {n_snap} members (snapshots) / {n_ind} members (independent)")
    print(f"wall time snapshots / independent = {ratio:.3f}  (ideal {max(epochs) / sum(epochs):.3f}, "
          f"bound {bound:.3f}) -> {'PASS' if ratio <= bound and n_snap == n_ind else 'FAIL'}")
    return 0 if ratio <= bound and n_snap == n_ind else 1


if __name__ == "__main__":
    sys.exit(main())
