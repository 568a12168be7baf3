"""Where a demo-size pool epoch spends its time on the CPU (cProfile).

Builds the demo's data (``sweeps/presets/demo.yaml``: four synthetic sites, 64² slices), then runs
``train_segmenter`` as a demo trial does (1 thread, batch 8, DiceCE + Adam, the source test split
and three targets scored after every epoch, a pool member written at a snapshot epoch) for
``1 + --epochs`` epochs. The first epoch is warm-up; the profiler runs from the end of epoch 1 to the
end of the last, which is a snapshot (as one epoch in three is in the demo: snapshots 3 and 6).

The profile is split, from cProfile's caller/callee table, into

* forward: the model's (and the loss module's) calls from ``train_epoch``, and the model's calls
  from evaluation (``trainables.dense._forward``);
* backward and optimizer step: everything ``Accel.step`` calls (``zero_grad``, ``backward``, ``step``);
* the rest: batching, transfers, augmentation, confusion counts, per-epoch metrics, member files,
  checkpoints, reporting.

Goal: the rest is below 15% of the epoch. The same epochs are also timed without the
profiler, to show its overhead. Prints the top functions of "the rest" so a regression is findable.

    python bench/profile_epoch.py [--arch unet_r18] [--epochs 3] [--threads 1] [--top 12]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sweeps.driver import prepare_data  # noqa: E402
from sweeps.spec import load_spec  # noqa: E402
from trainables.segment import train_segmenter  # noqa: E402

GOAL = 0.15


def _key_is(func: tuple, file_end: str, name: str) -> bool:
    return func[0].replace("\\", "/").endswith(file_end) and func[2] == name


def _find(stats: dict, file_end: str, name: str) -> list[tuple]:
    return [f for f in stats if _key_is(f, file_end, name)]


def _from(stats: dict, caller: tuple, callee_pred) -> float:
    """Cumulative time of ``caller``'s calls into callees matching ``callee_pred``."""
    total = 0.0
    for func, (_, _, _, _, callers) in stats.items():
        if callee_pred(func) and caller in callers:
            total += callers[caller][3]
    return total


def split(stats: dict) -> dict[str, float]:
    """forward / backward+step / window (s) from a pstats table (see the module doc)."""
    train_epoch = _find(stats, "trainables/dense.py", "train_epoch")
    fwd_eval = _find(stats, "trainables/dense.py", "_forward")
    step = _find(stats, "trainables/accel.py", "step")
    is_call = lambda f: f[2] in ("_wrapped_call_impl", "_call_impl")  # noqa: E731
    forward = sum(_from(stats, c, is_call) for c in train_epoch + fwd_eval)
    bwd_step = sum(stats[s][3] for s in step)
    return {"forward": forward, "backward_step": bwd_step}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="unet_r18", help="a demo architecture (default unet_r18)")
    ap.add_argument("--epochs", type=int, default=3, help="profiled epochs after the warm-up one (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a demo trial has 1 CPU)")
    ap.add_argument("--top", type=int, default=12, help="functions of 'the rest' to list")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="oodsweep-profile-"))
    try:
        os.environ.update(OODSWEEP_STORAGE=str(tmp / "runs"), OODSWEEP_DATA=str(tmp / "data"))
        spec = load_spec(ROOT / "sweeps" / "presets" / "demo.yaml")
        cache = prepare_data(spec, progress=False)
        last = 1 + args.epochs
        cfg = {"arch": args.arch, "lr": 1e-3, "seed": 0, "cache": str(cache), "source": spec.data.source,
               "targets": list(spec.data.targets), "batch_size": spec.pool.batch_size, "snapshots": [last],
               "num_threads": args.threads, "device": "cpu"}

        def run(tag: str, profile: bool) -> tuple[float, pstats.Stats | None, list[dict]]:
            prof = cProfile.Profile()
            marks: list[float] = []
            metrics: list[dict] = []

            def report(m: dict, ckpt_dir: str | None) -> None:
                if ckpt_dir:
                    shutil.rmtree(ckpt_dir, ignore_errors=True)
                metrics.append(m)
                if m["epoch"] == last and profile:
                    prof.disable()
                marks.append(time.perf_counter())
                if m["epoch"] == 1 and profile:
                    prof.enable()

            exp = tmp / f"exp-{tag}"
            exp.mkdir()
            train_segmenter({**cfg, "experiment_dir": str(exp)}, report=report)
            return marks[-1] - marks[0], (pstats.Stats(prof) if profile else None), metrics

        wall_plain, _, metrics = run("plain", profile=False)
        wall_prof, st, _ = run("profiled", profile=True)
        stats = st.stats  # type: ignore[attr-defined]
        parts = split(stats)
        window = sum(tt for (_, _, tt, _, _) in stats.values())  # every profiled second, once
        compute = parts["forward"] + parts["backward_step"]
        rest = window - compute
        print(f"# profile of {args.epochs} demo-size epochs of {args.arch} (epochs 2..{last}, member written at "
              f"epoch {last}), {args.threads} thread(s), torch {torch.__version__}")
        print(f"epoch wall time without the profiler: {wall_plain / args.epochs:.3f} s "
              f"(train {sum(m['train_seconds'] for m in metrics[1:]) / args.epochs:.3f} s, "
              f"eval {sum(m['eval_seconds'] for m in metrics[1:]) / args.epochs:.3f} s); "
              f"with it: {wall_prof / args.epochs:.3f} s (profiler overhead {wall_prof / wall_plain - 1:+.0%})")
        print(f"forward (model + loss, train and eval)  {parts['forward']:8.3f} s  {parts['forward'] / window:6.1%}")
        print(f"backward + optimizer step               {parts['backward_step']:8.3f} s  "
              f"{parts['backward_step'] / window:6.1%}")
        print(f"the rest (data, metrics, records, ...)  {rest:8.3f} s  {rest / window:6.1%}")
        print(f"profiled total                          {window:8.3f} s")
        print(f"\n# the rest, by function (cumulative time of the trainables' own calls, excluding the compute):")
        ours = [f for f in stats if "/trainables/" in f[0].replace("\\", "/")]
        rows = []
        for f in ours:
            if f[2] in ("train_segmenter", "train_epoch", "_forward", "step", "evaluate", "predict", "batches"):
                continue
            rows.append((stats[f][3], f))
        for ct, f in sorted(rows, reverse=True)[: args.top]:
            print(f"  {ct:7.3f} s  {ct / window:6.1%}  {Path(f[0]).name}:{f[1]} {f[2]}")
        verdict = "PASS" if rest / window < GOAL else "FAIL"
        print(f"\ntime outside forward/backward/step: {rest / window:.1%} of the epoch (goal < {GOAL:.0%}): {verdict}")
        return 0 if verdict == "PASS" else 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
