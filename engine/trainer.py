"""The shared task runner: ``setup_run`` (distributed, config, logging, seeds, toy world), ``fit`` (train,
evaluate, checkpoint, resume) and ``run_main`` (one-line errors and exit code 2)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import utils
from engine.checkpoint_io import (
    CheckpointError,
    checkpoint_name,
    load_checkpoint_file,
    load_latest_checkpoint,
    save_checkpoint,
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
from engine.logs import append_jsonl, setup_logging
from engine.train_loop import NonFiniteLossError, SkippedImagesError, train_one_epoch

logger = logging.getLogger(__name__)



def setup_run(args: argparse.Namespace, defaults: dict) -> tuple[dict, torch.device]:
    """Distributed init, config, output folder, logging, seeds, toy world. Returns (config, device)."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    init_distributed_mode(args)
    config = load_config(args.config, defaults, args.override)
    _check_output_dir(args.output_dir)
    setup_logging(args.output_dir, get_rank())
    device = torch.device(args.device)
    if device.type == "cuda" and args.distributed:
        device = torch.device("cuda", args.gpu)
    if config.get("toy_world"):
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
            scaler: Any) -> tuple[int, int, dict]:
    """Restore a checkpoint; returns (start epoch, start step, saved extras)."""
    if args.resume == "latest":
        found = load_latest_checkpoint(args.output_dir)
        if found is None:
            logger.info("--resume: no checkpoint in %s yet, starting from scratch", args.output_dir)
            return 0, 0, {}
        state, path = found
    else:
        state, path = load_checkpoint_file(args.resume), args.resume
    model.load_state_dict(state["model"])
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
    from models.checkpoint import load_weights
    from optim import create_optimizer
    from scheduler import create_scheduler

    model.to(device)
    optimizer = create_optimizer(config["optimizer"], model)
    scheduler = create_scheduler(config["schedular"], optimizer)
    use_fp16 = config["amp"] == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_fp16 else None
    start_epoch, start_step, extra = 0, 0, {"best": None, "skipped": 0}
    if args.resume:
        start_epoch, start_step, saved = _resume(args, model, optimizer, scheduler, scaler)
        extra.update(saved)
    elif args.checkpoint:
        load_weights(model, args.checkpoint)
    train_model = wrap_model(model, config, device)
    counter = {"skipped": extra["skipped"], "nonfinite": 0}
    log_path = os.path.join(args.output_dir, "log.txt")
    batch_size = loader.batch_size
    record: dict = {}

    def checkpoint_mid_epoch(epoch: int, step: int) -> None:
        every = config["save_every"]
        if every > 0 and step % every == 0 and step < steps_per_epoch:
            extra["skipped"] = counter["skipped"]
            state = _training_state(model, optimizer, scheduler, scaler, config, epoch, step, {"extra": extra})
            save_checkpoint(state, args.output_dir, checkpoint_name(epoch, step), config["keep_last"])

    for epoch in range(start_epoch, config["schedular"]["epochs"]):
        loader.sampler.set_epoch(epoch)
        steps_per_epoch = len(loader)
        loader.sampler.set_start(start_step * batch_size)
        stats = train_one_epoch(
            train_model, loader, optimizer, scheduler, epoch, step_fn, device=device, alpha=config["alpha"],
            warm_up=config["warm_up"], amp=config["amp"], scaler=scaler, grad_clip=config["grad_clip"],
            start_step=start_step, on_step=checkpoint_mid_epoch, nonfinite=config["nonfinite"],
            max_skipped=config["max_skipped_images"], skip_counter=counter, log_every=config["log_every"])
        start_step = 0
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
                  "skipped_images": counter["skipped"]}
        if evaluate is not None:
            record.update(evaluate(_unwrap(model), epoch))
            if score is not None:
                if score not in record:
                    raise KeyError(f"the evaluator returned no {score!r} (it returned {sorted(record)})")
                record["score"] = record[score]
        extra["skipped"] = counter["skipped"]
        _save_epoch(model, optimizer, scheduler, scaler, config, epoch, extra, record, args.output_dir)
        append_jsonl(log_path, record)
        logger.info("epoch %d: %s", epoch, json.dumps(record))
        barrier()
    return record


def _save_epoch(model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any, config: dict, epoch: int,
                extra: dict, record: dict, output_dir: str) -> None:
    score = record.get("score")
    is_best = score is not None and (extra.get("best") is None or score > extra["best"])
    if is_best:
        extra["best"] = score
        record["best_epoch"] = epoch
    state = _training_state(model, optimizer, scheduler, scaler, config, epoch, None, {"extra": extra})
    save_checkpoint(state, output_dir, checkpoint_name(epoch), config["keep_last"])
    if is_best:
        save_checkpoint(state, output_dir, "checkpoint_best.pth", keep_last=0)


def run_main(main: Callable[[], Any]) -> int:
    """Run an entry point; expected failures (bad config, data, checkpoint, non-finite loss) end in one
    clear logged message and exit code 2 instead of a traceback. ``ALBEF_DEBUG=1`` re-raises."""
    from dataset import DataError, ImageLoadError

    expected = (ConfigError, DataError, ImageLoadError, CheckpointError, NonFiniteLossError, FileNotFoundError,
                SkippedImagesError)
    try:
        main()
    except expected as exc:
        if os.environ.get("ALBEF_DEBUG"):
            raise
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO)
        logger.error("%s: %s", type(exc).__name__, exc)
        return 2
    finally:
        if is_dist_initialized():
            dist.destroy_process_group()
    return 0
