"""Write official pre-training annotation files and their images as WebDataset tar shards.

Usage (from the repository root)::

    python scripts/make_shards.py --ann data/coco.json data/vg.json data/cc3m_train.json \\
        --out-dir /data/shards/albef4m --max-count 10000 --short-side 576 --workers 16

Every item of the annotation files (``{"image": path, "caption": str | [str, ...]}``, checked as the JSON loader
checks them) becomes one sample ``<key>.{jpg|png|webp}``, ``<key>.txt`` (the first caption) and ``<key>.json``
(``source``, ``index``, ``image`` and ``caption`` as in the annotation file; the loader samples a caption
list as the official loader does). The key is ``<file number>_<item index>``. The items of all files are
shuffled together (``--seed``; ``--no-shuffle`` keeps file order), so that each shard mixes the sources.
Shards ``00000.tar, 00001.tar, ...`` hold ``--max-count`` samples, or fewer when the next sample would take the
shard past ``--max-bytes``.

Images are stored as their original bytes (JPEG, PNG and WebP; other formats re-encoded as JPEG), or, with
``--short-side``, shrunk as ``scripts/resize_images.py`` shrinks them (decoded by ``load_image``, EXIF
orientation applied, bicubic, saved in their own format); images already small enough keep their bytes.
Unreadable images are left out and listed in the manifest and in ``unreadable.txt``; the exit status is then 1.

``--out-dir/manifest.json`` records the parameters and, per finished shard, its sample count (the loader reads
it), byte size and the range of the shuffled order it holds; it is rewritten after every shard, each shard
appears atomically, so a rerun with the same arguments resumes after the last finished shard.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import sys
from collections.abc import Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset.image_io import ImageLoadError, load_image  # noqa: E402
from dataset.validate import PRETRAIN_SCHEMA, DataError, load_annotations  # noqa: E402
from scripts.resize_images import shrunk_size  # noqa: E402

logger = logging.getLogger("make_shards")

MANIFEST_VERSION = 1
_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are
_TAR_OVERHEAD = 3 * 1024  # bytes a sample adds besides its members' data: 3 headers and padding, about


def encode_image(path: str, short_side: int, quality: int) -> tuple[str, bytes]:
    """(extension, bytes) of the image stored for ``path``.

    Raises:
        ImageLoadError: the image cannot be read (as the training loader would find).
    """
    img = load_image(path, min_side=short_side or None)  # the loader's decode: unreadable images fail here
    with Image.open(path) as stored:
        fmt, size = stored.format, stored.size
    if fmt in _FORMATS and (not short_side or min(size) <= short_side):
        return _FORMATS[fmt], Path(path).read_bytes()  # the original bytes (EXIF applied by the loader)
    if short_side and min(img.size) > short_side:  # a JPEG may arrive decoded at 1/2, 1/4 or 1/8 scale
        img = img.resize(shrunk_size(*img.size, short_side), Image.BICUBIC)
    fmt = fmt if fmt in _FORMATS else "JPEG"
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return _FORMATS[fmt], buf.getvalue()


def _encode(job: tuple[str, int, int]) -> tuple[str, bytes] | str:
    """``encode_image`` in a pool worker: (ext, bytes), or the reason the image is unreadable."""
    try:
        return encode_image(*job)
    except ImageLoadError as err:
        return str(err)


def load_items(ann_files: list[str]) -> list[list[dict]]:
    """The items of each annotation file, validated with the pre-training schema (DataError otherwise)."""
    return [load_annotations(path, PRETRAIN_SCHEMA) for path in ann_files]


def plan_order(sizes: list[int], seed: int, shuffle: bool) -> list[tuple[int, int]]:
    """(file number, item index) of every item, shuffled with ``seed`` unless ``shuffle`` is False."""
    order = [(f, i) for f, n in enumerate(sizes) for i in range(n)]
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


def params_of(args: argparse.Namespace) -> dict:
    """What decides the shards' content: a resumed run must match it."""
    return {"ann": [os.path.abspath(p) for p in args.ann], "ann_bytes": [os.path.getsize(p) for p in args.ann],
            "image_root": args.image_root, "seed": args.seed, "shuffle": not args.no_shuffle,
            "max_count": args.max_count, "max_bytes": args.max_bytes, "short_side": args.short_side,
            "quality": args.quality}


def read_manifest(out_dir: str, params: dict) -> dict:
    """The manifest to continue: finished shards whose files are intact; a new one when there is none.

    Raises:
        DataError: the directory holds shards made with other parameters.
    """
    path = os.path.join(out_dir, "manifest.json")
    fresh = {"version": MANIFEST_VERSION, "params": params, "complete": False, "num_samples": 0, "shards": []}
    if not os.path.isfile(path):
        return fresh
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("params") != params:
        raise DataError(f"{path} was written with other parameters ({manifest.get('params')}); "
                        "use another --out-dir or the same arguments")
    kept = []
    for shard in manifest["shards"]:
        file = os.path.join(out_dir, shard["name"])
        if not os.path.isfile(file) or os.path.getsize(file) != shard["num_bytes"]:
            logger.warning("%s is missing or changed: rewriting it and the shards after it", file)
            break
        kept.append(shard)
    manifest["complete"] = manifest["complete"] and len(kept) == len(manifest["shards"])
    manifest["shards"] = kept
    return manifest


def write_manifest(out_dir: str, manifest: dict) -> None:
    """Atomically rewrite ``manifest.json`` (totals recomputed) and ``unreadable.txt``."""
    manifest["num_samples"] = sum(s["num_samples"] for s in manifest["shards"])
    unreadable = [u for s in manifest["shards"] for u in s["unreadable"]]
    manifest["num_unreadable"] = len(unreadable)
    for name, text in (("manifest.json", json.dumps(manifest, indent=1) + "\n"),
                       ("unreadable.txt", "".join(f"{u}\n" for u in unreadable))):
        tmp = os.path.join(out_dir, f"{name}.tmp")
        Path(tmp).write_text(text, encoding="utf-8")
        os.replace(tmp, os.path.join(out_dir, name))


class ShardBuilder:
    """Collects samples of one shard in a temporary tar and renames it into place when closed."""

    def __init__(self, out_dir: str, index: int, first: int) -> None:
        self.name, self.first = f"{index:05d}.tar", first
        self.path = os.path.join(out_dir, self.name)
        self.tmp = f"{self.path}.tmp"
        self.writer = wds.TarWriter(self.tmp, encoder=False, mtime=0.0)  # reproducible bytes
        self.count, self.bytes, self.unreadable = 0, 0, []

    def add(self, key: str, ext: str, image: bytes, meta: dict) -> None:
        caption = meta["caption"] if isinstance(meta["caption"], str) else meta["caption"][0]
        members = {ext: image, "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}
        self.writer.write({"__key__": key, **members})
        self.count += 1
        self.bytes += sum(len(v) for v in members.values()) + _TAR_OVERHEAD

    def close(self, end: int) -> dict:
        """Finish the tar; its manifest entry (``end``: the position after its last item in the order)."""
        self.writer.close()
        os.replace(self.tmp, self.path)
        return {"name": self.name, "num_samples": self.count, "num_bytes": os.path.getsize(self.path),
                "first": self.first, "end": end, "unreadable": self.unreadable}


def _results(jobs: Iterable[tuple[str, int, int]], workers: int) -> Iterator[tuple[str, bytes] | str]:
    """``_encode`` of every job, in order, in ``workers`` processes (0: this one)."""
    if workers <= 0:
        yield from map(_encode, jobs)
        return
    with Pool(workers) as pool:
        yield from pool.imap(_encode, jobs, chunksize=16)


def write_shards(args: argparse.Namespace, items: list[list[dict]], manifest: dict) -> dict:
    """Write the shards after those already in ``manifest``; returns the finished manifest."""
    order = plan_order([len(x) for x in items], args.seed, not args.no_shuffle)
    start = manifest["shards"][-1]["end"] if manifest["shards"] else 0
    sources = [os.path.basename(p) for p in args.ann]
    jobs = ((os.path.join(args.image_root, items[f][i]["image"]), args.short_side, args.quality)
            for f, i in order[start:])
    shard = ShardBuilder(args.out_dir, len(manifest["shards"]), start)
    for pos, result in tqdm(enumerate(_results(jobs, args.workers), start=start), total=len(order),
                            initial=start, desc="items", unit="item", disable=None):
        f, i = order[pos]
        if isinstance(result, str):
            logger.warning("%s", result)
            shard.unreadable.append(f"{args.ann[f]}, item {i}: {result}")
            continue
        ext, image = result
        if shard.count and (shard.count == args.max_count or
                            (args.max_bytes and shard.bytes + len(image) + _TAR_OVERHEAD > args.max_bytes)):
            manifest["shards"].append(shard.close(pos))
            write_manifest(args.out_dir, manifest)
            shard = ShardBuilder(args.out_dir, len(manifest["shards"]), pos)
        meta = {"source": sources[f], "index": i, **items[f][i]}
        shard.add(f"{f:03d}_{i:09d}", ext, image, meta)
    if shard.count or shard.unreadable:
        manifest["shards"].append(shard.close(len(order)))
    else:
        shard.writer.close()
        os.remove(shard.tmp)
    manifest["complete"] = True
    write_manifest(args.out_dir, manifest)
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ann", nargs="+", required=True, help="pre-training annotation JSON files")
    parser.add_argument("--image-root", default="", help="joined with relative image paths (as image_root)")
    parser.add_argument("--out-dir", required=True, help="directory of the shards and manifest.json")
    parser.add_argument("--max-count", type=int, default=10000, help="samples per shard at most")
    parser.add_argument("--max-bytes", type=float, default=0, help="bytes per shard at most (0: no limit)")
    parser.add_argument("--short-side", type=int, default=0, help="shrink larger images to this shorter side "
                        "(0: keep the original bytes)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality of re-encoded images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the item order")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the items in file order")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (0: this one)")
    args = parser.parse_args(argv)
    if args.max_count < 1 or args.max_bytes < 0 or args.short_side < 0 or not 1 <= args.quality <= 100:
        parser.error("--max-count must be >= 1, --max-bytes and --short-side >= 0, --quality in [1, 100]")
    return args


def main(argv: list[str] | None = None) -> int:
    """Write (or finish) the shards: 0 when every image was readable, 1 when some were left out, 2 on errors."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        items = load_items(args.ann)
        os.makedirs(args.out_dir, exist_ok=True)
        manifest = read_manifest(args.out_dir, params_of(args))
    except DataError as err:
        logger.error("%s", err)
        return 2
    if manifest["complete"]:
        logger.info("%s is complete: %d samples in %d shards", args.out_dir, manifest["num_samples"],
                    len(manifest["shards"]))
    else:
        logger.info("%d items from %d annotation file(s) -> %s, resuming after %d finished shard(s)",
                    sum(len(x) for x in items), len(args.ann), args.out_dir, len(manifest["shards"]))
        manifest = write_shards(args, items, manifest)
        logger.info("%d samples in %d shards, %d unreadable images left out (unreadable.txt)",
                    manifest["num_samples"], len(manifest["shards"]), manifest["num_unreadable"])
    return 1 if manifest.get("num_unreadable") else 0


if __name__ == "__main__":
    sys.exit(main())
