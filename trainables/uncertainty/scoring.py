"""Scoring a frozen member's uncertainty (paper §2.4, Table 4; docs/architecture.md "Uncertainty"): ŷ, δ's and
the baselines' maps on every site, each image's Otsu area, the maps' ranking of the error pixels, and the member's
uncertainty records (``records.UNCERTAINTY_COLUMNS`` / ``UNCERTAINTY_SITE_COLUMNS``)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import records
from ..accel import Accel
from .baselines import BayesCapNet, bayescap_variance, mc_dropout_map, tta_color_map, tta_noise_map
from ..data.cache import SliceCache
from .delta import DeltaNet, ggd_variance, unwrap
from trainables.ranking import binned_error_ranking, binned_error_rankings, scoring_mode  # absolute: survives a move of this module

from ..dense import predict
from ..member import eval_sets
from ..sam.frozen import predict_member_rows, prompted_mc_dropout_map
from .config import DeltaConfig

def uncertain_masks(maps: np.ndarray) -> np.ndarray:
    """The uncertain pixels of each image: above its own Otsu threshold (``N x H x W`` -> bool).

    A constant map has no uncertain pixels (Otsu's threshold is then the constant itself).
    """
    from skimage.filters import threshold_otsu

    maps = np.asarray(maps, dtype=np.float64)
    out = np.zeros(maps.shape, dtype=bool)
    for i, m in enumerate(maps):
        if not np.isfinite(m).all():
            raise ValueError(f"uncertainty map {i} has {int((~np.isfinite(m)).sum())} non-finite values")
        if m.max() > m.min():
            out[i] = m > threshold_otsu(m)
    return out


def otsu_area(maps: np.ndarray) -> np.ndarray:
    """Pixels above each image's Otsu threshold: ``N x H x W`` maps -> ``N`` int counts (the paper's area)."""
    return uncertain_masks(maps).reshape(len(maps), -1).sum(1).astype(np.int64)


def source_threshold(maps: np.ndarray) -> float:
    """Otsu's threshold fitted once on every pixel of a member's source maps (``N x H x W``).

    Applied unchanged to every site (``fixed_px``), it lets the *level* of the uncertainty count: a
    target whose maps are twice as high gets more uncertain pixels, where each image's own Otsu
    threshold would scale with the map and find the same area. ``inf`` for constant source maps
    (nothing is above them).
    """
    from skimage.filters import threshold_otsu

    m = np.asarray(maps, dtype=np.float64).ravel()
    if not m.size or not np.isfinite(m).all() or m.max() <= m.min():
        return math.inf
    return float(threshold_otsu(m))


def error_ranking(maps: np.ndarray, error: np.ndarray, scoring: str = "exact",
                  device: torch.device | str = "cpu") -> tuple[float, float]:
    """(AUROC, average precision) of the map's values as a score for the error pixels, over every pixel.

    ``scoring`` (``DeltaConfig.scoring``; ``trainables.ranking.scoring_mode``): "exact" is
    ``sklearn.metrics.roc_auc_score`` / ``average_precision_score`` in float64 over every pixel at once;
    "binned" counts the pixels per score bin on ``device`` in bounded memory
    (``trainables.ranking.binned_error_ranking``: AUROC within its stated bound, AP within 0.005 of
    exact); "auto" is exact up to ``ranking.EXACT_MAX_PIXELS`` pixels. NaN when every pixel, or none,
    is an error (either is undefined then).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    if scoring_mode(scoring, int(np.size(error))) == "binned":
        r = binned_error_ranking(maps, error, device)
        return r.auroc, r.ap

    y = np.asarray(error, dtype=bool).ravel()
    if y.all() or not y.any():
        return math.nan, math.nan
    s = np.asarray(maps, dtype=np.float64).ravel()
    return float(roc_auc_score(y, s)), float(average_precision_score(y, s))


def error_band(pred: np.ndarray, truth: np.ndarray, width: int) -> np.ndarray:
    """The error band of each slice: the pixels within ``width`` pixels (Euclidean, on the slice's grid) of
    the union of the predicted and the true mask (``N x H x W`` bool each -> ``N x H x W`` bool).

    Every error pixel (fp: predicted, fn: true) lies in the union, so the band keeps all of them and drops
    only correct background far from both masks, the easy part of a whole-image ranking. ``width`` 0 is the
    union itself. ``scipy.ndimage.binary_dilation`` with ``skimage.morphology.disk(width)`` as a one-slice-deep
    structuring element: the dilation never reaches across slices.
    """
    from scipy.ndimage import binary_dilation
    from skimage.morphology import disk

    if int(width) < 0:
        raise ValueError(f"error band width must be >= 0 pixels, got {width!r} (uncertainty.band_px)")
    both = np.asarray(pred, dtype=bool) | np.asarray(truth, dtype=bool)
    if int(width) == 0 or not both.any():
        return both
    return binary_dilation(both, structure=disk(int(width)).astype(bool)[None])


@dataclass(frozen=True)
class BandRanking:
    """The map's ranking of the error pixels within the error band, and the band's base rate."""

    auroc: float
    ap: float
    px: int        # pixels in the band (the site's slices together)
    error_px: int  # error pixels in it (every error pixel of the site: ``error_band``)

    @property
    def error_frac(self) -> float:
        """The band's error fraction: AP's chance level there. NaN for an empty band."""
        return self.error_px / self.px if self.px else math.nan


def error_rankings(maps: np.ndarray, error: np.ndarray, band, scoring: str = "exact",
                   device: torch.device | str = "cpu") -> tuple[tuple[float, float], BandRanking]:
    """``error_ranking`` over every pixel, and the same within the error ``band`` (``BandRanking``).

    ``band``: the ``N x H x W`` bool band (``error_band``), or a function ``band(start, stop)`` returning the band of those
    slices (the binned path asks it a batch at a time; the exact path once for every slice). The whole-image
    numbers are ``error_ranking``'s, computed the same way; the band's use the same ``scoring`` mode (the site's
    pixel count chooses it for both): exact is scikit-learn on the band's pixels, binned adds the band's
    histograms to the same pass (``ranking.binned_error_rankings``).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    if scoring_mode(scoring, int(np.size(error))) == "binned":
        within = band if callable(band) else (lambda i, j: np.asarray(band)[i:j])
        whole, sub = binned_error_rankings(maps, error, within, device)
        return (whole.auroc, whole.ap), BandRanking(sub.auroc, sub.ap, sub.positives + sub.negatives, sub.positives)
    auroc, ap = error_ranking(maps, error, "exact")
    keep = np.asarray(band(0, len(error)) if callable(band) else band, dtype=bool)
    if keep.shape != np.shape(error):
        raise ValueError(f"error band {keep.shape} and error masks {np.shape(error)} differ in shape")
    y = np.asarray(error, dtype=bool)[keep]
    if y.all() or not y.any():
        return (auroc, ap), BandRanking(math.nan, math.nan, int(y.size), int(y.sum()))
    s = np.asarray(maps, dtype=np.float64)[keep]
    return (auroc, ap), BandRanking(float(roc_auc_score(y, s)), float(average_precision_score(y, s)), int(y.size),
                                    int(y.sum()))


#: slices per chunk in ``slice_columns``: its float64 copies and Otsu masks are of a chunk, not of the whole site
#: (a 10,000-slice 256² site's float64 maps alone are 5 GB); each slice's columns are its own, so the chunking
#: changes no value
COLUMN_CHUNK = 256


def slice_columns(maps: np.ndarray, error: np.ndarray, threshold: float | None) -> dict[str, np.ndarray]:
    """The per-slice uncertainty columns of one method on one site (``records.UNCERTAINTY_COLUMNS``).

    Args:
        maps: ``N x H x W`` uncertainty maps.
        error: ``N x H x W`` bool, the frozen member's wrong pixels.
        threshold: the member's source threshold for this method (``source_threshold``); None
            when the method did not score the source split (``fixed_px`` is then <NA>).
    """
    n = len(maps)
    err = np.asarray(error, dtype=bool).reshape(n, -1)
    uncertain, uncertain_error, fixed = (np.zeros(n, dtype=np.int64) for _ in range(3))
    ptp, mean = np.zeros(n), np.zeros(n)
    for i in range(0, n, COLUMN_CHUNK):
        j = min(n, i + COLUMN_CHUNK)
        unc = uncertain_masks(maps[i:j]).reshape(j - i, -1)
        flat = np.asarray(maps[i:j], dtype=np.float64).reshape(j - i, -1)
        uncertain[i:j] = unc.sum(1)
        uncertain_error[i:j] = (unc & err[i:j]).sum(1)
        if threshold is not None:
            fixed[i:j] = (flat > threshold).sum(1)
        if flat.shape[1]:
            ptp[i:j] = flat.max(1) - flat.min(1)
        mean[i:j] = flat.mean(1)
    return {"uncertain_px": uncertain, "error_px": err.sum(1).astype(np.int64),
            "uncertain_error_px": uncertain_error,
            "fixed_px": pd.array(fixed, dtype="Int64") if threshold is not None else pd.array([pd.NA] * n, dtype="Int64"),
            "map_ptp": ptp, "mean_uncertainty": mean}


def union(masks: torch.Tensor) -> torch.Tensor:
    """Multi-label masks ``N x L x H x W`` -> their union ``N x H x W``; ``N x H x W`` unchanged.

    δ models one ŷ channel: for a multi-label task (fundus lesions) it sees the union of the
    lesions, and the error and uncertain areas are those of the union. The baselines likewise
    take the largest lesion probability per pixel (``amax`` over channels; the one channel of a
    binary model).
    """
    return masks.any(1) if masks.ndim == 4 else masks


#: The Table-4 baselines that need only ŷ (and the image); the others (TTA, MC dropout) run the member's model.
MODEL_FREE_BASELINES = ("bayescap", "ggd_yhat_only")


class StoredPredictions:
    """ŷ's *prediction source* for a member without a model (``oodsweep import``): its stored predicted masks.

    δ needs only x and ŷ, so ``frozen_predict`` reads ŷ from the member's packed predictions
    (``records.predictions_path``: the scored sites, and the source's training or validation split the import
    stored for δ's fit) instead of running a model. ``prompted`` is the member's ``oracle_prompt`` (Table 4's
    SAM-family reading); the baselines that need the model (TTA, MC dropout) cannot run on it.
    """

    stored = True

    def __init__(self, experiment_dir: str | os.PathLike, member_id: str):
        import json

        self.member_id = member_id
        pdir = records.records_dir(experiment_dir) / "predictions" / member_id
        files = sorted(pdir.glob("*.npz")) + sorted((pdir / "splits").glob("*.npz"))
        if not files:
            raise FileNotFoundError(f"imported member {member_id}: no stored predictions under {pdir}; run "
                                    f"`oodsweep import` with its spec again")
        part = records.records_dir(experiment_dir) / "parts" / f"{member_id}.member.json"
        self.prompted = bool(json.loads(part.read_text()).get("oracle_prompt", False)) if part.exists() else False
        self.masks: dict[tuple[str, str, int], np.ndarray] = {}
        for f in files:
            site = f.name[: -len(".npz")].rsplit(".", 1)[0] if f.parent.name == "splits" else f.stem
            masks, cases, slices = records.load_predictions(f)
            self.masks.update({(site, str(c), int(z)): m for m, c, z in zip(masks, cases, slices)})

    def predict_rows(self, cache: SliceCache, rows: np.ndarray) -> torch.Tensor:
        """The stored masks of cache rows, ``N x H x W`` bool; a row without one is a KeyError naming it."""
        idx = cache.index.iloc[rows]
        out = []
        for site, case, z in zip(idx["site"], idx["case_id"], idx["slice_idx"]):
            key = (str(site), str(case), int(z))
            if key not in self.masks:
                raise KeyError(f"imported member {self.member_id}: no stored prediction for site {site}, case {case}, "
                               f"slice {z} (δ's fit split needs them: give its predictions to `oodsweep import`)")
            out.append(self.masks[key])
        return torch.from_numpy(np.stack(out)) if out else torch.zeros((0, *cache.masks.shape[-2:]), dtype=torch.bool)


def stored_site_predictions(experiment_dir: str | os.PathLike, member_id: str, site: str, cache: SliceCache,
                            rows: np.ndarray) -> torch.Tensor | None:
    """The member's stored ŷ of cache ``rows`` of ``site`` (``records.predictions_path``: the masks the pool wrote
    with the member's records), ``N x H x W`` (``N x L x H x W`` multi-label) bool; None when the file is absent,
    misses one of the rows, or holds another grid: then the model predicts them again."""
    path = records.predictions_path(experiment_dir, member_id, site)
    if not path.is_file():
        return None
    masks, cases, slices = records.load_predictions(path)
    at = {(str(c), int(z)): i for i, (c, z) in enumerate(zip(cases, slices))}
    idx = cache.index.iloc[rows]
    keys = [(str(c), int(z)) for c, z in zip(idx["case_id"], idx["slice_idx"])]
    if not keys or any(k not in at for k in keys) or tuple(masks.shape[-2:]) != tuple(cache.masks.shape[-2:]):
        return None
    return torch.from_numpy(masks[[at[k] for k in keys]])


def frozen_predict(model: nn.Module | StoredPredictions, cache: SliceCache, rows: np.ndarray, device: torch.device,
                   accel: Accel | None = None) -> torch.Tensor:
    """ŷ of the frozen member on cache rows (``N x H x W`` bool); MedSAM members get the pool's oracle boxes;
    an imported member's ŷ is its stored prediction (``StoredPredictions``).

    ``accel``: the precision the pool scored the member with (bf16 autocast on a GPU), so that ŷ is the
    prediction the records hold."""
    if isinstance(model, StoredPredictions):
        return model.predict_rows(cache, rows)
    if getattr(model, "prompted", False):
        return predict_member_rows(model, cache, rows, device)
    return predict(model, cache.images[rows], device, accel=accel)


@torch.inference_mode()
def delta_maps(net: nn.Module, images: np.ndarray, preds: torch.Tensor, device: torch.device,
               batch_size: int = 64, accel: Accel | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(μ, uncertainty) maps ``N x H x W`` of a trained δ for images and the frozen predictions."""
    net.eval()
    accel = accel or Accel(device, None, False)
    mus, unc = [], []
    for i in range(0, len(images), batch_size):
        x = accel.images(torch.from_numpy(np.asarray(images[i:i + batch_size])))
        yh = accel.images(preds[i:i + batch_size, None])
        with accel.autocast():
            mu, a, b = net(x, yh)
        mus.append(mu[:, 0])
        unc.append((bayescap_variance(a, b) if isinstance(unwrap(net), BayesCapNet) else ggd_variance(a, b))[:, 0])
    return torch.cat(mus).cpu().numpy(), torch.cat(unc).cpu().numpy()


def score_member(cfg: DeltaConfig, cache: SliceCache, frozen: nn.Module | StoredPredictions, nets: dict[str, DeltaNet],
                 device: torch.device, gen: torch.Generator, accel: Accel | None = None,
                 fit: dict | None = None, stored_yhat: bool = False) -> dict:
    """Score every site with δ and the baselines; write the member's uncertainty records and examples.

    ``stored_yhat``: a site's ŷ is the member's stored predictions where they cover it
    (``stored_site_predictions``), else the model's (``frozen_predict``); the two are the same masks.

    Per slice: the Otsu area, its intersection with the error mask, the area above the member's
    source threshold, the map's mean and spread (``records.UNCERTAINTY_COLUMNS``); per site: the
    map's AUROC and AP for the error pixels, over every pixel and within the error band (``error_band``,
    ``cfg.band_px``) (``records.UNCERTAINTY_SITE_COLUMNS``); ``fit``: the δ
    fit's record (``records.write_uncertainty_fit``). The slice part is written last: it is the
    trial's done marker.
    """
    exp = Path(cfg.experiment_dir)
    frames, site_rows, summary, example = [], [], {}, None
    prompted = bool(getattr(frozen, "prompted", False))
    thresholds: dict[str, float] = {}  # per method, fitted on the source split (eval_sets gives it first)
    for site, role, rows in eval_sets(cache, cfg):
        images = cache.images[rows]
        truth = union(torch.from_numpy(np.asarray(cache.masks[rows]))).bool()
        pred = stored_site_predictions(exp, cfg.member_id, site, cache, rows) if stored_yhat else None
        pred = union(frozen_predict(frozen, cache, rows, device, accel) if pred is None else pred)
        error = (pred != truth).numpy()
        pred_np, truth_np = pred.numpy(), truth.numpy()

        def band_of(i: int, j: int) -> np.ndarray:  # the error band of slices i:j (the binned path: per batch)
            return error_band(pred_np[i:j], truth_np[i:j], cfg.band_px)
        # the exact path ranks the whole site at once: its band once, for every method
        band = band_of(0, len(error)) if scoring_mode(cfg.scoring, int(error.size)) == "exact" else band_of
        idx = cache.index.iloc[rows]
        pick = None  # the slices Fig. 6 shows, from the last target (the spec lists them by increasing shift, usually)
        if role == "ood":
            fg = np.flatnonzero(truth.reshape(len(truth), -1).any(1).numpy())
            pick = fg[np.linspace(0, len(fg) - 1, min(cfg.n_examples, len(fg))).astype(int)] if len(fg) \
                else np.arange(min(cfg.n_examples, len(rows)))
        shown: dict[str, np.ndarray] = {}  # δ's μ and map on those slices

        def site_maps():
            """Each method's maps of the site in turn, in the order they were always made (the baselines draw from
            ``gen`` in this order), so that only one method's maps are held at a time."""
            for name, net in nets.items():
                out = delta_maps(net, images, pred, device, accel=accel)
                if name == "ggd" and pick is not None:
                    shown.update(mu=out[0][pick], uncertainty=out[1][pick])
                yield name, out[1]
                del out
            if role in cfg.baseline_roles and not isinstance(frozen, StoredPredictions):  # (no model: ŷ's nets only)
                n = cfg.passes
                prompts = truth.numpy() if prompted else None  # MedSAM: the ground-truth boxes, as in the pool
                if "tta_noise" in cfg.baselines:
                    yield "tta_noise", tta_noise_map(frozen, images, device, n, cfg.noise_std, gen, prompts)
                if "tta_color" in cfg.baselines:
                    yield "tta_color", tta_color_map(frozen, images, device, n, cfg.jitter, gen, prompts)
                if "mc_dropout" in cfg.baselines and prompted:
                    yield "mc_dropout", prompted_mc_dropout_map(frozen, cache, rows, device, n, cfg.dropout, gen)
                elif "mc_dropout" in cfg.baselines:
                    yield "mc_dropout", mc_dropout_map(frozen, images, device, n, cfg.dropout, gen)
        for method, m in site_maps():
            if role == "id":
                thresholds[method] = source_threshold(m)
            cols = slice_columns(m, error, thresholds.get(method))
            frames.append(pd.DataFrame({
                "member_id": cfg.member_id, "method": method, "site": site, "role": role,
                "case_id": idx["case_id"].to_numpy(), "slice_idx": idx["slice_idx"].to_numpy(),
                "area_px": int(pred[0].numel()), **cols}))
            (auroc, ap), inband = error_rankings(m, error, band, cfg.scoring, device)
            del m
            site_rows.append({"member_id": cfg.member_id, "method": method, "site": site, "role": role,
                              "prompted": prompted, "auroc": auroc, "ap": ap, "error_px": int(error.sum()),
                              "area_px": int(error.size), "source_threshold": thresholds.get(method, math.nan),
                              "auroc_band": inband.auroc, "ap_band": inband.ap, "band_px": inband.px,
                              "band_error_frac": inband.error_frac, "band_width_px": int(cfg.band_px)})
            summary[f"ua_{method}_{site}"] = float(np.mean(cols["uncertain_px"] / pred[0].numel()))
            summary[f"auroc_{method}_{site}"] = auroc
            summary[f"auroc_band_{method}_{site}"] = inband.auroc
        if pick is not None:
            example = dict(image=np.asarray(images[pick][:, 0], dtype=np.float32), truth=truth.numpy()[pick],
                           pred=pred.numpy()[pick], error=error[pick], mu=shown["mu"],
                           uncertainty=shown["uncertainty"], site=np.asarray([site] * len(pick)),
                           case_id=idx["case_id"].to_numpy()[pick].astype(str),
                           slice_idx=idx["slice_idx"].to_numpy()[pick])
    folder = cfg.records_folder  # "uncertainty", or the δ-budget sensitivity's own folder
    records.write_uncertainty_sites(exp, cfg.member_id, pd.DataFrame(site_rows), folder)
    if fit is not None:
        records.write_uncertainty_fit(exp, cfg.member_id, fit, folder)
    if example is not None:
        path = records.records_dir(exp) / folder / "examples" / f"{cfg.member_id}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez_compressed(tmp, **example)
        os.replace(tmp, path)
    records.write_uncertainty_part(exp, cfg.member_id, pd.concat(frames, ignore_index=True), folder)
    return summary
