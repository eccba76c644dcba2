"""The shared task runner: ``setup_run`` (distributed, config, logging, seeds, toy world), ``fit`` (train,
evaluate, checkpoint, resume) and ``run_main`` (one-line errors and exit code 2)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

import utils
from engine import checks, run_state, signals
from engine.checkpoint_io import (
    CheckpointError,
    checkpoint_name,
    link_best,
    load_checkpoint_file,
    load_latest_checkpoint,
    save_checkpoint,
)
from engine.config import ConfigError, load_config, save_config
from engine.distributed import (
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_dist_initialized,
    is_main_process,
)
from engine.logs import (
    MetricAccumulator,
    append_jsonl,
    count_parameters,
    git_commit,
    log_run_info,
    peak_memory_mb,
    resume_command,
    round32,
    setup_logging,
)
from engine.train_loop import NonFiniteLossError, SkippedImagesError, train_one_epoch

logger = logging.getLogger(__name__)



def setup_run(args: argparse.Namespace, defaults: dict,
              hooks: Iterable[checks.Hook] = ()) -> tuple[dict, torch.device]:
    """Distributed init, config, output folder, logging, seeds, toy world. Returns (config, device).

    ``--device`` and the config are checked (``engine.checks``: the common rules and the task's ``hooks``) before
    anything is written: a bad value ends in one ``ConfigError`` line.
    """
    args.device = checks.check_device(args.device)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    init_distributed_mode(args)
    config = load_config(args.config, defaults, args.override)
    checks.check_config(config, args.config + (" with --override" if args.override else ""), hooks)
    from models.checkpoint import set_allow_partial  # --checkpoint loads stop on suspicious keys unless allowed

    set_allow_partial(bool(getattr(args, "allow_partial", False) or config.get("allow_partial", False)))
    run_state.check_output_dir_use(args)
    _check_output_dir(args.output_dir)
    setup_logging(args.output_dir, get_rank())
    device = torch.device(args.device)
    if device.type == "cuda" and args.distributed:
        device = torch.device("cuda", args.gpu)
    log_run_info(args, device, logger)
    run_state.startup_warnings(args, config)
    if args.evaluate and args.checkpoint:  # evaluate at the checkpoint's own resolution and sizes (its metadata)
        from models.checkpoint_info import adopt_checkpoint_sizes

        config = adopt_checkpoint_sizes(config, args.checkpoint, args.override, args.output_dir)
    if _uses_toy_world(config):
        if is_main_process() and not os.path.isfile(os.path.join(config["toy_world"], "manifest.json")):
            from dataset.toy_world import ensure_toy_world
            ensure_toy_world(config["toy_world"])
        barrier()
    if is_main_process():
        save_config(config, os.path.join(args.output_dir, "config.yaml"))
    utils.set_seed(args.seed)
    _check_image_root(config, args.config)
    batch = config.get("batch_size", config.get("batch_size_train"))
    if batch is not None:
        logger.info("batch size %d per process x %d process(es) = %d global", batch, get_world_size(),
                    batch * get_world_size())
        if config.get("queue_size"):
            describe_queue(config["queue_size"], batch * get_world_size())
    return config, device


def _uses_toy_world(config: dict) -> bool:
    """Whether any configured data file or folder (``*_file``, ``*_root``) lies in the ``toy_world`` folder."""
    world = config.get("toy_world")
    if not world:
        return False
    world = os.path.abspath(world)
    paths = []
    for key, value in config.items():
        if key.endswith(("_file", "_root")):
            paths += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v]
    return any(os.path.commonpath([world, os.path.abspath(p)]) == world for p in paths)


def _check_image_root(config: dict, source: str) -> None:
    root = config.get("image_root")
    if root and not os.path.isdir(root):
        raise ConfigError(f"image_root {root!r} (in {source} or --override) is not a folder")


def describe_queue(queue_size: int, global_batch: int) -> None:
    """Say what the ITC queues hold: any size works (ring buffer), but a small one holds less than a batch."""
    if queue_size < global_batch:
        logger.warning("queue_size %d is smaller than the global batch %d: each step overwrites the whole queue "
                       "with part of that batch's momentum features", queue_size, global_batch)
    else:
        logger.info("ITC queues: %d momentum features each = the last %.1f global batches of %d", queue_size,
                    queue_size / global_batch, global_batch)


def _check_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"output_dir {path} is not writable: {exc.strerror}") from None


def check_itm_batch(batch_size: int, key: str) -> None:
    """ITM draws an in-batch hard negative: a batch of one has none."""
    if batch_size < 2:
        raise ConfigError(f"{key} is {batch_size}: ITM hard negatives need at least 2 samples per process batch")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def wrap_model(model: torch.nn.Module, config: dict, device: torch.device) -> torch.nn.Module:
    """DDP (``broadcast_buffers=False``: queues are identical on every rank by construction) and compile."""
    if is_dist_initialized():
        # Ranks seed differently, so start every rank from rank 0's buffers (the random initial queues);
        # from then on the queues stay identical by construction and are never re-broadcast.
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if config.get("compile"):
        model = torch.compile(model)
    return model


def _training_state(model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any, config: dict,
                    epoch: int, step: int | None, extra: dict) -> dict:
    return {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "config": config, "epoch": epoch, "step": step, "rng": utils.get_rng_state(), **extra}


def _resume(args: argparse.Namespace, model: torch.nn.Module, optimizer: Any, scheduler: Any,
            scaler: Any, config: dict | None = None) -> tuple[int, int, dict]:
    """Restore a checkpoint; returns (start epoch, start step, saved extras). A config that differs from the
    checkpoint's is logged key by key; model sizes cannot change (``ConfigError``)."""
    if args.resume == "latest":
        found = load_latest_checkpoint(args.output_dir)
        if found is None:
            logger.info("--resume: no checkpoint in %s yet, starting from scratch", args.output_dir)
            return 0, 0, {}
        state, path = found
    else:
        state, path = load_checkpoint_file(args.resume), args.resume
    if config is not None:
        run_state.check_resume_config(state.get("config"), config, path)
    lacking = [k for k in ("model", "optimizer", "lr_scheduler", "epoch") if k not in state]
    if lacking:
        raise CheckpointError(f"cannot resume from {path}: it holds no {', '.join(map(repr, lacking))} (keys: "
                              f"{', '.join(map(str, list(state)[:8])) or 'none'}); start a new run from its weights "
                              "with --checkpoint instead")
    from models.checkpoint import load_exact

    load_exact(model, state["model"], path)  # another model size or task: one line naming the tensors
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if state.get("rng") is not None:
        utils.set_rng_state(state["rng"])
    step = state.get("step")
    epoch, step = (state["epoch"] + 1, 0) if step is None else (state["epoch"], step)
    logger.info("resumed from %s: epoch %d, iteration %d", path, epoch, step)
    return epoch, step, state.get("extra", {})


def fit(model: torch.nn.Module, loader: Any, step_fn: Callable, config: dict, args: argparse.Namespace,
        device: torch.device, evaluate: Callable[[torch.nn.Module, int], dict] | None = None,
        score: str | None = None) -> dict:
    """The shared training driver of every task script.

    Optimizer, scheduler and scaler from the config; ``--resume`` (exact, mid-epoch included) or
    ``--checkpoint`` weights; per epoch: ``train_one_epoch``, optional ``evaluate(model, epoch)`` returning a
    dict of JSON-serialisable metrics (accuracies, retrieval recalls, result-file paths), an atomic
    checkpoint and one JSON line in ``log.txt``. ``score`` names the metric of that dict (higher is better)
    that picks ``checkpoint_best.pth``; the log line repeats its value as ``score``. Raises ``KeyError``
    naming the metrics when the evaluator does not return it. Returns the last log record.
    """
    from dataset.sampler import plan_epoch
    from models.checkpoint import load_weights
    from models.checkpoint_info import checkpoint_meta
    from optim import create_optimizer
    from scheduler import create_scheduler

    model.to(device)
    meta = checkpoint_meta(model, config, getattr(args, "script", None), getattr(args, "text_encoder", ""),
                           git_commit())  # task, sizes, preprocessing: a checkpoint alone rebuilds the model
    optimizer = create_optimizer(config["optimizer"], model)
    scheduler = create_scheduler(config["schedular"], optimizer)
    use_fp16 = config["amp"] == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_fp16 else None
    start_epoch, start_step, extra = 0, 0, {"best": None, "skipped": 0}
    if args.resume:
        start_epoch, start_step, saved = _resume(args, model, optimizer, scheduler, scaler, config)
        extra.update(saved)
    if args.checkpoint and (not args.resume or (start_epoch, start_step) == (0, 0)):
        load_weights(model, args.checkpoint)  # --resume with no checkpoint yet starts from --checkpoint
    logger.info("parameters: %d in all, %d trainable", *count_parameters(model))
    train_model = wrap_model(model, config, device)
    counter = {"skipped": extra["skipped"], "nonfinite": 0}
    epochs = config["schedular"]["epochs"]
    finish = _EpochEnd(model, args, extra, evaluate, score)
    record = finish.after_resume(start_epoch, start_step)
    if start_epoch >= epochs:
        logger.info("the run in %s is complete (%d of %d epochs): nothing left to train", args.output_dir,
                    start_epoch, epochs)
        return record
    metrics = MetricAccumulator()  # the epoch's running sums: a mid-epoch checkpoint carries them
    if start_step and extra.get("metrics"):
        metrics.load_state_dict(extra["metrics"])
    clock = {"start": time.perf_counter(), "before": extra.get("train_seconds") or 0.0 if start_step else 0.0}

    def save(epoch: int, step: int | None) -> str:
        extra["position"] = None if step is None else plan.position(step)  # global samples consumed
        extra["skipped"] = counter["skipped"]
        extra["metrics"] = None if step is None else metrics.state_dict()
        extra["train_seconds"] = None if step is None else clock["before"] + time.perf_counter() - clock["start"]
        state = _training_state(model, optimizer, scheduler, scaler, config, epoch, step,
                                {"extra": extra, "meta": meta})
        path = save_checkpoint(state, args.output_dir, checkpoint_name(epoch, step), config["keep_last"])
        barrier()  # no rank moves on (or exits after a stop) while rank 0 is still writing
        return path

    def checkpoint_mid_epoch(epoch: int, step: int) -> None:
        if step >= steps_per_epoch:
            return  # the epoch's own checkpoint follows
        every = config["save_every"]
        path = save(epoch, step) if every > 0 and step % every == 0 else None
        if signals.stop_requested():
            raise signals.RunInterrupted(_stop_message(args, path or save(epoch, step), epoch, step))

    with signals.deferred():
        for epoch in range(start_epoch, epochs):
            # continue from the checkpoint's sample under any batch size and process count (or one clear error)
            plan = plan_epoch(loader, epoch, start_step, extra.get("position"), get_world_size())
            steps_per_epoch = plan.steps
            extra.setdefault("global_step", epoch * plan.steps)  # optimizer steps before this epoch
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stats = train_one_epoch(
                train_model, loader, optimizer, scheduler, epoch, step_fn, device=device, alpha=config["alpha"],
                warm_up=config["warm_up"], amp=config["amp"], scaler=scaler, grad_clip=config["grad_clip"],
                start_step=start_step, on_step=checkpoint_mid_epoch, nonfinite=config["nonfinite"],
                max_skipped=config["max_skipped_images"], skip_counter=counter, log_every=config["log_every"],
                metrics=metrics, step_offset=extra["global_step"],
                epoch_fraction=plan.fraction if start_step else None)
            start_step, extra["global_step"] = 0, extra["global_step"] + plan.steps
            seconds = clock["before"] + time.perf_counter() - clock["start"]
            extra["record"] = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
                               "skipped_images": counter["skipped"], "epoch_seconds": seconds,
                               "samples_per_s": plan.samples_at(plan.steps) / max(seconds, 1e-9),
                               "peak_mem_mb": peak_memory_mb(device)}
            path = save(epoch, None)  # before evaluation: a failing evaluation cannot lose the epoch
            if signals.stop_requested():
                raise signals.RunInterrupted(_stop_message(args, path, epoch, None))
            record = finish(epoch, extra["record"], path)
            metrics, clock = MetricAccumulator(), {"start": time.perf_counter(), "before": 0.0}
    return record


def _stop_message(args: argparse.Namespace, path: str, epoch: int, step: int | None) -> str:
    where = f"at epoch {epoch}, iteration {step}" if step is not None else f"after epoch {epoch} (its evaluation " \
        "runs on resume)"
    return f"stopped by {signals.requested_signal()} {where}; saved {path}; resume with: {resume_command(args)}"


class _EpochEnd:
    """What follows an epoch's checkpoint: evaluation (a signal stops it at once; the training random streams are
    left as they were), the ``checkpoint_best.pth`` link, and the epoch's ``log.txt`` line."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace, extra: dict,
                 evaluate: Callable[[torch.nn.Module, int], dict] | None, score: str | None) -> None:
        self.model, self.args, self.extra, self.evaluate, self.score = model, args, extra, evaluate, score
        self.log_path = os.path.join(args.output_dir, "log.txt")

    def after_resume(self, start_epoch: int, start_step: int) -> dict:
        """Recover the best score from ``log.txt``, evaluate and log an epoch whose checkpoint was written but
        whose line was not (a stop or crash in evaluation); returns the last epoch's record ({} if none)."""
        logged = broadcast_object(run_state.logged_epochs(self.log_path) if is_main_process() else None)
        logged = {e: r for e, r in logged.items() if e < start_epoch}
        best, best_epoch = run_state.best_in_log(logged)
        if best is not None:
            self.extra["best"], self.extra["best_epoch"] = best, best_epoch
        last = start_epoch - 1
        pending = self.extra.get("record")
        if start_step == 0 and last >= 0 and last not in logged and pending and pending.get("epoch") == last:
            logger.info("epoch %d was saved but not evaluated and logged: doing it now", last)
            return self(last, pending, os.path.join(self.args.output_dir, checkpoint_name(last)))
        return logged[max(logged)] if logged else {}

    def __call__(self, epoch: int, record: dict, path: str) -> dict:
        record = dict(record)
        if self.evaluate is not None:
            rng, start = utils.get_rng_state(), time.perf_counter()
            try:
                with signals.immediate():
                    record.update(self.evaluate(_unwrap(self.model), epoch))
            except signals.ForcedStop as stop:
                raise signals.RunInterrupted(
                    f"stopped by {signal.Signals(stop.signum).name} during the evaluation of epoch {epoch}; {path} "
                    f"was saved before it; resume (the evaluation runs first) with: {resume_command(self.args)}"
                ) from None
            utils.set_rng_state(rng)
            record["eval_seconds"] = time.perf_counter() - start
        if self.score is not None:
            if self.score not in record:
                raise KeyError(f"the evaluator returned no {self.score!r} (it returned {sorted(record)})")
            record["score"] = record[self.score]
            if self.extra.get("best") is None or record["score"] > self.extra["best"]:
                self.extra["best"], self.extra["best_epoch"] = record["score"], epoch
                if os.path.isfile(path):
                    link_best(self.args.output_dir, os.path.basename(path))
            record["best_epoch"] = self.extra["best_epoch"]
        record = round32(record)
        append_jsonl(self.log_path, record)
        logger.info("epoch %d: %s", epoch, json.dumps(record))
        barrier()
        return record


def _ensure_log_handlers() -> None:
    if not logging.getLogger().handlers:  # the failure came before setup_logging
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_main(main: Callable[[], Any]) -> int:
    """Run an entry point; expected failures (bad config, data, checkpoint, non-finite loss) end in one
    clear logged message and exit code 2 instead of a traceback. ``ALBEF_DEBUG=1`` re-raises.

    SIGINT / SIGTERM (``engine.signals``): a run stopped at a step boundary logs the ``--resume`` command and
    returns ``EXIT_INTERRUPTED`` (75); a second signal, or one before training starts, returns 128 + its number.
    """
    from dataset import DataError, ImageLoadError

    expected = (ConfigError, DataError, ImageLoadError, CheckpointError, NonFiniteLossError, FileNotFoundError,
                SkippedImagesError)
    try:
        with signals.handled():
            main()
    except signals.RunInterrupted as exc:
        _ensure_log_handlers()
        logger.warning("%s", exc)
        return signals.EXIT_INTERRUPTED
    except signals.ForcedStop as exc:
        _ensure_log_handlers()
        logger.error("%s", exc)
        return 128 + exc.signum
    except expected as exc:
        if os.environ.get("ALBEF_DEBUG"):
            raise
        _ensure_log_handlers()
        logger.error("%s: %s", type(exc).__name__, exc)
        return 2
    finally:
        if is_dist_initialized():
            dist.destroy_process_group()
    return 0
