"""What does the uncertainty stage cost per pool member? Measured in one run on this machine.

Trains one demo-sized pool member (the demo preset's data, architecture unet_r18, its epochs),
then fits δ for it with the demo preset's uncertainty settings, both through the plain trainables
(no Ray: the per-trial Ray start-up is the same for both stages). Prints

* fit δ (train δ + score every site with δ) / train the member   -- the bound: <= 1.5
* the same with every baseline (BayesCap, TTA noise, TTA colour, MC dropout) scored too
* one δ epoch / one member epoch (training only): the per-epoch cost behind the paper's settings
  (δ 50 epochs for members of 10-40 epochs)

    python bench/uncertainty.py [--arch unet_r18]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from sweeps.driver import prepare_data
from sweeps.spec import load_spec
from trainables.segment import train_segmenter
from trainables.uncertainty import fit_uncertainty

DEMO = Path(__file__).resolve().parents[1] / "sweeps" / "presets" / "demo.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="unet_r18")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="oodsweep-bench-") as tmp:
        tmp = Path(tmp)
        spec = load_spec(DEMO, env={**os.environ, "OODSWEEP_STORAGE": str(tmp), "OODSWEEP_DATA": str(tmp / "data")})
        d, u = spec.data, spec.uncertainty
        cache = prepare_data(spec, progress=False)  # the demo's synthetic sites and slice cache, as a sweep builds them
        common = {"cache": str(cache), "source": d.source, "targets": list(d.targets), "num_threads": 1,
                  "target_split": d.target_split}
        epochs = max(spec.pool.epochs.values)
        member_epochs = []
        t = time.perf_counter()
        member = train_segmenter({**common, "arch": args.arch, "lr": spec.pool.lr.values[0], "seed": 0,
                                  "epochs": epochs, "batch_size": spec.pool.batch_size,
                                  "experiment_dir": str(tmp / "exp")},
                                 report=lambda m, c: member_epochs.append(m["train_seconds"]))[0]
        t_member = time.perf_counter() - t
        ucfg = {**common, "member_id": member["member_id"], "checkpoint": member["checkpoint"], "epochs": u.epochs,
                "lr": u.lr, "lam": u.lam, "beta": u.beta, "batch_size": u.batch_size, "passes": u.passes,
                **u.bayescap}  # the demo's BayesCap size, as its trials get it (sweeps.uncertainty.param_space)
        delta_epochs = []

        def rec(m, c):
            if "epoch_seconds" in m:
                delta_epochs.append(m["epoch_seconds"])

        t = time.perf_counter()
        fit_uncertainty({**ucfg, "baselines": [], "experiment_dir": str(tmp / "u1")}, report=rec)
        t_delta = time.perf_counter() - t
        t = time.perf_counter()
        fit_uncertainty({**ucfg, "baselines": list(u.baselines), "experiment_dir": str(tmp / "u2")})
        t_all = time.perf_counter() - t
    member_epoch = sum(member_epochs) / len(member_epochs)
    delta_epoch = sum(delta_epochs) / len(delta_epochs)
    ratio = t_delta / t_member
    print(f"member: {args.arch}, {epochs} epochs, {t_member:.1f}s (train {sum(member_epochs):.1f}s + eval each epoch)")
    print(f"fit δ ({u.epochs} epochs, score {1 + len(d.targets)} sites): {t_delta:.1f}s -> ratio {ratio:.2f} "
          f"(bound 1.5) -> {'PASS' if ratio <= 1.5 else 'FAIL'}")
    print(f"fit δ + BayesCap + TTA noise/colour + MC dropout ({u.passes} passes): {t_all:.1f}s -> ratio "
          f"{t_all / t_member:.2f}")
    print(f"one δ training epoch / one member training epoch = {delta_epoch / member_epoch:.2f} "
          f"({delta_epoch:.2f}s / {member_epoch:.2f}s)")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
