"""Open architectures: any smp model, any MONAI network, or a user's callable, named in the spec.

Three forms besides the registered names (``trainables.models.MODELS``), as a string or a mapping:

* ``smp:<Arch>:<encoder>`` or ``{smp: {arch: FPN, encoder: resnet34, <smp keyword>: ...}}``: any
  architecture and encoder ``segmentation_models_pytorch`` knows (``encoder_weights`` as for the registered
  smp models);
* ``monai:<Network>`` or ``{monai: {network: BasicUNet, <keyword>: ...}}``: a network of
  ``monai.networks.nets`` in 2D (``spatial_dims``, ``in_channels`` and ``out_channels`` are filled in);
* ``{target: "my_pkg.models:build", kwargs: {...}}``: ``build(in_channels=C, classes=K, **kwargs)`` returning an
  ``nn.Module`` mapping ``B x C x H x W`` images (scaled to [0, 1], as the slice cache holds them) to
  ``B x K x H x W`` logits.

Every mapping form also takes ``name`` (the id in records, tables and MLflow; default ``smp-FPN-resnet34``,
``monai-BasicUNet``, ``target-my_pkg.models.build``), ``kwargs`` (keyword arguments of the constructor),
``size_multiple`` (H and W must be multiples of it), ``gpu_share`` (a trial's fraction of a GPU under
``gpu: auto``) and ``mc_dropout_layer`` (the module MC dropout goes before).

``normalise`` turns what the spec wrote into one canonical, JSON-able definition; ``arch_id`` names it;
``spec_of`` makes its ``ModelSpec`` (``trainables.models.resolve_model`` is the entry point).
"""
from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import json
import math
import re
import sys
from typing import Any, Mapping

from torch import nn

from .spec import ModelSpec, smp_factory

KINDS = ("smp", "monai", "target")
OPTIONS = ("name", "kwargs", "size_multiple", "gpu_share", "mc_dropout_layer")
#: a ``target`` may also be box-prompted (``prompted: true``): its callable returns a
#: ``trainables.sam.protocol.PromptedModel``, trained by the prompted loop
TARGET_OPTIONS = ("prompted",)
#: ``gpu: auto`` shares when the definition gives none: smp and MONAI models as the ResNet-50 UNets (half a
#: GPU), a user's model a whole GPU (its size is unknown).
DEFAULT_GPU_SHARE = {"smp": 0.5, "monai": 0.5, "target": 1.0}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]*(-[A-Za-z0-9_.]+)*")
TARGET = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


class ModelDefError(ValueError):
    """An open architecture that cannot be used: the message names the key, the value and the fix."""


def is_open(value: Any) -> bool:
    """True for an open architecture's spec value (a mapping, or a ``smp:``/``monai:``/``target:`` string)."""
    return isinstance(value, Mapping) or (isinstance(value, str) and value.split(":", 1)[0] in KINDS
                                          and ":" in value)


def normalise(value: Any, key: str = "pool.arch") -> dict:
    """The canonical definition of an open architecture (``kind``, what it names, ``kwargs`` and the options
    the spec gave): JSON-able, key order fixed. A bad value is a ModelDefError naming ``key``. A definition
    that is normalised already (it has ``kind``) is returned as it is."""
    if isinstance(value, Mapping) and value.get("kind") in KINDS:
        return json.loads(json.dumps(dict(value)))
    if isinstance(value, str):
        kind, _, rest = value.partition(":")
        if kind == "smp":
            arch, _, encoder = rest.partition(":")
            if not arch or not encoder:
                raise ModelDefError(f"{key}: {value!r}: write smp:<Arch>:<encoder>, e.g. smp:FPN:resnet34")
            value = {"smp": {"arch": arch, "encoder": encoder}}
        elif kind == "monai":
            value = {"monai": {"network": rest}}
        elif kind == "target":
            value = {"target": rest}
        else:
            raise ModelDefError(f"{key}: {value!r} is not an open architecture (smp:<Arch>:<encoder>, "
                                f"monai:<Network> or a mapping with smp, monai or target)")
    if not isinstance(value, Mapping):
        raise ModelDefError(f"{key}: expected a name or a mapping, got {type(value).__name__} {value!r}")
    kinds = [k for k in KINDS if k in value]
    if len(kinds) != 1:
        raise ModelDefError(f"{key}: {dict(value)!r} must hold exactly one of {', '.join(KINDS)}, e.g. "
                            f"{{smp: {{arch: FPN, encoder: resnet34}}}}, {{monai: {{network: BasicUNet}}}} or "
                            f"{{target: 'my_pkg.models:build', kwargs: {{...}}}}")
    kind = kinds[0]
    allowed = (kind, *OPTIONS, *(TARGET_OPTIONS if kind == "target" else ()))
    for k in value:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            raise ModelDefError(f"{key}.{k}: unknown key{f' (did you mean {close[0]!r}?)' if close else ''}; "
                                f"valid keys here: {', '.join(allowed)}")
    kwargs = value.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ModelDefError(f"{key}.kwargs: expected a mapping of keyword arguments, got {kwargs!r}")
    out: dict[str, Any] = {"kind": kind}
    body = value[kind]
    if kind == "smp":
        if not isinstance(body, Mapping) or "arch" not in body or "encoder" not in body:
            raise ModelDefError(f"{key}.smp: expected {{arch: <Arch>, encoder: <encoder>, ...}}, got {body!r}")
        out["arch"], out["encoder"] = str(body["arch"]), str(body["encoder"])
        kwargs = {**{k: v for k, v in body.items() if k not in ("arch", "encoder")}, **kwargs}
    elif kind == "monai":
        if isinstance(body, str):
            body = {"network": body}
        if not isinstance(body, Mapping) or not body.get("network"):
            raise ModelDefError(f"{key}.monai: expected a network name or {{network: <Network>, ...}}, got {body!r}")
        out["network"] = str(body["network"])
        kwargs = {**{k: v for k, v in body.items() if k != "network"}, **kwargs}
    else:
        if not isinstance(body, str) or not TARGET.fullmatch(body):
            raise ModelDefError(f"{key}.target: expected 'package.module:function', got {body!r}")
        out["target"] = body
    for bad in ("in_channels", "classes", "out_channels", "spatial_dims", "encoder_weights"):
        if bad in kwargs and not (bad == "spatial_dims" and kwargs[bad] == 2):
            raise ModelDefError(f"{key}.kwargs.{bad}: is filled in by oodsweep (from the data and the spec); "
                                f"remove it")
    out["kwargs"] = json.loads(json.dumps(dict(kwargs)))  # JSON-able: it travels in trial configs and checkpoints
    if "name" in value:
        if not isinstance(value["name"], str) or not NAME.fullmatch(value["name"]):
            raise ModelDefError(f"{key}.name: must be a folder-safe name (letters, digits, _ . and single -), got "
                                f"{value['name']!r}")
        out["name"] = value["name"]
    if "size_multiple" in value:
        sm = value["size_multiple"]
        if isinstance(sm, bool) or not isinstance(sm, int) or sm < 1:
            raise ModelDefError(f"{key}.size_multiple: must be an integer >= 1, got {sm!r}")
        out["size_multiple"] = sm
    if "gpu_share" in value:
        g = value["gpu_share"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g <= 1:
            raise ModelDefError(f"{key}.gpu_share: must be a number in (0, 1], got {g!r}")
        out["gpu_share"] = float(g)
    if value.get("prompted") not in (None, False):
        if value["prompted"] is not True:
            raise ModelDefError(f"{key}.prompted: must be true or false, got {value['prompted']!r}")
        out["prompted"] = True
    if "mc_dropout_layer" in value:
        if not isinstance(value["mc_dropout_layer"], str):
            raise ModelDefError(f"{key}.mc_dropout_layer: must be a module name of model.named_modules(), got "
                                f"{value['mc_dropout_layer']!r}")
        out["mc_dropout_layer"] = value["mc_dropout_layer"]
    return out


def arch_id(defn: Mapping) -> str:
    """The readable, stable id of a normalised definition: its ``name``, else ``smp-FPN-resnet34``,
    ``monai-BasicUNet`` or ``target-my_pkg.models.build``."""
    if defn.get("name"):
        return str(defn["name"])
    if defn["kind"] == "smp":
        return f"smp-{defn['arch']}-{defn['encoder']}"
    if defn["kind"] == "monai":
        return f"monai-{defn['network']}"
    return "target-" + defn["target"].replace(":", ".")


def spec_of(defn: Mapping) -> ModelSpec:
    """The ``ModelSpec`` of a normalised definition (names checked against smp / MONAI; cached)."""
    return _spec(json.dumps(dict(defn), sort_keys=True))


@functools.lru_cache(maxsize=None)
def _spec(key: str) -> ModelSpec:
    d = json.loads(key)
    kind, kw = d["kind"], dict(d["kwargs"])
    common = {"gpu_share": d.get("gpu_share", DEFAULT_GPU_SHARE[kind]), "mc_dropout_layer": d.get("mc_dropout_layer"),
              "definition": d}
    if kind == "smp":
        _check_smp(d["arch"], d["encoder"])
        return ModelSpec(smp_factory(d["arch"]), {"encoder_name": d["encoder"], **kw},
                         f"smp {d['arch']}, {d['encoder']} encoder", size_multiple=d.get("size_multiple", 32),
                         **common)
    if kind == "monai":
        network = _monai_network(d["network"])
        default_multiple = math.prod(kw.get("strides") or (2,) * 5) if d["network"] == "UNet" else (
            16 if d["network"] == "BasicUNet" else 32)
        return ModelSpec(functools.partial(_build_monai, d["network"]), kw, f"MONAI {network.__name__} (2D)",
                         size_multiple=d.get("size_multiple", default_multiple), takes_encoder_weights=False,
                         **common)
    if d.get("prompted"):
        return ModelSpec(functools.partial(_build_prompted_target, d["target"]), kw,
                         f"{d['target']} (a user's box-prompted model)", size_multiple=d.get("size_multiple", 1),
                         prompted=True, loop="prompted", takes_encoder_weights=False, **common)
    return ModelSpec(functools.partial(_build_target, d["target"]), kw, f"{d['target']} (a user's callable)",
                     size_multiple=d.get("size_multiple", 1), takes_encoder_weights=False, **common)


# ----------------------------------------------------------------------------- smp

def smp_architectures() -> list[str]:
    """The model classes smp exports (``smp.create_model``'s archs)."""
    import segmentation_models_pytorch as smp

    return sorted(n for n in dir(smp) if n[:1].isupper() and isinstance(getattr(smp, n), type)
                  and issubclass(getattr(smp, n), nn.Module))


def _check_smp(arch: str, encoder: str) -> None:
    import segmentation_models_pytorch as smp

    archs = smp_architectures()
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=3, cutoff=0.4)
        raise ModelDefError(f"pool.arch: smp has no architecture {arch!r}"
                            f"{f' (did you mean {close}?)' if close else ''}; smp's architectures: {', '.join(archs)}")
    names = smp.encoders.get_encoder_names()
    if encoder not in names and not encoder.startswith("tu-"):  # tu-<name>: any timm encoder, checked by smp
        close = difflib.get_close_matches(encoder, names, n=5, cutoff=0.5)
        raise ModelDefError(f"pool.arch: smp has no encoder {encoder!r}; close names: {', '.join(close) or 'none'}"
                            f" (all {len(names)}: segmentation_models_pytorch.encoders.get_encoder_names(); "
                            f"tu-<timm name> for a timm encoder)")


# ----------------------------------------------------------------------------- MONAI

def _monai_network(name: str) -> type:
    import monai.networks.nets as nets

    cls = getattr(nets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        valid = sorted(n for n in dir(nets) if isinstance(getattr(nets, n), type)
                       and issubclass(getattr(nets, n), nn.Module))
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.4)
        raise ModelDefError(f"pool.arch: monai.networks.nets has no network {name!r}"
                            f"{f' (did you mean {close}?)' if close else ''}; e.g. BasicUNet, UNet, AttentionUnet, "
                            f"SegResNet, UNETR, SwinUNETR, DynUNet")
    return cls


def monai_required(name: str, kwargs: Mapping) -> list[str]:
    """The constructor arguments of MONAI's ``name`` that have no default and that neither oodsweep fills
    in nor ``kwargs`` gives."""
    params = inspect.signature(_monai_network(name)).parameters
    filled = {"spatial_dims", "in_channels", "out_channels", *kwargs}
    return [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in filled
            and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]


def _build_monai(network: str, in_channels: int, classes: int, encoder_weights: Any = None, **kw: Any) -> nn.Module:
    cls = _monai_network(network)
    params = inspect.signature(cls).parameters
    missing = [p for p in ("in_channels", "out_channels") if p not in params]
    if missing:
        raise ModelDefError(f"pool.arch: monai:{network} has no {' or '.join(missing)} argument, so oodsweep cannot "
                            f"set its channels; wrap it in your own callable ({{target: 'my_pkg.models:build'}})")
    need = monai_required(network, kw)
    if need:
        raise ModelDefError(f"pool.arch: monai:{network} needs {', '.join(need)}: give "
                            f"{{monai: {{network: {network}, {need[0]}: ...}}}} (its signature: "
                            f"{inspect.signature(cls)})")
    if "spatial_dims" in params:
        kw = {"spatial_dims": 2, **kw}
    return cls(in_channels=in_channels, out_channels=classes, **kw)


# ----------------------------------------------------------------------------- a user's callable

def load_target(target: str):
    """The callable ``package.module:function`` names; an import error says where Python looked."""
    module, _, fn = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ModelDefError(
            f"pool.arch: target {target!r}: cannot import module {module!r} ({type(e).__name__}: {e}). Python "
            f"looked in sys.path = {sys.path[:6]}{' ...' if len(sys.path) > 6 else ''}. Name the folder of your "
            f"package in the spec's `runtime_env: {{py_modules: [path/to/{module.split('.')[0]}]}}` (or "
            f"`working_dir`), or install it and list it in `runtime_env: {{pip: [...]}}`") from None
    obj = getattr(mod, fn, None)
    if not callable(obj):
        raise ModelDefError(f"pool.arch: target {target!r}: module {module!r} ({getattr(mod, '__file__', '?')}) has "
                            f"no callable {fn!r}")
    return obj


def _build_target(target: str, in_channels: int, classes: int, encoder_weights: Any = None, **kw: Any) -> nn.Module:
    model = load_target(target)(in_channels=in_channels, classes=classes, **kw)
    if not isinstance(model, nn.Module):
        raise ModelDefError(f"pool.arch: target {target!r} returned {type(model).__name__}, not a torch.nn.Module; "
                            f"it must return the model (build(in_channels, classes, **kwargs) -> nn.Module)")
    return model


def _build_prompted_target(target: str, in_channels: int, classes: int = 1, encoder_weights: Any = None,
                           sam_checkpoint: str | None = None, seed: int = 0, **kw: Any) -> nn.Module:
    """A user's box-prompted model: ``build(in_channels=C, sam_checkpoint=..., seed=..., **kwargs)`` returning a
    ``trainables.sam.protocol.PromptedModel`` (one merged mask per box: ``classes`` must be 1)."""
    from ..sam.protocol import PromptedModel

    if classes != 1:
        raise ModelDefError(f"pool.arch: target {target!r} is box-prompted: one (merged) mask per box, so the data "
                            f"must have one label channel, got {classes}")
    model = load_target(target)(in_channels=in_channels, sam_checkpoint=sam_checkpoint, seed=seed, **kw)
    if not isinstance(model, PromptedModel):
        missing = [m for m in ("prompted", "box_mode", "img_size", "decoder", "parts_channels", "frozen_parts",
                               "encoder_key", "embed", "decode", "decode_parts", "upsample") if not hasattr(model, m)]
        raise ModelDefError(f"pool.arch: target {target!r} (prompted: true) returned {type(model).__name__}, which "
                            f"lacks {', '.join(missing)} of trainables.sam.protocol.PromptedModel")
    return model
