"""What the prompted (SAM-family) loop calls on a model: the ``PromptedModel`` protocol.

``trainables.sam.loop`` (training), ``scoring`` (ŷ, per-slice counts, MC dropout), ``frozen`` (a member's
checkpoint) and ``embeddings`` (the frozen-encoder cache) use only these members, so another SAM-family
model (SAM-Med2D, SAM 2's image predictor, a MedSAM checkpoint of another size) can be trained and scored
by the same loop if it provides them. The built-in ``MedSAM`` (variants ``vit_b``/``vit_l``/``vit_h``,
``tiny`` and ``lite``: the architectures ``medsam``, ``medsam_tiny``, ``medsam_lite``) implements it
(``isinstance(model, PromptedModel)``; ``tests/test_open_models.py``).

The contract, for an image batch of ``B x C x H x W`` slices in [0, 1] and one XYXY box per slice in the
slice's pixel coordinates:

* ``embed(images, batch_size)`` -> ``B x D x h x w`` image embeddings of the **frozen** image encoder
  (cached once per slice cache and ``encoder_key()``; never trained);
* ``decode(embeddings, boxes, image_hw)`` -> ``B x 1 x h' x w'`` low-resolution mask logits, one box per
  embedding (the trainable part runs here);
* ``decode_parts(embeddings, boxes, image_hw)`` -> ``(features B x F x h' x w', weights B x F)`` whose
  product over F is ``decode``'s output (MC dropout drops channels of ``features``; ``parts_channels`` = F);
* ``upsample(low_res, image_hw)`` -> logits at the slices' resolution;
* ``decoder``: the module that trains (its ``state_dict`` is the member's checkpoint); ``frozen_parts()``:
  the modules that never train (kept in eval mode, ``requires_grad`` False), the image encoder first;
* ``encoder_key()``: a string naming the frozen encoder's weights (it keys the embedding cache);
  ``img_size``: the encoder's input size; ``box_mode``: ``"mask"`` (one box per slice) or
  ``"components"`` (one per connected component, merged by union); ``prompted``: True.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class PromptedModel(Protocol):
    """A box-prompted segmentation model with a frozen image encoder (see the module's contract)."""

    prompted: bool
    box_mode: str

    @property
    def img_size(self) -> int: ...

    @property
    def decoder(self) -> nn.Module: ...

    @property
    def parts_channels(self) -> int: ...

    def frozen_parts(self) -> tuple[nn.Module, ...]: ...

    def encoder_key(self) -> str: ...

    def embed(self, images, batch_size: int = 8) -> torch.Tensor: ...

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor: ...

    def decode_parts(self, embeddings: torch.Tensor, boxes: torch.Tensor,
                     image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def upsample(self, low_res: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor: ...
