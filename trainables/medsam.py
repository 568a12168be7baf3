"""MedSAM's public names, as callers imported them before ``trainables.sam`` was split by concern.

A re-export only (nothing is defined here, and nothing inside ``trainables`` imports this module):
``sweeps.embeddings``, ``sweeps.spec``, the tests and the benches import from here. New code imports
from the ``trainables.sam`` module that owns the name; see ``trainables.sam`` for the design.
"""
from __future__ import annotations

from .sam.build import (LITE_FIX, SAM_CHECKPOINT_FIX, build_medsam, bundled_lite_checkpoint, checkpoint_family,
                        file_sha256, load_sam_weights, read_sam_checkpoint, sam_variant_of, verify_sha256)
from .sam.embeddings import (EMBED_VERSION, EMBEDDED, ENCODER_RUNS, embedding_folder, embedding_key, embedding_key_for,
                             embeddings_root, encoder_runs, encoder_source, ensure_embeddings, foreground_rows,
                             missing_embeddings, prepare_embeddings, sweep_rows)
from .sam.frozen import (load_medsam_member, member_state, oracle_forward, predict_member_rows,
                         prompted_mc_dropout_map)
from .sam.loop import decoder_step, train_medsam
from .sam.modeling import (LITE, LITE_IMG_SIZE, LITE_PIXEL_MEAN, LITE_PIXEL_STD, LITE_SHA256, PIXEL_MEAN, PIXEL_STD,
                           SAM_VARIANTS, MedSAM, build_sam, encoder_key)
from .sam.options import EmbeddingJob, SamOptions, amp_dtype, build_member_model
from .sam.prompts import jitter_boxes, mask_boxes, slice_prompts
from .sam.scoring import NO_BOX_LOGIT, evaluate_prompted, predict_prompted, prompted_logits

__all__ = [
    "LITE_FIX", "SAM_CHECKPOINT_FIX", "build_medsam", "bundled_lite_checkpoint", "checkpoint_family", "file_sha256",
    "load_sam_weights", "read_sam_checkpoint", "sam_variant_of", "verify_sha256",
    "EMBED_VERSION", "EMBEDDED", "ENCODER_RUNS", "embedding_folder", "embedding_key", "embedding_key_for",
    "embeddings_root", "encoder_runs", "encoder_source", "ensure_embeddings", "foreground_rows",
    "missing_embeddings", "prepare_embeddings", "sweep_rows",
    "load_medsam_member", "member_state", "oracle_forward", "predict_member_rows", "prompted_mc_dropout_map",
    "decoder_step", "train_medsam",
    "LITE", "LITE_IMG_SIZE", "LITE_PIXEL_MEAN", "LITE_PIXEL_STD", "LITE_SHA256", "PIXEL_MEAN", "PIXEL_STD",
    "SAM_VARIANTS", "MedSAM", "build_sam", "encoder_key",
    "EmbeddingJob", "SamOptions", "amp_dtype", "build_member_model",
    "jitter_boxes", "mask_boxes", "slice_prompts",
    "NO_BOX_LOGIT", "evaluate_prompted", "predict_prompted", "prompted_logits",
]
