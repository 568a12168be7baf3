"""How long must δ train to rank the error pixels? Measured outside Ray on the demo's data and pool.

Builds the demo preset's synthetic sites and slice cache, trains demo pool runs directly with
``trainables.segment.train_segmenter`` (members at the demo's snapshot epochs), then fits δ for every
member at each (δ epochs, λ) setting with ``fit_uncertainty`` (no baselines) and prints, per setting,
the median over members of the per-site pixel AUROC and AP of δ's variance for the member's error
pixels (the records' ``uncertainty_sites`` table), the median Dice(μ > 0.5, ŷ) on δ's held-out
slices, and the δ seconds per member. Everything runs in one process on this machine, so the
seconds are comparable within one run only.

    python bench/delta_fit.py --work /tmp/deltafit --settings 2:1 10:1 20:1 20:100 [--archs unet_r18 ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEMO = Path(__file__).resolve().parents[1] / "sweeps" / "presets" / "demo.yaml"


def build_pool(work: Path, archs: list[str] | None, lrs: list[float] | None) -> tuple[dict, list[dict]]:
    from sweeps.driver import prepare_data
    from sweeps.spec import load_spec
    from trainables.segment import train_segmenter

    spec = load_spec(DEMO, env={**os.environ, "OODSWEEP_STORAGE": str(work), "OODSWEEP_DATA": str(work / "data")})
    d = spec.data
    cache = prepare_data(spec, progress=False)  # the demo's synthetic sites and slice cache, as a sweep builds them
    common = {"cache": str(cache), "source": d.source, "targets": list(d.targets), "num_threads": 1,
              "target_split": d.target_split}
    members = []
    pool_dir = work / "pool"
    for arch in archs or spec.pool.arch.values:
        for lr in lrs or spec.pool.lr.values:
            done = pool_dir / f"{arch}-{lr:g}.done"
            t = time.perf_counter()
            if not done.exists():
                train_segmenter({**common, "arch": arch, "lr": lr, "seed": 0,
                                 "snapshots": list(spec.pool.epochs.values),
                                 "batch_size": spec.pool.batch_size, "experiment_dir": str(pool_dir)})
                done.touch()
                print(f"trained {arch} lr {lr:g} in {time.perf_counter() - t:.1f}s", flush=True)
    from trainables.records import load_records, resolve_checkpoint
    ms, _ = load_records(pool_dir)
    members = ms.to_dict(orient="records")
    for m in members:  # the records hold it relative to the pool's folder; δ is fitted in other folders
        m["checkpoint"] = str(resolve_checkpoint(pool_dir, m["checkpoint"]))
    return common, members


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a folder kept between runs (data, cache, pool)")
    ap.add_argument("--settings", nargs="+", default=["2:1", "10:1", "20:1"], help="δ epochs:λ pairs")
    ap.add_argument("--archs", nargs="*", default=None)
    ap.add_argument("--lrs", nargs="*", type=float, default=None)
    ap.add_argument("--members", nargs="*", default=None, help="member ids (default: all trained)")
    ap.add_argument("--lr", type=float, default=1e-3, help="δ's learning rate (the demo's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    common, members = build_pool(args.work, args.archs, args.lrs)
    if args.members:
        members = [m for m in members if m["member_id"] in args.members]
    from trainables.records import load_uncertainty_fits, load_uncertainty_sites
    from trainables.uncertainty import fit_uncertainty

    rows = []
    for setting in args.settings:
        ep, lam = setting.split(":")
        exp = args.work / f"delta-e{ep}-l{lam}"
        for m in members:
            t = time.perf_counter()
            if not (exp / "records" / "uncertainty" / "parts" / f"{m['member_id']}.parquet").exists():
                fit_uncertainty({**common, "member_id": m["member_id"], "checkpoint": m["checkpoint"],
                                 "epochs": int(ep), "lam": float(lam), "lr": args.lr, "baselines": [],
                                 "experiment_dir": str(exp)})
            rows.append({"setting": setting, "member_id": m["member_id"], "seconds": time.perf_counter() - t})
        sites = load_uncertainty_sites(exp)
        sites = sites[(sites["method"] == "ggd") & sites["member_id"].isin([m["member_id"] for m in members])]
        med = sites.groupby("site")[["auroc", "ap"]].median()
        fits = load_uncertainty_fits(exp)
        fits = fits[fits["member_id"].isin([m["member_id"] for m in members])]
        conv = fits["final_heldout_dice_mu_yhat"].median()
        mins = sites.groupby("site")["auroc"].min()
        secs = np.median([r["seconds"] for r in rows if r["setting"] == setting])
        print(f"δ {ep} epochs, λ {lam}: median per-member seconds {secs:.1f}; median Dice(μ>0.5, ŷ) held out "
              f"{conv:.3f}; median AUROC / AP per site: "
              + ", ".join(f"{s} {r.auroc:.3f} / {r.ap:.3f}" for s, r in med.iterrows())
              + "; worst member's AUROC per site: " + ", ".join(f"{s} {v:.3f}" for s, v in mins.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
