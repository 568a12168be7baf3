"""trainables.accel and the loops built on it: placement, precision, augmentation, no per-step sync."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables import records
from trainables.accel import Accel, accel_for, augment_flips, choose_placement, place_training_data
from trainables.config import AccelConfig
from trainables.segment import train_segmenter

from helpers import member_config

ROOT = Path(__file__).resolve().parent.parent


def cfg(tiny_cache, exp, **kw):
    return member_config(tiny_cache, exp, **{"targets": ["SiteB"], "snapshots": [2], **kw})


def test_choose_placement_from_size_and_setting():
    cpu = torch.device("cpu")
    where, why = choose_placement(1 << 20, cpu, None)
    assert where == "device" and "1.0 MiB" in why and "budget" in why
    where, why = choose_placement(1 << 50, cpu, None)  # a petabyte never fits: streamed
    assert where == "stream" and ">" in why
    assert choose_placement(1 << 20, cpu, None, "stream")[0] == "stream"
    assert choose_placement(1 << 50, cpu, None, "device")[0] == "device"
    with pytest.raises(ValueError, match="data_placement.*'gpu'"):
        choose_placement(1, cpu, None, "gpu")


def test_amp_settings_and_errors():
    cpu = torch.device("cpu")
    default = accel_for(AccelConfig(), cpu)
    assert default.amp is None and not default.channels_last  # the CPU: fp32 by default
    assert accel_for(AccelConfig(amp="bf16"), cpu).amp == torch.bfloat16
    assert accel_for(AccelConfig.from_dict({"amp": False}), cpu).amp is None  # YAML's `off` reads as false
    a = accel_for(AccelConfig.from_dict({"amp": "fp16"}), cpu)
    assert a.amp == torch.float16 and a.scaler is not None
    with pytest.raises(ValueError, match="AccelConfig: amp must be 'auto', 'bf16', 'fp16' or 'off', got 'fp8'"):
        AccelConfig.from_dict({"amp": "fp8"})
    with pytest.raises(ValueError, match="AccelConfig: channels_last must be 'auto', true or false, got 'yes'"):
        AccelConfig(channels_last="yes")
    # the pool trial's dict names the same key and value
    with pytest.raises(ValueError, match="AccelConfig: amp must be .* got 'fp8'"):
        train_segmenter({"arch": "unet_r18", "lr": 1e-3, "seed": 0, "cache": "c", "source": "A", "targets": [],
                         "experiment_dir": "e", "epochs": 1, "amp": "fp8"})


def test_fp16_step_goes_through_the_grad_scaler():
    torch.manual_seed(0)
    a = accel_for(AccelConfig(amp="fp16"), torch.device("cpu"))
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    losses = []
    for _ in range(5):
        with a.autocast():
            out = net(x)
        assert out.dtype == torch.float16
        loss = (out.float() - y).pow(2).mean()
        a.step(loss, opt)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    state = a.scaler.state_dict()  # the scaler saw every step: finite ones since its last back-off
    assert state["scale"] <= 65536.0 and 1 <= state["_growth_tracker"] <= 5


def test_augment_flips_image_and_mask_together():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    y = (x > 4).to(torch.uint8)[:, 0]
    gen = torch.Generator().manual_seed(0)
    out = augment_flips({"x": x, "y": y, "other": torch.ones(2)}, gen, ("x", "y"))
    assert torch.equal(out["other"], torch.ones(2))  # keys not named are untouched
    for i in range(2):
        xi = out["x"][i, 0]
        candidates = [x[i, 0], x[i, 0].flip(-1), x[i, 0].flip(-2), x[i, 0].flip(-1).flip(-2)]
        k = next(j for j, c in enumerate(candidates) if torch.equal(xi, c))
        ycand = [y[i], y[i].flip(-1), y[i].flip(-2), y[i].flip(-1).flip(-2)]
        assert torch.equal(out["y"][i], ycand[k])  # the mask got the image's flip
    # the same generator state gives the same flips; many samples flip about half the time
    again = augment_flips({"x": x, "y": y}, torch.Generator().manual_seed(0), ("x", "y"))
    assert torch.equal(again["x"], out["x"])
    big = torch.arange(4.0).reshape(1, 1, 2, 2).repeat(400, 1, 1, 1)
    flipped = augment_flips({"x": big}, torch.Generator().manual_seed(1), ("x",))["x"]
    h = (flipped[:, 0, 0, 0] == 1).float().mean()  # a horizontal-only flip moves 1 to the corner
    assert 0.15 < float(h) < 0.35


def _slices(exp):
    return records.merge_parts(exp)[1].sort_values(["site", "case_id", "slice_idx"]).reset_index(drop=True)


@pytest.mark.slow  # trains a model or fits δ: seconds, not a unit test's fraction of one (make test runs it)
def test_streamed_and_device_resident_training_are_identical(tiny_cache, tmp_path):
    """The DataLoader path (a worker process reading the memmap) trains on exactly the batches the
    device-resident path gathers: the same losses and the same recorded counts."""
    runs = {}
    for name, kw in {"device": {"data_placement": "device"},
                     "stream": {"data_placement": "stream", "loader_workers": 1}}.items():
        reports = []
        train_segmenter(cfg(tiny_cache, tmp_path / name, **kw), report=lambda m, c: reports.append(m))
        runs[name] = ([m["train_loss"] for m in reports], _slices(tmp_path / name))
    assert runs["device"][0] == runs["stream"][0]
    cols = ["tp", "fp", "fn", "tn"]
    assert (runs["device"][1][cols].to_numpy() == runs["stream"][1][cols].to_numpy()).all()


@pytest.mark.slow  # trains a model or fits δ: seconds, not a unit test's fraction of one (make test runs it)
def test_flip_augmentation_trains_and_resumes_exactly(tiny_cache, tiny_member, tmp_path):
    full = []
    train_segmenter(cfg(tiny_cache, tmp_path / "a", augment="flip", snapshots=[1, 2]),
                    report=lambda m, c: full.append(m["train_loss"]))
    # without flips: the session's tiny run (its other target changes no training loss)
    assert tiny_member["config"] == member_config(tiny_cache, tiny_member["exp"])
    plain = [m["train_loss"] for m, _ in tiny_member["reports"]]
    assert full != plain  # the flips change what is trained on
    saved = {}

    def keep(m, c):
        if m["epoch"] == 1:
            saved["dir"] = c
    train_segmenter(cfg(tiny_cache, tmp_path / "b", augment="flip", snapshots=[1]), report=keep)
    resumed = []
    train_segmenter(cfg(tiny_cache, tmp_path / "b", augment="flip", snapshots=[1, 2], resume_from=saved["dir"]),
                    report=lambda m, c: resumed.append(m["train_loss"]))
    assert resumed == full[1:]  # the flips of epoch 2 do not depend on where the run started
    with pytest.raises(ValueError, match="augment must be 'none' or 'flip', got 'rotate'"):
        train_segmenter(cfg(tiny_cache, tmp_path / "c", augment="rotate"))


class _SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the project's own tensor calls that wait for the device: .item(), float(), bool(),
    .tolist(), .cpu(), .numpy() made from code under trainables/. (Library internals are not counted:
    on the CPU, Adam reads its step count with .item() from a CPU tensor, which never syncs a GPU.)"""

    SYNCS = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}

    def __init__(self, everywhere: bool = False):
        super().__init__()
        self.calls: list[str] = []
        self.everywhere = everywhere

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1)
        if func in self.SYNCS and ("/trainables/" in caller.f_code.co_filename or self.everywhere):
            self.calls.append(f"{func.__name__} at {caller.f_code.co_filename}:{caller.f_lineno}")
        return func(*args, **(kwargs or {}))


def test_loops_do_not_synchronise_per_step(tiny_cache):
    """train_epoch and delta_epoch read nothing back from the device while they run."""
    from trainables.data.cache import open_slice_cache
    from trainables.models import build_model
    from trainables.dense import segmentation_loss, train_epoch
    from trainables.uncertainty import DeltaNet, delta_epoch

    cache = open_slice_cache(tiny_cache)
    rows = cache.rows("SiteA", "train")
    arrays = {"x": (str(cache.path / "images.npy"), rows), "y": (str(cache.path / "masks.npy"), rows)}
    a = Accel(torch.device("cpu"), None, False)
    data, _ = place_training_data(arrays, a.device, AccelConfig())
    model = build_model("unet_r18")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    perm = torch.randperm(len(data))
    with _SyncCounter() as counter:
        loss_sum, steps = train_epoch(model, opt, segmentation_loss(1), data, perm, 4, a)
    assert steps == len(data) // 4 and counter.calls == []
    ddata, _ = place_training_data(arrays, a.device, AccelConfig(),
                                   extra={"yh": torch.from_numpy(np.asarray(cache.masks[rows]))})
    nets = {"ggd": DeltaNet(1, width=4)}
    with _SyncCounter() as counter:
        sums, steps = delta_epoch(nets, {"ggd": torch.optim.Adam(nets["ggd"].parameters())}, ddata, perm, 4, a, 1.0)
    assert steps > 0 and counter.calls == []
    with _SyncCounter(everywhere=True) as counter:  # the counter does see a sync when there is one
        float(loss_sum)
    assert counter.calls


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_amp_matches_fp32(tmp_path):
    """bench/gpu_check.py on the CPU: the loop-vs-raw lines and the parity of AMP and fp32 training.

    Parity: unet_r18 trained on the ellipse task fp32 on the CPU and with AMP (bf16 autocast; on the
    CPU here, on the GPU where there is one) reaches the same Dice within 0.05 absolute.
    """
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--archs", "unet_r18", "delta",
                          "--steps", "2", "--size", "32", "--parity",
                          "--parity-epochs", "3"], capture_output=True, text=True, timeout=600,
                         env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [json.loads(x) for x in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    by = {(x["name"], x.get("arch")): x for x in lines}
    for arch in ("unet_r18", "delta"):
        r = by[("loop_vs_raw", arch)]
        assert r["loop_samples_per_s"] > 0 and r["raw_samples_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["loop_samples_per_s"] / r["raw_samples_per_s"], rel=0.01)
    p = by[("parity", None)]
    assert p["cpu_fp32_accel"] == "cpu fp32" and "bf16 autocast" in p["amp_accel"]
    assert p["cpu_fp32"] > 0.8 and p["amp"] > 0.8  # both learned the task
    assert p["abs_diff"] <= 0.05 and p["ok"]
    assert "unet_r18" in out.stdout and "delta" in out.stdout


def test_streamed_batches_carry_in_memory_extras(tiny_cache):
    """δ's ŷ (an in-memory tensor) travels with the streamed batches exactly as with device-resident ones."""
    from trainables.data.cache import open_slice_cache

    cache = open_slice_cache(tiny_cache)
    rows = cache.rows("SiteA", "train")
    arrays = {"x": (str(cache.path / "images.npy"), rows), "y": (str(cache.path / "masks.npy"), rows)}
    yh = torch.arange(len(rows), dtype=torch.int64)  # each row's own number: order mistakes show
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(3))
    got = {}
    for where, workers in (("device", 0), ("stream", 1)):
        data, _ = place_training_data(arrays, torch.device("cpu"),
                                      AccelConfig(data_placement=where, loader_workers=workers), extra={"yh": yh})
        got[where] = list(data.batches(perm, 5))
    assert len(got["device"]) == len(got["stream"]) == len(rows) // 5 + (len(rows) % 5 >= 2)
    for a, b in zip(got["device"], got["stream"]):
        assert set(a) == set(b) == {"x", "y", "yh"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.cat([b["yh"] for b in got["stream"]]), perm[: sum(len(b["yh"]) for b in got["stream"])])
