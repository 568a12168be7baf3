"""Sweep specs: YAML a person writes -> validated dataclasses (docs/architecture.md "Specs").

The public entry points (``load_spec``, ``parse_spec``) and the spec's types. By concern:
``spec_schema`` (the dataclasses and choice lists), ``spec_checks`` (the checker, ``${VAR}``
expansion), ``spec_data`` (the ``data:`` section), ``spec_sections`` (``pool``, ``search``,
``uncertainty``, ``analysis``).

A pool trained elsewhere has an ``imported:`` section (its members table and predicted masks; ``oodsweep
import``, ``sweeps.importer``) instead of ``pool:``.

Validation happens before anything launches; every error names the key (as a dotted path),
the bad value and the valid choices or the fix. ``${VAR}`` and ``${VAR:-default}`` in strings
are replaced from the environment (an unset variable without a default is an error naming it).

Example::

    name: demo
    storage: ${OODSWEEP_STORAGE:-./oodsweep-runs}
    data: {layout: prostate_multisite, root: ./data/synthetic, source: SiteA,
           targets: [SiteB, SiteC, SiteD], image_size: 64, synthetic: {cases_per_site: 10}}
    pool:
      arch: {grid: [unet_r18, unet_effb0]}
      lr: {grid: [1.0e-3, 3.0e-4, 1.0e-4]}
      epochs: {snapshots: [3, 6]}
      seed: {grid: [0]}
      resources: {cpu: 1, gpu: 0}
    analysis: {metric: iou_3d}

``pool.arch`` also takes open architectures (``smp:FPN:resnet34``, ``monai:BasicUNet``, ``{target:
my_pkg.models:build}``; ``sweeps.user_models``), and a top-level ``runtime_env:`` (Ray's) ships the user's
code to every node (docs/models.md).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from trainables.records import SURFACE_METRICS

from .console import command
from .spec_checks import MAX_SPEC_BYTES, Checker, expand_env, load_yaml, resolve_path
from .spec_data import parse_data
from .spec_schema import (BASELINES, DEFAULT_BASELINES, LAYOUTS, METRICS, AnalysisSpec, DataSpec, Epochs, ImportSpec,
                          Param, PoolSpec, SearchSpec, SpecError, SweepSpec, SyntheticSpec, UncertaintySpec)
from .spec_sections import (check_image_size, imported_pool_spec, parse_analysis, parse_imported, parse_pool,
                            parse_search, parse_uncertainty)
from .user_models import parse_runtime_env

#: the spec's types and choice lists, used as ``sweeps.spec.X`` by the stages, the CLI and the tests
__all__ = ["AnalysisSpec", "BASELINES", "DEFAULT_BASELINES", "DataSpec", "Epochs", "ImportSpec", "LAYOUTS", "METRICS", "Param",
           "PoolSpec", "SearchSpec", "SpecError", "SweepSpec", "SyntheticSpec", "UncertaintySpec", "load_spec",
           "parse_spec", "MAX_SPEC_BYTES"]


def parse_spec(raw: Any, where: str = "<spec>", base_dir: str | os.PathLike | None = None,
               env: Mapping[str, str] | None = None) -> SweepSpec:
    """Validate a spec mapping. Relative paths resolve against ``base_dir`` (default: the cwd).

    ``${VAR}`` and the default storage (``$OODSWEEP_STORAGE``) are read from ``env`` (default:
    ``os.environ``); a caller that overrides them passes ``{**os.environ, VAR: ...}``.
    """
    env = os.environ if env is None else env
    base = Path(base_dir or os.getcwd()).resolve()
    c = Checker(where)
    raw = expand_env(raw, "", where, env)
    imported_pool = isinstance(raw, dict) and "imported" in raw
    c.keys(raw, "", {"name": True, "storage": False, "data": True, "pool": not imported_pool, "search": False,
                     "uncertainty": False, "analysis": False, "tracking": False, "imported": False, "runtime_env": False})
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise c.fail("name", f"must be a folder-safe name (letters, digits, _ . -), got {name!r}")
    storage = raw.get("storage") or env.get("OODSWEEP_STORAGE") or "./oodsweep-runs"
    # an object-store URI (s3://bucket/prefix) stays a string: sweeps.objstore opens it
    storage = str(storage).rstrip("/") if "://" in str(storage) and not str(storage).startswith("file://") \
        else resolve_path(storage, base)
    data = parse_data(c, raw["data"], base)
    imported = None
    if imported_pool:
        for key in ("pool", "search"):
            if key in raw:
                raise c.fail(key, "a spec with an `imported:` section describes a pool trained elsewhere: it has no "
                                  f"{key} section (remove it, or remove `imported:` to train a pool here)")
        imported = parse_imported(c, raw["imported"], base)
        pool = imported_pool_spec(imported)
    else:
        pool = parse_pool(c, raw["pool"], base, data.image_size)
    search = parse_search(c, raw.get("search"), data, pool)
    uncertainty = parse_uncertainty(c, raw.get("uncertainty"), data)
    analysis = parse_analysis(c, raw.get("analysis"), uncertainty)
    if analysis.metric in SURFACE_METRICS and data.surface_tolerance_mm is None:
        raise c.fail("analysis.metric", f"{analysis.metric!r} reads the surface records, which "
                                        f"data.surface_tolerance_mm: null turns off; set it (e.g. 2.0) or choose iou_3d")
    t = c.keys(raw.get("tracking") or {}, "tracking", {"uri": False})
    # an imported pool's architectures are not built here: only δ's body constrains the image size
    check_image_size(c, data.image_size, () if imported else pool.arch.values, uncertainty is not None,
                     pool.models)
    runtime_env = parse_runtime_env(c, raw.get("runtime_env"), base)
    return SweepSpec(name=name, storage=storage, data=data, pool=pool, search=search, uncertainty=uncertainty,
                     analysis=analysis, tracking_uri=t.get("uri"), runtime_env=runtime_env, raw=raw,
                     imported=imported)


def load_spec(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> SweepSpec:
    """Read and validate a spec file. Relative paths in it resolve against the current directory; ``${VAR}``
    comes from ``env`` (default: ``os.environ``)."""
    path = Path(path)
    if path.is_dir():
        hint = (f"it is an experiment folder: continue it with `{command('oodsweep', 'resume', path)}`"
                if (path / "spec.yaml").is_file() else "give a spec YAML file, e.g. sweeps/presets/demo.yaml")
        raise SpecError(f"{path} is a folder, not a spec file; {hint}")
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    try:
        raw = load_yaml(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}; a spec is a YAML mapping "
                        f"(see sweeps/presets/demo.yaml)") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec file ({e.strerror or e}); check its permissions") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a YAML mapping with keys name, data, pool, ...; got "
                        f"{type(raw).__name__} {str(raw)[:60]!r} (see sweeps/presets/demo.yaml)")
    spec = parse_spec(raw, where=str(path), env=env)
    return SweepSpec(**{**spec.__dict__, "source_file": path.resolve()})
