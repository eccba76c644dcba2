"""Shard specs, per-shard sample counts, raw sample reading and decoding for :mod:`dataset.shards`.

A shard sample is the group of tar members sharing a key (as ``webdataset`` groups them): an image (``jpg``,
``jpeg``, ``png`` or ``webp``), a caption (``txt``) and optionally the ``json`` that ``scripts/make_shards.py``
and img2dataset write; a list under its ``caption`` key is sampled from, as the official loader samples
caption lists. Sample counts come from ``manifest.json`` beside the shards (``make_shards.py``), img2dataset's
``<shard>_stats.json`` (``successes``), or else a scan of the tar headers.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from dataset.caption import pre_caption
from dataset.image_io import ImageLoadError, load_image, to_rgb
from dataset.validate import PRETRAIN_SCHEMA, DataError, load_annotations

logger = logging.getLogger(__name__)

SHARD_DEFAULTS: dict[str, Any] = {
    "train_num_samples": 0,  # samples per epoch (all ranks); 0: one pass over every shard and JSON item
    "shuffle_buffer": 1000,  # samples each loader worker shuffles together (held as raw bytes)
}
JSON_UNIT_ITEMS = 1000  # JSON items per unit when JSON files are mixed with shards
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Unit:
    """A shard, or a slice ``[start, start + count)`` of JSON file number ``json_file``."""

    source: str
    count: int
    json_file: int = -1
    start: int = 0


def is_json_entry(entry: str) -> bool:
    """Whether a ``train_file`` entry is a JSON annotation file (else it is a shard spec)."""
    return entry.lower().endswith(".json")


def has_shards(train_file: str | Sequence[str]) -> bool:
    """Whether any ``train_file`` entry is a shard spec."""
    entries = [train_file] if isinstance(train_file, str) else list(train_file)
    return any(not is_json_entry(e) for e in entries)


def expand_shard_spec(spec: str) -> list[str]:
    """``{a..b}`` braces and ``::`` separators expanded as ``webdataset`` does; DataError when empty."""
    urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise DataError(f"shard spec {spec!r} names no shard")
    return urls


def _is_local(url: str) -> bool:
    return url.startswith("file:") or ":" not in url.split("/", 1)[0]


def _local_path(url: str) -> str:
    return re.sub(r"^file://?", "", url)  # as webdataset's gopen_file


_MANIFESTS: dict[tuple[str, int], dict[str, int]] = {}  # (path, mtime) -> counts: read once per rank
_META_RE = re.compile(r"__[^/]*__($|/)")  # members webdataset skips


def manifest_counts(directory: str) -> dict[str, int]:
    """Shard file name -> sample count from ``directory/manifest.json`` (empty when there is none)."""
    path = os.path.join(directory, "manifest.json")
    if not os.path.isfile(path):
        return {}
    key = (path, os.stat(path).st_mtime_ns)
    if key not in _MANIFESTS:
        try:
            with open(path, encoding="utf-8") as f:
                _MANIFESTS[key] = {s["name"]: int(s["num_samples"]) for s in json.load(f).get("shards", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{path}: unreadable shard manifest ({type(err).__name__}: {err})") from err
    return _MANIFESTS[key]


def count_tar_samples(path: str) -> int:
    """Samples in a tar, grouped by key as ``webdataset`` groups them, from the member headers alone."""
    count, last = 0, None
    with tarfile.open(path, "r:*") as tar:
        for info in tar:
            if not info.isreg() or _META_RE.match(info.name):
                continue
            prefix, _ = base_plus_ext(info.name)
            if prefix is not None and prefix != last:
                count, last = count + 1, prefix
    return count


def shard_sample_count(url: str) -> int:
    """A local shard's sample count: manifest.json, then img2dataset's ``_stats.json``, then a header scan.

    Raises:
        DataError: the shard file is missing (the message names it), or the URL is not local.
    """
    if not _is_local(url):
        raise DataError(f"shard {url!r}: only local (or mounted) paths are supported: the sample counts "
                        "are read from manifest.json or <shard>_stats.json beside the shards")
    path = _local_path(url)
    if not os.path.isfile(path):
        raise DataError(f"shard file not found: {path}")
    directory, name = os.path.split(path)
    counts = manifest_counts(directory)
    if name in counts:
        return counts[name]
    stats = os.path.join(directory, name.split(".", 1)[0] + "_stats.json")
    try:
        if os.path.isfile(stats):
            with open(stats, encoding="utf-8") as f:
                return int(json.load(f)["successes"])
        logger.info("%s: no manifest.json or _stats.json; counting samples from the tar headers", path)
        return count_tar_samples(path)
    except (OSError, ValueError, KeyError, TypeError, tarfile.TarError) as err:
        raise DataError(f"{path}: cannot count its samples ({type(err).__name__}: {err})") from err


def build_units(train_file: str | Sequence[str]) -> tuple[list[Unit], list[list[dict]]]:
    """The units of ``train_file`` (shards and JSON slices) and the items of each JSON file.

    Raises:
        DataError: a missing shard (naming it), an invalid JSON file, or no data at all.
    """
    entries = [train_file] if isinstance(train_file, str) else list(train_file)
    units: list[Unit] = []
    json_items: list[list[dict]] = []
    for entry in entries:
        if is_json_entry(entry):
            items = load_annotations(entry, PRETRAIN_SCHEMA)
            units += [Unit(entry, min(JSON_UNIT_ITEMS, len(items) - s), len(json_items), s)
                      for s in range(0, len(items), JSON_UNIT_ITEMS)]
            json_items.append(items)
            continue
        urls = expand_shard_spec(entry)
        missing = [_local_path(u) for u in urls if _is_local(u) and not os.path.isfile(_local_path(u))]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"shard file not found: {missing[0]}{more}, from train_file entry {entry!r}")
        units += [Unit(u, shard_sample_count(u)) for u in urls]
    if not units or sum(u.count for u in units) == 0:
        raise DataError(f"train_file {entries!r} holds no samples")
    return units, json_items


def spec_sample_count(spec: str) -> int:
    """Samples in all shards of one shard spec.

    Raises:
        DataError: a shard is missing (naming it) or its count cannot be read.
    """
    urls = expand_shard_spec(spec)
    total = sum(shard_sample_count(u) for u in urls)
    logger.info("%s: %d shards, %d samples", spec, len(urls), total)
    return total


def shard_problems(spec: str) -> list[str]:
    """Problems with one shard spec (for ``validate_config_files``); empty when usable."""
    try:
        spec_sample_count(spec)
    except DataError as err:
        return [f"{spec}: {err}"]
    return []


# ----------------------------------------------------------------------------- decoding
def decode_image_bytes(data: bytes, name: str) -> Image.Image:
    """Decode image bytes as :func:`load_image` decodes a file: EXIF orientation, 8-bit RGB.

    Raises:
        ImageLoadError: naming ``name``, for any unreadable or empty image.
    """
    if not data:
        raise ImageLoadError(name, "empty image member (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.width == 0 or img.height == 0:
                raise ImageLoadError(name, f"zero-size image {img.width}x{img.height}")
            try:
                upright = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - bad EXIF must not drop the pixels (as load_image)
                upright = img
            out = to_rgb(upright)
            if out is img:
                out = img.copy()
            out.load()
    except ImageLoadError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise ImageLoadError(name, f"{type(err).__name__}: {err}".strip()) from err
    return out


def _tar_caption(raw: Mapping[str, Any]) -> str | list | None:
    """A list under ``caption`` in the json member (sampled from), else the ``txt`` member."""
    if "json" in raw:
        try:
            caption = json.loads(raw["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
        if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
            return caption
    return raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else None


def _image_and_caption(raw: Mapping[str, Any], name: str) -> tuple[Image.Image, str | list | None]:
    """(RGB image, raw caption) of a tar sample or a JSON item."""
    if "__image__" in raw:  # a JSON item
        return load_image(raw["__image__"]), raw["__caption__"]
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise ImageLoadError(name, f"no image member ({'/'.join(IMAGE_EXTS)}); members {sorted(raw)}")
    return decode_image_bytes(raw[ext], f"{name}.{ext}"), _tar_caption(raw)


def seed_rngs(seed: int) -> None:
    """Seed ``random``, numpy and torch's CPU generator (what caption choice and augmentation draw from).

    ``torch.default_generator`` rather than ``torch.manual_seed``, which also seeds every accelerator backend
    and costs about a millisecond a call.
    """
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def preserved_rngs() -> Iterator[None]:
    """Put the states of ``random``, numpy and torch's CPU generator back on exit: a loader that runs in the
    training process (``num_workers=0``) leaves the training's random streams alone."""
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


def make_example(raw: Mapping[str, Any] | None, transform: Callable | None, max_words: int,
                 rng_seed: int) -> tuple[Any, str, str] | None:
    """``(transform(image) (3, H, W), cleaned caption, key)`` or None (logged) for an unusable sample.

    The caption choice and the augmentation run after :func:`seed_rngs` ``(rng_seed)``: they depend only on
    the sample's place in the epoch.
    """
    if raw is None:
        return None
    name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    try:
        image, caption = _image_and_caption(raw, name)
    except ImageLoadError as err:
        logger.warning("skipping sample: %s", err)
        return None
    seed_rngs(rng_seed)
    if isinstance(caption, list):
        caption = random.choice(caption)
    text = pre_caption(caption, max_words) if isinstance(caption, str) else ""
    if not text.strip():
        logger.warning("skipping sample %s: %s", name, "no caption" if caption is None else "empty caption")
        return None
    return (transform(image) if transform is not None else image), text, str(raw["__key__"])


def mix_seed(*values: int) -> int:
    """A 64-bit seed mixed from integers (splitmix64 steps): independent streams per tuple."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & _MASK)) * 0xBF58476D1CE4E5B9) & _MASK
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK
    return h ^ (h >> 29)


# ----------------------------------------------------------------------------- reading
def _tar_samples(url: str, stream: Any) -> Iterator[dict]:
    """Raw samples ``{__key__, __url__, ext: bytes}`` of one opened tar, grouped by ``webdataset``."""
    return group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def read_unit(unit: Unit, skip: int, take: int, json_items: Sequence[list[dict]],
              image_root: str = "") -> Iterator[dict | None]:
    """Exactly ``take`` raw samples of ``unit`` after its first ``skip`` (read, not decoded).

    A shard that ends early or breaks (truncated tar) yields ``None`` for each missing sample, with a warning,
    so that the epoch keeps its length; a shard holding more samples than its count is cut.

    Raises:
        DataError: the shard file is missing (the message names it).
    """
    if unit.json_file >= 0:
        items, name = json_items[unit.json_file], os.path.basename(unit.source)
        for i in range(unit.start + skip, unit.start + skip + take):
            yield {"__key__": f"{name}#{i}", "__url__": unit.source,
                   "__image__": os.path.join(image_root, items[i]["image"]), "__caption__": items[i]["caption"]}
        return
    if _is_local(unit.source) and not os.path.isfile(_local_path(unit.source)):
        raise DataError(f"shard file not found: {_local_path(unit.source)}")
    seen, problem = 0, ""
    try:
        with gopen(unit.source) as stream:
            for raw in _tar_samples(unit.source, stream):
                if seen >= skip:
                    yield raw
                seen += 1
                if seen == skip + take:
                    return
    except FileNotFoundError as err:
        raise DataError(f"shard file not found: {unit.source}") from err
    except (OSError, EOFError, ValueError, tarfile.TarError) as err:  # a broken shard costs its samples
        problem = f"unreadable after {seen} samples ({type(err).__name__}: {err})"
    missing = skip + take - max(seen, skip)
    logger.warning("shard %s %s; its count is %d: %d samples counted as skipped", unit.source,
                   problem or f"ended after {seen} samples", unit.count, missing)
    for _ in range(missing):
        yield None
