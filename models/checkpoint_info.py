"""What a checkpoint is: the metadata this project writes into it, the task and model sizes read back from any
checkpoint, and one-line explanations of why a checkpoint does not fit a model.

Checkpoints written by ``engine.trainer`` carry ``'meta'`` (:func:`checkpoint_meta`): task, training stage,
project version, image resolution, ViT sizes, the BERT config (12-layer form also for NLVR2), ``embed_dim``,
the answer decoder's depth (VQA) and the text preprocessing. :func:`architecture` rebuilds the model
configuration from that, else from the checkpoint's saved YAML ``config`` (``bert_config`` resolved in the
project), else from the tensor shapes alone (released raw state dicts such as ``refcoco.pth``: attention heads
are then taken as width / 64, true of every released ALBEF model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any

import torch
from torch import Tensor, nn

from models.albef import ALBEFConfig
from models.bert import BertConfig

logger = logging.getLogger(__name__)

PROJECT_VERSION = "0.1.0"
META_FORMAT = 1
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Model class -> task; entry script -> task (grounding trains the retrieval model).
MODEL_TASKS = {"ALBEFPretrain": "pretrain", "ALBEFRetrieval": "retrieval", "ALBEFVQA": "vqa", "ALBEFVE": "ve",
               "ALBEFNLVR": "nlvr", "ALBEFPretrainNLVR": "nlvr_pretrain"}
SCRIPT_TASKS = {"Pretrain.py": "pretrain", "Retrieval.py": "retrieval", "Grounding.py": "grounding",
                "VQA.py": "vqa", "SNLI_VE.py": "ve", "NLVR.py": "nlvr", "Pretrain_nlvr.py": "nlvr_pretrain"}
STAGES = {"pretrain": "pre-training", "nlvr_pretrain": "text-assignment pre-training"}  # others: fine-tuning
PAIRED_TASKS = ("nlvr", "nlvr_pretrain")  # fusion layers doubled: 12 -> 18 layers


def model_task(model: nn.Module) -> str | None:
    """The task of a model instance (``None`` for a class this project does not know)."""
    return MODEL_TASKS.get(type(model).__name__)


def script_task(script: str | None) -> str | None:
    """The task of an entry script path (``Grounding.py`` -> ``grounding``)."""
    return SCRIPT_TASKS.get(os.path.basename(script or ""))


def base_bert(bert: BertConfig, task: str | None) -> BertConfig:
    """The BERT config a task model is built from: the 18-layer NLVR2 encoder stems from 12 layers."""
    if task in PAIRED_TASKS:
        return dataclasses.replace(bert, num_hidden_layers=bert.fusion_layer
                                   + (bert.num_hidden_layers - bert.fusion_layer) // 2)
    return bert


def checkpoint_meta(model: nn.Module, config: dict, script: str | None = None, tokenizer: str = "bert-base-uncased",
                    commit: str | None = None) -> dict[str, Any]:
    """The ``'meta'`` entry of a checkpoint of ``model`` trained with ``config`` by ``script``: enough to rebuild
    the model and its preprocessing (plain values only: readable with ``weights_only=True``)."""
    from dataset.transforms import CLIP_MEAN, CLIP_STD

    task = script_task(script) or model_task(model)
    meta: dict[str, Any] = {"format": META_FORMAT, "task": task, "stage": STAGES.get(task, "fine-tuning"),
                            "version": PROJECT_VERSION, "commit": commit}
    c = getattr(model, "config", None)
    if not isinstance(c, ALBEFConfig):  # not an ALBEF model (engine tests): nothing more to say
        return meta
    meta.update({
        "image_res": c.image_res, "embed_dim": c.embed_dim, "distill": c.distill,
        "vit": {"patch_size": c.patch_size, "width": c.vision_width, "depth": c.vision_depth, "heads": c.vision_heads},
        "bert": dataclasses.asdict(base_bert(c.bert, task)),
        "text": {"tokenizer": tokenizer or "bert-base-uncased", "max_words": config.get("max_words"),
                 "max_tokens": config.get("max_tokens")},
        "normalize": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
    })
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None:
        meta["decoder_layers"] = decoder.config.num_hidden_layers
    return meta


def describe_sizes(meta: dict) -> str:
    """``meta`` in words: 'a pretrain checkpoint: image_res 256, ViT 768 x 12 blocks (patch 16), ...'."""
    vit, bert = meta.get("vit", {}), meta.get("bert", {})
    return (f"a {meta.get('task') or 'model'} checkpoint (project {meta.get('version', '?')}): image_res "
            f"{meta.get('image_res')}, ViT {vit.get('width')} x {vit.get('depth')} blocks "
            f"(patch {vit.get('patch_size')}), BERT {bert.get('hidden_size')} x {bert.get('num_hidden_layers')} "
            f"layers (fusion from {bert.get('fusion_layer')}), embed_dim {meta.get('embed_dim')}")


def read_meta(path: str) -> tuple[dict, dict]:
    """(``meta``, ``config``) of a checkpoint file, read without loading its tensors (memory-mapped); empty
    dicts for files without them or that cannot be mapped (old formats: ``models.checkpoint`` reads those)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}, {}
    if not isinstance(ckpt, dict):
        return {}, {}
    meta, config = ckpt.get("meta"), ckpt.get("config")
    return (meta if isinstance(meta, dict) else {}), (config if isinstance(config, dict) else {})


# ----------------------------------------------------------------------------- reading any checkpoint
def _strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def guess_task(state: dict[str, Tensor]) -> str | None:
    """The task a state dict was trained for, from its keys (``None`` when nothing says)."""
    state = _strip(state)
    if any(k.startswith("text_decoder.") for k in state):
        return "vqa"
    if any(k.startswith("ta_head.") for k in state):
        return "nlvr_pretrain"
    head = state.get("cls_head.2.weight")
    if head is not None:
        return {2: "nlvr", 3: "ve"}.get(head.shape[0])
    if any(k.startswith(("text_encoder.cls.", "text_encoder.bert.")) for k in state):
        return "pretrain"
    return "retrieval" if "itm_head.weight" in state else None


def _layers(state: dict[str, Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    return sorted({int(m[1]) for k in state if (m := pattern.match(k))})


def infer_bert(state: dict[str, Tensor], task: str | None) -> BertConfig:
    """The (12-layer form of the) text encoder's config from tensor shapes; heads = hidden / 64."""
    state = _strip(state)
    prefix = "text_encoder.bert." if "text_encoder.bert.embeddings.word_embeddings.weight" in state else "text_encoder."
    vocab, hidden = state[prefix + "embeddings.word_embeddings.weight"].shape
    layers = _layers(state, prefix)
    fusion = min((i for i in layers if f"{prefix}encoder.layer.{i}.crossattention.self.key.weight" in state),
                 default=len(layers))
    cross = state.get(f"{prefix}encoder.layer.{fusion}.crossattention.self.key.weight")
    bert = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=max(1, hidden // 64),
        intermediate_size=state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=state[prefix + "embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state[prefix + "embeddings.token_type_embeddings.weight"].shape[0], fusion_layer=fusion,
        encoder_width=cross.shape[1] if cross is not None else hidden)
    return base_bert(bert, task)


def project_path(path: str) -> str:
    """A relative path of a saved config as it exists: from the working directory, else from the project."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(PROJECT_ROOT, path) if os.path.exists(os.path.join(PROJECT_ROOT, path)) else path


def _bert_from_config(config: dict) -> BertConfig | None:
    """The saved config's ``bert_config`` file (relative paths from here or the project), if readable."""
    path = config.get("bert_config")
    if not isinstance(path, str) or not path or not os.path.isfile(project_path(path)):
        return None
    try:
        return BertConfig.from_json(project_path(path))
    except ValueError:
        return None


def _vit_sizes(state: dict[str, Tensor], config: dict) -> dict[str, int]:
    """Patch size, width, depth, resolution from the ViT's tensors; heads from the config or width / 64."""
    state = _strip(state)
    width, _, patch, _ = state["visual_encoder.patch_embed.proj.weight"].shape
    depth = len({int(k.split(".")[2]) for k in state if k.startswith("visual_encoder.blocks.")})
    grid = round((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    heads = (config.get("vit") or {}).get("heads") if isinstance(config.get("vit"), dict) else None
    return {"patch_size": patch, "width": width, "depth": depth, "image_res": grid * patch,
            "heads": heads or max(1, width // 64)}


def architecture(state: dict[str, Tensor], ckpt: dict, task: str | None) -> tuple[ALBEFConfig, int | None]:
    """(model config, answer-decoder layers or None) of a checkpoint; see the module docstring for the sources.

    The resolution is the position embedding's (the checkpoint's own); momentum twins and queues are left out
    (``distill`` off, queue of 1): what inference needs.
    """
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    vit = _vit_sizes(state, config)
    if meta.get("bert"):
        bert = BertConfig(**meta["bert"])
        vit["heads"] = meta.get("vit", {}).get("heads", vit["heads"])
    else:
        bert = _bert_from_config(config) or infer_bert(state, task)
    proj = _strip(state).get("vision_proj.weight")
    embed_dim = proj.shape[0] if proj is not None else meta.get("embed_dim") or config.get("embed_dim") or 256
    decoder = _layers(_strip(state), "text_decoder.bert.")
    model_config = ALBEFConfig(bert=bert, image_res=vit["image_res"], patch_size=vit["patch_size"],
                               vision_width=vit["width"], vision_depth=vit["depth"], vision_heads=vit["heads"],
                               embed_dim=embed_dim, queue_size=1, distill=False)
    return model_config, (len(decoder) or None)


# ----------------------------------------------------------------------------- one-line explanations
def shape_mismatches(state: dict[str, Tensor], target: dict[str, Tensor]) -> list[tuple[str, tuple, tuple]]:
    """(key, checkpoint shape, model shape) of every shared key whose shapes differ."""
    return [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in state.items()
            if k in target and tuple(v.shape) != tuple(target[k].shape)]


def describe_keys(keys: list[str], groups: int = 6) -> str:
    """Keys grouped by their top-level module, one example each: short enough for one line."""
    by_module: dict[str, list[str]] = {}
    for key in keys:
        by_module.setdefault(key.split(".", 1)[0], []).append(key)
    parts = [found[0] if len(found) == 1 else f"{module}.* ({len(found)} keys, e.g. {found[0]})"
             for module, found in list(by_module.items())[:groups]]
    if len(by_module) > groups:
        parts.append(f"and {len(by_module) - groups} more module(s)")
    return ", ".join(parts) or "none"


def _origin(model: nn.Module, state: dict[str, Tensor], ckpt: dict) -> str:
    """What the checkpoint seems to be against what the model is (task, sizes), for error messages."""
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    ckpt_task, task = meta.get("task") or guess_task(state), model_task(model)
    text = f"the model is {type(model).__name__} ({task or 'unknown task'})"
    if ckpt_task and ckpt_task != task:
        text = f"the checkpoint looks like a {ckpt_task} checkpoint, " + text
    if meta.get("bert"):
        text += f"; the checkpoint was saved from {describe_sizes(meta)}"
    return text


def mismatch_message(name: str, mismatched: list, model: nn.Module, state: dict[str, Tensor], ckpt: dict,
                     shown: int = 5) -> str:
    """One line: the tensors whose shapes differ (checkpoint vs model) and what that suggests."""
    listed = ", ".join(f"{k} {list(a)} vs {list(b)}" for k, a, b in mismatched[:shown])
    more = f" and {len(mismatched) - shown} more" if len(mismatched) > shown else ""
    return (f"{name} does not fit the model: {len(mismatched)} tensor(s) differ in shape (checkpoint vs model): "
            f"{listed}{more}; {_origin(model, state, ckpt)}. A checkpoint of another model size or task cannot be "
            "loaded: build the model with the checkpoint's bert_config, vision_width, vit and embed_dim, or load it "
            "with models.api.load_model, which reads them from the checkpoint")


def partial_message(name: str, report: Any, model: nn.Module, state: dict[str, Tensor], ckpt: dict) -> str:
    """One line: the suspicious missing and unexpected keys, and how to load anyway."""
    missing = [k for k in report.suspicious if k in report.missing]
    unexpected = [k for k in report.suspicious if k in report.unexpected]
    found = "; ".join(f"{what} {describe_keys(keys)}" for what, keys in
                      (("missing:", missing), ("unexpected:", unexpected)) if keys)
    return (f"{name} does not match the model ({found}); {_origin(model, state, ckpt)}. Nothing was loaded: pass "
            "--allow_partial (or allow_partial: true) to load the matching weights and keep the rest as initialised")


# ----------------------------------------------------------------------------- evaluation at the checkpoint's sizes
def adopt_checkpoint_sizes(config: dict, checkpoint: str, overrides: list[str], folder: str) -> dict:
    """``config`` with the checkpoint's own model sizes and resolution, where its metadata says (``--evaluate``).

    ``image_res``, ``vision_width``, ``vit``, ``embed_dim``, ``decoder_layers`` and the BERT config (written to
    ``folder/checkpoint_bert_config.json``) follow the checkpoint unless ``overrides`` set them; a checkpoint
    without metadata (released files) leaves the config as it is. Each change is logged.
    """
    from models.checkpoint import follow_checkpoint_link

    meta, _ = read_meta(follow_checkpoint_link(checkpoint)) if os.path.isfile(checkpoint) else ({}, {})
    if not meta.get("bert"):
        return config
    given = {o.split("=", 1)[0].strip().split(".")[0] for o in overrides}
    vit = meta.get("vit", {})
    wanted = {"image_res": meta.get("image_res"), "vision_width": vit.get("width"), "embed_dim": meta.get("embed_dim"),
              "vit": {"patch_size": vit.get("patch_size"), "depth": vit.get("depth"), "heads": vit.get("heads")}}
    out, changed = dict(config), []
    for key, value in wanted.items():
        if key in config and key not in given and value is not None and config[key] != value:
            out[key] = value if key != "vit" else {**config[key], **value}
            changed.append(f"{key} {config[key]} -> {out[key]}")
    bert = BertConfig(**meta["bert"])
    if "bert_config" in config and "bert_config" not in given and _bert_from_config(config) != bert:
        path = os.path.join(folder, "checkpoint_bert_config.json")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta["bert"], f, indent=2)
        os.replace(tmp, path)
        out["bert_config"] = path
        changed.append(f"bert_config {config['bert_config']} -> {path}")
    layers = meta.get("decoder_layers")
    current = config.get("decoder_layers") or bert.num_hidden_layers - bert.fusion_layer
    if "decoder_layers" in config and "decoder_layers" not in given and layers and current != layers:
        out["decoder_layers"] = layers
        changed.append(f"decoder_layers {config['decoder_layers']} -> {layers}")
    if changed:
        logger.info("evaluating %s at its own sizes (its metadata): %s; --override KEY=VALUE keeps the config's",
                    checkpoint, "; ".join(changed))
    return out
