"""Checkpoint files: atomic writes, rotation, listing, reading (``--resume``); the weights inside are
interpreted by ``models.checkpoint``."""

from __future__ import annotations

import logging
import math
import os
import re

import torch

from engine.distributed import is_main_process

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint_(\d+)(?:_(\d+))?\.pth$")
REQUIRED_CHECKPOINT_KEYS = ("model", "epoch")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or incomplete."""


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """``checkpoint_{epoch:02d}.pth`` at epoch end, ``checkpoint_{epoch:02d}_{step:06d}.pth`` mid-epoch."""
    return f"checkpoint_{epoch:02d}.pth" if step is None else f"checkpoint_{epoch:02d}_{step:06d}.pth"


def list_checkpoints(output_dir: str) -> list[str]:
    """Paths of ``checkpoint_*`` files in ``output_dir``, newest (epoch, step) first; epoch-end files rank after
    mid-epoch files of the same epoch. ``checkpoint_best.pth`` is not listed."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CKPT_RE.match(name)
        if match:
            step = math.inf if match.group(2) is None else int(match.group(2))
            found.append(((int(match.group(1)), step), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def save_checkpoint(state: dict, output_dir: str, name: str, keep_last: int = 2) -> str:
    """Atomically write ``state`` to ``output_dir/name`` (rank 0 only) and return the path.

    The file is written to ``name.tmp``, fsynced, then renamed. Afterwards only the newest ``keep_last``
    ``checkpoint_*.pth`` files are kept (``keep_last <= 0`` keeps all; ``checkpoint_best.pth`` is never deleted).
    """
    path = os.path.join(output_dir, name)
    if not is_main_process():
        return path
    os.makedirs(output_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[keep_last:]:
            logger.info("removing old checkpoint %s", old)
            os.remove(old)
    return path


def load_checkpoint_file(path: str, weights_only: bool = True) -> dict:
    """``torch.load`` a checkpoint onto the CPU, raising ``CheckpointError`` naming ``path`` on failure.

    ``weights_only=False`` unpickles arbitrary objects: use it only for files you trust.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # truncated zip, pickle errors, ...: all mean "unreadable"
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def load_latest_checkpoint(output_dir: str) -> tuple[dict, str] | None:
    """The newest readable checkpoint in ``output_dir`` with keys 'model' and 'epoch', and its path.

    Unreadable or incomplete files are skipped with a warning; None when nothing usable exists.
    """
    for path in list_checkpoints(output_dir):
        try:
            state = load_checkpoint_file(path)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint: %s", exc)
            continue
        missing = [k for k in REQUIRED_CHECKPOINT_KEYS if k not in state]
        if missing:
            logger.warning("skipping checkpoint %s: missing keys %s", path, missing)
            continue
        return state, path
    return None
