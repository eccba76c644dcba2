"""Section ``data_pipeline``: what the pre-training data costs, in rows of three kinds (column ``measure``).

- ``decode+augment``: images/s of decode + pre-training augmentation in one process, 1 torch thread; one row
  per ``--source-sizes`` JPEG and, for those whose shorter side exceeds ``--short-side``, one for the copy that
  ``scripts/resize_images.py`` makes of it.
- ``loader``: images/s of the pre-training loader (``build_pretrain_loader``, ``--loader-workers`` workers,
  batch ``--loader-batch``) over ``--loader-images`` photo-like JPEGs of the first ``--source-sizes`` size,
  decoded and augmented the same way (``build_transform('pretrain', --data-res)``), read from image files
  named by a JSON file (``PretrainDataset``) and from 8 shards that ``scripts/make_shards.py`` writes of them
  (``ShardLoader``); one epoch each, wall clock, worker start-up included. ``--loader-images 0``: no rows.
- ``dataset memory``: resident memory (RSS) that building one rank's loader adds to its process, for a
  generated JSON of ``--memory-items`` official-style items (absolute image path, one caption of CC3M-like
  length) and for shards whose manifest holds as many samples (placeholder tar files: the stream keeps only
  shard names and counts), both in one fresh process; ``rss_mb_at_14M`` scales it linearly to the paper's 14M
  images. ``--memory-items 0``: no rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset import build_pretrain_loader, build_transform, load_image
from scripts import make_shards, resize_images
from scripts.bench.common import REPO_ROOT, Row, Section, seed_everything

WORDS = "a man woman dog cat red blue small large on in with the of street table field water tree two".split()
SAMPLES_PER_SHARD = 10_000  # the memory measurement's shard size (img2dataset's default)
SCALE_TO = 14_000_000  # the paper's 14M pre-training images
# run in a fresh process: for each train_file argument in turn, the RSS (MiB) that building a rank's loader
# adds, as one JSON line; every loader is kept alive, so each measure is the growth its own build causes
MEMORY_CHILD = """
import json, sys, time
from dataset import build_pretrain_loader, build_transform

def rss_mb():
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmRSS:"))

transform, loaders = build_transform("pretrain", 256), []
for train_file in sys.argv[1:]:
    before, start = rss_mb(), time.perf_counter()
    loaders.append(build_pretrain_loader({"train_file": [train_file], "batch_size": 64, "num_workers": 8},
                                         transform, 0))
    print(json.dumps({"rss_mb": rss_mb() - before, "build_s": time.perf_counter() - start}), flush=True)
"""


def make_jpeg(path: str, width: int = 640, height: int = 480, seed: int = 0) -> None:
    """A photo-like (smooth + noise) RGB JPEG, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)


def make_caption(rng: random.Random) -> str:
    """A caption of 8-14 words (CC3M's mean is about 10)."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14)))


def _time_pipeline(path: str, transform: Callable, images: int) -> Row:
    """Decode (``load_image``) + ``transform`` of one file ``images`` times: images/s and median phases."""
    for _ in range(3):
        transform(load_image(path))
    decode, augment = [], []
    for _ in range(images):
        t0 = time.perf_counter()
        img = load_image(path)
        t1 = time.perf_counter()
        transform(img)
        decode.append(t1 - t0)
        augment.append(time.perf_counter() - t1)
    return {"images_per_s": images / (sum(decode) + sum(augment)),
            "decode_ms": 1000 * statistics.median(decode), "augment_ms": 1000 * statistics.median(augment)}


def decode_rows(args: argparse.Namespace, transform: Callable, tmp: str) -> list[Row]:
    """``decode+augment`` rows: one thread, as in a DataLoader worker (multiply by the workers per GPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for width, height in args.source_sizes:
            path = os.path.join(tmp, f"{width}x{height}.jpg")
            make_jpeg(path, width, height, seed=args.seed)
            sources = [(f"{width}x{height} JPEG", path)]
            if min(width, height) > args.short_side:
                shrunk = os.path.join(tmp, f"{width}x{height}_shrunk.jpg")
                resize_images.process(resize_images.Job(path, shrunk), args.short_side, quality=95)
                w, h = resize_images.shrunk_size(width, height, args.short_side)
                sources.append((f"{width}x{height} JPEG shrunk to {w}x{h}", shrunk))
            for name, source in sources:
                row: Row = {"measure": "decode+augment", "source": name, "transform": f"pretrain {args.data_res}px",
                            "images": args.images, "torch_threads": 1}
                rows.append({**row, **_time_pipeline(source, transform, args.images)})
    finally:
        torch.set_num_threads(threads)
    return rows


def write_loader_inputs(work_dir: str, images: int, size: tuple[int, int], seed: int = 0) -> tuple[str, list[str]]:
    """``images`` JPEGs of ``size`` with captions: their JSON annotation file and the 8 shards made of it."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(work_dir, "images"), exist_ok=True)
    items = []
    for i in range(images):
        path = os.path.join(work_dir, "images", f"{i:06d}.jpg")
        make_jpeg(path, *size, seed=seed + i)
        items.append({"image": path, "caption": make_caption(rng)})
    ann = os.path.join(work_dir, "pretrain.json")
    Path(ann).write_text(json.dumps(items), encoding="utf-8")
    shard_dir = os.path.join(work_dir, "shards")
    code = make_shards.main(["--ann", ann, "--out-dir", shard_dir, "--max-count", str(max(1, -(-images // 8))),
                             "--workers", "0"])
    if code != 0:
        raise RuntimeError(f"make_shards.py exited with {code}")
    return ann, [os.path.join(shard_dir, n) for n in sorted(os.listdir(shard_dir)) if n.endswith(".tar")]


def _epoch_rate(loader: Any) -> tuple[int, float]:
    """(images, images per second) over one epoch of ``loader`` (wall clock, worker start-up included)."""
    loader.sampler.set_epoch(0)
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch[0]) if len(batch) > 1 else 0
    return images, images / (time.perf_counter() - start)


def loader_rows(args: argparse.Namespace, transform: Callable, tmp: str) -> list[Row]:
    """``loader`` rows: the same images and transform from JSON + image files and from shards."""
    width, height = args.source_sizes[0]
    ann, shards = write_loader_inputs(os.path.join(tmp, "loader"), args.loader_images, (width, height), args.seed)
    config = {"batch_size": args.loader_batch, "num_workers": args.loader_workers}
    rows = []
    for source, train_file in ((f"{width}x{height} JPEG files + JSON", [ann]),
                               (f"{width}x{height} JPEG in {len(shards)} shards", shards)):
        loader = build_pretrain_loader({**config, "train_file": train_file}, transform, seed=args.seed)
        images, rate = _epoch_rate(loader)
        rows.append({"measure": "loader", "source": source, "transform": f"pretrain {args.data_res}px",
                     "images": images, "workers": args.loader_workers, "images_per_s": rate})
    return rows


def write_memory_inputs(work_dir: str, n_items: int, seed: int = 0) -> tuple[str, str]:
    """A JSON of ``n_items`` official-style items and placeholder shards + a manifest holding as many samples;
    returns the JSON path and the shard spec."""
    rng = random.Random(seed)
    os.makedirs(work_dir, exist_ok=True)
    ann = os.path.join(work_dir, f"pretrain_{n_items}.json")
    with open(ann, "w", encoding="utf-8") as f:
        json.dump([{"image": f"/datasets/cc12m/images/{i // 10000:05d}/{i:09d}.jpg", "caption": make_caption(rng)}
                   for i in range(n_items)], f)
    shards = []
    for s, first in enumerate(range(0, n_items, SAMPLES_PER_SHARD)):
        Path(work_dir, f"{s:05d}.tar").write_bytes(b"")  # never read: building the stream reads the manifest
        shards.append({"name": f"{s:05d}.tar", "num_samples": min(SAMPLES_PER_SHARD, n_items - first)})
    manifest = {"version": make_shards.MANIFEST_VERSION, "num_samples": n_items, "shards": shards}
    Path(work_dir, "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return ann, os.path.join(work_dir, f"{{00000..{len(shards) - 1:05d}}}.tar")


def memory_rows(args: argparse.Namespace, tmp: str) -> list[Row]:
    """``dataset memory`` rows, JSON then shards, measured in one fresh process (:data:`MEMORY_CHILD`), shards
    first (their build also pays what the first build imports lazily: the JSON figure is not lowered by it)."""
    ann, spec = write_memory_inputs(os.path.join(tmp, "memory"), args.memory_items, args.seed)
    shards = -(-args.memory_items // SAMPLES_PER_SHARD)
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, spec, ann], capture_output=True, text=True,
                         check=True, cwd=str(REPO_ROOT), env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    shard, json_file = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    return [{"measure": "dataset memory", "source": source, "items": args.memory_items, "rss_mb": child["rss_mb"],
             "build_s": child["build_s"], "rss_mb_at_14M": child["rss_mb"] * SCALE_TO / args.memory_items}
            for source, child in (("JSON annotation file", json_file), (f"{shards} shards + manifest", shard))]


def bench_data_pipeline(args: argparse.Namespace) -> list[Row]:
    """The section's rows: ``decode+augment``, then ``loader`` and ``dataset memory`` (module docstring)."""
    seed_everything(args.seed)
    transform = build_transform("pretrain", args.data_res)
    with tempfile.TemporaryDirectory() as tmp:
        rows = decode_rows(args, transform, tmp)
        if args.loader_images:
            rows += loader_rows(args, transform, tmp)
        if args.memory_items:
            rows += memory_rows(args, tmp)
    return rows


def add_args(parser: argparse.ArgumentParser) -> None:
    """``--images``, ``--data-res``, ``--source-sizes``, ``--short-side``, ``--loader-*``, ``--memory-items``."""
    parser.add_argument("--images", type=int, default=50, help="images timed by data_pipeline")
    parser.add_argument("--data-res", type=int, default=256, help="output size of the data_pipeline transform")
    parser.add_argument("--source-sizes", default="640x480,1600x1200",
                        help="data_pipeline: comma-separated WxH of the source JPEGs")
    parser.add_argument("--short-side", type=int, default=576,
                        help="data_pipeline: also time copies shrunk to this shorter side (scripts/resize_images.py)")
    parser.add_argument("--loader-images", type=int, default=256,
                        help="data_pipeline: images read by the loader from JSON + files and from shards (0: skip)")
    parser.add_argument("--loader-workers", type=int, default=2, help="data_pipeline: loader workers")
    parser.add_argument("--loader-batch", type=int, default=32, help="data_pipeline: loader batch size")
    parser.add_argument("--memory-items", type=int, default=1_000_000,
                        help="data_pipeline: items of the JSON (and shards) whose dataset memory is measured (0: skip)")


def check(args: argparse.Namespace) -> str | None:
    """Parses ``--source-sizes`` into ``[(width, height), ...]``; the error message of a bad flag, or None."""
    try:
        args.source_sizes = [tuple(int(v) for v in n.lower().split("x")) for n in args.source_sizes.split(",")]
    except ValueError:
        return f"--source-sizes: expected WxH[,WxH...], got {args.source_sizes!r}"
    if any(len(wh) != 2 or min(wh) < 16 for wh in args.source_sizes):
        return f"--source-sizes: each size is WxH with both at least 16, got {args.source_sizes}"
    if args.images < 1:
        return "--images must be >= 1"
    if min(args.loader_images, args.loader_workers, args.memory_items) < 0 or args.loader_batch < 1:
        return "--loader-images, --loader-workers and --memory-items must be >= 0, --loader-batch >= 1"
    if 0 < args.loader_images < args.loader_batch:
        return f"--loader-images {args.loader_images} is less than one --loader-batch ({args.loader_batch})"
    return None


SECTION = Section(run=bench_data_pipeline, add_args=add_args, check=check)
