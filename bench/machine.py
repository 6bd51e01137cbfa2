"""The machine a benchmark runs on: its name, the CPU heap policy, and a step's peak resident memory.

Shared by ``python -m bench overhead`` and ``python -m bench layer-costs``; ``bench/overhead.py``'s module
docstring says why the timed steps run under the ``retain`` heap and the memory step under ``measure``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def malloc_trim() -> None:
    """Hand glibc's freed heap back to the OS (no-op where there is no glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# mallopt parameter numbers from glibc's malloc.h.
_MALLOPT = {"trim_threshold": -1, "mmap_threshold": -3, "mmap_max": -4}
_heap = {"policy": "system"}


def _mallopt(**values: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all([bool(libc.mallopt(_MALLOPT[name], value)) for name, value in values.items()])
    except (OSError, AttributeError):
        return False


def set_malloc_policy(policy: str) -> bool:
    """``retain``: glibc serves every block from the heap and never trims it, so a step's temporaries reuse
    the previous step's pages instead of mmap-ing fresh, zero-filled ones (page faults that would otherwise
    cost every mode a share of its time that grows with its temporaries). ``measure``: every block of
    128 KiB or more is mmap'd and unmapped when freed, so the resident size follows live memory (used for
    the memory step). ``system``: glibc's defaults, untouched. Returns whether it took effect."""
    if policy == "retain":
        ok = _mallopt(mmap_max=0, trim_threshold=2**31 - 1)
    elif policy == "measure":
        ok = _mallopt(mmap_max=65536, mmap_threshold=128 * 1024, trim_threshold=128 * 1024)
    else:
        ok = True
    if ok:
        _heap["policy"] = policy
    return ok


def malloc_policy() -> str:
    """The heap policy last set (``system`` until one is)."""
    return _heap["policy"]


@contextmanager
def heap_for_measuring() -> Iterator[None]:
    """Inside the block large blocks are mmap'd (``measure``) and the freed heap is trimmed first, so the
    resident size follows live memory; a retained heap would hold it at the largest step so far, whoever
    made it. The policy before the block is restored after it."""
    before = malloc_policy()
    if before == "retain":
        set_malloc_policy("measure")
    try:
        malloc_trim()
        yield
    finally:
        if before == "retain":
            set_malloc_policy("retain")


class PeakRss:
    """Peak resident set size of this process while the block runs.

    On Linux the kernel's own high-water mark: writing 5 to /proc/self/clear_refs resets VmHWM to the current
    RSS, and VmHWM after the block is the exact peak, however short-lived (a sampler can miss a temporary
    that lives for less than its interval). Where that file cannot be written, a thread samples the RSS
    (psutil) every ``interval`` seconds instead."""

    _STATUS = "/proc/self/status"
    _CLEAR_REFS = "/proc/self/clear_refs"

    def __init__(self, interval: float = 0.001):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.start_rss = 0
        self.peak = 0
        self.exact = False
        """Whether the peak is the kernel's high-water mark (else sampled)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def _kernel_hwm(cls) -> int:
        with open(cls._STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no VmHWM line")

    @classmethod
    def reset_kernel_hwm(cls) -> bool:
        """Reset the kernel's high-water mark to the current RSS; False where this system cannot."""
        try:
            with open(cls._CLEAR_REFS, "w", encoding="ascii") as f:
                f.write("5")
            cls._kernel_hwm()
            return True
        except OSError:
            return False

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        if rss > self.peak:
            self.peak = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self.exact = self.reset_kernel_hwm()
        self.start_rss = self._proc.memory_info().rss
        self.peak = self.start_rss
        if not self.exact:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.exact:
            self.peak = max(self.peak, self._kernel_hwm())
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


def peak_memory_method(device: str) -> str:
    if device == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "VmHWM" if PeakRss.reset_kernel_hwm() else "rss sampled every 1 ms"
