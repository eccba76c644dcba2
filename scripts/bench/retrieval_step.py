"""Section ``retrieval_step``: a retrieval fine-tuning step (``ALBEFRetrieval``) of each size.

Forward (ITC with the id-aware queue + ITM, momentum update inside) + backward + AdamW, timed as the
pre-training step (:mod:`scripts.bench.step_timing`); the optimizer is the retrieval config's.
"""

from __future__ import annotations

import argparse
import gc

import torch

from models.model_retrieval import ALBEFRetrieval
from optim import create_optimizer
from scripts.bench.common import Row, Section, logger, seed_everything
from scripts.bench.inputs import SIZES, make_captions, make_inputs, retrieval_setup
from scripts.bench.step_timing import run_interleaved, step_row, train_step_fn


def bench_retrieval_step_size(size: str, args: argparse.Namespace, device: torch.device) -> Row:
    """Retrieval fine-tuning step of one size: forward (momentum update inside) + backward + AdamW."""
    config, model_config = retrieval_setup(size)
    batch = getattr(args, SIZES[size][2])
    seed_everything(args.seed)
    model = ALBEFRetrieval(model_config).to(device).train()
    image, _, _ = make_inputs(batch, model_config.image_res, 1, device, args.seed)
    ids, mask = (t.to(device) for t in make_captions(batch, config["max_tokens"], args.seed))
    idx = torch.arange(batch, device=device)
    optimizer = create_optimizer(config["optimizer"], model)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    step = train_step_fn(lambda: model(image, ids, mask, idx, alpha=args.alpha), optimizer, device.type, amp_dtype)
    logger.info("retrieval_step %s: batch %d, %s, %.1fM parameters", size, batch, device,
                sum(p.numel() for p in model.parameters()) / 1e6)
    results = run_interleaved({"ours": step}, args.steps, args.warmup, device)
    results["ours"]["peak_mb"] = results["ours"]["process_peak_mb"]
    row = step_row(size, batch, model_config, config["max_tokens"], results)
    row["precision"] = "bf16-autocast" if amp_dtype else "fp32"
    return row


def bench_retrieval_step(args: argparse.Namespace) -> list[Row]:
    """Retrieval fine-tuning step (ITC with id-aware queue + ITM, AdamW, momentum update) for each size."""
    device = torch.device(args.device)
    rows = []
    for size in args.sizes:
        rows.append(bench_retrieval_step_size(size, args, device))
        gc.collect()  # the model of one size is gone before the next is built
    return rows


SECTION = Section(run=bench_retrieval_step)
