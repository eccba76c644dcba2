"""scripts/benchmark.py section ``vqa`` at tiny settings: its rows, the generated answer list, the comparison."""

from __future__ import annotations

import json

import pytest
import torch

from scripts import benchmark
from scripts.bench.vqa import CLS, SEP, compare_rankings, make_answer_list

# one intra-op thread for every test of this file (the conftest fixture)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_answer_list_is_cls_words_sep_padding() -> None:
    ids, atts = make_answer_list(500, seed=1)
    lengths = atts.sum(dim=1)
    assert ids.shape == atts.shape == (500, int(lengths.max()))
    assert torch.all(ids[:, 0] == CLS) and torch.all(ids.gather(1, lengths[:, None] - 1) == SEP)
    assert torch.equal(ids == 0, atts == 0)  # padding exactly where the mask is 0
    assert torch.all(atts[:, :-1] >= atts[:, 1:])  # the mask is a prefix
    words = ids[(atts == 1) & (ids != CLS) & (ids != SEP)]
    assert words.min() >= 1000 and words.max() < 30000
    assert lengths.min() == 3 and 3 < lengths.max() <= 8  # 1..6 word pieces, at least one 1-piece answer
    assert torch.equal(make_answer_list(500, seed=1)[0], ids)


def test_compare_rankings() -> None:
    ids = torch.tensor([[2, 0, 1], [1, 3, 0]])
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]])
    assert compare_rankings((ids, probs), (ids, probs), 4) == {
        "identical_answers": True, "identical_rankings": True, "differing_answers": 0, "max_prob_diff": 0.0}
    # question 1: the last two swap (same answers), answer 2's probability moves by 0.05
    other_ids = torch.tensor([[2, 0, 1], [1, 0, 3]])
    other_probs = torch.tensor([[0.55, 0.3, 0.15], [0.7, 0.2, 0.1]])
    row = compare_rankings((ids, probs), (other_ids, other_probs), 4)
    assert row["identical_answers"] and not row["identical_rankings"] and row["differing_answers"] == 0
    assert row["max_prob_diff"] == pytest.approx(0.1)  # answer 3: 0.2 against 0.1
    # a different best answer for question 0; answer 3 absent from the other ranking counts as 0
    row = compare_rankings((ids, probs), (torch.tensor([[0, 2, 1], [1, 0, 2]]), probs), 4)
    assert not row["identical_answers"] and row["differing_answers"] == 1
    assert row["max_prob_diff"] == pytest.approx(0.2)


def test_vqa_section_rows(tmp_path) -> None:
    out = tmp_path / "bench.json"
    flags = "--only vqa --sizes tiny --vqa-questions-tiny 5 --vqa-answers 200 --vqa-k 12 --vqa-rank-batch 2"
    flags += " --vqa-repeats 2 --batch-tiny 3 --steps 2 --warmup 1"
    assert benchmark.main([*flags.split(), "--json", str(out)]) == 0
    rank, step = json.loads(out.read_text())["results"]["vqa"]
    assert list(rank) == [
        "measure", "size", "input", "questions", "answers", "k_test", "rank_batch", "fast_q_per_s", "ref_q_per_s",
        "speedup", "cpu_speedup", "identical_answers", "identical_rankings", "differing_answers", "max_prob_diff",
        "encode_q_per_s", "fast_extra_mb", "ref_extra_mb", "fast_wall_runs_s", "fast_cpu_runs_s",
        "ref_wall_runs_s", "ref_cpu_runs_s"]
    assert (rank["measure"], rank["size"], rank["questions"], rank["answers"], rank["k_test"], rank["rank_batch"]) \
        == ("rank", "tiny", 5, 200, 12, 2)
    assert rank["identical_answers"] is True and rank["identical_rankings"] is True
    assert rank["differing_answers"] == 0 and 0.0 <= rank["max_prob_diff"] < 1e-5
    assert len(rank["fast_wall_runs_s"]) == len(rank["ref_cpu_runs_s"]) == 2
    assert rank["speedup"] == pytest.approx(rank["fast_q_per_s"] / rank["ref_q_per_s"])
    assert min(rank["fast_q_per_s"], rank["ref_q_per_s"], rank["encode_q_per_s"], rank["cpu_speedup"]) > 0
    assert (step["measure"], step["size"], step["batch"], step["precision"]) == ("train_step", "tiny", 3, "fp32")
    assert step["input"].startswith("64px Tq") and " A9xT" in step["input"]  # 3 answers per question
    assert len(step["ours_steps_s"]) == 2 and step["ours_s"] > 0 and step["ours_peak_mb"] > 0
    assert min(step["ours_fwd_s"], step["ours_bwd_s"], step["ours_opt_s"]) > 0
