"""Model registry: one factory signature for every architecture (DESIGN §5).

``build_model(name, in_channels=1, classes=1, encoder_weights=None)`` returns an ``nn.Module``
mapping ``B x in_channels x H x W`` images to ``B x classes x H x W`` **logits**. Nothing is
downloaded unless ``encoder_weights`` is given explicitly (e.g. ``"imagenet"``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


def _smp(arch: str) -> Callable[..., nn.Module]:
    def make(in_channels: int, classes: int, encoder_weights: str | None, **kw: Any) -> nn.Module:
        import segmentation_models_pytorch as smp  # heavy import kept out of module import

        return getattr(smp, arch)(in_channels=in_channels, classes=classes,
                                  encoder_weights=encoder_weights, activation=None, **kw)
    make.__name__ = f"smp_{arch}"
    return make


MODELS: dict[str, ModelSpec] = {
    "unet_r18": ModelSpec(_smp("Unet"), {"encoder_name": "resnet18"}, "UNet, ResNet-18 encoder (CPU-sized)"),
    "unet_r50": ModelSpec(_smp("Unet"), {"encoder_name": "resnet50"}, "UNet, ResNet-50 encoder"),
    "unetpp_r50": ModelSpec(_smp("UnetPlusPlus"), {"encoder_name": "resnet50"}, "UNet++, ResNet-50 encoder"),
    "unet_effb0": ModelSpec(_smp("Unet"), {"encoder_name": "efficientnet-b0"}, "UNet, EfficientNet-b0 encoder"),
    "unetpp_effb0": ModelSpec(_smp("UnetPlusPlus"), {"encoder_name": "efficientnet-b0"},
                              "UNet++, EfficientNet-b0 encoder"),
}


def model_names() -> list[str]:
    return list(MODELS)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(MODELS)}") from None


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
        encoder_weights: pretrained encoder weights to load (downloads them); ``None`` = random init.
        bn_momentum: if given, the momentum of every BatchNorm layer. The EfficientNet encoders keep
            TensorFlow's 0.01 (PyTorch convention), whose running statistics lag hundreds of steps
            behind the weights: in short runs eval-mode predictions are then empty. The trainables
            pass PyTorch's default 0.1 unless the config says otherwise.

    Returns:
        A module mapping ``B x in_channels x H x W`` to ``B x classes x H x W`` logits.
    """
    spec = get_model_spec(name)
    model = spec.factory(in_channels=in_channels, classes=classes, encoder_weights=encoder_weights, **spec.kwargs)
    return set_bn_momentum(model, bn_momentum) if bn_momentum is not None else model
