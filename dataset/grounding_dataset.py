"""Referring-expression data for weakly supervised grounding (official ``grounding_dataset``, RefCOCO+).

* Training items ``{image, text}`` (extra keys ignored): the image id of ITC positives is the image file's
  name (the last path component), as in the official code; no boxes are used.
* Evaluation items ``{image, text, ref_id}``.
* Ground truth per ``ref_id`` from the official ``refer`` layout (``<root>/refcoco+/refs(unc).p`` and
  ``<root>/refcoco+/instances.json``, read as the official ``REFER`` class does) or from a plain JSON
  ``{ref_id: {"split", "bbox": [x, y, w, h], "image_id", "height", "width"}}``.
* Proposals in the official ``dets.json`` form ``{str(image_id): [[x, y, w, h, ...], ...]}``.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from dataset.caption import pre_caption
from dataset.image_io import SafeImageLoader
from dataset.retrieval_dataset import RetrievalTrainDataset
from dataset.validate import (
    GROUNDING_TEST_SCHEMA,
    GROUNDING_TRAIN_SCHEMA,
    DataError,
    load_annotation_files,
    read_json,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefTruth:
    """Ground truth of one referring expression: its split, the referred box and the image's id and size."""

    split: str
    bbox: tuple[float, float, float, float]  # [x, y, w, h] in image pixels
    image_id: int | str
    height: int
    width: int


# ----------------------------------------------------------------------------- ground truth
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _truth(where: str, split: Any, bbox: Any, image_id: Any, height: Any, width: Any) -> RefTruth:
    if not isinstance(split, str) or not split:
        raise DataError(f"{where}: 'split' must be a non-empty string, got {split!r}")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(_number, bbox)):
        raise DataError(f"{where}: 'bbox' must be [x, y, w, h] numbers, got {bbox!r}")
    if bbox[2] <= 0 or bbox[3] <= 0:
        raise DataError(f"{where}: 'bbox' has no area: {bbox!r}")
    if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
        raise DataError(f"{where}: 'image_id' must be an int or a string, got {image_id!r}")
    for key, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DataError(f"{where}: {key!r} must be a positive int, got {value!r}")
    return RefTruth(split, tuple(float(v) for v in bbox), image_id, height, width)


def load_plain_truth(path: str) -> dict[int, RefTruth]:
    """``{ref_id: {"split", "bbox", "image_id", "height", "width", ...}}`` JSON -> {int ref_id: RefTruth}."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object keyed by ref_id, got {type(data).__name__}")
    out: dict[int, RefTruth] = {}
    for key, ref in data.items():
        where = f"{path}, ref_id {key!r}"
        try:
            ref_id = int(key)
        except ValueError:
            raise DataError(f"{where}: ref_id keys must be integers") from None
        if not isinstance(ref, dict):
            raise DataError(f"{where}: expected an object, got {type(ref).__name__}")
        missing = [k for k in ("split", "bbox", "image_id", "height", "width") if k not in ref]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}")
        out[ref_id] = _truth(where, ref["split"], ref["bbox"], ref["image_id"], ref["height"], ref["width"])
    return out


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds lists, dicts, strings and numbers only: a refs file never needs a class, so none is imported."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refuses to load {module}.{name}: a refs file holds only plain data")


def _read_refs(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: refs file not found")
    try:
        with open(path, "rb") as f:
            refs = _DataOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the refs pickle: {err}") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DataError(f"{path}: expected a pickled list of ref dicts")
    return refs


def load_refer_truth(data_root: str, dataset: str = "refcoco+", split_by: str = "unc") -> dict[int, RefTruth]:
    """Ground truth from the ``refer`` layout, as the official ``REFER(data_root, dataset, split_by)``.

    The box is that of the ref's annotation (``instances.json`` ``annotations[ann_id]['bbox']``), the size that
    of its image (``images[image_id]``). ``data_root`` may also be the dataset folder itself.
    """
    folder = os.path.join(data_root, dataset)
    if not os.path.isdir(folder):
        folder = data_root
    refs = _read_refs(os.path.join(folder, f"refs({split_by}).p"))
    instances_path = os.path.join(folder, "instances.json")
    instances = read_json(instances_path)
    if not isinstance(instances, dict) or not {"images", "annotations"} <= set(instances):
        raise DataError(f"{instances_path}: expected an object with 'images' and 'annotations'")
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    out: dict[int, RefTruth] = {}
    for ref in refs:
        where = f"{folder}: ref_id {ref.get('ref_id')!r}"
        try:
            ann, image = anns[ref["ann_id"]], images[ref["image_id"]]
            out[ref["ref_id"]] = _truth(where, ref["split"], ann["bbox"], ref["image_id"], image["height"],
                                        image["width"])
        except KeyError as err:
            raise DataError(f"{where}: no {err.args[0]!r} entry (refs and instances.json disagree)") from None
    return out


def load_ground_truth(source: str, dataset: str = "refcoco+", split_by: str = "unc") -> dict[int, RefTruth]:
    """``source``: a plain JSON file, or the official ``refcoco_data`` folder (``refer`` layout)."""
    if os.path.isfile(source):
        return load_plain_truth(source)
    if os.path.isdir(source):
        return load_refer_truth(source, dataset, split_by)
    raise DataError(f"{source}: grounding ground truth not found (a JSON file or a refer data folder)")


def load_dets(path: str) -> dict[str, list[list[float]]]:
    """The proposal file ``{str(image_id): [[x, y, w, h, ...], ...]}``; only the first four numbers are used."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object keyed by image id, got {type(data).__name__}")
    for key, boxes in data.items():
        if not isinstance(boxes, list) or not all(
                isinstance(b, list) and len(b) >= 4 and all(map(_number, b[:4])) for b in boxes):
            raise DataError(f"{path}, image {key!r}: expected a list of [x, y, w, h, ...] boxes")
    return data


def reference_problems(ref_ids: Sequence[int], truth: dict[int, RefTruth], dets: dict[str, list],
                       source: str = "test_file") -> list[str]:
    """What evaluation would trip on: ref ids of ``source`` without ground truth, and their images without
    proposals in the detection file (each problem with a count and up to 5 examples)."""
    problems = []
    missing = sorted({r for r in ref_ids if r not in truth})
    if missing:
        problems.append(f"{len(missing)} ref_id(s) of {source} have no ground truth, e.g. {missing[:5]}")
    no_dets = sorted({str(truth[r].image_id) for r in ref_ids if r in truth and not dets.get(str(truth[r].image_id))})
    if no_dets:
        problems.append(f"{len(no_dets)} image(s) of {source} have no proposals in the detection file, "
                        f"e.g. {no_dets[:5]}")
    return problems


def grounding_file_problems(config: dict, test_items: Sequence[dict]) -> list[str]:
    """Problems of a grounding config's ``refcoco_data`` and ``det_file`` and of their coverage of the
    ``ref_id`` of ``test_items`` (the valid evaluation items): what ``Grounding.py`` checks at start-up."""
    try:
        truth = load_ground_truth(config.get("refcoco_data") or "", config.get("refer_dataset", "refcoco+"),
                                  config.get("refer_split_by", "unc"))
        dets = load_dets(config.get("det_file") or "")
    except DataError as err:
        return [str(err)]
    return reference_problems([item["ref_id"] for item in test_items], truth, dets)


# ----------------------------------------------------------------------------- datasets
def image_key(path: str) -> str:
    """The image id of ITC positives: the file name (official ``ann['image'].split('/')[-1]``)."""
    return path.split("/")[-1]


class GroundingTrainDataset(RetrievalTrainDataset):
    """``(image (3, R, R), cleaned text, image index)`` per ``{image, text}`` expression: the retrieval training
    data with ``text`` for ``caption`` and the image's file name for ``image_id`` (official: images with the same
    file name share an index)."""

    SCHEMA = GROUNDING_TRAIN_SCHEMA
    TEXT_KEY = "text"

    @staticmethod
    def image_id_of(ann: dict) -> str:
        return image_key(ann["image"])


class GroundingEvalDataset(Dataset):
    """``(image (3, R, R), cleaned text, ref_id)`` per referring expression."""

    def __init__(self, ann_files: str | Sequence[str], transform: Callable, image_root: str,
                 max_words: int = 30) -> None:
        self.ann = load_annotation_files(ann_files, GROUNDING_TEST_SCHEMA, text_keys=("text",))
        self.image_root = image_root
        self.max_words = max_words
        self._loader = SafeImageLoader(transform)

    @property
    def ref_ids(self) -> list[int]:
        return [ann["ref_id"] for ann in self.ann]

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[Any, str, int] | None:
        ann = self.ann[index]
        image = self._loader(os.path.join(self.image_root, ann["image"]))
        if image is None:
            return None
        return image, pre_caption(ann["text"], self.max_words), ann["ref_id"]
