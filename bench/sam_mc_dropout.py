"""Does decoding once pay for SAM's MC dropout? The direct and the factored implementation, in one run.

    direct:   ``passes`` full mask-decoder runs (transformer, upscaling, hypernetworks) per prompt with
              ``F.dropout2d`` hooked on the upscaled features: what the uncertainty stage did before
    factored: ``trainables.sam.scoring.prompted_dropout_variance``: the decoder once per prompt, then
              per pass only the product of the hypernetwork output with the kept channels

Both on LiteMedSAM (the bundled weights; the decoder random, its cost does not depend on the weights)
with 64-px slices of one ellipse each, the same seed; prints both times, their ratio and the largest
difference of the two variance maps (they draw the same dropout masks).

    python bench/sam_mc_dropout.py [--prompts 32] [--passes 8] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="slices, one box each")
    ap.add_argument("--passes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trainables.sam.build import build_medsam
    from trainables.sam.scoring import prompted_dropout_variance, prompted_logits

    model = build_medsam(1, "lite", 256, quiet=True).eval()
    n, size, p, seed, cpu = args.prompts, 64, 0.3, 7, torch.device("cpu")
    yy, xx = np.mgrid[:size, :size]
    rng = np.random.default_rng(0)
    masks = np.stack([((yy - rng.integers(20, 44)) ** 2 / 150 + (xx - rng.integers(20, 44)) ** 2 / 80 < 1)
                      for _ in range(n)]).astype(np.uint8)
    embeddings = model.embed(torch.rand(n, 1, size, size))

    t0 = time.perf_counter()
    hook = model.sam.mask_decoder.output_upscaling.register_forward_hook(
        lambda module, inputs, out: F.dropout2d(out, p, training=True))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            direct = torch.stack([torch.sigmoid(prompted_logits(model, embeddings, masks, cpu, "mask")[0])
                                  for _ in range(args.passes)]).var(dim=0, unbiased=False).numpy()
    finally:
        hook.remove()
    t_direct = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = prompted_dropout_variance(model, embeddings, masks, cpu, args.passes, p, seed)
    t_fast = time.perf_counter() - t0
    print(f"LiteMedSAM MC dropout, {n} prompts x {args.passes} passes, {args.threads} threads")
    print(f"  direct   {t_direct:7.2f} s  ({t_direct / n / args.passes * 1e3:6.1f} ms per prompt and pass)")
    print(f"  factored {t_fast:7.2f} s  ({t_fast / n / args.passes * 1e3:6.1f} ms per prompt and pass)")
    print(f"  ratio direct/factored: {t_direct / t_fast:.1f}x; max |variance difference| "
          f"{np.abs(fast - direct).max():.2e} (variance max {direct.max():.3f})")


if __name__ == "__main__":
    main()
