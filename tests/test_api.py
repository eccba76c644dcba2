"""The inference API (models/api.py, models/zero_shot.py), scripts/predict.py and the README example, on tiny
checkpoints made here; round trips: a checkpoint written by each task script loads through ``load_model`` and
gives the outputs of that script's own evaluation."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from conftest import ROOT, tiny_albef, tiny_bert
from dataset.caption import pre_caption
from dataset.toy_world import ensure_toy_world
from models import retrieval_eval as ev
from models.api import load_model
from models.checkpoint import CheckpointError
from models.checkpoint_info import checkpoint_meta
from models.gradcam import gradcam
from models.model_nlvr import ALBEFNLVR
from models.model_pretrain import ALBEFPretrain
from models.model_ve import ALBEFVE
from models.model_vqa import ALBEFVQA
from models.tokenizer import TextTokenizer
from models.vqa_rank import tokenize_answers, top_answers

# head width 64 (as every released model): a checkpoint without metadata is rebuilt from its shapes alone
HEAD64 = dict(bert=tiny_bert(hidden_size=64, num_attention_heads=1, encoder_width=64, intermediate_size=128),
              vision_width=64, vision_heads=1, embed_dim=16)
CONFIG = {"max_words": 30, "max_tokens": 30, "k_test": 3, "batch_size_test": 3, "text_batch": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_toy_world(str(tmp_path_factory.mktemp("toy_api")), n_train=8, n_val=6, n_test=8)


def spread(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Weights drawn wide: a random model whose outputs depend clearly on its inputs."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model.eval()


def save(model: torch.nn.Module, path: str, script: str, config: dict | None = None, meta: bool = True) -> str:
    config = dict(CONFIG if config is None else config)
    ckpt = {"model": model.state_dict(), "config": config}
    if meta:
        ckpt["meta"] = checkpoint_meta(model, config, script)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ALBEFPretrain, str]:
    model = spread(ALBEFPretrain(tiny_albef(**HEAD64)))
    return model, save(model, str(tmp_path_factory.mktemp("ckpt") / "pre.pth"), "Pretrain.py")


def test_images_as_paths_pil_images_and_tensors_give_the_same_features(world: str, pretrained: tuple) -> None:
    model, path = pretrained
    albef = load_model(path, device="cpu")
    assert albef.task == "pretrain" and albef.image_res == 32 and albef.batch_size == 3
    files = [os.path.join(world, "images", "test", f"{i:05d}.png") for i in range(4)]
    by_path = albef.extract_features(images=files)
    by_pil = albef.extract_features(images=[Image.open(f) for f in files])
    by_tensor = albef.extract_features(images=albef.preprocess(files))
    for key in ("image_embeds", "image_feat"):
        assert torch.equal(by_path[key], by_pil[key]) and torch.equal(by_path[key], by_tensor[key])
    with torch.no_grad():
        embeds, feat = model.encode_image(albef.preprocess(files))
    torch.testing.assert_close(by_path["image_feat"], feat, rtol=1e-5, atol=1e-6)
    both = albef.extract_features(images=files[:2], texts=["a red circle", "Two blue squares!"])
    assert both["text_embeds"].shape == (2, 30, 64) and both["multimodal_embeds"].shape == (2, 30, 64)
    with torch.no_grad():
        fused = model.bert.fuse(both["text_embeds"], both["text_atts"], embeds[:2])
    torch.testing.assert_close(both["multimodal_embeds"], fused, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"image tensors must be \(B, 3, 32, 32\)"):
        albef.preprocess(torch.zeros(3, 64, 64))


def test_match_scores_every_pair_as_the_model(world: str, pretrained: tuple) -> None:
    model, path = pretrained
    albef = load_model(path, device="cpu")
    files = [os.path.join(world, "images", "test", f"{i:05d}.png") for i in range(3)]
    texts = ["a red circle", "two blue squares", "a star", "a big green cross"]
    out = albef.match(files, texts)
    tok = TextTokenizer()
    batch = tok([pre_caption(t, 30) for t in texts], max_length=30, padding="max_length")
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(albef.preprocess(files))
        text_embeds, text_feat = model.encode_text(batch.input_ids, batch.attention_mask)
        for i in range(3):
            for j in range(4):
                logits = model.itm_logits(text_embeds[j:j + 1], batch.attention_mask[j:j + 1], image_embeds[i:i + 1])
                assert out["itm"][i, j].item() == pytest.approx(logits.softmax(-1)[0, 1].item(), abs=1e-5)
    torch.testing.assert_close(out["itc"], image_feat @ text_feat.t(), rtol=1e-5, atol=1e-6)
    assert out["itm"].std() > 1e-3  # the pairs differ


def test_retrieve_ranks_as_the_retrieval_evaluator_in_both_directions(world: str, pretrained: tuple) -> None:
    model, path = pretrained
    albef = load_model(path, device="cpu")
    files = [os.path.join(world, "images", "test", f"{i:05d}.png") for i in range(8)]
    texts = [c for item in json.load(open(os.path.join(world, "retrieval_test.json"))) for c in item["caption"]][:12]
    tok = TextTokenizer()
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(albef.preprocess(files))
    text_embeds, text_atts, text_feat = ev.encode_texts(model, [pre_caption(t, 30) for t in texts], tok,
                                                        torch.device("cpu"), 256, 30)
    feats = ev.RetrievalFeatures(image_embeds, image_feat, text_embeds, text_atts, text_feat)
    i2t, t2i = ev.rerank_batched(model, feats, k_test=3)
    t2i_api = albef.retrieve(texts, albef.index(images=files), k=3)
    i2t_api = albef.retrieve(files, albef.index(texts=texts), k=3)
    assert [[h["index"] for h in hits] for hits in t2i_api] == t2i.indices.tolist()
    assert [[h["index"] for h in hits] for hits in i2t_api] == i2t.indices.tolist()
    assert [h["score"] for h in t2i_api[0]] == pytest.approx(t2i.scores[0].tolist(), abs=1e-5)
    assert t2i_api[0][0]["item"] == files[t2i.indices[0, 0]] and i2t_api[1][0]["item"] == texts[i2t.indices[1, 0]]
    itc_only = albef.retrieve(texts[:2], albef.index(images=files), k=2, k_test=0)
    sims = (text_feat[:2] @ image_feat.t()).topk(2)
    assert [[h["index"] for h in hits] for hits in itc_only] == sims.indices.tolist()


def test_zero_shot_classification_and_its_folder_accuracy(world: str, pretrained: tuple, tmp_path) -> None:
    from scripts.toy_shape_folder import largest_shape, write_shape_folder

    assert largest_shape([{"shape": "star", "bbox": [0, 0, 9, 9]}, {"shape": "cross", "bbox": [0, 0, 8, 9]}]) == "star"
    assert largest_shape([{"shape": "star", "bbox": [0, 0, 9, 9]}, {"shape": "cross", "bbox": [5, 5, 9, 9]}]) is None
    counts = write_shape_folder(world, "test", str(tmp_path / "shapes"))
    assert sum(counts.values()) == 8
    _, path = pretrained
    albef = load_model(path, device="cpu")
    names = sorted(d for d in os.listdir(tmp_path / "shapes"))
    files = [(str(tmp_path / "shapes" / n / f), c) for c, n in enumerate(names)
             for f in sorted(os.listdir(tmp_path / "shapes" / n))]
    templates = ["a {}.", "a big {}."]
    out = albef.classify([f for f, _ in files], names, templates)
    texts = [t.format(n) for n in names for t in templates]
    feats = albef.encode_texts(texts)[2].view(len(names), 2, -1).mean(1)
    expected = albef.encode_images([f for f, _ in files])[1] @ torch.nn.functional.normalize(feats, dim=-1).t()
    torch.testing.assert_close(out["itc"], expected, rtol=1e-5, atol=1e-6)
    assert out["predictions"] == expected.argmax(1).tolist() and out["top"][0][0][0] == names[out["predictions"][0]]
    metrics = albef.evaluate_folder(str(tmp_path / "shapes"), templates)
    right = sum(p == c for p, (_, c) in zip(out["predictions"], files))
    assert metrics["acc"] == pytest.approx(100.0 * right / len(files)) and metrics["n"] == len(files)
    assert metrics["chance"] == pytest.approx(100.0 / len(names)) and metrics["classes"] == names
    reranked = albef.classify([f for f, _ in files], names, templates, rerank=2)
    top2 = expected.topk(2).indices
    for row, (itm, pred) in enumerate(zip(reranked["itm"], reranked["predictions"])):
        assert set(torch.nonzero(~itm.isnan()).flatten().tolist()) == set(top2[row].tolist())
        assert pred == int(itm.nan_to_num(-1).argmax())


def test_vqa_answers_as_the_model_ranks_them(world: str, tmp_path) -> None:
    model = spread(ALBEFVQA(tiny_albef(distill=False)), 0.1)
    answer_list = json.load(open(os.path.join(world, "answer_list.json")))
    path = save(model, str(tmp_path / "vqa.pth"), "VQA.py", {"answer_list": os.path.join(world, "answer_list.json"),
                                                               "k_test": 5, "batch_size_test": 2})
    albef = load_model(path, device="cpu")
    files = [os.path.join(world, "images", "test", f"{i:05d}.png") for i in range(3)]
    questions = ["what colour is the circle?", "how many shapes are there?", "is there a star?"]
    got = albef.answer(files, questions, top_n=3)
    tok = TextTokenizer()
    q = tok([q.lower().rstrip("?") for q in questions], max_length=64)
    a = tokenize_answers(tok, answer_list, "[SEP]", 64)
    ids, probs = model.rank(albef.preprocess(files), q.input_ids, q.attention_mask, a.input_ids, a.attention_mask, 5)
    expected = top_answers(ids, probs, answer_list, 3)
    assert [[x for x, _ in row] for row in got] == [[x for x, _ in row] for row in expected]
    assert [p for p in [p for _, p in got[0]]] == pytest.approx([p for _, p in expected[0]], abs=1e-6)
    with pytest.raises(ValueError, match="needs a pretrain / retrieval / grounding checkpoint; this one is vqa"):
        albef.match(files, questions)


def test_ve_and_nlvr_pairs_as_the_classifier(world: str, tmp_path) -> None:
    files = [os.path.join(world, "images", "test", f"{i:05d}.png") for i in range(4)]
    texts = ["there is a circle", "two squares", "a star is above", "no cross"]
    tok = TextTokenizer()
    batch = tok([pre_caption(t, 30) for t in texts], max_length=30)
    for cls, images in ((ALBEFVE, files), (ALBEFNLVR, list(zip(files, files[1:] + files[:1])))):
        model = spread(cls(tiny_albef(distill=False)), 0.2)
        albef = load_model(save(model, str(tmp_path / f"{cls.__name__}.pth"), None), device="cpu")
        out = albef.classify_pairs(images, texts)
        pixels = albef.preprocess(files) if cls is ALBEFVE else torch.cat(
            [albef.preprocess([a for a, _ in images]), albef.preprocess([b for _, b in images])])
        with torch.no_grad():
            probs = model.logits(pixels, batch.input_ids, batch.attention_mask).softmax(-1)
        for row, p in zip(out, probs):
            assert list(row["probs"].values()) == pytest.approx(p.tolist(), abs=1e-5)
            assert row["label"] == list(row["probs"])[int(p.argmax())]


def test_gradcam_is_the_grounding_module_s(world: str, pretrained: tuple) -> None:
    model, path = pretrained
    albef = load_model(path, device="cpu")
    image = os.path.join(world, "images", "test", "00002.png")
    out = albef.gradcam(image, "A red Circle.")
    tok = TextTokenizer()
    batch = tok(["a red circle"], max_length=64)
    expected = gradcam(model, albef.preprocess(image), batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(out["map"], expected["map"][0], rtol=1e-4, atol=1e-7)
    assert [w for w, _ in out["words"]] == ["a", "red", "circle"] and out["text"] == "a red circle"
    assert out["map"].shape == (4, 4) and out["score"] == pytest.approx(expected["score"][0].item(), abs=1e-5)
    assert albef.gradcam(image, "a red circle", mode="itc", per_word=False)["words"] == []


def test_a_file_without_metadata_is_rebuilt_from_its_shapes_and_gives_the_same_outputs(world: str, pretrained,
                                                                                         tmp_path) -> None:
    model, path = pretrained
    raw = str(tmp_path / "raw.pth")
    torch.save({"module." + k: v for k, v in model.state_dict().items() if "_m." not in k}, raw)  # refcoco.pth-like
    files = [os.path.join(world, "images", "test", f"{i:05d}.png") for i in range(2)]
    with_meta, without = load_model(path, device="cpu"), load_model(raw, device="cpu")
    assert without.task == "pretrain" and without.model.config == with_meta.model.config
    assert torch.equal(with_meta.match(files, ["a circle"])["itm"], without.match(files, ["a circle"])["itm"])
    as_retrieval = load_model(raw, task="retrieval", device="cpu")  # zero-shot retrieval from pre-training
    assert torch.equal(as_retrieval.match(files, ["a circle"])["itc"], without.match(files, ["a circle"])["itc"])
    ve = save(ALBEFVE(tiny_albef(**HEAD64, distill=False)), str(tmp_path / "ve.pth"), "SNLI_VE.py")
    with pytest.raises(CheckpointError, match=r"ve.pth does not match the model.*looks like a ve checkpoint"):
        load_model(ve, task="retrieval", device="cpu")
    with pytest.raises(ValueError, match="cannot tell its task"):
        torch.save({"visual_encoder.cls_token": torch.zeros(1, 1, 64)}, str(tmp_path / "odd.pth"))
        load_model(str(tmp_path / "odd.pth"), device="cpu")


# ----------------------------------------------------------------------------- command line and README
def test_predict_command_line_prints_tables_and_writes_json_and_pictures(world: str, pretrained: tuple, tmp_path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from scripts import predict

    _, path = pretrained
    folder = os.path.join(world, "images", "test")
    common = ["--checkpoint", path, "--device", "cpu", "--json", str(tmp_path / "out.json")]
    out = predict.main(["match", *common, "--images", f"{folder}/00000.png", f"{folder}/00001.png", "--texts",
                        "a red circle", "two blue squares"])
    assert len(out["itm"]) == 2 and len(out["itm"][0]) == 2
    assert json.load(open(tmp_path / "out.json"))["itc"] == out["itc"]
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["image", "text", "itm_prob", "itc_sim"] and len(text.splitlines()) == 6
    out = predict.main(["retrieve", *common, "--images", folder, "--texts", "a red circle", "--k", "2"])
    assert len(out["results"][0]["hits"]) == 2 and out["results"][0]["hits"][0]["item"].startswith(folder)
    out = predict.main(["classify", *common, "--images", folder, "--classes", "circle", "star", "--top_n", "1"])
    assert len(out["top"]) == 8 and out["classes"] == ["circle", "star"]
    out = predict.main(["gradcam", *common, "--image", f"{folder}/00000.png", "--text", "a red circle",
                        "--output_dir", str(tmp_path / "cam")])
    assert [os.path.basename(f) for f in out["files"]] == ["sentence.png", "word_01_a.png", "word_02_red.png",
                                                           "word_03_circle.png", "grid.png"]
    assert Image.open(out["files"][0]).size == (256, 256)


def readme_example() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Using a trained model (Python API)", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_runs_on_toy_checkpoints(world: str, pretrained: tuple, tmp_path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    _, path = pretrained
    vqa = save(spread(ALBEFVQA(tiny_albef(distill=False)), 0.1), str(tmp_path / "vqa.pth"), "VQA.py",
               {"answer_list": os.path.join(world, "answer_list.json"), "k_test": 5})
    for name, value in (("ALBEF_CHECKPOINT", path), ("ALBEF_VQA_CHECKPOINT", vqa),
                        ("ALBEF_IMAGES", os.path.join(world, "images", "test")), ("ALBEF_OUTPUT", str(tmp_path / "o"))):
        monkeypatch.setenv(name, value)
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    for expected in ("'image_feat': (3, 16)", "'multimodal_embeds': (3, 30, 64)", "ITM probabilities", "retrieved ",
                     "zero-shot [[(", "words: ['a', 'red', 'circle']", "answers [[("):
        assert expected in printed, expected
    assert Image.open(tmp_path / "o" / "gradcam.png").size == (64, 64)  # the picture's own size


# ----------------------------------------------------------------------------- round trips through the task scripts
def script_argv(world: str, config: str, out: str, *flags: str, overrides: tuple[str, ...] = ()) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs", "toy", config), "--output_dir", out, "--device", "cpu", *flags,
            "--override", "toy_world=''", "schedular.epochs=1", "num_workers=0", "image_res=32", *overrides]


@pytest.fixture(scope="module")
def spread_pretrain(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A toy-architecture pre-training checkpoint with wide weights (fine-tuned models then tell inputs apart)."""
    import Pretrain
    from engine.config import load_config
    from models.albef import ALBEFConfig

    config = load_config(os.path.join(ROOT, "configs", "toy", "Pretrain.yaml"), Pretrain.DEFAULTS,
                         ["toy_world=''", "image_res=32"])
    path = str(tmp_path_factory.mktemp("spread") / "pre.pth")
    torch.save({"model": spread(ALBEFPretrain(ALBEFConfig.from_config(config)), 0.2).state_dict()}, path)
    return path


def test_round_trip_retrieval(world: str, spread_pretrain: str, tmp_path) -> None:
    import Retrieval
    from dataset import RetrievalEvalDataset

    out = str(tmp_path / "run")
    results = Retrieval.main(script_argv(world, "Retrieval.yaml", out, "--checkpoint", spread_pretrain, overrides=(
        f"train_file=[{world}/retrieval_train.json]", f"val_file={world}/retrieval_val.json",
        f"test_file={world}/retrieval_test.json", f"image_root={world}", "batch_size_train=4", "queue_size=16",
        "k_test=4")))
    albef = load_model(os.path.join(out, "checkpoint_best.pth"), device="cpu")
    assert albef.task == "retrieval" and albef.meta["stage"] == "fine-tuning" and albef.meta["image_res"] == 32
    test = RetrievalEvalDataset(f"{world}/retrieval_test.json", None, world, 30)
    images = [os.path.join(world, item["image"]) for item in test.ann]
    texts = [c for item in test.ann for c in item["caption"]]
    t2i = albef.retrieve(texts, albef.index(images=images), k=4)
    i2t = albef.retrieve(images, albef.index(texts=texts), k=4)

    def ranking(hits: list) -> ev.Ranking:
        return ev.Ranking(torch.tensor([[h["index"] for h in row] for row in hits]),
                          torch.tensor([[h["score"] for h in row] for row in hits]))

    txt2img = torch.tensor([test.txt2img[t] for t in range(len(test.text))])
    metrics = ev.recall_metrics(ranking(i2t), ranking(t2i), txt2img)
    assert metrics == {k: results["test"][k] for k in metrics}
    assert 0 < metrics["r_mean"] < 100
    # --evaluate without image_res=32: the checkpoint's own resolution (its metadata), not the config's 64
    argv = script_argv(world, "Retrieval.yaml", str(tmp_path / "eval"), "--evaluate", "--checkpoint",
                       os.path.join(out, "checkpoint_best.pth"), overrides=(
                           f"val_file={world}/retrieval_val.json", f"test_file={world}/retrieval_test.json",
                           f"image_root={world}", "k_test=4"))
    evaluated = Retrieval.main([a for a in argv if a != "image_res=32"])
    assert evaluated["test"] == results["test"]


def test_round_trip_snli_ve_and_nlvr2(world: str, spread_pretrain: str, tmp_path) -> None:
    import NLVR
    import SNLI_VE
    from dataset.nlvr_dataset import nlvr_label
    from dataset.ve_dataset import ve_image_path, ve_label

    out = str(tmp_path / "ve")
    ve = SNLI_VE.main(script_argv(world, "VE.yaml", out, "--checkpoint", spread_pretrain, overrides=(
        f"train_file={world}/ve_train.json", f"val_file={world}/ve_val.json", f"test_file={world}/ve_test.json",
        f"image_root={world}/ve_images", "batch_size_train=8", "batch_size_test=4")))
    albef = load_model(os.path.join(out, "checkpoint_best.pth"), device="cpu")
    items = json.load(open(f"{world}/ve_test.json"))
    found = albef.classify_pairs([ve_image_path(f"{world}/ve_images", i["image"]) for i in items],
                                 [i["sentence"] for i in items])
    assert confusion(found, [ve_label(i["label"], "") for i in items], ve["test"]["classes"]) == ve["test"]["confusion"]

    out = str(tmp_path / "nlvr")
    nlvr = NLVR.main(script_argv(world, "NLVR.yaml", out, "--checkpoint", spread_pretrain, overrides=(
        f"train_file=[{world}/nlvr_train.json]", f"val_file=[{world}/nlvr_val.json]",
        f"test_file=[{world}/nlvr_test.json]", f"image_root={world}", "batch_size=4")))
    albef = load_model(os.path.join(out, "checkpoint_best.pth"), device="cpu")
    assert albef.task == "nlvr" and albef.model.bert.config.num_hidden_layers == 6
    items = json.load(open(f"{world}/nlvr_test.json"))
    found = albef.classify_pairs([tuple(os.path.join(world, p) for p in i["images"]) for i in items],
                                 [i["sentence"] for i in items])
    matrix = confusion(found, [nlvr_label(i["label"], "") for i in items], nlvr["test"]["classes"])
    assert matrix == nlvr["test"]["confusion"]
    assert len({round(f["probs"]["True"], 6) for f in found}) > 1  # the outputs depend on the inputs
    assert 100.0 * (matrix[0][0] + matrix[1][1]) / len(items) == pytest.approx(nlvr["test"]["acc"])


def confusion(found: list[dict], labels: list[int], classes: list[str]) -> list[list[int]]:
    """``confusion[true][predicted]`` counts of the API's predictions, classes in the evaluator's order."""
    predicted = [classes.index(f["label"]) for f in found]
    return [[sum(t == a and p == b for p, t in zip(predicted, labels)) for b in range(len(classes))]
            for a in range(len(classes))]



def test_round_trip_grounding(world: str, spread_pretrain: str, tmp_path) -> None:
    import Grounding
    from dataset.grounding_dataset import load_dets, load_ground_truth
    from dataset.grounding_eval import grounding_accuracy

    out = str(tmp_path / "run")
    results = Grounding.main(script_argv(world, "Grounding.yaml", out, "--checkpoint", spread_pretrain, overrides=(
        f"train_file=[{world}/grounding_train.json]", f"test_file=[{world}/grounding_test.json]",
        f"refcoco_data={world}/refs.json", f"det_file={world}/dets.json", f"image_root={world}", "batch_size=4",
        "queue_size=16")))
    albef = load_model(os.path.join(out, "checkpoint_best.pth"), device="cpu")
    assert albef.task == "grounding"
    items = json.load(open(f"{world}/grounding_test.json"))
    maps = {i["ref_id"]: albef.gradcam(os.path.join(world, i["image"]), i["text"], per_word=False)["map"]
            for i in items}
    accuracy = grounding_accuracy(maps, load_ground_truth(f"{world}/refs.json"), load_dets(f"{world}/dets.json"))
    assert accuracy == {k: results[k] for k in accuracy}


def test_round_trip_vqa(world: str, spread_pretrain: str, tmp_path) -> None:
    import VQA
    from dataset import VQATestDataset

    out = str(tmp_path / "run")
    results = VQA.main(script_argv(world, "VQA.yaml", out, "--checkpoint", spread_pretrain, overrides=(
        f"train_file=[{world}/vqa_train.json]", f"test_file=[{world}/vqa_test.json]", f"vqa_root={world}",
        f"vg_root={world}", f"answer_list={world}/answer_list.json", "test_answers_file=''", "batch_size_train=8",
        "batch_size_test=4")))
    albef = load_model(os.path.join(out, "checkpoint_00.pth"), device="cpu")
    assert albef.task == "vqa" and albef.meta["decoder_layers"] == 2
    test = VQATestDataset(f"{world}/vqa_test.json", None, world, world)
    answers = albef.answer(test.paths, test.questions, top_n=1)
    written = {r["question_id"]: r["answer"] for r in json.load(open(results["test"]["result_file"]))}
    assert {q: a[0][0] for q, a in zip(test.question_ids, answers)} == written
    assert len(set(written.values())) > 1


def test_pretraining_and_text_assignment_checkpoints_load_with_their_metadata(world: str, spread_pretrain: str,
                                                                            tmp_path) -> None:
    import Pretrain
    import Pretrain_nlvr

    runs = {"pretrain": (Pretrain, "Pretrain.yaml", ("itc_warmup_steps=0", "queue_size=16")),
            "nlvr_pretrain": (Pretrain_nlvr, "NLVR_pretrain.yaml", ())}
    for task, (script, config, extra) in runs.items():
        out = str(tmp_path / task)
        flags = ("--checkpoint", spread_pretrain) if task == "nlvr_pretrain" else ()
        script.main(script_argv(world, config, out, *flags, overrides=(
            f"train_file=[{world}/pretrain.json]", "batch_size=4", *extra)))
        ckpt = torch.load(os.path.join(out, "checkpoint_00.pth"), weights_only=True)
        meta = ckpt["meta"]
        assert meta["task"] == task and meta["stage"] == {"pretrain": "pre-training",
                                                          "nlvr_pretrain": "text-assignment pre-training"}[task]
        assert meta["image_res"] == 32 and meta["bert"]["num_hidden_layers"] == 4 and meta["vit"]["width"] == 128
        assert meta["text"] == {"tokenizer": "bert-base-uncased", "max_words": 30, "max_tokens": ckpt["config"][
            "max_tokens"]} and meta["version"]
        albef = load_model(os.path.join(out, "checkpoint_00.pth"), device="cpu")
        loaded = albef.model.state_dict()
        assert loaded and all(torch.equal(v, ckpt["model"][k]) for k, v in loaded.items())


# ----------------------------------------------------------------------------- the paper's launch recipes
LAUNCHERS = [  # (launcher arguments, environment, entry script, flags that must be in the command)
    (["pretrain.sh", "train_file=[a.json]"], {"VIT_INIT": "deit.pth", "BERT_INIT": "bert"}, "Pretrain.py",
     ["--text_encoder", "bert", "bert_init=true", "vit_init=deit.pth"]),
    (["nlvr_pretrain.sh"], {}, "Pretrain_nlvr.py", ["--checkpoint", "ALBEF.pth"]),
    (["retrieval.sh", "flickr"], {"IMAGE_ROOT": "/data/f/"}, "Retrieval.py", ["image_root=/data/f/"]),
    (["vqa.sh"], {"VQA_ROOT": "/v", "VG_ROOT": "/g"}, "VQA.py", ["vqa_root=/v", "vg_root=/g"]),
    (["nlvr.sh"], {}, "NLVR.py", ["output/nlvr_pretrain/checkpoint_00.pth"]),
    (["ve.sh", "schedular.epochs=1"], {}, "SNLI_VE.py", ["schedular.epochs=1"]),
    (["grounding.sh", "--", "--block_num", "8"], {"DET_FILE": "d.json"}, "Grounding.py",
     ["--block_num", "det_file=d.json"]),
    (["evaluate.sh", "retrieval_coco", "mscoco.pth"], {}, "Retrieval.py", ["--evaluate", "mscoco.pth"]),
]


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=[entry[0][0] for entry in LAUNCHERS])
def test_launchers_build_commands_their_entry_script_accepts(launcher: tuple) -> None:
    import importlib
    import shlex
    import subprocess

    from engine.config import get_parser, load_config

    argv, env, script, expected = launcher
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "launch", argv[0]), *argv[1:]], capture_output=True,
                         text=True, timeout=60, env={**os.environ, **env, "DRY_RUN": "1", "NPROC": "8"})
    assert run.returncode == 0, run.stderr
    command = shlex.split(run.stdout)
    assert command[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=8", "--standalone"]
    assert command[5] == script and all(flag in command for flag in expected), command
    module = importlib.import_module(script[:-3])
    parse = getattr(module, "parse_args", None) or get_parser(module.__doc__).parse_args
    args = parse(command[6:])
    load_config(args.config, module.DEFAULTS, args.override)  # every override is a key of the task's schema
