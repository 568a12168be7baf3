"""train_segmenter as a plain function (no Ray): records, checkpoints, predictions, resume."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from trainables import records
from trainables.records import load_predictions
from trainables.data.cache import open_slice_cache
from trainables.segment import load_member, train_segmenter
from trainables.dense import predict
from trainables.member import train_val_rows

from helpers import copy_experiment, member_config as cfg


@pytest.mark.slow  # trains a model or fits δ: seconds, not a unit test's fraction of one (make test runs it)
def test_between_snapshots_only_the_validation_split_is_scored(tiny_cache, tmp_path):
    """The test splits are scored at snapshot epochs only (eval_every_epoch: every epoch); the members'
    records do not change."""
    runs = {}
    for every in (False, True):
        exp = tmp_path / f"every{every}"
        reports = []
        train_segmenter(cfg(tiny_cache, exp, snapshots=[1, 3], eval_every_epoch=every),
                        report=lambda m, c: reports.append(m) or (c and shutil.rmtree(c)))
        runs[every] = (reports, *records.merge_parts(exp))
    between, every = runs[False][0][1], runs[True][0][1]
    assert between["epoch"] == 2 and "val_iou_3d" in between and "id_iou_3d" not in between
    assert "id_iou_3d" in every and "ood_SiteB_iou_3d" in every
    assert between["val_iou_3d"] == every["val_iou_3d"] and between["train_loss"] == every["train_loss"]
    assert all("id_iou_3d" in r for r in runs[False][0][::2])  # epochs 1 and 3 are snapshots
    for a, b in zip(runs[False][1:], runs[True][1:]):
        a, b = a.drop(columns=["checkpoint"], errors="ignore"), b.drop(columns=["checkpoint"], errors="ignore")
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_train_writes_members_and_records(tiny_cache, tiny_member, tmp_path):
    # the session's tiny run (helpers.member_config), merged again here in a copy of its experiment
    assert tiny_member["config"] == cfg(tiny_cache, tiny_member["exp"])
    tmp_path, members = copy_experiment(tiny_member["exp"], tmp_path, tiny_member["members"])
    reports = tiny_member["reports"]
    assert [m["member_id"] for m in members] == ["unet_r18-lr0.001-s0-ep1", "unet_r18-lr0.001-s0-ep2"]
    assert [r[0]["epoch"] for r in reports] == [1, 2]
    assert {"train_loss", "id_iou_3d", "id_dice_2d", "val_iou_3d", "ood_SiteB_iou_3d", "ood_SiteC_iou_3d",
            "ood_mean_iou_3d"} <= set(reports[0][0])
    assert all(c is not None for _, c in reports)  # each snapshot hands a checkpoint folder to the reporter
    mem, slices = records.merge_parts(tmp_path)
    assert len(mem) == 2 and set(mem["epochs"]) == {1, 2}
    assert mem["oracle_prompt"].dtype == bool and not mem["oracle_prompt"].any()  # unprompted: label-free
    assert list(slices.columns[: len(records.SLICE_COLUMNS)]) == list(records.SLICE_COLUMNS)
    assert (slices[["tp", "fp", "fn", "tn"]].sum(axis=1) == slices["area_px"]).all()
    assert set(slices["role"]) == {"id", "ood", "val"}
    # the validation cases: carved from the source's training cases, never trained on, scored every epoch
    cache = open_slice_cache(tiny_cache)
    train, val = train_val_rows(cache, "SiteA", 0.1)
    val_cases = set(slices.loc[slices.role == "val", "case_id"])
    assert val_cases == set(cache.index["case_id"].to_numpy()[val]) and len(val_cases) >= 1
    assert not val_cases & set(cache.index["case_id"].to_numpy()[train])
    assert not val_cases & set(slices.loc[slices.role == "id", "case_id"])
    assert set(slices.loc[slices.role == "id", "site"]) == {"SiteA"}
    # the reported per-epoch scalars are the ones the records give
    m2 = slices[slices.member_id == members[1]["member_id"]]
    iou = records.metric_by(m2, "iou_3d", by=["site"])
    assert reports[1][0]["ood_SiteB_iou_3d"] == pytest.approx(np.nan_to_num(iou["SiteB"]))
    # the checkpoint reproduces the recorded predictions and counts
    model = load_member(members[1]["checkpoint"])
    masks, case_ids, slice_idx = load_predictions(tmp_path / "records" / "predictions" / members[1]["member_id"]
                                                  / "SiteB.npz")

    cache = open_slice_cache(tiny_cache)
    rows = cache.rows("SiteB", "test")
    again = predict(model, cache.images[rows], torch.device("cpu")).numpy()
    assert (again == masks).all()
    b = m2[m2.site == "SiteB"]
    assert int(b["tp"].sum() + b["fp"].sum()) == int(masks.sum())
    assert list(case_ids) == cache.index.iloc[rows]["case_id"].tolist()


# resume equals uninterrupted: test_determinism.py::test_resumed_run_equals_uninterrupted (every loop)


def test_config_errors(tiny_cache, tmp_path):
    with pytest.raises(KeyError, match="unknown keys.*'learning_rate'"):
        train_segmenter({**cfg(tiny_cache, tmp_path), "learning_rate": 1})
    with pytest.raises(KeyError, match="registered models"):
        train_segmenter(cfg(tiny_cache, tmp_path, arch="resnet"))
    with pytest.raises(ValueError, match="positive"):
        train_segmenter(cfg(tiny_cache, tmp_path, snapshots=[0]))
    with pytest.raises(KeyError, match="no slices for site 'SiteZ'"):
        train_segmenter(cfg(tiny_cache, tmp_path, targets=["SiteZ"]))
