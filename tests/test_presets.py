"""The paper's presets, the data section of specs (sites, lesions, window, split), `oodsweep data
prepare`, and a multi-label (fundus) training run end to end through train_segmenter and the δ stage."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sweeps.spec import SpecError, load_spec, parse_spec
from trainables.data.fundus import LESIONS

sys.path.insert(0, str(Path(__file__).parent))
from test_datasets import write_fgadr, write_idrid  # noqa: E402

PRESETS = Path(__file__).resolve().parents[1] / "sweeps" / "presets"
PAPER = {  # preset -> (source, targets, env vars)
    "prostate-bmc": ("BMC", ("RUNMC", "BIDMC", "HK"), ("OODSWEEP_PROSTATE",)),
    "prostate-bidmc": ("BIDMC", ("BMC", "RUNMC", "HK"), ("OODSWEEP_PROSTATE",)),
    "dr-idrid": ("IDRiD", ("FGADR",), ("OODSWEEP_IDRID", "OODSWEEP_FGADR")),
    "dr-fgadr": ("FGADR", ("IDRiD",), ("OODSWEEP_IDRID", "OODSWEEP_FGADR")),
    "liver-flare": ("FLARE", ("LiTS",), ("OODSWEEP_FLARE", "OODSWEEP_LITS")),
    "liver-lits": ("LiTS", ("FLARE",), ("OODSWEEP_FLARE", "OODSWEEP_LITS")),
}
ENV = ("OODSWEEP_PROSTATE", "OODSWEEP_IDRID", "OODSWEEP_FGADR", "OODSWEEP_FLARE", "OODSWEEP_LITS")


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    for var in ENV:
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("OODSWEEP_STORAGE", str(tmp_path / "runs"))
    return tmp_path


def test_every_preset_parses(data_env):
    assert {p.stem for p in PRESETS.glob("*.yaml")} == {"demo", "study", *PAPER}
    for name, (source, targets, env) in PAPER.items():
        spec = load_spec(PRESETS / f"{name}.yaml")
        assert (spec.data.source, spec.data.targets) == (source, targets), name
        assert set(spec.pool.lr.values) == {1e-4, 3e-4, 5e-4, 1e-5} and spec.pool.seed.values == (0, 1, 2)
        # the paper's six architectures; MedSAM as medsam_lite (bundled weights, no sam_checkpoint given)
        assert set(spec.pool.arch.values) == {"unet_r50", "unetpp_r50", "unet_effb0", "unetpp_effb0", "transunet",
                                              "medsam_lite"}, name
        assert spec.pool.sam_checkpoint is None and spec.pool.encoder_weights == "imagenet", name
        assert spec.pool.epochs.values == (10, 20, 40), name
        assert spec.data.target_split == "test"  # every site scored on its held-out split
        roots = {spec.data.root} | {r for _, _, r in spec.data.sites}
        assert roots == {data_env / v for v in env}, name
    assert load_spec(PRESETS / "dr-idrid.yaml").data.labels == LESIONS
    # the study: >= 6 graded targets of more than one kind of shift, >= 60 members over several
    # architectures (TransUNet and the foundation model among them) and seeds, on the demo's generator
    from trainables.data.synthetic import SYNTHETIC_SITES

    study = load_spec(PRESETS / "study.yaml")
    assert study.data.synthetic is not None and len(study.data.targets) >= 6
    assert len({SYNTHETIC_SITES[t].kind for t in study.data.targets}) >= 4
    assert len({SYNTHETIC_SITES[t].severity for t in study.data.targets}) >= 3
    assert study.n_members() >= 60 and len(study.pool.seed.values) >= 2
    assert {"medsam_lite", "transunet_tiny"} <= set(study.pool.arch.values)
    assert load_spec(PRESETS / "liver-lits.yaml").data.window == (-160.0, 240.0)


def test_preset_without_its_env_var_says_what_to_set(data_env, monkeypatch):
    monkeypatch.delenv("OODSWEEP_FGADR")
    with pytest.raises(SpecError, match=r"data\.sites\.FGADR\.root.*OODSWEEP_FGADR is not set; export OODSWEEP_FGADR="):
        load_spec(PRESETS / "dr-idrid.yaml")
    monkeypatch.delenv("OODSWEEP_PROSTATE")
    with pytest.raises(SpecError, match="OODSWEEP_PROSTATE"):
        load_spec(PRESETS / "prostate-bmc.yaml")


def _spec(tmp_path, **data) -> dict:
    return {"name": "t", "storage": str(tmp_path / "runs"),
            "data": {"source": "IDRiD", "targets": ["FGADR"], "image_size": 32,
                     "sites": {"IDRiD": {"layout": "idrid", "root": str(tmp_path / "IDRiD")},
                               "FGADR": {"layout": "fgadr", "root": str(tmp_path / "FGADR")}}, **data},
            "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"snapshots": [1]}}}


@pytest.mark.parametrize("data,expect", [
    ({"lesions": ["MA", "XX"]}, ["data.lesions[1]", "'XX'", "MA, HE, EX, SE"]),
    ({"window": [-160, 240]}, ["data.window", "CT layouts"]),
    ({"split": "official"}, ["data.split", "dataset, random"]),
    ({"sites": {"IDRiD": {"layout": "idrid", "root": "/nonexistent/idrid"}}}, ["data.sites.IDRiD.root",
                                                                               "does not exist"]),
    ({"sites": {"IDRiD": {"layout": "idrd", "root": "."}}}, ["data.sites.IDRiD.layout", "did you mean 'idrid'"]),
    ({"sites": {"IDRiD": {"layout": "idrid", "root": "."}}}, ["data.layout", "required for sites ['FGADR']"]),
    ({"layout": "lits", "root": "."}, ["data.sites", "mix modalities"]),
])
def test_data_section_errors(tmp_path, data, expect):
    (tmp_path / "IDRiD").mkdir()
    (tmp_path / "FGADR").mkdir()
    d = _spec(tmp_path, **data)
    if data.get("layout") == "lits":
        del d["data"]["sites"]["FGADR"]
        d["data"]["targets"] = ["LiTS"]
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    for part in expect:
        assert part in str(e.value), (part, str(e.value))


def test_window_must_be_ordered(tmp_path):
    (tmp_path / "L").mkdir()
    d = {"name": "t", "data": {"layout": "lits", "root": str(tmp_path / "L"), "source": "LiTS",
                               "targets": ["FLARE"], "window": [240, -160],
                               "sites": {"FLARE": {"layout": "flare", "root": str(tmp_path / "L")}}},
         "pool": {"arch": "unet_r18", "lr": 1e-3, "epochs": 1}}
    with pytest.raises(SpecError, match=r"data\.window.*low must be < high"):
        parse_spec(d)


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    """IDRiD + FGADR fake data, a spec over both (two lesions), and its prepared cache."""
    from sweeps.cli import main

    tmp = tmp_path_factory.mktemp("fundus")
    write_idrid(tmp / "IDRiD", size=(48, 40))
    write_fgadr(tmp / "FGADR", n=4)
    spec = _spec(tmp, lesions=["EX", "MA"])
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp, main


def test_data_prepare_builds_the_cache_the_sweep_reads(fundus, capsys):
    from sweeps.driver import prepare_data

    tmp, main = fundus
    assert main(["data", "prepare", str(tmp / "spec.yaml")]) == 0
    out = capsys.readouterr()
    assert "slice cache ready" in out.out and "labels ['EX', 'MA']" in out.out
    assert "IDRiD/train: 3 cases, 3 slices" in out.out and "split of IDRiD: dataset" in out.out
    assert "[oodsweep] slice cache [" in out.err  # the progress bar
    spec = load_spec(tmp / "spec.yaml")
    cache = prepare_data(spec, progress=False)  # found, not rebuilt
    assert cache.parent == spec.cache_root and len(list(spec.cache_root.iterdir())) == 1


def test_multilabel_loss_is_per_channel():
    import torch
    from monai.losses import DiceCELoss, DiceLoss

    from trainables.dense import segmentation_loss

    g = torch.Generator().manual_seed(0)
    x1, y1 = torch.randn(2, 1, 8, 8, generator=g), (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    # Dice over the whole batch (batch=True): per slice, a slice without foreground scores near 1 whatever the model does
    assert torch.isclose(segmentation_loss(1)(x1, y1), DiceCELoss(sigmoid=True, batch=True)(x1, y1))
    x, y = torch.randn(2, 3, 8, 8, generator=g), (torch.rand(2, 3, 8, 8, generator=g) > 0.5).float()
    y[:, 1] = y[:, 0]  # overlapping labels: not mutually exclusive classes
    want = DiceLoss(sigmoid=True, batch=True)(x, y) + torch.nn.functional.binary_cross_entropy_with_logits(x, y)
    assert torch.isclose(segmentation_loss(3)(x, y), want)
    assert not torch.isclose(segmentation_loss(3)(x, y), DiceCELoss(sigmoid=True, batch=True)(x, y))  # softmax CE there


def test_multilabel_training_and_uncertainty(fundus, tmp_path):
    """Fundus lesions end to end: L output channels, counts per lesion (label column), δ on the union."""
    import torch

    from sweeps.driver import prepare_data
    from trainables import records
    from trainables.data.cache import open_slice_cache
    from trainables.segment import load_member, train_segmenter
    from trainables.dense import predict
    from trainables.uncertainty import fit_uncertainty

    tmp, _ = fundus
    cache_dir = prepare_data(load_spec(tmp / "spec.yaml"), progress=False)
    cache = open_slice_cache(cache_dir)
    assert cache.images.shape[1:] == (3, 32, 32) and cache.masks.shape[1:] == (2, 32, 32)
    members = train_segmenter({"arch": "unet_r18", "lr": 1e-3, "seed": 0, "cache": str(cache_dir),
                               "source": "IDRiD", "targets": ["FGADR"], "experiment_dir": str(tmp_path),
                               "epochs": 1, "batch_size": 2, "num_threads": 1})
    _, slices = records.merge_parts(tmp_path)
    assert (slices["area_px"] == 32 * 32).all()  # one row per slice and lesion
    assert sorted(slices["label"].unique()) == sorted(cache.labels) and len(cache.labels) == 2
    assert (slices[["tp", "fp", "fn", "tn"]].sum(axis=1) == slices["area_px"]).all()
    model = load_member(members[0]["checkpoint"])
    rows = cache.rows("FGADR", "test")
    pred = predict(model, cache.images[rows], torch.device("cpu"))
    assert pred.shape == (len(rows), 2, 32, 32)
    masks, _, _ = records.load_predictions(tmp_path / "records" / "predictions" / members[0]["member_id"]
                                           / "FGADR.npz")
    assert (masks == pred.numpy()).all()
    got = slices[(slices.site == "FGADR")]
    truth = np.asarray(cache.masks[rows]).astype(bool)
    assert got["tp"].sum() == (pred.numpy() & truth).sum()
    fit_uncertainty({"member_id": members[0]["member_id"], "checkpoint": members[0]["checkpoint"],
                     "cache": str(cache_dir), "source": "IDRiD", "targets": ["FGADR"],
                     "experiment_dir": str(tmp_path), "epochs": 1, "batch_size": 2, "num_threads": 1,
                     "baselines": ["tta_noise"], "passes": 2})
    unc = records.load_uncertainty(tmp_path)
    assert set(unc["method"]) == {"ggd", "tta_noise"} and (unc["area_px"] == 32 * 32).all()
    union_err = (pred.numpy().any(1) != truth.any(1)).reshape(len(rows), -1).sum(1)
    fg = unc[(unc.site == "FGADR") & (unc.method == "ggd")]
    assert fg["error_px"].tolist() == union_err.tolist()


def test_imagenet_without_network_fails_before_launch_and_local_weights_are_checked(data_env, tmp_path):
    """`encoder_weights: imagenet` needs the weight hosts (checked with a short TCP timeout before any trial
    starts); the offline form, a directory of <encoder>.pth files, is checked file by file at parse time."""
    import socket

    import torch

    from sweeps.cluster import check_pretrained_weights
    from trainables.models import build_model

    spec = load_spec(PRESETS / "prostate-bmc.yaml")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: like a weight host behind a firewall
    with pytest.raises(SpecError, match=r"pool\.encoder_weights: 'imagenet'.*127\.0\.0\.1:\d+ cannot be reached.*"
                                        r"dir holding efficientnet-b0\.pth, resnet50\.pth, "
                                        r"vit_base_r50_s16_224\.pth"):
        check_pretrained_weights(spec, hosts=(("127.0.0.1", port),), timeout=0.5)
    with socket.socket() as listening:  # a reachable host: no error
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_pretrained_weights(spec, hosts=(listening.getsockname(),), timeout=0.5)

    raw = yaml.safe_load((PRESETS / "prostate-bmc.yaml").read_text())
    weights = tmp_path / "weights"
    weights.mkdir()
    raw["pool"]["encoder_weights"] = str(weights)
    with pytest.raises(SpecError, match=r"pool\.encoder_weights.*weights/resnet50\.pth does not exist.*"
                                        r"unet_r50 needs resnet50\.pth"):
        parse_spec(raw)
    raw["pool"]["arch"] = {"grid": ["unet_r18", "medsam_lite"]}
    import segmentation_models_pytorch as smp

    ref = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=3, classes=1).encoder
    state = {**ref.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}  # torchvision's
    torch.save(state, weights / "resnet18.pth")
    spec = parse_spec(raw)
    assert spec.pool.encoder_weights == weights
    check_pretrained_weights(spec, hosts=(("127.0.0.1", port),))  # local weights: no network needed
    model = build_model("unet_r18", in_channels=1, encoder_weights=str(weights))  # as the trial does
    torch.testing.assert_close(model.encoder.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))  # smp's 1-channel rule
    assert torch.equal(model.encoder.layer4[0].conv1.weight, ref.layer4[0].conv1.weight)
