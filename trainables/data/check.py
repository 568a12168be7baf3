"""Validate a dataset folder and summarise it (``oodsweep data check ROOT --layout NAME``).

Unlike the cache builder, which needs only to know whether it may go on, the check reads every
case and reports every problem in one pass: pairing problems (an image without a mask and the
reverse, duplicated files), unreadable files, shape or orientation mismatches, unexpected
labels, non-finite or constant intensities, empty site folders, a missing root. The summary
says per site how many cases and slices there are, the label values found, the spacings and
image sizes, and which cases would be skipped and why.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import DataError, summarize_problems
from .layouts import CONFIGURED, get_layout

__all__ = ["SiteReport", "CheckReport", "check_dataset", "format_report"]

#: ``format_report`` prints the first SHOW_PER_KIND errors (and warnings) of each kind, then "... and N more
#: of this kind"; and the first SHOW_SKIPPED names of the skipped cases of a site
SHOW_PER_KIND = 3
SHOW_SKIPPED = 10


@dataclass
class SiteReport:
    """What the check found in one site."""

    site: str
    cases: int = 0
    slices: int = 0
    label_values: set = field(default_factory=set)
    spacings: list = field(default_factory=list)       # one (sx, sy, sz) per good case
    sizes: Counter = field(default_factory=Counter)     # (H, W) -> number of good cases
    depths: list = field(default_factory=list)          # slices per good case
    splits: Counter = field(default_factory=Counter)    # the release's own split, where it has one
    absent_masks: Counter = field(default_factory=Counter)  # multi-label: label -> images without its file
    skipped: list = field(default_factory=list)         # (case or file, reason)


@dataclass
class CheckReport:
    """The whole check: per-site reports, errors (each names a file or folder) and warnings."""

    root: Path
    layout: str
    sites: list[SiteReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    description: str = ""  # configured layouts: channels, labels, label kind

    @property
    def ok(self) -> bool:
        return not self.errors


def check_dataset(root: str | Path, layout: str, sites: Sequence[str] | None = None,
                  progress: bool = False, options: dict | None = None) -> CheckReport:
    """Reads every case of ``sites`` (default: every site found) and collects every problem.

    Args:
        root: the dataset root.
        layout: registry name of its layout.
        sites: the sites to check; None checks every site the layout finds under ``root``.
        progress: print one line per site to stderr.
        options: the configured layouts' options (``sites_from``, ``channels``, ``labels``, ...), as in a spec.

    Returns:
        The report; never raises on bad data (an unknown layout is a ValueError).
        A configured layout's report also names its channels, labels and ``label_kind``.
    """
    root = Path(root).expanduser()
    report = CheckReport(root=root, layout=layout)
    try:  # a configured layout reads its dataset description (and site map) here
        lay = get_layout(layout, root if layout in CONFIGURED else None, options)
    except DataError as e:
        report.errors.append(str(e))
        return report
    if hasattr(lay, "channels") or hasattr(lay, "label_values"):
        chans = list(getattr(lay, "channel_names", ())) or "1 (grayscale) or 3 (colour), from the files"
        report.description = (f"channels: {chans}; labels: {list(lay.labels)} ({lay.label_kind}, values "
                              f"{[list(v) or '> 0' for _, v in lay.channels]})")
    if sites is None:
        try:
            sites = lay.sites(root)
        except DataError as e:
            report.errors.append(str(e))
            return report
        empty = getattr(lay, "empty_site_folders", None)
        for folder in (empty(root) if empty else []):
            report.warnings.append(f"site folder {folder} holds no cases (expected the layout's case files); "
                                   "ignored")
        if not sites:
            report.errors.append(f"no {layout} sites found under {root}: every folder is empty or holds other files")
            return report
    for site in sites:
        rep = SiteReport(site=site)
        report.sites.append(rep)
        try:
            cases, problems = lay.scan_cases(root, site)
        except DataError as e:
            report.errors.append(str(e))
            continue
        for p in problems:
            rep.skipped.append((Path(p.split(": ")[0]).name, p))
            report.errors.append(p)
        for cf in cases:
            try:
                case = lay.load_case(cf)
            except DataError as e:
                rep.skipped.append((cf.case_id, str(e)))
                report.errors.append(str(e))
                continue
            report.warnings += list(case.warnings)
            rep.cases += 1
            rep.slices += int(case.image.shape[2])
            rep.depths.append(int(case.image.shape[2]))
            rep.label_values.update(case.label_values)
            rep.spacings.append(tuple(round(float(s), 4) for s in case.spacing))
            rep.sizes[tuple(int(s) for s in case.image.shape[:2])] += 1
            if cf.split:
                rep.splits[cf.split] += 1
            for label, path in cf.lesion_masks:
                if path is None:
                    rep.absent_masks[label] += 1
            del case
        if progress:
            print(f"[oodsweep] checked {site}: {rep.cases} good cases, {len(rep.skipped)} bad", file=sys.stderr)
    return report


def _range(values: Sequence[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g} (median {float(np.median(values)):g})"


def format_report(report: CheckReport) -> str:
    """The report as the text ``oodsweep data check`` prints."""
    out = [f"dataset {report.root} (layout {report.layout})"]
    if report.description:
        out.append(f"  {report.description}")
    for rep in report.sites:
        out.append(f"  site {rep.site}: {rep.cases} cases, {rep.slices} slices"
                   + (f", own split {dict(sorted(rep.splits.items()))}" if rep.splits else ""))
        if rep.cases:
            out.append(f"    label values: {sorted(rep.label_values)}")
            sp = np.asarray(rep.spacings, dtype=float)
            out.append("    spacing (mm): " + " x ".join(_range(sp[:, i].tolist()) for i in range(3)))
            sizes = ", ".join(f"{h}x{w} ({n})" for (h, w), n in rep.sizes.most_common(5))
            more = f" and {len(rep.sizes) - 5} more" if len(rep.sizes) > 5 else ""
            out.append(f"    image size H x W: {sizes}{more}; slices per case: {_range(rep.depths)}")
        if rep.absent_masks:
            out.append("    lesion mask files absent (lesion taken as absent): "
                       + ", ".join(f"{k} {n}" for k, n in rep.absent_masks.items()))
        if rep.skipped:  # the reasons are the errors listed below
            names = [case for case, _ in rep.skipped]
            more = f" and {len(names) - SHOW_SKIPPED} more" if len(names) > SHOW_SKIPPED else ""
            out.append(f"    skipped {len(names)} (see the errors below): " + ", ".join(names[:SHOW_SKIPPED]) + more)
    # many files with one problem (10,000 unpaired images) would print 10,000 lines: the first few of
    # each kind, then a count (base.summarize_problems)
    for w in summarize_problems(report.warnings, SHOW_PER_KIND):
        out.append(w if w.startswith("... and ") else f"WARNING: {w}")
    for e in summarize_problems(report.errors, SHOW_PER_KIND):
        out.append(e if e.startswith("... and ") else f"ERROR: {e}")
    n_cases = sum(r.cases for r in report.sites)
    out.append(f"{'OK' if report.ok else 'FAILED'}: {n_cases} good cases, {len(report.errors)} error(s), "
               f"{len(report.warnings)} warning(s)")
    return "\n".join(out)
