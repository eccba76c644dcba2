"""Start-up checks: every constraint between config values, the model and the data, in one place.

The schema (``engine.config``) checks keys and types; this module checks what types cannot: ranges
(``batch_size: 0``), choices (``amp: fp8``), and relations between values (``max_tokens`` against the BERT
config's position table, ``image_res`` against the patch size, the training split against one global batch).
The entry scripts and ``scripts/validate_data.py`` run the same functions, so a config that validates also starts.

- :data:`RULES`: one rule per config key (dotted for nested keys), applied to whatever keys a task's schema has.
  A task with a key of its own adds a rule here (the key's meaning must be the same in every task that has it).
- :func:`config_problems` / :func:`check_config`: the rules, the relations between keys (:data:`RELATIONS`) and
  a task's own hooks (``config -> list of problems``), before anything heavy is built; ``setup_run`` calls
  :func:`check_config` right after loading the config.
- :func:`size_problems` / :func:`check_sizes`: item counts of the splits, once the annotation files are read:
  empty splits, a training split smaller than one global batch.
- :func:`check_device`, :func:`reject_flags`, :func:`check_files_given`: the command line.

An entry script lists its hooks in ``CONFIG_CHECKS`` (always run) and ``TRAINING_CHECKS`` (run when it trains,
e.g. :func:`files_given_problems` of ``train_file``, :func:`itm_batch_problems`) and passes them to
``setup_run``; ``scripts/validate_data.py`` runs the same lists.

Every ``check_*`` raises ``ConfigError`` with all problems on one line, which ``engine.trainer.run_main`` turns
into one ``ERROR`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from engine.config import ConfigError

logger = logging.getLogger(__name__)

Hook = Callable[[dict], list[str]]
AMP_MODES = ("off", "bf16", "fp16")
SCHEDULES = ("cosine",)  # scheduler.create_scheduler
OPTIMIZERS = ("adamw",)  # optim.create_optimizer (case-insensitive, as in the official configs: adamW)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(low: float) -> Callable[[Any], str | None]:
    """Rule: a number >= ``low``."""
    return lambda v: None if _number(v) and v >= low else f"must be >= {low:g}"


def above(low: float) -> Callable[[Any], str | None]:
    """Rule: a number > ``low``."""
    return lambda v: None if _number(v) and v > low else f"must be > {low:g}"


def between(low: float, high: float) -> Callable[[Any], str | None]:
    """Rule: a number in ``[low, high]``."""
    return lambda v: None if _number(v) and low <= v <= high else f"must be in [{low:g}, {high:g}]"


def one_of(*options: str, fold_case: bool = False) -> Callable[[Any], str | None]:
    """Rule: one of ``options`` (compared lower-cased when ``fold_case``)."""

    def rule(value: Any) -> str | None:
        text = str(value).lower() if fold_case else value
        return None if text in options else "must be one of " + ", ".join(repr(o) for o in options)

    return rule


def _crop_scale(value: Any) -> str | None:
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_number(v) for v in value)
            or not 0 < value[0] <= value[1] <= 1):
        return "must be [min, max] with 0 < min <= max <= 1 (RandomResizedCrop's area fractions)"
    return None


# key -> rule; applied to every key a task's config has (a missing key is not an error here).
RULES: dict[str, Callable[[Any], str | None]] = {
    "batch_size": at_least(1), "batch_size_train": at_least(1), "batch_size_test": at_least(1),
    "queue_size": at_least(1), "embed_dim": at_least(1), "vision_width": at_least(1), "image_res": at_least(1),
    "vit.patch_size": at_least(1), "vit.depth": at_least(1), "vit.heads": at_least(1),
    "max_words": at_least(1), "max_tokens": at_least(2),  # [CLS] and one word at least
    "num_workers": at_least(0), "save_every": at_least(0), "keep_last": at_least(0), "log_every": at_least(0),
    "max_skipped_images": at_least(-1), "grad_clip": at_least(0), "itc_warmup_steps": at_least(0),
    "k_test": at_least(0), "text_batch": at_least(1), "rerank_batch": at_least(1),
    "train_num_samples": at_least(0), "shuffle_buffer": at_least(1),
    "momentum": between(0, 1), "mlm_probability": between(0, 1), "alpha": between(0, 1), "temp": above(0),
    "crop_scale": _crop_scale,
    "amp": one_of(*AMP_MODES), "eval_amp": one_of(*AMP_MODES), "nonfinite": one_of("stop", "skip"),
    "optimizer.opt": one_of(*OPTIMIZERS, fold_case=True), "optimizer.lr": at_least(0),
    "optimizer.weight_decay": at_least(0),
    "schedular.sched": one_of(*SCHEDULES), "schedular.epochs": at_least(1), "schedular.warmup_epochs": at_least(0),
    "schedular.lr": at_least(0), "schedular.min_lr": at_least(0), "schedular.warmup_lr": at_least(0),
}

# Config keys holding token counts (``max_tokens``, a task's ``max_answer_tokens`` ...): at most the BERT position
# table, or the embeddings fail deep in the first forward (in fine-tuning: only at the first evaluation).
TOKEN_KEY = re.compile(r"(^|_)tokens$")


def _get(config: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _rule_problems(config: Mapping[str, Any]) -> list[str]:
    problems = []
    for key, rule in RULES.items():
        found, value = _get(config, key)
        if found and (text := rule(value)) is not None:
            problems.append(f"{key} {text}, got {value!r}")
    return problems


def _image_relations(config: Mapping[str, Any]) -> list[str]:
    """``image_res`` a multiple of the patch size; ``vision_width`` divisible by the ViT heads."""
    problems = []
    res, patch = config.get("image_res"), _get(config, "vit.patch_size")[1]
    if _number(res) and _number(patch) and res >= 1 and patch >= 1 and res % patch:
        problems.append(f"image_res {res} must be a multiple of vit.patch_size {patch}")
    width, heads = config.get("vision_width"), _get(config, "vit.heads")[1]
    if _number(width) and _number(heads) and width >= 1 and heads >= 1 and width % heads:
        problems.append(f"vision_width {width} must be divisible by vit.heads {heads}")
    return problems


def _bert_relations(config: Mapping[str, Any]) -> list[str]:
    """The BERT config file is readable; token lengths fit its position table; its ``encoder_width`` (the width
    of the image tokens the cross-attention reads) is ``vision_width``."""
    path = config.get("bert_config")
    if not isinstance(path, str) or not path:
        return []
    from models.bert import BertConfig  # imported here: the rules above need no model code

    try:
        bert = BertConfig.from_json(path)
    except (ValueError, TypeError) as exc:
        return [f"bert_config: {exc}"]
    problems = []
    for key, value in config.items():
        if TOKEN_KEY.search(key) and _number(value) and value > bert.max_position_embeddings:
            problems.append(f"{key} {value} exceeds max_position_embeddings {bert.max_position_embeddings} "
                            f"of bert_config {path}")
    width = config.get("vision_width")
    if _number(width) and width != bert.encoder_width:
        problems.append(f"vision_width {width} differs from encoder_width {bert.encoder_width} of bert_config "
                        f"{path} (the width of the image tokens its cross-attention reads)")
    if bert.hidden_size % bert.num_attention_heads:
        problems.append(f"bert_config {path}: hidden_size {bert.hidden_size} is not divisible by "
                        f"num_attention_heads {bert.num_attention_heads}")
    return problems


RELATIONS: list[Hook] = [_image_relations, _bert_relations]


def config_problems(config: dict, hooks: Iterable[Hook] = ()) -> list[str]:
    """Every problem of ``config``: :data:`RULES`, :data:`RELATIONS`, then the task's ``hooks``."""
    problems = _rule_problems(config)
    for hook in (*RELATIONS, *hooks):
        problems += hook(config)
    return problems


def _raise(problems: Sequence[str], source: str) -> None:
    if problems:
        many = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise ConfigError(f"{source}: {many}{'; '.join(problems)}")


def check_config(config: dict, source: str, hooks: Iterable[Hook] = ()) -> None:
    """Raise one ``ConfigError`` naming ``source`` and every problem :func:`config_problems` finds."""
    _raise(config_problems(config, hooks), source)


def train_batch_key(config: Mapping[str, Any]) -> str:
    """The key of the per-process training batch: ``batch_size_train`` where the task has one, else ``batch_size``."""
    return "batch_size_train" if "batch_size_train" in config else "batch_size"


def size_problems(config: Mapping[str, Any], sizes: Mapping[str, int], world_size: int = 1) -> list[str]:
    """Problems of split sizes: ``sizes`` maps a split (``train``, ``val``, ``test`` ...) to its item count.

    An empty split is a problem; the training split must hold at least one global batch (the per-process batch
    times ``world_size``): training drops the last partial global batch of every epoch, as the official code.
    """
    problems = []
    for split, count in sizes.items():
        key = f"{split}_file"
        where = f"{key} {config.get(key)!r}" if key in config else f"the {split} split"
        if count == 0:
            problems.append(f"{where} holds no items: nothing to {'train on' if split == 'train' else 'evaluate'}")
        elif split == "train":
            batch_key = train_batch_key(config)
            batch = config.get(batch_key)
            if _number(batch) and batch >= 1 and count < batch * world_size:
                problems.append(
                    f"{where} holds {count} items, fewer than one global batch ({batch_key} {batch} x "
                    f"{world_size} process(es) = {batch * world_size}): lower {batch_key} or add data")
    return problems


def check_sizes(config: Mapping[str, Any], sizes: Mapping[str, int], source: str, world_size: int = 1) -> None:
    """Raise one ``ConfigError`` naming ``source`` and every problem :func:`size_problems` finds."""
    _raise(size_problems(config, sizes, world_size), source)


def itm_batch_problems(config: Mapping[str, Any]) -> list[str]:
    """Task hook of the tasks trained with ITM: its hard negative is drawn from the batch, so a per-process
    training batch of 1 has none."""
    key = train_batch_key(config)
    if config.get(key) == 1:
        return [f"{key} is 1: ITM hard negatives need at least 2 samples per process batch"]
    return []


def files_given_problems(config: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """Each of ``keys`` (``train_file`` ...) must name at least one file."""
    problems = []
    for key in keys:
        value = config.get(key)
        if not value or (isinstance(value, list) and not any(value)):
            problems.append(f"{key} is {'missing' if key not in config else repr(value)}: this run needs at least "
                            f"one file (set it in the config or --override {key}=[a.json])")
    return problems


def check_files_given(config: Mapping[str, Any], keys: Iterable[str], source: str) -> None:
    """Raise one ``ConfigError`` when a key of ``keys`` names no file."""
    _raise(files_given_problems(config, keys), source)


def check_device(device: str | None) -> str | None:
    """Validate ``--device`` before anything is built: returns it normalised (``gpu`` -> ``cuda``), None for
    the default. Raises ``ConfigError`` for an unknown device or one this machine does not have."""
    if device is None:
        return None
    import torch  # here: the rules need no torch (scripts/validate_data.py, --help stay light)

    name = device.strip().lower()
    if name == "gpu" or name.startswith("gpu:"):
        name = "cuda" + name[3:]
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: this machine has no CUDA device (use --device cpu)")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), 0 to {count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: MPS (Apple GPU) is not available on this machine")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device}: device type {dev.type!r} is not supported (cpu, cuda, mps)")
    return name


def reject_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, unused: Mapping[str, str],
                 script: str) -> None:
    """Raise ``ConfigError`` when a flag of ``unused`` (dest -> why) was given: a flag a script does not use
    must not be accepted and ignored (``Pretrain.py --evaluate`` would train and overwrite checkpoints)."""
    given = [dest for dest in unused if getattr(args, dest, None) != parser.get_default(dest)]
    if given:
        raise ConfigError("; ".join(f"{script} does not take --{dest}: {unused[dest]}" for dest in given))
