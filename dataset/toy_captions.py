"""Captions of the toy world: clean captions naming every object, noisy ones for pre-training, and the
pre-training / retrieval annotation files built from them (with the per-image scene records).

All randomness comes from the `random.Random` passed in (`build_captions`: one seeded from `seed`), so the
output is a pure function of the inputs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from dataset.toy_render import make_object
from dataset.toy_scene import (
    COLORS,
    NUMBERS,
    PLURALS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    Scene,
    ToyObject,
    absent_pair,
    article,
    counted,
    is_above,
)

MAX_CAPTION_WORDS = 20
NOISE_RATE = 0.1

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
        objects[i] = make_object(obj.shape, color, obj.size, obj.cx, obj.cy, obj.radius)
    elif kind == 1:
        shape = rng.choice([s for s in SHAPES if (obj.color, s) not in taken])
        objects[i] = make_object(shape, obj.color, obj.size, obj.cx, obj.cy, obj.radius)
    else:
        color, shape = absent_pair(scene, rng)
        objects.append(make_object(shape, color, rng.choice(SIZES), obj.cx, obj.cy, obj.radius))
    return make_caption(objects, rng)


_PREFIXES_PART = ("", "there is ", "a picture with ", "an image with ")


def partial_caption(scene: Scene, rng: random.Random) -> str:
    """A caption naming a random proper subset of the objects (1 to n-1 of them; the one object of a
    one-object image), with no object count.

    Every clean caption names every object, so a masked colour is the one present colour the caption does not
    name yet: MLM is solved by elimination, without binding colours to shapes. A partial caption leaves that
    shortcut out (``scripts/toy_binding_probe.py`` measures binding; README, VQA section).
    """
    objects = list(scene.objects)
    subset = rng.sample(objects, rng.randint(1, max(1, len(objects) - 1)))
    return rng.choice(_PREFIXES_PART) + _body(subset, rng, with_size=rng.random() < 0.8)


def build_binding_captions(pretrain: Sequence[dict], scenes: Sequence[Scene], rng: random.Random,
                           k: int = 3) -> list[dict[str, object]]:
    """``pretrain_binding.json``: each pre-training item's captions plus ``k`` :func:`partial_caption` ones."""
    return [{"image": item["image"], "caption": [*item["caption"], *(partial_caption(scene, rng) for _ in range(k))]}
            for item, scene in zip(pretrain, scenes, strict=True)]


def object_names(scene: Scene) -> list[str]:
    """Region captions naming one object each: "a big red star", "a large red star", "a red star"."""
    names = []
    for obj in scene.objects:
        names += [f"{article(word)} {word} {obj.color} {obj.shape}" for word in SIZE_WORDS[obj.size]]
        names.append(f"{article(obj.color)} {obj.color} {obj.shape}")
    return names


def shape_counts(scene: Scene) -> list[str]:
    """Region captions naming a shape by its count ("a star", "two circles") and the number of shapes."""
    counts = {shape: scene.count(shape=shape) for shape in dict.fromkeys(o.shape for o in scene.objects)}
    phrases = [f"{article(s)} {s}" if n == 1 else f"{NUMBERS[n]} {PLURALS[s]}" for s, n in counts.items()]
    return [*phrases, counted(len(scene.objects))]


def build_region_captions(scenes: Sequence[Scene], root: Path) -> list[dict[str, object]]:
    """``pretrain_regions.json``: short region descriptions in the pre-training format, as Visual Genome's in
    the official pre-training corpus (also the official text-assignment data). Two items per training image, one
    whose captions each name one object (:func:`object_names`), one whose captions each name a shape with its
    count or the number of objects (:func:`shape_counts`); every caption is true of its image."""
    items = [{"image": str(root / s.image), "caption": object_names(s)} for s in scenes]
    return items + [{"image": str(root / s.image), "caption": shape_counts(s)} for s in scenes]


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


def build_captions(scenes: dict[str, list[Scene]], root: Path, seed: int) -> dict[str, object]:
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
