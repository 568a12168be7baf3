"""Several labels and several image channels through training, δ and the records (trainables.exclusive)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from trainables import records
from trainables.exclusive import ExclusiveClasses, binary_logits, class_index, exclusive_loss, label_kind

SITES = ("SiteA", "SiteB")


def write_cache(folder: Path, n_channels: int = 2, labels=("PZ", "TZ"), kind: str | None = "exclusive",
                size: int = 32, cases: int = 4, depth: int = 3, seed: int = 0) -> Path:
    """A slice cache written by hand as ``trainables.data.cache`` writes one: two sites of ``cases`` cases of
    ``depth`` slices; label c is a disc (exclusive: a ring around the first), brighter in channel 0, darker
    in channel 1 (so both channels carry it). The last case of each site is its test split."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs, masks, rows = [], [], []
    for s, site in enumerate(SITES):
        for c in range(cases):
            for z in range(depth):
                cy, cx = rng.integers(10, size - 10, 2)
                r = np.hypot(yy - cy, xx - cx)
                m = np.zeros((len(labels), size, size), np.uint8)
                m[0] = r < 4
                if len(labels) > 1:
                    m[1] = (r >= 4) & (r < 7) if kind == "exclusive" else r < 6
                img = np.zeros((n_channels, size, size), np.float32) + 0.2 + 0.1 * s
                for ch in range(n_channels):
                    img[ch] += (0.5 if ch % 2 == 0 else -0.15) * m[0] + (0.25 if ch % 2 == 0 else 0.3) * m[-1]
                imgs.append(np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1))
                masks.append(m if len(labels) > 1 else m[0])
                rows.append((site, f"{site}_c{c}", z, "test" if c == cases - 1 else "train"))
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", np.stack(imgs).astype(np.float16))
    np.save(folder / "masks.npy", np.stack(masks).astype(np.uint8))
    pd.DataFrame(rows, columns=["site", "case_id", "slice_idx", "split"]).to_parquet(folder / "index.parquet",
                                                                                      index=False)
    manifest = {"labels": list(labels), "modality": "MR", "image_size": size}
    if kind is not None:
        manifest["label_kind"] = kind
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def config(cache: Path, exp: Path, **kw) -> dict:
    return {"arch": "unet_r18", "lr": 3e-3, "seed": 0, "cache": str(cache), "source": "SiteA", "targets": ["SiteB"],
            "experiment_dir": str(exp), "snapshots": [2], "batch_size": 4, "num_threads": 1, "val_fraction": 0.0,
            **kw}


# ----------------------------------------------------------------------------- unit

def test_label_kind_reads_the_manifest():
    assert label_kind({"labels": ["liver"]}) == "binary"
    assert label_kind({"labels": ["liver"], "label_kind": "exclusive"}) == "binary"  # one label: a sigmoid
    assert label_kind({"labels": ["MA", "HE"]}) == "overlapping"  # no key: as before it existed
    assert label_kind({"labels": ["PZ", "TZ"], "label_kind": "exclusive"}) == "exclusive"
    with pytest.raises(ValueError, match=r"cache/manifest.json: label_kind 'softmax' is not one of"):
        label_kind({"labels": ["a", "b"], "label_kind": "softmax"}, "cache/manifest.json")


def test_binary_logits_are_the_argmax_as_channels_that_never_overlap():
    z = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [0.0, 1.0, 4.0], [1.0, 1.0, 1.0]])  # 4 pixels x 3 classes
    logits = z.T.reshape(1, 3, 2, 2)
    m = binary_logits(logits)
    assert m.shape == (1, 2, 2, 2)
    # pixel 0: background wins by 1 over class 2; pixel 1: class 1 by 4; pixel 2: class 2 by 3; pixel 3: a tie
    assert m[0, :, 0, 0].tolist() == [-2.0, -1.0] and m[0, :, 0, 1].tolist() == [4.0, -4.0]
    assert m[0, :, 1, 0].tolist() == [-3.0, 3.0] and m[0, :, 1, 1].tolist() == [0.0, 0.0]
    pred = (m > 0).reshape(2, 4).T
    argmax = logits.argmax(1).reshape(4)
    assert [int(p.nonzero()[0][0]) + 1 if p.any() else 0 for p in pred[:3]] == argmax[:3].tolist()
    assert not (pred.sum(1) > 1).any()


def test_class_index_and_the_softmax_loss():
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 0, 0, 1] = 1
    masks[0, 1, 1, :] = 1
    assert class_index(masks)[0, 0].tolist() == [[0, 1], [2, 2]]
    loss = exclusive_loss()
    perfect = torch.full((1, 3, 2, 2), -20.0)
    for c, (i, j) in [(0, (0, 0)), (1, (0, 1)), (2, (1, 0)), (2, (1, 1))]:
        perfect[0, c, i, j] = 20.0
    assert float(loss(perfect, masks)) < 1e-3
    assert float(loss(-perfect, masks)) > 1.0


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def exclusive_run(tmp_path_factory):
    """One tiny unet_r18 run on a 2-channel cache with 2 exclusive labels (2 epochs, member at epoch 2)."""
    from trainables.segment import train_segmenter

    tmp = tmp_path_factory.mktemp("excl")
    cache = write_cache(tmp / "cache")
    members = train_segmenter(config(cache, tmp / "exp"))
    return {"cache": cache, "exp": tmp / "exp", "members": members}


def test_exclusive_classes_train_with_softmax_and_predict_disjoint_channels(exclusive_run):
    from trainables.data.cache import open_slice_cache
    from trainables.dense import predict
    from trainables.segment import load_member

    (member,) = exclusive_run["members"]
    state = torch.load(member["checkpoint"], weights_only=True)
    assert state["label_kind"] == "exclusive" and state["classes"] == 3 and state["in_channels"] == 2
    model = load_member(member["checkpoint"])  # the restore path: the wrapper around L + 1 logits
    assert isinstance(model, ExclusiveClasses)
    cache = open_slice_cache(exclusive_run["cache"])
    rows = cache.rows("SiteB", "test")
    assert model.class_net(torch.from_numpy(np.asarray(cache.images[rows], np.float32))).shape[1] == 3
    pred = predict(model, cache.images[rows], torch.device("cpu")).numpy()
    assert pred.shape == (len(rows), 2, 32, 32)
    assert not (pred.sum(1) > 1).any()  # argmax: a pixel is in one class at most
    stored, _, _ = records.load_predictions(exclusive_run["exp"] / "records" / "predictions" / member["member_id"]
                                            / "SiteB.npz")
    assert (stored == pred).all()


def test_exclusive_records_have_one_row_per_slice_and_label(exclusive_run):
    mem, slices = records.merge_parts(exclusive_run["exp"])
    assert records.LABEL_COLUMN in slices.columns
    assert sorted(slices[records.LABEL_COLUMN].unique()) == ["PZ", "TZ"]
    per_slice = slices.groupby(["site", "case_id", "slice_idx"]).size()
    assert (per_slice == 2).all() and len(per_slice) == 2 * 3  # one test case of 3 slices per site
    assert (slices[["tp", "fp", "fn", "tn"]].sum(axis=1) == slices["area_px"]).all()
    # the truth of the records is the cache's channel of that label
    from trainables.data.cache import open_slice_cache

    cache = open_slice_cache(exclusive_run["cache"])
    rows = cache.rows("SiteA", "test")
    tz = slices[(slices.site == "SiteA") & (slices[records.LABEL_COLUMN] == "TZ")].sort_values("slice_idx")
    assert (tz["tp"] + tz["fn"]).tolist() == np.asarray(cache.masks[rows][:, 1]).reshape(len(rows), -1).sum(1).tolist()


def test_an_overlapping_cache_refused_as_exclusive(tmp_path):
    from trainables.segment import train_segmenter

    cache = write_cache(tmp_path / "cache", kind="overlapping")
    mf = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**mf, "label_kind": "exclusive"}))
    with pytest.raises(ValueError, match=r"label_kind is 'exclusive' but \d+ slice\(s\) have pixels in two"):
        train_segmenter(config(cache, tmp_path / "exp", snapshots=[1]))


def test_uncertainty_on_an_exclusive_two_channel_member_pools_the_labels(exclusive_run, tmp_path):
    """δ (2-channel image stem), TTA colour (2 channels) and MC dropout (inside the wrapper) score the exclusive
    member; the uncertainty records stay one row per slice (the labels' union)."""
    import shutil

    from trainables.uncertainty import fit_uncertainty

    exp = tmp_path / "exp"
    shutil.copytree(exclusive_run["exp"], exp)
    (member,) = exclusive_run["members"]
    ckpt = exp / "records" / "checkpoints" / Path(member["checkpoint"]).name
    fit_uncertainty({"member_id": member["member_id"], "checkpoint": str(ckpt), "cache": str(exclusive_run["cache"]),
                     "source": "SiteA", "targets": ["SiteB"], "experiment_dir": str(exp), "epochs": 1, "passes": 2,
                     "batch_size": 4, "num_threads": 1, "val_fraction": 0.0, "holdout": 0.0,
                     "baselines": ["tta_color", "mc_dropout"]})
    unc = pd.read_parquet(exp / "records" / "uncertainty" / "parts" / f"{member['member_id']}.parquet")
    assert set(unc["method"]) == {"ggd", "tta_color", "mc_dropout"}
    assert records.LABEL_COLUMN not in unc.columns
    assert not unc.duplicated(["method", "site", "case_id", "slice_idx"]).any()  # one row per slice
    assert len(unc[unc.site == "SiteB"]) == 3 * 3  # methods x slices
    # error_px is the union's: the predicted classes' union against the labels' union
    _, slices = records.merge_parts(exp)
    from trainables.data.cache import open_slice_cache

    cache = open_slice_cache(exclusive_run["cache"])
    rows = cache.rows("SiteB", "test")
    pred, _, _ = records.load_predictions(exp / "records" / "predictions" / member["member_id"] / "SiteB.npz")
    truth = np.asarray(cache.masks[rows]).any(1)
    want = (pred.any(1) != truth).reshape(len(rows), -1).sum(1)
    got = unc[(unc.method == "ggd") & (unc.site == "SiteB")].sort_values("slice_idx")["error_px"].tolist()
    assert got == want.tolist()


# ----------------------------------------------------------------------------- analysis per label

def _mask(*pixels: int) -> np.ndarray:
    m = np.zeros(16, bool)
    m[list(pixels)] = True
    return m.reshape(4, 4)


#: one 4 x 4 slice per site; truth and three members' predictions per label (A, B): hand-checkable counts
TRUTH = {"S": (_mask(0, 1, 2, 3), _mask(8, 9)), "T": (_mask(0, 1, 2, 3), _mask(8, 9, 10))}
PREDS = {  # member -> site -> (A, B)
    "m0": {"S": (_mask(0, 1, 2, 3), _mask(8, 9)), "T": (_mask(0, 1, 2, 3), _mask(8, 12))},
    "m1": {"S": (_mask(0, 1), _mask(8, 9)), "T": (_mask(0, 1), _mask(8, 9, 10))},
    "m2": {"S": (_mask(0, 1, 2, 3), _mask(9)), "T": (_mask(0), _mask(12, 13))},
}


def write_records(exp: Path) -> Path:
    """A records folder by hand: members m0-m2 (one run each), source site S (role id) and target T, labels A, B."""
    for i, (mid, sites) in enumerate(PREDS.items()):
        rows = []
        for site, role in (("S", "id"), ("T", "ood")):
            for lab, p, t in zip("AB", sites[site], TRUTH[site]):
                rows.append({"site": site, "role": role, "case_id": f"{site}1", "slice_idx": 0, "tp": int((p & t).sum()),
                             "fp": int((p & ~t).sum()), "fn": int((~p & t).sum()), "tn": int((~p & ~t).sum()),
                             "area_px": 16, "label": lab})
            records.save_predictions(exp, mid, site, np.stack(sites[site])[None], [f"{site}1"], np.array([0]))
        member = {"member_id": mid, "run_id": f"run{i}", "arch": "unet_r18", "lr": 1e-3, "epochs": 1, "seed": i,
                  "batch_size": 4, "source": "S", "checkpoint": "", "oracle_prompt": False}
        records.write_member_part(exp, member, pd.DataFrame(rows).assign(member_id=mid))
    records.merge_parts(exp)
    return exp


def test_label_names_and_select_label(tmp_path):
    _, slices = records.merge_parts(write_records(tmp_path / "exp"))
    assert records.label_names(slices) == ["A", "B"]
    b = records.select_label(slices, "B")
    assert records.LABEL_COLUMN not in b.columns and len(b) == 3 * 2
    with pytest.raises(ValueError, match=r"label 'C': the slice records hold labels \['A', 'B'\]; give one of them"):
        records.select_label(slices, "C")
    with pytest.raises(ValueError, match=r"hold one label \(no 'label' column\)"):
        records.select_label(b, "B")


def test_label_channel_of_packed_predictions(tmp_path):
    from analysis.agreement import label_channel, read_packed

    for hw in (4, 3):  # 16 pixels a channel (whole bytes), 9 (unpacked and packed again)
        masks = np.random.default_rng(hw).random((5, 3, hw, hw)) > 0.5
        path = records.save_predictions(tmp_path, f"m{hw}", "S", masks, ["c"] * 5, np.arange(5))
        for c in range(3):
            p = label_channel(read_packed(path), c, path)
            assert p.shape == (5, hw, hw)
            got = np.unpackbits(p.bits, axis=1, count=hw * hw).astype(bool).reshape(5, hw, hw)
            assert (got == masks[:, c]).all()
    with pytest.raises(ValueError, match=r"have no label channel 3"):
        label_channel(read_packed(path), 3, path)


def test_analysis_per_label_and_averaged(tmp_path):
    """dice_global on T (hand-computed): m0 A 1.0, B 2*1/(2+3) = 0.4, mean 0.7; m1 A 2*2/(4+2) = 0.667, B 1.0;
    m2 A 2/(2+3) = 0.4, B 0. Agreement of m0 and m1 on T, label A: 2*2/(4+2); label B: 2*1/(2+3)."""
    from analysis import run_analysis

    exp = write_records(tmp_path / "exp")
    kw = dict(metric="dice_global", indicators=["id_performance", "id_agreement", "ood_agreement"], n_resamples=0)
    main = run_analysis(exp, **kw)
    perf = pd.read_csv(exp / "analysis" / "performance.csv").set_index("member_id")["ood_score"]
    assert perf.to_dict() == pytest.approx({"m0": 0.7, "m1": (2 / 3 + 1) / 2, "m2": 0.2})
    per_label = pd.read_csv(exp / "analysis" / "table1_per_label.csv")
    assert list(per_label.columns)[0] == "label" and set(per_label["label"]) == {"A", "B"}
    b = run_analysis(exp, label="B", **kw)
    out = exp / "analysis" / "per_label" / "B"
    assert b["out_dir"] == str(out) and any("label B" in n for n in b["notes"])
    perf_b = pd.read_csv(out / "performance.csv").set_index("member_id")["ood_score"]
    assert perf_b.to_dict() == pytest.approx({"m0": 0.4, "m1": 1.0, "m2": 0.0})
    pairs_a = pd.read_csv(run_analysis(exp, label="A", **kw)["out_dir"] + "/agreement_pairs.csv")
    pairs_b = pd.read_csv(out / "agreement_pairs.csv")
    first = (pairs_a.member_a == "m0") & (pairs_a.member_b == "m1")
    assert float(pairs_a.loc[first, "T"].iloc[0]) == pytest.approx(4 / 6)
    assert float(pairs_b.loc[first, "T"].iloc[0]) == pytest.approx(2 / 5)
    assert json.loads((out / "summary.json").read_text())["label"] == "B"
    assert "label" not in json.loads((exp / "analysis" / "summary.json").read_text())
    assert main["out_dir"] == str(exp / "analysis")


# ----------------------------------------------------------------------------- SAM: channels and labels

def _spec(tmp_path, **pool) -> dict:
    (tmp_path / "data").mkdir(exist_ok=True)
    return {"name": "t", "storage": str(tmp_path / "runs"),
            "data": {"layout": "prostate_multisite", "root": str(tmp_path / "data"), "source": "SiteA",
                     "targets": ["SiteB"], "image_size": 32},
            "pool": {"arch": {"grid": ["unet_r18", "medsam_tiny"]}, "lr": {"grid": [1e-3]},
                     "epochs": {"snapshots": [1]}, **pool}}


def test_sam_channels_in_the_spec(tmp_path):
    from sweeps.pool import param_space
    from sweeps.spec import SpecError, parse_spec

    assert parse_spec(_spec(tmp_path)).pool.sam_channels is None
    spec = parse_spec(_spec(tmp_path, sam_channels=[1, 1, 0]))
    assert spec.pool.sam_channels == (1, 1, 0)
    assert param_space(spec, tmp_path / "cache")["sam_channels"] == [1, 1, 0]
    with pytest.raises(SpecError, match=r"pool.sam_channels.*\[0, 1\]: give three image-channel indices"):
        parse_spec(_spec(tmp_path, sam_channels=[0, 1]))
    with pytest.raises(SpecError, match=r"pool.sam_channels.*-1"):
        parse_spec(_spec(tmp_path, sam_channels=[0, 1, -1]))
    only_cnn = _spec(tmp_path, sam_channels=[0, 0, 0])
    only_cnn["pool"]["arch"] = {"grid": ["unet_r18"]}
    with pytest.raises(SpecError, match=r"pool.sam_channels.*none of the SAM models"):
        parse_spec(only_cnn)


def test_sam_channels_against_the_image_channels():
    from sweeps.spec import SpecError
    from sweeps.user_models import check_prompted_data
    from trainables.sam.build import sam_channels

    assert sam_channels(1, None) is None and sam_channels(1, [0, 0, 0]) is None  # the default: grey repeated
    assert sam_channels(3, [0, 1, 2]) is None and sam_channels(3, [2, 1, 0]) == (2, 1, 0)
    assert sam_channels(2, [0, 1, 1]) == (0, 1, 1)
    with pytest.raises(ValueError, match=r"pool.sam_channels is not set and the slices have 2 image channels"):
        sam_channels(2, None)
    with pytest.raises(ValueError, match=r"pool.sam_channels: \[0, 1, 2\] does not fit slices of 2 image channel"):
        sam_channels(2, [0, 1, 2])
    check_prompted_data(["medsam_tiny"], 2, ["prostate"], (0, 1, 1), "s.yaml", "cache")
    with pytest.raises(SpecError, match=r"s.yaml: pool.sam_channels is not set .* \(slice cache cache\)"):
        check_prompted_data(["medsam_tiny"], 2, ["prostate"], None, "s.yaml", "cache")
    with pytest.raises(SpecError, match=r"box-prompted models \['medsam_tiny'\] predict one merged mask .* 2 labels"):
        check_prompted_data(["medsam_tiny"], 1, ["PZ", "TZ"], None, "s.yaml", "cache")


def test_medsam_sees_the_chosen_channels():
    from trainables.sam.build import build_medsam
    from trainables.sam.embeddings import _key_of

    grey = build_medsam(in_channels=1, variant="tiny", img_size=64, quiet=True)
    two = build_medsam(in_channels=2, variant="tiny", img_size=64, quiet=True, channels=[1, 1, 1])
    assert "channels" not in grey.source and two.source["channels"] == [1, 1, 1]
    assert "channels" not in build_medsam(in_channels=1, variant="tiny", img_size=64, quiet=True,
                                          channels=[0, 0, 0]).source  # the default, said: the same model
    x = np.random.default_rng(0).random((2, 2, 16, 16)).astype(np.float32)
    assert torch.equal(two.model_input(x), grey.model_input(x[:, 1:2]))
    assert _key_of(two.source, "abc") != _key_of({k: v for k, v in two.source.items() if k != "channels"}, "abc")
    with pytest.raises(ValueError, match=r"pool.sam_channels is not set and the slices have 2"):
        build_medsam(in_channels=2, variant="tiny", img_size=64, quiet=True)


def test_tta_colour_on_two_channels():
    from trainables.uncertainty.baselines import tta_color_map

    model = torch.nn.Conv2d(2, 1, 1)
    x = np.random.default_rng(0).random((3, 2, 8, 8)).astype(np.float32)
    m = tta_color_map(model, x, torch.device("cpu"), 3, 0.3, torch.Generator().manual_seed(0))
    assert m.shape == (3, 8, 8) and np.isfinite(m).all() and m.max() > 0

