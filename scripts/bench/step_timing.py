"""Timing of training steps, shared by the step sections: phase marks, interleaved runs, the result row.

A step function takes a :class:`PhaseTimer` and marks four times: start | forward | backward | optimizer step.
:func:`run_interleaved` alternates several of them step by step, so all see the same machine load, and
:func:`step_row` lays their medians side by side (``ours_*``, ``ref_*``).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from models.albef import ALBEFConfig
from scripts.bench.common import Row, logger, peak_memory_mb, reset_peak_memory


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


def inference_step_fn(forward: Callable[[], object], device_type: str, amp_dtype: torch.dtype | None) -> StepFn:
    """``forward()`` under ``no_grad`` as a step whose backward and optimizer phases are empty (0 s), so that
    :func:`run_interleaved` times inference with the same marks, medians and peak memory as training."""

    def step(timer: PhaseTimer) -> None:
        timer.mark()
        autocast = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with torch.no_grad(), autocast:
            forward()
        timer.mark()
        timer.mark()  # no backward
        timer.mark()  # no optimizer step

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


def step_row(size: str, batch: int, config: ALBEFConfig, text_len: int, results: dict[str, Row]) -> Row:
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
