"""The ``bert-base-uncased`` WordPiece tokenizer, offline, with the ALBEF special-token convention.

ALBEF's released checkpoints saw single sequences as ``[CLS] tokens`` with no trailing ``[SEP]``
(the official tokenizer drops it), always truncated. :class:`TextTokenizer` reproduces that on top of
the transformers fast tokenizer. The vocabulary ships with the project (``models/assets/vocab.txt``,
the 30,522 entries of ``bert-base-uncased``), so nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import BertTokenizerFast

VOCAB_FILE = os.path.join(os.path.dirname(__file__), "assets", "vocab.txt")
_BUILTIN_NAMES = {"bert-base-uncased", "google-bert/bert-base-uncased", ""}


@dataclass
class TextBatch:
    """Token ids (B, T) and attention mask (B, T) of a batch of texts."""

    input_ids: Tensor
    attention_mask: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextBatch:
        return TextBatch(self.input_ids.to(device, non_blocking=non_blocking),
                         self.attention_mask.to(device, non_blocking=non_blocking))


def _load_backend(name_or_path: str) -> BertTokenizerFast:
    if name_or_path in _BUILTIN_NAMES:
        path = VOCAB_FILE
    elif os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "vocab.txt")
    else:
        path = name_or_path
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer vocabulary not found for {name_or_path!r} (looked for {path}); pass 'bert-base-uncased' "
            "for the bundled vocabulary, a folder holding vocab.txt, or a vocab.txt file")
    # `vocab=` loads every entry; `vocab_file=` silently builds a 5-token vocabulary in transformers 5.x.
    tok = BertTokenizerFast(vocab=path, do_lower_case=True)
    if len(tok) < 100:
        raise RuntimeError(f"tokenizer vocabulary {path} loaded only {len(tok)} entries")
    return tok


class TextTokenizer:
    """Callable: list of texts -> :class:`TextBatch` of ``[CLS] w1 .. wn`` (no ``[SEP]``), padded."""

    def __init__(self, name_or_path: str = "bert-base-uncased") -> None:
        self.backend = _load_backend(name_or_path)
        self.pad_token_id = self.backend.pad_token_id
        self.cls_token_id = self.backend.cls_token_id
        self.sep_token_id = self.backend.sep_token_id
        self.mask_token_id = self.backend.mask_token_id
        self.vocab_size = len(self.backend)

    def __call__(self, texts: list[str], max_length: int, padding: str = "longest") -> TextBatch:
        """Tokenise; sequences are truncated to ``max_length`` tokens including [CLS].

        ``padding``: 'longest' (to the longest in the batch) or 'max_length'.
        """
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', not {padding!r}")
        pieces = self.backend(list(texts), add_special_tokens=False, truncation=True,
                              max_length=max_length - 1)["input_ids"]
        ids = [[self.cls_token_id, *p] for p in pieces]
        width = max_length if padding == "max_length" else max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
        return TextBatch(input_ids, attention_mask)
