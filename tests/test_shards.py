"""WebDataset shards: scripts/make_shards.py on the toy world, the streaming loader's epoch layout across ranks
and workers, exact mid-epoch resume, corrupt members, missing shards, JSON files mixed in."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from dataset import DataError, build_pretrain_loader, build_transform, load_image, validate_config_files
from dataset.sampler import plan_epoch
from dataset.shard_io import Unit, count_tar_samples, decode_image_bytes, shard_sample_count
from dataset.shards import ShardStream
from dataset.toy_world import ensure_toy_world
from scripts import make_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 40  # toy-world pre-training items
SPEC = "{00000..00007}.tar"  # 8 shards of 5


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_toy_world(str(tmp_path_factory.mktemp("toy")), n_train=N, n_val=4, n_test=4)


@pytest.fixture(scope="module")
def shards(world: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("shards"))
    assert make_shards.main(["--ann", os.path.join(world, "pretrain.json"), "--out-dir", out,
                             "--max-count", "5", "--workers", "0"]) == 0
    return out


def all_keys() -> set[str]:
    return {f"000_{i:09d}" for i in range(N)}


def config(train_file: list[str], **kw: object) -> dict:
    return {"train_file": train_file, "batch_size": 5, "num_workers": 2, "shuffle_buffer": 4, **kw}


def epoch_batches(loader: object, epoch: int) -> list[tuple]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def keys_of(batches: list[tuple]) -> list[str]:
    return [k for b in batches for k in b[2]]


TRANSFORM = build_transform("pretrain", 32)


def test_make_shards_manifest_and_resume(shards: str, world: str, tmp_path) -> None:
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    assert manifest["complete"] and manifest["num_samples"] == N and manifest["num_unreadable"] == 0
    assert [s["num_samples"] for s in manifest["shards"]] == [5] * 8
    assert [s["first"] for s in manifest["shards"]] == list(range(0, N, 5))
    keys = {k for s in range(8) for k, _ in _members(os.path.join(shards, f"{s:05d}.tar"))}
    assert keys == all_keys()
    # an interrupted run: the last 3 shards never finished (one left as a partial .tmp) -> a rerun completes them
    out = str(tmp_path / "resumed")
    shutil.copytree(shards, out)
    cut = dict(manifest, complete=False, shards=manifest["shards"][:5])
    json.dump(cut, open(os.path.join(out, "manifest.json"), "w"))
    for s in range(5, 8):
        os.replace(os.path.join(out, f"{s:05d}.tar"), os.path.join(out, f"{s:05d}.tar.tmp"))
    assert make_shards.main(["--ann", os.path.join(world, "pretrain.json"), "--out-dir", out,
                             "--max-count", "5", "--workers", "0"]) == 0
    for s in range(8):  # identical bytes: fixed order, fixed mtime
        assert _digest(os.path.join(out, f"{s:05d}.tar")) == _digest(os.path.join(shards, f"{s:05d}.tar"))
    # other arguments in the same directory are refused (exit 2), not mixed in
    assert make_shards.main(["--ann", os.path.join(world, "pretrain.json"), "--out-dir", out,
                             "--max-count", "6", "--workers", "0"]) == 2


def test_make_shards_by_bytes(world: str, tmp_path) -> None:
    out = str(tmp_path / "by_bytes")
    limit = 25_000
    assert make_shards.main(["--ann", os.path.join(world, "pretrain.json"), "--out-dir", out, "--max-bytes",
                             str(limit), "--short-side", "40", "--workers", "0"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["num_samples"] == N
    for s in manifest["shards"]:
        members = _members(os.path.join(out, s["name"]))
        data = sum(len(v) for _, v in members) + make_shards._TAR_OVERHEAD * s["num_samples"]
        assert s["num_samples"] == 1 or data <= limit
        assert s["num_samples"] == count_tar_samples(os.path.join(out, s["name"]))
        images = [Image.open(io.BytesIO(v)) for k, v in members if v[:4] == b"\x89PNG"]
        assert images and all(min(img.size) == 40 for img in images)  # the 64 px toy images, shrunk
    assert len(manifest["shards"]) > 2


def test_two_epochs_two_workers_each_sample_once(shards: str) -> None:
    loader = build_pretrain_loader(config([os.path.join(shards, SPEC)]), TRANSFORM, seed=3, return_keys=True)
    assert len(loader) == 8 and loader.batch_size == 5
    orders = []
    for epoch in range(2):
        batches = epoch_batches(loader, epoch)
        assert len(batches) == 8
        assert all(b[0].shape == (5, 3, 32, 32) and b[-1] == 0 for b in batches)
        keys = keys_of(batches)
        assert len(keys) == N and set(keys) == all_keys()
        orders.append(keys)
    assert orders[0] != orders[1]  # a new order each epoch
    again = build_pretrain_loader(config([os.path.join(shards, SPEC)]), TRANSFORM, seed=3, return_keys=True)
    assert keys_of(epoch_batches(again, 1)) == orders[1]  # a function of (seed, epoch) only


@pytest.mark.parametrize("num_samples", [0, 36])
def test_two_ranks_disjoint_with_equal_steps(shards: str, num_samples: int) -> None:
    cfg = config([os.path.join(shards, SPEC)], batch_size=4, train_num_samples=num_samples)
    per_rank = []
    for rank in range(2):
        loader = build_pretrain_loader(cfg, TRANSFORM, seed=0, rank=rank, world_size=2, return_keys=True)
        batches = epoch_batches(loader, 0)
        assert len(loader) == len(batches) == (N if not num_samples else num_samples) // 8
        per_rank.append(keys_of(batches))
    assert not set(per_rank[0]) & set(per_rank[1])
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)) == len(per_rank[0]) * 2
    assert set(seen) == all_keys() if not num_samples else len(seen) == 32


def test_epoch_longer_than_the_data_takes_a_second_pass(shards: str) -> None:
    loader = build_pretrain_loader(config([os.path.join(shards, SPEC)], train_num_samples=60), TRANSFORM,
                                   seed=0, return_keys=True)
    counts = collections.Counter(keys_of(epoch_batches(loader, 0)))
    assert len(loader) == 12 and sum(counts.values()) == 60
    assert set(counts) == all_keys() and max(counts.values()) == 2


def test_plan_splits_uneven_shards_by_sample() -> None:
    """Shards of 3, 7, 1, 9, 0 and 4 samples over 3 ranks x 2 workers: the workers' ranges tile the epoch."""
    units = [Unit(f"{i}.tar", n) for i, n in enumerate([3, 7, 1, 9, 0, 4])]
    taken = []
    for rank in range(3):
        stream = ShardStream(units, [], None, batch_size=2, steps=3, rank=rank, world_size=3, num_workers=2)
        for worker in range(2):
            quota = stream.worker_batches(worker) * 2
            segments = stream.segments(5, stream.stream_offset(worker), quota)
            assert sum(take for _, _, take in segments) == quota == (4 if worker == 0 else 2)
            taken += [(u, skip + j) for u, skip, take in segments for j in range(take)]
    order = [(u, j) for u in stream.unit_order(5, 0) for j in range(units[u].count)]
    assert taken == order[:18]  # 18 of the 24 samples, each once, in the epoch's order


def test_mid_epoch_resume_is_exact(shards: str) -> None:
    cfg = config([os.path.join(shards, SPEC)])
    full = epoch_batches(build_pretrain_loader(cfg, TRANSFORM, seed=1, return_keys=True), 1)
    resumed = build_pretrain_loader(cfg, TRANSFORM, seed=1, return_keys=True)
    position = plan_epoch(resumed, 1).position(3)  # what the trainer's checkpoint after 3 steps records
    assert (position["samples"], position["dataset_len"], position["seed"]) == (15, N, 1)
    plan_epoch(resumed, 1, 3, position)  # the trainer's resume: set_epoch, then set_start(15)
    assert len(resumed) == 5
    rest = list(resumed)
    assert len(resumed) == 8  # the skip applied to one iteration
    assert [b[1:] for b in rest] == [b[1:] for b in full[3:]]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, full[3:], strict=True))  # augmentation too
    with pytest.raises(ValueError, match="multiple of batch size"):
        resumed.sampler.set_start(7)
    fewer = build_pretrain_loader(config([os.path.join(shards, "{00000..00006}.tar")]), TRANSFORM, seed=1)
    with pytest.raises(DataError, match="training data changed"):
        plan_epoch(fewer, 1, 3, position)
    with pytest.raises(DataError, match="--seed 1"):
        plan_epoch(build_pretrain_loader(cfg, TRANSFORM, seed=2), 1, 3, position)
    with pytest.raises(DataError, match="batch layout"):
        plan_epoch(build_pretrain_loader({**cfg, "batch_size": 4}, TRANSFORM, seed=1), 1, 3, position)


def _members(path: str) -> list[tuple[str, bytes]]:
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name.split(".")[0], tar.extractfile(m).read()) for m in tar if m.isreg()]


def _digest(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_corrupt_members_are_skipped_and_counted(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 10, 10)).save(jpeg, "JPEG")
    samples = [
        {"__key__": "good0", "png": _png(0), "txt": b"A red square."},
        {"__key__": "truncated", "jpg": jpeg.getvalue()[:200], "txt": b"a cut jpeg"},
        {"__key__": "nocaption", "png": _png(1)},
        {"__key__": "emptycaption", "png": _png(2), "txt": b"?!."},
        {"__key__": "noimage", "txt": b"only text"},
        {"__key__": "good1", "jpg": jpeg.getvalue(), "json": json.dumps({"caption": ["Two", "Three"]}).encode()},
    ]
    with wds.TarWriter(str(tmp_path / "bad.tar"), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    assert shard_sample_count(str(tmp_path / "bad.tar")) == 6  # no manifest: counted from the headers
    cfg = config([str(tmp_path / "bad.tar")], batch_size=6, num_workers=0)
    torch.manual_seed(7)
    with caplog.at_level(logging.WARNING):
        (batch,) = epoch_batches(build_pretrain_loader(cfg, TRANSFORM, seed=0, return_keys=True), 0)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))  # loading in this process left its random stream alone
    images, captions, keys, dropped = batch
    assert images.shape == (2, 3, 32, 32) and dropped == 4
    assert sorted(keys) == ["good0", "good1"]
    assert captions[keys.index("good0")] == "a red square" and captions[keys.index("good1")] in ("two", "three")
    for key in ("truncated", "nocaption", "emptycaption", "noimage"):
        assert key in caplog.text


def test_truncated_tar_keeps_the_epoch_length(shards: str, tmp_path) -> None:
    out = str(tmp_path / "cut")
    shutil.copytree(shards, out)
    path = os.path.join(out, "00002.tar")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    loader = build_pretrain_loader(config([os.path.join(out, SPEC)]), TRANSFORM, seed=0, return_keys=True)
    batches = epoch_batches(loader, 0)
    kept, dropped = keys_of(batches), sum(b[-1] for b in batches)
    assert len(batches) == 8 and len(kept) + dropped == N and 0 < dropped < 5
    assert len(set(kept)) == len(kept)


def test_missing_shard_is_a_clear_error(shards: str, tmp_path) -> None:
    out = str(tmp_path / "missing")
    shutil.copytree(shards, out)
    os.remove(os.path.join(out, "00006.tar"))
    spec = os.path.join(out, SPEC)
    with pytest.raises(DataError, match="shard file not found: .*00006.tar"):
        build_pretrain_loader(config([spec]), TRANSFORM, seed=0)
    problems = validate_config_files({"train_file": [spec]}, "pretrain")
    assert len(problems) == 1 and "00006.tar" in problems[0]
    # a shard that disappears after the loader was built
    loader = build_pretrain_loader(config([os.path.join(shards, SPEC)], num_workers=0), TRANSFORM, seed=0)
    loader.dataset.units[3] = loader.dataset.units[3].__class__(os.path.join(out, "00006.tar"), 5)
    with pytest.raises(DataError, match="shard file not found: .*00006.tar"):
        epoch_batches(loader, 0)


def test_json_only_gives_the_json_loader_and_mixing_works(shards: str, world: str) -> None:
    ann = os.path.join(world, "pretrain.json")
    loader = build_pretrain_loader(config([ann]), TRANSFORM, seed=0)
    assert isinstance(loader, DataLoader) and len(loader) == N // 5 and loader.sampler.dataset_len == N
    assert validate_config_files({"train_file": [ann, os.path.join(shards, SPEC)]}, "pretrain") == []
    mixed = build_pretrain_loader(config([os.path.join(shards, "{00000..00003}.tar"), ann]), TRANSFORM, seed=0,
                                  return_keys=True)
    keys = keys_of(epoch_batches(mixed, 0))
    assert len(mixed) == 12 and len(keys) == len(set(keys)) == 60 == mixed.sampler.dataset_len
    assert {k for k in keys if "#" in k} == {f"pretrain.json#{i}" for i in range(N)}


def test_decode_image_bytes_matches_load_image(tmp_path) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = str(tmp_path / "rotated.jpg")
    img.save(path, "JPEG", exif=exif.tobytes())
    want = np.asarray(load_image(path))
    got = np.asarray(decode_image_bytes(open(path, "rb").read(), "rotated.jpg"))
    assert want.shape == (50, 30, 3) and np.array_equal(got, want)


def test_img2dataset_stats_give_the_count(tmp_path) -> None:
    with wds.TarWriter(str(tmp_path / "00000.tar"), encoder=False) as writer:
        writer.write({"__key__": "a", "png": _png(0), "txt": b"x"})
    json.dump({"successes": 1, "failed_to_download": 9}, open(tmp_path / "00000_stats.json", "w"))
    assert shard_sample_count(str(tmp_path / "00000.tar")) == 1


def test_make_shards_lists_unreadable_images(world: str, tmp_path) -> None:
    items = json.load(open(os.path.join(world, "pretrain.json")))[:3]
    items[1] = {"image": str(tmp_path / "gone.png"), "caption": "a missing image"}
    ann = str(tmp_path / "three.json")
    json.dump(items, open(ann, "w"))
    out = str(tmp_path / "three")
    assert make_shards.main(["--ann", ann, "--out-dir", out, "--no-shuffle", "--workers", "0"]) == 1
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["num_samples"] == 2 and manifest["num_unreadable"] == 1
    assert [k for k, _ in _members(os.path.join(out, "00000.tar"))][::3] == ["000_000000000", "000_000000002"]
    listed = open(os.path.join(out, "unreadable.txt")).read().splitlines()
    assert len(listed) == 1 and "item 1" in listed[0] and "gone.png" in listed[0]



TINY = ["bert_config=configs/toy/config_bert.json", "image_res=32", "vision_width=128",
        "vit={patch_size: 8, depth: 2, heads: 4}", "embed_dim=32", "queue_size=40", "num_workers=2",
        "max_tokens=24", "log_every=1", "itc_warmup_steps=0", "shuffle_buffer=8"]


def pretrain(world: str, out: str, train_file: str, batch_size: int, nproc: int = 1) -> list[list[dict]]:
    """Pre-train the tiny model 2 epochs (2 loader workers per process) through tests/shard_probe.py; returns
    each rank's per-step records. ``nproc`` 2: under ``torchrun --nproc_per_node=2`` (gloo, CPU)."""
    import shard_probe

    args = ["--config", os.path.join(ROOT, "configs/toy/Pretrain.yaml"), "--output_dir", out, "--device", "cpu",
            "--override", f"toy_world={world}", f"train_file=['{train_file}']", *TINY, f"batch_size={batch_size}",
            "schedular.epochs=2"]
    if nproc == 1:
        assert shard_probe.main([out, *args]) == 0
    else:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={nproc}", os.path.join("tests", "shard_probe.py"), out, *args],
                                cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
    return [json.load(open(f"{out}.rank{r}.json")) for r in range(nproc)]


def test_pretrain_from_shards_in_one_process_and_under_torchrun(world: str, shards: str, tmp_path,
                                                                 one_thread: None) -> None:
    """Pretrain.py on make_shards.py's toy shards, 2 epochs, 2 loader workers per process: in one process
    (batch 8) and in 2 (batch 4 each) every sample is trained on once per epoch, both ranks run 5 steps an
    epoch, and the loss falls as it does from pretrain.json."""
    spec = os.path.join(shards, SPEC)
    runs = {"json": pretrain(world, str(tmp_path / "json"), os.path.join(world, "pretrain.json"), 8),
            "one": pretrain(world, str(tmp_path / "one"), spec, 8),
            "two": pretrain(world, str(tmp_path / "two"), spec, 4, nproc=2)}
    for name in ("one", "two"):
        for epoch in range(2):
            steps = [[r for r in rank if r["step"] // 5 == epoch] for rank in runs[name]]
            assert [len(s) for s in steps] == [5] * len(steps), (name, epoch)
            keys = [k for s in steps for r in s for k in r["keys"]]
            assert len(keys) == N and set(keys) == all_keys(), (name, epoch)
    logs = {name: [json.loads(line) for line in open(os.path.join(tmp_path, name, "log.txt"))] for name in runs}
    # measured: MLM fell 0.70 (JSON), 0.63 (one process), 0.39 (two); ITC rose 0.24-0.27 in all three and ITM
    # stayed at its chance level (0.64); the shard runs' epoch means within 0.12 (ITC), 0.006 (ITM) and 0.23
    # (MLM) of the JSON run's
    for name, (first, second) in logs.items():
        assert first["train_loss_mlm"] - second["train_loss_mlm"] > 0.25, (name, logs[name])
        for epoch in range(2):
            for loss, tol in (("ita", 0.3), ("itm", 0.03), ("mlm", 0.5)):
                got, want = logs[name][epoch][f"train_loss_{loss}"], logs["json"][epoch][f"train_loss_{loss}"]
                assert got == pytest.approx(want, abs=tol), (name, epoch, loss)


def test_text_assignment_pretraining_reads_shards(world: str, shards: str, tmp_path, one_thread: None) -> None:
    """Pretrain_nlvr.py (TA) takes the same train_file: one epoch of the toy shards, 5 steps of 8."""
    import Pretrain_nlvr

    out = str(tmp_path / "ta")
    record = Pretrain_nlvr.main([
        "--config", os.path.join(ROOT, "configs", "toy", "NLVR_pretrain.yaml"), "--output_dir", out, "--device",
        "cpu", "--override", "toy_world=''", f"train_file=['{os.path.join(shards, SPEC)}']", "schedular.epochs=1",
        "batch_size=8", "num_workers=2", "image_res=32", "vit={patch_size: 8, depth: 1, heads: 4}"])
    assert record["epoch"] == 0 and record["train_loss_ta"] > 0 and record["skipped_images"] == 0
    assert record["samples_per_s"] * record["epoch_seconds"] == pytest.approx(N)  # 5 steps x 8 samples


def test_entry_scripts_accept_the_shard_keys() -> None:
    """Pretrain.py and Pretrain_nlvr.py write SHARD_DEFAULTS out (their schemas import no dataset code)."""
    import Pretrain
    import Pretrain_nlvr
    from dataset import SHARD_DEFAULTS

    for script in (Pretrain, Pretrain_nlvr):
        assert {k: script.DEFAULTS[k] for k in SHARD_DEFAULTS} == SHARD_DEFAULTS, script.__name__
