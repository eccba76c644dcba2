"""What every benchmark section shares: the :class:`Section` record, the row type, seeding, peak memory."""

from __future__ import annotations

import argparse
import logging
import random
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger("benchmark")  # one name for every section: the log lines read as one program

Row = dict[str, Any]


def _no_args(parser: argparse.ArgumentParser) -> None:
    """A section without flags of its own."""


def _no_check(args: argparse.Namespace) -> str | None:
    """A section without flags to check."""
    return None


@dataclass(frozen=True)
class Section:
    """One benchmark section, registered by name in :data:`scripts.bench.SECTIONS`.

    ``run(args)`` returns the section's rows (one table, one JSON list); ``add_args(parser)`` adds the
    section's own flags; ``check(args)`` validates them (and may normalise them in place), returning an
    error message or None. Every section's flags and check are active whatever ``--only`` selects.
    """

    run: Callable[[argparse.Namespace], list[Row]]
    add_args: Callable[[argparse.ArgumentParser], None] = _no_args
    check: Callable[[argparse.Namespace], str | None] = _no_check


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _read_rss_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB, or None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> float:
    """Start a new peak-memory window; returns the memory in use now (MiB).

    CPU: resets the process's RSS high-water mark (``/proc/self/clear_refs``, Linux); where that is not
    possible the peak is the process-lifetime maximum (``getrusage``). CUDA: allocator statistics.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    return _read_rss_mb("VmRSS") or 0.0


def peak_memory_mb(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`: RSS high-water mark on CPU, max allocated on CUDA (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _read_rss_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
