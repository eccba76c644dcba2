"""ALBEF visual entailment (SNLI-VE): fine-tuning and evaluation (paper Sec. 5, official ``VE.py``).

    python SNLI_VE.py --config configs/toy/VE.yaml --output_dir output/toy_ve \
        --checkpoint output/toy_pretrain/checkpoint_15.pth
    python SNLI_VE.py --config configs/VE.yaml --output_dir output/ve --checkpoint ve.pth --evaluate
    torchrun --nproc_per_node=8 SNLI_VE.py --config configs/VE.yaml --output_dir output/ve --checkpoint ALBEF.pth

A 3-way MLP head (contradiction / neutral / entailment) on the fused [CLS] state, trained with momentum
distillation (``distill``: ``(1 - alpha) CE + alpha`` soft CE against the momentum model). Each epoch evaluates
val (``val_acc`` picks ``checkpoint_best.pth``); the best checkpoint is then evaluated on test. ``--evaluate``
only evaluates val and test. ``output_dir/result/ve_metrics.json`` holds accuracy, per-class accuracy and the
confusion matrix (``confusion[true][predicted]``) of each split, ``ve_predictions.json`` each item's label and
prediction (the evaluated weights'); ``log.txt`` one line per epoch.

The shared classification glue below (step function, evaluator, training and evaluation runs) serves NLVR.py too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from engine.config import COMMON_DEFAULTS, get_parser

if TYPE_CHECKING:  # torch, the models and the data are imported inside the functions: --help stays fast
    import torch
    from torch.utils.data import Dataset

    from models.tokenizer import TextTokenizer

logger = logging.getLogger("albef.classifier")

# Keys of every classification task (SNLI-VE, NLVR2) with their defaults.
CLASSIFIER_DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    "image_root": "",
    "image_res": 384,
    "momentum": 0.995,  # hard-coded in the official VE / NLVR models
    "alpha": 0.4,
    "distill": True,  # momentum twins and the distillation term
    "max_words": 30,  # words kept by pre_caption
    "max_tokens": 512,  # tokenizer length incl. [CLS]; the official code does not truncate (pre_caption does)
    "crop_scale": [0.5, 1.0],  # RandomResizedCrop scale of fine-tuning
    "randaug": True,  # RandomAugment(2, 7) in training
    "eval_amp": "off",  # autocast of evaluation on CUDA: 'off' | 'bf16' | 'fp16'
    # Momentum twins that --checkpoint lacks (TA checkpoint, fine-tuning from a retrieval model): 'loaded' = copies
    # of the loaded weights; 'random' = official (copy_params() runs before loading: they keep the random init).
    "teacher_init": "loaded",
    "optimizer": {"opt": "adamW", "lr": 2e-5, "weight_decay": 0.02},
}

DEFAULTS: dict[str, Any] = {
    **CLASSIFIER_DEFAULTS,
    "train_file": "",  # JSON of {image, sentence, label}; image: Flickr30K id (image_root/<id>.jpg)
    "val_file": "",
    "test_file": "",
    "batch_size_train": 32,  # per GPU
    "batch_size_test": 64,
    "warm_up": False,  # ramp alpha over epoch 0
    "schedular": {"sched": "cosine", "lr": 2e-5, "epochs": 5, "min_lr": 1e-6, "decay_rate": 1,
                  "warmup_lr": 1e-5, "warmup_epochs": 1, "cooldown_epochs": 0},
}


def classifier_config_problems(config: dict) -> list[str]:
    """Task hook (``engine.checks``): the values of the classification tasks' own keys."""
    if config["teacher_init"] not in ("loaded", "random"):
        return [f"teacher_init must be 'loaded' or 'random', not {config['teacher_init']!r}"]
    return []


def train_file_problems(config: dict) -> list[str]:
    """Training hook: ``train_file`` must name data."""
    from engine import checks

    return checks.files_given_problems(config, ["train_file"])


CONFIG_CHECKS = (classifier_config_problems,)
TRAINING_CHECKS = (train_file_problems,)


def hooks_for(args: argparse.Namespace) -> tuple:
    """The config checks of this run: ``CONFIG_CHECKS``, and ``TRAINING_CHECKS`` unless ``--evaluate``."""
    return CONFIG_CHECKS if args.evaluate else CONFIG_CHECKS + TRAINING_CHECKS


def check_split_sizes(config: dict, splits: dict, train_set: Dataset | None, source: str) -> None:
    """Empty splits, or a training split smaller than one global batch: one ``ConfigError``."""
    from engine import checks, distributed

    sizes = {split: len(dataset) for split, dataset in splits.items()}
    if train_set is not None:
        sizes["train"] = len(train_set)
    checks.check_sizes(config, sizes, source, distributed.get_world_size())


def make_step_fn(tokenizer: TextTokenizer, config: dict, device: torch.device) -> Callable:
    """Batch -> ``{'loss', 'acc'}``; the batch is (images..., sentences, labels (B,)): one image tensor (B, 3, R, R)
    for SNLI-VE, two for NLVR2 (concatenated to (2B, 3, R, R): first images, then second images)."""
    import torch

    def step(model: torch.nn.Module, batch: tuple, alpha: float, global_step: int) -> dict[str, torch.Tensor]:
        *images, sentences, labels = batch
        text = tokenizer(sentences, max_length=config["max_tokens"]).to(device, non_blocking=True)
        image = torch.cat(images).to(device, non_blocking=True)
        return model(image, text.input_ids, text.attention_mask, labels.to(device, non_blocking=True), alpha=alpha)

    return step


def make_evaluator(config: dict, tokenizer: TextTokenizer, device: torch.device, class_names: Sequence[str],
                   batch_size: int) -> Callable[[torch.nn.Module, Dataset], dict]:
    """``evaluate(model, dataset) -> metrics`` (each example once across ranks)."""
    from models.classifier_eval import evaluate_classifier

    def evaluate(model: torch.nn.Module, dataset: Dataset) -> dict:
        return evaluate_classifier(model, dataset, tokenizer, device, class_names, batch_size, config["max_tokens"],
                                   config["num_workers"], config["eval_amp"])

    return evaluate


def flat_metrics(split: str, metrics: dict) -> dict[str, float]:
    """The scalar metrics of one split for ``log.txt``: ``val_acc``, ``val_n``, ``val_acc_<class>`` ..."""
    out = {f"{split}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    out.update({f"{split}_acc_{name}": v for name, v in metrics.get("per_class_acc", {}).items()})
    return out


def run_evaluation(model: torch.nn.Module, args: argparse.Namespace, splits: dict, evaluate: Callable,
                   device: torch.device) -> dict:
    """``--evaluate``: the ``--checkpoint`` weights on val and test."""
    from models.checkpoint import load_weights

    if args.checkpoint:
        report = load_weights(model, args.checkpoint)
        if report.fresh_heads:
            logger.warning("%s has no classifier head (%s): the evaluated head is untrained; evaluate a fine-tuned "
                           "checkpoint", args.checkpoint, ", ".join(report.fresh_heads))
    else:
        logger.warning("--evaluate without --checkpoint: evaluating a randomly initialised model")
    model.to(device)
    results: dict = {"mode": "evaluate", "checkpoint": args.checkpoint}
    for split, dataset in splits.items():
        results[split] = evaluate(model, dataset)
    return results


def load_initial_weights(model: torch.nn.Module, args: argparse.Namespace, config: dict) -> argparse.Namespace:
    """Load ``--checkpoint`` (unless resuming) with the configured ``teacher_init``; returns the arguments for
    ``trainer.fit`` (without the checkpoint, which is loaded already)."""
    from models.checkpoint import load_weights

    if not args.checkpoint or args.resume:
        return args
    report = load_weights(model, args.checkpoint, init_momentum=config["teacher_init"] == "loaded")
    if report.momentum_kept:
        logger.info("teacher_init 'random' (official): %s keep their random initialisation",
                    ", ".join(report.momentum_kept))
    return argparse.Namespace(**{**vars(args), "checkpoint": ""})


def run_training(model: torch.nn.Module, args: argparse.Namespace, config: dict, train_set: Dataset, splits: dict,
                 evaluate: Callable, step_fn: Callable, batch_size: int, device: torch.device) -> dict:
    """Fine-tune with ``trainer.fit`` (val each epoch, best on ``val_acc``), then evaluate the best on test."""
    from dataset import create_loader
    from engine import distributed, task_run

    loader = create_loader(train_set, batch_size, config["num_workers"], shuffle=True, seed=args.seed,
                           drop_last=True, rank=distributed.get_rank(), world_size=distributed.get_world_size())
    fit_args = load_initial_weights(model, args, config)
    results = task_run.fit_and_test(model, loader, step_fn, config, fit_args, device, splits,
                                    lambda m, split, epoch: evaluate(m, splits[split]), "acc", flat_metrics)
    return {**results, "checkpoint": args.checkpoint}


def run_classifier_task(args: argparse.Namespace, defaults: dict, model_cls: type, dataset_cls: type,
                        class_names: Sequence[str], name: str, noun: str, batch_keys: tuple[str, str]) -> dict:
    """The body of ``SNLI_VE.main`` and ``NLVR.main``: set up, fine-tune and/or evaluate, write the results.

    ``model_cls(ALBEFConfig)`` and ``dataset_cls(files, transform, image_root, max_words)`` are the task's;
    ``name`` names ``result/<name>_metrics.json``; ``noun`` the training items in the log; ``batch_keys`` the
    config keys of the training and evaluation batch sizes. Returns the results written.
    """
    from dataset import build_transform  # here, not above: --help stays fast
    from engine import distributed, task_run, trainer
    from models.albef import ALBEFConfig
    from models.tokenizer import TextTokenizer

    config, device = trainer.setup_run(args, defaults, hooks_for(args))
    tokenizer = TextTokenizer(args.text_encoder)
    model = model_cls(ALBEFConfig.from_config(config))
    test_transform = build_transform("test", config["image_res"])
    splits = {split: dataset_cls(config[f"{split}_file"], test_transform, config["image_root"], config["max_words"])
              for split in ("val", "test") if config[f"{split}_file"]}
    evaluate = make_evaluator(config, tokenizer, device, class_names, config[batch_keys[1]])
    if args.evaluate:
        check_split_sizes(config, splits, None, args.config)
        results = run_evaluation(model, args, splits, evaluate, device)
    else:
        transform = build_transform("train", config["image_res"], crop_scale=tuple(config["crop_scale"]),
                                    randaug=config["randaug"])
        train_set = dataset_cls(config["train_file"], transform, config["image_root"], config["max_words"])
        check_split_sizes(config, splits, train_set, args.config)
        logger.info("%d training %s", len(train_set), noun)
        results = run_training(model, args, config, train_set, splits, evaluate,
                               make_step_fn(tokenizer, config, device), config[batch_keys[0]], device)
    write_predictions(args.output_dir, results, name)
    task_run.write_results(args.output_dir, results, name, flat_metrics)
    distributed.barrier()
    return results


def write_predictions(output_dir: str, results: dict, name: str) -> None:
    """Move each split's ``predictions`` out of ``results`` into ``result/<name>_predictions.json`` (rank 0):
    ``{split: [{index, sentence, label, prediction}, ...]}`` of the evaluated weights (training: the best val epoch's,
    or the last weights' without val), for per-item error analysis (``scripts/toy_nlvr_kinds.py``)."""
    from engine import distributed, task_run

    predictions = {split: results[split].pop("predictions") for split in ("val", "test")
                   if "predictions" in results.get(split, {})}
    if distributed.is_main_process():
        task_run.write_result_file(output_dir, f"{name}_predictions.json", predictions, indent=1)


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune and/or evaluate on SNLI-VE; returns the results written to ``ve_metrics.json``."""
    args = get_parser(__doc__).parse_args(argv)
    from dataset import VEDataset
    from dataset.ve_dataset import VE_CLASS_NAMES
    from models.model_ve import ALBEFVE

    return run_classifier_task(args, DEFAULTS, ALBEFVE, VEDataset, VE_CLASS_NAMES, "ve", "hypotheses",
                               ("batch_size_train", "batch_size_test"))


if __name__ == "__main__":
    get_parser(__doc__).parse_args()  # --help and usage errors answer before torch is imported
    from engine.trainer import run_main

    sys.exit(run_main(main))
