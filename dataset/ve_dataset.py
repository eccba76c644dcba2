"""SNLI-VE data (official ``ve_dataset``): items ``{image, sentence, label}``.

``image`` is a Flickr30K id without extension, read as ``image_root/<id>.jpg`` (official); a value with an
extension (``12345.png``, ``flickr30k-images/12345.jpg``) is used as is, under ``image_root``. ``label`` is
``entailment`` / ``neutral`` / ``contradiction`` -> 2 / 1 / 0 (official mapping); anything else is a
:class:`~dataset.validate.DataError` naming the file and item.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

from dataset.caption import pre_caption
from dataset.image_io import SafeImageLoader
from dataset.validate import DataError, load_annotations

VE_SCHEMA: dict[str, type] = {"image": str, "sentence": str, "label": str}
VE_LABELS: dict[str, int] = {"contradiction": 0, "neutral": 1, "entailment": 2}
VE_CLASS_NAMES: tuple[str, ...] = tuple(sorted(VE_LABELS, key=VE_LABELS.get))  # index -> name


def ve_label(value: Any, where: str) -> int:
    """The class index of a SNLI-VE label string; ``where`` names the item in the error."""
    if isinstance(value, str) and value in VE_LABELS:
        return VE_LABELS[value]
    raise DataError(f"{where}, key 'label': expected one of {sorted(VE_LABELS)}, got {value!r}")


def ve_image_path(image_root: str, image: str) -> str:
    """``image_root/<id>.jpg`` for an id without extension (official), else ``image_root/<image>``."""
    return os.path.join(image_root, image if os.path.splitext(image)[1] else f"{image}.jpg")


class VEDataset(Dataset):
    """(image, hypothesis, label) triples; every file and label is checked when the dataset is built.

    Args:
        ann_files: one JSON annotation file (official: a string) or several.
        transform: callable mapping an RGB PIL image to a tensor.
        image_root: folder of the images.
        max_words: words kept by :func:`pre_caption`.
    """

    def __init__(self, ann_files: str | Sequence[str], transform: Callable, image_root: str,
                 max_words: int = 30) -> None:
        self.ann: list[dict] = []
        self.labels: list[int] = []
        for path in [ann_files] if isinstance(ann_files, str) else ann_files:
            items = load_annotations(path, VE_SCHEMA, text_keys=("sentence",))
            self.labels += [ve_label(item["label"], f"{path}, item {i}") for i, item in enumerate(items)]
            self.ann += items
        self.image_root = image_root
        self.max_words = max_words
        self._loader = SafeImageLoader(transform)

    @property
    def num_skipped(self) -> int:
        """Fetches that returned ``None`` because the image was unreadable."""
        return self._loader.num_skipped

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[Any, str, int] | None:
        """Return ``(image (3, H, W), sentence, label)`` or ``None`` if the image is unreadable."""
        ann = self.ann[index]
        image = self._loader(ve_image_path(self.image_root, ann["image"]))
        if image is None:
            return None
        return image, pre_caption(ann["sentence"], self.max_words), self.labels[index]
