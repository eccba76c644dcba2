"""Scene model and task annotations (VQA, NLVR2, SNLI-VE, grounding) of the toy world.

`dataset.toy_world` samples and renders scenes; this module only turns scene records into
annotation items in the official ALBEF formats. All randomness comes from the
`random.Random` passed in, so the output is a pure function of its inputs.

Vertical relations ("above"/"below") are used only between objects whose bounding boxes are
vertically disjoint, so every statement stays true under the horizontal flips used in training.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (34, 150, 50),
    "blue": (30, 80, 220),
    "yellow": (235, 195, 20),
    "purple": (140, 50, 175),
    "orange": (250, 125, 15),
    "black": (25, 25, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
VQA_ANSWERS: dict[str, tuple[str, ...]] = {
    "count": ("0", "1", "2", "3", "4"),
    "color": tuple(COLORS),
    "shape": SHAPES,
    "yesno": ("yes", "no"),
    "size": SIZES,
}


@dataclass(frozen=True)
class ToyObject:
    """One rendered object; geometry in output-image pixels, `bbox` is `[x, y, w, h]`."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float
    bbox: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One image: its split, per-split index, global integer id and objects."""

    image_id: int
    split: str
    index: int
    objects: tuple[ToyObject, ...]

    @property
    def image(self) -> str:
        """Image path relative to the world root."""
        return f"images/{self.split}/{self.index:05d}.png"

    @property
    def key(self) -> str:
        return f"{self.split}_{self.index:05d}"

    def pairs(self) -> set[tuple[str, str]]:
        return {(o.color, o.shape) for o in self.objects}

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum((shape in (None, o.shape)) and (color in (None, o.color)) for o in self.objects)


def is_above(a: ToyObject, b: ToyObject) -> bool:
    """True when `a` lies entirely above `b` (bounding boxes vertically disjoint)."""
    return a.bbox[1] + a.bbox[3] <= b.bbox[1]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def counted(n: int, noun: str = "shape") -> str:
    """'one shape', 'three shapes'."""
    return f"{NUMBERS[n]} {noun}" + ("" if n == 1 else "s")


def absent_pair(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A (colour, shape) pair that is not in the scene."""
    taken = scene.pairs()
    return rng.choice([pair for pair in ALL_PAIRS if pair not in taken])


def vertical_pairs(scene: Scene) -> list[tuple[ToyObject, ToyObject]]:
    """All (upper, lower) object pairs with a clear vertical relation."""
    return [(a, b) for a in scene.objects for b in scene.objects if is_above(a, b)]


# ----------------------------------------------------------------------------- VQA
QA = tuple[str, str, str]  # (question, answer, answer type)


def _qa_count(scene: Scene, rng: random.Random) -> QA | None:
    kind = rng.randrange(3)
    obj = rng.choice(scene.objects)  # ask mostly about present attributes: fewer "0" answers
    color = obj.color if rng.random() < 0.7 else rng.choice(tuple(COLORS))
    shape = obj.shape if rng.random() < 0.7 else rng.choice(SHAPES)
    if kind == 0:
        return "how many shapes are there", str(len(scene.objects)), "count"
    if kind == 1:
        return f"how many {color} shapes are there", str(scene.count(color=color)), "count"
    return f"how many {PLURALS[shape]} are there", str(scene.count(shape=shape)), "count"


def _qa_attribute(scene: Scene, rng: random.Random) -> QA | None:
    obj = rng.choice(scene.objects)
    if scene.count(shape=obj.shape) == 1 and rng.random() < 0.5:
        return f"what color is the {obj.shape}", obj.color, "color"
    if scene.count(color=obj.color) == 1 and rng.random() < 0.5:
        return f"what shape is the {obj.color} object", obj.shape, "shape"
    return f"what size is the {obj.name}", obj.size, "size"


def _qa_exists(scene: Scene, rng: random.Random) -> QA | None:
    if rng.random() < 0.5:
        name = rng.choice(scene.objects).name
        return f"is there {article(name)} {name}", "yes", "yesno"
    color, shape = absent_pair(scene, rng)
    return f"is there {article(color)} {color} {shape}", "no", "yesno"


def _qa_relation(scene: Scene, rng: random.Random) -> QA | None:
    """'what shape is above the X': only when exactly one object is anywhere above X, clearly."""
    ref = rng.choice(scene.objects)
    others = [o for o in scene.objects if o is not ref]
    word, rel = rng.choice((("above", lambda o: o.cy < ref.cy), ("below", lambda o: o.cy > ref.cy)))
    hits = [o for o in others if rel(o)]
    if len(hits) != 1 or not (is_above(hits[0], ref) or is_above(ref, hits[0])):
        return None
    if rng.random() < 0.5:
        return f"what shape is {word} the {ref.name}", hits[0].shape, "shape"
    return f"what color is the shape {word} the {ref.name}", hits[0].color, "color"


QAMaker = Callable[[Scene, random.Random], "QA | None"]
QA_MAKERS: tuple[QAMaker, ...] = (_qa_count, _qa_attribute, _qa_exists, _qa_relation)


def _questions(scene: Scene, rng: random.Random, k: int) -> list[QA]:
    out: list[QA] = []
    for _ in range(20 * k):
        qa = rng.choice(QA_MAKERS)(scene, rng)
        if qa is not None and qa[0] not in {q for q, _, _ in out}:
            out.append(qa)
        if len(out) == k:
            break
    return out


def _annotator_answers(answer: str, kind: str, rng: random.Random) -> list[str]:
    """Ten annotator answers: mostly the truth, at most 3 plausible mistakes."""
    answers = [answer] * 10
    wrong = [a for a in VQA_ANSWERS[kind] if a != answer]
    for i in rng.sample(range(10), min(3, sum(rng.random() < 0.1 for _ in range(10)))):
        answers[i] = rng.choice(wrong)
    return answers


def build_vqa(
    train: Sequence[Scene], evals: Sequence[Scene], rng: random.Random
) -> dict[str, object]:
    """VQA train/test items, test ground truth and the answer list."""
    train_items, test_items, truth = [], [], {}
    qid = 1
    for scene in train:
        for question, answer, kind in _questions(scene, rng, 3):
            train_items.append(
                {
                    "image": scene.image,
                    "question": question,
                    "answer": _annotator_answers(answer, kind, rng),
                    "question_id": qid,
                    "dataset": "vqa",
                }
            )
            qid += 1
    for scene in evals:
        for question, answer, _ in _questions(scene, rng, 2):
            test_items.append(
                {"image": scene.image, "question": question, "question_id": qid, "dataset": "vqa"}
            )
            truth[str(qid)] = answer
            qid += 1
    answer_list = [a for kind in VQA_ANSWERS.values() for a in kind]
    return {
        "vqa_train.json": train_items,
        "vqa_test.json": test_items,
        "vqa_test_answers.json": truth,
        "answer_list.json": answer_list,
    }


# ----------------------------------------------------------------------------- NLVR2
def _nlvr_statement(a: Scene, b: Scene, rng: random.Random) -> tuple[str, bool]:
    """One statement about the ordered pair (left=a, right=b) and its truth."""
    obj = rng.choice(rng.choice((a, b)).objects)
    color, shape = (obj.color, obj.shape) if rng.random() < 0.5 else absent_pair(a, rng)
    side, scene = rng.choice((("left", a), ("right", b)))
    n_a, n_b, n = len(a.objects), len(b.objects), len(rng.choice((a, b)).objects)
    has_shape = (a.count(shape=shape) > 0, b.count(shape=shape) > 0)
    has_color = (a.count(color=color) > 0, b.count(color=color) > 0)
    total = a.count(shape=shape) + b.count(shape=shape)
    m = max(2, total + rng.choice((-1, 0, 0, 1)))
    in_scene = (color, shape) in scene.pairs()
    statements = [
        (f"the {side} image contains {article(color)} {color} {shape}", in_scene),
        (f"both images contain exactly {counted(n)}", n_a == n_b == n),
        (f"there are {NUMBERS[m]} {PLURALS[shape]} in total", total == m),
        (f"both images contain {article(shape)} {shape}", all(has_shape)),
        ("the left image contains more shapes than the right image", n_a > n_b),
        (f"only one image contains {article(color)} {color} shape", has_color[0] != has_color[1]),
        (f"no image contains {article(shape)} {shape}", not any(has_shape)),
    ]
    return rng.choice(statements)


def build_nlvr(
    scenes: Sequence[Scene], n_items: int, rng: random.Random
) -> list[dict[str, object]]:
    """`n_items` NLVR2 items on pairs of distinct scenes, labels exactly alternating True/False."""
    items = []
    for i in range(n_items):
        target = i % 2 == 0
        while True:
            a, b = rng.sample(list(scenes), 2)
            sentence, label = _nlvr_statement(a, b, rng)
            if label == target:
                break
        items.append({"images": [a.image, b.image], "sentence": sentence, "label": str(label)})
    rng.shuffle(items)
    return items


# ----------------------------------------------------------------------------- SNLI-VE
MATERIALS = ("wood", "paper", "plastic", "metal", "glass", "stone")
AGENTS = ("child", "student", "teacher", "computer", "artist")
PROPERTIES = ("heavy", "old", "expensive", "warm", "cold", "soft")
PURPOSES = ("game", "book", "school", "class", "test")


def _ve_entailment(scene: Scene, rng: random.Random) -> str:
    obj = rng.choice(scene.objects)
    options = [
        f"there is {article(obj.name)} {obj.name} in the image",
        f"the image shows {counted(len(scene.objects))}",
        f"the {obj.name} is {obj.size}",
    ]
    color, shape = absent_pair(scene, rng)
    options.append(f"there is no {color} {shape} in the image")
    options += [
        f"{article(a.name)} {a.name} is above {article(b.name)} {b.name}"
        for a, b in vertical_pairs(scene)
    ]
    return rng.choice(options)


def _ve_contradiction(scene: Scene, rng: random.Random) -> str:
    obj = rng.choice(scene.objects)
    color, shape = absent_pair(scene, rng)
    wrong_n = rng.choice([m for m in range(1, 5) if m != len(scene.objects)])
    other_size = "large" if obj.size == "small" else "small"
    options = [
        f"there is {article(color)} {color} {shape} in the image",
        f"the image shows {counted(wrong_n)}",
        f"the {obj.name} is {other_size}",
    ]
    options += [
        f"{article(a.name)} {a.name} is below {article(b.name)} {b.name}"
        for a, b in vertical_pairs(scene)
    ]
    if len(scene.objects) > 1 and len({o.color for o in scene.objects}) > 1:
        options.append(f"all the shapes are {obj.color}")
    return rng.choice(options)


def _ve_neutral(scene: Scene, rng: random.Random) -> str:
    name = rng.choice(scene.objects).name
    return rng.choice(
        (
            f"the {name} is made of {rng.choice(MATERIALS)}",
            f"the shapes were drawn by {article(a := rng.choice(AGENTS))} {a}",
            f"the {name} is very {rng.choice(PROPERTIES)}",
            f"the picture was made for {article(p := rng.choice(PURPOSES))} {p}",
        )
    )


def build_ve(scenes: Sequence[Scene], rng: random.Random) -> list[dict[str, str]]:
    """Three hypotheses per image (one per label), so the labels are exactly balanced."""
    items = []
    for scene in scenes:
        for label, maker in (
            ("entailment", _ve_entailment),
            ("neutral", _ve_neutral),
            ("contradiction", _ve_contradiction),
        ):
            items.append(
                {"image": str(scene.image_id), "sentence": maker(scene, rng), "label": label}
            )
    rng.shuffle(items)
    return items


# ----------------------------------------------------------------------------- grounding
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


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _proposals(scene: Scene, image_size: int, rng: random.Random) -> list[list[float]]:
    """Jittered ground-truth boxes (IoU >= 0.6 with the truth) plus 2-3 random distractors."""
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
        w, h = rng.uniform(6, image_size / 2), rng.uniform(6, image_size / 2)
        x, y = rng.uniform(0, image_size - w), rng.uniform(0, image_size - h)
        dets.append([round(v, 1) for v in (x, y, w, h)])
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
        "grounding_test.json": test_items,
        "dets.json": dets,
        "refs.json": refs,
    }
