"""Section ``data_pipeline``: images/s of decode + pre-training augmentation in one process.

One row per ``--source-sizes`` JPEG and, for those whose shorter side exceeds ``--short-side``, one for the
copy that ``scripts/resize_images.py`` makes of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from dataset import build_transform, load_image
from scripts import resize_images
from scripts.bench.common import Row, Section, seed_everything


def make_jpeg(path: str, width: int = 640, height: int = 480, seed: int = 0) -> None:
    """A photo-like (smooth + noise) RGB JPEG, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)


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


def bench_data_pipeline(args: argparse.Namespace) -> list[Row]:
    """Images/s of decode (``load_image``) + pre-training augmentation in one process, 1 torch thread.

    One thread, as in a DataLoader worker; multiply by the workers per GPU for a loader's rate. One row per
    ``--source-sizes`` JPEG and, for those whose shorter side exceeds ``--short-side``, one for the copy
    that ``scripts/resize_images.py`` makes of it.
    """
    seed_everything(args.seed)
    transform = build_transform("pretrain", args.data_res)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
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
                    row: Row = {"source": name, "transform": f"pretrain {args.data_res}px", "images": args.images,
                                "torch_threads": 1}
                    rows.append({**row, **_time_pipeline(source, transform, args.images)})
    finally:
        torch.set_num_threads(threads)
    return rows


def add_args(parser: argparse.ArgumentParser) -> None:
    """``--images``, ``--data-res``, ``--source-sizes``, ``--short-side``."""
    parser.add_argument("--images", type=int, default=50, help="images timed by data_pipeline")
    parser.add_argument("--data-res", type=int, default=256, help="output size of the data_pipeline transform")
    parser.add_argument("--source-sizes", default="640x480,1600x1200",
                        help="data_pipeline: comma-separated WxH of the source JPEGs")
    parser.add_argument("--short-side", type=int, default=576,
                        help="data_pipeline: also time copies shrunk to this shorter side (scripts/resize_images.py)")


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
    return None


SECTION = Section(run=bench_data_pipeline, add_args=add_args, check=check)
