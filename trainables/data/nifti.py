"""NIfTI reading and the checks of the volume layouts (prostate MR, liver CT), via nibabel.

:func:`read_nifti` reads a 3D volume (any nibabel failure a :class:`DataError` naming the file),
:func:`check_orientation` compares the image and mask headers, and :func:`load_volume_case` is every
volume layout's ``load_case``: read both files, check them (:func:`.base.check_pair`) and binarise.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Case, CaseFiles, DataError, check_pair, file_problem, label_values

__all__ = ["read_nifti", "nifti_affine", "check_orientation", "load_volume_case"]


def read_nifti(path: Path, dtype: type | None = None,
               channels_last: bool = False) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reads a 3D NIfTI volume (or, with ``channels_last``, a 4D one whose 4th axis holds channels).

    Any failure of nibabel (missing file, truncated gzip, not NIfTI, corrupt header or
    data) becomes a :class:`DataError` naming the file. Trailing singleton axes beyond the
    third (``H x W x D x 1``) are dropped; anything else that is not 3D is an error.

    Args:
        path: the ``.nii`` or ``.nii.gz`` file.
        dtype: read straight into this dtype (nibabel scales in it: no float64 detour, which
            matters for the 0.5-1 GB volumes of LiTS); None keeps the stored type.
        channels_last: accept ``H x W x D x C`` (the Medical Segmentation Decathlon's multi-channel
            images); a 3D file is then returned as ``H x W x D x 1``.

    Returns:
        ``(array, spacing)``: the data as stored (scaling applied, dtype float32 when the
        file is scaled or float, else the stored integer dtype), and the voxel size in mm
        of the first three axes.

    Raises:
        DataError: the file cannot be read, or is not a 3D volume.
    """
    import nibabel as nib  # local: keeps importing the package light

    path = Path(path)
    bad = file_problem(path)  # a link loop or an unreadable file is named as such, not as a corrupt NIfTI
    if bad:
        raise DataError(bad)
    try:
        img = nib.load(str(path))
        # reading the array is where a truncated or corrupt gzip fails (EOFError,
        # zlib.error, OSError, ValueError ... depending on where it is cut): catch broadly
        shape = tuple(img.shape)
        if len(shape) > 3 and any(s != 1 for s in shape[3 + int(channels_last):]):
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
    if data is not None and channels_last:
        data = data.reshape(data.shape[:3] + (-1,)) if data.ndim >= 3 else data
    elif data is not None:
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
    if data is None or data.ndim != 3 + int(channels_last):
        want = "3D or 4D volume (H x W x D x channels)" if channels_last else "3D volume (H x W x D)"
        raise DataError(
            f"{path}: expected a {want}, got shape {tuple(img.shape)}. "
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
