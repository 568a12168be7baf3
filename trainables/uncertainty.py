"""Post-hoc uncertainty for a frozen pool member (paper §2.3–2.4, Appendix A.2; DESIGN §6).

For a frozen segmenter Φ, a small net δ({ŷ, x}) predicts a per-pixel generalized Gaussian
GGD(μ, α, β) of the ground truth, trained by maximum likelihood on the source training split
(Eq. 5 with the GGD of Eq. 7). Its per-pixel variance (Eq. 8), thresholded per image with Otsu's
method (``skimage.filters.threshold_otsu``), gives the image's *uncertain area*.

Baselines (paper Table 4), each a per-pixel map through the same Otsu area:

* ``bayescap``   BayesCap as published (Upadhyay et al., ECCV 2022; ExplainableML/BayesCap): its own net
  on ŷ only (``BayesCapNet``: a 9x9 stem, residual trunk, 1/α and β heads with ReLU) and its loss
  (``bayescap_loss``, the public ``TempCombLoss``: T1 · L1(μ, ŷ) + T2 · its GGD term, which writes
  (|μ − y| / α)^β as the product |μ − y| · (1/α) · β, clamped), T1 = 1, T2 = 5e-2 as its training code.
* ``ggd_yhat_only`` the ablation: our δ and loss with the image removed (δ on ŷ only), what earlier
  versions called "bayescap".
* ``tta_noise``  test-time augmentation with Gaussian pixel noise: variance over N passes of σ(Φ(x + ε)).
* ``tta_color``  test-time colour (intensity) jitter: random brightness and contrast per pass
  (``torchvision.transforms.v2.ColorJitter``; saturation and hue do not exist for grey images).
* ``mc_dropout`` MC dropout before the final layer: the pool's models have no dropout there, so
  channel dropout (``dropout2d(p)``, always on) is applied to the decoder features that enter
  ``model.segmentation_head`` (captured with a forward pre-hook; the library's modules are not
  modified), and the head runs N times on them. Variance over N passes of σ(head(·)).

Box-prompted members (MedSAM) are scored as the pool scored them: ŷ and every TTA and MC-dropout
pass use the ground-truth boxes of the slice (the oracle prompt), ŷ and MC dropout read the shared
embedding cache; MC dropout drops channels of the upscaled image features that enter SAM's final
mask product (``trainables.medsam.mc_dropout_map``).

``fit_uncertainty(config)`` is a plain function (no Ray). ``sweeps.uncertainty`` runs it as a Ray
Train ``TorchTrainer`` inside one Ray Tune trial per pool member, passing ``wrap_model`` (DDP) and
the worker's rank; only rank 0 scores and writes records.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import records
from .accel import ACCEL_DEFAULTS, Accel, accel_for, place_training_data, resolve_device
from .data.cache import SliceCache, open_slice_cache
from .segment import eval_sets, load_member, predict, train_val_rows, with_defaults

REQUIRED = ("member_id", "checkpoint", "cache", "source", "targets", "experiment_dir")
DEFAULTS: dict[str, Any] = {
    "target_split": "test",
    "epochs": 50,            # paper: Adam 1e-4, 50 epochs, cosine schedule
    "lr": 1e-4,
    "lam": 1.0,              # λ of Eq. 5 (identity term), > 0; a list fits one δ per value (a sweep):
                             # the first is method "ggd", the others "ggd_lam<λ>"
    "fit_split": "train",    # the source split δ is fitted on: "train" (the paper) or "val" (a validation split)
    "val_fraction": 0.0,     # the pool's validation split of the source's training cases (data.val_fraction)
    "split_seed": 0,         # and its seed (data.split_seed): fit_split's "train" / "val" rows
    "holdout": 0.1,          # fraction of the fit split's cases held out to record δ's convergence (0: none)
    "beta": 2.0,             # fixed shape (the paper's runs); learn_beta makes it a head
    "learn_beta": False,
    "width": 16,             # stem channels
    "padding": "replicate",  # δ's convolutions pad by repeating the edge ("zeros": the maps' bright frame)
    "batch_size": 8,
    "baselines": ["bayescap", "tta_noise", "tta_color", "mc_dropout"],
    "bayescap_width": 64,    # BayesCap's trunk width and residual blocks (published: 64, 16)
    "bayescap_blocks": 16,
    "bayescap_t1": 1.0,      # BayesCap's loss weights: T1 on the L1 identity term, T2 on its GGD term
    "bayescap_t2": 5e-2,
    "passes": 8,             # N for TTA and MC dropout
    "noise_std": 0.05,       # TTA pixel noise (images are in [0, 1])
    "jitter": 0.3,           # TTA brightness/contrast jitter strength
    "dropout": 0.2,          # MC dropout probability
    "baseline_roles": ["ood"],  # where baselines are scored (Table 4 is per target); "id" adds the source
    "n_examples": 4,         # slices kept for the qualitative figure
    "checkpoint_every": 10,  # epochs between resumable checkpoints (and after the last epoch)
    "num_threads": None,
    "device": "auto",
    "seed": 0,
    "resume_from": None,
    "verbose": False,
    # amp, channels_last, data placement (trainables.accel); δ trains without augmentation
    **{k: v for k, v in ACCEL_DEFAULTS.items() if k != "augment"},
}
EPS = 1e-3
FIT_SPLITS = ("train", "val")


# ----------------------------------------------------------------------------- the δ network

class _Stem(nn.Sequential):
    def __init__(self, cin: int, width: int):
        super().__init__(nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                         nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))


class DeltaNet(nn.Module):
    """δ({ŷ, x}): ``B x C x H x W`` image and ``B x 1 x H x W`` prediction -> μ, α, β (``B x 1 x H x W``).

    Two conv stems (x and ŷ), concatenated; a ResNet-18 body (``segmentation_models_pytorch``'s
    U-Net with a ResNet-18 encoder, so the body keeps the input resolution); the body's output is
    concatenated with the joint stem features and fused; three 1x1 heads give μ, α > 0 and β > 0.
    With ``use_image=False`` it is the BayesCap baseline (δ sees ŷ only).
    """

    def __init__(self, in_channels: int = 1, width: int = 16, use_image: bool = True,
                 learn_beta: bool = False, beta: float = 2.0, padding: str = "replicate"):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.use_image = use_image
        self.stem_y = _Stem(1, width)
        self.stem_x = _Stem(in_channels, width) if use_image else None
        joint = width * (2 if use_image else 1)
        self.body = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=joint, classes=width,
                             decoder_channels=(128, 64, 32, 32, 16))
        self.fuse = nn.Sequential(nn.Conv2d(joint + width, width, 3, padding=1), nn.ReLU(inplace=True))
        self.head_mu = nn.Conv2d(width, 1, 1)
        self.head_alpha = nn.Conv2d(width, 1, 1)
        self.head_beta = nn.Conv2d(width, 1, 1) if learn_beta else None
        self.register_buffer("beta_fixed", torch.tensor(float(beta)))
        set_padding(self, padding)

    def forward(self, x: torch.Tensor, y_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.stem_y(y_hat)
        if self.use_image:
            feats = torch.cat([self.stem_x(x), feats], dim=1)
        h = self.fuse(torch.cat([self.body(feats), feats], dim=1))
        # the heads' outputs leave autocast in fp32: the GGD likelihood (powers, log Γ) needs the precision
        mu = self.head_mu(h).float()
        alpha = F.softplus(self.head_alpha(h).float()) + EPS
        if self.head_beta is not None:
            beta = F.softplus(self.head_beta(h).float()) + 0.1  # β near 0 makes Γ(1/β) overflow
        else:
            beta = self.beta_fixed.expand_as(mu)
        return mu, alpha, beta


PADDINGS = ("replicate", "reflect", "zeros")


def set_padding(net: nn.Module, mode: str) -> nn.Module:
    """Every padded convolution of ``net`` pads with ``mode`` (``nn.Conv2d``'s own ``padding_mode``).

    Why δ's maps had a bright frame: with zero padding, every 3x3 convolution after a BatchNorm
    sees a step at the image edge (the background's features are not 0 there, the padding is),
    and the ResNet body, at 64 px down to 2x2, sees little else; δ learns to read that step as
    uncertainty, so the frame lights up where nothing is uncertain. Replicate padding continues
    the background across the edge, so a convolution sees no edge at all. The smp body is built
    by the library and then set the same way (an attribute every ``nn.Conv2d`` has; nothing of the
    library is copied or changed).
    """
    if mode not in PADDINGS:
        raise ValueError(f"uncertainty padding must be one of {list(PADDINGS)}, got {mode!r}")
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and any(int(p) > 0 for p in m.padding):
            m.padding_mode = mode
    return net


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


# ----------------------------------------------------------------------------- equations

def ggd_nll(y: torch.Tensor, mu: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per-pixel negative log-likelihood of GGD(μ, α, β) (Eq. 5/7 without the constant log 2).

    (|y − μ| / α)^β − log β + log α + log Γ(1/β). With β = 2 this is the Gaussian NLL with
    σ² = α² / 2 up to a constant.
    """
    resid = (y - mu).abs() / alpha
    return resid.clamp_min(1e-12).pow(beta) - torch.log(beta) + torch.log(alpha) + torch.lgamma(1.0 / beta)


def delta_loss(y: torch.Tensor, y_hat: torch.Tensor, mu: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
               lam: float) -> torch.Tensor:
    """Eq. 5 with the GGD likelihood, averaged over pixels: NLL(y | μ, α, β) + λ (μ − ŷ)²."""
    return ggd_nll(y, mu, alpha, beta).mean() + lam * (mu - y_hat).pow(2).mean()


def ggd_variance(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Eq. 8: the per-pixel uncertainty α² Γ(3/β) / Γ(1/β) (in log space for stability)."""
    return torch.exp(2 * torch.log(alpha) + torch.lgamma(3.0 / beta) - torch.lgamma(1.0 / beta))


def uncertain_masks(maps: np.ndarray) -> np.ndarray:
    """The uncertain pixels of each image: above its own Otsu threshold (``N x H x W`` -> bool).

    A constant map has no uncertain pixels (Otsu's threshold is then the constant itself).
    """
    from skimage.filters import threshold_otsu

    maps = np.asarray(maps, dtype=np.float64)
    out = np.zeros(maps.shape, dtype=bool)
    for i, m in enumerate(maps):
        if not np.isfinite(m).all():
            raise ValueError(f"uncertainty map {i} has {int((~np.isfinite(m)).sum())} non-finite values")
        if m.max() > m.min():
            out[i] = m > threshold_otsu(m)
    return out


def otsu_area(maps: np.ndarray) -> np.ndarray:
    """Pixels above each image's Otsu threshold: ``N x H x W`` maps -> ``N`` int counts (the paper's area)."""
    return uncertain_masks(maps).reshape(len(maps), -1).sum(1).astype(np.int64)


def source_threshold(maps: np.ndarray) -> float:
    """Otsu's threshold fitted once on every pixel of a member's source maps (``N x H x W``).

    Applied unchanged to every site (``fixed_px``), it lets the *level* of the uncertainty count: a
    target whose maps are twice as high gets more uncertain pixels, where each image's own Otsu
    threshold would scale with the map and find the same area. ``inf`` for constant source maps
    (nothing is above them).
    """
    from skimage.filters import threshold_otsu

    m = np.asarray(maps, dtype=np.float64).ravel()
    if not m.size or not np.isfinite(m).all() or m.max() <= m.min():
        return math.inf
    return float(threshold_otsu(m))


def error_ranking(maps: np.ndarray, error: np.ndarray) -> tuple[float, float]:
    """(AUROC, average precision) of the map's values as a score for the error pixels, over every pixel.

    ``sklearn.metrics.roc_auc_score`` / ``average_precision_score``; NaN when every pixel, or none,
    is an error (either is undefined then).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(error, dtype=bool).ravel()
    if y.all() or not y.any():
        return math.nan, math.nan
    s = np.asarray(maps, dtype=np.float64).ravel()
    return float(roc_auc_score(y, s)), float(average_precision_score(y, s))


def slice_columns(maps: np.ndarray, error: np.ndarray, threshold: float | None) -> dict[str, np.ndarray]:
    """The per-slice uncertainty columns of one method on one site (``records.UNCERTAINTY_COLUMNS``).

    Args:
        maps: ``N x H x W`` uncertainty maps.
        error: ``N x H x W`` bool, the frozen member's wrong pixels.
        threshold: the member's source threshold for this method (``source_threshold``); None
            when the method did not score the source split (``fixed_px`` is then <NA>).
    """
    n = len(maps)
    unc = uncertain_masks(maps)
    flat = np.asarray(maps, dtype=np.float64).reshape(n, -1)
    err = np.asarray(error, dtype=bool).reshape(n, -1)
    fixed = (pd.array((flat > threshold).sum(1), dtype="Int64") if threshold is not None
             else pd.array([pd.NA] * n, dtype="Int64"))
    return {"uncertain_px": unc.reshape(n, -1).sum(1).astype(np.int64),
            "error_px": err.sum(1).astype(np.int64),
            "uncertain_error_px": (unc.reshape(n, -1) & err).sum(1).astype(np.int64),
            "fixed_px": fixed, "map_ptp": flat.max(1) - flat.min(1) if flat.shape[1] else np.zeros(n),
            "mean_uncertainty": flat.mean(1)}


def union(masks: torch.Tensor) -> torch.Tensor:
    """Multi-label masks ``N x L x H x W`` -> their union ``N x H x W``; ``N x H x W`` unchanged.

    δ models one ŷ channel: for a multi-label task (fundus lesions) it sees the union of the
    lesions, and the error and uncertain areas are those of the union. The baselines likewise
    take the largest lesion probability per pixel (``amax`` over channels; the one channel of a
    binary model).
    """
    return masks.any(1) if masks.ndim == 4 else masks


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
            from .medsam import oracle_forward

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
        return torch.stack([jitter(xi) for xi in x.clamp(0, 1)])
    return _prob_variance(model, images, device, passes, perturb, gen, masks=masks)


@torch.inference_mode()
def mc_dropout_map(model, images, device, passes, p, gen, batch_size: int = 64) -> np.ndarray:
    """Variance over ``passes`` of σ(head(dropout2d(decoder features))).

    Dropout sits before the final layer only, so the encoder and decoder run once per batch (their
    output is captured by a forward pre-hook on ``segmentation_head``) and only the head runs N times.
    """
    model.eval()
    head = getattr(model, "segmentation_head", None)
    if head is None:
        raise ValueError(f"MC dropout needs a model with a `segmentation_head` (smp models); "
                         f"{type(model).__name__} has none")
    captured: dict[str, torch.Tensor] = {}
    handle = head.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    drop_gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.asarray(images[i:i + batch_size], dtype=np.float32)).to(device)
            model(x)
            feats = captured["x"]
            probs = []
            for _ in range(passes):
                keep = (torch.rand(feats.shape[:2], generator=drop_gen, device=device) >= p).to(feats.dtype)
                probs.append(torch.sigmoid(head(feats * keep[:, :, None, None] / (1 - p))).amax(1))
            out.append(torch.stack(probs).var(dim=0, unbiased=False).cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(out)


# ----------------------------------------------------------------------------- fitting

def _resolve(config: dict) -> dict:
    cfg = with_defaults(config, REQUIRED, DEFAULTS, "fit_uncertainty")
    bad = [b for b in cfg["baselines"] if b not in records.UNCERTAINTY_METHODS[1:]]
    if bad:
        raise ValueError(f"unknown uncertainty baselines {bad}; valid: {list(records.UNCERTAINTY_METHODS[1:])}")
    lams = cfg["lam"] if isinstance(cfg["lam"], (list, tuple)) else [cfg["lam"]]
    if not lams or not all(isinstance(v, (int, float)) and float(v) > 0 for v in lams):
        raise ValueError(f"uncertainty lam (λ of Eq. 5) must be > 0 (or a non-empty list of such), got {cfg['lam']!r}: "
                         f"without the identity term μ need not follow ŷ; the paper's default is 1.0")
    cfg["lams"] = {("ggd" if i == 0 else lam_method(v)): float(v) for i, v in enumerate(lams)}
    if cfg["fit_split"] not in FIT_SPLITS:
        raise ValueError(f"uncertainty fit_split must be one of {list(FIT_SPLITS)}, got {cfg['fit_split']!r}")
    if not 0 <= float(cfg["holdout"]) < 1:
        raise ValueError(f"uncertainty holdout must be in [0, 1), got {cfg['holdout']!r}")
    if int(cfg["epochs"]) < 1:
        raise ValueError(f"uncertainty epochs must be >= 1, got {cfg['epochs']!r}")
    cfg["checkpoint"] = str(records.resolve_checkpoint(cfg["experiment_dir"], cfg["checkpoint"]))
    if not Path(cfg["checkpoint"]).is_file():
        raise FileNotFoundError(f"pool member {cfg['member_id']}: checkpoint {cfg['checkpoint']} does not exist; "
                                f"`oodsweep resume {cfg['experiment_dir']}` trains that member again")
    return cfg


def _load_frozen(cfg: dict, device: torch.device) -> nn.Module:
    try:
        model = load_member(cfg["checkpoint"], device)
    except Exception as e:  # a file that is not ours, or weights for another architecture
        # torch's unpickling message suggests weights_only=False (running arbitrary code): never passed on
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        why = type(e).__name__ + (f": {first}" if first and "weights_only" not in str(e) else "")
        raise ValueError(f"pool member {cfg['member_id']}: cannot load checkpoint {cfg['checkpoint']}: it is damaged "
                         f"or not a pool member's weights ({why}); delete it and run `oodsweep resume "
                         f"{cfg['experiment_dir']}`, which trains that member again") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_predict(model: nn.Module, cache: SliceCache, rows: np.ndarray, device: torch.device,
                   accel: Accel | None = None) -> torch.Tensor:
    """ŷ of the frozen member on cache rows (``N x H x W`` bool); MedSAM members get the pool's oracle boxes.

    ``accel``: the precision the pool scored the member with (bf16 autocast on a GPU), so that ŷ is the
    prediction the records hold."""
    if getattr(model, "prompted", False):
        from .medsam import predict_member_rows

        return predict_member_rows(model, cache, rows, device)
    return predict(model, cache.images[rows], device, accel=accel)


def lam_method(lam: float) -> str:
    """The method name of δ fitted with a swept λ other than the first: ``ggd_lam100``."""
    return f"ggd_lam{float(lam):g}"


def _nets(cfg: dict, in_channels: int, accel: Accel) -> dict[str, nn.Module]:
    nets: dict[str, nn.Module] = {
        name: DeltaNet(in_channels, cfg["width"], True, cfg["learn_beta"], cfg["beta"], cfg["padding"])
        for name in cfg["lams"]}
    if "bayescap" in cfg["baselines"]:
        nets["bayescap"] = BayesCapNet(int(cfg["bayescap_width"]), int(cfg["bayescap_blocks"]), cfg["padding"])
    if "ggd_yhat_only" in cfg["baselines"]:
        nets["ggd_yhat_only"] = DeltaNet(in_channels, cfg["width"], False, cfg["learn_beta"], cfg["beta"],
                                         cfg["padding"])
    return {k: accel.model(v) for k, v in nets.items()}


@torch.inference_mode()
def delta_maps(net: nn.Module, images: np.ndarray, preds: torch.Tensor, device: torch.device,
               batch_size: int = 64, accel: Accel | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(μ, uncertainty) maps ``N x H x W`` of a trained δ for images and the frozen predictions."""
    net.eval()
    accel = accel or Accel(device, None, False)
    mus, unc = [], []
    for i in range(0, len(images), batch_size):
        x = accel.images(torch.from_numpy(np.asarray(images[i:i + batch_size])))
        yh = accel.images(preds[i:i + batch_size, None])
        with accel.autocast():
            mu, a, b = net(x, yh)
        mus.append(mu[:, 0])
        unc.append((bayescap_variance(a, b) if isinstance(_unwrap(net), BayesCapNet) else ggd_variance(a, b))[:, 0])
    return torch.cat(mus).cpu().numpy(), torch.cat(unc).cpu().numpy()


def fit_uncertainty(config: dict, report: Callable[[dict, str | None], None] | None = None,
                    wrap_model: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0,
                    world_size: int = 1) -> dict | None:
    """Fit δ (and BayesCap) for one frozen pool member, then score every site with every method.

    Args:
        config: see ``REQUIRED`` and ``DEFAULTS``.
        report: called after every epoch with ``{"epoch", "loss_ggd", ...}`` and, every
            ``checkpoint_every`` epochs and after the last, a folder with the resumable state.
        wrap_model: e.g. DDP's ``prepare_model`` when several workers train; identity by default.
        rank, world_size: this worker's shard of the training slices; only rank 0 scores and writes.

    Returns:
        On rank 0, a summary dict (mean uncertain area per method and site); else None.
    """
    cfg = _resolve(config)
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    device = resolve_device(cfg["device"])
    accel = accel_for(cfg, device, "fit_uncertainty")
    torch.manual_seed(int(cfg["seed"]))
    gen = torch.Generator().manual_seed(int(cfg["seed"]) + rank)
    cache = open_slice_cache(cfg["cache"])
    frozen = _load_frozen(cfg, device)
    frozen = accel.model(frozen)

    all_rows, held = fit_rows(cache, cfg)
    # equal shards: DDP needs every rank to take the same number of steps
    rows = all_rows[rank::world_size][: len(all_rows) // world_size]
    yhat = union(frozen_predict(frozen, cache, rows, device, accel)).to(torch.uint8)  # ŷ once, not per epoch
    # images and masks as cached (float16, uint8) and ŷ, on the device when they fit (trainables.accel)
    data, where = place_training_data({"x": (str(cache.path / "images.npy"), rows),
                                       "y": (str(cache.path / "masks.npy"), rows)}, device, cfg,
                                      "fit_uncertainty", extra={"yh": yhat})
    if rank == 0:
        print(f"[delta {cfg['member_id']}] {accel.describe()}; {where}", flush=True)

    nets = _nets(cfg, int(cache.images.shape[1]), accel)
    wrapped = {k: (wrap_model(v) if wrap_model else v) for k, v in nets.items()}
    opts = {k: torch.optim.Adam(v.parameters(), lr=float(cfg["lr"]), fused=device.type == "cuda" or None)
            for k, v in wrapped.items()}
    scheds = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=int(cfg["epochs"])) for k, o in opts.items()}
    start = 0
    curve: dict[str, list[float]] = {}
    if rank == 0 and len(held):
        held_data = (np.asarray(cache.images[held]), union(torch.from_numpy(np.asarray(cache.masks[held]))).float(),
                     union(frozen_predict(frozen, cache, held, device, accel)))
    if cfg["resume_from"]:
        state = torch.load(Path(cfg["resume_from"]) / "delta.pt", map_location=device, weights_only=True)
        for k in nets:
            nets[k].load_state_dict(state["nets"][k])
            opts[k].load_state_dict(state["opts"][k])
            scheds[k].load_state_dict(state["scheds"][k])
        if accel.scaler is not None and state.get("scaler"):
            accel.scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"])
        curve = {k: list(v) for k, v in state.get("curve", {}).items()}
        for _ in range(start):
            torch.randperm(len(data), generator=gen)

    if rank == 0:
        records.log_attempt(cfg["experiment_dir"], "uncertainty", cfg["member_id"], start)
    bs = int(cfg["batch_size"])
    epochs = int(cfg["epochs"])
    for epoch in range(start + 1, epochs + 1):
        t0 = time.perf_counter()
        sums, steps = delta_epoch(wrapped, opts, data, torch.randperm(len(data), generator=gen), bs, accel,
                                  {**cfg["lams"], "ggd_yhat_only": cfg["lams"]["ggd"]},
                                  (float(cfg["bayescap_t1"]), float(cfg["bayescap_t2"])))
        for s in scheds.values():
            s.step()
        metrics = {"epoch": epoch, **{f"loss_{k}": float(v) / max(steps, 1) for k, v in sums.items()},
                   "epoch_seconds": time.perf_counter() - t0}
        if rank == 0 and len(held):
            metrics.update(heldout_metrics(nets["ggd"], *held_data, cfg["lams"]["ggd"], device, accel))
        for k, v in metrics.items():
            if k.startswith(("loss_", "heldout_")):
                curve.setdefault(k, []).append(float(v))
        ckpt = None
        if report is not None and rank == 0 and (epoch % int(cfg["checkpoint_every"]) == 0 or epoch == epochs):
            ckpt = tempfile.mkdtemp(prefix="delta-", dir=records.scratch_dir(cfg["experiment_dir"]))
            torch.save({"nets": {k: v.state_dict() for k, v in nets.items()},
                        "opts": {k: compact_optimizer_state(v.state_dict()) for k, v in opts.items()},
                        "scheds": {k: v.state_dict() for k, v in scheds.items()}, "epoch": epoch, "curve": curve,
                        **({"scaler": accel.scaler.state_dict()} if accel.scaler else {})},
                       Path(ckpt) / "delta.pt")
        if cfg["verbose"] and rank == 0:
            print(f"[delta {cfg['member_id']}] epoch {epoch}: " +
                  " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("loss")))
        if report is not None:
            report(metrics, ckpt)
    if rank != 0:
        return None
    fit = {"fit_split": cfg["fit_split"], "epochs": epochs, "lam": cfg["lams"]["ggd"], "lams": cfg["lams"],
           "lr": float(cfg["lr"]),
           "beta": float(cfg["beta"]), "fit_slices": int(len(all_rows)), "heldout_slices": int(len(held)),
           "curve": curve, **{f"final_{k}": v[-1] for k, v in curve.items() if v}}
    summary = score_member(cfg, cache, frozen, nets, device, gen, accel, fit=fit)
    summary.update({k: v for k, v in fit.items() if k.startswith("final_")})
    if report is not None:
        report({"epoch": epochs, "scored": 1, **summary}, None)
    return summary


def compact_optimizer_state(state: dict) -> dict:
    """An optimizer state dict with its floating-point per-parameter buffers in bfloat16.

    Adam's two moments are twice the weights: in fp32 they made δ's resume checkpoint three times
    its net (144 MB of 192 at demo size). A resume needs them (a fresh Adam would restart its step
    sizes), but not to the last bit: bfloat16 keeps fp32's exponent range, so tiny second moments
    survive, and ``Optimizer.load_state_dict`` casts them back to the parameters' fp32. A resumed fit
    therefore follows the uninterrupted one to about 3 significant digits of the moments, not
    bit for bit. The weights stay fp32.
    """
    out = {"param_groups": state["param_groups"], "state": {}}
    for i, st in state["state"].items():
        out["state"][i] = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and v.ndim > 0
                               else v) for k, v in st.items()}
    return out


def fit_rows(cache: SliceCache, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(rows δ trains on, rows held out to record its convergence) of the source's ``fit_split``.

    The held-out part is whole cases (``holdout`` of them, at least one when the split has two or
    more), chosen with ``seed``; it is never trained on.
    """
    split, source = cfg["fit_split"], cfg["source"]
    # the pool's own split of the source's training cases (segment.train_val_rows: val_fraction,
    # split_seed): "train" is what the member trained on, "val" its validation cases
    train, val = train_val_rows(cache, cfg)
    rows = train if split == "train" else val
    if not len(rows):
        raise ValueError(f"uncertainty.fit_split: {split!r}, but the source site {source!r} has no {split!r} cases "
                         f"in cache {cache.path} (data.val_fraction = {cfg.get('val_fraction')}); use fit_split: "
                         f"train, or give the source a validation split (data.val_fraction, e.g. 0.1)")
    frac = float(cfg["holdout"])
    cases = cache.index["case_id"].to_numpy()[rows].astype(str)
    uniq = np.unique(cases)
    n_held = min(len(uniq) - 1, max(1, round(frac * len(uniq)))) if frac > 0 and len(uniq) >= 2 else 0
    if not n_held:
        return rows, rows[:0]
    held_cases = np.random.default_rng(int(cfg["seed"])).choice(uniq, n_held, replace=False)
    held = np.isin(cases, held_cases)
    return rows[~held], rows[held]


@torch.inference_mode()
def heldout_metrics(net: nn.Module, images: np.ndarray, y: torch.Tensor, yhat: torch.Tensor, lam: float,
                    device: torch.device, accel: Accel) -> dict[str, float]:
    """δ's convergence on held-out slices: its loss, Dice(μ > 0.5, ŷ) (has μ learnt to follow the
    frozen prediction?) and Dice(μ > 0.5, y), the Dice over all held-out pixels (1.0 when both are empty)."""
    mu = []
    loss, n = 0.0, 0
    net.eval()
    for i in range(0, len(images), 64):
        x = accel.images(torch.from_numpy(images[i:i + 64]))
        yh = yhat[i:i + 64, None].to(device).float()
        with accel.autocast():
            m, a, b = net(x, accel.images(yh))
        loss += float(delta_loss(y[i:i + 64, None].to(device), yh, m, a, b, lam)) * len(x)
        n += len(x)
        mu.append((m[:, 0] > 0.5).cpu())
    mu_b = torch.cat(mu)

    def dice(a: torch.Tensor, b: torch.Tensor) -> float:
        den = int(a.sum() + b.sum())
        return 1.0 if den == 0 else 2.0 * int((a & b).sum()) / den
    return {"heldout_loss_ggd": loss / max(n, 1), "heldout_dice_mu_yhat": dice(mu_b, yhat.bool()),
            "heldout_dice_mu_y": dice(mu_b, y.bool())}


def _finite_step(loss: torch.Tensor, opt: torch.optim.Optimizer, net: nn.Module) -> None:
    """A step whose non-finite gradient entries count as 0 (no host synchronisation).

    For the nets that see ŷ only (BayesCap, ``ggd_yhat_only``): a batch where the member predicted
    nothing is a constant input, every activation is then constant over the batch and the image
    (replicate padding keeps it so), and the backward pass of the ResNet body's BatchNorms gave NaN
    gradients on the demo's data. Zeroing them skips what that batch cannot teach (as a grad scaler
    skips an overflowing step) instead of poisoning the weights.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p in net.parameters():
        if p.grad is not None:
            p.grad.nan_to_num_(0.0, 0.0, 0.0)
    opt.step()


def _unwrap(net: nn.Module) -> nn.Module:
    return getattr(net, "module", net)  # DDP keeps the net in .module


def delta_epoch(nets: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], data, perm: torch.Tensor,
                bs: int, accel: Accel, lam: float | dict[str, float], bayescap_t: tuple[float, float] = (1.0, 5e-2)
                ) -> tuple[dict[str, torch.Tensor], int]:
    """One pass of every δ net over ``data`` (``x``, ``y``, ``yh``) in ``perm`` order; returns the summed
    losses (device tensors) and the step count. No host synchronisation per step; the bench and the
    GPU check time this function."""
    sums = {k: torch.zeros((), device=accel.device) for k in nets}
    steps = 0
    for net in nets.values():
        net.train()
    for batch in data.batches(perm, bs):
        x = accel.images(batch["x"])
        y = union(batch["y"].to(accel.device, non_blocking=True)).float()[:, None]
        yh = accel.images(batch["yh"].to(accel.device, non_blocking=True)[:, None])
        for k, net in nets.items():
            with accel.autocast():
                out = net(x, yh)
            inner = _unwrap(net)
            if isinstance(inner, BayesCapNet):
                loss = bayescap_loss(y, yh, *out, *bayescap_t)
            else:
                # fp32: the heads leave autocast in fp32; λ per net when λ is swept
                loss = delta_loss(y, yh, *out, lam=lam[k] if isinstance(lam, dict) else lam)
            if accel.scaler is None and not getattr(inner, "use_image", False):
                _finite_step(loss, opts[k], net)
            else:
                accel.step(loss, opts[k])
            sums[k] += loss.detach()
        steps += 1
    return sums, steps


def score_member(cfg: dict, cache: SliceCache, frozen: nn.Module, nets: dict[str, DeltaNet],
                 device: torch.device, gen: torch.Generator, accel: Accel | None = None,
                 fit: dict | None = None) -> dict:
    """Score every site with δ and the baselines; write the member's uncertainty records and examples.

    Per slice: the Otsu area, its intersection with the error mask, the area above the member's
    source threshold, the map's mean and spread (``records.UNCERTAINTY_COLUMNS``); per site: the
    map's AUROC and AP for the error pixels (``records.UNCERTAINTY_SITE_COLUMNS``); ``fit``: the δ
    fit's record (``records.write_uncertainty_fit``). The slice part is written last: it is the
    trial's done marker.
    """
    exp = Path(cfg["experiment_dir"])
    frames, site_rows, summary, example = [], [], {}, None
    prompted = bool(getattr(frozen, "prompted", False))
    thresholds: dict[str, float] = {}  # per method, fitted on the source split (eval_sets gives it first)
    for site, role, rows in eval_sets(cache, cfg):
        images = cache.images[rows]
        truth = union(torch.from_numpy(np.asarray(cache.masks[rows]))).bool()
        pred = union(frozen_predict(frozen, cache, rows, device, accel))
        error = (pred != truth).numpy()
        idx = cache.index.iloc[rows]
        maps: dict[str, np.ndarray] = {}
        mu_ggd = None
        for name, net in nets.items():
            mu, unc = delta_maps(net, images, pred, device, accel=accel)
            maps[name] = unc
            if name == "ggd":
                mu_ggd = mu
        if role in cfg["baseline_roles"]:
            n = int(cfg["passes"])
            prompts = truth.numpy() if prompted else None  # MedSAM: the ground-truth boxes, as in the pool
            if "tta_noise" in cfg["baselines"]:
                maps["tta_noise"] = tta_noise_map(frozen, images, device, n, float(cfg["noise_std"]), gen, prompts)
            if "tta_color" in cfg["baselines"]:
                maps["tta_color"] = tta_color_map(frozen, images, device, n, float(cfg["jitter"]), gen, prompts)
            if "mc_dropout" in cfg["baselines"] and prompted:
                from .medsam import mc_dropout_map as prompted_mc_dropout_map

                maps["mc_dropout"] = prompted_mc_dropout_map(frozen, cache, rows, device, n, float(cfg["dropout"]), gen)
            elif "mc_dropout" in cfg["baselines"]:
                maps["mc_dropout"] = mc_dropout_map(frozen, images, device, n, float(cfg["dropout"]), gen)
        for method, m in maps.items():
            if role == "id":
                thresholds[method] = source_threshold(m)
            cols = slice_columns(m, error, thresholds.get(method))
            frames.append(pd.DataFrame({
                "member_id": cfg["member_id"], "method": method, "site": site, "role": role,
                "case_id": idx["case_id"].to_numpy(), "slice_idx": idx["slice_idx"].to_numpy(),
                "area_px": int(pred[0].numel()), **cols}))
            auroc, ap = error_ranking(m, error)
            site_rows.append({"member_id": cfg["member_id"], "method": method, "site": site, "role": role,
                              "prompted": prompted, "auroc": auroc, "ap": ap, "error_px": int(error.sum()),
                              "area_px": int(error.size), "source_threshold": thresholds.get(method, math.nan)})
            summary[f"ua_{method}_{site}"] = float(np.mean(cols["uncertain_px"] / pred[0].numel()))
            summary[f"auroc_{method}_{site}"] = auroc
        if role == "ood":  # the last target (the spec lists them by increasing shift, usually) for Fig. 6
            fg = np.flatnonzero(truth.reshape(len(truth), -1).any(1).numpy())
            pick = fg[np.linspace(0, len(fg) - 1, min(int(cfg["n_examples"]), len(fg))).astype(int)] if len(fg) \
                else np.arange(min(int(cfg["n_examples"]), len(rows)))
            example = dict(image=np.asarray(images[pick][:, 0], dtype=np.float32), truth=truth.numpy()[pick],
                           pred=pred.numpy()[pick], error=error[pick], mu=mu_ggd[pick],
                           uncertainty=maps["ggd"][pick], site=np.asarray([site] * len(pick)),
                           case_id=idx["case_id"].to_numpy()[pick].astype(str),
                           slice_idx=idx["slice_idx"].to_numpy()[pick])
    records.write_uncertainty_sites(exp, cfg["member_id"], pd.DataFrame(site_rows))
    if fit is not None:
        records.write_uncertainty_fit(exp, cfg["member_id"], fit)
    if example is not None:
        path = records.records_dir(exp) / "uncertainty" / "examples" / f"{cfg['member_id']}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez_compressed(tmp, **example)
        os.replace(tmp, path)
    records.write_uncertainty_part(exp, cfg["member_id"], pd.concat(frames, ignore_index=True))
    return summary
