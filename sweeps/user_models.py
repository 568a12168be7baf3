"""The spec's open architectures and the user code they need (``pool.arch``, ``runtime_env``).

* ``parse_arch``: ``pool.arch`` as ids (what records, tables, plots and MLflow show) plus the normalised
  definitions of the open ones (``trainables.models.open_archs``), every error naming the key;
* ``parse_runtime_env``: the spec's ``runtime_env:`` (Ray's own: ``py_modules``, ``working_dir``, ``pip``,
  ``env_vars``), its paths made absolute and checked; the driver passes it to ``ray.init``, so that every
  task and trial of the sweep, on every node, can import the user's package;
* ``user_code``: the same paths on the driver's ``sys.path`` while the driver checks the models;
* ``check_models``: every architecture of the pool built and run on a dummy batch on the driver, before
  anything launches (``trainables.models.contract.check_model``).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator

from trainables.models import MODELS, ModelDefError, arch_id, is_open, normalise

from .console import log
from .spec_checks import Checker, resolve_path
from .spec_schema import DISTRIBUTIONS, Param, SpecError, SweepSpec

RUNTIME_ENV_KEYS = {"py_modules": False, "working_dir": False, "pip": False, "env_vars": False}


def parse_arch(c: Checker, raw: Any, image_size: int | None = None) -> tuple[Param, dict[str, dict]]:
    """``pool.arch``: a Param over architecture ids and ``{id: definition}`` of the open ones.

    A value is a registered name or an open architecture (a ``smp:``/``monai:`` string or a mapping with
    ``smp``, ``monai`` or ``target``). ``image_size`` fills a MONAI network's required ``img_size``
    (UNETR) when the definition leaves it out.
    """
    if isinstance(raw, dict) and not (len(raw) == 1 and next(iter(raw)) in DISTRIBUTIONS):
        raw = {"grid": [raw]}  # one open architecture written as a mapping
    defs: dict[str, dict] = {}

    def one(v: Any, key: str) -> str:
        if isinstance(v, str) and v in MODELS:
            return v
        if not is_open(v):
            return c.choice(v, key, tuple(MODELS))  # its error lists the registered names
        try:
            d = normalise(v, key)
            if d["kind"] == "monai" and image_size and "img_size" not in d["kwargs"]:
                from trainables.models.open_archs import monai_required

                if "img_size" in monai_required(d["network"], d["kwargs"]):
                    d["kwargs"]["img_size"] = image_size
            from trainables.models import resolve_model

            resolve_model(d)  # smp's architecture and encoder, MONAI's network: known names
        except ModelDefError as e:
            msg = str(e)
            if msg.startswith(key):  # names a key inside the definition already
                raise SpecError(f"{c.where}: {msg}") from None
            raise c.fail(key, f"{v!r}: {msg.removeprefix('pool.arch: ')}") from None
        aid = arch_id(d)
        if aid in MODELS:
            raise c.fail(key, f"its id {aid!r} is a registered architecture's; give it another `name:`")
        if aid in defs and defs[aid] != d:
            raise c.fail(key, f"two architectures have the id {aid!r} (they differ in {_differ(defs[aid], d)}); "
                              f"give each its own `name:`")
        defs[aid] = d
        return aid

    arch = c.param(raw, "pool.arch", one)
    if arch.kind in ("loguniform", "uniform"):
        raise c.fail("pool.arch", "architectures are categorical: use grid or choice")
    return arch, {a: defs[a] for a in arch.values if a in defs}


def _differ(a: dict, b: dict) -> str:
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def parse_runtime_env(c: Checker, raw: Any, base: Path) -> dict | None:
    """``runtime_env:`` as Ray takes it, local paths absolute and checked (None: not given)."""
    if raw is None:
        return None
    r = c.keys(raw, "runtime_env", RUNTIME_ENV_KEYS)
    out: dict[str, Any] = {}
    if "py_modules" in r:
        mods = r["py_modules"]
        if not isinstance(mods, list) or not mods:
            raise c.fail("runtime_env.py_modules", f"expected a list of package folders, got {mods!r}")
        out["py_modules"] = []
        for i, m in enumerate(mods):
            if not isinstance(m, str):
                raise c.fail(f"runtime_env.py_modules[{i}]", f"expected a path, got {m!r}")
            if "://" in m or m.endswith(".whl"):
                out["py_modules"].append(m)  # a remote package or a wheel: Ray fetches it
                continue
            p = resolve_path(m, base)
            if not p.exists():
                raise c.fail(f"runtime_env.py_modules[{i}]", f"{p} does not exist; give the folder of your package "
                                                             f"(the one holding its __init__.py), e.g. ./my_pkg")
            out["py_modules"].append(str(p))
    if "working_dir" in r:
        wd = r["working_dir"]
        if not isinstance(wd, str):
            raise c.fail("runtime_env.working_dir", f"expected a folder, got {wd!r}")
        if "://" in wd:
            out["working_dir"] = wd
        else:
            p = resolve_path(wd, base)
            if not p.is_dir():
                raise c.fail("runtime_env.working_dir", f"{p} is not a folder")
            out["working_dir"] = str(p)
    if "pip" in r:
        pip = r["pip"]
        if not (isinstance(pip, list) and all(isinstance(x, str) for x in pip)):
            raise c.fail("runtime_env.pip", f"expected a list of requirement strings, got {pip!r}")
        out["pip"] = list(pip)
    if "env_vars" in r:
        ev = r["env_vars"]
        if not isinstance(ev, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ev.items()):
            raise c.fail("runtime_env.env_vars", f"expected a mapping of strings to strings, got {ev!r}")
        out["env_vars"] = dict(ev)
    return out


def code_paths(runtime_env: dict | None) -> list[str]:
    """The folders ``runtime_env`` puts on the workers' ``sys.path``: each local ``py_modules`` entry's
    parent (a package folder) or the file's folder, and ``working_dir``."""
    out = []
    for m in (runtime_env or {}).get("py_modules", []):
        if "://" not in m and not m.endswith(".whl"):
            out.append(str(Path(m).parent))
    wd = (runtime_env or {}).get("working_dir")
    if wd and "://" not in wd:
        out.append(wd)
    return out


@contextlib.contextmanager
def user_code(runtime_env: dict | None) -> Iterator[None]:
    """The driver's ``sys.path`` with ``code_paths(runtime_env)`` in front, for the duration of the block."""
    paths = [p for p in code_paths(runtime_env) if p not in sys.path]
    sys.path[:0] = paths
    try:
        yield
    finally:
        for p in paths:
            with contextlib.suppress(ValueError):
                sys.path.remove(p)


def check_models(spec, in_channels: int, classes: int) -> None:
    """Build every open dense architecture of the pool and run a dummy batch of ``data.image_size`` through it
    (``check_model``), and build every box-prompted one (checked against ``PromptedModel``), with the spec's
    ``runtime_env`` code importable; a SpecError names the key and what did not fit. The registered
    architectures are known to fit and are skipped."""
    from trainables.models import build_model, resolve_model
    from trainables.models.contract import ContractError, check_model

    defs = spec.pool.models
    if not defs:
        return
    mc = spec.uncertainty is not None and "mc_dropout" in spec.uncertainty.baselines
    where = str(spec.source_file or "<spec>")
    with user_code(spec.runtime_env):
        for aid, d in defs.items():
            model_spec = resolve_model(aid, defs)
            if model_spec.prompted:  # a user's box-prompted model: built, and checked against the protocol
                ckpt = spec.pool.sam_per_arch.get(aid, {}).get("sam_checkpoint") or spec.pool.sam_checkpoint
                try:
                    model_spec.factory(in_channels=in_channels, classes=classes,
                                       sam_checkpoint=None if ckpt is None else str(ckpt), **model_spec.kwargs)
                except ModelDefError as e:
                    raise SpecError(f"{where}: {e}") from None
                continue
            try:
                check_model(lambda c_in, k: build_model(aid, c_in, k, defs=defs), aid, in_channels, classes,
                            spec.data.image_size, mc_dropout=mc, mc_layer=d.get("mc_dropout_layer"))
            except ContractError as e:
                raise SpecError(f"{where}: {e}") from None


def check_pool_models(spec: SweepSpec, cache_dir: Path) -> None:
    """The pool's open architectures built and run on a dummy batch of the cache's channels and labels
    (``sweeps.user_models.check_models``), before anything is launched."""
    from trainables.data.cache import open_slice_cache
    from trainables.exclusive import label_kind
    from trainables.models import is_prompted

    prompted = [a for a in spec.pool.arch.values if is_prompted(a, spec.pool.models)]
    if not spec.pool.models and not prompted:
        return
    cache = open_slice_cache(cache_dir)
    n_channels, labels = int(cache.images.shape[1]), cache.labels
    where = str(spec.source_file or "<spec>")
    if prompted:
        check_prompted_data(prompted, n_channels, labels, spec.pool.sam_channels, where, cache.path)
    if spec.pool.models:
        # exclusive classes (trainables.exclusive): the nets output background + one logit per class
        exclusive = label_kind(cache.manifest, str(cache.path / "manifest.json")) == "exclusive"
        check_models(spec, n_channels, len(labels) + 1 if exclusive else len(labels))
        log(f"open architectures checked on a dummy batch: {', '.join(spec.pool.models)}")


def check_prompted_data(prompted: list[str], n_channels: int, labels: list[str], channels, where: str,
                        cache_path) -> None:
    """The SAM models of the pool against the slice cache: one label (a box prompt gives one merged mask), and
    ``pool.sam_channels`` fitting the image channels (required unless there are 1 or 3); a SpecError says why."""
    from trainables.sam.build import sam_channels

    if len(labels) > 1:
        raise SpecError(f"{where}: pool.arch: the box-prompted models {prompted} predict one merged mask per box "
                        f"prompt, and the slice cache {cache_path} has {len(labels)} labels {labels}: train them on one "
                        f"label (data.lesions for the fundus layouts), or leave them out of this sweep")
    try:
        sam_channels(n_channels, None if channels is None else list(channels))
    except ValueError as e:
        raise SpecError(f"{where}: {e} (slice cache {cache_path})") from None
