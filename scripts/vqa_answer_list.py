"""Build a VQA answer list: the N most frequent answers of training files, as a JSON list of strings.

Usage (from the repository root)::

    python scripts/vqa_answer_list.py data/vqa_train.json data/vqa_val.json --top 3128 --out data/answer_list.json

An answer's frequency is the number of training questions whose annotators gave it (each distinct answer counts
once per question: a 'vqa' item's list, a 'vg' item's string). Ties are broken alphabetically, so the list is
the same for the same files. ``--min-count`` drops rarer answers. The files are read and validated as the
training set is (``dataset.vqa_dataset``); the answers are kept as written, without normalisation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dataset.validate import DataError, load_annotations  # noqa: E402
from dataset.vqa_dataset import VQA_TRAIN_SCHEMA, answer_weights  # noqa: E402

logger = logging.getLogger("vqa_answer_list")


def answer_counts(paths: Sequence[str]) -> Counter:
    """Answer -> number of training questions that have it among their annotators' answers."""
    counts: Counter = Counter()
    for path in paths:
        for i, item in enumerate(load_annotations(path, VQA_TRAIN_SCHEMA, text_keys=())):
            answers, _ = answer_weights(item, f"{path}, item {i}")
            counts.update(answers)
    return counts


def most_frequent(counts: Counter, top: int, min_count: int = 1) -> list[str]:
    """The ``top`` most frequent answers with at least ``min_count`` questions; ties alphabetical."""
    ranked = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    return ranked[:top]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_files", nargs="+", help="training JSON files of {image, question, answer, dataset}")
    parser.add_argument("--top", type=int, default=3128, help="answers kept (3,128 in the official list)")
    parser.add_argument("--min-count", type=int, default=1, help="drop answers of fewer questions")
    parser.add_argument("--out", required=True, help="the JSON answer list to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.top < 1:
        parser.error("--top must be >= 1")
    try:
        counts = answer_counts(args.train_files)
    except DataError as exc:
        logger.error("%s", exc)
        return 1
    answers = most_frequent(counts, args.top, args.min_count)
    if not answers:
        logger.error("no answer has %d or more questions in %s", args.min_count, ", ".join(args.train_files))
        return 1
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(answers, f)
    covered = sum(counts[a] for a in answers) / max(sum(counts.values()), 1)
    logger.info("wrote %s: %d of %d distinct answers (%.1f%% of the (question, answer) pairs)", args.out,
                len(answers), len(counts), 100 * covered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
