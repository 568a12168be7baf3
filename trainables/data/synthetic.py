"""Synthetic multi-site prostate-like MR data (the embedded default dataset, docs/architecture.md "Models and data").

:func:`write_synthetic_sites` writes NIfTI volumes in the ``prostate_multisite`` layout
(``<root>/<Site>/CaseNN.nii.gz`` + ``CaseNN_segmentation.nii.gz``), so that the real
loader reads them. Voxel size 0.6 x 0.6 x 3.0 mm, as in prostate T2 MR.

Anatomy (the same for case *i* at every site, different from case to case; drawn from
``(seed, i)``): a body ellipse on dark air, a textured background, 1-3 distractor
ellipsoids (bright fluid-like, dark, or organ-like intensity, smoother texture), and the
"organ": a randomly placed, rotated, irregular ellipsoid with a finer texture, a darker
inner zone and a thin dark capsule, present in a central run of slices only (the first
and last ``max(1, round(0.1 * D))`` slices are empty). The mask is the whole organ {0, 1}.
No single intensity threshold separates it from the organ-like distractors.

Each site then applies fixed scanner-like shifts, in this order (on an image in ~[0, 1],
then scaled by 1000 to MR-like raw intensities):

0. geometry: in-plane rotation by ``rotate`` degrees and isotropic in-plane scaling by ``zoom``
   about the image centre (a different patient positioning and field of view),
   ``monai.transforms.Affine``, bilinear for the image and nearest for the mask: the only shift
   that moves the mask;
1. contrast: gamma curve, ``monai.transforms.AdjustContrast(gamma)``;
2. coil bias field: ``monai.transforms.RandBiasField(degree=3, coeff_range=(-b, b))``;
3. resolution loss: in-plane ``monai.transforms.RandSimulateLowResolution`` with zoom
   ``z`` (area downsample to ``z`` x the matrix, bilinear upsample back);
4. Gibbs ringing: in-plane k-space truncation, ``monai.transforms.GibbsNoise(alpha)``;
5. acquisition noise: Rician (MR magnitude) noise, ``monai.transforms.RandRicianNoise(std)``.

Shifts 0 and 3-4 act slice by slice (depth moved to MONAI's channel axis), as in 2D
multi-slice acquisitions. The random parts of a shift (bias-field coefficients, noise
draws) come from ``(seed, case index)`` and are shared by all sites, each scaled by its
site's amplitude, so for every case the distance to SiteA grows with the severity.

SiteB-D mix every kind of shift at growing strength (the demo's targets); SiteE-H each apply
one kind, at about SiteC's strength, so that a study can tell the kinds apart (the study preset):

=======  ========  =====  ==========  ===========  ========  ===========  ====  ======
site     severity  gamma  bias_coeff  gibbs_alpha  lowres    noise_std    zoom  rotate
=======  ========  =====  ==========  ===========  ========  ===========  ====  ======
SiteA    0 clean   1.00   0.00        0.00         1.00      0.000        1.00  0
SiteB    1 mild    1.40   0.25        0.55         0.70      0.025        1.00  0
SiteC    2 moder.  1.60   0.35        0.62         0.60      0.040        1.00  0
SiteD    3 severe  2.00   0.50        0.70         0.45      0.060        1.00  0
SiteE    2 intens. 1.80   0.45        0.00         1.00      0.000        1.00  0
SiteF    2 resol.  1.00   0.00        0.65         0.50      0.000        1.00  0
SiteG    2 noise   1.00   0.00        0.00         1.00      0.070        1.00  0
SiteH    2 geom.   1.00   0.00        0.00         1.00      0.000        0.80  25
=======  ========  =====  ==========  ===========  ========  ===========  ====  ======

``gibbs_alpha`` is MONAI's: the kept k-space radius is ``(1 - alpha) * max(H, W) / sqrt(2)``,
so alpha below ~0.3 only cuts the k-space corners; ``lowres`` is the in-plane zoom of the
simulated acquisition matrix (1 = full resolution); ``noise_std`` is relative to the
[0, 1] image before scaling; ``zoom`` < 1 shrinks the anatomy in the field of view.

Version 2 (the demo's "pool that learns"): SiteB-D's shifts are a step stronger than version 1's
(on version 1's SiteB, working members scored *above* the source), SiteE-H are new.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["SiteShift", "SYNTHETIC_SITES", "MIXED_SITES", "SYNTHETIC_VERSION", "SPACING", "write_synthetic_sites",
           "shares_anatomies"]

#: Bump when the generator changes output; makes write_synthetic_sites rewrite old data.
SYNTHETIC_VERSION = 2
#: Voxel size in mm (H, W, D), like prostate T2 MR.
SPACING = (0.6, 0.6, 3.0)
#: Raw-intensity scale of the written images (MR units are arbitrary).
INTENSITY_SCALE = 1000.0
MANIFEST = "synthetic.json"


@dataclass(frozen=True)
class SiteShift:
    """Scanner-like shift of one synthetic site (see the module table).

    Attributes:
        severity: ordinal severity, 0 (clean source) to 3 (severe); for analysis plots.
        gamma: contrast gamma on the [0, 1] image (1 = unchanged; > 1 darkens mid-tones).
        bias_coeff: amplitude of the degree-3 Legendre log-bias field (0 = none).
        gibbs_alpha: MONAI GibbsNoise alpha in [0, 1] (0 = none).
        lowres: in-plane zoom of the simulated acquisition matrix (1 = full resolution).
        noise_std: Rician noise std, relative to the [0, 1] image (0 = none).
        zoom: in-plane scale of the anatomy about the image centre (1 = unchanged; moves the mask).
        rotate: in-plane rotation in degrees about the image centre (0 = none; moves the mask).
        kind: what the shift changes, for tables: "clean", "mixed", "intensity", "resolution",
            "noise" or "geometry".
    """

    severity: float
    gamma: float = 1.0
    bias_coeff: float = 0.0
    gibbs_alpha: float = 0.0
    lowres: float = 1.0
    noise_std: float = 0.0
    zoom: float = 1.0
    rotate: float = 0.0
    kind: str = "mixed"

    @property
    def moves_mask(self) -> bool:
        return self.zoom != 1.0 or self.rotate != 0.0


#: The synthetic sites, source first, in increasing severity.
SYNTHETIC_SITES: dict[str, SiteShift] = {
    "SiteA": SiteShift(severity=0.0, kind="clean"),
    "SiteB": SiteShift(severity=1.0, gamma=1.4, bias_coeff=0.25, gibbs_alpha=0.55, lowres=0.7, noise_std=0.025),
    "SiteC": SiteShift(severity=2.0, gamma=1.6, bias_coeff=0.35, gibbs_alpha=0.62, lowres=0.6, noise_std=0.040),
    "SiteD": SiteShift(severity=3.0, gamma=2.0, bias_coeff=0.50, gibbs_alpha=0.70, lowres=0.45, noise_std=0.060),
    "SiteE": SiteShift(severity=2.0, gamma=1.8, bias_coeff=0.45, kind="intensity"),
    "SiteF": SiteShift(severity=2.0, gibbs_alpha=0.65, lowres=0.5, kind="resolution"),
    "SiteG": SiteShift(severity=2.0, noise_std=0.070, kind="noise"),
    "SiteH": SiteShift(severity=2.0, zoom=0.8, rotate=25.0, kind="geometry"),
}
#: The source and the three mixed-shift sites of growing severity (the demo's sites).
MIXED_SITES = ("SiteA", "SiteB", "SiteC", "SiteD")


# --------------------------------------------------------------------------------------
# anatomy
#
# Written by hand: MONAI's create_test_image_3d draws untextured spheres of one intensity
# (a single threshold segments them); we need textured, rotated, irregular ellipsoids with
# distractors of overlapping intensity, and an organ kept out of the end slices.


def _texture(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """Smoothed white noise, zero mean and unit std."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=(sigma, sigma, sigma / 5.0 + 0.3))
    return (field - field.mean()) / (field.std() + 1e-8)


def _ellipsoid_distance(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: Sequence[float],
    radii: Sequence[float],
    angle: float,
) -> np.ndarray:
    """Normalised squared distance (< 1 inside) to an ellipsoid rotated in-plane by ``angle``."""
    x, y, z = (g - c for g, c in zip(grid, centre))
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * x + sin * y, -sin * x + cos * y
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (z / radii[2]) ** 2


def _anatomy(seed: int, index: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Clean image in ~[0, 1] (float32) and organ mask (uint8) of case ``index``."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng([seed, index, 0])
    h, w, d = shape
    size = float(min(h, w))
    grid = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                       np.arange(d, dtype=np.float32), indexing="ij", sparse=True)

    # body ellipse on air, textured background tissue
    body = _ellipsoid_distance(grid, ((h - 1) / 2, (w - 1) / 2, 0.0),
                               (rng.uniform(0.42, 0.49) * h, rng.uniform(0.40, 0.47) * w, 1e6), 0.0) < 1
    image = np.full(shape, 0.02, dtype=np.float32)
    tissue = 0.35 + 0.06 * _texture(rng, shape, sigma=2.5)
    image = np.where(body, tissue, image)

    # organ geometry (drawn before the distractors so these can keep out of its centre)
    margin = max(1, round(0.1 * d))
    zc = (d - 1) / 2 + rng.uniform(-1.0, 1.0) * max(0.0, d / 16)
    rz_max = ((d - 1) / 2 - abs(zc - (d - 1) / 2) - margin) / 1.1  # 1.1: irregularity headroom
    rz = max(0.6, rng.uniform(0.65, 1.0) * rz_max)
    rx, ry = rng.uniform(0.12, 0.2, size=2) * size
    cx = (h - 1) / 2 + rng.uniform(-0.12, 0.12) * h
    cy = (w - 1) / 2 + rng.uniform(-0.12, 0.12) * w
    angle = rng.uniform(0, np.pi)
    organ_d = _ellipsoid_distance(grid, (cx, cy, zc), (rx, ry, rz), angle)
    organ_d = organ_d * (1 + 0.08 * _texture(rng, shape, sigma=4.0))  # irregular outline

    # 1-3 distractors: bright (fluid), dark, or organ-like intensity
    for _ in range(rng.integers(1, 4)):
        for _try in range(20):
            dx = rng.uniform(0.15, 0.85) * h
            dy = rng.uniform(0.15, 0.85) * w
            if np.hypot(dx - cx, dy - cy) > 0.8 * max(rx, ry):
                break
        radii = (rng.uniform(0.06, 0.15) * size, rng.uniform(0.06, 0.15) * size, rng.uniform(0.3, 1.0) * d)
        dist = _ellipsoid_distance(grid, (dx, dy, rng.uniform(0, d - 1)), radii, rng.uniform(0, np.pi))
        kind = rng.choice(3, p=[0.3, 0.25, 0.45])  # bright fluid, dark, organ-like
        level = (rng.uniform(0.8, 0.92), rng.uniform(0.12, 0.2), rng.uniform(0.5, 0.62))[kind]
        image = np.where(body & (dist < 1), level + 0.03 * _texture(rng, shape, sigma=3.0), image)

    # organ: thin dark capsule, textured peripheral zone, darker inner zone
    inner_d = _ellipsoid_distance(grid, (cx + rng.uniform(-0.15, 0.15) * rx, cy + rng.uniform(-0.15, 0.15) * ry, zc),
                                  (0.55 * rx, 0.55 * ry, 0.7 * rz), angle)
    capsule = (organ_d >= 1) & (organ_d < 1.18)
    image = np.where(capsule, 0.24, image)
    organ = organ_d < 1
    organ_tex = 0.05 * _texture(rng, shape, sigma=0.8)
    image = np.where(organ, np.where(inner_d < 1, 0.46, 0.6) + organ_tex, image)

    # partial volume: blur in-plane only
    image = gaussian_filter(image, sigma=(0.6, 0.6, 0.0))
    return np.clip(image, 0.0, None).astype(np.float32), organ.astype(np.uint8)


# --------------------------------------------------------------------------------------
# site shifts (MONAI transforms, fixed random states)


def _move(image: np.ndarray, mask: np.ndarray, shift: SiteShift) -> tuple[np.ndarray, np.ndarray]:
    """A site's geometry shift (rotation and zoom about the centre, slice by slice) of a clean
    ``H x W x D`` image and its mask; identity when the site has none."""
    if not shift.moves_mask:
        return image, mask
    from monai.transforms import Affine
    from monai.utils import convert_to_numpy

    # MONAI's Affine maps output to input coordinates: a scale of 1/zoom shows the anatomy zoom x as large
    move = Affine(rotate_params=np.deg2rad(shift.rotate), scale_params=(1.0 / shift.zoom, 1.0 / shift.zoom),
                  padding_mode="border", image_only=True)
    img = np.moveaxis(image, -1, 0)  # D x H x W: 2D transform per slice (depth as MONAI's channel axis)
    msk = np.moveaxis(mask, -1, 0).astype(np.float32)
    img = convert_to_numpy(move(img, mode="bilinear"))
    msk = convert_to_numpy(move(msk, mode="nearest"))
    return (np.ascontiguousarray(np.moveaxis(img, 0, -1), dtype=np.float32),
            np.ascontiguousarray(np.moveaxis(msk, 0, -1) > 0.5).astype(np.uint8))


def _apply_shift(image: np.ndarray, shift: SiteShift, seed: int, index: int) -> np.ndarray:
    """Applies a site's shift to a clean ``H x W x D`` image in ~[0, 1]; returns float32."""
    from monai.transforms import AdjustContrast, GibbsNoise, RandBiasField, RandRicianNoise, RandSimulateLowResolution
    from monai.utils import convert_to_numpy

    # the random parts are drawn from (seed, case) only, shared by all sites: see module doc
    def state(stream: int) -> np.random.RandomState:
        return np.random.RandomState(np.random.SeedSequence([seed, index, stream]).generate_state(1)[0])

    x = image[None].astype(np.float32)  # C x H x W x D
    if shift.gamma != 1.0:
        x = convert_to_numpy(AdjustContrast(gamma=shift.gamma)(x))
    if shift.bias_coeff > 0:
        bias = RandBiasField(degree=3, coeff_range=(-shift.bias_coeff, shift.bias_coeff), prob=1.0)
        bias.set_random_state(state=state(1))
        x = convert_to_numpy(bias(x))
    slices = np.moveaxis(x[0], -1, 0)  # D x H x W: 2D transforms per slice
    if shift.lowres < 1.0:
        lowres = RandSimulateLowResolution(prob=1.0, downsample_mode="area", upsample_mode="bilinear",
                                           zoom_range=(shift.lowres, shift.lowres))
        lowres.set_random_state(state=state(2))
        slices = convert_to_numpy(lowres(slices))
    if shift.gibbs_alpha > 0:
        slices = convert_to_numpy(GibbsNoise(alpha=shift.gibbs_alpha)(slices))
    x = np.moveaxis(slices, 0, -1)[None]
    if shift.noise_std > 0:
        noise = RandRicianNoise(prob=1.0, std=shift.noise_std, sample_std=False)
        noise.set_random_state(state=state(3))
        x = convert_to_numpy(noise(x))
    return np.asarray(x[0], dtype=np.float32)


# --------------------------------------------------------------------------------------
# writing


def _params(sites: list[str], cases_per_site: int, shape: tuple[int, int, int], seed: int) -> dict:
    return {
        "version": SYNTHETIC_VERSION,
        "layout": "prostate_multisite",
        "seed": seed,
        "cases_per_site": cases_per_site,
        "shape": list(shape),
        "spacing": list(SPACING),
        "intensity_scale": INTENSITY_SCALE,
        "sites": {name: asdict(SYNTHETIC_SITES[name]) for name in sites},
    }


def _save(array: np.ndarray, path: Path, affine: np.ndarray) -> None:
    """Writes one NIfTI atomically (temp file in the same folder, then rename)."""
    import nibabel as nib

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms(SPACING)
    if array.dtype == np.uint8:
        img.header.set_intent("label")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def write_synthetic_sites(
    root: str | Path,
    sites: Sequence[str] | None = None,
    cases_per_site: int = 10,
    shape: tuple[int, int, int] = (80, 80, 16),
    seed: int = 0,
) -> Path:
    """Writes synthetic sites in the ``prostate_multisite`` layout under ``root``.

    Idempotent: a ``synthetic.json`` manifest at ``root`` records the parameters; when
    it matches, nothing is rewritten. When it differs, the site folders it lists are
    cleared of case files and everything is written again (the manifest last, so an
    interrupted write is redone next time).

    Args:
        root: folder to write into (created if missing).
        sites: names from :data:`SYNTHETIC_SITES`; default SiteA-D (:data:`MIXED_SITES`), source first.
        cases_per_site: cases per site, named ``Case00``, ``Case01`` ...
        shape: volume shape ``(H, W, D)``; D >= 6 so the organ can skip the end slices.
        seed: base seed; case ``i`` is the same anatomy at every site.

    Returns:
        ``root`` as a Path.

    Raises:
        ValueError: unknown site name, ``cases_per_site < 1`` or a too small shape.
    """
    root = Path(root)
    names = list(MIXED_SITES) if sites is None else list(sites)
    unknown = [s for s in names if s not in SYNTHETIC_SITES]
    if unknown:
        raise ValueError(f"unknown synthetic site(s) {unknown}; valid sites: {list(SYNTHETIC_SITES)}.")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"sites must be a non-empty list of distinct names, got {names}.")
    if cases_per_site < 1:
        raise ValueError(f"cases_per_site must be >= 1, got {cases_per_site}.")
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape[:2]) < 16 or shape[2] < 6:
        raise ValueError(f"shape must be (H, W, D) with H, W >= 16 and D >= 6, got {shape}.")

    params = _params(names, cases_per_site, shape, seed)
    manifest = root / MANIFEST
    old = None
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
    if old == params and all(
        (root / s / f"Case{i:02d}{suffix}.nii.gz").is_file()
        for s in names for i in range(cases_per_site) for suffix in ("", "_segmentation")
    ):
        return root

    # clear what an earlier, different write left (only our own case files)
    manifest.unlink(missing_ok=True)
    stale = set(names) | set((old or {}).get("sites", {}) if isinstance(old, dict) else ())
    for site in stale:
        folder = root / site
        if folder.is_dir():
            for f in folder.glob("Case*.nii.gz"):
                f.unlink()
            if not any(folder.iterdir()):
                shutil.rmtree(folder)

    affine = np.diag([*SPACING, 1.0]).astype(np.float64)
    for site in names:
        (root / site).mkdir(parents=True, exist_ok=True)
    for index in range(cases_per_site):
        clean, clean_mask = _anatomy(seed, index, shape)
        for site in names:
            moved, mask = _move(clean, clean_mask, SYNTHETIC_SITES[site])
            image = _apply_shift(moved, SYNTHETIC_SITES[site], seed, index)
            image = np.clip(image, 0.0, None) * np.float32(INTENSITY_SCALE)
            folder = root / site
            _save(image.astype(np.float32), folder / f"Case{index:02d}.nii.gz", affine)
            _save(mask, folder / f"Case{index:02d}_segmentation.nii.gz", affine)

    tmp = manifest.with_name(f".tmp-{os.getpid()}-{MANIFEST}")
    tmp.write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest)
    return root


def shares_anatomies(root: str | Path, sites: Sequence[str]) -> bool:
    """Whether ``sites`` are all synthetic sites written under ``root`` by :func:`write_synthetic_sites`
    (its manifest lists every one of them), so that case *i* is the same anatomy at each of them.

    The slice cache then gives every site the source's case split (``trainables.data.cache``): a
    target's test cases are the source's test anatomies under the target's shift, never anatomies the
    source trained on. Real multi-site data shares no patients and keeps a split per site.
    """
    try:
        params = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    listed = params.get("sites") if isinstance(params, dict) else None
    return isinstance(listed, dict) and len(sites) > 1 and all(s in listed for s in sites)
