"""``torch.distributed`` in one place: every helper is a no-op (or the identity) without a process group.

The lowest layer of the project: the models, the datasets and the engine import it; it imports none of them.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_dist_initialized() -> bool:
    """True when a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 in a single process."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 in a single process."""
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all ranks; nothing in a single process."""
    if is_dist_initialized():
        dist.barrier()


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK.

    Sets ``args.rank``, ``args.world_size``, ``args.gpu`` and ``args.distributed``. ``args.distributed`` False
    forces a single process; None auto-detects from the environment.
    """
    wanted = getattr(args, "distributed", None)
    in_env = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if wanted is True and not in_env:
        logger.warning("--distributed given but RANK/WORLD_SIZE are not set: running a single process")
    if wanted is False or not in_env:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        return
    args.rank = int(os.environ["RANK"])
    args.world_size = int(os.environ["WORLD_SIZE"])
    args.gpu = int(os.environ.get("LOCAL_RANK", "0"))
    args.distributed = True
    use_cuda = str(getattr(args, "device", "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    backend = "nccl" if use_cuda else "gloo"
    logger.info("distributed init: rank %d/%d, backend %s, %s", args.rank, args.world_size, backend, args.dist_url)
    dist.init_process_group(backend=backend, init_method=getattr(args, "dist_url", "env://"),
                            world_size=args.world_size, rank=args.rank)
    barrier()


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) along dim 0 across ranks, without gradient.

    Returns ``t.detach()`` in a single process.
    """
    if get_world_size() == 1:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor); ``t`` itself in a single process."""
    if get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (pickled); ``obj`` in a single process."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def collective_device() -> torch.device:
    """Device on which the active backend can reduce tensors (NCCL needs CUDA)."""
    if is_dist_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- evaluation split across ranks: each example exactly once ----


def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Contiguous items ``[a, b)`` of ``n`` handled by ``rank`` (shares differ by at most one, none padded).

    Unlike ``DistributedSampler`` (which pads with repeated items, so the official accuracies count a few
    examples twice), concatenating every rank's share in rank order gives each item exactly once.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return n * rank // world_size, n * (rank + 1) // world_size


def shard_dataset(dataset: Any) -> torch.utils.data.Subset:
    """This rank's :func:`shard_range` of ``dataset`` as a ``Subset`` (the whole dataset in one process)."""
    return torch.utils.data.Subset(dataset, range(*shard_range(len(dataset))))


@torch.no_grad()
def all_gather_uneven(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` along dim 0 across ranks in rank order when ranks hold different numbers of rows.

    (rows_r, ...) on rank r -> (sum_r rows_r, ...) on every rank, without gradient; the other dimensions must
    agree. Two collectives: the row counts, then the rows padded to the largest count. ``t.detach()`` in a
    single process.
    """
    world = get_world_size()
    if world == 1:
        return t.detach()
    counts = all_gather_cat(torch.tensor([t.size(0)], device=t.device))  # (world,)
    most = int(counts.max())
    padded = t.new_zeros((most, *t.shape[1:]))
    padded[: t.size(0)] = t
    parts = all_gather_cat(padded).split(most)
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts.tolist())])


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's :func:`shard_range` rows of an ``n``-item evaluation -> (n, ...) in item order, each once.

    Raises ``ValueError`` when the ranks' rows do not add up to ``n`` (a share computed differently).
    """
    full = all_gather_uneven(local)
    if full.size(0) != n:
        raise ValueError(f"gathered {full.size(0)} rows from {get_world_size()} rank(s), expected {n}")
    return full


def gather_objects(local: list) -> list:
    """Concatenate each rank's list of picklable results in rank order (result files: every item once)."""
    if get_world_size() == 1:
        return list(local)
    parts: list[list | None] = [None] * get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part or []]
