"""Text cleaning shared by every ALBEF task (Li et al., NeurIPS 2021).

The rules reproduce the official ``pre_caption`` / ``pre_question`` so that
released checkpoints see the same text they were trained on.
"""

from __future__ import annotations

import re

# Punctuation the official code deletes outright (before hyphen/slash handling).
_PUNCT_RE = re.compile(r"[,.'!?\"()*#:;~]")
# Runs of two or more whitespace characters (the official regex, kept as is).
_MULTI_SPACE_RE = re.compile(r"\s{2,}")


def _truncate_words(text: str, max_words: int) -> str:
    """Keep the first ``max_words`` space-separated words of ``text``."""
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean a caption exactly as the official ALBEF ``pre_caption``.

    Lowercase; delete ``,.'!?"()*#:;~``; replace ``-`` and ``/`` by a space;
    map ``<person>`` to ``person``; collapse whitespace runs; strip; keep the
    first ``max_words`` words.

    Args:
        caption: raw caption text.
        max_words: number of words kept after cleaning.

    Returns:
        The cleaned caption (may be empty if the input held only punctuation).
    """
    text = _PUNCT_RE.sub("", caption.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _MULTI_SPACE_RE.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    return _truncate_words(text, max_words)


def pre_question(question: str, max_words: int = 50) -> str:
    """Clean a VQA question exactly as the official ALBEF ``pre_question``.

    Lowercase; delete ``,.'!?"()*#:;~``; replace ``-`` and ``/`` by a space;
    strip trailing spaces; keep the first ``max_words`` words.

    Args:
        question: raw question text.
        max_words: number of words kept (30 in training, 50 at test).

    Returns:
        The cleaned question.
    """
    text = _PUNCT_RE.sub("", question.lower())
    text = text.replace("-", " ").replace("/", " ").rstrip(" ")
    return _truncate_words(text, max_words)
