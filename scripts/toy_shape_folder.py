"""An ImageFolder-style directory of toy-world images, one folder per shape of each image's largest object, for the
zero-shot classification evaluator (``scripts/predict.py classify --image_folder``).

    python scripts/toy_shape_folder.py --world data/toy --split test --out data/toy_shapes

The largest object is the one with the largest bounding box (``scenes.json``, width x height); images whose
largest box is shared by objects of different shapes are left out (counted). Images are linked (hard links,
copies where the file system has none), named as in the world. Prints the class counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections import Counter

logger = logging.getLogger("albef.toy_shapes")


def largest_shape(objects: list[dict]) -> str | None:
    """The shape of the object with the largest box (``bbox`` = [x, y, w, h]); None when shapes tie for it."""
    areas = [(o["bbox"][2] * o["bbox"][3], o["shape"]) for o in objects]
    top = max(area for area, _ in areas)
    shapes = {shape for area, shape in areas if area == top}
    return shapes.pop() if len(shapes) == 1 else None


def write_shape_folder(world: str, split: str, out: str) -> dict[str, int]:
    """Write ``out/<shape>/<image name>`` for the ``split`` images of the toy ``world``; returns
    ``{shape: images}`` plus ``'_ambiguous'`` (left out)."""
    with open(os.path.join(world, "scenes.json"), encoding="utf-8") as f:
        scenes = [s for s in json.load(f) if s["split"] == split]
    if not scenes:
        raise SystemExit(f"{world}/scenes.json has no {split!r} images")
    counts: Counter = Counter()
    for scene in scenes:
        shape = largest_shape(scene["objects"])
        if shape is None:
            counts["_ambiguous"] += 1
            continue
        target = os.path.join(out, shape, os.path.basename(scene["image"]))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            try:
                os.link(os.path.join(world, scene["image"]), target)
            except OSError:
                shutil.copyfile(os.path.join(world, scene["image"]), target)
        counts[shape] += 1
    return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="data/toy", help="the toy world folder (scenes.json)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    counts = write_shape_folder(args.world, args.split, args.out)
    sys.stdout.write("".join(f"{name}\t{n}\n" for name, n in counts.items()))
    return counts


if __name__ == "__main__":
    main()
