"""What a dataset's slice cache will hold, read from file headers only (``sweeps.guards`` sizes a spec
with it before anything is written): the number of slices, and the channels of an image and of a mask.

Volumes (NIfTI) give their depth from the header (nibabel reads the data lazily); a fundus photograph is
one slice of three channels. Nothing here reads voxels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .base import DataError
from .layouts import site_layout

__all__ = ["DataSize", "data_size"]


@dataclass(frozen=True)
class DataSize:
    """Slices per site and the channels a cache row has."""

    slices: dict[str, int]
    image_channels: int
    mask_channels: int

    @property
    def n_slices(self) -> int:
        return sum(self.slices.values())


def _depth(path: Path) -> int:
    import nibabel as nib  # local: keeps importing the package light

    try:
        shape = nib.load(str(path)).shape  # the header only
    except Exception as exc:  # noqa: BLE001 - nibabel raises many unrelated types
        raise DataError(f"{path}: cannot read its NIfTI header ({type(exc).__name__}: {exc})") from exc
    return int(shape[2]) if len(shape) >= 3 else 1


def data_size(layout: str, root: str | os.PathLike | None, sites: Sequence[str],
              site_sources: Mapping[str, tuple[str, str | os.PathLike]] | None = None,
              labels: Sequence[str] | None = None, layout_options: Mapping | None = None) -> DataSize:
    """Slices per site of the well-paired cases of ``sites`` (bad cases counted as good: an upper bound).

    Raises:
        DataError: a root or site folder is missing, or a header cannot be read (the cache build
            reports such problems in full; a caller sizing a spec may skip the estimate then).
    """
    slices: dict[str, int] = {}
    img_ch = mask_ch = 1
    for site in sites:
        lay_name, r = (site_sources or {}).get(site, (layout, root))
        if r is None:
            raise DataError(f"site {site!r} has no data root")
        lay = site_layout(lay_name, Path(r).expanduser(), layout_options)
        cases, _ = lay.scan_cases(Path(r).expanduser(), site)
        if lay.modality == "fundus":  # one photograph per case, RGB
            slices[site], img_ch = len(cases), 3
            mask_ch = len(labels) if labels else len(lay.labels)
        elif lay.modality == "image":  # folder2d: one image per case, RGB at most (an upper bound)
            slices[site], img_ch, mask_ch = len(cases), 3, len(lay.labels)
        else:
            if hasattr(lay, "channel_names"):  # nnunet, decathlon
                img_ch, mask_ch = len(lay.channel_names), len(lay.labels)
            slices[site] = sum(_depth(cf.image) for cf in cases)
    return DataSize(slices=slices, image_channels=img_ch, mask_channels=mask_ch)
