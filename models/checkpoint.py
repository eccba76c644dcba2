"""Loading released and own ALBEF checkpoints into any task model, with one clear report.

Accepts ``{'model': state_dict, ...}`` or a raw state dict (``refcoco.pth``); strips DDP's ``module.``;
moves ``text_encoder.bert.*`` <-> ``text_encoder.*`` to match the model; interpolates the ViT position
embedding (online and momentum) to the model's resolution; initialises missing momentum (``*_m``)
weights from the online ones; drops queues whose size differs. Missing and unexpected keys are
reported as "expected" (queues, MLM head, ``position_ids``) or "suspicious".

A text encoder whose fusion layers the model has doubled (NLVR2: 12 layers -> 18) receives each fusion layer
of the checkpoint in both blocks of its pair. Entries matching a model's ``unused_checkpoint_keys`` pattern
(e.g. the contrastive heads of a pre-training checkpoint loaded into a classifier) are dropped, counted, and so
are momentum weights (``*_m``) of twins the model does not build (``distill: false``, inference).

Nothing is loaded, and one :class:`CheckpointError` line says why, when: the file is not a checkpoint (text,
truncated, empty, a pickled list, a dict that holds neither ``model`` nor tensors); tensors differ in shape
(another model size or another task: the keys and both shapes are named); the checkpoint matches none of the
model's weights; or keys are missing or unexpected beyond the expected ones, unless ``allow_partial``
(``--allow_partial`` / ``allow_partial: true``: the process default, :func:`set_allow_partial`).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models.checkpoint_info import describe_keys, mismatch_message, partial_message, shape_mismatches
from models.checkpoint_mapping import decoder_from_encoder, pair_fusion_layers
from models.vit import interpolate_pos_embed

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or its weights do not fit the model (one line, naming file and keys)."""


_ALLOW_PARTIAL = {"default": False}


def set_allow_partial(allow: bool) -> None:
    """Process default of ``load_weights(allow_partial=None)`` (``--allow_partial``, ``allow_partial: true``)."""
    _ALLOW_PARTIAL["default"] = bool(allow)


_NOT_WEIGHTS = re.compile(r"(^|\.)(image_queue|text_queue|idx_queue|queue_ptr|position_ids)$")
_EXPECTED = re.compile(r"(^|\.)(image_queue|text_queue|idx_queue|queue_ptr|position_ids)$|^text_encoder(_m)?\.cls\.")


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    momentum_initialised: list[str] = field(default_factory=list)
    momentum_kept: list[str] = field(default_factory=list)  # absent, left as initialised (init_momentum=False)
    fresh_heads: list[str] = field(default_factory=list)  # a model's ``task_head_keys`` absent from the checkpoint
    loaded: int = 0  # model weights found in the checkpoint (queues and ``position_ids`` not counted)

    @property
    def suspicious(self) -> list[str]:
        return [k for k in self.missing + self.unexpected if not _EXPECTED.search(k)]


# First bytes of a pointer file standing for a checkpoint (``checkpoint_best.pth`` where hard links fail).
LINK_MAGIC = b"ALBEF checkpoint link -> "


def follow_checkpoint_link(path: str) -> str:
    """``path``, or the checkpoint a pointer file at ``path`` names (relative to its folder).

    Raises ``FileNotFoundError`` when the named checkpoint is gone.
    """
    if os.path.getsize(path) > 4096:
        return path
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.startswith(LINK_MAGIC):
        return path
    target = os.path.join(os.path.dirname(path), head[len(LINK_MAGIC):].decode().strip())
    if not os.path.isfile(target):
        raise FileNotFoundError(f"checkpoint {path} points to {target}, which does not exist")
    return target


def _why_unreadable(exc: BaseException) -> str:
    """One line on why ``torch.load`` failed (its messages span many lines)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, EOFError) or "central directory" in text or "unexpected EOF" in text:
        return f"the file is truncated or corrupt ({text[:160]})"
    if isinstance(exc, pickle.UnpicklingError) or "invalid load key" in text or "Invalid magic number" in text:
        return f"not a PyTorch checkpoint ({text[:160]})"
    return f"{type(exc).__name__}: {text[:200]}"


def _load_file(path: str) -> object:
    """``torch.load`` on the CPU, tensors only first; official files also pickle their config / argparse values."""
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(e)}") from None


def read_state_dict(path: str) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint file (or the one a pointer file names) -> (model state dict, the whole checkpoint
    dict or {}). ``{'model': state dict, ...}`` and raw state dicts are accepted.

    Raises ``FileNotFoundError`` (no file) or :class:`CheckpointError` (one line: empty, truncated, not a
    checkpoint, not a dict, a dict with neither ``model`` nor tensors).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    path = follow_checkpoint_link(path)
    ckpt = _load_file(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict or "
                              "{'model': state dict}")
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        what = "its 'model' entry is not a state dict of tensors" if "model" in ckpt else (
            f"it has no 'model' entry and is not a state dict (keys: {', '.join(map(str, list(ckpt)[:8])) or 'none'})")
        raise CheckpointError(f"checkpoint {path}: {what}")
    return dict(state), (ckpt if "model" in ckpt else {})


def adapt_state_dict(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename and resize checkpoint entries so they fit ``model`` (see the module docstring)."""
    target = model.state_dict()
    state = decoder_from_encoder(state, model, target)
    out: dict[str, Tensor] = {}
    children = dict(model.named_children())
    twins_dropped = []
    for key, value in state.items():
        key = key.removeprefix("module.")
        key = _match_bert_prefix(key, target)
        top = key.split(".", 1)[0]
        if key not in target and top.endswith("_m") and top not in children and top[:-2] in children:
            twins_dropped.append(key)  # a momentum twin this model does not build (distill off, inference)
            continue
        if key.endswith("pos_embed") and key in target and value.shape != target[key].shape \
                and value.dim() == 3 and value.shape[-1] == target[key].shape[-1]:  # another grid, same width
            vit = model.get_submodule(key.rsplit(".", 1)[0])
            value = interpolate_pos_embed(value, vit.patch_embed.num_patches, vit.num_prefix_tokens)
        if key.endswith("_queue") and key in target and value.shape != target[key].shape:
            logger.info("checkpoint %s has shape %s, model %s: keeping the model's fresh queue",
                        key, tuple(value.shape), tuple(target[key].shape))
            continue
        out[key] = value
    if "queue_ptr" in out and not all(k in out for k in ("image_queue", "text_queue")):
        del out["queue_ptr"]  # a pointer into a queue that was not loaded means nothing
    if twins_dropped:
        logger.info("%d momentum (*_m) entries dropped: the model has no momentum twins (%s)", len(twins_dropped),
                    ", ".join(sorted({k.split(".", 1)[0] for k in twins_dropped})))
    unused = getattr(model, "unused_checkpoint_keys", None)
    if unused is not None:
        dropped = [k for k in out if unused.search(k) and k not in target]
        if dropped:
            logger.info("%d checkpoint entries the model does not use were dropped (%s ...)",
                        len(dropped), ", ".join(dropped[:4]))
        out = {k: v for k, v in out.items() if k not in dropped}
    return pair_fusion_layers(out, model, target)


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


def load_weights(model: nn.Module, source: str | dict, strict: bool = False, init_momentum: bool = True,
                 allow_partial: bool | None = None, name: str | None = None) -> LoadReport:
    """Load a checkpoint path, a checkpoint dict ``{'model': state dict, ...}`` (read once by the caller) or a
    state dict into ``model``; returns (and logs) the report. ``name`` labels the source in messages.

    ``init_momentum=False`` leaves momentum twins that the checkpoint lacks as they are (official NLVR.py
    copies the online weights into them before loading, so they keep the random initialisation).
    ``allow_partial``: load even with suspicious missing or unexpected keys (a warning names them); ``None``
    takes the process default (:func:`set_allow_partial`, off unless ``--allow_partial``).

    Raises :class:`CheckpointError` (one line; nothing is loaded) when the file is not a checkpoint, when
    tensors differ in shape (another model size or task: the keys and both shapes are named), when the
    checkpoint matches none of the model's weights, or on suspicious keys without ``allow_partial``.
    """
    name = name or (source if isinstance(source, str) else "the state dict")
    if isinstance(source, str):
        state, ckpt = read_state_dict(source)
    elif isinstance(source.get("model"), dict):  # a whole checkpoint (no tensor is called 'model')
        state, ckpt = dict(source["model"]), source
    else:
        state, ckpt = source, {}
    adapted = adapt_state_dict(state, model)
    target = model.state_dict()
    mismatched = shape_mismatches(adapted, target)
    if mismatched:
        raise CheckpointError(mismatch_message(name, mismatched, model, state, ckpt))
    report = plan_load(model, adapted, target, init_momentum)
    if report.loaded == 0:
        raise CheckpointError(f"{name} matches none of the weights of {type(model).__name__} (checkpoint keys: "
                              f"{describe_keys(list(state))}): is it an ALBEF checkpoint?")
    partial = _ALLOW_PARTIAL["default"] if allow_partial is None else allow_partial
    if report.suspicious and not partial:
        raise CheckpointError(partial_message(name, report, model, state, ckpt))
    model.load_state_dict(adapted, strict=strict)
    if report.momentum_initialised:
        model.copy_to_momentum([n.removesuffix("_m") for n in report.momentum_initialised])
    _log_report(report, name, len(adapted))
    return report


def plan_load(model: nn.Module, state: dict[str, Tensor], target: dict[str, Tensor],
              init_momentum: bool = True) -> LoadReport:
    """What loading the adapted ``state`` into ``model`` (state dict ``target``) would do, without doing it."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    report = LoadReport(missing, unexpected, loaded=sum(k in target and not _NOT_WEIGHTS.search(k) for k in state))
    pairs = getattr(model, "momentum_pairs", [])
    names = [name for name, name_m in pairs if any(k.startswith(name_m + ".") for k in missing)]
    if names:
        twins = [n + "_m" for n in names]
        if init_momentum:
            report.momentum_initialised = twins
        else:
            report.momentum_kept = twins
        prefixes = tuple(n + "_m." for n in names)
        report.missing = [k for k in report.missing if not k.startswith(prefixes)]
    heads = getattr(model, "task_head_keys", None)  # a task's new head: absent from pre-training checkpoints
    if heads is not None:
        report.fresh_heads = [k for k in report.missing if heads.search(k)]
        report.missing = [k for k in report.missing if k not in report.fresh_heads]
    return report


def _log_report(report: LoadReport, name: str, tensors: int) -> None:
    logger.info("loaded %s: %d tensors, %d missing, %d unexpected", name, tensors,
                len(report.missing), len(report.unexpected))
    if report.momentum_initialised:
        logger.info("momentum weights absent from the checkpoint were initialised from the online weights "
                    "(%s)", ", ".join(report.momentum_initialised))
    if report.momentum_kept:
        logger.info("momentum weights absent from the checkpoint keep their initialisation (%s)",
                    ", ".join(report.momentum_kept))
    if report.fresh_heads:
        logger.info("task head weights absent from the checkpoint keep their initialisation (%s)",
                    ", ".join(report.fresh_heads))
    if report.suspicious:
        logger.warning("allow_partial: suspicious keys left as initialised or unused: %s",
                       describe_keys(report.suspicious))


def load_exact(model: nn.Module, state: dict[str, Tensor], name: str) -> None:
    """Load a state dict saved from this very model (``--resume``): every key, every shape, else one
    :class:`CheckpointError` line naming what differs (another model size or task)."""
    target = model.state_dict()
    mismatched = shape_mismatches(state, target)
    if mismatched:
        raise CheckpointError(mismatch_message(name, mismatched, model, state, {}))
    missing, unexpected = [k for k in target if k not in state], [k for k in state if k not in target]
    if missing or unexpected:
        raise CheckpointError(f"{name} is not a checkpoint of {type(model).__name__}: "
                              + "; ".join(f"{what}: {describe_keys(keys)}" for what, keys in
                                          (("missing", missing), ("unexpected", unexpected)) if keys))
    model.load_state_dict(state, strict=True)


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
