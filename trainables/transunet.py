"""TransUNet (Chen et al., 2021): an R50-ViT-B/16 hybrid encoder and a cascaded upsampler
(docs/architecture.md "Models and data").

The encoder is ``timm``'s ``vit_base_r50_s16_224`` (a ResNetV2-50 with three stages whose 1/16
feature map is the ViT-B's patch grid, "patch size 1" on it), built with ``pretrained=False`` unless
ImageNet weights are asked for explicitly. The three CNN skip features TransUNet needs (1/2, 1/4
and 1/8 of the input) are captured with forward hooks on the ResNet's stem and first two stages,
so timm's modules run unmodified. ``dynamic_img_size=True`` lets timm interpolate the position
embedding to the input's patch grid, so one model takes any input whose sides are multiples of 16.

The decoder (no library ships TransUNet's "cascaded upsampler", so it is written here, after the
paper's Fig. 1 and its reference code): a 3x3 conv from the ViT's 768 channels to 512, then four
blocks each upsampling 2x (bilinear) and applying two 3x3 conv-BN-ReLU, the first three concatenated
with the skips at 1/8, 1/4 and 1/2 (512, 256, 64 channels); channels (256, 128, 64, 16); a 3x3 conv
head gives logits at input resolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: The ViT patch grid is the ResNet's 1/16 feature map.
SIZE_MULTIPLE = 16


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _UpBlock(nn.Module):
    """Upsample 2x, concatenate the skip (if any), two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(_ConvBNReLU(cin + cskip, cout), _ConvBNReLU(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class CascadedUpsampler(nn.Module):
    """TransUNet's decoder: ``B x 768 x H/16 x W/16`` tokens + skips -> ``B x 16 x H x W`` features."""

    def __init__(self, hidden: int = 768, skip_channels: tuple[int, int, int] = (512, 256, 64),
                 channels: tuple[int, int, int, int] = (256, 128, 64, 16)):
        super().__init__()
        self.conv_more = _ConvBNReLU(hidden, 512)
        cins = (512,) + channels[:-1]
        skips = tuple(skip_channels) + (0,)
        self.blocks = nn.ModuleList(_UpBlock(ci, cs, co) for ci, cs, co in zip(cins, skips, channels))

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x


class TransUNet(nn.Module):
    """``B x in_channels x H x W`` -> ``B x classes x H x W`` logits; H and W multiples of 16.

    Attributes ``encoder``, ``decoder`` and ``segmentation_head`` follow smp's names, so the pool's
    code that looks for them (MC dropout before the final layer) works unchanged.
    """

    def __init__(self, in_channels: int = 1, classes: int = 1, encoder_weights: str | None = None,
                 **vit: int):
        """``vit``: overrides of timm's ViT-B (``depth``, ``embed_dim``, ``num_heads``) for reduced variants."""
        super().__init__()
        from pathlib import Path

        local = isinstance(encoder_weights, Path) or (encoder_weights not in (None, "imagenet")
                                                      and Path(str(encoder_weights)).is_file())
        if encoder_weights not in (None, "imagenet") and not local:
            raise ValueError(f"transunet: encoder_weights must be None (random init), 'imagenet' "
                             f"(timm's ImageNet-21k/1k R50-ViT-B/16, downloaded) or a local timm "
                             f"vit_base_r50_s16_224 weights file, got {encoder_weights!r}")
        import timm  # heavy import kept out of module import

        # a local file goes through timm's own loader (pretrained_cfg_overlay file=...): the same
        # checkpoint filtering and in_chans adaptation as the download
        overlay = {"pretrained_cfg_overlay": {"file": str(encoder_weights)}} if local else {}
        self.encoder = timm.create_model("vit_base_r50_s16_224", pretrained=encoder_weights is not None,
                                         in_chans=in_channels, num_classes=0, global_pool="",
                                         class_token=False, dynamic_img_size=True, **overlay, **vit)
        backbone = self.encoder.patch_embed.backbone
        self._skips: dict[str, torch.Tensor] = {}
        # 1/2 (stem, before its max-pool), 1/4 and 1/8: timm's feature_info names these modules
        for name, module in (("s2", backbone.stem.norm), ("s4", backbone.stages[0]), ("s8", backbone.stages[1])):
            module.register_forward_hook(self._keep(name))
        hidden = self.encoder.embed_dim
        self.decoder = CascadedUpsampler(hidden)
        self.segmentation_head = nn.Conv2d(16, classes, 3, padding=1)

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            self._skips[name] = output
        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(f"transunet: input height and width must be multiples of {SIZE_MULTIPLE} (the ViT "
                             f"patch grid is 1/16 of the input), got {h}x{w}; resize the slice cache "
                             f"(data.image_size) to a multiple of {SIZE_MULTIPLE}")
        self._skips.clear()
        tokens = self.encoder.forward_features(x)  # B x (H/16 * W/16) x hidden, no class token
        skips = [self._skips.pop("s8"), self._skips.pop("s4"), self._skips.pop("s2")]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], -1, h // SIZE_MULTIPLE, w // SIZE_MULTIPLE)
        return self.segmentation_head(self.decoder(grid, skips))
