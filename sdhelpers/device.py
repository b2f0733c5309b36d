"""Device, dtype, seeding, memory and timing: the GPU utilities every chapter shares.

Every notebook cell calls these instead of hard-coding ``"cuda"`` the way the source text does,
so the same cell runs on a CUDA GPU in fp16, on an Apple GPU (MPS) and on a plain CPU in fp32.
The choice can be forced with the ``SDHELPERS_DEVICE`` environment variable or an argument.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch

from sdhelpers import checks

DEVICE_ENV = "SDHELPERS_DEVICE"
DEVICE_KINDS = ("cuda", "mps", "cpu")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def _check_device(value: str, source: str) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{source}: {value!r} is not a device; allowed: {', '.join(DEVICE_KINDS)} (e.g. 'cuda:0')") from None
    if device.type not in DEVICE_KINDS:
        raise ValueError(f"{source}: {value!r} is not supported; allowed: {', '.join(DEVICE_KINDS)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{source}: {value!r} was asked for but no CUDA GPU is available; use 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{source}: {value!r} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"{source}: {value!r} was asked for but MPS is not available; use 'cpu'")
    return device


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the argument, else ``$SDHELPERS_DEVICE``, else CUDA, then MPS, then CPU.

    An explicit choice that this machine can't honour raises a ``ValueError`` instead of silently
    falling back, so a reader who asked for a GPU knows they are not getting one.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device is not None:
        return _check_device(device, "device")
    env = os.environ.get(DEVICE_ENV, "").strip()
    if env:
        return _check_device(env, DEVICE_ENV)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The inference dtype that suits ``device``: fp16 on CUDA and MPS, fp32 on the CPU.

    fp16 halves memory and uses the tensor cores on a GPU; on a CPU fp16 matmuls are slow or
    missing, so fp32 is both faster and exact there.
    """
    kind = get_device(device).type
    return torch.float16 if kind in ("cuda", "mps") else torch.float32


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a notebook re-runs identically on the CPU."""
    from diffusers.training_utils import set_seed

    set_seed(checks.seed(seed) % 2**32)


def make_generator(seed: int, device: str | torch.device | None = None) -> torch.Generator:
    """A ``torch.Generator`` on the right device, seeded: what diffusers pipelines take as ``generator``.

    The source text writes ``torch.Generator("cuda").manual_seed(42)``; on MPS generators must live on
    the CPU, so we do that there (diffusers moves the noise to the device itself).
    """
    seed = checks.seed(seed)
    dev = get_device(device)
    gen_device = "cpu" if dev.type == "mps" else dev
    return torch.Generator(device=gen_device).manual_seed(seed)


def hardware_summary(device: str | torch.device | None = None) -> str:
    """One line naming the device, its memory and the library versions, for logs and benchmark tables."""
    import diffusers
    import transformers

    dev = get_device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        where = f"CUDA {props.name}, {props.total_memory / 2**30:.0f} GiB"
    elif dev.type == "mps":
        where = f"MPS ({platform.machine()})"
    else:
        where = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    ram = psutil.virtual_memory().total / 2**30
    return (
        f"{where}, {ram:.0f} GiB RAM | torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, dtype {str(get_dtype(dev)).removeprefix('torch.')}"
    )


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for queued GPU work: without it a GPU timing measures only the kernel launches."""
    dev = get_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


@dataclass
class Timer:
    """Wall-clock timer that synchronises the GPU on entry and exit. Use as ``with Timer() as t: ...``."""

    device: str | torch.device | None = None
    seconds: float = 0.0
    _start: float = field(default=0.0, repr=False)

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


@dataclass
class MemoryTracker:
    """Peak memory of the block inside ``with MemoryTracker() as m:``.

    On CUDA: the peak allocated and reserved bytes of the caching allocator (what decides an OOM).
    On MPS/CPU: the peak resident set size (RSS) of this process, sampled by a background thread
    every ``interval`` seconds, since the CPU has no allocator statistics.
    """

    device: str | torch.device | None = None
    interval: float = 0.005
    peak_allocated: int = 0
    peak_reserved: int = 0
    peak_rss: int = 0
    start_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._device = get_device(self.device)

    def _sample_rss(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemoryTracker":
        self.start_rss = self.peak_rss = psutil.Process().memory_info().rss
        if self._device.type == "cuda":
            synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample_rss, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._device.type == "cuda":
            synchronize(self._device)
            self.peak_allocated = torch.cuda.max_memory_allocated(self._device)
            self.peak_reserved = torch.cuda.max_memory_reserved(self._device)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)

    @property
    def peak_bytes(self) -> int:
        """The figure that matters on this device: CUDA peak allocated, else peak RSS."""
        return self.peak_allocated if self._device.type == "cuda" else self.peak_rss

    def summary(self) -> str:
        gib = 2**30
        if self._device.type == "cuda":
            return f"peak CUDA allocated {self.peak_allocated / gib:.2f} GiB, reserved {self.peak_reserved / gib:.2f} GiB"
        return f"peak RSS {self.peak_rss / gib:.2f} GiB (+{(self.peak_rss - self.start_rss) / gib:.2f} GiB in the block)"


class flush_denormals:
    """Flush denormal floats to zero inside the block (CPU only; restored to torch's default after).

    Tiny values below 1e-38 appear during training (in Adam's moments, in near-silent activations)
    and x86 CPUs compute with them 10-100x slower: without this a TinySD VAE step took 2 s
    instead of 0.4 s. Flushing them changes results by less than 1e-38.
    """

    def __enter__(self):
        self._set = torch.set_flush_denormal(True)
        return self

    def __exit__(self, *exc):
        if self._set:
            torch.set_flush_denormal(False)
