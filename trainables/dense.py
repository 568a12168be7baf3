"""The dense training loop (smp U-Nets, TransUNet): every output pixel from the image alone
(docs/architecture.md "Models and data").

``train_dense(config, report)`` is ``trainables.segment.train_segmenter`` for the architectures whose
registry entry says ``loop="dense"``: Adam on MONAI's Dice + cross-entropy, through ``Accel``
(precision, memory format, data placement). It takes a ``MemberConfig`` (``trainables.config``); what it
shares with the prompted loop (splits, member records, reports) is ``trainables.member``'s.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pandas as pd
import torch

from . import records
from .accel import Accel, accel_for, augment_flips, choose_placement, place_training_data, resolve_device
from .config import MemberConfig
from .data.cache import SliceCache, open_slice_cache
from .exclusive import ExclusiveClasses, check_exclusive, exclusive_loss, label_kind
from .member import (PoolRun, ReportFn, epoch_sets, eval_sets, model_in_channels, restore_state, summarize,
                     train_val_rows, val_set)
from .metrics import confusion_counts
from .models import build_model
from .runner import run_epochs

@torch.inference_mode()
def predict(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 64,
            accel: Accel | None = None) -> torch.Tensor:
    """Binary masks ``N x H x W`` (bool, on the CPU) for ``N x C x H x W`` images (logit > 0).

    A multi-label model (L > 1 output channels, e.g. fundus lesions) gives ``N x L x H x W``; so does a member of
    exclusive classes (``trainables.exclusive.ExclusiveClasses``: its argmax as L channels that never overlap).
    ``accel``: the precision and memory format the model was trained with (default fp32).
    """
    model.eval()
    out = [_binary(_forward(model, _batch(images, i, batch_size), device, accel)).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def _batch(images, i: int, batch_size: int) -> torch.Tensor:
    b = images[i:i + batch_size]
    return b if isinstance(b, torch.Tensor) else torch.from_numpy(np.asarray(b))


def _forward(model: torch.nn.Module, x: torch.Tensor, device: torch.device, accel: Accel | None) -> torch.Tensor:
    if accel is None:
        return model(x.to(device).float())
    with accel.autocast():
        return model(accel.images(x))


def _binary(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] if logits.shape[1] == 1 else logits) > 0  # per-channel threshold


class EvalData:
    """Every eval set's slices, concatenated in ``sets`` order, so evaluation runs in full batches
    across set boundaries. ``resident``: images and masks are read once into the device's memory
    (they are then never re-read from the cache); otherwise each epoch reads them from the memmap."""

    def __init__(self, cache: SliceCache, sets: list[tuple[str, str, np.ndarray]], device: torch.device,
                 resident: bool):
        self.sets = sets
        self.rows = np.concatenate([rows for _, _, rows in sets])
        self.bounds = np.cumsum([0] + [len(rows) for _, _, rows in sets])
        self.resident = resident
        if resident:
            self.images = torch.from_numpy(np.asarray(cache.images[self.rows])).to(device)
            self.masks = torch.from_numpy(np.asarray(cache.masks[self.rows])).to(device)
        else:
            self.images, self.masks = _Take(cache.images, self.rows), _Take(cache.masks, self.rows)


class _Take:
    """``array[rows]`` sliced lazily (contiguous row ranges of a memmap read as such)."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.array[self.rows[sl]]))


@torch.inference_mode()
def evaluate(model: torch.nn.Module, cache: SliceCache, data: EvalData, device: torch.device,
             batch_size: int = 64, accel: Accel | None = None,
             keep_preds: bool = True) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Score ``model`` on every eval set; return per-slice counts and (``keep_preds``) the predicted
    masks per site (CPU). Counts are computed on the device and copied once."""
    model.eval()
    counts, preds = [], []
    for i in range(0, len(data.rows), batch_size):
        pred = _binary(_forward(model, _batch(data.images, i, batch_size), device, accel))
        truth = _batch(data.masks, i, batch_size).to(device, non_blocking=True)
        counts.append(confusion_counts(pred, truth, per_channel=pred.ndim == 4))  # multi-label: per lesion
        if keep_preds:
            preds.append(pred)
    counts = torch.cat(counts).cpu().numpy()
    all_preds = torch.cat(preds).cpu() if keep_preds else None
    frames, by_site = [], {}
    for (site, role, rows), lo, hi in zip(data.sets, data.bounds[:-1], data.bounds[1:]):
        idx = cache.index.iloc[rows]
        c = counts[lo:hi]
        case_id, slice_idx = idx["case_id"].to_numpy(), idx["slice_idx"].to_numpy()
        extra = {}
        if c.ndim == 3:  # multi-label: one row per slice and lesion (records.LABEL_COLUMN)
            n_lab = c.shape[1]
            case_id, slice_idx = np.repeat(case_id, n_lab), np.repeat(slice_idx, n_lab)
            extra = {records.LABEL_COLUMN: np.tile(np.asarray(cache.labels, dtype=str), len(c))}
            c = c.reshape(-1, 4)
        frames.append(pd.DataFrame({
            "site": site, "role": role, "case_id": case_id, "slice_idx": slice_idx, "tp": c[:, 0], "fp": c[:, 1],
            "fn": c[:, 2], "tn": c[:, 3], "area_px": int(np.prod(cache.masks.shape[-2:])), **extra}))
        if keep_preds and role != "val":  # agreement and the uncertainty stage use the id/ood sets
            by_site[site] = all_preds[lo:hi]
    return pd.concat(frames, ignore_index=True), by_site



def training_state(model, opt, epoch: int, cfg: MemberConfig, accel: Accel | None = None) -> dict:
    """The dense run's resumable state (``member.save_state`` writes it)."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
            "arch": cfg.arch, "in_channels": model_in_channels(model),
            **(accel.scaler_state() if accel is not None else {})}


def load_dense_member(state: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a frozen dense pool member from its checkpoint dict (``write_member``'s default state)."""
    defs = {state["arch"]: state["model_def"]} if state.get("model_def") else None  # an open architecture
    model = build_model(state["arch"], in_channels=state["in_channels"], classes=state.get("classes", 1), defs=defs)
    if state.get("label_kind") == "exclusive":  # L + 1 softmax logits seen as L binary channels
        model = ExclusiveClasses(model)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def segmentation_loss(n_labels: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Sigmoid Dice + binary cross-entropy over ``n_labels`` independent channels (one label, or overlapping
    labels; mutually exclusive classes train with ``trainables.exclusive.exclusive_loss``).

    One channel: MONAI's ``DiceCELoss(sigmoid=True)``. Several (multi-label, e.g. fundus lesions):
    ``DiceLoss(sigmoid=True)`` + ``BCEWithLogitsLoss``, since ``DiceCELoss`` takes a softmax
    cross-entropy across channels whenever there is more than one, which treats the labels as
    mutually exclusive classes.
    """
    from monai.losses import DiceCELoss, DiceLoss

    # batch=True: the Dice term is computed over the whole batch, not per slice. Per slice, every
    # slice without foreground (the organ's end slices, most of a lesion map) scores a Dice loss
    # near 1 whatever the model does (a sigmoid is never exactly 0), which adds a constant floor and
    # a pull towards predicting nothing: on the demo's data the per-slice loss plateaued at 0.6 and
    # members collapsed to empty masks.
    if n_labels == 1:
        return DiceCELoss(sigmoid=True, batch=True)
    dice, bce = DiceLoss(sigmoid=True, batch=True), torch.nn.BCEWithLogitsLoss()

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice(logits, target) + bce(logits, target)
    return loss


def train_dense(config: MemberConfig | dict, report: ReportFn | None = None) -> list[dict]:
    """Train one dense run; write a pool member at each snapshot epoch; return the member records.

    Args:
        config: the run's ``MemberConfig`` (a dict is converted with ``MemberConfig.from_dict``). ``cache``
            is a slice-cache folder, ``source`` and ``targets`` are site names in it, ``experiment_dir`` an
            absolute path.
        report: called after every epoch with the epoch's metrics and, at snapshot and ``checkpoint_every``
            epochs, a folder holding the resumable training state (None at other epochs).

    Returns:
        The member dicts written (schema ``records.MEMBER_COLUMNS``).
    """
    loop = DenseLoop(config if isinstance(config, MemberConfig) else MemberConfig.from_dict(config))
    run_epochs(loop, loop.epochs, loop.exp, report, loop.cfg.resume_from, ("pool", loop.run_id))
    return loop.members


class DenseLoop(PoolRun):
    """The dense run as a ``trainables.runner.EpochLoop``: Adam on ``segmentation_loss`` through ``Accel``."""

    def __init__(self, cfg: MemberConfig):
        super().__init__(cfg)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = device = resolve_device(cfg.device)
        self.accel = accel = accel_for(cfg.accel, device)
        torch.manual_seed(self.seed)  # the model's initialisation
        self.rng = torch.Generator().manual_seed(self.seed)  # the shuffling stream
        self.cache = cache = open_slice_cache(cfg.cache)
        train_rows = train_val_rows(cache, cfg.source, cfg.val_fraction, cfg.split_seed)[0]
        # The training split (float16 images, uint8 masks as cached) is held in the device's memory when
        # it fits the trial's share, else streamed from the memmap by a DataLoader (trainables.accel).
        self.data, where = place_training_data({"x": (str(cache.path / "images.npy"), train_rows),
                                                "y": (str(cache.path / "masks.npy"), train_rows)}, device,
                                               cfg.accel)
        in_channels, n_labels = int(cache.images.shape[1]), len(cache.labels)
        self.sets = sets = eval_sets(cache, cfg) + val_set(cache, cfg)
        # the eval sets join the training split in device memory when both fit the same budget
        eval_rows = sum(len(rows) for _, _, rows in sets)
        eval_bytes = eval_rows * (cache.images[:1].nbytes + cache.masks[:1].nbytes)
        resident = self.data.placement == "device" and choose_placement(
            self.data.nbytes + eval_bytes, device, cfg.accel.gpu_share, cfg.accel.data_placement)[0] == "device"
        self.evald = EvalData(cache, sets, device, resident=resident)
        between = epoch_sets(cfg, sets, 0)  # the sets scored between snapshots (epoch 0 is never a snapshot)
        self.evald_between = self.evald if between is sets else EvalData(cache, between, device, resident=resident)
        where += f"; eval sets ({eval_bytes / 2**20:.1f} MiB) {'on ' + str(device) if resident else 'read per epoch'}"
        print(f"[{self.run_id}] {accel.describe()}; {where}", flush=True)

        # exclusive classes (the manifest's label_kind, trainables.exclusive): L + 1 softmax logits, nnU-Net's loss
        exclusive = label_kind(cache.manifest, str(cache.path / "manifest.json")) == "exclusive"
        if exclusive:
            check_exclusive(cache.masks[train_rows], f"slice cache {cache.path} ({cfg.source}'s training split)")
        model = build_model(cfg.arch, in_channels=in_channels, classes=n_labels + 1 if exclusive else n_labels,
                            encoder_weights=cfg.encoder_weights, bn_momentum=cfg.bn_momentum, defs=cfg.model_defs)
        self.model = accel.model(ExclusiveClasses(model) if exclusive else model)
        self.loss_fn = exclusive_loss() if exclusive else segmentation_loss(n_labels)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    fused=device.type == "cuda" or None)

    def load_state(self, state: dict) -> int:
        return restore_state(self.model, self.opt, self.accel, state)

    def draw(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.data), generator=self.rng)

    def train(self, epoch: int, perm: torch.Tensor) -> dict:
        self._t0 = time.perf_counter()
        augment = _augmenter(self.cfg, self.device, epoch)
        loss_sum, n_steps = train_epoch(self.model, self.opt, self.loss_fn, self.data, perm,
                                        self.cfg.batch_size, self.accel, augment)
        train_loss = float(loss_sum) / max(n_steps, 1)  # the epoch's one host synchronisation
        return {"epoch": epoch, "train_loss": train_loss, "train_seconds": time.perf_counter() - self._t0}

    def score(self, epoch: int, metrics: dict) -> dict:
        snapshot = self.is_snapshot(epoch)
        slices, preds = evaluate(self.model, self.cache, self.evald if snapshot else self.evald_between, self.device,
                                 self.cfg.eval_batch_size, self.accel, keep_preds=snapshot)
        metrics = {**metrics, **summarize(slices),
                   "eval_seconds": time.perf_counter() - self._t0 - metrics["train_seconds"]}
        if snapshot:
            self.snapshot(epoch, metrics, self.model, slices, preds, self.cache, self.sets)
        return metrics

    def state(self, epoch: int) -> dict:
        return training_state(self.model, self.opt, epoch, self.cfg, self.accel)


def _augmenter(cfg: MemberConfig, device: torch.device, epoch: int):
    """The epoch's batch augmentation (None: none), drawn on ``device`` from a (seed, epoch) generator
    so that a resumed run augments exactly as an uninterrupted one. ``MemberConfig`` checked ``augment``."""
    if cfg.augment == "none":
        return None
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
    return lambda batch: augment_flips(batch, gen, ("x", "y"))


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn, data, perm: torch.Tensor, bs: int,
                accel: Accel, augment=None) -> tuple[torch.Tensor, int]:
    """One pass over ``data`` in ``perm`` order; returns the summed loss (a device tensor) and the step count.

    No host synchronisation per step: the batches are gathered on the device (or arrive pinned from
    the loader), the loss is summed on the device. The bench and the GPU check time this function.
    """
    model.train()
    net = getattr(model, "class_net", model)  # exclusive classes: the loss takes the L + 1 class logits
    loss_sum = torch.zeros((), device=accel.device)
    n_steps = 0
    for batch in data.batches(perm, bs):
        if augment is not None:
            batch = augment(batch)
        x, y = accel.images(batch["x"]), batch["y"].to(accel.device, non_blocking=True).float()
        y = y[:, None] if y.ndim == 3 else y  # N x L x H x W: one channel per label
        with accel.autocast():
            logits = net(x)
        loss = loss_fn(logits.float(), y)  # Dice and BCE in fp32
        accel.step(loss, opt)
        loss_sum += loss.detach()
        n_steps += 1
    return loss_sum, n_steps

