"""Logging set-up (rank 0 to stderr and ``train.log``), metric running means (resumable), ``log.txt`` JSON lines
(floats at float32 precision) and the run's provenance."""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

import numpy as np
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

    def state_dict(self) -> dict[str, dict]:
        """The running sums and counts of all ranks together (one all-reduce: call it on every rank), as plain
        floats and ints, so that a mid-epoch checkpoint carries the epoch's means so far."""
        names, table = self._stacked(collective_device() if get_world_size() > 1 else torch.device("cpu"))
        if get_world_size() > 1:
            dist.all_reduce(table, op=dist.ReduceOp.SUM)
        sums, counts = table.tolist() if names else ([], [])
        return {"sums": dict(zip(names, sums)), "counts": {n: int(c) for n, c in zip(names, counts)}}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Start from saved sums (rank 0 only: the saved sums already hold every rank's share)."""
        self._sums, self._counts = {}, {}
        if is_main_process():
            self._sums = {n: float(v) for n, v in state.get("sums", {}).items()}
            self._counts = {n: int(c) for n, c in state.get("counts", {}).items()}
        else:  # zero sums under the same names, so every rank still reduces the same table
            self._sums = {n: 0.0 for n in state.get("sums", {})}
            self._counts = {n: 0 for n in state.get("counts", {})}


def round32(value: Any) -> Any:
    """Floats (also inside dicts and lists) rounded to the shortest decimal that float32 holds: the metrics are
    float32 sums, so ``1e-4`` rather than ``9.999999747378752e-05``. Other values are returned unchanged."""
    if isinstance(value, float):
        return float(str(np.float32(value))) if np.isfinite(value) and abs(value) < 3e38 else value
    if isinstance(value, dict):
        return {k: round32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round32(v) for v in value]
    return value


def append_jsonl(path: str, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (rank 0 only; floats by ``round32``), flushed and fsynced."""
    if not is_main_process():
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(round32(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARIES = ("torch", "torchvision", "timm", "transformers", "numpy", "pillow")


def git_commit(root: str = PROJECT_ROOT) -> str | None:
    """The checkout's commit (``+dirty`` when tracked files changed), None outside a git checkout."""
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def library_versions() -> dict[str, str]:
    """Python and the installed versions of the libraries that change numbers."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        versions["cudnn"] = str(torch.backends.cudnn.version())
    return versions


def command_line(args: Any) -> str:
    """The command that started this run, as a shell line (``torchrun ...`` under a launcher)."""
    script = getattr(args, "script", None) or sys.argv[0]
    argv = getattr(args, "argv", None)
    argv = sys.argv[1:] if argv is None else argv
    nproc = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) if get_world_size() > 1 else 0
    launcher = ["torchrun", f"--nproc_per_node={nproc}"] if nproc else ["python"]
    if nproc and get_world_size() > nproc:  # several nodes: each node runs this with its own --node_rank
        launcher.append(f"--nnodes={get_world_size() // nproc}")
    return shlex.join([*launcher, script, *argv])


def resume_command(args: Any) -> str:
    """``command_line`` with ``--resume`` (alone: the newest checkpoint of output_dir) instead of any resume flag."""
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    kept: list[str] = []
    skip_value = False
    for i, token in enumerate(argv):
        if skip_value:
            skip_value = False
            continue
        if token == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            skip_value = bool(nxt) and not nxt.startswith("--")
            continue
        if token.startswith("--resume="):
            continue
        kept.append(token)
    ns = type("Args", (), {"script": getattr(args, "script", None), "argv": [*kept, "--resume"]})()
    return command_line(ns)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable ones); momentum twins and frozen parts count only in the first."""
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device`` since the last reset, or the process's peak RSS on CPU (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def log_run_info(args: Any, device: torch.device, logger: logging.Logger) -> None:
    """Log where the numbers of this run come from: command, seed, device, processes, commit, libraries."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    logger.info("command: %s", command_line(args))
    logger.info("seed %s, device %s (%s), %d process(es), git commit %s", args.seed, device, name,
                get_world_size(), git_commit() or "none (not a git checkout)")
    logger.info("versions: %s", ", ".join(f"{k} {v}" for k, v in library_versions().items()))
