"""Does the slice cache pay, and does preparing a dataset stay within memory? Measured in one run.

A synthetic CT set in the LiTS layout (``volume-N.nii.gz`` + ``segmentation-N.nii.gz``, int16 HU,
labels 0/1/2) of ``--cases`` volumes of ``--shape`` (default 10 x 256 x 256 x 200 = 2,000 slices):

* read throughput: random training samples (image + mask, float32) read from the slice cache's
  memory-mapped arrays, against what a trial would do without a cache: open the case's NIfTI,
  decode the one slice through nibabel's array proxy, window it and resize it (MONAI, as the cache
  does). Both the compressed ``.nii.gz`` files and uncompressed ``.nii`` copies (LiTS ships
  ``.nii``) are decoded; the ratios are cache / NIfTI samples per second. The bar: >= 10x.
* peak RSS of preparing the cache, measured inside a fresh child process (``ru_maxrss``), next to
  the same child's RSS after importing what preparation imports (torch, MONAI, nibabel), so the
  data's share is visible. ``--big`` adds a separate preparation of one 512 x 512 x 987 volume (the
  largest LiTS case) to check the < 4 GiB bound where it matters.

    python bench/cache.py [--cases 10] [--shape 256 256 200] [--image-size 256] [--samples 300] [--big]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainables.data.cache import DEFAULT_CT_WINDOW, open_slice_cache  # noqa: E402

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from trainables.data.cache import build_slice_cache
import monai.transforms, nibabel, torch  # what preparation imports, measured before the data
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
path = build_slice_cache("lits", {data!r}, ["LiTS"], {size}, {cache!r}, progress=False)
wall = time.perf_counter() - t
print(json.dumps({{"path": str(path), "wall_s": wall, "base_kib": base,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def write_ct_set(root: Path, n: int, shape: tuple[int, int, int], seed: int = 0, gz: bool = True) -> int:
    """``n`` smooth CT-like volumes (a body ellipse, a liver blob with a tumour), LiTS naming."""
    rng = np.random.default_rng(seed)
    h, w, d = shape
    yy, xx = np.mgrid[:h, :w]
    ext = ".nii.gz" if gz else ".nii"
    for i in range(n):
        body = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1
        liver = ((yy - 0.45 * h) / (0.18 * h)) ** 2 + ((xx - 0.4 * w) / (0.15 * w)) ** 2 < 1
        tumour = ((yy - 0.45 * h) / (0.04 * h)) ** 2 + ((xx - 0.4 * w) / (0.04 * w)) ** 2 < 1
        img = np.full((h, w, d), -1000, np.int16)
        seg = np.zeros((h, w, d), np.uint8)
        for z in range(d):
            sl = np.where(body, 40, -1000) + np.where(liver, 60, 0)
            img[:, :, z] = sl + rng.normal(0, 15, (h, w)).astype(np.int16)
            if d // 5 <= z < 4 * d // 5:
                seg[:, :, z] = np.where(tumour, 2, np.where(liver, 1, 0))
        aff = np.diag([0.7, 0.7, 2.5, 1.0])
        nib.save(nib.Nifti1Image(img, aff), str(root / f"volume-{i}{ext}"))
        nib.save(nib.Nifti1Image(seg, aff), str(root / f"segmentation-{i}{ext}"))
    return n * d


def prepare_in_child(data: Path, cache_root: Path, size: int) -> dict:
    code = CHILD.format(root=str(ROOT), data=str(data), cache=str(cache_root), size=size)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_cache(cache, idx: np.ndarray) -> float:
    t = time.perf_counter()
    for i in idx:
        x = np.asarray(cache.images[i], dtype=np.float32)
        y = np.asarray(cache.masks[i], dtype=np.float32)
        assert x.shape[-1] == y.shape[-1]
    return len(idx) / (time.perf_counter() - t)


def read_nifti(files: list[tuple[Path, Path]], samples: list[tuple[int, int]], size: int) -> float:
    from monai.transforms import Resize, ScaleIntensityRange

    scale = ScaleIntensityRange(*DEFAULT_CT_WINDOW, 0.0, 1.0, clip=True)
    rimg = Resize((size, size), mode="bilinear", align_corners=False)
    rmsk = Resize((size, size), mode="nearest")
    t = time.perf_counter()
    for case, z in samples:
        img_path, seg_path = files[case]
        x = np.asarray(nib.load(str(img_path)).dataobj[:, :, z], dtype=np.float32)[None]
        y = np.asarray(nib.load(str(seg_path)).dataobj[:, :, z], dtype=np.float32)[None]
        x = np.asarray(rimg(scale(x)))
        y = np.asarray(rmsk((y > 0).astype(np.float32)))
    return len(samples) / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 200])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=300, help="random samples timed per reader")
    ap.add_argument("--big", action="store_true", help="also prepare one 512 x 512 x 987 volume (peak RSS)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="oodsweep-bench-cache-") as tmp:
        tmp = Path(tmp)
        (tmp / "gz").mkdir()
        (tmp / "raw").mkdir()
        t = time.perf_counter()
        n_slices = write_ct_set(tmp / "gz", args.cases, tuple(args.shape))
        write_ct_set(tmp / "raw", args.cases, tuple(args.shape), gz=False)
        print(f"synthetic LiTS-layout set: {args.cases} volumes of {tuple(args.shape)} = {n_slices} slices "
              f"(written in {time.perf_counter() - t:.0f}s)", flush=True)
        prep = prepare_in_child(tmp / "gz", tmp / "cache", args.image_size)
        print(f"preparation: {prep['wall_s']:.1f}s, peak RSS {prep['peak_kib'] / 2**20:.2f} GiB "
              f"(of which {prep['base_kib'] / 2**20:.2f} GiB after imports, before any data)", flush=True)
        cache = open_slice_cache(prep["path"])
        assert len(cache.index) == n_slices
        idx = rng.integers(0, n_slices, args.samples)
        order = cache.index[["case_id", "slice_idx"]].to_numpy()
        samples = [(int(order[i, 0]), int(order[i, 1])) for i in idx]
        rates = {}
        for name, folder, ext in (("nii.gz", "gz", ".nii.gz"), ("nii", "raw", ".nii")):
            files = [(tmp / folder / f"volume-{i}{ext}", tmp / folder / f"segmentation-{i}{ext}")
                     for i in range(args.cases)]
            rates[name] = read_nifti(files, samples, args.image_size)
        rates["cache"] = read_cache(cache, idx)
        print(f"random training samples (image + mask, {args.image_size}x{args.image_size}), samples/s:")
        print(f"  slice cache (memory-mapped)          {rates['cache']:10.0f}")
        for name in ("nii.gz", "nii"):
            print(f"  NIfTI decoded per sample ({name:6s})   {rates[name]:10.1f}   cache is "
                  f"{rates['cache'] / rates[name]:.0f}x faster")
        ok = min(rates["cache"] / rates["nii.gz"], rates["cache"] / rates["nii"]) >= 10
        if args.big:
            (tmp / "big").mkdir()
            for p in (tmp / "raw").iterdir():  # free the disk the uncompressed copies took
                p.unlink()
            t = time.perf_counter()
            write_ct_set(tmp / "big", 1, (512, 512, 987), gz=False)
            print(f"one 512x512x987 volume written in {time.perf_counter() - t:.0f}s", flush=True)
            big = prepare_in_child(tmp / "big", tmp / "cache-big", args.image_size)
            gib = big["peak_kib"] / 2**20
            print(f"preparation of the 512x512x987 volume: {big['wall_s']:.1f}s, peak RSS {gib:.2f} GiB "
                  f"(bound: 4 GiB)")
            ok = ok and gib < 4
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
