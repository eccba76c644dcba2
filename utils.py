"""Seeding and RNG state: what a run needs to be repeatable and to resume exactly.

The rest of the shared infrastructure lives in ``engine/`` (config, distributed, logs, checkpoint_io,
train_loop, trainer).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from engine.distributed import get_rank


def set_seed(seed: int) -> None:
    """Seed torch (CPU and CUDA), ``random`` and numpy with ``seed + rank``."""
    seed = seed + get_rank()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def get_rng_state() -> dict:
    """RNG states of python ``random``, numpy, torch CPU and CUDA (None without CUDA).

    Only plain types and tensors, so it loads with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore states saved by ``get_rng_state``; absent entries (or CUDA without CUDA) are left alone."""
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
