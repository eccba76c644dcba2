"""Section ``gradcam``: Grad-CAM maps per second (``models.gradcam.gradcam``), per size and mode.

Each row times the call ``Grounding.py`` makes for one evaluation batch: ``gradcam(model, image, ids, mask,
mode, block_num)`` (``itm``: ViT without a graph, then text and fusion with the gradient of the ITM logit on a
fusion layer's cross-attention; ``itc``: ViT with a graph, the gradient of the ITC similarity flowing back from
the image feature to block ``block_num``'s attention, and the text [CLS] without fusion), in fp32 as the
evaluation runs, on random images and random expressions. The architectures, image sizes
and blocks are those of the grounding configs (:data:`GROUNDING_CONFIGS`: full = ViT-B/16 at 384 px, a 24 x 24
grid, + BERT-base; tiny = the toy grounding model, 64 px, an 8 x 8 grid); the batch is ``--batch-full`` /
``--batch-tiny`` (``Grounding.py`` evaluates with its ``batch_size``, 32 in the official config).

On CPU the rows add the process CPU seconds per batch (``cpu_s_per_batch``, all threads) and
``cpu_maps_per_s``. ``rank_ms`` (CPU milliseconds) is the proposal ranking that follows each map on the CPU
(``dataset.grounding_eval``: bicubic upsampling to a 640 x 480 image, :data:`RANK_BOXES` boxes scored):
evaluation time per expression is about ``1 / maps_per_s + rank_ms / 1000``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable

import torch

import Grounding
from dataset.grounding_eval import pick_box, upsample_map
from engine.config import load_config
from models.albef import ALBEFConfig
from models.gradcam import MODES, default_block, gradcam, patch_grid
from models.model_retrieval import ALBEFRetrieval
from scripts.bench.common import REPO_ROOT, Row, Section, logger, peak_memory_mb, reset_peak_memory, seed_everything
from scripts.bench.inputs import SIZES, make_captions

# size -> the config whose architecture, image size and block_num the section uses
GROUNDING_CONFIGS = {"tiny": "configs/toy/Grounding.yaml", "full": "configs/Grounding.yaml"}
EXPRESSION_TOKENS = (4, 12)  # token counts of the random expressions, [CLS] included (RefCOCO+-like)
RANK_BOXES = 10  # proposals per image in the ranking timing (MAttNet dets.json: about 10 per COCO image)


def grounding_setup(size: str) -> tuple[dict, ALBEFConfig]:
    """The resolved grounding config of ``size`` and its model config (queue shrunk: Grad-CAM never reads it)."""
    config = load_config(str(REPO_ROOT / GROUNDING_CONFIGS[size]), Grounding.DEFAULTS)
    model_config = ALBEFConfig.from_config(config, str(REPO_ROOT / config["bert_config"]))
    return config, dataclasses.replace(model_config, queue_size=16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], steps: int, warmup: int,
               device: torch.device) -> tuple[list[float], list[float]]:
    """Wall and process CPU seconds (all threads) of ``steps`` calls of ``fn()`` after ``warmup`` untimed ones.

    On a machine shared with other jobs the wall time swings with the load, the CPU time much less.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(steps):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def rank_ms(grid: int, repeats: int = 5) -> float:
    """Median CPU milliseconds to upsample one (G, G) map to 480 x 640 and pick the best of :data:`RANK_BOXES`."""
    gen = torch.Generator().manual_seed(0)
    heat = torch.rand(grid, grid, generator=gen)
    xy = torch.rand(RANK_BOXES, 2, generator=gen) * torch.tensor([440.0, 280.0])
    wh = 20 + torch.rand(RANK_BOXES, 2, generator=gen) * 180
    boxes = torch.cat([xy, wh], 1).tolist()
    _, cpu = time_calls(lambda: pick_box(upsample_map(heat, 480, 640), boxes), repeats, 1, torch.device("cpu"))
    return 1000 * statistics.median(cpu)


def bench_gradcam_size(size: str, mode: str, args: argparse.Namespace, device: torch.device) -> Row:
    """Maps per second of one size and mode, median over ``--steps`` batches after ``--warmup``."""
    config, model_config = grounding_setup(size)
    batch = getattr(args, SIZES[size][2])
    seed_everything(args.seed)
    model = ALBEFRetrieval(model_config).to(device).eval()
    # the config's block_num belongs to its gradcam_mode (a BERT layer for itm, a ViT block for itc)
    block = config["block_num"] if config["gradcam_mode"] == mode else None
    block = default_block(model, mode) if block is None else block
    gen = torch.Generator().manual_seed(args.seed)
    res = model_config.image_res
    image = torch.randn(batch, 3, res, res, generator=gen).to(device)
    ids, mask = (t.to(device) for t in make_captions(batch, EXPRESSION_TOKENS[1], args.seed, EXPRESSION_TOKENS))
    logger.info("gradcam %s %s: batch %d, %d px, block %d, %s", size, mode, batch, res, block, device)
    base_mb = reset_peak_memory(device)
    wall, cpu = time_calls(lambda: gradcam(model, image, ids, mask, mode=mode, block_num=block), args.steps,
                           args.warmup, device)
    median = statistics.median(wall)
    grid = patch_grid(model)
    row: Row = {"size": size, "mode": mode, "input": f"{res}px T{EXPRESSION_TOKENS[1]}", "grid": f"{grid}x{grid}",
                "block": block, "batch": batch, "s_per_batch": median, "maps_per_s": batch / median,
                "peak_mb": peak_memory_mb(device), "base_mb": base_mb, "rank_ms": rank_ms(grid),
                "steps_s": wall}
    if device.type == "cpu":  # process CPU seconds: steadier than the wall time on a shared machine
        row["cpu_s_per_batch"] = statistics.median(cpu)
        row["cpu_maps_per_s"] = batch / row["cpu_s_per_batch"]
    return row


def bench_gradcam(args: argparse.Namespace) -> list[Row]:
    """One row per size and ``--gradcam-modes`` entry."""
    device = torch.device(args.device)
    rows = []
    for size in args.sizes:
        for mode in args.gradcam_modes:
            rows.append(bench_gradcam_size(size, mode, args, device))
            gc.collect()  # one model is gone before the next is built
    return rows


def add_args(parser: argparse.ArgumentParser) -> None:
    """``--gradcam-modes``."""
    parser.add_argument("--gradcam-modes", default=",".join(MODES), help=f"gradcam: subset of {','.join(MODES)}")


def check(args: argparse.Namespace) -> str | None:
    """Turn ``--gradcam-modes`` into a list; the error message for an unknown mode, or None."""
    if isinstance(args.gradcam_modes, str):
        args.gradcam_modes = [m.strip() for m in args.gradcam_modes.split(",") if m.strip()]
    unknown = [m for m in args.gradcam_modes if m not in MODES]
    if unknown or not args.gradcam_modes:
        return f"--gradcam-modes: unknown or empty {unknown}; known: {list(MODES)}"
    return None


SECTION = Section(run=bench_gradcam, add_args=add_args, check=check)
