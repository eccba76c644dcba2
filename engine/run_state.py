"""What an output folder already holds, and whether this run may use it: a used folder needs ``--resume``, a
resumed run must keep its model sizes, a finished run is complete; start-up warnings for flags that do nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from engine.checkpoint_io import BEST_NAME, list_checkpoints
from engine.config import ConfigError

logger = logging.getLogger(__name__)

# Keys that decide parameter or buffer shapes: a resume cannot change them (the checkpoint would not load).
FIXED_ON_RESUME = ("bert_config", "vision_width", "vit", "embed_dim", "image_res", "queue_size")


def check_output_dir_use(args: argparse.Namespace) -> None:
    """Refuse, in one line, to start a new run in a folder that holds another run's checkpoints.

    Without this, a second run silently overwrites ``checkpoint_00.pth`` and appends a second epoch 0 to
    ``log.txt``. ``--resume`` continues the run; ``--evaluate`` would overwrite its config and results.
    """
    if args.resume:
        return
    found = [os.path.basename(p) for p in list_checkpoints(args.output_dir)]
    if not found and os.path.isfile(os.path.join(args.output_dir, BEST_NAME)):
        found = [BEST_NAME]
    if not found and logged_epochs(os.path.join(args.output_dir, "log.txt")):
        found = ["log.txt with epoch lines"]  # its checkpoints were removed: a new run would log epoch 0 again
    if found:
        what = ("--evaluate would overwrite its config.yaml and results: choose" if args.evaluate
                else "add --resume to continue that run, or choose")
        raise ConfigError(f"output_dir {args.output_dir} already holds a run's checkpoints ({found[0]}, "
                          f"{len(found)} in all): {what} a new --output_dir")


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def config_differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs: key -> (saved, current); absent keys are None."""
    old, new = _flatten(saved), _flatten(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def check_resume_config(saved: dict | None, current: dict, path: str) -> None:
    """Log every key whose value differs from the checkpoint's config; ``ConfigError`` for model sizes."""
    if not isinstance(saved, dict):
        return
    diff = config_differences(saved, current)
    if not diff:
        return
    logger.warning("resuming %s with a changed config: %s", path,
                   "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items())))
    fixed = [k for k in diff if k.split(".")[0] in FIXED_ON_RESUME]
    if fixed:
        raise ConfigError(f"cannot resume {path} with another {', '.join(fixed)} (model sizes are fixed for a "
                          f"run): restore the saved value(s) or start a new --output_dir from --checkpoint")


def logged_epochs(log_path: str) -> dict[int, dict]:
    """The epoch lines of ``log.txt``, by epoch (the last line of an epoch wins); {} without a log."""
    records: dict[int, dict] = {}
    if not os.path.isfile(log_path):
        return records
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a hard kill
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                records[record["epoch"]] = record
    return records


def best_in_log(records: dict[int, dict]) -> tuple[float | None, int | None]:
    """(best score, its epoch) among logged epochs, the first of equal scores; (None, None) without scores."""
    scored = [(r["score"], -e) for e, r in records.items() if isinstance(r.get("score"), (int, float))]
    if not scored:
        return None, None
    score, neg_epoch = max(scored)
    return score, -neg_epoch


def startup_warnings(args: argparse.Namespace, config: dict) -> None:
    """One warning line per flag or setting that will not do what it seems to."""
    if args.world_size > 1 and not args.distributed:
        logger.warning("--world_size %d does nothing without a launcher: this is one process; start "
                       "`torchrun --nproc_per_node=%d %s ...` for %d processes", args.world_size, args.world_size,
                       os.path.basename(getattr(args, "script", None) or "Task.py"), args.world_size)
    eval_keys = [k for k in config if k.endswith(("val_file", "test_file"))]
    if args.evaluate and eval_keys and not any(config[k] for k in eval_keys):
        logger.warning("--evaluate with no %s set: there is nothing to evaluate", " or ".join(eval_keys))
    if args.evaluate or args.resume or args.checkpoint:
        return
    if "vit_init" in config or "bert_init" in config:
        if not config.get("vit_init") and not config.get("bert_init"):
            logger.warning("pre-training from scratch (no vit_init, no bert_init): the paper initialises the ViT "
                           "from DeiT-B/16 (ImageNet) and the text and fusion layers from BERT-base; from random "
                           "weights the encoders must learn vision and language from the image-text pairs alone, "
                           "and the paper's schedule and results do not apply (set vit_init to a DeiT checkpoint "
                           "and bert_init: true; from scratch, itc_warmup_steps helps, see configs/toy)")
    elif not args.evaluate:
        logger.warning("fine-tuning with no --checkpoint: the model starts from random weights, not from "
                       "pre-trained ALBEF (pass --checkpoint ALBEF.pth or your pre-training's checkpoint)")
