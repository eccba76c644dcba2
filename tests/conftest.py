"""Shared fixtures: tiny model configs, the repo root on sys.path, single-threaded torch."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models.albef import ALBEFConfig  # noqa: E402
from models.bert import BertConfig  # noqa: E402


def tiny_bert(**kw: object) -> BertConfig:
    values = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, fusion_layer=2, encoder_width=32)
    values.update(kw)
    return BertConfig(**values)


def tiny_albef(**kw: object) -> ALBEFConfig:
    values = dict(bert=tiny_bert(), image_res=32, patch_size=8, vision_width=32, vision_depth=2,
                  vision_heads=2, embed_dim=16, queue_size=12)
    values.update(kw)
    return ALBEFConfig(**values)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: tiny models gain nothing from threads, and on a shared machine a second thread can
    stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
