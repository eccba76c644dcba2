"""Grounding annotations of the toy world (RefCOCO+-style): referring expressions, boxes, detections.

Expressions come from a small grammar and name exactly one object of their scene; the detections of an
evaluation image are its jittered ground-truth boxes plus random distractors that overlap no object at
IoU >= 0.5, so every expression has exactly one proposal at IoU >= 0.5 with its object and at least 3
proposals. All randomness comes from the `random.Random` passed in, so the output is a pure function of
its inputs.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from dataset.toy_scene import COLORS, SHAPES, SIZES, Scene, ToyObject, is_above

# The kinds of expression of the grammar below, in the order `referring_expressions` lists them; the last two
# use location words, which RefCOCO+ (the benchmark of the paper's Table 5) forbids and RefCOCO allows.
_SHAPE, _COLOR, _SIZE = "|".join(SHAPES), "|".join(COLORS), "|".join(SIZES)
EXPRESSION_KINDS: dict[str, str] = {
    "colour shape": rf"the ({_COLOR}) ({_SHAPE})",
    "size colour shape": rf"the ({_SIZE}) ({_COLOR}) ({_SHAPE})",
    "shape": rf"the ({_SHAPE})",
    "colour": rf"the ({_COLOR}) (shape|object)",
    "size shape": rf"the ({_SIZE}) ({_SHAPE})",
    "top / bottom": r"the shape at the (top|bottom)",
    "relation": rf"the ({_SHAPE}) (above|below) the ({_COLOR}) ({_SHAPE})",
}
LOCATION_KINDS = ("top / bottom", "relation")


def expression_kind(text: str) -> str:
    """The kind of a toy referring expression (a key of `EXPRESSION_KINDS`), or "other" outside the grammar."""
    return next((kind for kind, pattern in EXPRESSION_KINDS.items() if re.fullmatch(pattern, text)), "other")


def referring_expressions(scene: Scene, target: ToyObject) -> list[str]:
    """Every expression of our grammar that picks out `target` and no other object."""
    out = [f"the {target.name}", f"the {target.size} {target.name}"]
    if scene.count(shape=target.shape) == 1:
        out.append(f"the {target.shape}")
    if scene.count(color=target.color) == 1:
        out += [f"the {target.color} shape", f"the {target.color} object"]
    same_size_shape = [o for o in scene.objects if (o.size, o.shape) == (target.size, target.shape)]
    if len(same_size_shape) == 1:
        out.append(f"the {target.size} {target.shape}")
    others = [o for o in scene.objects if o is not target]
    if others and all(is_above(target, o) for o in others):
        out.append("the shape at the top")
    if others and all(is_above(o, target) for o in others):
        out.append("the shape at the bottom")
    for ref in others:
        rivals = [o for o in others if o.shape == target.shape and o is not ref]
        if is_above(target, ref) and all(o.cy >= ref.cy for o in rivals):
            out.append(f"the {target.shape} above the {ref.name}")
        if is_above(ref, target) and all(o.cy <= ref.cy for o in rivals):
            out.append(f"the {target.shape} below the {ref.name}")
    return out


def full_expressions(scenes: Sequence[Scene]) -> list[dict[str, str]]:
    """One training item per object naming it in full, "the {size} {colour} {shape}" (no randomness, so writing
    it leaves every other file unchanged).

    `grounding_train.json` picks each object's expression at random among those unique in its image; many
    ("the blue object", "the star") fit many other images, so the hard negatives that ITM draws by contrastive
    similarity mostly fit the expression too and the ITM head learns the label prior (README, grounding). A full
    name fits about 1 image in 30, as RefCOCO+'s longer expressions rarely fit another image.
    """
    return [{"image": s.image, "text": f"the {o.size} {o.name}"} for s in scenes for o in s.objects]


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _distractor(scene: Scene, image_size: int, rng: random.Random) -> list[float]:
    """A random box with IoU < 0.5 against every object of the scene, so no expression of the image gets a
    second proposal at IoU >= 0.5 (the evaluator's official IoU never exceeds this continuous one).

    The first box comes from `rng` (four draws, as always); a rejected box is redrawn from a generator
    seeded by the scene and the rejected box, so `rng`'s stream, and with it every other file of the toy
    world, is the same as without the rejection.
    """
    def draw(source: random.Random) -> list[float]:
        w, h = source.uniform(6, image_size / 2), source.uniform(6, image_size / 2)
        x, y = source.uniform(0, image_size - w), source.uniform(0, image_size - h)
        return [round(v, 1) for v in (x, y, w, h)]

    box = draw(rng)
    redraw = random.Random(f"{scene.image_id}-{box}")
    for _ in range(1000):
        if all(_box_iou(box, obj.bbox) < 0.5 for obj in scene.objects):
            return box
        box = draw(redraw)
    raise RuntimeError(f"no distractor box clear of the objects of toy image {scene.image_id}")


def _proposals(scene: Scene, image_size: int, rng: random.Random) -> list[list[float]]:
    """Jittered ground-truth boxes (IoU >= 0.6 with the truth) plus 2-3 random distractors, each with
    IoU < 0.5 against every object (:func:`_distractor`)."""
    dets = []
    for obj in scene.objects:
        box = list(map(float, obj.bbox))
        for _ in range(10):
            cand = [round(v + rng.gauss(0.0, 0.06 * max(obj.bbox[2:])), 1) for v in obj.bbox]
            if cand[2] > 1 and cand[3] > 1 and _box_iou(cand, obj.bbox) >= 0.6:
                box = cand
                break
        dets.append(box)
    for _ in range(rng.randint(2, 3)):
        dets.append(_distractor(scene, image_size, rng))
    rng.shuffle(dets)
    return dets


def build_grounding(
    train: Sequence[Scene],
    val: Sequence[Scene],
    test: Sequence[Scene],
    image_size: int,
    rng: random.Random,
) -> dict[str, object]:
    """RefCOCO+-style files. Test images with <= 2 objects are `testA`, the rest `testB`."""
    train_items = [
        {"image": s.image, "text": rng.choice(referring_expressions(s, o))}
        for s in train
        for o in s.objects
    ]
    test_items, refs, dets = [], {}, {}
    ref_id = 0
    for scene in [*val, *test]:
        split = "val" if scene.split == "val" else ("testA" if len(scene.objects) <= 2 else "testB")
        dets[str(scene.image_id)] = _proposals(scene, image_size, rng)
        for obj in scene.objects:
            text = rng.choice(referring_expressions(scene, obj))
            test_items.append({"image": scene.image, "text": text, "ref_id": ref_id})
            refs[str(ref_id)] = {
                "split": split,
                "image_id": scene.image_id,
                "bbox": list(obj.bbox),
                "height": image_size,
                "width": image_size,
                "image": scene.image,
            }
            ref_id += 1
    return {
        "grounding_train.json": train_items,
        "grounding_train_full.json": full_expressions(train),
        "grounding_test.json": test_items,
        "dets.json": dets,
        "refs.json": refs,
    }
