"""The annotation files of SNLI-VE, NLVR2 and VQA as their datasets read them, for the validator.

:func:`file_checks` tells :func:`dataset.validate.task_file_report` what each ``<split>_file`` of a task holds: the
dataset's schema and caption keys, the dataset's own check of an item (the same function the dataset calls:
``ve_label``, ``nlvr_item_label``, ``answer_weights``, ``check_test_item``) and an item's image files. The
validator lists every bad item of a file where the dataset stops at the first. :func:`split_problems` runs what
the VQA script checks of a whole split at start-up (the answer list; ground truth and test images, by building
the split's ``VQATestDataset`` as ``VQA.py`` does). This module imports the datasets, which import
``dataset.validate``: ``dataset.validate`` imports it inside its functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dataset.nlvr_dataset import NLVR_SCHEMA, nlvr_item_label
from dataset.validate import DataError, FileCheck, read_json
from dataset.ve_dataset import VE_SCHEMA, ve_image_path, ve_label
from dataset.vqa_dataset import (
    VQA_TEST_SCHEMA,
    VQA_TRAIN_SCHEMA,
    VQATestDataset,
    answer_weights,
    check_test_item,
    load_answer_list,
    vqa_image_path,
)

TASKS = ("ve", "nlvr", "vqa")
SPLIT_KEYS = ("train_file", "val_file", "test_file")


def _roots(config: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The image folders named by ``keys`` ('' where absent or not a string) and the problems of bad ones."""
    values = [config.get(key, "") for key in keys]
    problems = [f"config: {key!r} must be a string, got {value!r}" for key, value in zip(keys, values)
                if not isinstance(value, str)]
    return [v if isinstance(v, str) else "" for v in values], problems


def _ve_checks(config: Mapping[str, Any]) -> tuple[dict[str, FileCheck], list[str]]:
    (root,), problems = _roots(config, ("image_root",))
    check = FileCheck(VE_SCHEMA, ("sentence",), lambda item, where: ve_label(item["label"], where),
                      lambda item: [ve_image_path(root, item["image"])])
    return dict.fromkeys(SPLIT_KEYS, check), problems


def _nlvr_checks(config: Mapping[str, Any]) -> tuple[dict[str, FileCheck], list[str]]:
    (root,), problems = _roots(config, ("image_root",))
    check = FileCheck(NLVR_SCHEMA, ("sentence",), nlvr_item_label,
                      lambda item: [os.path.join(root, p) for p in item["images"]])
    return dict.fromkeys(SPLIT_KEYS, check), problems


def _vqa_checks(config: Mapping[str, Any]) -> tuple[dict[str, FileCheck], list[str]]:
    (vqa_root, vg_root), problems = _roots(config, ("vqa_root", "vg_root"))

    def images(item: dict) -> list[str]:
        return [vqa_image_path(item, vqa_root, vg_root)]

    def test_check() -> FileCheck:  # question ids must be unique across the files of one split
        seen: dict[int, str] = {}
        return FileCheck(VQA_TEST_SCHEMA, (), lambda item, where: check_test_item(item, where, seen), images)

    train = FileCheck(VQA_TRAIN_SCHEMA, (), answer_weights, images)
    return {"train_file": train, "val_file": test_check(), "test_file": test_check()}, problems


def file_checks(config: Mapping[str, Any], task: str) -> tuple[dict[str, FileCheck], list[str]]:
    """``{split key: FileCheck}`` of ``task`` (``ve``, ``nlvr``, ``vqa``) and the problems of its image folders.

    A ``FileCheck`` may keep state across the files of its split (VQA's question ids): one per report.
    """
    if task == "ve":
        return _ve_checks(config)
    if task == "nlvr":
        return _nlvr_checks(config)
    if task == "vqa":
        return _vqa_checks(config)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) and value else list(value or [])


def split_problems(config: Mapping[str, Any], task: str, clean_splits: set[str]) -> list[str]:
    """What ``task``'s script checks of whole splits at start-up, beyond single items (VQA: the answer list;
    for each of ``clean_splits`` among val / test: its ground truth and that every image exists)."""
    if task != "vqa":
        return []
    problems = []
    if isinstance(config.get("answer_list"), str) and config["answer_list"]:  # unset: VQA.py's config check
        try:
            load_answer_list(config["answer_list"])
        except DataError as err:
            problems.append(str(err))
    for split in ("val", "test"):
        files = _as_list(config.get(f"{split}_file"))
        if split not in clean_splits or not files:
            continue
        answers_file = config.get(f"{split}_answers_file") or ""
        try:  # as VQA.eval_datasets (question types aside: they do not make an item valid or not)
            VQATestDataset(files, None, config.get("vqa_root") or "", config.get("vg_root") or "",
                           answers=read_json(answers_file) if answers_file else None)
        except DataError as err:
            problems.append(f"{split} split{f' ({answers_file})' if answers_file else ''}: {err}")
    return problems
