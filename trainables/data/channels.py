"""Per-channel intensity scaling of the own-data layouts' images, for the slice cache.

A case that says how to scale each channel (:attr:`.base.Case.channel_norms`) is scaled channel by
channel: ``"percentile"`` clips the channel to its own 0.5/99.5 percentiles over the whole volume (the
MR rule of the fixed layouts, per channel), ``"window"`` clips it to the CT window, ``"range255"`` maps
0..255; then [0, 1] and a bilinear resize to ``S x S``, slab by slab as the fixed layouts' path.
The fixed layouts never come here (their arithmetic stays as it was).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["NORMS", "channel_ranges", "scale_channels"]

NORMS = ("percentile", "window", "range255")


def channel_ranges(image: np.ndarray, norms: Sequence[str], window: tuple[float, float]) -> list[tuple[float, float]]:
    """``(low, high)`` of each channel of ``image`` (``H x W x D x C``) under its norm."""
    if image.shape[-1] != len(norms):
        raise ValueError(f"{image.shape[-1]} channels but {len(norms)} norms")
    out = []
    for c, norm in enumerate(norms):
        if norm == "percentile":
            lo, hi = np.percentile(image[..., c], [0.5, 99.5])
            out.append((float(lo), float(hi)))
        elif norm == "window":
            out.append((float(window[0]), float(window[1])))
        elif norm == "range255":
            out.append((0.0, 255.0))
        else:
            raise ValueError(f"channel norm {norm!r}; known: {NORMS}")
    return out


def scale_channels(image: np.ndarray, norms: Sequence[str], size: int, window: tuple[float, float],
                   anti_aliasing: bool, slab: int = 32) -> np.ndarray:
    """``H x W x D`` or ``H x W x D x C`` raw intensities -> ``D x C x S x S`` float16 in [0, 1]."""
    from monai.transforms import Resize, ScaleIntensityRange

    img = image if image.ndim == 4 else image[..., None]
    scalers = [ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
               for lo, hi in channel_ranges(img, norms, window)]
    resize = Resize(spatial_size=(size, size, -1), mode="bilinear", align_corners=False, anti_aliasing=anti_aliasing)
    depth, n_ch = img.shape[2], img.shape[3]
    out = np.empty((depth, n_ch, size, size), np.float16)
    for z in range(0, depth, slab):
        part = np.moveaxis(img[:, :, z:z + slab, :], -1, 0).astype(np.float32)  # C x H x W x d (MONAI)
        part = np.concatenate([np.asarray(s(part[c:c + 1]), dtype=np.float32) for c, s in enumerate(scalers)])
        out[z:z + slab] = np.moveaxis(np.asarray(resize(part), dtype=np.float32), -1, 0)
    return out
