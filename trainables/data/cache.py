"""The slice cache: preprocess a dataset once into memory-mappable arrays (docs/architecture.md "Models and data").

A cache is a folder ``<cache_root>/<key>/`` holding

* ``images.npy``  float16, ``N x C x S x S`` (C = 1 for MR and CT, 3 for fundus RGB), in [0, 1]
* ``masks.npy``   uint8 in {0, 1}: ``N x S x S`` for one label, ``N x L x S x S`` for L > 1 labels
  (the fundus lesions; channel order in the manifest's ``labels``)
* ``index.parquet`` one row per slice: site, case_id, slice_idx, split ("train" | "test") and
  spacing_h, spacing_w, spacing_d: the cache grid's voxel size in mm (:data:`SPACING_COLUMNS`)
* ``manifest.json`` what built it, per-site counts, the content hash of the arrays

Preprocessing per modality: MR clipped to its 0.5/99.5 percentiles (per volume), CT windowed
(default [-160, 240] HU, the liver window), fundus photographs kept RGB; all rescaled to [0, 1]
and resized to ``S x S`` (bilinear; masks nearest). 3D volumes become 2D slices along their last
axis; a 2D photograph is one slice. Each row keeps its case and slice index, so predictions merge
back into volumes (:meth:`SliceCache.case_volume`).

Split (``trainables.data.splits``): the dataset's own where the layout gives one (IDRiD's training/testing
sets), else 80/20 by case with a fixed seed (``split="random"`` forces the latter everywhere); synthetic
sites all take the source's case split (the same anatomies: a target is tested on the source's test ones).

``key`` hashes the sites (each with its layout and root), the image size, the labels, the CT
window, the split and a fingerprint of the input files (relative path, size, modification time),
so a changed dataset gets a new cache and every trial and every sweep on the same data shares one.
Building streams one case at a time and each case slab by slab (memory is bounded by the largest
case as read, e.g. ~1.5 GB for a 512 x 512 x 987 LiTS volume), writes into a temporary folder and
renames it into place, so a reader never sees a half-written cache and a failed build leaves nothing
behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .base import CaseFiles, DataError, summarize_problems
from .channels import scale_channels
from .labelmap import cache_label_kind
from .layouts import CONFIGURED, configured_ident, get_layout, site_layout
from .progress import Progress
from .splits import assign_splits, paired_source, split_cases

CACHE_VERSION = 3  # 3: index.parquet has the spacing columns (images and masks as in 2)
#: The cache grid's voxel size per slice row: the native spacing x native size / S in-plane, the native
#: spacing along depth (never resampled); 1.0 where the header has none (photographs: native pixels).
SPACING_COLUMNS = ("spacing_h", "spacing_w", "spacing_d")
#: The liver window (HU) CT volumes are clipped to unless the spec gives another.
DEFAULT_CT_WINDOW = (-160.0, 240.0)
#: Slices preprocessed at a time (bounded temporaries on big volumes).
SLAB = 32
SPLIT_MODES = ("dataset", "random")


def _file_fingerprint(cases: Sequence[CaseFiles], roots: Mapping[str, Path]) -> list[tuple[str, str, int, int]]:
    out = []
    for cf in cases:
        for p in cf.paths():
            st = p.stat()
            out.append((cf.site, str(p.relative_to(roots[cf.site])), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _combine(hi: "hashlib._Hash", hm: "hashlib._Hash") -> str:
    return hashlib.sha256((hi.hexdigest() + hm.hexdigest()).encode()).hexdigest()


def _intensity_range(image: np.ndarray, modality: str, window: tuple[float, float] | None) -> tuple[float, float]:
    if modality == "mr":  # the volume's 0.5/99.5 percentiles, as MONAI's ScaleIntensityRangePercentiles
        lo, hi = np.percentile(image, [0.5, 99.5])
        return float(lo), float(hi)
    if modality == "ct":
        return tuple(float(v) for v in (window or DEFAULT_CT_WINDOW))  # type: ignore[return-value]
    if modality == "fundus":
        return 0.0, 255.0
    raise ValueError(f"modality {modality!r} has no preprocessing; known: mr, ct, fundus")


def preprocess_case(image: np.ndarray, mask: np.ndarray, modality: str, size: int,
                    window: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A case's arrays -> its cache rows.

    Args:
        image: ``H x W x D`` or ``H x W x D x C`` raw intensities.
        mask: ``H x W x D`` or ``H x W x D x L`` in {0, 1}.
        modality: ``"mr"`` (clip to the 0.5/99.5 percentiles), ``"ct"`` (clip to ``window``,
            default :data:`DEFAULT_CT_WINDOW`) or ``"fundus"`` (0..255); then scaled to [0, 1].
        size: output side ``S``.
        window: CT window in HU.

    Returns:
        ``D x C x S x S`` float16 image rows and ``D x S x S`` (one label) or ``D x L x S x S``
        uint8 mask rows. Slabs of :data:`SLAB` slices are processed at a time; depth is never
        resampled, so slab by slab equals the whole volume at once.
    """
    from monai.transforms import Resize, ScaleIntensityRange

    img = image if image.ndim == 4 else image[..., None]  # H x W x D x C
    msk = mask if mask.ndim == 4 else mask[..., None]     # H x W x D x L
    lo, hi = _intensity_range(img, modality, window)
    scale = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    # big down-sampling factors (fundus photographs of 4288 px) alias without smoothing first
    resize_img = Resize(spatial_size=(size, size, -1), mode="bilinear", align_corners=False,
                        anti_aliasing=modality == "fundus")
    depth, n_ch = img.shape[2], img.shape[3]
    out_img = np.empty((depth, n_ch, size, size), np.float16)
    for z in range(0, depth, SLAB):
        slab = np.moveaxis(img[:, :, z:z + SLAB, :], -1, 0).astype(np.float32)  # C x H x W x d (MONAI)
        slab = np.asarray(resize_img(scale(slab)), dtype=np.float32)
        out_img[z:z + SLAB] = np.moveaxis(slab, -1, 0)
    return out_img, resize_masks(msk, size)


def resize_masks(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary masks onto the cache's ``S x S`` grid, as every cached ground truth is (MONAI ``Resize``,
    nearest neighbour; depth is never resampled). Predicted masks imported from elsewhere
    (``oodsweep import``) go through this same function, so they land on the ground truth's pixels.

    Args:
        mask: ``H x W x D`` or ``H x W x D x L`` in {0, 1}.
        size: output side ``S``.

    Returns:
        ``D x S x S`` (one label) or ``D x L x S x S`` uint8 in {0, 1}, slab by slab (:data:`SLAB`).
    """
    from monai.transforms import Resize

    msk = mask if mask.ndim == 4 else mask[..., None]     # H x W x D x L
    resize_msk = Resize(spatial_size=(size, size, -1), mode="nearest")
    depth, n_lab = msk.shape[2], msk.shape[3]
    out_msk = np.empty((depth, n_lab, size, size), np.uint8)
    for z in range(0, depth, SLAB):
        mslab = np.moveaxis(msk[:, :, z:z + SLAB, :], -1, 0).astype(np.float32)
        out_msk[z:z + SLAB] = np.moveaxis(np.asarray(resize_msk(mslab)) > 0.5, -1, 0)
    return out_msk[:, 0] if n_lab == 1 else out_msk


#: A site's data: (layout name, root folder).
SiteSource = tuple[str, Path]


def resolve_sources(layout: str, root: str | os.PathLike | None, sites: Sequence[str],
                    site_sources: Mapping[str, tuple[str, str | os.PathLike]] | None = None) -> dict[str, SiteSource]:
    """Site -> (layout, absolute root): ``site_sources`` where it names the site, else ``(layout, root)``."""
    out: dict[str, SiteSource] = {}
    for site in sites:
        lay, r = (site_sources or {}).get(site, (layout, root))
        if r is None:
            raise DataError(f"site {site!r} has no data root: give data.root, or data.sites.{site}.root")
        get_layout(lay)
        out[site] = (lay, Path(r).expanduser().resolve())
    return out


def _labels_for(sources: Mapping[str, SiteSource], labels: Sequence[str] | None,
                options: Mapping | None = None) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
    """(modality, the layouts' label names, indices of the chosen labels); all sites must agree."""
    if options and not any(lay in CONFIGURED for lay, _ in sources.values()):
        raise DataError(f"data.{sorted(options)[0]} applies to the layouts {sorted(CONFIGURED)} only; remove it")
    lays = {site: site_layout(lay, r, options) for site, (lay, r) in sources.items()}
    modalities = {lay.modality for lay in lays.values()}
    names = {tuple(lay.labels) for lay in lays.values()}
    if len(modalities) > 1 or len(names) > 1:
        raise DataError("sites of one cache must share a modality and labels; got "
                        + ", ".join(f"{s}: {lay.name} ({lay.modality}, labels {list(lay.labels)})"
                                    for s, lay in lays.items()))
    all_labels = next(iter(names))
    if labels is None:
        return next(iter(modalities)), all_labels, tuple(range(len(all_labels)))
    bad = [x for x in labels if x not in all_labels]
    if bad or not labels or len(set(labels)) != len(labels):
        raise DataError(f"labels {list(labels)}: each must be one of {list(all_labels)}, once")
    return next(iter(modalities)), all_labels, tuple(all_labels.index(x) for x in labels)


def scan_sources(sources: Mapping[str, SiteSource],
                 options: Mapping | None = None) -> tuple[list[CaseFiles], list[dict]]:
    """Every site's well-paired cases, and the pairing problems as skipped entries (site, case_id, reason)."""
    cases, problems = [], []
    for site, (lay, root) in sources.items():
        if not root.is_dir():
            raise DataError(f"data root {root} of site {site!r} does not exist; set data.root (or data.sites."
                            f"{site}.root, or the environment variable the spec names) to the folder holding "
                            f"the {lay} data")
        found, probs = site_layout(lay, root, options).scan_cases(root, site)
        cases += found
        # a pairing problem has no case yet: its entry names the file the message starts with
        problems += [{"site": site, "case_id": Path(p.split(": ")[0]).name, "reason": p} for p in probs]
    return cases, problems


def cache_key(layout: str, root: Path | None, sites: Sequence[str], image_size: int, split_seed: int,
              test_fraction: float, *, site_sources: Mapping[str, tuple[str, str | os.PathLike]] | None = None,
              labels: Sequence[str] | None = None, window: tuple[float, float] | None = None,
              split: str = "dataset", cases: Sequence[CaseFiles] | None = None,
              layout_options: Mapping | None = None) -> tuple[str, dict]:
    """The cache folder name and the identity it hashes (see the module docstring)."""
    sources = resolve_sources(layout, root, sites, site_sources)
    modality, all_labels, chosen = _labels_for(sources, labels, layout_options)
    if cases is None:
        cases, _ = scan_sources(sources, layout_options)
    layouts = sorted({lay for lay, _ in sources.values()})
    ident = {"version": CACHE_VERSION, "layout": layouts[0] if len(layouts) == 1 else layouts,
             "sites": list(sites), "sources": {s: lay for s, (lay, _) in sources.items()},
             "image_size": int(image_size), "split_seed": int(split_seed), "test_fraction": float(test_fraction),
             "split": split, "modality": modality, "labels": [all_labels[i] for i in chosen],
             "window": list(window or DEFAULT_CT_WINDOW) if modality == "ct" else None,
             "files": _file_fingerprint(cases, {s: r for s, (_, r) in sources.items()})}
    if any(lay in CONFIGURED for lay, _ in sources.values()):  # only these: the fixed layouts' keys stay as they were
        ident.update(configured_ident(sources, layout_options))
    if paired_source(sources, sites):  # only then: the other caches' keys stay as they were
        ident["split_like"] = sites[0]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{'+'.join(layouts)}-{image_size}-{key}", ident


def build_slice_cache(layout: str, root: str | os.PathLike | None, sites: Sequence[str], image_size: int,
                      cache_root: str | os.PathLike, split_seed: int = 0, test_fraction: float = 0.2,
                      skip_bad_cases: bool = False, progress: bool = True, *,
                      site_sources: Mapping[str, tuple[str, str | os.PathLike]] | None = None,
                      labels: Sequence[str] | None = None, window: tuple[float, float] | None = None,
                      split: str = "dataset", layout_options: Mapping | None = None) -> Path:
    """Build (or find) the slice cache of ``sites``; return its folder.

    Args:
        layout, root: the layout and data root of every site not in ``site_sources``.
        sites: site names, source first.
        image_size: side ``S`` of the cached slices.
        cache_root: folder holding the caches.
        split_seed, test_fraction: the 80/20-by-case split of sites without a split of their own.
        skip_bad_cases: skip bad cases with a warning (listed in the manifest) instead of failing.
        progress: draw a progress bar on stderr.
        site_sources: site -> (layout, root) for sites stored elsewhere (e.g. IDRiD and FGADR).
        labels: the label channels to keep (fundus: a subset of MA, HE, EX, SE); None keeps all.
        window: CT window in HU (default :data:`DEFAULT_CT_WINDOW`).
        split: ``"dataset"`` (the release's own split where it has one) or ``"random"``.
        layout_options: the spec's options of the configured layouts (``sites_from``, ``channels``,
            ``labels``, ``label_values``, ``pixel_spacing``).

    Every case is checked before anything is kept; all problems are reported together in one
    ``DataError`` (or, with ``skip_bad_cases``, skipped with a warning and listed in the manifest).
    """
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
    sources = resolve_sources(layout, root, sites, site_sources)
    for site, (lay, r) in sources.items():
        if not r.is_dir():
            raise DataError(f"data root {r} does not exist; set data.root in the spec (or the environment "
                            f"variable it names) to the folder holding the {lay} sites")
    cache_root = Path(cache_root).expanduser().resolve()
    modality, _, chosen = _labels_for(sources, labels, layout_options)
    lays = {s: site_layout(lay, r, layout_options) for s, (lay, r) in sources.items()}
    cases, problems = scan_sources(sources, layout_options)
    key, ident = cache_key(layout, root, sites, image_size, split_seed, test_fraction, site_sources=site_sources,
                           labels=labels, window=window, split=split, cases=cases, layout_options=layout_options)
    final = cache_root / key
    if (final / "manifest.json").exists():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".build-{key}-"))
    try:
        chunks, rows, skipped, warnings, n_channels = [], [], list(problems), [], 0
        case_split: dict[tuple[str, str], str | None] = {}
        bar = Progress(len(cases), progress)
        for i, cf in enumerate(cases):
            try:
                case = lays[cf.site].load_case(cf)
            except DataError as e:
                skipped.append({"site": cf.site, "case_id": cf.case_id, "reason": str(e)})
                continue
            warnings += list(case.warnings)
            mask = case.mask if case.mask.ndim == 3 else case.mask[..., list(chosen)]
            grid = tuple(float(sp) * n / image_size for sp, n in zip(case.spacing[:2], case.image.shape[:2]))
            grid += (float(case.spacing[2]),)
            if case.channel_norms is None:
                img, msk = preprocess_case(case.image, mask, modality, image_size, window)
            else:  # the configured layouts: each channel scaled on its own (trainables.data.channels)
                img = scale_channels(case.image, case.channel_norms, image_size, window or DEFAULT_CT_WINDOW,
                                     anti_aliasing=modality == "image", slab=SLAB)
                msk = resize_masks(mask, image_size)
                if chunks and img.shape[1] != n_channels:
                    raise DataError(f"{case.image_path}: {img.shape[1]} image channel(s), but the cases before it "
                                    f"have {n_channels}; convert it (e.g. to RGB or grayscale like the others)")
                n_channels = img.shape[1]
            del case, mask
            np.save(tmp / f"chunk{i:05d}_img.npy", img)
            np.save(tmp / f"chunk{i:05d}_msk.npy", msk)
            chunks.append(i)
            rows += [(cf.site, cf.case_id, z, *grid) for z in range(img.shape[0])]
            case_split[(cf.site, cf.case_id)] = cf.split
            bar.update(i + 1, len(rows))
        bar.close()
        if skipped and not skip_bad_cases:
            raise DataError(f"{len(skipped)} bad case(s) under {sorted({str(r) for _, r in sources.values()})} "
                            f"(nothing was cached; fix or remove them, or set data.skip_bad_cases: true):\n  - "
                            + "\n  - ".join(summarize_problems([s["reason"] for s in skipped])))
        for line in summarize_problems([s["reason"] for s in skipped]):
            print(f"[oodsweep] WARNING skipped: {line}", file=sys.stderr)
        for w in warnings:
            print(f"[oodsweep] WARNING: {w}", file=sys.stderr)
        index = pd.DataFrame(rows, columns=["site", "case_id", "slice_idx", *SPACING_COLUMNS])
        if index.empty:
            raise DataError(f"no usable slices for sites {list(sites)}")
        site_cases = {site: list(g["case_id"].unique()) for site, g in index.groupby("site", sort=False)}
        split_of, split_source = assign_splits(site_cases, case_split, split, split_seed, test_fraction,
                                               paired=paired_source(sources, sites))
        index["split"] = [split_of[(s, c)] for s, c in zip(index["site"], index["case_id"])]
        first = np.load(tmp / f"chunk{chunks[0]:05d}_img.npy", mmap_mode="r")
        first_m = np.load(tmp / f"chunk{chunks[0]:05d}_msk.npy", mmap_mode="r")
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.float16,
                                           shape=(len(index),) + first.shape[1:])
        masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(index),) + first_m.shape[1:])
        del first, first_m
        hi, hm = hashlib.sha256(), hashlib.sha256()
        pos = 0
        for i in chunks:  # one case at a time: bounded memory
            ci, cm = np.load(tmp / f"chunk{i:05d}_img.npy"), np.load(tmp / f"chunk{i:05d}_msk.npy")
            images[pos:pos + len(ci)], masks[pos:pos + len(ci)] = ci, cm
            hi.update(ci.tobytes()), hm.update(cm.tobytes())
            pos += len(ci)
            (tmp / f"chunk{i:05d}_img.npy").unlink(), (tmp / f"chunk{i:05d}_msk.npy").unlink()
        images.flush(), masks.flush()
        del images, masks
        index.to_parquet(tmp / "index.parquet", index=False)
        counts = index.groupby(["site", "split"]).agg(cases=("case_id", "nunique"), slices=("slice_idx", "size"))
        manifest = {**{k: v for k, v in ident.items() if k != "files"}, "key": key,
                    "root": str(sources[sites[0]][1]), "roots": {s: str(r) for s, (_, r) in sources.items()},
                    "n_slices": int(len(index)), "n_files": len(ident["files"]), "split_source": split_source,
                    "counts": {f"{s}/{sp}": {"cases": int(r.cases), "slices": int(r.slices)}
                               for (s, sp), r in counts.iterrows()},
                    "content_sha256": _combine(hi, hm), "skipped": skipped, "warnings": warnings,
                    "label_kind": cache_label_kind(list(lays.values()), len(ident["labels"])),
                    "created": time.time()}
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
    masks: np.ndarray   # N x S x S uint8 (one label) or N x L x S x S (L labels)
    index: pd.DataFrame
    manifest: dict

    @property
    def labels(self) -> list[str]:
        """Names of the mask channels (one for a binary task)."""
        return list(self.manifest.get("labels") or ["foreground"])

    def case_volume(self, site: str, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """A case's slices merged back into a volume, in slice order.

        Returns:
            ``(image, mask)``: ``S x S x D`` (``S x S x D x C`` for C > 1) float32 and
            ``S x S x D`` (``S x S x D x L`` for L > 1) uint8, i.e. the layout's ``Case`` axes.
        """
        sel = (self.index["site"] == site) & (self.index["case_id"] == case_id)
        rows = np.flatnonzero(sel.to_numpy())
        if len(rows) == 0:
            raise KeyError(f"no slices for case {case_id!r} of site {site!r} in cache {self.path}")
        rows = rows[np.argsort(self.index["slice_idx"].to_numpy()[rows], kind="stable")]
        img = np.moveaxis(np.asarray(self.images[rows], dtype=np.float32), 0, -1)  # C x S x S x D
        img = np.moveaxis(img, 0, -1)                                               # S x S x D x C
        msk = np.asarray(self.masks[rows])
        msk = np.moveaxis(msk, 0, -1) if msk.ndim == 3 else np.moveaxis(np.moveaxis(msk, 0, -1), 0, -1)
        return (img[..., 0] if img.shape[-1] == 1 else img), msk

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
