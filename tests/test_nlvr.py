"""NLVR2: the paired fusion encoder, the 12 -> 18 checkpoint mapping, TA sampling and model, NLVR2 data."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_model import ROOT, read_manifest
from test_ve import (
    check_predictions,
    pretrain_checkpoint,
    read_predictions,
    read_result,
    spread_checkpoint,
    torchrun,
    toy_model_config,
)

from conftest import tiny_albef
from dataset.nlvr_dataset import NLVRDataset, nlvr_label
from dataset.transforms import build_transform
from dataset.validate import DataError
from engine.config import ConfigError
from engine.logs import round32
from models.albef import ALBEFConfig
from models.bert import BertConfig
from models.checkpoint import load_weights
from models.losses import distill_cross_entropy
from models.model_nlvr import ALBEFNLVR, fuse_pair
from models.model_pretrain import ALBEFPretrain
from models.model_pretrain_nlvr import ALBEFPretrainNLVR, sample_ta_pairs, ta_negative_weights


def text(bs: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 3000, (bs, 7))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    ids[0, 5:] = 0
    mask[0, 5:] = 0
    return ids, mask


def cross_kv(bert: torch.nn.Module, layer: int) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    attn = bert.encoder.layer[layer].crossattention.self
    return attn.key, attn.value


# ----------------------------------------------------------------------------- architecture
def test_released_nlvr_checkpoint_layout_loads_strictly_at_full_size() -> None:
    """Keys, order and shapes of the released NLVR2 checkpoints (built on the meta device: no memory)."""
    rows = read_manifest("albef_base_nlvr_keys.txt")
    config = ALBEFConfig(bert=BertConfig.from_json(os.path.join(ROOT, "configs", "config_bert.json")), image_res=384)
    with torch.device("meta"):
        model = ALBEFNLVR(config)
    assert list(model.state_dict()) == [r[0] for r in rows]
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state: dict[str, torch.Tensor] = {}
    for key, shape, dtype, tied in rows:
        state[key] = state[tied] if tied else torch.empty(shape, dtype=dtypes[dtype], device="meta")
    model.load_state_dict(state, strict=True)
    assert model.bert.config.num_hidden_layers == 18
    tied = [(key, tied) for key, _, _, tied in rows if tied]
    assert len(tied) == 48  # key/value weight/bias of 6 pairs, online and momentum
    for key, tied_to in tied:  # each `tied_to` row is one parameter object in the model
        assert model.get_parameter(key) is model.get_parameter(tied_to)
    state["cls_head.2.weight"] = torch.empty(3, 768, device="meta")
    with pytest.raises(RuntimeError, match="size mismatch for cls_head.2.weight"):
        model.load_state_dict(state, strict=True)


def test_pair_projections_are_one_parameter_and_train_from_both_blocks() -> None:
    model = ALBEFNLVR(tiny_albef())  # 4 layers, fusion 2 -> 6 layers: pairs (2, 3), (4, 5)
    bert = model.bert
    assert bert.config.num_hidden_layers == 6
    for first in (2, 4):
        assert cross_kv(bert, first)[0] is cross_kv(bert, first + 1)[0]
        assert cross_kv(bert, first)[1] is cross_kv(bert, first + 1)[1]
        assert bert.encoder.layer[first].crossattention.self.query is not bert.encoder.layer[first + 1] \
            .crossattention.self.query
        assert cross_kv(model.text_encoder_m, first)[0] is cross_kv(model.text_encoder_m, first + 1)[0]
        assert cross_kv(model.text_encoder_m, first)[0] is not cross_kv(bert, first)[0]
    names = {n for n, _ in model.named_parameters()}
    assert "text_encoder.encoder.layer.2.crossattention.self.key.weight" in names
    assert "text_encoder.encoder.layer.3.crossattention.self.key.weight" not in names  # one object, listed once
    assert "text_encoder.encoder.layer.3.crossattention.self.key.weight" in model.state_dict()
    ids, mask = text(2)
    model.eval()
    model.logits(torch.randn(4, 3, 32, 32), ids, mask).sum().backward()
    assert cross_kv(bert, 2)[0].weight.grad is not None and cross_kv(bert, 2)[0].weight.grad.abs().sum() > 0


def test_layer_l_reads_image_l_minus_fusion_mod_2() -> None:
    model = ALBEFNLVR(tiny_albef())
    model.eval()
    bert = model.bert
    seen: dict[int, torch.Tensor] = {}
    for n in range(2, 6):
        bert.encoder.layer[n].crossattention.register_forward_hook(
            lambda mod, args, out, n=n: seen.__setitem__(n, args[2]))  # (hidden, mask, kv, ...)
    ids, mask = text(3)
    image0, image1 = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    fuse_pair(bert, bert.encode_text(ids, mask), mask, image0, image1)
    assert [n for n in range(2, 6) if seen[n] is image0] == [2, 4]
    assert [n for n in range(2, 6) if seen[n] is image1] == [3, 5]
    # the fused [CLS] of the model is fuse_pair on the ViT tokens of the B first and the B second images
    images = torch.randn(6, 3, 32, 32)
    tokens = model.visual_encoder(images)
    expected = fuse_pair(bert, bert.encode_text(ids, mask), mask, tokens[:3], tokens[3:], cls_only=False)[:, 0]
    torch.testing.assert_close(model.fused_cls(images, ids, mask), expected, rtol=1e-5, atol=1e-6)
    swapped = model.fused_cls(torch.cat([images[3:], images[:3]]), ids, mask)
    assert not torch.allclose(swapped, expected, atol=1e-4)  # the order of the images matters


def test_forward_is_the_distillation_loss_against_the_updated_twins() -> None:
    model = ALBEFNLVR(tiny_albef(momentum=0.5))
    model.eval()  # no dropout: the hand computation sees the same function
    for p in model.cls_head.parameters():
        torch.nn.init.normal_(p)  # online differs from twins after one EMA step
    images, (ids, mask), targets = torch.randn(8, 3, 32, 32), text(4), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        head_m = [0.5 * pm + 0.5 * p for pm, p in zip(model.cls_head_m.parameters(), model.cls_head.parameters())]
    out = model(images, ids, mask, targets, alpha=0.4)
    for pm, expected in zip(model.cls_head_m.parameters(), head_m):
        torch.testing.assert_close(pm, expected)
    logits = model.logits(images, ids, mask)
    logits_m = model.logits(images, ids, mask, momentum=True)
    torch.testing.assert_close(out["loss"], distill_cross_entropy(logits, targets, logits_m, 0.4))
    assert out["loss"].requires_grad and out["acc"] == (logits.argmax(1) == targets).float().mean()
    plain = ALBEFNLVR(tiny_albef(distill=False))
    assert not any(k.endswith("_m") or "_m." in k for k in plain.state_dict())
    plain.eval()
    out = plain(images, ids, mask, targets, alpha=0.4)
    torch.testing.assert_close(out["loss"], F.cross_entropy(plain.logits(images, ids, mask), targets))


# ----------------------------------------------------------------------------- 12 -> 18 mapping
def test_pretrain_checkpoint_maps_each_fusion_layer_onto_both_blocks_of_its_pair() -> None:
    source = ALBEFPretrain(tiny_albef())
    src = source.state_dict()
    for model in (ALBEFNLVR(tiny_albef()), ALBEFPretrainNLVR(tiny_albef())):
        report = load_weights(model, src)
        assert not report.suspicious and not report.missing  # queues, MLM head, contrastive heads: dropped or expected
        assert report.fresh_heads and all(k.startswith(("cls_head.", "ta_head.")) for k in report.fresh_heads)
        for enc, src_enc in [("text_encoder", "text_encoder.bert")] + \
                ([("text_encoder_m", "text_encoder_m.bert")] if isinstance(model, ALBEFNLVR) else []):
            bert, src_bert = model.get_submodule(enc), source.get_submodule(src_enc)
            for target_layer, source_layer in {0: 0, 1: 1, 2: 2, 3: 2, 4: 3, 5: 3}.items():
                t_state = bert.encoder.layer[target_layer].state_dict()
                s_state = src_bert.encoder.layer[source_layer].state_dict()
                assert t_state.keys() == s_state.keys()
                for name in t_state:
                    assert torch.equal(t_state[name], s_state[name]), (enc, target_layer, name)
            for first in (2, 4):  # loading copied values: the projections are still one object per pair
                assert cross_kv(bert, first)[0] is cross_kv(bert, first + 1)[0]
                assert cross_kv(bert, first)[1] is cross_kv(bert, first + 1)[1]
        assert torch.equal(model.visual_encoder.pos_embed, source.visual_encoder.pos_embed)


def test_ta_checkpoint_without_twins_gives_loaded_teacher_by_default_and_random_with_the_official_option() -> None:
    ta = ALBEFPretrainNLVR(tiny_albef())
    assert not [k for k in ta.state_dict() if "_m." in k]
    model = ALBEFNLVR(tiny_albef())
    report = load_weights(model, ta.state_dict())
    assert report.momentum_initialised == ["visual_encoder_m", "text_encoder_m", "cls_head_m"]
    assert not report.suspicious and len(report.fresh_heads) == 4
    assert torch.equal(model.text_encoder_m.encoder.layer[3].output.dense.weight,
                       ta.text_encoder.encoder.layer[3].output.dense.weight)
    official = ALBEFNLVR(tiny_albef())
    initial = official.text_encoder_m.encoder.layer[3].output.dense.weight.clone()
    report = load_weights(official, ta.state_dict(), init_momentum=False)
    assert report.momentum_kept == ["visual_encoder_m", "text_encoder_m", "cls_head_m"]
    assert not report.momentum_initialised
    assert torch.equal(official.text_encoder_m.encoder.layer[3].output.dense.weight, initial)
    assert torch.equal(official.text_encoder.encoder.layer[3].output.dense.weight,
                       ta.text_encoder.encoder.layer[3].output.dense.weight)


# ----------------------------------------------------------------------------- text assignment
def test_ta_weights_use_the_fixed_temperature_and_never_the_own_image() -> None:
    feat = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    weights = ta_negative_weights(feat)
    row = [math.exp(c / 0.07) for c in (1.0, 0.6, 0.0)]
    assert weights[0, 0] == 0
    torch.testing.assert_close(weights[0, 1:], torch.tensor(row[1:]) / sum(row))


def test_ta_sampler_labels_are_a_third_each_and_the_match_side_is_the_own_image() -> None:
    bs = 3000
    gen = torch.Generator().manual_seed(0)
    weights = ta_negative_weights(F.normalize(torch.randn(bs, 8, generator=gen), dim=1))
    first, second, labels = sample_ta_pairs(weights, gen)
    own = torch.arange(bs)
    freq = torch.bincount(labels, minlength=3).float() / bs
    assert (freq - 1 / 3).abs().max() < 0.03, freq  # 3 sigma of a binomial(3000, 1/3) is 0.026
    assert torch.equal(first[labels == 0], own[labels == 0]) and (second[labels == 0] != own[labels == 0]).all()
    assert torch.equal(second[labels == 1], own[labels == 1]) and (first[labels == 1] != own[labels == 1]).all()
    two = labels == 2
    assert (first[two] != own[two]).all() and (second[two] != own[two]).all() and (first[two] != second[two]).all()
    # negatives follow the weights: with all mass on the next image (and a little on the one after)
    sharp = torch.zeros(5, 5)
    for b in range(5):
        sharp[b, (b + 1) % 5], sharp[b, (b + 2) % 5] = 1.0, 1e-9
    first, second, labels = sample_ta_pairs(sharp, torch.Generator().manual_seed(1))
    for b in range(5):
        if labels[b] == 0:
            assert second[b] == (b + 1) % 5
        elif labels[b] == 1:
            assert first[b] == (b + 1) % 5
    with pytest.raises(ValueError, match="at least 3"):
        sample_ta_pairs(ta_negative_weights(torch.eye(2)))


def test_ta_model_loss_is_the_cross_entropy_of_the_sampled_pairs() -> None:
    model = ALBEFPretrainNLVR(tiny_albef())
    model.eval()
    assert model.ta_head.out_features == 3 and not hasattr(model, "itm_head")
    image, (ids, mask) = torch.randn(4, 3, 32, 32), text(4)
    out = model(image, ids, mask, generator=torch.Generator().manual_seed(3))
    tokens = model.visual_encoder(image)
    feat = F.normalize(model.vision_proj(tokens[:, 0]), dim=-1)
    first, second, labels = sample_ta_pairs(ta_negative_weights(feat), torch.Generator().manual_seed(3))
    fused = fuse_pair(model.bert, model.bert.encode_text(ids, mask), mask, tokens[first], tokens[second])
    torch.testing.assert_close(out["loss_ta"], F.cross_entropy(model.ta_head(fused[:, 0]), labels))
    out["loss_ta"].backward()
    assert model.ta_head.weight.grad is not None and model.vision_proj.weight.grad is None


# ----------------------------------------------------------------------------- data
def write_world(tmp_path: Path, items: list) -> str:
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    path = tmp_path / "nlvr.json"
    path.write_text(json.dumps(items))
    return str(path)


def test_nlvr_labels_accept_true_false_strings_and_booleans_only() -> None:
    assert [nlvr_label(v, "x") for v in ("True", "False", True, False)] == [1, 0, 1, 0]
    for bad in ("true", "FALSE", "1", "", 1, 0, None, [True]):
        with pytest.raises(DataError, match="x, key 'label'"):
            nlvr_label(bad, "x")


def test_nlvr_dataset_items_and_errors(tmp_path: Path) -> None:
    good = {"images": ["a.png", "b.png"], "sentence": "The LEFT image, a red square!", "label": "True"}
    path = write_world(tmp_path, [good, {**good, "label": False}, {**good, "images": ["b.png", "a.png"]}])
    data = NLVRDataset([path], build_transform("test", 16), str(tmp_path))
    assert data.labels == [1, 0, 1] and len(data) == 3
    image0, image1, sentence, label = data[0]
    assert image0.shape == image1.shape == (3, 16, 16) and sentence == "the left image a red square" and label == 1
    no_sentence = {k: v for k, v in good.items() if k != "sentence"}
    for bad, match in [({**good, "label": "yes"}, r"item 1, key 'label'.*'yes'"),
                       ({**good, "label": 1}, r"item 1, key 'label'"),
                       ({**good, "images": ["a.png"]}, r"item 1, key 'images'"),
                       (no_sentence, r"item 1: missing required key 'sentence'")]:
        path = write_world(tmp_path, [good, bad])
        with pytest.raises(DataError, match=match):
            NLVRDataset(path, build_transform("test", 16), str(tmp_path))
    path = write_world(tmp_path, [good, {**good, "sentence": "..."}, {**good, "label": "yes"}])
    with pytest.raises(DataError, match=r"item 2, key 'label'"):  # the skipped empty sentence shifts nothing
        NLVRDataset(path, build_transform("test", 16), str(tmp_path))
    path = write_world(tmp_path, [{**good, "images": ["a.png", "missing.png"]}])
    assert NLVRDataset(path, build_transform("test", 16), str(tmp_path))[0] is None  # unreadable: skipped


# ----------------------------------------------------------------------------- Pretrain_nlvr.py, NLVR.py end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    """8 train images (8 statements, 8 captioned images), 9 val (9 statements), 12 test (12)."""
    from dataset.toy_world import ensure_toy_world

    return ensure_toy_world(str(tmp_path_factory.mktemp("toy_nlvr")), n_train=8, n_val=9, n_test=12)


def nlvr_argv(world: str, out: str, *flags: str) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs", "toy", "NLVR.yaml"), "--output_dir", out, "--device", "cpu",
            *flags, "--override", "toy_world=''", f"train_file=[{world}/nlvr_train.json]",
            f"val_file=[{world}/nlvr_val.json]", f"test_file=[{world}/nlvr_test.json]", f"image_root={world}",
            "schedular.epochs=1", "batch_size=4", "num_workers=0", "image_res=32"]


def test_ta_then_nlvr_fine_tuning_from_the_ta_checkpoint(world: str, tmp_path: Path) -> None:
    import NLVR
    import Pretrain_nlvr

    ta_out = str(tmp_path / "ta")
    record = Pretrain_nlvr.main([
        "--config", os.path.join(ROOT, "configs", "toy", "NLVR_pretrain.yaml"), "--output_dir", ta_out,
        "--device", "cpu", "--checkpoint", pretrain_checkpoint(str(tmp_path / "pre.pth")), "--override",
        "toy_world=''", f"train_file=[{world}/pretrain.json, {world}/pretrain_regions.json]", "schedular.epochs=1",
        "batch_size=4", "num_workers=0", "image_res=32"])
    assert record["epoch"] == 0 and 0 <= record["train_acc_ta"] <= 1 and record["train_loss_ta"] > 0
    ta_state = torch.load(os.path.join(ta_out, "checkpoint_00.pth"), weights_only=False)["model"]
    assert "ta_head.weight" in ta_state and "text_encoder.encoder.layer.5.output.dense.weight" in ta_state
    assert not [k for k in ta_state if "_m." in k]  # as the released TA checkpoint: no momentum weights

    out = str(tmp_path / "nlvr")
    results = NLVR.main(nlvr_argv(world, out, "--checkpoint", os.path.join(ta_out, "checkpoint_00.pth")))
    assert read_result(out, "nlvr") == json.loads(json.dumps(round32(results)))
    for split, n in (("val", 9), ("test", 12)):
        assert results[split]["n"] == n and results[split]["classes"] == ["False", "True"]
        assert torch.tensor(results[split]["confusion"]).sum() == n
    check_predictions(read_predictions(out, "nlvr"), results,
                      {split: f"{world}/nlvr_{split}.json" for split in ("val", "test")},
                      {"True": "True", "False": "False"})
    state = torch.load(os.path.join(out, "checkpoint_00.pth"), weights_only=False)["model"]
    key = "text_encoder.encoder.layer.3.crossattention.self.key.weight"
    assert torch.equal(state[key], state[key.replace("layer.3", "layer.2")])  # still shared after training


def test_nlvr_two_processes_evaluate_exactly_like_one(world: str, tmp_path: Path) -> None:
    """val 9 statements (4 + 5 per rank), test 12 (6 + 6): gathered in order, every statement once."""
    import NLVR

    model = ALBEFNLVR(ALBEFConfig.from_config(toy_model_config("NLVR.yaml", NLVR.DEFAULTS)))
    ckpt = spread_checkpoint(model, str(tmp_path / "spread.pth"))
    two = str(tmp_path / "two")
    result = torchrun("NLVR.py", nlvr_argv(world, two, "--evaluate", "--checkpoint", ckpt))
    assert result.returncode == 0, result.stderr[-3000:]
    one = NLVR.main(nlvr_argv(world, str(tmp_path / "one"), "--evaluate", "--checkpoint", ckpt))
    metrics = read_result(two, "nlvr")
    for split in ("val", "test"):
        assert metrics[split] == json.loads(json.dumps(round32(one[split]))), split
    assert read_predictions(two, "nlvr") == read_predictions(str(tmp_path / "one"), "nlvr")
    assert all(sum(row) for row in map(list, zip(*one["test"]["confusion"])))  # both classes predicted


def test_config_checks_name_the_task_keys(world: str, tmp_path: Path) -> None:
    import NLVR
    import Pretrain_nlvr

    with pytest.raises(ConfigError, match="teacher_init must be 'loaded' or 'random', not 'official'"):
        NLVR.main(nlvr_argv(world, str(tmp_path / "a"), "--evaluate") + ["teacher_init=official"])
    with pytest.raises(ConfigError, match="at least 3 images per process batch"):
        Pretrain_nlvr.main(["--config", os.path.join(ROOT, "configs", "toy", "NLVR_pretrain.yaml"), "--output_dir",
                            str(tmp_path / "b"), "--device", "cpu", "--override", "toy_world=''",
                            f"train_file=[{world}/pretrain.json]", "batch_size=2"])
