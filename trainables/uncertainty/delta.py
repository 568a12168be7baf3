"""δ({ŷ, x}), the paper's post-hoc uncertainty net, and its equations (paper §2.3, Eq. 5, 7, 8;
docs/architecture.md "Uncertainty").

``DeltaNet`` predicts a per-pixel generalized Gaussian GGD(μ, α, β) of the ground truth; ``delta_loss``
is its maximum-likelihood loss (Eq. 5 with the GGD of Eq. 7) and ``ggd_variance`` the per-pixel
uncertainty (Eq. 8). ``trainables.uncertainty`` fits it, ``trainables.uncertainty.scoring`` scores it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-3


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


def unwrap(net: nn.Module) -> nn.Module:
    return getattr(net, "module", net)  # DDP keeps the net in .module
