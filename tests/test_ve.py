"""SNLI-VE: the distillation loss by hand, the classifier model, its checkpoint layout, SNLI-VE data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_model import ROOT, read_manifest

from conftest import tiny_albef
from dataset.transforms import build_transform
from dataset.validate import DataError
from dataset.ve_dataset import VE_CLASS_NAMES, VEDataset, ve_image_path, ve_label
from engine.logs import round32
from models.albef import ALBEFConfig
from models.bert import BertConfig
from models.checkpoint import load_weights
from models.losses import distill_cross_entropy
from models.model_pretrain import ALBEFPretrain
from models.model_ve import ALBEFVE


def test_distill_cross_entropy_by_hand() -> None:
    # row 0: softmax(0, ln 3) = (1/4, 3/4), target 1, teacher uniform; row 1: softmax(ln 2, 0, 0) = (1/2, 1/4, 1/4)
    logits = torch.tensor([[0.0, math.log(3.0), -1e4], [math.log(2.0), 0.0, 0.0]])  # row 0: class 2 ~ never
    targets = torch.tensor([1, 0])
    logits_m = torch.tensor([[0.0, 0.0, -1e4], [0.0, 0.0, 0.0]])  # teacher: (1/2, 1/2, 0), (1/3, 1/3, 1/3)
    ce = (-math.log(3 / 4) - math.log(1 / 2)) / 2
    soft = (-(0.5 * math.log(1 / 4) + 0.5 * math.log(3 / 4))
            - (math.log(1 / 2) + 2 * math.log(1 / 4)) / 3) / 2
    alpha = 0.4
    got = distill_cross_entropy(logits, targets, logits_m, alpha)
    assert got.item() == pytest.approx((1 - alpha) * ce + alpha * soft, rel=1e-6)
    assert distill_cross_entropy(logits, targets).item() == pytest.approx(ce, rel=1e-6)
    assert distill_cross_entropy(logits, targets, logits_m, 0.0).item() == pytest.approx(ce, rel=1e-6)


def test_ve_forward_is_the_distillation_loss_and_backward_reaches_the_encoders() -> None:
    model = ALBEFVE(tiny_albef(momentum=0.5))
    model.eval()  # no dropout
    for p in model.cls_head.parameters():
        torch.nn.init.normal_(p)
    ids = torch.randint(1000, 3000, (3, 6))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    image, targets = torch.randn(3, 3, 32, 32), torch.tensor([2, 0, 1])
    out = model(image, ids, mask, targets, alpha=0.4)
    logits, logits_m = model.logits(image, ids, mask), model.logits(image, ids, mask, momentum=True)
    assert logits.shape == (3, 3)
    torch.testing.assert_close(out["loss"], distill_cross_entropy(logits, targets, logits_m, 0.4))
    out["loss"].backward()
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.text_encoder.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.cls_head_m.parameters())
    # the fused [CLS] is that of the full 12-layer pass (official mode 'multi_modal')
    full = model.bert(ids, mask, model.visual_encoder(image))[:, 0]
    torch.testing.assert_close(model.fused_cls(image, ids, mask), full, rtol=1e-5, atol=1e-6)


def test_ve_layout_is_the_retrieval_body_plus_cls_head_and_loads_a_pretrain_checkpoint() -> None:
    rows = read_manifest("albef_base_retrieval_keys.txt")
    config = ALBEFConfig(bert=BertConfig.from_json(os.path.join(ROOT, "configs", "config_bert.json")), image_res=384)
    with torch.device("meta"):
        model = ALBEFVE(config)
    body = [k for k, *_ in rows if k.startswith(("visual_encoder.", "text_encoder."))]
    head = ["cls_head.0.weight", "cls_head.0.bias", "cls_head.2.weight", "cls_head.2.bias"]
    twins = [k.replace(".", "_m.", 1) for k in body + head]
    assert list(model.state_dict()) == body + head + twins
    assert model.cls_head[2].weight.shape == (3, 768)
    assert not [k for k in ALBEFVE(tiny_albef(distill=False)).state_dict() if "_m." in k]

    source = ALBEFPretrain(tiny_albef(image_res=32))
    target = ALBEFVE(tiny_albef(image_res=48))
    report = load_weights(target, source.state_dict())
    assert not report.suspicious and not report.missing
    assert report.fresh_heads == [f"cls_head.{n}" for n in ("0.weight", "0.bias", "2.weight", "2.bias")]
    assert report.momentum_initialised == ["cls_head_m"]  # the encoders' twins come from the checkpoint
    name = "encoder.layer.3.crossattention.self.value.weight"
    assert torch.equal(target.text_encoder_m.get_parameter(name), source.text_encoder_m.bert.get_parameter(name))
    assert target.visual_encoder_m.pos_embed.shape == (1, 37, 32)


# ----------------------------------------------------------------------------- data
def test_ve_labels_and_image_paths() -> None:
    assert [ve_label(v, "x") for v in ("entailment", "neutral", "contradiction")] == [2, 1, 0]
    assert VE_CLASS_NAMES == ("contradiction", "neutral", "entailment")
    for bad in ("Entailment", "entails", "", 2, None):
        with pytest.raises(DataError, match="x, key 'label'"):
            ve_label(bad, "x")
    assert ve_image_path("root", "2248275918") == os.path.join("root", "2248275918.jpg")
    assert ve_image_path("root", "12.png") == os.path.join("root", "12.png")
    assert ve_image_path("root", "flickr/12.jpg") == os.path.join("root", "flickr/12.jpg")


def test_ve_dataset_items_and_errors(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (0, 0, 200)).save(tmp_path / "17.jpg")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(tmp_path / "18.png")
    items = [{"image": "17", "sentence": "A Blue square.", "label": "entailment"},
             {"image": "18.png", "sentence": "a green one", "label": "contradiction"},
             {"image": "19", "sentence": "missing image", "label": "neutral"}]
    path = tmp_path / "ve.json"
    path.write_text(json.dumps(items))
    data = VEDataset(str(path), build_transform("test", 16), str(tmp_path))
    assert data.labels == [2, 0, 1]
    image, sentence, label = data[0]
    assert image.shape == (3, 16, 16) and sentence == "a blue square" and label == 2
    assert data[1][0][2].mean() < data[0][0][2].mean()  # the .png was read as is (green, not blue)
    assert data[2] is None and data.num_skipped == 1  # 19.jpg does not exist
    path.write_text(json.dumps([items[0], {**items[0], "label": "unknown"}]))
    with pytest.raises(DataError, match=r"ve.json, item 1, key 'label'.*'unknown'"):
        VEDataset([str(path)], build_transform("test", 16), str(tmp_path))
    path.write_text(json.dumps([{**items[0], "sentence": "?!"}]))
    with pytest.raises(DataError, match=r"item 0, key 'sentence': caption is empty"):
        VEDataset(str(path), build_transform("test", 16), str(tmp_path))
    # an item skipped for its empty sentence does not shift the index named for a later bad one
    path.write_text(json.dumps([items[0], {**items[0], "sentence": "?!"}, {**items[0], "label": "maybe"}]))
    with pytest.raises(DataError, match=r"ve.json, item 2, key 'label'.*'maybe'"):
        VEDataset(str(path), build_transform("test", 16), str(tmp_path))


def test_soft_targets_of_the_model_are_the_teacher_softmax() -> None:
    """alpha = 1: the loss is exactly the soft cross-entropy against the twins' distribution."""
    model = ALBEFVE(tiny_albef(momentum=1.0))  # momentum 1: the twins do not move
    model.eval()
    for p in model.cls_head_m.parameters():
        torch.nn.init.normal_(p)
    ids = torch.randint(1000, 3000, (2, 5))
    ids[:, 0] = 101
    mask, image, targets = torch.ones_like(ids), torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    loss = model(image, ids, mask, targets, alpha=1.0)["loss"]
    soft = F.softmax(model.logits(image, ids, mask, momentum=True), dim=1)
    expected = -(F.log_softmax(model.logits(image, ids, mask), dim=1) * soft).sum(1).mean()
    torch.testing.assert_close(loss, expected)


# ----------------------------------------------------------------------------- SNLI_VE.py end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    """8 train images (24 hypotheses, 8 NLVR2 statements), 9 val (27 / 9), 12 test (36 / 12)."""
    from dataset.toy_world import ensure_toy_world

    return ensure_toy_world(str(tmp_path_factory.mktemp("toy_cls")), n_train=8, n_val=9, n_test=12)


def toy_model_config(name: str, defaults: dict, *overrides: str) -> dict:
    from engine.config import load_config

    return load_config(os.path.join(ROOT, "configs", "toy", name), defaults, ["toy_world=''", "image_res=32",
                                                                               *overrides])


def pretrain_checkpoint(path: str) -> str:
    """A randomly initialised toy pre-training model at 32 px, saved as the pre-training script saves it."""
    import Pretrain

    model = ALBEFPretrain(ALBEFConfig.from_config(toy_model_config("Pretrain.yaml", Pretrain.DEFAULTS)))
    torch.save({"model": model.state_dict()}, path)
    return path


def spread_checkpoint(model: torch.nn.Module, path: str) -> str:
    """Weights drawn at std 0.3: distinct predictions, so a mis-ordered or duplicated gather shows."""
    from scripts.bench.retrieval_eval import spread_weights

    spread_weights(model, 0.3)
    torch.save({"model": model.state_dict()}, path)
    return path


def torchrun(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 SCRIPT ARGS`` (gloo on CPU)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def ve_argv(world: str, out: str, *flags: str) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs", "toy", "VE.yaml"), "--output_dir", out, "--device", "cpu",
            *flags, "--override", "toy_world=''", f"train_file={world}/ve_train.json",
            f"val_file={world}/ve_val.json", f"test_file={world}/ve_test.json", f"image_root={world}/ve_images",
            "schedular.epochs=1", "batch_size_train=8", "batch_size_test=4", "num_workers=0", "image_res=32"]


def read_result(out: str, name: str) -> dict:
    with open(os.path.join(out, "result", f"{name}_metrics.json")) as fh:
        return json.load(fh)


def read_predictions(out: str, name: str) -> dict:
    with open(os.path.join(out, "result", f"{name}_predictions.json")) as fh:
        return json.load(fh)


def check_predictions(predictions: dict, results: dict, files: dict[str, str], label_names: dict) -> None:
    """Each split's rows: every item once, in file order, its sentence and label from the file, and the
    accuracy and confusion matrix of ``results`` recomputed from them."""
    assert set(predictions) == {"val", "test"}
    for split, rows in predictions.items():
        with open(files[split]) as fh:
            items = json.load(fh)
        assert [row["index"] for row in rows] == list(range(len(items)))
        assert [row["sentence"] for row in rows] == [item["sentence"] for item in items]
        assert [row["label"] for row in rows] == [label_names[item["label"]] for item in items]
        right = sum(row["label"] == row["prediction"] for row in rows)
        assert results[split]["acc"] == pytest.approx(100 * right / len(rows), rel=1e-6)
        classes = results[split]["classes"]
        confusion = [[sum((r["label"], r["prediction"]) == (t, p) for r in rows) for p in classes] for t in classes]
        assert confusion == results[split]["confusion"]
        assert "predictions" not in results[split]  # in their own file, not in <task>_metrics.json


def test_ve_main_fine_tunes_from_pretraining_and_reports_per_class_accuracy(world: str, tmp_path: Path) -> None:
    import SNLI_VE

    out = str(tmp_path / "ve")
    results = SNLI_VE.main(ve_argv(world, out, "--checkpoint", pretrain_checkpoint(str(tmp_path / "pre.pth"))))
    assert read_result(out, "ve") == json.loads(json.dumps(round32(results)))
    assert results["best_epoch"] == 0 and results["evaluated"] == "checkpoint_best.pth"
    for split, n in (("val", 27), ("test", 36)):
        m = results[split]
        confusion = torch.tensor(m["confusion"])
        assert m["n"] == confusion.sum() == n and m["classes"] == ["contradiction", "neutral", "entailment"]
        assert confusion.sum(1).tolist() == [n // 3] * 3  # three hypotheses per image, one of each label
        assert m["acc"] == pytest.approx(100 * confusion.trace().item() / n, rel=1e-6)
        for c, name in enumerate(m["classes"]):
            assert m["per_class_acc"][name] == pytest.approx(100 * confusion[c, c].item() / (n // 3), rel=1e-6)
    with open(os.path.join(out, "log.txt")) as fh:
        lines = [json.loads(line) for line in fh]
    assert lines[0]["epoch"] == 0 and lines[0]["score"] == lines[0]["val_acc"] == round32(results["val"]["acc"])
    assert "val_acc_neutral" in lines[0] and len(lines) == 1  # one line per epoch; test results in ve_metrics.json
    check_predictions(read_predictions(out, "ve"), results,
                      {split: f"{world}/ve_{split}.json" for split in ("val", "test")},
                      {name: name for name in ("contradiction", "neutral", "entailment")})


def test_ve_two_processes_evaluate_exactly_like_one(world: str, tmp_path: Path) -> None:
    """Each rank classifies a contiguous share (val 13 + 14, test 18 + 18) gathered in order: every item once."""
    import SNLI_VE

    model = ALBEFVE(ALBEFConfig.from_config(toy_model_config("VE.yaml", SNLI_VE.DEFAULTS)))
    ckpt = spread_checkpoint(model, str(tmp_path / "spread.pth"))
    two = str(tmp_path / "two")
    result = torchrun("SNLI_VE.py", ve_argv(world, two, "--evaluate", "--checkpoint", ckpt))
    assert result.returncode == 0, result.stderr[-3000:]
    one = SNLI_VE.main(ve_argv(world, str(tmp_path / "one"), "--evaluate", "--checkpoint", ckpt))
    metrics = read_result(two, "ve")
    for split in ("val", "test"):
        assert metrics[split] == json.loads(json.dumps(round32(one[split]))), split
    assert read_predictions(two, "ve") == read_predictions(str(tmp_path / "one"), "ve")
    assert sum(1 for row in one["test"]["confusion"] for v in row if v) >= 3  # predictions differ between items
