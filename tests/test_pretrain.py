"""Pretrain.py end to end on a small toy world: training, log and checkpoints, clear failures, exact resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import Pretrain
import utils
from conftest import ROOT
from dataset.toy_world import ensure_toy_world

TINY = ["bert_config=configs/toy/config_bert.json", "image_res=32", "vision_width=128",
        "vit={patch_size: 8, depth: 2, heads: 4}", "embed_dim=32", "batch_size=8", "queue_size=40",
        "num_workers=0", "max_tokens=24", "log_every=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_toy_world(str(tmp_path_factory.mktemp("toy")), n_train=40, n_val=4, n_test=4)


def argv(world: str, out: str, *extra: str, epochs: int = 2) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs/toy/Pretrain.yaml"), "--output_dir", out, "--device", "cpu",
            "--override", f"toy_world={world}", f"train_file=[{world}/pretrain.json]", *TINY,
            f"schedular.epochs={epochs}", *extra]


def read_log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def test_pretrain_main_trains_logs_and_checkpoints(world: str, tmp_path) -> None:
    out = str(tmp_path / "run")
    record = Pretrain.main(argv(world, out))
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    assert record == log[-1]
    for key in ("train_loss_ita", "train_loss_itm", "train_loss_mlm", "train_lr"):
        assert all(isinstance(r[key], float) and r[key] == r[key] for r in log)
    ckpt = torch.load(os.path.join(out, "checkpoint_01.pth"), weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "config", "epoch"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["config"]["batch_size"] == 8
    assert "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight" in ckpt["model"]
    assert os.path.isfile(os.path.join(out, "config.yaml"))


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "Pretrain.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("case", ["malformed_json", "empty_caption", "unknown_key", "missing_file"])
def test_bad_inputs_end_in_one_clear_message(world: str, tmp_path, case: str) -> None:
    ann = tmp_path / "ann.json"
    extra: list[str] = [f"train_file=[{ann}]"]
    if case == "malformed_json":
        ann.write_text('[{"image": "a.png", "caption": "x"},\n {"image": }]')
        expect = [str(ann), "line 2"]
    elif case == "empty_caption":
        ann.write_text(json.dumps([{"image": f"{world}/images/train/00000.png", "caption": "  "}]))
        expect = [str(ann), "0"]
    elif case == "unknown_key":
        ann.write_text("[]")
        extra.append("batch_sise=4")
        expect = ["batch_sise", "batch_size"]
    else:
        extra = [f"train_file=[{tmp_path / 'nope.json'}]"]
        expect = ["nope.json"]
    result = run_cli(argv(world, str(tmp_path / "out"), *extra))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(error_lines) == 1 and all(e in error_lines[0] for e in expect), result.stderr[-2000:]


def test_unreadable_images_are_skipped_and_counted(world: str, tmp_path, caplog) -> None:
    items = json.load(open(os.path.join(world, "pretrain.json")))[:16]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    items[0]["image"] = str(tmp_path / "missing.png")
    items[1]["image"] = str(corrupt)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(items))
    out = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        Pretrain.main(argv(world, out, f"train_file=[{ann}]", epochs=1))
    assert read_log(out)[0]["skipped_images"] == 2
    assert "missing.png" in caplog.text and "corrupt.png" in caplog.text


def test_too_many_skipped_images_stop_with_a_summary(world: str, tmp_path) -> None:
    items = [{"image": str(tmp_path / f"missing{i}.png"), "caption": "a red circle"} for i in range(16)]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(items))
    code = utils.run_main(lambda: Pretrain.main(argv(world, str(tmp_path / "o"), f"train_file=[{ann}]",
                                                     "max_skipped_images=3", epochs=1)))
    assert code == 2


def state_of(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(world: str, tmp_path) -> None:
    """Kill the run right after its first mid-epoch checkpoint; --resume must reach the same weights."""
    common = ["save_every=2", "keep_last=3"]
    ref = str(tmp_path / "ref")
    assert run_cli(argv(world, ref, *common)).returncode == 0
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "Pretrain.py", *argv(world, out, *common)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = os.path.join(out, "checkpoint_00_000004.pth")
    deadline = time.time() + 240
    while not os.path.exists(target) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(target) and not os.path.exists(os.path.join(out, "checkpoint_01.pth"))
    result = run_cli(argv(world, out, *common, "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr
    a, b = state_of(os.path.join(ref, "checkpoint_01.pth")), state_of(os.path.join(out, "checkpoint_01.pth"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_falls_back_when_the_newest_checkpoint_is_truncated(world: str, tmp_path) -> None:
    out = str(tmp_path / "run")
    Pretrain.main(argv(world, out, "save_every=2", "keep_last=4", epochs=1))
    newest = os.path.join(out, "checkpoint_00.pth")
    data = open(newest, "rb").read()
    with open(newest, "wb") as f:
        f.write(data[: len(data) // 2])
    found = utils.load_latest_checkpoint(out)
    assert found is not None and found[1].endswith("checkpoint_00_000004.pth")


def test_two_processes_with_torchrun_on_cpu(world: str, tmp_path) -> None:
    """torchrun --nproc_per_node=2 (gloo): both ranks train, rank 0 alone writes the log and checkpoint."""
    out = str(tmp_path / "ddp")
    args = argv(world, out, "batch_size=4", "queue_size=48", epochs=1)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29531", "Pretrain.py", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 per process x 2 process(es) = 8 global" in result.stderr
    log = read_log(out)
    assert len(log) == 1 and log[0]["epoch"] == 0
    state = torch.load(os.path.join(out, "checkpoint_00.pth"), weights_only=True)["model"]
    assert state["queue_ptr"].item() == 40  # 40 items / global batch 8 = 5 steps, each enqueuing 8 features
