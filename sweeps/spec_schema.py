"""The sweep spec as validated, frozen dataclasses, and the choice lists the checks use (docs/architecture.md "Specs").

``sweeps.spec.parse_spec`` builds these from YAML; the stages read them. The choice lists come from
their registries (docs/architecture.md "Rooms": one registry per kind of plug-in): metrics and uncertainty methods from
``trainables.records``, layouts from ``trainables.data.layouts``, architectures from
``trainables.models`` (read where they are checked); the analysis' indicators from ``analysis``
(``sweeps.spec_sections.indicator_choices``). A default the trials share (a batch size, δ's epochs, the SAM
weights) is read from the field of the trainables' config (``trainables.config``, ``trainables.uncertainty.config``)
that keeps it, never written here a second time (``default``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.config import MemberConfig
from trainables.data.layouts import LAYOUTS as LAYOUT_REGISTRY
from trainables.records import ALL_METRICS, SURFACE_METRICS, UNCERTAINTY_METHODS
from trainables.uncertainty.config import DeltaConfig

from .errors import SpecError  # noqa: F401 (the spec's error, used as sweeps.spec_schema.SpecError)

#: Performance metrics (``trainables.records.metric_by``): per lesion then averaged, and ``*_micro`` (pooled);
#: the surface metrics of the surface records (``trainables.records.surface_by``)
METRICS = ALL_METRICS + SURFACE_METRICS
LAYOUTS = tuple(LAYOUT_REGISTRY)
SPLITS = ("dataset", "random")
DISTRIBUTIONS = ("grid", "choice", "loguniform", "uniform")
#: δ (``uncertainty.method``) is the records' first uncertainty method; the others are its baselines
METHODS = UNCERTAINTY_METHODS[:1]
BASELINES = UNCERTAINTY_METHODS[1:]
#: Table 4's (δ's default, ``DeltaConfig.baselines``); ggd_yhat_only (the ablation) only when asked for
DEFAULT_BASELINES = DeltaConfig.default("baselines")
FIT_SPLITS = ("train", "val")
#: ``uncertainty.prompted_members``: which box-prompted members get δ (UncertaintySpec.prompted_members)
PROMPTED_MEMBERS = ("all", "with_baselines")
#: ``pool.max_failures``/``uncertainty.max_failures`` by default: on spot instances a trial may lose its
#: node more than once (each time it resumes from its last checkpoint); a bug that fails every attempt
#: costs at most three more attempts (docs/cluster.md, "Spot instances")
SPOT_MAX_FAILURES = 3
#: Values of the ``training`` blocks (trainables.config.AccelConfig documents them).
TRAINING_CHOICES = {"amp": ("auto", "bf16", "fp16", "off"), "channels_last": ("auto", True, False),
                    "data_placement": ("auto", "device", "stream"), "augment": ("none", "flip")}


def default(spec_type: type, name: str) -> Any:
    """The default of field ``name`` of the spec dataclass ``spec_type`` (what the parser fills in when the
    YAML leaves the key out)."""
    f = {f.name: f for f in dataclasses.fields(spec_type)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


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
    split_seed: int = MemberConfig.default("split_seed")
    test_fraction: float = 0.2
    #: share of the source's training cases held out (by case, seeded by split_seed) as the validation
    #: split: scored every epoch, it chooses configurations (Tables 1-3, the search metric)
    val_fraction: float = MemberConfig.default("val_fraction")
    target_split: str = MemberConfig.default("target_split")
    #: the normalised surface Dice's tolerance (mm) of the per-case surface records; None: no surface records
    surface_tolerance_mm: float | None = MemberConfig.default("surface_tolerance_mm")
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
    #: options of the configured layouts (nnunet, decathlon, folder2d): ``sites_from`` (an absolute path),
    #: ``channels``, ``labels``, ``label_values``, ``pixel_spacing``; None when the spec sets none
    layout_options: dict | None = None

    def site_sources(self) -> dict[str, tuple[str, Path]]:
        """Site -> (layout, root) for the sites listed under ``data.sites``."""
        return {site: (layout, root) for site, layout, root in self.sites}


@dataclass(frozen=True)
class PoolSpec:
    #: architecture ids: registered names and the ids of open architectures (``models``)
    arch: Param
    lr: Param
    epochs: Epochs
    seed: Param
    batch_size: int = MemberConfig.default("batch_size")
    weight_decay: float = MemberConfig.default("weight_decay")
    cpu: float = 1.0
    #: GPU fraction per trial; None = "auto": the architecture's share (trainables.models.ModelSpec.gpu_share)
    #: when the cluster has (or can autoscale to) GPUs, else 0
    gpu: float | None = None
    #: per-architecture overrides, e.g. {"transunet": {"gpu": 1, "cpu": 8}}
    per_arch: dict = field(default_factory=dict)
    max_concurrent_trials: int | None = None
    #: restarts of a trial whose process or node died (a spot preemption): each resumes from its last checkpoint
    max_failures: int = SPOT_MAX_FAILURES
    #: the resumable state is saved every this many epochs, and at every snapshot (Tune keeps the latest)
    checkpoint_every: int = MemberConfig.default("checkpoint_every")
    #: SAM weights for the box-prompted archs (medsam): an official SAM ViT-B/L/H file or medsam_vit_b.pth
    sam_checkpoint: Path | None = MemberConfig.default("sam_checkpoint")
    #: the sha256 sam_checkpoint must have (checked before it is loaded), e.g. a fine-tuned LiteMedSAM's
    sam_sha256: str | None = MemberConfig.default("sam_sha256")
    #: ``pool.sam_checkpoint: {arch: file}``: each SAM architecture's own weights,
    #: {arch: {"sam_checkpoint": path, "sam_sha256": hex or None}} (sam_checkpoint/sam_sha256 are then None)
    sam_per_arch: dict = field(default_factory=dict)
    #: ``pool.sam_channels``: which image channels the SAM models see as R, G, B (None: grey repeated, or RGB);
    #: checked against the slice cache's channels before launch (``sweeps.user_models.check_pool_models``)
    sam_channels: tuple[int, int, int] | None = None
    #: ImageNet weights of the CNN/TransUNet encoders: None (random init), "imagenet" (smp/timm download
    #: them at trial start: needs network, checked before launch) or a local file / directory of
    #: <encoder>.pth files (trainables.models.resolve_encoder_weights); the SAM models ignore it
    encoder_weights: str | Path | None = MemberConfig.default("encoder_weights")
    #: how the loop runs on its device (trainables.config.AccelConfig): amp, channels_last,
    #: data_placement, loader_workers, augment; only the keys the spec sets
    training: dict = field(default_factory=dict)
    #: the open architectures of ``arch`` by id: their normalised definitions (trainables.models.open_archs),
    #: passed to every trial as ``model_defs``
    models: dict = field(default_factory=dict)
    #: ``pool.repeat`` (``sweeps.spec_repeat``): extra (arch, lr, seed) training runs of grid configurations
    repeat: tuple[tuple[str, float, int], ...] = ()

    def runs(self) -> list[tuple[str, float, int]]:
        """Every (arch, lr, seed) training run of a grid pool: the grid's, then ``repeat``'s."""
        return [(a, lr, s) for a in self.arch.values for lr in self.lr.values for s in self.seed.values] \
            + list(self.repeat)


@dataclass(frozen=True)
class SearchSpec:
    algo: str = "optuna"
    num_samples: int = 8
    #: a per-epoch scalar of the trials: the validation split's score by default (never the reported test split)
    metric: str = "val_iou_3d"
    mode: str = "max"
    seed: int = 0


@dataclass(frozen=True)
class SensitivitySpec:
    """``uncertainty.sensitivity``: a second δ per member of a subset, fitted ``epochs`` long (a longer budget than
    ``uncertainty.epochs``) and recorded apart (``records/uncertainty_budget``), so that C4 can be read at both
    budgets on the same members (docs/uncertainty.md "δ's training budget")."""

    epochs: int
    #: "per_run" (each training run's last snapshot member), "all", or N: the first N of "per_run"
    members: str | int = "per_run"


@dataclass(frozen=True)
class UncertaintySpec:
    """The δ net per pool member (paper §2.3) and the Table-4 baselines."""

    method: str = "ggd"
    epochs: int = DeltaConfig.default("epochs")
    lr: float = DeltaConfig.default("lr")
    #: λ of Eq. 5, > 0; a tuple (``{grid: [...]}``) fits δ once per value
    lam: float | tuple[float, ...] = DeltaConfig.default("lam")
    beta: float = DeltaConfig.default("beta")
    learn_beta: bool = DeltaConfig.default("learn_beta")
    batch_size: int = DeltaConfig.default("batch_size")
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    passes: int = DeltaConfig.default("passes")
    workers: int = 1          # Ray Train workers per member (DDP when > 1)
    cpu: float = 1.0          # per Train worker
    gpu: float | None = None  # per Train worker; None = "auto" (a quarter GPU when there are GPUs)
    trial_cpu: float = 0.5    # the Tune trial that drives the Train run
    max_concurrent_trials: int | None = None
    max_failures: int = SPOT_MAX_FAILURES
    checkpoint_every: int = DeltaConfig.default("checkpoint_every")
    #: members that also get the baselines (BayesCap, TTA, MC dropout): None = all, N = the N best by
    #: performance on the source's validation split (its test split without one; source labels only)
    baseline_members: int | None = None
    #: True (``baseline_members: {per_arch: N}``): the N best of each architecture, so that Table 4 covers
    #: every family (pool-wide, the best members may all be of one architecture)
    baseline_per_arch: bool = False
    #: True (``baseline_members: {per_run: N}``): the N best snapshots of each training run, so that every
    #: family's baseline members come from as many runs as it has (the claims' intervals resample runs)
    baseline_per_run: bool = False
    #: which box-prompted (SAM-family) members get δ: "all", or "with_baselines": only those that also get
    #: the baselines (Table 4 and C5 read them); the others' uncertain area is oracle-prompted, not
    #: label-free, so no claim reads it, and their δ trials are skipped
    prompted_members: str = "all"
    #: as PoolSpec.training, without augment
    training: dict = field(default_factory=dict)
    #: the source split δ is fitted on: "train" (the paper) or "val" (needs a validation split)
    fit_split: str = DeltaConfig.default("fit_split")
    #: BayesCap's size: {"width": 64, "blocks": 16} as published (trainables.uncertainty.BayesCapNet)
    bayescap: dict = field(default_factory=dict)
    #: members fitted one after another in one Tune trial / Ray Train run (``sweeps.uncertainty.member_groups``):
    #: None (``group_size: run``) the snapshot members of one training run; N: N members at a time (1: a run each)
    group_size: int | None = None
    #: restarts of a δ group's Ray Train worker group (``ray.train.FailureConfig``: a preempted spot node),
    #: from its latest checkpoint, before the Tune trial fails (and ``max_failures`` retries the trial)
    train_max_failures: int = 0
    #: pixel AUROC/AP of the maps: "auto", "exact" or "binned" (DeltaConfig.scoring; docs/uncertainty.md)
    scoring: str = DeltaConfig.default("scoring")
    #: the error band's width (cache-grid pixels) for the maps' AUROC/AP within it (DeltaConfig.band_px)
    band_px: int = DeltaConfig.default("band_px")
    #: the δ-budget sensitivity (None: none; the default δ's records are the same with and without it)
    sensitivity: SensitivitySpec | None = None


@dataclass(frozen=True)
class AnalysisSpec:
    metric: str = "iou_3d"
    indicators: tuple[str, ...] = ("id_performance", "agreement")
    #: members scoring below this on an axis (ID/OOD score, agreement) are flagged "degenerate" and the
    #: correlations are reported with and without them (a member predicting nothing sits at the probit floor)
    degenerate_floor: float = 0.01
    #: bound (GiB) on the members' packed masks the agreement holds at once (blocks of cases); None: no bound
    memory_gib: float | None = None
    #: the probit scale's clip: "auto" (half a case of each site, 1/(2 n_cases)) or a number in (0, 0.5)
    #: (analysis.probit_clip; docs/statistics.md "The probit scale")
    probit_clip: str | float = "auto"


@dataclass(frozen=True)
class ImportSpec:
    """A pool trained elsewhere (the ``imported:`` section, ``oodsweep import``): its members table and the
    folder of its predicted masks (``<predictions>/<member_id>/<site>/<case_id>.nii.gz``, or ``.png``)."""

    members: Path
    predictions: Path | None = None
    #: the table's member ids and runs (empty when the table cannot be read any more: a moved experiment)
    member_ids: tuple[str, ...] = ()
    runs: int = 0


@dataclass(frozen=True)
class SweepSpec:
    name: str
    storage: Path | str  # a str: an object-store URI (sweeps.objstore)
    data: DataSpec
    pool: PoolSpec
    search: SearchSpec | None = None
    uncertainty: UncertaintySpec | None = None
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
    tracking_uri: str | None = None
    #: Ray's runtime_env for every task and trial (``runtime_env:``; sweeps.user_models): the user's code
    runtime_env: dict | None = None
    source_file: Path | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)
    #: the experiment folder when it is not <storage>/<name> (`resume`/`status` of a renamed folder)
    location: Path | None = None
    #: a pool trained elsewhere (``oodsweep import``); ``pool`` then only names its architectures
    imported: ImportSpec | None = None
    #: the experiment's URI on object storage; ``location`` is then its node-local working copy (sweeps.objstore)
    remote: str | None = None

    @property
    def experiment_dir(self) -> Path:
        if self.location is None and isinstance(self.storage, str):
            raise RuntimeError(f"experiment {self.storage}/{self.name} is on object storage: open it with "
                               f"sweeps.objstore.session first")
        return self.location or self.storage / self.name

    @property
    def cache_root(self) -> Path:
        if isinstance(self.storage, str) and self.data.cache_dir is None:  # object storage: node-local
            import tempfile

            return Path(tempfile.gettempdir()) / "oodsweep-cache" / "slices"
        return self.data.cache_dir or (self.storage / ".cache" / "slices")

    def tracking(self) -> str:
        """The MLflow tracking URI: the spec's, else $MLFLOW_TRACKING_URI, else SQLite in the experiment."""
        return (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{(self.experiment_dir / 'mlflow.db').resolve()}")

    def n_runs(self) -> int | None:
        """Training runs in the pool (None for a search: it is num_samples)."""
        if self.imported is not None:
            return self.imported.runs or None
        if self.search:
            return self.search.num_samples
        n = len(self.pool.runs())
        return n * (len(self.pool.epochs.values) if self.pool.epochs.mode == "grid" else 1)

    def n_members(self) -> int | None:
        if self.imported is not None:
            return len(self.imported.member_ids) or None
        runs = self.n_runs()
        return runs * len(self.pool.epochs.values) if self.pool.epochs.mode == "snapshots" else runs

