"""``train_one_epoch``: the one training loop every task runs (AMP, clipping, non-finite losses, skipped
samples, alpha ramp, per-iteration learning rate)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from engine.distributed import all_gather_cat, collective_device, get_rank, get_world_size, is_main_process
from engine.logs import MetricAccumulator

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_warned_cpu_amp = False


class SkippedImagesError(RuntimeError):
    """More unreadable images were skipped than ``max_skipped_images`` allows."""


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or inf."""

    def __init__(self, epoch: int, step: int, terms: list[str]) -> None:
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}: {', '.join(terms)}")
        self.epoch, self.step, self.terms = epoch, step, terms


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, None for fp32 (AMP is ignored off CUDA, with one warning)."""
    global _warned_cpu_amp
    if amp not in ("off", *_AMP_DTYPES):
        raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {amp!r}")
    if amp == "off":
        return None
    if device.type != "cuda":
        if not _warned_cpu_amp:
            logger.warning("amp=%s ignored on device %s: training in fp32", amp, device)
            _warned_cpu_amp = True
        return None
    return _AMP_DTYPES[amp]


def _check_step_options(amp: str, device: torch.device, scaler: Any,
                        nonfinite: str) -> tuple[torch.dtype | None, Any]:
    """(autocast dtype or None, the scaler when fp16 runs else None); ``ValueError`` for a bad option."""
    if nonfinite not in ("stop", "skip"):
        raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
    dtype = _autocast_dtype(amp, device)
    if dtype is torch.float16 and scaler is None:
        raise ValueError("amp='fp16' needs a torch.amp.GradScaler (scaler=...)")
    return dtype, scaler if dtype is torch.float16 else None


def _unpack_batch(batch: Any, counter: dict, max_skipped: int, epoch: int, step: int) -> tuple[Any, list[int]]:
    """Strip the trailing dropped-sample count; returns (the fields, None for an empty batch; every rank's rows).

    The samples every rank dropped are counted in ``counter['skipped']`` (one small all-gather of the row and drop
    counts when distributed): each rank holds the global count, and all stop at ``max_skipped`` together.
    """
    dropped = 0 if batch is None else int(batch[-1])
    fields = None if batch is None else (batch[:-1] or None)  # () when every sample of the batch was unreadable
    counts = [0 if fields is None else len(fields[0])]
    if get_world_size() > 1:
        table = all_gather_cat(torch.tensor([[counts[0], dropped]], device=collective_device())).tolist()
        counts, dropped = [rows for rows, _ in table], sum(lost for _, lost in table)  # (world,) rows, all lost
    if dropped:
        counter["skipped"] += dropped
        if 0 <= max_skipped < counter["skipped"]:
            raise SkippedImagesError(
                f"{counter['skipped']} unreadable samples dropped so far (epoch {epoch}, step {step}), "
                f"more than max_skipped={max_skipped}; check the image paths in the annotation files"
            )
    return fields, counts


def _total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    terms = [v for k, v in losses.items() if k.startswith("loss")]
    if not terms:
        raise ValueError(f"step_fn returned no 'loss*' entries: {sorted(losses)}")
    total = terms[0].float().sum()
    for term in terms[1:]:
        total = total + term.float().sum()
    return total


def _backward_step(total: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: Any, grad_clip: float) -> None:
    """backward, optional gradient clipping, optimizer step and zero_grad; ``scaler`` for fp16 or None."""
    if scaler is not None:
        scaler.scale(total).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(model: torch.nn.Module, loader: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    epoch: int, step_fn: Callable[[torch.nn.Module, Any, float, int], dict[str, torch.Tensor]], *,
                    device: torch.device, alpha: float, warm_up: bool, amp: str = "off", scaler: Any = None,
                    grad_clip: float = 0.0, start_step: int = 0,
                    on_step: Callable[[int, int], None] | None = None, nonfinite: str = "stop",
                    max_skipped: int = -1, skip_counter: dict | None = None,
                    log_every: int = 50, metrics: MetricAccumulator | None = None, step_offset: int | None = None,
                    epoch_fraction: Callable[[int], float] | None = None) -> dict[str, float]:
    """Train ``model`` for one epoch (from iteration ``start_step``) and return the mean losses and 'lr'.

    A resumed loader already skips the first ``start_step`` batches: the epoch has ``start_step + len(loader)``.
    Each batch is a tuple whose last element counts dropped samples, or None.
    ``step_fn(model, batch[:-1], alpha_i, global_step)`` (``global_step = epoch * steps_per_epoch + i``)
    returns named scalar tensors; those whose key starts with 'loss' are summed into the total, the rest
    are only averaged. alpha ramps as ``alpha * min(1, i / len(loader))`` in epoch 0 when ``warm_up``.
    A non-finite total raises ``NonFiniteLossError`` (``nonfinite='stop'``) or skips the update
    (``'skip'``, counted in ``skip_counter['nonfinite']``). ``on_step(epoch, i + 1)`` runs after every
    iteration. ``step_offset``: optimizer steps of the epochs before (default ``epoch * num_steps``), so that
    ``global_step = step_offset + i``; ``epoch_fraction(i)``: the share of the epoch's samples consumed before
    iteration ``i`` for the alpha ramp (default ``i / num_steps``; a resume under another batch size passes it).
    Ranks agree on every step (:func:`_agree_across_ranks`): a batch left empty on one rank skips the step on
    all, and a short batch weighs its rank's gradient by its share of the global batch.
    ``metrics``: the accumulator of the epoch's running means (a resumed epoch passes the one
    restored from its checkpoint, so that the returned means cover the whole epoch).
    """
    device = torch.device(device)
    dtype, scaler = _check_step_options(amp, device, scaler, nonfinite)
    counter = skip_counter if skip_counter is not None else {}
    counter.setdefault("skipped", 0)
    counter.setdefault("nonfinite", 0)
    num_steps = start_step + len(loader)  # a resumed loader yields only the remaining batches
    metrics = MetricAccumulator() if metrics is None else metrics
    model.train()
    # to a terminal: live; to a file (nohup, a cluster job's log): one line a minute, not ten a second
    interval = 0.1 if sys.stderr.isatty() else 60.0
    with tqdm(total=num_steps, initial=start_step, desc=f"epoch {epoch}", dynamic_ncols=True, mininterval=interval,
              disable=not is_main_process()) as bar:
        for i, batch in enumerate(loader, start=start_step):
            batch, share = _agree_across_ranks(*_unpack_batch(batch, counter, max_skipped, epoch, i), counter,
                                               epoch, i)
            if batch is not None:
                done = i / num_steps if epoch_fraction is None else epoch_fraction(i)
                alpha_i = alpha * min(1.0, done) if epoch == 0 and warm_up else alpha
                lr = scheduler.step(epoch, i)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    losses = step_fn(model, batch, alpha_i, (epoch * num_steps if step_offset is None
                                                             else step_offset) + i)
                total = _total_loss(losses)
                if _all_finite(total):
                    _backward_step(total if share == 1.0 else total * share, model, optimizer, scaler, grad_clip)
                    metrics.update(**losses, lr=lr)
                else:
                    _handle_nonfinite(losses, optimizer, nonfinite, counter, epoch, i)
            bar.update(1)
            if log_every > 0 and (i + 1) % log_every == 0 and not bar.disable:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.averages(all_ranks=False).items()})
            if on_step is not None:
                on_step(epoch, i + 1)
    return metrics.averages()


def _agree_across_ranks(batch: Any, counts: list[int], counter: dict, epoch: int,
                        step: int) -> tuple[Any, float]:
    """Make every rank take the same decision on this step; returns (batch or None, this rank's loss weight).

    Unreadable images leave ranks with different numbers of rows (``counts``, every rank's). A rank with none
    cannot run the step, and DDP needs every rank in the gradient all-reduce: when any rank's batch is empty,
    every rank skips the step (counted in ``counter['empty_steps']``; the other ranks' rows of that step are not
    trained on). Otherwise each rank's losses are means over its own rows and its gradient is weighted by
    ``rows_r * world / sum(rows)`` (exactly 1.0 for full batches): after DDP's averaging, every row of the global
    batch counts the same, as in one process with that batch.
    """
    world = len(counts)
    if world == 1:
        return batch, 1.0
    if min(counts) == 0:
        counter["empty_steps"] = counter.get("empty_steps", 0) + 1
        if is_main_process():
            logger.warning("epoch %d, iteration %d: no readable sample in the batch of process(es) %s: every "
                           "process skips this step (%d samples of the others unused)", epoch, step,
                           [r for r, c in enumerate(counts) if c == 0], sum(counts))
        return None, 1.0
    return batch, counts[get_rank()] * world / sum(counts)


def _all_finite(total: torch.Tensor) -> bool:
    """Whether ``total`` is finite on every rank (one host sync per step: correctness before speed). Ranks
    must agree, or a rank that skips backward would leave the others waiting in DDP's gradient all-reduce."""
    finite = torch.isfinite(total.detach()).float()
    if get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _handle_nonfinite(losses: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, mode: str,
                      counter: dict, epoch: int, step: int) -> None:
    """Raise ``NonFiniteLossError`` naming the bad terms ('stop'), or drop this step's gradients ('skip')."""
    terms = [k for k, v in losses.items() if k.startswith("loss") and not bool(torch.isfinite(v).all())]
    terms = terms or ["total"]  # e.g. the bad value was on another rank
    if mode == "stop":
        raise NonFiniteLossError(epoch, step, terms)
    counter["nonfinite"] += 1
    optimizer.zero_grad(set_to_none=True)
    logger.warning("skipping step %d of epoch %d: non-finite %s", step, epoch, ", ".join(terms))
