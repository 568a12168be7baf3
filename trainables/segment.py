"""Train one segmentation run and record its pool members (DESIGN §2, §5).

``train_segmenter(config, report=None)`` is a plain function: it runs with or without Ray.
Under Ray Tune, ``sweeps.pool`` passes a ``report`` callable that forwards each epoch's
metrics (and, at snapshot epochs, a checkpoint folder) to ``ray.tune.report``.

One run trains to ``max(snapshots)`` epochs; at every snapshot epoch it freezes a pool member:
its weights (``records/checkpoints``), its per-slice confusion counts on the source test split
and every target site (``records/parts``) and its packed predicted masks (``records/predictions``).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from . import records
from .accel import (ACCEL_DEFAULTS, Accel, accel_for, augment_flips, choose_placement, place_training_data,
                    resolve_device)
from .data.cache import SliceCache, open_slice_cache
from .metrics import confusion_counts
from .models import build_model, get_model_spec, is_prompted

#: Keys a config must have; the rest have defaults (see ``DEFAULTS``).
REQUIRED = ("arch", "lr", "seed", "cache", "source", "targets", "experiment_dir")
DEFAULTS: dict[str, Any] = {
    "epochs": None,          # int: train this many epochs, one member at the end
    "snapshots": None,       # list[int]: train to max(snapshots), one member at each
    "batch_size": 8,
    "eval_batch_size": 64,
    "target_split": "test",  # which split of each target site to score: "test" or "all"
    "val_fraction": 0.1,     # share of the source's training cases held out as the validation split (by case)
    "split_seed": 0,         # seeds the choice of the validation cases
    "weight_decay": 0.0,
    "num_threads": None,     # torch CPU threads (None: leave torch's default)
    "device": "auto",
    "encoder_weights": None,
    "bn_momentum": 0.1,      # see trainables.models.build_model; None keeps each encoder's own
    "resume_from": None,     # a checkpoint folder written by this function (Tune restarts)
    "sam_checkpoint": None,  # SAM weights for box-prompted archs (trainables.medsam); others ignore it
    "sam_sha256": None,      # the sha256 sam_checkpoint must have (checked before loading); others ignore it
    "embeddings_ready": False,  # True: the driver computed the SAM embeddings, trials only read; others ignore it
    "eval_every_epoch": False,  # False: between snapshots score only the validation split (see train_segmenter)
    "verbose": False,
    **ACCEL_DEFAULTS,        # amp, channels_last, data placement, augmentation: trainables.accel
}

ReportFn = Callable[[dict, "str | None"], None]


def member_id(arch: str, lr: float, seed: int, epoch: int) -> str:
    return f"{arch}-lr{lr:.6g}-s{seed}-ep{epoch}"


def run_name(arch: str, lr: float, seed: int, last_epoch: int) -> str:
    """A training run (its members are ``member_id(..., epoch)`` at each snapshot up to ``last_epoch``)."""
    return f"{arch}-lr{lr:.6g}-s{seed}-E{last_epoch}"


def end_epoch(cfg: dict, run_id: str, metrics: dict, report: ReportFn | None, ckpt_dir: str | None) -> None:
    """Print the epoch's line (``verbose``) and hand its metrics and checkpoint folder to the reporter."""
    if cfg["verbose"]:
        scores = " ".join(f"{k} {metrics[k]:.3f}" for k in ("val_iou_3d", "id_iou_3d", "ood_mean_iou_3d")
                          if k in metrics and not math.isnan(metrics[k]))
        print(f"[{run_id}] epoch {metrics['epoch']}: loss {metrics['train_loss']:.4f} {scores}")
    if report is not None:
        report(metrics, ckpt_dir)


def with_defaults(config: dict, required: tuple[str, ...], defaults: dict, who: str) -> dict:
    """``config`` over ``defaults``; a missing required key or an unknown key is a KeyError naming it."""
    missing = [k for k in required if k not in config]
    if missing:
        raise KeyError(f"{who} config lacks {missing}; required keys: {list(required)}")
    unknown = sorted(set(config) - set(required) - set(defaults))
    if unknown:
        raise KeyError(f"{who} config has unknown keys {unknown}; valid keys: {sorted(set(required) | set(defaults))}")
    return {**defaults, **config}


def _resolve(config: dict) -> dict:
    cfg = with_defaults(config, REQUIRED, DEFAULTS, "train_segmenter")
    snaps = cfg["snapshots"] if cfg["snapshots"] is not None else [cfg["epochs"]]
    if not snaps or any(s is None or int(s) < 1 for s in snaps):
        raise ValueError(f"epochs/snapshots must be positive integers, got epochs={cfg['epochs']!r} "
                         f"snapshots={cfg['snapshots']!r}")
    cfg["snapshots"] = sorted({int(s) for s in snaps})
    if cfg["target_split"] not in ("test", "all"):
        raise ValueError(f"target_split must be 'test' or 'all', got {cfg['target_split']!r}")
    get_model_spec(cfg["arch"])  # fail early on an unknown architecture
    return cfg


def train_val_rows(cache: SliceCache, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """The source's training rows split by case into (train, validation) rows.

    ``val_fraction`` of the training cases (rounded; at least one when the fraction is positive and
    the source has three or more training cases; never all of them), drawn with ``split_seed``. The
    validation cases are scored every epoch (role ``"val"``) and choose configurations; they are never
    trained on and never reported as a result. Computed here rather than in the slice cache so that
    the cache (shared by experiments with other fractions) keeps the dataset's train/test split.
    """
    rows = cache.rows(cfg["source"], "train")
    frac = float(cfg.get("val_fraction") or 0.0)
    cases = cache.index["case_id"].to_numpy()[rows].astype(str)
    uniq = np.unique(cases)
    n_val = int(round(frac * len(uniq)))
    if n_val == 0 and frac > 0 and len(uniq) >= 3:
        n_val = 1
    n_val = min(n_val, len(uniq) - 1)
    if n_val <= 0:
        return rows, rows[:0]
    val_cases = np.random.default_rng(int(cfg.get("split_seed") or 0)).permutation(uniq)[:n_val]
    is_val = np.isin(cases, val_cases)
    return rows[~is_val], rows[is_val]


def val_set(cache: SliceCache, cfg: dict) -> list[tuple[str, str, np.ndarray]]:
    """``[(source, "val", rows)]`` for the validation split (empty when there is none)."""
    val_rows = train_val_rows(cache, cfg)[1]
    return [(cfg["source"], "val", val_rows)] if len(val_rows) else []


def epoch_sets(cfg: dict, sets: list, epoch: int) -> list:
    """The eval sets scored at ``epoch``: all of them at a snapshot epoch (or with ``eval_every_epoch``), only
    the validation split in between, when there is one. A member is frozen only at snapshots, so the test
    splits scored in between fed nothing but the learning curves (with 7 targets, most of an epoch's time);
    the validation split drives the search and stays in every epoch's report."""
    if cfg["eval_every_epoch"] or epoch in cfg["snapshots"]:
        return sets
    val = [s for s in sets if s[1] == "val"]
    return val or sets


def eval_sets(cache: SliceCache, cfg: dict) -> list[tuple[str, str, np.ndarray]]:
    """(site, role, rows): the source's test split (role "id") then each target (role "ood")."""
    sets = [(cfg["source"], "id", cache.rows(cfg["source"], "test"))]
    sets += [(t, "ood", cache.rows(t, cfg["target_split"])) for t in cfg["targets"]]
    return sets


@torch.inference_mode()
def predict(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 64,
            accel: Accel | None = None) -> torch.Tensor:
    """Binary masks ``N x H x W`` (bool, on the CPU) for ``N x C x H x W`` images (logit > 0).

    A multi-label model (L > 1 output channels, e.g. fundus lesions) gives ``N x L x H x W``.
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


def summarize(slices: pd.DataFrame) -> dict[str, float]:
    """Per-epoch scalars: ``id_<metric>``, ``val_<metric>`` (the validation split, when scored),
    ``ood_<site>_<metric>`` and ``ood_mean_<metric>``."""
    out: dict[str, float] = {}
    for metric in ("iou_3d", "dice_2d"):
        per = records.metric_by(slices, metric, by=("site", "role"))
        ood = []
        for (site, role), v in per.items():
            v = float(v) if not math.isnan(v) else 0.0
            if role in ("id", "val"):
                out[f"{role}_{metric}"] = v
            else:
                out[f"ood_{site}_{metric}"] = v
                ood.append(v)
        out[f"ood_mean_{metric}"] = float(np.mean(ood)) if ood else float("nan")
    return out


def _save_state(path: Path, model, opt, epoch: int, cfg: dict, accel: Accel | None = None) -> None:
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                "arch": cfg["arch"], "in_channels": model_in_channels(model),
                **({"scaler": accel.scaler.state_dict()} if accel is not None and accel.scaler else {})}, path)


def model_in_channels(model: torch.nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return int(first.in_channels)


def load_member(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a frozen pool member from its ``records/checkpoints/<member>.pt`` file."""
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    if is_prompted(state["arch"]):  # MedSAM members store the decoder and where the frozen encoders are
        from .medsam import load_medsam_member

        return load_medsam_member(state, device)
    model = build_model(state["arch"], in_channels=state["in_channels"], classes=state.get("classes", 1))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def segmentation_loss(n_labels: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Sigmoid Dice + binary cross-entropy over ``n_labels`` independent channels.

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


def train_segmenter(config: dict, report: ReportFn | None = None) -> list[dict]:
    """Train one run; write a pool member at each snapshot epoch; return the member records.

    Args:
        config: see ``REQUIRED`` and ``DEFAULTS``. ``cache`` is a slice-cache folder, ``source`` and
            ``targets`` are site names in it, ``experiment_dir`` an absolute path.
        report: called after every epoch with the epoch's metrics and, at snapshot epochs, a folder
            holding the resumable training state (None at other epochs).

    Returns:
        The member dicts written (schema ``records.MEMBER_COLUMNS``).
    """
    if is_prompted(config.get("arch", "")):  # box-prompted foundation models: decoder-only training
        from .medsam import train_medsam

        return train_medsam(config, report)
    cfg = _resolve(config)
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    device = resolve_device(cfg["device"])
    accel = accel_for(cfg, device, "train_segmenter")
    torch.manual_seed(int(cfg["seed"]))
    rng = torch.Generator().manual_seed(int(cfg["seed"]))
    exp = Path(cfg["experiment_dir"])
    cache = open_slice_cache(cfg["cache"])
    run_id = run_name(cfg["arch"], float(cfg["lr"]), int(cfg["seed"]), max(cfg["snapshots"]))
    train_rows = train_val_rows(cache, cfg)[0]
    # The training split (float16 images, uint8 masks as cached) is held in the device's memory when
    # it fits the trial's share, else streamed from the memmap by a DataLoader (trainables.accel).
    data, where = place_training_data({"x": (str(cache.path / "images.npy"), train_rows),
                                       "y": (str(cache.path / "masks.npy"), train_rows)}, device, cfg,
                                      "train_segmenter")
    in_channels, n_labels = int(cache.images.shape[1]), len(cache.labels)
    sets = eval_sets(cache, cfg) + val_set(cache, cfg)
    # the eval sets join the training split in device memory when both fit the same budget
    eval_rows = sum(len(rows) for _, _, rows in sets)
    eval_bytes = eval_rows * (cache.images[:1].nbytes + cache.masks[:1].nbytes)
    resident = data.placement == "device" and choose_placement(
        data.nbytes + eval_bytes, device, cfg["gpu_share"], cfg["data_placement"], "train_segmenter")[0] == "device"
    evald = EvalData(cache, sets, device, resident=resident)
    between = epoch_sets(cfg, sets, 0)  # the sets scored between snapshots (epoch 0 is never a snapshot)
    evald_between = evald if between is sets else EvalData(cache, between, device, resident=resident)
    where += f"; eval sets ({eval_bytes / 2**20:.1f} MiB) {'on ' + str(device) if resident else 'read per epoch'}"
    print(f"[{run_id}] {accel.describe()}; {where}", flush=True)

    model = accel.model(build_model(cfg["arch"], in_channels=in_channels, classes=n_labels,
                                    encoder_weights=cfg["encoder_weights"], bn_momentum=cfg["bn_momentum"]))
    loss_fn = segmentation_loss(n_labels)
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]),
                           fused=device.type == "cuda" or None)
    start_epoch = 0
    if cfg["resume_from"]:
        state = torch.load(Path(cfg["resume_from"]) / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if accel.scaler is not None and state.get("scaler"):
            accel.scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        for _ in range(start_epoch):  # keep the shuffling stream identical to an uninterrupted run
            torch.randperm(len(data), generator=rng)

    records.log_attempt(exp, "pool", run_id, start_epoch)
    members: list[dict] = []
    bs = int(cfg["batch_size"])
    for epoch in range(start_epoch + 1, max(cfg["snapshots"]) + 1):
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(int(cfg["seed"]), epoch))
        loss_sum, n_steps = train_epoch(model, opt, loss_fn, data, torch.randperm(len(data), generator=rng), bs,
                                        accel, _augmenter(cfg, device, epoch))
        train_loss = float(loss_sum) / max(n_steps, 1)  # the epoch's one host synchronisation
        train_s = time.perf_counter() - t0
        snapshot = epoch in cfg["snapshots"]
        slices, preds = evaluate(model, cache, evald if snapshot else evald_between, device,
                                 int(cfg["eval_batch_size"]), accel, keep_preds=snapshot)
        metrics = {"epoch": epoch, "train_loss": train_loss, **summarize(slices),
                   "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0 - train_s}
        ckpt_dir = None
        if snapshot:
            members.append(_write_member(exp, cfg, run_id, epoch, model, slices, preds, cache, sets))
            metrics["member_id"] = members[-1]["member_id"]
            if report is not None:  # the reporter owns (and removes) this folder
                ckpt_dir = tempfile.mkdtemp(prefix="ckpt-", dir=records.scratch_dir(exp))
                _save_state(Path(ckpt_dir) / "state.pt", model, opt, epoch, cfg, accel)
        end_epoch(cfg, run_id, metrics, report, ckpt_dir)
    return members


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of torch's global generator for ``epoch`` of a run seeded ``seed``.

    Stochastic layers (EfficientNet's drop-connect, dropout) draw from torch's global generator. A run
    resumed at epoch e rebuilds its model (which draws its initialisation from that generator), so
    without a reseed its draws continued from there, not from where the uninterrupted run stood: a
    resumed ``unet_effb0`` run ended with other weights than the uninterrupted one. Reseeding at every
    epoch from (seed, epoch) makes the draws of epoch e the same however the run got there. numpy's
    ``SeedSequence`` derives the seed, so that it is independent of the flips' (seed, epoch) generator.
    """
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def _augmenter(cfg: dict, device: torch.device, epoch: int):
    """The epoch's batch augmentation (None: none), drawn on ``device`` from a (seed, epoch) generator
    so that a resumed run augments exactly as an uninterrupted one."""
    if cfg["augment"] in (None, "none", False):
        return None
    if cfg["augment"] != "flip":
        raise ValueError(f"train_segmenter: augment must be 'none' or 'flip', got {cfg['augment']!r}")
    gen = torch.Generator(device=device).manual_seed(int(cfg["seed"]) * 100_003 + epoch)
    return lambda batch: augment_flips(batch, gen, ("x", "y"))


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn, data, perm: torch.Tensor, bs: int,
                accel: Accel, augment=None) -> tuple[torch.Tensor, int]:
    """One pass over ``data`` in ``perm`` order; returns the summed loss (a device tensor) and the step count.

    No host synchronisation per step: the batches are gathered on the device (or arrive pinned from
    the loader), the loss is summed on the device. The bench and the GPU check time this function.
    """
    model.train()
    loss_sum = torch.zeros((), device=accel.device)
    n_steps = 0
    for batch in data.batches(perm, bs):
        if augment is not None:
            batch = augment(batch)
        x, y = accel.images(batch["x"]), batch["y"].to(accel.device, non_blocking=True).float()
        y = y[:, None] if y.ndim == 3 else y  # N x L x H x W: one channel per label
        with accel.autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y)  # Dice and BCE in fp32
        accel.step(loss, opt)
        loss_sum += loss.detach()
        n_steps += 1
    return loss_sum, n_steps


def _write_member(exp: Path, cfg: dict, run_id: str, epoch: int, model, slices: pd.DataFrame,
                  preds: dict[str, torch.Tensor], cache: SliceCache, sets, state: dict | None = None,
                  extra: dict | None = None) -> dict:
    """Write a member's checkpoint, predictions and records. ``state`` replaces the default checkpoint
    dict (MedSAM stores its decoder only); ``extra`` adds fields to the member record."""
    mid = member_id(cfg["arch"], float(cfg["lr"]), int(cfg["seed"]), epoch)
    ckpt = records.records_dir(exp) / "checkpoints" / f"{mid}.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    if state is None:
        state = {"model": model.state_dict(), "arch": cfg["arch"], "in_channels": model_in_channels(model),
                 "classes": len(cache.labels), "epoch": epoch}
    torch.save(state, tmp)
    os.replace(tmp, ckpt)
    for site, role, rows in sets:
        if role == "val":
            continue
        idx = cache.index.iloc[rows]
        records.save_predictions(exp, mid, site, preds[site].numpy(), idx["case_id"].tolist(),
                                 idx["slice_idx"].to_numpy())
    member = {"member_id": mid, "run_id": run_id, "arch": cfg["arch"], "lr": float(cfg["lr"]), "epochs": epoch,
              "seed": int(cfg["seed"]), "batch_size": int(cfg["batch_size"]), "source": cfg["source"],
              # relative to the experiment, so that a moved experiment folder still finds it
              "checkpoint": ckpt.relative_to(exp).as_posix(),
              # box-prompted members are prompted with each slice's ground-truth box (labels used)
              "oracle_prompt": bool(get_model_spec(cfg["arch"]).prompted), **(extra or {})}
    records.write_member_part(exp, member, slices.assign(member_id=mid))
    return {**member, "checkpoint": str(ckpt)}  # to the caller: the file itself
