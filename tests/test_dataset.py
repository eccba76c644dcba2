"""Unit tests of the data pipeline: text cleaning, transforms, RandAugment,
datasets, the resumable sampler and the skip-None collate (CPU, offline)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from dataset import (
    CLIP_MEAN,
    CLIP_STD,
    PretrainDataset,
    ResumableSampler,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    build_transform,
    collate_skip_none,
    create_loader,
    pre_caption,
    pre_question,
)
from dataset import randaugment as ra
from dataset.randaugment import DEFAULT_AUGS, OPS, RandomAugment, level_to_args


def _write_json(path: Path, data: object) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def _write_image(
    path: Path, size: tuple[int, int] = (12, 10), color=(10, 200, 30)
) -> str:
    Image.new("RGB", size, color).save(path)
    return str(path)


# --------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A man, riding a horse!", "a man riding a horse"),
        ('He said: "Hi" (twice); ok? #tag ~*', "he said hi twice ok tag"),
        ("It's a well-known cat/dog", "its a well known cat dog"),
        ("<person> is walking", "person is walking"),
        ("  Hello   world  \n", "hello world"),
        ("Café NAÏVE 猫", "café naïve 猫"),
    ],
)
def test_pre_caption_examples(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_keeps_first_30_words() -> None:
    words = [f"w{i}" for i in range(45)]
    out = pre_caption(" ".join(words))
    assert out.split(" ") == words[:30]
    assert pre_caption("a b c d", max_words=2) == "a b"


def test_pre_question() -> None:
    assert pre_question("What's the man-made object?  ") == "whats the man made object"
    assert pre_question(" ".join(["q"] * 60)).count("q") == 50
    assert pre_question("a b c", max_words=2) == "a b"


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("kind", ["pretrain", "train", "test", "grounding_train"])
def test_transform_shape_and_dtype(kind: str) -> None:
    img = Image.new("RGB", (40, 30), (120, 60, 200))
    out = build_transform(kind, 32)(img)
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32


def test_test_transform_normalises_constant_image() -> None:
    out = build_transform("test", 16)(Image.new("RGB", (20, 20), (128, 128, 128)))
    # (128/255 - mean) / std, worked out by hand per channel.
    expected = torch.tensor([0.076336, 0.168897, 0.339949])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-6)
    manual = torch.tensor(
        [(128 / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    )
    assert torch.allclose(expected, manual, atol=1e-5)


def test_transform_crop_scale_override_and_unknown_kind() -> None:
    tf = build_transform("pretrain", 8, crop_scale=(0.9, 1.0), randaug=False)
    crop = tf.transforms[0]
    assert crop.scale == (0.9, 1.0)
    assert not any(isinstance(t, RandomAugment) for t in tf.transforms)
    assert build_transform("train", 8).transforms[0].scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="unknown transform kind"):
        build_transform("bogus", 8)


# --------------------------------------------------------------------------- RandAugment


@pytest.mark.parametrize("op", DEFAULT_AUGS)
def test_every_op_runs(op: str) -> None:
    random.seed(0)
    img = Image.linear_gradient("L").resize((16, 12)).convert("RGB")
    aug = RandomAugment(2, 7, augs=[op])
    for _ in range(6):
        out = aug(img)
        assert out.size == img.size
        assert out.mode == "RGB"


def test_op_magnitudes_at_level_7() -> None:
    assert level_to_args("Brightness", 7) == pytest.approx((1.36,))
    assert level_to_args("Sharpness", 7) == pytest.approx((1.36,))
    assert level_to_args("Identity", 7) == ()
    for _ in range(10):
        assert abs(level_to_args("Rotate", 7)[0]) == pytest.approx(21.0)
        assert abs(level_to_args("ShearX", 7)[0]) == pytest.approx(0.21)
        assert abs(level_to_args("TranslateY", 7)[0]) == pytest.approx(7.0)
    signs = {level_to_args("Rotate", 7)[0] > 0 for _ in range(200)}
    assert signs == {True, False}


def test_random_augment_applies_ops_with_official_args(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, tuple]] = []
    for name in ("Rotate", "Brightness"):
        monkeypatch.setitem(
            OPS, name, lambda img, *args, _n=name: calls.append((_n, args)) or img
        )
    monkeypatch.setattr(ra.random, "random", lambda: 0.0)  # always apply, positive sign
    RandomAugment(2, 7, augs=["Rotate", "Brightness"])(Image.new("RGB", (4, 4)))
    assert len(calls) == 2  # n=2 ops drawn with replacement
    expected = {"Rotate": (21.0,), "Brightness": (1.36,)}
    for name, args in calls:
        assert args == pytest.approx(expected[name])


def test_translate_direction_matches_official() -> None:
    img = Image.new("L", (20, 5), 0)
    img.paste(255, (10, 0, 11, 5))  # white column at x=10
    out = OPS["TranslateX"](img, 7.0)  # official: content moves left by the offset
    assert out.getpixel((3, 2)) == 255
    assert out.getpixel((10, 2)) == 0


def test_random_augment_rejects_unknown_op() -> None:
    with pytest.raises(KeyError, match="Solarize"):
        RandomAugment(2, 7, augs=["Solarize"])


# --------------------------------------------------------------------------- datasets


def test_pretrain_dataset_random_caption_from_list(tmp_path: Path) -> None:
    img = _write_image(tmp_path / "a.jpg")
    ann = _write_json(
        tmp_path / "p.json", [{"image": img, "caption": ["A cat.", "A dog!"]}]
    )
    ds = PretrainDataset([ann], build_transform("test", 8))
    random.seed(0)
    captions = {ds[0][1] for _ in range(40)}
    assert captions == {"a cat", "a dog"}
    assert ds[0][0].shape == (3, 8, 8)


def test_pretrain_dataset_joins_relative_paths(tmp_path: Path) -> None:
    _write_image(tmp_path / "rel.png")
    ann = _write_json(tmp_path / "p.json", [{"image": "rel.png", "caption": "x"}])
    ds = PretrainDataset([ann], build_transform("test", 8), image_root=str(tmp_path))
    assert ds[0] is not None
    assert ds.num_skipped == 0


def test_retrieval_train_reindexes_ids(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.jpg")
    items = [
        {"image": "a.jpg", "caption": "one", "image_id": "a"},
        {"image": "a.jpg", "caption": "two", "image_id": "b"},
        {"image": "a.jpg", "caption": "three", "image_id": "a"},
    ]
    ds = RetrievalTrainDataset(
        [_write_json(tmp_path / "t.json", items)],
        build_transform("test", 8),
        str(tmp_path),
    )
    assert [ds[i][2] for i in range(3)] == [0, 1, 0]
    assert [ds[i][1] for i in range(3)] == ["one", "two", "three"]


def test_retrieval_eval_maps(tmp_path: Path) -> None:
    items = []
    for k in range(2):
        _write_image(tmp_path / f"{k}.png")
        items.append(
            {"image": f"{k}.png", "caption": [f"Caption {k}-{j}." for j in range(5)]}
        )
    ds = RetrievalEvalDataset(
        _write_json(tmp_path / "e.json", items),
        build_transform("test", 8),
        str(tmp_path),
    )
    assert len(ds) == 2
    assert len(ds.text) == 10
    assert ds.img2txt == {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9]}
    assert ds.txt2img == {t: t // 5 for t in range(10)}
    assert ds.text[6] == "caption 1 1"
    assert ds.image == ["0.png", "1.png"]
    image, index = ds[1]
    assert image.shape == (3, 8, 8)
    assert index == 1


# --------------------------------------------------------------------------- sampler


def test_sampler_deterministic_per_epoch() -> None:
    a = ResumableSampler(50, shuffle=True, seed=3, drop_last=False)
    b = ResumableSampler(50, shuffle=True, seed=3, drop_last=False)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(3)
    assert list(a) != first
    assert sorted(a) == list(range(50))
    assert list(ResumableSampler(5, shuffle=False, seed=0, drop_last=False)) == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_sampler_shards_disjoint_and_cover() -> None:
    shards = [
        list(ResumableSampler(10, True, 1, rank=r, world_size=2, drop_last=False))
        for r in range(2)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_sampler_eval_pads_by_wrapping() -> None:
    shards = [
        list(ResumableSampler(5, False, 0, rank=r, world_size=2, drop_last=False))
        for r in range(2)
    ]
    assert shards == [[0, 2, 4], [1, 3, 0]]


def test_sampler_train_gives_equal_full_batches() -> None:
    samplers = [
        ResumableSampler(23, True, 0, rank=r, world_size=2, batch_size=4)
        for r in range(2)
    ]
    assert [len(s) for s in samplers] == [8, 8]  # 23 // 8 global batches of 4 per rank
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(5, True, 0, world_size=2, batch_size=4)


def test_sampler_set_start_yields_tail() -> None:
    s = ResumableSampler(20, shuffle=True, seed=7, drop_last=False)
    s.set_epoch(1)
    full = list(s)
    s.set_start(6)
    assert len(s) == 14
    assert list(s) == full[6:]
    assert len(s) == 20
    assert list(s) == full


# --------------------------------------------------------------------------- collate / loader


def test_collate_skip_none_drops_and_counts() -> None:
    batch = [(torch.zeros(3, 2, 2), "a", 1), None, (torch.ones(3, 2, 2), "b", 4), None]
    images, texts, ids, dropped = collate_skip_none(batch)
    assert images.shape == (2, 3, 2, 2)
    assert texts == ["a", "b"]
    assert ids.dtype == torch.long
    assert ids.tolist() == [1, 4]
    assert dropped == 2
    assert collate_skip_none([None, None]) == (2,)


def test_create_loader_skips_bad_images(tmp_path: Path) -> None:
    items = [
        {"image": _write_image(tmp_path / f"{i}.png"), "caption": f"c{i}"}
        for i in range(6)
    ]
    items.append({"image": str(tmp_path / "missing.png"), "caption": "gone"})
    items.append({"image": _write_image(tmp_path / "7.png"), "caption": "c7"})
    ds = PretrainDataset(
        [_write_json(tmp_path / "p.json", items)], build_transform("test", 8)
    )
    loader = create_loader(
        ds, batch_size=4, num_workers=0, shuffle=False, seed=0, drop_last=True
    )
    batches = list(loader)
    assert len(batches) == 2
    assert [b[-1] for b in batches] == [0, 1]
    assert batches[1][0].shape == (3, 3, 8, 8)
    assert ds.num_skipped == 1
