"""Sites (and splits) from a map file, for layouts without site folders (``data.sites_from``).

Two formats, told apart by the file's suffix:

``.csv``
    columns ``case_id``, ``site`` and optionally ``split`` (``train``, ``test`` or empty)::

        case_id,site,split
        prostate_00,BMC,train
        prostate_01,BMC,test
        prostate_02,HK,

``.json``
    a MONAI-style datalist, ``{"training": [{"image": ..., "label": ..., "site": ..., "split": ...}]}``;
    ``image`` may be a list of channel files. The case an entry names is the label file's name without
    its ending (``labelsTr/prostate_00.nii.gz`` -> ``prostate_00``), or, without a label, the first
    image's name without its ending and its nnU-Net channel suffix (``_0000``).

:func:`apply_site_map` checks the map against the dataset's cases: a case in no row, a row naming no
case, and a site with too few cases for its splits are errors naming the map file, the row and the fix.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .base import DataError, file_problem

__all__ = ["SPLIT_VALUES", "SiteMap", "read_site_map", "apply_site_map", "case_of_file"]

#: The values a map's split may take (empty: the dataset's own split, or 80/20 by case).
SPLIT_VALUES = ("train", "test")

_ENDINGS = re.compile(r"\.(nii\.gz|nii|mha|mhd|nrrd|png|jpe?g|tiff?|bmp)$", re.IGNORECASE)


def case_of_file(name: str, strip_channel: bool = False) -> str:
    """A file name without its image ending (and, with ``strip_channel``, its ``_XXXX`` channel suffix)."""
    stem = _ENDINGS.sub("", Path(name).name)
    return re.sub(r"_\d{4}$", "", stem) if strip_channel else stem


@dataclass(frozen=True)
class SiteMap:
    """A read site map: case id -> (site, split or None, where in the file, e.g. ``row 3``)."""

    path: Path
    rows: dict[str, tuple[str, str | None, str]]

    def sites(self) -> list[str]:
        """The sites the map names, sorted."""
        return sorted({site for site, _, _ in self.rows.values()})


def _split(value, path: Path, where: str) -> str | None:
    value = "" if value is None else str(value).strip()
    if value == "":
        return None
    if value not in SPLIT_VALUES:
        raise DataError(f"{path} {where}: unknown split {value!r}; use one of {list(SPLIT_VALUES)} or leave it "
                        "empty (the dataset's own split, else 80/20 by case)")
    return value


def _add(rows: dict, path: Path, where: str, case_id, site, split) -> None:
    case_id, site = str(case_id or "").strip(), str(site or "").strip()
    if not case_id or not site:
        empty = "case_id" if not case_id else "site"
        raise DataError(f"{path} {where}: empty {empty}; every row names a case and its site")
    if case_id in rows:
        raise DataError(f"{path} {where}: case {case_id!r} again (first at {rows[case_id][2]}); a case belongs to "
                        "one site: remove one of the rows")
    rows[case_id] = (site, _split(split, path, where), where)


def _read_csv(path: Path) -> dict:
    rows: dict = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("case_id", "site") if c not in cols]
        if missing:
            raise DataError(f"{path}: no column {missing} (columns found: {cols}); a site map has the columns "
                            "case_id, site and optionally split")
        for i, raw in enumerate(reader, start=2):  # row 1 is the header
            row = {(k or "").strip(): v for k, v in raw.items()}
            _add(rows, path, f"row {i}", row.get("case_id"), row.get("site"), row.get("split"))
    return rows


def _read_datalist(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({e}); fix the file") from e
    entries = raw.get("training") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a datalist {{\"training\": [{{\"image\": ..., \"label\": ..., "
                        "\"site\": ...}, ...]}; no \"training\" list in it")
    rows: dict = {}
    for i, e in enumerate(entries):
        where = f"training[{i}]"
        if not isinstance(e, dict) or "site" not in e or ("label" not in e and "image" not in e):
            raise DataError(f"{path} {where}: expected {{\"image\": ..., \"label\": ..., \"site\": ...}}, got {e!r}")
        if e.get("label"):
            case = case_of_file(str(e["label"]))
        else:
            image = e["image"][0] if isinstance(e["image"], list) and e["image"] else e["image"]
            case = case_of_file(str(image), strip_channel=True)
        _add(rows, path, where, case, e["site"], e.get("split"))
    return rows


def read_site_map(path: str | Path) -> SiteMap:
    """Reads a site map (``.csv`` or a ``.json`` datalist); DataError naming the file, row and fix on bad input."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise DataError(f"data.sites_from: file {path} does not exist; point it at the site map (a CSV with the "
                        "columns case_id, site[, split], or a datalist JSON), relative to the spec's folder")
    bad = file_problem(path)
    if bad:
        raise DataError(f"data.sites_from: {bad}")
    if path.suffix.lower() == ".csv":
        rows = _read_csv(path)
    elif path.suffix.lower() == ".json":
        rows = _read_datalist(path)
    else:
        raise DataError(f"data.sites_from: {path} is neither .csv (columns case_id, site, split) nor a .json "
                        "datalist; rename or convert it")
    if not rows:
        raise DataError(f"{path}: no rows; list every case with its site")
    return SiteMap(path=path, rows=rows)


def apply_site_map(site_map: SiteMap, cases: dict[str, tuple[Path, str | None]],
                   broken: set[str] = frozenset()) -> tuple[dict, list[str]]:
    """Assigns the dataset's cases to the map's sites.

    Args:
        site_map: the read map.
        cases: case id -> (its first file, the dataset's own split or None).
        broken: ids of cases whose files have problems of their own (reported apart: a row naming one is fine).

    Returns:
        ``(assigned, problems)``: case id -> (site, split) for the cases the map names (the map's split
        wins over the dataset's own), and one message per case in no row, row naming no case, and site
        with too few cases for its splits.
    """
    problems = []
    path = site_map.path
    for case, (file, _) in sorted(cases.items()):
        if case not in site_map.rows:
            problems.append(f"{file}: case {case!r} is in no row of the site map {path}; add a row "
                            f"`{case},SITE` (or remove the case)")
    examples = ", ".join(sorted(cases)[:3]) or "none found"
    for case, (_, _, where) in site_map.rows.items():
        if case not in cases and case not in broken:
            problems.append(f"{path} {where}: case_id {case!r} names no case of the dataset (its cases: {examples}"
                            f"{' ...' if len(cases) > 3 else ''}); fix the case id or remove the row")
    assigned = {c: (site, split if split is not None else cases[c][1])
                for c, (site, split, _) in site_map.rows.items() if c in cases}
    for site in site_map.sites():
        splits = [site_map.rows[c][1] for c, (s, _) in assigned.items() if s == site]  # the map's own splits
        if len(splits) < 2:
            problems.append(f"{path}: site {site!r} has {len(splits)} case(s) of the dataset; a site needs at least 2 "
                            "(one to train on, one to test). Add cases to it or merge it into another site")
        elif all(sp is not None for sp in splits) and len(set(splits)) < 2:
            problems.append(f"{path}: every case of site {site!r} is in split {splits[0]!r}; give it at least one "
                            f"{'test' if splits[0] == 'train' else 'train'} case, or leave its split column empty "
                            "(80/20 by case)")
    return assigned, problems
