"""The label channels of multi-label slice records (docs/statistics.md "Several labels").

A multi-label task records one slice row per label (``LABEL_COLUMN``), in the slice cache's channel order, and
stores its predicted masks as ``N x L x H x W`` bits. ``label_names`` gives that order back from the records (the
analysis reads no slice cache), ``select_label`` keeps one label's rows, so that every metric is that label's.
"""
from __future__ import annotations

import pandas as pd

from .schema import LABEL_COLUMN


def label_names(slices: pd.DataFrame) -> list[str]:
    """The labels of ``slices`` in channel order (their order within each slice's rows); ``[]`` for records
    without a ``label`` column (one label)."""
    if LABEL_COLUMN not in slices.columns or slices.empty:
        return []
    return [str(x) for x in pd.unique(slices[LABEL_COLUMN].astype(str))]


def select_label(slices: pd.DataFrame, label: str, where: str = "the slice records") -> pd.DataFrame:
    """The rows of ``label`` only (the ``label`` column dropped: one label is a binary task).

    Raises:
        ValueError: the records have no ``label`` column, or not this label (the message lists the labels).
    """
    names = label_names(slices)
    if label not in names:
        have = f"labels {names}" if names else "one label (no 'label' column)"
        raise ValueError(f"label {label!r}: {where} hold {have}; give one of them"
                         + ("" if names else ", or leave the label out"))
    return slices[slices[LABEL_COLUMN].astype(str) == label].drop(columns=[LABEL_COLUMN]).reset_index(drop=True)
