"""What one architecture is (``ModelSpec``) and the smp factory every smp-based entry shares.

A ``ModelSpec`` says how to build a model (``factory(in_channels, classes, encoder_weights, **kwargs)``
returning an ``nn.Module`` that maps ``B x in_channels x H x W`` to ``B x classes x H x W`` logits) and what
the sweep needs to know about it before building one: the image-size multiple, the GPU share of a trial,
its training loop, and which layer MC dropout goes before. The registered architectures
(``trainables.models.MODELS``) and the open ones a spec names (``trainables.models.open_archs``) are both
``ModelSpec``s, and everything downstream asks ``trainables.models.resolve_model`` for one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture."""

    factory: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    #: H and W must be multiples of this (encoder down-sampling).
    size_multiple: int = 32
    #: True for box-prompted models: ``forward(images, boxes)``, trained by ``trainables.sam``.
    prompted: bool = False
    #: Fraction of one GPU a trial asks for when the cluster has GPUs and the spec says ``gpu: auto``
    #: (``sweeps.cluster.gpu_share``). From the peak memory of a training step at 256², batch 32 on an
    #: H100 (UNet-R18 1.7 GiB, UNet-R50 3.4, UNet++-R50 7.3, effb0 2.9-3.8, TransUNet's encoder 7.1,
    #: SAM ViT-B encoder 19.4) and the measured gain of sharing (2 processes 2.17x, 4 2.48x): small models
    #: a quarter, the ResNet-50/EfficientNet UNets half, ViT-based models a whole GPU.
    gpu_share: float = 1.0
    #: The training loop ``trainables.segment`` dispatches to: "dense" or "prompted" (``segment.LOOPS``).
    loop: str = "dense"
    #: The module (a name of ``model.named_modules()``) MC dropout goes before; None: the rule of
    #: ``trainables.models.contract.dropout_layer`` (the last convolution with one output channel per class).
    mc_dropout_layer: str | None = None
    #: False for architectures without an ImageNet encoder (MONAI networks, user callables): ``encoder_weights``
    #: does not apply to them and is ignored, as for the SAM models.
    takes_encoder_weights: bool = True
    #: An open architecture's definition as the spec gave it, normalised (``open_archs.normalise``): what a
    #: checkpoint stores so that the member can be rebuilt anywhere. None for the registered ones.
    definition: dict | None = None


def set_bn_momentum(model: nn.Module, momentum: float) -> nn.Module:
    """Set the running-statistics momentum of every BatchNorm layer (PyTorch convention)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    return model


def smp_factory(arch: str) -> Callable[..., nn.Module]:
    """A factory building ``segmentation_models_pytorch.<arch>`` (logits: ``activation=None``)."""
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
