"""Section ``pretrain_step``: a full pre-training step, ours against the official algorithm.

It times a full pre-training step (forward + backward + AdamW step, momentum update included) of OUR fast
``ALBEFPretrain`` and, on the same model object, of a straightforward re-implementation of the official
algorithm (``scripts/reference_step.py``), interleaved step by step so both see the same machine load. It
reports the medians, their ratio, peak memory and, for ours, a forward / backward / optimizer breakdown; and
the image-encoder work both algorithms share (``vit_floor_s``, ``floor_ratio``).

On CUDA ours runs under bf16 autocast with fused AdamW; the reference runs in fp32 with a plain AdamW
(as the official code); step times come from CUDA events.
"""

from __future__ import annotations

import argparse
import gc

import torch
from torch import Tensor

from models.model_pretrain import ALBEFPretrain
from optim import create_optimizer, param_groups_weight_decay
from scripts.bench.common import Row, Section, logger, seed_everything
from scripts.bench.inputs import SIZES, Inputs, make_inputs
from scripts.bench.step_timing import PhaseTimer, StepFn, run_interleaved, step_row, train_step_fn
from scripts.reference_step import reference_forward

OPTIMIZER_CFG = {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}  # configs/Pretrain.yaml


def fast_step_fn(model: ALBEFPretrain, optimizer: torch.optim.Optimizer, inputs: Inputs, alpha: float,
                 amp_dtype: torch.dtype | None) -> StepFn:
    """OUR pre-training step: loss_mlm + loss_ita + loss_itm, phases as :func:`train_step_fn`."""
    return train_step_fn(lambda: model(*inputs, alpha=alpha), optimizer, inputs[0].device.type, amp_dtype)


def reference_step_fn(model: ALBEFPretrain, optimizer: torch.optim.Optimizer, inputs: Inputs,
                      alpha: float) -> StepFn:
    """The official algorithm (scripts/reference_step.py), fp32, same phases as :func:`fast_step_fn`."""

    def step(timer: PhaseTimer) -> None:
        timer.mark()
        optimizer.zero_grad(set_to_none=True)
        losses = reference_forward(model, *inputs, alpha)
        loss = losses["loss_mlm"] + losses["loss_ita"] + losses["loss_itm"]
        timer.mark()
        loss.backward()
        timer.mark()
        optimizer.step()
        timer.mark()

    return step


def image_encoder_floor_fn(model: ALBEFPretrain, inputs: Inputs) -> StepFn:
    """The image-encoder work that both algorithms do alike: online ViT forward and backward (a fixed linear
    read-out of every token stands in for the losses), momentum ViT forward. A step with the same math
    cannot take less than this plus its text and fusion work, so ``vit_floor_s / ref_s`` (``floor_ratio``) bounds
    the ratio from below."""
    image = inputs[0]
    vit = model.visual_encoder
    read_out = torch.randn(vit.patch_embed.num_patches + 1, model.config.vision_width, device=image.device)

    def step(timer: PhaseTimer) -> None:
        timer.mark()
        vit.zero_grad(set_to_none=True)
        embeds = vit(image)  # (B, 1 + N, D)
        with torch.no_grad():
            model.visual_encoder_m(image)
        timer.mark()
        (embeds * read_out).sum().backward()
        timer.mark()
        timer.mark()  # no optimizer

    return step


def optimizer_state_mb(optimizer: torch.optim.Optimizer) -> float:
    """Memory held by the optimizer's state tensors (AdamW: two moments per parameter)."""
    nbytes = sum(v.numel() * v.element_size() for state in optimizer.state.values()
                 for v in state.values() if isinstance(v, Tensor))
    return nbytes / 2**20


def bench_pretrain_size(size: str, args: argparse.Namespace, device: torch.device) -> Row:
    """One size of the pre-training step, ours and (unless --no-reference) the reference.

    Both steps live in one process on one model, so each peak is reported less the other step's
    AdamW state (``peak_mb``: as if run alone); the raw process peaks are in the JSON.
    """
    build, text_len, batch_arg = SIZES[size]
    batch = getattr(args, batch_arg)
    seed_everything(args.seed)
    config = build(args.queue)
    model = ALBEFPretrain(config).to(device).train()
    inputs = make_inputs(batch, config.image_res, text_len, device, args.seed)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    optimizers = {"ours": create_optimizer(OPTIMIZER_CFG, model)}
    fns = {"ours": fast_step_fn(model, optimizers["ours"], inputs, args.alpha, amp_dtype)}
    if args.reference:
        groups = param_groups_weight_decay(model, OPTIMIZER_CFG["weight_decay"])
        optimizers["reference"] = torch.optim.AdamW(groups, lr=OPTIMIZER_CFG["lr"], foreach=False, fused=False)
        fns["reference"] = reference_step_fn(model, optimizers["reference"], inputs, args.alpha)
        fns["floor"] = image_encoder_floor_fn(model, inputs)
    logger.info("pretrain_step %s: batch %d, %s, %.1fM parameters", size, batch, device,
                sum(p.numel() for p in model.parameters()) / 1e6)
    results = run_interleaved(fns, args.steps, args.warmup, device)
    states = {name: optimizer_state_mb(opt) for name, opt in optimizers.items()}
    floor = results.pop("floor", None)
    for name, result in results.items():
        result["peak_mb"] = result["process_peak_mb"] - sum(v for k, v in states.items() if k != name)
    row = step_row(size, batch, config, text_len, results)
    if floor is not None:
        row.update(vit_floor_s=floor["step_s"], floor_ratio=floor["step_s"] / row["ref_s"])
    row["precision"] = "ours bf16-autocast, ref fp32" if amp_dtype else "fp32"
    del model, fns, optimizers, results
    gc.collect()
    return row


def bench_pretrain_step(args: argparse.Namespace) -> list[Row]:
    """Pre-training step (forward + backward + AdamW, momentum update included) for each size."""
    device = torch.device(args.device)
    return [bench_pretrain_size(size, args, device) for size in args.sizes]


def add_args(parser: argparse.ArgumentParser) -> None:
    """``--queue``, ``--reference``."""
    parser.add_argument("--queue", type=int, default=65536, help="ITC queue size")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the official algorithm on the same model (the ratio)")


SECTION = Section(run=bench_pretrain_step, add_args=add_args)
