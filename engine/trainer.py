"""The shared task runner: ``setup_run`` (distributed, config, logging, seeds, toy world), ``fit`` (train,
evaluate, checkpoint, resume) and ``run_main`` (one-line errors and exit code 2)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

import utils
from engine import checks, run_state, signals
from engine.checkpoint_io import (
    CheckpointError,
)
from engine.config import ConfigError, load_config, save_config
from engine.distributed import (
    barrier,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_dist_initialized,
    is_main_process,
)
from engine.epochs import EpochEnd, TrainingRun
from engine.logs import (
    count_parameters,
    git_commit,
    log_run_info,
    peak_memory_mb,
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
        if is_main_process():  # absent, or written by an older generator: (re)generate it
            from dataset.toy_world import ensure_current_toy_world
            ensure_current_toy_world(config["toy_world"])
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


def fit(model: torch.nn.Module, loader: Any, step_fn: Callable, config: dict, args: argparse.Namespace,
        device: torch.device, evaluate: Callable[[torch.nn.Module, int], dict] | None = None,
        score: str | None = None) -> dict:
    """The shared training driver of every task script.

    Optimizer, scheduler and scaler from the config; ``--resume`` (exact, mid-epoch included) or
    ``--checkpoint`` weights; per epoch: ``train_one_epoch``, an atomic checkpoint, optional
    ``evaluate(model, epoch)`` returning a dict of JSON-serialisable metrics (accuracies, retrieval recalls,
    result-file paths) and one JSON line in ``log.txt``. ``score`` names the metric of that dict (higher is
    better) that picks ``checkpoint_best.pth``; the log line repeats its value as ``score``. Raises ``KeyError``
    naming the metrics when the evaluator does not return it. Returns the last log record.
    """
    run = _start_run(model, config, args, device)
    logger.info("parameters: %d in all, %d trainable", *count_parameters(model))
    train_model = wrap_model(model, config, device)
    finish = EpochEnd(model, args, run.extra, evaluate, score)
    record = finish.after_resume(run.start_epoch, run.start_step)
    epochs = config["schedular"]["epochs"]
    if run.start_epoch >= epochs:
        logger.info("the run in %s is complete (%d of %d epochs): nothing left to train", args.output_dir,
                    run.start_epoch, epochs)
        return record
    with signals.deferred():
        for epoch in range(run.start_epoch, epochs):
            path = _train_epoch(run, train_model, loader, step_fn, epoch, device)
            if signals.stop_requested():
                raise signals.RunInterrupted(run.stop_message(path, epoch, None))
            record = finish(epoch, run.extra["record"], path)
            run.new_epoch()
    return record


def _start_run(model: torch.nn.Module, config: dict, args: argparse.Namespace,
               device: torch.device) -> TrainingRun:
    """Optimizer, scheduler and fp16 scaler from the config, then ``--resume`` and/or ``--checkpoint``."""
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
    run = TrainingRun(model, optimizer, scheduler, scaler, config, args, meta)
    if args.resume:
        run.resume()
    if args.checkpoint and (not args.resume or (run.start_epoch, run.start_step) == (0, 0)):
        load_weights(model, args.checkpoint)  # --resume with no checkpoint yet starts from --checkpoint
    return run


def _train_epoch(run: TrainingRun, train_model: torch.nn.Module, loader: Any, step_fn: Callable, epoch: int,
                 device: torch.device) -> str:
    """One epoch of ``train_one_epoch`` and its checkpoint (written before evaluation: a failing evaluation
    cannot lose the epoch); the training record goes to ``run.extra['record']``. Returns the checkpoint path."""
    from dataset.sampler import plan_epoch

    config, extra, start_step = run.config, run.extra, run.start_step
    # continue from the checkpoint's sample under any batch size and process count (or one clear error)
    run.plan = plan = plan_epoch(loader, epoch, start_step, extra.get("position"), get_world_size())
    extra.setdefault("global_step", epoch * plan.steps)  # optimizer steps before this epoch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = train_one_epoch(
        train_model, loader, run.optimizer, run.scheduler, epoch, step_fn, device=device, alpha=config["alpha"],
        warm_up=config["warm_up"], amp=config["amp"], scaler=run.scaler, grad_clip=config["grad_clip"],
        start_step=start_step, on_step=run.on_step, nonfinite=config["nonfinite"],
        max_skipped=config["max_skipped_images"], skip_counter=run.counter, log_every=config["log_every"],
        metrics=run.metrics, step_offset=extra["global_step"], epoch_fraction=plan.fraction if start_step else None)
    run.start_step, extra["global_step"] = 0, extra["global_step"] + plan.steps
    seconds = run.seconds()
    extra["record"] = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
                       "skipped_images": run.counter["skipped"], "epoch_seconds": seconds,
                       "samples_per_s": plan.samples_at(plan.steps) / max(seconds, 1e-9),
                       "peak_mem_mb": peak_memory_mb(device)}
    return run.save(epoch, None)


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
