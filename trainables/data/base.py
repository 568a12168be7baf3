"""The data package's base: errors, case files, the layout protocol and the checks every layout shares.

Every problem with the input data raises :class:`DataError`, whose message names the file or
folder, the bad value, and what to do about it. A layout (one module per dataset family:
:mod:`.prostate`, :mod:`.fundus`, :mod:`.liver`; the registry is :mod:`.layouts`) turns a root
folder into :class:`CaseFiles` and reads one into a :class:`Case`; everything downstream
(preprocessing, the slice cache) works on those and never looks at folder names or file spellings.

Every layout pairs files with :meth:`Layout.scan_cases`, which collects the pairing problems
of a site (an image without a mask, a mask without an image ...) instead of stopping at the
first, so that ``oodsweep data check`` can report all of them in one pass;
:meth:`Layout.list_cases` raises them together (:func:`raise_problems`).
"""
from __future__ import annotations

import errno
import os
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "DataError",
    "CaseFiles",
    "Case",
    "Layout",
    "BLOCK",
    "label_values",
    "check_pair",
    "pair_problems",
    "check_root",
    "raise_problems",
    "ScannedLayout",
    "file_problem",
    "summarize_problems",
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
        channels: layouts with one file per image channel (``nnunet``): the files of the
            channels after the first (``image``), in channel order.
    """

    site: str
    case_id: str
    image: Path
    mask: Path | None
    split: str | None = None
    lesion_masks: tuple[tuple[str, Path | None], ...] = ()
    channels: tuple[Path, ...] = ()

    def paths(self) -> list[Path]:
        """Every existing file of the case (image first)."""
        out = [Path(self.image)] + ([Path(self.mask)] if self.mask is not None else [])
        return out + [Path(p) for _, p in self.lesion_masks if p is not None] + [Path(p) for p in self.channels]


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
        channel_norms: the own-data layouts: how the cache scales each image channel to [0, 1]
            (``"percentile"``: the channel's 0.5/99.5 percentiles over the volume; ``"window"``: the
            CT window; ``"range255"``: 0..255); None: the layout's modality decides, as before.
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
    channel_norms: tuple[str, ...] | None = None


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


#: Slices per block when a whole-volume check runs block by block (bounded temporaries on
#: 512 x 512 x 987 LiTS volumes).
BLOCK = 32


def label_values(mask: np.ndarray) -> tuple[int, ...]:
    """The distinct values of a label array, block by block (no full-size temporary).

    Raises:
        DataError: never; non-integer values are returned as they are (rounded check is the
            caller's).
    """
    found: set = set()
    if mask.ndim < 3:
        return tuple(np.unique(mask).tolist())
    for z in range(0, mask.shape[2], BLOCK):
        found.update(np.unique(mask[:, :, z:z + BLOCK]).tolist())
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
    for z in range(0, image.shape[-1], BLOCK):  # block by block: bounded temporaries on big volumes
        block = image[..., z:z + BLOCK]
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
        raise DataError(f"{len(problems)} problems in {where}:\n  - " + "\n  - ".join(summarize_problems(problems)))


def file_problem(path: Path) -> str | None:
    """Why a file whose name a layout expects cannot be used, or None when it is a readable regular file.

    A symbolic-link loop, a broken link, a folder or other non-file under a case file's name, and a file
    that cannot be opened are named as such (``Path.is_file`` answers False for all of them, and the case
    would otherwise look like a missing file).
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return (f"{path}: a symbolic link loop (it points to {os.readlink(path)!r}, which leads back to "
                    "itself); replace the link with the file it should point to, or remove it")
        if path.is_symlink():
            return (f"{path}: a broken symbolic link (to {os.readlink(path)!r}, which does not exist); point it "
                    "at the file, or remove it")
        return f"{path}: cannot be read ({e.strerror or e}); check the file and its folder's permissions"
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, pipe or socket)"
        return f"{path}: {kind} where a case file is expected; move it away or replace it with the file"
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"{path}: unreadable ({e.strerror or e}); give the user running oodsweep read access (chmod a+r)"
    return None


def _kind(message: str) -> str:
    """A message with its paths and numbers abstracted: messages of one kind differ only there."""
    kind = re.sub(r"(?:\S*/\S*|\S+\.(?:nii|gz|png|jpe?g|tif+|bmp))", "<file>", message)
    return re.sub(r"\d+", "N", kind)


def summarize_problems(messages: list[str], first: int = 3) -> list[str]:
    """``messages`` grouped by kind (the same words but for paths and numbers), in order of first
    appearance: the first ``first`` of each kind, then one line "... and N more of this kind"."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for m in messages:
        groups.setdefault(_kind(m), []).append(m)
    out: list[str] = []
    for msgs in groups.values():
        out += msgs[:first]
        if len(msgs) > first:
            out.append(f"... and {len(msgs) - first} more of this kind")
    return out


class ScannedLayout:
    """The :meth:`Layout.list_cases` of a layout whose ``scan_cases`` collects the problems under ``root``:
    the scan's cases, with every pairing problem raised together (:func:`raise_problems`)."""

    def list_cases(self, root: Path, site: str) -> list[CaseFiles]:
        """Like :meth:`scan_cases`, every pairing problem an error (all in one DataError)."""
        cases, problems = self.scan_cases(root, site)
        raise_problems(problems, Path(root))
        return cases
