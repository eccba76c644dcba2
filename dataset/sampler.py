"""A deterministic, rank-sharded sampler that can resume in the middle of an epoch."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


class ResumableSampler(Sampler[int]):
    """Shard a (shuffled) index order across ranks, like ``DistributedSampler``.

    The order is a permutation from a ``torch.Generator`` seeded with
    ``seed + epoch``, so it depends only on (seed, epoch), never on global RNG
    state. Rank ``r`` takes ``order[r::world_size]``.

    * ``drop_last=True`` (training): the order is cut to a multiple of
      ``batch_size * world_size``, so every rank yields the same number of
      full batches (the momentum queue needs a constant global batch).
    * ``drop_last=False`` (evaluation): the order is padded by wrapping around
      to a multiple of ``world_size``; a few samples are then seen twice.

    ``set_start(k)`` makes the next iteration skip the first ``k`` indices of
    this rank's shard (mid-epoch resume); it resets to 0 once that iteration
    finishes or is abandoned.

    Args:
        dataset_len: number of samples.
        shuffle: permute the order each epoch.
        seed: base seed; the epoch is added to it.
        rank: this process's rank.
        world_size: number of ranks.
        drop_last: keep only full global batches (training) instead of padding.
        batch_size: per-rank batch size, used when ``drop_last``.
    """

    def __init__(
        self,
        dataset_len: int,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        batch_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset_len = dataset_len
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.epoch = 0
        self._start = 0
        if drop_last:
            global_batch = batch_size * world_size
            self.shard_len = (dataset_len // global_batch) * batch_size
            if dataset_len > 0 and self.shard_len == 0:
                raise ValueError(
                    f"dataset has {dataset_len} samples, fewer than one global batch "
                    f"(batch_size {batch_size} x world_size {world_size} = {global_batch}); "
                    "training would run zero steps"
                )
        else:
            self.shard_len = math.ceil(dataset_len / world_size)
        self.total_len = self.shard_len * world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (call before each epoch)."""
        self.epoch = epoch

    def set_start(self, num_samples_to_skip: int) -> None:
        """Skip the first ``num_samples_to_skip`` indices of this rank's next iteration."""
        if not 0 <= num_samples_to_skip <= self.shard_len:
            raise ValueError(
                f"cannot skip {num_samples_to_skip} samples of a {self.shard_len}-sample shard"
            )
        self._start = num_samples_to_skip

    def full_order(self) -> list[int]:
        """The global order of this epoch after cutting or padding (before sharding)."""
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=gen).tolist()
        else:
            order = list(range(self.dataset_len))
        if self.total_len <= len(order):
            return order[: self.total_len]
        repeats = math.ceil(self.total_len / max(len(order), 1))
        return (order * repeats)[: self.total_len]  # wrap-around padding

    def shard(self) -> list[int]:
        """This rank's indices for the current epoch (ignoring ``set_start``)."""
        return self.full_order()[self.rank : self.total_len : self.world_size]

    def __iter__(self) -> Iterator[int]:
        indices = self.shard()
        start = self._start
        if start:
            logger.info(
                "resuming epoch %d at sample %d of %d", self.epoch, start, len(indices)
            )
        try:
            yield from indices[start:]
        finally:
            self._start = 0  # the skip applies to one iteration only

    def __len__(self) -> int:
        return self.shard_len - self._start
