"""Toy grounding accuracy per kind of referring expression, from ``Grounding.py``'s per-expression results.

    python scripts/toy_grounding_kinds.py output/toy_grounding/result/grounding_refs.json

Prints a Markdown table: one row per kind of the toy grammar (``dataset.toy_grounding.EXPRESSION_KINDS``), one
column per split, each cell the accuracy in % and the number of expressions; then all expressions, and those
without location words ("the shape at the top", "the star above the red circle"), which RefCOCO+ does not allow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.toy_grounding import EXPRESSION_KINDS, LOCATION_KINDS, expression_kind  # noqa: E402

logger = logging.getLogger("toy_grounding_kinds")


def accuracy_by_kind(rows: Iterable[dict]) -> dict[str, dict[str, tuple[float, int]]]:
    """``{row name: {split: (accuracy %, n)}}`` for the kinds present, "all" and "no location words".

    ``rows`` are ``grounding_refs.json`` rows (``text``, ``split``, ``correct``).
    """
    tally: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        kind = expression_kind(row["text"])
        groups = [kind, "all"] + ([] if kind in LOCATION_KINDS else ["no location words"])
        for group in groups:
            counts = tally.setdefault(group, {}).setdefault(row["split"], [0, 0])
            counts[0] += bool(row["correct"])
            counts[1] += 1
    order = [*EXPRESSION_KINDS, "other", "all", "no location words"]
    return {group: {split: (100.0 * c / n, n) for split, (c, n) in tally[group].items()}
            for group in order if group in tally}


def markdown_table(table: dict[str, dict[str, tuple[float, int]]]) -> str:
    """The table of :func:`accuracy_by_kind` as Markdown, splits in first-seen order, cells ``acc (n)``."""
    splits = list(dict.fromkeys(split for cells in table.values() for split in cells))
    lines = ["| expressions | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for group, cells in table.items():
        shown = [f"{cells[s][0]:.1f} ({cells[s][1]})" if s in cells else "" for s in splits]
        lines.append(f"| {group} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("refs", help="grounding_refs.json written by Grounding.py (output_dir/result/)")
    args = parser.parse_args(argv)
    try:
        rows = json.loads(Path(args.refs).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        parser.error(f"cannot read {args.refs}: {err}")
    table = markdown_table(accuracy_by_kind(rows))
    print(table)  # the table is the output
    return table


if __name__ == "__main__":
    main()
