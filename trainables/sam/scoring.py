"""Scoring a MedSAM with oracle box prompts: merged logits, predictions, per-slice counts (see
``trainables.sam``)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

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
        emb = _prompt_embeddings(embeddings, p.numpy(), rows, device)
        logits = model.upsample(model.decode(emb, torch.from_numpy(boxes[i:i + batch_size]), hw), hw)[:, 0]
        _merge_max(merged, p, logits)
    return merged, np.bincount(pos, minlength=len(masks))


def _prompt_embeddings(embeddings: np.ndarray | torch.Tensor, pos: np.ndarray, rows: np.ndarray | None,
                       device: torch.device) -> torch.Tensor:
    """The embeddings of the slices at positions ``pos`` (one per prompt), as float32 on ``device``."""
    r = pos if rows is None else np.asarray(rows)[pos]
    if isinstance(embeddings, torch.Tensor):
        return embeddings[torch.from_numpy(r).to(embeddings.device)].to(device, torch.float32)
    return torch.from_numpy(np.asarray(embeddings[r], dtype=np.float32)).to(device)


def _merge_max(merged: torch.Tensor, pos: torch.Tensor, logits: torch.Tensor) -> None:
    """Fold prompts' ``P x H x W`` logits into their slices' rows of ``merged`` by their maximum."""
    flat = logits.reshape(len(pos), -1).float().cpu()
    merged.view(len(merged), -1).scatter_reduce_(0, pos[:, None].expand_as(flat), flat, "amax", include_self=False)


@torch.no_grad()
def prompted_dropout_variance(model: MedSAM, embeddings: np.ndarray | torch.Tensor, masks: np.ndarray,
                              device: torch.device, passes: int, p: float, seed: int, batch_size: int = 64,
                              rows: np.ndarray | None = None) -> np.ndarray:
    """MC dropout on the upscaled features: ``N x H x W`` variance over ``passes`` of σ(merged logit).

    The same numbers as running ``prompted_logits`` ``passes`` times with ``F.dropout2d(p)`` hooked on
    ``mask_decoder.output_upscaling`` under ``torch.manual_seed(seed)`` (``tests/test_medsam.py`` checks
    it), at the cost of one decoder pass: channel dropout there scales the channels of the product
    ``hyper · upscaled`` that ends the decoder, so ``MedSAM.decode_parts`` runs the transformer once per
    prompt and each pass is only that product with the channels' keep-masks. The masks are drawn first,
    pass by pass and batch by batch, as the hooked decoder under ``vmap(randomness="different")`` draws
    them (one ``1 x C x 1 x 1`` mask per prompt).
    """
    model.eval()
    masks = np.asarray(masks)
    hw = tuple(masks.shape[-2:])
    pos, boxes, _ = slice_prompts(masks, model.box_mode)
    starts = range(0, len(pos), batch_size)
    channels = model.parts_channels  # decode_parts' feature channels (SAM: output_upscaling's)
    drop = torch.func.vmap(lambda u: F.dropout2d(u, p, training=True), randomness="different")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout draws from the global RNG; keep the run reproducible
        keep = [[drop(torch.ones(len(pos[i:i + batch_size]), 1, channels, 1, 1, device=device))[:, 0, :, 0, 0]
                 for i in starts] for _ in range(passes)]
    merged = torch.full((passes, len(masks), *hw), NO_BOX_LOGIT)
    for b, i in enumerate(starts):
        at = torch.from_numpy(pos[i:i + batch_size])
        emb = _prompt_embeddings(embeddings, at.numpy(), rows, device)
        upscaled, hyper = model.decode_parts(emb, torch.from_numpy(boxes[i:i + batch_size]), hw)
        for k in range(passes):
            low = torch.einsum("pc,pchw->phw", hyper * keep[k][b], upscaled)[:, None]
            _merge_max(merged[k], at, model.upsample(low, hw)[:, 0])
    return torch.sigmoid(merged).var(dim=0, unbiased=False).numpy()


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
