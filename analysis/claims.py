"""The claims report: which of the paper's claims the experiment reproduces.

One row per claim of Nguyen, Pham et al. 2023 (and the project's own questions), each with a named
statistic, its 95% interval, the members it is computed on, and a verdict decided from the interval alone
by the rule ``rule_text`` states. The interval: over **training runs and the sites' test cases**
(``analysis.case_bootstrap``: runs drawn as ``analysis.correlate``'s bootstrap draws them, then each site's
cases, the members' scores recomputed from them) for C2, C4, the other indicators and ALine-S when the case
records are given (``cases``); over **training runs** alone (``run_id``: the snapshot members of a run move
together; ``analysis.correlate``'s bootstrap) for C3 and beside the two-level one (``ci_runs_low``/
``ci_runs_high``); C1 and C5, arms of a few runs: Student's t over the runs' means (``analysis.run_intervals``,
at least 3 runs per arm):

* ``reproduced``: the whole interval lies on the claim's side of its threshold;
* ``refuted``: the whole interval lies on the other side;
* ``inconclusive``: the interval straddles the threshold, or there is no interval (too few runs);
* ``not testable``: an input the claim needs is missing (the row says which, and why).

The claims:

======  =============================================================  ==========================
C1      the foundation model (SAM family, oracle-prompted) drops less   SAM drop − CNN drop (pp) < 0
        from Same-Dom. to the targets than every other architecture     (per CNN; overall: the max)
        (Tables 1–3, configurations chosen on the validation split)
C2      ID performance is a weak indicator of OOD performance           |Pearson r| < 0.5
        (accuracy on the line does not hold)                            (per target; overall: mean r)
C3      ID agreement is a weak indicator (agreement on the line does    |pair Pearson r| < 0.5
        not hold): OOD agreement vs ID agreement over pairs (Fig. 4)
C4      the uncertain area (δ's Otsu area) correlates strongly and      Pearson r ≤ −0.5
        negatively with OOD performance (Fig. 3)
C5      δ has the lowest Table-4 error among the uncertainty methods    δ MSE − best baseline MSE < 0
======  =============================================================  ==========================

Beside them, not claims: the other indicators' correlations (``kind = "extra"``), and the project's
rows (``kind = "project"``): each indicator's model-selection regret against a random pick, and the
ALine estimates' mean absolute error (a number, no verdict). Their verdicts use the same rule on their
own side and read ``holds`` / ``does not hold`` / ``inconclusive``. Where the pool has degenerate
members (``analysis.degenerate_floor``), C2–C4's overall rows give the statistic without them in their
``*_nondegenerate`` columns, and a verdict that changes without them is reported as inconclusive
(``_check_degenerate``). C2 and C3 have a row per scale (``scale``): the probit one decides (the paper
reads the lines on probit axes, its Fig. 4), the raw one (scope ``... (raw scale)``) is beside it; the
probit clip is ``analysis.probit_clip`` (half a case of each site by default). C2–C4 and the project rows use the label-free members only
(docs/architecture.md "Records"); C1 and C5 include the oracle-prompted SAM members, as the paper's tables do, and
say so.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.aline import aline_table
from analysis.case_bootstrap import RUNS_X_CASES, CaseScores, prepared_case_scores
from analysis.claim_rule import (CLAIM_COLUMNS, CLAIM_TEXT, INCONCLUSIVE, NOT_TESTABLE, REFUTED, REPRODUCED,
                                 rule_text, untestable_row)
from analysis.budget_claims import budget_markdown, experiment_budget_rows, with_budget_rows
from analysis.claim_arms import c1_rows, c5_rows
from analysis.claim_stats import agreement_rows, aline_rows, indicator_rows, regret_rows
from analysis.correlate import MIN_POINTS, N_RESAMPLES, SEED
from analysis.indicators import INDICATORS, resolve_indicators
from analysis.performance import check_metric, is_bounded
from analysis.prepare import LABEL_FREE, prepare
from analysis.probit_clip import AUTO, KEY, Clips, check_probit_clip, site_cases
from analysis.tables import markdown_table
from trainables.records import SURFACE_METRICS


# --- the whole report ---------------------------------------------------------------------------

def _check_degenerate(ov: dict, nd: dict | None) -> None:
    """Put the statistic without the degenerate members beside the overall row ``ov`` (its ``*_nondegenerate``
    columns; ``nd`` None: the pool has none, the same values), and make a verdict that does not survive
    leaving them out inconclusive (in place).

    Members that predict (almost) nothing sit together at the bottom of both axes and can make a
    correlation by themselves; where the verdict with them differs from the one without them, it is
    carried by them, and the overall row says so instead of reporting it."""
    src = nd if nd is not None else ov
    ov.update(value_nondegenerate=src["value"], ci_low_nondegenerate=src["ci_low"],
              ci_high_nondegenerate=src["ci_high"], n_members_nondegenerate=src["n_members"],
              verdict_nondegenerate=src["verdict"])
    if nd is None or ov["verdict"] not in (REPRODUCED, REFUTED) or nd["verdict"] == ov["verdict"]:
        return
    ov["note"] = ((ov["note"] + "; ") if ov["note"] else "") + (
        f"with every member the interval says {ov['verdict']}, without the degenerate members {nd['verdict']}: the "
        f"verdict is carried by members that predict almost nothing, so it is reported as inconclusive")
    ov["verdict"] = INCONCLUSIVE


def claims_table(perf: pd.DataFrame, table: pd.DataFrame | None, agreement=None, unc: pd.DataFrame | None = None,
                 aline_fits: list[dict] | None = None, indicators: list[str] | None = None,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED, floor: float | None = None,
                 sam_members: set[str] | None = None, clips=None, cases: CaseScores | None = None) -> pd.DataFrame:
    """Every claim row (``CLAIM_COLUMNS``).

    Args:
        perf: ``performance_table`` of every member (oracle-prompted included: C1, C5).
        table: ``indicator_table`` of the label-free members (None or empty: C2–C4 not testable).
        agreement: the label-free members' ``Agreement`` (None: C3 and ALine not testable).
        unc: the uncertainty records (``records.load_uncertainty``; None: C5 not testable).
        aline_fits: ``aline.aline_table``'s fits (for ALine-D's point value).
        indicators: the indicators to give extra and regret rows for (default: those with values).
        n_resamples, seed: the run-level bootstrap's.
        label: one label of multi-label records (``run_analysis``'s ``label``; default written under
            ``<experiment_dir>/analysis/per_label/<label>``).
        floor: the degenerate floor: C2, C3 and C4 are repeated without the members below it (C2, C4: the
            points; C3: members with a score below it anywhere), and a verdict that changes without them is
            reported as inconclusive (``_check_degenerate``).
        sam_members: C5's SAM family as Table 4 reads it (``sam_members_of``); None: ``oracle_prompt``.
        clips: the probit clips (``analysis.probit_clip.Clips``): C2 and C3 get a row per scale, the probit one
            first (it decides, scope ``overall``), the raw one beside it (scope ``overall (raw scale)``); None:
            the raw scale alone (a metric without a probit scale, −HD95).
        cases: the label-free members' case sums (``case_bootstrap.case_scores``): C2, C4, the other indicators
            and the ALine-S error then get the two-level interval (runs × cases) as their default, the run-level
            one beside it; None: run-level intervals only.
    """
    rows: list[dict] = []
    rows += c1_rows(perf, n_resamples, seed)
    have = [n for n in INDICATORS if table is not None and not table.empty
            and np.isfinite(table[INDICATORS[n].column].astype(float)).any()]
    indicators = [n for n in (indicators or have) if n in have]
    free = "no label-free member (every member is oracle-prompted)"
    empty = table is None or table.empty
    run_of = dict(zip(perf["member_id"].astype(str), perf["run_id"]))
    for claim, ind, side in (("C2", "id_performance", "weak"), ("C3", None, "weak"),
                             ("C4", "uncertain_area", "strong_negative")):
        if empty:
            rows.append(untestable_row(claim, free, statistic="Pearson r"))
            continue
        if claim == "C4" and "uncertain_area" not in have:
            rows.append(untestable_row("C4", "no uncertain-area values for the label-free members (no uncertainty "
                                             "stage, no δ 'ggd' records, or no uncertainty indicator in "
                                             "analysis.indicators)", statistic="Pearson r"))
            continue
        overall, per = [], []
        for scale in (("probit", "raw") if clips is not None and claim != "C4" else (None,)):
            if claim == "C3":
                got = agreement_rows(agreement, run_of, n_resamples, seed, scale=scale, clips=clips)
                nd = []
                if floor is not None and agreement is not None and got[0]["verdict"] != NOT_TESTABLE:
                    m = table.groupby(table["member_id"].astype(str)).agg(i=("id_score", "min"), o=("ood_score", "min"))
                    keep = m.index[(m["i"] >= floor) & (m["o"] >= floor)].tolist()
                    if len(keep) < len(m):
                        nd = agreement_rows(agreement.subset(keep), run_of, n_resamples, seed, " (non-degenerate)",
                                            scale=scale, clips=clips)
            else:
                got = indicator_rows(table, ind, claim, "claim", side, n_resamples, seed, scale=scale, clips=clips,
                                     cases=cases)
                nd = ([] if floor is None else
                      indicator_rows(table, ind, claim, "claim", side, n_resamples, seed, floor, per_target=False,
                                     scale=scale, clips=clips, cases=cases))
            if floor is not None and got[0]["verdict"] != NOT_TESTABLE:
                _check_degenerate(got[0], nd[0] if nd else None)
            if scale == "raw":  # beside the deciding probit row: named in the scope, per target too
                for r in got:
                    r["scope"] += " (raw scale)"
            overall.append(got[0])
            per += got[1:]
        rows += overall + per
    rows += c5_rows(unc, perf, n_resamples, seed, sam_members)
    if not empty:
        for n in indicators:
            if n in ("id_performance", "uncertain_area"):
                continue
            rows += indicator_rows(table, n, "extra", "extra",
                                   "weak" if INDICATORS[n].higher_is_better else "strong_negative", n_resamples, seed,
                                   per_target=False, cases=cases)
    rows += regret_rows(None if empty else table, indicators, n_resamples, seed)
    metric = str(perf["metric"].iloc[0]) if len(perf) else ""
    if metric in SURFACE_METRICS:  # ALine maps agreement onto the metric: both must be on one scale
        rows.append(untestable_row("ALine error", f"{metric} is a surface metric and the agreement is the members' "
                                                  f"3D IoU: not on one scale", "project", "MAE (pp)"))
    else:
        rows += aline_rows(None if empty else table, agreement, aline_fits, n_resamples, seed, clips=clips, cases=cases)
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS).fillna({"scale": "", "verdict_nondegenerate": ""})


def _fmt(v: float, spec: str = ".3f") -> str:
    return format(float(v), spec) if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v)) else "–"


def _ci(lo: float, hi: float) -> str:
    return f"[{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) and math.isfinite(hi) else "none"


def _shown(df: pd.DataFrame) -> pd.DataFrame:
    """The rows as the report's tables show them: the two-level interval (the verdict's, where the row has
    one; "runs only" where the run-level interval decides) and the run-level one beside it."""
    two = df["interval"] == RUNS_X_CASES
    return pd.DataFrame({
        "claim": df["claim"], "scope": df["scope"], "statistic": df["statistic"],
        "value": [_fmt(v) for v in df["value"]],
        "95% CI (runs × cases)": [_ci(lo, hi) if t else "– (runs only)"
                                  for lo, hi, t in zip(df["ci_low"], df["ci_high"], two)],
        "95% CI (runs)": [_ci(lo, hi) for lo, hi in zip(df["ci_runs_low"], df["ci_runs_high"])],
        "claim's side": df["side"], "computed on": df["members"], "verdict": df["verdict"],
        "without the degenerate members": [_nondegenerate(r) for r in df.to_dict(orient="records")]})


def _nondegenerate(r: dict) -> str:
    """The ``*_nondegenerate`` columns of a row in words ("–" where the row has none)."""
    v = r.get("verdict_nondegenerate")
    if v is None or (isinstance(v, float) and math.isnan(v)) or not str(v):
        return "–"
    lo, hi = float(r["ci_low_nondegenerate"]), float(r["ci_high_nondegenerate"])
    ci = _ci(lo, hi) if math.isfinite(lo) and math.isfinite(hi) else "no interval"
    return (f"{_fmt(r['value_nondegenerate'])} {ci}, {r['verdict_nondegenerate']} "
            f"({int(r['n_members_nondegenerate'])} members)")


def verdict_rows(claims: pd.DataFrame) -> pd.DataFrame:
    """The rows that carry the paper's claims' verdicts: each claim's overall rows (and C1's per-CNN rows)."""
    return claims[(claims["kind"] == "claim") & (claims["scope"].str.startswith("overall") | (claims["claim"] == "C1"))]


def verdicts_markdown(claims: pd.DataFrame) -> str:
    """The verdict table alone (the Claims section of ``tables.md`` and the CLI's output)."""
    return markdown_table(_shown(verdict_rows(claims)))


def claims_markdown(claims: pd.DataFrame, experiment: str = "", metric: str = "", n_resamples: int = N_RESAMPLES,
                    floor: float | None = None, probit_clip: str = "") -> str:
    """``claims.md``: the decision rule, the verdicts (overall rows), plain-word notes, then every row."""
    shown = _shown
    main = verdict_rows(claims)
    md = [f"# Claims report{': ' + experiment if experiment else ''}", "",
          f"Does this experiment reproduce the claims of Nguyen, Pham et al. 2023? Metric: `{metric}`. "
          f"Built by `oodsweep report` (or `oodsweep analyze`) from the experiment's records; every row in "
          f"`claims.csv`.", "",
          rule_text(n_resamples, floor, probit_clip, two_level=bool((claims["interval"] == RUNS_X_CASES).any())), "",
          "## Verdicts", ""]
    for c in ("C1", "C2", "C3", "C4", "C5"):
        md.append(f"- **{c}**: {CLAIM_TEXT[c]}." + (f" {C1_READING}" if c == "C1" else ""))
    md += ["", markdown_table(shown(main)), "", "## In plain words", ""]
    for c in ("C1", "C2", "C3", "C4", "C5"):
        g = claims[(claims["claim"] == c) & (claims["kind"] == "claim")]
        md.append(f"- **{c}**: " + _plain(c, g))
    md += ["", "## Per target (same rule; for reading, the overall row above is the verdict)", ""]
    per = claims[(claims["kind"] == "claim") & ~claims["scope"].str.startswith("overall") & (claims["claim"] != "C1")]
    md += [markdown_table(shown(per)) if len(per) else "(none)", ""]
    extra = claims[claims["kind"] == "extra"]
    md += ["## Other indicators (not claims of the paper)", "",
           "Mean Pearson r over the targets with OOD performance, label-free members; side: strong and negative for "
           "the uncertainty readings (as C4), weak for the agreement indicators (as C2/C3).", "",
           markdown_table(shown(extra)) if len(extra) else "(none)", ""]
    md += budget_markdown(claims, shown)  # C4 at δ's two budgets, when the experiment has a sensitivity
    proj = claims[claims["kind"] == "project"]
    md += ["## The project's own rows", "",
           "Model selection: for each target, the member the indicator ranks first is deployed; the statistic is its "
           "regret (best member's OOD score − the picked one's) minus the expected regret of a uniform random pick "
           "(pp; < 0: the indicator beats a random pick). ALine: mean absolute error of the ALine estimates of each "
           "member's OOD score (pp), a number to read, no verdict.", "",
           markdown_table(shown(proj).assign(note=proj["note"].to_numpy())) if len(proj) else "(none)", ""]
    return "\n".join(md)


#: How to read C1's verdict, beside it in ``claims.md``.
C1_READING = ("Read its verdict with care: the SAM family is evaluated oracle-prompted (each slice's ground-truth "
              "box as its prompt, which no CNN gets), so part of its advantage is by construction.")


def _plain(claim: str, g: pd.DataFrame) -> str:
    """One sentence per claim: its verdict, the number behind it, and what limits it."""
    if g.empty:
        return "no row."
    ov = g[g["scope"].str.startswith("overall")]
    r = (ov if len(ov) else g).iloc[0]
    if r["verdict"] == NOT_TESTABLE:
        return f"not testable: {r['note']}."
    has_ci = math.isfinite(r["ci_low"]) and math.isfinite(r["ci_high"])
    ci = f"95% interval ({r['interval']}) [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if has_ci else "no interval"
    if has_ci and r["interval"] == RUNS_X_CASES:
        ci += f", over runs only {_ci(r['ci_runs_low'], r['ci_runs_high'])}"
    s = f"{r['verdict']}: {r['statistic']} = {_fmt(r['value'])}, {ci}, on {r['members']}."
    carried = "carried by" in str(r["note"])
    if r["verdict"] == INCONCLUSIVE and not carried:
        s += (f" The interval does not lie wholly on either side of the threshold ({r['side']})." if has_ci else
              "" if claim in ("C1", "C5") else  # their note says which arm is short and by how many runs
              f" Too few training runs to resample (fewer than {MIN_POINTS}): more seeds would give one.")
    if r["note"]:
        note = str(r["note"])
        s += f" {note[:1].upper() if note[:1].isascii() else note[:1]}{note[1:]}."
    nd = _nondegenerate(r.to_dict())
    if nd != "–" and int(r["n_members_nondegenerate"]) != int(r["n_members"]):
        s += f" Without the degenerate members: {nd}."
    raw = g[g["scope"] == "overall (raw scale)"]
    if r["scale"] == "probit" and len(raw):
        w = raw.iloc[0]
        ci = (f"[{_fmt(w['ci_low'])}, {_fmt(w['ci_high'])}]" if math.isfinite(w["ci_low"]) and math.isfinite(w["ci_high"])
              else "no interval")
        s += f" On the raw scale (beside it, not deciding): {_fmt(w['value'])} {ci}, {w['verdict']}"
        rnd = _nondegenerate(w.to_dict())
        s += (f"; without the degenerate members {rnd}." if rnd != "–"
              and int(w["n_members_nondegenerate"]) != int(w["n_members"]) else ".")
    return s


#: How ``claims.csv`` writes its floats (ten significant digits; ``write_claims`` says why).
CLAIMS_FLOAT_FORMAT = "%.10g"


def write_claims(claims: pd.DataFrame, out_dir: str | Path, experiment: str = "", metric: str = "",
                 n_resamples: int = N_RESAMPLES, floor: float | None = None, probit_clip: str = "") -> list[Path]:
    """Write ``claims.csv`` and ``claims.md`` under ``out_dir``; returns their paths (``probit_clip``: the clip in
    words, stated in the rule)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Ten significant digits, not float64's seventeen: the last bits of a correlation or a bootstrap bound
    # depend on the CPU (OpenBLAS picks its dot-product kernel per CPU, numpy its SIMD loops), and
    # `oodsweep rederive` compares claims.csv byte for byte, on whatever machine a reader has.
    claims.to_csv(out / "claims.csv", index=False, float_format=CLAIMS_FLOAT_FORMAT)
    (out / "claims.md").write_text(claims_markdown(claims, experiment, metric, n_resamples, floor, probit_clip),
                                   encoding="utf-8")
    return [out / "claims.csv", out / "claims.md"]


def sam_members_of(experiment_dir: str | Path) -> set[str] | None:
    """The box-prompted members as Table 4 reads them: the uncertainty site records' ``prompted``
    (``analysis.uncertainty_indicators.uncertainty_sections``); None without site records."""
    from trainables.records import load_uncertainty_sites

    sites = load_uncertainty_sites(experiment_dir)
    return None if sites is None else set(sites.loc[sites["prompted"].astype(bool), "member_id"].astype(str))


def _spec_analysis(experiment_dir: Path) -> dict:
    """The frozen spec's ``analysis`` section (``{}`` without a readable ``spec.yaml``)."""
    import yaml

    try:
        raw = yaml.safe_load((experiment_dir / "spec.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    a = raw.get("analysis") if isinstance(raw, dict) else None
    return a if isinstance(a, dict) else {}


def build_claims(experiment_dir: str | Path, metric: str | None = None, out_dir: str | Path | None = None,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED, label: str | None = None,
                 probit_clip: str | float | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """(Re)build the claims report of a finished experiment from its files alone (no Ray, no MLflow).

    Reads the records (``trainables.records``), prepares the performance and indicator tables as
    ``run_analysis`` does (``analysis.prepare``), and writes ``claims.csv`` / ``claims.md`` under ``out_dir``
    (default ``<experiment_dir>/analysis``); the rest of the analysis is left as it is.

    Args:
        experiment_dir: the experiment folder (holding ``records/``).
        metric: default the frozen spec's ``analysis.metric``, else ``iou_3d``.
        out_dir: where to write.
        n_resamples, seed: the run-level bootstrap's.
        label: one label of multi-label records (``run_analysis``'s ``label``; default written under
            ``<experiment_dir>/analysis/per_label/<label>``).
        probit_clip: the probit scale's clip (``analysis.probit_clip``); default the frozen spec's
            ``analysis.probit_clip``, else ``auto``.

    Returns:
        ``(claims, [claims.csv, claims.md])``.

    Raises:
        FileNotFoundError: no records under ``experiment_dir`` (the message names the folder and the fix).
        ValueError: an unknown metric (the message lists the valid ones), or records without OOD evaluations.
    """
    experiment_dir = Path(experiment_dir)
    spec = _spec_analysis(experiment_dir)
    metric = check_metric(metric or str(spec.get("metric") or "iou_3d"))
    floor = spec.get("degenerate_floor", 0.01) if is_bounded(metric) else None  # −HD95 is not in [0, 1]
    # the label-free members, their agreement and δ's indicators exactly as run_analysis reads them
    prep = prepare(experiment_dir, metric, resolve_indicators(None), warn=False, label=label)
    perf, unc = prep.perf, prep.unc
    table, agreement = prep.tables.get(LABEL_FREE), prep.agreements.get(LABEL_FREE)
    setting = check_probit_clip(probit_clip if probit_clip is not None else spec.get("probit_clip", AUTO),
                                where=f"{experiment_dir / 'spec.yaml'}: {KEY}" if probit_clip is None else KEY)
    clips = Clips(setting, site_cases(prep.slices)) if is_bounded(metric) else None
    clip_text = "" if clips is None else clips.text(
        list(dict.fromkeys([*perf["source"].astype(str), *perf["target"].astype(str)])))
    fits = (aline_table(table, agreement, clips=clips)[1] if table is not None and agreement is not None
            and metric not in SURFACE_METRICS else [])
    claims = claims_table(perf, table, agreement, unc, fits, n_resamples=n_resamples, seed=seed,
                          floor=None if floor is None else float(floor),
                          sam_members=sam_members_of(experiment_dir) if unc is not None else None, clips=clips,
                          cases=prepared_case_scores(experiment_dir, prep.slices, table, metric, unc, label))
    claims = with_budget_rows(claims, experiment_budget_rows(experiment_dir, table, n_resamples, seed))
    out = Path(out_dir) if out_dir is not None else experiment_dir / "analysis"
    if out_dir is None and label is not None:
        from analysis.plots import safe_name  # as run_analysis names the label's folder

        out = out / "per_label" / safe_name(label)
    return claims, write_claims(claims, out, experiment_dir.name, metric, n_resamples,
                                None if floor is None else float(floor), clip_text)
