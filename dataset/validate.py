"""Annotation schema checks that fail early, before any GPU time is spent.

Every problem becomes a :class:`DataError` whose message names the file and,
where relevant, the item index and key. The annotation formats are those of
the official ALBEF JSON files (a JSON list of dicts; extra keys allowed).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dataset.caption import pre_caption

logger = logging.getLogger(__name__)

TypeSpec = type | tuple[type, ...]

PRETRAIN_SCHEMA: dict[str, TypeSpec] = {"image": str, "caption": (str, list)}
RETRIEVAL_TRAIN_SCHEMA: dict[str, TypeSpec] = {
    "image": str,
    "caption": str,
    "image_id": (str, int, float),
}
RETRIEVAL_EVAL_SCHEMA: dict[str, TypeSpec] = {"image": str, "caption": list}
GROUNDING_TRAIN_SCHEMA: dict[str, TypeSpec] = {"image": str, "text": str}
GROUNDING_TEST_SCHEMA: dict[str, TypeSpec] = {"image": str, "text": str, "ref_id": int}

# A dataset's own check of one schema-valid item (label parsing ...): (item, "file, item i") -> raises DataError.
ItemCheck = Callable[[dict, str], Any]


@dataclass(frozen=True)
class FileCheck:
    """How a task's dataset reads one annotation file, for :func:`task_file_report`.

    ``schema``: required keys and types; ``text_keys``: caption keys (None: those of ``caption`` / ``text`` in the
    schema); ``item_check``: the dataset's own check of each schema-valid item (the same function the dataset
    calls); ``image_paths``: item -> its image files (None: ``image_root/<image>``), for ``check_images``.
    """

    schema: Mapping[str, TypeSpec]
    text_keys: tuple[str, ...] | None = None
    item_check: ItemCheck | None = None
    image_paths: Callable[[dict], list[str]] | None = None


# Items whose text is empty after cleaning (punctuation only) are skipped and counted, like unreadable images;
# a file with more of them than this stops the run (something is wrong with the file, not with a few items).
MAX_EMPTY_TEXTS = 1000


class DataError(ValueError):
    """An annotation file or item does not match the expected schema."""


def _where(path: str, index: int | None = None, key: str | None = None) -> str:
    """Location prefix ``file[, item i][, key 'k']`` for error messages."""
    loc = f"{path}"
    if index is not None:
        loc += f", item {index}"
    if key is not None:
        loc += f", key {key!r}"
    return loc


def _type_names(spec: TypeSpec) -> str:
    types = spec if isinstance(spec, tuple) else (spec,)
    return " or ".join(t.__name__ for t in types)


def _is_instance(value: Any, spec: TypeSpec) -> bool:
    """``isinstance`` that does not accept bools where only int/float is asked for."""
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def read_json(path: str) -> Any:
    """Parse a JSON file, turning every I/O and syntax failure into DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a UTF-8 byte-order mark (Windows editors) is dropped
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err
    except OSError as err:
        raise DataError(f"{path}: cannot read file: {err.strerror or err}") from err


def _check_text(path: str, index: int, key: str, value: Any) -> None:
    """A caption is a str or a non-empty list of str (emptiness after cleaning: ``_drop_empty_texts``)."""
    texts = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise DataError(f"{_where(path, index, key)}: empty caption list")
    for j, text in enumerate(texts):
        sub = f"{key}[{j}]" if isinstance(value, list) else key
        if not isinstance(text, str):
            raise DataError(
                f"{_where(path, index, sub)}: expected str, got {type(text).__name__}"
            )


def _drop_empty_texts(item: dict, keys: Sequence[str]) -> tuple[dict | None, list[tuple[str, str]]]:
    """``item`` without the captions that ``pre_caption`` leaves empty, or None when a key keeps none.

    Returns (item or None, [(key or key[j], raw text) dropped]); the item is copied only when changed.
    """
    dropped: list[tuple[str, str]] = []
    out = item
    for key in keys:
        value = item[key]
        if isinstance(value, str):
            if not pre_caption(value).strip():
                return None, [*dropped, (key, value)]
            continue
        kept = [t for t in value if pre_caption(t).strip()]
        dropped += [(f"{key}[{j}]", t) for j, t in enumerate(value) if not pre_caption(t).strip()]
        if not kept:
            return None, dropped
        if len(kept) < len(value):
            out = {**out, key: kept}
    return out, dropped


def _check_item(
    path: str,
    index: int,
    item: Any,
    required: Mapping[str, TypeSpec],
    text_keys: Iterable[str],
) -> None:
    """Check one annotation item: a dict with the required keys and types."""
    if not isinstance(item, dict):
        raise DataError(
            f"{_where(path, index)}: expected a JSON object, got {type(item).__name__}"
        )
    for key, spec in required.items():
        if key not in item:
            raise DataError(
                f"{_where(path, index)}: missing required key {key!r} "
                f"(item keys: {sorted(item)})"
            )
        if not _is_instance(item[key], spec):
            raise DataError(
                f"{_where(path, index, key)}: expected {_type_names(spec)}, "
                f"got {type(item[key]).__name__} ({str(item[key])[:60]!r})"
            )
    if isinstance(item.get("image"), str) and not item["image"].strip():
        raise DataError(f"{_where(path, index, 'image')}: empty image path")
    for key in text_keys:
        if key in required:
            _check_text(path, index, key, item[key])


def load_annotations(
    path: str,
    required: Mapping[str, TypeSpec],
    text_keys: Sequence[str] = ("caption",),
    max_empty: int = MAX_EMPTY_TEXTS,
) -> list[dict]:
    """Load a JSON annotation file (UTF-8, with or without a byte-order mark) and validate every item.

    Args:
        path: JSON file holding a list of dicts.
        required: key -> allowed type(s) every item must have; extra keys are allowed.
        text_keys: required keys holding captions (str or list of str). Captions that
            ``pre_caption`` leaves empty (punctuation only) are dropped, and items left
            without one are skipped: counted in one warning line, like unreadable images.
        max_empty: more such captions than this (or no usable item at all) is a
            ``DataError`` (-1: no limit).

    Returns:
        The list of usable items (copies where captions were dropped).

    Raises:
        DataError: naming the file (and item index and key) on any problem.
    """
    return [item for _, item in _indexed_items(path, required, text_keys, max_empty)]


def load_checked_annotations(path: str, required: Mapping[str, TypeSpec], text_keys: Sequence[str],
                             item_check: ItemCheck) -> tuple[list[dict], list[Any]]:
    """:func:`load_annotations`, then the dataset's own check of each usable item: ``item_check(item, "<file>, item
    <i>")`` with ``i`` the item's index in the file (items skipped for an empty caption do not shift it).

    Returns (items, the check's value for each, e.g. its class label). Raises the first ``DataError``.
    """
    indexed = _indexed_items(path, required, text_keys, MAX_EMPTY_TEXTS)
    return [item for _, item in indexed], [item_check(item, _where(path, index)) for index, item in indexed]


def _indexed_items(path: str, required: Mapping[str, TypeSpec], text_keys: Sequence[str],
                   max_empty: int) -> list[tuple[int, dict]]:
    """The usable items of a file with their indices in it (see :func:`load_annotations`)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(
            f"{path}: top level must be a JSON list of items, got {type(data).__name__}"
        )
    keys = [k for k in text_keys if k in required]
    kept: list[tuple[int, dict]] = []
    empty: list[tuple[int, str, str]] = []  # (item index, key, raw text) of captions empty after cleaning
    for index, item in enumerate(data):
        _check_item(path, index, item, required, text_keys)
        cleaned, dropped = _drop_empty_texts(item, keys)
        empty += [(index, key, raw) for key, raw in dropped]
        if cleaned is not None:
            kept.append((index, cleaned))
    if empty:
        _report_empty_texts(path, empty, len(data) - len(kept), len(kept), max_empty)
    if required is RETRIEVAL_EVAL_SCHEMA:
        report_duplicate_images(path, data)
    logger.debug("%s: %d items valid", path, len(kept))
    return kept


def _report_empty_texts(path: str, empty: list[tuple[int, str, str]], skipped: int, kept: int,
                        max_empty: int) -> None:
    """One warning line for captions left empty by cleaning; ``DataError`` when none or too few remain."""
    index, key, raw = empty[0]
    first = f"{_where(path, index, key)}: caption is empty after cleaning (raw value {raw[:60]!r})"
    if not kept:
        raise DataError(f"{first}; no item of the file has a usable caption")
    if 0 <= max_empty < len(empty):
        raise DataError(f"{first}; {len(empty)} such captions in the file, more than the {max_empty} "
                        "allowed: check how the file was written")
    listed = ", ".join(f"item {i} {raw[:20]!r}" for i, _, raw in empty[:5])
    more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
    logger.warning("%s: %d caption(s) empty after cleaning skipped (%s%s); %d item(s) left without a caption "
                   "skipped", path, len(empty), listed, more, skipped)


def load_annotation_files(
    paths: str | Sequence[str],
    required: Mapping[str, TypeSpec],
    text_keys: Sequence[str] = ("caption",),
) -> list[dict]:
    """Load and concatenate several annotation files (a single path is accepted)."""
    if isinstance(paths, str):
        paths = [paths]
    items: list[dict] = []
    for path in paths:
        items.extend(load_annotations(path, required, text_keys))
    if "image_id" in required:
        report_mixed_ids(", ".join(paths), items)
    return items


def report_mixed_ids(where: str, items: list[dict], key: str = "image_id") -> bool:
    """Warn (one line) when ``key`` values mix types: ``0`` and ``"0"`` are different images to the dataset, so
    captions of one picture would not count as each other's positives. Returns whether they were mixed."""
    by_type: dict[str, list[Any]] = {}
    for item in items:
        by_type.setdefault(type(item[key]).__name__, []).append(item[key])
    if len(by_type) < 2:
        return False
    names = {str(v) for v in by_type.get("str", [])}
    clashes = sorted({repr(v) for t, vs in by_type.items() if t != "str" for v in vs if str(v) in names})
    example = f"; {clashes[0]} and '{clashes[0]}' both occur and count as two images" if clashes else ""
    logger.warning("%s: %s values mix types (%s)%s: write every id the same way", where, key,
                   ", ".join(f"{len(vs)} {t}" for t, vs in sorted(by_type.items())), example)
    return True


def report_duplicate_images(path: str, items: list[dict]) -> int:
    """Warn (one line) when an evaluation file lists an image in several items: each copy becomes a separate
    candidate and the texts of one copy count only that copy as correct, so recalls come out lower. Returns the
    number of repeated items."""
    seen: dict[str, int] = {}
    repeats: list[tuple[int, int, str]] = []  # (item, first item, image)
    for index, item in enumerate(items):
        first = seen.setdefault(item["image"], index)
        if first != index:
            repeats.append((index, first, item["image"]))
    if repeats:
        index, first, image = repeats[0]
        logger.warning("%s: %d item(s) repeat an image listed before (item %d repeats item %d, %r): each copy is a "
                       "separate candidate in retrieval, which lowers the recalls; merge their captions",
                       path, len(repeats), index, first, image)
    return len(repeats)


def report_missing_images(path: str, items: list[dict], image_root: str) -> int:
    """Warn (one line) about image files of ``items`` that do not exist: a cheap check (no decoding) run before
    training, so that a wrong ``image_root`` for val/test shows at start-up rather than after an epoch. Returns
    the number of missing files (they are skipped and counted when evaluated)."""
    images = dict.fromkeys(os.path.join(image_root, it["image"]) for it in items)
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        logger.warning("%s: %d of %d image files do not exist (first: %s); they will be skipped and counted",
                       path, len(missing), len(images), missing[0])
    return len(missing)


def annotation_problems(
    path: str,
    required: Mapping[str, TypeSpec],
    text_keys: Sequence[str] = ("caption",),
    limit: int = 20,
    item_check: ItemCheck | None = None,
) -> tuple[list[dict], list[str]]:
    """Every problem of one annotation file, where :func:`load_annotations` stops at the first.

    ``item_check(item, "file, item i")``: the dataset's own check of each item that passes the schema and keeps a
    caption (the items its dataset checks); its ``DataError`` is a problem of that item.
    Returns the valid items and the problems: the first ``limit`` listed, then one line counting the rest.
    """
    try:
        data = read_json(path)
    except DataError as err:
        return [], [str(err)]
    if not isinstance(data, list):
        return [], [f"{path}: top level must be a JSON list of items, got {type(data).__name__}"]
    items, problems = [], []
    keys = [k for k in text_keys if k in required]
    for index, item in enumerate(data):
        try:
            _check_item(path, index, item, required, text_keys)
        except DataError as err:
            problems.append(str(err))
            continue
        cleaned, _ = _drop_empty_texts(item, keys)  # as load_annotations: skipped, not a problem
        if cleaned is None:
            continue
        if item_check is not None:
            try:
                item_check(cleaned, _where(path, index))
            except DataError as err:
                problems.append(str(err))
                continue
        items.append(cleaned)
    if len(problems) > limit:
        problems = [*problems[:limit], f"{path}: ... and {len(problems) - limit} more problems "
                                       f"({len(problems)} of {len(data)} items)"]
    return items, problems
