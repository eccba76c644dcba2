"""The most-frequent-answer baseline of a VQA config, per question type: what answering every question with its
type's most frequent training answer scores on the test (or val) split.

Usage (from the repository root)::

    python scripts/vqa_type_baseline.py --config configs/toy/VQA.yaml [--split val]

A training question's answer is its annotators' most frequent one (``dataset.vqa_dataset.answer_weights``, ties
by first occurrence); a question's types are the config's ``question_types`` rules that match it
(``dataset.vqa_eval.question_types``), and the ``all`` row answers each question with the answer of its first
matching type. A test answer counts when it equals the ground truth (``<split>_answers_file`` or the items'
``answer``; for a list of annotator answers, its most frequent one) exactly. Prints one row per type.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dataset.validate import load_annotations, read_json  # noqa: E402
from dataset.vqa_dataset import VQA_TEST_SCHEMA, VQA_TRAIN_SCHEMA, answer_weights  # noqa: E402
from dataset.vqa_eval import question_types  # noqa: E402


def _top(answers: list[str], weights: list[float]) -> str:
    return answers[max(range(len(answers)), key=weights.__getitem__)]


def type_baseline(config: dict, split: str = "test") -> dict[str, tuple[int, str, float]]:
    """``{type: (questions, most frequent training answer, % of them it answers right)}`` plus an ``all`` row."""
    rules = [tuple(rule) for rule in config["question_types"]]
    counts: dict[str, Counter] = defaultdict(Counter)
    for path in config["train_file"]:
        for i, item in enumerate(load_annotations(path, VQA_TRAIN_SCHEMA, text_keys=())):
            answer = _top(*answer_weights(item, f"{path}, item {i}"))
            for name in question_types(item["question"], rules):
                counts[name][answer] += 1
    best = {name: counter.most_common(1)[0][0] for name, counter in counts.items()}
    truth_file = config.get(f"{split}_answers_file") or ""
    truth = read_json(truth_file) if truth_file else {}
    total: Counter = Counter()
    right: Counter = Counter()
    for path in config[f"{split}_file"]:
        for item in load_annotations(path, VQA_TEST_SCHEMA, text_keys=()):
            gold = truth.get(str(item["question_id"]), item.get("answer"))
            if isinstance(gold, list):
                gold = Counter(gold).most_common(1)[0][0]
            names = [n for n in question_types(item["question"], rules) if n in best]
            for name in names + (["all"] if names else []):
                guess = best[names[0] if name == "all" else name]
                total[name] += 1
                right[name] += guess == gold
    return {name: (total[name], best.get(name, ""), 100 * right[name] / total[name]) for name in total}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a VQA config (VQA.py's keys)")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    args = parser.parse_args(argv)
    from engine.config import load_config
    from VQA import DEFAULTS

    config = load_config(args.config, DEFAULTS)
    rows = type_baseline(config, args.split)
    print(f"{'type':<12} {'n':>5}  {'answer':<10} {'rate %':>7}")
    for name, (n, answer, rate) in sorted(rows.items(), key=lambda kv: (kv[0] != "all", kv[0])):
        print(f"{name:<12} {n:>5}  {answer:<10} {rate:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
