"""Sections ``ve`` and ``nlvr``: SNLI-VE and NLVR2 fine-tuning steps and inference throughput, per size.

The architectures are those of the task configs (:data:`CONFIGS`): ``full`` = ViT-B/16 at 384 px + BERT-base
(``configs/VE.yaml``; ``configs/NLVR.yaml``, whose 6 fusion layers are doubled into 12 blocks, 18 layers in all),
momentum twins included (``distill: true``); ``tiny`` = the toy models (``configs/toy/*.yaml``: 64 px, 4-block
ViT of width 128, the toy BERT). The batch is ``--batch-full`` / ``--batch-tiny`` examples (on CPU the issue's
figure is ``--batch-full 2``); an NLVR2 example is one sentence with two images. Texts are random word pieces
of :data:`TEXT_TOKENS` tokens. Rows (column ``measure``):

- ``train_step``: forward (the online logits, the twins' EMA step and their soft targets) + backward + AdamW of
  the config, timed as the other step sections (:mod:`scripts.bench.step_timing`); bf16 autocast on CUDA.
  ``examples_per_s`` = batch / median step.
- ``inference``: ``model.logits`` (the evaluation path of ``models.classifier_eval``) in eval mode without
  gradient, fp32 as the evaluation's default ``eval_amp: off``; ``examples_per_s`` = batch / median call,
  ``cpu_s_per_batch`` the process CPU seconds (all threads; steadier than wall time on a shared machine).
- ``ta_step`` (``nlvr`` only): a text-assignment pre-training step (``ALBEFPretrainNLVR``, the architecture and
  optimizer of ``configs/NLVR_pretrain.yaml`` / its toy twin: 256 px full, no twins) at the batch or 3, whichever
  is larger (two distinct negative images per caption need 3).
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable

import torch
from torch import Tensor

import NLVR
import Pretrain_nlvr
import SNLI_VE
from engine.config import load_config
from models.albef import ALBEFConfig
from models.model_nlvr import ALBEFNLVR
from models.model_pretrain_nlvr import ALBEFPretrainNLVR
from models.model_ve import ALBEFVE, ALBEFClassifier
from optim import create_optimizer
from scripts.bench.common import REPO_ROOT, Row, Section, logger, seed_everything
from scripts.bench.inputs import SIZES, make_captions, make_inputs
from scripts.bench.step_timing import inference_step_fn, run_interleaved, step_row, train_step_fn

# task -> size -> config file; task -> (entry-script defaults, model class)
CONFIGS = {
    "ve": {"tiny": "configs/toy/VE.yaml", "full": "configs/VE.yaml"},
    "nlvr": {"tiny": "configs/toy/NLVR.yaml", "full": "configs/NLVR.yaml"},
    "ta": {"tiny": "configs/toy/NLVR_pretrain.yaml", "full": "configs/NLVR_pretrain.yaml"},
}
SCHEMAS = {"ve": SNLI_VE.DEFAULTS, "nlvr": NLVR.DEFAULTS, "ta": Pretrain_nlvr.DEFAULTS}
MODELS: dict[str, type[ALBEFClassifier]] = {"ve": ALBEFVE, "nlvr": ALBEFNLVR}
IMAGES_PER_EXAMPLE = {"ve": 1, "nlvr": 2, "ta": 1}
# Token counts (min, max) of the random texts, [CLS] included: SNLI-VE hypotheses are short (about 7 words),
# NLVR2 sentences longer (about 15 words); TA captions are pre-training captions (COCO-like). Estimates.
TEXT_TOKENS = {"ve": (6, 16), "nlvr": (10, 30), "ta": (8, 20)}
TA_MIN_BATCH = 3


def task_setup(task: str, size: str) -> tuple[dict, ALBEFConfig]:
    """The resolved config of ``task`` (``ve``, ``nlvr`` or ``ta``) at ``size`` and its (12-layer) model config."""
    config = load_config(str(REPO_ROOT / CONFIGS[task][size]), SCHEMAS[task])
    return config, ALBEFConfig.from_config(config, str(REPO_ROOT / config["bert_config"]))


def make_texts(n: int, task: str, max_tokens: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` random texts of :data:`TEXT_TOKENS` ``[task]`` tokens (at most ``max_tokens``), padded to the longest."""
    low, high = TEXT_TOKENS[task]
    high = min(high, max_tokens)
    ids, mask = make_captions(n, high, seed, tokens=(min(low, high), high))
    width = int(mask.sum(dim=1).max())
    return ids[:, :width], mask[:, :width]


def example_inputs(task: str, batch: int, res: int, max_tokens: int, device: torch.device,
                   seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """images (I*B, 3, R, R): NLVR2's first images, then its second images; ids, mask (B, T); labels (B,)."""
    image, _, _ = make_inputs(IMAGES_PER_EXAMPLE[task] * batch, res, 1, device, seed)
    ids, mask = make_texts(batch, task, max_tokens, seed)
    labels = torch.arange(batch) % (3 if task == "ve" else 2)
    return image, ids.to(device), mask.to(device), labels.to(device)


def _timed_row(measure: str, task: str, size: str, batch: int, model_config: ALBEFConfig, text_len: int,
               step: Callable, args: argparse.Namespace, device: torch.device, precision: str) -> Row:
    """Time ``step`` with :func:`run_interleaved`; the flat row of a train or TA step."""
    results = run_interleaved({"ours": step}, args.steps, args.warmup, device)
    results["ours"]["peak_mb"] = results["ours"]["process_peak_mb"]
    row = step_row(size, batch, model_config, text_len, results)
    row["input"] = f"{model_config.image_res}px {IMAGES_PER_EXAMPLE[task]}img T{text_len}"
    return {"measure": measure, "task": task, **row, "precision": precision, "examples_per_s": batch / row["ours_s"]}


def bench_train_step(task: str, size: str, model: ALBEFClassifier, config: dict, args: argparse.Namespace,
                     device: torch.device) -> Row:
    """Fine-tuning step: forward (distillation, momentum update inside) + backward + AdamW."""
    batch = getattr(args, SIZES[size][2])
    model.train()
    image, ids, mask, labels = example_inputs(task, batch, model.config.image_res, config["max_tokens"], device,
                                              args.seed)
    optimizer = create_optimizer(config["optimizer"], model)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    alpha = args.alpha if config["distill"] else 0.0
    step = train_step_fn(lambda: {"loss": model(image, ids, mask, labels, alpha=alpha)["loss"]}, optimizer,
                         device.type, amp_dtype)
    logger.info("%s train_step %s: batch %d, %s, %.1fM parameters", task, size, batch, device,
                sum(p.numel() for p in model.parameters()) / 1e6)
    row = _timed_row("train_step", task, size, batch, model.config, ids.size(1), step, args, device,
                     "bf16-autocast" if amp_dtype else "fp32")
    del optimizer
    return row


def bench_inference(task: str, size: str, model: ALBEFClassifier, config: dict, args: argparse.Namespace,
                    device: torch.device) -> Row:
    """``model.logits`` without gradient in eval mode, fp32: examples per second."""
    batch = getattr(args, SIZES[size][2])
    model.eval()
    image, ids, mask, _ = example_inputs(task, batch, model.config.image_res, config["max_tokens"], device,
                                         args.seed + 1)
    step = inference_step_fn(lambda: model.logits(image, ids, mask), device.type, None)
    logger.info("%s inference %s: batch %d, %s", task, size, batch, device)
    ours = run_interleaved({"ours": step}, args.steps, args.warmup, device)["ours"]
    row: Row = {"measure": "inference", "task": task, "size": size, "batch": batch,
                "input": f"{model.config.image_res}px {IMAGES_PER_EXAMPLE[task]}img T{ids.size(1)}",
                "s_per_batch": ours["step_s"], "examples_per_s": batch / ours["step_s"],
                "peak_mb": ours["process_peak_mb"], "precision": "fp32"}
    if ours["cpu_s"] is not None:
        row["cpu_s_per_batch"] = ours["cpu_s"]
    row.update(steps_s=ours["steps_s"], cpu_steps_s=ours["cpu_steps_s"])
    return row


def bench_ta_step(size: str, args: argparse.Namespace, device: torch.device) -> Row:
    """Text-assignment pre-training step (hard negatives drawn in the forward) + backward + AdamW."""
    config, model_config = task_setup("ta", size)
    batch = max(getattr(args, SIZES[size][2]), TA_MIN_BATCH)
    seed_everything(args.seed)
    model = ALBEFPretrainNLVR(model_config).to(device).train()
    image, _, _ = make_inputs(batch, model_config.image_res, 1, device, args.seed)
    ids, mask = (t.to(device) for t in make_texts(batch, "ta", config["max_tokens"], args.seed))
    optimizer = create_optimizer(config["optimizer"], model)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    step = train_step_fn(lambda: {"loss": model(image, ids, mask)["loss_ta"]}, optimizer, device.type, amp_dtype)
    logger.info("nlvr ta_step %s: batch %d, %s, %.1fM parameters", size, batch, device,
                sum(p.numel() for p in model.parameters()) / 1e6)
    row = _timed_row("ta_step", "ta", size, batch, model_config, ids.size(1), step, args, device,
                     "bf16-autocast" if amp_dtype else "fp32")
    return {**row, "task": "nlvr"}  # a stage of NLVR2


def bench_task(task: str, args: argparse.Namespace) -> list[Row]:
    """Per size: inference, then the training step, on one model (fresh weights); NLVR2 adds the TA step."""
    device = torch.device(args.device)
    rows = []
    for size in args.sizes:
        config, model_config = task_setup(task, size)
        seed_everything(args.seed)
        model = MODELS[task](model_config).to(device)
        rows.append(bench_inference(task, size, model, config, args, device))
        rows.append(bench_train_step(task, size, model, config, args, device))
        del model
        gc.collect()  # the model of one size is gone before the next is built
        if task == "nlvr":
            rows.append(bench_ta_step(size, args, device))
            gc.collect()
    return rows


VE_SECTION = Section(run=lambda args: bench_task("ve", args))
NLVR_SECTION = Section(run=lambda args: bench_task("nlvr", args))
