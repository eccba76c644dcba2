"""Checking every annotation file a task's config names, as the task's datasets read them (``validate_data.py``).

:func:`task_file_report` / :func:`validate_config_files` take a config and a task: the ``<split>_file`` keys,
each file's schema and items (every bad item listed, where a dataset stops at the first), optionally every image
decoded, and the task's whole-split files (grounding's ground truth and proposals; VQA's answer list, ground
truth and test images). :func:`file_checks` says what each ``<split>_file`` of SNLI-VE, NLVR2 and VQA holds: the
dataset's schema and caption keys, the dataset's own check of an item (the same function the dataset calls:
``ve_label``, ``nlvr_item_label``, ``answer_weights``, ``check_test_item``) and an item's image files.
:func:`split_problems` runs what the VQA script checks of a whole split at start-up (by building the split's
``VQATestDataset`` as ``VQA.py`` does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from dataset.grounding_dataset import grounding_file_problems
from dataset.image_io import ImageLoadError, load_image
from dataset.nlvr_dataset import NLVR_SCHEMA, nlvr_item_label
from dataset.validate import (
    GROUNDING_TEST_SCHEMA,
    GROUNDING_TRAIN_SCHEMA,
    PRETRAIN_SCHEMA,
    RETRIEVAL_EVAL_SCHEMA,
    RETRIEVAL_TRAIN_SCHEMA,
    DataError,
    FileCheck,
    annotation_problems,
    read_json,
)
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

logger = logging.getLogger(__name__)

TASKS = ("ve", "nlvr", "vqa")
MAX_LISTED_IMAGES = 20  # unreadable images listed per file before one line counts the rest
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


def _check_images(path: str, items: list[dict], image_root: str,
                  paths_of: Callable[[dict], list[str]] | None = None) -> list[str]:
    """Try to decode every distinct image of ``items`` (``paths_of(item)``, default ``image_root/<image>``);
    describe the failures."""
    paths_of = paths_of or (lambda it: [os.path.join(image_root, it["image"])])
    image_paths = dict.fromkeys(p for it in items for p in paths_of(it))
    failures: list[str] = []
    for image_path in image_paths:
        try:
            load_image(image_path)
        except ImageLoadError as err:
            failures.append(f"{path}: {err}")
    logger.info(
        "%s: %d images checked, %d unreadable", path, len(image_paths), len(failures)
    )
    if len(failures) > MAX_LISTED_IMAGES:
        rest = len(failures) - MAX_LISTED_IMAGES
        failures = [
            *failures[:MAX_LISTED_IMAGES],
            f"{path}: ... and {rest} more unreadable images",
        ]
    return failures


def task_file_pairs(
    config: Mapping[str, Any], task: str
) -> tuple[list[tuple[str, FileCheck]], list[str]]:
    """(file, how it is read) pairs a task reads, plus problems with the config keys."""
    problems: list[str] = []
    pairs: list[tuple[str, Any]] = []

    def files_of(key: str, want_list: bool) -> list[str]:
        if key not in config:
            problems.append(f"config: missing key {key!r}")
            return []
        value = config[key]
        if want_list and isinstance(value, str):
            value = [value]
        ok = isinstance(value, list) if want_list else isinstance(value, str)
        if not ok or (want_list and not all(isinstance(v, str) for v in value)):
            kind = "a list of paths" if want_list else "one path (a string)"
            problems.append(f"config: {key!r} must be {kind}, got {value!r}")
            return []
        return value if want_list else [value]

    if task in ("pretrain", "nlvr_pretrain"):  # Pretrain_nlvr.py reads its data with the pre-training loader
        pairs += [(f, PRETRAIN_SCHEMA) for f in files_of("train_file", True)]
    elif task == "retrieval":
        pairs += [(f, RETRIEVAL_TRAIN_SCHEMA) for f in files_of("train_file", True)]
        for key in ("val_file", "test_file"):
            pairs += [(f, RETRIEVAL_EVAL_SCHEMA) for f in files_of(key, False)]
        if not isinstance(config.get("image_root"), str):
            problems.append(
                f"config: 'image_root' must be a string, got {config.get('image_root')!r}"
            )
    elif task == "grounding":  # Grounding.py: the ground truth and proposals are checked by task_file_report
        pairs += [(f, GROUNDING_TRAIN_SCHEMA) for f in files_of("train_file", True)]
        pairs += [(f, GROUNDING_TEST_SCHEMA) for f in files_of("test_file", True)]
        if not isinstance(config.get("image_root"), str):
            problems.append(f"config: 'image_root' must be a string, got {config.get('image_root')!r}")
    elif task in ("ve", "nlvr", "vqa"):  # an absent or empty split key: no such split
        checks, found = file_checks(config, task)
        problems += found
        for key, check in checks.items():
            pairs += [(f, check) for f in (files_of(key, True) if config.get(key) else [])]
    else:
        raise ValueError(f"unknown task {task!r}; expected 'pretrain', 'retrieval', 'grounding', 've', 'nlvr', "
                         "'nlvr_pretrain' or 'vqa'")
    return [(f, c if isinstance(c, FileCheck) else FileCheck(c)) for f, c in pairs], problems


def task_file_report(
    config: Mapping[str, Any], task: str, check_images: bool = False, limit: int = 20
) -> tuple[dict[str, int], list[str]]:
    """Validate every annotation file of a task (all problems of each file, up to ``limit`` listed).

    Returns the valid items per split (``train``, ``val``, ``test``, from the ``<split>_file`` keys; shard specs
    are checked but not counted, nor is a split with a file that could not be read) and the problems.
    """
    pairs, problems = task_file_pairs(config, task)
    image_root = config.get("image_root") or ""
    image_root = image_root if isinstance(image_root, str) else ""
    split_of = {}
    for key in ("train_file", "val_file", "test_file"):
        value = config.get(key)
        for f in [value] if isinstance(value, str) else value or []:
            split_of[f] = key[: -len("_file")]
    sizes: dict[str, int] = {}
    broken: set[str] = set()
    dirty: set[str] = set()  # splits with a problem in a file
    grounding_items: list[dict] = []  # the valid evaluation items of a grounding config
    for path, check in pairs:
        schema = check.schema
        if schema is PRETRAIN_SCHEMA and not path.lower().endswith(".json"):
            from dataset.shard_io import shard_problems  # a WebDataset shard spec (dataset/shards.py)

            problems += shard_problems(path)
            continue
        text_keys = check.text_keys
        if text_keys is None:
            text_keys = tuple(k for k in ("caption", "text") if k in schema)  # grounding items carry 'text'
        items, found = annotation_problems(path, schema, text_keys, limit=limit, item_check=check.item_check)
        problems += found
        if schema is GROUNDING_TEST_SCHEMA:
            grounding_items += items
        split = split_of.get(path, "train")
        if found and not items:
            broken.add(split)  # unreadable or no valid item: reported above, not counted as empty
        if found:
            dirty.add(split)
        sizes[split] = sizes.get(split, 0) + len(items)
        logger.info("%s: %d valid items, %d problem(s)", path, len(items), len(found))
        if check_images:
            problems += _check_images(path, items, image_root, check.image_paths)
    if task == "grounding":
        problems += grounding_file_problems(dict(config), grounding_items)
    elif task == "vqa":  # whole splits: answer list, ground truth, test images (as VQA.py's start-up)
        problems += split_problems(config, task, {"val", "test"} - dirty)
    return {split: n for split, n in sizes.items() if split not in broken}, problems


def validate_config_files(
    config: Mapping[str, Any], task: str, check_images: bool = False
) -> list[str]:
    """Validate every annotation file a task's config refers to.

    Args:
        config: the parsed YAML config.
        task: ``'pretrain'`` (``train_file``), ``'retrieval'`` (``train_file``,
            ``val_file``, ``test_file`` and ``image_root``) or ``'grounding'`` (``train_file``, ``test_file``,
            ``image_root``, and ``refcoco_data`` and ``det_file`` covering every test ``ref_id``); ``'ve'``,
            ``'nlvr'``, ``'vqa'`` (``train_file``, ``val_file``, ``test_file``, read as their datasets read them:
            ``dataset.task_files``; VQA also ``answer_list``, ``*_answers_file`` and the test images);
            ``'nlvr_pretrain'`` (as ``'pretrain'``).
        check_images: also decode every referenced image with :func:`load_image`.

    Returns:
        Human-readable problems (every problem of each file, see :func:`task_file_report`); an empty list means
        the data is usable.
    """
    return task_file_report(config, task, check_images)[1]
