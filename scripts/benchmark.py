"""Benchmarks of the ALBEF reimplementation: training-step time and memory, data-pipeline throughput.

Usage (from the repository root)::

    python scripts/benchmark.py --device cpu --threads 2 --sizes tiny,full --json bench.json
    python scripts/benchmark.py --device cuda --batch-full 64 --batch-tiny 256
    python scripts/benchmark.py --only data_pipeline
    python scripts/benchmark.py --only retrieval_eval,retrieval_step --sizes tiny

Sections (``--only``; each is a module of ``scripts/bench/`` whose docstring says what it measures):

- ``pretrain_step``: a full pre-training step (forward + backward + AdamW, momentum update) of OUR
  ``ALBEFPretrain`` against the official algorithm (``scripts/reference_step.py``) on the same model,
  interleaved step by step; medians, ratio, phases, peak memory, the image-encoder floor.
- ``data_pipeline``: decode + pre-training augmentation in one process, per source JPEG size; the
  pre-training loader's images/s from JSON + image files against WebDataset shards of the same images; one
  rank's dataset memory for a ``--memory-items`` JSON against shards.
- ``retrieval_eval``: ITM pairs reranked per second, batched evaluator against the official per-query loop,
  and whether their rankings are identical.
- ``retrieval_step``: a retrieval fine-tuning step (``ALBEFRetrieval``).

On CUDA ours runs under bf16 autocast with fused AdamW; the reference runs in fp32 with a plain AdamW
(as the official code); step times come from CUDA events.

This driver owns what every section shares: the flags they all read (``--device``, ``--sizes``,
``--batch-*``, ``--steps``, ``--warmup``, ``--alpha``, ``--seed``, ``--threads``), the environment header,
one table per section on stdout and the JSON file ``{"environment": {...}, "results": {section: [rows]}}``.

Adding a section (a new task's, say ``vqa``) adds a file, not lines here:

1. ``scripts/bench/vqa.py`` with ``run(args) -> list[Row]`` (one dict per table row; list and dict values,
   and keys ending in :data:`JSON_ONLY`, go to the JSON only), optionally ``add_args(parser)`` for its own
   flags and ``check(args)`` returning an error message or None, and
   ``SECTION = Section(run=run, add_args=add_args, check=check)`` (``scripts.bench.common.Section``);
2. one line ``"vqa": vqa.SECTION`` in ``SECTIONS`` of ``scripts/bench/__init__.py``.

Shared parts to build on: ``scripts.bench.common`` (``Section``, ``Row``, ``seed_everything``, peak
memory), ``scripts.bench.inputs`` (the ``--sizes`` model configs, random images and captions, the retrieval
configs), ``scripts.bench.step_timing`` (interleaved step timing and its ``ours_*``/``ref_*`` row).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from scripts.bench import SECTIONS  # noqa: E402
from scripts.bench.common import Row, logger  # noqa: E402
from scripts.bench.inputs import SIZES  # noqa: E402


def environment(args: argparse.Namespace) -> Row:
    """Versions, threads and hardware of this run."""
    import timm
    import transformers

    env: Row = {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "platform": platform.platform(),
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": args.device,
                "seed": args.seed, "steps": args.steps, "warmup": args.warmup, "alpha": args.alpha,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


# fields left to the JSON (besides lists)
JSON_ONLY = ("_min_s", "_cpu_s", "_process_peak_mb")


def format_table(name: str, rows: list[Row]) -> str:
    """A plain-text table of the scalar fields of ``rows`` (lists and :data:`JSON_ONLY` go to the JSON); the
    columns are every row's fields in order of first appearance, blank where a row lacks one."""
    fields = {k: v for row in reversed(rows) for k, v in row.items()}  # a value of each field
    columns = [k for k in dict.fromkeys(k for row in rows for k in row)
               if not isinstance(fields[k], (list, dict)) and not k.endswith(JSON_ONLY)]
    cells = [columns] + [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    rule = "-" * len(lines[0])
    return "\n".join([f"== {name}", lines[0], rule, *lines[1:]]) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The shared flags, then each section's own (:data:`scripts.bench.SECTIONS` order)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--sizes", default="tiny,full", help="comma-separated subset of " + ",".join(SIZES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-full", type=int, default=4)
    parser.add_argument("--batch-tiny", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.4, help="momentum-distillation weight")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    for section in SECTIONS.values():
        section.add_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; every section checks its own flags, whichever run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    args.sizes = [n.strip() for n in args.sizes.split(",") if n.strip()]
    for value, known, flag in ((args.only, SECTIONS, "--only"), (args.sizes, SIZES, "--sizes")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; known: {list(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1, --warmup >= 0")
    for section in SECTIONS.values():
        message = section.check(args)
        if message:
            parser.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks, print their tables, write the JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args)
    logger.info("environment: %s", json.dumps(env))
    results = {name: SECTIONS[name].run(args) for name in args.only}
    header = ", ".join(f"{k} {env[k]}" for k in ("torch", "timm", "transformers", "torch_threads", "device"))
    sys.stdout.write(f"# {header}\n")
    for name, rows in results.items():
        if rows:
            sys.stdout.write(format_table(name, rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
