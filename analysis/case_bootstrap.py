"""The two-level bootstrap of the claims report: training runs, then the test cases of every site.

The run-level bootstrap (``analysis.correlate.run_bootstrap``) treats each member's site score as
fixed, but a site score is a mean over a handful of test cases (ten per target site in the study), and
the claims' statistics inherit that case-to-case variation. One replicate of this bootstrap:

1. draws the training runs with replacement, as the run-level bootstrap does (a run's snapshot members
   move together);
2. draws each site's test cases with replacement, **the same draw for every member** (every member is
   scored on the same cases: a paired design), independently from site to site;
3. recomputes every member's site scores from the drawn cases, exactly as the records' metric forms
   them (``trainables.records.metric_by`` / ``surface_by``), and the statistic from those.

The interval is the percentile interval of the replicates (no BCa: its jackknife has no single
"leave one unit out" over two levels), over the finite replicates when at least 90% are finite, as
``run_bootstrap`` falls back. A site score is a ratio of case sums: for ``iou_3d`` Σ IoU over the
cases with ground truth / their count; for ``dice_2d`` Σ slice Dice / the slices with ground truth; for
``dice_global`` Σ 2TP / Σ (2TP + FP + FN); for the surface metrics the mean over the cases with a
value; multi-label records average the labels where defined (as ``metric_by``). So one members x cases
x labels pair of arrays per site (``SiteCases``) gives every replicate's scores with one product:
drawing a case k times weights its sums k times, and drawing every case once gives the recorded score.
δ's readings (the uncertain area, a mean over the target images of the Otsu fraction, and the other
readings of ``analysis.uncertainty_indicators``: means over the images too) are ratios of case sums as well.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.correlate import BOOT_BATCH, CONFIDENCE, MIN_POINTS, point_weights, probit
from analysis.uncertainty_cases import case_sums
from analysis.uncertainty_indicators import UNCERTAINTY_INDICATORS as UNCERTAINTY_READINGS
from analysis.probit_clip import probit_scaled
from trainables.records import LABEL_COLUMN, LOWER_IS_BETTER, SURFACE_METRICS
from trainables.records.metrics import SURFACE_VALUE

#: The interval kinds a claims row names (``analysis.claim_rule.CLAIM_COLUMNS``' ``interval``).
RUNS_X_CASES, RUNS = "runs × cases", "runs"


@dataclass
class SiteCases:
    """One site's case sums: a member's score is ``Σ_c w_c num[m, c, l] / Σ_c w_c den[m, c, l]`` per label
    ``l`` (NaN where the denominator is 0), averaged over the labels where defined, times ``sign``."""

    case_ids: list[str]
    num: np.ndarray  # M x C x L
    den: np.ndarray  # M x C x L
    sign: float = 1.0

    def scores(self, w: np.ndarray) -> np.ndarray:
        """Case weights ``... x C`` (draws per case) -> the members' scores ``... x M``."""
        w = np.asarray(w, dtype=np.float64)
        n = np.einsum("...c,mcl->...ml", w, self.num)
        d = np.einsum("...c,mcl->...ml", w, self.den)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(d > 0, n / np.where(d > 0, d, 1.0), np.nan)
            ok = np.isfinite(r)
            out = np.where(ok, r, 0.0).sum(-1) / ok.sum(-1)
        return self.sign * out


@dataclass
class CaseScores:
    """Every member's case sums per site: ``id`` (the source test split) and ``ood`` (per target site);
    ``unc``: δ's readings (``uncertainty_indicator_frame``'s columns, e.g. ``uncertain_area``) -> target site ->
    their case sums on the same case lists (empty without uncertainty records)."""

    members: list[str]
    id: SiteCases | None
    ood: dict[str, SiteCases]
    unc: dict[str, dict[str, SiteCases]] = field(default_factory=dict)
    metric: str = ""

    def n_cases(self, sizes: dict[str, int] | None = None) -> str:
        """The cases drawn per site, for a row's label (e.g. ``10 ID, 10 per target``): of ``sizes`` (a
        statistic's ``{ID_KEY or target: cases}``), default every site."""
        if sizes is None:
            sizes = {**({ID_KEY: len(self.id.case_ids)} if self.id is not None else {}),
                     **{t: len(s.case_ids) for t, s in self.ood.items()}}
        t = sorted({n for k, n in sizes.items() if k != ID_KEY})
        out = [f"{sizes[ID_KEY]} ID"] if ID_KEY in sizes else []
        if t:
            out.append("–".join(str(v) for v in (t[:1] + t[-1:] if len(t) > 1 else t))
                       + (" per target" if len([k for k in sizes if k != ID_KEY]) > 1 else " on the target"))
        return ", ".join(out)


def _dense_at(mi: np.ndarray, ci: np.ndarray, li: np.ndarray, values: dict[str, np.ndarray],
              shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Sum ``values`` into ``M x C x L`` arrays at the positions (member, case, label) of each row; a row with
    a member or case position of -1 (not among them) is left out."""
    ok = (mi >= 0) & (ci >= 0)
    out = {}
    for k, v in values.items():
        a = np.zeros(shape)
        np.add.at(a, (mi[ok], ci[ok], li[ok]), np.asarray(v, dtype=np.float64)[ok])
        out[k] = a
    return out


def _dense(keys: pd.DataFrame, values: dict[str, np.ndarray], members: list[str], cases: list[str],
           labels: list[str]) -> dict[str, np.ndarray]:
    """Sum ``values`` into ``M x C x L`` arrays by the (member_id, case_id, label) of ``keys``."""
    mi = pd.Index(members).get_indexer(keys["member_id"].astype(str))
    ci = pd.Index(cases).get_indexer(keys["case_id"].astype(str))
    li = pd.Index(labels).get_indexer(keys["label"].astype(str))
    return _dense_at(mi, ci, li, values, (len(members), len(cases), len(labels)))


class _Codes:
    """A key column of the records as integer codes, factorized once (no string per row: at 2,000 members the
    slice records have millions of rows); ``positions`` maps a subset of rows onto a list of names."""

    def __init__(self, col: pd.Series):
        self.codes, uniques = pd.factorize(col)  # a missing value: -1 (never among the names)
        self.names = np.asarray(pd.Index(uniques).astype(str), dtype=object)

    def positions(self, rows: np.ndarray, names: list[str]) -> np.ndarray:
        lut = np.append(pd.Index(names).get_indexer(self.names), -1)  # code -1 -> the last entry, -1
        return lut[self.codes[rows]]

    def present(self, rows: np.ndarray) -> set[str]:
        c = np.unique(self.codes[rows])
        return set(self.names[c[c >= 0]].tolist())


def _site_values(rows: pd.DataFrame, metric: str) -> dict[str, np.ndarray]:
    """The rows' {num, den} contributions (or iou_3d's tp, fp, fn) for one site, before they are summed per case."""
    if metric in SURFACE_METRICS:
        v = rows[SURFACE_VALUE[metric]].to_numpy(dtype=float)
        return {"num": np.nan_to_num(v), "den": np.isfinite(v).astype(float)}
    tp, fp, fn = (rows[c].to_numpy(dtype=np.float64) for c in ("tp", "fp", "fn"))
    if metric == "dice_2d":
        has = tp + fn > 0
        return {"num": np.where(has, 2 * tp / np.where(has, 2 * tp + fp + fn, 1.0), 0.0), "den": has * 1.0}
    if metric == "dice_global":
        return {"num": 2 * tp, "den": 2 * tp + fp + fn}
    return {"tp": tp, "fp": fp, "fn": fn}  # iou_3d: summed per case first


def _build(vals: dict[str, np.ndarray], mi: np.ndarray, ci: np.ndarray, li: np.ndarray, metric: str,
           n_members: int, cases: list[str], n_labels: int) -> SiteCases:
    a = _dense_at(mi, ci, li, vals, (n_members, len(cases), n_labels))
    if metric == "iou_3d":  # per case TP / (TP + FP + FN) over its slices, over the cases with ground truth
        has = a["tp"] + a["fn"] > 0
        a = {"num": np.where(has, a["tp"] / np.where(has, a["tp"] + a["fp"] + a["fn"], 1.0), 0.0),
             "den": has * 1.0}
    return SiteCases(cases, a["num"], a["den"], -1.0 if metric in LOWER_IS_BETTER else 1.0)


def case_scores(slices: pd.DataFrame, metric: str, members: list[str], surface: pd.DataFrame | None = None,
                unc: pd.DataFrame | None = None, method: str = "ggd") -> CaseScores:
    """The members' case sums per site from the records (the slice records, or the surface records for a
    surface metric; δ's uncertainty slice records, ``method``'s rows, for its readings).

    Raises:
        ValueError: an unknown metric, or a surface metric without surface records.
    """
    base = metric[: -len("_micro")] if metric.endswith("_micro") else metric
    if base not in ("iou_3d", "dice_2d", "dice_global") and metric not in SURFACE_METRICS:
        raise ValueError(f"unknown metric {metric!r} for the case-level bootstrap")
    if metric in SURFACE_METRICS:
        if surface is None:
            raise ValueError(f"metric {metric!r} reads the surface records (records/surface.parquet), and there are "
                             f"none; pass them as surface=")
        src, multi = surface, True  # surface_by always averages per label
    else:
        src = slices
        multi = LABEL_COLUMN in src.columns and src[LABEL_COLUMN].nunique() > 1
        if metric.endswith("_micro") and multi:
            keys = [c for c in src.columns if c not in ("tp", "fp", "fn", "tn", "area_px", LABEL_COLUMN)]
            src = src.groupby(keys, sort=False, dropna=False)[["tp", "fp", "fn"]].sum().reset_index()
            multi = False
    # every key column as integer codes, once: no copy of the records, no string per row (GiBs at 2,000 members);
    # the members not asked for are left out by their position (-1)
    member_codes, case_codes = _Codes(src["member_id"]), _Codes(src["case_id"])
    label_codes = _Codes(src[LABEL_COLUMN]) if multi else None
    everyone = np.arange(len(src))
    chosen = everyone[member_codes.positions(everyone, members) >= 0]
    labels = sorted(label_codes.present(chosen)) if multi else [""]
    u = None
    if unc is not None:
        u = case_sums(unc)  # the records' case sums (analysis.uncertainty_cases; slice records are summed here)
        u = u[(u["method"] == method).to_numpy(dtype=bool, na_value=False) & u["member_id"].isin(members).to_numpy(
            dtype=bool) & (u["role"] == "ood").to_numpy(dtype=bool, na_value=False)]
    out = CaseScores(list(members), None, {}, {}, metric)
    # each site's rows by position, and of them only the value columns: a boolean filter or a groupby over the
    # frame would copy every column of every row
    value_cols = [src.columns.get_loc(c) for c in
                  ([SURFACE_VALUE[metric]] if metric in SURFACE_METRICS else ["tp", "fp", "fn"])]
    role_codes, site_codes = _Codes(src["role"]), _Codes(src["site"])
    r, s = role_codes.codes[chosen], site_codes.codes[chosen]
    group = r.astype(np.int64) * (len(site_codes.names) + 1) + s  # one code per (role, site)
    keys, first = np.unique(group, return_index=True)
    for k in keys[np.argsort(first)]:  # in order of first appearance
        here = group == k
        rc, si = r[here][0], s[here][0]
        role = role_codes.names[rc] if rc >= 0 else None
        if role not in ("id", "ood") or si < 0:
            continue
        idx = chosen[here]
        site = str(site_codes.names[si])
        ua = u[u["site"].astype(str) == site] if u is not None and role == "ood" else None
        cases = sorted(case_codes.present(idx) | (set(ua["case_id"].astype(str)) if ua is not None else set()))
        li = label_codes.positions(idx, labels) if multi else np.zeros(len(idx), dtype=np.int64)
        sc = _build(_site_values(src.iloc[idx, value_cols], base), member_codes.positions(idx, members),
                    case_codes.positions(idx, cases), li, base, len(members), cases, len(labels))
        if role == "id":
            out.id = sc
        else:
            out.ood[site] = sc
            if ua is not None and len(ua):
                for col, sc in _readings(ua, members, cases).items():
                    out.unc.setdefault(col, {})[site] = sc
    return out


def _readings(u: pd.DataFrame, members: list[str], cases: list[str]) -> dict[str, SiteCases]:
    """δ's readings on one site from its case sums (``analysis.uncertainty_cases``), each the mean over the
    images of a per-image value (as ``uncertainty_indicator_frame`` forms them): per member and case the sum
    over its images and their number; a member with a NaN (or infinite) image there has no value."""
    keys = pd.DataFrame({"member_id": u["member_id"].astype(str).to_numpy(),
                         "case_id": u["case_id"].astype(str).to_numpy(), "label": ""})
    n = u["n_images"].to_numpy(dtype=np.float64)
    out = {}
    for col in UNCERTAINTY_READINGS:
        bad = u[f"{col}_bad"].to_numpy(dtype=np.float64)
        a = _dense(keys, {"num": np.where(bad > 0, 0.0, u[col].to_numpy(dtype=np.float64)), "den": n, "bad": bad},
                   members, cases, [""])
        a["num"][a["bad"].sum(axis=(1, 2)) > 0] = np.nan
        out[col] = SiteCases(cases, a["num"], a["den"])
    return out


def _case_counts(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """``b`` draws of ``n`` cases with replacement -> how often each case is drawn, ``b x n``."""
    idx = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def two_level_interval(statistic: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray], unit_of: np.ndarray,
                       n_units: int, n_cases: dict[str, int], n_resamples: int, seed: int) -> tuple[float, float]:
    """The 95% percentile interval of ``statistic(member weights B x M, {site: case weights B x C})``.

    Each replicate draws ``n_units`` runs with replacement (``unit_of``: each member's run, as
    ``analysis.correlate.unit_of_points``), then each site's cases with replacement (one draw per site,
    shared by every member). NaN (no interval) with fewer than ``MIN_POINTS`` runs, no resamples, or fewer
    than 90% finite replicates.
    """
    if n_resamples <= 0 or n_units < MIN_POINTS:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    dist = []
    for start in range(0, n_resamples, BOOT_BATCH):
        b = min(BOOT_BATCH, n_resamples - start)
        c = point_weights(rng.integers(0, n_units, size=(b, n_units)), unit_of, n_units)
        w = {k: _case_counts(rng, b, n) for k, n in n_cases.items()}
        with np.errstate(invalid="ignore", divide="ignore"):
            dist.append(np.asarray(statistic(c, w), dtype=float).reshape(b))
    d = np.concatenate(dist)
    finite = d[np.isfinite(d)]
    if finite.size < 0.9 * d.size:
        return float("nan"), float("nan")
    alpha = (1.0 - CONFIDENCE) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson r over the last axis with frequency weights ``w`` (a point drawn k times counts k times);
    NaN where fewer than 2 distinct points or an input is constant."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = w.sum(-1)
        x, y = np.where(w > 0, x, 0.0), np.where(w > 0, y, 0.0)
        dx = x - ((w * x).sum(-1) / n)[..., None]
        dy = y - ((w * y).sum(-1) / n)[..., None]
        r = (w * dx * dy).sum(-1) / np.sqrt((w * dx * dx).sum(-1) * (w * dy * dy).sum(-1))
    return np.clip(r, -1.0, 1.0)


#: The key of the source test split in the case weights (target sites are keyed by their names).
ID_KEY = "\x00id"


def r_two_level(cs: CaseScores, members: list[str], targets: list[str], x_col: str, x: np.ndarray,
                present: np.ndarray, unit_of: np.ndarray, n_units: int, n_resamples: int, seed: int,
                value: float, y: np.ndarray | None = None,
                clips_xy: tuple[list[float], list[float]] | None = None) -> tuple[float, float, str, str] | None:
    """The two-level interval of the mean over ``targets`` of Pearson r(x, OOD score) (``indicator_rows``).

    The OOD scores are recomputed from each target's drawn cases; ``x`` too when it has case records
    (``id_score``: the source test split's cases; δ's readings, e.g. ``uncertain_area``: the target's cases, the
    same draw as its
    OOD score), else ``x`` (``M x T``) stays as recorded. ``present``: ``M x T`` the points of the statistic.
    ``y``: ``M x T`` the recorded OOD scores, which the case records must reproduce with every case drawn once
    (and ``x``, where it is recomputed from cases).

    Returns:
        ``(lo, hi, note, the cases drawn per site in words)``, or None where the case records do not cover the
        members and targets or do not reproduce ``y`` and ``value`` (the run-level statistic on the sample) with
        every case drawn once.
    ``clips_xy``: per target the probit clips of x and of the OOD score when the row is on the probit scale
    (``x`` and ``y`` are then probit values; the scores recomputed from cases are put on the same scale).
    """
    pos = pd.Index(cs.members).get_indexer(members)
    if clips_xy is None:
        fx = fy = lambda j, v: v  # noqa: E731
    else:
        fx = lambda j, v: probit_scaled(v, clips_xy[0][j])  # noqa: E731
        fy = lambda j, v: probit_scaled(v, clips_xy[1][j])  # noqa: E731
    kind = "id" if x_col == "id_score" else "unc" if x_col in cs.unc else None
    area = cs.unc.get(x_col, {})
    if (pos < 0).any() or any(t not in cs.ood for t in targets) or (kind == "id" and cs.id is None) \
            or (kind == "unc" and any(t not in area for t in targets)):
        return None
    sizes = {t: len(cs.ood[t].case_ids) for t in targets}
    if kind == "id":
        sizes[ID_KEY] = len(cs.id.case_ids)

    def statistic(c: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
        xid = cs.id.scores(w[ID_KEY])[..., pos] if kind == "id" else None
        rs = []
        for j, t in enumerate(targets):
            yt = fy(j, cs.ood[t].scores(w[t])[..., pos])
            xt = (fx(j, xid) if kind == "id" else fx(j, area[t].scores(w[t])[..., pos]) if kind == "unc"
                  else x[:, j])
            xt = np.broadcast_to(xt, yt.shape)
            ok = present[:, j] & np.isfinite(xt) & np.isfinite(yt)
            rs.append(weighted_pearson(xt, yt, c * ok))
        return np.mean(rs, axis=0)

    ones = {k: np.ones(n) for k, n in sizes.items()}
    if y is not None:
        got = np.stack([fy(j, cs.ood[t].scores(ones[t])[pos]) for j, t in enumerate(targets)], 1)
        if kind == "id":
            xid = cs.id.scores(ones[ID_KEY])[pos]
            got = np.concatenate([got, np.stack([fx(j, xid) for j in range(len(targets))], 1)], 1)
        elif kind == "unc":
            got = np.concatenate([got, np.stack([fx(j, area[t].scores(ones[t])[pos])
                                                 for j, t in enumerate(targets)], 1)], 1)
        want = np.concatenate([y, x], 1)[:, :got.shape[1]]
        mask = np.tile(present, (1, got.shape[1] // len(targets)))
        if not np.allclose(got[mask], want[mask], rtol=0, atol=1e-9):
            return None
    one = statistic(np.ones((1, len(members))), {k: v[None] for k, v in ones.items()})[0]
    if not (np.isfinite(one) and abs(one - value) <= 1e-9):
        return None
    lo, hi = two_level_interval(statistic, unit_of, n_units, sizes, n_resamples, seed)
    note = ("" if kind else f"cases resampled on the OOD scores only (`{x_col}` has no per-case records)")
    return lo, hi, note, cs.n_cases(sizes)


def prepared_case_scores(experiment_dir, slices: pd.DataFrame, table: pd.DataFrame | None, metric: str,
                         unc: pd.DataFrame | None = None, label: str | None = None) -> CaseScores | None:
    """``case_scores`` of the members of ``table`` (the label-free indicator table) from an experiment's
    records as ``analysis.prepare`` read them (``slices``: already one ``label``'s where one is asked for);
    the surface records are read here for a surface metric. None without members."""
    if table is None or table.empty:
        return None
    surface = None
    if metric in SURFACE_METRICS:
        from trainables.records import load_surface

        surface = load_surface(experiment_dir)
        if surface is not None and label is not None:
            surface = surface[surface[LABEL_COLUMN].astype(str) == label]
    members = sorted(table["member_id"].astype(str).unique())
    return case_scores(slices, metric, members, surface, unc)


def aline_two_level(cs: CaseScores, ids: list[str], targets: list[str], mae: Callable, id_score: np.ndarray,
                    truths: list[np.ndarray], unit_of: np.ndarray, n_units: int, value: float, eps: float,
                    n_resamples: int, seed: int) -> tuple[float, float, str] | None:
    """The two-level interval of the ALine-S error (``claim_stats.aline_rows``): ``mae(member weights, probit
    ID scores, [OOD scores per target])`` on the ID and OOD scores recomputed from the drawn cases.

    Returns:
        ``(lo, hi, the cases drawn in words)``, or None where the case records do not cover ``ids`` and
        ``targets`` or do not reproduce ``id_score``, ``truths`` and ``value`` with every case drawn once.
    """
    pos = pd.Index(cs.members).get_indexer(ids)
    if cs.id is None or (pos < 0).any() or any(t not in cs.ood for t in targets):
        return None
    sizes = {ID_KEY: len(cs.id.case_ids), **{t: len(cs.ood[t].case_ids) for t in targets}}

    def scores(w):
        return cs.id.scores(w[ID_KEY])[..., pos], [cs.ood[t].scores(w[t])[..., pos] for t in targets]

    def statistic(c, w):
        ids_, ood = scores(w)
        return mae(c, probit(ids_, eps), ood)
    ones = {k: np.ones((1, n)) for k, n in sizes.items()}
    id1, ood1 = scores(ones)
    if not all(np.allclose(a[0], b, atol=1e-9, rtol=0, equal_nan=True) for a, b in zip([id1, *ood1],
                                                                                        [id_score, *truths])):
        return None
    if not abs(statistic(np.ones((1, len(ids))), ones)[0] - value) <= 1e-9:
        return None
    lo, hi = two_level_interval(statistic, unit_of, n_units, sizes, n_resamples, seed)
    return lo, hi, cs.n_cases(sizes)
