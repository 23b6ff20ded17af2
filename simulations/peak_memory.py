"""How much memory a simulation took: this process's peak, and the peak of it with every process it started.

The Simulation Engine runs virtual devices in Ray worker processes (and Ray's own raylet and GCS), all
descendants of this one; their memory is the simulation's too. A thread samples the tree once a second
and keeps the largest total of proportional set sizes (PSS: a page shared by n processes counts 1/n in
each, so the libraries every worker maps are counted once, not once per worker). A peak that lasts less
than a second may fall between two samples; this process's own peak (``ru_maxrss``) is exact.
"""

from __future__ import annotations

import resource
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

MIB = 2**20
INTERVAL = 1.0  # seconds between samples of the process tree


@dataclass
class PeakMemory:
    """What :func:`watched` found; MiB."""

    process_peak_mb: float = 0.0  # this process (the coordinator and the engine's driver) at its peak
    tree_peak_mb: float = 0.0  # this process and its descendants, summed (PSS), at the largest sample
    processes_at_peak: int = 0
    samples: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "process_peak_mb": round(self.process_peak_mb, 1),
            "tree_peak_mb": round(self.tree_peak_mb, 1),
            "processes_at_peak": self.processes_at_peak,
            "samples": self.samples,
        }


def _tree_bytes(root: psutil.Process) -> tuple[int, int]:
    """PSS of ``root`` and its descendants, summed, and how many were read (gone ones are skipped)."""
    total, counted = 0, 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
            counted += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, AttributeError):
            continue  # ended between the listing and the read, or a platform without PSS
    return total, counted


@contextmanager
def watched() -> Iterator[PeakMemory]:
    """Sample the process tree until the block ends; the yielded :class:`PeakMemory` is filled then."""
    found = PeakMemory()
    stop = threading.Event()
    root = psutil.Process()

    def sample() -> None:
        while True:
            total, counted = _tree_bytes(root)
            found.samples += 1
            if total / MIB > found.tree_peak_mb:
                found.tree_peak_mb, found.processes_at_peak = total / MIB, counted
            if stop.wait(INTERVAL):
                return

    sampler = threading.Thread(target=sample, name="peak-memory", daemon=True)
    sampler.start()
    try:
        yield found
    finally:
        stop.set()
        sampler.join()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        found.process_peak_mb = peak / MIB if sys.platform == "darwin" else peak / 1024
