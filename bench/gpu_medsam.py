"""GPU check for MedSAM: the project's own code held against the raw-step anchors (goal: >= 80%).

The anchors are ``bench/anchor_gpu.py``'s figures on an H100 (docs/performance.md, "GPU anchors").

Runs without Ray. Prints, for SAM ViT-B at 1024 px (random weights; throughput does not depend on them):

1. **encoder**: image-encoder inference on preprocessed batches (``MedSAM.embed``'s encoder call,
   fp32) -- anchor 55 img/s at batch 8;
2. **embedding cache build**: ``ensure_embeddings`` over a synthetic slice cache (SamPredictor's
   preprocessing of every slice, the encoder, float16 writes to the memmap) -- same anchor;
3. **cached decoder training**: ``decoder_step`` (the step ``train_medsam`` runs: vmapped decoder,
   ``Sam.postprocess_masks``, MONAI Dice+CE, Adam; bf16 autocast on CUDA) from device-resident
   float16 embeddings with jittered boxes -- anchor 1126 samples/s at batch 32;
4. **train_segmenter**: one epoch of the real trainable (``arch: medsam``) on that cache; its
   ``train_seconds`` gives the loop's samples/s (data, jitter, reporting included) -- same anchor.

Each line shows the measured throughput and its fraction of the anchor. A comparison holds only on
the same card: run ``python bench/anchor_gpu.py sam_encoder sam_decoder_train`` beside it and compare ratios.

    python bench/gpu_medsam.py                 # on a GPU: ViT-B, 1024 px
    python bench/gpu_medsam.py --smoke         # anywhere (CPU): SAM ViT-B at 256 px, a few steps,
                                               # and medsam_tiny for the trainable; fractions not comparable
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss

from trainables.data.cache import build_slice_cache, open_slice_cache
from trainables.data.synthetic import write_synthetic_sites
from trainables.medsam import amp_dtype, build_medsam, decoder_step, ensure_embeddings, jitter_boxes, slice_prompts
from trainables.segment import train_segmenter

ANCHOR_ENCODER = 55.0     # img/s, SAM ViT-B image encoder inference, 1024², batch 8, fp32 (H100)
ANCHOR_DECODER = 1126.0   # samples/s, SAM ViT-B mask decoder train step from cached embeddings, batch 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _line(what: str, value: float, unit: str, anchor: float, smoke: bool) -> None:
    frac = f"{value / anchor:6.1%} of the H100 anchor {anchor:g}" + (" (smoke run: not comparable)" if smoke else "")
    print(f"{what:44s} {value:9.2f} {unit:10s} {frac}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="reduced sizes, runs on a CPU in about a minute")
    ap.add_argument("--img-size", type=int, default=None, help="SAM input size (default 1024; smoke 256)")
    ap.add_argument("--slice-size", type=int, default=None, help="slice cache size (default 256; smoke 64)")
    ap.add_argument("--steps", type=int, default=None, help="timed decoder steps (default 50; smoke 3)")
    ap.add_argument("--cases", type=int, default=None, help="synthetic cases per site (default 20; smoke 1)")
    ap.add_argument("--no-amp", action="store_true", help="decoder steps in fp32")
    args = ap.parse_args()
    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        print("no GPU here: run with --smoke for a reduced CPU check", file=sys.stderr)
        return 2
    img = args.img_size or (256 if smoke else 1024)
    size = args.slice_size or (64 if smoke else 256)
    steps = args.steps or (3 if smoke else 50)
    cases = args.cases or (1 if smoke else 20)
    enc_bs, dec_bs = (2, 4) if smoke else (8, 32)
    amp = None if args.no_amp else amp_dtype("auto", device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}; SAM vit_b at {img}px, slices {size}px, "
          f"decoder {'bf16 autocast' if amp else 'fp32'}")

    model = build_medsam(1, "vit_b", img, init_seed=0, quiet=True).to(device)

    # 1. the encoder alone, on preprocessed batches
    x = model.model_input(np.random.default_rng(0).random((enc_bs, 1, size, size), dtype=np.float32))
    with torch.no_grad():
        model.sam.image_encoder(x)  # warm-up
        _sync(device)
        n_iter = 2 if smoke else 10
        t = time.perf_counter()
        for _ in range(n_iter):
            model.sam.image_encoder(x)
        _sync(device)
    _line(f"1 encoder inference, batch {enc_bs}", enc_bs * n_iter / (time.perf_counter() - t), "img/s",
          ANCHOR_ENCODER, smoke)
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    with tempfile.TemporaryDirectory(prefix="oodsweep-gpu-medsam-") as tmp:
        tmp = Path(tmp)
        sites = ["SiteA", "SiteB"]
        write_synthetic_sites(tmp / "data", sites=sites, cases_per_site=max(cases, 2), shape=(80, 80, 8 if smoke else 24))
        cache_dir = build_slice_cache("prostate_multisite", tmp / "data", sites, size, tmp / "cache",
                                      test_fraction=0.5, progress=False)
        cache = open_slice_cache(cache_dir)

        # 2. the embedding cache build (preprocessing + encoder + float16 memmap writes)
        t = time.perf_counter()
        emb, computed = ensure_embeddings(model, cache, tmp / "emb", device, batch_size=enc_bs, progress=False)
        _sync(device)
        assert computed
        _line(f"2 embedding cache build, {len(cache.images)} slices", len(cache.images) / (time.perf_counter() - t),
              "img/s", ANCHOR_ENCODER, smoke)

        # 3. cached decoder training steps, as train_medsam runs them
        pos, boxes, targets = slice_prompts(np.asarray(cache.masks))
        emb_dev = torch.from_numpy(np.array(emb)).to(device)
        targets_dev = torch.from_numpy(targets).to(device)
        boxes_t = torch.from_numpy(boxes)
        pos_dev = torch.from_numpy(pos).to(device)
        model.train()
        opt = torch.optim.Adam(model.sam.mask_decoder.parameters(), lr=1e-4)
        loss_fn = DiceCELoss(sigmoid=True)
        gen = torch.Generator().manual_seed(0)
        hw = (size, size)

        def step(i: int) -> None:
            b = torch.arange(i * dec_bs, (i + 1) * dec_bs) % len(pos)
            b_dev = b.to(device)
            decoder_step(model, opt, loss_fn, emb_dev[pos_dev[b_dev]].float(),
                         jitter_boxes(boxes_t[b], hw, 20, gen), targets_dev[b_dev][:, None].float(), hw, amp)

        for i in range(2):
            step(i)
        _sync(device)
        t = time.perf_counter()
        for i in range(steps):
            step(i)
        _sync(device)
        _line(f"3 cached decoder train step, batch {dec_bs}", dec_bs * steps / (time.perf_counter() - t),
              "samples/s", ANCHOR_DECODER, smoke)
        if device.type == "cuda":
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

        # 4. the trainable itself (embeddings already cached for the registry's medsam at 1024 px
        #    only when img is 1024; the smoke run uses medsam_tiny and builds its own)
        arch = "medsam" if img == 1024 else "medsam_tiny"
        cfg = {"arch": arch, "lr": 1e-4, "seed": 0, "cache": str(cache_dir), "source": "SiteA", "targets": ["SiteB"],
               "experiment_dir": str(tmp / "exp"), "epochs": 3, "batch_size": dec_bs,
               "embedding_dir": str(tmp / "emb"), "amp": amp is not None}
        out: list[dict] = []
        train_segmenter(cfg, report=lambda m, d: out.append(m))
        n_train = len(slice_prompts(np.asarray(cache.masks[cache.rows("SiteA", "train")]))[0])
        last = out[-1]  # the last epoch: no embedding build, warm kernels
        _line(f"4 train_segmenter({arch}) epoch, {n_train} prompts", n_train / last["train_seconds"], "samples/s",
              ANCHOR_DECODER, smoke)
        print(f"  epoch 1: embeddings {out[0]['embed_seconds']:.1f}s, train {out[0]['train_seconds']:.2f}s, "
              f"eval {out[0]['eval_seconds']:.2f}s; last epoch: train {last['train_seconds']:.2f}s, "
              f"eval {last['eval_seconds']:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
