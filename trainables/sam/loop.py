"""The prompted training loop: SAM's mask decoder trained from cached embeddings on jittered
ground-truth boxes (paper §2.2; see ``trainables.sam``)."""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import records
from ..accel import choose_placement, resolve_device
from ..data.cache import open_slice_cache
from ..member import (STATE_FILE, ReportFn, end_epoch, epoch_sets, eval_sets, load_state, run_name, save_state,
                      summarize, train_val_rows, val_set, write_member)
from .embeddings import embeddings_root, ensure_embeddings, sweep_rows
from .frozen import member_state
from .modeling import MedSAM
from .options import amp_dtype, build_member_model, resolve_config
from .prompts import jitter_boxes, slice_prompts
from .scoring import evaluate_prompted


def decoder_step(model: MedSAM, opt: torch.optim.Optimizer, loss_fn: nn.Module, emb: torch.Tensor,
                 boxes: torch.Tensor, targets: torch.Tensor, image_hw: tuple[int, int],
                 amp: torch.dtype | None = None) -> torch.Tensor:
    """One optimisation step of the mask decoder; returns the (detached) loss.

    ``emb``: ``B x D x h x w`` float embeddings; ``boxes``: ``B x 4`` (already jittered) in the
    ``image_hw`` slices' coordinates; ``targets``: ``B x 1 x H x W`` float masks. Training, the
    bench and the GPU check all time this function.
    """
    ctx = torch.autocast(emb.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        logits = model.upsample(model.decode(emb, boxes, image_hw), image_hw)
    loss = loss_fn(logits.float(), targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_medsam(config: dict, report: ReportFn | None = None) -> list[dict]:
    """``train_segmenter`` for box-prompted models: train the mask decoder from cached embeddings.

    Same config (plus ``MEDSAM_DEFAULTS``), reports and records as ``train_segmenter``; the
    slice records gain ``n_boxes`` and each member ``unprompted_slices`` (eval slices without a box).
    """
    from monai.losses import DiceCELoss

    cfg = resolve_config(config)
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    device = resolve_device(cfg["device"])
    rng = torch.Generator().manual_seed(int(cfg["seed"]))
    exp = Path(cfg["experiment_dir"])
    cache = open_slice_cache(cfg["cache"])
    model = build_member_model(cfg, in_channels=int(cache.images.shape[1])).to(device)
    model.box_mode = cfg["box_mode"]
    t0 = time.perf_counter()
    # embeddings_ready: the driver's pre-stage computed them (sweeps.embeddings): read only, never compute
    embeddings, computed = ensure_embeddings(model, cache, embeddings_root(cache, cfg["embedding_dir"]), device,
                                             int(cfg["embed_batch_size"]), compute=not cfg["embeddings_ready"],
                                             rows=sweep_rows(cache, cfg))
    embed_s = time.perf_counter() - t0

    train_rows = train_val_rows(cache, cfg)[0]
    hw = tuple(cache.masks.shape[-2:])
    pos, boxes, targets = slice_prompts(np.asarray(cache.masks[train_rows]), cfg["box_mode"])
    if len(pos) == 0:
        raise ValueError(f"train_medsam: no slice of {cfg['source']}'s training split in {cache.path} has "
                         f"foreground, so there is no box prompt to train on")
    skipped_train = int(len(train_rows) - len(np.unique(pos)))
    # The training split's embeddings (float16) and targets are read once and kept on the device, not
    # read from the memmap every step (ViT-B: 2 MiB a slice), when they fit the trial's share
    # (trainables.accel.choose_placement, as for the other architectures); otherwise they stay on the
    # host and each batch is copied over.
    used = np.unique(pos)  # only the training slices with a box (the cache holds no others' embeddings)
    emb_train = torch.from_numpy(np.asarray(embeddings[train_rows[used]]))
    pos = np.searchsorted(used, pos)  # box -> its slice's row in emb_train
    targets_t = torch.from_numpy(targets)
    placement, why = choose_placement(emb_train.nbytes + targets_t.nbytes, device, cfg["gpu_share"],
                                      cfg["data_placement"], "train_medsam")
    if placement == "device":
        emb_train, targets_t = emb_train.to(device), targets_t.to(device)
    boxes_t = torch.from_numpy(boxes)
    pos_t = torch.from_numpy(pos)
    sets = eval_sets(cache, cfg) + val_set(cache, cfg)

    decoder = model.sam.mask_decoder
    amp = amp_dtype(cfg["amp"], device)
    loss_fn = DiceCELoss(sigmoid=True)
    opt = torch.optim.Adam(decoder.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    start_epoch = 0
    if cfg["resume_from"]:
        state = load_state(cfg["resume_from"], device)
        decoder.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        for _ in range(start_epoch):  # the same shuffling and jitter stream as an uninterrupted run
            perm = torch.randperm(len(pos), generator=rng)
            for i in range(0, len(perm), int(cfg["batch_size"])):
                jitter_boxes(boxes_t[perm[i:i + int(cfg["batch_size"])]], hw, cfg["box_shift"], rng)

    run_id = run_name(cfg["arch"], float(cfg["lr"]), int(cfg["seed"]), max(cfg["snapshots"]))
    records.log_attempt(exp, "pool", run_id, start_epoch)
    if cfg["verbose"]:
        print(f"[{run_id}] embeddings {'computed' if computed else 'cached'} in {embed_s:.1f}s, "
              f"{'on ' + str(device) if placement == 'device' else 'on the host'} ({why}); "
              f"{len(pos)} box prompts from {len(train_rows) - skipped_train} training slices "
              f"({skipped_train} without foreground skipped)")
    members: list[dict] = []
    bs = int(cfg["batch_size"])
    for epoch in range(start_epoch + 1, max(cfg["snapshots"]) + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(pos), generator=rng)
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        for i in range(0, len(perm), bs):
            b = perm[i:i + bs]
            box = jitter_boxes(boxes_t[b], hw, cfg["box_shift"], rng)
            emb = emb_train[pos_t[b].to(emb_train.device)].to(device, torch.float32, non_blocking=True)
            target = targets_t[b.to(targets_t.device)][:, None].to(device, torch.float32, non_blocking=True)
            loss_sum += decoder_step(model, opt, loss_fn, emb, box, target, hw, amp)
            n_steps += 1
        train_s = time.perf_counter() - t0
        slices, preds = evaluate_prompted(model, cache, embeddings, epoch_sets(cfg, sets, epoch), device,
                                          cfg["box_mode"],
                                          int(cfg["eval_batch_size"]))
        metrics = {"epoch": epoch, "train_loss": float(loss_sum) / max(n_steps, 1), **summarize(slices),
                   "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0 - train_s,
                   "embed_seconds": embed_s if epoch == start_epoch + 1 else 0.0}
        ckpt_dir = None
        if epoch in cfg["snapshots"]:
            unprompted = int((slices["n_boxes"] == 0).sum())
            member = write_member(exp, cfg, run_id, epoch, model, slices, preds, cache, sets,
                                           state=member_state(model, cfg, epoch),
                                           extra={"prompt": "ground-truth box (oracle), no jitter",
                                                  "unprompted_slices": unprompted,
                                                  "skipped_train_slices": skipped_train})
            members.append(member)
            metrics["member_id"] = member["member_id"]
            if report is not None:  # the reporter owns (and removes) this folder
                ckpt_dir = tempfile.mkdtemp(prefix="ckpt-", dir=records.scratch_dir(exp))
                save_state(Path(ckpt_dir) / STATE_FILE, {"model": decoder.state_dict(), "optimizer": opt.state_dict(),
                                                         "epoch": epoch, "arch": cfg["arch"]})
        end_epoch(cfg, run_id, metrics, report, ckpt_dir)
    return members
