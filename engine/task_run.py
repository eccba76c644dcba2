"""The end of every fine-tuning script: ``fit_and_test`` (val each epoch, the best checkpoint on test) and
``write_results`` (``result/<task>_metrics.json`` and, for ``--evaluate``, the one ``log.txt`` line)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from engine import distributed, logs
from engine.checkpoint_io import load_checkpoint_file

logger = logging.getLogger(__name__)

# evaluate(model, split, epoch) -> that split's metrics (nested dicts allowed); epoch: the weights' epoch or None
SplitEvaluator = Callable[[torch.nn.Module, str, Any], dict]
# flatten(split, metrics) -> the scalar metrics of a split for log.txt, named "<split>_<metric>"
Flatten = Callable[[str, dict], dict]


def prefixed(split: str, metrics: dict) -> dict:
    """The default ``Flatten``: every scalar metric as ``<split>_<name>``."""
    return {f"{split}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def fit_and_test(model: torch.nn.Module, loader: Any, step_fn: Callable, config: dict, args: argparse.Namespace,
                 device: torch.device, splits: dict, evaluate: SplitEvaluator, metric: str,
                 flatten: Flatten = prefixed) -> dict:
    """``engine.trainer.fit`` with val evaluated each epoch (when ``splits`` has ``'val'``; ``val_<metric>``
    picks ``checkpoint_best.pth``), then the best checkpoint (without val: the last weights) on test.

    Returns ``{'mode': 'train', 'checkpoint', 'last_epoch', ['best_epoch', 'evaluated', 'val'], ['test']}``; the
    val metrics of the best epoch are those of its evaluation during training, not a second run.
    """
    from engine import trainer

    history: dict[int, dict] = {}

    def evaluate_val(m: torch.nn.Module, epoch: int) -> dict:
        if "val" not in splits:
            return {}
        history[epoch] = evaluate(m, "val", epoch)
        return flatten("val", history[epoch])

    record = trainer.fit(model, loader, step_fn, config, args, device, evaluate_val,
                         score=f"val_{metric}" if "val" in splits else None)
    epoch = record.get("epoch")
    results: dict = {"mode": "train", "checkpoint": args.checkpoint, "last_epoch": epoch}
    best = os.path.join(args.output_dir, "checkpoint_best.pth")
    if "val" in splits and os.path.isfile(best):
        state = load_checkpoint_file(best)
        model.load_state_dict(state["model"])
        epoch = state["epoch"]
        results.update(best_epoch=epoch, evaluated="checkpoint_best.pth",
                       val=history.get(epoch) or evaluate(model, "val", epoch))
    if "test" in splits:
        results["test"] = evaluate(model, "test", epoch)
    return results


def write_result_file(output_dir: str, name: str, content: Any, indent: int | None = None) -> str:
    """Write ``content`` as JSON to ``output_dir/result/<name>`` and return that path. The file is written beside
    its final name and renamed over it, so a crash never leaves half a file. The caller picks the writing rank."""
    path = os.path.join(output_dir, "result", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=indent)
    os.replace(tmp, path)
    return path


def write_results(output_dir: str, results: dict, task: str, flatten: Flatten | None = prefixed,
                  round_floats: bool = True) -> None:
    """Write ``result/<task>_metrics.json`` (rank 0) and log the scalar results in one line; ``--evaluate``
    results (``mode: evaluate``) also make the one line of ``log.txt`` (a training run's ``log.txt`` keeps one
    line per epoch, all of one shape). ``flatten``: how the ``val`` / ``test`` dicts enter that line (None: the
    results are flat already). ``round_floats``: floats as float32 (as ``log.txt``)."""
    line = {k: v for k, v in results.items() if not isinstance(v, dict)} if flatten else dict(results)
    for split in ("val", "test") if flatten else ():
        line.update(flatten(split, results.get(split, {})))
    rounded = logs.round32 if round_floats else (lambda value: value)
    if results.get("mode") == "evaluate":
        logs.append_jsonl(os.path.join(output_dir, "log.txt"), line)
    if distributed.is_main_process():
        write_result_file(output_dir, f"{task}_metrics.json", rounded(results), indent=2)
    logger.info("%s results: %s", task, json.dumps(rounded(line)))
