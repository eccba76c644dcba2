"""VQA data in the official ALBEF formats (``dataset/vqa_dataset.py``, ``vqa_collate_fn``).

- Training items ``{image, question, answer, dataset}``: ``dataset`` is ``'vqa'`` (image under ``vqa_root``,
  ``answer`` a list of annotator answers, each distinct answer weighted by its share of the list) or ``'vg'``
  (image under ``vg_root``, ``answer`` one string, weight 0.5). ``eos`` is appended to every answer. Questions
  are cleaned by ``pre_question`` (30 words). ``question_id`` is ignored.
- Test items ``{image, question, question_id[, dataset]}`` (``dataset`` defaults to ``'vqa'``; the official code
  needs it), questions cleaned to 50 words. Ground truth, when present (a val split), comes from the items'
  ``answer`` or from a ``{question_id: answer(s)}`` file; question types from the items' ``question_type`` /
  ``answer_type`` or from ``(name, regex)`` rules on the question.
- The answer list is a JSON list of strings.

Bad input: schema problems, an unknown ``dataset``, a test item without an int ``question_id``, duplicate
question ids, missing test images and an answer list that is not a list of strings are :class:`DataError`\\s
naming the file and item. Empty training questions are skipped and counted; training answers outside the answer
list are kept (they are trained on, as officially) and counted; unreadable training images are dropped by the
collate function and counted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from dataset.caption import pre_question
from dataset.image_io import SafeImageLoader
from dataset.validate import DataError, load_annotation_files, read_json
from dataset.vqa_eval import question_types

logger = logging.getLogger(__name__)

VQA_TRAIN_SCHEMA: dict[str, type | tuple[type, ...]] = {"image": str, "question": str, "answer": (str, list),
                                                        "dataset": str}
VQA_TEST_SCHEMA: dict[str, type | tuple[type, ...]] = {"image": str, "question": str, "question_id": int}
VG_WEIGHT = 0.5  # official weight of a Visual Genome answer
_LISTED = 5  # examples named in a warning


def load_answer_list(path: str) -> list[str]:
    """The candidate answers: a JSON list of non-empty strings (duplicates are warned about: they tie)."""
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: answer_list must be a non-empty JSON list of strings, got "
                        f"{type(data).__name__ if not isinstance(data, list) else 'an empty list'}")
    for i, answer in enumerate(data):
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{path}, item {i}: answer_list entries must be non-empty strings, got {answer!r}")
    duplicates = len(data) - len(set(data))
    if duplicates:
        logger.warning("%s: %d duplicate answers (they get equal scores; the first wins)", path, duplicates)
    return data


def answer_weights(item: dict, where: str) -> tuple[list[str], list[float]]:
    """Distinct answers and weights of a training item (official): shares of a 'vqa' list, 0.5 for 'vg'."""
    answer, source = item["answer"], item["dataset"]
    if source == "vqa":
        if not isinstance(answer, list) or not answer or not all(isinstance(a, str) for a in answer):
            raise DataError(f"{where}, key 'answer': a 'vqa' item needs a non-empty list of strings, got {answer!r}")
        weights: dict[str, float] = {}
        for a in answer:  # the official running sum of 1/len (not count/len: the same up to rounding)
            weights[a] = weights.get(a, 0.0) + 1 / len(answer)
        return list(weights), list(weights.values())
    if source == "vg":
        if not isinstance(answer, str):
            raise DataError(f"{where}, key 'answer': a 'vg' item needs one string, got {answer!r}")
        return [answer], [VG_WEIGHT]
    raise DataError(f"{where}, key 'dataset': expected 'vqa' or 'vg', got {source!r}")


def vqa_image_path(item: dict, vqa_root: str, vg_root: str) -> str:
    """The image file of an item: ``vg_root/image`` for a ``'vg'`` item, else ``vqa_root/image``."""
    return os.path.join(vg_root if item.get("dataset") == "vg" else vqa_root, item["image"])


def check_test_item(item: dict, where: str, seen: dict[int, str]) -> None:
    """A schema-valid test item's own checks: a ``question_id`` not in ``seen`` (id -> the item that has it; the
    item's id is added) and a known ``dataset``; a :class:`DataError` naming ``where`` otherwise. The dataset and
    ``scripts/validate_data.py`` call it."""
    qid = item["question_id"]
    if qid in seen:
        raise DataError(f"{where}: question_id {qid} repeats {seen[qid]}; result files need unique ids")
    if item.get("dataset", "vqa") not in ("vqa", "vg"):
        raise DataError(f"{where}, key 'dataset': expected 'vqa' or 'vg', got {item['dataset']!r}")
    seen[qid] = where


class VQATrainDataset(Dataset):
    """``(image, question, answers + eos, weights)`` per item, or ``None`` for an unreadable image.

    Args:
        ann_files: training JSON files. transform: PIL -> tensor. vqa_root, vg_root: image folders.
        eos: appended to every answer. max_words: kept by ``pre_question``.
        answer_list: if given, answers outside it are counted (``out_of_list``) and reported.
    """

    def __init__(self, ann_files: str | Sequence[str], transform: Callable, vqa_root: str, vg_root: str,
                 eos: str = "[SEP]", max_words: int = 30, answer_list: Sequence[str] | None = None) -> None:
        files = [ann_files] if isinstance(ann_files, str) else list(ann_files)
        self.items: list[tuple[str, str, list[str], list[float]]] = []
        empty: list[str] = []
        for path in files:
            for i, item in enumerate(load_annotation_files(path, VQA_TRAIN_SCHEMA, text_keys=())):
                answers, weights = answer_weights(item, f"{path}, item {i}")
                question = pre_question(item["question"], max_words)
                if not question.strip():
                    empty.append(f"{path}, item {i}")
                    continue
                self.items.append((vqa_image_path(item, vqa_root, vg_root), question, answers, weights))
        self.num_empty_questions = len(empty)
        if empty:
            logger.warning("%d training questions are empty after cleaning and were skipped (%s)", len(empty),
                           "; ".join(empty[:_LISTED]))
        self.out_of_list = self._count_out_of_list(answer_list) if answer_list is not None else None
        self.eos = eos
        self._loader = SafeImageLoader(transform)

    def _count_out_of_list(self, answer_list: Sequence[str]) -> dict[str, float]:
        known = set(answer_list)
        total = missing = weight_total = weight_missing = 0.0
        examples: list[str] = []
        for _, _, answers, weights in self.items:
            for a, w in zip(answers, weights):
                total, weight_total = total + 1, weight_total + w
                if a not in known:
                    missing, weight_missing = missing + 1, weight_missing + w
                    if len(examples) < _LISTED:
                        examples.append(repr(a))
        if missing:
            logger.warning("%d of %d distinct training answers (%.1f%% of the answer weight) are not in the answer "
                           "list: trained on, never predicted (e.g. %s)", missing, total,
                           100 * weight_missing / max(weight_total, 1e-12), ", ".join(examples))
        return {"answers": int(missing), "of": int(total), "weight_share": weight_missing / max(weight_total, 1e-12)}

    @property
    def num_skipped(self) -> int:
        """Fetches that returned ``None`` because the image was unreadable (this process only)."""
        return self._loader.num_skipped

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, str, list[str], list[float]] | None:
        path, question, answers, weights = self.items[index]
        image = self._loader(path)
        if image is None:
            return None
        return image, question, [a + self.eos for a in answers], list(weights)


def vqa_collate(batch: list) -> tuple:
    """Official ``vqa_collate_fn`` plus the dropped-sample count: ``(images (B, 3, R, R), questions,
    answers (N,) flat, weights (N,), answers_per_question (B,), num_dropped)``; ``(num_dropped,)`` if all dropped."""
    kept = [sample for sample in batch if sample is not None]
    dropped = len(batch) - len(kept)
    if not kept:
        return (dropped,)
    images = torch.stack([s[0] for s in kept])
    answers = [a for s in kept for a in s[2]]
    weights = torch.tensor([w for s in kept for w in s[3]], dtype=torch.float)
    counts = torch.tensor([len(s[2]) for s in kept], dtype=torch.long)
    return images, [s[1] for s in kept], answers, weights, counts, dropped


class VQATestDataset(Dataset):
    """``(image, question, index)`` per test question, or ``None`` for an unreadable image.

    Attributes: question_ids (item order), questions, truth (question id -> ground truth, for the ids that
    have one), types (question id -> type names).

    Args:
        ann_files: test JSON files. transform: PIL -> tensor. vqa_root, vg_root: image folders.
        max_words: kept by ``pre_question``. answers: ``{question_id: answer(s)}`` ground truth (keys may be
        strings). type_rules: ``(name, regex)`` pairs giving question types where items carry none.
    """

    def __init__(self, ann_files: str | Sequence[str], transform: Callable, vqa_root: str, vg_root: str,
                 max_words: int = 50, answers: Mapping[Any, Any] | None = None,
                 type_rules: Sequence[tuple[str, str]] = ()) -> None:
        files = [ann_files] if isinstance(ann_files, str) else list(ann_files)
        self.paths: list[str] = []
        self.questions: list[str] = []
        self.question_ids: list[int] = []
        self.truth: dict[int, str | list[str]] = {}
        self.types: dict[int, list[str]] = {}
        seen: dict[int, str] = {}
        for path in files:
            for i, item in enumerate(load_annotation_files(path, VQA_TEST_SCHEMA, text_keys=())):
                qid = item["question_id"]
                check_test_item(item, f"{path}, item {i}", seen)
                self.paths.append(vqa_image_path(item, vqa_root, vg_root))
                self.questions.append(pre_question(item["question"], max_words))
                self.question_ids.append(qid)
                if "answer" in item:
                    self.truth[qid] = item["answer"]
                named = [item[k] for k in ("question_type", "answer_type") if isinstance(item.get(k), str)]
                self.types[qid] = named or question_types(item["question"].lower(), type_rules)
        self._add_answers(answers or {})
        self._check_images()
        empty = sum(not q.strip() for q in self.questions)
        if empty:
            logger.warning("%d test questions are empty after cleaning: answered from the image alone", empty)
        self._loader = SafeImageLoader(transform)

    def _add_answers(self, answers: Mapping[Any, Any]) -> None:
        if not isinstance(answers, Mapping):  # a JSON list read as the answers file
            raise DataError(f"answers: expected a JSON object {{question_id: answer(s)}}, got {type(answers).__name__}")
        ids = set(self.question_ids)
        for key, value in answers.items():
            try:
                qid = int(key)
            except (TypeError, ValueError):
                raise DataError(f"answers: question id {key!r} is not an integer") from None
            if qid in ids:
                self.truth[qid] = value
        for qid, value in self.truth.items():
            listed = isinstance(value, list) and value and all(isinstance(a, str) for a in value)
            if not (isinstance(value, str) or listed):
                raise DataError(f"question {qid}: ground truth must be a string or a non-empty list of strings, "
                                f"got {value!r}")

    def _check_images(self) -> None:
        missing = sorted({p for p in self.paths if not os.path.isfile(p)})
        if missing:
            raise DataError(f"{len(missing)} test image(s) not found (every test question needs an answer), e.g. "
                            + ", ".join(missing[:_LISTED]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, str, int] | None:
        image = self._loader(self.paths[index])
        if image is None:
            return None
        return image, self.questions[index], index
