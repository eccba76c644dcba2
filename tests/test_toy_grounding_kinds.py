"""Tests for the toy grounding expression kinds (`dataset.toy_grounding`) and `scripts/toy_grounding_kinds.py`."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from dataset.toy_grounding import EXPRESSION_KINDS, expression_kind, referring_expressions
from dataset.toy_render import sample_scene

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import toy_grounding_kinds  # noqa: E402


@pytest.mark.parametrize(("text", "kind"), [
    ("the red star", "colour shape"),
    ("the small red star", "size colour shape"),
    ("the star", "shape"),
    ("the blue shape", "colour"),
    ("the blue object", "colour"),
    ("the large cross", "size shape"),
    ("the shape at the bottom", "top / bottom"),
    ("the circle above the purple diamond", "relation"),
    ("the square below the black cross", "relation"),
    ("the big red star", "other"),  # "big" is a caption word, not the grammar's
    ("a red star", "other"),
])
def test_expression_kind_by_hand(text: str, kind: str) -> None:
    assert expression_kind(text) == kind


def test_every_expression_of_the_grammar_has_its_kind() -> None:
    rng, seen = random.Random(5), set()
    for index in range(300):
        scene = sample_scene(rng, index, "val", index, 64)
        for obj in scene.objects:
            for text in referring_expressions(scene, obj):
                seen.add(expression_kind(text))
    assert seen == set(EXPRESSION_KINDS)


def test_accuracy_by_kind_and_its_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [
        {"text": "the red star", "split": "val", "correct": True},
        {"text": "the star", "split": "val", "correct": False},
        {"text": "the shape at the top", "split": "val", "correct": False},
        {"text": "the circle above the red square", "split": "testB", "correct": True},
        {"text": "the red star", "split": "testB", "correct": True},
    ]
    table = toy_grounding_kinds.accuracy_by_kind(rows)
    assert table == {
        "colour shape": {"val": (100.0, 1), "testB": (100.0, 1)},
        "shape": {"val": (0.0, 1)},
        "top / bottom": {"val": (0.0, 1)},
        "relation": {"testB": (100.0, 1)},
        "all": {"val": (100 / 3, 3), "testB": (100.0, 2)},
        "without location words": {"val": (50.0, 2), "testB": (100.0, 1)},
    }
    path = tmp_path / "grounding_refs.json"
    path.write_text(json.dumps(rows[::-1]))  # testB first: the columns keep RefCOCO+'s order
    printed = toy_grounding_kinds.main([str(path)])
    assert printed.splitlines()[:3] == ["| expressions | val | testB |", "|---|---|---|",
                                        "| colour shape | 100.0 (1) | 100.0 (1) |"]
    assert printed.splitlines()[-2:] == ["| all | 33.3 (3) | 100.0 (2) |",
                                         "| without location words | 50.0 (2) | 100.0 (1) |"]
    assert capsys.readouterr().out.strip() == printed
    (tmp_path / "metrics.json").write_text(json.dumps({"val_d": 0.5}))
    for bad in ("missing.json", "metrics.json"):
        with pytest.raises(SystemExit):
            toy_grounding_kinds.main([str(tmp_path / bad)])
        assert bad in capsys.readouterr().err
