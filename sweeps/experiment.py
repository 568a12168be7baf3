"""The experiment directory's own files (docs/architecture.md "Records"): the names the stages share, the
frozen spec (what a resume checks), and the driver lock.

``<storage>/<name>/spec.yaml`` is the spec as launched; a rerun or ``oodsweep resume`` compares the new
spec with it and refuses changes that would alter results (``RESUMABLE`` lists the ones that may change).
``.driver.lock`` is held by the running driver.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from .console import log
from .errors import ExperimentError
from .lock import DRIVER_LOCK, driver_lock, driver_running  # noqa: F401 (the experiment's lock, used as experiment.X)
from .spec import SpecError, SweepSpec, parse_spec
from .spec_checks import load_yaml

SPEC_FILE = "spec.yaml"
#: the stages' folders (their Ray Tune experiments) and the marker a finished stage leaves in its folder
POOL_STAGE = "pool"
UNCERTAINTY_STAGE = "uncertainty"
DONE_MARKER = ".oodsweep-done"


def frozen_spec(spec: SweepSpec) -> dict:
    """The spec as launched: environment variables expanded, paths absolute."""
    raw = json.loads(json.dumps(spec.raw))  # deep copy
    raw["storage"] = str(spec.storage)
    raw["data"]["root"] = str(spec.data.root)
    for site, _, root in spec.data.sites:
        raw["data"]["sites"][site]["root"] = str(root)
    if spec.data.cache_dir:
        raw["data"]["cache_dir"] = str(spec.data.cache_dir)
    if spec.imported is not None:  # a pool trained elsewhere: its table and predictions, absolute
        raw["imported"]["members"] = str(spec.imported.members)
        if spec.imported.predictions is not None:
            raw["imported"]["predictions"] = str(spec.imported.predictions)
    if spec.pool.sam_checkpoint:
        raw["pool"]["sam_checkpoint"] = str(spec.pool.sam_checkpoint)
    if spec.pool.sam_per_arch:
        raw["pool"]["sam_checkpoint"] = {a: w["sam_checkpoint"] for a, w in spec.pool.sam_per_arch.items()}
    if isinstance(spec.pool.encoder_weights, Path):
        raw["pool"]["encoder_weights"] = str(spec.pool.encoder_weights)
    if spec.runtime_env is not None:
        raw["runtime_env"] = json.loads(json.dumps(spec.runtime_env))
    return raw


def _diff(a, b, key=""):
    if isinstance(a, dict) and b is None or a is None and isinstance(b, dict):  # a block added or removed
        a, b = a or {}, b or {}
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _diff(a.get(k), b.get(k), f"{key}.{k}" if key else k)
    elif a != b:
        yield key, f"{key}: {a!r} -> {b!r}"


#: Spec keys that may change between the launch and a resume: where the experiment folder lies (it
#: may have been moved), where and how wide trials run, how often they may fail, what the analysis
#: shows, where the user's code is found (``runtime_env``: the architectures' definitions in ``pool.arch``
#: are compared, not the code they import). Everything else defines the results.
RESUMABLE = ("storage", "runtime_env", "pool.resources", "pool.max_concurrent_trials", "pool.max_failures",
             "pool.checkpoint_every", "uncertainty.resources",
             "uncertainty.trial_cpu", "uncertainty.max_concurrent_trials", "uncertainty.max_failures",
             "uncertainty.train_max_failures", "uncertainty.sensitivity",
             "analysis", "pool.training.data_placement", "pool.training.loader_workers",
             "uncertainty.training.data_placement", "uncertainty.training.loader_workers")


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE)


def _read_frozen(path: Path) -> dict:
    """The frozen spec of an experiment; a damaged one is an error naming the file and the fix."""
    fix = (f"it is the copy oodsweep froze at launch: replace it with the spec the sweep was launched from "
           f"(`cp <your spec.yaml> {path}`; a resume checks it against the records' settings), or move "
           f"{path.parent} away to start over")
    try:
        raw = load_yaml(path, "frozen spec")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ExperimentError(f"{path} is damaged: not valid YAML{at} "
                              f"({getattr(e, 'problem', None) or type(e).__name__}); {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExperimentError(f"{path} cannot be read ({type(e).__name__}: {e}); {fix}") from None
    except SpecError as e:  # too big, not UTF-8, an alias
        raise ExperimentError(f"{path} is damaged: {str(e).removeprefix(str(path)).lstrip(': ')}; {fix}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict) or "name" not in raw:
        raise ExperimentError(f"{path} is damaged: expected the frozen sweep spec (a mapping with name, data, "
                              f"pool, ...), got {type(raw).__name__} {str(raw)[:60]!r}; {fix}")
    return raw


def check_frozen(spec: SweepSpec) -> tuple[dict, list[str]]:
    """The spec to freeze and its resumable changes; refuse one changed in a way that cannot resume.

    Reads only: nothing is written until every check that can refuse the spec has passed (``freeze``).
    """
    exp = spec.experiment_dir
    frozen = frozen_spec(spec)
    path = exp / SPEC_FILE
    if not path.exists():
        return frozen, []
    old = _read_frozen(path)
    changes = list(_diff(old, frozen))
    fixed = [msg for key, msg in changes if not _resumable(key)]
    if fixed:
        raise SpecError(
            f"{exp} already holds sweep {spec.name!r} launched from a different spec, and these changes "
            f"cannot be resumed: " + "; ".join(fixed) + ". Give the sweep a new `name`, or move "
            f"{exp} away to start over (its finished work is kept as it is). Only these may change "
            f"on a resume: {', '.join(RESUMABLE)}.")
    return frozen, [msg for _, msg in changes]


def freeze(spec: SweepSpec, frozen: dict, changes: list[str]) -> None:
    path = spec.experiment_dir / SPEC_FILE
    if changes:
        log("continuing with a changed spec: " + "; ".join(changes))
    if changes or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SPEC_FILE}.tmp")
        tmp.write_text(yaml.safe_dump(frozen, sort_keys=False))
        os.replace(tmp, path)


def prepare_experiment(spec: SweepSpec) -> Path:
    """Create the experiment dir and freeze the spec; refuse a spec changed in a way that cannot resume."""
    frozen, changes = check_frozen(spec)
    freeze(spec, frozen, changes)
    return spec.experiment_dir


def load_experiment_spec(experiment_dir: str | os.PathLike) -> SweepSpec:
    """The frozen spec of an existing experiment directory, placed where the folder is now.

    The folder may have been moved or renamed since it ran: its location is the folder given, not
    the frozen ``storage``/``name``.
    """
    from . import objstore

    remote = str(experiment_dir).rstrip("/") if objstore.is_remote(experiment_dir) else None
    # on object storage: a node-local working copy (its writes are uploaded by the driver's session or at exit)
    exp = objstore.checkout(remote) if remote else Path(os.path.abspath(experiment_dir))
    path = exp / SPEC_FILE
    if remote and not path.exists():
        raise ExperimentError(f"{remote} holds no oodsweep experiment (no {SPEC_FILE}); pass the URI `oodsweep run` "
                              f"printed, e.g. <storage>/<sweep name>")
    if not exp.is_dir():
        raise ExperimentError(f"{exp} does not exist; pass the experiment folder `oodsweep run` printed, "
                              f"e.g. <storage>/<sweep name>")
    if not path.exists():
        raise ExperimentError(f"{exp} is not an oodsweep experiment (no {SPEC_FILE}); pass the folder "
                              f"`oodsweep run` printed, e.g. <storage>/<sweep name>")
    if (exp / "published.json").is_file():  # sweeps.publish.MANIFEST: records and analysis, no weights
        raise ExperimentError(f"{exp} is a published folder (`oodsweep export`: records and analysis, no weights); "
                              f"it cannot be resumed or analysed in place: `oodsweep rederive {exp}` reruns its "
                              f"analysis, `oodsweep report {exp}` its claims report")
    raw = _read_frozen(path)
    raw["storage"] = remote.rsplit("/", 1)[0] if remote else str(exp.parent)  # the folder may have been moved since
    spec = parse_spec(raw, where=str(path))
    return SweepSpec(**{**spec.__dict__, "location": exp, "remote": remote})
