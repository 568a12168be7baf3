"""The prompted run's config: ``MEDSAM_DEFAULTS`` beyond the pool member's, resolving it, the autocast
dtype of the decoder step, and the MedSAM a trial's config builds (see ``trainables.sam``)."""
from __future__ import annotations

from typing import Any

import torch

from ..accel import amp_dtype as accel_amp
from ..member import DEFAULTS, REQUIRED, resolve_config as resolve_member_config, with_defaults
from ..models import get_model_spec
from .build import build_medsam
from .modeling import MedSAM

#: Keys beyond ``trainables.member.DEFAULTS`` that a MedSAM run takes.
MEDSAM_DEFAULTS: dict[str, Any] = {
    "sam_checkpoint": None,       # official SAM ViT-B/L/H, medsam_vit_b.pth or (medsam_lite) a LiteMedSAM file;
                                  # None: random (warned), or for medsam_lite the bundled official weights
    "sam_sha256": None,           # if given, the sha256 sam_checkpoint must have (checked before loading)
    "sam_init_seed": 0,           # seed of a randomly initialised frozen encoder (shared by all trials)
    "box_shift": 20,              # max outward jitter per side, px at 256-px scale (MedSAM)
    "box_mode": "mask",           # "mask": one box per slice; "components": one per connected component
    "embedding_dir": None,        # default <slice cache root>/sam-embeddings
    "embed_batch_size": 8,
}


def resolve_config(config: dict) -> dict:
    """A prompted trial's config over ``member.DEFAULTS`` and ``MEDSAM_DEFAULTS``, checked (errors say
    ``train_medsam``)."""
    cfg = with_defaults(config, REQUIRED, {**DEFAULTS, **MEDSAM_DEFAULTS}, "train_medsam")
    # encoder_weights (the CNNs' ImageNet weights, set pool-wide in a spec) does not apply: SAM's weights
    # come from sam_checkpoint (or, for medsam_lite, the bundled file)
    if cfg["box_mode"] not in ("mask", "components"):
        raise ValueError(f"train_medsam: box_mode must be 'mask' or 'components', got {cfg['box_mode']!r}")
    base = {k: v for k, v in cfg.items() if k not in MEDSAM_DEFAULTS}
    return {**resolve_member_config(base), **{k: cfg[k] for k in MEDSAM_DEFAULTS}}


def amp_dtype(setting: Any, device: torch.device) -> torch.dtype | None:
    """The decoder steps' autocast dtype: ``trainables.accel.amp_dtype`` (bf16 on CUDA, none on the CPU
    by default; the ANCHORS.md decoder numbers use bf16). fp16 is refused: the decoder step has no
    gradient scaler."""
    dtype = accel_amp(setting, device, "train_medsam")
    if dtype == torch.float16 and setting in ("auto", True):
        return None  # a card without bf16: fp32
    if dtype == torch.float16:
        raise ValueError(f"train_medsam: amp={setting!r} gives fp16 on {device}, which the decoder step does not "
                         f"scale; use amp: bf16 or amp: off")
    return dtype


def build_member_model(cfg: dict, in_channels: int) -> MedSAM:
    kw = dict(get_model_spec(cfg["arch"]).kwargs)
    return build_medsam(in_channels=in_channels, variant=kw["variant"], img_size=kw["img_size"],
                        sam_checkpoint=cfg["sam_checkpoint"], init_seed=int(cfg["sam_init_seed"]),
                        decoder_seed=None if cfg["sam_checkpoint"] else int(cfg["seed"]),
                        sam_sha256=cfg["sam_sha256"])
