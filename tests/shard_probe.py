"""Run ``Pretrain.main`` recording the samples and losses of every training step (tests/test_shards.py).

    python -m torch.distributed.run --nproc_per_node=2 tests/shard_probe.py RECORD Pretrain.py-arguments...

Each rank writes ``RECORD.rank{r}.json``: one entry per step, ``{"step": global step, "keys": [sample keys],
"losses": {name: this rank's value}}``. The loader is ``build_pretrain_loader`` with ``return_keys=True``: shard
samples carry their tar key (JSON-only ``train_file`` gives the JSON loader, whose batches carry no keys: ``[]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import dataset  # noqa: E402
import Pretrain  # noqa: E402
from engine import trainer  # noqa: E402


@contextlib.contextmanager
def recording(records: list[dict]) -> Iterator[None]:
    """Within: ``Pretrain.main`` loads with sample keys and appends one record per step to ``records``."""
    build_loader, make_step_fn = dataset.build_pretrain_loader, Pretrain.make_step_fn

    def with_keys(*args: object, **kwargs: object) -> object:
        return build_loader(*args, **{**kwargs, "return_keys": True})

    def make(tokenizer: object, config: dict, device: torch.device) -> Callable:
        step = make_step_fn(tokenizer, config, device)

        def probed(model: torch.nn.Module, batch: tuple, alpha: float, global_step: int) -> dict:
            image, captions, *keys = batch  # keys: [] from the JSON loader
            losses = step(model, (image, captions), alpha, global_step)
            records.append({"step": global_step, "keys": list(keys[0]) if keys else [],
                            "losses": {k: float(v.detach()) for k, v in losses.items()}})
            return losses

        return probed

    dataset.build_pretrain_loader, Pretrain.make_step_fn = with_keys, make
    try:
        yield
    finally:
        dataset.build_pretrain_loader, Pretrain.make_step_fn = build_loader, make_step_fn


def main(argv: list[str]) -> int:
    """``argv``: the record path, then Pretrain.py's arguments; returns Pretrain's exit code."""
    records: list[dict] = []
    rank = int(os.environ.get("RANK", "0"))  # read before run_main tears the process group down
    with recording(records):
        code = trainer.run_main(lambda: Pretrain.main(argv[1:]))
    with open(f"{argv[0]}.rank{rank}.json", "w", encoding="utf-8") as f:
        json.dump(records, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
