"""GPU check: the project's own training loops against the raw model step, per architecture.

Runs without Ray (a GPU machine need not have it installed): it imports ``trainables`` only. For each architecture
it writes a synthetic training split (random images with elliptic masks, as ``.npy`` files like a
slice cache's), places it with ``trainables.accel.place_training_data`` (on the device, as a pool
trial would), and times

* **loop**: ``segment.train_epoch`` over ``--steps`` batches, the function ``train_segmenter`` runs
  each epoch (batch gathering on the device, bf16 autocast, channels_last, MONAI DiceCE, fused Adam,
  the loss summed on the device), after a warm-up epoch;
* **raw**: the model step of ``bench/anchor_gpu.py``, measured in the same run on the same
  card: the model on one fixed batch already on the device, bf16 autocast, channels_last, BCE, Adam,
  3 warm-up and 10 timed steps;

and prints samples/s of both and their ratio. ``delta`` is the δ loop (``uncertainty.delta_epoch``, the
paper's δ only) against the raw smp Unet-resnet18 step (the anchor table's "size of the δ net", docs/performance.md), and
also against a raw step of δ's own network. Goals: loop/raw >= 0.80 for unet_r50, unetpp_r50,
unet_effb0 and transunet at 256², and >= 0.70 for the δ loop. Box-prompted models (medsam,
medsam_tiny) train their decoder from cached embeddings: ``bench/gpu_medsam.py`` checks them.

``--parity`` trains unet_r18 on a small synthetic task twice, fp32 on the CPU and with the device's
AMP (bf16 autocast on a GPU; CPU bf16 autocast where there is none), and compares the Dice.

On the CPU the same script runs at 64², batch 8, fp32 (CPU figures: docs/performance.md, "CPU anchors").

    python bench/gpu_check.py                      # every architecture, defaults for the device
    python bench/gpu_check.py --archs unet_r50 delta --steps 20 --parity
    python bench/gpu_check.py --anchor [PATH]      # also run anchor_gpu.py's smp/transunet sections

Writes one JSON line per measurement to ``$OUT/gpu_check.jsonl`` when ``OUT`` is set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainables.accel import accel_for, place_training_data  # noqa: E402
from trainables.config import AccelConfig  # noqa: E402
from trainables.models import MODELS, build_model  # noqa: E402
from trainables.dense import segmentation_loss, train_epoch  # noqa: E402

GOALS = {"unet_r50": 0.80, "unetpp_r50": 0.80, "unet_effb0": 0.80, "transunet": 0.80, "delta": 0.70}
ANCHOR = ROOT / "bench" / "anchor_gpu.py"


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "gpu_check.jsonl", "a") as f:
            f.write(json.dumps(kw) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_split(folder: Path, n: int, size: int, channels: int = 1, seed: int = 0) -> dict:
    """``n`` random slices with an ellipse each, written like a slice cache's arrays."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1))
    ry, rx = rng.uniform(0.1, 0.25, (2, n, 1, 1))
    masks = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
    images = (0.3 + 0.4 * masks[:, None] + 0.15 * rng.standard_normal((n, channels, size, size))).astype(np.float16)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images)
    np.save(folder / "masks.npy", masks)
    rows = np.arange(n)
    return {"x": (str(folder / "images.npy"), rows), "y": (str(folder / "masks.npy"), rows)}


def raw_step_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                  forward=None, warmup: int = 3, iters: int = 10) -> float:
    """samples/s of anchor_gpu.py's train step (bf16 autocast on CUDA, channels_last, BCE, Adam)."""
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = forward or (lambda m, inp: m(inp))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.binary_cross_entropy_with_logits(forward(model, x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return len(x) * iters / (time.perf_counter() - t)


def loop_rate(run_epoch, data, bs: int, steps: int, device: torch.device) -> float:
    """samples/s of the project's epoch function over ``steps`` batches, after a warm-up epoch."""
    gen = torch.Generator().manual_seed(0)
    n = steps * bs
    run_epoch(torch.randperm(len(data), generator=gen)[: max(2 * bs, n // 4)])  # warm-up (cudnn autotune)
    sync(device)
    t = time.perf_counter()
    run_epoch(torch.randperm(len(data), generator=gen)[:n])
    sync(device)
    return n / (time.perf_counter() - t)


def check_arch(arch: str, device: torch.device, size: int, bs: int, steps: int, tmp: Path) -> dict:
    cfg = AccelConfig(amp="auto", channels_last="auto", data_placement="auto")
    accel = accel_for(cfg, device)
    in_ch = 1
    arrays = synthetic_split(tmp / arch, steps * bs, size, in_ch)
    data, where = place_training_data(arrays, device, cfg)
    model = accel.model(build_model(arch, in_channels=in_ch, classes=1, bn_momentum=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    loss_fn = segmentation_loss(1)
    loop = loop_rate(lambda perm: train_epoch(model, opt, loss_fn, data, perm, bs, accel), data, bs, steps, device)
    del model, opt, data
    x = torch.randn(bs, in_ch, size, size, device=device)
    y = (torch.rand(bs, 1, size, size, device=device) > 0.5).float()
    raw = raw_step_rate(build_model(arch, in_channels=in_ch, classes=1).to(device), x, y, device)
    return {"loop": loop, "raw": raw, "where": where, "accel": accel.describe()}


def check_delta(device: torch.device, size: int, bs: int, steps: int, tmp: Path) -> dict:
    import segmentation_models_pytorch as smp

    from trainables.uncertainty import DeltaNet, delta_epoch

    cfg = AccelConfig(amp="auto", channels_last="auto", data_placement="auto")
    accel = accel_for(cfg, device)
    arrays = synthetic_split(tmp / "delta", steps * bs, size)
    yhat = torch.from_numpy(np.load(arrays["y"][0]))  # a frozen member's prediction: the mask itself
    data, where = place_training_data(arrays, device, cfg, extra={"yh": yhat})
    nets = {"ggd": accel.model(DeltaNet(1))}
    opts = {"ggd": torch.optim.Adam(nets["ggd"].parameters(), lr=1e-4, fused=device.type == "cuda" or None)}
    loop = loop_rate(lambda perm: delta_epoch(nets, opts, data, perm, bs, accel, 1.0), data, bs, steps, device)
    del nets, opts, data
    y = (torch.rand(bs, 1, size, size, device=device) > 0.5).float()
    raw_r18 = raw_step_rate(smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=3, classes=1)
                            .to(device), torch.randn(bs, 3, size, size, device=device), y, device)
    x1 = torch.randn(bs, 1, size, size, device=device)
    raw_delta = raw_step_rate(DeltaNet(1).to(device), x1, y, device, forward=lambda m, inp: m(inp, y)[0])
    return {"loop": loop, "raw": raw_r18, "raw_delta_net": raw_delta, "where": where, "accel": accel.describe()}


def parity(device: torch.device, size: int = 64, epochs: int = 6, tmp: Path | None = None) -> dict:
    """Dice of unet_r18 trained fp32 on the CPU and with AMP on ``device`` (CPU bf16 autocast if no GPU)."""
    from trainables.metrics import confusion_counts

    arrays = synthetic_split(tmp / "parity", 96, size, seed=1)
    held = synthetic_split(tmp / "parity-test", 48, size, seed=2)
    xt = torch.from_numpy(np.load(held["x"][0]))
    yt = torch.from_numpy(np.load(held["y"][0])).bool()
    out = {}
    for name, dev, amp in [("cpu_fp32", torch.device("cpu"), "off"), ("amp", device, "auto" if device.type == "cuda"
                                                                        else "bf16")]:
        cfg = AccelConfig(amp=amp, channels_last="auto", data_placement="device")
        accel = accel_for(cfg, dev)
        torch.manual_seed(0)
        model = accel.model(build_model("unet_r18", bn_momentum=0.1))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        data, _ = place_training_data(arrays, dev, cfg)
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            train_epoch(model, opt, segmentation_loss(1), data, torch.randperm(len(data), generator=gen), 8, accel)
        model.eval()
        with torch.inference_mode(), accel.autocast():
            pred = model(accel.images(xt))[:, 0].float().cpu() > 0
        c = confusion_counts(pred, yt).sum(0).double()
        out[name] = float(2 * c[0] / (2 * c[0] + c[1] + c[2]))
        out[f"{name}_accel"] = accel.describe()
    out["abs_diff"] = abs(out["cpu_fp32"] - out["amp"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smp_like = [n for n, m in MODELS.items() if not m.prompted]
    ap.add_argument("--archs", nargs="+", default=smp_like + ["delta"],
                    help=f"architectures to check (default: {' '.join(smp_like)} delta)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=None, help="slice size (default 256 on a GPU, 64 on the CPU)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 32 on a GPU, 8 on the CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per loop (default 30 on a GPU, 4 on the CPU)")
    ap.add_argument("--parity", action="store_true", help="also compare the Dice of AMP and CPU fp32 training")
    ap.add_argument("--parity-epochs", type=int, default=6, help="epochs of each parity run (default 6)")
    ap.add_argument("--anchor", nargs="?", const=str(ANCHOR), default=None, metavar="ANCHOR_GPU_PY",
                    help=f"also run anchor_gpu.py's smp_train and transunet_encoder_train sections "
                         f"(default: the repository's bench/anchor_gpu.py)")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    size = args.size or (256 if cuda else 64)
    bs = args.batch or (32 if cuda else 8)
    steps = args.steps or (30 if cuda else 4)
    unknown = [a for a in args.archs if a != "delta" and a not in MODELS]
    if unknown:
        ap.error(f"unknown architectures {unknown}; registered: {', '.join(MODELS)} (and delta)")
    emit(name="env", device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
         python=sys.version.split()[0], size=size, batch=bs, steps=steps, threads=torch.get_num_threads())
    if cuda:
        torch.backends.cudnn.benchmark = True
    results, failed = {}, []
    with tempfile.TemporaryDirectory(prefix="oodsweep-gpucheck-") as tmp:
        for arch in args.archs:
            if arch != "delta" and MODELS[arch].prompted:
                print(f"# {arch}: box-prompted, checked by bench/gpu_medsam.py", flush=True)
                continue
            t = time.perf_counter()
            try:
                r = (check_delta(device, size, bs, steps, Path(tmp)) if arch == "delta"
                     else check_arch(arch, device, size, bs, steps, Path(tmp)))
            except Exception as e:  # one architecture must not cost the others' measurements
                emit(name="loop_vs_raw", arch=arch, error=repr(e)[:300])
                failed.append(arch)
                continue
            finally:
                if cuda:
                    torch.cuda.empty_cache()
            r["ratio"] = r["loop"] / r["raw"]
            results[arch] = r
            emit(name="loop_vs_raw", arch=arch, loop_samples_per_s=round(r["loop"], 2),
                 raw_samples_per_s=round(r["raw"], 2), ratio=round(r["ratio"], 3),
                 **({"raw_delta_net_samples_per_s": round(r["raw_delta_net"], 2),
                     "ratio_vs_delta_net": round(r["loop"] / r["raw_delta_net"], 3)} if "raw_delta_net" in r else {}),
                 accel=r["accel"], data=r["where"], seconds=round(time.perf_counter() - t, 1))
        p = None
        if args.parity:
            p = parity(device, epochs=args.parity_epochs, tmp=Path(tmp))
            emit(name="parity", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.items()},
                 tolerance=0.05, ok=p["abs_diff"] <= 0.05)
    print(f"\n# {'arch':<15} {'loop/s':>9} {'raw/s':>9} {'ratio':>6}  goal")
    ok = True
    for arch, r in results.items():
        goal = GOALS.get(arch)
        at_goal_size = cuda and size == 256
        verdict = "" if goal is None else (f">= {goal:.2f} " + (("PASS" if r["ratio"] >= goal else "FAIL")
                                                               if at_goal_size else "(a goal for a GPU at 256²)"))
        if goal is not None and at_goal_size:
            ok &= r["ratio"] >= goal
        print(f"  {arch:<15} {r['loop']:9.1f} {r['raw']:9.1f} {r['ratio']:6.2f}  {verdict}")
    if p is not None:
        ok &= p["abs_diff"] <= 0.05
        print(f"# parity, unet_r18 Dice: fp32 on the CPU {p['cpu_fp32']:.4f}, {p['amp_accel']} {p['amp']:.4f}, "
              f"|diff| {p['abs_diff']:.4f} (tolerance 0.05): {'PASS' if p['abs_diff'] <= 0.05 else 'FAIL'}")
    if not cuda:
        print("# CPU figures (fp32); the goals are for a GPU at 256²: python bench/gpu_check.py --parity")
    if args.anchor:
        if not Path(args.anchor).exists():
            print(f"# {args.anchor} not found: run bench/anchor_gpu.py by hand for the anchor table", flush=True)
        else:
            subprocess.run([sys.executable, args.anchor, "smp_train", "transunet_encoder_train"], check=False)
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
