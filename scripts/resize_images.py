"""Write copies of a dataset's images shrunk to a maximum shorter side, so that loading them is cheaper.

Usage (from the repository root)::

    python scripts/resize_images.py --ann data/coco_train.json data/coco_val.json data/coco_test.json \\
        --image-root /data/coco/images/ --out-root /data/coco_512/ --short-side 512 --workers 8

Every image named by the annotation files (key ``image``, or the list ``images`` of NLVR2) is decoded as the
training loader decodes it (EXIF orientation applied, RGB), shrunk with bicubic filtering if its shorter side
exceeds ``--short-side``, and written in its own format (JPEG at ``--quality``) under ``--out-root``; images
that are small enough already are copied unchanged.

* Relative paths (retrieval, VQA, NLVR2, SNLI-VE files) keep their place: the annotation files stay valid,
  point ``image_root`` at ``--out-root``.
* Absolute paths (the official pre-training files) move under ``--out-root``, relative to the longest
  directory all of them share; those files are rewritten, with the new paths, to ``--out-root/annotations/``.

Reruns skip the images already written (each file appears atomically), so an interrupted run resumes.
Images that cannot be read are listed in ``--out-root/unreadable.txt`` and left out (the loaders skip
missing images too); the exit status is then 1.

When it pays off: the data-pipeline rows of ``scripts/benchmark.py`` (``--source-size``) time decode +
augmentation per source size. Training at 256 px with RandomResizedCrop down to 20% of the area reads crops
of about 0.45 of the shorter side, so a shorter side of 576 or more keeps every crop at full resolution.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset.image_io import ImageLoadError, load_image  # noqa: E402
from dataset.validate import DataError, read_json  # noqa: E402

logger = logging.getLogger("resize_images")


@dataclass(frozen=True)
class Job:
    """One image: where it is read and where its copy goes."""

    src: str
    dst: str


def image_paths(item: dict, where: str) -> list[str]:
    """The image path(s) of one annotation item: ``image`` (str) or ``images`` (list of str)."""
    if isinstance(item.get("image"), str):
        return [item["image"]]
    if isinstance(item.get("images"), list) and all(isinstance(p, str) for p in item["images"]):
        return list(item["images"])
    raise DataError(f"{where}: no 'image' string or 'images' list of strings")


def read_annotations(paths: list[str]) -> dict[str, list[dict]]:
    """Annotation file -> its list of items, each checked to name its image(s)."""
    out = {}
    for path in paths:
        items = read_json(path)
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of items, got {type(items).__name__}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise DataError(f"{path}, item {i}: expected an object, got {type(item).__name__}")
            image_paths(item, f"{path}, item {i}")
        out[path] = items
    return out


def absolute_base(names: list[str]) -> str:
    """The longest directory that every absolute image path lies under ('' when there are none)."""
    dirs = [os.path.dirname(n) for n in names if os.path.isabs(n)]
    return os.path.commonpath(dirs) if dirs else ""


def destination(name: str, out_root: str, base: str) -> str:
    """Where the copy of the image ``name`` (as written in an annotation file) goes."""
    return os.path.join(out_root, os.path.relpath(name, base) if os.path.isabs(name) else name)


def plan(annotations: dict[str, list[dict]], image_root: str, out_root: str) -> tuple[list[Job], str]:
    """One job per distinct image name; the base directory of the absolute names."""
    names = sorted({n for items in annotations.values() for item in items for n in image_paths(item, "")})
    base = absolute_base(names)
    jobs, seen = [], {}
    for name in names:
        src, dst = os.path.normpath(os.path.join(image_root, name)), os.path.normpath(destination(name, out_root, base))
        if os.path.relpath(dst, out_root).startswith(os.pardir):
            raise DataError(f"image {name!r} would be written outside --out-root ({dst})")
        if dst in seen:
            if seen[dst] != src:
                raise DataError(f"images {seen[dst]!r} and {src!r} would both be written to {dst}")
            continue  # one file named twice (relative and absolute)
        seen[dst] = src
        jobs.append(Job(src, dst))
    return jobs, base


def shrunk_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is ``short_side``, rounded, each at least 1."""
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def process(job: Job, short_side: int, quality: int) -> tuple[str, str]:
    """Write the copy of one image -> (status, detail): written, copied, exists or unreadable."""
    if os.path.isfile(job.dst) and os.path.getsize(job.dst) > 0:
        return "exists", job.dst
    try:
        img = load_image(job.src, min_side=short_side)
    except ImageLoadError as err:
        return "unreadable", str(err)
    os.makedirs(os.path.dirname(job.dst) or ".", exist_ok=True)
    tmp = f"{job.dst}.tmp{os.getpid()}"
    with Image.open(job.src) as stored:
        small = min(stored.size) <= short_side
    if small:
        shutil.copyfile(job.src, tmp)  # the original bytes (the loader applies their EXIF orientation as before)
        status = "copied"
    else:
        if min(img.size) > short_side:  # a JPEG may arrive decoded at 1/2, 1/4 or 1/8 scale, never below
            img = img.resize(shrunk_size(*img.size, short_side), Image.BICUBIC)
        fmt = Image.registered_extensions().get(os.path.splitext(job.dst)[1].lower(), "JPEG")
        img.save(tmp, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))  # upright, no EXIF
        status = "written"
    os.replace(tmp, job.dst)
    return status, job.dst


def _run(args: tuple[Job, int, int]) -> tuple[str, str]:
    return process(*args)


def run_jobs(jobs: list[Job], short_side: int, quality: int, workers: int) -> Iterator[tuple[str, str]]:
    """Process the jobs in ``workers`` processes (0: in this one), yielding results as they finish."""
    tasks = [(job, short_side, quality) for job in jobs]
    if workers <= 0:
        yield from map(_run, tasks)
        return
    with Pool(workers) as pool:
        yield from pool.imap_unordered(_run, tasks, chunksize=8)


def rewrite_annotations(annotations: dict[str, list[dict]], out_root: str, base: str) -> list[str]:
    """Files holding absolute paths -> ``out_root/annotations/<name>`` with the new paths; their paths."""
    written = []
    for path, items in annotations.items():
        if not any(os.path.isabs(n) for item in items for n in image_paths(item, path)):
            continue
        moved = []
        for item in items:
            new = dict(item)
            key = "image" if "image" in item and isinstance(item["image"], str) else "images"
            paths = [os.path.abspath(destination(n, out_root, base)) if os.path.isabs(n) else n
                     for n in image_paths(item, path)]
            new[key] = paths[0] if key == "image" else paths
            moved.append(new)
        out = os.path.join(out_root, "annotations", os.path.basename(path))
        if out in written:
            raise DataError(f"two annotation files are named {os.path.basename(path)!r}; rewrite them one at a time")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(f"{out}.tmp", "w", encoding="utf-8") as f:
            json.dump(moved, f)
        os.replace(f"{out}.tmp", out)
        written.append(out)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ann", nargs="+", required=True, help="annotation JSON files (official formats)")
    parser.add_argument("--image-root", default="", help="joined with relative image paths (as image_root)")
    parser.add_argument("--out-root", required=True, help="directory the copies are written to")
    parser.add_argument("--short-side", type=int, default=576, help="largest shorter side kept, in pixels")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of shrunk images")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (0: this one)")
    args = parser.parse_args(argv)
    if args.short_side < 1 or not 1 <= args.quality <= 100:
        parser.error("--short-side must be >= 1 and --quality in [1, 100]")
    return args


def main(argv: list[str] | None = None) -> int:
    """Shrink or copy every image of the annotation files; 0 if all were readable, 1 otherwise."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        annotations = read_annotations(args.ann)
        jobs, base = plan(annotations, args.image_root, args.out_root)
    except DataError as err:
        logger.error("%s", err)
        return 2
    logger.info("%d images from %d annotation file(s) -> %s (shorter side <= %d)", len(jobs), len(args.ann),
                args.out_root, args.short_side)
    counts = {"written": 0, "copied": 0, "exists": 0, "unreadable": 0}
    unreadable = []
    for status, detail in tqdm(run_jobs(jobs, args.short_side, args.quality, args.workers), total=len(jobs),
                               desc="images", unit="img", disable=None):
        counts[status] += 1
        if status == "unreadable":
            logger.warning("%s", detail)
            unreadable.append(detail)
    os.makedirs(args.out_root, exist_ok=True)
    for out in rewrite_annotations(annotations, args.out_root, base):
        logger.info("annotation file with the new paths: %s", out)
    listing = os.path.join(args.out_root, "unreadable.txt")
    if unreadable:
        Path(listing).write_text("\n".join(sorted(unreadable)) + "\n", encoding="utf-8")
    where = f" (listed in {listing})" if unreadable else ""
    logger.info("%d shrunk, %d copied unchanged, %d already there, %d unreadable%s", counts["written"],
                counts["copied"], counts["exists"], counts["unreadable"], where)
    return 1 if unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
