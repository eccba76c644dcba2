"""The shared body of the classification datasets (SNLI-VE, NLVR2): annotation files checked item by item when
the dataset is built, one class label per item, images read through :class:`~dataset.image_io.SafeImageLoader`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from torch.utils.data import Dataset

from dataset.image_io import SafeImageLoader
from dataset.validate import TypeSpec, load_checked_annotations


class LabelledDataset(Dataset):
    """Items of ``SCHEMA`` (text under ``TEXT_KEY``) and their labels; a subclass sets the two class attributes
    and ``label_of(item, where)`` (a ``DataError`` naming ``where``, "<file>, item <i>", for a bad item) and
    defines ``__getitem__``.

    Args:
        ann_files: one JSON annotation file or several.
        transform: callable mapping an RGB PIL image to a tensor.
        image_root: folder the image paths are relative to.
        max_words: words kept by :func:`~dataset.caption.pre_caption`.
    """

    SCHEMA: ClassVar[Mapping[str, TypeSpec]] = {}
    TEXT_KEY: ClassVar[str] = "sentence"

    def __init__(self, ann_files: str | Sequence[str], transform: Callable, image_root: str,
                 max_words: int = 30) -> None:
        self.ann: list[dict] = []
        self.labels: list[int] = []
        for path in [ann_files] if isinstance(ann_files, str) else ann_files:
            items, labels = load_checked_annotations(path, self.SCHEMA, (self.TEXT_KEY,), self.label_of)
            self.ann += items
            self.labels += labels
        self.image_root = image_root
        self.max_words = max_words
        self._loader = SafeImageLoader(transform)

    @staticmethod
    def label_of(item: dict, where: str) -> int:
        raise NotImplementedError

    @property
    def num_skipped(self) -> int:
        """Fetches that returned ``None`` because an image was unreadable."""
        return self._loader.num_skipped

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError
