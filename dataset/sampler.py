"""A deterministic, rank-sharded sampler that resumes in the middle of an epoch from a GLOBAL sample position,
under any batch size and any number of processes."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Sampler

from dataset.validate import DataError

logger = logging.getLogger(__name__)


def global_batch_problem(num_items: int, batch_size: int, world_size: int) -> str | None:
    """Why ``num_items`` cannot fill one global batch of ``batch_size x world_size``, or None."""
    global_batch = batch_size * world_size
    if num_items < global_batch:
        return (f"{num_items} samples, fewer than one global batch (batch size {batch_size} x {world_size} "
                f"process(es) = {global_batch}): training would run zero steps; lower the batch size "
                f"(batch_size or batch_size_train) or add data")
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


@dataclass
class EpochPlan:
    """Where an epoch starts and how its steps map to samples consumed by all processes together.

    ``steps`` counts the whole epoch: the ``start_step`` optimizer steps done before a resume (under whatever
    batch size) plus this iteration's. ``identity``: what the position depends on, saved with it.
    """

    start_step: int
    start_samples: int
    global_batch: int
    steps: int
    identity: dict = field(default_factory=dict)

    def samples_at(self, step: int) -> int:
        """Global samples consumed before step ``step`` (``>= start_step``) of this epoch."""
        return self.start_samples + (step - self.start_step) * self.global_batch

    def fraction(self, step: int) -> float:
        """Share of the epoch's samples consumed before ``step``: the alpha ramp's position."""
        return self.samples_at(step) / max(self.samples_at(self.steps), 1)

    def position(self, step: int) -> dict:
        """What a checkpoint written after ``step`` steps records: ``samples`` consumed and ``identity``."""
        return {"samples": self.samples_at(step), **self.identity}


def plan_epoch(loader: Any, epoch: int, start_step: int = 0, position: dict | None = None,
               world_size: int = 1) -> EpochPlan:
    """Select ``epoch`` on ``loader.sampler`` and, after ``start_step`` steps of a mid-epoch checkpoint, start
    at the global sample ``position['samples']`` whatever batch size and number of processes wrote it.

    A loader whose sampler has ``resume_from`` (``ResumableSampler``) continues from that sample under any
    batch size and world size; one with only ``set_start`` (per-rank streams, e.g. WebDataset shards) needs
    the batch layout it was saved with. A checkpoint without ``position`` (written before positions were
    recorded) is taken to have the current layout.

    Raises:
        DataError: the data or seed changed since the checkpoint, or the loader cannot continue from it.
    """
    sampler = loader.sampler
    sampler.set_epoch(epoch)
    batch = int(loader.batch_size)
    identity = {"batch_size": batch, "world_size": world_size, "global_batch": batch * world_size,
                "dataset_len": getattr(sampler, "dataset_len", None), "seed": getattr(sampler, "seed", None)}
    samples = 0
    if start_step:
        if position is None:
            samples = start_step * batch * world_size
            logger.warning("the checkpoint records no sample position: assuming it was written with batch size "
                           "%d x %d process(es)", batch, world_size)
        else:
            samples = int(position["samples"])
            _check_same_order(position, identity, epoch)
        _start_at(sampler, samples, position, identity)
    return EpochPlan(start_step, samples, batch * world_size, start_step + len(loader), identity)


def _check_same_order(saved: dict, now: dict, epoch: int) -> None:
    """The epoch's order depends on the data and the seed: a position in another order means nothing."""
    before = f"resume from checkpoint_{epoch - 1:02d}.pth (the end of the previous epoch)" if epoch else \
        "start again"
    if None not in (saved.get("dataset_len"), now["dataset_len"]) and saved["dataset_len"] != now["dataset_len"]:
        raise DataError(f"the training data changed since the mid-epoch checkpoint ({saved['dataset_len']} samples "
                        f"then, {now['dataset_len']} now): its position in epoch {epoch} cannot carry over; restore "
                        f"the data or {before}")
    if None not in (saved.get("seed"), now["seed"]) and saved["seed"] != now["seed"]:
        raise DataError(f"the mid-epoch checkpoint's data order comes from --seed {saved['seed']} (now "
                        f"{now['seed']}): resume with --seed {saved['seed']}")


def _start_at(sampler: Any, samples: int, saved: dict | None, now: dict) -> None:
    if hasattr(sampler, "resume_from"):
        if saved is not None and saved.get("global_batch") != now["global_batch"]:
            logger.info("resuming at sample %d with batch size %d x %d process(es) (the checkpoint's: %s x %s)",
                        samples, now["batch_size"], now["world_size"], saved.get("batch_size"),
                        saved.get("world_size"))
        sampler.resume_from(samples)
        return
    layout = (now["batch_size"], now["world_size"])
    if saved is not None and (saved.get("batch_size"), saved.get("world_size")) != layout:
        raise DataError(f"this loader resumes mid-epoch only with the batch layout of the checkpoint (batch size "
                        f"{saved.get('batch_size')} x {saved.get('world_size')} process(es), now {layout[0]} x "
                        f"{layout[1]}): resume with that layout, or from the previous epoch's checkpoint")
    sampler.set_start(samples // now["world_size"])
