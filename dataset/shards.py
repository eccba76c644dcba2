"""Streaming pre-training data from WebDataset tar shards, mixed with JSON annotation files.

``train_file`` entries ending in ``.json`` are official annotation files; every other entry is a shard spec
(``/data/cc12m/{00000..01242}.tar``; braces and ``::`` as in ``webdataset``). :func:`build_pretrain_loader`
returns the exact-resume JSON loader (:func:`dataset.create_loader`) when every entry is JSON, else a
:class:`ShardLoader` over all entries. Samples, counts and decoding: :mod:`dataset.shard_io`.

How an epoch is laid out (every rank computes the same plan; nothing is exchanged):

* The units of data are the shards and, for JSON files mixed in, slices of ``JSON_UNIT_ITEMS`` items. Each
  epoch concatenates them in an order shuffled with ``(seed, epoch)`` (further shuffled passes follow when
  ``train_num_samples`` exceeds the data) and takes ``steps * batch_size * world_size`` samples,
  ``steps = train_num_samples // (batch_size * world_size)``: every rank runs the same number of steps.
* Rank ``r``'s loader worker ``w`` (of ``W``) makes the batches ``w, w + W, ...`` of the rank's epoch from a
  contiguous range of that many samples, so each sample goes to one worker of one rank (``train_num_samples``
  = the data size: each sample exactly once per epoch). A unit cut between two ranges is read by both, each
  skipping (reading, not decoding) the other's part: at most one shard of extra reading per worker and epoch.
* A worker reads its range in blocks of ``shuffle_buffer`` samples (raw bytes in memory) and emits each block
  in an order shuffled with ``(seed, epoch, stream, block)``; each sample's caption choice and augmentation
  are seeded with its place in the epoch, so the batches depend only on the seed, the epoch and the layout
  (world size, workers, batch size, ``shuffle_buffer``).

Mid-epoch resume (``set_start``) is exact: each worker re-reads the block it was in (and, read and discarded,
the part of that block's first shard before it) and emits the rest of the block in the same order; nothing is
repeated or skipped, augmentation included. It needs the layout and shard counts of the interrupted run.
Unreadable samples (an image that does not decode, no image or caption, a caption empty after cleaning, the
missing tail of a truncated shard) become ``None`` and are dropped and counted by ``collate_skip_none``, as on
the JSON path; a missing shard file is a :class:`DataError` naming it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataset.shard_io import (
    JSON_UNIT_ITEMS,
    SHARD_DEFAULTS,
    Unit,
    build_units,
    has_shards,
    make_example,
    mix_seed,
    preserved_rngs,
    read_unit,
)
from dataset.validate import DataError

__all__ = ["JSON_UNIT_ITEMS", "SHARD_DEFAULTS", "ShardLoader", "ShardStream", "build_pretrain_loader",
           "has_shards"]

logger = logging.getLogger(__name__)


class ShardStream(IterableDataset):
    """One rank's share of the epoch as an iterable of collated batches (see the module docstring).

    Each item is ``(images (B', 3, H, W), captions list[str], num_dropped)``, ``B'`` = ``batch_size`` minus the
    dropped samples (with ``return_keys``: ``(images, captions, keys, num_dropped)``), or ``(num_dropped,)``
    when every sample of the batch was dropped. Set ``epoch`` and ``start_step`` before iterating.

    Args:
        units: shards and JSON slices with their sample counts (``build_units``).
        json_items: the items of each JSON file that ``units`` refer to.
        transform: RGB PIL image -> tensor (3, H, W).
        batch_size: per-rank batch size.
        steps: batches per rank and epoch.
        rank, world_size: this rank and the number of ranks.
        num_workers: DataLoader workers of this rank (0: the main process, one stream).
        seed: base seed of the unit order, block shuffles and augmentation.
        shuffle_buffer: samples shuffled together by one worker.
        max_words: words kept by ``pre_caption``.
        image_root: joined with the image paths of JSON items.
        shuffle: shuffle units and blocks (False: file order, for inspection).
        return_keys: also return each sample's key (tar key, or ``file.json#index``).
    """

    def __init__(self, units: Sequence[Unit], json_items: Sequence[list[dict]], transform: Callable | None, *,
                 batch_size: int, steps: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 seed: int = 0, shuffle_buffer: int = 1000, max_words: int = 30, image_root: str = "",
                 shuffle: bool = True, return_keys: bool = False) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if batch_size < 1 or steps < 1 or shuffle_buffer < 1:
            raise ValueError(f"batch_size {batch_size}, steps {steps} and shuffle_buffer {shuffle_buffer} "
                             "must be >= 1")
        self.units, self.json_items, self.transform = list(units), json_items, transform
        self.batch_size, self.steps, self.rank, self.world_size = batch_size, steps, rank, world_size
        self.workers = max(1, num_workers)
        self.seed, self.shuffle_buffer, self.max_words = seed, shuffle_buffer, max_words
        self.image_root, self.shuffle, self.return_keys = image_root, shuffle, return_keys
        self.epoch, self.start_step = 0, 0

    def worker_batches(self, worker: int) -> int:
        """Batches that logical worker ``worker`` makes per epoch: steps ``worker, worker + W, ...``."""
        return len(range(worker, self.steps, self.workers))

    def stream_offset(self, worker: int) -> int:
        """Where logical worker ``worker`` of this rank starts in the epoch's sample sequence."""
        before = sum(self.worker_batches(w) for w in range(worker))
        return (self.rank * self.steps + before) * self.batch_size

    def unit_order(self, epoch: int, pass_index: int) -> list[int]:
        """The units of one pass over the data in epoch ``epoch``."""
        order = list(range(len(self.units)))
        if self.shuffle:
            random.Random(mix_seed(self.seed, epoch, pass_index)).shuffle(order)
        return order

    def segments(self, epoch: int, begin: int, length: int) -> list[tuple[int, int, int]]:
        """``(unit index, skip, take)`` covering samples ``[begin, begin + length)`` of the epoch's sequence."""
        out, pos, end = [], 0, begin + length
        if length <= 0:
            return out
        for pass_index in itertools.count():
            for u in self.unit_order(epoch, pass_index):
                count = self.units[u].count
                if pos + count > begin and count > 0:
                    skip = max(begin - pos, 0)
                    out.append((u, skip, min(end, pos + count) - pos - skip))
                pos += count
                if pos >= end:
                    return out
        return out  # unreachable: the loop ends when pos reaches end

    def _raw(self, epoch: int, begin: int, length: int) -> Iterator[dict | None]:
        for u, skip, take in self.segments(epoch, begin, length):
            yield from read_unit(self.units[u], skip, take, self.json_items, self.image_root)

    def _blocks(self, raw: Iterator[dict | None], quota: int, emitted: int, stream: int
                ) -> Iterator[tuple[int, dict | None]]:
        """``(position in the stream, raw sample)`` from ``emitted`` on, shuffled block by block."""
        size = self.shuffle_buffer
        for block in itertools.count(emitted // size):
            lo, hi = block * size, min((block + 1) * size, quota)
            if lo >= quota:
                return
            buf = list(itertools.islice(raw, hi - lo))  # raw samples at positions lo .. hi - 1
            order = list(range(hi - lo))
            if self.shuffle:
                random.Random(mix_seed(self.seed, self.epoch, stream, block, 1)).shuffle(order)
            for j, idx in enumerate(order):
                if lo + j >= emitted:  # the first block after a resume: only what was not emitted yet
                    yield lo + idx, buf[idx]
                buf[idx] = None  # release the bytes

    def __iter__(self) -> Iterator[tuple]:
        from dataset import collate_skip_none  # dataset/__init__ imports this module

        info = get_worker_info()
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream planned for {self.workers} workers runs in {info.num_workers}")
        done = self.start_step  # batches this rank ran before (mid-epoch resume)
        worker = ((info.id if info is not None else 0) + done) % self.workers  # DataLoader's round robin
        quota = self.worker_batches(worker) * self.batch_size
        emitted = len(range(worker, done, self.workers)) * self.batch_size
        stream = self.rank * self.workers + worker
        first = emitted // self.shuffle_buffer * self.shuffle_buffer
        raw = self._raw(self.epoch, self.stream_offset(worker) + first, quota - first)
        samples = self._blocks(raw, quota, emitted, stream)
        # in the training process (num_workers=0) each batch is made between saving and restoring its RNGs
        guard = preserved_rngs if info is None else contextlib.nullcontext
        for _ in range((quota - emitted) // self.batch_size):
            with guard():
                batch = [make_example(sample, self.transform, self.max_words,
                                      mix_seed(self.seed, self.epoch, stream, pos))
                         for pos, sample in itertools.islice(samples, self.batch_size)]
            yield collate_skip_none([e if e is None or self.return_keys else e[:2] for e in batch])


def _identity(batch: Any) -> Any:
    return batch


class ShardLoader:
    """The loader protocol of the training loop (``len``, ``batch_size``, ``sampler.set_epoch``,
    ``sampler.set_start``) over a :class:`ShardStream`; each iteration starts fresh workers that carry the
    epoch and the resume point.

    Args:
        dataset: the rank's stream.
        num_workers: DataLoader workers (must match ``dataset``'s plan).
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(self, dataset: ShardStream, num_workers: int, pin_memory: bool = False) -> None:
        if max(1, num_workers) != dataset.workers:
            raise ValueError(f"num_workers {num_workers} does not match the stream's {dataset.workers}")
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self._start = 0

    @property
    def batch_size(self) -> int:
        return self.dataset.batch_size

    @property
    def sampler(self) -> ShardLoader:
        """This loader: it takes ``set_epoch`` and ``set_start`` like ``ResumableSampler``."""
        return self

    @property
    def dataset_len(self) -> int:
        """Samples in all shards and JSON items: a mid-epoch checkpoint records it, and a resume on changed data
        is refused (``dataset.sampler.plan_epoch``)."""
        return sum(u.count for u in self.dataset.units)

    @property
    def seed(self) -> int:
        """The seed of the epoch layout: a mid-epoch resume under another one is refused (``plan_epoch``)."""
        return self.dataset.seed

    def set_epoch(self, epoch: int) -> None:
        """Select the unit order, shuffles and augmentation seeds of ``epoch``."""
        self.dataset.epoch = epoch

    def set_start(self, num_samples_to_skip: int) -> None:
        """Skip this rank's first ``num_samples_to_skip`` samples (whole batches) in the next iteration."""
        steps, rest = divmod(num_samples_to_skip, self.batch_size)
        if rest or not 0 <= steps <= self.dataset.steps:
            raise ValueError(f"cannot skip {num_samples_to_skip} samples: a multiple of batch size "
                             f"{self.batch_size} up to {self.dataset.steps} batches is needed")
        self._start = steps

    def __len__(self) -> int:
        return self.dataset.steps - self._start

    def __iter__(self) -> Iterator[tuple]:
        self.dataset.start_step = self._start
        if self._start:
            logger.info("resuming epoch %d at batch %d of %d", self.dataset.epoch, self._start,
                        self.dataset.steps)
        generator = torch.Generator()  # for the workers' base seed, instead of drawing from the global stream
        generator.manual_seed(self.dataset.seed + self.dataset.rank)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            pin_memory=self.pin_memory, generator=generator)
        try:
            yield from loader
        finally:
            self._start = self.dataset.start_step = 0  # the skip applies to one iteration only


def build_pretrain_loader(config: Mapping[str, Any], transform: Callable, seed: int, rank: int = 0,
                          world_size: int = 1, return_keys: bool = False) -> Any:
    """The pre-training loader of ``config['train_file']``: JSON files only -> ``create_loader`` over a
    ``PretrainDataset`` (exact resume as before); any shard spec -> a :class:`ShardLoader` over all entries.

    Reads ``train_file``, ``batch_size``, ``num_workers``, ``max_words`` (30), ``image_root`` ('') and, for
    shards, ``train_num_samples`` and ``shuffle_buffer`` (``SHARD_DEFAULTS``). Either loader has
    ``sampler.dataset_len``, the number of training samples (JSON items, or shard samples and JSON items).

    Raises:
        DataError: missing shard files or JSON files, invalid JSON items, fewer samples than one global batch.
    """
    from dataset import PretrainDataset, create_loader  # dataset/__init__ imports this module

    train_file, batch_size = config["train_file"], int(config["batch_size"])
    num_workers, max_words = int(config["num_workers"]), int(config.get("max_words", 30))
    image_root = config.get("image_root", "") or ""
    if not has_shards(train_file):
        dataset = PretrainDataset(train_file, transform, max_words, image_root)
        logger.info("%d image-text items from %d JSON annotation file(s)", len(dataset),
                    1 if isinstance(train_file, str) else len(train_file))
        return create_loader(dataset, batch_size, num_workers, shuffle=True, seed=seed, drop_last=True,
                             rank=rank, world_size=world_size)
    units, json_items = build_units(train_file)
    total = sum(u.count for u in units)
    num_samples = int(config.get("train_num_samples", SHARD_DEFAULTS["train_num_samples"])) or total
    steps = num_samples // (batch_size * world_size)
    if steps < 1:
        raise DataError(f"an epoch of {num_samples} samples is less than one global batch ({batch_size} x "
                        f"{world_size} ranks); training would run zero steps")
    logger.info("%d shards and JSON slices, %d samples; epoch: %d samples = %d steps x %d x %d ranks",
                len(units), total, steps * batch_size * world_size, steps, batch_size, world_size)
    stream = ShardStream(units, json_items, transform, batch_size=batch_size, steps=steps, rank=rank,
                         world_size=world_size, num_workers=num_workers, seed=seed,
                         shuffle_buffer=int(config.get("shuffle_buffer", SHARD_DEFAULTS["shuffle_buffer"])),
                         max_words=max_words, image_root=image_root, return_keys=return_keys)
    return ShardLoader(stream, num_workers, pin_memory=torch.cuda.is_available())
