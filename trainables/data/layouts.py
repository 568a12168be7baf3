"""Dataset layouts: how a public release lays out its files on disk (DESIGN §5).

A *layout* knows three things about one dataset family: which sites live under a root
folder, which (image, mask) file pairs make up a site, and how to read one case into
arrays. Everything downstream (preprocessing, the slice cache) works on :class:`Case`
objects and never looks at folder names or file spellings.

One registry dict, :data:`LAYOUTS`; :func:`get_layout` looks a name up and lists the
valid names when it is unknown.

Registered layouts:

``prostate_multisite``
    The multi-site prostate MR release of SAML / MS-Net::

        <root>/<SITE folder>/CaseNN.nii.gz
        <root>/<SITE folder>/CaseNN_segmentation.nii.gz   (or CaseNN_Segmentation, or .nii)

    Site names map to folders through :data:`PROSTATE_SITE_FOLDERS` (``BMC`` ->
    ``ISBI_1.5``, ``RUNMC`` -> ``ISBI``); any other site name (``BIDMC``, ``HK``,
    ``I2CVB``, ``UCL``, synthetic ``SiteA`` ...) is its own folder name. Masks may use
    labels 1 and 2 (two prostate zones); prostate = label > 0; other labels are an error.

``idrid``, ``fgadr`` (:mod:`trainables.data.fundus`)
    2D colour fundus photographs with four lesion masks each (MA, HE, EX, SE): a multi-label
    task, one mask channel per lesion. A missing lesion mask file means the lesion is absent.

``lits``, ``flare`` (:mod:`trainables.data.liver`)
    Abdominal CT; liver = label > 0 in LiTS (liver plus tumour), label 1 in FLARE (FLARE21
    ``train_NNN[_0000]`` and FLARE22 ``FLARE22_Tr_NNNN[_0000]`` file names).

Every layout pairs files with :meth:`Layout.scan_cases`, which collects the pairing problems
of a site (an image without a mask, a mask without an image ...) instead of stopping at the
first, so that ``oodsweep data check`` can report all of them in one pass;
:meth:`Layout.list_cases` raises them together.

Every problem with the input data raises :class:`DataError`, whose message names the
file or folder, the bad value, and what to do about it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "DataError",
    "CaseFiles",
    "Case",
    "Layout",
    "ProstateMultisite",
    "PROSTATE_SITE_FOLDERS",
    "LAYOUTS",
    "get_layout",
    "read_nifti",
    "nifti_affine",
    "check_pair",
    "check_orientation",
]


class DataError(ValueError):
    """Bad input data. The message names the file (or folder), the bad value, and the fix."""


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case, before anything is read.

    Attributes:
        site: site name as the user names it (e.g. ``"BMC"`` or ``"SiteA"``).
        case_id: case identifier, e.g. ``"Case03"``.
        image: path of the image volume (or 2D photograph).
        mask: path of the label volume; None for multi-label layouts, whose files are in
            ``lesion_masks``.
        split: the dataset's own split of this case (``"train"`` or ``"test"``), None where
            the release has none (the cache then splits 80/20 by case).
        lesion_masks: multi-label layouts: ``(label name, file)`` per label, in the layout's
            label order; a None file means the label is absent from this image.
    """

    site: str
    case_id: str
    image: Path
    mask: Path | None
    split: str | None = None
    lesion_masks: tuple[tuple[str, Path | None], ...] = ()

    def paths(self) -> list[Path]:
        """Every existing file of the case (image first)."""
        out = [Path(self.image)] + ([Path(self.mask)] if self.mask is not None else [])
        return out + [Path(p) for _, p in self.lesion_masks if p is not None]


@dataclass
class Case:
    """One loaded, checked case.

    Attributes:
        site: site name as the user names it.
        case_id: case identifier, e.g. ``"Case03"``.
        image: float32 array, ``H x W x D`` (2D slices along the last axis), raw intensities;
            colour images are ``H x W x D x C`` (fundus: ``D = 1``, ``C = 3`` RGB in 0..255).
        mask: uint8 array in {0, 1}, ``H x W x D``, already binarised (foreground as the layout
            defines it); multi-label layouts give ``H x W x D x L``, one channel per label.
        spacing: voxel size in mm along (H, W, D), from the image header (1.0 where unknown).
        image_path: file the image was read from.
        mask_path: file the mask was read from (multi-label: the first lesion file, or the image).
        labels: names of the mask channels, in order.
        label_values: the label values found in the mask file(s) before binarising.
        warnings: problems that did not stop the case (each names the file).
    """

    site: str
    case_id: str
    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    image_path: Path
    mask_path: Path
    labels: tuple[str, ...] = ("foreground",)
    label_values: tuple[int, ...] = ()
    warnings: tuple[str, ...] = ()


@runtime_checkable
class Layout(Protocol):
    """What every dataset layout provides.

    Attributes:
        name: registry name of the layout.
        modality: ``"mr"``, ``"ct"`` or ``"fundus"``; tells preprocessing how to normalise.
        labels: names of the mask channels a loaded case has (one for binary tasks).
    """

    name: str
    modality: str
    labels: tuple[str, ...]

    def sites(self, root: Path) -> list[str]:
        """Site names found under ``root``, sorted."""
        ...

    def scan_cases(self, root: Path, site: str) -> tuple[list[CaseFiles], list[str]]:
        """The well-paired cases of one site and the pairing problems (one message each).

        Raises DataError only when there is nothing to pair: a missing root or site folder,
        or a site without any case file.
        """
        ...

    def list_cases(self, root: Path, site: str) -> list[CaseFiles]:
        """The cases of one site, sorted by case id; raises DataError on structural problems."""
        ...

    def load_case(self, files: CaseFiles) -> Case:
        """Reads and checks one case; raises DataError on the case's problems."""
        ...


# --------------------------------------------------------------------------------------
# NIfTI reading and checks shared by the volume layouts

#: Slices per block when a whole-volume check runs block by block (bounded temporaries on
#: 512 x 512 x 987 LiTS volumes).
_BLOCK = 32


def read_nifti(path: Path, dtype: type | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reads a 3D NIfTI volume.

    Any failure of nibabel (missing file, truncated gzip, not NIfTI, corrupt header or
    data) becomes a :class:`DataError` naming the file. Trailing singleton axes beyond the
    third (``H x W x D x 1``) are dropped; anything else that is not 3D is an error.

    Args:
        path: the ``.nii`` or ``.nii.gz`` file.
        dtype: read straight into this dtype (nibabel scales in it: no float64 detour, which
            matters for the 0.5-1 GB volumes of LiTS); None keeps the stored type.

    Returns:
        ``(array, spacing)``: the data as stored (scaling applied, dtype float32 when the
        file is scaled or float, else the stored integer dtype), and the voxel size in mm
        of the first three axes.

    Raises:
        DataError: the file cannot be read, or is not a 3D volume.
    """
    import nibabel as nib  # local: keeps importing the package light

    path = Path(path)
    try:
        img = nib.load(str(path))
        # reading the array is where a truncated or corrupt gzip fails (EOFError,
        # zlib.error, OSError, ValueError ... depending on where it is cut): catch broadly
        shape = tuple(img.shape)
        if len(shape) > 3 and any(s != 1 for s in shape[3:]):
            raise _NotVolume(shape)
        data = np.asanyarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except _NotVolume:
        data, zooms = None, ()
    except Exception as exc:  # noqa: BLE001 - nibabel raises many unrelated types
        raise DataError(
            f"{path}: cannot read it as NIfTI ({type(exc).__name__}: {exc}). The file is "
            "missing, truncated, corrupt or not NIfTI; re-download or re-extract it, or "
            "remove the case."
        ) from exc
    if data is not None:
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
    if data is None or data.ndim != 3:
        raise DataError(
            f"{path}: expected a 3D volume (H x W x D), got shape {tuple(img.shape)}. "
            "Split 4D series into one 3D volume per file, or remove the case."
        )
    if np.issubdtype(data.dtype, np.floating) and data.dtype != np.float32:
        data = data.astype(np.float32)
    spacing = (zooms + (1.0, 1.0, 1.0))[:3]
    return data, spacing  # type: ignore[return-value]


class _NotVolume(Exception):
    """Internal: a 4D (or higher) volume, detected from the header before reading the data."""


def nifti_affine(path: Path) -> np.ndarray:
    """The voxel-to-world affine of a NIfTI file (header only; the data is not read).

    Raises:
        DataError: the header cannot be read.
    """
    import nibabel as nib

    try:
        return np.asarray(nib.load(str(path)).affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: cannot read its NIfTI header ({type(exc).__name__}: {exc}); "
                        "re-download the file or remove the case.") from exc


def check_orientation(image_path: Path, mask_path: Path, tol_mm: float = 1e-2) -> list[str]:
    """Checks that image and mask headers put their voxels in the same place.

    Different axis orientations (e.g. ``RAS`` vs ``LPS``) mean the arrays do not correspond
    voxel for voxel: an error. Same orientation but a different origin or spacing beyond
    ``tol_mm`` is a warning only (public releases carry such header slips on masks that do
    match their image).

    Returns:
        The warnings (each names the mask file).

    Raises:
        DataError: the axis orientations differ.
    """
    import nibabel as nib

    a_img, a_msk = nifti_affine(image_path), nifti_affine(mask_path)
    o_img, o_msk = nib.aff2axcodes(a_img), nib.aff2axcodes(a_msk)
    if o_img != o_msk:
        raise DataError(
            f"{mask_path}: orientation {''.join(o_msk)} differs from its image {image_path} "
            f"({''.join(o_img)}); the arrays would not match voxel for voxel. Reorient the mask "
            "onto the image (e.g. nibabel.as_closest_canonical on both), or remove the case."
        )
    diff = float(np.abs(a_img - a_msk).max())
    if diff > tol_mm:
        return [(f"{mask_path}: its affine differs from the image's by up to {diff:.3g} mm "
                 f"(same orientation {''.join(o_img)}); used as if it matched voxel for voxel")]
    return []


def label_values(mask: np.ndarray) -> tuple[int, ...]:
    """The distinct values of a label array, block by block (no full-size temporary).

    Raises:
        DataError: never; non-integer values are returned as they are (rounded check is the
            caller's).
    """
    found: set = set()
    if mask.ndim < 3:
        return tuple(np.unique(mask).tolist())
    for z in range(0, mask.shape[2], _BLOCK):
        found.update(np.unique(mask[:, :, z:z + _BLOCK]).tolist())
    return tuple(sorted(found))


def check_pair(
    image: np.ndarray,
    mask: np.ndarray,
    image_path: Path,
    mask_path: Path,
    allowed_labels: tuple[int, ...] | None = None,
    foreground: tuple[int, ...] | None = None,
    values: tuple | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Checks an image/label pair and returns ``(image float32, mask uint8 {0, 1})``.

    Args:
        image: the image array as read.
        mask: the label array as read (any labels; foreground = label > 0).
        image_path: the image file, for messages.
        mask_path: the mask file, for messages.
        allowed_labels: the label values the release uses; any other value is an error
            (None: any non-negative integer).
        foreground: the labels that make up the structure (None: every label > 0).
        values: the mask's distinct values if the caller has them (see :func:`label_values`).

    Returns:
        The float32 image and the binarised uint8 mask.

    Raises:
        DataError: shapes differ, non-finite or constant intensities, non-finite or
            unexpected labels, or no foreground.
    """
    if image.shape != mask.shape:
        raise DataError(
            f"{image_path} has shape {tuple(image.shape)} but its mask {mask_path} has shape "
            f"{tuple(mask.shape)}; they must match voxel for voxel. Resample the mask onto "
            "the image grid, or remove the case."
        )
    image = np.asarray(image, dtype=np.float32)
    n_nan = n_inf = 0
    for z in range(0, image.shape[-1], _BLOCK):  # block by block: bounded temporaries on big volumes
        block = image[..., z:z + _BLOCK]
        n_nan += int(np.isnan(block).sum())
        n_inf += int(np.isinf(block).sum())
    if n_nan or n_inf:
        raise DataError(
            f"{image_path}: {n_nan} NaN and {n_inf} inf voxels out of {image.size}; "
            "intensities must be finite. Fix the file (e.g. replace them by 0) or remove the case."
        )
    lo, hi = float(image.min()), float(image.max())
    if lo == hi:
        raise DataError(
            f"{image_path}: constant intensities (every voxel is {lo:g}); the image carries no "
            "information (a blank export?). Re-export the image or remove the case."
        )
    if np.issubdtype(mask.dtype, np.floating):
        n_bad = int((~np.isfinite(mask)).sum())
        if n_bad:
            raise DataError(
                f"{mask_path}: {n_bad} NaN/inf voxels in the mask; labels must be finite "
                "integers. Fix the file or remove the case."
            )
    values = label_values(mask) if values is None else values
    bad = [v for v in values if v < 0 or v != int(v)
           or (allowed_labels is not None and int(v) not in allowed_labels)]
    if bad:
        expect = (f"the release's labels {list(allowed_labels)}" if allowed_labels is not None
                  else "non-negative integers")
        raise DataError(
            f"{mask_path}: unexpected label values {bad[:10]} (found {list(values)[:12]}; expected "
            f"{expect}). Is this the label file of this dataset (not a probability map or another "
            "release)? Fix the file or remove the case."
        )
    if foreground is None:
        binary = (mask > 0).astype(np.uint8)
    else:
        binary = np.isin(mask, foreground).astype(np.uint8)
    if not binary.any():
        what = "label > 0" if foreground is None else f"label in {list(foreground)}"
        raise DataError(
            f"{mask_path}: the mask has no foreground ({what}) in any of its "
            f"{binary.shape[-1]} slices (labels found: {list(values)[:10]}). "
            "Check that it belongs to this image, or remove the case."
        )
    return image, binary


def pair_problems(folder: Path, images: dict[str, Path], masks: dict[str, Path], image_hint: str,
                  mask_hint: str) -> list[str]:
    """Messages for images without masks and masks without images (``*_hint`` formats a name)."""
    out = [f"{p}: image without a mask (expected {mask_hint.format(case=c)} in {folder}). Add the "
           "mask or remove the image." for c, p in images.items() if c not in masks]
    out += [f"{p}: mask without an image (expected {image_hint.format(case=c)} in {folder}). Add "
            "the image or remove the mask." for c, p in masks.items() if c not in images]
    return out


def check_root(root: Path, hint: str) -> Path:
    """``root`` as a Path; DataError naming it (and ``hint``, what it should hold) when it is not a folder."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"data root {root} {what}. {hint}")
    return root


def raise_problems(problems: list[str], where: Path) -> None:
    """Raises one DataError listing every problem (a single problem is raised as it is)."""
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{len(problems)} problems in {where}:\n  - " + "\n  - ".join(problems))

# --------------------------------------------------------------------------------------
# prostate_multisite

#: Site name -> folder name, where they differ (the SAML / MS-Net release).
PROSTATE_SITE_FOLDERS: dict[str, str] = {"BMC": "ISBI_1.5", "RUNMC": "ISBI"}

_PROSTATE_FILE = re.compile(r"^(?P<case>Case(?P<num>\d+))(?P<seg>_[Ss]egmentation)?\.nii(\.gz)?$")


class ProstateMultisite:
    """The multi-site prostate MR layout (``<root>/<SITE>/CaseNN[_segmentation].nii.gz``)."""

    name = "prostate_multisite"
    modality = "mr"
    labels = ("prostate",)
    #: label values of the release (two zones in some sites); prostate = label > 0
    allowed_labels = (0, 1, 2)

    def __init__(self, site_folders: dict[str, str] | None = None) -> None:
        """Creates the layout.

        Args:
            site_folders: site name -> folder name where they differ; defaults to
                :data:`PROSTATE_SITE_FOLDERS`.
        """
        self.site_folders = dict(PROSTATE_SITE_FOLDERS if site_folders is None else site_folders)

    # -- helpers -----------------------------------------------------------------------
    def folder(self, site: str) -> str:
        """The folder name of a site (``BMC`` -> ``ISBI_1.5``; others unchanged)."""
        return self.site_folders.get(site, site)

    def _site_name(self, folder: str) -> str:
        reverse = {v: k for k, v in self.site_folders.items()}
        return reverse.get(folder, folder)

    @staticmethod
    def _check_root(root: Path) -> Path:
        return check_root(root, "Point data.root (or the environment variable the spec names) at the folder "
                                "that holds one sub-folder per site, or generate synthetic sites with "
                                "trainables.data.synthetic.write_synthetic_sites.")

    @staticmethod
    def _has_cases(folder: Path) -> bool:
        return any(_PROSTATE_FILE.match(p.name) for p in folder.iterdir() if p.is_file())

    # -- Layout ------------------------------------------------------------------------
    def sites(self, root: Path) -> list[str]:
        """Site names under ``root``: every sub-folder holding at least one case file.

        Args:
            root: the dataset root.

        Returns:
            Sorted site names (folders ``ISBI_1.5``/``ISBI`` reported as ``BMC``/``RUNMC``).

        Raises:
            DataError: ``root`` does not exist.
        """
        root = self._check_root(root)
        found = [
            self._site_name(d.name)
            for d in root.iterdir()
            if d.is_dir() and not d.name.startswith(".") and self._has_cases(d)
        ]
        return sorted(found)

    def empty_site_folders(self, root: Path) -> list[Path]:
        """Sub-folders of ``root`` without any case file (``oodsweep data check`` warns about them)."""
        root = self._check_root(root)
        return sorted(d for d in root.iterdir()
                      if d.is_dir() and not d.name.startswith(".") and not self._has_cases(d))

    def scan_cases(self, root: Path, site: str) -> tuple[list[CaseFiles], list[str]]:
        """Pairs the image and mask files of one site, collecting the pairing problems.

        Files whose names do not look like ``CaseNN[_segmentation].nii[.gz]`` are ignored.

        Args:
            root: the dataset root.
            site: site name (``BMC``, ``RUNMC``, ``BIDMC``, ``SiteA`` ...).

        Returns:
            ``(cases, problems)``: the well-paired cases sorted by case number, and one
            message per image without mask, mask without image, or duplicated file.

        Raises:
            DataError: missing root or site folder, or a folder without cases.
        """
        root = self._check_root(root)
        folder = root / self.folder(site)
        if not folder.is_dir():
            existing = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            alias = "" if folder.name == site else f" (site {site!r} is stored in folder {folder.name!r})"
            raise DataError(
                f"site folder {folder} does not exist{alias}. Folders under {root}: "
                f"{existing or 'none'}. Fix the site name or the data root; site aliases: "
                f"{self.site_folders}."
            )
        images: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        numbers: dict[str, int] = {}
        problems: list[str] = []
        dupes: set[str] = set()
        for path in sorted(folder.iterdir()):
            m = _PROSTATE_FILE.match(path.name)
            if m is None or not path.is_file():
                continue
            case_id = m.group("case")
            numbers[case_id] = int(m.group("num"))
            role = masks if m.group("seg") else images
            if case_id in role:
                kind = "mask" if m.group("seg") else "image"
                problems.append(
                    f"{folder}: two {kind} files for {case_id}: {role[case_id].name} and "
                    f"{path.name}. Keep one of them."
                )
                dupes.add(case_id)
                continue
            role[case_id] = path
        if not images and not masks:
            raise DataError(
                f"site folder {folder} holds no cases (expected CaseNN.nii.gz + "
                "CaseNN_segmentation.nii.gz). Check the site name and the data root."
            )
        problems += pair_problems(folder, images, masks, "{case}.nii.gz", "{case}_segmentation.nii.gz")
        order = sorted((c for c in images if c in masks and c not in dupes), key=lambda c: (numbers[c], c))
        return [CaseFiles(site=site, case_id=c, image=images[c], mask=masks[c]) for c in order], problems

    def list_cases(self, root: Path, site: str) -> list[CaseFiles]:
        """Like :meth:`scan_cases`, but every pairing problem is an error (all in one DataError).

        Raises:
            DataError: missing root or site folder, a folder without cases, an image
                without mask or a mask without image, or two files for the same role.
        """
        cases, problems = self.scan_cases(root, site)
        raise_problems(problems, Path(root) / self.folder(site))
        return cases

    def load_case(self, files: CaseFiles) -> Case:
        """Reads one case and checks it.

        Args:
            files: the case's files, from :meth:`list_cases`.

        Returns:
            The case: float32 image, binarised uint8 mask (label > 0), spacing from the
            image header.

        Raises:
            DataError: unreadable file, not 3D, shape or orientation mismatch, non-finite or
                constant intensities, labels other than 0/1/2, or a mask without foreground.
        """
        return load_volume_case(files, allowed_labels=self.allowed_labels, foreground=None,
                                label=self.labels[0])


def load_volume_case(files: CaseFiles, allowed_labels: tuple[int, ...] | None,
                     foreground: tuple[int, ...] | None, label: str) -> Case:
    """Reads and checks a NIfTI image/label pair (every volume layout's ``load_case``).

    Args:
        files: the case's files.
        allowed_labels: label values the release uses (others are an error).
        foreground: labels that make up the structure (None: label > 0).
        label: the name of the one mask channel.
    """
    image, spacing = read_nifti(files.image, dtype=np.float32)
    mask, _ = read_nifti(files.mask)
    warnings = check_orientation(files.image, files.mask) if image.shape == mask.shape else []
    values = label_values(mask)
    image, binary = check_pair(image, mask, files.image, files.mask, allowed_labels, foreground, values)
    del mask
    return Case(
        site=files.site,
        case_id=files.case_id,
        image=image,
        mask=binary,
        spacing=spacing,
        image_path=Path(files.image),
        mask_path=Path(files.mask),
        labels=(label,),
        label_values=tuple(int(v) for v in values),
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------------------
# registry

#: Registry of dataset layouts, by name.
LAYOUTS: dict[str, Layout] = {"prostate_multisite": ProstateMultisite()}

# The other families live in their own modules, which import the shared checks above; they
# are registered here, after those definitions exist.
from .fundus import FGADR, IDRiD  # noqa: E402
from .liver import FLARE, LiTS  # noqa: E402

LAYOUTS.update({"idrid": IDRiD(), "fgadr": FGADR(), "lits": LiTS(), "flare": FLARE()})


def get_layout(name: str) -> Layout:
    """Looks a layout up in :data:`LAYOUTS`.

    Args:
        name: registry name, e.g. ``"prostate_multisite"``.

    Returns:
        The layout.

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dataset layout {name!r}; valid layouts: {sorted(LAYOUTS)}. "
            "Fix data.layout in the spec."
        ) from None
