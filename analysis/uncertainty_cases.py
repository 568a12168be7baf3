"""The uncertainty records summed per case as they are read: what the analysis keeps of them at scale.

``records/uncertainty.parquet`` holds one row per member x method x site x slice: 25 million rows at
2,000 members, five methods, five sites and 500 slices (about 1.1 GiB even as the compact frame of
``trainables.records.load_uncertainty_compact``). Every reading the analysis takes of it is a mean over
images of a per-image value: δ's indicators (``analysis.uncertainty_indicators``) per member and site, the
case bootstrap's readings per member and case, Table 4 and C5's squared errors per method and site or per
member and method. So the analysis keeps, per member x method x site x role x case, the number of images
and, per reading, the sum of its values over the images and two counts (``case_sums``):

* ``<reading>``: the sum over the case's images of the values that are not NaN (a sum as pandas' ``sum``);
* ``<reading>_n``: how many of them are not NaN (so ``sum / n`` is pandas' ``mean``, which skips NaN);
* ``<reading>_bad``: how many are not finite (NaN or infinite: the case bootstrap drops such a member);

plus ``n_images`` and ``pixel_na`` (images without ``uncertain_error_px``, scored before it existed: the
pixel reading is left out when any has none). The readings (``READINGS``): ``uncertain_area``,
``mean_uncertainty``, ``fixed_threshold_area``, ``guarded_area`` (with ``FLAT_TOL``), and Table 4's
``sq_area`` and ``sq_pixel``.

A mean over images is then the sum of the case sums over the sum of the counts. The values are the per-slice
means' up to the order of the additions (a few units in the last place of a float64); the claims report
rounds to ten significant digits. ``read_case_sums`` reads the file in batches
(``trainables.records.iter_uncertainty_batches``), so the peak is the per-case table plus one batch.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

#: The flatness guard's tolerance: a map whose max - min is below this counts as certain. The maps
#: are variances of a [0, 1] target (δ's Eq. 8; the baselines' variance of probabilities), at most
#: 0.25 for a coin flip; 0.01 is 4% of that range, far above float noise, far below a real error's map.
FLAT_TOL = 0.01

#: The keys of a case-sum row.
CASE_KEYS = ("member_id", "method", "site", "role", "case_id")

#: The per-image readings summed per case (see the module docstring).
READINGS = ("uncertain_area", "mean_uncertainty", "fixed_threshold_area", "guarded_area", "sq_area", "sq_pixel")


def guarded_area(uncertain_px: np.ndarray, map_ptp: np.ndarray, area_px: np.ndarray | int,
                 flat_tol: float = FLAT_TOL) -> np.ndarray:
    """Per image: the Otsu area fraction, 0 where the map's spread is below ``flat_tol``."""
    frac = np.asarray(uncertain_px, dtype=float) / np.asarray(area_px, dtype=float)
    return np.where(np.asarray(map_ptp, dtype=float) >= flat_tol, frac, 0.0)


def _col(u: pd.DataFrame, name: str) -> np.ndarray:
    """A column as float64 (NaN for a missing value, or for the whole column when the records lack it)."""
    if name not in u.columns:
        return np.full(len(u), np.nan)
    return u[name].astype("Float64").to_numpy(dtype=float, na_value=np.nan)


def per_image(u: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each reading's value per slice row of ``u`` (the uncertainty slice records), as the analysis forms them."""
    area = _col(u, "area_px")
    unc_px, err_px, both = _col(u, "uncertain_px"), _col(u, "error_px"), _col(u, "uncertain_error_px")
    ptp = _col(u, "map_ptp")
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "uncertain_area": unc_px / area,
            "mean_uncertainty": _col(u, "mean_uncertainty"),
            "fixed_threshold_area": _col(u, "fixed_px") / area,
            # NaN spread (old records): the guard cannot be applied, so no value
            "guarded_area": np.where(np.isfinite(ptp), guarded_area(unc_px, ptp, area), np.nan),
            "sq_area": ((unc_px - err_px) / area) ** 2,
            "sq_pixel": (unc_px + err_px - 2 * both) / area,
        }


def _counts_as_int32(cs: pd.DataFrame) -> pd.DataFrame:
    """A case-sum table with its count columns as int32 (plenty: a case has at most a few thousand images)."""
    for c in cs.columns:
        if c == "n_images" or c == "pixel_na" or c.endswith(("_n", "_bad")):
            cs[c] = cs[c].astype(np.int32)
    return cs


def is_case_sums(unc: pd.DataFrame) -> bool:
    """Whether ``unc`` is a case-sum table (``case_sums``) rather than slice records."""
    return "n_images" in unc.columns


def case_sums(unc: pd.DataFrame) -> pd.DataFrame:
    """The slice records ``unc`` summed per member x method x site x role x case (the module docstring); a
    case-sum table is returned as it is. The keys keep their dtype (categoricals stay categoricals, with
    only the observed combinations as rows)."""
    if is_case_sums(unc):
        return unc
    keys = [c for c in CASE_KEYS if c in unc.columns]
    vals = per_image(unc)
    cols: dict[str, np.ndarray] = {"n_images": np.ones(len(unc), np.int64),
                                   "pixel_na": (unc["uncertain_error_px"].isna().to_numpy(dtype=bool)
                                                if "uncertain_error_px" in unc.columns
                                                else np.ones(len(unc), bool)).astype(np.int64)}
    for name, v in vals.items():
        nan = np.isnan(v)
        cols[name] = np.where(nan, 0.0, v)
        cols[f"{name}_n"] = (~nan).astype(np.int64)
        cols[f"{name}_bad"] = (~np.isfinite(v)).astype(np.int64)
    frame = pd.DataFrame(cols, index=unc.index)
    out = frame.groupby([unc[k] for k in keys], sort=True, observed=True, dropna=False).sum()
    out = out.reset_index()
    return _counts_as_int32(out)


def merge_case_sums(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Case-sum tables of parts of the same records (e.g. batches of a file) as one: the sums of each key's rows."""
    if not parts:
        return pd.DataFrame(columns=[*CASE_KEYS, "n_images"])
    if len(parts) == 1:
        return parts[0]
    keys = [c for c in CASE_KEYS if c in parts[0].columns]
    whole = pd.concat(parts, ignore_index=True)
    for k in keys:  # categoricals of different batches: one set of categories (union), sorted
        if any(isinstance(p[k].dtype, pd.CategoricalDtype) for p in parts):
            cats = sorted(set().union(*(p[k].cat.categories if isinstance(p[k].dtype, pd.CategoricalDtype)
                                        else p[k].dropna().unique() for p in parts)))
            whole[k] = pd.Categorical(whole[k].astype(object), categories=pd.Index(cats, dtype="string"))
    return _counts_as_int32(whole.groupby(keys, sort=True, observed=True, dropna=False).sum().reset_index())


def read_case_sums(path: str | os.PathLike, batch_rows: int | None = None) -> pd.DataFrame:
    """One uncertainty parquet file as its case sums, read in batches (``batch_rows`` slice rows each)."""
    from trainables.records import iter_uncertainty_batches

    import pyarrow as pa

    parts = [case_sums(b) for b in iter_uncertainty_batches(path, batch_rows)]
    out = merge_case_sums(parts)
    del parts
    pa.default_memory_pool().release_unused()  # the batches' buffers: back to the OS, not kept for later
    return out


def mean_over_images(cs: pd.DataFrame, reading: str, by: list, skipna: bool = True) -> pd.Series:
    """The mean over images of ``reading`` per group ``by`` (column names or arrays aligned with ``cs``).

    ``skipna``: pandas' ``mean`` (NaN images left out); False: NaN for a group with any NaN image (as the
    indicators read a member x site)."""
    g = cs[[reading, f"{reading}_n", "n_images"]].groupby(by, sort=True, observed=True, dropna=False).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        out = g[reading] / g[f"{reading}_n"].where(g[f"{reading}_n"] > 0)
    if not skipna:
        out = out.mask(g[f"{reading}_n"] < g["n_images"])
    return out
