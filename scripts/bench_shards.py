"""Data-pipeline measurements of WebDataset shards against JSON annotation files + image files.

* :func:`bench_loader_throughput`: images/s of the pre-training loader over the same images, decoded and
  augmented the same way (``build_transform('pretrain', res)``), read from image files named by a JSON file
  (``PretrainDataset`` + ``create_loader``) and from shards written by ``scripts/make_shards.py``
  (``ShardLoader``); one epoch each, wall clock, worker start-up included.
* :func:`bench_dataset_memory`: resident memory (RSS) that building the dataset object adds to one rank's
  process: ``PretrainDataset`` on a generated JSON of ``n_items`` official-style items (absolute image path,
  one caption of CC3M-like length), and the shard stream over shards whose manifest holds as many samples
  (placeholder tar files: the stream keeps only shard names and counts). Each is built in a fresh process.

    python scripts/bench_shards.py --images 256 --workers 2 --memory-items 1000000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dataset import build_pretrain_loader, build_transform  # noqa: E402
from scripts import make_shards  # noqa: E402

Row = dict[str, Any]
WORDS = "a man woman dog cat red blue small large on in with the of street table field water tree two".split()
SAMPLES_PER_SHARD = 10_000  # the memory measurement's shard size (img2dataset's default)


def write_photo_jpeg(path: str, width: int, height: int, seed: int) -> None:
    """A photo-like JPEG (smooth colour field + noise), quality 90."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)


def caption(rng: random.Random) -> str:
    """A caption of 8-14 words (CC3M's mean is about 10)."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14)))


def _epoch_rate(loader: Any) -> float:
    """Images per second over one epoch of ``loader`` (wall clock)."""
    loader.sampler.set_epoch(0)
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch[0]) if len(batch) > 1 else 0
    return images / (time.perf_counter() - start)


def bench_loader_throughput(work_dir: str, images: int = 256, size: tuple[int, int] = (640, 480),
                            data_res: int = 256, batch_size: int = 32, num_workers: int = 2,
                            seed: int = 0) -> list[Row]:
    """Images/s of the pre-training loader from image files (JSON) and from shards, same images and transform.

    Returns:
        Two rows: ``source``, ``images``, ``workers``, ``images_per_s``.
    """
    rng = random.Random(seed)
    image_dir = os.path.join(work_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    items = []
    for i in range(images):
        path = os.path.join(image_dir, f"{i:06d}.jpg")
        write_photo_jpeg(path, *size, seed=seed + i)
        items.append({"image": path, "caption": caption(rng)})
    ann = os.path.join(work_dir, "pretrain.json")
    Path(ann).write_text(json.dumps(items), encoding="utf-8")
    shard_dir = os.path.join(work_dir, "shards")
    make_shards.main(["--ann", ann, "--out-dir", shard_dir, "--max-count", str(max(1, images // 8)),
                      "--workers", "0"])
    names = sorted(n for n in os.listdir(shard_dir) if n.endswith(".tar"))
    transform = build_transform("pretrain", data_res)
    config = {"batch_size": batch_size, "num_workers": num_workers}
    rows = []
    for source, train_file in (("JSON + image files", [ann]),
                               ("WebDataset shards", [os.path.join(shard_dir, n) for n in names])):
        loader = build_pretrain_loader({**config, "train_file": train_file}, transform, seed=seed)
        rows.append({"source": source, "images": len(loader) * batch_size, "image_size": f"{size[0]}x{size[1]}",
                     "transform": f"pretrain {data_res}px", "workers": num_workers,
                     "images_per_s": round(_epoch_rate(loader), 1)})
    return rows


def write_memory_inputs(work_dir: str, n_items: int, seed: int = 0) -> tuple[str, str]:
    """A JSON of ``n_items`` official-style items and a directory of placeholder shards + manifest as large."""
    rng = random.Random(seed)
    ann = os.path.join(work_dir, f"pretrain_{n_items}.json")
    with open(ann, "w", encoding="utf-8") as f:
        json.dump([{"image": f"/datasets/cc12m/images/{i // 10000:05d}/{i:09d}.jpg", "caption": caption(rng)}
                   for i in range(n_items)], f)
    shard_dir = os.path.join(work_dir, "memory_shards")
    os.makedirs(shard_dir, exist_ok=True)
    shards = []
    for s, first in enumerate(range(0, n_items, SAMPLES_PER_SHARD)):
        name = f"{s:05d}.tar"
        Path(shard_dir, name).write_bytes(b"")  # never read: building the stream reads only the manifest
        shards.append({"name": name, "num_samples": min(SAMPLES_PER_SHARD, n_items - first)})
    manifest = {"version": make_shards.MANIFEST_VERSION, "num_samples": n_items, "shards": shards}
    Path(shard_dir, "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    spec = os.path.join(shard_dir, f"{{00000..{len(shards) - 1:05d}}}.tar")
    return ann, spec


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmRSS:"))


def _memory_child(train_file: str) -> None:
    """In a fresh process: print the RSS that building the rank's loader (dataset object) adds, in MiB."""
    transform = build_transform("pretrain", 256)
    before = _rss_mb()
    start = time.perf_counter()
    loader = build_pretrain_loader({"train_file": [train_file], "batch_size": 64, "num_workers": 8}, transform,
                                   seed=0)
    print(json.dumps({"rss_mb": _rss_mb() - before, "build_s": time.perf_counter() - start,
                      "steps": len(loader)}))


def bench_dataset_memory(work_dir: str, n_items: int = 1_000_000, scale_to: int = 14_000_000) -> list[Row]:
    """RSS of one rank's dataset object for ``n_items`` items from JSON and from shards, each in a fresh process.

    Returns:
        Two rows: ``source``, ``items``, ``rss_mb``, ``build_s`` and ``rss_mb_at_<scale_to>`` (linear scaling).
    """
    ann, spec = write_memory_inputs(work_dir, n_items)
    rows = []
    for source, train_file in (("JSON annotation file", ann), ("WebDataset shards", spec)):
        out = subprocess.run([sys.executable, __file__, "--memory-child", train_file], capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        child = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"source": source, "items": n_items, "rss_mb": round(child["rss_mb"], 1),
                     "build_s": round(child["build_s"], 2),
                     f"rss_mb_at_{scale_to}": round(child["rss_mb"] * scale_to / n_items, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print both measurements as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="640x480", help="WxH of the generated JPEGs")
    parser.add_argument("--data-res", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-items", type=int, default=1_000_000)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        logging.disable(logging.INFO)
        _memory_child(args.memory_child)
        return 0
    logging.basicConfig(level=logging.WARNING)
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_loader_throughput(tmp, args.images, (width, height), args.data_res, args.batch_size,
                                       args.workers)
        rows += bench_dataset_memory(tmp, args.memory_items)
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
