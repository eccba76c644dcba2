"""scripts/toy_binding_probe.py: which objects it probes, and how it counts right answers and binding errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_albef
from dataset.toy_scene import COLORS, SHAPES
from dataset.toy_world import ensure_toy_world

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import toy_binding_probe as probe  # noqa: E402


def obj(color: str, shape: str) -> dict:
    return {"color": color, "shape": shape, "size": "small", "bbox": [0, 0, 4, 4]}


def test_probes_cover_the_unambiguous_objects_of_multi_object_images() -> None:
    caption = "a red circle, a blue square and a red star"
    scenes = [
        {"split": "test", "image": "a.png", "objects": [obj("red", "circle"), obj("blue", "square"),
                                                         obj("red", "star")], "captions": [caption]},
        {"split": "test", "image": "b.png", "objects": [obj("red", "circle")], "captions": ["a red circle"]},
        {"split": "train", "image": "c.png", "objects": [obj("red", "circle"), obj("blue", "star")],
         "captions": ["a red circle and a blue star"]},
    ]
    probes = probe.build_probes(scenes, "test")
    got = [(p.kind, p.text, p.answer) for p in probes]
    assert got == [
        ("colour, one object named", "a red circle", "red"),
        ("colour, one object named", "a blue square", "blue"),
        ("colour, one object named", "a red star", "red"),
        ("colour, all objects named", caption, "blue"),  # red is twice in the image: ambiguous
        ("shape, one object named", "a blue square", "square"),
    ]
    assert probes[0].present == {"red", "blue"} and probes[-1].present == {"circle", "square", "star"}
    assert probes[0].candidates == tuple(COLORS) and probes[-1].candidates == tuple(SHAPES)


def test_a_model_that_always_says_blue_square_is_counted_by_hand(tmp_path: Path, one_thread: None) -> None:
    from models.checkpoint_info import checkpoint_meta
    from models.model_pretrain import ALBEFPretrain
    from models.tokenizer import TextTokenizer

    world = ensure_toy_world(str(tmp_path / "w"), n_train=4, n_val=4, n_test=12)
    model = ALBEFPretrain(tiny_albef()).eval()
    tokenizer = TextTokenizer()
    with torch.no_grad():
        bias = model.text_encoder.cls.predictions.decoder.bias
        for word in ("blue", "square"):
            bias[int(tokenizer([word], max_length=4).input_ids[0, 1])] = 1e4
    config = {"max_tokens": 30}
    path = str(tmp_path / "pre.pth")
    torch.save({"model": model.state_dict(), "config": config,
                "meta": checkpoint_meta(model, config, "Pretrain.py")}, path)

    with open(Path(world) / "scenes.json", encoding="utf-8") as f:
        probes = probe.build_probes(json.load(f), "test")
    assert probes, "the tiny world has multi-object test images"
    rows = probe.run_probes(path, world, "test")
    for kind, row in rows.items():
        mine = [p for p in probes if p.kind == kind]
        guess = "square" if kind.startswith("shape") else "blue"
        right = sum(p.answer == guess for p in mine)
        other = sum(p.answer != guess and guess in p.present for p in mine)
        assert row["n"] == len(mine)
        assert row["accuracy"] == pytest.approx(100 * right / len(mine))
        assert row["other_object"] == pytest.approx(100 * other / len(mine))
        assert row["chance"] == pytest.approx(100 * sum(1 / len(p.present) for p in mine) / len(mine))
