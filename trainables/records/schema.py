"""The record schema: the columns and types of every table the stages hand over (docs/architecture.md "Records").

The tables themselves are written and read by :mod:`.store`; the metrics that aggregate their
counts are :mod:`.metrics`. This module has no IO: it says what a valid table is
(:func:`conform`), and how records written by older versions are read (columns added later).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

#: The experiment's records folder (``<experiment>/records``).
RECORDS_DIR = "records"

#: The box-prompted archs of the model registry when ``oracle_prompt`` was added to MEMBER_COLUMNS:
#: records written before then lack the column, and it is derived from these names (with a warning).
LEGACY_PROMPTED_ARCHS = ("medsam", "medsam_tiny")

#: One row per pool member.
MEMBER_COLUMNS = {
    "member_id": "string",   # unique in the experiment, e.g. "unet_r18-lr0.001-s0-ep4"
    "run_id": "string",      # the training run (one run gives a member per snapshot epoch)
    "arch": "string",        # model registry name
    "lr": "float64",
    "epochs": "int64",       # the epoch this member was taken at
    "seed": "int64",
    "batch_size": "int64",
    "source": "string",      # source site name
    "checkpoint": "string",  # the member's weights, relative to the experiment (resolve_checkpoint)
    # True when the member's evaluation used labels: box-prompted members (models.MODELS[arch].prompted)
    # are prompted with each evaluated slice's ground-truth box, so their predictions (and every
    # "label-free" indicator computed from them) encode the target labels.
    "oracle_prompt": "bool",
}
# A pool imported from elsewhere (``oodsweep import``) adds ``imported: True`` after these columns and leaves
# ``checkpoint`` empty: it has predicted masks and no weights. Records of a trained pool have no such column.

#: One row per member x site x case x slice. Every metric derives from these counts.
#: Multi-label tasks (the fundus lesions, one mask channel each) add a ``label`` column (LABEL_COLUMN):
#: one row per slice and lesion, so that ``metric_by`` scores each lesion and averages them (MONAI's
#: per-channel mean); ``<metric>_micro`` pools the lesions' counts first. Records written before the
#: column existed hold one row per slice with the counts summed over the channels (micro only).
SLICE_COLUMNS = {
    "member_id": "string",
    "site": "string",        # site name as the spec names it
    "role": "string",        # "id" (source test split) or "ood" (a target site)
    "case_id": "string",
    "slice_idx": "int64",    # index of the 2D slice in its volume (last axis)
    "tp": "int64",
    "fp": "int64",
    "fn": "int64",
    "tn": "int64",
    "area_px": "int64",      # pixels in the evaluated slice (H*W, x L labels); tp+fp+fn+tn == area_px
}

#: The optional per-lesion column of the slice records (multi-label tasks).
LABEL_COLUMN = "label"

#: One row per member x site x case x label: surface distances on the slice cache's grid at its physical
#: spacing (``trainables.surface``). Written per member as ``surface/<member_id>.parquet`` before the member's
#: record, merged into ``surface.parquet``. Experiments scored before it existed have none (the analysis then
#: refuses ``--metric hd95``/``nsd`` with the fix).
SURFACE_COLUMNS = {
    "member_id": "string",
    "site": "string",
    "role": "string",
    "case_id": "string",
    "label": "string",          # the mask channel (the cache's label name; "foreground" for one label)
    "hd95_mm": "float64",      # MONAI compute_hausdorff_distance(percentile=95); one mask empty: the volume's
                               # diagonal (mm); both empty: NaN
    "nsd": "float64",          # MONAI compute_surface_dice at tolerance_mm; one empty: 0; both empty: NaN
    "empty": "string",         # "none", "pred" (nothing predicted), "truth" (nothing to find) or "both"
    "tolerance_mm": "float64",
    "spacing_h": "float64",    # the cache grid's voxel size (mm; native pixels where the file has none)
    "spacing_w": "float64",
    "spacing_d": "float64",
}

# --- the uncertainty stage's records (docs/architecture.md "Records", "Uncertainty") -----
# One row per member x method x site x case x slice. ``method`` is "ggd" (the paper's delta net on
# {y_hat, x}), "bayescap" (BayesCap as published, on y_hat only), "tta_noise", "tta_color", "mc_dropout"
# or "ggd_yhat_only" (the ablation: our delta without the image). An image's
# ``uncertain_px`` (docs/architecture.md "Records") is the "ggd" rows here: several methods score
# the same slice, so they live in their own long table instead of widening slices.parquet.
#
#   records/uncertainty/parts/<member_id>.parquet   per slice (UNCERTAINTY_COLUMNS), written by one
#                                                   uncertainty trial, last (the trial's done marker)
#   records/uncertainty/sites/<member_id>.parquet   per method x site (UNCERTAINTY_SITE_COLUMNS)
#   records/uncertainty/fits/<member_id>.json       the member's δ fit: settings and convergence
#                                                   (loss per epoch, Dice(μ > 0.5, ŷ) on held-out slices)
#   records/uncertainty.parquet                     merged by the driver (or the first reader)
#   records/uncertainty_sites.parquet               merged likewise
#   records/uncertainty/examples/<member_id>.npz    a few slices for the qualitative figure:
#       image (K x H x W float), truth, pred, error (K x H x W bool), mu, uncertainty (K x H x W float),
#       site, case_id (K str), slice_idx (K int)
UNCERTAINTY_METHODS = ("ggd", "bayescap", "tta_noise", "tta_color", "mc_dropout", "ggd_yhat_only")
UNCERTAINTY_COLUMNS = {
    "member_id": "string",
    "method": "string",
    "site": "string",
    "role": "string",
    "case_id": "string",
    "slice_idx": "int64",
    "uncertain_px": "int64",     # pixels above the Otsu threshold of this slice's uncertainty map
    "error_px": "int64",         # fp + fn of the frozen member's prediction on this slice
    "area_px": "int64",
    "mean_uncertainty": "float64",
    "uncertain_error_px": "Int64",  # pixels both uncertain (Otsu, as uncertain_px) and wrong (error_px)
    "fixed_px": "Int64",         # pixels above the member's source threshold (Otsu fitted once on every
                                 # source test map of this method); <NA> where the method did not score the source
    "map_ptp": "float64",        # max - min of the slice's map (the flatness guard reads it)
}
#: Columns added after the first release: records written before them read as <NA> / NaN there.
UNCERTAINTY_LATER_COLUMNS = ("uncertain_error_px", "fixed_px", "map_ptp")

#: One row per member x method x site: how well the map ranks the member's error pixels.
UNCERTAINTY_SITE_COLUMNS = {
    "member_id": "string",
    "method": "string",
    "site": "string",
    "role": "string",
    "prompted": "bool",          # the member is box-prompted (SAM family): the paper's Table 4 is for these
    "auroc": "float64",          # sklearn roc_auc_score(error mask, map) over every pixel of the site; NaN if
    "ap": "float64",             # the site has no error pixel or no correct one; average_precision_score likewise
    "error_px": "int64",         # error pixels of the site (the positives)
    "area_px": "int64",          # pixels of the site
    "source_threshold": "float64",  # the threshold behind fixed_px (NaN: no source maps)
    # the same ranking within the error band: the pixels within band_width_px (the cache grid's pixels) of
    # the union of the predicted and the true mask, per slice. Every error pixel is in it; it drops the easy
    # far background, so a map that lights up the predicted structure no longer scores for it.
    "auroc_band": "float64",     # NaN: the band has no error pixel or no correct one (or older records)
    "ap_band": "float64",
    "band_px": "Int64",          # pixels in the band (<NA>: older records)
    "band_error_frac": "float64",  # error pixels / band_px: the band's base rate (AP's chance level there)
    "band_width_px": "Int64",    # the band's width (uncertainty.band_px)
}
#: Site columns added after the first release: records written before them read as <NA> / NaN (with a warning).
UNCERTAINTY_SITE_LATER_COLUMNS = ("auroc_band", "ap_band", "band_px", "band_error_frac", "band_width_px")


def derive_oracle_prompt(members: pd.DataFrame, what: str) -> pd.DataFrame:
    """Records written before ``oracle_prompt`` existed: derive it from the arch, with a warning.

    The records module may not import the model registry (the analysis imports ``trainables.records``
    only, without torch), so the derivation uses ``LEGACY_PROMPTED_ARCHS``: records without the column
    predate it, and these were the registry's box-prompted models then (newer ones always write it).
    """
    import warnings

    if "oracle_prompt" in members.columns or "arch" not in members.columns:
        return members
    derived = members["arch"].astype(str).isin(LEGACY_PROMPTED_ARCHS)
    warnings.warn(f"{what}: no 'oracle_prompt' column (records written before it existed); derived it from "
                  f"the arch (box-prompted medsam* members: {int(derived.sum())} of {len(members)}). Rewrite "
                  f"the records with the current pool stage to store it", UserWarning, stacklevel=3)
    return members.assign(oracle_prompt=derived)


def conform(df: pd.DataFrame, columns: dict[str, str], what: str) -> pd.DataFrame:
    """``df`` with the schema's ``columns`` first, in order and typed (extra columns kept after them).

    Raises:
        ValueError: a column of the schema is missing (the message names ``what`` and lists them).
    """
    if columns is MEMBER_COLUMNS:
        df = derive_oracle_prompt(df, what)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}; expected {list(columns)}")
    extra = [c for c in df.columns if c not in columns]
    return df[list(columns) + extra].astype(columns)


def with_later_columns(df: pd.DataFrame) -> pd.DataFrame:
    """An experiment scored before ``UNCERTAINTY_LATER_COLUMNS`` existed: those columns as <NA> / NaN."""
    for c in UNCERTAINTY_LATER_COLUMNS:
        if c not in df.columns:
            dtype = UNCERTAINTY_COLUMNS[c]
            df[c] = pd.Series(pd.NA if dtype == "Int64" else np.nan, index=df.index, dtype=dtype)
    return df


def with_later_site_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Site records written before ``UNCERTAINTY_SITE_LATER_COLUMNS`` existed: those columns as <NA> / NaN,
    with a warning that says how to get them (also when a merged table already holds them as <NA>: a band
    scored by the current stage always records its ``band_width_px``)."""
    import warnings

    missing = [c for c in UNCERTAINTY_SITE_LATER_COLUMNS if c not in df.columns]
    if missing:
        df = df.copy()
        for c in missing:
            dtype = UNCERTAINTY_SITE_COLUMNS[c]
            df[c] = pd.Series(pd.NA if dtype == "Int64" else np.nan, index=df.index, dtype=dtype)
    old = df["band_width_px"].isna()
    if old.any():
        warnings.warn(f"uncertainty site records: {int(old.sum())} of {len(df)} rows have no error band (scored "
                      f"before it existed): auroc_band, ap_band, band_px, band_error_frac read as NaN. Run the "
                      f"uncertainty stage again to get the band's AUROC/AP (it skips the members whose records "
                      f"exist under records/uncertainty/: move those aside first)", UserWarning, stacklevel=3)
    return df
