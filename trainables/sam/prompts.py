"""Box prompts: ground-truth boxes from masks and MedSAM's box jitter (see ``trainables.sam``)."""
from __future__ import annotations

import numpy as np
import torch


def mask_boxes(mask: np.ndarray, mode: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth box prompts of one slice, and the target mask of each box.

    Args:
        mask: ``H x W`` (binary) or ``L x H x W`` (one channel per label, e.g. lesion types).
        mode: ``"mask"``: one tight box around each label's foreground; ``"components"``: one box per
            connected component (8-connectivity) of each label (fundus lesions).

    Returns:
        (``K x 4`` int64 XYXY boxes, inclusive pixel indices; ``K x H x W`` bool targets); K = 0 for
        a slice without foreground. The union of the targets is the merged mask.
    """
    if mode not in ("mask", "components"):
        raise ValueError(f"box_mode must be 'mask' or 'components', got {mode!r}")
    m = np.asarray(mask) > 0
    labels = m[None] if m.ndim == 2 else m
    boxes, targets = [], []
    for lab in labels:
        if not lab.any():
            continue
        if mode == "mask":
            parts = [lab]
        else:
            from scipy import ndimage

            comp, n = ndimage.label(lab, structure=np.ones((3, 3), dtype=bool))
            parts = [comp == i for i in range(1, n + 1)]
        for p in parts:
            ys, xs = np.nonzero(p)
            boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))
            targets.append(p)
    hw = labels.shape[-2:]
    if not boxes:
        return np.zeros((0, 4), dtype=np.int64), np.zeros((0, *hw), dtype=bool)
    return np.asarray(boxes, dtype=np.int64), np.stack(targets)


def jitter_boxes(boxes: torch.Tensor, image_hw: tuple[int, int], shift_at_256: float = 20.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Enlarge each side of each box outward by a uniform integer in [0, shift] px, clipped to the image.

    ``shift = round(shift_at_256 * max(H, W) / 256)``: MedSAM's 0-20 px rule, stated for 256-px images.
    """
    h, w = image_hw
    shift = int(round(float(shift_at_256) * max(h, w) / 256.0))
    d = torch.randint(0, shift + 1, boxes.shape, generator=generator)
    out = boxes.to(torch.int64) + d * torch.tensor([-1, -1, 1, 1])
    lo = torch.zeros(4, dtype=torch.int64)
    hi = torch.tensor([w - 1, h - 1, w - 1, h - 1])
    return torch.maximum(torch.minimum(out, hi), lo)


def slice_prompts(masks: np.ndarray, mode: str = "mask") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box prompts of many slices: (slice position ``P``, boxes ``P x 4``, targets ``P x H x W`` bool)."""
    pos, boxes, targets = [], [], []
    for i, m in enumerate(masks):
        b, t = mask_boxes(m, mode)
        pos += [i] * len(b)
        boxes.append(b)
        targets.append(t)
    hw = np.asarray(masks).shape[-2:]
    return (np.asarray(pos, dtype=np.int64), np.concatenate(boxes) if boxes else np.zeros((0, 4), np.int64),
            np.concatenate(targets) if targets else np.zeros((0, *hw), bool))
