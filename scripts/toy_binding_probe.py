"""Attribute binding of a pre-training checkpoint on the toy world, read through its masked-language-model head.

Usage (from the repository root)::

    python scripts/toy_binding_probe.py --checkpoint output/toy_pretrain_vit/checkpoint_15.pth [--split test]

For every object of a multi-object test image, the MLM head fills in one masked word of a text about that object:

- ``colour, one object named``: "a [MASK] star" (only objects whose shape is unique in the image), the masked
  word scored over the 7 colours;
- ``shape, one object named``: "a red [MASK]" (only objects whose colour is unique in the image), over the 6 shapes;
- ``colour, all objects named``: the image's first caption (it names every object), the object's colour masked.

Each row gives the accuracy, the share of answers that name an attribute of *another* object of the image (a
binding error) and the chance of picking at random among the attribute values present in the image. A model that
binds colour to shape scores far above that chance on the one-object rows. The all-objects row can be solved
without binding, by elimination: the masked colour is the present colour the caption does not name yet.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dataset.toy_scene import COLORS, SHAPES, article  # noqa: E402


@dataclass(frozen=True)
class Probe:
    """One masked word: ``text`` with ``answer`` at the masked place, scored over ``candidates``."""

    kind: str
    image: str
    text: str
    answer: str
    candidates: tuple[str, ...]
    present: frozenset[str]  # the values of this attribute in the image


def _unique(objects: list[dict], key: str) -> list[dict]:
    return [o for o in objects if sum(p[key] == o[key] for p in objects) == 1]


def build_probes(scenes: list[dict], split: str) -> list[Probe]:
    """The three probe kinds over the multi-object images of ``split`` (``scenes.json`` records)."""
    probes: list[Probe] = []
    for scene in scenes:
        objects = scene["objects"]
        if scene["split"] != split or len(objects) < 2:
            continue
        colours = frozenset(o["color"] for o in objects)
        shapes = frozenset(o["shape"] for o in objects)
        if len(colours) >= 2:
            for o in _unique(objects, "shape"):  # "a" for every colour: "an" would give "orange" away
                probes.append(Probe("colour, one object named", scene["image"], f"a {o['color']} {o['shape']}",
                                    o["color"], tuple(COLORS), colours))
            for o in _unique(objects, "color"):
                probes.append(Probe("colour, all objects named", scene["image"], scene["captions"][0],
                                    o["color"], tuple(COLORS), colours))
        if len(shapes) >= 2:
            for o in _unique(objects, "color"):
                probes.append(Probe("shape, one object named", scene["image"],
                                    f"{article(o['color'])} {o['color']} {o['shape']}", o["shape"], tuple(SHAPES),
                                    shapes))
    return probes


@torch.inference_mode()
def run_probes(checkpoint: str, world: str, split: str) -> dict[str, dict[str, float]]:
    """``{kind: {n, accuracy, other_object, chance}}`` in percent (``n`` a count)."""
    from models.api import load_model

    inference = load_model(checkpoint, task="pretrain", device="cpu", amp="none")
    model, tokenizer = inference.model, inference.tokenizer
    with open(Path(world) / "scenes.json", encoding="utf-8") as f:
        probes = build_probes(json.load(f), split)

    # each colour and shape is one word piece, tokenised once: [CLS] word -> its id
    word_ids = {w: int(tokenizer([w], max_length=8).input_ids[0, 1]) for w in (*COLORS, *SHAPES)}
    totals: dict[str, list[float]] = {}
    for image, image_probes in groupby(probes, key=lambda p: p.image):  # build_probes keeps an image's together
        image_embeds, _ = model.encode_image(inference.preprocess(str(Path(world) / image)))  # (1, 1+N, D)
        for probe in image_probes:
            batch = tokenizer([probe.text], max_length=inference.max_tokens)
            ids = batch.input_ids.clone()  # (1, T)
            where = (ids[0] == word_ids[probe.answer]).nonzero()
            if len(where) != 1:
                raise ValueError(f"{image}: '{probe.answer}' is not once in '{probe.text}'")
            ids[0, where[0, 0]] = tokenizer.mask_token_id
            hidden = model.text_encoder.bert(ids, batch.attention_mask, image_embeds)  # (1, T, H)
            logits = model.text_encoder.logits_at(hidden, ids == tokenizer.mask_token_id)[0]  # (V,)
            guess = probe.candidates[int(logits[[word_ids[c] for c in probe.candidates]].argmax())]
            row = totals.setdefault(probe.kind, [0, 0, 0, 0.0])
            row[0] += 1
            row[1] += guess == probe.answer
            row[2] += guess != probe.answer and guess in probe.present
            row[3] += 1 / len(probe.present)
    return {kind: {"n": n, "accuracy": 100 * ok / n, "other_object": 100 * other / n, "chance": 100 * chance / n}
            for kind, (n, ok, other, chance) in totals.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a pre-training checkpoint (it has the MLM head)")
    parser.add_argument("--world", default="data/toy", help="the toy world (its scenes.json)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = run_probes(args.checkpoint, args.world, args.split)
    print(f"{'probe':<28} {'n':>5} {'accuracy %':>11} {'other object %':>15} {'chance %':>9}")
    for kind, row in rows.items():
        print(f"{kind:<28} {row['n']:>5} {row['accuracy']:>11.1f} {row['other_object']:>15.1f} {row['chance']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
