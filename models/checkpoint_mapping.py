"""The task mappings of checkpoint loading (``models.checkpoint.adapt_state_dict``): a pre-training text encoder
into a VQA answer decoder (official ``VQA.py``) and a 12-layer encoder into the two-image 18-layer one of NLVR2
(official ``Pretrain_nlvr.py``)."""

from __future__ import annotations

import logging
import re

from torch import Tensor, nn

logger = logging.getLogger(__name__)


_DECODER_PAIRS = (("text_encoder", "text_decoder"), ("text_encoder_m", "text_decoder_m"))
_ENCODER_KEY = re.compile(r"^(text_encoder(?:_m)?)\.(?:bert\.)?(embeddings\..+|encoder\.layer\.(\d+)\..+|cls\..+)$")


def decoder_from_encoder(state: dict[str, Tensor], model: nn.Module, target: dict) -> dict[str, Tensor]:
    """Initialise an answer decoder (VQA) that the checkpoint lacks from its text encoder (official ``VQA.py``).

    ``text_decoder(_m)`` takes the encoder's embeddings, its fusion layers ``fusion_layer + i`` as layers ``i``
    and its MLM head ``cls``; the encoder keeps every layer. Applies only when the model has a
    ``text_decoder`` and the checkpoint has none (a ``vqa.pth`` loads as it is).
    """
    if not any(k.startswith("text_decoder.") for k in target) or any(
            k.removeprefix("module.").startswith("text_decoder") for k in state):
        return state
    out = dict(state)
    for key, value in state.items():
        m = _ENCODER_KEY.match(key.removeprefix("module."))
        pair = dict(_DECODER_PAIRS).get(m[1]) if m else None
        if pair is None or not any(k.startswith(pair + ".") for k in target):
            continue
        rest = m[2] if m[2].startswith("cls.") else "bert." + m[2]
        if m[3] is not None:
            layer = int(m[3]) - model.get_submodule(m[1]).config.fusion_layer
            if layer < 0:
                continue
            rest = f"bert.encoder.layer.{layer}." + m[2].split(".", 3)[3]
        out[f"{pair}.{rest}"] = value
    decoder = model.get_submodule("text_decoder").config
    logger.info("text_decoder initialised from the text encoder: embeddings, fusion layers as decoder layers "
                "0..%d, MLM head (official VQA.py)", decoder.num_hidden_layers - 1)
    return out


_LAYER_KEY = re.compile(r"^(text_encoder(?:_m)?\.(?:bert\.)?encoder\.layer\.)(\d+)\.(.+)$")


def _layer_counts(keys: object) -> dict[str, int]:
    """Encoder key prefix -> number of layers (highest index + 1) among ``keys``."""
    counts: dict[str, int] = {}
    for key in keys:
        m = _LAYER_KEY.match(key)
        if m:
            counts[m[1]] = max(counts.get(m[1], 0), int(m[2]) + 1)
    return counts


def pair_fusion_layers(state: dict[str, Tensor], model: nn.Module, target: dict) -> dict[str, Tensor]:
    """Copy fusion layer ``l >= f`` of an n-layer checkpoint encoder into layers ``f + 2(l - f)`` and
    ``f + 2(l - f) + 1`` of a model encoder with ``f + 2(n - f)`` layers (official ``Pretrain_nlvr.py``).

    Text layers (``l < f``) keep their index. Applies only where the model's encoder has exactly that
    many layers; both names of a shared key/value projection then receive the same tensor.
    """
    source_counts, target_counts = _layer_counts(state), _layer_counts(target)
    mapped: dict[str, int] = {}
    for prefix, n in source_counts.items():
        config = getattr(_submodule(model, prefix.removesuffix(".encoder.layer.")), "config", None)
        f = getattr(config, "fusion_layer", None)
        if f is not None and n > f and target_counts.get(prefix) == f + 2 * (n - f):
            mapped[prefix] = f
    if not mapped:
        return state
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _LAYER_KEY.match(key)
        if m is None or m[1] not in mapped or int(m[2]) < mapped[m[1]]:
            out[key] = value
            continue
        f, layer = mapped[m[1]], int(m[2])
        for new in (f + 2 * (layer - f), f + 2 * (layer - f) + 1):
            out[f"{m[1]}{new}.{m[3]}"] = value
    for prefix, f in mapped.items():
        logger.info("%s: checkpoint of %d layers mapped to %d: fusion layer l >= %d copied into layers "
                    "%d + 2(l - %d) and the next (two-image fusion)", prefix.removesuffix(".encoder.layer."),
                    source_counts[prefix], target_counts[prefix], f, f, f)
    return out


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
