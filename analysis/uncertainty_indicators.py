"""Uncertainty indicators beside the paper's Otsu area, and how well each method's map finds errors.

All read the uncertainty stage's records (``trainables.records``: per slice ``uncertain_px``,
``uncertain_error_px``, ``fixed_px``, ``map_ptp``, ``mean_uncertainty``; per site ``auroc``, ``ap``),
never the maps themselves. One value per (pool member, site), from the δ net's ("ggd") maps:

======================  =============================================================================
indicator               value for member m on site t (a mean over t's images)
======================  =============================================================================
uncertain_area          the paper's: pixels above each image's own Otsu threshold, as a fraction of the
                        image (the primary, unchanged). Otsu splits any histogram in two, so a flat
                        map plus noise still gets an area, and scaling a map changes nothing.
mean_uncertainty        the mean of the map (Eq. 8's variance): the level, with no threshold.
fixed_threshold_area    pixels above one threshold per member, Otsu fitted once on all of the
                        member's source test maps and applied to every site: a target whose maps are
                        higher gets more area (the level counts).
guarded_area            the paper's area, but an image whose map spreads less than ``FLAT_TOL``
                        (max - min, in the variance's units) counts as certain (area 0): Otsu's split
                        of a flat map is noise.
======================  =============================================================================

Lower is better for each (more uncertainty promises a worse OOD score).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

# the flatness guard (FLAT_TOL, guarded_area) lives with the per-case sums that apply it while the records are read
from analysis.uncertainty_cases import FLAT_TOL, case_sums, guarded_area, mean_over_images  # noqa: F401

#: name -> (column of the indicator table, what it measures: the caption line in tables.md).
UNCERTAINTY_INDICATORS: dict[str, str] = {
    "uncertain_area": "the paper's: mean fraction of each image above its own Otsu threshold (primary)",
    "mean_uncertainty": "the mean of the variance map (Eq. 8): the level of uncertainty, no threshold",
    "fixed_threshold_area": "mean fraction above the member's source threshold (Otsu fitted once on its "
                            "source test maps, applied to every site): the level counts",
    "guarded_area": f"the paper's area with a flatness guard: an image whose map spreads (max − min) less "
                    f"than {FLAT_TOL:g} counts as certain",
}


def uncertainty_indicator_frame(unc: pd.DataFrame, method: str = "ggd") -> pd.DataFrame:
    """Every uncertainty indicator per (member_id, site) from one method's records.

    Args:
        unc: the uncertainty records: slice records (``records.load_uncertainty``, one row per member x method x
            site x slice) or their case sums (``analysis.uncertainty_cases.case_sums``: what the analysis reads;
            the flatness guard at ``FLAT_TOL``).
        method: the method whose maps are read (the δ net: ``"ggd"``).

    Returns:
        Indexed by (member_id, site), one column per ``UNCERTAINTY_INDICATORS`` name, each the mean over the
        site's images; NaN where any image has none (a mean over part of the images would mislead), e.g.
        where the records lack the column (an experiment scored before it existed).
    """
    cs = case_sums(unc[(unc["method"] == method).to_numpy(dtype=bool)])
    keys = [cs["member_id"].astype(str).to_numpy(), cs["site"].astype(str).to_numpy()]
    out = pd.DataFrame({name: mean_over_images(cs, name, keys, skipna=False) for name in UNCERTAINTY_INDICATORS})
    out.index.names = ["member_id", "site"]
    return out


# --- how well each method's map finds the error pixels ------------------------------------------

#: The error band's rows of ``error_ranking_table``: statistic -> the site records' column (its median).
BAND_STATISTICS = (("median AUROC (band)", "auroc_band"), ("median AP (band)", "ap_band"),
                   ("band error fraction", "band_error_frac"), ("band width (px)", "band_width_px"))


def error_ranking_table(sites: pd.DataFrame, roles: dict[str, str], source: str) -> pd.DataFrame:
    """Median (over members) pixel AUROC and AP of each method's map for the error pixels, per site.

    Args:
        sites: ``records.load_uncertainty_sites``.
        roles: site -> role; columns in the order OOD targets, then the source.
        source: the source's name for the column labels.

    Returns:
        Columns ``method, statistic`` then one per site. Statistics: ``median AUROC``, ``median AP`` (every
        pixel); ``median AUROC (band)``, ``median AP (band)`` (within the error band: the pixels near the
        predicted or the true mask, ``records.UNCERTAINTY_SITE_COLUMNS``), ``band error fraction`` (median:
        the band's base rate, AP's chance level there), ``band width (px)``; NaN where the records predate the
        band; ``members``.
    """
    order = [s for s, r in roles.items() if r == "ood"] + [s for s, r in roles.items() if r == "id"]
    order += sorted(set(sites["site"].astype(str)) - set(order))
    rows = []
    stats = (("median AUROC", "auroc"), ("median AP", "ap"), *BAND_STATISTICS)
    for method, g in sites.groupby("method", sort=False):
        for stat, col in stats:
            vals = g[col].astype(float) if col in g.columns else pd.Series(math.nan, index=g.index)
            med = vals.groupby(g["site"].astype(str)).median()
            rows.append({"method": method, "statistic": stat, **{s: med.get(s, math.nan) for s in order}})
        n = g.groupby(g["site"].astype(str))["auroc"].count()
        rows.append({"method": method, "statistic": "members", **{s: float(n.get(s, 0)) for s in order}})
    out = pd.DataFrame(rows, columns=["method", "statistic", *order])
    out.columns = ["method", "statistic"] + [f"{source} → {s}" if roles.get(s) == "ood" else f"{s} (same)"
                                             for s in order]
    return out


def error_ranking_markdown(t: pd.DataFrame, labels: dict[str, str]) -> str:
    """The AUROC/AP table in markdown (three decimals; member counts as integers)."""
    cols = [c for c in t.columns if c not in ("method", "statistic")]
    shown = pd.DataFrame({"method": [labels.get(m, m) for m in t["method"]], "statistic": t["statistic"]})
    for c in cols:
        shown[c] = [("–" if not math.isfinite(float(v)) else
                     (f"{int(v)}" if s in ("members", "band width (px)") else f"{float(v):.3f}"))
                    for v, s in zip(t[c], t["statistic"])]
    caption = ("**Does the map find the errors?** Per method and site, the median over pool members of the pixel "
               "AUROC and average precision of the method's uncertainty map as a score for the member's error "
               "pixels (every pixel of the site's images; scikit-learn). 0.5 is chance; AP's chance level is the "
               "error fraction. members: how many members the site's median is over (an AUROC is undefined for a "
               "member with no error pixel).") + BAND_CAPTION
    band = t.loc[t["statistic"].isin([b for b, _ in BAND_STATISTICS]), cols].to_numpy(dtype=float)
    if cols and len(t) and not np.isfinite(band).any():
        caption += (" *The band rows are empty: these uncertainty records were scored before the error band "
                    "existed; run the uncertainty stage again to get them.*")
    from analysis.tables import markdown_table

    return caption + "\n\n" + markdown_table(shown)


#: What the band rows of the error-ranking table are, and why (``error_ranking_markdown``'s caption).
BAND_CAPTION = (" *(band)*: the same within the error band, the pixels within `band width (px)` pixels (cache grid, "
                "per slice) of the union of the predicted and the true mask. Every error pixel lies in that union, so "
                "the band keeps all the errors and drops only the correct background far from both masks: a map "
                "that merely lights up the predicted structure scores high over the whole image and lower here. "
                "*band error fraction*: the band's error pixels / its pixels, AP's chance level in the band.")


def indicators_markdown(flat_tol: float = FLAT_TOL) -> str:
    """What each uncertainty indicator measures (the tables.md section)."""
    lines = ["**Uncertainty indicators** (each from the δ net's per-pixel variance map, mean over the site's "
             "images; lower promises a better OOD score):", ""]
    for name, what in UNCERTAINTY_INDICATORS.items():
        lines.append(f"- `{name}`: {what.replace(f'{FLAT_TOL:g}', f'{flat_tol:g}')}.")
    return "\n".join(lines)


# --- Table 4, both readings; the maps' AUROC; δ's fits: the analysis' uncertainty sections -------

#: Table 4's captions per reading (``analysis.table4.TABLE4_READINGS``).
TABLE4_CAPTIONS = {
    "area": "mean over images of (uncertain-area fraction − error fraction)²: how much is uncertain, not where",
    "pixel": "mean over images of the pixel-wise MSE between the binary uncertain mask (Otsu) and the binary "
             "error mask, (uncertain + error − 2 · both) / pixels: where it is uncertain counts",
}


def _members_scored_by_all(unc: pd.DataFrame) -> int:
    return int((unc.groupby("member_id", observed=True)["method"].nunique() == unc["method"].nunique()).sum())


#: The Table-4 methods that run the member's model (an imported member, which has none, is not scored by them).
MODEL_METHODS = ("tta_noise", "tta_color", "mc_dropout")


def imported_note(members: pd.DataFrame | None) -> str | None:
    """Table 4's note for a pool with imported members (``oodsweep import``: predicted masks, no model): the
    methods that need the model were not run for them; None when every member has its model."""
    if members is None or "imported" not in members.columns:
        return None
    n = int(members["imported"].astype("boolean").fillna(False).sum())
    if not n:
        return None
    from analysis.table4 import METHOD_LABELS

    skipped = ", ".join(METHOD_LABELS[m] for m in MODEL_METHODS)
    return (f"Table 4: {n} of {len(members)} members were imported (predicted masks, no model): δ and BayesCap "
            f"were fitted on their stored predictions; {skipped} need the model and were not run for them, so "
            f"they have no rows from those members")


def uncertainty_sections(experiment_dir, unc: pd.DataFrame, roles: dict[str, str], source: str, out,
                         files: list, notes: list[str], members: pd.DataFrame | None = None
                         ) -> tuple[pd.DataFrame, list[str]]:
    """Write the uncertainty stage's tables and return (the default Table 4, its tables.md lines).

    Files under ``out``: ``table4.csv`` (area reading, default members), ``table4_readings.csv`` (both
    readings x SAM family / pooled, long), ``error_ranking.csv`` (median AUROC/AP per method and
    site), ``uncertainty_fits.csv`` (each member's δ fit: settings and final held-out numbers).

    Table 4's default members are the SAM family (box-prompted, ``prompted`` in the site records),
    as in the paper; the pooled version (every member) stands beside it. Without SAM-family members
    (or records that say which they are), the default is the pooled one, and a note says so.
    """
    from pathlib import Path

    from analysis.table4 import METHOD_LABELS, table4, table4_frame, table4_markdown
    from trainables.records import load_uncertainty_fits, load_uncertainty_sites

    out = Path(out)
    unc = case_sums(unc)  # the records' case sums (per-slice records are summed here)
    sites = load_uncertainty_sites(experiment_dir)
    prompted = set(sites.loc[sites["prompted"].astype(bool), "member_id"].astype(str)) if sites is not None else set()
    subsets = {"pooled": unc}
    sam = unc[unc["member_id"].isin(prompted)]  # not astype(str): it would spell out every row's id
    if len(sam):
        subsets = {"sam": sam, "pooled": unc}
    elif sites is not None:
        notes.append("Table 4: no SAM-family (box-prompted) member has uncertainty records; the default "
                     "Table 4 is the pooled one")
    default = next(iter(subsets))
    frames, md = [], []
    have_pixel = not unc["pixel_na"].any()
    for reading in ("area", "pixel"):
        if reading == "pixel" and not have_pixel:
            notes.append("Table 4, pixel reading: the uncertainty records lack uncertain_error_px (scored "
                         "before it existed); rerun the uncertainty stage to get it")
            continue
        for who, sub in subsets.items():
            t4 = table4_frame(table4(sub, reading=reading), roles, source)
            frames.append(t4.assign(reading=reading, members=who))
            n = _members_scored_by_all(sub)
            whom = "SAM-family (box-prompted) members, as in the paper" if who == "sam" else "every pool member"
            cap = (f"**Table 4 ({reading} reading, {whom}).** {TABLE4_CAPTIONS[reading]}; over the {n} members "
                   f"every method scored. Smaller is better; the best per column in bold; n/a: the method did not "
                   f"score that split.")
            md += [table4_markdown(t4, n, caption=cap), ""]
    default_t4 = frames[0].drop(columns=["reading", "members"])
    default_t4.to_csv(out / "table4.csv", index=False)
    files.append(out / "table4.csv")
    long = pd.concat(frames, ignore_index=True)
    long = long[["reading", "members", *[c for c in long.columns if c not in ("reading", "members")]]]
    long.to_csv(out / "table4_readings.csv", index=False)
    files.append(out / "table4_readings.csv")
    md.insert(0, f"Default: the {'SAM family' if default == 'sam' else 'pooled members'}, area reading "
                 f"(`table4.csv`); every version in `table4_readings.csv`.")
    md.insert(1, "")
    note = imported_note(members)
    if note:  # said beside the table and among the analysis' notes
        md[2:2] = [f"*{note}.*", ""]
        notes.append(note)
    if sites is not None:
        er = error_ranking_table(sites, roles, source)
        er.to_csv(out / "error_ranking.csv", index=False)
        files.append(out / "error_ranking.csv")
        md += ["## Uncertainty maps against the error pixels", "", error_ranking_markdown(er, METHOD_LABELS), ""]
    md += [indicators_markdown(), ""]
    fits = load_uncertainty_fits(experiment_dir)
    if len(fits):
        keep = [c for c in fits.columns if c != "curve"]
        fits[keep].to_csv(out / "uncertainty_fits.csv", index=False)
        files.append(out / "uncertainty_fits.csv")
        md += [fits_markdown(fits), ""]
    return default_t4, md


def fits_markdown(fits: pd.DataFrame) -> str:
    """δ's convergence across the pool, per (epochs, λ): median final held-out numbers."""
    cols = [c for c in ("final_loss_ggd", "final_heldout_loss_ggd", "final_heldout_dice_mu_yhat",
                        "final_heldout_dice_mu_y") if c in fits.columns]
    keys = [k for k in ("fit_split", "epochs", "lam") if k in fits.columns]
    if not cols or not keys:
        return ""
    g = fits.groupby(keys)[cols].median().reset_index()
    g.insert(len(keys), "members", fits.groupby(keys).size().to_numpy())
    from analysis.tables import markdown_table

    shown = g.astype(object)
    for c in cols:
        shown[c] = [f"{float(v):.3f}" if math.isfinite(float(v)) else "–" for v in g[c]]
    caption = ("**δ's fit** (per fit split, epochs and λ: the median over members of the last epoch's training "
               "loss, and on slices of held-out source cases δ never trained on, its loss, Dice(μ > 0.5, ŷ) — has "
               "μ learnt to follow the frozen prediction — and Dice(μ > 0.5, y)). Per member and epoch in "
               "`records/uncertainty/fits/`.")
    return caption + "\n\n" + markdown_table(shown)
