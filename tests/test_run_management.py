"""Runs a researcher can trust: signals, evaluation after the epoch's checkpoint, epoch means across a resume,
output-folder safety, provenance and timing, ``log.txt`` shape, ``checkpoint_best.pth`` as a link, paths and the
command line (data the way it arrives: ``test_data_arrival.py``).

Most tests drive ``engine.trainer.fit`` on a linear model (milliseconds a run), with real signals sent to this
process; one runs ``Pretrain.py`` in a subprocess and stops it with SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import Dataset

import utils
from conftest import ROOT
from dataset import create_loader
from engine import checkpoint_io, distributed, logs, run_state, signals, task_run, trainer
from engine.config import ConfigError, get_parser, load_config

# ------------------------------------------------------------------ a tiny run of fit


class Pairs(Dataset):
    """x (4,), y: a noisy linear target; 24 items = 6 batches of 4."""

    def __init__(self, n: int = 24) -> None:
        gen = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple:
        return self.x[i], float(self.y[i])


def config_of(epochs: int = 2, **kw: object) -> dict:
    config = {"optimizer": {"opt": "adamW", "lr": 1e-2, "weight_decay": 0.0},
              "schedular": {"sched": "cosine", "lr": 1e-2, "epochs": epochs, "min_lr": 1e-4, "warmup_lr": 1e-2,
                            "warmup_epochs": 0},
              "amp": "off", "alpha": 0.4, "warm_up": False, "grad_clip": 0.0, "nonfinite": "stop",
              "max_skipped_images": -1, "log_every": 0, "save_every": 0, "keep_last": 2, "compile": False,
              "vision_width": 4}
    config.update(kw)
    return config


def args_of(out: str, resume: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(output_dir=out, resume=resume, checkpoint="", evaluate=False, seed=0,
                              script="Task.py", argv=["--output_dir", out])


def step_fn(hook=None):
    def step(model: torch.nn.Module, batch: tuple, alpha: float, global_step: int) -> dict[str, torch.Tensor]:
        if hook is not None:
            hook(global_step)
        x, y = batch
        pred = model(x).squeeze(-1)
        weight = 1 + 0.5 * torch.rand(())  # the global random stream matters, as dropout and masking make it
        return {"loss_mse": weight * torch.nn.functional.mse_loss(pred, y.float()), "err": (pred - y).abs().mean()}
    return step


def run_fit(out: str, config: dict, resume: str | None = None, hook=None, evaluate=None, score=None,
            init_seed: int = 0) -> dict:
    """One call of ``fit`` as an entry script makes it (seeded, then the model and the loader)."""
    os.makedirs(out, exist_ok=True)
    utils.set_seed(0)
    torch.manual_seed(init_seed)  # a resumed run must not depend on its initial weights
    model = torch.nn.Linear(4, 1)
    loader = create_loader(Pairs(), 4, 0, shuffle=True, seed=0, drop_last=True, rank=distributed.get_rank(),
                           world_size=distributed.get_world_size())
    return trainer.fit(model, loader, step_fn(hook), config, args_of(out, resume), torch.device("cpu"),
                       evaluate=evaluate, score=score)


def weights(path: str) -> dict[str, torch.Tensor]:
    return checkpoint_io.load_checkpoint_file(path)["model"]


def read_log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def train_means(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith("train_") or k == "epoch"}


def kill_self_at(step: int, sig: int = signal.SIGTERM):
    def hook(global_step: int) -> None:
        if global_step == step:
            os.kill(os.getpid(), sig)
    return hook


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An uninterrupted 2-epoch run (6 steps an epoch)."""
    out = str(tmp_path_factory.mktemp("reference"))
    run_fit(out, config_of())
    return out


# ------------------------------------------------------------------ interruption


def test_sigterm_mid_epoch_stops_with_a_checkpoint_and_resumes_exactly(reference: str, tmp_path, caplog) -> None:
    out = str(tmp_path)
    with pytest.raises(signals.RunInterrupted) as stop:
        run_fit(out, config_of(), hook=kill_self_at(3))  # SIGTERM during iteration 3 of epoch 0
    message = str(stop.value)
    assert "stopped by SIGTERM at epoch 0, iteration 4" in message
    assert message.endswith("resume with: python Task.py --output_dir " + out + " --resume")
    assert sorted(os.listdir(out)) == ["checkpoint_00_000004.pth"]  # no log line: the epoch is not over
    with caplog.at_level(logging.INFO):
        run_fit(out, config_of(), resume="latest", init_seed=1)
    assert "resumed from" in caplog.text
    a, b = weights(os.path.join(reference, "checkpoint_01.pth")), weights(os.path.join(out, "checkpoint_01.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the epoch means of the resumed epoch cover all its 6 steps, not the 2 after the resume
    assert [train_means(r) for r in read_log(out)] == [train_means(r) for r in read_log(reference)]


def test_run_main_exit_codes_and_one_line(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        code = trainer.run_main(lambda: run_fit(str(tmp_path), config_of(), hook=kill_self_at(2, signal.SIGINT)))
    assert code == signals.EXIT_INTERRUPTED == 75
    lines = [r.getMessage() for r in caplog.records if "resume with:" in r.getMessage()]
    assert len(lines) == 1 and "stopped by SIGINT" in lines[0] and "Traceback" not in caplog.text


def test_the_resume_command_repeats_the_run_with_resume(monkeypatch) -> None:
    args = argparse.Namespace(script="Pretrain.py", argv=["--config", "c.yaml", "--resume", "old.pth", "--override",
                                                          "vit={depth: 2}", "--seed", "3"])
    assert logs.resume_command(args) == "python Pretrain.py --config c.yaml --override 'vit={depth: 2}' --seed 3 " \
                                        "--resume"
    monkeypatch.setattr(logs, "get_world_size", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert logs.resume_command(args).startswith("torchrun --nproc_per_node=8 --nnodes=2 Pretrain.py --config")


def test_second_signal_during_a_checkpoint_write_leaves_the_previous_one(reference: str, tmp_path,
                                                                         monkeypatch) -> None:
    """The first SIGTERM asks for a stop; the second lands inside ``torch.save`` of the stop checkpoint: the run
    exits at once (143), the half-written temporary file is gone, the periodic checkpoint before is intact."""
    out = str(tmp_path)
    monkeypatch.setattr(signals, "SAME_REQUEST_S", 0.0)
    real_save = torch.save
    calls = {"n": 0}

    def save_interrupted(obj: object, f: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # checkpoints at iterations 2 and 4, then the stop checkpoint at 5
            f.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(obj, f)

    monkeypatch.setattr(checkpoint_io.torch, "save", save_interrupted)
    code = trainer.run_main(lambda: run_fit(out, config_of(save_every=2), hook=kill_self_at(4)))
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)
    assert code == 128 + signal.SIGTERM
    assert sorted(os.listdir(out)) == ["checkpoint_00_000002.pth", "checkpoint_00_000004.pth"]
    assert checkpoint_io.load_checkpoint_file(os.path.join(out, "checkpoint_00_000004.pth"))["step"] == 4
    run_fit(out, config_of(save_every=2), resume="latest", init_seed=1)
    a, b = weights(os.path.join(reference, "checkpoint_01.pth")), weights(os.path.join(out, "checkpoint_01.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _two_rank_stop(rank: int, init_file: str, root: str) -> None:
    """Rank 1 alone gets SIGTERM: both ranks stop after the same step, rank 0 writes the checkpoint, and the
    resumed run matches an uninterrupted one (weights exactly, epoch means up to float32 summation order)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ref, out = os.path.join(root, "ref"), os.path.join(root, "out")
        run_fit(ref, config_of())
        try:
            run_fit(out, config_of(), hook=kill_self_at(1) if rank == 1 else None)
            stopped = "finished"
        except signals.RunInterrupted as exc:
            stopped = str(exc)
        files = sorted(os.listdir(out))
        run_fit(out, config_of(), resume="latest", init_seed=1)
        torch.save({"stopped": stopped, "files": files}, os.path.join(root, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_stop_together_and_resume(tmp_path) -> None:
    torch.multiprocessing.spawn(_two_rank_stop, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert "stopped by SIGTERM at epoch 0, iteration 2" in result["stopped"] or rank == 0
        assert result["stopped"] != "finished" and result["files"] == ["checkpoint_00_000002.pth"]
    a, b = weights(str(tmp_path / "ref" / "checkpoint_01.pth")), weights(str(tmp_path / "out" / "checkpoint_01.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(read_log(str(tmp_path / "ref")), read_log(str(tmp_path / "out"))):
        assert train_means(x) == pytest.approx(train_means(y), rel=1e-6)


def test_sigterm_to_a_pretraining_process(tmp_path) -> None:
    """A real process: SIGTERM -> exit 75, one line with the exact --resume command, which then finishes it."""
    from dataset.toy_world import ensure_toy_world

    world = ensure_toy_world(str(tmp_path / "toy"), n_train=40, n_val=2, n_test=2)
    out = str(tmp_path / "run")
    argv = ["--config", "configs/toy/Pretrain.yaml", "--output_dir", out, "--device", "cpu", "--override",
            f"toy_world={world}", f"train_file=[{world}/pretrain.json]", "bert_config=configs/toy/config_bert.json",
            "image_res=32", "vision_width=128", "vit={patch_size: 8, depth: 1, heads: 4}", "embed_dim=16",
            "batch_size=4", "queue_size=8", "num_workers=0", "max_tokens=16", "save_every=2",
            "schedular.epochs=1"]
    proc = subprocess.Popen([sys.executable, "Pretrain.py", *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    first = os.path.join(out, "checkpoint_00_000002.pth")
    deadline = time.time() + 240
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "resume with:" in line]
    assert len(lines) == 1 and "stopped by SIGTERM " in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[:2] == ["python", "Pretrain.py"] and command[-1] == "--resume"
    import Pretrain

    record = Pretrain.main(command[2:])
    assert record["epoch"] == 0 and [r["epoch"] for r in read_log(out)] == [0]


# ------------------------------------------------------------------ evaluation never loses training


def test_a_crash_in_evaluation_leaves_the_epochs_checkpoint(reference: str, tmp_path, caplog) -> None:
    out = str(tmp_path)
    seen: list[int] = []

    def broken(model: torch.nn.Module, epoch: int) -> dict:
        if epoch == 1:
            raise ValueError("not enough values to unpack")
        seen.append(epoch)
        return {"val_score": 1.0}

    with pytest.raises(ValueError):
        run_fit(out, config_of(), evaluate=broken, score="val_score")
    assert os.path.isfile(os.path.join(out, "checkpoint_01.pth")) and [r["epoch"] for r in read_log(out)] == [0]

    def fixed(model: torch.nn.Module, epoch: int) -> dict:
        seen.append(epoch)
        return {"val_score": 2.0}

    with caplog.at_level(logging.INFO):
        record = run_fit(out, config_of(), resume="latest", evaluate=fixed, score="val_score")
    assert seen == [0, 1] and "epoch 1 was saved but not evaluated" in caplog.text
    assert "is complete (2 of 2 epochs)" in caplog.text
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1] and record == log[-1] and record["best_epoch"] == 1
    assert train_means(log[1]) == train_means(read_log(reference)[1])  # trained once, logged once
    assert os.path.samefile(os.path.join(out, "checkpoint_best.pth"), os.path.join(out, "checkpoint_01.pth"))


def test_a_signal_during_evaluation_stops_at_once_and_the_resume_evaluates(tmp_path) -> None:
    out = str(tmp_path)

    def slow(model: torch.nn.Module, epoch: int) -> dict:
        if epoch == 0 and not os.path.exists(os.path.join(out, "signalled")):
            open(os.path.join(out, "signalled"), "w").close()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # interrupted before this ends
        return {"val_score": float(epoch)}

    with pytest.raises(signals.RunInterrupted, match="during the evaluation of epoch 0.*--resume"):
        run_fit(out, config_of(epochs=1), evaluate=slow, score="val_score")
    assert not os.path.exists(os.path.join(out, "log.txt"))
    run_fit(out, config_of(epochs=1), resume="latest", evaluate=slow, score="val_score")
    assert [r["epoch"] for r in read_log(out)] == [0]


def test_evaluation_leaves_the_training_random_streams_alone(reference: str, tmp_path) -> None:
    def draws(model: torch.nn.Module, epoch: int) -> dict:
        torch.rand(100)  # an evaluation loader or dropout would draw from the same generator
        return {}

    out = str(tmp_path)
    run_fit(out, config_of(), evaluate=draws)
    a, b = weights(os.path.join(reference, "checkpoint_01.pth")), weights(os.path.join(out, "checkpoint_01.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ output folders


def test_a_used_output_folder_needs_resume(reference: str, tmp_path) -> None:
    args = args_of(reference)
    with pytest.raises(ConfigError, match=r"already holds a run's checkpoints \(checkpoint_01.pth, 2 in all\): add "
                                          r"--resume to continue that run, or choose a new --output_dir"):
        run_state.check_output_dir_use(args)
    args.evaluate = True
    with pytest.raises(ConfigError, match="--evaluate would overwrite"):
        run_state.check_output_dir_use(args)
    run_state.check_output_dir_use(args_of(reference, resume="latest"))  # allowed
    only_log = tmp_path / "only_log"
    only_log.mkdir()
    (only_log / "log.txt").write_text(open(os.path.join(reference, "log.txt")).readline())
    with pytest.raises(ConfigError, match=r"\(log.txt with epoch lines, 1 in all\)"):
        run_state.check_output_dir_use(args_of(str(only_log)))


def test_second_pretraining_run_into_a_used_folder_refuses_in_one_line(tmp_path, caplog) -> None:
    import Pretrain

    out = tmp_path / "used"
    out.mkdir()
    (out / "checkpoint_00.pth").write_bytes(b"x")
    argv = ["--config", "configs/toy/Pretrain.yaml", "--output_dir", str(out), "--device", "cpu"]
    with caplog.at_level(logging.ERROR):
        assert trainer.run_main(lambda: Pretrain.main(argv)) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "--resume" in errors[0].getMessage()
    assert sorted(os.listdir(out)) == ["checkpoint_00.pth"]  # nothing written: no config.yaml, no train.log


def test_resuming_a_finished_run_says_it_is_complete(reference: str, caplog) -> None:
    before = open(os.path.join(reference, "log.txt")).read()
    with caplog.at_level(logging.INFO):
        record = run_fit(reference, config_of(), resume="latest")
    assert "is complete (2 of 2 epochs): nothing left to train" in caplog.text
    assert record == read_log(reference)[-1] and open(os.path.join(reference, "log.txt")).read() == before


def test_a_changed_config_is_logged_and_model_sizes_refuse(reference: str, tmp_path, caplog) -> None:
    out = str(tmp_path)
    with open(os.path.join(reference, "checkpoint_00.pth"), "rb") as src:
        (tmp_path / "checkpoint_00.pth").write_bytes(src.read())
    (tmp_path / "log.txt").write_text(open(os.path.join(reference, "log.txt")).readline())
    with pytest.raises(ConfigError, match="cannot resume .* with another vision_width"):
        run_fit(out, config_of(vision_width=8), resume="latest")
    with caplog.at_level(logging.WARNING):
        run_fit(out, config_of(epochs=3), resume="latest")
    assert "schedular.epochs: 2 -> 3" in caplog.text
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2]


# ------------------------------------------------------------------ provenance, timing, log.txt, best checkpoint


def test_log_lines_have_one_shape_float32_values_and_timing(reference: str) -> None:
    log = read_log(reference)
    assert len({tuple(sorted(r)) for r in log}) == 1
    assert {"epoch_seconds", "samples_per_s", "peak_mem_mb", "skipped_images", "train_lr"} <= set(log[0])
    assert log[0]["samples_per_s"] > 0 and log[0]["peak_mem_mb"] > 0
    text = open(os.path.join(reference, "log.txt")).read()
    assert '"train_lr": 0.01' in text  # the lr of epoch 0, not 0.009999999776482582
    assert logs.round32(9.999999747378752e-05) == 1e-4 and logs.round32({"a": [0.1 + 0.2]}) == {"a": [0.3]}


def test_provenance_is_logged(tmp_path, caplog) -> None:
    import Pretrain

    argv = ["--config", "configs/toy/Pretrain.yaml", "--output_dir", str(tmp_path), "--device", "cpu",
            "--seed", "7", "--override", "toy_world=", "train_file=[]"]
    args = get_parser("t").parse_args(argv)
    with caplog.at_level(logging.INFO):
        trainer.setup_run(args, Pretrain.DEFAULTS)
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        model[1].requires_grad_(False)
        trainer.logger.info("parameters: %d in all, %d trainable", *logs.count_parameters(model))
    text = caplog.text
    assert "command: python" in text and "--seed 7" in text
    assert "seed 7, device cpu" in text and "1 process(es), git commit " in text
    assert "versions: python " in text and " torch " in text
    assert "parameters: 11 in all, 8 trainable" in text
    assert "pre-training from scratch" in text  # neither vit_init nor bert_init


def test_saved_checkpoint_is_logged_and_best_is_a_link(tmp_path, caplog) -> None:
    out = str(tmp_path)
    scores = {0: 1.0, 1: 3.0, 2: 2.0}
    with caplog.at_level(logging.INFO):
        run_fit(out, config_of(epochs=3, keep_last=1), evaluate=lambda m, e: {"val_s": scores[e]}, score="val_s")
    assert f"saved checkpoint {os.path.join(out, 'checkpoint_02.pth')}" in caplog.text
    best = os.path.join(out, "checkpoint_best.pth")
    assert sorted(os.listdir(out)) == ["checkpoint_02.pth", "checkpoint_best.pth", "log.txt"]
    assert os.stat(best).st_nlink == 1  # checkpoint_01.pth was rotated away; its data lives on as the best
    assert checkpoint_io.load_checkpoint_file(best)["epoch"] == 1
    assert [r["best_epoch"] for r in read_log(out)] == [0, 1, 1]


def test_best_is_a_small_pointer_file_where_hard_links_fail(tmp_path, monkeypatch) -> None:
    from models.checkpoint import read_state_dict

    def no_links(src: str, dst: str) -> None:
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    out = str(tmp_path)
    scores = {0: 1.0, 1: 3.0, 2: 2.0}
    run_fit(out, config_of(epochs=3, keep_last=1), evaluate=lambda m, e: {"val_s": scores[e]}, score="val_s")
    best = os.path.join(out, "checkpoint_best.pth")
    assert os.path.getsize(best) < 100
    assert os.path.isfile(os.path.join(out, "checkpoint_01.pth"))  # kept: the pointer names it
    assert checkpoint_io.load_checkpoint_file(best)["epoch"] == 1
    state, ckpt = read_state_dict(best)  # what --checkpoint reads
    assert ckpt["epoch"] == 1
    assert torch.equal(state["weight"], weights(os.path.join(out, "checkpoint_01.pth"))["weight"])
    run_fit(out, config_of(epochs=4, keep_last=1), resume=best)  # --resume PATH follows it too
    assert [r["epoch"] for r in read_log(out)][-1] == 3


# ------------------------------------------------------------------ start-up warnings, command line, paths


def test_one_warning_line_for_each_flag_that_does_nothing(caplog) -> None:
    def warnings_for(flags: list[str], config: dict) -> list[str]:
        caplog.clear()
        args = get_parser("t").parse_args(["--config", "c", "--output_dir", "o", *flags])
        args.distributed = False
        with caplog.at_level(logging.WARNING):
            run_state.startup_warnings(args, config)
        return [r.getMessage() for r in caplog.records]

    fine_tune = {"val_file": "", "test_file": ""}
    pretrain = {"vit_init": "", "bert_init": False}
    found = warnings_for(["--world_size", "2", "--checkpoint", "a.pth"], fine_tune)
    assert len(found) == 1 and "torchrun --nproc_per_node=2" in found[0]
    found = warnings_for(["--evaluate", "--checkpoint", "a.pth"], fine_tune)
    assert len(found) == 1 and "--evaluate with no val_file or test_file set" in found[0]
    found = warnings_for([], {**fine_tune, "val_file": "v.json"})
    assert len(found) == 1 and "fine-tuning with no --checkpoint" in found[0]
    found = warnings_for([], pretrain)
    assert len(found) == 1 and "pre-training from scratch" in found[0] and "DeiT-B/16" in found[0]
    assert warnings_for([], {"vit_init": "deit.pth", "bert_init": True}) == []
    assert warnings_for(["--checkpoint", "a.pth"], {**fine_tune, "val_file": "v.json"}) == []


ENTRY_SCRIPTS = ("Pretrain.py", "Retrieval.py", "VQA.py", "SNLI_VE.py", "NLVR.py", "Pretrain_nlvr.py", "Grounding.py")


def test_help_is_fast_complete_and_keeps_the_examples() -> None:
    for script in sorted(ENTRY_SCRIPTS, key=lambda name: name == "Retrieval.py"):  # its help is checked below
        result = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        assert "torch" not in imported and "engine.config" in imported, script
    text = result.stdout
    assert "--output_dir output/toy_retrieval \\\n        --checkpoint" in text  # not reflowed
    assert "\n  --no-distributed " in text and "[--no-distributed]" in text  # a plain switch, no [BOOL]
    blocks = text.split("options:")[1].split("\n  -")[1:]
    for block in blocks:
        flag, first, *_ = block.split()
        assert len(block.split()) > 2, f"{flag} has no help"
        takes_value = first.lstrip("[").isupper()  # CONFIG, [PATH], [BOOL], [KEY=VALUE ...]; switches have none
        if takes_value and flag not in ("-config", "-output_dir"):  # the two required flags have no default
            assert "default" in block, f"{flag} shows no default"
    import Grounding
    from models.gradcam import MODES

    assert Grounding.GRADCAM_MODES == MODES  # written out in Grounding.py for --help


def test_override_with_nothing_after_the_equals_sign_is_the_empty_string(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("image_root: images\nbatch_size: 4\n")
    defaults = {"image_root": "x", "batch_size": 1}
    assert load_config(str(path), defaults, ["image_root="])["image_root"] == ""
    with pytest.raises(ConfigError, match="batch_size.*expects int, found str"):
        load_config(str(path), defaults, ["batch_size="])


def test_shipped_paths_resolve_from_anywhere_and_the_toy_world_is_used_only_when_configured(tmp_path,
                                                                                          monkeypatch) -> None:
    import Pretrain

    monkeypatch.chdir(tmp_path)
    config = load_config("configs/toy/Pretrain.yaml", Pretrain.DEFAULTS)
    assert config["bert_config"] == os.path.join(ROOT, "configs", "toy", "config_bert.json")
    assert config["toy_world"] == os.path.join(ROOT, "data", "toy")
    assert config["train_file"] == [os.path.join(ROOT, "data", "toy", "pretrain.json")]
    assert trainer._uses_toy_world(config)
    monkeypatch.chdir(ROOT)  # the same files from the project folder: a resume from there sees no change
    assert load_config("configs/toy/Pretrain.yaml", Pretrain.DEFAULTS)["bert_config"] == config["bert_config"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.json").write_text("[]")
    config = load_config("configs/toy/Pretrain.yaml", Pretrain.DEFAULTS, ["train_file=[mine.json]"])
    assert config["train_file"] == [str(tmp_path / "mine.json")]  # the user's own file, from where they are
    assert not trainer._uses_toy_world(config)  # so no 49 MB toy world is generated for it
    from models.tokenizer import TextTokenizer

    assert TextTokenizer("bert-base-uncased").vocab_size == 30522  # the shipped vocabulary, from anywhere


def test_result_files_are_replaced_whole(tmp_path) -> None:
    """task_run.write_result_file: result/<name> as JSON, an older file replaced, no temporary file left over."""
    first = task_run.write_result_file(str(tmp_path), "x_metrics.json", {"acc": 1.5, "rows": [1, 2]}, indent=2)
    assert first == str(tmp_path / "result" / "x_metrics.json")
    assert json.loads((tmp_path / "result" / "x_metrics.json").read_text()) == {"acc": 1.5, "rows": [1, 2]}
    task_run.write_result_file(str(tmp_path), "x_metrics.json", [3])
    assert json.loads((tmp_path / "result" / "x_metrics.json").read_text()) == [3]
    assert sorted(os.listdir(tmp_path / "result")) == ["x_metrics.json"]
