"""Guards before launch: can the storage folder be written, and does the spec fit the machine?

Both run before anything is written or Ray starts (``run_sweep`` calls ``check_before_launch`` first), so a
refused spec leaves nothing behind and costs seconds, not a slice cache built for nothing and trials that
run out of memory.

**Memory** (``estimate``): what one trial holds, by a stated rule of thumb, not by running it:

* activations kept for the backward pass: ``ACT_FACTOR`` x the bytes per pixel per image of
  ``ARCH_COST`` x batch size x image_size². The bytes per pixel were measured once on the CPU (fp32, one
  channel, batch 2, every tensor autograd saves, at 64² and 128²: the difference is what grows with the
  pixels, the rest is the weights); ``ACT_FACTOR`` covers the gradients and temporaries of the backward
  pass. ViT-based models add their attention matrices (depth x heads x tokens² x 4 bytes x 2).
* evaluation batches (no gradients): ``EVAL_BYTES_PER_PX`` x ``eval_batch_size`` x image_size² (two
  layers' inputs and outputs live at once, measured the same way: 195-896 B per pixel);
* weights, gradients and Adam's two moments: 16 bytes per parameter; plus ``PROCESS_BYTES`` for the
  worker process itself (PyTorch, Ray).

The box-prompted SAM models train their decoder from cached embeddings at the model's own input size,
so ``data.image_size`` does not change theirs. δ is a ResNet-18 UNet with two stems (``unet_r18``'s
cost x ``DELTA_FACTOR``) per Ray Train worker, plus the member's predictions of its fit split in memory.
The training split itself is not counted: it is streamed from the memory-mapped slice cache when it
does not fit (``trainables.accel.choose_placement``).

**Disk**: the slice cache (float16 images and uint8 masks, from the number of slices: the synthetic
preset's sizes, or the volumes' headers), the synthetic sites (5 bytes per voxel at most), each member's
weights, each training run's resume checkpoint (weights and Adam, removed when the stage ends), each
member's packed predicted masks, SAM embedding caches; less what the experiment folder and an existing
slice cache already hold.

A spec is refused when one trial of the pool or of δ needs more memory than the machine has available
(``/proc/meminfo``'s MemAvailable, or the cgroup's limit when lower), or the experiment more disk than
its file system has free; the message gives the numbers and the largest ``data.image_size`` that fits.
Several trials at once that do not fit together are logged as a warning with the
``max_concurrent_trials`` that would. On a Ray cluster the memory check runs per node after connecting
(``check_nodes``: the largest node's ``memory`` resource).
"""
from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .console import log
from .errors import ResourceError, StorageError
from .spec import SweepSpec

GiB = 2**30


@dataclass(frozen=True)
class ArchCost:
    """One architecture's size: parameters (millions), activation bytes per pixel per image kept for the
    backward pass (fp32), and for ViT-based models their attention (depth, heads, patch); ``fixed_size``:
    the input side a SAM model resizes every slice to (``data.image_size`` does not change it)."""

    params_m: float
    act_bytes_per_px: float
    attention: tuple[int, int, int] | None = None
    fixed_size: int | None = None


#: Measured as the module docstring says (``trainables.models.MODELS``; a new architecture adds its line,
#: ``tests/test_guards.py`` checks that every registered one has one).
ARCH_COST: dict[str, ArchCost] = {
    "unet_r18": ArchCost(14.3, 1281), "unet_r50": ArchCost(32.5, 2660), "unetpp_r50": ArchCost(49.0, 6115),
    "unet_effb0": ArchCost(6.3, 2599), "unetpp_effb0": ArchCost(6.6, 3463),
    "transunet": ArchCost(105.3, 5672, attention=(12, 12, 16)),
    "transunet_tiny": ArchCost(17.8, 3443, attention=(2, 3, 16)),
    "medsam": ArchCost(93.7, 1281, fixed_size=1024), "medsam_tiny": ArchCost(0.4, 1281, fixed_size=64),
    "medsam_lite": ArchCost(9.8, 1281, fixed_size=256)}
ACT_FACTOR = 2.0
EVAL_BYTES_PER_PX = 2 * 256
PROCESS_BYTES = GiB // 2
DELTA_FACTOR = 1.3
#: bytes of a SAM image embedding per slice (256 channels at 1/16 of the input side, float16)
SAM_EMBED = 256 * 2


def _cost(arch: str) -> ArchCost:
    return ARCH_COST.get(arch) or max(ARCH_COST.values(), key=lambda c: c.act_bytes_per_px)


def trial_bytes(arch: str, image_size: int, batch: int, eval_batch: int, in_channels: int = 1) -> dict[str, float]:
    """One pool trial's memory by the rule of thumb (bytes): activations, evaluation, weights, process."""
    c = _cost(arch)
    side = c.fixed_size or image_size
    px = side * side
    act = ACT_FACTOR * c.act_bytes_per_px * batch * px
    if c.attention:
        depth, heads, patch = c.attention
        act += depth * heads * (px / patch**2) ** 2 * 4 * 2 * batch
    ev = EVAL_BYTES_PER_PX * eval_batch * px * max(1, in_channels)
    return {"activations": act, "evaluation": ev, "weights": 16 * c.params_m * 1e6, "process": PROCESS_BYTES}


def _one_trial(spec: SweepSpec, image_size: int, channels: int) -> tuple[str, dict[str, float]]:
    """The pool architecture whose trial needs the most memory, and its parts."""
    from trainables.config import MemberConfig

    ev = MemberConfig.default("eval_batch_size")
    parts = {a: trial_bytes(a, image_size, spec.pool.batch_size, ev, channels) for a in spec.pool.arch.values}
    arch = max(parts, key=lambda a: max(parts[a]["activations"], parts[a]["evaluation"]) + parts[a]["weights"])
    return arch, parts[arch]


def _need(parts: dict[str, float]) -> float:
    """A trial's peak: training and evaluation take turns, weights and the process stay."""
    return max(parts["activations"], parts["evaluation"]) + parts["weights"] + parts["process"]


def _delta_bytes(spec: SweepSpec, image_size: int, fit_slices: int) -> float:
    """One δ trial: each Ray Train worker a δ net (unet_r18 x DELTA_FACTOR), plus ŷ of the fit split (float32)."""
    u = spec.uncertainty
    p = trial_bytes("unet_r18", image_size, u.batch_size, u.batch_size)
    worker = DELTA_FACTOR * max(p["activations"], p["evaluation"]) + 2 * p["weights"] + p["process"]
    return u.workers * worker + fit_slices * image_size**2 * 4 + PROCESS_BYTES


@dataclass
class Estimate:
    """What a spec needs (bytes) and how it was counted."""

    image_size: int
    slices: int
    cache_bytes: float
    pool_arch: str
    pool_parts: dict[str, float]
    pool_trial: float
    delta_trial: float
    disk: dict[str, float] = field(default_factory=dict)

    @property
    def disk_total(self) -> float:
        return sum(self.disk.values())


def data_size(spec: SweepSpec):
    """``trainables.data.size.DataSize`` of the spec's sites: from the synthetic preset's sizes, else the headers.
    None when the data cannot be sized (missing files: the cache build reports them)."""
    from trainables.data.base import DataError
    from trainables.data.size import DataSize
    from trainables.data.size import data_size as sized

    d = spec.data
    sites = [d.source, *d.targets]
    if d.synthetic is not None:
        return DataSize({s: d.synthetic.cases_per_site * d.synthetic.shape[2] for s in sites}, 1, 1)
    try:
        return sized(d.layout, d.root, sites, d.site_sources(), d.labels, d.layout_options)
    except (DataError, OSError):
        return None


def estimate(spec: SweepSpec, image_size: int | None = None, size=None) -> Estimate | None:
    """The memory and disk ``spec`` needs at ``image_size`` (default: the spec's); None if the data cannot be sized."""
    size = size or data_size(spec)
    if size is None:
        return None
    s = image_size or spec.data.image_size
    n = size.n_slices
    cache = n * s * s * (2 * size.image_channels + size.mask_channels)
    arch, parts = _one_trial(spec, s, size.image_channels)
    src = size.slices.get(spec.data.source, 0)
    fit = int(src * (1 - spec.data.test_fraction))
    delta = _delta_bytes(spec, s, fit) if spec.uncertainty is not None else 0.0
    members, runs = spec.n_members() or 1, spec.n_runs() or 1
    params = max(_cost(a).params_m for a in spec.pool.arch.values) * 1e6
    disk = {"slice cache": cache, "pool members' weights": members * params * 4,
            "resume checkpoints (removed when a stage ends)": runs * params * 12,
            "packed predictions": members * n * s * s / 8}
    if spec.uncertainty is not None:
        disk["δ resume checkpoints (removed when the stage ends)"] = members * _cost("unet_r18").params_m * 1e6 * 12
    if spec.data.synthetic is not None:
        h, w, dd = spec.data.synthetic.shape
        disk["synthetic sites"] = spec.data.synthetic.cases_per_site * (1 + len(spec.data.targets)) * h * w * dd * 5
    for a in spec.pool.arch.values:
        if _cost(a).fixed_size:
            disk[f"{a} embeddings"] = n * SAM_EMBED * (_cost(a).fixed_size // 16) ** 2
    return Estimate(s, n, cache, arch, parts, _need(parts), delta, disk)


# ------------------------------------------------------------------ the machine

def available_memory() -> int:
    """Bytes of memory this machine (or the cgroup it runs in, when lower) can still give."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # cgroup v2: a container's limit
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, avail)


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _gb(b: float) -> str:
    return f"{b / GiB:.1f} GiB" if b >= 0.1 * GiB else f"{b / 2**20:.0f} MiB"


def _largest_fitting(spec: SweepSpec, size, limit: float, which) -> int | None:
    """The largest image size (a multiple the architectures accept) whose ``which(estimate)`` is <= ``limit``."""
    from trainables.models import MODELS

    mult = math.lcm(*(MODELS[a].size_multiple for a in spec.pool.arch.values if a in MODELS), 32)
    for s in range(spec.data.image_size - mult, 0, -mult):
        est = estimate(spec, s, size)
        if est is not None and which(est) <= limit:
            return s
    return None


def check_resources(spec: SweepSpec, num_cpus: int | None = None, local: bool = True,
                    memory: int | None = None) -> Estimate | None:
    """Refuse ``spec`` when one trial cannot fit this machine's memory (``local``: trials run here) or the
    experiment cannot fit the free disk of its storage; return the estimate. ``memory``: the bytes to
    compare with (default ``available_memory()``)."""
    size = data_size(spec)
    est = estimate(spec, size=size)
    if est is None:
        return None
    s = spec.data.image_size
    if local:
        _check_cpus(spec, num_cpus)
        mem = available_memory() if memory is None else memory
        for what, need, key in (("pool", est.pool_trial, lambda e: e.pool_trial),
                                ("δ", est.delta_trial, lambda e: e.delta_trial)):
            if need <= mem:
                continue
            fit = _largest_fitting(spec, size, mem, key)
            p = est.pool_parts
            how = (f"one pool trial of {est.pool_arch} (pool.batch_size {spec.pool.batch_size}) needs about "
                   f"{_gb(need)}: activations {_gb(p['activations'])}, evaluation batches {_gb(p['evaluation'])}, "
                   f"weights and Adam {_gb(p['weights'])}, the process {_gb(p['process'])}"
                   if what == "pool" else
                   f"one δ trial (uncertainty.batch_size {spec.uncertainty.batch_size}, {spec.uncertainty.workers} "
                   f"worker(s)) needs about {_gb(need)}")
            raise ResourceError(
                f"data.image_size {s}: {how} (rules of thumb in docs/guards.md), and the slice cache of "
                f"{est.slices} slices would take {_gb(est.cache_bytes)}; this machine has {_gb(mem)} of memory "
                f"available. Use data.image_size <= {fit}, a smaller pool.batch_size, or a machine with more memory"
                if fit else
                f"data.image_size {s}: {how}; this machine has {_gb(mem)} of memory available, and no smaller "
                f"image size fits either. Use a machine with more memory")
        _warn_concurrency(spec, est, num_cpus, mem)
    _check_disk(spec, est, size)
    return est


def _check_cpus(spec: SweepSpec, num_cpus: int | None) -> None:
    """A trial that asks for more CPUs than the local Ray has would wait forever: refuse it."""
    cpus = num_cpus or os.cpu_count() or 1
    asks = [("pool.resources.cpu", spec.pool.cpu)]
    asks += [(f"pool.resources.per_arch.{a}.cpu", r["cpu"]) for a, r in spec.pool.per_arch.items() if "cpu" in r]
    if spec.uncertainty is not None:
        u = spec.uncertainty
        asks.append((f"uncertainty: trial_cpu {u.trial_cpu:g} + workers {u.workers} x resources.cpu {u.cpu:g}",
                     u.trial_cpu + u.workers * u.cpu))
    for key, n in asks:
        if n > cpus:
            raise ResourceError(f"{key} asks for {n:g} CPUs per trial but the local Ray has {cpus} "
                                f"({'--num-cpus' if num_cpus else 'this machine'}); the trial would never start. "
                                f"Ask for at most {cpus}, or run on a cluster (--address)")


def _warn_concurrency(spec: SweepSpec, est: Estimate, num_cpus: int | None, mem: float) -> None:
    cpus = num_cpus or os.cpu_count() or 1
    at_once = min(spec.n_runs() or 1, max(1, int(cpus // spec.pool.cpu)),
                  spec.pool.max_concurrent_trials or 10**9)
    if at_once * est.pool_trial > mem:
        n = max(1, int(mem // est.pool_trial))
        log(f"WARNING: {at_once} pool trials at once need about {_gb(at_once * est.pool_trial)} of memory "
            f"({_gb(est.pool_trial)} each), this machine has {_gb(mem)} available; set "
            f"pool.max_concurrent_trials: {n} (or fewer --num-cpus) if they run out of memory")


def _check_disk(spec: SweepSpec, est: Estimate, size) -> None:
    exp = spec.experiment_dir
    if "://" in str(exp):
        return
    need = dict(est.disk)
    if _cache_exists(spec):
        need.pop("slice cache", None)
    if spec.data.synthetic is not None and (spec.data.root / spec.data.source).is_dir():
        need.pop("synthetic sites", None)
    have = _folder_bytes(exp) if exp.is_dir() else 0
    total = max(0.0, sum(need.values()) - have)
    where = existing_parent(exp)
    free = shutil.disk_usage(where).free
    if total <= free:
        return
    fit = _largest_fitting(spec, size, free + have, lambda e: e.disk_total)
    parts = ", ".join(f"{k} {_gb(v)}" for k, v in need.items() if v >= 2**20)
    raise ResourceError(
        f"the experiment needs about {_gb(total)} of disk under {exp} ({parts}"
        + (f"; {_gb(have)} already there" if have else "") + f"), and {where} has {_gb(free)} free. Free space "
        f"there, put `storage:` (or $OODSWEEP_STORAGE, --storage) on a larger disk"
        + (f", or use data.image_size <= {fit}" if fit else ""))


def _cache_exists(spec: SweepSpec) -> bool:
    """Whether the slice cache of the spec is already built (its key from the files' names, sizes, times)."""
    from trainables.data.cache import cache_key

    d = spec.data
    try:
        key, _ = cache_key(d.layout, d.root, [d.source, *d.targets], d.image_size, d.split_seed, d.test_fraction,
                           site_sources=d.site_sources(), labels=d.labels, window=d.window, split=d.split,
                           layout_options=d.layout_options)
    except (ValueError, OSError):
        return False
    return (spec.cache_root / key / "manifest.json").is_file()


def check_nodes(spec: SweepSpec, nodes: list[dict]) -> None:
    """On a cluster (``ray.nodes()``): refuse when one pool trial needs more memory than the largest node has."""
    mems = [float(n.get("Resources", {}).get("memory", 0)) for n in nodes if n.get("Alive")]
    if not mems or not max(mems):
        return
    est = estimate(spec)
    if est is not None and est.pool_trial > max(mems):
        raise ResourceError(
            f"data.image_size {spec.data.image_size}: one pool trial of {est.pool_arch} needs about "
            f"{_gb(est.pool_trial)} of memory, and the cluster's largest node has {_gb(max(mems))} (Ray's memory "
            f"resource); use a smaller data.image_size or pool.batch_size, or nodes with more memory")


# ------------------------------------------------------------------ storage

_FIX = {errno.EACCES: "it is not writable by this user", errno.EPERM: "it is not writable by this user",
        errno.EROFS: "it is on a read-only file system", errno.ENOSPC: "its disk is full",
        errno.EDQUOT: "the disk quota is used up", errno.ENOTDIR: "a part of the path is a file, not a folder"}


def storage_error(what: str, folder: Path, e: OSError) -> StorageError:
    """A ``StorageError`` for ``e`` raised under ``folder``: the folder, the OS error, what it means and the fix."""
    why = _FIX.get(e.errno or 0, "")
    return StorageError(
        f"{what} {folder}: cannot write there ({errno.errorcode.get(e.errno or 0, 'OSError')}: "
        f"{e.strerror or e}{'; ' + why if why else ''}). Choose a folder you can write to (`storage:` in the "
        f"spec, $OODSWEEP_STORAGE, or --storage for the demo), or make {existing_parent(folder)} writable. "
        f"Nothing was written.")


#: the OS errors that mean "this storage cannot be written" (the command line prints them as storage errors)
STORAGE_ERRNOS = frozenset(_FIX)


def os_error_message(e: OSError) -> str:
    """An ``OSError`` met while a command ran (a full disk, a lost mount, a permission changed): the file, the
    error, what it means and the fix."""
    why = _FIX.get(e.errno or 0, "")
    where = e.filename or "writing a file (the library did not name it; the storage, data and cache folders)"
    return (f"{where}: {errno.errorcode.get(e.errno or 0, 'OSError')}: {e.strerror or e}"
            f"{' (' + why + ')' if why else ''}. Check that folder's permissions and free space (`df -h`); "
            f"finished work is kept, and `oodsweep resume EXPERIMENT_DIR` continues from it")


def writable_folders(spec: SweepSpec, experiment: bool = True) -> list[tuple[str, Path]]:
    """The folders a sweep writes: the experiment (``experiment``), the slice caches, synthetic sites."""
    out = [("storage", spec.experiment_dir)] if experiment else []
    out.append(("slice cache folder", spec.cache_root))
    if spec.data.synthetic is not None:
        out.append(("data.root (the synthetic sites are written there)", spec.data.root))
    return out


def check_storage_writable(spec: SweepSpec, experiment: bool = True) -> None:
    """Refuse a storage folder that cannot be written, without creating anything: a file is created and
    removed in the nearest existing folder of each path ``writable_folders`` lists."""
    for what, folder in writable_folders(spec, experiment):
        if "://" in str(folder):
            continue
        parent = existing_parent(folder)
        try:
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
            fd, probe = tempfile.mkstemp(dir=parent, prefix=".oodsweep-write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise storage_error(what, folder, e) from None


def check_before_launch(spec: SweepSpec, address: str | None = None, num_cpus: int | None = None) -> None:
    """Every guard that needs neither Ray nor a write: the storage folders, then the memory and disk the spec
    needs (memory only when the trials run on this machine: no ``address`` nor $RAY_ADDRESS)."""
    check_storage_writable(spec)
    check_resources(spec, num_cpus=num_cpus, local=not (address or os.environ.get("RAY_ADDRESS")))
