"""Scoring a MedSAM with oracle box prompts: merged logits, predictions, per-slice counts (see
``trainables.sam``)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..data.cache import SliceCache
from ..metrics import confusion_counts
from .modeling import MedSAM
from .prompts import slice_prompts

#: The merged logit of a slice without a box prompt: predicted empty, probability ~0.
NO_BOX_LOGIT = -100.0


@torch.no_grad()
def prompted_logits(model: MedSAM, embeddings: np.ndarray | torch.Tensor, masks: np.ndarray,
                    device: torch.device, mode: str = "mask", batch_size: int = 64,
                    rows: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Oracle-box logits: (``N x H x W`` float on the CPU, ``N`` boxes per slice).

    Each slice is prompted with the ground-truth box(es) of ``masks`` (no jitter); several boxes of a
    slice are merged by their maximum logit (so thresholding gives the union of their masks); a slice
    without foreground has no box and gets ``NO_BOX_LOGIT`` everywhere (predicted empty).
    ``embeddings[rows[i]]`` is slice i's embedding (``rows`` None: ``embeddings[i]``); only the
    batch's rows are read from a memory-mapped cache.
    """
    model.eval()
    masks = np.asarray(masks)
    hw = tuple(masks.shape[-2:])
    pos, boxes, _ = slice_prompts(masks, mode)
    merged = torch.full((len(masks), *hw), NO_BOX_LOGIT)
    for i in range(0, len(pos), batch_size):
        p = torch.from_numpy(pos[i:i + batch_size])
        r = p.numpy() if rows is None else np.asarray(rows)[p.numpy()]
        if isinstance(embeddings, torch.Tensor):
            emb = embeddings[torch.from_numpy(r).to(embeddings.device)].to(device, torch.float32)
        else:
            emb = torch.from_numpy(np.asarray(embeddings[r], dtype=np.float32)).to(device)
        logits = model.upsample(model.decode(emb, torch.from_numpy(boxes[i:i + batch_size]), hw), hw)[:, 0]
        flat = logits.reshape(len(p), -1).float().cpu()
        merged.view(len(masks), -1).scatter_reduce_(0, p[:, None].expand_as(flat), flat, "amax", include_self=False)
    return merged, np.bincount(pos, minlength=len(masks))


def predict_prompted(model: MedSAM, embeddings: np.ndarray | torch.Tensor, masks: np.ndarray, device: torch.device,
                     mode: str = "mask", batch_size: int = 64,
                     rows: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Oracle-box predictions: (``N x H x W`` bool masks, ``N`` boxes per slice); see ``prompted_logits``."""
    logits, n_boxes = prompted_logits(model, embeddings, masks, device, mode, batch_size, rows)
    return logits > 0, n_boxes


def evaluate_prompted(model: MedSAM, cache: SliceCache, embeddings: np.ndarray, sets, device: torch.device,
                      mode: str, batch_size: int) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """``segment.evaluate`` for MedSAM: per-slice counts (plus ``n_boxes``) and predicted masks per site."""
    frames, preds = [], {}
    for site, role, rows in sets:
        truth = np.asarray(cache.masks[rows])
        pred, n_boxes = predict_prompted(model, embeddings, truth, device, mode, batch_size, rows)
        counts = confusion_counts(pred, torch.from_numpy(truth).bool()).numpy()
        idx = cache.index.iloc[rows]
        frames.append(pd.DataFrame({
            "site": site, "role": role, "case_id": idx["case_id"].to_numpy(),
            "slice_idx": idx["slice_idx"].to_numpy(), "tp": counts[:, 0], "fp": counts[:, 1],
            "fn": counts[:, 2], "tn": counts[:, 3], "area_px": pred[0].numel(), "n_boxes": n_boxes}))
        if role != "val":  # the validation split is scored, not stored (segment.evaluate)
            preds[site] = pred
    return pd.concat(frames, ignore_index=True), preds
