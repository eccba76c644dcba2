"""scripts/toy_vit_init.py: the multi-hot object labels, and a saved file that ``vit_init`` loads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from conftest import ROOT, tiny_albef

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import toy_vit_init  # noqa: E402


def test_object_labels_mark_shapes_colours_and_pairs(tmp_path: Path) -> None:
    objects = [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"},
               {"shape": "circle", "color": "blue"}]
    scenes = [{"split": "train", "image": "images/a.png", "objects": objects},
              {"split": "val", "image": "images/b.png", "objects": objects[:1]}]
    (tmp_path / "scenes.json").write_text(json.dumps(scenes))
    paths, targets, names = toy_vit_init.object_labels(str(tmp_path), "train")
    assert paths == [str(tmp_path / "images/a.png")]
    assert len(names) == 6 + 7 + 42 and targets.shape == (1, 55)
    on = {names[k] for k in targets[0].nonzero().flatten().tolist()}
    assert on == {"circle", "square", "red", "blue", "red circle", "blue square", "blue circle"}


def test_saved_file_initialises_the_albef_vit(tmp_path: Path, one_thread: None) -> None:
    from models.albef import ALBEFBase
    from models.checkpoint import load_vit_init

    config = tmp_path / "tiny.yaml"
    config.write_text("image_res: 32\nvision_width: 32\nvit: {patch_size: 8, depth: 2, heads: 2}\n")
    out = tmp_path / "vit.pth"
    metrics = toy_vit_init.main(["--config", str(config), "--out", str(out), "--world", str(tmp_path / "w"),
                                 "--n_train", "6", "--n_val", "4", "--steps", "2", "--batch_size", "4",
                                 "--eval_every", "1"])
    assert metrics["step"] == 2 and 0 <= metrics["shape_acc"] <= 100
    model = ALBEFBase(tiny_albef())
    load_vit_init(model, str(out))
    saved = torch.load(out)["model"]
    assert torch.equal(model.visual_encoder.blocks[1].mlp.fc2.weight, saved["blocks.1.mlp.fc2.weight"])
    assert saved["head.weight"].shape == (55, 32)


def test_patch_labels_follow_the_object_pixels(tmp_path: Path) -> None:
    from PIL import Image

    from dataset.toy_scene import ALL_PAIRS, COLORS

    # 16 x 16 image, 8 px patches: a red block over the whole top-left patch, a blue one over 12 pixels (under a
    # quarter) of the top-right patch, a green one over 16 pixels (a quarter) of the bottom-right patch.
    pixels = Image.new("RGB", (16, 16), (240, 240, 240))
    pixels.paste(COLORS["red"], (0, 0, 8, 8))
    pixels.paste(COLORS["blue"], (12, 0, 16, 3))
    pixels.paste(COLORS["green"], (8, 8, 12, 12))
    (tmp_path / "images").mkdir()
    pixels.save(tmp_path / "images/a.png")
    objects = [{"shape": "star", "color": "red", "bbox": [0, 0, 8, 8]},
               {"shape": "circle", "color": "blue", "bbox": [12, 0, 4, 3]},
               {"shape": "cross", "color": "green", "bbox": [8, 8, 4, 4]}]
    (tmp_path / "scenes.json").write_text(json.dumps([{"split": "train", "image": "images/a.png",
                                                        "objects": objects}]))
    labels = toy_vit_init.patch_labels(str(tmp_path), "train", image_res=16, patch_size=8)
    red_star, green_cross = ALL_PAIRS.index(("red", "star")) + 1, ALL_PAIRS.index(("green", "cross")) + 1
    assert labels.tolist() == [[[red_star, 0], [0, green_cross]]]


def test_patch_weight_trains_the_patch_head(tmp_path: Path, one_thread: None) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text("image_res: 32\nvision_width: 32\nvit: {patch_size: 8, depth: 2, heads: 2}\n")
    metrics = toy_vit_init.main(["--config", str(config), "--out", str(tmp_path / "vit.pth"), "--world",
                                 str(tmp_path / "w"), "--n_train", "6", "--n_val", "4", "--steps", "2",
                                 "--batch_size", "4", "--eval_every", "1", "--patch_weight", "1"])
    assert 0 <= metrics["object_patch_acc"] <= 100
