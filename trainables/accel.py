"""Training loops at the speed of the hardware (docs/architecture.md "Models and data"): precision, memory format,
data placement.

Both training loops (``segment.train_segmenter`` and ``uncertainty.fit_uncertainty``) take an
``Accel`` from ``accel_for`` and a ``TrainData`` from ``place_training_data``:

* On a GPU, ``Accel`` turns on bf16 autocast (fp16 with a gradient scaler on cards without bf16),
  channels_last tensors and ``cudnn.benchmark`` — the settings ``bench/anchor_gpu.py`` measured its
  ceilings with (docs/performance.md, "GPU anchors"). On the CPU it changes nothing unless asked (``amp: bf16`` runs CPU autocast; the
  parity test uses it).
* ``TrainData`` holds the training split where the loop reads it. ``device``: the whole split in the
  device's memory (float16 images, uint8 masks as in the slice cache), batches gathered and augmented
  there, nothing crossing the bus per step; on the CPU that is RAM. ``stream``: a ``DataLoader`` over
  the memory-mapped cache with worker processes and pinned memory, for caches too large for the
  trial's share of the device (LiTS). ``choose_placement`` decides from the split's size and the
  trial's GPU share (``gpu_share``) and says why; ``data_placement`` in the config forces either.

The settings are an ``AccelConfig`` (``trainables.config``: its fields document the choices and keep the
defaults), a field of the pool member's and δ's configs.

Nothing here synchronises with the device per step: losses are summed on the device and read once
per epoch.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from .config import AccelConfig

#: ``device`` placement uses at most this fraction of the trial's share of device memory (the
#: model, activations and optimizer state need the rest), and at most this fraction of the free
#: RAM on the CPU.
DEVICE_FRACTION = 0.25


@dataclass
class Accel:
    """How a loop runs on its device: ``autocast()``, ``model()``, ``images()``, ``step()``."""

    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    scaler: Any = None  # torch.amp.GradScaler for fp16

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 batch on the device, channels_last where the loop uses it."""
        x = x.to(self.device, non_blocking=True).float()
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()

    def scaler_state(self) -> dict:
        """``{"scaler": ...}`` for a loop's resumable state when a gradient scaler runs (fp16), else ``{}``."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_scaler(self, state: dict) -> None:
        """Restore the gradient scaler from a resumable state written with ``scaler_state``."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def describe(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}[self.amp]
        return f"{self.device} {amp}{', channels_last' if self.channels_last else ''}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(setting: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (see ``AccelConfig.amp``) on ``device``."""
    if setting is True:
        setting = "auto"
    if setting is False or setting == "off":
        return None
    if setting == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'off', got {setting!r}")


def accel_for(settings: AccelConfig, device: torch.device) -> Accel:
    """The ``Accel`` for ``settings`` (checked when the ``AccelConfig`` was built) on ``device``."""
    amp = amp_dtype(settings.amp, device)
    cl = settings.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    return Accel(device, amp, device.type == "cuda" if cl == "auto" else bool(cl), scaler)


# ----------------------------------------------------------------------------- data placement

def _free_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def choose_placement(nbytes: int, device: torch.device, gpu_share: float | None,
                     setting: str = "auto") -> tuple[str, str]:
    """("device" | "stream", why) for a training split of ``nbytes`` on ``device``."""
    if setting not in ("auto", "device", "stream"):
        raise ValueError(f"data_placement must be 'auto', 'device' or 'stream', got {setting!r}")
    size = f"{nbytes / 2**20:.1f} MiB"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        share = float(gpu_share) if gpu_share else 1.0
        budget = int(min(DEVICE_FRACTION * share * total, 0.5 * torch.cuda.mem_get_info(device)[0]))
        where = f"{share:g} of {total / 2**30:.1f} GiB on {torch.cuda.get_device_name(device)}"
    else:
        budget = int(DEVICE_FRACTION * _free_ram())
        where = "free RAM"
    if setting != "auto":
        return setting, f"{size}, data_placement={setting} (set in the config)"
    if nbytes <= budget:
        return "device", f"{size} <= budget {budget / 2**30:.2f} GiB ({DEVICE_FRACTION:g} x {where})"
    return "stream", f"{size} > budget {budget / 2**30:.2f} GiB ({DEVICE_FRACTION:g} x {where})"


class _Rows(torch.utils.data.Dataset):
    """Batches read from the memory-mapped arrays (opened lazily in each worker: a memmap pickled to a
    worker would be copied whole)."""

    def __init__(self, arrays: dict[str, tuple[str, np.ndarray]], extra: dict[str, torch.Tensor] | None = None):
        self.arrays = arrays  # name -> (path of the .npy, rows)
        self.extra = extra or {}  # name -> in-memory tensor indexed like the rows (δ's ŷ)
        self._open: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()))[1])

    def __getitem__(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
        out = {}
        for name, (path, rows) in self.arrays.items():
            if name not in self._open:
                self._open[name] = np.load(path, mmap_mode="r")
            sel = rows[batch]
            order = np.argsort(sel, kind="stable")  # memmap reads in file order, then back to batch order
            data = np.asarray(self._open[name][sel[order]])
            out[name] = torch.from_numpy(data[np.argsort(order, kind="stable")])
        out.update({k: v[torch.from_numpy(batch)] for k, v in self.extra.items()})
        return out


class _EpochBatches(torch.utils.data.Sampler):
    """The loop's own batches (set per epoch), so both placements see the same shuffling."""

    def __init__(self):
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TrainData:
    """The training split of a loop: tensors ``name -> N x ...`` held on the device, or streamed.

    ``batches(perm, batch_size)`` yields dicts of device tensors in the order of ``perm`` (a CPU
    permutation from the loop's seeded generator); a final batch of one is dropped (BatchNorm).
    """

    def __init__(self, tensors: dict[str, torch.Tensor] | None, placement: str, device: torch.device,
                 loader: torch.utils.data.DataLoader | None = None, n: int | None = None,
                 sampler: _EpochBatches | None = None, nbytes: int = 0):
        self.tensors, self.placement, self.device, self.loader = tensors, placement, device, loader
        self.sampler = sampler
        self.nbytes = nbytes  # the split's size (in device memory when placement is "device")
        self.n = n if n is not None else len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def split_batches(perm: torch.Tensor, bs: int) -> list[torch.Tensor]:
        out = [perm[i:i + bs] for i in range(0, len(perm), bs)]
        if len(out) > 1 and len(out[-1]) < 2:  # a batch of one breaks BatchNorm; drop the remainder
            out.pop()
        return out

    def batches(self, perm: torch.Tensor, bs: int) -> Iterator[dict[str, torch.Tensor]]:
        if self.placement == "device":
            perm_dev = perm.to(self.device, non_blocking=True)  # one transfer per epoch
            for idx in self.split_batches(perm_dev, bs):
                yield {k: v[idx] for k, v in self.tensors.items()}
            return
        self.sampler.batches = [b.numpy() for b in self.split_batches(perm, bs)]
        for batch in self.loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def place_training_data(arrays: dict[str, tuple[str, np.ndarray]], device: torch.device, settings: AccelConfig,
                        extra: dict[str, torch.Tensor] | None = None) -> tuple[TrainData, str]:
    """Place a training split: ``arrays`` name -> (``.npy`` path of the memory-mapped cache array, rows),
    as ``settings`` (``data_placement``, ``gpu_share``, ``loader_workers``) and the split's size say.

    ``extra``: tensors already in memory (e.g. the frozen member's predictions for δ), indexed like
    the rows; they follow the placement. Returns the data and a line saying where and why.
    """
    mm = {k: np.load(p, mmap_mode="r") for k, (p, _) in arrays.items()}
    nbytes = sum(int(mm[k][:1].nbytes) * len(rows) for k, (_, rows) in arrays.items())
    nbytes += sum(int(t.nbytes) for t in (extra or {}).values())
    placement, why = choose_placement(nbytes, device, settings.gpu_share, settings.data_placement)
    n = len(next(iter(arrays.values()))[1])
    if placement == "device":
        tensors = {k: torch.from_numpy(np.asarray(mm[k][rows])).to(device) for k, (_, rows) in arrays.items()}
        tensors.update({k: t.to(device) for k, t in (extra or {}).items()})
        return TrainData(tensors, "device", device, n=n, nbytes=nbytes), f"training data on {device} ({why})"
    workers = settings.loader_workers
    workers = (2 if device.type == "cuda" else 0) if workers == "auto" else workers
    ds = _Rows({k: (str(p), np.asarray(rows)) for k, (p, rows) in arrays.items()},
               {k: t.cpu() for k, t in (extra or {}).items()})
    sampler = _EpochBatches()  # the loop sets each epoch's batches on it; workers read them in order
    loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return TrainData(None, "stream", device, loader, n=n, sampler=sampler, nbytes=nbytes), \
        f"training data streamed ({workers} loader workers{', pinned' if device.type == 'cuda' else ''}; {why})"


# ----------------------------------------------------------------------------- augmentation

def augment_flips(batch: dict[str, torch.Tensor], gen: torch.Generator, keys: tuple[str, ...]) -> dict:
    """Random horizontal and vertical flips, per sample, of the ``keys`` tensors (``B x ... x H x W``),
    on whatever device they are (no host round trip).

    Written here rather than with MONAI's ``RandFlip``: that transform draws one random state per
    call on a single channel-first item on the host; a batch flip is two ``torch.where`` calls.
    """
    # drawn where the generator lives (the loop gives one on the batch's device): no host copy per step
    flips = (torch.rand((2, len(batch[keys[0]])), generator=gen, device=gen.device) < 0.5).to(batch[keys[0]].device)
    out = dict(batch)
    for k in keys:
        t = out[k]
        shape = (len(t),) + (1,) * (t.ndim - 1)
        t = torch.where(flips[0].view(shape), t.flip(-1), t)
        out[k] = torch.where(flips[1].view(shape), t.flip(-2), t)
    return out
