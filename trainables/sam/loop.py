"""The prompted training loop: SAM's mask decoder trained from cached embeddings on jittered
ground-truth boxes (paper §2.2; see ``trainables.sam``), as a ``trainables.runner.EpochLoop``. It takes a
``MemberConfig`` (``trainables.config``) whose ``sam`` field holds the ``SamOptions``."""
from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch
from torch import nn

from ..accel import Accel, accel_for, choose_placement, resolve_device
from ..config import MemberConfig
from ..data.cache import open_slice_cache
from ..member import PoolRun, ReportFn, epoch_sets, eval_sets, restore_state, summarize, train_val_rows, val_set
from ..runner import run_epochs
from .embeddings import embeddings_root, ensure_embeddings, sweep_rows
from .frozen import member_state
from .modeling import MedSAM
from .options import build_member_model
from .prompts import jitter_boxes, slice_prompts
from .scoring import evaluate_prompted


def decoder_step(model: MedSAM, opt: torch.optim.Optimizer, loss_fn: nn.Module, emb: torch.Tensor,
                 boxes: torch.Tensor, targets: torch.Tensor, image_hw: tuple[int, int],
                 amp: torch.dtype | None = None, accel: Accel | None = None) -> torch.Tensor:
    """One optimisation step of the mask decoder; returns the (detached) loss.

    ``emb``: ``B x D x h x w`` float embeddings; ``boxes``: ``B x 4`` (already jittered) in the
    ``image_hw`` slices' coordinates; ``targets``: ``B x 1 x H x W`` float masks. ``accel``: the run's
    precision and optimizer step (autocast, the fp16 gradient scaler), as the other loops; without it,
    ``amp`` autocast and a plain step (the benches). Training, the bench and the GPU check all time this
    function.
    """
    if accel is not None:
        ctx = accel.autocast()
    else:
        ctx = torch.autocast(emb.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        logits = model.upsample(model.decode(emb, boxes, image_hw), image_hw)
    loss = loss_fn(logits.float(), targets)
    if accel is not None:
        accel.step(loss, opt)
    else:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.detach()


def train_medsam(config: MemberConfig | dict, report: ReportFn | None = None) -> list[dict]:
    """``train_segmenter`` for box-prompted models: train the mask decoder from cached embeddings.

    Same config (a ``MemberConfig``, its ``sam`` options included; a dict is converted with
    ``MemberConfig.from_dict``), reports and records as ``train_segmenter``; the slice records gain
    ``n_boxes`` and each member ``unprompted_slices`` (eval slices without a box).
    """
    loop = PromptedLoop(config if isinstance(config, MemberConfig) else MemberConfig.from_dict(config))
    run_epochs(loop, loop.epochs, loop.exp, report, loop.cfg.resume_from, ("pool", loop.run_id))
    return loop.members


class PromptedLoop(PoolRun):
    """The prompted run as a ``trainables.runner.EpochLoop``: the frozen encoder's cached embeddings, one
    jittered ground-truth box per training sample, Adam on MONAI's Dice + cross-entropy for the decoder."""

    def __init__(self, cfg: MemberConfig):
        from monai.losses import DiceCELoss

        super().__init__(cfg)
        sam = cfg.sam
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = device = resolve_device(cfg.device)
        # channels_last stays off: the decoder runs vmapped on B x D x h x w embeddings, where it is not
        # measured; precision and the optimizer step are the other loops' (bf16 autocast on a GPU, fp16
        # with a gradient scaler on cards without bf16; fp32 on the CPU)
        self.accel = accel_for(dataclasses.replace(cfg.accel, channels_last=False), device)
        self.rng = torch.Generator().manual_seed(self.seed)  # the shuffling and box-jitter stream
        self.cache = cache = open_slice_cache(cfg.cache)
        if len(cache.labels) > 1:  # the driver refuses such a pool before launch (sweeps.user_models)
            raise ValueError(f"{cfg.arch}: a box-prompted model predicts one merged mask per box prompt, and slice "
                             f"cache {cache.path} has {len(cache.labels)} labels {cache.labels}; train it on one label")
        self.model = model = build_member_model(cfg.arch, sam, cfg.seed, int(cache.images.shape[1]), cfg.model_defs).to(device)
        model.box_mode = sam.box_mode
        t0 = time.perf_counter()
        # embeddings_ready: the driver's pre-stage computed them (sweeps.embeddings): read only, never compute
        self.embeddings, computed = ensure_embeddings(model, cache, embeddings_root(cache, sam.embedding_dir),
                                                      device, sam.embed_batch_size, compute=not sam.embeddings_ready,
                                                      rows=sweep_rows(cache, cfg.source, cfg.targets,
                                                                      cfg.target_split))
        self.embed_s = time.perf_counter() - t0

        train_rows = train_val_rows(cache, cfg.source, cfg.val_fraction, cfg.split_seed)[0]
        self.hw = tuple(cache.masks.shape[-2:])
        pos, boxes, targets = slice_prompts(np.asarray(cache.masks[train_rows]), sam.box_mode)
        if len(pos) == 0:
            raise ValueError(f"train_medsam: no slice of {cfg.source}'s training split in {cache.path} has "
                             f"foreground, so there is no box prompt to train on")
        self.skipped_train = skipped_train = int(len(train_rows) - len(np.unique(pos)))
        # The training split's embeddings (float16) and targets are read once and kept on the device, not
        # read from the memmap every step (ViT-B: 2 MiB a slice), when they fit the trial's share
        # (trainables.accel.choose_placement, as for the other architectures); otherwise they stay on the
        # host and each batch is copied over.
        used = np.unique(pos)  # only the training slices with a box (the cache holds no others' embeddings)
        emb_train = torch.from_numpy(np.asarray(self.embeddings[train_rows[used]]))
        pos = np.searchsorted(used, pos)  # box -> its slice's row in emb_train
        targets_t = torch.from_numpy(targets)
        placement, why = choose_placement(emb_train.nbytes + targets_t.nbytes, device, cfg.accel.gpu_share,
                                          cfg.accel.data_placement)
        if placement == "device":
            emb_train, targets_t = emb_train.to(device), targets_t.to(device)
        self.emb_train, self.targets_t = emb_train, targets_t
        self.boxes_t = torch.from_numpy(boxes)
        self.pos_t = torch.from_numpy(pos)
        self.sets = eval_sets(cache, cfg) + val_set(cache, cfg)

        self.decoder = model.decoder
        self.loss_fn = DiceCELoss(sigmoid=True)
        self.opt = torch.optim.Adam(self.decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    fused=device.type == "cuda" or None)
        self.first_epoch = True  # its metrics carry the embedding time
        if cfg.verbose:
            print(f"[{self.run_id}] {self.accel.describe()}; embeddings {'computed' if computed else 'cached'} in "
                  f"{self.embed_s:.1f}s, {'on ' + str(device) if placement == 'device' else 'on the host'} ({why}); "
                  f"{len(pos)} box prompts from {len(train_rows) - skipped_train} training slices "
                  f"({skipped_train} without foreground skipped)")

    def load_state(self, state: dict) -> int:
        return restore_state(self.decoder, self.opt, self.accel, state)

    def draw(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches in shuffled order, each with its jittered boxes (the shuffle, then each
        batch's jitter, from one generator: the order the steps use them)."""
        bs = self.cfg.batch_size
        perm = torch.randperm(len(self.pos_t), generator=self.rng)
        batches = [perm[i:i + bs] for i in range(0, len(perm), bs)]
        return [(b, jitter_boxes(self.boxes_t[b], self.hw, self.cfg.sam.box_shift, self.rng)) for b in batches]

    def train(self, epoch: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        self._t0 = time.perf_counter()
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for b, box in batches:
            emb = self.emb_train[self.pos_t[b].to(self.emb_train.device)].to(self.device, torch.float32,
                                                                            non_blocking=True)
            target = self.targets_t[b.to(self.targets_t.device)][:, None].to(self.device, torch.float32,
                                                                            non_blocking=True)
            loss_sum += decoder_step(self.model, self.opt, self.loss_fn, emb, box, target, self.hw, accel=self.accel)
        return {"epoch": epoch, "train_loss": float(loss_sum) / max(len(batches), 1),
                "train_seconds": time.perf_counter() - self._t0}

    def score(self, epoch: int, metrics: dict) -> dict:
        cfg = self.cfg
        slices, preds = evaluate_prompted(self.model, self.cache, self.embeddings, epoch_sets(cfg, self.sets, epoch),
                                          self.device, cfg.sam.box_mode, cfg.eval_batch_size)
        metrics = {**metrics, **summarize(slices),
                   "eval_seconds": time.perf_counter() - self._t0 - metrics["train_seconds"],
                   "embed_seconds": self.embed_s if self.first_epoch else 0.0}
        self.first_epoch = False
        if self.is_snapshot(epoch):
            self.snapshot(epoch, metrics, self.model, slices, preds, self.cache, self.sets,
                          state=member_state(self.model, cfg, epoch),
                          extra={"prompt": "ground-truth box (oracle), no jitter",
                                 "unprompted_slices": int((slices["n_boxes"] == 0).sum()),
                                 "skipped_train_slices": self.skipped_train})
        return metrics

    def state(self, epoch: int) -> dict:
        return {"model": self.decoder.state_dict(), "optimizer": self.opt.state_dict(), "epoch": epoch,
                "arch": self.cfg.arch,
                **self.accel.scaler_state()}
