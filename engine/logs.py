"""Logging set-up (rank 0 to stderr and ``train.log``), metric running means, and ``log.txt`` JSON lines."""

from __future__ import annotations

import json
import logging
import os
import sys

import torch
import torch.distributed as dist

from engine.distributed import collective_device, get_world_size, is_main_process


def setup_logging(output_dir: str | None, rank: int) -> None:
    """Rank 0 logs INFO to stderr and ``output_dir/train.log``; other ranks log WARNING and above to stderr.

    Calling it again replaces the handlers it installed before.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_albef", False)]:
        root.removeHandler(handler)
        handler.close()
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0 and output_dir:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "train.log")))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._albef = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


class MetricAccumulator:
    """Running sums of scalar metrics, kept as tensors on their device so ``update`` never syncs with the host.

    Every rank must update the same set of names before ``averages``.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = {}

    def update(self, **values: torch.Tensor | float) -> None:
        """Add one observation per name (tensors are detached and summed in float32)."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().sum()
            self._sums[name] = self._sums.get(name, 0.0) + value
            self._counts[name] = self._counts.get(name, 0) + 1

    def _stacked(self, device: torch.device) -> tuple[list[str], torch.Tensor]:
        names = sorted(self._sums)
        rows = [torch.as_tensor(self._sums[n], dtype=torch.float32).to(device) for n in names]
        counts = torch.tensor([float(self._counts[n]) for n in names], device=device)
        sums = torch.stack(rows) if rows else torch.zeros(0, device=device)
        return names, torch.stack([sums, counts])

    def averages(self, all_ranks: bool = True) -> dict[str, float]:
        """Means over all updates, on all ranks (one all-reduce) or this rank only; one host sync."""
        reduce = all_ranks and get_world_size() > 1
        names, table = self._stacked(collective_device() if reduce else torch.device("cpu"))
        if reduce:
            dist.all_reduce(table, op=dist.ReduceOp.SUM)
        return {n: s / c for n, s, c in zip(names, *table.tolist())}


def append_jsonl(path: str, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (rank 0 only), flushed and fsynced."""
    if not is_main_process():
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
