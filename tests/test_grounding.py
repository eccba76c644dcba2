"""Grad-CAM, proposal ranking, grounding ground truth and pictures (paper Sec. 6.4)."""

from __future__ import annotations

import copy
import json
import pickle
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from conftest import tiny_albef, tiny_bert
from dataset.grounding_dataset import (
    DataError,
    GroundingEvalDataset,
    GroundingTrainDataset,
    RefTruth,
    load_dets,
    load_ground_truth,
    load_plain_truth,
    load_refer_truth,
)
from dataset.grounding_eval import (
    box_scores,
    compute_iou,
    grounding_accuracy,
    pick_box,
    proposal_stats,
    upsample_map,
)
from dataset.task_files import validate_config_files
from dataset.toy_world import ensure_toy_world
from dataset.transforms import build_transform
from models.albef import ALBEFConfig
from models.gradcam import answer_gradcam, default_block, gradcam
from models.model_retrieval import ALBEFRetrieval
from models.model_vqa import ALBEFVQA
from models.tokenizer import TextTokenizer
from models.vqa_rank import tokenize_answers
from scripts import benchmark, visualize

ROOT = Path(__file__).resolve().parents[1]


def batch(config: ALBEFConfig, b: int = 2, t: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    image = torch.randn(b, 3, config.image_res, config.image_res)
    ids = torch.randint(1000, 2000, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    if b > 1:
        mask[-1, t - 2:] = 0  # the last text is padded
    return image, ids, mask


# ----------------------------------------------------------------------------- Grad-CAM
@pytest.mark.parametrize("config, grid, itm_block, itc_block", [
    (tiny_albef(), 4, 2, 1),  # 32 px / patch 8; 2 fusion layers of 4; 2 ViT blocks
    (tiny_albef(bert=tiny_bert(num_hidden_layers=6, num_attention_heads=4), image_res=48, vision_depth=3,
                vision_heads=4), 6, 4, 2),  # 48 px: 6x6 grid; the third fusion layer exists
])
def test_gradcam_map_shapes(config: ALBEFConfig, grid: int, itm_block: int, itc_block: int) -> None:
    model = ALBEFRetrieval(config).train()
    image, ids, mask = batch(config)
    assert default_block(model, "itm") == itm_block and default_block(model, "itc") == itc_block
    itm = gradcam(model, image, ids, mask, mode="itm")
    assert itm["map"].shape == (2, grid, grid) and itm["token_maps"].shape == (2, 6, grid, grid)
    assert itm["score"].shape == (2,)
    assert (itm["token_maps"] >= 0).all() and itm["token_maps"].sum() > 0
    assert (itm["token_maps"][1, 4:] == 0).all()  # padded tokens
    torch.testing.assert_close(itm["map"], itm["token_maps"].mean(1))
    itc = gradcam(model, image, ids, mask, mode="itc")
    assert itc["map"].shape == (2, grid, grid) and set(itc) == {"map", "score"}
    assert model.training  # the caller's mode is restored
    assert all(p.grad is None for p in model.parameters())  # parameter gradients untouched


def test_default_blocks_of_the_full_model_are_the_official_8() -> None:
    full = SimpleNamespace(config=ALBEFConfig())
    assert default_block(full, "itm") == 8 and default_block(full, "itc") == 8


def test_gradcam_leaves_the_fused_attention_path() -> None:
    config = tiny_albef()
    model = ALBEFRetrieval(config).eval()
    image, ids, mask = batch(config)
    with torch.no_grad():
        image_embeds, _ = model.encode_image(image)
        text_embeds, _ = model.encode_text(ids, mask)
        before = model.itm_logits(text_embeds, mask, image_embeds)
    out = gradcam(model, image, ids, mask, block_num=3)
    torch.testing.assert_close(out["score"], before[:, 1])  # explicit attention: the same logits
    gradcam(model, image, ids, mask, mode="itc", block_num=0)
    cross = model.bert.encoder.layer[3].crossattention.self
    assert not cross.save_attention and cross.attention_map is None
    assert all(blk.attn.fused_attn == model.visual_encoder.blocks[1].attn.fused_attn
               for blk in model.visual_encoder.blocks)
    with pytest.raises(ValueError, match="fusion layer"):
        gradcam(model, image, ids, mask, block_num=1)  # a text-only layer has no cross-attention
    with pytest.raises(IndexError):
        gradcam(model, image, ids, mask, mode="itc", block_num=2)


def test_gradcam_of_a_frozen_model_equals_the_trainable_one() -> None:
    config = tiny_albef()
    model = ALBEFRetrieval(config)
    image, ids, mask = batch(config)
    expected = {mode: gradcam(model, image, ids, mask, mode=mode)["map"] for mode in ("itm", "itc")}
    model.requires_grad_(False)
    for mode in ("itm", "itc"):
        torch.testing.assert_close(gradcam(model, image, ids, mask, mode=mode)["map"], expected[mode])


def test_answer_gradcam_of_a_vqa_model_explains_the_answer_likelihood() -> None:
    config = tiny_albef(distill=False)
    model = ALBEFVQA(config).train()
    image, ids, mask = batch(config)
    answer_ids = torch.tensor([[101, 1005, 102, 0], [101, 1006, 1007, 102]])  # [CLS] answer [SEP] [PAD]
    answer_mask = (answer_ids != 0).long()
    out = answer_gradcam(model, image, ids, mask, answer_ids, answer_mask)
    assert out["map"].shape == (2, 4, 4) and out["token_maps"].shape == (2, 6, 4, 4)
    assert (out["token_maps"] >= 0).all() and out["token_maps"].sum() > 0
    assert (out["token_maps"][1, 4:] == 0).all()  # padded question tokens
    torch.testing.assert_close(out["map"], out["token_maps"].mean(1))
    assert model.training and all(p.grad is None for p in model.parameters())
    # the score is the answer's log-likelihood: minus the training loss of each question with its one answer
    model.eval()
    for b in range(2):
        loss = model(image[b:b + 1], ids[b:b + 1], mask[b:b + 1], answer_ids[b:b + 1], answer_mask[b:b + 1],
                     torch.tensor([1]), torch.tensor([1.0]))["loss"]
        torch.testing.assert_close(out["score"][b], -loss.detach())
    with pytest.raises(ValueError, match="answer_gradcam"):
        gradcam(model, image, ids, mask)


class FixedTokens(nn.Module):
    """Stands in for the ViT: the same image tokens (1, 1+G*G, D) for every image."""

    def __init__(self, tokens: Tensor) -> None:
        super().__init__()
        self.tokens = nn.Parameter(tokens)

    def forward(self, image: Tensor) -> Tensor:
        return self.tokens.expand(image.size(0), -1, -1)


def forced_attention_model(patch: int, heads: int) -> ALBEFRetrieval:
    """Cross-attention of layer 2 attends (for every head and token) to grid patch ``patch`` only."""
    config = tiny_albef(bert=tiny_bert(num_attention_heads=heads))
    model = ALBEFRetrieval(config)
    width, grid = config.vision_width, 4
    tokens = torch.zeros(1, 1 + grid * grid, width)
    tokens[0, 1:, 1:] = 0.01 * torch.randn(grid * grid, width - 1)
    tokens[0, 1 + patch, 0] = 5.0  # only the chosen patch has a component along dimension 0
    model.visual_encoder = FixedTokens(tokens)
    cross = model.bert.encoder.layer[2].crossattention.self
    with torch.no_grad():
        cross.query.weight.zero_()
        cross.query.bias.fill_(1.0)  # the same query for every token
        cross.key.weight.zero_()
        cross.key.weight[:, 0] = 10.0  # key = 10 * token[0] in every dimension: only the patch scores
        cross.key.bias.zero_()
    return model


def negated_itm(model: ALBEFRetrieval) -> ALBEFRetrieval:
    """The same model with the ITM positive logit's weights negated: every gradient changes sign."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.itm_head.weight[1].neg_()
        other.itm_head.bias[1].neg_()
    return other


@pytest.mark.parametrize("heads, t", [(2, 6), (1, 1)])
def test_itm_heat_peaks_at_the_patch_the_cross_attention_attends(heads: int, t: int) -> None:
    patch, grid = 9, 4
    image, ids, mask = batch(tiny_albef(), b=1, t=t)
    model = forced_attention_model(patch, heads)
    peaks = []
    for m in (model, negated_itm(model)):
        heat = gradcam(m, image, ids, mask, block_num=2)["map"][0].flatten()
        others = heat[torch.arange(grid * grid) != patch]
        assert (others == 0).all()  # no attention there: softmax weights underflow to exactly 0
        peaks.append(heat[patch].item())
    assert max(peaks) > 0
    if heads == t == 1:  # one gradient at the patch: one sign keeps it, the clamp removes the other
        assert min(peaks) == 0.0


# ----------------------------------------------------------------------------- box ranking
@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
    ([0, 0, 10, 10], [5, 0, 10, 10], 50 / 150),  # 5 x 10 pixels shared
    ([0, 0, 10, 10], [2, 2, 4, 4], 16 / 100),  # contained
    ([0, 0, 10, 10], [10, 0, 10, 10], 0.0),  # adjacent
    ([0, 0, 10, 10], [9, 0, 10, 10], 0.0),  # one shared pixel column: zero, as the official computeIoU
    ([0, 0, 10, 20], [5, 10, 10, 20], 50 / 350),
])
def test_compute_iou_hand_values(a: list, b: list, expected: float) -> None:
    assert compute_iou(a, b) == pytest.approx(expected)
    assert compute_iou(b, a) == pytest.approx(expected)


def test_box_scores_sum_the_heat_inside_over_the_root_area() -> None:
    heat = torch.arange(16, dtype=torch.float).view(4, 4)  # heat[r, c] = 4r + c
    boxes = [[1, 1, 2, 2], [0.5, 0.9, 2.2, 1.5], [0, 0, 4, 4, 0.99]]
    # rows 1-2, cols 1-2: 5+6+9+10 = 30 over 2; rows int(0.9)=0 : int(2.4)=2, cols 0 : int(2.7)=2: 0+1+4+5 = 10
    expected = [30 / 2, 10 / 3.3**0.5, 120 / 4]
    assert box_scores(heat, boxes) == pytest.approx(expected)
    assert box_scores(heat, boxes[:1], alpha=1.0) == pytest.approx([30 / 4])
    assert pick_box(heat, boxes) == 2
    assert pick_box(torch.zeros(4, 4), boxes) == 0  # all equal: the first


def test_upsample_map_is_bicubic_to_the_image_size() -> None:
    heat = torch.zeros(2, 2)
    heat[0, 0] = 1.0
    up = upsample_map(heat, 6, 4)
    assert up.shape == (6, 4)
    assert up[0, 0] > up[5, 3] and up[:3, :2].sum() > up[3:, 2:].sum()
    torch.testing.assert_close(upsample_map(torch.full((3, 3), 2.0), 7, 5), torch.full((7, 5), 2.0))


def test_grounding_accuracy_per_split() -> None:
    truth = {1: RefTruth("val", (0, 0, 4, 4), 7, 8, 8), 2: RefTruth("testA", (4, 4, 4, 4), 7, 8, 8),
             3: RefTruth("testA", (4, 0, 4, 4), 7, 8, 8)}
    dets = {"7": [[0, 0, 4, 4, 0.9], [4, 4, 4, 4, 0.8], [4, 0, 4, 4, 0.5]]}
    top_left, bottom_right = torch.zeros(2, 2), torch.zeros(2, 2)
    top_left[0, 0] = bottom_right[1, 1] = 1.0
    maps = {1: top_left, 2: bottom_right, 3: bottom_right}  # ref 3 (top right) picks the wrong box
    assert grounding_accuracy(maps, truth, dets) == {"val_d": 1.0, "testA_d": 0.5}
    stats = proposal_stats([1, 2, 3], truth, dets)
    assert stats["testA"] == {"n": 2, "chance": pytest.approx(1 / 3), "min_proposals": 3, "one_hit": 1.0}
    with pytest.raises(KeyError, match="no proposals"):
        grounding_accuracy(maps, truth, {"8": dets["7"]})


# ----------------------------------------------------------------------------- ground truth on the toy world
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "world"
    return Path(ensure_toy_world(str(root), seed=5, n_train=4, n_val=6, n_test=8, image_size=64))


def write_refer_layout(world: Path, root: Path) -> Path:
    """The toy refs.json in the official refer layout: refs(unc).p (pickle) and instances.json."""
    refs = json.loads((world / "refs.json").read_text())
    folder = root / "refcoco+"
    folder.mkdir(parents=True)
    pickled, anns, images = [], [], {}
    for ref_id, ref in refs.items():
        ann_id = 1000 + int(ref_id)  # annotation ids differ from ref ids, as in RefCOCO+
        pickled.append({"ref_id": int(ref_id), "ann_id": ann_id, "image_id": ref["image_id"], "split": ref["split"],
                        "category_id": 1, "sentences": [{"sent_id": int(ref_id), "tokens": [], "raw": ""}]})
        anns.append({"id": ann_id, "image_id": ref["image_id"], "bbox": ref["bbox"], "category_id": 1})
        images[ref["image_id"]] = {"id": ref["image_id"], "height": ref["height"], "width": ref["width"],
                                   "file_name": ref["image"]}
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(pickled, f, protocol=2)
    instances = {"images": list(images.values()), "annotations": anns, "categories": [{"id": 1, "name": "shape"}]}
    (folder / "instances.json").write_text(json.dumps(instances))
    return root


def test_refer_layout_and_plain_json_give_the_same_accuracy(world: Path, tmp_path: Path) -> None:
    plain = load_ground_truth(str(world / "refs.json"))
    refer = load_ground_truth(str(write_refer_layout(world, tmp_path / "data")))
    assert refer == plain and len(plain) == len(json.loads((world / "refs.json").read_text()))
    assert {r.split for r in plain.values()} == {"val", "testA", "testB"}
    dets = load_dets(str(world / "dets.json"))
    stats = proposal_stats(list(plain), plain, dets)
    assert all(s["min_proposals"] >= 3 and s["chance"] <= 1 / 3 for s in stats.values())
    maps = {ref_id: torch.rand(8, 8) for ref_id in plain}
    accuracy = grounding_accuracy(maps, plain, dets)
    assert accuracy == grounding_accuracy(maps, refer, dets)
    assert set(accuracy) == {"val_d", "testA_d", "testB_d"}
    # a map that is hot exactly on the true box picks a proposal overlapping it (>= 0.5 on the toy proposals)
    oracle = {}
    for ref_id, ref in plain.items():
        heat = torch.zeros(ref.height, ref.width)
        x, y, w, h = map(int, ref.bbox)
        heat[y:y + h, x:x + w] = 1.0
        oracle[ref_id] = heat
    assert all(acc > 0.8 for acc in grounding_accuracy(oracle, plain, dets).values())


def test_refs_pickle_with_a_class_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "refcoco+"
    folder.mkdir()
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump([{"ref_id": 1, "path": Path("x")}], f)
    (folder / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="refuses to load"):
        load_refer_truth(str(tmp_path))


def test_plain_truth_errors_name_the_ref(tmp_path: Path) -> None:
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"3": {"split": "val", "bbox": [0, 0, 4], "image_id": 1, "height": 8, "width": 8}}))
    with pytest.raises(DataError, match=r"ref_id '3'.*bbox"):
        load_plain_truth(str(path))
    path.write_text(json.dumps({"3": {"split": "val", "bbox": [0, 0, 4, 4], "image_id": 1}}))
    with pytest.raises(DataError, match="missing key"):
        load_plain_truth(str(path))


def test_datasets(world: Path, tmp_path: Path) -> None:
    items = json.loads((world / "grounding_train.json").read_text())
    first = items[0]["image"]
    # the same file name under another folder: the same image id for ITC (official basename rule)
    extra = [{"image": first, "text": "The RED, circle!"}, {"image": "other/" + first.split("/")[-1], "text": "x"}]
    (world / "other").mkdir(exist_ok=True)
    (world / "other" / first.split("/")[-1]).write_bytes((world / first).read_bytes())
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(extra))
    train = GroundingTrainDataset([str(train_file)], build_transform("grounding_train", 32, randaug=False),
                                  str(world))
    (image, text, idx), (_, _, idx2) = train[0], train[1]
    assert image.shape == (3, 32, 32) and text == "the red circle" and idx == idx2 == 0
    test = GroundingEvalDataset([str(world / "grounding_test.json")], build_transform("test", 32), str(world))
    image, text, ref_id = test[3]
    assert ref_id == json.loads((world / "grounding_test.json").read_text())[3]["ref_id"] == test.ref_ids[3]


def grounding_config(world: Path, **changes: object) -> dict:
    config = {"train_file": [str(world / "grounding_train.json")], "test_file": [str(world / "grounding_test.json")],
              "image_root": str(world), "refcoco_data": str(world / "refs.json"), "det_file": str(world / "dets.json")}
    return {**config, **changes}


def test_validate_config_files_checks_grounding_files_truth_and_proposals(world: Path, tmp_path: Path) -> None:
    assert validate_config_files(grounding_config(world), "grounding", check_images=True) == []
    assert validate_config_files(grounding_config(world, refcoco_data=str(write_refer_layout(world, tmp_path))),
                                 "grounding") == []
    items = json.loads((world / "grounding_test.json").read_text())
    bad = tmp_path / "test.json"
    bad.write_text(json.dumps([*items[:3], {"image": items[0]["image"], "text": "x", "ref_id": 999},
                               {"image": items[0]["image"], "text": 3, "ref_id": 1}]))
    dets = json.loads((world / "dets.json").read_text())
    first_image = str(json.loads((world / "refs.json").read_text())[str(items[0]["ref_id"])]["image_id"])
    dets.pop(first_image)
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    problems = validate_config_files(grounding_config(world, test_file=[str(bad)], det_file=str(tmp_path / "dets.json"),
                                                      train_file=[str(world / "missing.json")]), "grounding")
    assert len(problems) == 4, problems
    assert problems[:2] == [f"{world / 'missing.json'}: annotation file not found",
                            f"{bad}, item 4, key 'text': expected str, got int ('3')"]
    assert problems[2] == "1 ref_id(s) of test_file have no ground truth, e.g. [999]"
    assert problems[3] == f"1 image(s) of test_file have no proposals in the detection file, e.g. ['{first_image}']"
    assert validate_config_files(grounding_config(world, refcoco_data=str(tmp_path / "none")), "grounding") == [
        f"{tmp_path / 'none'}: grounding ground truth not found (a JSON file or a refer data folder)"]


def test_grounding_config_hooks() -> None:
    import Grounding

    config = {**Grounding.DEFAULTS, "test_file": ["t.json"], "refcoco_data": "r", "det_file": "d.json"}
    assert Grounding.config_problems(config) == []
    assert Grounding.config_problems({**config, "gradcam_mode": "grad", "block_num": "8", "det_file": ""}) == [
        "gradcam_mode must be one of ('itm', 'itc'), not 'grad'",
        "block_num must be a layer index (an integer >= 0) or null, not '8'",
        "det_file is not set: grounding is evaluated on test_file with refcoco_data, det_file"]
    assert len(Grounding.training_problems({**config, "batch_size": 1})) == 2  # no train_file; no ITM negative


# ----------------------------------------------------------------------------- pictures
def test_overlay_colours_the_hot_cell_red_and_the_cold_corner_blue() -> None:
    picture = Image.new("RGB", (40, 40), (128, 128, 128))
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0] = 1.0
    out = np.asarray(visualize.overlay(picture, heat))
    assert out.shape == (40, 40, 3)
    assert tuple(out[0, 0]) == (128, 0, 0)  # the peak: jet(1), opaque
    r, g, b = out[2, 2].astype(int)
    assert r > g + 150 and r > b + 150  # red around it
    r, g, b = out[39, 39].astype(int)
    assert b > r + 20 and r > 100  # the cold corner: the grey picture under a light blue
    np.testing.assert_allclose(visualize.jet(np.array([0.0, 0.5, 1.0])),
                               [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]])


def test_visualize_writes_valid_pngs(world: Path, tmp_path: Path) -> None:
    bert = tiny_bert()
    (tmp_path / "bert.json").write_text(json.dumps({k: getattr(bert, k) for k in bert.__dataclass_fields__}))
    (tmp_path / "model.yaml").write_text(
        f"bert_config: {tmp_path / 'bert.json'}\nimage_res: 32\nvision_width: 32\n"
        "vit: {patch_size: 8, depth: 2, heads: 2}\nembed_dim: 16\nqueue_size: 12\n")
    model = ALBEFRetrieval(tiny_albef())
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    image = json.loads((world / "grounding_test.json").read_text())[0]["image"]
    out = tmp_path / "pictures"
    paths = visualize.main(["--config", str(tmp_path / "model.yaml"), "--checkpoint", str(tmp_path / "ckpt.pth"),
                            "--image", str(world / image), "--text", "The red circle!", "--output_dir", str(out),
                            "--display_size", "96"])
    names = [Path(p).name for p in paths]
    assert names == ["sentence.png", "word_01_the.png", "word_02_red.png", "word_03_circle.png", "grid.png"]
    for path in paths:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (96, 96) or path.endswith("grid.png")
    with Image.open(out / "grid.png") as grid:  # 5 tiles (image, sentence, 3 words) in rows of 4, titled
        assert grid.size == (4 + 4 * 100, 4 + 2 * (96 + visualize.TITLE_HEIGHT + 4))
    itc = visualize.main(["--config", str(tmp_path / "model.yaml"), "--checkpoint", str(tmp_path / "ckpt.pth"),
                          "--image", str(world / image), "--text", "a circle", "--output_dir", str(tmp_path / "itc"),
                          "--gradcam_mode", "itc"])
    assert [Path(p).name for p in itc] == ["sentence.png", "grid.png"]


def test_visualize_a_vqa_checkpoint_explains_its_answer(world: Path, tmp_path: Path) -> None:
    bert = tiny_bert()
    (tmp_path / "bert.json").write_text(json.dumps({k: getattr(bert, k) for k in bert.__dataclass_fields__}))
    (tmp_path / "vqa.yaml").write_text(
        f"bert_config: {tmp_path / 'bert.json'}\nimage_res: 32\nvision_width: 32\n"
        "vit: {patch_size: 8, depth: 2, heads: 2}\ndistill: false\n")
    torch.save({"model": ALBEFVQA(tiny_albef(distill=False)).state_dict()}, tmp_path / "vqa.pth")
    image = str(world / json.loads((world / "grounding_test.json").read_text())[0]["image"])
    common = ["--config", str(tmp_path / "vqa.yaml"), "--checkpoint", str(tmp_path / "vqa.pth"), "--image", image,
              "--text", "What color is the circle?"]
    paths = visualize.main([*common, "--answer", "red", "--output_dir", str(tmp_path / "a")])
    assert [Path(p).name for p in paths] == ["sentence.png", "word_01_what.png", "word_02_color.png",
                                             "word_03_is.png", "word_04_the.png", "word_05_circle.png", "grid.png"]
    for path in paths:
        with Image.open(path) as im:
            im.verify()
    (tmp_path / "answers.json").write_text(json.dumps(["red", "blue", "two"]))
    ranked = visualize.main([*common, "--answer_list", str(tmp_path / "answers.json"), "--output_dir",
                             str(tmp_path / "b")])
    assert len(ranked) == 7
    # the answer picked from the list is the one of highest likelihood, the score answer_gradcam differentiates
    model = visualize.load_model(str(tmp_path / "vqa.yaml"), str(tmp_path / "vqa.pth"), torch.device("cpu"))
    tokenizer = TextTokenizer()
    pixels = build_transform("test", 32)(Image.open(image).convert("RGB"))
    q = tokenizer(["what color is the circle"], max_length=30)
    scores = []
    for answer in ("red", "blue", "two"):
        a = tokenize_answers(tokenizer, [answer])
        scores.append(answer_gradcam(model, pixels[None], q.input_ids, q.attention_mask, a.input_ids,
                                     a.attention_mask)["score"].item())
    best = ("red", "blue", "two")[scores.index(max(scores))]
    assert visualize.pick_answer(model, tokenizer, pixels, "what color is the circle", ["red", "blue", "two"]) == best
    with pytest.raises(ValueError, match="needs --answer"):
        visualize.main([*common, "--output_dir", str(tmp_path / "c")])
    with pytest.raises(ValueError, match="no contrastive projections"):
        visualize.main([*common, "--answer", "red", "--gradcam_mode", "itc", "--output_dir", str(tmp_path / "d")])


# ----------------------------------------------------------------------------- Grounding.py
@pytest.fixture(scope="module")
def few_refs(world: Path) -> Path:
    """5 expressions per split (15: uneven rank shares of 7 + 8)."""
    refs = json.loads((world / "refs.json").read_text())
    items, per_split = [], {}
    for item in json.loads((world / "grounding_test.json").read_text()):
        split = refs[str(item["ref_id"])]["split"]
        if per_split.get(split, 0) < 5:
            per_split[split] = per_split.get(split, 0) + 1
            items.append(item)
    path = world / "grounding_test_15.json"
    path.write_text(json.dumps(items))
    return path


def grounding_argv(world: Path, out: Path, *flags: str, truth: str = "") -> list[str]:
    return ["--config", str(ROOT / "configs" / "toy" / "Grounding.yaml"), "--output_dir", str(out), "--device", "cpu",
            *flags, "--override", "toy_world=''", f"train_file=[{world}/grounding_train.json]",
            f"test_file=[{world}/grounding_test_15.json]", f"refcoco_data={truth or world / 'refs.json'}",
            f"det_file={world}/dets.json", f"image_root={world}", "schedular.epochs=1", "batch_size=4",
            "queue_size=16", "num_workers=0", "image_res=32"]


@pytest.fixture(scope="module")
def spread_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy grounding architecture at 32 px with spread weights: distinct maps per expression (a fresh init
    maps every expression alike and scores 0 on every split), so accuracies depend on which map is whose."""
    model = ALBEFRetrieval(tiny_albef(bert=tiny_bert(hidden_size=128, encoder_width=128, num_attention_heads=4,
                                                     intermediate_size=512), vision_width=128, vision_depth=4,
                                      vision_heads=4, embed_dim=64, queue_size=16))
    torch.manual_seed(0)
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    path = tmp_path_factory.mktemp("spread") / "spread.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def fine_tuned(world: Path, few_refs: Path, spread_checkpoint: Path,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One epoch of Grounding.py from the spread checkpoint (one process): its output folder and results (the
    evaluation of the epoch's weights, which the epoch checkpoint holds). Both end-to-end tests read it."""
    import Grounding

    out = tmp_path_factory.mktemp("grounding") / "run"
    return out, Grounding.main(grounding_argv(world, out, "--checkpoint", str(spread_checkpoint)))


ACCURACY_KEYS = ("val_d", "testA_d", "testB_d", "n_refs")


def test_main_fine_tunes_then_evaluates(world: Path, fine_tuned: tuple[Path, dict], tmp_path: Path) -> None:
    import Grounding

    run, results = fine_tuned
    assert results["best_epoch"] == 0 and results["gradcam_mode"] == "itm" and results["block_num"] == 2
    assert set(results) >= {"val_d", "testA_d", "testB_d"} and results["n_refs"] == 15
    assert len({results["val_d"], results["testA_d"], results["testB_d"]}) > 1 or 0 < results["val_d"] < 1
    log = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert log[0]["score"] == log[0]["val_d"] and "train_loss_ita" in log[0]
    refer = write_refer_layout(world, tmp_path / "refer")
    evaluated = Grounding.main(grounding_argv(world, tmp_path / "eval", "--evaluate", "--checkpoint",
                                              str(run / "checkpoint_best.pth"), truth=str(refer)))
    assert {k: evaluated[k] for k in ACCURACY_KEYS} == {k: results[k] for k in ACCURACY_KEYS}
    saved = json.loads((tmp_path / "eval" / "result" / "grounding_metrics.json").read_text())
    assert saved == pytest.approx(evaluated)
    test_items = json.loads((world / "grounding_test_15.json").read_text())
    for out in (run, tmp_path / "eval"):  # the best epoch's rows, then the evaluation's: one per expression
        rows = json.loads((out / "result" / "grounding_refs.json").read_text())
        assert [(r["ref_id"], r["text"]) for r in rows] == [(t["ref_id"], t["text"]) for t in test_items]
        assert all(r["correct"] == (r["iou"] >= 0.5) and len(r["box"]) == 4 for r in rows)
        for split in ("val", "testA", "testB"):
            verdicts = [r["correct"] for r in rows if r["split"] == split]
            assert sum(verdicts) / len(verdicts) == results[f"{split}_d"]
    args = Grounding.parse_args(grounding_argv(world, tmp_path, "--gradcam_mode", "itc", "--block_num", "3"))
    assert args.override[-2:] == ["gradcam_mode=itc", "block_num=3"]  # the official flags win over the config


def test_two_processes_evaluate_exactly_like_one(world: Path, fine_tuned: tuple[Path, dict], tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 Grounding.py --evaluate``: the accuracies of one process (the fine-tuning
    run's evaluation of the same weights); the maps are gathered in memory, so the output folder holds no per-rank
    files."""
    run, one = fine_tuned
    flags = ("--evaluate", "--checkpoint", str(run / "checkpoint_best.pth"))
    two = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "Grounding.py", *grounding_argv(world, two, *flags)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((two / "result" / "grounding_metrics.json").read_text())
    assert metrics["mode"] == "evaluate" and {k: metrics[k] for k in ACCURACY_KEYS} == {
        k: one[k] for k in ACCURACY_KEYS}
    assert len({one["val_d"], one["testA_d"], one["testB_d"]}) > 1 or 0 < one["val_d"] < 1
    assert sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file()) == [
        "config.yaml", "log.txt", "result/grounding_metrics.json", "result/grounding_refs.json", "train.log"]


# ----------------------------------------------------------------------------- benchmark section
def test_gradcam_benchmark_section_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = "--only gradcam --sizes tiny --batch-tiny 2 --steps 2 --warmup 0".split()
    assert benchmark.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]["gradcam"]
    # the toy grounding model: 64 px / patch 8; itm on the config's block 2, itc on ViT block round(2/3 * 4)
    assert [(r["size"], r["mode"], r["input"], r["grid"], r["block"], r["batch"]) for r in rows] == [
        ("tiny", "itm", "64px T12", "8x8", 2, 2), ("tiny", "itc", "64px T12", "8x8", 3, 2)]
    for row in rows:
        assert len(row["steps_s"]) == 2 and row["s_per_batch"] == pytest.approx(statistics.median(row["steps_s"]))
        assert row["maps_per_s"] == pytest.approx(2 / row["s_per_batch"])
        assert row["cpu_maps_per_s"] == pytest.approx(2 / row["cpu_s_per_batch"])
        assert min(row["rank_ms"], row["peak_mb"], row["cpu_s_per_batch"]) > 0
    header = benchmark.format_table("gradcam", rows).splitlines()[1].split()
    assert header[-3:] == ["rank_ms", "cpu_s_per_batch", "cpu_maps_per_s"] and "steps_s" not in header
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--gradcam-modes", "itm,gradient"])


def test_ref_outcomes_file_is_written_or_a_stale_one_removed(tmp_path: Path) -> None:
    import Grounding

    rows = [{"ref_id": 3, "text": "the red star", "split": "val", "box": [1, 2, 3, 4], "iou": 0.7, "correct": True}]
    Grounding.write_ref_outcomes(str(tmp_path), rows)
    assert json.loads((tmp_path / "result" / "grounding_refs.json").read_text()) == rows
    Grounding.write_ref_outcomes(str(tmp_path), None)  # a resumed run's best epoch, evaluated before the resume
    assert not (tmp_path / "result" / "grounding_refs.json").exists()
