"""Image-text retrieval data (official ``re_train_dataset`` / ``re_eval_dataset``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

from torch.utils.data import Dataset

from dataset.caption import pre_caption
from dataset.image_io import SafeImageLoader
from dataset.validate import (
    RETRIEVAL_EVAL_SCHEMA,
    RETRIEVAL_TRAIN_SCHEMA,
    TypeSpec,
    load_annotation_files,
    load_annotations,
)


class RetrievalTrainDataset(Dataset):
    """One item per caption: ``{image, caption, image_id}``.

    ``image_id`` (any hashable) is re-indexed to ``0..N-1`` in first-seen order;
    the index marks ITC positives and masks same-image ITM negatives.

    Args:
        ann_files: JSON annotation files (a single path is accepted too).
        transform: callable mapping an RGB PIL image to a tensor.
        image_root: directory the relative ``image`` paths are joined to.
        max_words: words kept by :func:`pre_caption`.
    """

    SCHEMA: ClassVar[Mapping[str, TypeSpec]] = RETRIEVAL_TRAIN_SCHEMA
    TEXT_KEY: ClassVar[str] = "caption"

    def __init__(
        self,
        ann_files: str | Sequence[str],
        transform: Callable,
        image_root: str,
        max_words: int = 30,
    ) -> None:
        self.ann = load_annotation_files(ann_files, self.SCHEMA, text_keys=(self.TEXT_KEY,))
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.img_ids: dict[Hashable, int] = {}
        for ann in self.ann:
            self.img_ids.setdefault(self.image_id_of(ann), len(self.img_ids))
        self._loader = SafeImageLoader(transform)

    @staticmethod
    def image_id_of(ann: dict) -> Hashable:
        """The id that marks an item's image (items sharing it are ITC positives of each other)."""
        return ann["image_id"]

    @property
    def num_skipped(self) -> int:
        """Fetches that returned ``None`` because the image was unreadable."""
        return self._loader.num_skipped

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[Any, str, int] | None:
        """Return ``(image (3, H, W), caption, image index)`` or ``None``."""
        ann = self.ann[index]
        image = self._loader(os.path.join(self.image_root, ann["image"]))
        if image is None:
            return None
        return image, pre_caption(ann[self.TEXT_KEY], self.max_words), self.img_ids[self.image_id_of(ann)]


class RetrievalEvalDataset(Dataset):
    """One item per image: ``{image, caption: [str, ...]}``.

    Attributes:
        text: all cleaned captions, image by image.
        image: image paths as written in the file (relative to ``image_root``).
        txt2img: caption index -> image index.
        img2txt: image index -> its caption indices.

    Args:
        ann_file: one JSON annotation file.
        transform: callable mapping an RGB PIL image to a tensor.
        image_root: directory the relative ``image`` paths are joined to.
        max_words: words kept by :func:`pre_caption`.
    """

    def __init__(
        self, ann_file: str, transform: Callable, image_root: str, max_words: int = 30
    ) -> None:
        self.ann = load_annotations(ann_file, RETRIEVAL_EVAL_SCHEMA)
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.text: list[str] = []
        self.image: list[str] = []
        self.txt2img: dict[int, int] = {}
        self.img2txt: dict[int, list[int]] = {}
        for img_id, ann in enumerate(self.ann):
            self.image.append(ann["image"])
            self.img2txt[img_id] = []
            for caption in ann["caption"]:
                txt_id = len(self.text)
                self.text.append(pre_caption(caption, max_words))
                self.img2txt[img_id].append(txt_id)
                self.txt2img[txt_id] = img_id
        self._loader = SafeImageLoader(transform)

    @property
    def num_skipped(self) -> int:
        """Fetches that returned ``None`` because the image was unreadable."""
        return self._loader.num_skipped

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        """Return ``(image (3, H, W), index)`` or ``None`` if the image is unreadable."""
        image = self._loader(os.path.join(self.image_root, self.image[index]))
        if image is None:
            return None
        return image, index
