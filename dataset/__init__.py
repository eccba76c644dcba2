"""ALBEF data: caption cleaning, transforms, robust image I/O, datasets, loaders.

Datasets return ``None`` for samples whose image cannot be read;
:func:`collate_skip_none` drops them and reports how many were dropped as the
last element of every batch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dataset.caption import pre_caption, pre_question
from dataset.image_io import ImageLoadError, SafeImageLoader, load_image
from dataset.nlvr_dataset import NLVRDataset
from dataset.pretrain_dataset import PretrainDataset
from dataset.randaugment import RandomAugment
from dataset.retrieval_dataset import RetrievalEvalDataset, RetrievalTrainDataset
from dataset.sampler import ResumableSampler
from dataset.shards import SHARD_DEFAULTS, ShardLoader, build_pretrain_loader, has_shards
from dataset.task_files import validate_config_files
from dataset.transforms import CLIP_MEAN, CLIP_STD, build_transform
from dataset.validate import DataError, load_annotations
from dataset.ve_dataset import VEDataset
from dataset.vqa_dataset import VQATestDataset, VQATrainDataset, load_answer_list, vqa_collate

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DataError",
    "ImageLoadError",
    "NLVRDataset",
    "PretrainDataset",
    "RandomAugment",
    "ResumableSampler",
    "SHARD_DEFAULTS",
    "ShardLoader",
    "RetrievalEvalDataset",
    "RetrievalTrainDataset",
    "SafeImageLoader",
    "VEDataset",
    "VQATestDataset",
    "VQATrainDataset",
    "build_pretrain_loader",
    "build_transform",
    "collate_skip_none",
    "create_loader",
    "has_shards",
    "load_annotations",
    "load_answer_list",
    "load_image",
    "pre_caption",
    "pre_question",
    "seed_worker",
    "validate_config_files",
    "vqa_collate",
]

logger = logging.getLogger(__name__)


def _collate_field(values: Sequence[Any]) -> Any:
    """Stack tensors, turn ints into a LongTensor and floats into a float tensor,
    keep everything else (strings, lists) as a list."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(values), dim=0)  # (B, ...)
    if isinstance(first, bool):
        return list(values)
    if isinstance(first, int):
        return torch.tensor(values, dtype=torch.long)  # (B,)
    if isinstance(first, float):
        return torch.tensor(values, dtype=torch.float)  # (B,)
    return list(values)


def collate_skip_none(batch: list) -> tuple:
    """Collate tuples, dropping ``None`` samples (unreadable images).

    Args:
        batch: samples, each a tuple (or ``None``).

    Returns:
        ``(*fields, num_dropped)`` with tensors stacked, ints as a LongTensor and
        strings as lists; just ``(num_dropped,)`` if every sample was dropped, so the count is never lost.
    """
    kept = [sample for sample in batch if sample is not None]
    num_dropped = len(batch) - len(kept)
    if not kept:
        return (num_dropped,)
    fields = tuple(_collate_field(column) for column in zip(*kept, strict=True))
    return (*fields, num_dropped)


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and numpy in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def create_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Callable[[list], tuple] = collate_skip_none,
) -> DataLoader:
    """Build a DataLoader over a :class:`ResumableSampler` shard of ``dataset``.

    Training loaders (``drop_last=True``) yield the same number of full batches
    on every rank (before ``None`` samples are dropped); evaluation loaders pad
    by wrapping. Call ``loader.sampler.set_epoch(e)`` each epoch and
    ``loader.sampler.set_start(k)`` to resume after ``k`` samples.

    Args:
        dataset: map-style dataset returning tuples or ``None``.
        batch_size: per-rank batch size.
        num_workers: worker processes (0: load in the main process).
        shuffle: reshuffle each epoch (seeded by ``seed + epoch``).
        seed: base seed of the sampler and of the worker seeds.
        drop_last: keep only full batches (training).
        rank: this process's rank.
        world_size: number of ranks.
        collate_fn: batch collation; it must end each batch with the dropped-sample count
            (``collate_skip_none``, ``dataset.vqa_dataset.vqa_collate``).

    Returns:
        The DataLoader; each batch is ``collate_skip_none``'s output.
    """
    sampler = ResumableSampler(
        len(dataset),
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        batch_size=batch_size,
    )
    generator = torch.Generator()
    generator.manual_seed(seed + rank)  # distinct augmentation streams per rank
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
    )
