"""Benchmarks of the ALBEF reimplementation: training-step time and memory, data-pipeline throughput.

Usage (from the repository root)::

    python scripts/benchmark.py --device cpu --threads 2 --sizes tiny,full --json bench.json
    python scripts/benchmark.py --device cuda --batch-full 64 --batch-tiny 256
    python scripts/benchmark.py --only data_pipeline
    python scripts/benchmark.py --only retrieval_eval,retrieval_step --sizes tiny

``pretrain_step`` times a full pre-training step (forward + backward + AdamW step, momentum update
included) of OUR fast ``ALBEFPretrain`` and, on the same model object, of a straightforward
re-implementation of the official algorithm (``scripts/reference_step.py``), interleaved step by step
so both see the same machine load. It reports the medians, their ratio, peak memory and, for ours, a
forward / backward / optimizer breakdown. ``data_pipeline`` measures decode + augmentation in one
process. ``retrieval_eval`` measures ITM pairs reranked per second by the batched evaluator
(``models.retrieval_eval.rerank_batched``) against the official one-query-at-a-time loop
(``rerank_per_query``) on the same model and features, and whether their rankings are identical;
``retrieval_step`` times a retrieval fine-tuning step (``ALBEFRetrieval``). The retrieval sections build
their sizes from :data:`RETRIEVAL_CONFIGS` (tiny: the toy config; full: ViT-B/16 + BERT-base at 384 px).
Sections live in :data:`BENCHMARKS` (name -> function(args) -> rows); add new ones there.

On CUDA ours runs under bf16 autocast with fused AdamW; the reference runs in fp32 with a plain AdamW
(as the official code); step times come from CUDA events.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import Retrieval  # noqa: E402
import utils  # noqa: E402
from dataset import build_transform, load_image  # noqa: E402
from models import retrieval_eval  # noqa: E402
from models.albef import ALBEFConfig  # noqa: E402
from models.bert import BertConfig  # noqa: E402
from models.model_pretrain import ALBEFPretrain  # noqa: E402
from models.model_retrieval import ALBEFRetrieval  # noqa: E402
from optim import create_optimizer, param_groups_weight_decay  # noqa: E402
from scripts import resize_images  # noqa: E402
from scripts.reference_step import reference_forward  # noqa: E402

logger = logging.getLogger("benchmark")

Row = dict[str, Any]
Inputs = tuple[Tensor, Tensor, Tensor]
OPTIMIZER_CFG = {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}  # configs/Pretrain.yaml


# --------------------------------------------------------------- measuring
class PhaseTimer:
    """Marks between the phases of one step: ``perf_counter`` on CPU, CUDA events on GPU.

    On CPU it also records the process CPU time (``process_time``, all threads): on a machine shared
    with other jobs the wall time of a multi-threaded step swings widely, its CPU time much less.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.cpu_marks: list[float] = []

    def mark(self) -> None:
        """Record the end of one phase and the start of the next."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

    def intervals(self) -> list[float]:
        """Wall seconds between consecutive marks (waits for the GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]

    def cpu_seconds(self) -> float | None:
        """Process CPU seconds from the first to the last mark; None on CUDA."""
        return self.cpu_marks[-1] - self.cpu_marks[0] if self.cpu_marks else None


def _read_rss_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB, or None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> float:
    """Start a new peak-memory window; returns the memory in use now (MiB).

    CPU: resets the process's RSS high-water mark (``/proc/self/clear_refs``, Linux); where that is not
    possible the peak is the process-lifetime maximum (``getrusage``). CUDA: allocator statistics.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    return _read_rss_mb("VmRSS") or 0.0


def peak_memory_mb(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`: RSS high-water mark on CPU, max allocated on CUDA (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _read_rss_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -------------------------------------------------------------- models
def tiny_config(queue: int) -> ALBEFConfig:
    """ViT 32 px / patch 8 / depth 2 / width 64; BERT 4 layers (2 text + 2 fusion), hidden 64, full vocab."""
    bert = BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256,
                      fusion_layer=2, encoder_width=64)
    return ALBEFConfig(bert=bert, image_res=32, patch_size=8, vision_width=64, vision_depth=2, vision_heads=2,
                       queue_size=queue)


def full_config(queue: int) -> ALBEFConfig:
    """ViT-B/16 at 256 px + BERT-base (configs/config_bert.json), as the official pre-training."""
    bert = BertConfig.from_json(str(REPO_ROOT / "configs" / "config_bert.json"))
    return ALBEFConfig(bert=bert, image_res=256, queue_size=queue)


# size -> (config builder, text length, name of the batch-size argument)
SIZES: dict[str, tuple[Callable[[int], ALBEFConfig], int, str]] = {
    "tiny": (tiny_config, 12, "batch_tiny"),
    "full": (full_config, 30, "batch_full"),
}


def make_inputs(batch: int, res: int, text_len: int, device: torch.device, seed: int) -> Inputs:
    """Random images and ``[CLS] w1 .. wn [PAD]..`` texts of lengths in [text_len/2, text_len]."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, res, res, generator=gen)
    ids = torch.randint(1000, 30000, (batch, text_len), generator=gen)
    ids[:, 0] = 101
    lengths = torch.randint(text_len // 2, text_len + 1, (batch,), generator=gen)
    mask = (torch.arange(text_len)[None] < lengths[:, None]).long()
    ids = ids * mask
    return image.to(device), ids.to(device), mask.to(device)


# --------------------------------------------------------- pre-training step
StepFn = Callable[[PhaseTimer], None]


def train_step_fn(forward: Callable[[], dict[str, Tensor]], optimizer: torch.optim.Optimizer,
                  device_type: str, amp_dtype: torch.dtype | None) -> StepFn:
    """zero_grad + ``forward()`` (momentum update inside), loss = sum of its losses | backward | AdamW step."""

    def step(timer: PhaseTimer) -> None:
        timer.mark()
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with autocast:
            loss = sum(forward().values())
        timer.mark()
        loss.backward()
        timer.mark()
        optimizer.step()
        timer.mark()

    return step


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


def run_interleaved(fns: dict[str, StepFn], steps: int, warmup: int, device: torch.device) -> dict[str, Row]:
    """Warm up, then alternate the step functions step by step; per function the median phases and peak."""
    for _ in range(warmup):
        for fn in fns.values():
            timer = PhaseTimer(device)
            fn(timer)
            timer.intervals()
    phases: dict[str, list[list[float]]] = {name: [] for name in fns}
    peaks: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float | None]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:  # alternate the order: no systematic bias
            gc.collect()
            reset_peak_memory(device)
            timer = PhaseTimer(device)
            fns[name](timer)
            phases[name].append(timer.intervals())
            peaks[name].append(peak_memory_mb(device))
            cpu[name].append(timer.cpu_seconds())
            logger.info("  %-9s step %d: %.3f s wall, %s s CPU", name, i, sum(phases[name][-1]), cpu[name][-1])
    return {name: _summarise(phases[name], peaks[name], cpu[name]) for name in fns}


def _summarise(phases: list[list[float]], peaks: list[float], cpu: list[float | None]) -> Row:
    totals = [sum(p) for p in phases]
    forward, backward, opt = (statistics.median(p[i] for p in phases) for i in range(3))
    cpu_s = statistics.median(cpu) if None not in cpu else None
    return {"step_s": statistics.median(totals), "min_s": min(totals), "forward_s": forward,
            "backward_s": backward, "optimizer_s": opt, "cpu_s": cpu_s, "process_peak_mb": max(peaks),
            "steps_s": totals, "cpu_steps_s": cpu}


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
    row = _step_row(size, batch, config, text_len, results)
    if floor is not None:
        row.update(vit_floor_s=floor["step_s"], floor_ratio=floor["step_s"] / row["ref_s"])
    row["precision"] = "ours bf16-autocast, ref fp32" if amp_dtype else "fp32"
    del model, fns, optimizers, results
    gc.collect()
    return row


def _step_row(size: str, batch: int, config: ALBEFConfig, text_len: int, results: dict[str, Row]) -> Row:
    """Flat result row: medians side by side, the ratio, phases, memory; per-step lists for the JSON."""
    ours, ref = results["ours"], results.get("reference")
    row: Row = {"size": size, "batch": batch, "input": f"{config.image_res}px T{text_len} Q{config.queue_size}",
                "ours_s": ours["step_s"]}
    if ref:
        row.update(ref_s=ref["step_s"], ratio=ours["step_s"] / ref["step_s"])
        if ours["cpu_s"] is not None:
            row["cpu_ratio"] = ours["cpu_s"] / ref["cpu_s"]
    prefixed = [("ours", ours), ("ref", ref)] if ref else [("ours", ours)]
    for prefix, result in prefixed:
        row.update({f"{prefix}_fwd_s": result["forward_s"], f"{prefix}_bwd_s": result["backward_s"],
                    f"{prefix}_opt_s": result["optimizer_s"]})
    for prefix, result in prefixed:
        row[f"{prefix}_peak_mb"] = result["peak_mb"]
    for prefix, result in prefixed:
        row.update({f"{prefix}_min_s": result["min_s"], f"{prefix}_cpu_s": result["cpu_s"],
                    f"{prefix}_process_peak_mb": result["process_peak_mb"], f"{prefix}_steps_s": result["steps_s"],
                    f"{prefix}_cpu_steps_s": result["cpu_steps_s"]})
    return row


def bench_pretrain_step(args: argparse.Namespace) -> list[Row]:
    """Pre-training step (forward + backward + AdamW, momentum update included) for each size."""
    device = torch.device(args.device)
    return [bench_pretrain_size(size, args, device) for size in args.sizes]


# ------------------------------------------------------------ data pipeline
def make_jpeg(path: str, width: int = 640, height: int = 480, seed: int = 0) -> None:
    """A photo-like (smooth + noise) RGB JPEG, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)


def _time_pipeline(path: str, transform: Callable, images: int) -> Row:
    """Decode (``load_image``) + ``transform`` of one file ``images`` times: images/s and median phases."""
    for _ in range(3):
        transform(load_image(path))
    decode, augment = [], []
    for _ in range(images):
        t0 = time.perf_counter()
        img = load_image(path)
        t1 = time.perf_counter()
        transform(img)
        decode.append(t1 - t0)
        augment.append(time.perf_counter() - t1)
    return {"images_per_s": images / (sum(decode) + sum(augment)),
            "decode_ms": 1000 * statistics.median(decode), "augment_ms": 1000 * statistics.median(augment)}


def bench_data_pipeline(args: argparse.Namespace) -> list[Row]:
    """Images/s of decode (``load_image``) + pre-training augmentation in one process, 1 torch thread.

    One thread, as in a DataLoader worker; multiply by the workers per GPU for a loader's rate. One row per
    ``--source-sizes`` JPEG and, for those whose shorter side exceeds ``--short-side``, one for the copy
    that ``scripts/resize_images.py`` makes of it.
    """
    seed_everything(args.seed)
    transform = build_transform("pretrain", args.data_res)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for width, height in args.source_sizes:
                path = os.path.join(tmp, f"{width}x{height}.jpg")
                make_jpeg(path, width, height, seed=args.seed)
                sources = [(f"{width}x{height} JPEG", path)]
                if min(width, height) > args.short_side:
                    shrunk = os.path.join(tmp, f"{width}x{height}_shrunk.jpg")
                    resize_images.process(resize_images.Job(path, shrunk), args.short_side, quality=95)
                    w, h = resize_images.shrunk_size(width, height, args.short_side)
                    sources.append((f"{width}x{height} JPEG shrunk to {w}x{h}", shrunk))
                for name, source in sources:
                    row: Row = {"source": name, "transform": f"pretrain {args.data_res}px", "images": args.images,
                                "torch_threads": 1}
                    rows.append({**row, **_time_pipeline(source, transform, args.images)})
    finally:
        torch.set_num_threads(threads)
    return rows


# ---------------------------------------------------------------- retrieval
# size -> the config whose architecture (and optimizer, queue, text length) the retrieval sections use
RETRIEVAL_CONFIGS = {"tiny": "configs/toy/Retrieval.yaml", "full": "configs/Retrieval_coco.yaml"}
CAPTION_TOKENS = (8, 20)  # caption lengths of the retrieval benchmarks, [CLS] included (COCO-like)


def retrieval_setup(size: str) -> tuple[dict, ALBEFConfig]:
    """The resolved YAML config of ``size`` (:data:`RETRIEVAL_CONFIGS`) and its model config."""
    config = utils.load_config(str(REPO_ROOT / RETRIEVAL_CONFIGS[size]), Retrieval.DEFAULTS)
    return config, ALBEFConfig.from_config(config, str(REPO_ROOT / config["bert_config"]))


def make_captions(n: int, max_tokens: int, seed: int,
                  tokens: tuple[int, int] = CAPTION_TOKENS) -> tuple[Tensor, Tensor]:
    """``n`` random ``[CLS] w1 .. [PAD]`` captions of ``tokens`` (min, max) tokens padded to ``max_tokens``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (n, max_tokens), generator=gen)
    ids[:, 0] = 101
    lengths = torch.randint(tokens[0], min(tokens[1], max_tokens) + 1, (n,), generator=gen)
    mask = (torch.arange(max_tokens)[None] < lengths[:, None]).long()
    return ids * mask, mask


@torch.no_grad()
def eval_features(model: ALBEFRetrieval, n_img: int, captions: int, max_tokens: int, device: torch.device,
                  seed: int, batch: int = 32) -> retrieval_eval.RetrievalFeatures:
    """Unimodal features of ``n_img`` random images and ``captions`` random captions per image."""
    gen = torch.Generator().manual_seed(seed)
    res = model.config.image_res
    ids, mask = make_captions(n_img * captions, max_tokens, seed)
    ids, mask = ids.to(device), mask.to(device)
    images = [model.encode_image(torch.randn(min(batch, n_img - a), 3, res, res, generator=gen).to(device))
              for a in range(0, n_img, batch)]
    texts = [model.encode_text(ids[a:a + 8 * batch], mask[a:a + 8 * batch]) for a in range(0, ids.size(0), 8 * batch)]
    return retrieval_eval.RetrievalFeatures(torch.cat([e for e, _ in images]), torch.cat([f for _, f in images]),
                                            torch.cat([e for e, _ in texts]), mask, torch.cat([f for _, f in texts]))


def _first_images(feats: retrieval_eval.RetrievalFeatures, n_img: int,
                  captions: int) -> retrieval_eval.RetrievalFeatures:
    """The features of the first ``n_img`` images and their captions (a warm-up problem)."""
    n_txt = n_img * captions
    return retrieval_eval.RetrievalFeatures(feats.image_embeds[:n_img], feats.image_feat[:n_img],
                                            feats.text_embeds[:n_txt], feats.text_atts[:n_txt],
                                            feats.text_feat[:n_txt])


@torch.no_grad()
def spread_weights(model: torch.nn.Module, std: float) -> None:
    """Redraw every weight matrix at ``std`` (0: no change), then re-copy the momentum twins.

    A freshly initialised small model scores all candidates of a query within about 0.01 of each other, so two
    evaluators that sum in different orders can swap candidates whose fp32 scores tie to 1e-8; spread weights
    give distinct scores (as a trained model does), so "identical rankings" tests the evaluator, not the ties.
    """
    if std <= 0:
        return
    for name, p in model.named_parameters():
        if p.dim() > 1 and "_m." not in name:
            p.normal_(0.0, std)
    model.copy_to_momentum()


def bench_retrieval_eval_size(size: str, args: argparse.Namespace, device: torch.device) -> Row:
    """Batched against per-query ITM rerank of one size on the same random features (after a warm-up)."""
    config, model_config = retrieval_setup(size)
    n_img = getattr(args, f"eval_images_{size}")
    k_test = getattr(args, f"eval_k_{size}")
    k_test = config["k_test"] if k_test is None else k_test
    seed_everything(args.seed)
    model = ALBEFRetrieval(model_config).to(device).eval()
    spread_weights(model, getattr(args, f"eval_spread_{size}", 0.0))
    feats = eval_features(model, n_img, args.captions, config["max_tokens"], device, args.seed)
    warm = _first_images(feats, min(2, n_img), args.captions)
    retrieval_eval.benchmark_rerank(model, warm, k_test, args.rerank_batch)
    logger.info("retrieval_eval %s: %d images x %d captions, k_test %d", size, n_img, args.captions, k_test)
    stats = retrieval_eval.benchmark_rerank(model, feats, k_test, args.rerank_batch, repeats=args.eval_repeats)
    row: Row = {"size": size, "input": f"{model_config.image_res}px T{config['max_tokens']}", "images": n_img,
                "texts": n_img * args.captions, "k_test": k_test, "rerank_batch": args.rerank_batch}
    row.update(stats)
    del model, feats
    gc.collect()
    return row


def bench_retrieval_eval(args: argparse.Namespace) -> list[Row]:
    """ITM pairs reranked per second: batched evaluator against the official per-query loop, per size."""
    device = torch.device(args.device)
    return [bench_retrieval_eval_size(size, args, device) for size in args.sizes]


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
    row = _step_row(size, batch, model_config, config["max_tokens"], results)
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


# name -> function(args) -> rows; other modules may register more sections here.
BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "pretrain_step": bench_pretrain_step,
    "data_pipeline": bench_data_pipeline,
    "retrieval_eval": bench_retrieval_eval,
    "retrieval_step": bench_retrieval_step,
}


# ---------------------------------------------------------------- driver
def environment(args: argparse.Namespace) -> Row:
    """Versions, threads and hardware of this run."""
    import timm
    import transformers

    env: Row = {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "platform": platform.platform(),
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": args.device,
                "seed": args.seed, "steps": args.steps, "warmup": args.warmup, "alpha": args.alpha,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


# fields left to the JSON (besides lists)
JSON_ONLY = ("_min_s", "_cpu_s", "_process_peak_mb")


def format_table(name: str, rows: list[Row]) -> str:
    """A plain-text table of the scalar fields of ``rows`` (lists and :data:`JSON_ONLY` go to the JSON)."""
    columns = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict)) and not k.endswith(JSON_ONLY)]
    cells = [columns] + [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    rule = "-" * len(lines[0])
    return "\n".join([f"== {name}", lines[0], rule, *lines[1:]]) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {list(BENCHMARKS)}")
    parser.add_argument("--sizes", default="tiny,full", help="comma-separated subset of " + ",".join(SIZES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-full", type=int, default=4)
    parser.add_argument("--batch-tiny", type=int, default=32)
    parser.add_argument("--queue", type=int, default=65536, help="ITC queue size")
    parser.add_argument("--alpha", type=float, default=0.4, help="momentum-distillation weight")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--images", type=int, default=50, help="images timed by data_pipeline")
    parser.add_argument("--data-res", type=int, default=256, help="output size of the data_pipeline transform")
    parser.add_argument("--source-sizes", default="640x480,1600x1200",
                        help="data_pipeline: comma-separated WxH of the source JPEGs")
    parser.add_argument("--short-side", type=int, default=576,
                        help="data_pipeline: also time copies shrunk to this shorter side (scripts/resize_images.py)")
    parser.add_argument("--eval-images-tiny", type=int, default=300, help="images of retrieval_eval, tiny")
    parser.add_argument("--eval-images-full", type=int, default=8, help="images of retrieval_eval, full")
    parser.add_argument("--captions", type=int, default=5, help="captions per image in retrieval_eval")
    parser.add_argument("--eval-k-tiny", type=int, default=None, help="k_test of retrieval_eval, tiny (config's)")
    parser.add_argument("--eval-k-full", type=int, default=8, help="k_test of retrieval_eval, full")
    parser.add_argument("--eval-spread-tiny", type=float, default=0.3,
                        help="retrieval_eval, tiny: redraw weight matrices at this std (0: keep the init)")
    parser.add_argument("--eval-spread-full", type=float, default=0.0, help="the same for full")
    parser.add_argument("--rerank-batch", type=int, default=256, help="pairs per fusion batch of rerank_batched")
    parser.add_argument("--eval-repeats", type=int, default=3,
                        help="retrieval_eval: timed runs of each evaluator, alternating (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the official algorithm on the same model (the ratio)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    args.sizes = [n.strip() for n in args.sizes.split(",") if n.strip()]
    try:
        args.source_sizes = [tuple(int(v) for v in n.lower().split("x")) for n in args.source_sizes.split(",")]
    except ValueError:
        parser.error(f"--source-sizes: expected WxH[,WxH...], got {args.source_sizes!r}")
    if any(len(wh) != 2 or min(wh) < 16 for wh in args.source_sizes):
        parser.error(f"--source-sizes: each size is WxH with both at least 16, got {args.source_sizes}")
    for value, known, flag in ((args.only, BENCHMARKS, "--only"), (args.sizes, SIZES, "--sizes")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; known: {list(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    counts = (args.steps, args.images, args.eval_images_tiny, args.eval_images_full, args.captions, args.eval_k_full,
              1 if args.eval_k_tiny is None else args.eval_k_tiny, args.rerank_batch)
    if min(counts) < 1 or args.warmup < 0:
        parser.error("--steps, --images, --eval-*, --captions and --rerank-batch must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks, print their tables, write the JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args)
    logger.info("environment: %s", json.dumps(env))
    results = {name: BENCHMARKS[name](args) for name in args.only}
    header = ", ".join(f"{k} {env[k]}" for k in ("torch", "timm", "transformers", "torch_threads", "device"))
    sys.stdout.write(f"# {header}\n")
    for name, rows in results.items():
        if rows:
            sys.stdout.write(format_table(name, rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
