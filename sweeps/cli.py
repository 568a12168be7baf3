"""The ``oodsweep`` command line.

    oodsweep run SPEC [--address ADDR] [--num-cpus N]   run (or continue) a sweep
    oodsweep resume EXPERIMENT_DIR [--address ADDR]     continue an interrupted sweep from its folder
    oodsweep demo [--storage DIR] [--smoke]             the embedded-default demo sweep
    oodsweep status EXPERIMENT_DIR                      what is done, failed, pending per stage
    oodsweep analyze EXPERIMENT_DIR [--metric M] [--out DIR] [--label NAME|all]   rerun the analysis (no Ray needed)
    oodsweep report EXPERIMENT_DIR [--metric M] [--label NAME]  the claims report: which of the paper's claims hold
    oodsweep export EXPERIMENT_DIR OUT_DIR [--log FILE] [--strip PATH]  publish it: records, spec, analysis; no weights
    oodsweep rederive PUBLISHED_DIR [--out DIR]         rerun the analysis of a published folder, compare claims.csv
    oodsweep data check ROOT --layout NAME [--sites A,B] [--sites-from MAP]  validate a dataset folder
    oodsweep data prepare SPEC                          build the spec's slice cache ahead of a sweep
    oodsweep import SPEC [--members CSV] [--predictions DIR] [--records-only]
                                                        a pool trained elsewhere: its predicted masks -> records,
                                                        then δ and the analysis as `run` does
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from trainables.data.base import DataError

from .errors import LockError, OodsweepError, StorageError
from .spec import METRICS, load_spec

PRESETS = Path(__file__).parent / "presets"
PROBIT_CLIP_HELP = ("the probit scale's clip: 'auto' (half a case of each site, 1/(2 x its test cases)) or a number "
                    "in (0, 0.5); default: the frozen spec's analysis.probit_clip, else auto")


def _probit_clip_arg(value: str) -> str | float:
    """``--probit-clip``: 'auto' or a number in (0, 0.5) (argparse prints the message and exits 2)."""
    from analysis.probit_clip import check_probit_clip

    try:
        return check_probit_clip(value, where="--probit-clip")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    """argparse's type for a count that must be >= 1 (``--num-cpus 0`` would hang Ray, -1 fail after the spec
    is frozen): refused before anything runs."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n} (how many CPUs the local Ray may use; leave "
                                         f"--num-cpus out to use all of this machine's)")
    return n


def _refuse_if_driver_runs(exp: Path, out: str | None, cmd: str) -> bool:
    """Whether a driver holds ``exp``; without ``--out`` that is a ``LockError`` naming its pid and host (the
    driver writes ``analysis/`` and MLflow itself, and SQLite takes one writer)."""
    from .console import command
    from .lock import DRIVER_LOCK, driver_running

    what = {"analyze": "analysis", "report": "claims report"}[cmd]
    holder = driver_running(exp)
    if holder is None:
        return False
    if not out or Path(out).resolve() == exp / "analysis":
        raise LockError(f"{exp}: a driver is running this experiment ({holder}; it holds {exp / DRIVER_LOCK}) and "
                        f"writes its analysis and MLflow runs when it ends. Wait for it "
                        f"(`{command('oodsweep', 'status', exp)}` shows its progress), stop it, or write this "
                        f"{what} to another folder: `{command('oodsweep', cmd, exp, '--out', 'DIR')}` "
                        f"(nothing is logged to MLflow then)")
    print(f"[oodsweep] a driver is running {exp} ({holder}): the {what} goes to {out} only, nothing is logged "
          f"to MLflow", file=sys.stderr)
    return True


def _layouts() -> list[str]:
    from trainables.data.layouts import LAYOUTS

    return sorted(LAYOUTS)


def _cmd_run(args) -> int:
    from .driver import run_sweep

    spec = load_spec(args.spec)
    run_sweep(spec, address=args.address, num_cpus=args.num_cpus)
    return 0


def _cmd_resume(args) -> int:
    from .driver import run_sweep
    from .experiment import load_experiment_spec

    spec = load_experiment_spec(args.experiment_dir)
    run_sweep(spec, address=args.address, num_cpus=args.num_cpus)
    return 0


#: `oodsweep demo --smoke`: the demo's pipeline in about a minute on 2 CPUs (tiny sites, one
#: architecture, two members, δ for one epoch with one baseline), for checking an installation or
#: a cluster rather than for results.
SMOKE = {"name": "demo-smoke",
         "data": {"synthetic": {"cases_per_site": 4, "shape": [40, 40, 8], "seed": 0}, "image_size": 32,
                  "test_fraction": 0.25, "targets": ["SiteB", "SiteC"]},
         "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1.0e-3]}, "epochs": {"snapshots": [1, 2]},
                  "batch_size": 4, "repeat": None},  # no extra seed (the demo's repeats an arch not in this grid)
         "uncertainty": {"epochs": 1, "passes": 2, "batch_size": 4, "baselines": ["bayescap"],
                         "bayescap": {"width": 8, "blocks": 1},
                         "baseline_members": "all"}}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in (
            "arch", "lr", "epochs", "synthetic") else v
    return out


def _cmd_demo(args) -> int:
    import yaml

    from .driver import run_sweep
    from .spec import parse_spec

    env = dict(os.environ)
    if args.storage:  # everything under it: the experiments and the synthetic data (the preset's ${VAR}s)
        env["OODSWEEP_STORAGE"] = str(Path(args.storage).resolve())
        env["OODSWEEP_DATA"] = str(Path(args.storage).resolve() / "data")
    if args.smoke:
        raw = _merge(yaml.safe_load((PRESETS / "demo.yaml").read_text()), SMOKE)
        raw["data"]["root"] = raw["data"]["root"].replace("synthetic-prostate", "synthetic-prostate-smoke")
        spec = parse_spec(raw, where="demo --smoke", env=env)
    else:
        spec = load_spec(PRESETS / "demo.yaml", env=env)
    run_sweep(spec, address=args.address, num_cpus=args.num_cpus)
    return 0


def _cmd_import(args) -> int:
    import yaml

    from .driver import run_sweep
    from .importer import import_pool
    from .spec import parse_spec

    path = Path(args.spec)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist; `oodsweep import` takes a spec with name, data and "
                        f"`imported: {{members: CSV, predictions: DIR}}` (docs/import.md)")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a YAML mapping with keys name, data, imported, ...")
    given = {k: str(Path(v).resolve()) for k, v in (("members", args.members), ("predictions", args.predictions)) if v}
    if given:  # the flags complete (or override) the spec's imported section
        raw["imported"] = {**(raw.get("imported") or {}), **given}
    spec = parse_spec(raw, where=str(path))
    spec = import_pool(type(spec)(**{**spec.__dict__, "source_file": path.resolve()}))
    if args.records_only:
        print(f"[oodsweep] records written to {spec.experiment_dir / 'records'}; `oodsweep resume "
              f"{spec.experiment_dir}` fits δ and runs the analysis")
        return 0
    run_sweep(spec, address=args.address, num_cpus=args.num_cpus)
    return 0


def _labels_of(experiment_dir: Path, wanted: list[str]) -> list[str]:
    """``--label`` values: the names given, or every label of the records for ``all``."""
    if "all" not in wanted:
        return list(dict.fromkeys(wanted))
    from trainables.records import label_names, load_records

    from .errors import SpecError

    names = label_names(load_records(experiment_dir)[1])
    if not names:
        raise SpecError(f"--label all: the records of {experiment_dir} hold one label (no 'label' column); "
                        f"analyse them without --label")
    return names


def _cmd_analyze(args) -> int:
    dirs = args.experiment_dir
    if len(dirs) > 1:  # each experiment's own analysis, then Tables 1-3 joined across them
        from analysis import joint_tables

        for d in dirs:
            _cmd_analyze(argparse.Namespace(**{**vars(args), "experiment_dir": [d], "out": None}))
        out = Path(args.out).resolve() if args.out else Path(dirs[0]).resolve() / "analysis"
        for f in joint_tables(dirs, out):
            print(f"[oodsweep] joint table written to {f}")
        return 0
    args.experiment_dir = dirs[0]
    from .driver import run_analysis_stage, tracker_for
    from .experiment import load_experiment_spec

    spec = load_experiment_spec(args.experiment_dir)
    running = _refuse_if_driver_runs(spec.experiment_dir, args.out, "analyze")
    out = None
    if args.out:
        out = Path(args.out).resolve()
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".oodsweep-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise StorageError(f"--out {args.out}: cannot write the analysis there ({e.strerror or e}); pass a "
                            f"folder you can create and write to, or leave --out out to write into "
                            f"{spec.experiment_dir / 'analysis'}") from None
    if args.label:  # one label's analysis (or each label's) of multi-label records: files only, no MLflow run
        for label in _labels_of(spec.experiment_dir, args.label):
            res = run_analysis_stage(spec, None, metric=args.metric, out_dir=out / label if out else None,
                                     allow_incomplete=args.allow_incomplete, label=label,
                                     probit_clip=args.probit_clip)
            print(f"[oodsweep] analysis of label {label} written to {res['out_dir']}")
        return 0
    tracker = None if args.no_mlflow or running else tracker_for(spec)
    res = run_analysis_stage(spec, tracker, metric=args.metric, out_dir=out, allow_incomplete=args.allow_incomplete,
                             memory_gib=args.memory_gib, probit_clip=args.probit_clip)
    print(f"[oodsweep] analysis written to {res['out_dir']}")
    def f(v):
        return "nan" if v is None else f"{v:.3f}"
    for c in res.get("correlations", []):
        print(f"  {c.get('indicator')}: {c.get('source')} -> {c.get('target')}: pearson r = {f(c.get('pearson_r'))} "
              f"(95% bootstrap CI {f(c.get('pearson_boot_low'))}..{f(c.get('pearson_boot_high'))}), "
              f"spearman rho = {f(c.get('spearman_rho'))}, n = {c.get('n')}")
    verdicts = {c["claim"]: c["verdict"] for c in reversed(res.get("claims", []))
                if c.get("kind") == "claim" and str(c.get("scope", "")).startswith("overall")}
    if verdicts:
        print(f"[oodsweep] claims ({Path(res['out_dir']) / 'claims.md'}): "
              + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())))
    return 0


def _cmd_report(args) -> int:
    from analysis.claims import build_claims, verdicts_markdown

    if (Path(args.experiment_dir) / "spec.yaml").is_file():
        _refuse_if_driver_runs(Path(os.path.abspath(args.experiment_dir)), args.out, "report")
    claims, files = build_claims(args.experiment_dir, metric=args.metric, out_dir=args.out, label=args.label,
                                 probit_clip=args.probit_clip)
    print(verdicts_markdown(claims))
    print(f"\n[oodsweep] claims report written to {files[1]} (every row: {files[0]})")
    return 0


def _cmd_status(args) -> int:
    from .status import experiment_status, format_status

    st = experiment_status(args.experiment_dir)
    print(json.dumps(st, indent=1, default=str) if args.json else format_status(st))
    return 0


def _cmd_data_check(args) -> int:
    from trainables.data.check import check_dataset, format_report

    sites = [s for s in args.sites.split(",") if s] if args.sites else None
    options = {"sites_from": args.sites_from, "channels": args.channels and args.channels.split(","),
               "labels": args.labels and args.labels.split(",")}
    if args.label_values:
        try:
            options["label_values"] = {k: int(v) for k, v in (kv.split("=") for kv in args.label_values.split(","))}
        except ValueError:
            raise DataError(f"--label-values {args.label_values!r}: expected NAME=VALUE[,NAME=VALUE], e.g. "
                            "lesion=255") from None
    report = check_dataset(args.root, args.layout, sites=sites, progress=True,
                           options={k: v for k, v in options.items() if v})
    print(format_report(report))
    return 0 if report.ok else 1


def _cmd_data_prepare(args) -> int:
    from trainables.data.cache import open_slice_cache

    from .driver import prepare_data

    from .guards import check_storage_writable

    spec = load_spec(args.spec)
    check_storage_writable(spec, experiment=False)  # the slice cache's folder (and synthetic sites)
    cache = open_slice_cache(prepare_data(spec, progress=True))
    m = cache.manifest
    print(f"[oodsweep] slice cache ready: {cache.path}")
    print(f"  {m['n_slices']} slices of {spec.data.image_size}x{spec.data.image_size}, modality {m['modality']}, "
          f"{cache.images.shape[1]} image channel(s), labels {cache.labels} ({m.get('label_kind', 'exclusive')})")
    for k, v in m["counts"].items():
        print(f"  {k}: {v['cases']} cases, {v['slices']} slices")
    for site, how in m.get("split_source", {}).items():
        print(f"  split of {site}: {how}")
    for sk in m["skipped"]:
        print(f"  skipped {sk['site']}/{sk['case_id']}: {sk['reason']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oodsweep", description="Which segmentation model will hold up at a "
                                     "site whose data it has never seen? Pools, uncertainty, on-the-line analysis.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or continue) the sweep a spec describes")
    p.add_argument("spec", help="sweep spec YAML (see sweeps/presets/)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=_positive_int, help="CPUs for a local Ray (default: all)")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("resume", help="continue an interrupted sweep from its experiment folder alone "
                                      "(finished trials are kept, unfinished ones restart from their checkpoints)")
    p.add_argument("experiment_dir", help="the folder `oodsweep run` printed: <storage>/<sweep name>")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=_positive_int, help="CPUs for a local Ray (default: all)")
    p.set_defaults(func=_cmd_resume)
    p = sub.add_parser("demo", help="the embedded-default demo: synthetic sites, local Ray, SQLite MLflow")
    p.add_argument("--storage", help="where experiments go (default: $OODSWEEP_STORAGE or ./oodsweep-runs)")
    p.add_argument("--num-cpus", type=_positive_int, help="CPUs for the local Ray (default: all)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--smoke", action="store_true", help="a one-minute version (tiny sites, 2 members) to check "
                                                        "an installation or a cluster")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("import", help="build an experiment from a pool trained elsewhere (its predicted masks "
                                      "per member and site), then fit δ and analyse it as `run` does")
    p.add_argument("spec", help="spec YAML with name, data and `imported: {members: CSV, predictions: DIR}` "
                                "instead of pool (docs/import.md)")
    p.add_argument("--members", help="the members table (CSV); overrides imported.members")
    p.add_argument("--predictions", help="folder of <member_id>/<site>/<case_id>.nii.gz masks; overrides "
                                         "imported.predictions")
    p.add_argument("--records-only", action="store_true", help="stop after writing the records (then `oodsweep "
                                                               "resume EXPERIMENT_DIR` runs δ and the analysis)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.set_defaults(func=_cmd_import)
    p = sub.add_parser("status", help="per stage: done, failed, pending")
    p.add_argument("experiment_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("analyze", help="recompute the analysis of a finished experiment (no Ray needed); several "
                                       "experiments on the same data (one per source) also get a joint Table 1")
    p.add_argument("experiment_dir", nargs="+")
    p.add_argument("--metric", choices=METRICS, help="default: the spec's analysis.metric")
    p.add_argument("--out", help="output folder (default: EXPERIMENT_DIR/analysis; with several experiments, where "
                                 "the joint tables go: default the first one's analysis folder)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the analysis to MLflow")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="analyse an experiment with missing pool or δ records (tables.md lists them); by "
                        "default it is refused, and `oodsweep resume` redoes them")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="multi-label records: the analysis of this label alone, written to "
                        "EXPERIMENT_DIR/analysis/per_label/NAME (or --out/NAME); repeat it, or give `all` for every "
                        "label; without it the analysis is the mean over the labels")
    p.add_argument("--memory-gib", type=float, metavar="GIB",
                   help="bound the pool's masks the agreement holds at once (blocks of cases; default: the spec's "
                        "analysis.memory_gib, else none)")
    p.add_argument("--probit-clip", metavar="CLIP", type=_probit_clip_arg, help=PROBIT_CLIP_HELP)
    p.set_defaults(func=_cmd_analyze)
    p = sub.add_parser("report", help="the claims report: each claim of the paper with its statistic, run-level "
                                      "interval and verdict, rebuilt from the experiment's files (no Ray, no MLflow)")
    p.add_argument("experiment_dir", help="a finished experiment folder (holding records/)")
    p.add_argument("--metric", choices=METRICS, help="default: the frozen spec's analysis.metric, else iou_3d")
    p.add_argument("--out", help="output folder (default: EXPERIMENT_DIR/analysis)")
    p.add_argument("--label", metavar="NAME", help="multi-label records: the claims of this label alone (default "
                                                  "output EXPERIMENT_DIR/analysis/per_label/NAME)")
    p.add_argument("--probit-clip", metavar="CLIP", type=_probit_clip_arg, help=PROBIT_CLIP_HELP)
    p.set_defaults(func=_cmd_report)
    from .publish import cmd_export, cmd_rederive

    p = sub.add_parser("export", help="publish a finished experiment as a self-contained, relocatable folder: its "
                                      "records, frozen spec and analysis, no weights, no absolute paths (docs/publish.md)")
    p.add_argument("experiment_dir")
    p.add_argument("out_dir", help="a new (or empty) folder")
    p.add_argument("--log", help="a captured console log of the run, published as driver.log (paths rewritten)")
    p.add_argument("--strip", action="append", metavar="PATH", help="another absolute folder to write as <its name> "
                                                                    "(e.g. the clone the run started from); repeatable")
    p.add_argument("--no-check", action="store_true", help="do not re-derive the analysis after the export")
    p.add_argument("--all-examples", action="store_true", help="every slice of δ's examples (default: what Fig. 6 "
                                                               "shows, as the analysis draws it)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("rederive", help="rerun the whole analysis of a published folder (temporary folder) and check "
                                        "that claims.csv is reproduced byte for byte; lists the files that differ")
    p.add_argument("published_dir")
    p.add_argument("--out", help="keep the re-derived files here (default: a temporary folder, removed)")
    p.set_defaults(func=cmd_rederive)
    p = sub.add_parser("data", help="dataset tools: check a folder, prepare a spec's slice cache")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("check", help="validate a dataset folder and print a summary (every problem in one pass)")
    q.add_argument("root", help="the dataset folder")
    q.add_argument("--layout", required=True, help="dataset layout: " + ", ".join(_layouts()))
    q.add_argument("--sites", help="comma-separated sites to check (default: every site found)")
    q.add_argument("--sites-from", help="nnunet, decathlon, folder2d: a site map (CSV case_id,site[,split] or a "
                                        "datalist JSON), as data.sites_from")
    q.add_argument("--channels", help="nnunet, decathlon: comma-separated channel names to read, as data.channels")
    q.add_argument("--labels", help="configured layouts: comma-separated label names, as data.labels")
    q.add_argument("--label-values", help="folder2d: NAME=VALUE[,NAME=VALUE] mask values, as data.label_values")
    q.set_defaults(func=_cmd_data_check)
    q = dsub.add_parser("prepare", help="build (or find) the slice cache a spec's sweep will read")
    q.add_argument("spec", help="sweep spec YAML")
    q.set_defaults(func=_cmd_data_prepare)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OodsweepError as e:  # the prefix says what kind: invalid spec, storage, tracking, cluster, ...
        print(f"oodsweep: {e.prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except DataError as e:
        print(f"oodsweep: data: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # failed trials, damaged records: the message names the file and what to do
        print(f"oodsweep: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        from .guards import STORAGE_ERRNOS, os_error_message

        if e.errno in STORAGE_ERRNOS:  # mid-run: a full disk, a lost mount, a read-only remount
            print(f"oodsweep: storage: {os_error_message(e)}", file=sys.stderr)
            return 1
        print(f"oodsweep: error: {e}", file=sys.stderr)  # ours name the file and the fix
        return 2
    except (ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"oodsweep: error: {msg}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
