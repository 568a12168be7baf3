"""Publish a finished experiment as a self-contained, relocatable folder, and re-derive its analysis from it.

``oodsweep export EXPERIMENT_DIR OUT_DIR`` writes everything the analysis reads, less the model weights, the
Tune/Train state, MLflow and the caches::

    OUT_DIR/
      published.json     what was published: the experiment's name, the analysis's arguments, every file
                         with its size and SHA-256, and the command that re-derives it
      spec.yaml          the frozen spec; absolute paths rewritten (``${OODSWEEP_STORAGE:-./oodsweep-runs}``,
                         ``${OODSWEEP_DATA:-./data}``, ``<name>`` for the others)
      records/           members, slices, uncertainty, uncertainty_sites, surface (.parquet, zstd),
                         predictions/<member>/<site>.npz (the packed masks the agreement reads, deflated),
                         uncertainty/fits/*.json (δ's convergence), uncertainty/examples/*.npz (Fig. 6: the
                         shown member's slices, the slice it shows of the others; --all-examples: all);
                         where the δ-budget sensitivity ran, uncertainty_budget.parquet and
                         uncertainty_budget/fits/*.json
      analysis/          the experiment's analysis as it was: claims.md / claims.csv, tables.md, *.csv,
                         summary.json, plots/
      driver.log         (``--log FILE``) a captured console log of the run

No file in it holds an absolute path of the machine it came from: the experiment's folder is written
``<experiment>``, its storage ``<storage>``, the data ``<data>``, the home folder ``~`` and each ``--strip PATH``
``<its name>``; the export checks every file's bytes for these paths and refuses to finish otherwise.

``oodsweep rederive OUT_DIR`` runs the whole analysis again from ``OUT_DIR/records`` into a temporary folder
(``--out DIR`` keeps it) and compares every file with ``OUT_DIR/analysis``: ``claims.csv`` must be identical
byte for byte; the others are listed as identical or different (``summary.json`` without its timings).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import ExperimentError

MANIFEST = "published.json"
#: The merged record tables the analysis reads (``trainables.records``); parts are left behind (a merged
#: table with no parts beside it is read as it is).
TABLES = ("members.parquet", "slices.parquet", "uncertainty.parquet", "uncertainty_sites.parquet", "surface.parquet",
          "uncertainty_budget.parquet")  # the last: the δ-budget sensitivity (C4 at a longer δ), where it ran
#: δ's fit records (convergence; the sensitivity's epochs label its claims rows), copied as they are.
FIT_DIRS = ("uncertainty/fits", "uncertainty_budget/fits")
TEXT_SUFFIXES = {".md", ".csv", ".json", ".jsonl", ".yaml", ".yml", ".log", ".txt", ".svg"}
#: The file whose bytes the re-derivation must reproduce.
CHECKED = "claims.csv"


def _prefixes(pairs: list[tuple[str | os.PathLike, str]]) -> list[tuple[str, str]]:
    """(absolute path, placeholder), longest first; each path in its given and its resolved spelling, the home
    folder as ``~``; never ``/`` itself."""
    home = Path.home()
    out: dict[str, str] = {}
    for p, name in [*pairs, *([(home, "~")] if len(home.parts) > 1 else [])]:
        for spelling in {os.path.abspath(p), os.path.realpath(p)}:
            if len(Path(spelling).parts) > 1:
                out.setdefault(spelling.rstrip("/"), name)
    return sorted(out.items(), key=lambda kv: -len(kv[0]))


def _experiment_prefixes(exp: Path, spec, raw: dict, strip: list[str]) -> list[tuple[str, str]]:
    """Where the experiment is and was (the frozen ``storage``, ``.oodsweep-location``), its data and caches,
    and the folders the user names."""
    from .reconcile import LOCATION_FILE

    pairs: list[tuple[str | os.PathLike, str]] = [(exp, "<experiment>"), (exp.parent, "<storage>")]
    frozen = raw.get("storage")
    if isinstance(frozen, str) and os.path.isabs(frozen):
        pairs += [(Path(frozen) / exp.name, "<experiment>"), (frozen, "<storage>")]
    loc = exp / LOCATION_FILE
    if loc.is_file() and os.path.isabs(old := loc.read_text(encoding="utf-8").strip()):
        pairs += [(old, "<experiment>"), (Path(old).parent, "<storage>")]
    storages = [Path(os.path.abspath(p)) for p, n in pairs if n == "<storage>"]
    data = [spec.data.root, *(r for _, _, r in spec.data.sites), *([spec.data.cache_dir] if spec.data.cache_dir else [])]
    pairs += [(d, "<data>" if i == 0 else f"<{Path(d).name}>") for i, d in enumerate(data)
              if not any(Path(os.path.abspath(d)).is_relative_to(s) for s in storages)]  # else: <storage>/...
    return _prefixes(pairs + [(s, f"<{Path(os.path.abspath(s)).name or 'root'}>") for s in strip])


def relativize(text: str, prefixes: list[tuple[str, str]]) -> str:
    """``text`` with each absolute path of ``prefixes`` replaced by its placeholder, at path boundaries only
    (``/a/b`` is replaced in ``/a/b/c`` and ``sqlite:////a/b``, not in ``/a/bc``)."""
    for path, name in prefixes:
        text = re.sub(re.escape(path) + r"(?![A-Za-z0-9_.-])", lambda m, n=name: n, text)
    return text


def _relativize_value(v, prefixes, spec_names: dict[str, str]):
    if isinstance(v, dict):
        return {k: _relativize_value(x, prefixes, spec_names) for k, x in v.items()}
    if isinstance(v, list):
        return [_relativize_value(x, prefixes, spec_names) for x in v]
    if isinstance(v, str):
        v = relativize(v, prefixes)
        for placeholder, env in spec_names.items():
            v = v.replace(placeholder, env)
    return v


#: In spec.yaml the storage and data placeholders are written as the presets write them, so the file still parses.
SPEC_NAMES = {"<storage>": "${OODSWEEP_STORAGE:-./oodsweep-runs}", "<data>": "${OODSWEEP_DATA:-./data}"}


def _copy_table(src: Path, dst: Path, prefixes) -> None:
    """A parquet table rewritten with zstd (the schema and its pandas metadata kept, so pandas reads the same
    frame), its string columns' absolute paths replaced."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    for i, field in enumerate(table.schema):
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            continue
        col = table.column(i)
        for path, name in prefixes:
            if pc.any(pc.match_substring(col, path)).as_py():
                col = pc.replace_substring_regex(col, re.escape(path) + r"(?:$|(/))", name + r"\1")
        table = table.set_column(i, field, col)
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dst, compression="zstd")


def _copy_npz(src: Path, dst: Path) -> None:
    """The same arrays, deflated (``np.load`` reads both; the packed masks are mostly zeros)."""
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst, **arrays)


def fig6_slice(exp: Path) -> tuple[str, tuple[str, str, int]] | None:
    """The member and slice ``(site, case_id, slice_idx)`` of the analysis's Fig. 6 (its ``plots/fig6_<member>.png``,
    the slice chosen as the analysis chooses it); None without one."""
    from analysis.examples import example_members, fig6_inputs
    from analysis.plots import safe_name
    from trainables.records import load_uncertainty

    shown = sorted((exp / "analysis" / "plots").glob("fig6_*.png"))
    member = {safe_name(m): m for m in example_members(exp)}.get(shown[0].stem[len("fig6_"):]) if len(shown) == 1 \
        else None
    if member is None:
        return None
    chosen, _ = fig6_inputs(exp, None, load_uncertainty(exp), member)
    return member, chosen.key


def _copy_examples(src: Path, dst: Path, key: tuple[str, str, int] | None) -> None:
    """An examples file deflated; with ``key``, only that slice (Fig. 6 reads no other slice of the members it
    does not show)."""
    from analysis.examples import load_examples

    if key is None:
        return _copy_npz(src, dst)
    keep = np.array([e.key == key for e in load_examples(src)], dtype=bool)
    with np.load(src) as z:
        arrays = {k: (z[k][keep] if z[k].ndim and len(z[k]) == len(keep) else z[k]) for k in z.files}
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst, **arrays)


def _copy_text(src: Path, dst: Path, prefixes) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(relativize(src.read_text(encoding="utf-8"), prefixes), encoding="utf-8")


def _copy_tree(src: Path, dst: Path, prefixes) -> None:
    for f in sorted(src.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            target = dst / f.relative_to(src)
            if f.suffix in TEXT_SUFFIXES:
                _copy_text(f, target, prefixes)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def analysis_arguments(spec) -> dict:
    """``run_analysis``'s keyword arguments as the driver passes them for ``spec`` (``run_analysis_stage``)."""
    from .driver import severity_chain

    return {"metric": spec.analysis.metric, "indicators": list(spec.analysis.indicators),
            "degenerate_floor": spec.analysis.degenerate_floor, "target_order": list(spec.data.targets),
            "severity_chain": severity_chain(spec), "memory_gib": spec.analysis.memory_gib}


def leaked_paths(folder: Path, prefixes: list[tuple[str, str]]) -> list[str]:
    """``file: path`` for each file under ``folder`` whose bytes still hold one of the absolute paths."""
    found = []
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            found += [f"{f.relative_to(folder)}: {p}" for p, _ in prefixes if p.encode() in data]
    return found


def export_experiment(experiment_dir: str | os.PathLike, out_dir: str | os.PathLike, log: str | None = None,
                      strip: list[str] | None = None, check: bool = True, all_examples: bool = False) -> dict:
    """Write the published folder of ``experiment_dir`` to ``out_dir`` (module docstring); with ``check``,
    re-derive it at once (``rederive``); ``all_examples``: every slice of δ's examples, not only the one Fig. 6
    shows for the members it does not show. Returns the manifest, with ``rederived`` when checked.

    Raises:
        ExperimentError: no analysis to publish, an ``out_dir`` that is not empty, a driver still running, or an
            absolute path left in a file (each message names the folder or file and the fix).
    """
    from trainables import records

    from .console import command
    from .experiment import load_experiment_spec
    from .lock import driver_running

    spec = load_experiment_spec(experiment_dir)
    exp = spec.experiment_dir
    out = Path(os.path.abspath(out_dir))
    if driver_running(exp):
        raise ExperimentError(f"{exp}: a driver is running this experiment; export it once it has finished")
    summary_path = exp / "analysis" / "summary.json"
    if not (exp / "analysis" / CHECKED).is_file() or not summary_path.is_file():
        raise ExperimentError(f"{exp / 'analysis'} holds no {CHECKED} or summary.json: run "
                              f"`{command('oodsweep', 'analyze', exp)}` first, then export")
    if out.exists() and any(out.iterdir()):
        raise ExperimentError(f"{out} is not empty; export into a new folder (or remove its files first: the "
                              f"published folder is written whole)")
    if out == exp or exp in out.parents:
        raise ExperimentError(f"{out} is inside the experiment {exp}; export to a folder outside it")
    t0 = time.perf_counter()
    # the merged tables brought up to date from their parts first (as any reader of the records does)
    records.load_records(exp)
    records.load_uncertainty(exp)
    records.load_uncertainty_sites(exp)
    records.load_surface(exp)
    records.load_uncertainty_budget(exp)
    import yaml

    raw = yaml.safe_load((exp / "spec.yaml").read_text(encoding="utf-8"))
    prefixes = _experiment_prefixes(exp, spec, raw if isinstance(raw, dict) else {}, list(strip or []))
    rdir, odir = records.records_dir(exp), out / "records"
    for name in TABLES:
        if (rdir / name).is_file():
            _copy_table(rdir / name, odir / name, prefixes)
    for f in sorted((rdir / "predictions").rglob("*.npz")) if (rdir / "predictions").is_dir() else []:
        rel = f.relative_to(rdir / "predictions")
        if not f.name.startswith(".") and "splits" not in rel.parts:  # splits/: δ's fit input, not the analysis's
            _copy_npz(f, odir / "predictions" / rel)
    shown = fig6_slice(exp) if not all_examples else None
    for f in sorted((rdir / "uncertainty" / "examples").glob("*.npz")):
        if not f.name.startswith("."):
            _copy_examples(f, odir / "uncertainty" / "examples" / f.name,
                           None if shown is None or f.stem == shown[0] else shown[1])
    for fits in FIT_DIRS:
        if (rdir / fits).is_dir():
            _copy_tree(rdir / fits, odir / fits, prefixes)
    _copy_tree(exp / "analysis", out / "analysis", prefixes)
    (out / "spec.yaml").write_text(yaml.safe_dump(_relativize_value(raw, prefixes, SPEC_NAMES), sort_keys=False),
                                   encoding="utf-8")
    if log:
        _copy_text(Path(log), out / "driver.log", prefixes)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    args = {**analysis_arguments(spec), "metric": summary.get("metric", spec.analysis.metric)}
    files = sorted(f for f in out.rglob("*") if f.is_file())
    manifest = {"experiment": exp.name, "format": 1, "analysis_arguments": args,
                "missing": [relativize(m, prefixes) for m in summary.get("missing", [])],
                "rederive": "oodsweep rederive <this folder>", "checked": f"analysis/{CHECKED}",
                "placeholders": sorted(set(n for _, n in prefixes)),
                "bytes": sum(f.stat().st_size for f in files),
                "files": {str(f.relative_to(out)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    leaks = leaked_paths(out, prefixes)
    if leaks:
        raise ExperimentError(f"{out}: absolute paths of this machine are left in " + "; ".join(leaks[:10])
                              + ": pass the folder holding them with --strip, or remove the file")
    manifest["export_seconds"] = round(time.perf_counter() - t0, 3)
    if check:
        manifest["rederived"] = rederive(out)
    return manifest


def _same(a: Path, b: Path) -> bool:
    if a.name == "summary.json":  # its timings differ on every run
        def load(p):
            d = json.loads(p.read_text(encoding="utf-8"))
            d.pop("seconds", None)
            return d
        return load(a) == load(b)
    return a.read_bytes() == b.read_bytes()


def compare_outputs(published: Path, rederived: Path) -> dict:
    """File by file: ``identical``, ``different``, ``only_published``, ``only_rederived`` (relative paths)."""
    def files(d: Path) -> set[str]:
        return {str(f.relative_to(d)) for f in d.rglob("*") if f.is_file()} if d.is_dir() else set()
    a, b = files(published), files(rederived)
    both = sorted(a & b)
    same = [f for f in both if _same(published / f, rederived / f)]
    return {"identical": same, "different": [f for f in both if f not in same],
            "only_published": sorted(a - b), "only_rederived": sorted(b - a)}


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ExperimentError(f"{folder} is not a published experiment (no {MANIFEST}); `oodsweep export "
                              f"EXPERIMENT_DIR {folder}` writes one")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ExperimentError(f"{path} is damaged ({e}); export the experiment again") from None


def rederive(published: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Run the analysis from ``published/records`` into ``out_dir`` (default a temporary folder, removed) and
    compare it with ``published/analysis`` (``compare_outputs``). ``claims_identical``: ``claims.csv`` is
    reproduced byte for byte. Nothing is written into ``published``."""
    from analysis import run_analysis

    published = Path(os.path.abspath(published))
    manifest = read_manifest(published)
    if not (published / "records").is_dir():
        raise ExperimentError(f"{published} has no records/ folder: the published folder is incomplete; export "
                              f"the experiment again")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oodsweep-rederive-") as tmp:
        base = Path(os.path.abspath(out_dir)) if out_dir is not None else Path(tmp)
        exp = base / manifest["experiment"]  # the experiment's own name: the reports quote it
        exp.mkdir(parents=True, exist_ok=True)
        link = exp / "records"
        if link.is_symlink() or link.exists():
            raise ExperimentError(f"{exp} exists already; pass an empty --out folder")
        try:  # the records are read, never written: no parts beside the merged tables means nothing to merge
            link.symlink_to(published / "records", target_is_directory=True)
        except OSError:
            shutil.copytree(published / "records", link)
        shutil.copyfile(published / "spec.yaml", exp / "spec.yaml")
        raw_out = base / ".raw-analysis"
        run_analysis(exp, out_dir=raw_out, missing=list(manifest.get("missing", [])),
                     **manifest["analysis_arguments"])
        # the same placeholders as the published files (written there from <experiment>/analysis)
        prefixes = _prefixes([(exp, "<experiment>"), (base, "<storage>"), (raw_out, "<experiment>/analysis")])
        out = base / "analysis"
        _copy_tree(raw_out, out, prefixes)
        shutil.rmtree(raw_out)
        result = compare_outputs(published / "analysis", out)
        result["claims_identical"] = CHECKED in result["identical"]
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["out_dir"] = str(out) if out_dir is not None else None
    return result


def format_rederived(result: dict, published: Path) -> str:
    lines = [f"[oodsweep] re-derived the analysis of {published} in {result['seconds']:.1f}s: "
             f"{len(result['identical'])} files identical, {len(result['different'])} different"]
    lines.append(f"  {CHECKED}: " + ("identical, byte for byte" if result["claims_identical"] else
                                     "NOT reproduced" if CHECKED in result["different"] else "missing"))
    for key, what in (("different", "differs"), ("only_published", "not re-derived"),
                      ("only_rederived", "not in the published folder")):
        lines += [f"  {f}: {what}" for f in result[key]]
    if result.get("out_dir"):
        lines.append(f"  re-derived files: {result['out_dir']}")
    return "\n".join(lines)


def cmd_export(args) -> int:
    manifest = export_experiment(args.experiment_dir, args.out_dir, log=args.log, strip=args.strip or [],
                                 check=not args.no_check, all_examples=args.all_examples)
    out = Path(os.path.abspath(args.out_dir))
    print(f"[oodsweep] published {args.experiment_dir} to {out}: {len(manifest['files'])} files, "
          f"{manifest['bytes'] / 1e6:.1f} MB ({manifest['export_seconds']:.1f}s)")
    if "rederived" in manifest:
        print(format_rederived(manifest["rederived"], out))
        if not manifest["rederived"]["claims_identical"]:
            print(f"oodsweep: the experiment's analysis is not what its records give now; run `oodsweep analyze "
                  f"{args.experiment_dir}` and export again", file=sys.stderr)
            return 1
    return 0


def cmd_rederive(args) -> int:
    result = rederive(args.published_dir, args.out)
    print(format_rederived(result, Path(args.published_dir)))
    return 0 if result["claims_identical"] else 1
