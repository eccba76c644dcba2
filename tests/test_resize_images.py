"""scripts/resize_images.py: shrunk copies, unchanged small files, rewritten absolute paths, resumption."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from dataset.image_io import load_image
from scripts import resize_images

ORIENTATION = 0x0112  # EXIF tag; 6 = rotate 90 degrees clockwise to display


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth random colours, so JPEG round trips stay close."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 20, width // 20, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.BICUBIC)


@pytest.fixture()
def world(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    photo(400, 300).save(root / "big.jpg", quality=95)
    photo(100, 80, seed=1).save(root / "sub" / "small.png")
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    photo(300, 200, seed=2).save(root / "rot.jpg", quality=95, exif=exif)
    (root / "bad.jpg").write_bytes(b"not an image")
    anns = tmp_path / "ann"
    anns.mkdir()
    relative = [{"image": "big.jpg", "caption": "a"}, {"image": "sub/small.png", "caption": "b"},
                {"image": "bad.jpg", "caption": "c"}, {"images": ["big.jpg", "sub/small.png"], "label": "True"}]
    absolute = [{"image": str(root / "big.jpg"), "caption": ["x", "y"]},  # big.jpg named both ways: one copy
                {"image": str(root / "rot.jpg"), "caption": "z"}]
    (anns / "retrieval.json").write_text(json.dumps(relative))
    (anns / "pretrain.json").write_text(json.dumps(absolute))
    return tmp_path, root, anns


def run(tmp_path, root, anns, *extra: str) -> int:
    out = tmp_path / "out"
    argv = ["--ann", str(anns / "retrieval.json"), str(anns / "pretrain.json"), "--image-root", str(root),
            "--out-root", str(out), "--short-side", "128", "--workers", "0", *extra]
    return resize_images.main(argv)


def test_images_are_shrunk_copied_and_listed(world, caplog: pytest.LogCaptureFixture) -> None:
    tmp_path, root, anns = world
    with caplog.at_level(logging.INFO, logger="resize_images"):
        assert run(tmp_path, root, anns) == 1  # bad.jpg is unreadable
    out = tmp_path / "out"
    assert "2 shrunk, 1 copied unchanged, 0 already there, 1 unreadable" in caplog.text
    with Image.open(out / "big.jpg") as img:
        assert img.size == (171, 128) and img.format == "JPEG"  # 400 x 300 * 128/300, rounded
    assert (out / "sub" / "small.png").read_bytes() == (root / "sub" / "small.png").read_bytes()
    with Image.open(out / "rot.jpg") as img:  # rotated upright as the loader shows it, then shrunk
        assert img.size == (128, 192) and img.getexif().get(ORIENTATION) is None
    upright = np.asarray(load_image(str(root / "rot.jpg")).resize((128, 192), Image.BICUBIC), dtype=float)
    assert np.abs(np.asarray(load_image(str(out / "rot.jpg")), dtype=float) - upright).mean() < 3.0
    assert (out / "unreadable.txt").read_text().count("\n") == 1 and "bad.jpg" in (out / "unreadable.txt").read_text()
    assert not (out / "bad.jpg").exists()
    # relative paths stay valid as they are; the absolute ones are rewritten under out/
    assert sorted(os.listdir(out / "annotations")) == ["pretrain.json"]
    moved = json.loads((out / "annotations" / "pretrain.json").read_text())
    assert moved == [{"image": str((out / "big.jpg").resolve()), "caption": ["x", "y"]},
                     {"image": str((out / "rot.jpg").resolve()), "caption": "z"}]


def test_a_rerun_skips_what_is_written(world, caplog: pytest.LogCaptureFixture) -> None:
    tmp_path, root, anns = world
    run(tmp_path, root, anns)
    stamp = os.stat(tmp_path / "out" / "big.jpg").st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="resize_images"):
        assert run(tmp_path, root, anns) == 1
    assert "0 shrunk, 0 copied unchanged, 3 already there, 1 unreadable" in caplog.text
    assert os.stat(tmp_path / "out" / "big.jpg").st_mtime_ns == stamp
    assert not [n for n in os.listdir(tmp_path / "out") if ".tmp" in n]


def test_an_item_without_an_image_is_named(world, caplog: pytest.LogCaptureFixture) -> None:
    tmp_path, root, anns = world
    (anns / "retrieval.json").write_text(json.dumps([{"image": "big.jpg"}, {"caption": "no image"}]))
    with caplog.at_level(logging.ERROR, logger="resize_images"):
        assert run(tmp_path, root, anns) == 2
    assert "retrieval.json, item 1: no 'image' string or 'images' list of strings" in caplog.text


def test_load_image_min_side_decodes_jpegs_at_a_reduced_scale(tmp_path) -> None:
    photo(400, 300).save(tmp_path / "a.jpg")
    photo(400, 300).save(tmp_path / "a.png")
    assert load_image(str(tmp_path / "a.jpg"), min_side=100).size == (200, 150)  # 1/2; 1/4 would be 75 high
    assert load_image(str(tmp_path / "a.jpg"), min_side=160).size == (400, 300)
    assert load_image(str(tmp_path / "a.jpg"), min_side=30).size == (50, 38)  # 1/8, rounded up
    assert load_image(str(tmp_path / "a.png"), min_side=30).size == (400, 300)


def test_a_path_leaving_the_output_root_is_refused(world, caplog: pytest.LogCaptureFixture) -> None:
    tmp_path, root, anns = world
    (anns / "retrieval.json").write_text(json.dumps([{"image": "../outside.jpg", "caption": "a"}]))
    with caplog.at_level(logging.ERROR, logger="resize_images"):
        assert run(tmp_path, root, anns) == 2
    assert "'../outside.jpg' would be written outside --out-root" in caplog.text
