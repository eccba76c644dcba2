"""AdamW parameter groups as in the official code (timm ``add_weight_decay``)."""

from __future__ import annotations

import pytest
import torch

from optim import create_optimizer

CFG = {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.temp = torch.nn.Parameter(torch.tensor(0.07))  # 0-dim, like ALBEF's learnable temperature
        self.proj_m = torch.nn.Linear(4, 3)  # a momentum twin: frozen
        for p in self.proj_m.parameters():
            p.requires_grad = False
        self.head = torch.nn.Linear(4, 3, bias=False)
        self.head.weight = self.proj.weight  # tied, like the MLM decoder and word embeddings: listed once


def _ids(group: dict) -> set[int]:
    return {id(p) for p in group["params"]}


def _groups(model: torch.nn.Module) -> tuple[dict, dict]:
    opt = create_optimizer(CFG, model)
    no_decay, decay = opt.param_groups
    return no_decay, decay


def test_group_membership_and_weight_decay() -> None:
    model = Tiny()
    no_decay, decay = _groups(model)
    assert _ids(no_decay) == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)}
    # the 0-dim temperature is decayed, as in the official code (it is not 1-d)
    assert _ids(decay) == {id(model.proj.weight), id(model.temp)}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.02
    assert len(decay["params"]) == 2  # the tied weight appears once
    frozen = {id(p) for p in model.proj_m.parameters()}
    assert not frozen & (_ids(no_decay) | _ids(decay))


def test_lr_from_config_and_fused_kernel_on_cpu() -> None:
    opt = create_optimizer({"opt": "adamw", "lr": 3e-5, "weight_decay": 0.05}, Tiny())
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["lr"] == 3e-5 for g in opt.param_groups)
    assert opt.defaults.get("fused") is True


def test_no_weight_decay_hook_is_honoured() -> None:
    model = Tiny()
    model.no_weight_decay = lambda: {"temp"}
    no_decay, decay = _groups(model)
    assert id(model.temp) in _ids(no_decay) and id(model.temp) not in _ids(decay)


def test_rejects_other_optimizers() -> None:
    with pytest.raises(ValueError, match="only 'adamW'"):
        create_optimizer({"opt": "sgd", "lr": 0.1, "weight_decay": 0.0}, Tiny())


def test_temp_lr_scale_puts_the_temperature_in_a_scaled_group() -> None:
    from scheduler import create_scheduler

    model = Tiny()
    model.temp = torch.nn.Parameter(torch.tensor(0.07))
    opt = create_optimizer({"opt": "adamW", "lr": 1e-3, "weight_decay": 0.02, "temp_lr_scale": 0.1}, model)
    temp_group = [g for g in opt.param_groups if any(p is model.temp for p in g["params"])]
    assert len(temp_group) == 1 and len(temp_group[0]["params"]) == 1
    sched = create_scheduler({"sched": "cosine", "lr": 1e-3, "epochs": 2, "min_lr": 1e-5, "warmup_lr": 1e-4,
                              "warmup_epochs": 0}, opt)
    sched.step(0, 0)
    assert temp_group[0]["lr"] == pytest.approx(1e-4) and opt.param_groups[0]["lr"] == pytest.approx(1e-3)
