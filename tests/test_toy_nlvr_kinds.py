"""Tests for the toy NLVR2 statement kinds (`dataset.toy_tasks`) and `scripts/toy_nlvr_kinds.py`."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from dataset.toy_render import sample_scene
from dataset.toy_tasks import NLVR_KINDS, _nlvr_statement, nlvr_statement_kind

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import toy_nlvr_kinds  # noqa: E402


@pytest.mark.parametrize(("sentence", "kind"), [
    ("the left image contains a red circle", "the left/right image contains a COLOUR SHAPE"),
    ("the right image contains an orange star", "the left/right image contains a COLOUR SHAPE"),
    ("both images contain exactly one shape", "both images contain exactly N shapes"),
    ("both images contain exactly three shapes", "both images contain exactly N shapes"),
    ("there are two crosses in total", "there are N SHAPEs in total"),
    ("both images contain a diamond", "both images contain a SHAPE"),
    ("the left image contains more shapes than the right image",
     "the left image contains more shapes than the right image"),
    ("only one image contains a yellow shape", "only one image contains a COLOUR shape"),
    ("no image contains a triangle", "no image contains a SHAPE"),
    ("the right image contains more shapes than the left image", "other"),  # not a toy template
    ("there are two cross in total", "other"),
    ("both images contain a red circle", "other"),
])
def test_statement_kind_by_hand(sentence: str, kind: str) -> None:
    assert nlvr_statement_kind(sentence) == kind


def test_every_template_of_the_toy_statements_has_its_kind() -> None:
    rng = random.Random(3)
    scenes = [sample_scene(rng, index, "val", index, 64) for index in range(60)]
    seen = [nlvr_statement_kind(_nlvr_statement(*rng.sample(scenes, 2), rng)[0]) for _ in range(600)]
    assert set(seen) == set(NLVR_KINDS)


def test_accuracy_by_kind_and_its_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def row(sentence: str, label: str, prediction: str) -> dict:
        return {"index": 0, "sentence": sentence, "label": label, "prediction": prediction}

    predictions = {
        "val": [row("no image contains a star", "True", "True"), row("no image contains a circle", "False", "True"),
                row("both images contain a star", "True", "False")],
        "test": [row("no image contains a cross", "False", "False"), row("a red star", "True", "True")],
    }
    assert toy_nlvr_kinds.accuracy_by_kind(predictions) == {
        "both images contain a SHAPE": {"val": (0.0, 1)},
        "no image contains a SHAPE": {"val": (50.0, 2), "test": (100.0, 1)},
        "other": {"test": (100.0, 1)},
        "all": {"val": (100 / 3, 3), "test": (100.0, 2)},
    }
    path = tmp_path / "nlvr_predictions.json"
    path.write_text(json.dumps(predictions))
    printed = toy_nlvr_kinds.main([str(path)])
    assert printed.splitlines() == [
        "| statements | val | test |", "|---|---|---|",
        "| both images contain a SHAPE | 0.0 (1) |  |",
        "| no image contains a SHAPE | 50.0 (2) | 100.0 (1) |",
        "| other |  | 100.0 (1) |",
        "| all | 33.3 (3) | 100.0 (2) |",
    ]
    assert capsys.readouterr().out.strip() == printed
    (tmp_path / "metrics.json").write_text(json.dumps({"val": {"acc": 50.0}}))
    for bad in ("missing.json", "metrics.json"):
        with pytest.raises(SystemExit):
            toy_nlvr_kinds.main([str(tmp_path / bad)])
        assert bad in capsys.readouterr().err
