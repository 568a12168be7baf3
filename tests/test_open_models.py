"""Open architectures (smp:<Arch>:<encoder>, monai:<Network>, a user's callable by import path): the resolver,
the ids, the dummy-batch contract check, MC dropout for any model, the user's code through Ray's runtime_env
on a two-node cluster."""
from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sweeps.spec import SpecError, parse_spec
from trainables.uncertainty import baselines
from trainables.models import arch_id, build_model, normalise, resolve_model
from trainables.models.contract import dropout_layer

#: a user's package, written into a temporary folder by the tests (never importable from the repository)
USER_MODULE = '''
import json, os
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_channels, classes, width):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        return self.out(self.body(x))


def build(in_channels, classes, width=8, log=None, bad=None):
    if log:  # where this build ran: the Ray node (None on the driver) and the file Python imported
        node = None
        import ray
        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
        with open(log, "a") as f:
            f.write(json.dumps({"node": node, "file": __file__, "pid": os.getpid()}) + "\\n")
    if bad == "shape":
        return nn.Conv2d(in_channels, classes, 3, stride=2, padding=1)
    if bad == "channels":
        return TinyNet(in_channels, classes + 1, width)
    if bad == "module":
        return "a model"
    return TinyNet(in_channels, classes, width)
'''


def user_package(folder: Path) -> Path:
    """A fresh ``labnets`` package in ``folder``; the one an earlier test of this process imported (from its
    own temporary folder) is forgotten, so that this test's copy is the one imported."""
    for name in [m for m in sys.modules if m == "labnets" or m.startswith("labnets.")]:
        del sys.modules[name]
    pkg = folder / "labnets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(USER_MODULE)
    return pkg


def spec_with(arch, tmp_path, **top) -> dict:
    return {"name": "open", "storage": str(tmp_path / "runs"),
            "data": {"layout": "prostate_multisite", "root": str(tmp_path), "source": "SiteA", "targets": ["SiteB"],
                     "image_size": 32},
            "pool": {"arch": arch, "lr": 1e-3, "epochs": {"snapshots": [1]}},
            "analysis": {"indicators": ["id_performance"]}, **top}


# ----------------------------------------------------------------------------- the resolver and the ids

def test_open_architectures_resolve_with_readable_ids():
    assert arch_id(normalise("smp:FPN:resnet34")) == "smp-FPN-resnet34"
    assert arch_id(normalise({"smp": {"arch": "DeepLabV3Plus", "encoder": "resnet18", "decoder_channels": 64}})) \
        == "smp-DeepLabV3Plus-resnet18"
    assert arch_id(normalise("monai:BasicUNet")) == "monai-BasicUNet"
    assert arch_id(normalise({"target": "my_pkg.models:build"})) == "target-my_pkg.models.build"
    assert arch_id(normalise({"monai": "UNet", "name": "unet-monai"})) == "unet-monai"
    fpn = resolve_model("smp:FPN:resnet18")
    assert (fpn.size_multiple, fpn.gpu_share, fpn.kwargs) == (32, 0.5, {"encoder_name": "resnet18"})
    basic = resolve_model({"monai": {"network": "BasicUNet", "features": [8, 8, 16, 32, 64, 8]}, "gpu_share": 0.25})
    assert (basic.size_multiple, basic.gpu_share, basic.takes_encoder_weights) == (16, 0.25, False)
    assert resolve_model("unet_r18") is resolve_model("unet_r18", {"x": {}})  # registered names unchanged
    x = torch.rand(2, 1, 32, 32)
    assert build_model("smp:FPN:resnet18", classes=2)(x).shape == (2, 2, 32, 32)
    assert build_model("monai:BasicUNet", 1)(x).shape == (2, 1, 32, 32)


def test_spec_takes_open_architectures_and_names_bad_ones(tmp_path):
    spec = parse_spec(spec_with({"grid": ["unet_r18", "smp:FPN:resnet18",
                                          {"monai": {"network": "BasicUNet", "features": [8, 8, 16, 32, 64, 8]}},
                                          {"target": "labnets.models:build", "kwargs": {"width": 4}}]}, tmp_path))
    assert spec.pool.arch.values == ("unet_r18", "smp-FPN-resnet18", "monai-BasicUNet", "target-labnets.models.build")
    assert spec.pool.models["monai-BasicUNet"]["kwargs"] == {"features": [8, 8, 16, 32, 64, 8]}
    assert "unet_r18" not in spec.pool.models
    with pytest.raises(SpecError, match=r"pool\.arch\.grid\[0\]: 'smp:FPN:resnet19': smp has no encoder 'resnet19'; "
                                        r"close names: resnet18"):
        parse_spec(spec_with("smp:FPN:resnet19", tmp_path))
    with pytest.raises(SpecError, match=r"no architecture 'FPNN' \(did you mean \['FPN'"):
        parse_spec(spec_with({"smp": {"arch": "FPNN", "encoder": "resnet18"}}, tmp_path))
    with pytest.raises(SpecError, match=r"two architectures have the id 'smp-FPN-resnet18' .*kwargs.*`name:`"):
        parse_spec(spec_with({"grid": ["smp:FPN:resnet18", {"smp": {"arch": "FPN", "encoder": "resnet18",
                                                                     "decoder_dropout": 0.1}}]}, tmp_path))
    with pytest.raises(SpecError, match=r"pool\.arch\.grid\[0\]\.kwargs\.in_channels: is filled in"):
        parse_spec(spec_with({"target": "a.b:c", "kwargs": {"in_channels": 3}}, tmp_path))
    with pytest.raises(SpecError, match=r"runtime_env\.py_modules\[0\]: .*nowhere does not exist"):
        parse_spec(spec_with("unet_r18", tmp_path, runtime_env={"py_modules": ["./nowhere"]}))


def test_gpu_share_and_image_size_follow_the_definition(tmp_path):
    from sweeps import cluster

    spec = parse_spec(spec_with({"grid": [{"smp": {"arch": "FPN", "encoder": "resnet18"}, "gpu_share": 0.25},
                                          "monai:BasicUNet"]}, tmp_path))
    assert cluster.gpu_share("smp-FPN-resnet18", None, None, True, spec.pool.models) == 0.25
    assert cluster.gpu_share("monai-BasicUNet", None, None, True, spec.pool.models) == 0.5
    with pytest.raises(SpecError, match="data.image_size: must be a multiple of 32"):
        parse_spec({**spec_with("smp:FPN:resnet18", tmp_path),
                    "data": {**spec_with("x", tmp_path)["data"], "image_size": 48}})


# ----------------------------------------------------------------------------- the contract, on a dummy batch

@pytest.mark.parametrize("bad, says", [
    ("shape", r"wrong output shape: a 2 x 1 x 32 x 32 batch gave \(2, 1, 16, 16\), expected \(2, 1, 32, 32\)"),
    ("channels", r"wrong output channels \(one per label: the data has 1\).* gave \(2, 2, 32, 32\)"),
    ("module", r"returned str, not a torch.nn.Module")])
def test_a_callable_that_breaks_the_contract_is_refused_before_launch(tmp_path, bad, says):
    from sweeps.user_models import check_models

    user_package(tmp_path / "code")
    spec = parse_spec(spec_with({"target": "labnets.models:build", "kwargs": {"bad": bad}}, tmp_path,
                                runtime_env={"py_modules": [str(tmp_path / "code" / "labnets")]}))
    with pytest.raises(SpecError, match=r"pool\.arch: target-labnets\.models\.build: " + says if bad != "module"
                       else says):
        check_models(spec, in_channels=1, classes=1)
    assert str(tmp_path / "code") not in __import__("sys").path  # the driver's path is restored


def test_an_unimportable_target_says_where_python_looked(tmp_path):
    from sweeps.user_models import check_models

    spec = parse_spec(spec_with({"target": "nolab.models:build"}, tmp_path))
    with pytest.raises(SpecError, match=r"cannot import module 'nolab.models'.*sys.path = .*runtime_env: "
                                        r"\{py_modules: \[path/to/nolab\]\}"):
        check_models(spec, in_channels=1, classes=1)


# ----------------------------------------------------------------------------- MC dropout for any model

@torch.inference_mode()
def mc_dropout_before(model, images, device, passes, p, gen, batch_size=64):
    """``mc_dropout_map`` as it was (the hook on smp's ``segmentation_head``), kept to compare against."""
    model.eval()
    head = model.segmentation_head
    captured = {}
    handle = head.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    drop_gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, len(images), batch_size):
        model(torch.from_numpy(np.asarray(images[i:i + batch_size], dtype=np.float32)).to(device))
        feats, probs = captured["x"], []
        for _ in range(passes):
            keep = (torch.rand(feats.shape[:2], generator=drop_gen, device=device) >= p).to(feats.dtype)
            probs.append(torch.sigmoid(head(feats * keep[:, :, None, None] / (1 - p))).amax(1))
        out.append(torch.stack(probs).var(dim=0, unbiased=False).cpu().numpy())
    handle.remove()
    return np.concatenate(out)


@pytest.mark.parametrize("arch", ["unet_r18", "smp:FPN:resnet18"])
def test_mc_dropout_of_smp_models_is_unchanged(arch):
    torch.manual_seed(0)
    model = build_model(arch)
    images = np.random.default_rng(0).random((5, 1, 32, 32)).astype(np.float32)
    cpu = torch.device("cpu")
    before = mc_dropout_before(model, images, cpu, 3, 0.3, torch.Generator().manual_seed(1), batch_size=2)
    now = baselines.mc_dropout_map(model, images, cpu, 3, 0.3, torch.Generator().manual_seed(1), batch_size=2)
    assert before.max() > 0 and np.abs(before - now).max() <= 1e-6


def test_mc_dropout_layer_rule_and_refusal():
    torch.manual_seed(0)
    basic = build_model({"monai": {"network": "BasicUNet", "features": [4, 4, 8, 8, 16, 4]}}, classes=2)
    assert dropout_layer(basic, 2)[0] == "final_conv"
    assert dropout_layer(build_model("unet_r18"), 1)[0] == "segmentation_head.0"
    assert dropout_layer(basic, 2, "upcat_1")[0] == "upcat_1"
    images = np.random.default_rng(0).random((3, 1, 32, 32)).astype(np.float32)
    var = baselines.mc_dropout_map(basic, images, torch.device("cpu"), 3, 0.5, torch.Generator().manual_seed(0))
    assert var.shape == (3, 32, 32) and var.max() > 0
    # the generic path (dropout by a pre-hook, the whole model per pass) gives the head path's maps
    unet = build_model("unet_r18").eval()
    conv = unet.segmentation_head[0]
    seeded = [torch.Generator().manual_seed(5) for _ in range(2)]
    fast = baselines.mc_dropout_map(unet, images, torch.device("cpu"), 2, 0.3, seeded[0])
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=seeded[1]))
    slow = baselines._mc_dropout_layer(unet, conv, images, torch.device("cpu"), 2, 0.3,
                                       torch.Generator().manual_seed(seed), 64)
    assert np.abs(fast - slow).max() < 1e-6

    class NoClassConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).mean(1, keepdim=True)
    with pytest.raises(ValueError, match=r"last convolution with one output channel per class \(1\), and "
                                         r"NoClassConv has none \(its last convolutions: conv \(4 out\)\)"):
        baselines.mc_dropout_map(NoClassConv(), images, torch.device("cpu"), 2, 0.5, torch.Generator())
    with pytest.raises(ValueError, match="mc_dropout_layer 'final' is not a module"):
        dropout_layer(basic, 2, "final")


def test_a_changed_definition_cannot_be_resumed(tmp_path):
    from sweeps.experiment import check_frozen, prepare_experiment

    arch = {"grid": [{"monai": {"network": "BasicUNet", "features": [8, 8, 16, 32, 64, 8]}}]}
    prepare_experiment(parse_spec(spec_with(arch, tmp_path)))
    check_frozen(parse_spec(spec_with(arch, tmp_path)))  # the same definition: resumable
    arch["grid"][0]["monai"]["features"] = [8, 8, 16, 32, 64, 16]
    with pytest.raises(SpecError, match=r"cannot be resumed: pool\.arch\.grid: .*16\]"):
        check_frozen(parse_spec(spec_with(arch, tmp_path)))


# ----------------------------------------------------------------------------- a sweep on two nodes

@pytest.mark.integration
def test_open_pool_on_two_nodes_trains_resumes_and_is_analysed(tmp_path, tiny_data):
    """smp:FPN:resnet18, a small monai:BasicUNet and a callable from a package that exists only in a temporary
    folder, on a head (1 CPU) and a worker node (2 CPUs). The callable's trial asks for 2 CPUs, so it can only
    run on the worker: its build there imports the package from the copy Ray's runtime_env shipped. A second
    run finds everything done; the MC-dropout baseline runs on each member (called directly: the uncertainty
    stage, δ on Ray Train, would triple the test's time; it loads members through the same load_member)."""
    import ray
    from ray.cluster_utils import Cluster

    from sweeps.driver import run_sweep
    from trainables import records

    pkg = user_package(tmp_path / "code")
    log = tmp_path / "builds.jsonl"
    target = {"target": "labnets.models:build", "kwargs": {"width": 8, "log": str(log)}}
    spec = parse_spec({
        "name": "open2", "storage": str(tmp_path / "runs"),
        "data": {"layout": "prostate_multisite", "root": str(tiny_data), "source": "SiteA", "targets": ["SiteB"],
                 "image_size": 32, "test_fraction": 0.25, "cache_dir": str(tmp_path / "cache")},
        "pool": {"arch": {"grid": ["smp:FPN:resnet18",
                                   {"monai": {"network": "BasicUNet", "features": [8, 8, 16, 32, 64, 8]}}, target]},
                 "lr": 1e-3, "epochs": {"snapshots": [1]}, "batch_size": 8,
                 "resources": {"cpu": 1, "per_arch": {"target-labnets.models.build": {"cpu": 2}}}},
        "runtime_env": {"py_modules": [str(pkg)]},
        "analysis": {"metric": "iou_3d"}})
    exp = tmp_path / "runs" / "open2"
    ids = {"smp-FPN-resnet18", "monai-BasicUNet", "target-labnets.models.build"}
    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        result = run_sweep(spec, address=cluster.address)
        ray.shutdown()
        first = time.time() - t0
        attempts = len(records.load_attempts(exp))
        builds = [json.loads(line) for line in log.read_text().splitlines()]
        run_sweep(spec, address=cluster.address)  # resume: everything is recorded
        ray.shutdown()
        again = [json.loads(line) for line in log.read_text().splitlines()][len(builds):]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"first run {first:.0f}s, with the resume {time.time() - t0:.0f}s")
    members, _ = records.load_records(exp)
    assert set(members["arch"]) == ids and len(members) == 3
    # the driver built it from the temporary folder (its check); the trial on the worker node from Ray's copy
    on_driver = [b for b in builds if b["node"] is None]
    on_worker = [b for b in builds if b["node"] == worker.node_id]
    assert on_driver and all(Path(b["file"]).is_relative_to(tmp_path / "code") for b in on_driver)
    assert on_worker and all("runtime_resources" in b["file"] and not Path(b["file"]).is_relative_to(tmp_path)
                             for b in on_worker), builds
    from sweeps.user_models import user_code
    from trainables.data.cache import open_slice_cache
    from trainables.segment import load_member

    images = open_slice_cache(next((tmp_path / "cache").glob("prostate_multisite-*"))).images[:4]
    with user_code(spec.runtime_env):  # the driver imports the package from the spec's folder
        for m in members.itertuples():
            var = baselines.mc_dropout_map(load_member(exp / m.checkpoint), images, torch.device("cpu"), 2, 0.5,
                                           torch.Generator().manual_seed(0))
            assert var.shape == (4, 32, 32) and np.isfinite(var).all() and var.max() > 0, m.arch
    assert all(i in (Path(result["analysis_dir"]) / "tables.md").read_text() for i in ids)
    from mlflow import MlflowClient  # the member runs carry the id as their arch parameter

    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("open2").experiment_id])
    assert {r.data.params["arch"] for r in runs if "arch" in r.data.params} == ids
    # the resume trained nothing and fitted nothing: no new attempt, no build outside the driver's check
    assert len(records.load_attempts(exp)) == attempts and all(b["node"] is None for b in again), again
    import yaml  # the frozen spec keeps the local folder (ray.init rewrites its runtime_env argument in place)
    assert yaml.safe_load((exp / "spec.yaml").read_text())["runtime_env"] == {"py_modules": [str(pkg)]}


# ----------------------------------------------------------------------------- the SAM family's protocol

@pytest.mark.parametrize("arch", ["medsam_tiny", "medsam_lite"])
def test_the_builtin_sam_models_implement_the_prompted_protocol(arch):
    from trainables.sam.modeling import MedSAM
    from trainables.sam.protocol import PromptedModel

    model = build_model(arch)
    assert isinstance(model, PromptedModel) and resolve_model(arch).prompted
    assert model.decoder is model.sam.mask_decoder
    assert all(not p.requires_grad for part in model.frozen_parts() for p in part.parameters())
    assert model.parts_channels == model.sam.mask_decoder.output_upscaling[-2].out_channels
    assert not isinstance(build_model("unet_r18"), PromptedModel)
    # medsam (ViT-B) is the same class as these two: checked on the class, without building a ViT-B
    assert all(hasattr(MedSAM, m) for m in ("embed", "decode", "decode_parts", "upsample", "frozen_parts",
                                            "encoder_key", "decoder", "parts_channels"))


def test_sam_checkpoint_per_architecture(tmp_path, tiny_cache):
    """``pool.sam_checkpoint: {arch: file}``: medsam_tiny with a SAM file and medsam_lite with a LiteMedSAM file
    in one pool, each checked as the pool-wide file is; each trial (and embedding job) gets its own."""
    from sweeps.embeddings import embedding_jobs
    from sweeps.pool import param_space, sam_weights_of
    from trainables.medsam import LITE_SHA256, bundled_lite_checkpoint
    from trainables.sam.modeling import build_sam

    vit = tmp_path / "sam_tiny.pth"
    torch.save(build_sam("tiny", 64).state_dict(), vit)
    lite = bundled_lite_checkpoint()

    def spec(files, shas=None):
        raw = spec_with({"grid": ["medsam_tiny", "medsam_lite", "unet_r18"]}, tmp_path)
        raw["pool"].update(sam_checkpoint=files, **({"sam_sha256": shas} if shas else {}))
        return parse_spec(raw)
    s = spec({"medsam_tiny": str(vit), "medsam_lite": str(lite)}, {"medsam_lite": LITE_SHA256})
    assert s.pool.sam_per_arch == {"medsam_tiny": {"sam_checkpoint": str(vit), "sam_sha256": None},
                                   "medsam_lite": {"sam_checkpoint": str(lite), "sam_sha256": LITE_SHA256}}
    space = param_space(s, tmp_path / "cache")
    assert sam_weights_of({**space, "arch": "medsam_tiny"})["sam_checkpoint"] == str(vit)
    lite_trial = sam_weights_of({**space, "arch": "medsam_lite"})
    assert (lite_trial["sam_checkpoint"], lite_trial["sam_sha256"]) == (str(lite), LITE_SHA256)
    assert "sam_checkpoint" not in sam_weights_of({**space, "arch": "unet_r18"}) and "sam_per_arch" not in lite_trial
    jobs = embedding_jobs(s, tiny_cache)  # the pre-stage embeds each architecture with its own encoder weights
    assert sorted(j.sam.sam_checkpoint for j in jobs.values()) == sorted([str(vit), str(lite)])
    with pytest.raises(SpecError, match=r"pool\.sam_checkpoint\.medsam_lite: .*holds a SAM tiny model"):
        spec({"medsam_lite": str(vit)})
    with pytest.raises(SpecError, match=r"pool\.sam_sha256\.medsam_lite: .*expected 0000"):
        spec({"medsam_lite": str(lite)}, {"medsam_lite": "0" * 64})
    with pytest.raises(SpecError, match=r"pool\.sam_checkpoint\.unet_r18: 'unet_r18' is not a SAM architecture"):
        spec({"unet_r18": str(vit)})


ADAPTER_MODULE = '''
from torch import nn

from trainables.sam.build import build_medsam


class Adapter(nn.Module):
    """A lab's SAM-family adapter, written against trainables.sam.protocol.PromptedModel (here around the tiny
    MedSAM, as SAM-Med2D or SAM 2 would be around theirs)."""

    prompted = True

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.box_mode = "mask"

    img_size = property(lambda self: self.inner.img_size)
    decoder = property(lambda self: self.inner.decoder)
    parts_channels = property(lambda self: self.inner.parts_channels)

    def frozen_parts(self):
        return self.inner.frozen_parts()

    def encoder_key(self):
        return "adapter-" + self.inner.encoder_key()

    def embed(self, images, batch_size=8):
        return self.inner.embed(images, batch_size)

    def decode(self, embeddings, boxes, image_hw):
        return self.inner.decode(embeddings, boxes, image_hw)

    def decode_parts(self, embeddings, boxes, image_hw):
        return self.inner.decode_parts(embeddings, boxes, image_hw)

    def upsample(self, low_res, image_hw):
        return self.inner.upsample(low_res, image_hw)

    def forward(self, images, boxes=None):
        return self.inner(images, boxes)


def build(in_channels, sam_checkpoint=None, seed=0, img_size=64):
    return Adapter(build_medsam(in_channels, "tiny", img_size, sam_checkpoint=sam_checkpoint, init_seed=0,
                                decoder_seed=seed, quiet=True))


def not_prompted(in_channels, sam_checkpoint=None, seed=0):
    return nn.Conv2d(in_channels, 1, 1)
'''


def test_a_labs_prompted_adapter_trains_in_the_prompted_loop(tmp_path, tiny_cache, monkeypatch):
    """``{target: ..., prompted: true}``: a SAM-family adapter from a package of the lab's (a temporary folder
    here) is trained by the prompted loop, its member reloads from the checkpoint and is scored as MedSAM's."""
    from sweeps.user_models import check_models
    from trainables import records
    from trainables.sam.frozen import predict_member_rows, prompted_mc_dropout_map
    from trainables.sam.protocol import PromptedModel
    from trainables.segment import load_member, train_segmenter

    pkg = tmp_path / "code" / "labsam"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "adapter.py").write_text(ADAPTER_MODULE)
    raw = spec_with({"target": "labsam.adapter:build", "prompted": True}, tmp_path,
                    runtime_env={"py_modules": [str(pkg)]})
    spec = parse_spec(raw)
    (aid,) = spec.pool.arch.values
    assert aid == "target-labsam.adapter.build" and resolve_model(aid, spec.pool.models).prompted
    check_models(spec, 1, 1)  # built on the driver and checked against the protocol
    bad = parse_spec({**raw, "pool": {**raw["pool"], "arch": {"target": "labsam.adapter:not_prompted",
                                                               "prompted": True}}})
    with pytest.raises(SpecError, match=r"returned Conv2d, which lacks prompted, box_mode, .* of "
                                        r"trainables\.sam\.protocol\.PromptedModel"):
        check_models(bad, 1, 1)

    monkeypatch.syspath_prepend(str(tmp_path / "code"))  # the trial runs in this process here
    exp = tmp_path / "exp"
    members = train_segmenter({"arch": aid, "model_defs": spec.pool.models, "lr": 1e-3, "seed": 0,
                               "cache": str(tiny_cache), "source": "SiteA", "targets": ["SiteB"],
                               "experiment_dir": str(exp), "snapshots": [1], "batch_size": 8, "num_threads": 1,
                               "embedding_dir": str(tmp_path / "emb")})
    assert [m["arch"] for m in members] == [aid] and members[0]["oracle_prompt"]
    assert [p.name.split("-")[0] for p in (tmp_path / "emb").iterdir() if not p.name.startswith(".")] == ["user"]
    model = load_member(members[0]["checkpoint"])
    assert isinstance(model, PromptedModel) and type(model).__name__ == "Adapter"
    from trainables.data.cache import open_slice_cache

    cache = open_slice_cache(tiny_cache)
    rows = cache.rows("SiteB", "test")
    pred = predict_member_rows(model, cache, rows, torch.device("cpu"))
    assert pred.shape == (len(rows), 32, 32)
    var = prompted_mc_dropout_map(model, cache, rows, torch.device("cpu"), 2, 0.5, torch.Generator().manual_seed(0))
    assert var.shape == (len(rows), 32, 32) and np.isfinite(var).all()
    assert records.member_part_ids(exp) == [members[0]["member_id"]]
