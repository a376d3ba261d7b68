"""Wall-clock time per phase of a training step, for ``bench speed``.

A :class:`PhaseTimer` is a no-op until enabled, so the trainer keeps one always. UNet forwards are
timed by hooks on the UNet module wherever they happen (the theta step and the learned update).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates seconds per named phase; synchronises CUDA around each phase when timing on a GPU."""

    def __init__(self, enabled: bool = False, device: torch.device | None = None) -> None:
        self.enabled = enabled
        self.cuda = device is not None and device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._hooks: list = []
        self._local = threading.local()  # per thread: the learned update may run in a thread of its own
        self._add_lock = threading.Lock()

    def _thread(self) -> threading.local:
        """The calling thread's own state: ``stack`` (the phases open in it, innermost last) and ``unet_start``."""
        if not hasattr(self._local, "stack"):
            self._local.stack, self._local.unet_start = [], []
        return self._local

    @property
    def _stack(self) -> list[str]:
        return self._thread().stack

    @property
    def _unet_start(self) -> list[float]:
        return self._thread().unet_start

    def _add(self, name: str, seconds: float) -> None:
        with self._add_lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()
            self._sync()
            self._add(name, time.perf_counter() - t0)

    def watch_unet(self, unet: torch.nn.Module) -> None:
        """Time every forward of ``unet`` as ``unet_forward`` (nested inside other phases), and per calling
        phase as ``unet_forward_in_<phase>``."""

        def pre(_module, _args, _kwargs=None):
            if self.enabled:
                self._sync()
                self._unet_start.append(time.perf_counter())

        def post(_module, _args, _kwargs_or_out, _out=None):
            if self.enabled and self._unet_start:
                self._sync()
                dt = time.perf_counter() - self._unet_start.pop()
                self._add("unet_forward", dt)
                if self._stack:  # which phase asked for it (the theta step or the learned update)
                    self._add(f"unet_forward_in_{self._stack[-1]}", dt)

        self._hooks += [unet.register_forward_pre_hook(pre), unet.register_forward_hook(post)]

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def process_age() -> float | None:
    """Seconds since this process started (Linux: its start in clock ticks since boot, against the boot clock;
    10 ms resolution), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5), counted after the name
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start
    except (OSError, ValueError, IndexError, AttributeError):
        return None
