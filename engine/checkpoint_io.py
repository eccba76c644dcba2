"""Checkpoint files: atomic writes, rotation, listing, reading (``--resume``), and ``checkpoint_best.pth`` as a
hard link (no second copy; a small pointer file where the file system has no hard links). The weights inside are
interpreted by ``models.checkpoint``."""

from __future__ import annotations

import logging
import math
import os
import re

import torch

from engine.distributed import is_main_process
from models.checkpoint import LINK_MAGIC, CheckpointError, follow_checkpoint_link  # one error for files and weights

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint_(\d+)(?:_(\d+))?\.pth$")
REQUIRED_CHECKPOINT_KEYS = ("model", "epoch")
BEST_NAME = "checkpoint_best.pth"


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

    The file is written to ``name.tmp``, fsynced, then renamed; if anything interrupts the write (an error, a
    second Ctrl-C), the temporary file is removed and the previous file is untouched. Afterwards only the newest
    ``keep_last`` ``checkpoint_*.pth`` files are kept (``keep_last <= 0`` keeps all; ``checkpoint_best.pth``
    and the file it points to are never deleted). Logs ``saved checkpoint PATH``.
    """
    path = os.path.join(output_dir, name)
    if not is_main_process():
        return path
    os.makedirs(output_dir, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    logger.info("saved checkpoint %s", path)
    if keep_last > 0:
        keep = _link_target(os.path.join(output_dir, BEST_NAME))
        keep = keep if keep is not None and os.path.isfile(keep) else None
        for old in list_checkpoints(output_dir)[keep_last:]:
            if keep is None or not os.path.samefile(old, keep):
                logger.info("removing old checkpoint %s", old)
                os.remove(old)
    return path


def _link_target(path: str) -> str | None:
    """The file a pointer file names, None when ``path`` is absent or a real checkpoint (or a hard link)."""
    if not os.path.isfile(path):
        return None
    target = follow_checkpoint_link(path)
    return None if target == path else target


def link_best(output_dir: str, name: str) -> str:
    """Make ``checkpoint_best.pth`` the same file as ``output_dir/name`` (rank 0 only), atomically.

    A hard link costs no space and survives the rotation of ``name``; where hard links are not supported, a
    pointer file (one line naming ``name``) is written instead, followed by ``--checkpoint`` and ``--resume``.
    """
    best, target = os.path.join(output_dir, BEST_NAME), os.path.join(output_dir, name)
    if not is_main_process() or (os.path.isfile(best) and os.path.samefile(best, target)):
        return best  # (renaming a hard link over itself would do nothing and leave the .tmp behind)
    tmp = best + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        try:
            os.link(target, tmp)
        except OSError:  # no hard links here (some network or FUSE file systems)
            with open(tmp, "wb") as f:
                f.write(LINK_MAGIC + name.encode() + b"\n")
        os.replace(tmp, best)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    logger.info("%s -> %s", best, name)
    return best


def load_checkpoint_file(path: str, weights_only: bool = True) -> dict:
    """``torch.load`` a checkpoint onto the CPU, raising ``CheckpointError`` naming ``path`` on failure.

    ``weights_only=False`` unpickles arbitrary objects: use it only for files you trust.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        path = follow_checkpoint_link(path)
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from None
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
