"""TransUNet: logits at input resolution for several sizes, the size rule, explicit weights only."""
from __future__ import annotations

import pytest
import torch

from trainables.models import build_model, get_model_spec


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("transunet_tiny", in_channels=1, classes=2).eval()


@pytest.mark.parametrize("size", [64, 96, 128])
def test_output_shape_at_input_resolution(tiny, size):
    with torch.no_grad():
        y = tiny(torch.randn(2, 1, size, size))
    assert y.shape == (2, 2, size, size)


def test_non_square_and_three_channel_inputs():
    model = build_model("transunet_tiny", in_channels=3, classes=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 112)).shape == (1, 1, 64, 112)


def test_sizes_not_multiple_of_16_are_refused(tiny):
    assert get_model_spec("transunet").size_multiple == 16
    with pytest.raises(ValueError, match=r"multiples of 16.*got 72x72.*data.image_size"):
        tiny(torch.randn(1, 1, 72, 72))


def test_full_model_is_r50_vit_b16():
    model = build_model("transunet")
    enc = model.encoder
    assert len(enc.blocks) == 12 and enc.embed_dim == 768
    assert [len(s.blocks) for s in enc.patch_embed.backbone.stages] == [3, 4, 9]  # ResNet-50's first 3 stages
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 110e6  # TransUNet's 105M


def test_only_explicit_imagenet_weights():
    with pytest.raises(ValueError, match="encoder_weights must be None.*'imagenet'"):
        build_model("transunet_tiny", encoder_weights="ssl")
