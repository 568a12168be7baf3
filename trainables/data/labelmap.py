"""Label names, selections and unions of the own-data layouts (``nnunet``, ``decathlon``, ``folder2d``).

A dataset names its label values (nnU-Net: ``{"background": 0, "PZ": 1, "TZ": 2}``, region labels with a
list of values, ``"whole": [1, 2]``; Decathlon: ``{"0": "background", "1": "PZ"}``; ``folder2d``:
``data.label_values``). ``data.labels`` picks the mask channels by name, or defines unions::

    labels: [PZ, TZ]                       # two channels
    labels: {whole_prostate: [PZ, TZ]}     # one channel, the union
    labels: [PZ, {whole_prostate: [PZ, TZ]}]

Default: every label but the background, one channel each. Each channel is the set of label values
that make it up (:data:`Channel`); the cache's ``label_kind`` is ``"exclusive"`` when no two channels
share a value (classes that cannot overlap: one softmax over background + classes is possible) and
``"overlapping"`` otherwise (unions next to their parts, region labels).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import DataError

__all__ = ["Channel", "select_labels", "label_kind", "cache_label_kind", "binarise", "ANY_NONZERO"]

#: A mask channel: (name, the label values that make it up); ``ANY_NONZERO`` as values: every value > 0.
Channel = tuple[str, tuple[int, ...]]
ANY_NONZERO: tuple[int, ...] = ()


def _values_of(name, available: dict[str, tuple[int, ...]], key: str, where: str) -> tuple[int, ...]:
    if not isinstance(name, str) or name not in available:
        raise DataError(f"{key}: unknown label {name!r}; the labels of {where} are {sorted(available)}. "
                        "Fix the name (labels are case-sensitive)")
    return available[name]


def select_labels(available: dict[str, tuple[int, ...]], selection, where: str,
                  key: str = "data.labels") -> tuple[Channel, ...]:
    """The mask channels ``selection`` names (see the module docstring).

    Args:
        available: label name -> its values, background excluded.
        selection: None (every label), a list of names and ``{name: [names]}`` unions, or a mapping of unions.
        where: the file that names the labels (for messages).
        key: the spec key (for messages).

    Raises:
        DataError: an unknown name, an empty union, a repeated channel name, no labels.
    """
    if selection is None:
        if not available:
            raise DataError(f"{where}: no labels besides the background; name the structures in its labels")
        return tuple((n, v) for n, v in available.items())
    items = list(selection.items()) if isinstance(selection, dict) else selection
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items:
        raise DataError(f"{key}: expected a list of label names and {{name: [labels]}} unions, got {selection!r}")
    out: list[Channel] = []
    for item in items:
        if isinstance(item, dict) and len(item) == 1:
            item = next(iter(item.items()))
        if isinstance(item, tuple):
            name, parts = item
            parts = [parts] if isinstance(parts, str) else parts
            if not isinstance(parts, list) or not parts:
                raise DataError(f"{key}: union {name!r} needs a list of labels, e.g. {{{name}: [PZ, TZ]}}; "
                                f"got {parts!r}")
            values = sorted({v for p in parts for v in _values_of(p, available, key, where)})
            out.append((str(name), tuple(values)))
        else:
            out.append((str(item), _values_of(item, available, key, where)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise DataError(f"{key}: repeated channel names {names}; give each channel (and union) its own name")
    return tuple(out)


def label_kind(channels: tuple[Channel, ...]) -> str:
    """``"exclusive"`` when no two channels share a label value (one channel always is), else ``"overlapping"``."""
    seen: set[int] = set()
    for _, values in channels:
        if not values or seen & set(values):
            return "overlapping" if len(channels) > 1 else "exclusive"
        seen |= set(values)
    return "exclusive"


def binarise(mask: np.ndarray, channels: tuple[Channel, ...], values: tuple, mask_path: Path,
             allowed: set[int] | None, where: str) -> np.ndarray:
    """The label array as one {0, 1} channel per selected label: ``... x L``, or the array's own shape for one.

    Args:
        mask: the label array as read.
        channels: the selected channels.
        values: the distinct values of ``mask``.
        mask_path: the label file (for messages).
        allowed: the values the dataset declares (background included); None: any non-negative integer.
        where: the file that declares them (for messages).

    Raises:
        DataError: a value the dataset does not declare (or a negative or fractional one), or no foreground
            in any channel.
    """
    bad = [v for v in values if v < 0 or v != int(v) or (allowed is not None and int(v) not in allowed)]
    if bad:
        expect = f"the labels {sorted(allowed)} declared in {where}" if allowed is not None else "integers >= 0"
        raise DataError(f"{mask_path}: label value(s) {bad[:10]} not in {expect} (found {list(values)[:12]}). "
                        f"Add the label to {where}, or fix the mask file, or remove the case")
    out = np.stack([(mask > 0) if not vals else np.isin(mask, vals) for _, vals in channels], axis=-1)
    if not out.any():
        raise DataError(f"{mask_path}: no foreground for the labels {[n for n, _ in channels]} (values found: "
                        f"{list(values)[:12]}). Check that the mask belongs to the image, or remove the case")
    out = out.astype(np.uint8)
    return out[..., 0] if len(channels) == 1 else out


def cache_label_kind(lays: Sequence, n_labels: int) -> str:
    """The cache's ``label_kind``: one label is ``"exclusive"`` (foreground vs background); else the
    layout's (configured layouts decide from their label values), the fundus lesions ``"overlapping"``."""
    if n_labels == 1:
        return "exclusive"
    return getattr(lays[0], "label_kind", None) or ("overlapping" if lays[0].modality == "fundus" else "exclusive")
