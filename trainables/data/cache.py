"""The slice cache: preprocess a dataset once into memory-mappable arrays (DESIGN §5).

A cache is a folder ``<cache_root>/<key>/`` holding

* ``images.npy``  float16, ``N x C x S x S`` (C = 1 for MR), intensities in [0, 1]
* ``masks.npy``   uint8,   ``N x S x S`` in {0, 1}
* ``index.parquet`` one row per slice: site, case_id, slice_idx, split ("train" | "test")
* ``manifest.json`` what built it, per-site counts, the content hash of the arrays

``key`` hashes the layout, the sites, the image size, the split and a fingerprint of the input
files (relative path, size, modification time), so a changed dataset gets a new cache and every
trial and every sweep on the same data shares one. Building streams one case at a time (memory
is bounded by the largest case), writes into a temporary folder and renames it into place, so a
reader never sees a half-written cache and a failed build leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .layouts import DataError, get_layout

CACHE_VERSION = 1


def _file_fingerprint(paths: Sequence[Path], root: Path) -> list[tuple[str, int, int]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _combine(hi: "hashlib._Hash", hm: "hashlib._Hash") -> str:
    return hashlib.sha256((hi.hexdigest() + hm.hexdigest()).encode()).hexdigest()


def split_cases(case_ids: Sequence[str], site: str, seed: int = 0, test_fraction: float = 0.2) -> dict[str, str]:
    """Assign each case to "train" or "test": a fixed-seed permutation per site, 80/20 by default.

    At least one case goes to each split when the site has two or more cases.
    """
    ids = sorted(case_ids)
    rng = np.random.default_rng([seed, zlib.crc32(site.encode())])
    order = rng.permutation(len(ids))
    n_test = int(round(test_fraction * len(ids)))
    if len(ids) >= 2:
        n_test = min(max(n_test, 1), len(ids) - 1)
    test = {ids[i] for i in order[:n_test]}
    return {c: ("test" if c in test else "train") for c in ids}


def _preprocess(image: np.ndarray, mask: np.ndarray, modality: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``H x W x D`` volume -> (``D x 1 x S x S`` float16 image, ``D x S x S`` uint8 mask)."""
    from monai.transforms import Resize, ScaleIntensityRangePercentiles

    img = image[None].astype(np.float32)  # channel-first 1 x H x W x D for MONAI
    if modality == "mr":
        img = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(img)
    else:
        raise ValueError(f"modality {modality!r} has no preprocessing yet; known: mr")
    img = Resize(spatial_size=(size, size, -1), mode="bilinear", align_corners=False)(img)
    msk = Resize(spatial_size=(size, size, -1), mode="nearest")(mask[None].astype(np.float32))
    img = np.asarray(img, dtype=np.float32)[0]
    msk = np.asarray(msk)[0] > 0.5
    return (np.moveaxis(img, -1, 0)[:, None].astype(np.float16),
            np.moveaxis(msk, -1, 0).astype(np.uint8))


def cache_key(layout: str, root: Path, sites: Sequence[str], image_size: int, split_seed: int,
              test_fraction: float) -> tuple[str, dict]:
    lay = get_layout(layout)
    files: list[Path] = []
    for site in sites:
        for cf in lay.list_cases(root, site):
            files += [cf.image, cf.mask]
    ident = {"version": CACHE_VERSION, "layout": layout, "sites": list(sites), "image_size": int(image_size),
             "split_seed": int(split_seed), "test_fraction": float(test_fraction),
             "files": _file_fingerprint(files, root)}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{layout}-{image_size}-{key}", ident


def build_slice_cache(layout: str, root: str | os.PathLike, sites: Sequence[str], image_size: int,
                      cache_root: str | os.PathLike, split_seed: int = 0, test_fraction: float = 0.2,
                      skip_bad_cases: bool = False, progress: bool = True) -> Path:
    """Build (or find) the slice cache of ``sites`` under ``root``; return its folder.

    Every case is checked before anything is written; all problems are reported together in one
    ``DataError`` (or, with ``skip_bad_cases``, skipped with a warning and listed in the manifest).
    """
    root = Path(root).expanduser().resolve()
    cache_root = Path(cache_root).expanduser().resolve()
    lay = get_layout(layout)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; set data.root in the spec (or the environment "
                        f"variable it names) to the folder holding the {layout} sites")
    key, ident = cache_key(layout, root, sites, image_size, split_seed, test_fraction)
    final = cache_root / key
    if (final / "manifest.json").exists():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".build-{key}-"))
    try:
        chunks, rows, problems, skipped = [], [], [], []
        cases = [cf for site in sites for cf in lay.list_cases(root, site)]
        t0 = time.time()
        tty, step = sys.stderr.isatty(), max(1, len(cases) // 10)
        cr, end = ("\r", "") if tty else ("", "\n")
        for i, cf in enumerate(cases):
            try:
                case = lay.load_case(cf)
            except DataError as e:
                problems.append(str(e))
                skipped.append({"site": cf.site, "case_id": cf.case_id, "reason": str(e)})
                continue
            img, msk = _preprocess(case.image, case.mask, lay.modality, image_size)
            np.save(tmp / f"chunk{i:05d}_img.npy", img)
            np.save(tmp / f"chunk{i:05d}_msk.npy", msk)
            chunks.append(i)
            rows += [(cf.site, cf.case_id, z) for z in range(img.shape[0])]
            if progress and (tty or (i + 1) % step == 0 or i + 1 == len(cases)):
                print(f"{cr}[oodsweep] slice cache: {i + 1}/{len(cases)} cases ({time.time() - t0:.0f}s)",
                      end=end, file=sys.stderr, flush=True)
        if progress and tty:
            print(file=sys.stderr)
        if problems and not skip_bad_cases:
            raise DataError(f"{len(problems)} bad case(s) in {root} (nothing was cached; fix or remove them, "
                            f"or set data.skip_bad_cases: true):\n  - " + "\n  - ".join(problems))
        for p in problems:
            print(f"[oodsweep] WARNING skipped: {p}", file=sys.stderr)
        index = pd.DataFrame(rows, columns=["site", "case_id", "slice_idx"])
        if index.empty:
            raise DataError(f"no usable slices under {root} for sites {list(sites)}")
        split = {}
        for site, g in index.groupby("site"):
            split.update({(site, c): s for c, s in split_cases(g["case_id"].unique(), site, split_seed,
                                                                 test_fraction).items()})
        index["split"] = [split[(s, c)] for s, c in zip(index["site"], index["case_id"])]
        first = np.load(tmp / f"chunk{chunks[0]:05d}_img.npy", mmap_mode="r")
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.float16,
                                           shape=(len(index),) + first.shape[1:])
        masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(index), image_size, image_size))
        hi, hm = hashlib.sha256(), hashlib.sha256()
        pos = 0
        for i in chunks:
            ci, cm = np.load(tmp / f"chunk{i:05d}_img.npy"), np.load(tmp / f"chunk{i:05d}_msk.npy")
            images[pos:pos + len(ci)], masks[pos:pos + len(ci)] = ci, cm
            hi.update(ci.tobytes()), hm.update(cm.tobytes())
            pos += len(ci)
            (tmp / f"chunk{i:05d}_img.npy").unlink(), (tmp / f"chunk{i:05d}_msk.npy").unlink()
        images.flush(), masks.flush()
        del images, masks, first
        index.to_parquet(tmp / "index.parquet", index=False)
        counts = index.groupby(["site", "split"]).agg(cases=("case_id", "nunique"), slices=("slice_idx", "size"))
        manifest = {**{k: v for k, v in ident.items() if k != "files"}, "key": key, "root": str(root),
                    "modality": lay.modality, "n_slices": int(len(index)), "n_files": len(ident["files"]),
                    "counts": {f"{s}/{sp}": {"cases": int(r.cases), "slices": int(r.slices)}
                               for (s, sp), r in counts.iterrows()},
                    "content_sha256": _combine(hi, hm), "skipped": skipped, "created": time.time()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same cache first: theirs is identical
            if not (final / "manifest.json").exists():
                raise
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class SliceCache:
    """A built slice cache, memory-mapped."""

    path: Path
    images: np.ndarray  # N x C x S x S float16
    masks: np.ndarray   # N x S x S uint8
    index: pd.DataFrame
    manifest: dict

    def rows(self, site: str, split: str | None = None) -> np.ndarray:
        """Row numbers of ``site`` (optionally one split), ordered by case and slice."""
        sel = self.index["site"] == site
        if split is not None and split != "all":
            sel &= self.index["split"] == split
        idx = np.flatnonzero(sel.to_numpy())
        if len(idx) == 0:
            have = sorted(self.index["site"].unique())
            raise KeyError(f"no slices for site {site!r} split {split!r} in cache {self.path}; sites: {have}")
        return idx

    def verify(self) -> None:
        """Recompute the content hash (slow on big caches; tests and `data check` use it)."""
        hi, hm = hashlib.sha256(), hashlib.sha256()
        for i in range(0, len(self.images), 1024):  # bounded memory on big caches
            hi.update(np.ascontiguousarray(self.images[i:i + 1024]).tobytes())
            hm.update(np.ascontiguousarray(self.masks[i:i + 1024]).tobytes())
        if _combine(hi, hm) != self.manifest["content_sha256"]:
            raise DataError(f"slice cache {self.path} is corrupt (content hash mismatch); delete the folder "
                            f"and it will be rebuilt")


def open_slice_cache(path: str | os.PathLike) -> SliceCache:
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.exists():
        raise FileNotFoundError(f"{path} is not a slice cache (no manifest.json); build it with "
                                f"`oodsweep data prepare SPEC` or by running the sweep")
    return SliceCache(path=path, images=np.load(path / "images.npy", mmap_mode="r"),
                      masks=np.load(path / "masks.npy", mmap_mode="r"),
                      index=pd.read_parquet(path / "index.parquet"), manifest=json.loads(mf.read_text()))
