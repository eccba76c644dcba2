"""Pre-training image-text pairs (official ``pretrain_dataset``)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

from dataset.caption import pre_caption
from dataset.image_io import SafeImageLoader
from dataset.validate import PRETRAIN_SCHEMA, load_annotation_files


class PretrainDataset(Dataset):
    """Items ``{image, caption}``; ``caption`` is a str or a list of str.

    Every annotation file is loaded and validated up front, so schema errors
    surface as :class:`~dataset.validate.DataError` before training starts.

    Args:
        ann_files: JSON annotation files (a single path is accepted too).
        transform: callable mapping an RGB PIL image to a tensor.
        max_words: words kept by :func:`pre_caption`.
        image_root: joined with relative image paths (absolute paths, as in the
            official files, are used unchanged).
    """

    def __init__(
        self,
        ann_files: str | Sequence[str],
        transform: Callable,
        max_words: int = 30,
        image_root: str = "",
    ) -> None:
        self.ann = load_annotation_files(ann_files, PRETRAIN_SCHEMA)
        self.transform = transform
        self.max_words = max_words
        self.image_root = image_root
        self._loader = SafeImageLoader(transform)

    @property
    def num_skipped(self) -> int:
        """Fetches that returned ``None`` because the image was unreadable."""
        return self._loader.num_skipped

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[Any, str] | None:
        """Return ``(image (3, H, W), caption)`` or ``None`` if the image is unreadable."""
        ann = self.ann[index]
        caption = ann["caption"]
        if isinstance(caption, list):
            caption = random.choice(caption)  # one of several captions per fetch
        image = self._loader(os.path.join(self.image_root, ann["image"]))
        if image is None:
            return None
        return image, pre_caption(caption, self.max_words)
