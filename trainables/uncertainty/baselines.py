"""The paper's Table-4 baselines, each a per-pixel uncertainty map (see ``trainables.uncertainty``):
BayesCap as published (its net and loss), test-time augmentation with pixel noise and with intensity
jitter, and MC dropout before the final layer (``mc_dropout_map``; box-prompted members: ``trainables.sam.frozen``)."""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import nn

from .delta import ggd_variance, set_padding
from ..exclusive import ExclusiveClasses, binary_logits
from ..models.contract import dropout_layer
from ..sam.frozen import oracle_forward

class _BCResBlock(nn.Module):
    """BayesCap's residual block (conv-BN-PReLU-conv-BN plus the input), as its SRGAN trunk."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.PReLU(),
                                  nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class BayesCapNet(nn.Module):
    """BayesCap's net (ExplainableML/BayesCap ``src/networks_SRGAN.py``, class ``BayesCap``) on ŷ only.

    ``B x 1 x H x W`` ŷ -> μ, 1/α (>= 0), β (>= 0). A 9x9 stem, ``blocks`` residual blocks, a conv-BN
    skip, a 4x-wide conv block, and 9x9 heads; the 1/α and β heads end in ReLU (the published heads).
    No library ships it, so it is written here from the paper's code, at a configurable width and depth
    (published: 64 and 16; the CPU demo uses a small one). ``forward(x, y_hat)`` ignores x: the same
    call as ``DeltaNet``.
    """

    def __init__(self, width: int = 64, blocks: int = 16, padding: str = "replicate"):
        super().__init__()
        w4 = 4 * width
        self.stem = nn.Sequential(nn.Conv2d(1, width, 9, padding=4), nn.PReLU())
        self.trunk = nn.Sequential(*[_BCResBlock(width) for _ in range(blocks)])
        self.skip = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.wide = nn.Sequential(nn.Conv2d(width, w4, 3, padding=1), nn.PReLU(), nn.Conv2d(w4, w4, 3, padding=1),
                                  nn.PReLU())
        self.head_mu = nn.Conv2d(w4, 1, 9, padding=4)

        def head() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(w4, width, 9, padding=4), nn.PReLU(), nn.Conv2d(width, width, 9, padding=4),
                                 nn.PReLU(), nn.Conv2d(width, 1, 9, padding=4), nn.ReLU())
        self.head_one_over_alpha = head()
        self.head_beta = head()
        set_padding(self, padding)

    def forward(self, x: torch.Tensor | None, y_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out1 = self.stem(y_hat)
        h = self.wide(out1 + self.skip(self.trunk(out1)))
        return self.head_mu(h).float(), self.head_one_over_alpha(h).float(), self.head_beta(h).float()


# BayesCap's published constants (TempCombLoss / GenGaussLoss defaults; get_uncer_BayesCap's map)
BC_ALPHA_EPS, BC_BETA_EPS, BC_RESI = 1e-4, 1e-4, (1e-4, 1e3)
BC_MAP_ALPHA_EPS, BC_MAP_BETA_EPS = 1e-5, 1e-2


def bayescap_loss(y: torch.Tensor, y_hat: torch.Tensor, mu: torch.Tensor, one_over_alpha: torch.Tensor,
                  beta: torch.Tensor, t1: float = 1.0, t2: float = 5e-2) -> torch.Tensor:
    """BayesCap's loss as published (``TempCombLoss``): T1 · L1(μ, ŷ) + T2 · mean GGD term on y.

    The GGD term is the public code's: resi = clamp(|μ − y| · (1/α + ε) · (β + ε), 1e-4, 1e3);
    resi − log(1/α + ε) + log Γ(1/(β + ε)) − log(β + ε). Note the product where Eq. 7 has the power
    (|μ − y| / α)^β; it is kept, since this is the baseline as published.
    """
    oa, b = one_over_alpha + BC_ALPHA_EPS, beta + BC_BETA_EPS
    resi = ((mu - y).abs() * oa * b).clamp(*BC_RESI)
    ggd = resi - torch.log(oa) + torch.lgamma(1.0 / b) - torch.log(b)
    return t1 * (mu - y_hat).abs().mean() + t2 * ggd.mean()


def bayescap_variance(one_over_alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """BayesCap's uncertainty map (``get_uncer_BayesCap``): α = 1/(1/α + 1e-5), β + 1e-2 in Eq. 8.

    Its ReLU heads give β = 0 (dead pixels at the start of training), where Γ(3/β)/Γ(1/β) overflows:
    computed in float64 and capped at float32's largest value, so that such pixels rank as the most
    uncertain (as the published map's inf would) and the map stays finite for Otsu.
    """
    v = ggd_variance(1.0 / (one_over_alpha.double() + BC_MAP_ALPHA_EPS), beta.double() + BC_MAP_BETA_EPS)
    big = torch.finfo(torch.float32).max
    return torch.nan_to_num(v, nan=big, posinf=big).clamp_max(big).float()


# ----------------------------------------------------------------------------- baselines

@torch.inference_mode()
def _prob_variance(model: nn.Module, images: np.ndarray, device: torch.device, passes: int,
                   perturb: Callable[[torch.Tensor, torch.Generator], torch.Tensor], gen: torch.Generator,
                   batch_size: int = 64, masks: np.ndarray | None = None) -> np.ndarray:
    """Variance over passes of σ(Φ(perturb(x))); ``masks``: the prompts' ground truth for box-prompted Φ."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[i:i + batch_size], dtype=np.float32)).to(device)
        if masks is None:
            forward = model
        else:
            forward = partial(oracle_forward, model, masks=np.asarray(masks[i:i + batch_size]))
        probs = torch.stack([torch.sigmoid(forward(perturb(x, gen))).amax(1) for _ in range(passes)])
        out.append(probs.var(dim=0, unbiased=False).cpu().numpy())
    return np.concatenate(out)


def tta_noise_map(model, images, device, passes, std, gen, masks=None):
    model.eval()
    return _prob_variance(model, images, device, passes,
                          lambda x, g: x + std * torch.randn(x.shape, generator=g).to(x.device), gen, masks=masks)


def tta_color_map(model, images, device, passes, strength, gen, masks=None):
    from torchvision.transforms.v2 import ColorJitter

    model.eval()
    jitter = ColorJitter(brightness=strength, contrast=strength)

    def perturb(x, g):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))  # ColorJitter uses the global RNG
        if x.shape[1] in (1, 3):  # grey or RGB: torchvision's own colour handling
            return torch.stack([jitter(xi) for xi in x.clamp(0, 1)])
        # other channel counts (torchvision's contrast takes 1 or 3): each image's channels jittered as grey
        # images with one draw of brightness and contrast (a C x 1 x H x W batch shares the parameters)
        return torch.stack([jitter(xi[:, None])[:, 0] for xi in x.clamp(0, 1)])
    return _prob_variance(model, images, device, passes, perturb, gen, masks=masks)


@torch.inference_mode()
def mc_dropout_map(model, images, device, passes, p, gen, batch_size: int = 64, layer: str | None = None) -> np.ndarray:
    """Variance over ``passes`` of σ(Φ) with channel dropout (``dropout2d``) on the input of Φ's last layer.

    The layer is ``trainables.models.contract.dropout_layer``'s: ``layer`` (or the ``mc_dropout_layer`` the
    member's spec names), else the last ``Conv2d``/``ConvTranspose2d`` with one output channel per class; a
    model without one is refused with the reason. When that layer opens smp's ``segmentation_head`` (smp
    models, TransUNet), the encoder and decoder run once per batch (the head's input is captured by a
    forward pre-hook) and only the head runs N times; for any other model the dropout is applied by a pre-hook
    on the layer and the whole model runs N times. Both draw the same masks from the same stream.
    """
    model.eval()
    # exclusive classes (trainables.exclusive): dropout in the wrapped net, its L + 1 logits turned into L margins
    outputs = binary_logits if isinstance(model, ExclusiveClasses) else None
    model = getattr(model, "class_net", model)
    first = torch.from_numpy(np.asarray(images[:1], dtype=np.float32)).to(device)
    classes = int(model(first).shape[1])
    _, conv = dropout_layer(model, classes, layer)
    head = getattr(model, "segmentation_head", None)
    opens_head = head is not None and (conv is head or (isinstance(head, nn.Sequential) and len(head) > 0
                                                        and head[0] is conv))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    drop_gen = torch.Generator(device=device).manual_seed(seed)
    run = _mc_dropout_head if opens_head else _mc_dropout_layer
    return run(model, head if opens_head else conv, images, device, passes, p, drop_gen, batch_size, outputs)


def _out(logits: torch.Tensor, outputs) -> torch.Tensor:
    return logits if outputs is None else outputs(logits)


def _dropped(x: torch.Tensor, p: float, drop_gen: torch.Generator) -> torch.Tensor:
    """``x`` (B x C x H x W) with whole channels dropped with probability p (a mask drawn from ``drop_gen``),
    the kept ones scaled by 1/(1 - p)."""
    keep = (torch.rand(x.shape[:2], generator=drop_gen, device=x.device) >= p).to(x.dtype)
    return x * keep[:, :, None, None] / (1 - p)


@torch.inference_mode()
def _mc_dropout_head(model, head, images, device, passes, p, drop_gen, batch_size, outputs=None) -> np.ndarray:
    captured: dict[str, torch.Tensor] = {}
    handle = head.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.asarray(images[i:i + batch_size], dtype=np.float32)).to(device)
            model(x)
            feats = captured["x"]
            probs = [torch.sigmoid(_out(head(_dropped(feats, p, drop_gen)), outputs)).amax(1) for _ in range(passes)]
            out.append(torch.stack(probs).var(dim=0, unbiased=False).cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(out)


@torch.inference_mode()
def _mc_dropout_layer(model, layer, images, device, passes, p, drop_gen, batch_size, outputs=None) -> np.ndarray:
    def drop(mod, args):
        return (_dropped(args[0], p, drop_gen), *args[1:])
    handle = layer.register_forward_pre_hook(drop)
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.asarray(images[i:i + batch_size], dtype=np.float32)).to(device)
            probs = [torch.sigmoid(_out(model(x), outputs)).amax(1) for _ in range(passes)]
            out.append(torch.stack(probs).var(dim=0, unbiased=False).cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(out)
