"""The trainables' configs as frozen dataclasses (docs/architecture.md "Rooms", "Conventions"): converted once at
the trainable boundary.

Ray Tune hands a trial one flat ``dict``; the entry points (``trainables.segment.train_segmenter``,
``trainables.uncertainty.fit_uncertainty``, the SAM embedding pre-stage ``trainables.sam.embeddings.
prepare_embeddings``) convert it once, with ``from_dict``, into one of these and pass the dataclass down:
attribute access, no casts, one place for each default (the field's).

* ``AccelConfig``: how a loop runs on its device (precision, memory format, data placement).
* ``SamOptions``: what a box-prompted (SAM-family) run takes beyond a pool member's config.
* ``MemberConfig``: a pool trial's config (``train_segmenter``), with its ``accel`` and ``sam`` settings.
* ``DeltaConfig`` (``trainables.uncertainty.config``): a δ fit's config (``fit_uncertainty``), with its ``accel``
  settings.

The dict stays flat: a nested config's fields are keys of the outer dict (``amp``, ``box_mode``), and
``keys()`` lists every key a dict may hold. Each field casts its value once (``setting(cast=...)``), at
construction, so a dataclass built directly is checked as one built from a dict. An error names the
config type, the key, the value and the valid choices or keys. Nothing here imports torch: the sweep spec
reads its defaults from these fields (``sweeps.spec_schema``) without loading the training stack.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Mapping, TypeVar

C = TypeVar("C", bound="Config")


# ----------------------------------------------------------------------------- casts

class Invalid(ValueError):
    """Raised by a cast: what the value must be and, optionally, the fix (``Config`` adds the type, the key
    and the value: ``<Type>: <key> <what>, got <value>; <fix>``)."""

    def __init__(self, what: str, fix: str = ""):
        super().__init__(what)
        self.what, self.fix = what, fix


def _say(values: tuple) -> str:
    words = [repr(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def choice(*values: str, listed: bool = False) -> Callable[[Any], str]:
    """One of the strings ``values`` (``listed``: the error says ``one of [...]``)."""
    def cast(v: Any) -> str:
        if isinstance(v, str) and v in values:
            return str(v)
        raise Invalid(f"must be one of {list(values)}" if listed else f"must be {_say(values)}")
    return cast


def integer(v: Any) -> int:
    if isinstance(v, bool) or v is None:
        raise Invalid("must be an integer")
    try:
        out = int(v)
    except (TypeError, ValueError):
        raise Invalid("must be an integer") from None
    if isinstance(v, float) and out != v:
        raise Invalid("must be an integer")
    return out


def number(v: Any) -> float:
    if isinstance(v, bool) or v is None:
        raise Invalid("must be a number")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise Invalid("must be a number") from None


def flag(v: Any) -> bool:
    if v is True or v is False or (not isinstance(v, str) and v in (0, 1)):
        return bool(v)
    raise Invalid("must be true or false")


def text(v: Any) -> str:
    if v is None or isinstance(v, (bool, int, float)):
        raise Invalid("must be a string")
    return str(v)


def optional(cast: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``None`` or ``cast(v)``."""
    return lambda v: None if v is None else cast(v)


def tuple_of(cast: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    """A list or tuple, each item cast (a plain string is refused: it is not a list of names)."""
    def out(v: Any) -> tuple:
        if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
            raise Invalid("must be a list")
        return tuple(cast(x) for x in v)
    return out


def fraction_or_zero(v: Any) -> float:
    """A number; ``None`` (or 0) is 0.0 (the split helpers took ``cfg.get(key) or 0``)."""
    return 0.0 if v is None else number(v)


def setting(default: Any = MISSING, cast: Callable[[Any], Any] | None = None) -> Any:
    """A config field: its default (the one place it is kept) and the cast applied once at construction."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("a config default must be immutable (a tuple, not a list)")
    return field(default=default, metadata={"cast": cast} if cast else {})


def nested(cls: type) -> Any:
    """A field holding another ``Config`` whose keys sit flat in the outer dict."""
    return field(default_factory=cls, metadata={"nested": cls})


# ----------------------------------------------------------------------------- the base

class Config:
    """The behaviour every config dataclass shares: ``from_dict``, ``keys``, ``default``, ``to_dict``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            cast = f.metadata.get("cast")
            if cast is None:
                continue
            value = getattr(self, f.name)
            try:
                object.__setattr__(self, f.name, cast(value))
            except Invalid as e:
                raise self.invalid(f.name, value, e.what, e.fix) from None

    @classmethod
    def invalid(cls, key: str, value: Any, what: str, fix: str = "") -> ValueError:
        """The ValueError of a bad value: ``<Type>: <key> <what>, got <value>; <fix>``."""
        return ValueError(f"{cls.__name__}: {key} {what}, got {value!r}{'; ' + fix if fix else ''}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every key a config dict may hold (a nested config's keys included), in field order."""
        out: list[str] = []
        for f in dataclasses.fields(cls):
            sub = f.metadata.get("nested")
            out += list(sub.keys()) if sub is not None else [f.name]
        return tuple(out)

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """The keys without a default."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.default is MISSING and f.default_factory is MISSING)

    @classmethod
    def default(cls, key: str) -> Any:
        """The default of ``key`` (a nested config's key included): where every other default reads it."""
        for f in dataclasses.fields(cls):
            sub = f.metadata.get("nested")
            if sub is not None and key in sub.keys():
                return sub.default(key)
            if f.name == key and sub is None:
                if f.default is MISSING:
                    raise KeyError(f"{cls.__name__}: {key!r} is required, it has no default")
                return f.default
        raise cls.unknown([key], cls.keys())

    @classmethod
    def unknown(cls, unknown: list[str], valid: tuple[str, ...] | list[str], why: str = "") -> KeyError:
        """The KeyError of keys that are not fields (or not taken here: ``why`` says so)."""
        hints = [f"{k!r} (did you mean {m[0]!r}?)" for k in unknown
                 for m in [difflib.get_close_matches(k, list(valid), n=1)] if m]
        elsewhere = [k for k in unknown if k in cls.keys()]
        return KeyError(f"{cls.__name__}: the config has unknown keys {sorted(unknown)}"
                        f"{'; ' + ', '.join(hints) if hints else ''}"
                        f"{f'; {elsewhere} are not taken here: {why}' if elsewhere and why else ''}"
                        f"; valid keys: {sorted(valid)}")

    @classmethod
    def check_keys(cls, keys, exclude: tuple[str, ...] = (), why: str = "") -> None:
        """Refuse a key set that lacks a required key or has one that is not a field (or is in ``exclude``,
        for the reason ``why``), e.g. a Tune ``param_space`` built by the driver: a KeyError naming the key
        and the valid ones."""
        keys = list(keys)
        missing = [k for k in cls.required() if k not in keys]
        if missing:
            raise KeyError(f"{cls.__name__}: the config lacks {missing}; required keys: {list(cls.required())}")
        valid = [k for k in cls.keys() if k not in exclude]
        unknown = [k for k in keys if k not in valid]
        if unknown:
            raise cls.unknown(unknown, valid, why)

    @classmethod
    def from_dict(cls: type[C], config: Mapping[str, Any], exclude: tuple[str, ...] = (),
                  ignore_unknown: bool = False, why: str = "") -> C:
        """The config of a Ray-style flat dict, each value cast once; a missing required key or (unless
        ``ignore_unknown``) a key that is not a field (or is in ``exclude``) is a KeyError naming it."""
        if not ignore_unknown:
            cls.check_keys(config, exclude, why)
        else:
            missing = [k for k in cls.required() if k not in config]
            if missing:
                raise KeyError(f"{cls.__name__}: the config lacks {missing}; required keys: {list(cls.required())}")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            sub = f.metadata.get("nested")
            if sub is not None:
                kw[f.name] = sub.from_dict({k: v for k, v in config.items() if k in sub.keys()})
            elif f.name in config:
                kw[f.name] = config[f.name]
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The flat dict (``from_dict``'s inverse; tuples stay tuples)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("nested") is not None:
                out.update(value.to_dict())
            else:
                out[f.name] = value
        return out


# ----------------------------------------------------------------------------- the configs

def _amp(v: Any) -> str:
    v = {True: "auto", False: "off"}.get(v, v) if isinstance(v, bool) else v
    return choice("auto", "bf16", "fp16", "off")(v)


def _channels_last(v: Any) -> str | bool:
    if isinstance(v, bool) or v == "auto":
        return v
    raise Invalid("must be 'auto', true or false")


def _workers(v: Any) -> str | int:
    if v == "auto":
        return v
    n = integer(v)
    if n < 0:
        raise Invalid("must be 'auto' or an integer >= 0")
    return n


@dataclass(frozen=True)
class AccelConfig(Config):
    """How a loop runs on its device (``trainables.accel.accel_for`` and ``place_training_data``)."""

    #: "auto" (bf16 on CUDA, fp16 + scaler where bf16 is missing; none on the CPU), "bf16", "fp16", "off"
    #: (true/false: "auto"/"off")
    amp: str = setting("auto", _amp)
    #: "auto" (on CUDA), true, false
    channels_last: str | bool = setting("auto", _channels_last)
    #: "auto", "device" (the whole split in device memory), "stream" (DataLoader)
    data_placement: str = setting("auto", choice("auto", "device", "stream"))
    #: stream mode: DataLoader worker processes ("auto": 2 with a GPU, else 0)
    loader_workers: str | int = setting("auto", _workers)
    #: the trial's GPU fraction (the sweeps pass it); None (or 0): the whole device
    gpu_share: float | None = setting(None, lambda v: number(v) if v else None)


@dataclass(frozen=True)
class SamOptions(Config):
    """What a box-prompted (SAM-family) run takes beyond a pool member's config (``trainables.sam``).
    ``sam_checkpoint``, ``sam_sha256`` and ``embeddings_ready`` are pool-wide (the other architectures
    accept and ignore them); the others are keys of a box-prompted trial only."""

    #: official SAM ViT-B/L/H, medsam_vit_b.pth or (medsam_lite) a LiteMedSAM file; None: random (warned),
    #: or for medsam_lite the bundled official weights
    sam_checkpoint: str | None = setting(None, optional(text))
    #: if given, the sha256 sam_checkpoint must have (checked before loading)
    sam_sha256: str | None = setting(None, optional(text))
    #: True: the driver's pre-stage computed the SAM embeddings, trials only read them
    embeddings_ready: bool = setting(False, flag)
    #: seed of a randomly initialised frozen encoder (shared by all trials)
    sam_init_seed: int = setting(0, integer)
    #: max outward jitter per side, px at 256-px scale (MedSAM)
    box_shift: float = setting(20.0, number)
    #: "mask": one box per slice; "components": one per connected component
    box_mode: str = setting("mask", choice("mask", "components"))
    #: default <slice cache root>/sam-embeddings
    embedding_dir: str | None = setting(None, optional(text))
    embed_batch_size: int = setting(8, integer)
    #: which image channels SAM's R, G, B are (``pool.sam_channels``; ``trainables.sam.build.sam_channels``
    #: checks them against the slices); None: grey repeated (1 channel) or RGB (3)
    sam_channels: tuple[int, ...] | None = setting(None, lambda v: None if v is None else tuple_of(integer)(v))

    #: the keys every pool trial accepts (the sweep sets them pool-wide); the others only box-prompted ones
    POOL_WIDE = ("sam_checkpoint", "sam_sha256", "embeddings_ready", "sam_channels")


def _defs(v: Any) -> dict:
    if not isinstance(v, Mapping) or not all(isinstance(d, Mapping) for d in v.values()):
        raise Invalid("must be a mapping of architecture id to definition", "the sweep builds it from pool.arch")
    return {str(k): dict(d) for k, d in v.items()}


def _positive_int(v: Any) -> int:
    n = integer(v)
    if n < 1:
        raise Invalid("must be an integer >= 1")
    return n


def _positive_ints(v: Any) -> tuple[int, ...] | None:
    return None if v is None else tuple_of(integer)(v)


@dataclass(frozen=True)
class MemberConfig(Config):
    """A pool trial's config (``train_segmenter``): one run to ``max(snapshots)`` epochs, a member at each.

    After construction ``snapshots`` is the sorted, unique snapshot epochs (``epochs`` alone: one)."""

    arch: str = setting(cast=text)
    lr: float = setting(cast=number)
    seed: int = setting(cast=integer)
    #: the slice-cache folder; ``source`` and ``targets`` are sites in it
    cache: str = setting(cast=text)
    source: str = setting(cast=text)
    targets: tuple[str, ...] = setting(cast=tuple_of(text))
    #: an absolute path (Ray Tune changes a trial's working directory)
    experiment_dir: str = setting(cast=text)
    #: train this many epochs, one member at the end
    epochs: int | None = setting(None, optional(integer))
    #: train to max(snapshots), one member at each
    snapshots: tuple[int, ...] | None = setting(None, _positive_ints)
    batch_size: int = setting(8, integer)
    eval_batch_size: int = setting(64, integer)
    #: which split of each target site to score: "test" or "all"
    target_split: str = setting("test", choice("test", "all"))
    #: share of the source's training cases held out as the validation split (by case)
    val_fraction: float = setting(0.1, fraction_or_zero)
    #: seeds the choice of the validation cases
    split_seed: int = setting(0, lambda v: integer(v or 0))
    #: NSD's tolerance (mm) of the per-case surface records (trainables.surface); None: no surface records
    surface_tolerance_mm: float | None = setting(2.0, optional(number))
    weight_decay: float = setting(0.0, number)
    #: torch CPU threads (None: leave torch's default)
    num_threads: int | None = setting(None, optional(integer))
    device: str = setting("auto", text)
    #: the CNN/TransUNet encoders' weights (trainables.models.resolve_encoder_weights); SAM models ignore it
    encoder_weights: str | None = setting(None, optional(text))
    #: see trainables.models.build_model; None keeps each encoder's own
    bn_momentum: float | None = setting(0.1, optional(number))
    #: a checkpoint folder written by this run (Tune restarts)
    resume_from: str | None = setting(None, optional(text))
    #: the resumable state is also saved every this many epochs between snapshots (a preempted run loses
    #: fewer epochs); saving it changes no arithmetic and no random draw
    checkpoint_every: int = setting(5, _positive_int)
    #: False: between snapshots score only the validation split (trainables.member.epoch_sets)
    eval_every_epoch: bool = setting(False, flag)
    verbose: bool = setting(False, flag)
    #: "none" or "flip": random horizontal/vertical flips, on the batch's device (the dense loop)
    augment: str = setting("none", lambda v: choice("none", "flip")("none" if v in (None, False) else v))
    #: the open architectures of the pool by id (``trainables.models.resolve_model``): {id: definition}; None
    #: when the pool holds registered names only
    model_defs: dict | None = setting(None, optional(_defs))
    accel: AccelConfig = nested(AccelConfig)
    sam: SamOptions = nested(SamOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        snaps = self.snapshots if self.snapshots is not None else (self.epochs,)
        if not snaps or any(s is None or s < 1 for s in snaps):
            raise ValueError(f"{type(self).__name__}: epochs/snapshots must be positive integers, got "
                             f"epochs={self.epochs!r} snapshots={self.snapshots!r}; give snapshots: [e1, e2, ...] "
                             f"or epochs: E")
        object.__setattr__(self, "snapshots", tuple(sorted(set(snaps))))
        from .models import resolve_model

        resolve_model(self.arch, self.model_defs)  # fail early on an unknown architecture (the error lists them)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], exclude: tuple[str, ...] = (),
                  ignore_unknown: bool = False, why: str = "") -> MemberConfig:
        """A pool trial's dict. The SAM options beyond the pool-wide ones are keys of box-prompted
        architectures only (``trainables.models.ModelSpec.prompted``)."""
        from .models import MODELS, is_prompted

        arch = config.get("arch")
        defs = config.get("model_defs") if isinstance(config.get("model_defs"), Mapping) else None
        if not isinstance(arch, str) or not is_prompted(arch, defs):  # an unknown architecture: __post_init__ names it
            exclude = (*exclude, *(k for k in SamOptions.keys() if k not in SamOptions.POOL_WIDE))
            prompted = ", ".join(n for n, m in MODELS.items() if m.prompted)
            why = why or f"they are options of the box-prompted architectures ({prompted}), not of {arch!r}"
        return super().from_dict(config, exclude, ignore_unknown, why)

    def to_dict(self) -> dict[str, Any]:
        """The flat dict ``from_dict`` takes back (without the SAM-only keys for other architectures)."""
        from .models import resolve_model

        out = super().to_dict()
        if not resolve_model(self.arch, self.model_defs).prompted:
            out = {k: v for k, v in out.items() if k in SamOptions.POOL_WIDE or k not in SamOptions.keys()}
        return out

    @property
    def last_epoch(self) -> int:
        return max(self.snapshots)
