"""The raw-model-step anchors: what each workload of the paper costs at the hardware's limit.

Every measurement is a bare library model (segmentation_models_pytorch, timm, segment_anything) with
random weights (throughput does not depend on the weights) on one fixed batch already on the device:
no data loading, no metrics, no reporting. The project's own loops are held against these numbers
(``bench/gpu_check.py``, ``bench/gpu_medsam.py``); the figures measured on an H100 are in
``docs/performance.md``, "GPU anchors".

Settings (the same for every section): bf16 autocast on CUDA, channels_last for the CNNs,
``cudnn.benchmark`` and TF32 on, binary cross-entropy, Adam (lr 1e-4) with its step included; a few
warm-up steps, then the mean over the timed steps, synchronised with the device.

Sections (name them on the command line to run only those):

* ``sam_encoder``: SAM ViT-B and ViT-L image encoders, inference at 1024², batch 8, fp32 and bf16;
* ``sam_decoder_train``: SAM ViT-B's mask decoder trained from cached 256x64x64 embeddings with one
  box per image (batch 32), and the same step with the frozen encoder recomputed (batch 8);
* ``smp_train``: smp Unet / UnetPlusPlus with resnet50, efficientnet-b0 and resnet18 encoders,
  256² batch 32 and 512² batch 16;
* ``transunet_encoder_train``: timm's ``vit_base_r50_s16_224`` (TransUNet's encoder), 224², batch 32;
* ``gpu_sharing``: 1, 2 and 4 processes each training smp Unet-resnet50 (256², batch 16) on one GPU.

    python bench/anchor_gpu.py                          # every section, on the GPU
    python bench/anchor_gpu.py smp_train sam_decoder_train
    python bench/anchor_gpu.py --smoke                  # on a CPU, tiny sizes: checks the script, numbers not comparable

One JSON line per measurement on stdout, also appended to ``$OUT/anchor_gpu.jsonl`` when ``OUT`` is set.
A comparison holds only on one card in one run: compare ratios, not absolute numbers from another card.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F


class Bench:
    """The device, the sizes (full or ``--smoke``) and the output of one run."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.dev.type == "cuda"
        self.warmup, self.iters = (1, 2) if smoke else (3, 10)

    def emit(self, **kw) -> None:
        line = json.dumps(kw)
        print(line, flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "anchor_gpu.jsonl"), "a") as f:
                f.write(line + "\n")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, fn, warmup: int | None = None, iters: int | None = None) -> float:
        """Mean seconds of one call of ``fn`` after the warm-up calls."""
        warmup, iters = warmup or self.warmup, iters or self.iters
        for _ in range(warmup):
            fn()
        self.sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return (time.perf_counter() - t) / iters

    def autocast(self, dtype=torch.bfloat16):
        return torch.autocast(self.dev.type, dtype=dtype, enabled=self.cuda and dtype != torch.float32)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def train_step(self, model, opt, x, y, forward=None):
        forward = forward or model

        def step():
            with self.autocast():
                loss = F.binary_cross_entropy_with_logits(forward(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step


@contextlib.contextmanager
def one_prompt_per_image():
    """segment_anything's MaskDecoder repeats the image embedding once per prompt (one image, many
    prompts); batched training has one box per image, so a batch of B would become B² rows. While
    this is active a repeat by the batch's own size is skipped. The library has no switch for it;
    the project's loop gets the same effect with ``torch.func.vmap`` (``trainables/sam/modeling.py``)."""
    orig = torch.repeat_interleave

    def repeat(t, r, dim=0):
        return t if isinstance(r, int) and t.shape[0] == r else orig(t, r, dim=dim)
    torch.repeat_interleave = repeat
    try:
        yield
    finally:
        torch.repeat_interleave = orig


def sam_encoder(b: Bench) -> None:
    from segment_anything import sam_model_registry
    if b.smoke:  # 16 s an image on a 2-core CPU: nothing to learn from it in a smoke run
        b.emit(name="sam_encoder", skipped="smoke run")
        return
    for kind in ["vit_b", "vit_l"]:
        sam = sam_model_registry[kind](checkpoint=None).to(b.dev).eval()
        x = torch.randn(8, 3, 1024, 1024, device=b.dev)
        for dtype in [torch.float32, torch.bfloat16]:
            def step():
                with torch.no_grad(), b.autocast(dtype):
                    sam.image_encoder(x)
            s = b.seconds(step, 2, 5)
            b.emit(name="sam_encoder", kind=kind, dtype=str(dtype), batch=8, img_per_s=8 / s, peak_gib=b.peak_gib())
        del sam


def sam_decoder_train(b: Bench) -> None:
    from segment_anything import sam_model_registry
    sam = sam_model_registry["vit_b"](checkpoint=None).to(b.dev)
    for p in list(sam.image_encoder.parameters()) + list(sam.prompt_encoder.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.Adam(sam.mask_decoder.parameters(), lr=1e-4)
    n = 2 if b.smoke else 32
    emb = torch.randn(n, 256, 64, 64, device=b.dev)
    boxes = torch.tensor([[100.0, 120.0, 400.0, 500.0]], device=b.dev).repeat(n, 1)
    gt = (torch.rand(n, 1, 256, 256, device=b.dev) > 0.5).float()

    def decode(embeddings, k):
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[:k, None, :], masks=None)
        masks, _ = sam.mask_decoder(image_embeddings=embeddings, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=False)
        return masks

    with one_prompt_per_image():
        step = b.train_step(sam.mask_decoder, opt, emb, gt, forward=lambda e: decode(e, n))
        s = b.seconds(step)
        b.emit(name="sam_decoder_train_cached", batch=n, samples_per_s=n / s, peak_gib=b.peak_gib())
        if b.smoke:
            b.emit(name="sam_decoder_train_full_encoder_each_step", skipped="smoke run")
            return
        x = torch.randn(8, 3, 1024, 1024, device=b.dev)

        def full(inp):
            with torch.no_grad(), b.autocast():
                e = sam.image_encoder(inp)
            return decode(e.float(), 8)
        s = b.seconds(b.train_step(sam.mask_decoder, opt, x, gt[:8], forward=full), 2, 5)
        b.emit(name="sam_decoder_train_full_encoder_each_step", batch=8, samples_per_s=8 / s)


def smp_train(b: Bench) -> None:
    import segmentation_models_pytorch as smp
    configs = [("Unet", "resnet50"), ("UnetPlusPlus", "resnet50"), ("Unet", "efficientnet-b0"),
               ("UnetPlusPlus", "efficientnet-b0"), ("Unet", "resnet18")]
    sizes = [(64, 2)] if b.smoke else [(256, 32), (512, 16)]
    for arch, enc in configs:
        for size, n in sizes:
            model = getattr(smp, arch)(encoder_name=enc, encoder_weights=None, in_channels=3, classes=1).to(b.dev)
            model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            x = torch.randn(n, 3, size, size, device=b.dev).to(memory_format=torch.channels_last)
            y = (torch.rand(n, 1, size, size, device=b.dev) > 0.5).float()
            if b.cuda:
                torch.cuda.reset_peak_memory_stats()
            s = b.seconds(b.train_step(model, opt, x, y))
            b.emit(name="smp_train", arch=arch, encoder=enc, size=size, batch=n, samples_per_s=n / s,
                   peak_gib=b.peak_gib())
            del model, opt


def transunet_encoder_train(b: Bench) -> None:
    import timm
    model = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0).to(b.dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    n = 2 if b.smoke else 32
    x = torch.randn(n, 3, 224, 224, device=b.dev)

    def step():  # no decoder: the loss is the features' mean square, which trains the whole encoder
        with b.autocast():
            loss = model.forward_features(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    s = b.seconds(step)
    b.emit(name="transunet_encoder_train", batch=n, samples_per_s=n / s, peak_gib=b.peak_gib())


def _sharing_worker(q) -> None:
    import segmentation_models_pytorch as smp
    b = Bench(smoke=False)
    model = smp.Unet(encoder_name="resnet50", encoder_weights=None, classes=1).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(16, 3, 256, 256, device="cuda").to(memory_format=torch.channels_last)
    y = (torch.rand(16, 1, 256, 256, device="cuda") > 0.5).float()
    q.put(16 / b.seconds(b.train_step(model, opt, x, y), 5, 40))


def gpu_sharing(b: Bench) -> None:
    if not b.cuda:
        b.emit(name="gpu_sharing", skipped="no GPU")
        return
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    for n in [1, 2, 4]:
        q = ctx.Queue()
        procs = [ctx.Process(target=_sharing_worker, args=(q,)) for _ in range(n)]
        t = time.perf_counter()
        for p in procs:
            p.start()
        rates = [q.get(timeout=240) for _ in procs]
        for p in procs:
            p.join()
        b.emit(name="gpu_sharing_unet_r50_256", procs=n, aggregate_samples_per_s=sum(rates),
               per_proc=rates, wall_s=time.perf_counter() - t)


SECTIONS = {f.__name__: f for f in [sam_encoder, sam_decoder_train, smp_train, transunet_encoder_train, gpu_sharing]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sections", nargs="*", metavar="SECTION",
                    help=f"run only these ({', '.join(SECTIONS)}); default: all")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (minutes on 2 CPU cores); checks the script, numbers not comparable")
    args = ap.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    b = Bench(args.smoke)
    if not b.cuda and not args.smoke:
        ap.error("no CUDA device: the anchors are GPU figures; --smoke runs the script on the CPU")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    b.emit(name="env", torch=torch.__version__, device=torch.cuda.get_device_name(0) if b.cuda else "cpu",
           python=sys.version.split()[0], smoke=args.smoke)
    failed = 0
    for name, fn in SECTIONS.items():
        if args.sections and name not in args.sections:
            continue
        t = time.perf_counter()
        try:
            if b.cuda:
                torch.cuda.reset_peak_memory_stats()
            fn(b)
        except Exception as e:  # one failing section must not cost the others' measurements
            failed += 1
            b.emit(name=name, error=repr(e)[:300])
            traceback.print_exc()
        finally:
            if b.cuda:
                torch.cuda.empty_cache()
        print(f"# {name} took {time.perf_counter() - t:.1f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
