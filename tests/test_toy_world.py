"""Tests for the synthetic toy world (`dataset.toy_world`, `dataset.toy_tasks`)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from dataset.grounding_dataset import load_dets, load_plain_truth
from dataset.grounding_eval import compute_iou, proposal_stats
from dataset.toy_grounding import _proposals
from dataset.toy_scene import Scene, ToyObject
from dataset.toy_world import VERSION, ensure_current_toy_world, ensure_toy_world, is_current_toy_world, main

SMALL = {"seed": 3, "n_train": 40, "n_val": 10, "n_test": 12, "image_size": 64}
SHAPES = {"circle", "square", "triangle", "star", "cross", "diamond"}
PLURALS = {"circles", "squares", "triangles", "stars", "crosses", "diamonds"}
COLORS = {"red", "green", "blue", "yellow", "purple", "orange", "black"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Other words a caption may use ("five" only occurs in noisy captions with an extra object).
_CAPTION_WORDS = """a an and above below small little large big picture of image with there is
are one two three four five shape shapes objects"""
# Other words of questions, answers, NLVR/VE sentences and referring expressions.
_TASK_WORDS = """how many what color size the object yes no 0 1 2 3 4 left right images contains
contain both exactly in total more than only shows all made wood paper plastic metal glass stone
were drawn by child student teacher computer artist very heavy old expensive warm cold soft was
for game book school class test at top bottom"""
CAPTION_VOCAB = SHAPES | COLORS | set(_CAPTION_WORDS.split())
TASK_VOCAB = CAPTION_VOCAB | PLURALS | set(NUMBER_WORDS) | set(_TASK_WORDS.split())
_FILES = """pretrain pretrain_binding pretrain_regions retrieval_train retrieval_val retrieval_test vqa_train vqa_test
vqa_test_answers answer_list nlvr_train nlvr_val nlvr_test ve_train ve_val ve_test grounding_train
grounding_train_full grounding_test dets refs scenes manifest nlvr_train_extra"""
TASK_FILES = [f"{name}.json" for name in _FILES.split()]
SPLITS = ("train", "val", "test")


def words(text: str) -> list[str]:
    return text.replace(",", " ").replace(":", " ").split()


def mentioned_pairs(caption: str) -> Counter:
    """(colour, shape) pairs named in a caption; every object phrase ends in 'colour shape'."""
    w = words(caption)
    return Counter((w[i - 1], w[i]) for i in range(1, len(w)) if w[i] in SHAPES)


def scene_pairs(record: dict) -> Counter:
    return Counter((o["color"], o["shape"]) for o in record["objects"])


def load(root: Path, name: str):
    return json.loads((root / name).read_text(encoding="utf-8"))


def field(root: Path, names: list[str], key: str) -> list:
    """`item[key]` of every item in the given annotation files."""
    return [item[key] for name in names for item in load(root, name)]


def referents(text: str, objects: list[dict]) -> list[dict]:
    """Objects matching the head of a referring expression ('the [size] [colour] shape')."""
    head = text.split()[1:]
    for stop in ("above", "below", "at"):
        head = head[: head.index(stop)] if stop in head else head
    return [
        o
        for o in objects
        if all(w in ("shape", "object", o["shape"], o["color"], o["size"]) for w in head)
    ]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = ensure_toy_world(str(tmp_path_factory.mktemp("toy") / "world"), **SMALL)
    return Path(root)


@pytest.fixture(scope="module")
def scenes(world: Path) -> dict[str, dict]:
    return {r["image"]: r for r in load(world, "scenes.json")}


def test_all_files_written_and_counted(world: Path) -> None:
    assert world.is_absolute()
    manifest = load(world, "manifest.json")
    assert manifest["params"] == {**SMALL, "version": manifest["version"]}
    for name in TASK_FILES:
        assert (world / name).is_file(), name
    for name, count in manifest["counts"].items():
        assert count > 0 and len(load(world, name)) == count
    for split in ("train", "val", "test"):
        assert len(list((world / "images" / split).glob("*.png"))) == SMALL[f"n_{split}"]
    assert not [p for p in world.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_same_seed_gives_identical_bytes(world: Path, tmp_path: Path) -> None:
    again = Path(ensure_toy_world(str(tmp_path / "again"), **SMALL))
    for name in TASK_FILES:
        a = (world / name).read_text(encoding="utf-8").replace(str(world), "<root>")
        b = (again / name).read_text(encoding="utf-8").replace(str(again), "<root>")
        assert a == b, name
    images = sorted(p.relative_to(world) for p in world.rglob("*") if p.suffix in (".png", ".jpg"))
    assert len(images) == 2 * sum(SMALL[f"n_{s}"] for s in ("train", "val", "test"))
    assert all(digest(world / p) == digest(again / p) for p in images)
    other = Path(ensure_toy_world(str(tmp_path / "other"), **{**SMALL, "seed": 4}))
    assert load(other, "retrieval_val.json") != load(world, "retrieval_val.json")


def test_pretrain_format(world: Path) -> None:
    items = load(world, "pretrain.json")
    assert len(items) == SMALL["n_train"]
    for item in items:
        assert os.path.isabs(item["image"]) and Path(item["image"]).is_file()
        assert isinstance(item["caption"], list) and 2 <= len(item["caption"]) <= 3
        assert all(isinstance(c, str) and c for c in item["caption"])


def test_retrieval_format(world: Path, scenes: dict[str, dict]) -> None:
    train = load(world, "retrieval_train.json")
    for item in train:
        assert isinstance(item["caption"], str) and isinstance(item["image_id"], str)
        assert not os.path.isabs(item["image"]) and (world / item["image"]).is_file()
        assert item["image_id"] == "train_" + Path(item["image"]).stem
    assert len(train) == sum(len(r["captions"]) for r in scenes.values() if r["split"] == "train")
    for split in ("val", "test"):
        items = load(world, f"retrieval_{split}.json")
        assert len(items) == SMALL[f"n_{split}"]
        for item in items:
            assert item["image"].startswith(f"images/{split}/")
            assert (world / item["image"]).is_file()
            assert isinstance(item["caption"], list) and len(set(item["caption"])) == 5


def test_eval_images_unseen_in_train(world: Path, scenes: dict[str, dict]) -> None:
    train = {img for img, r in scenes.items() if r["split"] == "train"}
    held_out = {img for img, r in scenes.items() if r["split"] != "train"}
    assert train and held_out and not train & held_out
    assert not {digest(world / p) for p in train} & {digest(world / p) for p in held_out}
    ids = [r["image_id"] for r in scenes.values()]
    assert len(set(ids)) == len(ids)


def test_clean_captions_name_every_object(world: Path, scenes: dict[str, dict]) -> None:
    captions = [(i["image"], i["caption"]) for i in load(world, "retrieval_train.json")]
    for name in ("retrieval_val.json", "retrieval_test.json"):
        captions += [(i["image"], c) for i in load(world, name) for c in i["caption"]]
    for image, caption in captions:
        assert mentioned_pairs(caption) == scene_pairs(scenes[image]), caption
        assert {o["shape"] for o in scenes[image]["objects"]} <= set(words(caption))


def test_noise_only_in_pretrain(world: Path, scenes: dict[str, dict]) -> None:
    retrieval: dict[str, set[str]] = {}
    for item in load(world, "retrieval_train.json"):
        retrieval.setdefault(item["image"], set()).add(item["caption"])
    n_noisy = n_total = 0
    for item in load(world, "pretrain.json"):
        image = str(Path(item["image"]).relative_to(world))
        record = scenes[image]
        assert item["caption"] == record["pretrain_captions"]
        assert retrieval[image] == set(record["captions"])
        triples = zip(item["caption"], record["captions"], record["noisy"], strict=True)
        for caption, clean, noisy in triples:
            n_total += 1
            n_noisy += noisy
            assert (mentioned_pairs(caption) != scene_pairs(record)) == noisy, caption
            assert noisy or caption == clean
            assert not noisy or caption not in retrieval[image]
    assert 0 < n_noisy < 0.3 * n_total


def test_binding_captions_name_a_proper_subset_without_counts(world: Path, scenes: dict[str, dict]) -> None:
    items = load(world, "pretrain_binding.json")
    pretrain = load(world, "pretrain.json")
    assert [i["image"] for i in items] == [i["image"] for i in pretrain]
    sizes = set()
    for item, original in zip(items, pretrain, strict=True):
        assert item["caption"][:-3] == original["caption"]
        record = scenes[str(Path(item["image"]).relative_to(world))]
        n = len(record["objects"])
        for caption in item["caption"][-3:]:
            named = mentioned_pairs(caption)
            assert not named - scene_pairs(record), caption  # only objects of the image
            k = sum(named.values())
            assert 1 <= k <= max(1, n - 1), caption
            assert not set(words(caption)) & set(NUMBER_WORDS), caption
            sizes.add((n, k))
    assert {(2, 1), (3, 1), (3, 2)} <= sizes  # every proper subset size occurs


def test_region_captions_are_true_of_their_image(world: Path, scenes: dict[str, dict]) -> None:
    items = load(world, "pretrain_regions.json")
    train = [i["image"] for i in load(world, "pretrain.json")]
    assert [i["image"] for i in items] == train + train  # object names, then shape counts
    sizes = {"small": {"small", "little"}, "large": {"large", "big"}}
    for item in items[: len(train)]:
        record = scenes[str(Path(item["image"]).relative_to(world))]
        named = []
        for caption in item["caption"]:
            pair = mentioned_pairs(caption)
            assert sum(pair.values()) == 1, caption
            assert words(caption)[0] == ("an" if words(caption)[1][0] in "aeiou" else "a"), caption
            named.append(next(iter(pair)))
            if len(words(caption)) == 4:  # "a big red star": the size word is the object's
                assert any(words(caption)[1] in sizes[o["size"]] for o in record["objects"]
                           if (o["color"], o["shape"]) == named[-1]), caption
        assert Counter(named) == Counter({p: 3 * n for p, n in scene_pairs(record).items()})
    for item in items[len(train):]:
        record = scenes[str(Path(item["image"]).relative_to(world))]
        shapes = Counter(o["shape"] for o in record["objects"])
        *phrases, total = item["caption"]
        n = len(record["objects"])
        assert total == ("one shape" if n == 1 else f"{NUMBER_WORDS[n]} shapes")
        expected = {f"{'an' if s[0] in 'aeiou' else 'a'} {s}" if k == 1 else f"{NUMBER_WORDS[k]} "
                    f"{'crosses' if s == 'cross' else s + 's'}" for s, k in shapes.items()}
        assert sorted(phrases) == sorted(expected)


def test_caption_vocabulary(world: Path) -> None:
    names = ["pretrain.json", "pretrain_binding.json", "retrieval_val.json", "retrieval_test.json"]
    captions = [c for captions in field(world, names, "caption") for c in captions]
    captions += field(world, ["retrieval_train.json"], "caption")
    for caption in captions:
        tokens = words(caption)
        assert caption == caption.lower() and len(tokens) <= 20, caption
        assert not {"left", "right"} & set(tokens), caption
        assert set(tokens) <= CAPTION_VOCAB, caption


def test_task_text_vocabulary(world: Path) -> None:
    texts = field(world, ["vqa_train.json", "vqa_test.json"], "question")
    texts += load(world, "answer_list.json")
    texts += field(world, [f"{t}_{s}.json" for t in ("nlvr", "ve") for s in SPLITS], "sentence")
    texts += field(world, ["grounding_train.json", "grounding_train_full.json", "grounding_test.json"], "text")
    texts += [c for captions in field(world, ["pretrain_regions.json"], "caption") for c in captions]
    for text in texts:
        assert set(text.split()) <= TASK_VOCAB, text


def test_vocabulary_is_whole_wordpiece_tokens() -> None:
    vocab_file = Path(__file__).resolve().parents[1] / "models" / "assets" / "vocab.txt"
    if not vocab_file.is_file():
        pytest.skip("no BERT vocab.txt in models/assets")
    vocab = set(vocab_file.read_text(encoding="utf-8").split("\n"))
    assert TASK_VOCAB <= vocab, sorted(TASK_VOCAB - vocab)


def test_vqa(world: Path, scenes: dict[str, dict]) -> None:
    answer_list = load(world, "answer_list.json")
    train, test = load(world, "vqa_train.json"), load(world, "vqa_test.json")
    truth = load(world, "vqa_test_answers.json")
    qids = [q["question_id"] for q in train + test]
    assert all(isinstance(q, int) for q in qids) and len(set(qids)) == len(qids)
    assert set(truth) == {str(q["question_id"]) for q in test}
    assert set(truth.values()) <= set(answer_list)
    assert all(q["dataset"] == "vqa" and "answer" not in q for q in test)
    assert all(scenes[q["image"]]["split"] != "train" for q in test)
    for q in train:
        assert q["dataset"] == "vqa" and len(q["answer"]) == 10
        assert set(q["answer"]) <= set(answer_list)
        answer, votes = Counter(q["answer"]).most_common(1)[0]
        assert votes >= 7
        record = scenes[q["image"]]
        if q["question"] == "how many shapes are there":
            assert answer == str(len(record["objects"]))
        if m := re.fullmatch(r"is there an? (\w+) (\w+)", q["question"]):
            assert answer == ("yes" if (m[1], m[2]) in scene_pairs(record) else "no")


def _nlvr_truth(sentence: str, left: dict, right: dict) -> bool:
    """The truth of a toy NLVR2 statement, recomputed from the two scene records (every template)."""
    sides = {"left": left["objects"], "right": right["objects"]}

    def count(objects: list, **attrs: str) -> int:
        return sum(all(o[k] == v for k, v in attrs.items()) for o in objects)
    both = (left["objects"], right["objects"])
    singular = {p: p[:-2] if p.endswith("sses") else p[:-1] for p in PLURALS}  # crosses -> cross
    if m := re.fullmatch(r"the (left|right) image contains an? (\w+) (\w+)", sentence):
        return count(sides[m[1]], color=m[2], shape=m[3]) > 0
    if m := re.fullmatch(r"both images contain exactly (\w+) shapes?", sentence):
        return len(left["objects"]) == len(right["objects"]) == NUMBER_WORDS.index(m[1])
    if m := re.fullmatch(r"there are (\w+) (\w+) in total", sentence):
        return sum(count(objs, shape=singular[m[2]]) for objs in both) == NUMBER_WORDS.index(m[1])
    if m := re.fullmatch(r"both images contain an? (\w+)", sentence):
        return all(count(objs, shape=m[1]) for objs in both)
    if sentence == "the left image contains more shapes than the right image":
        return len(left["objects"]) > len(right["objects"])
    if m := re.fullmatch(r"only one image contains an? (\w+) shape", sentence):
        return (count(both[0], color=m[1]) > 0) != (count(both[1], color=m[1]) > 0)
    if m := re.fullmatch(r"no image contains an? (\w+)", sentence):
        return not any(count(objs, shape=m[1]) for objs in both)
    raise AssertionError(f"unknown NLVR2 statement: {sentence!r}")


@pytest.mark.parametrize("name", ["nlvr_train", "nlvr_val", "nlvr_test", "nlvr_train_extra"])
def test_nlvr_labels_are_balanced_and_true_to_the_scenes(world: Path, scenes: dict[str, dict], name: str) -> None:
    split = name.split("_")[1]
    items = load(world, f"{name}.json")
    n_images = SMALL[f"n_{split}"]
    assert len(items) == (3 * n_images if name.endswith("extra") else n_images)
    labels = Counter(i["label"] for i in items)
    assert set(labels) == {"True", "False"} and abs(labels["True"] - labels["False"]) <= 1
    for item in items:
        left, right = item["images"]
        assert left != right and {scenes[left]["split"], scenes[right]["split"]} == {split}
        assert item["label"] == str(_nlvr_truth(item["sentence"], scenes[left], scenes[right])), item


def test_extra_nlvr_statements_are_new(world: Path) -> None:
    first = {(tuple(i["images"]), i["sentence"]) for i in load(world, "nlvr_train.json")}
    extra = [(tuple(i["images"]), i["sentence"]) for i in load(world, "nlvr_train_extra.json")]
    assert sum(key in first for key in extra) < len(extra) // 20  # its own draws, not a copy


def test_ve(world: Path, scenes: dict[str, dict]) -> None:
    by_id = {str(r["image_id"]): r for r in scenes.values()}
    for split in ("train", "val", "test"):
        items = load(world, f"ve_{split}.json")
        labels = Counter(i["label"] for i in items)
        assert set(labels) == {"entailment", "neutral", "contradiction"}
        assert len(set(labels.values())) == 1  # exactly balanced
        for item in items:
            assert "." not in item["image"]
            assert (world / "ve_images" / f"{item['image']}.jpg").is_file()
            record = by_id[item["image"]]
            assert record["split"] == split
            if m := re.fullmatch(r"the image shows (\w+) shapes?", item["sentence"]):
                true = NUMBER_WORDS.index(m[1]) == len(record["objects"])
                assert item["label"] == ("entailment" if true else "contradiction")


def test_grounding(world: Path, scenes: dict[str, dict]) -> None:
    for item in load(world, "grounding_train.json"):
        record = scenes[item["image"]]
        assert record["split"] == "train" and referents(item["text"], record["objects"])
    tests, refs = load(world, "grounding_test.json"), load(world, "refs.json")
    dets = load(world, "dets.json")
    assert sorted(i["ref_id"] for i in tests) == sorted(int(k) for k in refs)
    assert {r["split"] for r in refs.values()} <= {"val", "testA", "testB"}
    for item in tests:
        ref, record = refs[str(item["ref_id"])], scenes[item["image"]]
        assert ref["image_id"] == record["image_id"] and ref["split"] != "train"
        target = next(o for o in record["objects"] if o["bbox"] == ref["bbox"])
        candidates = referents(item["text"], record["objects"])
        assert target in candidates, item["text"]
        if not {"above", "below", "at"} & set(item["text"].split()):
            assert candidates == [target], item["text"]  # attributes alone are unique
        boxes = dets[str(ref["image_id"])]
        assert len(boxes) > len(record["objects"])  # distractor proposals
        assert max(iou(box, ref["bbox"]) for box in boxes) >= 0.5


def test_full_grounding_expressions_name_each_training_object_once(world: Path, scenes: dict[str, dict]) -> None:
    items = load(world, "grounding_train_full.json")
    train = [r for r in scenes.values() if r["split"] == "train"]
    assert len(items) == sum(len(r["objects"]) for r in train)
    for item in items:
        record = scenes[item["image"]]
        words = item["text"].split()
        assert words[0] == "the" and len(words) == 4 and words[1] in ("small", "large"), item["text"]
        target = next(o for o in record["objects"] if [o["size"], o["color"], o["shape"]] == words[1:])
        assert referents(item["text"], record["objects"]) == [target], item["text"]
    named = {(i["image"], i["text"]) for i in items}
    assert len(named) == len(items)  # every object of every training image, once


def test_grounding_test_split_has_exactly_one_right_proposal(world: Path) -> None:
    """The acceptance's split: >= 3 proposals per image, exactly one at IoU >= 0.5 (the evaluator's official
    IoU) with the referred object; the chance level is the mean of 1/#proposals (1/3 to 1/7 per image)."""
    truth = load_plain_truth(str(world / "refs.json"))
    dets = load_dets(str(world / "dets.json"))
    for ref in truth.values():
        boxes = dets[str(ref.image_id)]
        assert len(boxes) >= 3 and sum(compute_iou(ref.bbox, box) >= 0.5 for box in boxes) == 1
    stats = proposal_stats(list(truth), truth, dets)
    assert set(stats) == {"val", "testA", "testB"}
    for split, s in stats.items():
        chance = [1 / len(dets[str(r.image_id)]) for r in truth.values() if r.split == split]
        assert s["one_hit"] == 1.0 and s["min_proposals"] >= 3
        assert s["chance"] == pytest.approx(sum(chance) / len(chance)) and 1 / 7 <= s["chance"] <= 1 / 3


def test_distractors_never_overlap_an_object() -> None:
    """A large object that random boxes often cover at IoU >= 0.5: every distractor is redrawn clear of it."""
    obj = ToyObject("square", "red", "large", 26.0, 26.0, 12.0, (14, 14, 24, 24))
    scene = Scene(image_id=7, split="test", index=0, objects=(obj,))
    hits = []
    for seed in range(300):
        boxes = _proposals(scene, 64, random.Random(seed))
        assert 3 <= len(boxes) <= 4
        hits.append(sum(iou(box, obj.bbox) >= 0.5 for box in boxes))
    assert hits == [1] * 300
    assert _proposals(scene, 64, random.Random(5)) == _proposals(scene, 64, random.Random(5))  # seeded


def test_cached_then_regenerated_on_new_params(tmp_path: Path) -> None:
    params = {**SMALL, "n_train": 6, "n_val": 3, "n_test": 3}
    root = ensure_toy_world(str(tmp_path / "w"), **params)
    manifest = Path(root) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    argv = f"--root {tmp_path / 'w'} --seed 3 --n_train 6 --n_val 3 --n_test 3".split()
    assert main(argv) == root  # the CLI with the same parameters: no regeneration
    assert manifest.stat().st_mtime_ns == stamp
    ensure_toy_world(root, **{**params, "n_val": 4})
    assert json.loads(manifest.read_text())["params"]["n_val"] == 4
    assert len(list((Path(root) / "images" / "val").glob("*.png"))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_a_world_from_an_older_generator_is_regenerated_with_its_own_parameters(tmp_path: Path) -> None:
    params = {**SMALL, "n_train": 6, "n_val": 3, "n_test": 3}
    root = Path(ensure_toy_world(str(tmp_path / "w"), **params))
    assert is_current_toy_world(str(root)) and not is_current_toy_world(str(tmp_path / "absent"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = manifest["params"]["version"] = VERSION - 1  # as written before the latest file existed
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "nlvr_train_extra.json").unlink()
    assert not is_current_toy_world(str(root))
    assert ensure_current_toy_world(str(root)) == str(root)
    assert json.loads((root / "manifest.json").read_text())["params"] == {**params, "version": VERSION}
    assert (root / "nlvr_train_extra.json").is_file()
    assert len(list((root / "images" / "train").glob("*.png"))) == 6  # its own size, not the default 3,000
    stamp = (root / "manifest.json").stat().st_mtime_ns
    ensure_current_toy_world(str(root))  # current: left alone
    assert (root / "manifest.json").stat().st_mtime_ns == stamp


def test_refuses_to_overwrite_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_toy_world(str(tmp_path / "mine"), **{**SMALL, "n_train": 4, "n_val": 2, "n_test": 2})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_existing_empty_directory_is_used(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    root = ensure_toy_world(
        str(tmp_path / "empty"), **{**SMALL, "n_train": 4, "n_val": 2, "n_test": 2}
    )
    assert root == str(tmp_path / "empty") and (tmp_path / "empty" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
