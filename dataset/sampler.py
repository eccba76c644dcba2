"""A deterministic, rank-sharded sampler that resumes in the middle of an epoch from a GLOBAL sample position,
under any batch size and any number of processes."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from dataset.validate import DataError

logger = logging.getLogger(__name__)


def global_batch_problem(num_items: int, batch_size: int, world_size: int) -> str | None:
    """Why ``num_items`` cannot fill one global batch of ``batch_size x world_size``, or None."""
    global_batch = batch_size * world_size
    if num_items < global_batch:
        return (f"{num_items} samples, fewer than one global batch (batch size {batch_size} x {world_size} "
                f"process(es) = {global_batch}): training would run zero steps")
    return None


class ResumableSampler(Sampler[int]):
    """Shard a (shuffled) index order across ranks, like ``DistributedSampler``.

    The order is a permutation from a ``torch.Generator`` seeded with ``seed + epoch``, so it depends only on
    (seed, epoch, dataset length), never on global RNG state, the batch size or the number of processes. Every
    step of every rank together consumes the next ``batch_size * world_size`` positions of that order: rank ``r``
    takes positions ``r, r + world_size, ...`` of what is left.

    * ``drop_last=True`` (training): what is left is cut to a multiple of ``batch_size * world_size``, so every
      rank yields the same number of full batches (the momentum queue needs a constant global batch); the cut
      samples are not seen this epoch (they differ from epoch to epoch).
    * ``drop_last=False`` (evaluation): the order is padded by wrapping around to a multiple of ``world_size``;
      a few samples are then seen twice.

    ``resume_from(s)`` makes the next iteration start at global position ``s`` of the epoch's order (``s``
    samples consumed before, under whatever batch size and number of processes): the samples before ``s`` are
    never repeated and none after it is skipped, except the cut of ``drop_last``. It resets to 0 once that
    iteration finishes or is abandoned.

    Args:
        dataset_len: number of samples.
        shuffle: permute the order each epoch.
        seed: base seed; the epoch is added to it.
        rank: this process's rank.
        world_size: number of ranks.
        drop_last: keep only full global batches (training) instead of padding.
        batch_size: per-rank batch size, used when ``drop_last``.

    Raises:
        DataError: (``drop_last``) fewer samples than one global batch.
    """

    def __init__(self, dataset_len: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, batch_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and (problem := global_batch_problem(dataset_len, batch_size, world_size)):
            raise DataError(f"the training data holds {problem}")
        self.dataset_len = dataset_len
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.epoch = 0
        self._start = 0  # global samples consumed before the next iteration

    @property
    def global_batch(self) -> int:
        """Samples one step of all ranks consumes."""
        return self.batch_size * self.world_size

    @property
    def start(self) -> int:
        """Global samples of this epoch consumed before the next iteration (``resume_from``)."""
        return self._start

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (call before each epoch)."""
        self.epoch = epoch

    def resume_from(self, samples: int) -> None:
        """Start the next iteration at global position ``samples`` of this epoch's order.

        Raises ``DataError`` when ``samples`` is beyond the data (the data changed since it was counted).
        """
        if not 0 <= samples <= self.dataset_len:
            raise DataError(f"cannot resume at sample {samples} of an epoch of {self.dataset_len} samples")
        self._start = samples

    def set_start(self, num_samples_to_skip: int) -> None:
        """Skip the first ``num_samples_to_skip`` indices of this rank's shard in the next iteration: global
        position ``num_samples_to_skip * world_size`` (every rank had taken as many)."""
        self.resume_from(num_samples_to_skip * self.world_size)

    def _remaining(self) -> int:
        """Global samples the next iteration yields over all ranks (after the cut or the padding)."""
        left = self.dataset_len - self._start
        if self.drop_last:
            return left // self.global_batch * self.global_batch
        return math.ceil(left / self.world_size) * self.world_size

    def epoch_samples(self) -> int:
        """Global samples consumed at the end of this epoch: ``start`` plus what the next iteration yields."""
        return self._start + self._remaining()

    def full_order(self) -> list[int]:
        """This epoch's permutation of every sample (before the start, the cut or the padding)."""
        if not self.shuffle:
            return list(range(self.dataset_len))
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_len, generator=gen).tolist()

    def shard(self) -> list[int]:
        """This rank's indices for the next iteration (from ``start``, cut or padded)."""
        order = self.full_order()
        remaining = self._remaining()
        rest = order[self._start: self._start + remaining]
        if len(rest) < remaining:  # evaluation: wrap around to a multiple of world_size
            rest += (order * math.ceil(remaining / max(len(order), 1)))[: remaining - len(rest)]
        return rest[self.rank:: self.world_size]

    def __iter__(self) -> Iterator[int]:
        indices = self.shard()
        if self._start:
            logger.info("resuming epoch %d at sample %d of %d (all processes): %d left on this process",
                        self.epoch, self._start, self.dataset_len, len(indices))
        try:
            yield from indices
        finally:
            self._start = 0  # the start applies to one iteration only

    def __len__(self) -> int:
        return self._remaining() // self.world_size
