"""VQA data, accuracy, answer-list script and VQA.py end to end (toy world, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dataset import DataError, collate_skip_none, load_answer_list, vqa_collate
from dataset.vqa_dataset import VQATestDataset, VQATrainDataset
from dataset.vqa_eval import accuracy_report, normalize_answer, question_types, vqa_accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.zeros(3, 4, 4)


def write(path: Path, data: object) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for folder in ("coco", "vg"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / folder / "a.png")
    (tmp_path / "coco" / "broken.png").write_bytes(b"not a png")
    return tmp_path


# ---------------------------------------------------------------------------------------------- accuracy
def test_vqa_accuracy_is_the_leave_one_out_average_of_the_standard_tool() -> None:
    # 3 x "2", 7 x "two": annotators disagree, so only punctuation is normalised on their side ("two" stays);
    # "two" predicted becomes "2": the 3 subsets without a "2" hold 2 matches (2/3), the 7 others 3 (1)
    gt = ["2"] * 3 + ["two"] * 7
    assert vqa_accuracy("two", gt) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("2", gt) == pytest.approx(0.9)
    two_of_ten = ["red", "red"] + ["blue"] * 8  # 2 subsets with 1 match (1/3), 8 with 2 (2/3)
    assert vqa_accuracy("Red", two_of_ten) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("no", ["yes"] * 10) == 0.0
    assert vqa_accuracy("Two", "2") == 1.0 and vqa_accuracy("3", "2") == 0.0  # one ground-truth string: exact


def test_answer_normalisation_of_the_standard_tool() -> None:
    assert normalize_answer("the dog") == "dog"
    assert normalize_answer("A red car!") == "red car"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("3,000") == "3000"  # digit,digit: punctuation deleted, not spaced
    assert normalize_answer("1.5") == "1.5" and normalize_answer("end.") == "end"
    assert normalize_answer(" ten\tpeople ") == "10 people"
    assert normalize_answer("black-and-white") == "black and white"


def test_accuracy_report_per_type_with_an_unanswered_question() -> None:
    truth = {1: "red", 2: "2", 3: "yes", 4: "circle"}
    types = {1: ["color", "relation"], 2: ["count"], 3: ["existence"], 4: ["shape", "relation"]}
    report = accuracy_report({1: "red", 2: "two", 3: "no"}, truth, types)
    assert report["acc"] == pytest.approx(50.0) and report["n"] == 4 and report["unanswered"] == 1
    assert report["per_type"]["relation"] == {"acc": pytest.approx(50.0), "n": 2}
    assert report["per_type"]["count"]["acc"] == 100.0 and report["per_type"]["shape"]["acc"] == 0.0
    rules = [("color", "^what colou?r"), ("relation", r"\b(above|below)\b")]
    assert question_types("what colour is the shape above the star", rules) == ["color", "relation"]


# ---------------------------------------------------------------------------------------------- datasets
def test_training_items_weights_roots_eos_and_counted_problems(images: Path, caplog) -> None:
    items = [
        {"image": "a.png", "question": "What color?", "answer": ["red", "red", "blue"], "dataset": "vqa"},
        {"image": "a.png", "question": "How many?", "answer": "2", "dataset": "vg"},
        {"image": "a.png", "question": "?!", "answer": ["x"], "dataset": "vqa"},  # empty after cleaning: skipped
        {"image": "broken.png", "question": "is it", "answer": ["yes"], "dataset": "vqa"},
    ]
    ds = VQATrainDataset(write(images / "t.json", items), to_tensor, str(images / "coco"), str(images / "vg"),
                         answer_list=["red", "yes", "no"])
    assert len(ds) == 3 and ds.num_empty_questions == 1
    image, question, answers, weights = ds[0]
    assert question == "what color" and answers == ["red[SEP]", "blue[SEP]"]
    assert weights == pytest.approx([2 / 3, 1 / 3])
    assert ds.items[1][0] == str(images / "vg" / "a.png") and ds[1][2:] == (["2[SEP]"], [0.5])
    # "blue" and "2" are not in the list: 2 of 4 distinct answers, weight (1/3 + 0.5) / (2/3 + 1/3 + 0.5 + 1)
    assert ds.out_of_list == {"answers": 2, "of": 4, "weight_share": pytest.approx((1 / 3 + 0.5) / 2.5)}
    assert "not in the answer list" in caplog.text
    batch = vqa_collate([ds[0], ds[2], ds[1]])  # ds[2]: unreadable image -> None, dropped and counted
    images_t, questions, answers, weights, counts, dropped = batch
    assert images_t.shape == (2, 3, 4, 4) and questions == ["what color", "how many"] and dropped == 1
    assert answers == ["red[SEP]", "blue[SEP]", "2[SEP]"] and counts.tolist() == [2, 1]
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 1 / 3, 0.5]))
    assert vqa_collate([None]) == (1,)


@pytest.mark.parametrize("item, message", [
    ({"image": "a.png", "question": "q", "answer": ["a"], "dataset": "coco"}, "expected 'vqa' or 'vg'"),
    ({"image": "a.png", "question": "q", "answer": "a", "dataset": "vqa"}, "needs a non-empty list"),
    ({"image": "a.png", "question": "q", "answer": ["a"], "dataset": "vg"}, "needs one string"),
    ({"image": "a.png", "question": "q", "answer": ["a"]}, "missing required key 'dataset'"),
])
def test_bad_training_items_are_clear_errors(images: Path, item: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        VQATrainDataset(write(images / "t.json", [item]), to_tensor, str(images / "coco"), str(images / "vg"))


def test_test_items_ground_truth_types_and_errors(images: Path) -> None:
    coco, vg = str(images / "coco"), str(images / "vg")
    items = [{"image": "a.png", "question": "What colour is it?", "question_id": 7},
             {"image": "a.png", "question": "", "question_id": 8, "dataset": "vg", "answer": ["1"] * 10,
              "answer_type": "number"}]
    ds = VQATestDataset(write(images / "test.json", items), to_tensor, coco, vg, answers={"7": "red"},
                        type_rules=[("color", "^what colou?r")])
    assert ds.question_ids == [7, 8] and ds.questions == ["what colour is it", ""]
    assert ds.truth == {7: "red", 8: ["1"] * 10} and ds.types == {7: ["color"], 8: ["number"]}
    assert ds[1][1:] == ("", 1) and ds.paths[1] == os.path.join(vg, "a.png")
    bad = [([{"image": "a.png", "question": "q"}], "missing required key 'question_id'"),
           ([{"image": "a.png", "question": "q", "question_id": "7"}], "expected int"),
           ([items[0], items[0]], "question_id 7 repeats"),
           ([{"image": "gone.png", "question": "q", "question_id": 1}], "1 test image"),
           ([{"image": "a.png", "question": "q", "question_id": 1, "answer": 3}], "ground truth must be")]
    for rows, message in bad:
        with pytest.raises(DataError, match=message):
            VQATestDataset(write(images / "bad.json", rows), to_tensor, coco, vg)
    ds = VQATestDataset(write(images / "b.json", [{"image": "broken.png", "question": "q", "question_id": 3}]),
                        to_tensor, coco, vg)
    assert collate_skip_none([ds[0]]) == (1,)  # unreadable (but present) test image: dropped, counted


@pytest.mark.parametrize("content, message", [
    ({"yes": 1}, "must be a non-empty JSON list"), ([], "must be a non-empty JSON list"),
    (["yes", 2], "item 1: answer_list entries must be non-empty strings"), (["yes", " "], "item 1"),
])
def test_answer_list_must_be_a_list_of_strings(tmp_path: Path, content: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_answer_list(write(tmp_path / "answers.json", content))
    assert load_answer_list(write(tmp_path / "ok.json", ["yes", "no"])) == ["yes", "no"]


def test_answer_list_script_keeps_the_most_frequent_answers(tmp_path: Path) -> None:
    from scripts.vqa_answer_list import main

    items = [{"image": "a", "question": "q", "answer": ["b", "b", "a"], "dataset": "vqa"},
             {"image": "a", "question": "q", "answer": ["c", "a"], "dataset": "vqa"},
             {"image": "a", "question": "q", "answer": "b", "dataset": "vg"},
             {"image": "a", "question": "q", "answer": ["d"], "dataset": "vqa"}]
    out = tmp_path / "list.json"
    assert main([write(tmp_path / "t.json", items), "--top", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == ["a", "b", "c"]  # a: 2, b: 2 (ties alphabetical), then c, d: 1
    assert main([str(tmp_path / "t.json"), "--min-count", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == ["a", "b"]
    assert main([write(tmp_path / "bad.json", [{"image": "a", "question": "q", "answer": 1, "dataset": "vqa"}]),
                 "--out", str(out)]) == 1


def test_type_baseline_answers_each_type_with_its_most_frequent_training_answer(tmp_path: Path) -> None:
    from scripts.vqa_type_baseline import type_baseline

    train = [{"image": "a", "question": "how many", "answer": ["2", "2", "1"], "dataset": "vqa"},
             {"image": "a", "question": "how many", "answer": ["2"], "dataset": "vqa"},
             {"image": "a", "question": "how many", "answer": "3", "dataset": "vg"},
             {"image": "a", "question": "what colour", "answer": ["red"], "dataset": "vqa"}]
    test = [{"image": "a", "question": "how many", "question_id": 1, "dataset": "vqa"},
            {"image": "a", "question": "how many", "question_id": 2, "dataset": "vqa"},
            {"image": "a", "question": "what colour", "question_id": 3, "dataset": "vqa"},
            {"image": "a", "question": "is there", "question_id": 4, "dataset": "vqa"}]  # no type: not counted
    config = {"train_file": [write(tmp_path / "train.json", train)], "test_file": [write(tmp_path / "t.json", test)],
              "test_answers_file": write(tmp_path / "truth.json", {"1": "2", "2": "1", "3": "red", "4": "no"}),
              "question_types": [["count", "^how many"], ["color", "^what colou?r"]]}
    assert type_baseline(config) == {"count": (2, "2", 50.0), "color": (1, "red", 100.0),
                                     "all": (3, "", 100 * 2 / 3)}


# ---------------------------------------------------------------------------------------------- VQA.py
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    """8 training images (24 questions), 9 + 12 test images (42 questions)."""
    from dataset.toy_world import ensure_toy_world

    return ensure_toy_world(str(tmp_path_factory.mktemp("toy_vqa")), n_train=8, n_val=9, n_test=12)


def vqa_argv(world: str, out: str, *flags: str) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs", "toy", "VQA.yaml"), "--output_dir", out, "--device", "cpu",
            *flags, "--override", "toy_world=''", f"train_file=[{world}/vqa_train.json]",
            f"test_file=[{world}/vqa_test.json]", f"test_answers_file={world}/vqa_test_answers.json",
            f"answer_list={world}/answer_list.json", f"vqa_root={world}", f"vg_root={world}", "schedular.epochs=1",
            "batch_size_train=8", "batch_size_test=5", "num_workers=0", "image_res=32", "top_n=3",
            "distill=true"]  # the toy config turns it off; these runs keep the momentum path covered


def spread_vqa_checkpoint(path: str) -> str:
    """A toy VQA model at std 0.3: different questions get different answers."""
    import VQA
    from engine.config import load_config
    from models.albef import ALBEFConfig
    from models.model_vqa import ALBEFVQA

    config = load_config(os.path.join(ROOT, "configs", "toy", "VQA.yaml"), VQA.DEFAULTS, ["toy_world=''",
                                                                                         "image_res=32"])
    model = ALBEFVQA(ALBEFConfig.from_config(config))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    torch.save({"model": model.state_dict()}, path)
    return path


def read_json(path: str) -> object:
    with open(path) as fh:
        return json.load(fh)


def test_vqa_main_fine_tunes_and_writes_one_answer_per_test_question(world: str, tmp_path: Path) -> None:
    import VQA

    out = str(tmp_path / "vqa")
    # the test questions double as a val split here: val_acc picks checkpoint_best.pth, which answers test
    results = VQA.main(vqa_argv(world, out, "--override", f"val_file=[{world}/vqa_test.json]",
                                f"val_answers_file={world}/vqa_test_answers.json"))
    assert results["best_epoch"] == 0 and results["evaluated"] == "checkpoint_best.pth"
    assert results["val"]["acc"] == results["test"]["acc"]
    test_ids = [item["question_id"] for item in read_json(f"{world}/vqa_test.json")]
    rows = read_json(os.path.join(out, "result", "vqa_result_epoch0.json"))
    answers = set(read_json(f"{world}/answer_list.json"))
    assert [r["question_id"] for r in rows] == test_ids and all(r["answer"] in answers for r in rows)
    truth = read_json(f"{world}/vqa_test_answers.json")
    expected = 100 * sum(r["answer"] == truth[str(r["question_id"])] for r in rows) / len(rows)
    test = results["test"]
    assert test["acc"] == pytest.approx(expected) and test["n"] == test["answered"] == len(test_ids) == 42
    assert set(test["per_type"]) <= {"count", "color", "shape", "existence", "size", "relation"}
    assert sum(v["n"] for k, v in test["per_type"].items() if k != "relation") == 42
    top = read_json(os.path.join(out, "result", "vqa_top3_epoch0.json"))
    assert [t["answers"][0][0] for t in top] == [r["answer"] for r in rows]
    assert all(len(t["answers"]) == 3 and t["answers"][0][1] >= t["answers"][1][1] for t in top)
    with open(os.path.join(out, "log.txt")) as fh:
        line = json.loads(fh.readline())
    assert line["epoch"] == 0 and line["score"] == line["val_acc"] and "val_acc_count" in line
    assert os.path.isfile(os.path.join(out, "result", "vqa_val_result_epoch0.json"))


def test_vqa_two_processes_write_the_same_result_file_as_one(world: str, tmp_path: Path) -> None:
    ckpt = spread_vqa_checkpoint(str(tmp_path / "vqa.pth"))
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "VQA.py", *vqa_argv(world, two, "--evaluate", "--checkpoint", ckpt)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import VQA

    VQA.main(vqa_argv(world, one, "--evaluate", "--checkpoint", ckpt))
    rows = read_json(os.path.join(two, "result", "vqa_result.json"))
    assert rows == read_json(os.path.join(one, "result", "vqa_result.json"))
    assert len({r["question_id"] for r in rows}) == len(rows) == 42
    assert len({r["answer"] for r in rows}) > 1  # the answers depend on the question
