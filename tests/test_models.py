"""One shared test body over every registered model: forward, backward, output shape."""
from __future__ import annotations

import pytest
import torch

from trainables.models import MODELS, build_model, get_model_spec


@pytest.mark.parametrize("name", [n for n, spec in MODELS.items() if not spec.prompted])
def test_registered_model(name):
    """Box-prompted models (MedSAM) take boxes too: tests/test_medsam.py covers them."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, classes=1)
    x = torch.randn(2, 1, 64, 64)
    y = model(x)
    assert y.shape == (2, 1, 64, 64)  # logits at input resolution
    assert y.min() < 0 < y.max()      # logits, not probabilities
    y.mean().backward()
    for part in (model.decoder, model.segmentation_head):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in part.parameters())
    # encoders may carry layers the segmentation features never use (EfficientNet's classifier head)
    params = list(model.parameters())
    with_grad = [p for p in params if p.grad is not None]
    assert len(with_grad) >= 0.95 * len(params)
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.parameters() if p.grad is not None)


def test_unknown_model_lists_valid_names():
    with pytest.raises(KeyError, match="unet_r18"):
        get_model_spec("unet_r1000")


def test_bn_momentum_applies_everywhere():
    model = build_model("unet_effb0", bn_momentum=0.1)
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
