"""Faults users reported, rebuilt as small inputs: uneven batches across processes, resume after a batch-size or
process-count change, and the start-up constraint checks (each a test that failed before the fix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT, tiny_albef
from dataset import DataError, ResumableSampler
from engine.train_loop import train_one_epoch
from models.albef import ALBEFBase
from models.model_retrieval import ALBEFRetrieval


# ------------------------------------------------------------------ 1. uneven batches under several processes
def _enqueue(rank: int, out: str) -> None:
    """Rank 0 enqueues 4 rows, rank 1 three (it lost an unreadable image)."""
    torch.manual_seed(0)  # the same initial queues on both ranks
    base = ALBEFBase(tiny_albef(queue_size=12), momentum=False)
    retrieval = ALBEFRetrieval(tiny_albef(queue_size=12))
    rows = 4 if rank == 0 else 3
    feats = torch.nn.functional.normalize(torch.randn(2, rows, 16, generator=torch.Generator().manual_seed(rank)),
                                          dim=-1)
    base.enqueue(feats[0], feats[1])
    retrieval.enqueue(feats[0], feats[1], torch.arange(rows) + 10 * rank)
    torch.save({"feats": feats, "base": base.state_dict(), "retrieval": retrieval.state_dict()},
               f"{out}.enqueue.{rank}")


class _Scheduler:
    def step(self, epoch: int, step: int) -> float:
        return 1.0


def _train_loop(rank: int, out: str) -> None:
    """Three steps of a DDP linear model; rank 0's rows per step: 4, 4, 0; rank 1's: 2, 4, 4."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1, bias=False))
    data = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 3, generator=data) for _ in range(6)]  # (step, rank) -> up to 4 rows
    rows = {(0, 0): 4, (0, 1): 4, (0, 2): 0, (1, 0): 2, (1, 1): 4, (1, 2): 4}
    loader = []
    for step in range(3):
        n = rows[(rank, step)]
        loader.append((xs[2 * step + rank][:n], 4 - n) if n else (4,))  # collate_skip_none: fields, dropped count
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def step_fn(m: torch.nn.Module, batch: tuple, alpha: float, global_step: int) -> dict:
        return {"loss": m(batch[0]).square().mean()}

    counter: dict = {}
    train_one_epoch(model, loader, optimizer, _Scheduler(), 1, step_fn, device=torch.device("cpu"), alpha=0.0,
                    warm_up=False, skip_counter=counter)
    torch.save({"weight": model.module.weight.detach(), "xs": xs, "counter": counter}, f"{out}.loop.{rank}")


def _uneven_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _enqueue(rank, out)
        _train_loop(rank, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def uneven_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One pair of gloo processes runs both uneven-batch cases (a spawn costs more than the cases)."""
    out = tmp_path_factory.mktemp("uneven")
    mp.spawn(_uneven_worker, args=(2, str(out / "init"), str(out / "out")), nprocs=2)
    return str(out / "out")


def test_enqueue_takes_every_row_of_uneven_ranks(uneven_run: str) -> None:
    """Rank 0 holds 4 rows, rank 1 holds 3: both queues receive all 7 in rank order, the pointer moves by 7
    (before: gloo aborted with 'Received data size doesn't match expected size')."""
    saved = [torch.load(f"{uneven_run}.enqueue.{r}", weights_only=True) for r in range(2)]
    image = torch.cat([saved[0]["feats"][0], saved[1]["feats"][0]])  # (7, E)
    text = torch.cat([saved[0]["feats"][1], saved[1]["feats"][1]])
    for name in ("base", "retrieval"):
        state = [s[name] for s in saved]
        for key in state[0]:
            assert torch.equal(state[0][key], state[1][key]), (name, key)  # identical on both ranks
        assert state[0]["queue_ptr"].item() == 7
        assert torch.equal(state[0]["image_queue"][:, :7], image.t())
        assert torch.equal(state[0]["text_queue"][:, :7], text.t())
    assert saved[0]["retrieval"]["idx_queue"][0, :8].tolist() == [0, 1, 2, 3, 10, 11, 12, -100]


def test_ranks_agree_on_short_and_empty_batches(uneven_run: str) -> None:
    """A short batch: every row of the global batch weighs the same in the gradient. A batch left empty on one
    rank: every rank skips that step (before, the other rank waited in DDP's all-reduce)."""
    saved = [torch.load(f"{uneven_run}.loop.{r}", weights_only=True) for r in range(2)]
    assert torch.equal(saved[0]["weight"], saved[1]["weight"])
    assert saved[0]["counter"]["empty_steps"] == saved[1]["counter"]["empty_steps"] == 1
    assert saved[0]["counter"]["skipped"] == saved[1]["counter"]["skipped"] == 6  # the global count on each rank
    xs = saved[0]["xs"]
    torch.manual_seed(0)
    single = torch.nn.Linear(3, 1, bias=False)  # one process, the global batch of each step
    optimizer = torch.optim.SGD(single.parameters(), lr=1.0)
    for x in (torch.cat([xs[0], xs[1][:2]]), torch.cat([xs[2], xs[3]])):  # 6 rows, then 8; step 3 skipped
        single(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.allclose(saved[0]["weight"], single.weight.detach(), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ 2. resume under another batch size or process count
def _trained_steps(n: int, batch: int, world: int, start: int, seed: int = 42) -> tuple[list[list[int]], int]:
    """The samples each step of a resumed epoch trains on (all ranks together, sorted), and its steps."""
    samplers = [ResumableSampler(n, True, seed, rank=r, world_size=world, batch_size=batch) for r in range(world)]
    shards = []
    for s in samplers:
        s.set_epoch(3)
        s.resume_from(start)
        shards.append(list(s))
    steps = len(shards[0]) // batch
    return [sorted(i for shard in shards for i in shard[k * batch:(k + 1) * batch]) for k in range(steps)], steps


@pytest.mark.parametrize("batch, world", [(8, 1), (2, 1), (4, 2), (3, 3), (1, 5)])
def test_sampler_resumes_at_the_global_sample_under_any_batch_and_world(batch: int, world: int) -> None:
    """An epoch of 40 samples checkpointed after 4 steps of 4 (16 samples): the rest of the epoch is the rest of
    the same order, none repeated, none skipped, cut only to whole global batches (before: batch 8 raised 'cannot
    skip 32 samples of a 24-sample shard', batch 2 trained 8 samples twice)."""
    full = ResumableSampler(40, True, 42, batch_size=4)
    full.set_epoch(3)
    order = full.full_order()
    assert list(full)[:16] == order[:16]
    rest, steps = _trained_steps(40, batch, world, start=16)
    assert steps == 24 // (batch * world)
    g = batch * world  # each step consumes the next g samples of the epoch's order
    assert rest == [sorted(order[16 + k * g:16 + (k + 1) * g]) for k in range(steps)]
    sampler = ResumableSampler(40, True, 42, rank=0, world_size=world, batch_size=batch)
    sampler.resume_from(16)
    assert sampler.epoch_samples() == 16 + steps * batch * world


def test_sampler_refuses_a_position_beyond_the_data() -> None:
    sampler = ResumableSampler(40, True, 42, batch_size=4)
    with pytest.raises(DataError, match="cannot resume at sample 48 of an epoch of 40"):
        sampler.resume_from(48)
    with pytest.raises(DataError, match="fewer than one global batch"):
        ResumableSampler(7, True, 0, world_size=2, batch_size=4)


TINY = ["bert_config=configs/toy/config_bert.json", "image_res=32", "vision_width=128",
        "vit={patch_size: 8, depth: 2, heads: 4}", "embed_dim=32", "queue_size=40", "num_workers=0", "max_tokens=24",
        "log_every=0", "itc_warmup_steps=0", "randaug=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    from dataset.toy_world import ensure_toy_world

    return ensure_toy_world(str(tmp_path_factory.mktemp("toy")), n_train=40, n_val=4, n_test=4)


def numbered(world: str, path: str, n: int = 40, bad: dict[int, str] | None = None) -> str:
    """The toy world's first ``n`` images with the captions 'caption number i' (a caption names its item);
    ``bad`` replaces the image of item i by a path (an unreadable image)."""
    items = json.load(open(os.path.join(world, "pretrain.json")))[:n]
    rows = [{"image": (bad or {}).get(i, it["image"]), "caption": f"caption number {i}"} for i, it in enumerate(items)]
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


def pretrain_argv(world: str, ann: str, out: str, *extra: str) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs/toy/Pretrain.yaml"), "--output_dir", out, "--device", "cpu",
            "--override", f"toy_world={world}", f"train_file=[{ann}]", *TINY, "schedular.epochs=1", *extra]


def recorded_run(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> list[dict]:
    """Pretrain.main(argv) in this process, recording each step's item numbers, alpha and global step."""
    import Pretrain

    records: list[dict] = []
    make = Pretrain.make_step_fn

    def probed_make(tokenizer: object, config: dict, device: torch.device):
        step = make(tokenizer, config, device)

        def probed(model: torch.nn.Module, batch: tuple, alpha: float, global_step: int) -> dict:
            records.append({"items": [int(c.split()[-1]) for c in batch[1]], "alpha": alpha, "step": global_step})
            return step(model, batch, alpha, global_step)

        return probed

    monkeypatch.setattr(Pretrain, "make_step_fn", probed_make)
    Pretrain.main(argv)
    return records


@pytest.fixture(scope="module")
def interrupted(world: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[dict]]:
    """One epoch of 40 items at batch 4 (10 steps) with a checkpoint after step 4: (annotations, checkpoint,
    the steps of the uninterrupted epoch)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    ann = numbered(world, str(tmp / "ann.json"))
    with pytest.MonkeyPatch.context() as mp_:
        steps = recorded_run(mp_, pretrain_argv(world, ann, str(tmp / "run"), "batch_size=4", "save_every=4",
                                                "keep_last=5"))
    return ann, str(tmp / "run" / "checkpoint_00_000004.pth"), steps


@pytest.mark.parametrize("batch", [8, 2])
def test_resume_with_another_batch_size_continues_from_the_sample(world: str, interrupted: tuple, tmp_path,
                                                                   monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """Before: batch 8 stopped with 'cannot skip 32 samples of a 24-sample shard'; batch 2 skipped 8 samples
    instead of 16, training 8 twice. Now the resumed epoch trains exactly the 24 items the uninterrupted epoch
    had left, in the same order; the step counter continues from 4, alpha follows the share of samples done."""
    ann, checkpoint, full = interrupted
    assert len(full) == 10 and torch.load(checkpoint, weights_only=False)["extra"]["position"]["samples"] == 16
    steps = recorded_run(monkeypatch, pretrain_argv(world, ann, str(tmp_path / "out"), f"batch_size={batch}",
                                                    "--resume", checkpoint))
    assert len(steps) == 24 // batch
    assert [i for s in steps for i in s["items"]] == [i for s in full[4:] for i in s["items"]]
    assert [s["step"] for s in steps] == list(range(4, 4 + 24 // batch))
    assert [s["alpha"] for s in steps] == pytest.approx([0.4 * (16 + batch * j) / 40 for j in range(24 // batch)])
    log = json.load(open(tmp_path / "out" / "log.txt"))
    assert log["epoch"] == 0


@pytest.mark.parametrize("change, message", [
    ("data", "the training data changed since the mid-epoch checkpoint (40 samples then, 36 now)"),
    ("seed", "comes from --seed 42 (now 7): resume with --seed 42"),
])
def test_resume_that_cannot_continue_says_why(world: str, interrupted: tuple, tmp_path, caplog, change: str,
                                              message: str) -> None:
    import Pretrain
    from engine.trainer import run_main

    ann, checkpoint, _ = interrupted
    extra = ["--seed", "7"] if change == "seed" else []
    if change == "data":
        ann = numbered(world, str(tmp_path / "fewer.json"), n=36)
    code = run_main(lambda: Pretrain.main(pretrain_argv(world, ann, str(tmp_path / "out"), "batch_size=4",
                                                        "--resume", checkpoint, *extra)))
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0], errors
    assert not os.path.exists(tmp_path / "out" / "log.txt")


# ------------------------------------------------------------------ 3. start-up constraint checks
BAD_VALUES = [  # (override, text the one error line must hold)
    ("batch_size=0", "batch_size must be >= 1"),
    ("vit={patch_size: 0, depth: 2, heads: 4}", "vit.patch_size must be >= 1"),
    ("queue_size=0", "queue_size must be >= 1"),
    ("queue_size=-1", "queue_size must be >= 1"),
    ("max_tokens=0", "max_tokens must be >= 2"),
    ("max_tokens=100", "max_tokens 100 exceeds max_position_embeddings 64 of bert_config"),
    ("num_workers=-1", "num_workers must be >= 0"),
    ("crop_scale=[1.5, 0.2]", "crop_scale must be [min, max] with 0 < min <= max <= 1"),
    ("schedular.sched=step", "schedular.sched must be one of 'cosine'"),
    ("optimizer.opt=sgd", "optimizer.opt must be one of 'adamw'"),
    ("schedular.warmup_epochs=-1", "schedular.warmup_epochs must be >= 0"),
    ("schedular.epochs=0", "schedular.epochs must be >= 1"),
    ("amp=fp8", "amp must be one of 'off', 'bf16', 'fp16'"),
    ("nonfinite=maybe", "nonfinite must be one of 'stop', 'skip'"),
    ("image_res=36", "image_res 36 must be a multiple of vit.patch_size 8"),
    ("embed_dim=0", "embed_dim must be >= 1"),
    ("max_words=0", "max_words must be >= 1"),
    ("momentum=2", "momentum must be in [0, 1]"),
    ("mlm_probability=1.5", "mlm_probability must be in [0, 1]"),
    ("save_every=-3", "save_every must be >= 0"),
    ("train_file=[]", "train_file is []: this run needs at least one file"),
]


def one_error(caplog: pytest.LogCaptureFixture) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("override, text", BAD_VALUES)
def test_bad_values_stop_pretraining_in_one_line_before_anything_is_built(world: str, tmp_path, caplog,
                                                                          override: str, text: str) -> None:
    """Each was a traceback (several only after the dataset and model were built) or trained silently."""
    import Pretrain
    from engine.trainer import run_main

    out = tmp_path / "out"
    argv = pretrain_argv(world, f"{world}/pretrain.json", str(out), "batch_size=4", override)
    assert run_main(lambda: Pretrain.main(argv)) == 2
    assert text in one_error(caplog)
    assert not out.exists()  # checked before the output folder is made


@pytest.mark.parametrize("override, text", BAD_VALUES)
def test_the_validator_finds_what_the_script_refuses(world: str, caplog, override: str, text: str) -> None:
    """scripts/validate_data.py runs the same checks: a config that validates also starts."""
    from scripts.validate_data import main as validate

    args = ["--config", os.path.join(ROOT, "configs/toy/Pretrain.yaml"), "--override", f"toy_world={world}",
            f"train_file=[{world}/pretrain.json]", *TINY, "batch_size=4", override]
    assert validate(args) == 1
    assert any(text in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_fine_tuning_checks_lengths_and_training_files_at_start_up(world: str, tmp_path, caplog) -> None:
    """max_tokens beyond the position table failed only at the first evaluation, after a full epoch; train_file
    [] evaluated the untouched model and wrote "mode": "train" results."""
    import Retrieval
    from engine.trainer import run_main

    base = ["--config", os.path.join(ROOT, "configs/toy/Retrieval.yaml"), "--device", "cpu", "--override",
            f"toy_world={world}", f"image_root={world}", f"train_file=[{world}/retrieval_train.json]",
            f"val_file={world}/retrieval_val.json", f"test_file={world}/retrieval_test.json", *TINY[:5]]
    for override, text in (("max_tokens=100", "max_tokens 100 exceeds max_position_embeddings 64"),
                           ("train_file=[]", "train_file is []"), ("k_test=-1", "k_test must be >= 0")):
        caplog.clear()
        out = tmp_path / override.split("=")[0]
        argv = ["--output_dir", str(out), *base, override]
        assert run_main(lambda a=argv: Retrieval.main(a)) == 2
        assert text in one_error(caplog)
        assert not out.exists()


@pytest.mark.parametrize("flags, text", [
    (["--device", "cuda"], "--device cuda: this machine has no CUDA device (use --device cpu)"),
    (["--device", "gpu"], "--device gpu: this machine has no CUDA device"),
    (["--device", "mps"], "--device mps: MPS (Apple GPU) is not available on this machine"),
    (["--device", "tpu0"], "--device 'tpu0' is not a device"),
    (["--evaluate"], "Pretrain.py does not take --evaluate"),
])
def test_command_line_mistakes_stop_in_one_line(world: str, tmp_path, caplog, monkeypatch: pytest.MonkeyPatch,
                                                flags: list[str], text: str) -> None:
    """--device without that device was a traceback after the model was built; Pretrain.py --evaluate trained."""
    import Pretrain
    from engine.trainer import run_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    argv = [a for a in pretrain_argv(world, f"{world}/pretrain.json", str(tmp_path / "out")) if a != "cpu"]
    argv.remove("--device")
    assert run_main(lambda: Pretrain.main([*argv, *flags])) == 2
    assert text in one_error(caplog)
    assert not (tmp_path / "out").exists()


def test_resume_without_a_checkpoint_yet_starts_from_the_given_weights(world: str, tmp_path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A preemptible job passes --resume every time: its first start took no --checkpoint weights (silently)."""
    import Pretrain
    from models import checkpoint

    class Loaded(Exception):
        pass

    def load_weights(model: torch.nn.Module, path: str) -> None:
        raise Loaded(path)

    monkeypatch.setattr(checkpoint, "load_weights", load_weights)
    with pytest.raises(Loaded, match="init.pth"):
        Pretrain.main(pretrain_argv(world, f"{world}/pretrain.json", str(tmp_path / "out"), "batch_size=4",
                                    "--resume", "--checkpoint", str(tmp_path / "init.pth")))


def test_retrieval_evaluate_refuses_resume(world: str, tmp_path, caplog) -> None:
    import Retrieval
    from engine.trainer import run_main

    argv = ["--config", os.path.join(ROOT, "configs/toy/Retrieval.yaml"), "--output_dir", str(tmp_path / "out"),
            "--device", "cpu", "--evaluate", "--resume"]
    assert run_main(lambda: Retrieval.main(argv)) == 2
    assert "Retrieval.py --evaluate does not take --resume" in one_error(caplog)


@pytest.mark.parametrize("case", ["empty_file", "fewer_than_a_batch"])
def test_too_little_data_ends_in_one_error_line(world: str, tmp_path, caplog, case: str) -> None:
    """An annotation file holding [] trained epochs of 0 steps and wrote checkpoints of an untrained model;
    3 items at batch 4 escaped as a bare ValueError traceback (exit 1)."""
    import Pretrain
    from engine.trainer import run_main

    ann = tmp_path / "ann.json"
    ann.write_text("[]") if case == "empty_file" else numbered(world, str(ann), n=3)
    out = tmp_path / "out"
    assert run_main(lambda: Pretrain.main(pretrain_argv(world, str(ann), str(out), "batch_size=4"))) == 2
    assert f"{0 if case == 'empty_file' else 3} samples, fewer than one global batch" in one_error(caplog)
    assert not list(out.glob("checkpoint_*")) and not (out / "log.txt").exists()


def test_validator_lists_every_problem_takes_overrides_and_infers_the_task(world: str, tmp_path, caplog) -> None:
    """Before: it accepted a string train_file that Pretrain.py rejects, flagged a missing train_file that
    Pretrain.py trained through, stopped at a file's first problem, took no --override and needed --task."""
    from scripts.validate_data import main as validate

    items = [{"image": f"{world}/images/train/{i:05d}.png", "caption": "a red circle"} for i in range(30)]
    for i in range(0, 30, 2):
        del items[i]["caption"]  # 15 bad items
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(items))
    config = tmp_path / "Mine.yaml"  # a name that names no task: inferred from the keys
    config.write_text(f"train_file: [{ann}]\nbatch_size: 4\nmlm_probability: 0.15\n"
                      "bert_config: configs/toy/config_bert.json\nvision_width: 128\nimage_res: 32\n"
                      "vit: {patch_size: 8, depth: 2, heads: 4}\n")
    assert validate(["--config", str(config), "--max-listed", "5"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert sum("missing required key 'caption'" in e for e in errors) == 5
    assert any("... and 10 more problems (15 of 30 items)" in e for e in errors)
    caplog.clear()
    good = numbered(world, str(tmp_path / "good.json"), n=8)
    assert validate(["--config", str(config), "--override", f"train_file=[{good}]"]) == 0
    caplog.clear()
    assert validate(["--config", str(config), "--override", f"train_file={good}"]) == 1  # a string: as Pretrain.py
    assert "key 'train_file' expects list" in one_error(caplog)
    caplog.clear()
    config.write_text("batch_size: 4\nmlm_probability: 0.15\nbert_config: configs/toy/config_bert.json\n")
    assert validate(["--config", str(config)]) == 1  # no train_file: Pretrain.py refuses it too
    assert "train_file is []" in caplog.text
    caplog.clear()
    config.write_text("batch_size: 4\n  mlm_probability: [0.15\n")
    assert validate(["--config", str(config), "--task", "pretrain"]) == 1
    error = one_error(caplog)
    assert "YAML syntax error" in error and "\n" not in error


# ------------------------------------------------------------------ 1+2 under torchrun: gloo, two processes
def torchrun(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 SCRIPT ARGS`` on CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def corrupt_image(tmp_path) -> str:
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return str(path)


def test_pretraining_resumed_on_two_processes_with_unreadable_images(world: str, interrupted: tuple,
                                                                     tmp_path) -> None:
    """The single-process checkpoint after 16 samples (4 steps of 4) resumed by 2 processes x 4: the rest of
    the epoch is 3 global steps of the same order (rank r takes every other sample). Item order[17] (rank 1,
    first step) is unreadable: rank 1 has 3 rows, the queues take all 7. Items order[24, 26, 28, 30] (rank 0's
    whole second batch) are unreadable: both processes skip that step. Before: gloo aborted on the uneven
    gather, or rank 1 waited forever in DDP's all-reduce; and the resume needed the same batch layout."""
    _, checkpoint, _ = interrupted
    sampler = ResumableSampler(40, True, 42, batch_size=4)  # epoch 0's order: it depends on the data size and seed
    order = sampler.full_order()
    bad = dict.fromkeys([order[17], order[24], order[26], order[28], order[30]], corrupt_image(tmp_path))
    ann = numbered(world, str(tmp_path / "ann.json"), bad=bad)
    out = tmp_path / "out"
    result = torchrun(os.path.join("tests", "ddp_probe.py"),
                      [str(tmp_path / "rec"), *pretrain_argv(world, ann, str(out), "batch_size=4", "--resume",
                                                             checkpoint)])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rec.rank{r}.pt", weights_only=True) for r in range(2)]
    items = [[[int(c.split()[-1]) for c in step["captions"]] for step in rank] for rank in ranks]
    assert items[0] == [order[16:24:2], order[32:40:2]]  # the second step skipped by both
    assert items[1] == [order[19:24:2], order[33:40:2]]  # order[17] unreadable
    for step, ptr in enumerate((23, 31)):  # 16 + 7, then + 8
        for key in ("image_queue", "text_queue", "queue_ptr"):
            assert torch.equal(ranks[0][step][key], ranks[1][step][key]), (step, key)
        assert ranks[0][step]["queue_ptr"].item() == ptr
    assert [s["alpha"] for s in ranks[0]] == pytest.approx([0.4 * 16 / 40, 0.4 * 32 / 40])
    log = json.loads((out / "log.txt").read_text())
    assert log["skipped_images"] == 5
    assert torch.load(out / "checkpoint_00.pth", weights_only=False)["model"]["queue_ptr"].item() == 31


def test_fine_tuning_on_two_processes_with_an_unreadable_image(world: str, tmp_path) -> None:
    """16 captions, 2 processes x 4: rank 1's first batch loses one caption's image; the image, text and id
    queues take the 15 readable rows on both ranks, and evaluation follows."""
    items = json.load(open(os.path.join(world, "retrieval_train.json")))[:16]
    order = ResumableSampler(16, True, 42, world_size=2, batch_size=4).full_order()
    items[order[1]]["image"] = corrupt_image(tmp_path)  # rank 1 takes order[1, 3, 5, 7] first
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(items))
    out = tmp_path / "out"
    args = ["--config", os.path.join(ROOT, "configs/toy/Retrieval.yaml"), "--output_dir", str(out), "--device",
            "cpu", "--override", f"toy_world={world}", f"train_file=[{ann}]", f"image_root={world}",
            f"val_file={world}/retrieval_val.json", f"test_file={world}/retrieval_test.json", *TINY[:5],
            "queue_size=48", "k_test=2", "num_workers=0", "batch_size_train=4", "batch_size_test=4",
            "schedular.epochs=1", "randaug=false"]
    result = torchrun("Retrieval.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((out / "log.txt").read_text())
    assert log["skipped_images"] == 1 and "val_r_mean" in log
    state = torch.load(out / "checkpoint_00.pth", weights_only=False)["model"]
    assert state["queue_ptr"].item() == 15
    assert int((state["idx_queue"] != -100).sum()) == 15
    assert json.loads((out / "result" / "retrieval_metrics.json").read_text())["test"]["r_mean"] >= 0
