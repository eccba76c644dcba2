"""The official ALBEF learning-rate schedule: linear warm-up inside epoch 0, then a per-epoch cosine.

The official scripts drive timm's ``CosineLRScheduler`` (``warmup_prefix``, one cycle) from the training loop:
in epoch 0 they call ``step(i // 100)`` *after* the optimizer step of every iteration ``i`` with
``i % 100 == 0 and i <= warmup_epochs*100``; at the start of epoch ``e > 0`` they call ``step(e + warmup_epochs)``.
Iteration ``i`` of epoch 0 therefore trains with warm-up step ``min((i - 1) // 100, warmup_epochs)`` (0 at
``i = 0``): iteration 100 still uses step 0, iteration 101 the first raised rate. ``WarmupCosineScheduler``
computes the resulting value directly from ``(epoch, iteration)``.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

__all__ = ["STEP_SIZE", "WarmupCosineScheduler", "create_scheduler"]

STEP_SIZE = 100  # iterations per warm-up step, hard-coded in the official loops


class WarmupCosineScheduler:
    """Warm-up + cosine schedule of the official ``schedular`` block, evaluated per (epoch, iteration).

    ``cfg`` keys: ``sched`` ('cosine' only), ``epochs``, ``min_lr``, ``warmup_lr``, ``warmup_epochs``; ``lr``,
    ``decay_rate`` and ``cooldown_epochs`` are accepted but, as in the official code, do not change the curve
    (one cosine cycle, so no decay; the loop runs ``epochs`` epochs, so no cooldown). The peak is each param
    group's initial lr (timm's ``base_values``), i.e. ``optimizer.lr``; a different ``schedular.lr`` is warned
    about.

    Note that ``warmup_epochs`` counts *100-iteration steps inside epoch 0*, not epochs: for Pretrain.yaml
    (warmup_epochs 20) the lr rises from ``warmup_lr`` to ``lr`` every 100 iterations over the first 2,000
    iterations (iteration 2,001 is the first at ``lr``) and stays at ``lr`` for the rest of epoch 0. Epoch
    ``e > 0`` uses ``min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * e / epochs))`` (``min_lr`` once ``e >= epochs``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: dict) -> None:
        sched = str(cfg.get("sched", "cosine"))
        if sched.lower() != "cosine":
            raise ValueError(f"schedular.sched={sched!r} is not supported: only 'cosine' (as in every official config)")
        self.optimizer = optimizer
        self.epochs = int(cfg["epochs"])
        self.min_lr = float(cfg.get("min_lr", 1e-5))
        self.warmup_lr = float(cfg.get("warmup_lr", 1e-5))
        self.warmup_steps = int(cfg.get("warmup_epochs", 0))
        if self.epochs <= 0 or self.warmup_steps < 0:
            raise ValueError(f"schedular needs epochs > 0 and warmup_epochs >= 0, got {self.epochs}, "
                             f"{self.warmup_steps}")
        self.base_lrs = [float(g.setdefault("initial_lr", g["lr"] / g.get("lr_scale", 1.0)))
                         for g in optimizer.param_groups]
        if "lr" in cfg and not math.isclose(float(cfg["lr"]), self.base_lrs[0]):
            logger.warning("schedular.lr=%g differs from optimizer.lr=%g; the peak lr is optimizer.lr as in the "
                           "official code", float(cfg["lr"]), self.base_lrs[0])
        self.last_epoch: int | None = None
        self.last_step: int | None = None

    def _timm_t(self, epoch: int, step: int) -> int:
        """The argument the official loop last passed to timm's ``step`` before iteration ``step``."""
        if epoch == 0:  # the official loop advances the warm-up after iteration i's optimizer step
            return min(max(step - 1, 0) // STEP_SIZE, self.warmup_steps)
        return epoch + self.warmup_steps

    def _value(self, t: int, base_lr: float) -> float:
        if t < self.warmup_steps:
            return self.warmup_lr + t * (base_lr - self.warmup_lr) / self.warmup_steps
        t -= self.warmup_steps  # warmup_prefix: the cosine starts after the warm-up
        if t >= self.epochs:
            return self.min_lr
        return self.min_lr + 0.5 * (base_lr - self.min_lr) * (1 + math.cos(math.pi * t / self.epochs))

    def lr_at(self, epoch: int, step: int) -> float:
        """The lr (of the first param group) used for iteration ``step`` of ``epoch``; no side effects."""
        return self._value(self._timm_t(epoch, step), self.base_lrs[0])

    def step(self, epoch: int, step: int) -> float:
        """Set every param group's lr for iteration ``step`` of ``epoch`` and return the first group's."""
        t = self._timm_t(epoch, step)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self._value(t, base_lr) * group.get("lr_scale", 1.0)
        self.last_epoch, self.last_step = epoch, step
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """Last (epoch, step) and the peak lrs."""
        return {"last_epoch": self.last_epoch, "last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output."""
        self.last_epoch = state.get("last_epoch")
        self.last_step = state.get("last_step")
        if "base_lrs" in state:
            self.base_lrs = [float(v) for v in state["base_lrs"]]


def create_scheduler(cfg: dict, optimizer: torch.optim.Optimizer) -> WarmupCosineScheduler:
    """Build the scheduler from the official ``schedular`` config block."""
    return WarmupCosineScheduler(optimizer, cfg)
