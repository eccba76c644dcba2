"""A seeded, offline synthetic "toy world" for ALBEF demos, tests and CI.

Each image shows 1-4 coloured shapes on a light background (rendered with Pillow). Captions
describe the whole composition, so retrieval needs every object. The generator writes the
annotation files of every downstream task in the official ALBEF formats (REFERENCE_NOTES 1.1):

    images/{train,val,test}/NNNNN.png   ve_images/<image_id>.jpg
    pretrain.json            [{"image": ABSOLUTE path, "caption": [str, ...]}], ~10% noisy
    retrieval_train.json     [{"image": rel, "caption": str, "image_id": "train_NNNNN"}]
    retrieval_{val,test}.json [{"image": rel, "caption": [5 x str]}]
    vqa_train.json, vqa_test.json, vqa_test_answers.json, answer_list.json
    nlvr_{train,val,test}.json, ve_{train,val,test}.json
    grounding_train.json, grounding_test.json, dets.json, refs.json (JSON stand-in for REFER)
    scenes.json              per-image object records (shape, colour, size, bbox) and captions
    manifest.json            parameters, counts, version (written last)

Usage: ``python -m dataset.toy_world --root data/toy`` or ``ensure_toy_world("data/toy")``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dataset.toy_tasks import (
    ALL_PAIRS,
    COLORS,
    NUMBERS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    Scene,
    ToyObject,
    absent_pair,
    article,
    build_grounding,
    build_nlvr,
    build_ve,
    build_vqa,
    is_above,
)

logger = logging.getLogger(__name__)

VERSION = 1
MAX_CAPTION_WORDS = 20
NOISE_RATE = 0.1
SUPERSAMPLE = 4
_RADIUS = {"small": (0.085, 0.105), "large": (0.15, 0.18)}  # fraction of the image side


# ----------------------------------------------------------------------------- geometry
def _ring(n: int, radii: Sequence[float]) -> tuple[tuple[float, float], ...]:
    """`n` points around the centre starting at the top, cycling through `radii`."""
    angles = (-math.pi / 2 + 2 * math.pi * k / n for k in range(n))
    return tuple(
        (radii[k % len(radii)] * math.cos(t), radii[k % len(radii)] * math.sin(t))
        for k, t in enumerate(angles)
    )


def _quarter_turns(points: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """`points` followed by their three rotations by 90 degrees (a 4-fold symmetric outline)."""
    out: list[tuple[float, float]] = []
    for _ in range(4):
        out += points
        points = [(-y, x) for x, y in points]
    return tuple(out)


# ----------------------------------------------------------------------------- scenes
_ARM, _HALF = 0.9, 0.3  # cross: arm length and half width
# Unit outlines (outer radius ~1, centred, image y axis pointing down).
_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {
    "circle": _ring(48, (1.0,)),
    "square": ((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)),
    "diamond": ((0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)),
    "triangle": ((0.0, -0.9), (0.95, 0.75), (-0.95, 0.75)),
    "star": _ring(10, (1.0, 0.42)),
    "cross": _quarter_turns(((-_HALF, -_ARM), (_HALF, -_ARM), (_HALF, -_HALF))),
}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of `shape` centred at (cx, cy) with outer radius r."""
    return [(cx + r * x, cy + r * y) for x, y in _OUTLINES[shape]]


def _make_object(shape: str, color: str, size: str, cx: float, cy: float, r: float) -> ToyObject:
    xs, ys = zip(*_polygon(shape, cx, cy, r), strict=True)
    x0, y0 = math.floor(min(xs)), math.floor(min(ys))
    box = (x0, y0, math.ceil(max(xs)) - x0, math.ceil(max(ys)) - y0)
    return ToyObject(shape, color, size, round(cx, 2), round(cy, 2), round(r, 2), box)


def sample_scene(
    rng: random.Random, image_id: int, split: str, index: int, image_size: int
) -> Scene:
    """1-4 objects with distinct (colour, shape) pairs, placed with little overlap."""
    n = rng.choices((1, 2, 3, 4), weights=(0.15, 0.35, 0.3, 0.2))[0]
    pairs = rng.sample(ALL_PAIRS, n)
    objects: list[ToyObject] = []
    for color, shape in pairs:
        size = rng.choice(SIZES)
        r = image_size * rng.uniform(*_RADIUS[size])
        for _ in range(100):  # rejection sampling; the last draw is kept if all fail
            cx, cy = rng.uniform(r + 1, image_size - r - 1), rng.uniform(r + 1, image_size - r - 1)
            if all(math.hypot(cx - o.cx, cy - o.cy) >= 0.9 * (r + o.radius) for o in objects):
                break
        objects.append(_make_object(shape, color, size, cx, cy, r))
    return Scene(image_id, split, index, tuple(objects))


def render_scene(scene: Scene, image_size: int, seed: int) -> Image.Image:
    """Draw at SUPERSAMPLE x resolution, downsample (anti-aliasing), add mild pixel noise."""
    rng = np.random.default_rng([seed, scene.image_id])
    big = image_size * SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(222, 250, size=3))
    canvas = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        pts = _polygon(
            obj.shape, obj.cx * SUPERSAMPLE, obj.cy * SUPERSAMPLE, obj.radius * SUPERSAMPLE
        )
        draw.polygon(pts, fill=COLORS[obj.color])
    small = np.asarray(
        canvas.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.int16
    )
    noisy = small + rng.integers(-4, 5, size=small.shape, dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- captions
_PREFIXES_ONE = ("", "a picture of ", "an image with ", "there is ", "one shape: ")
_PREFIXES_MANY = (
    "",
    "{n} shapes: ",
    "{n} objects: ",
    "an image of {n} shapes: ",
    "a picture with ",
    "there are {n} shapes: ",
)


def _phrase(obj: ToyObject, rng: random.Random, with_size: bool) -> str:
    words = [rng.choice(SIZE_WORDS[obj.size])] if with_size else []
    words += [obj.color, obj.shape]
    return f"{article(words[0])} {' '.join(words)}"


def _body(objects: Sequence[ToyObject], rng: random.Random, with_size: bool) -> str:
    """Objects in random or top-to-bottom order; the first two may be joined by above/below."""
    order = list(objects)
    if rng.random() < 0.5:
        rng.shuffle(order)
    else:
        order.sort(key=lambda o: o.cy)
    phrases = [_phrase(o, rng, with_size) for o in order]
    if len(order) >= 2 and rng.random() < 0.6:
        a, b = order[0], order[1]
        word = "above" if is_above(a, b) else "below" if is_above(b, a) else None
        if word:
            phrases[:2] = [f"{phrases[0]} {word} {phrases[1]}"]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def make_caption(objects: Sequence[ToyObject], rng: random.Random) -> str:
    """One caption naming every object (colour and shape, usually size), <= 20 words."""
    with_size = rng.random() < 0.8
    prefix = rng.choice(_PREFIXES_ONE if len(objects) == 1 else _PREFIXES_MANY)
    caption = prefix.format(n=NUMBERS[len(objects)]) + _body(objects, rng, with_size)
    if len(caption.replace(":", " ").replace(",", " ").split()) > MAX_CAPTION_WORDS:
        caption = _body(objects, rng, with_size=False)
    return caption


def make_captions(scene: Scene, rng: random.Random, k: int) -> list[str]:
    """`k` distinct clean captions (different templates, orderings and synonyms)."""
    captions: list[str] = []
    for _ in range(200 * k):
        caption = make_caption(scene.objects, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == k:
            return captions
    raise RuntimeError(f"could not make {k} distinct captions for {scene.key}")


def corrupt_caption(scene: Scene, rng: random.Random) -> str:
    """Pre-training noise: a caption with a wrong colour, a wrong shape or an extra object."""
    objects = list(scene.objects)
    i = rng.randrange(len(objects))
    obj = objects[i]
    kind = rng.randrange(3)
    taken = scene.pairs()
    if kind == 0:
        color = rng.choice([c for c in COLORS if (c, obj.shape) not in taken])
        objects[i] = _make_object(obj.shape, color, obj.size, obj.cx, obj.cy, obj.radius)
    elif kind == 1:
        shape = rng.choice([s for s in SHAPES if (obj.color, s) not in taken])
        objects[i] = _make_object(shape, obj.color, obj.size, obj.cx, obj.cy, obj.radius)
    else:
        color, shape = absent_pair(scene, rng)
        objects.append(_make_object(shape, color, rng.choice(SIZES), obj.cx, obj.cy, obj.radius))
    return make_caption(objects, rng)


# ----------------------------------------------------------------------------- writing
def _scenes(seed: int, counts: dict[str, int], image_size: int) -> dict[str, list[Scene]]:
    """All scenes, with integer ids 0..N-1 in split order.

    Val/test scenes get object signatures unique within their split where possible, so each
    retrieval query has one right image.
    """
    rng = random.Random(seed)
    out: dict[str, list[Scene]] = {}
    image_id = 0
    for split, n in counts.items():
        out[split], seen = [], set()
        for index in range(n):
            for _ in range(50):
                scene = sample_scene(rng, image_id, split, index, image_size)
                signature = frozenset((o.color, o.shape, o.size) for o in scene.objects)
                if split == "train" or signature not in seen:
                    break
            seen.add(signature)
            out[split].append(scene)
            image_id += 1
    return out


def _write_images(tmp: Path, scenes: dict[str, list[Scene]], image_size: int, seed: int) -> None:
    (tmp / "ve_images").mkdir(parents=True)
    for split, split_scenes in scenes.items():
        (tmp / "images" / split).mkdir(parents=True)
        for scene in split_scenes:
            image = render_scene(scene, image_size, seed)
            image.save(tmp / scene.image, format="PNG", compress_level=1)
            image.save(tmp / "ve_images" / f"{scene.image_id}.jpg", format="JPEG", quality=95)


def _scene_record(scene: Scene) -> dict[str, object]:
    objects = [
        {"shape": o.shape, "color": o.color, "size": o.size, "bbox": list(o.bbox)}
        for o in scene.objects
    ]
    return {
        "image_id": scene.image_id,
        "split": scene.split,
        "image": scene.image,
        "objects": objects,
    }


def _caption_files(scenes: dict[str, list[Scene]], root: Path, seed: int) -> dict[str, object]:
    """Pre-training and retrieval annotations plus the per-image scene records."""
    rng = random.Random(f"{seed}-captions")
    pretrain, retrieval_train, records = [], [], []
    evals: dict[str, list[dict[str, object]]] = {"val": [], "test": []}
    for split, split_scenes in scenes.items():
        for scene in split_scenes:
            record = _scene_record(scene)
            if split == "train":
                clean = make_captions(scene, rng, rng.randint(2, 3))
                noisy = [rng.random() < NOISE_RATE for _ in clean]
                captions = [
                    corrupt_caption(scene, rng) if bad else c
                    for c, bad in zip(clean, noisy, strict=True)
                ]
                pretrain.append({"image": str(root / scene.image), "caption": captions})
                retrieval_train += [
                    {"image": scene.image, "caption": c, "image_id": scene.key} for c in clean
                ]
                record.update(captions=clean, pretrain_captions=captions, noisy=noisy)
            else:
                record["captions"] = make_captions(scene, rng, 5)
                evals[split].append({"image": scene.image, "caption": record["captions"]})
            records.append(record)
    return {
        "pretrain.json": pretrain,
        "retrieval_train.json": retrieval_train,
        "retrieval_val.json": evals["val"],
        "retrieval_test.json": evals["test"],
        "scenes.json": records,
    }


def _annotation_files(
    scenes: dict[str, list[Scene]], root: Path, params: dict[str, int]
) -> dict[str, object]:
    seed = params["seed"]
    files = _caption_files(scenes, root, seed)
    train, val, test = scenes["train"], scenes["val"], scenes["test"]
    files.update(build_vqa(train, [*val, *test], random.Random(f"{seed}-vqa")))
    for split, split_scenes in scenes.items():
        rng = random.Random(f"{seed}-{split}")
        files[f"nlvr_{split}.json"] = build_nlvr(split_scenes, len(split_scenes), rng)
        files[f"ve_{split}.json"] = build_ve(split_scenes, rng)
    files.update(
        build_grounding(train, val, test, params["image_size"], random.Random(f"{seed}-ground"))
    )
    return files


def _generate(tmp: Path, root: Path, params: dict[str, int]) -> None:
    counts = {"train": params["n_train"], "val": params["n_val"], "test": params["n_test"]}
    scenes = _scenes(params["seed"], counts, params["image_size"])
    _write_images(tmp, scenes, params["image_size"], params["seed"])
    files = _annotation_files(scenes, root, params)
    for name, content in files.items():
        (tmp / name).write_text(json.dumps(content), encoding="utf-8")
    manifest = {
        "generator": "dataset.toy_world",
        "version": VERSION,
        "params": params,
        "images": counts,
        "counts": {name: len(content) for name, content in files.items()},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


# ----------------------------------------------------------------------------- entry points
def _manifest_matches(root: Path, params: dict[str, int]) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("params") == params


def _install(tmp: Path, root: Path, params: dict[str, int]) -> None:
    """Rename the finished world into place; only a stale toy world (or empty dir) is replaced."""
    if root.exists():
        if _manifest_matches(root, params):  # another process finished first
            return
        if any(root.iterdir()) and not (root / "manifest.json").exists():
            raise FileExistsError(f"{root} exists and is not a toy world; refusing to overwrite it")
        stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        root.rename(stale / "world")
        tmp.rename(root)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        try:
            tmp.rename(root)
        except OSError:
            if not _manifest_matches(root, params):  # lost a race to a different world
                raise


def ensure_toy_world(
    root: str,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 200,
    n_test: int = 250,
    image_size: int = 64,
) -> str:
    """Generate the toy world in `root` unless a complete one with these parameters exists.

    The world is built in a temporary directory next to `root` and renamed into place, so an
    interrupted run never leaves a partial world. Returns the absolute root path.
    """
    root_path = Path(root).expanduser().resolve()
    params = {
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "image_size": image_size,
        "version": VERSION,
    }
    if _manifest_matches(root_path, params):
        logger.info("toy world already present at %s", root_path)
        return str(root_path)
    if min(n_train, n_val, n_test) < 2 or image_size < 32:
        raise ValueError("need at least 2 images per split and image_size >= 32")
    start = time.perf_counter()
    root_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root_path.name}.tmp-", dir=root_path.parent))
    try:
        _generate(tmp, root_path, params)
        _install(tmp, root_path, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("toy world written to %s in %.1fs", root_path, time.perf_counter() - start)
    return str(root_path)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Generate the offline ALBEF toy world.")
    parser.add_argument("--root", default="data/toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=3000)
    parser.add_argument("--n_val", type=int, default=200)
    parser.add_argument("--n_test", type=int, default=250)
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return ensure_toy_world(
        args.root, args.seed, args.n_train, args.n_val, args.n_test, args.image_size
    )


if __name__ == "__main__":
    main()
