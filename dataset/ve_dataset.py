"""SNLI-VE data (official ``ve_dataset``): items ``{image, sentence, label}``.

``image`` is a Flickr30K id without extension, read as ``image_root/<id>.jpg`` (official); a value with an
extension (``12345.png``, ``flickr30k-images/12345.jpg``) is used as is, under ``image_root``. ``label`` is
``entailment`` / ``neutral`` / ``contradiction`` -> 2 / 1 / 0 (official mapping); anything else is a
:class:`~dataset.validate.DataError` naming the file and item.
"""

from __future__ import annotations

import os
from typing import Any

from dataset.caption import pre_caption
from dataset.labelled_dataset import LabelledDataset
from dataset.validate import DataError

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


class VEDataset(LabelledDataset):
    """(image, hypothesis, label) triples; every file and label is checked when the dataset is built (arguments:
    :class:`~dataset.labelled_dataset.LabelledDataset`; ``ann_files``: official, a string)."""

    SCHEMA = VE_SCHEMA

    @staticmethod
    def label_of(item: dict, where: str) -> int:
        return ve_label(item["label"], where)

    def __getitem__(self, index: int) -> tuple[Any, str, int] | None:
        """Return ``(image (3, H, W), sentence, label)`` or ``None`` if the image is unreadable."""
        ann = self.ann[index]
        image = self._loader(ve_image_path(self.image_root, ann["image"]))
        if image is None:
            return None
        return image, pre_caption(ann["sentence"], self.max_words), self.labels[index]
