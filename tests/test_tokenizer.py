"""The bundled bert-base-uncased tokenizer and ALBEF's [CLS]-only convention."""

from __future__ import annotations

from transformers import BertTokenizer

from models.tokenizer import VOCAB_FILE, TextTokenizer


def test_known_ids_without_sep() -> None:
    tok = TextTokenizer()
    assert tok.vocab_size == 30522
    batch = tok(["a large red star"], max_length=25)
    assert batch.input_ids.tolist() == [[101, 1037, 2312, 2417, 2732]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1]]


def test_padding_and_truncation() -> None:
    tok = TextTokenizer()
    batch = tok(["a large red star", "two"], max_length=4)
    assert batch.input_ids.tolist() == [[101, 1037, 2312, 2417], [101, 2048, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    fixed = tok(["two"], max_length=6, padding="max_length")
    assert fixed.input_ids.tolist() == [[101, 2048, 0, 0, 0, 0]]


def test_matches_the_reference_wordpiece_tokenizer() -> None:
    slow = BertTokenizer(vocab=VOCAB_FILE)
    tok = TextTokenizer()
    texts = ["Café déjà vu: naïve résumé!", "unaffable 3D-printed widgets", "日本語 text", "x" * 60]
    for text in texts:
        ids = tok([text], max_length=64).input_ids[0].tolist()
        assert ids == slow(text)["input_ids"][:-1]  # the same pieces, without [SEP]
