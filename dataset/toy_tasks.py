"""Task annotations (VQA, NLVR2, SNLI-VE) of the toy world, in the official ALBEF formats.

`dataset.toy_render` samples and renders scenes (`dataset.toy_scene`); this module only turns scene
records into annotation items (grounding: `dataset.toy_grounding`). All randomness comes from the
`random.Random` passed in, so the output is a pure function of its inputs. Statements of a vertical
relation follow `is_above` (boxes vertically disjoint), so they stay true under horizontal flips.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

from dataset.toy_scene import (
    COLORS,
    NUMBERS,
    PLURALS,
    SHAPES,
    SIZES,
    Scene,
    absent_pair,
    article,
    counted,
    is_above,
    vertical_pairs,
)

VQA_ANSWERS: dict[str, tuple[str, ...]] = {
    "count": ("0", "1", "2", "3", "4"),
    "color": tuple(COLORS),
    "shape": SHAPES,
    "yesno": ("yes", "no"),
    "size": SIZES,
}


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


_SHAPE, _SHAPES, _COLOR = "|".join(SHAPES), "|".join(PLURALS.values()), "|".join(COLORS)
_NUMBER = "|".join(NUMBERS)
# The kinds of `_nlvr_statement`, one per template, each named by its template (placeholders in capitals).
NLVR_KINDS: dict[str, str] = {
    "the left/right image contains a COLOUR SHAPE": rf"the (left|right) image contains an? ({_COLOR}) ({_SHAPE})",
    "both images contain exactly N shapes": rf"both images contain exactly ({_NUMBER}) shapes?",
    "there are N SHAPEs in total": rf"there are ({_NUMBER}) ({_SHAPES}) in total",
    "both images contain a SHAPE": rf"both images contain an? ({_SHAPE})",
    "the left image contains more shapes than the right image":
        r"the left image contains more shapes than the right image",
    "only one image contains a COLOUR shape": rf"only one image contains an? ({_COLOR}) shape",
    "no image contains a SHAPE": rf"no image contains an? ({_SHAPE})",
}


def nlvr_statement_kind(sentence: str) -> str:
    """The kind of a toy NLVR2 statement (a key of `NLVR_KINDS`), or "other" outside the toy templates."""
    return next((kind for kind, pattern in NLVR_KINDS.items() if re.fullmatch(pattern, sentence)), "other")


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

