"""NLVR2 data (official ``nlvr_dataset``): items ``{images: [path0, path1], sentence, label}``.

``images`` are relative to ``image_root``. ``label`` is the string ``"True"`` / ``"False"`` (official files)
or a JSON boolean -> 1 / 0. The official code maps anything but ``"True"`` to 0; here any other value
(``"true"``, ``1``, ``null`` ...) is a :class:`~dataset.validate.DataError` naming the file and item.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

from dataset.caption import pre_caption
from dataset.image_io import SafeImageLoader
from dataset.validate import DataError, load_annotations

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


class NLVRDataset(Dataset):
    """(image 1, image 2, sentence, label) items; every file and label is checked when the dataset is built.

    Args:
        ann_files: JSON annotation files (official: a list; a single path is accepted too).
        transform: callable mapping an RGB PIL image to a tensor (applied to each image separately).
        image_root: folder the image paths are relative to.
        max_words: words kept by :func:`pre_caption`.
    """

    def __init__(self, ann_files: str | Sequence[str], transform: Callable, image_root: str,
                 max_words: int = 30) -> None:
        self.ann: list[dict] = []
        self.labels: list[int] = []
        for path in [ann_files] if isinstance(ann_files, str) else ann_files:
            items = load_annotations(path, NLVR_SCHEMA, text_keys=("sentence",))
            self.labels += [nlvr_item_label(item, f"{path}, item {i}") for i, item in enumerate(items)]
            self.ann += items
        self.image_root = image_root
        self.max_words = max_words
        self._loader = SafeImageLoader(transform)

    @property
    def num_skipped(self) -> int:
        """Fetches that returned ``None`` because an image was unreadable."""
        return self._loader.num_skipped

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[Any, Any, str, int] | None:
        """Return ``(image0 (3, H, W), image1 (3, H, W), sentence, label)`` or ``None`` if an image is unreadable."""
        ann = self.ann[index]
        images = [self._loader(os.path.join(self.image_root, p)) for p in ann["images"]]
        if images[0] is None or images[1] is None:
            return None
        return images[0], images[1], pre_caption(ann["sentence"], self.max_words), self.labels[index]
