"""NLVR2 data (official ``nlvr_dataset``): items ``{images: [path0, path1], sentence, label}``.

``images`` are relative to ``image_root``. ``label`` is the string ``"True"`` / ``"False"`` (official files)
or a JSON boolean -> 1 / 0. The official code maps anything but ``"True"`` to 0; here any other value
(``"true"``, ``1``, ``null`` ...) is a :class:`~dataset.validate.DataError` naming the file and item.
"""

from __future__ import annotations

import os
from typing import Any

from dataset.caption import pre_caption
from dataset.labelled_dataset import LabelledDataset
from dataset.validate import DataError

NLVR_SCHEMA: dict[str, type | tuple[type, ...]] = {"images": list, "sentence": str, "label": (str, bool)}
_NLVR_LABELS: dict[Any, int] = {"True": 1, "False": 0}


def nlvr_label(value: Any, where: str) -> int:
    """1 for ``"True"`` / ``true``, 0 for ``"False"`` / ``false``; ``where`` names the item in the error."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value in _NLVR_LABELS:
        return _NLVR_LABELS[value]
    raise DataError(f"{where}, key 'label': expected \"True\", \"False\" or a JSON boolean, got {value!r}")


def _check_images(images: list, where: str) -> None:
    if len(images) != 2 or not all(isinstance(p, str) and p.strip() for p in images):
        raise DataError(f"{where}, key 'images': expected a list of two image paths, got {images!r}"[:300])


def nlvr_item_label(item: dict, where: str) -> int:
    """The label of a schema-valid item (:func:`nlvr_label`) once its two image paths are checked; ``where`` names
    the item in a :class:`~dataset.validate.DataError`. The dataset and ``scripts/validate_data.py`` call it."""
    _check_images(item["images"], where)
    return nlvr_label(item["label"], where)


class NLVRDataset(LabelledDataset):
    """(image 1, image 2, sentence, label) items; every file and label is checked when the dataset is built
    (arguments: :class:`~dataset.labelled_dataset.LabelledDataset`; ``ann_files``: official, a list; the transform
    is applied to each image separately)."""

    SCHEMA = NLVR_SCHEMA
    label_of = staticmethod(nlvr_item_label)

    def __getitem__(self, index: int) -> tuple[Any, Any, str, int] | None:
        """Return ``(image0 (3, H, W), image1 (3, H, W), sentence, label)`` or ``None`` if an image is unreadable."""
        ann = self.ann[index]
        images = [self._loader(os.path.join(self.image_root, p)) for p in ann["images"]]
        if images[0] is None or images[1] is None:
            return None
        return images[0], images[1], pre_caption(ann["sentence"], self.max_words), self.labels[index]
