"""Engine pieces every task shares: evaluation sharding that sees each example once, uneven gathers, the
named score of ``fit``, and the layering rule (``models/`` imports nothing above it)."""

from __future__ import annotations

import ast
import os

import pytest
import torch
import torch.multiprocessing as mp

from engine import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shard_range_covers_every_item_once() -> None:
    for n in (0, 1, 7, 12, 13):
        for world in (1, 2, 3, 5):
            shares = [distributed.shard_range(n, r, world) for r in range(world)]
            items = [i for a, b in shares for i in range(a, b)]
            assert items == list(range(n))
            sizes = [b - a for a, b in shares]
            assert max(sizes) - min(sizes) <= 1
    assert distributed.shard_range(10) == (0, 10)  # one process: everything


def test_single_process_helpers_are_identities() -> None:
    t = torch.arange(6.0).view(3, 2)
    assert torch.equal(distributed.all_gather_uneven(t), t)
    assert torch.equal(distributed.gather_rows(t, 3), t)
    assert distributed.gather_objects([{"id": 1}]) == [{"id": 1}]
    assert list(distributed.shard_dataset(list("abc"))) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="gathered 3 rows from 1 rank"):
        distributed.gather_rows(t, 4)


def _gather_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = [f"item{i}" for i in range(7)]  # 7 items on 2 ranks: shares of 3 and 4, none padded
        share = distributed.shard_dataset(data)
        rows = torch.tensor([[int(item[4:]), rank] for item in share])  # (rows_r, 2)
        gathered = distributed.gather_rows(rows, len(data))
        objects = distributed.gather_objects([{"id": item, "rank": rank} for item in share])
        uneven = distributed.all_gather_uneven(torch.full((rank + 2, 3), float(rank)))  # 2 and 3 rows
        torch.save((gathered, objects, uneven), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_gather_each_example_once(tmp_path) -> None:
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    for rank in range(2):
        gathered, objects, uneven = torch.load(tmp_path / f"out.{rank}")
        assert gathered[:, 0].tolist() == list(range(7))  # every item once, in order
        assert gathered[:, 1].tolist() == [0, 0, 0, 1, 1, 1, 1]  # rank 0 holds items 0-2, rank 1 items 3-6
        assert [o["id"] for o in objects] == [f"item{i}" for i in range(7)]
        assert uneven.shape == (5, 3) and uneven[:2].eq(0).all() and uneven[2:].eq(1).all()


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_models_import_nothing_above_them() -> None:
    """``models/`` may use ``engine.distributed`` (the low-level collectives) and nothing else of the engine,
    no entry script and not ``utils``."""
    scripts = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    allowed = {"engine", "engine.distributed"}
    for name in sorted(os.listdir(os.path.join(ROOT, "models"))):
        if not name.endswith(".py"):
            continue
        found = _imports(os.path.join(ROOT, "models", name))
        bad = sorted(m for m in found if m.split(".")[0] in scripts
                     or (m.startswith("engine") and m not in allowed))
        assert not bad, f"models/{name} imports {bad}"
