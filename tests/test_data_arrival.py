"""Data the way it arrives: byte-order marks, captions that cleaning empties, mixed image ids, repeated
evaluation images, an evaluation batch of unreadable images, and a first run on fewer items than a batch."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from engine import trainer


def write_json(path, items: object, bom: bool = False) -> str:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + json.dumps(items).encode("utf-8"))
    return str(path)


def test_a_byte_order_mark_is_read(tmp_path) -> None:
    from dataset.validate import PRETRAIN_SCHEMA, load_annotations

    path = write_json(tmp_path / "bom.json", [{"image": "a.png", "caption": "a red circle"}], bom=True)
    assert load_annotations(path, PRETRAIN_SCHEMA) == [{"image": "a.png", "caption": "a red circle"}]


def test_captions_empty_after_cleaning_are_skipped_counted_and_capped(tmp_path, caplog) -> None:
    from dataset import DataError
    from dataset.validate import PRETRAIN_SCHEMA, RETRIEVAL_EVAL_SCHEMA, load_annotations

    items = [{"image": "a.png", "caption": "a red circle"}, {"image": "b.png", "caption": "?!..."},
             {"image": "c.png", "caption": ["...", "two squares"]}, {"image": "d.png", "caption": [" ", "--"]}]
    path = write_json(tmp_path / "ann.json", items)
    with caplog.at_level(logging.WARNING):
        kept = load_annotations(path, PRETRAIN_SCHEMA)
    assert [it["image"] for it in kept] == ["a.png", "c.png"] and kept[1]["caption"] == ["two squares"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "4 caption(s) empty after cleaning skipped (item 1 '?!...', item 2 '...', item 3 ' ', item 3 '--')" \
        in warnings[0] and "2 item(s) left without a caption skipped" in warnings[0]
    with pytest.raises(DataError, match=r"ann.json, item 1, key 'caption'.*4 such captions.*more than the 3"):
        load_annotations(path, PRETRAIN_SCHEMA, max_empty=3)
    only_empty = write_json(tmp_path / "none.json", [{"image": "a.png", "caption": "!!"}])
    with pytest.raises(DataError, match="item 0, key 'caption': caption is empty after cleaning.*no item"):
        load_annotations(only_empty, PRETRAIN_SCHEMA)
    evaluation = write_json(tmp_path / "val.json", [{"image": "a.png", "caption": ["a circle", "?"]},
                                                    {"image": "b.png", "caption": ["a square"]}])
    assert load_annotations(evaluation, RETRIEVAL_EVAL_SCHEMA)[0]["caption"] == ["a circle"]


def test_mixed_image_id_types_and_repeated_evaluation_images_are_reported(tmp_path, caplog) -> None:
    from dataset.validate import RETRIEVAL_EVAL_SCHEMA, RETRIEVAL_TRAIN_SCHEMA, load_annotation_files, load_annotations

    train = [{"image": "a.png", "caption": "x", "image_id": 0}, {"image": "a.png", "caption": "y", "image_id": "0"},
             {"image": "b.png", "caption": "z", "image_id": 1}]
    path = write_json(tmp_path / "train.json", train)
    with caplog.at_level(logging.WARNING):
        load_annotation_files([path], RETRIEVAL_TRAIN_SCHEMA)
    assert "image_id values mix types (2 int, 1 str); 0 and '0' both occur and count as two images" in caplog.text
    caplog.clear()
    val = [{"image": "a.png", "caption": ["x"]}, {"image": "b.png", "caption": ["y"]},
           {"image": "a.png", "caption": ["z"]}]
    with caplog.at_level(logging.WARNING):
        load_annotations(write_json(tmp_path / "val.json", val), RETRIEVAL_EVAL_SCHEMA)
    assert "1 item(s) repeat an image listed before (item 2 repeats item 0, 'a.png')" in caplog.text


def test_retrieval_evaluation_survives_an_unreadable_first_batch(tmp_path) -> None:
    """Once a ValueError from ``encode_images`` after a whole epoch: the batch is skipped and counted."""
    from PIL import Image

    from conftest import tiny_albef
    from dataset import RetrievalEvalDataset, build_transform
    from models.model_retrieval import ALBEFRetrieval
    from models.retrieval_eval import evaluate_retrieval
    from models.tokenizer import TextTokenizer

    for name in ("c", "d"):
        Image.new("RGB", (32, 32), (200, 10, 10) if name == "c" else (10, 10, 200)).save(tmp_path / f"{name}.png")
    items = [{"image": f"{n}.png", "caption": [f"picture {n}", f"image {n}"]} for n in "abcd"]  # a, b missing
    dataset = RetrievalEvalDataset(write_json(tmp_path / "val.json", items), build_transform("test", 32),
                                   str(tmp_path))
    model = ALBEFRetrieval(tiny_albef())
    metrics = evaluate_retrieval(model, dataset, TextTokenizer(), torch.device("cpu"), k_test=2, batch_size=2,
                                 text_batch=4, rerank_batch=4, max_length=8, amp="off")
    assert (metrics["images"], metrics["texts"], metrics["unreadable_images"]) == (4, 8, 2)
    assert 0.0 <= metrics["r_mean"] <= 100.0


@pytest.mark.parametrize("script", ["Pretrain", "Retrieval"])
def test_a_first_run_on_fewer_items_than_a_batch_names_the_key(script: str, tmp_path, caplog) -> None:
    """A new user's own data, smaller than the toy batch of 32: one ERROR line saying which key to change."""
    import importlib

    from dataset.toy_world import ensure_toy_world

    world = ensure_toy_world(str(tmp_path / "toy"), n_train=5, n_val=2, n_test=2)  # 5 pairs, 25 captions
    files = {"Pretrain": [f"train_file=[{world}/pretrain.json]"],
             "Retrieval": [f"train_file=[{world}/retrieval_train.json]", f"val_file={world}/retrieval_val.json",
                           "test_file=", f"image_root={world}"]}
    argv = ["--config", f"configs/toy/{script}.yaml", "--output_dir", str(tmp_path / "out"), "--device", "cpu",
            "--override", "toy_world=", "num_workers=0", *files[script]]
    main = importlib.import_module(script).main
    with caplog.at_level(logging.ERROR):
        assert trainer.run_main(lambda: main(argv)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    key = "batch_size" if script == "Pretrain" else "batch_size_train"
    assert len(errors) == 1 and "lower" in errors[0] and key in errors[0], errors
