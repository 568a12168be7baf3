"""Does the SAM embedding cache pay? MedSAM decoder training steps with and without it, in one run.

    cached:    a step reads the batch's image embeddings (float16, as the cache stores them) and
               trains the mask decoder (``trainables.medsam.decoder_step``)
    uncached:  a step first runs the frozen image encoder on the batch's slices (``MedSAM.embed``:
               SamPredictor's preprocessing + ViT), then the same decoder step

Both use random weights (throughput does not depend on them) and synthetic slices with one
ellipse each. Prints per-step times and their ratio for each configuration, and how many steps
of training the one-time cache build equals. On an H100 the raw ratio for ViT-B at 1024 px is 24x
(docs/performance.md, "GPU anchors": 1126 vs 46 samples/s); on this CPU the configurations are reduced:

* ``medsam_tiny``: the registry's CPU SAM (2-layer 64-wide ViT, 64 px), 64-px slices, batch 8
* ``vit_b@256``:  SAM ViT-B with its input reduced to 256 px, 64-px slices, batch 2
* ``medsam_lite``: LiteMedSAM (TinyViT at its native 256 px, the bundled pretrained weights), 64-px
  slices, batch 2

Then the embedding cache's skipping of slices without foreground on the demo data (the synthetic
sites of ``sweeps/presets/demo.yaml``, 4 sites x 12 cases x 16 slices at 64 px): slices embedded
before (all) and after (foreground only), and the encoder time that saves at the per-slice encoder
times measured above.

    python bench/medsam.py [--steps 20] [--vitb-steps 3] [--lite-steps 3] [--threads 2] [--skip-vitb]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from monai.losses import DiceCELoss

from trainables.medsam import build_medsam, decoder_step, jitter_boxes, slice_prompts


def _slices(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = rng.random((n, 1, size, size)).astype(np.float32) * 0.3
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(0.1, 0.25, 2) * size
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        images[i, 0] += 0.5 * masks[i]
    return images.astype(np.float16), masks


def measure(name: str, variant: str, img_size: int, size: int, batch: int, steps: int) -> tuple[float, float]:
    """Prints cached vs uncached decoder steps; returns (ratio, encoder seconds per slice)."""
    model = build_medsam(1, variant, img_size, init_seed=0, quiet=True).train()
    images, masks = _slices(batch * max(steps, 2), size)
    pos, boxes, targets = slice_prompts(masks)
    opt = torch.optim.Adam(model.sam.mask_decoder.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(sigmoid=True)
    gen = torch.Generator().manual_seed(0)
    hw = (size, size)

    t = time.perf_counter()
    cache = model.embed(images).half()  # the one-time cost the cache pays (float16, like the cache)
    build_s = time.perf_counter() - t

    def step(i: int, cached: bool) -> None:
        b = torch.arange(i * batch, (i + 1) * batch) % len(pos)
        emb = cache[b].float() if cached else model.embed(images[pos[b.numpy()]])
        box = jitter_boxes(torch.from_numpy(boxes[b.numpy()]), hw, 20, gen)
        decoder_step(model, opt, loss_fn, emb, box, torch.from_numpy(targets[b.numpy()])[:, None].float(), hw)

    step(0, True), step(0, False)  # warm-up
    times = {True: 0.0, False: 0.0}
    for i in range(steps):  # alternate, so that drift in machine speed hits both alike
        for cached in (True, False):
            t = time.perf_counter()
            step(i, cached)
            times[cached] += time.perf_counter() - t
    c, u = times[True] / steps, times[False] / steps
    print(f"{name:12s} slices {size}px -> SAM {img_size}px, batch {batch}, {steps} steps: "
          f"cached {c * 1000:8.1f} ms/step ({batch / c:7.1f} samples/s)  "
          f"uncached {u * 1000:8.1f} ms/step ({batch / u:6.2f} samples/s)  ratio {u / c:5.1f}x  "
          f"(cache build {build_s:.2f}s for {len(images)} slices = {build_s / c:.0f} cached steps)", flush=True)
    return u / c, build_s / len(images)


def demo_foreground(per_slice: dict[str, float]) -> None:
    """Slices the demo's embedding cache embeds before/after skipping empty ones, and the time saved."""
    import tempfile
    from pathlib import Path

    import yaml

    from trainables.data.cache import build_slice_cache, open_slice_cache
    from trainables.data.synthetic import write_synthetic_sites
    from trainables.medsam import foreground_rows

    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "sweeps/presets/demo.yaml").read_text())["data"]
    syn = demo["synthetic"]
    sites = [demo["source"], *demo["targets"]]
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_sites(Path(tmp) / "data", sites=sites, cases_per_site=syn["cases_per_site"],
                                     shape=tuple(syn["shape"]), seed=syn["seed"])
        cache = open_slice_cache(build_slice_cache("prostate_multisite", root, sites, demo["image_size"],
                                                   Path(tmp) / "cache", test_fraction=demo["test_fraction"],
                                                   progress=False))
        n, fg = len(cache.images), len(foreground_rows(cache))
    print(f"demo data ({len(sites)} sites x {syn['cases_per_site']} cases x {syn['shape'][2]} slices): embedded "
          f"before {n} slices, after {fg} (only slices with foreground; {n - fg} skipped, "
          f"{(n - fg) / n:.0%} fewer, {n / fg:.2f}x less encoder work)")
    for name, sec in per_slice.items():
        print(f"  {name:12s} encoder {sec * 1000:8.1f} ms/slice: cache build {n * sec:7.1f}s -> {fg * sec:7.1f}s "
              f"(saves {(n - fg) * sec:.1f}s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode, medsam_tiny")
    ap.add_argument("--vitb-steps", type=int, default=3, help="timed steps per mode, ViT-B at 256 px")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lite-steps", type=int, default=3, help="timed steps per mode, medsam_lite")
    ap.add_argument("--skip-vitb", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 on the CPU")
    per_slice = {"medsam_tiny": measure("medsam_tiny", "tiny", 64, 64, 8, args.steps)[1]}
    if not args.skip_vitb:
        per_slice["vit_b@256"] = measure("vit_b@256", "vit_b", 256, 64, 2, args.vitb_steps)[1]
    per_slice["medsam_lite"] = measure("medsam_lite", "lite", 256, 64, 2, args.lite_steps)[1]
    print("H100 reference (docs/performance.md, ViT-B at 1024 px): 1126 vs 46 samples/s = 24x")
    demo_foreground(per_slice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
