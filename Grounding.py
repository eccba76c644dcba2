"""ALBEF weakly supervised visual grounding (paper Sec. 6.4, Table 5): retrieval fine-tuning on referring
expressions, evaluated by ranking detector proposals with Grad-CAM.

    python Grounding.py --config configs/toy/Grounding.yaml --output_dir output/toy_grounding \
        --checkpoint output/toy_pretrain/checkpoint_best.pth
    python Grounding.py --config configs/Grounding.yaml --output_dir output/refcoco --checkpoint refcoco.pth \
        --evaluate --gradcam_mode itc --block_num 8
    torchrun --nproc_per_node=8 Grounding.py --config configs/Grounding.yaml --output_dir output/refcoco \
        --checkpoint ALBEF.pth

Training is the retrieval objective (ITC with same-image positives + ITM, momentum distillation) on
``{image, text}`` pairs; boxes are never used. The image id of the ITC positives is the image file's name. Each
epoch every test expression gets a Grad-CAM map (``gradcam_mode`` ``itm`` or ``itc``, layer ``block_num``),
the proposals of its image are ranked by it, and the accuracy per split (``val_d``, ``testA_d``, ``testB_d``)
is logged; ``val_d`` picks ``checkpoint_best.pth``. Under torchrun each rank maps a contiguous share of the
expressions and the maps are gathered in memory (no per-rank result files). Ground truth (``refcoco_data``):
the official ``refer`` folder (``<refcoco_data>/refcoco+/refs(unc).p`` + ``instances.json``) or a plain JSON
``{ref_id: {split, bbox, image_id, height, width}}``. Results: ``log.txt``,
``output_dir/result/grounding_metrics.json`` and, per expression (the evaluated epoch's picked box, its IoU and
verdict), ``output_dir/result/grounding_refs.json``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from engine.config import COMMON_DEFAULTS, ConfigError, get_parser
from Retrieval import make_step_fn

if TYPE_CHECKING:  # torch, the models and the data are imported inside the functions: --help stays fast
    import torch

    from dataset.grounding_dataset import GroundingEvalDataset
    from models.model_retrieval import ALBEFRetrieval
    from models.tokenizer import TextTokenizer

GRADCAM_MODES = ("itm", "itc")  # models.gradcam.MODES, written out so that --help imports no model code

logger = logging.getLogger("albef.grounding")

# Every accepted key with its default; this dict is the schema (unknown keys are rejected).
DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    "train_file": [],  # JSON files of {image, text}, image relative to image_root
    "test_file": [],  # JSON files of {image, text, ref_id}
    "refcoco_data": "",  # refer data folder (official layout) or a plain ground-truth JSON
    "refer_dataset": "refcoco+",  # refer layout: <refcoco_data>/<refer_dataset>/refs(<refer_split_by>).p
    "refer_split_by": "unc",
    "det_file": "",  # proposals {str(image_id): [[x, y, w, h, ...], ...]}
    "coco_file": "",  # accepted and unused, as in the official code
    "image_root": "",
    "image_res": 384,
    "batch_size": 32,  # per GPU, training and evaluation (official)
    "queue_size": 65536,
    "momentum": 0.995,
    "embed_dim": 256,
    "temp": 0.07,
    "alpha": 0.4,
    "distill": True,
    "warm_up": True,
    "max_words": 30,  # words kept by pre_caption
    "max_tokens": 30,  # training tokenizer length (evaluation texts are not truncated, as in the official code)
    "randaug": True,  # RandomAugment(2, 7) after the resize and flip
    "gradcam_mode": "itm",  # 'itm' or 'itc' (--gradcam_mode)
    "block_num": None,  # Grad-CAM layer (--block_num); null: models.gradcam.default_block (8 at full size)
    "box_alpha": 0.5,  # proposal score = heat inside / area ** box_alpha
    "optimizer": {"opt": "adamW", "lr": 1e-5, "weight_decay": 0.02},
    "schedular": {"sched": "cosine", "lr": 1e-5, "epochs": 5, "min_lr": 1e-6, "decay_rate": 1,
                  "warmup_lr": 1e-5, "warmup_epochs": 1, "cooldown_epochs": 0},
}


def config_problems(config: dict) -> list[str]:
    """What the schema's types cannot catch: the Grad-CAM mode and block, and the evaluation files (evaluation
    runs every epoch, so even a training run needs them)."""
    from models.gradcam import MODES

    problems = []
    if config["gradcam_mode"] not in MODES:
        problems.append(f"gradcam_mode must be one of {MODES}, not {config['gradcam_mode']!r}")
    block = config["block_num"]
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 0):
        problems.append(f"block_num must be a layer index (an integer >= 0) or null, not {block!r}")
    for key in ("test_file", "refcoco_data", "det_file"):
        if not config[key]:
            problems.append(f"{key} is not set: grounding is evaluated on test_file with refcoco_data, det_file")
    return problems


def training_problems(config: dict) -> list[str]:
    """Fine-tuning (not ``--evaluate``): ``train_file`` names a file, and a batch holds an ITM hard negative."""
    from engine.checks import files_given_problems, itm_batch_problems

    return files_given_problems(config, ["train_file"]) + itm_batch_problems(config)


# The task's own start-up checks (``engine.checks`` hooks, besides the common rules); scripts/validate_data.py
# runs them too, and TRAINING_CHECKS unless --evaluate.
CONFIG_CHECKS = [config_problems]
TRAINING_CHECKS = [training_problems]


def parse_args(argv: list[str] | None) -> Any:
    """The common flags plus the official ``--gradcam_mode`` and ``--block_num`` (they override the config)."""
    parser = get_parser(__doc__)
    parser.add_argument("--gradcam_mode", choices=GRADCAM_MODES, default=None, help="default: the config's (itm)")
    parser.add_argument("--block_num", type=int, default=None, help="default: the config's")
    args = parser.parse_args(argv)
    for key in ("gradcam_mode", "block_num"):
        if getattr(args, key) is not None:
            args.override.append(f"{key}={getattr(args, key)}")
    return args


# ----------------------------------------------------------------------------- evaluation
def collect_maps(model: ALBEFRetrieval, dataset: GroundingEvalDataset, tokenizer: TextTokenizer,
                 device: torch.device, config: dict) -> dict[int, torch.Tensor]:
    """Grad-CAM map (G, G) of every expression, {ref_id: map} on every rank.

    Each rank maps its contiguous share (``distributed.shard_dataset``); maps and ref ids are gathered in rank
    order in memory. Expressions whose image cannot be read are left out (and logged).
    """
    import torch
    from torch.utils.data import DataLoader

    from dataset import collate_skip_none
    from dataset.grounding_eval import maps_by_ref
    from engine import distributed
    from models.gradcam import gradcam, patch_grid

    loader = DataLoader(distributed.shard_dataset(dataset), batch_size=config["batch_size"], shuffle=False,
                        num_workers=config["num_workers"], collate_fn=collate_skip_none)
    grid = patch_grid(model)
    ref_ids, maps, dropped = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, grid, grid)], 0
    max_length = model.config.bert.max_position_embeddings
    for batch in loader:
        dropped += int(batch[-1])
        if len(batch) == 1:
            continue
        image, texts, ids = batch[:3]
        text = tokenizer(texts, max_length=max_length).to(device)
        out = gradcam(model, image.to(device), text.input_ids, text.attention_mask,
                      mode=config["gradcam_mode"], block_num=config["block_num"])
        maps.append(out["map"].float().cpu())
        ref_ids.append(ids)
    where = distributed.collective_device()
    all_ids = distributed.all_gather_uneven(torch.cat(ref_ids).to(where)).cpu()
    all_maps = distributed.all_gather_uneven(torch.cat(maps).to(where)).cpu()
    if dropped:
        logger.warning("%d expression(s) of rank %d left out: unreadable images", dropped, distributed.get_rank())
    return maps_by_ref(all_ids, all_maps)


class GroundingEvaluator:
    """``evaluator(model, epoch) -> {'val_d', 'testA_d', 'testB_d', ..., 'n_refs'}`` on the test files.

    Builds the evaluation set, reads the ground truth and the proposals, and checks them once, before any
    training. ``outcomes[epoch]`` keeps, on the main process, one row per expression in test-file order:
    ``{"ref_id", "text", "split", "box" (the picked proposal [x, y, w, h]), "iou", "correct"}``.
    """

    def __init__(self, config: dict, tokenizer: TextTokenizer, device: torch.device) -> None:
        from dataset import build_transform
        from dataset.grounding_dataset import GroundingEvalDataset, load_dets, load_ground_truth, reference_problems
        from dataset.grounding_eval import proposal_stats

        self.config, self.tokenizer, self.device = config, tokenizer, device
        self.dataset = GroundingEvalDataset(config["test_file"], build_transform("test", config["image_res"]),
                                            config["image_root"], config["max_words"])
        self.truth = load_ground_truth(config["refcoco_data"], config["refer_dataset"], config["refer_split_by"])
        self.dets = load_dets(config["det_file"])
        problems = reference_problems(self.dataset.ref_ids, self.truth, self.dets)
        if problems:  # found now, not after an epoch of training
            raise ConfigError(f"{'; '.join(problems)} (ground truth {config['refcoco_data']}, proposals "
                              f"{config['det_file']})")
        for split, s in proposal_stats(self.dataset.ref_ids, self.truth, self.dets).items():
            logger.info("%s: %d expressions, chance accuracy %.2f%% (mean 1/#proposals), fewest proposals %d, "
                        "exactly one proposal at IoU >= 0.5 for %.1f%%", split, s["n"], 100 * s["chance"],
                        s["min_proposals"], 100 * s["one_hit"])
        self.texts = {ann["ref_id"]: ann["text"] for ann in reversed(self.dataset.ann)}  # repeated id: first text
        self.outcomes: dict[int, list[dict]] = {}

    def __call__(self, model: torch.nn.Module, epoch: int = 0) -> dict[str, float]:
        from dataset.grounding_eval import ref_outcomes, split_accuracy
        from engine import distributed

        maps = collect_maps(model, self.dataset, self.tokenizer, self.device, self.config)
        metrics = None
        if distributed.is_main_process():
            outcomes = ref_outcomes(maps, self.truth, self.dets, self.config["box_alpha"])
            metrics = {**split_accuracy(outcomes), "n_refs": len(maps)}
            self.outcomes[epoch] = [{"ref_id": r, "text": self.texts[r], **outcomes[r]}
                                    for r in dict.fromkeys(self.dataset.ref_ids) if r in outcomes]
        return distributed.broadcast_object(metrics)


# ----------------------------------------------------------------------------- runs
def run_training(model: ALBEFRetrieval, args: Any, config: dict, evaluate: GroundingEvaluator,
                 tokenizer: TextTokenizer, device: torch.device) -> dict:
    """Fine-tune with ``trainer.fit``; each epoch evaluates every split, ``val_d`` picks the best."""
    from dataset import build_transform, create_loader
    from dataset.grounding_dataset import GroundingTrainDataset
    from engine import distributed, trainer

    transform = build_transform("grounding_train", config["image_res"], randaug=config["randaug"])
    dataset = GroundingTrainDataset(config["train_file"], transform, config["image_root"], config["max_words"])
    logger.info("%d expressions of %d images for training", len(dataset), len(dataset.img_ids))
    loader = create_loader(dataset, config["batch_size"], config["num_workers"], shuffle=True, seed=args.seed,
                           drop_last=True, rank=distributed.get_rank(), world_size=distributed.get_world_size())
    history: dict[int, dict[str, float]] = {}

    def evaluate_epoch(m: torch.nn.Module, epoch: int) -> dict:
        history[epoch] = evaluate(m, epoch)
        return history[epoch]

    record = trainer.fit(model, loader, make_step_fn(tokenizer, config, device), config, args, device,
                         evaluate_epoch, score="val_d")
    best = record.get("best_epoch", record.get("epoch"))
    results = {"mode": "train", "checkpoint": args.checkpoint, "gradcam_mode": config["gradcam_mode"],
               "block_num": config["block_num"], "last_epoch": record.get("epoch"), "best_epoch": best}
    return {**results, **history.get(best, {k: v for k, v in record.items() if k.endswith("_d")})}


def write_ref_outcomes(output_dir: str, rows: list[dict] | None) -> None:
    """``result/grounding_refs.json``: the evaluated epoch's box and verdict for every expression, for error
    analysis (``scripts/toy_grounding_kinds.py`` groups the toy world's by expression kind). ``rows`` None (a
    resumed run whose best epoch was evaluated before the resume): an older file is removed, not left to
    contradict ``grounding_metrics.json``."""
    from engine import task_run

    path = os.path.join(output_dir, "result", "grounding_refs.json")
    if rows is None:
        if os.path.exists(path):
            os.remove(path)
        logger.warning("the best epoch was evaluated before this run resumed: no %s (evaluate checkpoint_best.pth "
                       "with --evaluate to write it)", path)
        return
    task_run.write_result_file(output_dir, "grounding_refs.json", rows)
    logger.info("per-expression boxes and verdicts: %s", path)


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune and/or evaluate; returns the results written to ``grounding_metrics.json`` (and the per-expression
    rows to ``grounding_refs.json``)."""
    args = parse_args(argv)
    from engine import distributed, task_run, trainer
    from models.albef import ALBEFConfig
    from models.checkpoint import load_weights
    from models.model_retrieval import ALBEFRetrieval
    from models.tokenizer import TextTokenizer

    config, device = trainer.setup_run(args, DEFAULTS, CONFIG_CHECKS if args.evaluate else
                                       [*CONFIG_CHECKS, *TRAINING_CHECKS])
    tokenizer = TextTokenizer(args.text_encoder)
    model = ALBEFRetrieval(ALBEFConfig.from_config(config))
    evaluate = GroundingEvaluator(config, tokenizer, device)
    if args.evaluate:
        if args.checkpoint:
            load_weights(model, args.checkpoint)
        else:
            logger.warning("--evaluate without --checkpoint: evaluating a randomly initialised model")
        results = {"mode": "evaluate", "checkpoint": args.checkpoint, "gradcam_mode": config["gradcam_mode"],
                   "block_num": config["block_num"], **evaluate(model.to(device))}
    else:
        results = run_training(model, args, config, evaluate, tokenizer, device)
    task_run.write_results(args.output_dir, results, "grounding", flatten=None, round_floats=False)
    if distributed.is_main_process():
        write_ref_outcomes(args.output_dir, evaluate.outcomes.get(0 if args.evaluate else results["best_epoch"]))
    distributed.barrier()
    return results


if __name__ == "__main__":
    parse_args(None)  # --help and usage errors answer before torch is imported
    from engine.trainer import run_main

    sys.exit(run_main(main))
