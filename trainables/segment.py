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
    "weight_decay": 0.0,
    "num_threads": None,     # torch CPU threads (None: leave torch's default)
    "device": "auto",
    "encoder_weights": None,
    "bn_momentum": 0.1,      # see trainables.models.build_model; None keeps each encoder's own
    "resume_from": None,     # a checkpoint folder written by this function (Tune restarts)
    "sam_checkpoint": None,  # SAM weights for box-prompted archs (trainables.medsam); others ignore it
    "verbose": False,
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
        print(f"[{run_id}] epoch {metrics['epoch']}: loss {metrics['train_loss']:.4f} "
              f"id_iou_3d {metrics['id_iou_3d']:.3f} ood_mean_iou_3d {metrics['ood_mean_iou_3d']:.3f}")
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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def eval_sets(cache: SliceCache, cfg: dict) -> list[tuple[str, str, np.ndarray]]:
    """(site, role, rows): the source's test split (role "id") then each target (role "ood")."""
    sets = [(cfg["source"], "id", cache.rows(cfg["source"], "test"))]
    sets += [(t, "ood", cache.rows(t, cfg["target_split"])) for t in cfg["targets"]]
    return sets


@torch.inference_mode()
def predict(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Binary masks ``N x H x W`` (bool, on the CPU) for ``N x C x H x W`` images (logit > 0).

    A multi-label model (L > 1 output channels, e.g. fundus lesions) gives ``N x L x H x W``.
    """
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[i:i + batch_size], dtype=np.float32)).to(device)
        logits = model(x)
        out.append(((logits[:, 0] if logits.shape[1] == 1 else logits) > 0).cpu())  # per-channel threshold
    return torch.cat(out)


def evaluate(model: torch.nn.Module, cache: SliceCache, sets: list[tuple[str, str, np.ndarray]],
             device: torch.device, batch_size: int = 64) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Score ``model`` on each eval set; return per-slice counts and the predicted masks per site."""
    frames, preds = [], {}
    for site, role, rows in sets:
        pred = predict(model, cache.images[rows], device, batch_size)
        counts = confusion_counts(pred, torch.from_numpy(np.asarray(cache.masks[rows])).bool()).numpy()
        idx = cache.index.iloc[rows]
        frames.append(pd.DataFrame({
            "site": site, "role": role, "case_id": idx["case_id"].to_numpy(),
            "slice_idx": idx["slice_idx"].to_numpy(), "tp": counts[:, 0], "fp": counts[:, 1],
            "fn": counts[:, 2], "tn": counts[:, 3], "area_px": pred[0].numel()}))
        preds[site] = pred
    return pd.concat(frames, ignore_index=True), preds


def summarize(slices: pd.DataFrame) -> dict[str, float]:
    """Per-epoch scalars: ``id_<metric>``, ``ood_<site>_<metric>`` and ``ood_mean_<metric>``."""
    out: dict[str, float] = {}
    for metric in ("iou_3d", "dice_2d"):
        per = records.metric_by(slices, metric, by=("site", "role"))
        ood = []
        for (site, role), v in per.items():
            v = float(v) if not math.isnan(v) else 0.0
            if role == "id":
                out[f"id_{metric}"] = v
            else:
                out[f"ood_{site}_{metric}"] = v
                ood.append(v)
        out[f"ood_mean_{metric}"] = float(np.mean(ood)) if ood else float("nan")
    return out


def _save_state(path: Path, model, opt, epoch: int, cfg: dict) -> None:
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                "arch": cfg["arch"], "in_channels": model_in_channels(model)}, path)


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

    if n_labels == 1:
        return DiceCELoss(sigmoid=True)
    dice, bce = DiceLoss(sigmoid=True), torch.nn.BCEWithLogitsLoss()

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
    device = _device(cfg["device"])
    torch.manual_seed(int(cfg["seed"]))
    rng = torch.Generator().manual_seed(int(cfg["seed"]))
    exp = Path(cfg["experiment_dir"])
    cache = open_slice_cache(cfg["cache"])
    train_rows = cache.rows(cfg["source"], "train")
    # The training split of these datasets is small (a few thousand slices at most for the demo and
    # the prostate sites), so it is held in memory once instead of re-read every epoch.
    x_train = torch.from_numpy(np.asarray(cache.images[train_rows], dtype=np.float32))
    y_train = torch.from_numpy(np.asarray(cache.masks[train_rows], dtype=np.float32))
    y_train = y_train[:, None] if y_train.ndim == 3 else y_train  # N x L x H x W: one channel per label
    sets = eval_sets(cache, cfg)

    model = build_model(cfg["arch"], in_channels=x_train.shape[1], classes=y_train.shape[1],
                        encoder_weights=cfg["encoder_weights"], bn_momentum=cfg["bn_momentum"]).to(device)
    loss_fn = segmentation_loss(y_train.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    start_epoch = 0
    if cfg["resume_from"]:
        state = torch.load(Path(cfg["resume_from"]) / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        for _ in range(start_epoch):  # keep the shuffling stream identical to an uninterrupted run
            torch.randperm(len(x_train), generator=rng)

    run_id = run_name(cfg["arch"], float(cfg["lr"]), int(cfg["seed"]), max(cfg["snapshots"]))
    records.log_attempt(exp, "pool", run_id, start_epoch)
    members: list[dict] = []
    bs = int(cfg["batch_size"])
    for epoch in range(start_epoch + 1, max(cfg["snapshots"]) + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(x_train), generator=rng)
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        for i in range(0, len(perm), bs):
            b = perm[i:i + bs]
            if len(b) < 2 and n_steps:  # a batch of one breaks BatchNorm; drop the remainder
                continue
            x, y = x_train[b].to(device, non_blocking=True), y_train[b].to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            n_steps += 1
        train_s = time.perf_counter() - t0
        slices, preds = evaluate(model, cache, sets, device, int(cfg["eval_batch_size"]))
        metrics = {"epoch": epoch, "train_loss": float(loss_sum) / max(n_steps, 1), **summarize(slices),
                   "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0 - train_s}
        ckpt_dir = None
        if epoch in cfg["snapshots"]:
            members.append(_write_member(exp, cfg, run_id, epoch, model, slices, preds, cache, sets))
            metrics["member_id"] = members[-1]["member_id"]
            if report is not None:  # the reporter owns (and removes) this folder
                ckpt_dir = tempfile.mkdtemp(prefix="ckpt-", dir=records.scratch_dir(exp))
                _save_state(Path(ckpt_dir) / "state.pt", model, opt, epoch, cfg)
        end_epoch(cfg, run_id, metrics, report, ckpt_dir)
    return members


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
    for site, _, rows in sets:
        idx = cache.index.iloc[rows]
        records.save_predictions(exp, mid, site, preds[site].numpy(), idx["case_id"].tolist(),
                                 idx["slice_idx"].to_numpy())
    member = {"member_id": mid, "run_id": run_id, "arch": cfg["arch"], "lr": float(cfg["lr"]), "epochs": epoch,
              "seed": int(cfg["seed"]), "batch_size": int(cfg["batch_size"]), "source": cfg["source"],
              "checkpoint": str(ckpt), **(extra or {})}
    records.write_member_part(exp, member, slices.assign(member_id=mid))
    return member
