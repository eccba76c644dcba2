"""Loading released and own ALBEF checkpoints into any task model, with one clear report.

Accepts ``{'model': state_dict, ...}`` or a raw state dict (``refcoco.pth``); strips DDP's ``module.``;
moves ``text_encoder.bert.*`` <-> ``text_encoder.*`` to match the model; interpolates the ViT position
embedding (online and momentum) to the model's resolution; initialises missing momentum (``*_m``)
weights from the online ones; drops queues whose size differs. Missing and unexpected keys are
reported as "expected" (queues, MLM head, ``position_ids``) or "suspicious".
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models.vit import interpolate_pos_embed

logger = logging.getLogger(__name__)

_EXPECTED = re.compile(r"(^|\.)(image_queue|text_queue|idx_queue|queue_ptr|position_ids)$|^text_encoder(_m)?\.cls\.")


_DECODER_PAIRS = (("text_encoder", "text_decoder"), ("text_encoder_m", "text_decoder_m"))
_ENCODER_KEY = re.compile(r"^(text_encoder(?:_m)?)\.(?:bert\.)?(embeddings\..+|encoder\.layer\.(\d+)\..+|cls\..+)$")


def _decoder_from_encoder(state: dict[str, Tensor], model: nn.Module, target: dict) -> dict[str, Tensor]:
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


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    momentum_initialised: list[str] = field(default_factory=list)

    @property
    def suspicious(self) -> list[str]:
        return [k for k in self.missing + self.unexpected if not _EXPECTED.search(k)]


def read_state_dict(path: str) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint file -> (model state dict, the whole checkpoint dict or {})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # official files also pickle their config / argparse values
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise RuntimeError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
    state = ckpt.get("model", ckpt)
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise RuntimeError(f"checkpoint {path}: 'model' is not a state dict of tensors")
    return dict(state), (ckpt if "model" in ckpt else {})


def adapt_state_dict(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename and resize checkpoint entries so they fit ``model`` (see the module docstring)."""
    target = model.state_dict()
    state = _decoder_from_encoder(state, model, target)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        key = _match_bert_prefix(key, target)
        if key.endswith("pos_embed") and key in target and value.shape != target[key].shape:
            vit = model.get_submodule(key.rsplit(".", 1)[0])
            value = interpolate_pos_embed(value, vit.patch_embed.num_patches, vit.num_prefix_tokens)
        if key.endswith("_queue") and key in target and value.shape != target[key].shape:
            logger.info("checkpoint %s has shape %s, model %s: keeping the model's fresh queue",
                        key, tuple(value.shape), tuple(target[key].shape))
            continue
        out[key] = value
    if "queue_ptr" in out and not all(k in out for k in ("image_queue", "text_queue")):
        del out["queue_ptr"]  # a pointer into a queue that was not loaded means nothing
    return out


def _match_bert_prefix(key: str, target: dict) -> str:
    for enc in ("text_encoder.", "text_encoder_m."):
        if key.startswith(enc + "bert.") and key not in target:
            alt = enc + key[len(enc) + len("bert."):]
            if alt in target:
                return alt
        elif key.startswith(enc) and key not in target:
            alt = enc + "bert." + key[len(enc):]
            if alt in target:
                return alt
    return key


def load_weights(model: nn.Module, source: str | dict[str, Tensor], strict: bool = False) -> LoadReport:
    """Load a checkpoint path or state dict into ``model``; returns (and logs) the report."""
    state = read_state_dict(source)[0] if isinstance(source, str) else source
    state = adapt_state_dict(state, model)
    result = model.load_state_dict(state, strict=strict)
    report = LoadReport(list(result.missing_keys), list(result.unexpected_keys))
    _init_missing_momentum(model, report)
    name = source if isinstance(source, str) else "state dict"
    logger.info("loaded %s: %d tensors, %d missing, %d unexpected", name, len(state),
                len(report.missing), len(report.unexpected))
    if report.momentum_initialised:
        logger.info("momentum weights absent from the checkpoint were initialised from the online weights "
                    "(%s)", ", ".join(report.momentum_initialised))
    if report.suspicious:
        logger.warning("suspicious missing/unexpected keys: %s", report.suspicious[:20])
    return report


def _init_missing_momentum(model: nn.Module, report: LoadReport) -> None:
    pairs = getattr(model, "momentum_pairs", [])
    missing = set(report.missing)
    names = [name for name, name_m in pairs if any(k.startswith(name_m + ".") for k in missing)]
    if names:
        model.copy_to_momentum(names)
        report.momentum_initialised = [n + "_m" for n in names]
        prefixes = tuple(n + "_m." for n in names)
        report.missing = [k for k in report.missing if not k.startswith(prefixes)]


def load_vit_init(model: nn.Module, path: str) -> None:
    """Initialise ``visual_encoder`` (and its twin) from an ImageNet DeiT/ViT checkpoint file.

    The official pre-training starts from DeiT-B/16 (``deit_base_patch16_224-b5f2ef4d.pth``); without it
    results drop by about 12 points of Flickr R@1, so a missing file is an error, not a warning.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"vit_init: ViT initialisation file not found: {path}. Download DeiT-B/16 "
            "(deit_base_patch16_224-b5f2ef4d.pth) and point vit_init at it, or set vit_init: '' to train "
            "the ViT from scratch.")
    state, _ = read_state_dict(path)
    vit = model.visual_encoder
    state = {k: v for k, v in state.items() if not k.startswith(("head", "dist_token", "fc_norm"))}
    if "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], vit.patch_embed.num_patches,
                                                   vit.num_prefix_tokens)
    result = vit.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise RuntimeError(f"vit_init {path}: missing ViT weights {result.missing_keys[:10]}")
    logger.info("ViT initialised from %s", path)


def load_bert_init(model: nn.Module, name_or_path: str) -> None:
    """Initialise the BERT part from Hugging Face ``bert-base-uncased`` weights, read offline.

    ``name_or_path`` is a local folder (config.json + weights) or a model id already in the local
    Hugging Face cache. Cross-attention layers stay randomly initialised, as in the paper.
    """
    from transformers import BertForMaskedLM as HFBertForMaskedLM

    try:
        hf = HFBertForMaskedLM.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"bert_init: cannot read BERT weights {name_or_path!r} offline ({e}). Pass --text_encoder with a "
            "local folder holding config.json and the weights, or set bert_init: false.") from None
    state = hf.state_dict()
    encoder = model.text_encoder
    if not hasattr(encoder, "bert"):  # bare BertModel: drop the 'bert.' prefix and the MLM head
        state = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}
    result = encoder.load_state_dict(state, strict=False)
    unexpected_missing = [k for k in result.missing_keys if "crossattention" not in k and "position_ids" not in k]
    if unexpected_missing:
        logger.warning("BERT weights from %s lack %s", name_or_path, unexpected_missing[:10])
    logger.info("BERT initialised from %s (%d tensors)", name_or_path, len(state))


def init_from_pretrained(model: nn.Module, vit_init: str = "", bert_init: str = "") -> None:
    """Apply the optional ImageNet ViT and BERT initialisations, then re-copy the momentum twins."""
    if vit_init:
        load_vit_init(model, vit_init)
    if bert_init:
        load_bert_init(model, bert_init)
    if (vit_init or bert_init) and hasattr(model, "copy_to_momentum"):
        model.copy_to_momentum()
