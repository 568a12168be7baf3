"""The model contract, checked on a dummy batch before anything is launched, and where MC dropout goes.

Every dense architecture (registered or open) is a ``torch.nn.Module`` that

* takes ``B x C x H x W`` float32 images scaled to [0, 1] (as the slice cache holds them; C = 1 for MR/CT,
  3 for fundus photographs), with H and W the spec's ``data.image_size`` (a multiple of its
  ``size_multiple``);
* returns ``B x K x H x W`` **logits** (no sigmoid), K = the data's label channels (1 for one organ): a
  pixel is foreground where its logit is > 0; training uses sigmoid Dice + BCE;
* for the MC-dropout baseline, has a layer to put the dropout before (``dropout_layer``).

``check_model`` builds one and runs a batch of two random images through it in eval mode; its error says
what did not fit. ``dropout_layer`` states the rule: the layer named by ``mc_dropout_layer``, else the
**last** ``nn.Conv2d``/``nn.ConvTranspose2d`` in ``model.modules()`` order whose ``out_channels`` equals K
(smp's ``segmentation_head`` conv, MONAI BasicUNet's ``final_conv``).
"""
from __future__ import annotations

import difflib

import torch
from torch import nn

#: The attribute a loaded member carries when its spec names the MC-dropout layer (``mc_dropout_layer``).
MC_LAYER_ATTR = "oodsweep_mc_dropout_layer"


class ContractError(ValueError):
    """A model that does not fit the contract: the message names the architecture and what did not fit."""


def dropout_layer(model: nn.Module, classes: int, name: str | None = None) -> tuple[str, nn.Module]:
    """The module MC dropout goes before: ``name`` (a key of ``model.named_modules()``), else the last
    ``nn.Conv2d``/``nn.ConvTranspose2d`` with ``out_channels == classes``. A ValueError says why none fits."""
    modules = dict(model.named_modules())
    if name is None:
        name = getattr(model, MC_LAYER_ATTR, None)
    if name is not None:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, list(modules), n=3)
            raise ValueError(f"mc_dropout_layer {name!r} is not a module of {type(model).__name__}"
                             f"{f' (did you mean {close}?)' if close else ''}; give a name of "
                             f"model.named_modules()")
        return name, modules[name]
    found = None
    for n, m in modules.items():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.out_channels == classes:
            found = (n, m)
    if found is None:
        convs = [f"{n} ({m.out_channels} out)" for n, m in modules.items()
                 if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-3:]
        raise ValueError(f"MC dropout goes before the model's last convolution with one output channel per class "
                         f"({classes}), and {type(model).__name__} has none (its last convolutions: "
                         f"{', '.join(convs) or 'none'}); name the layer with mc_dropout_layer in the spec, or "
                         f"leave mc_dropout out of uncertainty.baselines")
    return found


def check_model(build, arch: str, in_channels: int, classes: int, image_size: int,
                mc_dropout: bool = False, mc_layer: str | None = None) -> None:
    """Build a model with ``build(in_channels, classes)`` and run two random [0, 1] images of
    ``image_size``² through it (eval mode, no gradients); a ContractError says what did not fit."""
    try:
        model = build(in_channels, classes)
    except ContractError:
        raise
    except ValueError as e:  # ModelDefError and the factories' own checks: already name the problem
        raise ContractError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a user's constructor may raise anything: say where
        raise ContractError(f"pool.arch: {arch}: building the model with in_channels={in_channels}, "
                            f"classes={classes} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ContractError(f"pool.arch: {arch}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    x = torch.rand(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001
        raise ContractError(f"pool.arch: {arch}: the forward pass of a 2 x {in_channels} x {image_size} x "
                            f"{image_size} batch failed: {type(e).__name__}: {str(e)[:300]}; the model must take "
                            f"B x C x H x W images at data.image_size (is it a multiple of the model's "
                            f"down-sampling? set size_multiple)") from e
    want = (2, classes, image_size, image_size)
    if not isinstance(out, torch.Tensor):
        raise ContractError(f"pool.arch: {arch}: the model returned {type(out).__name__}, not a tensor; it must "
                            f"return B x K x H x W logits {want}")
    if tuple(out.shape) != want:
        what = ("channels (one per label: the data has " + str(classes) + ")"
                if out.ndim == 4 and out.shape[0] == 2 and out.shape[2:] == x.shape[2:] else "shape")
        raise ContractError(f"pool.arch: {arch}: wrong output {what}: a 2 x {in_channels} x {image_size} x "
                            f"{image_size} batch gave {tuple(out.shape)}, expected {want} (B x K x H x W logits "
                            f"at the input's size)")
    if not out.is_floating_point():
        raise ContractError(f"pool.arch: {arch}: the model returned {out.dtype}, expected float logits")
    if mc_dropout:
        try:
            dropout_layer(model, classes, mc_layer)
        except ValueError as e:
            raise ContractError(f"pool.arch: {arch}: {e}") from None
