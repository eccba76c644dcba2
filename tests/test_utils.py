"""Tests for utils.py: config, CLI flags, distributed no-ops, checkpoints, RNG state and the training loop."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import socket

import numpy as np
import pytest
import torch

import utils
from engine import checkpoint_io, distributed, logs, train_loop, trainer
from engine.config import ConfigError, get_parser, load_config, save_config
from scheduler import WarmupCosineScheduler

DEFAULTS = {
    "train_file": [],
    "image_root": None,
    "bert_config": "configs/config_bert.json",
    "batch_size": 64,
    "alpha": 0.4,
    "distill": True,
    "amp": "off",
    "optimizer": {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02},
    "schedular": {"sched": "cosine", "lr": 1e-4, "epochs": 30, "min_lr": 1e-5, "warmup_epochs": 20},
}


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


# ---- config ----


def test_load_config_fills_defaults_and_converts(tmp_path) -> None:
    path = _write(tmp_path, "batch_size: 8\nalpha: 1\noptimizer: {lr: '2e-5'}\nschedular:\n  min_lr: 1e-6\n")
    cfg = load_config(path, DEFAULTS)
    assert cfg["batch_size"] == 8
    assert cfg["alpha"] == 1.0 and isinstance(cfg["alpha"], float)  # int accepted for float
    assert cfg["optimizer"] == {"opt": "adamW", "lr": 2e-5, "weight_decay": 0.02}  # str parsed as float
    assert cfg["schedular"]["min_lr"] == 1e-6 and cfg["schedular"]["epochs"] == 30
    assert DEFAULTS["optimizer"]["lr"] == 1e-4  # defaults untouched


def test_unknown_key_names_key_file_and_suggestion(tmp_path) -> None:
    path = _write(tmp_path, "batch_sise: 8\n")
    with pytest.raises(ConfigError, match="batch_sise") as err:
        load_config(path, DEFAULTS)
    assert path in str(err.value) and "batch_size" in str(err.value)


def test_nested_unknown_key_is_dotted(tmp_path) -> None:
    path = _write(tmp_path, "schedular:\n  warmup_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"schedular\.warmup_epoch.*warmup_epochs"):
        load_config(path, DEFAULTS)


@pytest.mark.parametrize("text", ["batch_size: 8.5\n", "distill: 'yes'\n", "train_file: a.json\n",
                                  "alpha: abc\n", "batch_size: true\n", "optimizer: 3\n"])
def test_wrong_type_is_rejected(tmp_path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, DEFAULTS)
    assert path in str(err.value)


def test_wrong_type_message_names_expected_and_found(tmp_path) -> None:
    path = _write(tmp_path, "batch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"batch_size.*int.*list"):
        load_config(path, DEFAULTS)


def test_none_default_accepts_anything(tmp_path) -> None:
    cfg = load_config(_write(tmp_path, "image_root: [a, b]\n"), DEFAULTS)
    assert cfg["image_root"] == ["a", "b"]


def test_overrides(tmp_path) -> None:
    path = _write(tmp_path, "batch_size: 8\n")
    cfg = load_config(path, DEFAULTS, ["schedular.epochs=2", "train_file=[a.json,b.json]",
                                             "optimizer.lr=1e-4", "amp=bf16", "alpha=0.5"])
    assert cfg["schedular"]["epochs"] == 2
    assert cfg["train_file"] == ["a.json", "b.json"]
    assert cfg["optimizer"]["lr"] == 1e-4 and cfg["amp"] == "bf16" and cfg["alpha"] == 0.5


@pytest.mark.parametrize("override, pattern", [
    ("optimizer.lrr=1", r"--override 'optimizer.lrr=1'.*optimizer\.lrr.*'lr'"),
    ("batch_size=abc", r"--override 'batch_size=abc'.*batch_size.*int.*str"),
    ("batch_size", "key=value"),
    ("nope.lr=1", "unknown config key 'nope'"),
])
def test_bad_override_names_the_override(tmp_path, override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, ""), DEFAULTS, [override])


def test_yaml_syntax_error_names_file_and_line(tmp_path) -> None:
    path = _write(tmp_path, "batch_size: 8\nalpha: [0.4\nschedular: 3\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: line 3"):
        load_config(path, DEFAULTS)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"), DEFAULTS)


def test_save_config_round_trip(tmp_path) -> None:
    cfg = load_config(_write(tmp_path, "train_file: [a.json]\n"), DEFAULTS)
    out = str(tmp_path / "saved.yaml")
    save_config(cfg, out)
    assert load_config(out, DEFAULTS) == cfg


# ---- CLI ----

BASE_ARGS = ["--config", "c.yaml", "--output_dir", "out"]


def test_parser_defaults() -> None:
    args = get_parser("t").parse_args(BASE_ARGS)
    assert args.distributed is None and args.resume is None and args.checkpoint == ""
    assert args.seed == 42 and args.world_size == 1 and args.override == [] and not args.evaluate


def test_repeated_override_flags_accumulate() -> None:
    args = get_parser("t").parse_args(BASE_ARGS + ["--override", "a=1", "b=2", "--override", "c=3"])
    assert args.override == ["a=1", "b=2", "c=3"]
    assert get_parser("t").parse_args(BASE_ARGS).override == []  # the default list is not shared


@pytest.mark.parametrize("flags, expected", [
    (["--distributed", "False"], False), (["--distributed", "false"], False), (["--distributed", "0"], False),
    (["--no-distributed"], False), (["--distributed"], True), (["--distributed", "True"], True),
])
def test_distributed_flag_is_a_real_boolean(flags: list[str], expected: bool) -> None:
    # the official ``type=bool`` turned the string "False" into True
    assert get_parser("t").parse_args(BASE_ARGS + flags).distributed is expected


def test_distributed_flag_rejects_garbage() -> None:
    with pytest.raises(SystemExit):
        get_parser("t").parse_args(BASE_ARGS + ["--distributed", "maybe"])


def test_resume_flag() -> None:
    parser = get_parser("t")
    assert parser.parse_args(BASE_ARGS + ["--resume"]).resume == "latest"
    assert parser.parse_args(BASE_ARGS + ["--resume", "ck.pth"]).resume == "ck.pth"
    args = parser.parse_args(BASE_ARGS + ["--override", "a=1", "b.c=2"])
    assert args.override == ["a=1", "b.c=2"]


# ---- distributed no-ops ----


def test_distributed_helpers_without_process_group() -> None:
    assert not distributed.is_dist_initialized()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1 and distributed.is_main_process()
    distributed.barrier()
    t = torch.randn(3, 2, requires_grad=True)
    gathered = distributed.all_gather_cat(t)
    assert torch.equal(gathered, t) and not gathered.requires_grad
    assert torch.equal(distributed.all_reduce_mean(t.detach()), t.detach())
    obj = {"a": [1, 2]}
    assert distributed.broadcast_object(obj) is obj


def test_init_distributed_mode_single_process(monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = argparse.Namespace(distributed=None, device="cpu", dist_url="env://")
    distributed.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu, args.distributed) == (0, 1, 0, False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = argparse.Namespace(distributed=False, device="cpu", dist_url="env://")
    distributed.init_distributed_mode(args)  # forced single process: must not try to join a group
    assert args.distributed is False and not distributed.is_dist_initialized()


def _two_rank_worker(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    args = argparse.Namespace(distributed=None, device="cpu", dist_url="env://")
    distributed.init_distributed_mode(args)
    try:
        assert args.distributed and (distributed.get_rank(), distributed.get_world_size()) == (rank, 2)
        gathered = distributed.all_gather_cat(torch.full((2, 3), float(rank)))
        assert torch.equal(gathered, torch.tensor([0.0, 0.0, 1.0, 1.0]).unsqueeze(1).expand(4, 3))
        assert distributed.all_reduce_mean(torch.tensor([float(rank)])).item() == 0.5
        assert distributed.broadcast_object({"from": rank}) == {"from": 0}
        acc = logs.MetricAccumulator()
        acc.update(loss=torch.tensor(float(rank)), lr=0.1)
        assert acc.averages() == pytest.approx({"loss": 0.5, "lr": 0.1})
        assert acc.averages(all_ranks=False)["loss"] == rank
        # a NaN on rank 1 alone must stop (or skip) the step on both ranks
        assert train_loop._all_finite(torch.tensor(float("nan") if rank else 1.0)) is False
        distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_on_two_gloo_ranks() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_two_rank_worker, args=(port,), nprocs=2)


# ---- logging & metrics ----


def test_metric_accumulator() -> None:
    acc = logs.MetricAccumulator()
    acc.update(loss_a=torch.tensor(1.0), lr=0.1)
    acc.update(loss_a=torch.tensor(3.0), lr=0.3)
    avg = acc.averages()
    assert avg["loss_a"] == pytest.approx(2.0) and avg["lr"] == pytest.approx(0.2)
    assert acc.averages(all_ranks=False) == pytest.approx(avg)
    assert logs.MetricAccumulator().averages() == {}


def test_append_jsonl_and_setup_logging(tmp_path) -> None:
    path = str(tmp_path / "log.jsonl")
    logs.append_jsonl(path, {"epoch": 0, "loss": 1.5})
    logs.append_jsonl(path, {"epoch": 1})
    with open(path) as f:
        lines = f.read().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]
    root = logging.getLogger()
    level = root.level
    try:
        logs.setup_logging(str(tmp_path), rank=0)
        logs.setup_logging(str(tmp_path), rank=0)  # idempotent
        logging.getLogger("albef.test").info("hello")
        ours = [h for h in root.handlers if getattr(h, "_albef", False)]
        assert len(ours) == 2
        for h in ours:
            h.flush()
        assert "hello" in (tmp_path / "train.log").read_text()
    finally:
        for h in [h for h in root.handlers if getattr(h, "_albef", False)]:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)


# ---- checkpoint files ----


def test_checkpoint_names_and_order(tmp_path) -> None:
    assert checkpoint_io.checkpoint_name(3) == "checkpoint_03.pth"
    assert checkpoint_io.checkpoint_name(3, 500) == "checkpoint_03_000500.pth"
    for name in ["checkpoint_00.pth", "checkpoint_01_000100.pth", "checkpoint_01.pth", "checkpoint_best.pth",
                 "checkpoint_01_000020.pth", "other.pth"]:
        (tmp_path / name).write_bytes(b"")
    names = [os.path.basename(p) for p in checkpoint_io.list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint_01.pth", "checkpoint_01_000100.pth", "checkpoint_01_000020.pth",
                     "checkpoint_00.pth"]
    assert checkpoint_io.list_checkpoints(str(tmp_path / "missing")) == []


def test_atomic_save_keeps_last_k(tmp_path) -> None:
    out = str(tmp_path)
    checkpoint_io.save_checkpoint({"model": {}, "epoch": -1}, out, "checkpoint_best.pth")
    for epoch in range(4):
        path = checkpoint_io.save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": epoch}, out,
                                     checkpoint_io.checkpoint_name(epoch), keep_last=2)
        assert os.path.basename(path) == checkpoint_io.checkpoint_name(epoch)
    files = sorted(os.listdir(out))
    assert files == ["checkpoint_02.pth", "checkpoint_03.pth", "checkpoint_best.pth"]
    assert not any(f.endswith(".tmp") for f in files)


def test_load_latest_falls_back_on_truncated_file(tmp_path, caplog) -> None:
    out = str(tmp_path)
    assert checkpoint_io.load_latest_checkpoint(out) is None
    name = checkpoint_io.checkpoint_name
    checkpoint_io.save_checkpoint({"model": {"w": torch.zeros(64)}, "epoch": 0}, out, name(0))
    newest = checkpoint_io.save_checkpoint({"model": {"w": torch.ones(64)}, "epoch": 1}, out, name(1))
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with caplog.at_level(logging.WARNING):
        state, path = checkpoint_io.load_latest_checkpoint(out)
    assert state["epoch"] == 0 and path.endswith("checkpoint_00.pth")
    assert "checkpoint_01.pth" in caplog.text


def test_load_latest_skips_incomplete_state(tmp_path, caplog) -> None:
    out = str(tmp_path)
    checkpoint_io.save_checkpoint({"model": {}, "epoch": 0}, out, checkpoint_io.checkpoint_name(0))
    checkpoint_io.save_checkpoint({"model": {}}, out, checkpoint_io.checkpoint_name(1, 100))
    with caplog.at_level(logging.WARNING):
        state, path = checkpoint_io.load_latest_checkpoint(out)
    assert state["epoch"] == 0 and path.endswith("checkpoint_00.pth") and "missing keys" in caplog.text


def test_load_checkpoint_file_errors_name_the_path(tmp_path) -> None:
    with pytest.raises(checkpoint_io.CheckpointError, match="nope.pth"):
        checkpoint_io.load_checkpoint_file(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint_io.CheckpointError, match="bad.pth"):
        checkpoint_io.load_checkpoint_file(str(bad))


# ---- seeding ----


def _draw() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_rng_state_round_trip_through_checkpoint(tmp_path) -> None:
    utils.set_seed(7)
    state = utils.get_rng_state()
    first = _draw()
    checkpoint_io.save_checkpoint({"model": {}, "epoch": 0, "rng": state}, str(tmp_path), "checkpoint_00.pth")
    loaded = checkpoint_io.load_checkpoint_file(str(tmp_path / "checkpoint_00.pth"))  # weights_only=True
    _draw()
    utils.set_rng_state(loaded["rng"])
    second = _draw()
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    utils.set_seed(7)
    assert _draw()[0] == first[0]


# ---- training loop ----


class FakeLoader:
    """Yields ``batches[start:]`` and reports their number, like a loader whose sampler skips ``start``."""

    def __init__(self, batches: list, start: int = 0) -> None:
        self.batches, self.start = batches, start

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __iter__(self):
        return iter(self.batches[self.start:])


def _setup(n: int = 10, lr: float = 0.05):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(n, 8, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    batches = [(x[i], y[i], 0) for i in range(n)]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    sched = WarmupCosineScheduler(optimizer, {"sched": "cosine", "lr": lr, "epochs": 100, "min_lr": lr,
                                              "warmup_lr": lr, "warmup_epochs": 0})
    return model, batches, optimizer, sched


def _mse_step(record: list | None = None, bad_step: int | None = None):
    calls = {"n": 0}

    def step_fn(model, batch, alpha, global_step):
        if record is not None:
            record.append(alpha)
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
        extra = torch.tensor(float("nan")) if calls["n"] == bad_step else torch.tensor(0.0)
        calls["n"] += 1
        return {"loss_mse": loss, "loss_extra": extra, "acc": torch.tensor(1.0)}

    return step_fn


def _run(model, batches, optimizer, sched, step_fn, epoch=0, start=0, **kw):
    return train_loop.train_one_epoch(model, FakeLoader(batches, start), optimizer, sched, epoch, step_fn,
                                 device=torch.device("cpu"), alpha=0.4, warm_up=True, start_step=start, **kw)


def test_train_one_epoch_reduces_loss_and_reports_lr() -> None:
    model, batches, optimizer, sched = _setup()
    stats = [_run(model, batches, optimizer, sched, _mse_step(), epoch=e) for e in range(3)]
    assert stats[2]["loss_mse"] < stats[1]["loss_mse"] < stats[0]["loss_mse"]
    assert stats[0]["lr"] == pytest.approx(0.05) and stats[0]["acc"] == 1.0
    assert set(stats[0]) == {"loss_mse", "loss_extra", "acc", "lr"}


def test_alpha_ramp_and_on_step() -> None:
    model, batches, optimizer, sched = _setup()
    alphas: list[float] = []
    steps: list[tuple[int, int]] = []
    _run(model, batches, optimizer, sched, _mse_step(alphas), on_step=lambda e, s: steps.append((e, s)))
    assert alphas == [0.4 * min(1.0, i / 10) for i in range(10)]
    assert alphas[0] == 0.0 and steps == [(0, i + 1) for i in range(10)]
    alphas.clear()
    _run(model, batches, optimizer, sched, _mse_step(alphas), start=6)  # resumed mid-epoch 0
    assert alphas == [0.4 * min(1.0, i / 10) for i in range(6, 10)]
    alphas.clear()
    _run(model, batches, optimizer, sched, _mse_step(alphas), epoch=1)
    assert alphas == [0.4] * 10


def test_nonfinite_stop_names_the_term() -> None:
    model, batches, optimizer, sched = _setup()
    with pytest.raises(train_loop.NonFiniteLossError, match=r"epoch 0, step 3: loss_extra") as err:
        _run(model, batches, optimizer, sched, _mse_step(bad_step=3))
    assert err.value.terms == ["loss_extra"] and err.value.step == 3


def test_nonfinite_skip_mode_skips_the_update() -> None:
    model, batches, optimizer, sched = _setup()
    counter: dict = {}
    stats = _run(model, batches, optimizer, sched, _mse_step(bad_step=3), nonfinite="skip", skip_counter=counter)
    assert counter["nonfinite"] == 1
    assert all(math.isfinite(v) for v in stats.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dropped_samples_are_counted_and_capped() -> None:
    model, batches, optimizer, sched = _setup(n=6)
    batches = [(*b[:2], d) for b, d in zip(batches, [0, 1, 0, 2, 0, 0])]
    batches[4] = None  # a batch whose samples were all unreadable
    counter: dict = {}
    seen: list[float] = []
    _run(model, batches, optimizer, sched, _mse_step(seen), skip_counter=counter)
    assert counter["skipped"] == 3 and len(seen) == 5
    with pytest.raises(RuntimeError, match="max_skipped=2"):
        _run(model, batches, optimizer, sched, _mse_step(), skip_counter={}, max_skipped=2)
    counter = {"skipped": 0}
    _run(model, batches, optimizer, sched, _mse_step(), skip_counter=counter, max_skipped=3)
    assert counter["skipped"] == 3


def test_amp_is_ignored_on_cpu_and_validated() -> None:
    model, batches, optimizer, sched = _setup()
    stats = _run(model, batches, optimizer, sched, _mse_step(), amp="bf16")
    assert math.isfinite(stats["loss_mse"])
    with pytest.raises(ValueError, match="amp"):
        _run(model, batches, optimizer, sched, _mse_step(), amp="fp8")


def test_describe_queue_says_what_the_queue_holds(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="engine.trainer"):
        trainer.describe_queue(1024, 256)
        trainer.describe_queue(100, 256)
    assert "the last 4.0 global batches of 256" in caplog.text
    assert "queue_size 100 is smaller than the global batch 256" in caplog.text
