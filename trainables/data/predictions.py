"""Predicted masks written elsewhere (``oodsweep import``): find a case's file, read it, check it against the
case's ground truth, and put it on the slice cache's grid.

A prediction is one file per case, named by the case id as the dataset layout names it: ``<case_id>.nii.gz``
(or ``.nii``) for volumes, ``<case_id>.png`` for 2D photographs. The checks, each a ``DataError`` that names
the member, site, case and file (``where``):

* the shape equals the case's ground-truth mask as stored (``H x W x D``; ``H x W`` for a photograph);
* NIfTI only: the orientation (``nibabel.aff2axcodes`` of the affine) equals the ground truth's, as the
  dataset reader checks an image against its mask (``trainables.data.nifti.check_orientation``); the same
  orientation with another origin or spacing is a warning only, as there;
* the values are binary (0/1 or false/true): a probability or label map is refused (threshold it first).

Then it goes onto the cache grid through the cache's own mask resampling (``trainables.data.cache.resize_masks``:
nearest neighbour, depth kept), so a prediction lands on the same pixels as the ground truth it is scored against.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import CaseFiles, DataError

__all__ = ["PREDICTION_SUFFIXES", "case_of", "reference_shape", "read_prediction"]

#: file names a prediction may have: ``<case_id><suffix>``
PREDICTION_SUFFIXES = (".nii.gz", ".nii", ".png")


def case_of(path: Path) -> str | None:
    """The case id a prediction file names (``Case03.nii.gz`` -> ``Case03``), None for another kind of file."""
    for suffix in PREDICTION_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def reference_shape(files: CaseFiles) -> tuple[int, ...]:
    """The shape of a case's ground truth as stored: ``H x W x D`` (NIfTI header) or ``H x W`` (a photograph)."""
    ref = Path(files.mask) if files.mask is not None else Path(files.image)
    if _is_nifti(ref):
        import nibabel as nib

        shape = tuple(int(s) for s in nib.load(str(ref)).shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        return shape
    from PIL import Image

    with Image.open(ref) as im:
        return (int(im.size[1]), int(im.size[0]))


def read_prediction(path: Path, files: CaseFiles, where: str) -> tuple[np.ndarray, list[str]]:
    """One case's predicted mask, checked against its ground truth (``files``), as ``H x W x D`` uint8.

    Args:
        path: the prediction file (NIfTI for volume layouts, PNG for photographs).
        files: the case's dataset files (the ground truth it must match).
        where: "member M, site S, case C" for the messages.

    Returns:
        ``(mask, warnings)``: ``H x W x D`` uint8 in {0, 1} (a photograph: ``D = 1``), and the header
        warnings (same orientation, other origin or spacing).

    Raises:
        DataError: unreadable, another shape, another orientation, non-binary values (each names
            ``where`` and the file).
    """
    from .nifti import check_orientation, read_nifti

    path = Path(path)
    want = reference_shape(files)
    ref = Path(files.mask) if files.mask is not None else Path(files.image)
    warnings: list[str] = []
    if _is_nifti(path) != _is_nifti(ref):
        raise DataError(f"{where}: {path}: a {'NIfTI' if _is_nifti(path) else 'PNG'} prediction for a dataset whose "
                        f"ground truth is {ref.name}; write the prediction as "
                        f"{files.case_id}{'.nii.gz' if _is_nifti(ref) else '.png'}")
    try:
        if _is_nifti(path):
            arr, _ = read_nifti(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
            if arr.ndim == 3:  # an RGB(A) export of a binary mask: every channel must agree
                if not (arr == arr[..., :1]).all():
                    raise DataError(f"{path}: a colour image whose channels differ; write the mask as one "
                                    f"grey channel")
                arr = arr[..., 0]
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001  (Pillow raises several types)
        raise DataError(f"{where}: {path}: cannot read it as an image ({type(e).__name__}: {e}); rewrite it as "
                        f"PNG") from None
    if tuple(arr.shape) != want:
        raise DataError(f"{where}: {path} has shape {tuple(arr.shape)} but the case's ground truth {ref} has shape "
                        f"{want}; write the prediction on the ground truth's grid (the original image's size, not "
                        f"a resampled or cropped one)")
    if _is_nifti(path):
        try:
            warnings = check_orientation(ref, path)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    values = np.unique(arr)
    bad = [v for v in values.tolist() if v not in (0, 1)]
    if bad:
        raise DataError(f"{where}: {path} is not a binary mask (values {values[:8].tolist()}"
                        f"{' ...' if len(values) > 8 else ''}); write 0 for background and 1 for the structure "
                        f"(threshold a probability map, e.g. at 0.5; merge the labels of a label map)")
    out = arr.astype(np.uint8)
    return (out[..., None] if out.ndim == 2 else out), [f"{where}: {w}" for w in warnings]
