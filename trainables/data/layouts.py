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
    labels 1 and 2 (two prostate zones); prostate = label > 0.

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
]


class DataError(ValueError):
    """Bad input data. The message names the file (or folder), the bad value, and the fix."""


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case, before anything is read.

    Attributes:
        site: site name as the user names it (e.g. ``"BMC"`` or ``"SiteA"``).
        case_id: case identifier, e.g. ``"Case03"``.
        image: path of the image volume.
        mask: path of the label volume.
    """

    site: str
    case_id: str
    image: Path
    mask: Path


@dataclass
class Case:
    """One loaded, checked case.

    Attributes:
        site: site name as the user names it.
        case_id: case identifier, e.g. ``"Case03"``.
        image: float32 array, ``H x W x D`` (2D slices along the last axis), raw intensities.
        mask: uint8 array in {0, 1}, ``H x W x D``, already binarised (foreground = label > 0).
        spacing: voxel size in mm along (H, W, D), from the image header.
        image_path: file the image was read from.
        mask_path: file the mask was read from.
    """

    site: str
    case_id: str
    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    image_path: Path
    mask_path: Path


@runtime_checkable
class Layout(Protocol):
    """What every dataset layout provides.

    Attributes:
        name: registry name of the layout.
        modality: ``"mr"``, ``"ct"`` or ``"fundus"``; tells preprocessing how to normalise.
    """

    name: str
    modality: str

    def sites(self, root: Path) -> list[str]:
        """Site names found under ``root``, sorted."""
        ...

    def list_cases(self, root: Path, site: str) -> list[CaseFiles]:
        """The cases of one site, sorted by case id; raises DataError on structural problems."""
        ...

    def load_case(self, files: CaseFiles) -> Case:
        """Reads and checks one case; raises DataError on the case's problems."""
        ...


# --------------------------------------------------------------------------------------
# NIfTI reading and checks shared by the volume layouts


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reads a 3D NIfTI volume.

    Any failure of nibabel (missing file, truncated gzip, not NIfTI, corrupt header or
    data) becomes a :class:`DataError` naming the file. Trailing singleton axes beyond the
    third (``H x W x D x 1``) are dropped; anything else that is not 3D is an error.

    Args:
        path: the ``.nii`` or ``.nii.gz`` file.

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
        data = np.asanyarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as exc:  # noqa: BLE001 - nibabel raises many unrelated types
        raise DataError(
            f"{path}: cannot read it as NIfTI ({type(exc).__name__}: {exc}). The file is "
            "missing, truncated, corrupt or not NIfTI; re-download or re-extract it, or "
            "remove the case."
        ) from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(
            f"{path}: expected a 3D volume (H x W x D), got shape {tuple(img.shape)}. "
            "Split 4D series into one 3D volume per file, or remove the case."
        )
    if np.issubdtype(data.dtype, np.floating) and data.dtype != np.float32:
        data = data.astype(np.float32)
    spacing = (zooms + (1.0, 1.0, 1.0))[:3]
    return data, spacing  # type: ignore[return-value]


def check_pair(
    image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Checks an image/label pair and returns ``(image float32, mask uint8 {0, 1})``.

    Args:
        image: the image array as read.
        mask: the label array as read (any labels; foreground = label > 0).
        image_path: the image file, for messages.
        mask_path: the mask file, for messages.

    Returns:
        The float32 image and the binarised uint8 mask.

    Raises:
        DataError: shapes differ, non-finite intensities or labels, or no foreground.
    """
    if image.shape != mask.shape:
        raise DataError(
            f"{image_path} has shape {tuple(image.shape)} but its mask {mask_path} has shape "
            f"{tuple(mask.shape)}; they must match voxel for voxel. Resample the mask onto "
            "the image grid, or remove the case."
        )
    image = np.asarray(image, dtype=np.float32)
    n_nan = int(np.isnan(image).sum())
    n_inf = int(np.isinf(image).sum())
    if n_nan or n_inf:
        raise DataError(
            f"{image_path}: {n_nan} NaN and {n_inf} inf voxels out of {image.size}; "
            "intensities must be finite. Fix the file (e.g. replace them by 0) or remove the case."
        )
    if np.issubdtype(mask.dtype, np.floating):
        n_bad = int((~np.isfinite(mask)).sum())
        if n_bad:
            raise DataError(
                f"{mask_path}: {n_bad} NaN/inf voxels in the mask; labels must be finite "
                "integers. Fix the file or remove the case."
            )
    binary = (mask > 0).astype(np.uint8)
    if not binary.any():
        raise DataError(
            f"{mask_path}: the mask has no foreground (label > 0) in any of its "
            f"{binary.shape[-1]} slices (labels found: {np.unique(mask)[:10].tolist()}). "
            "Check that it belongs to this image, or remove the case."
        )
    return image, binary


# --------------------------------------------------------------------------------------
# prostate_multisite

#: Site name -> folder name, where they differ (the SAML / MS-Net release).
PROSTATE_SITE_FOLDERS: dict[str, str] = {"BMC": "ISBI_1.5", "RUNMC": "ISBI"}

_PROSTATE_FILE = re.compile(r"^(?P<case>Case(?P<num>\d+))(?P<seg>_[Ss]egmentation)?\.nii(\.gz)?$")


class ProstateMultisite:
    """The multi-site prostate MR layout (``<root>/<SITE>/CaseNN[_segmentation].nii.gz``)."""

    name = "prostate_multisite"
    modality = "mr"

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
        root = Path(root)
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DataError(
                f"data root {root} {what}. Point data.root (or $OODSWEEP_DATA) at the folder "
                "that holds one sub-folder per site, or generate synthetic sites with "
                "trainables.data.synthetic.write_synthetic_sites."
            )
        return root

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

    def list_cases(self, root: Path, site: str) -> list[CaseFiles]:
        """Pairs the image and mask files of one site.

        Files whose names do not look like ``CaseNN[_segmentation].nii[.gz]`` are ignored.

        Args:
            root: the dataset root.
            site: site name (``BMC``, ``RUNMC``, ``BIDMC``, ``SiteA`` ...).

        Returns:
            The site's cases, sorted by case number.

        Raises:
            DataError: missing root or site folder, a folder without cases, an image
                without mask or a mask without image, or two files for the same role.
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
        for path in sorted(folder.iterdir()):
            m = _PROSTATE_FILE.match(path.name)
            if m is None or not path.is_file():
                continue
            case_id = m.group("case")
            numbers[case_id] = int(m.group("num"))
            role = masks if m.group("seg") else images
            if case_id in role:
                kind = "mask" if m.group("seg") else "image"
                raise DataError(
                    f"{folder}: two {kind} files for {case_id}: {role[case_id].name} and "
                    f"{path.name}. Keep one of them."
                )
            role[case_id] = path
        if not images and not masks:
            raise DataError(
                f"site folder {folder} holds no cases (expected CaseNN.nii.gz + "
                "CaseNN_segmentation.nii.gz). Check the site name and the data root."
            )
        for case_id, path in images.items():
            if case_id not in masks:
                raise DataError(
                    f"{path}: image without a mask (expected {case_id}_segmentation.nii.gz "
                    f"in {folder}). Add the mask or remove the image."
                )
        for case_id, path in masks.items():
            if case_id not in images:
                raise DataError(
                    f"{path}: mask without an image (expected {case_id}.nii.gz in {folder}). "
                    "Add the image or remove the mask."
                )
        order = sorted(images, key=lambda c: (numbers[c], c))
        return [CaseFiles(site=site, case_id=c, image=images[c], mask=masks[c]) for c in order]

    def load_case(self, files: CaseFiles) -> Case:
        """Reads one case and checks it.

        Args:
            files: the case's files, from :meth:`list_cases`.

        Returns:
            The case: float32 image, binarised uint8 mask (label > 0), spacing from the
            image header.

        Raises:
            DataError: unreadable file, not 3D, shape mismatch, non-finite intensities,
                or a mask without foreground.
        """
        image, spacing = read_nifti(files.image)
        mask, _ = read_nifti(files.mask)
        image, mask = check_pair(image, mask, files.image, files.mask)
        return Case(
            site=files.site,
            case_id=files.case_id,
            image=image,
            mask=mask,
            spacing=spacing,
            image_path=Path(files.image),
            mask_path=Path(files.mask),
        )


# --------------------------------------------------------------------------------------
# registry

#: Registry of dataset layouts, by name.
LAYOUTS: dict[str, Layout] = {"prostate_multisite": ProstateMultisite()}


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
