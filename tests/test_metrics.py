"""Metrics from confusion counts: hand-computed cases, and agreement with MONAI on random volumes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from trainables.metrics import confusion_counts
from trainables.records import metric_by


def test_confusion_counts_by_hand():
    pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    true = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 1]]])
    c = confusion_counts(pred, true)
    assert c.tolist() == [[1, 1, 1, 1], [0, 0, 1, 3]]


def test_confusion_counts_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        confusion_counts(torch.zeros(2, 3, 3), torch.zeros(2, 3, 4))


def _slices(rows):
    return pd.DataFrame(rows, columns=["member_id", "site", "case_id", "slice_idx", "tp", "fp", "fn"])


def test_metric_by_hand():
    # case c1: slices (tp, fp, fn) = (2, 1, 1) and (0, 0, 0) -> empty-truth slice left out of dice_2d
    # case c2: (1, 0, 3)
    s = _slices([("m", "A", "c1", 0, 2, 1, 1), ("m", "A", "c1", 1, 0, 0, 0), ("m", "A", "c2", 0, 1, 0, 3),
                 ("m", "A", "c2", 1, 0, 2, 0)])
    # dice_2d: slices with truth: 2*2/(4+1+1)=2/3 and 2*1/(2+0+3)=0.4 -> mean 0.5333
    assert metric_by(s, "dice_2d")[("m", "A")] == pytest.approx((2 / 3 + 0.4) / 2)
    # iou_3d: c1 = 2/(2+1+1) = 0.5; c2 = 1/(1+2+3) = 1/6
    assert metric_by(s, "iou_3d")[("m", "A")] == pytest.approx((0.5 + 1 / 6) / 2)
    # dice_global: TP=3, FP=3, FN=4 -> 6/13
    assert metric_by(s, "dice_global")[("m", "A")] == pytest.approx(6 / 13)
    with pytest.raises(ValueError, match="valid metrics"):
        metric_by(s, "hausdorff")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_monai(seed):
    from monai.metrics import DiceMetric, MeanIoU

    g = torch.Generator().manual_seed(seed)
    n_cases, depth, hw = 3, 5, 16
    truth = (torch.rand(n_cases, depth, hw, hw, generator=g) > 0.7)
    truth[:, 0] = False  # an empty-truth slice per case
    pred = (torch.rand(n_cases, depth, hw, hw, generator=g) > 0.6)
    rows = []
    for c in range(n_cases):
        cnt = confusion_counts(pred[c], truth[c]).numpy()
        rows += [("m", "A", f"c{c}", z, *cnt[z, :3]) for z in range(depth)]
    s = _slices(rows)
    # 2D: every slice as an image, empty-truth slices ignored (MONAI's ignore_empty)
    p2 = pred.reshape(-1, 1, hw, hw).float()
    t2 = truth.reshape(-1, 1, hw, hw).float()
    d = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(p2, t2)
    assert metric_by(s, "dice_2d")[("m", "A")] == pytest.approx(float(np.nanmean(d.numpy())), abs=1e-6)
    # 3D: each case a volume
    p3 = pred[:, None].float()
    t3 = truth[:, None].float()
    iou = MeanIoU(include_background=True, reduction="mean")(p3, t3)
    assert metric_by(s, "iou_3d")[("m", "A")] == pytest.approx(float(iou.mean()), abs=1e-6)


def test_multilabel_metrics_average_per_lesion_like_monai():
    from monai.metrics import DiceMetric

    # two lesions on 2 slices of one case: a perfect 1000-px-like exudate and a missed 10-px microaneurysm
    hw = 40
    truth = torch.zeros(2, 2, hw, hw, dtype=torch.bool)   # slices x lesions x H x W
    truth[:, 0, :25, :] = True                            # lesion 0: 1000 px per slice
    truth[0, 1, 30:32, 30:35] = True                      # lesion 1: 10 px on slice 0 only
    pred = truth.clone()
    pred[0, 1] = False                                    # lesion 1 missed
    cnt = confusion_counts(pred, truth, per_channel=True)  # 2 x 2 x 4
    assert cnt.shape == (2, 2, 4) and cnt[0, 1].tolist() == [0, 0, 10, hw * hw - 10]
    rows = [("m", "A", "c0", z, *cnt[z, k, :3].tolist(), name) for z in range(2) for k, name in enumerate(("EX", "MA"))]
    s = pd.DataFrame(rows, columns=["member_id", "site", "case_id", "slice_idx", "tp", "fp", "fn", "label"])
    dice = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
    dice(pred.float(), truth.float())                     # each slice an image, each lesion a channel
    per_lesion = dice.aggregate()                         # mean over slices per lesion: [1, 0]
    monai = float(per_lesion.mean())                      # then over lesions
    assert monai == pytest.approx(0.5)
    assert metric_by(s, "dice_2d")[("m", "A")] == pytest.approx(monai)
    assert metric_by(s, "iou_3d")[("m", "A")] == pytest.approx(0.5)           # per lesion per case, then mean
    assert metric_by(s, "dice_global")[("m", "A")] == pytest.approx(0.5)
    assert metric_by(s, "dice_global_micro")[("m", "A")] == pytest.approx(4000 / 4010)  # the pooled lesions
    assert metric_by(s, "dice_2d_micro")[("m", "A")] == pytest.approx((2000 / 2010 + 1) / 2)
