"""How much memory does ranking one member's error pixels take on a large split? Exact (sklearn) against binned.

Each mode runs in a child process of its own, which builds one method's uncertainty maps (float32) and the
member's error masks for ``--slices`` slices of ``--size`` squared pixels, as ``score_member`` holds them for
one site, then scores them with ``trainables.uncertainty.scoring.error_ranking`` (``scoring`` exact or binned,
on ``--device``). Printed per mode: the child's peak RSS, the RSS before scoring (the interpreter, torch and the maps and masks), the
difference (what the scoring itself added), the wall time, and AUROC / AP with the binned path's difference
from the exact one. The maps are variance-like: a near-zero background with a ring of high values at an
ellipse's edge, where most errors are.

    python bench/scoring_memory.py                       # the full size: 10,000 slices of 256² (needs ~25 GB)
    python bench/scoring_memory.py --slices 500 --size 128   # a quick check
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from bench.scoring_memory import make_split
from trainables.uncertainty.scoring import error_ranking
maps, error = make_split({slices}, {size})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
auroc, ap = error_ranking(maps, error, {mode!r}, {device!r})
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps(dict(auroc=auroc, ap=ap, wall=wall, data_kib=before, peak_kib=peak)))
"""


def make_split(slices: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``slices x size x size`` float32 maps and bool error masks, built a chunk of slices at a time."""
    rng = np.random.default_rng(seed)
    maps = np.empty((slices, size, size), dtype=np.float32)
    error = np.empty((slices, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    for i in range(0, slices, 64):
        n = min(64, slices - i)
        cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1)).astype(np.float32)
        r = rng.uniform(0.05, 0.25, (n, 1, 1)).astype(np.float32)
        d = np.abs(np.hypot(yy - cy, xx - cx) - r) * size
        maps[i:i + n] = np.exp(-d) * rng.lognormal(0, 1, (n, 1, 1)) + rng.exponential(1e-4, d.shape)
        error[i:i + n] = ((d < rng.uniform(0.5, 2.5, (n, 1, 1))) & (rng.random(d.shape) < 0.7)) \
            | (rng.random(d.shape) < 0.002)
    return maps, error


def run_child(mode: str, slices: int, size: int, device: str) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    code = CHILD.format(root=root, slices=slices, size=size, mode=mode, device=device)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not line:
        raise SystemExit(f"{mode} child failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="the binned path's device (cuda on a GPU machine)")
    args = ap.parse_args()
    gib = 1 / (1 << 20)  # ru_maxrss is in KiB on Linux
    px = args.slices * args.size ** 2
    print(f"one method's maps on {args.slices} slices of {args.size}x{args.size} ({px / 1e6:.0f} M pixels)", flush=True)
    res = {}
    for mode in ("exact", "binned"):
        r = res[mode] = run_child(mode, args.slices, args.size, args.device if mode == "binned" else "cpu")
        print(f"{mode:6s}: peak RSS {r['peak_kib'] * gib:6.2f} GiB (before scoring {r['data_kib'] * gib:5.2f} GiB, "
              f"scoring added {(r['peak_kib'] - r['data_kib']) * gib:5.2f} GiB) in {r['wall']:6.1f} s; "
              f"AUROC {r['auroc']:.5f}, AP {r['ap']:.5f}", flush=True)
    e, b = res["exact"], res["binned"]
    print(f"binned - exact: AUROC {b['auroc'] - e['auroc']:+.2e}, AP {b['ap'] - e['ap']:+.2e}; peak RSS ratio "
          f"binned / exact {b['peak_kib'] / e['peak_kib']:.2f}; scoring's own memory ratio "
          f"{(b['peak_kib'] - b['data_kib']) / max(1, e['peak_kib'] - e['data_kib']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
