"""Bad-data behaviour: every malformed annotation gives a DataError that names
the file (and item and key); every unreadable image gives ``None`` plus a skip
count; odd but valid images load as RGB. No raw PIL/json/OS error escapes."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import (
    DataError,
    ImageLoadError,
    PretrainDataset,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    build_transform,
    collate_skip_none,
    load_annotations,
    load_image,
    pre_caption,
    validate_config_files,
)
from dataset.validate import PRETRAIN_SCHEMA
from scripts.validate_data import main as validate_main

TF = build_transform("test", 8)


def _good_image(tmp_path: Path, name: str = "good.png") -> str:
    path = tmp_path / name
    Image.new("RGB", (10, 10), (1, 2, 3)).save(path)
    return str(path)


def _raises_only_data_error(path: str, schema: dict = PRETRAIN_SCHEMA) -> str:
    """Load ``path`` and return the DataError message; any other type fails."""
    with pytest.raises(Exception) as info:  # exact type asserted below
        load_annotations(path, schema)
    assert info.type is DataError, f"{info.type.__name__} escaped: {info.value}"
    return str(info.value)


# --------------------------------------------------------------------------- annotation files


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(
        '[\n  {"image": "a.jpg",\n   "caption": "x" ,,\n]\n', encoding="utf-8"
    )
    msg = _raises_only_data_error(str(path))
    assert "broken.json" in msg
    assert "line 3" in msg
    assert "column" in msg


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ({"image": "a.jpg", "caption": "x"}, ["top level must be a JSON list", "dict"]),
        (
            [{"image": "a.jpg", "caption": "x"}, "oops"],
            ["item 1", "expected a JSON object"],
        ),
        (
            [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}],
            ["item 1", "missing required key 'caption'"],
        ),
        (
            [{"image": "a.jpg", "caption": 5}],
            ["item 0", "key 'caption'", "expected str or list, got int"],
        ),
        ([{"image": 7, "caption": "x"}], ["item 0", "key 'image'", "got int"]),
        (
            [{"image": "a.jpg", "caption": ""}],
            ["item 0", "key 'caption'", "empty after cleaning"],
        ),
        (
            [{"image": "a.jpg", "caption": "  \t "}],
            ["item 0", "key 'caption'", "empty after cleaning"],
        ),
        ([{"image": "a.jpg", "caption": "?!..."}], ["item 0", "empty after cleaning"]),
        ([{"image": "a.jpg", "caption": []}], ["item 0", "empty caption list"]),
        (
            [{"image": "a.jpg", "caption": ["ok", 3]}],
            ["item 0", "caption[1]", "expected str"],
        ),
        ([{"image": "  ", "caption": "x"}], ["item 0", "empty image path"]),
    ],
)
def test_bad_annotations_raise_data_error(
    tmp_path: Path, content: object, needles: list[str]
) -> None:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    msg = _raises_only_data_error(str(path))
    assert "ann.json" in msg
    for needle in needles:
        assert needle in msg


def test_missing_directory_and_non_utf8_annotation_files(tmp_path: Path) -> None:
    assert "not found" in _raises_only_data_error(str(tmp_path / "nope.json"))
    assert "not found" in _raises_only_data_error(str(tmp_path))
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'[{"image": "a.jpg", "caption": "caf\xe9"}]')
    assert "UTF-8" in _raises_only_data_error(str(bad))


def test_dataset_constructors_raise_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}]), encoding="utf-8")
    with pytest.raises(
        DataError, match=r"bad.json, item 0: missing required key 'image_id'"
    ):
        RetrievalTrainDataset([str(path)], TF, str(tmp_path))
    with pytest.raises(DataError, match=r"key 'caption': expected list, got str"):
        RetrievalEvalDataset(str(path), TF, str(tmp_path))


def test_long_and_non_ascii_captions_are_fine(tmp_path: Path) -> None:
    img = _good_image(tmp_path)
    long_caption = " ".join(f"word{i}" for i in range(500))
    items = [
        {"image": img, "caption": long_caption},
        {"image": img, "caption": "一只猫坐在垫子上, Café naïve!"},
    ]
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    ds = PretrainDataset([str(path)], TF)
    assert len(ds[0][1].split(" ")) == 30
    assert ds[1][1] == "一只猫坐在垫子上 café naïve"
    assert pre_caption(long_caption, 30) == " ".join(f"word{i}" for i in range(30))


# --------------------------------------------------------------------------- unreadable images


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(
        np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ).save(buf, "JPEG")
    return buf.getvalue()


BAD_FILES = {
    "missing.png": None,
    "truncated.png": _png_bytes()[:700],
    "truncated.jpg": _jpeg_bytes()[:900],
    "random.jpg": np.random.default_rng(2).bytes(2048),
    "empty.jpg": b"",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_image_is_skipped(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / name
    if BAD_FILES[name] is not None:
        path.write_bytes(BAD_FILES[name])
    with pytest.raises(Exception) as info:  # exact type asserted below
        load_image(str(path))
    assert info.type is ImageLoadError
    assert name in str(info.value)

    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            [
                {"image": str(path), "caption": "x"},
                {"image": _good_image(tmp_path), "caption": "y"},
            ]
        )
    )
    ds = PretrainDataset([str(ann)], TF)
    with caplog.at_level(logging.WARNING):
        assert ds[0] is None
        assert ds[0] is None
    assert ds.num_skipped == 2
    assert (
        sum(name in r.getMessage() for r in caplog.records) == 1
    )  # warned once per path
    batch = collate_skip_none([ds[0], ds[1]])
    assert batch is not None
    assert batch[-1] == 1
    assert batch[0].shape == (1, 3, 8, 8)


def test_retrieval_datasets_skip_unreadable(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    train = tmp_path / "t.json"
    train.write_text(json.dumps([{"image": "bad.jpg", "caption": "x", "image_id": 1}]))
    evaluation = tmp_path / "e.json"
    evaluation.write_text(json.dumps([{"image": "bad.jpg", "caption": ["x", "y"]}]))
    tr = RetrievalTrainDataset([str(train)], TF, str(tmp_path))
    ev = RetrievalEvalDataset(str(evaluation), TF, str(tmp_path))
    assert tr[0] is None
    assert ev[0] is None
    assert tr.num_skipped == 1
    assert ev.num_skipped == 1


def test_directory_and_decompression_bomb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(str(tmp_path))
    path = _good_image(tmp_path)
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 10
    )  # 100 px > 2 x limit -> bomb error
    with pytest.raises(ImageLoadError, match="DecompressionBomb"):
        load_image(path)


# --------------------------------------------------------------------------- odd but valid images


def _save(tmp_path: Path, img: Image.Image, name: str, **kwargs: object) -> str:
    path = tmp_path / name
    img.save(path, **kwargs)
    return str(path)


def test_grayscale_and_bilevel(tmp_path: Path) -> None:
    out = load_image(_save(tmp_path, Image.new("L", (5, 4), 77), "g.png"))
    assert out.mode == "RGB"
    assert out.size == (5, 4)
    assert out.getpixel((0, 0)) == (77, 77, 77)
    out = load_image(_save(tmp_path, Image.new("1", (5, 4), 1), "b.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_rgba_and_la_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    out = load_image(_save(tmp_path, img, "a.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (255, 0, 0)
    out = load_image(_save(tmp_path, Image.new("LA", (3, 3), (0, 0)), "la.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    out = load_image(_save(tmp_path, pal, "p.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 255, 0)
    out = load_image(_save(tmp_path, pal, "pt.png", transparency=1))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    out = load_image(_save(tmp_path, Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "c.jpg"))
    assert out.mode == "RGB"
    assert out.getpixel((4, 4)) == (255, 255, 255)


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 1000], [32896, 65535]], dtype=np.uint16)
    out = load_image(_save(tmp_path, Image.fromarray(arr), "d.png"))
    assert out.mode == "RGB"
    assert [out.getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [
        0,
        4,
        128,
        255,
    ]


def test_float_image_is_scaled(tmp_path: Path) -> None:
    arr = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    out = load_image(_save(tmp_path, Image.fromarray(arr, mode="F"), "f.tiff"))
    assert [out.getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1)]] == [0, 128, 255]


def test_exif_rotated_jpeg_is_transposed(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out = load_image(_save(tmp_path, img, "r.jpg", exif=exif))
    assert out.mode == "RGB"
    assert out.size == (20, 40)


# --------------------------------------------------------------------------- config validator + CLI


def _retrieval_config(tmp_path: Path, eval_caption: object) -> dict:
    _good_image(tmp_path, "im.png")
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"image": "im.png", "caption": "x", "image_id": 3},
                                 {"image": "im.png", "caption": "y", "image_id": 3}]))
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"image": "im.png", "caption": eval_caption}]))
    return {
        "train_file": [str(train)],
        "val_file": str(test),
        "test_file": str(test),
        "image_root": str(tmp_path),
    }


def test_validate_config_files(tmp_path: Path) -> None:
    config = _retrieval_config(tmp_path, ["a", "b"])
    assert validate_config_files(config, "retrieval", check_images=True) == []
    config["val_file"] = [config["val_file"]]
    config["image_root"] = str(tmp_path / "elsewhere")
    problems = validate_config_files(config, "retrieval", check_images=True)
    assert any("'val_file' must be one path" in p for p in problems)
    assert any("file not found" in p and "im.png" in p for p in problems)
    problems = validate_config_files(
        {"train_file": [str(tmp_path / "no.json")]}, "pretrain"
    )
    assert len(problems) == 1
    assert "no.json" in problems[0]


def test_validate_data_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    config = _retrieval_config(tmp_path, ["a", "b"])
    good.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()))
    assert (
        validate_main(["--config", str(good), "--task", "retrieval", "--check-images",
                       "--override", "batch_size_train=2"])
        == 0
    )
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = tmp_path / "bad.yaml"
    config = _retrieval_config(bad_dir, "")
    bad.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()))
    assert validate_main(["--config", str(bad), "--task", "retrieval"]) == 1
    assert (
        validate_main(
            ["--config", str(tmp_path / "missing.yaml"), "--task", "pretrain"]
        )
        == 1
    )


@pytest.mark.parametrize("case", ["malformed_val", "eval_caption_not_list", "missing_image_id"])
def test_retrieval_cli_bad_inputs_end_in_one_clear_message(tmp_path: Path, case: str) -> None:
    """Retrieval.py stops before training with exit code 2 and one ERROR line naming the file (no traceback)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    config = _retrieval_config(tmp_path, ["a", "b"])
    bad = tmp_path / "bad.json"
    if case == "malformed_val":
        bad.write_text('[{"image": "im.png", "caption": ["a"]},\n {"image": }]')
        config["val_file"], expect = str(bad), ["bad.json", "line 2"]
    elif case == "eval_caption_not_list":
        bad.write_text(json.dumps([{"image": "im.png", "caption": ["a"]}, {"image": "im.png", "caption": 7}]))
        config["test_file"], expect = str(bad), ["bad.json", "1", "caption"]
    else:
        bad.write_text(json.dumps([{"image": "im.png", "caption": "a"}]))
        config["train_file"], expect = [str(bad)], ["bad.json", "0", "image_id"]
    overrides = [f"{k}={json.dumps(v)}" for k, v in config.items()] + ["toy_world=''", "num_workers=0"]
    result = subprocess.run(
        [sys.executable, "Retrieval.py", "--config", "configs/toy/Retrieval.yaml",
         "--output_dir", str(tmp_path / "out"), "--override", *overrides],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and all(e in errors[0] for e in expect), result.stderr[-2000:]
