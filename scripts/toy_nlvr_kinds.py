"""Toy NLVR2 accuracy per kind of statement, from ``NLVR.py``'s per-statement predictions.

    python scripts/toy_nlvr_kinds.py output/toy_nlvr/result/nlvr_predictions.json

Prints a Markdown table: one row per template of the toy statements (``dataset.toy_tasks.NLVR_KINDS``), one column
per split of the file (val, then test), each cell the accuracy in % and the number of statements; then all
statements. A statement outside the toy templates counts as "other".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_grounding_kinds import accuracy_table, markdown_table, read_json  # noqa: E402

from dataset.toy_tasks import NLVR_KINDS, nlvr_statement_kind  # noqa: E402


def accuracy_by_kind(predictions: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, int]]]:
    """``{kind: {split: (accuracy %, n)}}`` for the kinds present and "all"; ``predictions`` is
    ``nlvr_predictions.json`` (``{split: [{sentence, label, prediction, ...}]}``)."""
    items = (([nlvr_statement_kind(row["sentence"]), "all"], split, row["prediction"] == row["label"])
             for split, rows in predictions.items() for row in rows)
    return accuracy_table(items, [*NLVR_KINDS, "other", "all"])


def _is_predictions(data: object) -> bool:
    return isinstance(data, dict) and all(
        isinstance(rows, list) and all(isinstance(r, dict) and {"sentence", "label", "prediction"} <= r.keys()
                                       for r in rows)
        for rows in data.values())


def main(argv: Sequence[str] | None = None) -> str:
    """Print (and return) the table of one ``nlvr_predictions.json``; an unreadable file or one that is not
    ``{split: [rows]}`` stops with a usage error naming it."""
    parser = argparse.ArgumentParser(description="Toy NLVR2 accuracy per kind of statement, from the "
                                                 "nlvr_predictions.json that NLVR.py writes.")
    parser.add_argument("predictions", help="nlvr_predictions.json written by NLVR.py (output_dir/result/)")
    args = parser.parse_args(argv)
    data = read_json(parser, args.predictions, _is_predictions,
                     "{split: [rows with sentence, label and prediction]} (NLVR.py's result/nlvr_predictions.json)")
    table = markdown_table(accuracy_by_kind(data), first_column="statements")
    print(table)  # the table is the output
    return table


if __name__ == "__main__":
    main()
