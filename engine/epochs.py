"""What ``engine.trainer.fit`` does around ``train_one_epoch``: the state a training checkpoint holds and its
writes (``TrainingRun``: resume, epoch and mid-epoch checkpoints, stops at a step boundary) and what follows an
epoch's checkpoint (``EpochEnd``: evaluation, ``checkpoint_best.pth``, the ``log.txt`` line)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import torch

import utils
from engine import run_state, signals
from engine.checkpoint_io import (
    CheckpointError,
    checkpoint_name,
    link_best,
    load_checkpoint_file,
    load_latest_checkpoint,
    save_checkpoint,
)
from engine.distributed import barrier, broadcast_object, is_main_process
from engine.logs import MetricAccumulator, append_jsonl, resume_command, round32

logger = logging.getLogger(__name__)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``torch.compile`` and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


class TrainingRun:
    """The optimizer, scheduler, scaler and bookkeeping of one run, and the checkpoints that hold them.

    ``extra`` (saved under ``'extra'``): ``best``/``best_epoch``, ``skipped`` (unreadable samples so far),
    ``global_step`` (optimizer steps before the current epoch), and mid-epoch ``position`` (global samples
    consumed), ``metrics`` (the epoch's running sums) and ``train_seconds``; ``record`` is the last epoch's
    training record, so that a run stopped during evaluation evaluates it on resume.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any, config: dict,
                 args: argparse.Namespace, meta: dict) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.config, self.args, self.meta = config, args, meta
        self.start_epoch, self.start_step = 0, 0
        self.extra: dict = {"best": None, "skipped": 0}
        self.counter = {"skipped": 0, "nonfinite": 0}
        self.plan: Any = None  # the current epoch's dataset.sampler plan
        self.metrics = MetricAccumulator()
        self.clock = {"start": time.perf_counter(), "before": 0.0}

    def resume(self) -> None:
        """Restore ``--resume`` (a path or ``latest``): weights, optimizer, scheduler, scaler, RNG streams, the
        epoch's running sums; a config that differs is logged key by key, model sizes cannot change."""
        if self.args.resume == "latest":
            found = load_latest_checkpoint(self.args.output_dir)
            if found is None:
                logger.info("--resume: no checkpoint in %s yet, starting from scratch", self.args.output_dir)
                return
            state, path = found
        else:
            state, path = load_checkpoint_file(self.args.resume), self.args.resume
        run_state.check_resume_config(state.get("config"), self.config, path)
        lacking = [k for k in ("model", "optimizer", "lr_scheduler", "epoch") if k not in state]
        if lacking:
            raise CheckpointError(f"cannot resume from {path}: it holds no {', '.join(map(repr, lacking))} (keys: "
                                  f"{', '.join(map(str, list(state)[:8])) or 'none'}); start a new run from its "
                                  "weights with --checkpoint instead")
        from models.checkpoint import load_exact

        load_exact(self.model, state["model"], path)  # another model size or task: one line naming the tensors
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("rng") is not None:
            utils.set_rng_state(state["rng"])
        step = state.get("step")
        self.start_epoch, self.start_step = (state["epoch"] + 1, 0) if step is None else (state["epoch"], step)
        self.extra.update(state.get("extra", {}))
        self.counter["skipped"] = self.extra["skipped"]
        if self.start_step:
            if self.extra.get("metrics"):
                self.metrics.load_state_dict(self.extra["metrics"])
            self.clock["before"] = self.extra.get("train_seconds") or 0.0
        logger.info("resumed from %s: epoch %d, iteration %d", path, self.start_epoch, self.start_step)

    def seconds(self) -> float:
        """Training seconds of the current epoch, a resumed part included."""
        return self.clock["before"] + time.perf_counter() - self.clock["start"]

    def new_epoch(self) -> None:
        self.metrics, self.clock = MetricAccumulator(), {"start": time.perf_counter(), "before": 0.0}

    def save(self, epoch: int, step: int | None) -> str:
        """Write the checkpoint of ``epoch`` (``step`` None: the epoch's end) atomically; returns its path."""
        mid = step is not None
        self.extra.update(position=self.plan.position(step) if mid else None, skipped=self.counter["skipped"],
                          metrics=self.metrics.state_dict() if mid else None,
                          train_seconds=self.seconds() if mid else None)
        state = {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else None, "config": self.config,
                 "epoch": epoch, "step": step, "rng": utils.get_rng_state(), "extra": self.extra, "meta": self.meta}
        path = save_checkpoint(state, self.args.output_dir, checkpoint_name(epoch, step), self.config["keep_last"])
        barrier()  # no rank moves on (or exits after a stop) while rank 0 is still writing
        return path

    def on_step(self, epoch: int, step: int) -> None:
        """After iteration ``step``: the ``save_every`` checkpoint, and a requested stop (with a checkpoint)."""
        if step >= self.plan.steps:
            return  # the epoch's own checkpoint follows
        every = self.config["save_every"]
        path = self.save(epoch, step) if every > 0 and step % every == 0 else None
        if signals.stop_requested():
            raise signals.RunInterrupted(self.stop_message(path or self.save(epoch, step), epoch, step))

    def stop_message(self, path: str, epoch: int, step: int | None) -> str:
        where = f"at epoch {epoch}, iteration {step}" if step is not None else \
            f"after epoch {epoch} (its evaluation runs on resume)"
        return (f"stopped by {signals.requested_signal()} {where}; saved {path}; resume with: "
                f"{resume_command(self.args)}")


class EpochEnd:
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
                    record.update(self.evaluate(unwrap(self.model), epoch))
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
