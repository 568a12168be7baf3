"""The prompted run's options: ``SamOptions`` (defined with the other configs in ``trainables.config``),
``EmbeddingJob`` (what the embedding pre-stage reads of a pool trial's config), the autocast dtype of the
decoder step, and the MedSAM a trial's config builds (see ``trainables.sam``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..accel import amp_dtype as accel_amp
from ..config import Config, MemberConfig, SamOptions, integer, nested, optional, setting, text, tuple_of
from ..models import get_model_spec, resolve_model
from .build import build_medsam
from .modeling import MedSAM

__all__ = ["EmbeddingJob", "SamOptions", "amp_dtype", "build_member_model"]


@dataclass(frozen=True)
class EmbeddingJob(Config):
    """What the SAM embedding cache of a pool trial depends on (``trainables.sam.embeddings``): the
    architecture, the slice cache, the rows the sweep reads (``source``, ``targets``, ``target_split``),
    where the encoder runs, and the ``SamOptions``. ``from_dict`` reads a pool trial's config and ignores
    the keys a job does not need; the defaults are ``MemberConfig``'s."""

    arch: str = setting(cast=text)
    #: the slice-cache folder (``prepare_embeddings`` and the cache keys need it; ``encoder_source`` does not)
    cache: str | None = setting(None, optional(text))
    source: str | None = setting(None, optional(text))
    targets: tuple[str, ...] = setting((), lambda v: () if v is None else tuple_of(text)(v))
    target_split: str = setting(MemberConfig.default("target_split"), text)
    device: str = setting(MemberConfig.default("device"), text)
    num_threads: int | None = setting(MemberConfig.default("num_threads"), optional(integer))
    #: the decoder's seed when there is no sam_checkpoint (the embeddings do not depend on it)
    seed: int = setting(0, integer)
    #: the pool's open architectures (``MemberConfig.model_defs``): a user's box-prompted model
    model_defs: dict | None = setting(None, optional(dict))
    sam: SamOptions = nested(SamOptions)

    @classmethod
    def of(cls, config: EmbeddingJob | MemberConfig | Mapping[str, Any]) -> EmbeddingJob:
        """A job from a pool trial's dict (extra keys ignored), a ``MemberConfig``, or itself."""
        if isinstance(config, EmbeddingJob):
            return config
        if isinstance(config, MemberConfig):
            return cls(arch=config.arch, cache=config.cache, source=config.source, targets=config.targets,
                       target_split=config.target_split, device=config.device, num_threads=config.num_threads,
                       seed=config.seed, sam=config.sam, model_defs=config.model_defs)
        return cls.from_dict(config, ignore_unknown=True)


def amp_dtype(setting: Any, device: torch.device) -> torch.dtype | None:
    """The decoder steps' autocast dtype: ``trainables.accel.amp_dtype`` (bf16 on CUDA, none on the CPU
    by default; the decoder anchors of docs/performance.md use bf16). fp16 is refused: the decoder step has no
    gradient scaler."""
    dtype = accel_amp(setting, device)
    if dtype == torch.float16 and setting in ("auto", True):
        return None  # a card without bf16: fp32
    if dtype == torch.float16:
        raise ValueError(f"amp={setting!r} gives fp16 on {device}, which the bare decoder step does not scale; "
                         f"use amp: bf16 or amp: off")
    return dtype


def build_member_model(arch: str, sam: SamOptions, seed: int, in_channels: int,
                       defs: Mapping[str, Mapping] | None = None) -> MedSAM:
    """The MedSAM of a box-prompted trial: ``arch``'s variant and size, the frozen encoders from
    ``sam.sam_checkpoint`` (random from ``sam.sam_init_seed`` without one, the decoder then from ``seed``).
    A user's box-prompted model (``{target: ..., prompted: true}`` in ``defs``) is its callable's, called with
    ``in_channels``, ``sam_checkpoint`` and ``seed``."""
    spec = resolve_model(arch, defs)
    if spec.definition is not None:
        if sam.sam_channels is not None:
            raise ValueError(f"pool.sam_channels applies to the registered SAM models; {arch!r} is a user's box-prompted "
                             f"model, which maps the image channels in its own model_input: leave it out")
        model = spec.factory(in_channels=in_channels, classes=1, sam_checkpoint=sam.sam_checkpoint, seed=seed,
                             **spec.kwargs)
        model.oodsweep_in_channels = in_channels  # the member's checkpoint records it (frozen.member_state)
        return model
    kw = dict(get_model_spec(arch).kwargs)
    return build_medsam(in_channels=in_channels, variant=kw["variant"], img_size=kw["img_size"],
                        sam_checkpoint=sam.sam_checkpoint, init_seed=sam.sam_init_seed,
                        decoder_seed=None if sam.sam_checkpoint else seed, sam_sha256=sam.sam_sha256,
                        channels=None if sam.sam_channels is None else list(sam.sam_channels))
