"""``tables.md``: every table of the analysis, the figures, and what was skipped and why
(docs/architecture.md "Analysis").

``analysis.run.run_analysis`` computes the results and writes the CSV files; this module lays them out
as one markdown report, label-free members first (each result block under a heading naming its set).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.aline import PAIRS
from analysis.claims import verdicts_markdown
from analysis.health import health_line
from analysis.prepare import LABEL_FREE
from analysis.tables import (aline_markdown, boot_caption, correlation_markdown, correlation_matrix_markdown,
                             lines_markdown, loto_markdown, selection_markdown, table1_markdown)


def tables_markdown(*, experiment: str, metric: str, n_members: int, source: str, targets: list[str],
                    available: list[str], has_agreement: bool, missing: list[str] | None, notes: list[str],
                    health: dict, member_sets: dict[str, list[str]], claims: pd.DataFrame, perf: pd.DataFrame,
                    n_resamples: int, corr: pd.DataFrame, lines_df: pd.DataFrame | None,
                    fig_files: dict[str, list[Path]], out: Path, unc_md: list[str] | None, sel: pd.DataFrame,
                    aline_fits: list[dict], loto_summary: pd.DataFrame, n_targets: int, probit_clip: str = "") -> str:
    """The text of ``tables.md``.

    Args:
        experiment: the experiment's name (the title).
        lines_df: Baek et al.'s test per target (None: no agreement, the section says it was skipped).
        fig_files: ``{"fig4": [...], "fig3": [...], "fig6": [...]}``, the figures written (under ``out``).
        unc_md: the uncertainty sections' lines (Table 4 ...; None: no uncertainty records).
        probit_clip: the probit clip in words (``analysis.probit_clip.Clips.text``), stated in the header and
            under every probit-scale section; "" where the metric has no probit scale.
        The other arguments are ``run_analysis``'s results of the same names.
    """
    md = [f"# Analysis: {experiment}", "",
          f"Metric: `{metric}`; {n_members} pool members; source {source}; targets {', '.join(targets)}. "
          f"Indicators: {', '.join(f'`{n}`' for n in available) or 'none'}"
          + (f" (also the pair-level `{PAIRS}` test)" if has_agreement else "") + ".", ""]
    clip_note = [f"Probit scale (the correlation table's probit fits, Baek et al.'s lines, Fig. 4, ALine, leave one "
                 f"target out, the probit rows of C2/C3): {probit_clip}.", ""] if probit_clip else []
    md += clip_note
    if missing:
        md += [f"**Incomplete experiment: {len(missing)} record(s) missing, analysed without them** "
               f"(`oodsweep resume` redoes them):", ""] + [f"- {m}" for m in missing] + [""]
    if notes:
        md += ["**Skipped or partial:**", ""] + [f"- {n}" for n in notes] + [""]

    def per_set(render, df: pd.DataFrame | None) -> list[str]:
        """One block per member set (label-free first), each under a heading that names the set."""
        blocks: list[str] = []
        for k, ids in member_sets.items():
            sub = (df[df["members"].isin([k, f"{k} (non-degenerate)"])] if df is not None and "members" in df.columns
                   else df)
            head = (f"**Label-free members** ({len(ids)}; oracle-prompted † members left out)" if k == LABEL_FREE
                    else f"**All members** ({len(ids)}; includes the oracle-prompted † members: not label-free)")
            blocks += [head, "", render(sub), ""]
        return blocks

    md += ["## Pool health", "", health_line(health, metric) + ".", "",
           "Collapsed members: " + (", ".join(f"`{m}`" for m in health["collapsed"]) or "none") + ".", ""]
    md += ["## Claims", "", "Which of the paper's claims this experiment reproduces, by the rule stated in "
           "[claims.md](claims.md) (95% intervals over training runs; every row in `claims.csv`):", "",
           verdicts_markdown(claims), ""]
    md += ["## Tables 1–3: same-domain and cross-domain performance", "", table1_markdown(perf), "",
           "## Correlation of each indicator with OOD performance", "",
           boot_caption(n_resamples, corr), ""]
    md += per_set(lambda c: correlation_matrix_markdown(c) + "\n\n" + correlation_markdown(c), corr)
    md += ["## Agreement on the line: Baek et al.'s test", ""]
    md += clip_note + (per_set(lines_markdown, lines_df) if lines_df is not None
                       else ["Skipped: no agreement (see above).", ""])
    md += ["## Figures", ""]
    for target, f in zip(targets, fig_files["fig4"]):
        md += [f"Fig. 4, {source} → {target}: OOD vs ID performance, OOD vs ID agreement (per member and per "
               f"pair), probit axes" + (" (each axis's clip in its label)" if probit_clip else "") + ".", "", f"![Fig. 4 {target}]({f.relative_to(out).as_posix()})", ""]
    for f in fig_files["fig3"]:
        md += ["Fig. 3: uncertain area against OOD performance.", "", f"![Fig. 3]({f.relative_to(out).as_posix()})", ""]
    for f in fig_files["fig6"]:
        md += ["Fig. 6: a member's slice: image, truth, prediction, μ, error, uncertainty.", "",
               f"![Fig. 6]({f.relative_to(out).as_posix()})", ""]
    if not fig_files["fig3"]:
        md += ["Fig. 3: skipped (no uncertain-area values; see above).", ""]
    if not fig_files["fig6"]:
        md += ["Fig. 6: skipped (no uncertainty examples; see above).", ""]
    md += ["## Table 4: uncertainty methods", ""]
    md += unc_md if unc_md is not None else ["Skipped: no uncertainty records (see above).", ""]
    md += ["## Model selection for a new site", ""]
    md += per_set(lambda d: selection_markdown(d, metric), sel)
    md += ["## OOD estimates: ALine-S, ALine-D and leave one target out", ""] + clip_note
    aline_summary = pd.DataFrame(aline_fits)
    md += per_set(lambda d: aline_markdown(d, metric), aline_summary) if aline_fits \
        else ["ALine estimates: skipped (they need the agreement on the source test split and the targets).", ""]
    md += per_set(lambda d: loto_markdown(d, metric), loto_summary) if n_targets >= 2 \
        else [f"Leave-one-target-out estimates: skipped (needs at least two targets; this experiment has "
              f"{n_targets}).", ""]
    return "\n".join(md)
