"""A frozen MedSAM pool member: its checkpoint dict and reload, and what the uncertainty stage asks of
it (ŷ on cache rows, a forward pass on perturbed images, MC dropout), all with the pool's oracle boxes."""
from __future__ import annotations

import numpy as np
import torch

from ..config import MemberConfig
from ..data.cache import SliceCache
from ..models import resolve_model
from .build import build_medsam, file_sha256
from .embeddings import ensure_embeddings
from .modeling import MedSAM
from .scoring import NO_BOX_LOGIT, predict_prompted, prompted_dropout_variance, prompted_logits


def member_state(model: MedSAM, cfg: MemberConfig, epoch: int) -> dict:
    """A pool member's checkpoint: the trained decoder and where the frozen encoders come from (a user's
    box-prompted model: its definition, ``sam_checkpoint`` and seed, to call its builder again)."""
    spec = resolve_model(cfg.arch, cfg.model_defs)
    if spec.definition is not None:
        return {"model": model.decoder.state_dict(), "arch": cfg.arch, "model_def": spec.definition,
                "in_channels": int(model.oodsweep_in_channels), "epoch": epoch, "seed": cfg.seed,
                "sam_checkpoint": cfg.sam.sam_checkpoint, "box_mode": model.box_mode,
                "embedding_dir": cfg.sam.embedding_dir}
    return {"model": model.decoder.state_dict(), "arch": cfg.arch,
            "in_channels": model.source["in_channels"], "epoch": epoch, "sam": dict(model.source),
            "box_mode": model.box_mode, "embedding_dir": cfg.sam.embedding_dir}


def load_medsam_member(state: dict, device: str | torch.device = "cpu") -> MedSAM:
    """Rebuild a MedSAM member from ``member_state``'s dict (``trainables.segment.load_member`` calls this)."""
    if "model_def" in state:  # a user's box-prompted model: its builder again, then the trained decoder
        user = resolve_model(state["arch"], {state["arch"]: state["model_def"]}).factory(
            in_channels=int(state["in_channels"]), classes=1, sam_checkpoint=state.get("sam_checkpoint"),
            seed=int(state.get("seed", 0)), **state["model_def"]["kwargs"])
        user.decoder.load_state_dict(state["model"])
        user.box_mode = state.get("box_mode", "mask")
        user.embedding_dir = state.get("embedding_dir")
        return user.to(device).eval()
    src = state["sam"]
    ckpt = src.get("sam_checkpoint")
    if ckpt and src.get("sam_sha256") and file_sha256(ckpt) != src["sam_sha256"]:
        raise ValueError(f"the SAM checkpoint {ckpt} changed since this member was trained (sha256 differs); "
                         f"restore the original file")
    # medsam_lite with the bundled weights records sam_checkpoint None: rebuilt from the bundled file,
    # whose sha256 build_medsam checks
    model = build_medsam(in_channels=int(src["in_channels"]), variant=src["variant"], img_size=int(src["img_size"]),
                         sam_checkpoint=ckpt, init_seed=int(src["init_seed"]), quiet=True,
                         channels=src.get("channels"))
    model.decoder.load_state_dict(state["model"])
    model.box_mode = state.get("box_mode", "mask")
    #: where the pool found its embeddings (None: beside the slice cache), so later stages reuse them
    model.embedding_dir = state.get("embedding_dir")
    return model.to(device).eval()


@torch.no_grad()
def oracle_forward(model: MedSAM, images: torch.Tensor, masks: np.ndarray, mode: str | None = None) -> torch.Tensor:
    """``B x 1 x H x W`` logits of ``images`` (encoder run on them, no cache) prompted with ``masks``' boxes.

    For code that perturbs the images (test-time augmentation): the prompts stay the ground truth's.
    Only the images with foreground in ``masks`` are embedded (the others have no box: predicted empty).
    """
    masks = np.asarray(masks)
    fg = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
    if len(fg) == 0:
        return torch.full((len(images), 1, *masks.shape[-2:]), NO_BOX_LOGIT, device=images.device)
    emb = model.embed(images[torch.from_numpy(fg).to(images.device)])
    logits = torch.full((len(images), *masks.shape[-2:]), NO_BOX_LOGIT)
    fg_logits, _ = prompted_logits(model, emb, masks[fg], emb.device, mode or model.box_mode, batch_size=len(fg))
    logits[torch.from_numpy(fg)] = fg_logits
    return logits[:, None].to(images.device)


def prompted_mc_dropout_map(model: MedSAM, cache: SliceCache, rows: np.ndarray, device: torch.device, passes: int,
                   p: float, gen: torch.Generator, batch_size: int = 64) -> np.ndarray:
    """MC dropout for a frozen MedSAM member: ``N x H x W`` variance over ``passes`` of σ(merged logit).

    SAM's mask decoder ends in the product of the mask token's hypernetwork output with the upscaled
    image features (``mask_decoder.output_upscaling``'s output): those features are what enters the
    final layer, as the decoder features entering an smp model's ``segmentation_head`` are, so channel
    dropout (always on) is applied there (``scoring.prompted_dropout_variance``: the decoder runs once,
    each pass is the final product). The embeddings are the cached ones; prompts are the ground-truth boxes.
    """
    embeddings, _ = ensure_embeddings(model, cache, getattr(model, "embedding_dir", None), device=device, rows=rows)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return prompted_dropout_variance(model, embeddings, np.asarray(cache.masks[rows]), device, passes, p, seed,
                                     batch_size, rows)


def predict_member_rows(model: MedSAM, cache: SliceCache, rows: np.ndarray, device: torch.device,
                        batch_size: int = 64) -> torch.Tensor:
    """A frozen MedSAM member's ``N x H x W`` bool predictions on cache rows (oracle boxes, cached embeddings)."""
    embeddings, _ = ensure_embeddings(model, cache, getattr(model, "embedding_dir", None), device=device, rows=rows)
    return predict_prompted(model, embeddings, np.asarray(cache.masks[rows]), device, model.box_mode,
                            batch_size, rows)[0]
