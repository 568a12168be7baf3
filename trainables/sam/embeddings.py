"""The SAM embedding cache: the frozen image encoder runs once per (slice-cache content, encoder, image
size), into a float16 ``.npy`` beside the slice cache (see ``trainables.sam`` for the locking and the
driver's pre-stage)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..accel import resolve_device
from ..data.cache import SliceCache, open_slice_cache
from ..models import MODELS, get_model_spec, is_prompted, resolve_model
from .build import SAM_CHECKPOINT_FIX, checkpoint_family, sam_channels, sha256_cached
from .modeling import LITE, LITE_SHA256, SAM_VARIANTS, MedSAM, encoder_key
from .options import EmbeddingJob, build_member_model

EMBED_VERSION = 1


def embeddings_root(cache: SliceCache, override: str | os.PathLike | None = None) -> Path:
    """``<slice cache root>/sam-embeddings`` (beside the slice caches, on the shared storage)."""
    return Path(override) if override else Path(cache.path).parent / "sam-embeddings"


def _key_of(source: dict, content_sha256: str) -> str:
    # the variant's sizes too: a randomly initialised encoder is named by its seed alone, and the same
    # seed builds a different encoder when a variant's sizes change (medsam_tiny's patch went 8 -> 2)
    ident = {"version": EMBED_VERSION, "slices": content_sha256, "encoder": encoder_key(source),
             "sizes": SAM_VARIANTS.get(source["variant"], LITE),
             "preprocess": "sam-rgb-uint8-resize-longest-normalise-pad"}
    if source.get("channels") is not None:  # pool.sam_channels other than the default: other encoder inputs
        ident["channels"] = list(source["channels"])
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{source['variant']}-{int(source['img_size'])}-{digest}"


def embedding_key(model: MedSAM, cache: SliceCache) -> str:
    if not hasattr(model, "source"):  # a user's PromptedModel names its frozen encoder itself (encoder_key)
        ident = {"version": EMBED_VERSION, "slices": cache.manifest["content_sha256"], "encoder": model.encoder_key(),
                 "img_size": int(model.img_size)}
        return f"user-{int(model.img_size)}-{hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]}"
    return _key_of({**model.source, "img_size": model.img_size}, cache.manifest["content_sha256"])


def encoder_source(config: EmbeddingJob | dict) -> dict:
    """The ``MedSAM.source`` fields that name the frozen encoder ``build_member_model`` builds for a pool
    trial's config (an ``EmbeddingJob`` or the trial's dict), read without building it (the variant of a
    ``sam_checkpoint`` from the file, memory-mapped; its sha256 hashed once per process), so that the driver
    can tell which embedding caches a pool needs."""
    job = EmbeddingJob.of(config)
    kw = get_model_spec(job.arch).kwargs
    variant, ckpt, sha = kw["variant"], job.sam.sam_checkpoint, None
    if ckpt is not None:
        path = Path(ckpt).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"sam_checkpoint {path} does not exist; {SAM_CHECKPOINT_FIX}")
        variant = checkpoint_family(path)
        st = path.stat()
        sha = sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)
    elif variant == LITE:
        sha = LITE_SHA256  # the bundled weights (build_medsam checks the file has this hash)
    out = {"variant": variant, "img_size": int(kw["img_size"]), "sam_sha256": sha, "init_seed": job.sam.sam_init_seed}
    if job.sam.sam_channels is not None:  # as build_medsam records it: only a value other than the default
        chans = sam_channels(int(_open_cache(job).images.shape[1]), list(job.sam.sam_channels))
        if chans is not None:
            out["channels"] = list(chans)
    return out


def _open_cache(job: EmbeddingJob) -> SliceCache:
    if job.cache is None:
        raise KeyError(f"EmbeddingJob of {job.arch!r}: the config lacks 'cache' (the slice-cache folder); give a "
                       f"pool trial's config")
    return open_slice_cache(job.cache)


def embedding_key_for(config: EmbeddingJob | dict) -> str:
    """``embedding_key`` of the model and slice cache a pool trial's ``config`` names, without building it."""
    job = EmbeddingJob.of(config)
    cache = _open_cache(job)
    if resolve_model(job.arch, job.model_defs).definition is not None:  # a user's model: built to ask its key
        return embedding_key(build_member_model(job.arch, job.sam, job.seed, int(cache.images.shape[1]),
                                                job.model_defs), cache)
    return _key_of(encoder_source(job), cache.manifest["content_sha256"])


def embedding_folder(config: EmbeddingJob | dict) -> Path:
    """Where the embeddings of a pool trial's ``config`` are (or will be): ``<root>/<key>``."""
    job = EmbeddingJob.of(config)
    return embeddings_root(_open_cache(job), job.sam.embedding_dir) / embedding_key_for(job)


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


def prepare_embeddings(config: EmbeddingJob | dict) -> Path:
    """Compute (or find) the embedding cache a pool trial's ``config`` needs, without training: its folder.

    The driver's pre-stage (``sweeps.embeddings``) calls this once per distinct cache key, in a Ray task
    with the trial's resources, before the pool's trials start; the trials are then told
    ``embeddings_ready`` and only read the cache. ``config``: an ``EmbeddingJob`` or a pool trial's dict
    (``train_segmenter``'s keys; those a job does not read are ignored), converted here once; read are
    ``arch`` (box-prompted), ``cache``, the ``SamOptions``, ``source``/``targets``/``target_split``,
    ``seed``, ``device`` and ``num_threads``.
    """
    job = EmbeddingJob.of(config)
    if not is_prompted(job.arch, job.model_defs):
        raise ValueError(f"prepare_embeddings: arch {job.arch!r} is not box-prompted, so it has no SAM "
                         f"embeddings; give one of {', '.join(n for n, m in MODELS.items() if m.prompted)}")
    cache = _open_cache(job)
    if job.num_threads:
        torch.set_num_threads(job.num_threads)
    model = build_member_model(job.arch, job.sam, job.seed, in_channels=int(cache.images.shape[1]),
                               defs=job.model_defs)
    root = embeddings_root(cache, job.sam.embedding_dir)
    ensure_embeddings(model, cache, root, resolve_device(job.device), job.sam.embed_batch_size,
                      rows=sweep_rows(cache, job.source, job.targets, job.target_split))
    return root / embedding_key(model, cache)


def sweep_rows(cache: SliceCache, source: str | None, targets=(), target_split: str = "test") -> np.ndarray | None:
    """The cache rows a sweep with ``source``, ``targets`` and ``target_split`` reads: every split of the
    source (training, validation, test) and each target's ``target_split``; None (every row) when there is
    no ``source``. A target's training cases are never read, and on a CPU the encoder is the slow part
    (LiteMedSAM: about 1.5 s a slice on 2 cores), so they are not embedded."""
    if not source:
        return None
    parts = [cache.rows(source)]
    parts += [cache.rows(t, target_split) for t in targets or ()]
    return np.unique(np.concatenate(parts))


def missing_embeddings(config: EmbeddingJob | dict) -> int:
    """How many of the slices a pool trial's ``config`` reads (``sweep_rows``, with foreground) its embedding
    cache lacks: all of them when the cache does not exist."""
    job = EmbeddingJob.of(config)
    cache = _open_cache(job)
    need = _needed_rows(cache, sweep_rows(cache, job.source, job.targets, job.target_split))
    folder = embedding_folder(job)
    if not (folder / "manifest.json").exists():
        return len(need)
    return int((~_embedded(folder, cache)[need]).sum())


def _needed_rows(cache: SliceCache, rows: np.ndarray | None) -> np.ndarray:
    """The rows with foreground among ``rows`` (sorted, unique; None: every row). Only the given rows' masks
    are read: the δ stage asks once per site, and the whole cache's masks need not be read each time."""
    if rows is None:
        return foreground_rows(cache)
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    masks = np.asarray(cache.masks[rows])
    return rows[masks.reshape(len(rows), -1).any(1)]


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
    enc = model.frozen_parts()[0]
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
                "source": getattr(model, "source", None), "shape": [n, *first.shape[1:]], "dtype": "float16",
                "embedded_slices": int(embedded.sum()), "skipped_empty_slices": int(n - fg),
                "not_read_slices": int(fg - embedded.sum()),
                "rows": "slices with foreground that a sweep reads (embedded.npy); the others are zero (never read)",
                "encoder_params": sum(p.numel() for p in enc.parameters()), "device": str(device),
                "seconds": time.perf_counter() - t0, "pid": os.getpid(), "created": time.time()}
    tmp = folder / f".tmp-{os.getpid()}-manifest.json"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / "manifest.json")
