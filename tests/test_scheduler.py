"""Hand-computed learning rates of the official warm-up + cosine schedule (Pretrain.yaml settings)."""

from __future__ import annotations

import math

import pytest
import torch

from scheduler import WarmupCosineScheduler, create_scheduler

PRETRAIN = {"sched": "cosine", "lr": 1e-4, "epochs": 30, "min_lr": 1e-5, "decay_rate": 1, "warmup_lr": 1e-5,
            "warmup_epochs": 20, "cooldown_epochs": 0}


def _make(cfg: dict = PRETRAIN, lr: float = 1e-4) -> WarmupCosineScheduler:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    return create_scheduler(cfg, optimizer)


def _cosine(epoch: int) -> float:
    return 1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * epoch / 30))


@pytest.mark.parametrize("epoch, step, expected", [
    (0, 0, 1e-5),
    (0, 99, 1e-5),
    (0, 100, 1e-5),  # the official loop raises the rate after iteration 100's optimizer step
    (0, 101, 1e-5 + 9e-5 / 20),  # 1.45e-5
    (0, 200, 1.45e-5),
    (0, 1050, 1e-5 + 10 * 9e-5 / 20),
    (0, 1999, 1e-5 + 19 * 9e-5 / 20),
    (0, 2000, 1e-5 + 19 * 9e-5 / 20),
    (0, 2001, 1e-4),
    (0, 5000, 1e-4),
    (1, 0, 1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi / 30))),
    (1, 12345, _cosine(1)),
    (15, 0, 1e-5 + 0.5 * 9e-5),
    (29, 0, 1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 29 / 30))),
    (30, 0, 1e-5),
    (45, 0, 1e-5),
])
def test_official_pretrain_lrs(epoch: int, step: int, expected: float) -> None:
    assert _make().lr_at(epoch, step) == pytest.approx(expected, rel=1e-12, abs=0)


def test_step_sets_every_param_group() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-4)
    sched = WarmupCosineScheduler(optimizer, PRETRAIN)
    assert sched.step(0, 101) == pytest.approx(1.45e-5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1.45e-5, 1.45e-5])
    assert sched.lr_at(1, 0) == pytest.approx(_cosine(1))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.45e-5)  # lr_at is pure


def test_no_warmup_starts_at_peak() -> None:
    cfg = {**PRETRAIN, "warmup_epochs": 0, "epochs": 5, "min_lr": 1e-6, "lr": 1e-5}
    sched = _make(cfg, lr=1e-5)
    assert sched.lr_at(0, 0) == pytest.approx(1e-5)
    assert sched.lr_at(1, 0) == pytest.approx(1e-6 + 0.5 * 9e-6 * (1 + math.cos(math.pi / 5)))


def test_state_dict_round_trip() -> None:
    sched = _make()
    sched.step(3, 250)
    state = sched.state_dict()
    other = _make()
    other.load_state_dict(state)
    assert other.state_dict() == state == {"last_epoch": 3, "last_step": 250, "base_lrs": [1e-4]}
    assert other.lr_at(3, 0) == sched.lr_at(3, 0)


def test_peak_is_the_optimizer_lr_and_mismatch_warns(caplog) -> None:
    sched = _make({**PRETRAIN, "lr": 2e-4}, lr=1e-4)
    assert sched.lr_at(0, 2001) == pytest.approx(1e-4)
    assert "schedular.lr" in caplog.text


def test_unsupported_sched() -> None:
    with pytest.raises(ValueError, match="only 'cosine'"):
        _make({**PRETRAIN, "sched": "step"})


def official_lrs(cfg: dict, iters_per_epoch: int, epochs: int) -> list[list[float]]:
    """The lr each optimizer step of the official loop trains with: timm's ``CosineLRScheduler`` as the
    official ``create_scheduler`` builds it, driven as the official Pretrain.py / Retrieval.py drive it
    (``step(epoch + warmup)`` before epochs > 0; ``step(i // 100)`` after iteration i's optimizer step in epoch 0
    when ``i % 100 == 0 and i <= warmup * 100``)."""
    from timm.scheduler import CosineLRScheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-4)
    timm = CosineLRScheduler(optimizer, t_initial=cfg["epochs"], lr_min=cfg["min_lr"], cycle_limit=1,
                             warmup_t=cfg["warmup_epochs"], warmup_lr_init=cfg["warmup_lr"], warmup_prefix=True,
                             t_in_epochs=True)
    seen = []
    for epoch in range(epochs):
        if epoch > 0:
            timm.step(epoch + cfg["warmup_epochs"])
        lrs = []
        for i in range(iters_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])  # optimizer.step() runs with this rate
            if epoch == 0 and i % 100 == 0 and i <= cfg["warmup_epochs"] * 100:
                timm.step(i // 100)
        seen.append(lrs)
    return seen


@pytest.mark.parametrize("iters", [150, 350])
@pytest.mark.parametrize("warmup", [3, 20])
def test_matches_the_official_loop_iteration_by_iteration(iters: int, warmup: int) -> None:
    cfg = {**PRETRAIN, "warmup_epochs": warmup, "epochs": 4}
    sched = _make(cfg)
    expected = official_lrs(cfg, iters, epochs=5)
    ours = [[sched.step(epoch, i) for i in range(iters)] for epoch in range(5)]
    for epoch in range(5):
        assert ours[epoch] == pytest.approx(expected[epoch], rel=1e-12, abs=0), epoch
    if warmup == 3:  # the case: iteration 100 trains with warmup_lr, 101 with the first raised rate
        hand = {99: 1e-5, 100: 1e-5, 101: 4e-5, 149: 4e-5, 200: 4e-5, 201: 7e-5, 300: 7e-5, 301: 1e-4, 349: 1e-4}
        for i, lr in hand.items():
            if i < iters:
                assert ours[0][i] == pytest.approx(lr, rel=1e-12), i
