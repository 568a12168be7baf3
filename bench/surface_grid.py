"""How far are HD95 and NSD on the slice cache's grid from the same numbers on the native grid? One case.

The surface records (``trainables.surface``) score masks on the cache's ``S x S x D`` grid at its physical
spacing (native spacing x native size / S in-plane, native along depth). This takes one case, a
synthetic one (``trainables.data.synthetic``, native 0.6 x 0.6 x 3.0 mm) or a NIfTI mask, perturbs its
truth in a few ways (an in-plane shift, a dilation, a missing end slice), and scores each perturbed
mask against the truth twice: on the native grid at the native spacing, and after both masks went
through the cache's nearest-neighbour resize (``resize_masks``) at the cache grid's spacing.

    python bench/surface_grid.py [--shape 64 64 10] [--sizes 32 64] [--mask case_mask.nii.gz] [--tolerance 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainables.data.cache import resize_masks  # noqa: E402
from trainables.data.nifti import read_nifti  # noqa: E402
from trainables.surface import case_scores  # noqa: E402


def perturbations(truth: np.ndarray) -> dict[str, np.ndarray]:
    """A few plausible prediction errors of ``truth`` (H x W x D bool)."""
    end = truth.copy()
    zs = np.flatnonzero(truth.any(axis=(0, 1)))
    end[:, :, zs[-1]] = False
    return {"shift 2 px in-plane": np.roll(truth, 2, axis=1),
            "dilate 1 px in-plane": ndimage.binary_dilation(truth, structure=np.ones((3, 3, 1), bool)),
            "erode 2 px in-plane": ndimage.binary_erosion(truth, structure=np.ones((5, 5, 1), bool)),
            "last slice missing": end}


def synthetic_case(shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple[float, float, float]]:
    from trainables.data.synthetic import write_synthetic_sites

    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_sites(tmp, sites=["SiteA"], cases_per_site=1, shape=shape, seed=0)
        mask_file = next(p for p in Path(root).rglob("*.nii.gz") if "seg" in p.name.lower())
        mask, spacing = read_nifti(mask_file)
    return mask > 0, spacing


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 64, 10], help="synthetic case shape (the demo's)")
    ap.add_argument("--mask", type=Path, help="a NIfTI label volume instead of the synthetic case (label > 0)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="cache image sizes S")
    ap.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance (mm)")
    args = ap.parse_args(argv)
    if args.mask:
        mask, spacing = read_nifti(args.mask)
        truth, what = mask > 0, str(args.mask)
    else:
        truth, spacing = synthetic_case(tuple(args.shape))
        what = f"synthetic case {tuple(args.shape)}"
    print(f"{what}: native spacing {tuple(round(float(s), 3) for s in spacing)} mm, "
          f"{int(truth.sum())} foreground voxels, NSD tolerance {args.tolerance:g} mm")
    print(f"{'perturbation':<22} {'grid':<22} {'HD95 mm':>8} {'NSD':>6}")
    for name, pred in perturbations(truth).items():
        hd, nsd, _ = case_scores(pred, truth, spacing, args.tolerance)
        print(f"{name:<22} {'native ' + 'x'.join(map(str, truth.shape)):<22} {hd:8.3f} {nsd:6.3f}")
        for s in args.sizes:
            grid = (spacing[0] * truth.shape[0] / s, spacing[1] * truth.shape[1] / s, spacing[2])
            # the cache's resize (nearest) gives D x S x S; back to S x S x D, the Case axes
            t, p = (np.moveaxis(resize_masks(m.astype(np.uint8), s), 0, -1).astype(bool) for m in (truth, pred))
            hd_c, nsd_c, _ = case_scores(p, t, grid, args.tolerance)
            label = f"cache {s}x{s}x{truth.shape[2]} @{grid[0]:.2f}"
            print(f"{'':<22} {label:<22} {hd_c:8.3f} {nsd_c:6.3f}   (Δ HD95 {hd_c - hd:+.3f} mm, Δ NSD {nsd_c - nsd:+.3f})")


if __name__ == "__main__":
    main()
