"""δ's config (``fit_uncertainty``; paper §2.3-2.4, docs/architecture.md "Uncertainty") as a frozen dataclass
(see ``trainables.config``: ``DeltaConfig.from_dict`` converts Ray's dict once, each field's default is kept
here and nowhere else)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import (AccelConfig, Config, Invalid, choice, flag, fraction_or_zero, integer, nested, number, optional,
                     setting, text, tuple_of)


def lam_method(lam: float) -> str:
    """The method name of δ fitted with a swept λ other than the first: ``ggd_lam100``."""
    return f"ggd_lam{float(lam):g}"


def _lam(v: Any) -> float | tuple[float, ...]:
    lams = v if isinstance(v, (list, tuple)) else [v]
    if not lams or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and float(x) > 0 for x in lams):
        raise Invalid("(λ of Eq. 5) must be > 0 (or a non-empty list of such)",
                      "without the identity term μ need not follow ŷ; the paper's default is 1.0")
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)


def _baselines(v: Any) -> tuple[str, ...]:
    from ..records import UNCERTAINTY_METHODS

    names = tuple_of(text)(v)
    bad = [b for b in names if b not in UNCERTAINTY_METHODS[1:]]
    if bad:
        raise Invalid(f"lists unknown uncertainty baselines {bad}", f"valid: {list(UNCERTAINTY_METHODS[1:])}")
    return names


def _holdout(v: Any) -> float:
    x = number(v)
    if not 0 <= x < 1:
        raise Invalid("must be in [0, 1)")
    return x


def _at_least_one(v: Any) -> int:
    n = integer(v)
    if n < 1:
        raise Invalid("must be >= 1")
    return n


def _band_px(v: Any) -> int:
    n = integer(v)
    if n < 0:
        raise Invalid("must be >= 0 (pixels; 0: the union of ŷ and the truth itself)")
    return n


@dataclass(frozen=True)
class DeltaConfig(Config):
    """A δ fit's config (``fit_uncertainty``): the net δ per frozen pool member and the Table-4 baselines
    (paper §2.3-2.4; docs/architecture.md "Uncertainty")."""

    member_id: str = setting(cast=text)
    #: the member's checkpoint (relative to the experiment or absolute; fit_uncertainty resolves it)
    checkpoint: str = setting(cast=text)
    cache: str = setting(cast=text)
    source: str = setting(cast=text)
    targets: tuple[str, ...] = setting(cast=tuple_of(text))
    experiment_dir: str = setting(cast=text)
    #: ŷ's prediction source: "model" (the member's checkpoint, run on each slice) or "stored" (its predicted
    #: masks in the records: a member imported from elsewhere, which has no model; only the baselines on ŷ run)
    yhat: str = setting("model", choice("model", "stored"))
    target_split: str = setting("test", choice("test", "all"))
    #: paper: Adam 1e-4, 50 epochs, cosine schedule
    epochs: int = setting(50, _at_least_one)
    lr: float = setting(1e-4, number)
    #: λ of Eq. 5 (identity term), > 0; a list fits one δ per value (a sweep): the first is method "ggd",
    #: the others "ggd_lam<λ>" (``lams``)
    lam: float | tuple[float, ...] = setting(1.0, _lam)
    #: the source split δ is fitted on: "train" (the paper) or "val" (a validation split)
    fit_split: str = setting("train", choice("train", "val", listed=True))
    #: the pool's validation split of the source's training cases (data.val_fraction) and its seed
    #: (data.split_seed): fit_split's "train" / "val" rows
    val_fraction: float = setting(0.0, fraction_or_zero)
    split_seed: int = setting(0, lambda v: integer(v or 0))
    #: fraction of the fit split's cases held out to record δ's convergence (0: none)
    holdout: float = setting(0.1, _holdout)
    #: fixed shape (the paper's runs); learn_beta makes it a head
    beta: float = setting(2.0, number)
    learn_beta: bool = setting(False, flag)
    #: stem channels
    width: int = setting(16, integer)
    #: δ's convolutions pad by repeating the edge ("zeros": the maps' bright frame)
    padding: str = setting("replicate", text)
    batch_size: int = setting(8, integer)
    baselines: tuple[str, ...] = setting(("bayescap", "tta_noise", "tta_color", "mc_dropout"), _baselines)
    #: BayesCap's trunk width and residual blocks (published: 64, 16)
    bayescap_width: int = setting(64, integer)
    bayescap_blocks: int = setting(16, integer)
    #: BayesCap's loss weights: T1 on the L1 identity term, T2 on its GGD term
    bayescap_t1: float = setting(1.0, number)
    bayescap_t2: float = setting(5e-2, number)
    #: N for TTA and MC dropout
    passes: int = setting(8, integer)
    #: TTA pixel noise (images are in [0, 1])
    noise_std: float = setting(0.05, number)
    #: TTA brightness/contrast jitter strength
    jitter: float = setting(0.3, number)
    #: MC dropout probability
    dropout: float = setting(0.2, number)
    #: where baselines are scored (Table 4 is per target); "id" adds the source
    baseline_roles: tuple[str, ...] = setting(("ood",), tuple_of(text))
    #: the maps' pixel AUROC/AP for the error pixels: "exact" (sklearn over every pixel), "binned" (per-bin counts
    #: on the device, bounded memory; trainables.ranking) or "auto" (exact up to ranking.EXACT_MAX_PIXELS per site)
    scoring: str = setting("auto", choice("auto", "exact", "binned"))
    #: the error band's width in pixels of the cache grid: AUROC/AP are also scored on the pixels within this
    #: distance of the union of ŷ and the truth, per slice (``scoring.error_band``; docs/uncertainty.md)
    band_px: int = setting(3, _band_px)
    #: the records' folder under ``records/``: "uncertainty" (the δ stage), or "uncertainty_budget" (the δ-budget
    #: sensitivity's second δ, fitted longer on a subset of members: ``uncertainty.sensitivity``)
    records_folder: str = setting("uncertainty", choice("uncertainty", "uncertainty_budget"))
    #: slices kept for the qualitative figure
    n_examples: int = setting(4, integer)
    #: epochs between resumable checkpoints (and after the last epoch)
    checkpoint_every: int = setting(10, integer)
    num_threads: int | None = setting(None, optional(integer))
    device: str = setting("auto", text)
    seed: int = setting(0, integer)
    resume_from: str | None = setting(None, optional(text))
    verbose: bool = setting(False, flag)
    #: amp, channels_last, data placement (trainables.accel); δ trains without augmentation
    accel: AccelConfig = nested(AccelConfig)

    @property
    def lams(self) -> dict[str, float]:
        """``{method: λ}``: "ggd" for the first λ, ``lam_method(λ)`` for the others."""
        lams = self.lam if isinstance(self.lam, tuple) else (self.lam,)
        return {("ggd" if i == 0 else lam_method(v)): v for i, v in enumerate(lams)}
