"""How much memory does ranking one member's error pixels take on a large split? Exact (sklearn) against binned.

Each mode runs in a child process of its own, which builds one method's uncertainty maps (float32) and the
member's error masks for ``--slices`` slices of ``--size`` squared pixels, as ``score_member`` holds them for
one site, then scores them with ``trainables.uncertainty.scoring.error_ranking`` (``scoring`` exact or binned,
on ``--device``). Printed per mode: the child's peak RSS, the RSS before scoring (the interpreter, torch and the maps and masks), the
difference (what the scoring itself added), the wall time, and AUROC / AP with the binned path's difference
from the exact one. The maps are variance-like: a near-zero background with a ring of high values at an
ellipse's edge, where most errors are.

    python bench/scoring_memory.py                       # the full size: 10,000 slices of 256²
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
from bench.scoring_memory import address_space_kib, make_split
from trainables.uncertainty.scoring import error_ranking
maps, error = make_split({slices}, {size})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {limit_kib}:  # what scoring may map beyond what is mapped now: over it, an allocation fails (MemoryError)
    resource.setrlimit(resource.RLIMIT_AS, ((address_space_kib() + {limit_kib}) * 1024, resource.RLIM_INFINITY))
t = time.perf_counter()
try:
    auroc, ap = error_ranking(maps, error, {mode!r}, {device!r})
    failed = None
except MemoryError as e:
    auroc = ap = float("nan")
    failed = f"MemoryError: {{e}}"[:200]
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps(dict(auroc=auroc, ap=ap, wall=wall, data_kib=before, peak_kib=peak, failed=failed)))
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


def _status_kib(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def address_space_kib() -> int:
    """This process's virtual address space now (KiB): the child's cap is set above what is mapped already."""
    return _status_kib("/proc/self/status", "VmSize")


def run_child(mode: str, slices: int, size: int, device: str, limit_gib: float = 0) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    code = CHILD.format(root=root, slices=slices, size=size, mode=mode, device=device,
                        limit_kib=int(limit_gib * (1 << 20)))
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
    ap.add_argument("--headroom-gib", type=float, default=None,
                    help="what scoring may map on top of the maps and masks (default: the memory available now, "
                         "less the maps and masks and 2 GiB); over it the child reports a MemoryError instead of "
                         "being killed by the kernel")
    args = ap.parse_args()
    gib = 1 / (1 << 20)  # ru_maxrss is in KiB on Linux
    px = args.slices * args.size ** 2
    headroom = args.headroom_gib
    if headroom is None:
        headroom = _status_kib("/proc/meminfo", "MemAvailable") * gib - px * 5 / 2**30 - 2
    print(f"one method's maps on {args.slices} slices of {args.size}x{args.size} ({px / 1e6:.0f} M pixels); scoring "
          f"may add {headroom:.1f} GiB of address space", flush=True)
    res = {}
    for mode in ("exact", "binned"):
        r = res[mode] = run_child(mode, args.slices, args.size, args.device if mode == "binned" else "cpu",
                                  max(headroom, 0.5))
        what = (f"FAILED after {r['wall']:.1f} s: over the {headroom:.1f} GiB it may add ({r['failed']})"
                if r["failed"] else f"in {r['wall']:6.1f} s; AUROC {r['auroc']:.5f}, AP {r['ap']:.5f}")
        print(f"{mode:6s}: peak RSS {r['peak_kib'] * gib:6.2f} GiB (before scoring {r['data_kib'] * gib:5.2f} GiB, "
              f"scoring added {(r['peak_kib'] - r['data_kib']) * gib:5.2f} GiB) {what}", flush=True)
    e, b = res["exact"], res["binned"]
    if e["failed"] or b["failed"]:
        print("no difference to report: a mode did not finish (run a smaller --slices for the binned - exact numbers)")
        return 0 if not b["failed"] else 1
    print(f"binned - exact: AUROC {b['auroc'] - e['auroc']:+.2e}, AP {b['ap'] - e['ap']:+.2e}; peak RSS ratio "
          f"binned / exact {b['peak_kib'] / e['peak_kib']:.2f}; scoring's own memory ratio "
          f"{(b['peak_kib'] - b['data_kib']) / max(1, e['peak_kib'] - e['data_kib']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
