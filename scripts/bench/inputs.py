"""What the benchmarks run on: the model sizes (``--sizes``) and random images and captions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import Retrieval
from engine.config import load_config
from models.albef import ALBEFConfig
from models.bert import BertConfig
from scripts.bench.common import REPO_ROOT

Inputs = tuple[Tensor, Tensor, Tensor]


def tiny_config(queue: int) -> ALBEFConfig:
    """ViT 32 px / patch 8 / depth 2 / width 64; BERT 4 layers (2 text + 2 fusion), hidden 64, full vocab."""
    bert = BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256,
                      fusion_layer=2, encoder_width=64)
    return ALBEFConfig(bert=bert, image_res=32, patch_size=8, vision_width=64, vision_depth=2, vision_heads=2,
                       queue_size=queue)


def full_config(queue: int) -> ALBEFConfig:
    """ViT-B/16 at 256 px + BERT-base (configs/config_bert.json), as the official pre-training."""
    bert = BertConfig.from_json(str(REPO_ROOT / "configs" / "config_bert.json"))
    return ALBEFConfig(bert=bert, image_res=256, queue_size=queue)


# size -> (config builder, text length, name of the batch-size argument)
SIZES: dict[str, tuple[Callable[[int], ALBEFConfig], int, str]] = {
    "tiny": (tiny_config, 12, "batch_tiny"),
    "full": (full_config, 30, "batch_full"),
}


def make_inputs(batch: int, res: int, text_len: int, device: torch.device, seed: int) -> Inputs:
    """Random images and ``[CLS] w1 .. wn [PAD]..`` texts of lengths in [text_len/2, text_len]."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, res, res, generator=gen)
    ids = torch.randint(1000, 30000, (batch, text_len), generator=gen)
    ids[:, 0] = 101
    lengths = torch.randint(text_len // 2, text_len + 1, (batch,), generator=gen)
    mask = (torch.arange(text_len)[None] < lengths[:, None]).long()
    ids = ids * mask
    return image.to(device), ids.to(device), mask.to(device)


# size -> the config whose architecture (and optimizer, queue, text length) the retrieval sections use
RETRIEVAL_CONFIGS = {"tiny": "configs/toy/Retrieval.yaml", "full": "configs/Retrieval_coco.yaml"}
CAPTION_TOKENS = (8, 20)  # caption lengths of the retrieval benchmarks, [CLS] included (COCO-like)


def retrieval_setup(size: str) -> tuple[dict, ALBEFConfig]:
    """The resolved YAML config of ``size`` (:data:`RETRIEVAL_CONFIGS`) and its model config."""
    config = load_config(str(REPO_ROOT / RETRIEVAL_CONFIGS[size]), Retrieval.DEFAULTS)
    return config, ALBEFConfig.from_config(config, str(REPO_ROOT / config["bert_config"]))


def make_captions(n: int, max_tokens: int, seed: int,
                  tokens: tuple[int, int] = CAPTION_TOKENS) -> tuple[Tensor, Tensor]:
    """``n`` random ``[CLS] w1 .. [PAD]`` captions of ``tokens`` (min, max) tokens padded to ``max_tokens``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (n, max_tokens), generator=gen)
    ids[:, 0] = 101
    lengths = torch.randint(tokens[0], min(tokens[1], max_tokens) + 1, (n,), generator=gen)
    mask = (torch.arange(max_tokens)[None] < lengths[:, None]).long()
    return ids * mask, mask
