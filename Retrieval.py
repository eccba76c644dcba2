r"""ALBEF image-text retrieval: fine-tuning (ITC with image-id positives + ITM) and the paper's evaluation.

    python Retrieval.py --config configs/toy/Retrieval.yaml --output_dir output/toy_retrieval \
        --checkpoint output/toy_pretrain/checkpoint_best.pth
    python Retrieval.py --config configs/Retrieval_flickr.yaml --output_dir output/zs_flickr \
        --checkpoint mscoco.pth --evaluate          # zero-shot Flickr30K from the COCO-fine-tuned model
    torchrun --nproc_per_node=8 Retrieval.py --config configs/Retrieval_coco.yaml --output_dir output/coco \
        --checkpoint ALBEF.pth

Each epoch evaluates val (``score`` = val ``r_mean`` picks ``checkpoint_best.pth``); the best checkpoint is
then evaluated on test. ``--evaluate`` only evaluates val and test. ``log.txt`` has one line per epoch (val
metrics included) or, with ``--evaluate``, one line of val and test metrics; all results are written to
``output_dir/result/retrieval_metrics.json``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.config import COMMON_DEFAULTS, get_parser

if TYPE_CHECKING:  # torch, the models and the data are imported inside the functions: --help stays fast
    import torch

    from dataset import RetrievalEvalDataset
    from models.model_retrieval import ALBEFRetrieval
    from models.tokenizer import TextTokenizer

logger = logging.getLogger("albef.retrieval")

# Every accepted key with its default; this dict is the schema (unknown keys are rejected).
DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    "train_file": [],  # JSON files of {image, caption, image_id}, image relative to image_root
    "val_file": "",  # JSON of {image, caption: [str, ...]} ('' : no validation)
    "test_file": "",
    "image_root": "",
    "image_res": 384,
    "batch_size_train": 32,  # per GPU
    "batch_size_test": 64,
    "queue_size": 65536,
    "momentum": 0.995,
    "embed_dim": 256,
    "temp": 0.07,
    "k_test": 256,  # ITC shortlist reranked by ITM (0: ITC-only ranking)
    "score": "itm",  # rerank score: 'itm' (official, ITM positive logit) or 'itm+itc' (BLIP/LAVIS)
    "alpha": 0.4,
    "distill": True,
    "warm_up": True,  # ramp alpha over epoch 0
    "max_words": 30,  # words kept by pre_caption
    "max_tokens": 30,  # tokenizer length (incl. [CLS]) in training and evaluation
    "crop_scale": [0.5, 1.0],  # RandomResizedCrop scale of fine-tuning
    "randaug": True,  # RandomAugment(2, 7) in training
    "text_batch": 256,  # texts per encoder batch in evaluation (hard-coded 256 in the official code)
    "rerank_batch": 256,  # (image, text) pairs per fusion batch in evaluation
    "eval_amp": "bf16",  # autocast of evaluation on CUDA: 'off' | 'bf16' | 'fp16'
    "optimizer": {"opt": "adamW", "lr": 1e-5, "weight_decay": 0.02},
    "schedular": {"sched": "cosine", "lr": 1e-5, "epochs": 10, "min_lr": 1e-6, "decay_rate": 1,
                  "warmup_lr": 1e-5, "warmup_epochs": 1, "cooldown_epochs": 0},
}


def score_problems(config: dict) -> list[str]:
    """The rerank score is one of the two known ones (``k_test``, ``eval_amp`` ...: ``engine.checks.RULES``)."""
    if config["score"] not in ("itm", "itm+itc"):
        return [f"score must be 'itm' or 'itm+itc', got {config['score']!r}"]
    return []


def training_problems(config: dict) -> list[str]:
    """Fine-tuning (not ``--evaluate``): ``train_file`` names a file, and a batch holds an ITM hard negative."""
    from engine.checks import files_given_problems, itm_batch_problems

    return files_given_problems(config, ["train_file"]) + itm_batch_problems(config)


# The task's own start-up checks (``engine.checks`` hooks, besides the common rules); scripts/validate_data.py
# runs them too, and TRAINING_CHECKS unless --evaluate.
CONFIG_CHECKS = [score_problems]
TRAINING_CHECKS = [training_problems]


def check_split_sizes(config: dict, splits: dict[str, RetrievalEvalDataset], source: str) -> None:
    """An empty val/test split is an error (``engine.checks``); a ``k_test`` beyond a split's images or texts
    is allowed (the shortlist is then the whole split) and said once."""
    from engine.checks import check_sizes

    check_sizes(config, {split: len(dataset) for split, dataset in splits.items()}, source)
    for split, dataset in splits.items():
        if config["k_test"] > min(len(dataset), len(dataset.text)):
            logger.warning("k_test %d exceeds the %d images or %d texts of %s: ITM reranks every candidate",
                           config["k_test"], len(dataset), len(dataset.text), split)


def make_step_fn(tokenizer: TextTokenizer, config: dict, device: torch.device) -> Callable:
    """Batch -> named losses; the batch is (images (B, 3, R, R), captions list[str], image indices (B,))."""

    def step(model: torch.nn.Module, batch: tuple, alpha: float, global_step: int) -> dict[str, torch.Tensor]:
        image, captions, idx = batch
        text = tokenizer(captions, max_length=config["max_tokens"]).to(device, non_blocking=True)
        return model(image.to(device, non_blocking=True), text.input_ids, text.attention_mask,
                     idx.to(device, non_blocking=True), alpha=alpha)

    return step


def make_evaluator(config: dict, tokenizer: TextTokenizer, device: torch.device) -> Callable:
    """``evaluate(model, dataset) -> metrics`` with the config's evaluation settings."""
    from models.retrieval_eval import evaluate_retrieval

    def evaluate(model: torch.nn.Module, dataset: RetrievalEvalDataset) -> dict[str, float]:
        return evaluate_retrieval(
            model, dataset, tokenizer, device, k_test=config["k_test"], score=config["score"],
            batch_size=config["batch_size_test"], text_batch=config["text_batch"],
            rerank_batch=config["rerank_batch"], max_length=config["max_tokens"],
            num_workers=config["num_workers"], amp=config["eval_amp"])

    return evaluate


def eval_datasets(config: dict) -> dict[str, RetrievalEvalDataset]:
    """The configured val / test splits (absent ones are skipped); missing image files are reported now."""
    from dataset import RetrievalEvalDataset, build_transform
    from dataset.validate import report_missing_images

    transform = build_transform("test", config["image_res"])
    splits = {split: RetrievalEvalDataset(config[f"{split}_file"], transform, config["image_root"],
                                          config["max_words"]) for split in ("val", "test") if config[f"{split}_file"]}
    for split, dataset in splits.items():
        report_missing_images(config[f"{split}_file"], dataset.ann, config["image_root"])
    return splits


def run_evaluation(model: ALBEFRetrieval, args: Any, splits: dict, evaluate: Callable,
                   device: torch.device) -> dict:
    """``--evaluate``: the ``--checkpoint`` weights on val and test."""
    from models.checkpoint import load_weights, read_state_dict

    if args.checkpoint:
        state, ckpt = read_state_dict(args.checkpoint)
        saved = ckpt.get("config")
        trained_res = saved.get("image_res") if isinstance(saved, dict) else None
        if trained_res is not None and trained_res != model.config.image_res:
            logger.warning("%s was trained at %s px but is evaluated at %d px (salesforce/ALBEF#25: evaluate a "
                           "pre-trained checkpoint at its own resolution, --override image_res=%s)",
                           args.checkpoint, trained_res, model.config.image_res, trained_res)
        load_weights(model, state)
    else:
        logger.warning("--evaluate without --checkpoint: evaluating a randomly initialised model")
    model.to(device)
    results: dict = {"mode": "evaluate", "checkpoint": args.checkpoint}
    for split, dataset in splits.items():
        results[split] = evaluate(model, dataset)
    return results


def run_training(model: ALBEFRetrieval, args: Any, config: dict, splits: dict, evaluate: Callable,
                 tokenizer: TextTokenizer, device: torch.device) -> dict:
    """Fine-tune with ``trainer.fit`` (val each epoch), then evaluate the best checkpoint on test."""
    from dataset import RetrievalTrainDataset, build_transform, create_loader
    from engine import checks, distributed, task_run, trainer

    trainer.check_itm_batch(config["batch_size_train"], "batch_size_train")
    transform = build_transform("train", config["image_res"], crop_scale=tuple(config["crop_scale"]),
                                randaug=config["randaug"])
    dataset = RetrievalTrainDataset(config["train_file"], transform, config["image_root"], config["max_words"])
    logger.info("%d captions of %d images for training", len(dataset), len(dataset.img_ids))
    checks.check_sizes(config, {"train": len(dataset)}, args.config, distributed.get_world_size())
    loader = create_loader(dataset, config["batch_size_train"], config["num_workers"], shuffle=True,
                           seed=args.seed, drop_last=True, rank=distributed.get_rank(),
                           world_size=distributed.get_world_size())
    return task_run.fit_and_test(model, loader, make_step_fn(tokenizer, config, device), config, args, device,
                                 splits, lambda m, split, epoch: evaluate(m, splits[split]), "r_mean")


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune and/or evaluate; returns the results written to ``retrieval_metrics.json``."""
    parser = get_parser(__doc__)
    args = parser.parse_args(argv)
    from engine import checks, distributed, task_run, trainer
    from models.albef import ALBEFConfig
    from models.model_retrieval import ALBEFRetrieval
    from models.tokenizer import TextTokenizer

    if args.evaluate:
        checks.reject_flags(args, parser, {"resume": "it evaluates the --checkpoint weights; --resume continues "
                                                     "a fine-tuning run"}, "Retrieval.py --evaluate")
    hooks = CONFIG_CHECKS if args.evaluate else [*CONFIG_CHECKS, *TRAINING_CHECKS]
    config, device = trainer.setup_run(args, DEFAULTS, hooks)
    tokenizer = TextTokenizer(args.text_encoder)
    model = ALBEFRetrieval(ALBEFConfig.from_config(config))
    splits = eval_datasets(config)
    check_split_sizes(config, splits, args.config)
    evaluate = make_evaluator(config, tokenizer, device)
    if args.evaluate:
        results = run_evaluation(model, args, splits, evaluate, device)
    else:
        results = run_training(model, args, config, splits, evaluate, tokenizer, device)
    task_run.write_results(args.output_dir, results, "retrieval", round_floats=False)
    distributed.barrier()
    return results


if __name__ == "__main__":
    get_parser(__doc__).parse_args()  # --help and usage errors answer before torch is imported
    from engine.trainer import run_main

    sys.exit(run_main(main))
