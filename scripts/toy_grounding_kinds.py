"""Toy grounding accuracy per kind of referring expression, from ``Grounding.py``'s per-expression results.

    python scripts/toy_grounding_kinds.py output/toy_grounding/result/grounding_refs.json

Prints a Markdown table: one row per kind of the toy grammar (``dataset.toy_grounding.EXPRESSION_KINDS``), one
column per split (val, testA, testB, then any other), each cell the accuracy in % and the number of expressions;
then all expressions, and those without location words ("the shape at the top", "the star above the red circle"),
which RefCOCO+ does not allow.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.toy_grounding import EXPRESSION_KINDS, LOCATION_KINDS, expression_kind  # noqa: E402

SPLIT_ORDER = ("val", "testA", "testB")  # RefCOCO+'s, as the paper's Table 5


def accuracy_table(items: Iterable[tuple[Sequence[str], str, bool]], order: Sequence[str]
                   ) -> dict[str, dict[str, tuple[float, int]]]:
    """``{group: {split: (accuracy %, n)}}`` of ``(groups, split, correct)`` items (each item counts in every one
    of its groups), for the groups of ``order`` that occur, in that order."""
    tally: dict[str, dict[str, list[int]]] = {}
    for groups, split, correct in items:
        for group in groups:
            counts = tally.setdefault(group, {}).setdefault(split, [0, 0])
            counts[0] += bool(correct)
            counts[1] += 1
    return {group: {split: (100.0 * c / n, n) for split, (c, n) in tally[group].items()}
            for group in order if group in tally}


def accuracy_by_kind(rows: Iterable[dict]) -> dict[str, dict[str, tuple[float, int]]]:
    """``{row name: {split: (accuracy %, n)}}`` for the kinds present, "all" and "without location words".

    ``rows`` are ``grounding_refs.json`` rows (``text``, ``split``, ``correct``).
    """
    def groups(text: str) -> list[str]:
        kind = expression_kind(text)
        return [kind, "all"] + ([] if kind in LOCATION_KINDS else ["without location words"])

    return accuracy_table(((groups(row["text"]), row["split"], row["correct"]) for row in rows),
                          [*EXPRESSION_KINDS, "other", "all", "without location words"])


def markdown_table(table: dict[str, dict[str, tuple[float, int]]], first_column: str = "expressions") -> str:
    """A table of :func:`accuracy_table` as Markdown: columns val, testA, testB (those present), then any other
    split in first-seen order; cells ``acc (n)``; ``first_column`` heads the row names."""
    seen = list(dict.fromkeys(split for cells in table.values() for split in cells))
    splits = [s for s in SPLIT_ORDER if s in seen] + [s for s in seen if s not in SPLIT_ORDER]
    lines = [f"| {first_column} | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for group, cells in table.items():
        shown = [f"{cells[s][0]:.1f} ({cells[s][1]})" if s in cells else "" for s in splits]
        lines.append(f"| {group} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def read_json(parser: argparse.ArgumentParser, path: str, valid: Callable[[Any], bool], expected: str) -> Any:
    """The JSON content of ``path``; an unreadable file, or content that ``valid`` rejects, stops with a usage
    error naming the file (and ``expected``, what it should hold)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        parser.error(f"cannot read {path}: {err}")
    if not valid(data):
        parser.error(f"{path} is not {expected}")
    return data


def _is_refs(data: Any) -> bool:
    return isinstance(data, list) and all(isinstance(r, dict) and {"text", "split", "correct"} <= r.keys()
                                          for r in data)


def main(argv: Sequence[str] | None = None) -> str:
    """Print (and return) the table of one ``grounding_refs.json``; an unreadable file or one that is not a list
    of rows stops with a usage error naming it."""
    parser = argparse.ArgumentParser(description="Toy grounding accuracy per kind of referring expression, from "
                                                 "the grounding_refs.json that Grounding.py writes.")
    parser.add_argument("refs", help="grounding_refs.json written by Grounding.py (output_dir/result/)")
    args = parser.parse_args(argv)
    rows = read_json(parser, args.refs, _is_refs,
                     "a list of rows with text, split and correct (Grounding.py's result/grounding_refs.json)")
    table = markdown_table(accuracy_by_kind(rows))
    print(table)  # the table is the output
    return table


if __name__ == "__main__":
    main()
