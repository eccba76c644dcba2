"""AdamW with the parameter groups of the official ALBEF code (timm ``create_optimizer`` / ``add_weight_decay``)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["create_optimizer", "param_groups_weight_decay"]


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``model`` into a decay and a no-decay group.

    As in timm's ``add_weight_decay``: frozen parameters (``requires_grad=False``, e.g. the momentum encoders)
    are left out, and 1-d parameters (biases, LayerNorm weights) and names ending in ``.bias`` get no weight
    decay. A 0-dim parameter such as the learnable ``temp`` is *not* 1-d, so it is decayed, exactly as in the
    official code. Tied parameters appear once (``named_parameters`` de-duplicates them). Names returned by
    ``model.no_weight_decay()``, when the model defines it, are not decayed either (timm's ``skip_list``).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def create_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.AdamW:
    """Build AdamW from the official ``optimizer`` block ``{opt: adamW, lr, weight_decay}``.

    Only AdamW is supported. The fused kernel (CPU or CUDA) is used when every trainable parameter is on one
    device type: on CPU it is several times faster than the per-tensor loop.
    """
    opt = str(cfg.get("opt", "adamW"))
    if opt.lower() != "adamw":
        raise ValueError(f"optimizer.opt={opt!r} is not supported: only 'adamW' (as in every official config)")
    lr = float(cfg["lr"])
    weight_decay = float(cfg.get("weight_decay", 0.0))
    groups = param_groups_weight_decay(model, weight_decay)
    temp_scale = float(cfg.get("temp_lr_scale", 1.0))
    if temp_scale != 1.0 and isinstance(getattr(model, "temp", None), torch.nn.Parameter):
        # Adam moves a scalar by about lr per step whatever its gradient: at a from-scratch lr the temperature
        # can fall from 0.1 to the 0.001 clamp within a few hundred steps. The official code has no such group.
        groups[1]["params"] = [p for p in groups[1]["params"] if p is not model.temp]
        groups.append({"params": [model.temp], "weight_decay": weight_decay, "lr": lr * temp_scale,
                       "lr_scale": temp_scale})
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise ValueError("the model has no trainable parameters")
    fused = len({p.device.type for p in params}) == 1 and params[0].device.type in ("cpu", "cuda")
    logger.info(
        "AdamW lr=%g weight_decay=%g: %d tensors with decay, %d without, fused=%s",
        lr, weight_decay, len(groups[1]["params"]), len(groups[0]["params"]), fused,
    )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
