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
from conftest import ROOT
from dataset.toy_world import ensure_toy_world
from engine import checkpoint_io, trainer

TINY = ["bert_config=configs/toy/config_bert.json", "image_res=32", "vision_width=128",
        "vit={patch_size: 8, depth: 2, heads: 4}", "embed_dim=32", "batch_size=8", "queue_size=40",
        "num_workers=0", "max_tokens=24", "log_every=1", "itc_warmup_steps=3"]


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


@pytest.mark.parametrize("case", ["malformed_json", "empty_caption", "unknown_key", "missing_file", "missing_root"])
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
    elif case == "missing_root":
        ann.write_text("[]")
        extra.append(f"image_root={tmp_path / 'no_images'}")
        expect = ["image_root", "no_images", "not a folder"]
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
    code = trainer.run_main(lambda: Pretrain.main(argv(world, str(tmp_path / "o"), f"train_file=[{ann}]",
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
    found = checkpoint_io.load_latest_checkpoint(out)
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


def one_caption_per_image(world: str, path: str) -> str:
    """pretrain.json with each item's first caption only: a caption list is drawn from per fetch with the
    rank's own random stream, which would give the two runs different texts."""
    items = json.load(open(os.path.join(world, "pretrain.json")))
    first = [{"image": it["image"], "caption": it["caption"][0] if isinstance(it["caption"], list) else it["caption"]}
             for it in items]
    with open(path, "w") as f:
        json.dump(first, f)
    return path


def bert_without_dropout(path: str) -> str:
    """configs/toy/config_bert.json with dropout 0 (dropout masks come from each rank's random stream) and
    BERT's usual init std 0.02, with which the tolerances of the 2-process test were measured."""
    config = json.load(open(os.path.join(ROOT, "configs", "toy", "config_bert.json")))
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02)
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def probe_run(nproc: int, record: str, args: list[str]) -> None:
    """Run tests/ddp_probe.py (Pretrain.main recording every step) in one process or under torchrun."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per worker: the same kernels in both runs
    result = subprocess.run([sys.executable, *launch, os.path.join("tests", "ddp_probe.py"), record, *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def relative_update_gap(one: dict, two: dict, start: dict) -> float:
    """||w_two - w_one|| / ||w_one - w_start|| over the ITC-only parameters."""
    gap = torch.cat([(two[k] - one[k]).flatten() for k in one]).norm()
    return float(gap / torch.cat([(one[k] - start[k]).flatten() for k in one]).norm())


def test_two_processes_match_one_process_with_twice_the_batch(world: str, tmp_path) -> None:
    """2 processes x batch 4 against 1 process x batch 8: one epoch of 5 steps on the same 40 items.

    Both runs go through tests/ddp_probe.py, which records every rank's captions, image checksums, local
    losses, queues and ITC-only parameters (``vision_proj``, ``text_proj``, ``temp``) at every step, with a
    deterministic image transform; captions are one per image and dropout is 0, so both runs feed the same
    samples to the same initial model (rank 0 seeds like the single process; DDP broadcasts its weights and
    wrap_model its buffers). Rank r gets items r, r+2, ... of the single process's batch, so the gathered
    queue holds the single run's 8 features in the order 0 2 4 6 1 3 5 7.

    Legitimate differences: each rank's ITC softmax sees its own 4 momentum features plus the shared queue
    (4096 entries, alpha 0, no ITC warm-up) instead of 8; ITM hard negatives are drawn from each rank's own 4 items; MLM
    masks come from each rank's random stream. So losses are compared with tolerances, and the weights only
    for the ITC-only parameters, whose gradient is the (all-reduced) ITC gradient.

    Tolerances (measured on CPU, torch 2.x: first-step ITC 0.001 apart, epoch means ITC 0.016 / MLM 0.002 /
    ITM 0.0003, ITC-only update gap 2e-6 after one step and 0.012 after four, queue entries 0 after one step
    and 1.2e-4 after five): first-step ITC 0.005; epoch means ITC 0.05, MLM 0.15, ITM 0.01; ITC-only update
    gap 1e-3 after one step (0.31 without the gradient all-reduce) and 0.05 after four (0.17 without);
    queue 1e-6 after one step, 1e-3 after five. Queues and pointer must be equal on both ranks after every step.
    """
    one_caption = one_caption_per_image(world, str(tmp_path / "one_caption.json"))
    common = [f"train_file=[{one_caption}]", f"bert_config={bert_without_dropout(str(tmp_path / 'bert.json'))}",
              "queue_size=4096", "alpha=0", "itc_warmup_steps=0"]  # the queue in every step (see above)
    probe_run(1, str(tmp_path / "one"), argv(world, str(tmp_path / "one"), *common, "batch_size=8", epochs=1))
    probe_run(2, str(tmp_path / "two"), argv(world, str(tmp_path / "two"), *common, "batch_size=4", epochs=1))
    one = torch.load(tmp_path / "one.rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"two.rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 5
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # single-run batch position of each gathered feature
    for step, (single, r0, r1) in enumerate(zip(one, *ranks)):
        assert [c for pair in zip(r0["captions"], r1["captions"]) for c in pair] == single["captions"]
        assert torch.allclose(torch.stack([r0["image_sums"], r1["image_sums"]], 1).flatten(), single["image_sums"])
        for key in ("image_queue", "text_queue", "queue_ptr"):
            assert torch.equal(r0[key], r1[key]), (step, key)
        assert single["queue_ptr"].item() == r0["queue_ptr"].item() == 8 * (step + 1)
        for key in ("image_queue", "text_queue"):
            written = r0[key][:, : 8 * (step + 1)].view(-1, step + 1, 8)
            expected = single[key][:, : 8 * (step + 1)].view(-1, step + 1, 8)[:, :, order]
            assert (written - expected).abs().max() <= (1e-6 if step == 0 else 1e-3), (step, key)
        assert all(torch.equal(r0["params_before"][k], r1["params_before"][k]) for k in r0["params_before"])

    first_itc = (ranks[0][0]["losses"]["loss_ita"] + ranks[1][0]["losses"]["loss_ita"]) / 2
    assert first_itc == pytest.approx(one[0]["losses"]["loss_ita"], abs=5e-3)
    log_one, log_two = read_log(str(tmp_path / "one"))[0], read_log(str(tmp_path / "two"))[0]
    for name, tol in (("loss_ita", 0.05), ("loss_mlm", 0.15), ("loss_itm", 0.01)):
        assert log_two[f"train_{name}"] == pytest.approx(log_one[f"train_{name}"], abs=tol), name
        mean = sum(r[step]["losses"][name] for r in ranks for step in range(5)) / 10
        assert log_two[f"train_{name}"] == pytest.approx(mean, rel=1e-5)  # log.txt: means over both ranks

    start = one[0]["params_before"]
    assert relative_update_gap(one[1]["params_before"], ranks[0][1]["params_before"], start) < 1e-3
    assert relative_update_gap(one[4]["params_before"], ranks[0][4]["params_before"], start) < 0.05
