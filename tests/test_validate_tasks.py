"""The data validator knows SNLI-VE, NLVR2 (and its TA pre-training) and VQA: it runs the datasets' own item checks
(the same messages the datasets raise), lists every bad item of a file with its file and index up to the limit,
runs VQA's whole-split checks, and infers the task from the config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from dataset.nlvr_dataset import NLVRDataset
from dataset.task_files import task_file_report, validate_config_files
from dataset.validate import DataError
from dataset.ve_dataset import VEDataset
from dataset.vqa_dataset import VQATestDataset
from scripts.validate_data import main as validate_main

ROOT = Path(__file__).resolve().parents[1]
VE_GOOD = {"image": "101", "sentence": "Two dogs run.", "label": "entailment"}
NLVR_GOOD = {"images": ["a.png", "b.png"], "sentence": "The left image has two dogs.", "label": "True"}
VQA_TRAIN = {"image": "a.png", "question": "What colour?", "answer": ["red", "red", "blue"], "dataset": "vqa"}


def write(path: Path, items: object) -> str:
    path.write_text(json.dumps(items), encoding="utf-8")
    return str(path)


def dataset_error(build) -> str:
    with pytest.raises(DataError) as info:
        build()
    return str(info.value)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


# ----------------------------------------------------------------------------- SNLI-VE
def test_ve_bad_labels_are_listed_with_file_and_item_as_the_dataset_words_them(tmp_path: Path) -> None:
    bad = write(tmp_path / "ve_train.json", [VE_GOOD, {**VE_GOOD, "label": "yes"}, VE_GOOD,
                                             {**VE_GOOD, "label": 2}, {**VE_GOOD, "sentence": 5}])
    good = write(tmp_path / "ve_test.json", [VE_GOOD, VE_GOOD])
    config = {"train_file": bad, "val_file": "", "test_file": good, "image_root": str(tmp_path)}
    sizes, problems = task_file_report(config, "ve")
    assert problems == [
        f"{bad}, item 1, key 'label': expected one of ['contradiction', 'entailment', 'neutral'], got 'yes'",
        f"{bad}, item 3, key 'label': expected str, got int ('2')",  # the schema's type check first
        f"{bad}, item 4, key 'sentence': expected str, got int ('5')"]
    assert sizes == {"train": 2, "test": 2}  # val_file '' is no split (as SNLI_VE.py)
    # one implementation: the dataset stops at the first of them with the same words
    first = write(tmp_path / "first.json", [VE_GOOD, {**VE_GOOD, "label": "yes"}])
    assert dataset_error(lambda: VEDataset(first, None, "")) == problems[0].replace(bad, first)


def test_ve_check_images_reads_id_dot_jpg_under_image_root(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "101.jpg")
    ann = write(tmp_path / "ve.json", [VE_GOOD, {**VE_GOOD, "image": "102"}])
    config = {"train_file": ann, "image_root": str(tmp_path)}
    problems = validate_config_files(config, "ve", check_images=True)
    assert len(problems) == 1 and str(tmp_path / "102.jpg") in problems[0] and "101" not in problems[0]


def test_every_problem_of_a_file_up_to_the_limit(tmp_path: Path) -> None:
    bad = write(tmp_path / "many.json", [VE_GOOD] + [{**VE_GOOD, "label": "maybe"}] * 30)
    _, problems = task_file_report({"train_file": bad, "image_root": ""}, "ve", limit=5)
    assert [p.split(",")[1] for p in problems[:5]] == [f" item {i}" for i in range(1, 6)]
    assert problems[5:] == [f"{bad}: ... and 25 more problems (30 of 31 items)"]


# ----------------------------------------------------------------------------- NLVR2
def test_nlvr_bad_labels_and_image_lists_as_the_dataset_words_them(tmp_path: Path) -> None:
    bad = write(tmp_path / "nlvr_dev.json", [NLVR_GOOD, {**NLVR_GOOD, "label": "true"}, {**NLVR_GOOD, "label": False},
                                             {**NLVR_GOOD, "images": ["a.png"]}, {**NLVR_GOOD, "label": 1}])
    config = {"train_file": [], "val_file": [bad], "test_file": [], "image_root": str(tmp_path)}
    sizes, problems = task_file_report(config, "nlvr")
    assert problems == [
        f"{bad}, item 1, key 'label': expected \"True\", \"False\" or a JSON boolean, got 'true'",
        f"{bad}, item 3, key 'images': expected a list of two image paths, got ['a.png']",
        f"{bad}, item 4, key 'label': expected str or bool, got int ('1')"]
    assert sizes == {"val": 2}
    first = write(tmp_path / "first.json", [NLVR_GOOD, {**NLVR_GOOD, "label": "true"}])
    assert dataset_error(lambda: NLVRDataset([first], None, "")) == problems[0].replace(bad, first)


def test_nlvr_check_images_reads_both_images(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    ann = write(tmp_path / "nlvr.json", [NLVR_GOOD])
    problems = validate_config_files({"train_file": [ann], "image_root": str(tmp_path)}, "nlvr", check_images=True)
    assert len(problems) == 1 and str(tmp_path / "b.png") in problems[0]


# ----------------------------------------------------------------------------- VQA
def vqa_config(tmp_path: Path, test_items: list, **extra: object) -> dict:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    return {"train_file": [write(tmp_path / "vqa_train.json", [VQA_TRAIN])],
            "val_file": [], "test_file": [write(tmp_path / "vqa_test.json", test_items)],
            "answer_list": write(tmp_path / "answers.json", ["red", "blue"]), "vqa_root": str(tmp_path),
            "vg_root": str(tmp_path), "test_answers_file": "", **extra}


def test_vqa_test_item_without_question_id_and_other_bad_items(tmp_path: Path) -> None:
    question = {"image": "a.png", "question": "What colour?"}
    items = [{**question, "question_id": 7}, question, {**question, "question_id": 7},
             {**question, "question_id": 8, "dataset": "coco"}]
    config = vqa_config(tmp_path, items)
    config["train_file"].append(write(tmp_path / "vqa_bad_train.json", [{**VQA_TRAIN, "answer": "red"}]))
    test = config["test_file"][0]
    problems = validate_config_files(config, "vqa")
    assert problems == [
        f"{config['train_file'][1]}, item 0, key 'answer': a 'vqa' item needs a non-empty list of strings, got 'red'",
        f"{test}, item 1: missing required key 'question_id' (item keys: ['image', 'question'])",
        f"{test}, item 2: question_id 7 repeats {test}, item 0; result files need unique ids",
        f"{test}, item 3, key 'dataset': expected 'vqa' or 'vg', got 'coco'"]
    no_id = write(tmp_path / "no_id.json", items[:2])
    assert dataset_error(lambda: VQATestDataset([no_id], None, str(tmp_path), "")) == problems[1].replace(test, no_id)


def test_vqa_split_checks_answer_list_ground_truth_and_test_images(tmp_path: Path) -> None:
    items = [{"image": "a.png", "question": "What?", "question_id": 1},
             {"image": "gone.png", "question": "What?", "question_id": 2}]
    assert validate_config_files(vqa_config(tmp_path, items[:1]), "vqa") == []
    truth = write(tmp_path / "truth.json", [["red"]])  # a list, not {question_id: answers}
    config = vqa_config(tmp_path, items, answer_list=write(tmp_path / "bad_list.json", ["red", 3]))
    assert validate_config_files(config, "vqa") == [
        f"{config['answer_list']}, item 1: answer_list entries must be non-empty strings, got 3",
        f"test split: 1 test image(s) not found (every test question needs an answer), e.g. {tmp_path / 'gone.png'}"]
    problems = validate_config_files(vqa_config(tmp_path, items[:1], test_answers_file=truth), "vqa")
    assert problems == [f"test split ({truth}): answers: expected a JSON object {{question_id: answer(s)}}, got list"]


# ----------------------------------------------------------------------------- the command line
def test_cli_infers_each_task_and_reports_its_bad_items(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ve_bad = write(tmp_path / "ve.json", [VE_GOOD, VE_GOOD, {**VE_GOOD, "label": "yes"}])
    nlvr_bad = write(tmp_path / "nlvr.json", [NLVR_GOOD, NLVR_GOOD, {**NLVR_GOOD, "label": "yes"}])
    cases = {  # a config that names no task: the task comes from the keys the schemas accept
        "ve": (f"train_file: {ve_bad}\nbatch_size_train: 2\nteacher_init: loaded\n", ve_bad, 2),
        "nlvr": (f"train_file: [{nlvr_bad}]\nbatch_size: 2\nteacher_init: loaded\n", nlvr_bad, 2),
    }
    for task, (text, bad, item) in cases.items():
        caplog.clear()
        config = tmp_path / f"mine_{task}.yaml"
        config.write_text(text + "bert_config: configs/toy/config_bert.json\nvision_width: 128\n"
                          "vit: {patch_size: 8, depth: 2, heads: 4}\nimage_res: 32\nmax_tokens: 40\n")
        assert validate_main(["--config", str(config)]) == 1
        assert [e for e in errors(caplog) if bad in e][0].startswith(f"{bad}, item {item}, key 'label'")
        assert f"1 problem(s) found in the {task} config" in errors(caplog)[-1]
    caplog.clear()
    good = write(tmp_path / "ve_good.json", [VE_GOOD, VE_GOOD])
    assert validate_main(["--config", str(tmp_path / "mine_ve.yaml"), "--override", f"train_file={good}"]) == 0
    assert any("the ve config" in r.getMessage() and "valid" in r.getMessage() for r in caplog.records)


def test_cli_vqa_and_ta_from_the_toy_configs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = vqa_config(tmp_path, [{"image": "a.png", "question": "What?"}])
    overrides = [f"{k}={json.dumps(v)}" for k, v in config.items()] + ["toy_world=''", "batch_size_train=1"]
    assert validate_main(["--config", str(ROOT / "configs/toy/VQA.yaml"), "--override", *overrides]) == 1
    assert f"{config['test_file'][0]}, item 0: missing required key 'question_id'" in errors(caplog)[0]
    caplog.clear()
    captions = write(tmp_path / "captions.json", [{"image": "a.png", "caption": "a dog"}] * 3 + [{"image": "a.png"}])
    argv = ["--config", str(ROOT / "configs/toy/NLVR_pretrain.yaml"), "--override", f"train_file=[{captions}]",
            "toy_world=''", "batch_size=3"]
    assert validate_main(argv) == 1
    assert errors(caplog)[0].startswith(f"{captions}, item 3: missing required key 'caption'")
    assert "in the nlvr_pretrain config" in errors(caplog)[-1]
