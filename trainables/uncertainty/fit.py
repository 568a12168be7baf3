"""Post-hoc uncertainty for a frozen pool member (paper §2.3–2.4, Appendix A.2; docs/architecture.md "Uncertainty").

For a frozen segmenter Φ, a small net δ({ŷ, x}) predicts a per-pixel generalized Gaussian
GGD(μ, α, β) of the ground truth, trained by maximum likelihood on the source training split
(Eq. 5 with the GGD of Eq. 7). Its per-pixel variance (Eq. 8), thresholded per image with Otsu's
method (``skimage.filters.threshold_otsu``), gives the image's *uncertain area*.

Baselines (paper Table 4), each a per-pixel map through the same Otsu area:

* ``bayescap``   BayesCap as published (Upadhyay et al., ECCV 2022; ExplainableML/BayesCap): its own net
  on ŷ only (``BayesCapNet``: a 9x9 stem, residual trunk, 1/α and β heads with ReLU) and its loss
  (``bayescap_loss``, the public ``TempCombLoss``: T1 · L1(μ, ŷ) + T2 · its GGD term, which writes
  (|μ − y| / α)^β as the product |μ − y| · (1/α) · β, clamped), T1 = 1, T2 = 5e-2 as its training code.
* ``ggd_yhat_only`` the ablation: our δ and loss with the image removed (δ on ŷ only), what earlier
  versions called "bayescap".
* ``tta_noise``  test-time augmentation with Gaussian pixel noise: variance over N passes of σ(Φ(x + ε)).
* ``tta_color``  test-time colour (intensity) jitter: random brightness and contrast per pass
  (``torchvision.transforms.v2.ColorJitter``; saturation and hue do not exist for grey images).
* ``mc_dropout`` MC dropout before the final layer: the pool's models have no dropout there, so
  channel dropout (``dropout2d(p)``, always on) is applied to the input of the model's last convolution
  with one output channel per class, or of the layer the spec's ``mc_dropout_layer`` names
  (``trainables.models.contract.dropout_layer``; forward pre-hooks, the modules are not modified). For smp
  models that input is what enters ``segmentation_head``, and only the head runs N times on it.
  Variance over N passes of σ(Φ).

Box-prompted members (MedSAM) are scored as the pool scored them: ŷ and every TTA and MC-dropout
pass use the ground-truth boxes of the slice (the oracle prompt), ŷ and MC dropout read the shared
embedding cache; MC dropout drops channels of the upscaled image features that enter SAM's final
mask product (``trainables.sam.frozen.prompted_mc_dropout_map``).

Modules: ``trainables.uncertainty.delta`` (the net δ and the equations), ``trainables.uncertainty.baselines`` (the Table-4
baselines), ``trainables.uncertainty.scoring`` (Otsu areas, error ranking, scoring a member and writing
its records) and this one (the config and the fit).

ŷ's *prediction source* (``DeltaConfig.yhat``): the member's model (``model``), or, for a member imported from
elsewhere (``oodsweep import``), its stored predicted masks (``stored``: ``trainables.uncertainty.scoring.StoredPredictions``);
δ and the baselines on ŷ alone (BayesCap, ``ggd_yhat_only``) then run as for any member, TTA and MC dropout cannot.

``fit_uncertainty(config)`` is a plain function (no Ray). ``sweeps.uncertainty`` runs it as a Ray
Train ``TorchTrainer`` inside one Ray Tune trial per group of pool members (``fit_group``: one after
another, ``trainables.uncertainty.group``), passing ``wrap_model`` (DDP) and the worker's rank; only
rank 0 scores and writes records.
"""
from __future__ import annotations

import dataclasses
import shlex
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import records
from ..accel import Accel, accel_for, place_training_data, resolve_device
from .baselines import BayesCapNet, bayescap_loss
from ..data.cache import SliceCache, open_slice_cache
from .delta import DeltaNet, delta_loss, ggd_nll, ggd_variance, unwrap
from .config import DeltaConfig, lam_method
from ..member import train_val_rows
from ..runner import run_epochs
from ..segment import load_member
from .scoring import (MODEL_FREE_BASELINES, StoredPredictions, error_ranking, frozen_predict, otsu_area,
                                  score_member, slice_columns, source_threshold, uncertain_masks, union)

#: Names callers imported from here before the split (temporary aliases; they live in ``trainables.uncertainty.delta``
#: and ``trainables.uncertainty.scoring``).
__all__ = ["DeltaConfig", "FIT_SPLITS", "DeltaFit", "DeltaNet", "compact_optimizer_state", "delta_epoch",
           "delta_loss", "error_ranking", "fit_rows", "fit_uncertainty", "ggd_nll", "ggd_variance", "heldout_metrics",
           "lam_method", "load_frozen", "otsu_area", "slice_columns", "source_threshold", "uncertain_masks"]

FIT_SPLITS = ("train", "val")


# ----------------------------------------------------------------------------- fitting


def _resolve(config: dict | DeltaConfig) -> DeltaConfig:
    """The δ config of ``config`` (a dict converted once), its member's checkpoint resolved (relative to the
    experiment) and present."""
    cfg = config if isinstance(config, DeltaConfig) else DeltaConfig.from_dict(config)
    if cfg.yhat == "stored":  # an imported member: ŷ from its stored predictions, no checkpoint
        model_based = [b for b in cfg.baselines if b not in MODEL_FREE_BASELINES]
        if model_based:
            raise ValueError(f"pool member {cfg.member_id} has no model (its ŷ is stored predictions): the baselines "
                             f"{model_based} need one; leave them out for it (valid: {list(MODEL_FREE_BASELINES)})")
        return cfg
    checkpoint = str(records.resolve_checkpoint(cfg.experiment_dir, cfg.checkpoint))
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"pool member {cfg.member_id}: checkpoint {checkpoint} does not exist; "
                                f"`oodsweep resume {shlex.quote(str(cfg.experiment_dir))}` trains that member again")
    return dataclasses.replace(cfg, checkpoint=checkpoint)


def load_frozen(checkpoint: str, member_id: str, experiment_dir: str, device: torch.device) -> nn.Module:
    """The frozen pool member ``member_id`` of ``checkpoint`` (a resolved δ config's), its weights without
    gradients; a damaged or foreign checkpoint is a ValueError naming the member, the file and the fix
    (``oodsweep resume <experiment_dir>``)."""
    try:
        model = load_member(checkpoint, device)
    except Exception as e:  # a file that is not ours, or weights for another architecture
        # torch's unpickling message suggests weights_only=False (running arbitrary code): never passed on
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        why = type(e).__name__ + (f": {first}" if first and "weights_only" not in str(e) else "")
        raise ValueError(f"pool member {member_id}: cannot load checkpoint {checkpoint}: it is damaged "
                         f"or not a pool member's weights ({why}); delete it and run `oodsweep resume "
                         f"{shlex.quote(str(experiment_dir))}`, which trains that member again") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model




def _nets(cfg: DeltaConfig, in_channels: int, accel: Accel) -> dict[str, nn.Module]:
    nets: dict[str, nn.Module] = {
        name: DeltaNet(in_channels, cfg.width, True, cfg.learn_beta, cfg.beta, cfg.padding) for name in cfg.lams}
    if "bayescap" in cfg.baselines:
        nets["bayescap"] = BayesCapNet(cfg.bayescap_width, cfg.bayescap_blocks, cfg.padding)
    if "ggd_yhat_only" in cfg.baselines:
        nets["ggd_yhat_only"] = DeltaNet(in_channels, cfg.width, False, cfg.learn_beta, cfg.beta, cfg.padding)
    return {k: accel.model(v) for k, v in nets.items()}


def fit_uncertainty(config: dict | DeltaConfig, report: Callable[[dict, str | None], None] | None = None,
                    wrap_model: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0,
                    world_size: int = 1, cache: SliceCache | None = None, stored_yhat: bool = True) -> dict | None:
    """Fit δ (and BayesCap) for one frozen pool member, then score every site with every method.

    Args:
        config: a ``DeltaConfig`` or its flat dict (``DeltaConfig.keys()``), converted here once.
        report: called after every epoch with ``{"epoch", "loss_ggd", ...}`` and, every
            ``checkpoint_every`` epochs and after the last, a folder with the resumable state.
        wrap_model: e.g. DDP's ``prepare_model`` when several workers train; identity by default.
        rank, world_size: this worker's shard of the training slices; only rank 0 scores and writes.
        cache: the slice cache, already open (``fit_group`` keeps one for its members); None: opened here.
        stored_yhat: score each site with the member's stored predictions (``records/predictions/``, what the
            pool wrote with its records) where they cover the site, instead of running the model again; ŷ of
            the fit split is always the model's (the pool stores no predictions of it).

    Returns:
        On rank 0, a summary dict (mean uncertain area per method and site); else None.
    """
    fit = DeltaFit(_resolve(config), wrap_model, rank, world_size, cache)
    cfg = fit.cfg
    run_epochs(fit, fit.epochs, cfg.experiment_dir, report, cfg.resume_from,
               (cfg.records_folder, cfg.member_id) if rank == 0 else None)
    if rank != 0:
        return None
    lams = cfg.lams
    record = {"fit_split": cfg.fit_split, "epochs": fit.epochs, "lam": lams["ggd"], "lams": lams, "lr": cfg.lr,
              "beta": cfg.beta, "fit_slices": int(len(fit.all_rows)), "heldout_slices": int(len(fit.held)),
              "curve": fit.curve, **{f"final_{k}": v[-1] for k, v in fit.curve.items() if v}}
    summary = score_member(cfg, fit.cache, fit.frozen, fit.nets, fit.device, fit.gen, fit.accel, fit=record,
                           stored_yhat=stored_yhat)
    summary.update({k: v for k, v in record.items() if k.startswith("final_")})
    if report is not None:
        report({"epoch": fit.epochs, "scored": 1, **summary}, None)
    return summary


class DeltaFit:
    """δ's fit (and BayesCap's, and ``ggd_yhat_only``'s) as a ``trainables.runner.EpochLoop``: the frozen
    member's ŷ computed once, every net one Adam step per batch, a cosine schedule, the held-out
    convergence record (``curve``) and a resumable state every ``checkpoint_every`` epochs and after the
    last (rank 0)."""

    state_file = "delta.pt"
    ckpt_prefix = "delta-"

    def __init__(self, cfg: DeltaConfig, wrap_model: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0,
                 world_size: int = 1, cache: SliceCache | None = None):
        self.cfg, self.rank = cfg, rank
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = device = resolve_device(cfg.device)
        self.accel = accel = accel_for(cfg.accel, device)
        self.seed = cfg.seed
        self.epochs = cfg.epochs
        torch.manual_seed(self.seed)  # the nets' initialisation
        self.gen = torch.Generator().manual_seed(self.seed + rank)  # the shuffling (and the baselines') stream
        self.cache = cache = cache if cache is not None else open_slice_cache(cfg.cache)
        if cfg.yhat == "stored":  # ŷ's prediction source: the stored masks of an imported member
            self.frozen = frozen = StoredPredictions(cfg.experiment_dir, cfg.member_id)
        else:
            frozen = load_frozen(cfg.checkpoint, cfg.member_id, cfg.experiment_dir, device)
            self.frozen = frozen = accel.model(frozen)

        self.all_rows, self.held = all_rows, held = fit_rows(cache, cfg)
        # equal shards: DDP needs every rank to take the same number of steps
        rows = all_rows[rank::world_size][: len(all_rows) // world_size]
        yhat = union(frozen_predict(frozen, cache, rows, device, accel)).to(torch.uint8)  # ŷ once, not per epoch
        # images and masks as cached (float16, uint8) and ŷ, on the device when they fit (trainables.accel)
        self.data, where = place_training_data({"x": (str(cache.path / "images.npy"), rows),
                                                "y": (str(cache.path / "masks.npy"), rows)}, device, cfg.accel,
                                               extra={"yh": yhat})
        if rank == 0:
            print(f"[delta {cfg.member_id}] {accel.describe()}; {where}", flush=True)

        self.nets = nets = _nets(cfg, int(cache.images.shape[1]), accel)
        self.wrapped = wrapped = {k: (wrap_model(v) if wrap_model else v) for k, v in nets.items()}
        self.opts = opts = {k: torch.optim.Adam(v.parameters(), lr=cfg.lr,
                                                fused=device.type == "cuda" or None) for k, v in wrapped.items()}
        self.scheds = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=self.epochs) for k, o in opts.items()}
        self.curve: dict[str, list[float]] = {}
        if rank == 0 and len(held):
            self.held_data = (np.asarray(cache.images[held]),
                              union(torch.from_numpy(np.asarray(cache.masks[held]))).float(),
                              union(frozen_predict(frozen, cache, held, device, accel)))

    def load_state(self, state: dict) -> int:
        for k in self.nets:
            self.nets[k].load_state_dict(state["nets"][k])
            self.opts[k].load_state_dict(state["opts"][k])
            self.scheds[k].load_state_dict(state["scheds"][k])
        self.accel.load_scaler(state)
        self.curve = {k: list(v) for k, v in state.get("curve", {}).items()}
        return int(state["epoch"])

    def draw(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.data), generator=self.gen)

    def train(self, epoch: int, perm: torch.Tensor) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        lams = cfg.lams
        sums, steps = delta_epoch(self.wrapped, self.opts, self.data, perm, cfg.batch_size, self.accel,
                                  {**lams, "ggd_yhat_only": lams["ggd"]}, (cfg.bayescap_t1, cfg.bayescap_t2))
        for s in self.scheds.values():
            s.step()
        return {"epoch": epoch, **{f"loss_{k}": float(v) / max(steps, 1) for k, v in sums.items()},
                "epoch_seconds": time.perf_counter() - t0}

    def score(self, epoch: int, metrics: dict) -> dict:
        """δ's convergence on the held-out cases (rank 0), appended to the curve with the losses."""
        if self.rank == 0 and len(self.held):
            metrics.update(heldout_metrics(self.nets["ggd"], *self.held_data, self.cfg.lams["ggd"], self.device,
                                           self.accel))
        for k, v in metrics.items():
            if k.startswith(("loss_", "heldout_")):
                self.curve.setdefault(k, []).append(float(v))
        return metrics

    def checkpoint(self, epoch: int) -> bool:
        return self.rank == 0 and (epoch % self.cfg.checkpoint_every == 0 or epoch == self.epochs)

    def state(self, epoch: int) -> dict:
        return {"nets": {k: v.state_dict() for k, v in self.nets.items()},
                "opts": {k: compact_optimizer_state(v.state_dict()) for k, v in self.opts.items()},
                "scheds": {k: v.state_dict() for k, v in self.scheds.items()}, "epoch": epoch, "curve": self.curve,
                **self.accel.scaler_state()}

    def log(self, metrics: dict) -> None:
        if self.cfg.verbose and self.rank == 0:
            print(f"[delta {self.cfg.member_id}] epoch {metrics['epoch']}: " +
                  " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("loss")))


def compact_optimizer_state(state: dict) -> dict:
    """An optimizer state dict with its floating-point per-parameter buffers in bfloat16.

    Adam's two moments are twice the weights: in fp32 they made δ's resume checkpoint three times
    its net (144 MB of 192 at demo size). A resume needs them (a fresh Adam would restart its step
    sizes), but not to the last bit: bfloat16 keeps fp32's exponent range, so tiny second moments
    survive, and ``Optimizer.load_state_dict`` casts them back to the parameters' fp32. A resumed fit
    therefore follows the uninterrupted one to about 3 significant digits of the moments, not
    bit for bit. The weights stay fp32.
    """
    out = {"param_groups": state["param_groups"], "state": {}}
    for i, st in state["state"].items():
        out["state"][i] = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and v.ndim > 0
                               else v) for k, v in st.items()}
    return out


def fit_rows(cache: SliceCache, cfg: DeltaConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows δ trains on, rows held out to record its convergence) of the source's ``fit_split``.

    The held-out part is whole cases (``holdout`` of them, at least one when the split has two or
    more), chosen with ``seed``; it is never trained on.
    """
    split, source = cfg.fit_split, cfg.source
    # the pool's own split of the source's training cases (member.train_val_rows: val_fraction,
    # split_seed): "train" is what the member trained on, "val" its validation cases
    train, val = train_val_rows(cache, source, cfg.val_fraction, cfg.split_seed)
    rows = train if split == "train" else val
    if not len(rows):
        raise ValueError(f"uncertainty.fit_split: {split!r}, but the source site {source!r} has no {split!r} cases "
                         f"in cache {cache.path} (data.val_fraction = {cfg.val_fraction}); use fit_split: "
                         f"train, or give the source a validation split (data.val_fraction, e.g. 0.1)")
    frac = cfg.holdout
    cases = cache.index["case_id"].to_numpy()[rows].astype(str)
    uniq = np.unique(cases)
    n_held = min(len(uniq) - 1, max(1, round(frac * len(uniq)))) if frac > 0 and len(uniq) >= 2 else 0
    if not n_held:
        return rows, rows[:0]
    held_cases = np.random.default_rng(cfg.seed).choice(uniq, n_held, replace=False)
    held = np.isin(cases, held_cases)
    return rows[~held], rows[held]


@torch.inference_mode()
def heldout_metrics(net: nn.Module, images: np.ndarray, y: torch.Tensor, yhat: torch.Tensor, lam: float,
                    device: torch.device, accel: Accel) -> dict[str, float]:
    """δ's convergence on held-out slices: its loss, Dice(μ > 0.5, ŷ) (has μ learnt to follow the
    frozen prediction?) and Dice(μ > 0.5, y), the Dice over all held-out pixels (1.0 when both are empty)."""
    mu = []
    loss, n = 0.0, 0
    net.eval()
    for i in range(0, len(images), 64):
        x = accel.images(torch.from_numpy(images[i:i + 64]))
        yh = yhat[i:i + 64, None].to(device).float()
        with accel.autocast():
            m, a, b = net(x, accel.images(yh))
        loss += float(delta_loss(y[i:i + 64, None].to(device), yh, m, a, b, lam)) * len(x)
        n += len(x)
        mu.append((m[:, 0] > 0.5).cpu())
    mu_b = torch.cat(mu)

    def dice(a: torch.Tensor, b: torch.Tensor) -> float:
        den = int(a.sum() + b.sum())
        return 1.0 if den == 0 else 2.0 * int((a & b).sum()) / den
    return {"heldout_loss_ggd": loss / max(n, 1), "heldout_dice_mu_yhat": dice(mu_b, yhat.bool()),
            "heldout_dice_mu_y": dice(mu_b, y.bool())}


def _finite_step(loss: torch.Tensor, opt: torch.optim.Optimizer, net: nn.Module) -> None:
    """A step whose non-finite gradient entries count as 0 (no host synchronisation).

    For the nets that see ŷ only (BayesCap, ``ggd_yhat_only``): a batch where the member predicted
    nothing is a constant input, every activation is then constant over the batch and the image
    (replicate padding keeps it so), and the backward pass of the ResNet body's BatchNorms gave NaN
    gradients on the demo's data. Zeroing them skips what that batch cannot teach (as a grad scaler
    skips an overflowing step) instead of poisoning the weights.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p in net.parameters():
        if p.grad is not None:
            p.grad.nan_to_num_(0.0, 0.0, 0.0)
    opt.step()


def delta_epoch(nets: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], data, perm: torch.Tensor,
                bs: int, accel: Accel, lam: float | dict[str, float], bayescap_t: tuple[float, float] = (1.0, 5e-2)
                ) -> tuple[dict[str, torch.Tensor], int]:
    """One pass of every δ net over ``data`` (``x``, ``y``, ``yh``) in ``perm`` order; returns the summed
    losses (device tensors) and the step count. No host synchronisation per step; the bench and the
    GPU check time this function."""
    sums = {k: torch.zeros((), device=accel.device) for k in nets}
    steps = 0
    for net in nets.values():
        net.train()
    for batch in data.batches(perm, bs):
        if len(batch["x"]) * (batch["x"].shape[-2] // 32) * (batch["x"].shape[-1] // 32) <= 1:
            # a last batch of one slice whose encoder bottleneck (1/32) is a single pixel: BatchNorm cannot train
            # on one value per channel (PyTorch raises), so it is left out; every other batch is as before
            continue
        x = accel.images(batch["x"])
        y = union(batch["y"].to(accel.device, non_blocking=True)).float()[:, None]
        yh = accel.images(batch["yh"].to(accel.device, non_blocking=True)[:, None])
        for k, net in nets.items():
            with accel.autocast():
                out = net(x, yh)
            inner = unwrap(net)
            if isinstance(inner, BayesCapNet):
                loss = bayescap_loss(y, yh, *out, *bayescap_t)
            else:
                # fp32: the heads leave autocast in fp32; λ per net when λ is swept
                loss = delta_loss(y, yh, *out, lam=lam[k] if isinstance(lam, dict) else lam)
            if accel.scaler is None and not getattr(inner, "use_image", False):
                _finite_step(loss, opts[k], net)
            else:
                accel.step(loss, opts[k])
            sums[k] += loss.detach()
        steps += 1
    return sums, steps
