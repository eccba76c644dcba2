"""Shared infrastructure for the ALBEF task scripts, in the order data flows through a run.

Sections: 1. config (YAML against a schema, ``--override``, common CLI flags); 2. distributed (collectives that
are no-ops in one process); 3. logging & metrics; 4. checkpoint files (atomic, rotated, resumable); 5. seeding
and RNG state; 6. the generic ``train_one_epoch`` loop shared by every task.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import logging
import math
import os
import random
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from tqdm import tqdm

logger = logging.getLogger(__name__)

# ---- 1. Config ----


class ConfigError(ValueError):
    """A config file or ``--override`` is unreadable, has an unknown key, or a value of the wrong type."""


def _yaml() -> YAML:
    return YAML(typ="safe", pure=True)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Return ``value`` checked (and, for floats, converted) against the type of ``default``."""
    if default is None:
        return value
    expected = type(default)
    ok = isinstance(value, expected)
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                ok = False
    if not ok:
        raise ConfigError(
            f"{source}: key '{key}' expects {expected.__name__}, found {_type_name(value)} ({value!r})"
        )
    return value


def _unknown_key(key: str, known: Iterable[str], source: str) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _merge(target: dict, values: Any, schema: dict, source: str, prefix: str = "") -> None:
    """Validate ``values`` against ``schema`` and write them into ``target`` (recursively for dicts).

    An empty dict in the schema accepts any mapping unvalidated.
    """
    if not isinstance(values, dict):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: '{where}' must be a mapping, found {_type_name(values)}")
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise _unknown_key(dotted, schema.keys(), source)
        default = schema[key]
        if isinstance(default, dict) and default:
            if not isinstance(target.get(key), dict):
                target[key] = copy.deepcopy(default)
            _merge(target[key], value, default, source, prefix=f"{dotted}.")
        else:
            target[key] = _coerce(value, default, dotted, source)


def _apply_override(config: dict, schema: dict, override: str) -> None:
    source = f"--override {override!r}"
    if "=" not in override:
        raise ConfigError(f"{source}: expected key=value")
    key, raw = override.split("=", 1)
    try:
        value = _yaml().load(raw)
    except YAMLError as exc:
        raise ConfigError(f"{source}: value is not valid YAML ({exc})") from exc
    *parents, leaf = key.strip().split(".")
    for depth, part in enumerate(parents):
        dotted = ".".join(parents[: depth + 1])
        if part not in schema:
            raise _unknown_key(dotted, schema.keys(), source)
        if not isinstance(schema[part], dict):
            raise ConfigError(f"{source}: '{dotted}' is not a section")
        schema = schema[part]
        config = config.setdefault(part, {})
    prefix = ".".join(parents) + "." if parents else ""
    _merge(config, {leaf: value}, schema, source, prefix=prefix)


def load_config(path: str, defaults: dict, overrides: list[str] | None = None) -> dict:
    """Load the YAML config at ``path``, validated against ``defaults``, then apply ``overrides``.

    ``defaults`` lists every allowed key with its default value; nested dicts (``optimizer``, ``schedular``) are
    validated recursively. A default of ``None`` accepts any value; ints are accepted for floats, and so are
    strings that parse as floats. ``overrides`` are ``key=value`` strings, dotted for nested keys, with the value
    parsed as YAML (``schedular.epochs=2``, ``train_file=[a.json,b.json]``). Raises ``ConfigError``.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = _yaml().load(f)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line}: YAML syntax error: {exc.problem or exc}") from exc
    except YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from exc
    config = copy.deepcopy(defaults)
    _merge(config, {} if data is None else data, defaults, path)
    for override in overrides or []:
        _apply_override(config, defaults, override)
    return config


def save_config(config: dict, path: str) -> None:
    """Write ``config`` as block-style YAML to ``path``."""
    yaml = _yaml()
    yaml.default_flow_style = False
    with open(path, "w", encoding="utf-8") as f:
        yaml.dump(config, f)


class _BoolFlag(argparse.Action):
    """``--flag`` / ``--flag true|false`` / ``--no-flag``: a real boolean (the official ``type=bool`` made
    ``--distributed False`` true)."""

    _TRUE: ClassVar[frozenset[str]] = frozenset({"1", "true", "yes", "on"})
    _FALSE: ClassVar[frozenset[str]] = frozenset({"0", "false", "no", "off"})

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        negated = [f"--no-{s[2:]}" for s in option_strings if s.startswith("--")]
        super().__init__(option_strings + negated, dest, nargs="?", metavar="BOOL", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string is not None and option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
            return
        text = "true" if values is None else str(values).lower()
        if text not in self._TRUE | self._FALSE:
            parser.error(f"{option_string}: expected true or false, got {values!r}")
        setattr(namespace, self.dest, text in self._TRUE)


def get_parser(description: str) -> argparse.ArgumentParser:
    """Return a parser with the flags every official ALBEF script takes; scripts add their own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--checkpoint", default="", help="weights to initialise from")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume training: alone = newest checkpoint in output_dir, or a checkpoint path")
    p.add_argument("--evaluate", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--text_encoder", default="bert-base-uncased")
    p.add_argument("--world_size", type=int, default=1)
    p.add_argument("--dist_url", default="env://")
    p.add_argument("--distributed", action=_BoolFlag, default=None,
                   help="true/false (or --no-distributed); default: auto-detect from RANK/WORLD_SIZE")
    p.add_argument("--override", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, dotted keys for nested values, YAML values; repeatable")
    return p


# ---- 2. Distributed (every helper is a no-op / identity without an initialised process group) ----


def is_dist_initialized() -> bool:
    """True when a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 in a single process."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 in a single process."""
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all ranks; nothing in a single process."""
    if is_dist_initialized():
        dist.barrier()


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK.

    Sets ``args.rank``, ``args.world_size``, ``args.gpu`` and ``args.distributed``. ``args.distributed`` False
    forces a single process; None auto-detects from the environment.
    """
    wanted = getattr(args, "distributed", None)
    in_env = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if wanted is True and not in_env:
        logger.warning("--distributed given but RANK/WORLD_SIZE are not set: running a single process")
    if wanted is False or not in_env:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        return
    args.rank = int(os.environ["RANK"])
    args.world_size = int(os.environ["WORLD_SIZE"])
    args.gpu = int(os.environ.get("LOCAL_RANK", "0"))
    args.distributed = True
    use_cuda = str(getattr(args, "device", "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    backend = "nccl" if use_cuda else "gloo"
    logger.info("distributed init: rank %d/%d, backend %s, %s", args.rank, args.world_size, backend, args.dist_url)
    dist.init_process_group(backend=backend, init_method=getattr(args, "dist_url", "env://"),
                            world_size=args.world_size, rank=args.rank)
    barrier()


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) along dim 0 across ranks, without gradient.

    Returns ``t.detach()`` in a single process.
    """
    if get_world_size() == 1:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor); ``t`` itself in a single process."""
    if get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (pickled); ``obj`` in a single process."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _collective_device() -> torch.device:
    """Device on which the active backend can reduce tensors (NCCL needs CUDA)."""
    if is_dist_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- 3. Logging & metrics ----


def setup_logging(output_dir: str | None, rank: int) -> None:
    """Rank 0 logs INFO to stderr and ``output_dir/train.log``; other ranks log WARNING and above to stderr.

    Calling it again replaces the handlers it installed before.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_albef", False)]:
        root.removeHandler(handler)
        handler.close()
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0 and output_dir:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "train.log")))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._albef = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


class MetricAccumulator:
    """Running sums of scalar metrics, kept as tensors on their device so ``update`` never syncs with the host.

    Every rank must update the same set of names before ``averages``.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = {}

    def update(self, **values: torch.Tensor | float) -> None:
        """Add one observation per name (tensors are detached and summed in float32)."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().sum()
            self._sums[name] = self._sums.get(name, 0.0) + value
            self._counts[name] = self._counts.get(name, 0) + 1

    def _stacked(self, device: torch.device) -> tuple[list[str], torch.Tensor]:
        names = sorted(self._sums)
        rows = [torch.as_tensor(self._sums[n], dtype=torch.float32).to(device) for n in names]
        counts = torch.tensor([float(self._counts[n]) for n in names], device=device)
        sums = torch.stack(rows) if rows else torch.zeros(0, device=device)
        return names, torch.stack([sums, counts])

    def averages(self, all_ranks: bool = True) -> dict[str, float]:
        """Means over all updates, on all ranks (one all-reduce) or this rank only; one host sync."""
        reduce = all_ranks and get_world_size() > 1
        names, table = self._stacked(_collective_device() if reduce else torch.device("cpu"))
        if reduce:
            dist.all_reduce(table, op=dist.ReduceOp.SUM)
        return {n: s / c for n, s, c in zip(names, *table.tolist())}


def append_jsonl(path: str, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (rank 0 only), flushed and fsynced."""
    if not is_main_process():
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- 4. Checkpoint files ----

_CKPT_RE = re.compile(r"^checkpoint_(\d+)(?:_(\d+))?\.pth$")
REQUIRED_CHECKPOINT_KEYS = ("model", "epoch")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or incomplete."""


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """``checkpoint_{epoch:02d}.pth`` at epoch end, ``checkpoint_{epoch:02d}_{step:06d}.pth`` mid-epoch."""
    return f"checkpoint_{epoch:02d}.pth" if step is None else f"checkpoint_{epoch:02d}_{step:06d}.pth"


def list_checkpoints(output_dir: str) -> list[str]:
    """Paths of ``checkpoint_*`` files in ``output_dir``, newest (epoch, step) first; epoch-end files rank after
    mid-epoch files of the same epoch. ``checkpoint_best.pth`` is not listed."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CKPT_RE.match(name)
        if match:
            step = math.inf if match.group(2) is None else int(match.group(2))
            found.append(((int(match.group(1)), step), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def save_checkpoint(state: dict, output_dir: str, name: str, keep_last: int = 2) -> str:
    """Atomically write ``state`` to ``output_dir/name`` (rank 0 only) and return the path.

    The file is written to ``name.tmp``, fsynced, then renamed. Afterwards only the newest ``keep_last``
    ``checkpoint_*.pth`` files are kept (``keep_last <= 0`` keeps all; ``checkpoint_best.pth`` is never deleted).
    """
    path = os.path.join(output_dir, name)
    if not is_main_process():
        return path
    os.makedirs(output_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[keep_last:]:
            logger.info("removing old checkpoint %s", old)
            os.remove(old)
    return path


def load_checkpoint_file(path: str, weights_only: bool = True) -> dict:
    """``torch.load`` a checkpoint onto the CPU, raising ``CheckpointError`` naming ``path`` on failure.

    ``weights_only=False`` unpickles arbitrary objects: use it only for files you trust.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # truncated zip, pickle errors, ...: all mean "unreadable"
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {_type_name(state)}, expected a dict")
    return state


def load_latest_checkpoint(output_dir: str) -> tuple[dict, str] | None:
    """The newest readable checkpoint in ``output_dir`` with keys 'model' and 'epoch', and its path.

    Unreadable or incomplete files are skipped with a warning; None when nothing usable exists.
    """
    for path in list_checkpoints(output_dir):
        try:
            state = load_checkpoint_file(path)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint: %s", exc)
            continue
        missing = [k for k in REQUIRED_CHECKPOINT_KEYS if k not in state]
        if missing:
            logger.warning("skipping checkpoint %s: missing keys %s", path, missing)
            continue
        return state, path
    return None


# ---- 5. Seeding and RNG state ----


def set_seed(seed: int) -> None:
    """Seed torch (CPU and CUDA), ``random`` and numpy with ``seed + rank``."""
    seed = seed + get_rank()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def get_rng_state() -> dict:
    """RNG states of python ``random``, numpy, torch CPU and CUDA (None without CUDA).

    Only plain types and tensors, so it loads with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore states saved by ``get_rng_state``; absent entries (or CUDA without CUDA) are left alone."""
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---- 6. Training loop ----

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_warned_cpu_amp = False


class SkippedImagesError(RuntimeError):
    """More unreadable images were skipped than ``max_skipped_images`` allows."""


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or inf."""

    def __init__(self, epoch: int, step: int, terms: list[str]) -> None:
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}: {', '.join(terms)}")
        self.epoch, self.step, self.terms = epoch, step, terms


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, None for fp32 (AMP is ignored off CUDA, with one warning)."""
    global _warned_cpu_amp
    if amp not in ("off", *_AMP_DTYPES):
        raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {amp!r}")
    if amp == "off":
        return None
    if device.type != "cuda":
        if not _warned_cpu_amp:
            logger.warning("amp=%s ignored on device %s: training in fp32", amp, device)
            _warned_cpu_amp = True
        return None
    return _AMP_DTYPES[amp]


def _unpack_batch(batch: Any, counter: dict, max_skipped: int, epoch: int, step: int) -> Any:
    """Strip the trailing dropped-sample count (counted in ``counter['skipped']``); None for an empty batch."""
    if batch is None:
        return None
    dropped = int(batch[-1])
    if dropped:
        counter["skipped"] += dropped
        if 0 <= max_skipped < counter["skipped"]:
            raise SkippedImagesError(
                f"{counter['skipped']} unreadable samples dropped so far (epoch {epoch}, step {step}), "
                f"more than max_skipped={max_skipped}; check the image paths in the annotation files"
            )
    return batch[:-1] or None  # () when every sample of the batch was unreadable


def _total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    terms = [v for k, v in losses.items() if k.startswith("loss")]
    if not terms:
        raise ValueError(f"step_fn returned no 'loss*' entries: {sorted(losses)}")
    total = terms[0].float().sum()
    for term in terms[1:]:
        total = total + term.float().sum()
    return total


def _backward_step(total: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: Any, grad_clip: float) -> None:
    """backward, optional gradient clipping, optimizer step and zero_grad; ``scaler`` for fp16 or None."""
    if scaler is not None:
        scaler.scale(total).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(model: torch.nn.Module, loader: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    epoch: int, step_fn: Callable[[torch.nn.Module, Any, float, int], dict[str, torch.Tensor]], *,
                    device: torch.device, alpha: float, warm_up: bool, amp: str = "off", scaler: Any = None,
                    grad_clip: float = 0.0, start_step: int = 0,
                    on_step: Callable[[int, int], None] | None = None, nonfinite: str = "stop",
                    max_skipped: int = -1, skip_counter: dict | None = None,
                    log_every: int = 50) -> dict[str, float]:
    """Train ``model`` for one epoch (from iteration ``start_step``) and return the mean losses and 'lr'.

    A resumed loader already skips the first ``start_step`` batches: the epoch has ``start_step + len(loader)``.
    Each batch is a tuple whose last element counts dropped samples, or None.
    ``step_fn(model, batch[:-1], alpha_i, global_step)`` (``global_step = epoch * steps_per_epoch + i``)
    returns named scalar tensors; those whose key starts with 'loss' are summed into the total, the rest
    are only averaged. alpha ramps as ``alpha * min(1, i / len(loader))`` in epoch 0 when ``warm_up``.
    A non-finite total raises ``NonFiniteLossError`` (``nonfinite='stop'``) or skips the update
    (``'skip'``, counted in ``skip_counter['nonfinite']``). ``on_step(epoch, i + 1)`` runs after every
    iteration.
    """
    if nonfinite not in ("stop", "skip"):
        raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
    device = torch.device(device)
    dtype = _autocast_dtype(amp, device)
    if dtype is torch.float16 and scaler is None:
        raise ValueError("amp='fp16' needs a torch.amp.GradScaler (scaler=...)")
    scaler = scaler if dtype is torch.float16 else None
    counter = skip_counter if skip_counter is not None else {}
    counter.setdefault("skipped", 0)
    counter.setdefault("nonfinite", 0)
    num_steps = start_step + len(loader)  # a resumed loader yields only the remaining batches
    metrics = MetricAccumulator()
    model.train()
    # to a terminal: live; to a file (nohup, a cluster job's log): one line a minute, not ten a second
    interval = 0.1 if sys.stderr.isatty() else 60.0
    with tqdm(total=num_steps, initial=start_step, desc=f"epoch {epoch}", dynamic_ncols=True, mininterval=interval,
              disable=not is_main_process()) as bar:
        for i, batch in enumerate(loader, start=start_step):
            batch = _unpack_batch(batch, counter, max_skipped, epoch, i)
            if batch is not None:
                alpha_i = alpha * min(1.0, i / num_steps) if epoch == 0 and warm_up else alpha
                lr = scheduler.step(epoch, i)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    losses = step_fn(model, batch, alpha_i, epoch * num_steps + i)
                total = _total_loss(losses)
                if _all_finite(total):
                    _backward_step(total, model, optimizer, scaler, grad_clip)
                    metrics.update(**losses, lr=lr)
                else:
                    _handle_nonfinite(losses, optimizer, nonfinite, counter, epoch, i)
            bar.update(1)
            if log_every > 0 and (i + 1) % log_every == 0 and not bar.disable:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.averages(all_ranks=False).items()})
            if on_step is not None:
                on_step(epoch, i + 1)
    return metrics.averages()


def _all_finite(total: torch.Tensor) -> bool:
    """Whether ``total`` is finite on every rank (one host sync per step: correctness before speed). Ranks
    must agree, or a rank that skips backward would leave the others waiting in DDP's gradient all-reduce."""
    finite = torch.isfinite(total.detach()).float()
    if get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _handle_nonfinite(losses: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, mode: str,
                      counter: dict, epoch: int, step: int) -> None:
    """Raise ``NonFiniteLossError`` naming the bad terms ('stop'), or drop this step's gradients ('skip')."""
    terms = [k for k, v in losses.items() if k.startswith("loss") and not bool(torch.isfinite(v).all())]
    terms = terms or ["total"]  # e.g. the bad value was on another rank
    if mode == "stop":
        raise NonFiniteLossError(epoch, step, terms)
    counter["nonfinite"] += 1
    optimizer.zero_grad(set_to_none=True)
    logger.warning("skipping step %d of epoch %d: non-finite %s", step, epoch, ", ".join(terms))


# ---- 7. Task runner: setup, fit (train + evaluate + checkpoint + resume), clean exits ----

# Keys every task config accepts, with their defaults (task scripts add theirs).
COMMON_DEFAULTS: dict[str, Any] = {
    "bert_config": "configs/config_bert.json",  # BERT architecture (JSON) with fusion_layer, encoder_width
    "vision_width": 768,  # ViT width
    "vit": {"patch_size": 16, "depth": 12, "heads": 12},  # ViT size (ViT-B/16 by default)
    "toy_world": "",  # if set: generate the offline toy world in this folder on first use
    "amp": "off",  # 'off' | 'bf16' | 'fp16' autocast on CUDA (ignored on CPU)
    "compile": False,  # torch.compile the model
    "grad_ckpt": False,  # gradient checkpointing in the ViT and BERT
    "num_workers": 4,  # data-loading processes per rank
    "save_every": 0,  # also checkpoint every N iterations (0: only at epoch ends)
    "keep_last": 2,  # checkpoint_*.pth files kept
    "max_skipped_images": 1000,  # stop when more unreadable images were skipped (-1: never)
    "grad_clip": 0.0,  # max gradient norm (0: no clipping)
    "nonfinite": "stop",  # on a NaN/inf loss: 'stop' or 'skip' the step
    "log_every": 50,  # progress-bar refresh, iterations
}


def setup_run(args: argparse.Namespace, defaults: dict) -> tuple[dict, torch.device]:
    """Distributed init, config, output folder, logging, seeds, toy world. Returns (config, device)."""
    init_distributed_mode(args)
    config = load_config(args.config, defaults, args.override)
    _check_output_dir(args.output_dir)
    setup_logging(args.output_dir, get_rank())
    device = torch.device(args.device)
    if device.type == "cuda" and args.distributed:
        device = torch.device("cuda", args.gpu)
    if config.get("toy_world"):
        if is_main_process() and not os.path.isfile(os.path.join(config["toy_world"], "manifest.json")):
            from dataset.toy_world import ensure_toy_world
            ensure_toy_world(config["toy_world"])
        barrier()
    if is_main_process():
        save_config(config, os.path.join(args.output_dir, "config.yaml"))
    set_seed(args.seed)
    _check_image_root(config, args.config)
    batch = config.get("batch_size", config.get("batch_size_train"))
    if batch is not None:
        logger.info("batch size %d per process x %d process(es) = %d global", batch, get_world_size(),
                    batch * get_world_size())
        if config.get("queue_size"):
            describe_queue(config["queue_size"], batch * get_world_size())
    return config, device


def _check_image_root(config: dict, source: str) -> None:
    root = config.get("image_root")
    if root and not os.path.isdir(root):
        raise ConfigError(f"image_root {root!r} (in {source} or --override) is not a folder")


def describe_queue(queue_size: int, global_batch: int) -> None:
    """Say what the ITC queues hold: any size works (ring buffer), but a small one holds less than a batch."""
    if queue_size < global_batch:
        logger.warning("queue_size %d is smaller than the global batch %d: each step overwrites the whole queue "
                       "with part of that batch's momentum features", queue_size, global_batch)
    else:
        logger.info("ITC queues: %d momentum features each = the last %.1f global batches of %d", queue_size,
                    queue_size / global_batch, global_batch)


def _check_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"output_dir {path} is not writable: {exc.strerror}") from None


def check_itm_batch(batch_size: int, key: str) -> None:
    """ITM draws an in-batch hard negative: a batch of one has none."""
    if batch_size < 2:
        raise ConfigError(f"{key} is {batch_size}: ITM hard negatives need at least 2 samples per process batch")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def wrap_model(model: torch.nn.Module, config: dict, device: torch.device) -> torch.nn.Module:
    """DDP (``broadcast_buffers=False``: queues are identical on every rank by construction) and compile."""
    if is_dist_initialized():
        # Ranks seed differently, so start every rank from rank 0's buffers (the random initial queues);
        # from then on the queues stay identical by construction and are never re-broadcast.
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if config.get("compile"):
        model = torch.compile(model)
    return model


def _training_state(model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any, config: dict,
                    epoch: int, step: int | None, extra: dict) -> dict:
    return {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "config": config, "epoch": epoch, "step": step, "rng": get_rng_state(), **extra}


def _resume(args: argparse.Namespace, model: torch.nn.Module, optimizer: Any, scheduler: Any,
            scaler: Any) -> tuple[int, int, dict]:
    """Restore a checkpoint; returns (start epoch, start step, saved extras)."""
    if args.resume == "latest":
        found = load_latest_checkpoint(args.output_dir)
        if found is None:
            logger.info("--resume: no checkpoint in %s yet, starting from scratch", args.output_dir)
            return 0, 0, {}
        state, path = found
    else:
        state, path = load_checkpoint_file(args.resume), args.resume
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if state.get("rng") is not None:
        set_rng_state(state["rng"])
    step = state.get("step")
    epoch, step = (state["epoch"] + 1, 0) if step is None else (state["epoch"], step)
    logger.info("resumed from %s: epoch %d, iteration %d", path, epoch, step)
    return epoch, step, state.get("extra", {})


def fit(model: torch.nn.Module, loader: Any, step_fn: Callable, config: dict, args: argparse.Namespace,
        device: torch.device, evaluate: Callable[[torch.nn.Module, int], dict] | None = None) -> dict:
    """The shared training driver of every task script.

    Optimizer, scheduler and scaler from the config; ``--resume`` (exact, mid-epoch included) or
    ``--checkpoint`` weights; per epoch: ``train_one_epoch``, optional ``evaluate(model, epoch)`` (its
    'score' key picks ``checkpoint_best.pth``), an atomic checkpoint and one JSON line in ``log.txt``.
    Returns the last log record.
    """
    from models.checkpoint import load_weights
    from optim import create_optimizer
    from scheduler import create_scheduler

    model.to(device)
    optimizer = create_optimizer(config["optimizer"], model)
    scheduler = create_scheduler(config["schedular"], optimizer)
    use_fp16 = config["amp"] == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_fp16 else None
    start_epoch, start_step, extra = 0, 0, {"best": None, "skipped": 0}
    if args.resume:
        start_epoch, start_step, saved = _resume(args, model, optimizer, scheduler, scaler)
        extra.update(saved)
    elif args.checkpoint:
        load_weights(model, args.checkpoint)
    train_model = wrap_model(model, config, device)
    counter = {"skipped": extra["skipped"], "nonfinite": 0}
    log_path = os.path.join(args.output_dir, "log.txt")
    batch_size = loader.batch_size
    record: dict = {}

    def checkpoint_mid_epoch(epoch: int, step: int) -> None:
        every = config["save_every"]
        if every > 0 and step % every == 0 and step < steps_per_epoch:
            extra["skipped"] = counter["skipped"]
            state = _training_state(model, optimizer, scheduler, scaler, config, epoch, step, {"extra": extra})
            save_checkpoint(state, args.output_dir, checkpoint_name(epoch, step), config["keep_last"])

    for epoch in range(start_epoch, config["schedular"]["epochs"]):
        loader.sampler.set_epoch(epoch)
        steps_per_epoch = len(loader)
        loader.sampler.set_start(start_step * batch_size)
        stats = train_one_epoch(
            train_model, loader, optimizer, scheduler, epoch, step_fn, device=device, alpha=config["alpha"],
            warm_up=config["warm_up"], amp=config["amp"], scaler=scaler, grad_clip=config["grad_clip"],
            start_step=start_step, on_step=checkpoint_mid_epoch, nonfinite=config["nonfinite"],
            max_skipped=config["max_skipped_images"], skip_counter=counter, log_every=config["log_every"])
        start_step = 0
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
                  "skipped_images": counter["skipped"]}
        if evaluate is not None:
            record.update(evaluate(_unwrap(model), epoch))
        extra["skipped"] = counter["skipped"]
        _save_epoch(model, optimizer, scheduler, scaler, config, epoch, extra, record, args.output_dir)
        append_jsonl(log_path, record)
        logger.info("epoch %d: %s", epoch, json.dumps(record))
        barrier()
    return record


def _save_epoch(model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any, config: dict, epoch: int,
                extra: dict, record: dict, output_dir: str) -> None:
    score = record.get("score")
    is_best = score is not None and (extra.get("best") is None or score > extra["best"])
    if is_best:
        extra["best"] = score
        record["best_epoch"] = epoch
    state = _training_state(model, optimizer, scheduler, scaler, config, epoch, None, {"extra": extra})
    save_checkpoint(state, output_dir, checkpoint_name(epoch), config["keep_last"])
    if is_best:
        save_checkpoint(state, output_dir, "checkpoint_best.pth", keep_last=0)


def run_main(main: Callable[[], Any]) -> int:
    """Run an entry point; expected failures (bad config, data, checkpoint, non-finite loss) end in one
    clear logged message and exit code 2 instead of a traceback. ``ALBEF_DEBUG=1`` re-raises."""
    from dataset import DataError, ImageLoadError

    expected = (ConfigError, DataError, ImageLoadError, CheckpointError, NonFiniteLossError, FileNotFoundError,
                SkippedImagesError)
    try:
        main()
    except expected as exc:
        if os.environ.get("ALBEF_DEBUG"):
            raise
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO)
        logger.error("%s: %s", type(exc).__name__, exc)
        return 2
    finally:
        if is_dist_initialized():
            dist.destroy_process_group()
    return 0
