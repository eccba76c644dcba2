"""scripts/benchmark.py sections ``ve`` and ``nlvr`` at tiny size: their rows and keys, and the texts they feed."""

from __future__ import annotations

import json

import pytest
import torch

from scripts import benchmark
from scripts.bench.ve_nlvr import TEXT_TOKENS, make_texts

STEP_KEYS = ["measure", "task", "size", "batch", "input", "ours_s", "ours_fwd_s", "ours_bwd_s", "ours_opt_s",
             "ours_peak_mb", "ours_min_s", "ours_cpu_s", "ours_process_peak_mb", "ours_steps_s", "ours_cpu_steps_s",
             "precision", "examples_per_s"]
INFERENCE_KEYS = ["measure", "task", "size", "batch", "input", "s_per_batch", "examples_per_s", "peak_mb",
                  "precision", "cpu_s_per_batch", "steps_s", "cpu_steps_s"]


# one intra-op thread for every test of this file (the conftest fixture)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_texts_are_cls_words_padding_within_the_task_lengths() -> None:
    ids, mask = make_texts(50, "nlvr", 64, seed=3)
    lengths = mask.sum(dim=1)
    assert ids.shape == mask.shape == (50, int(lengths.max()))
    assert lengths.min() >= TEXT_TOKENS["nlvr"][0] and lengths.max() <= TEXT_TOKENS["nlvr"][1]
    assert torch.all(ids[:, 0] == 101) and torch.equal(ids == 0, mask == 0)
    assert make_texts(50, "ve", 8, seed=3)[1].sum(dim=1).max() <= 8  # capped at the config's max_tokens


def test_ve_and_nlvr_section_rows(tmp_path) -> None:
    out = tmp_path / "bench.json"
    flags = "--only ve,nlvr --sizes tiny --batch-tiny 2 --steps 1 --warmup 0"
    assert benchmark.main([*flags.split(), "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    rows = results["ve"] + results["nlvr"]
    assert [(r["measure"], r["task"], r["size"], r["batch"]) for r in rows] == [
        ("inference", "ve", "tiny", 2), ("train_step", "ve", "tiny", 2),
        ("inference", "nlvr", "tiny", 2), ("train_step", "nlvr", "tiny", 2),
        ("ta_step", "nlvr", "tiny", 3)]  # text assignment needs 3 images per batch
    for row in rows:
        assert list(row) == (INFERENCE_KEYS if row["measure"] == "inference" else STEP_KEYS)
        assert row["precision"] == "fp32" and row["examples_per_s"] > 0
    assert [r["input"].split(" T")[0] for r in rows] == ["64px 1img", "64px 1img", "64px 2img", "64px 2img",
                                                         "64px 1img"]
    for row in rows:
        if row["measure"] == "inference":
            assert row["examples_per_s"] == pytest.approx(2 / row["s_per_batch"])
            assert len(row["steps_s"]) == 1 and row["cpu_s_per_batch"] > 0 and row["peak_mb"] > 0
        else:
            assert row["examples_per_s"] == pytest.approx(row["batch"] / row["ours_s"])
            assert len(row["ours_steps_s"]) == 1 and min(row["ours_fwd_s"], row["ours_bwd_s"], row["ours_opt_s"]) > 0
