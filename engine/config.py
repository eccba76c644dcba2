"""Run configuration: YAML files validated against a task's schema, ``--override``, and the common CLI flags.

Every task script declares its schema as a ``DEFAULTS`` dict (every accepted key with its default), built on
``COMMON_DEFAULTS``; unknown keys and values of the wrong type raise ``ConfigError`` naming the file and key.
Relative paths that the project ships (``configs/...``, the toy world) resolve from the project folder wherever
a script is started (``resolve_paths``). Light on purpose: ``--help`` imports nothing heavier than this module.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    "allow_partial": False,  # load a --checkpoint with suspicious missing/unexpected keys (else: stop, naming them)
}

# The data keys of the image-caption pre-training scripts (Pretrain.py, Pretrain_nlvr.py).
PRETRAIN_DATA_DEFAULTS: dict[str, Any] = {
    "train_file": [],  # JSON files of {image: path, caption: str | [str]} and/or WebDataset shard specs
    "image_root": "",  # joined with relative image paths (official files hold absolute ones)
    # shards only (dataset.shard_io.SHARD_DEFAULTS, written out here so that --help needs no dataset import):
    "train_num_samples": 0,  # samples per epoch over all ranks; 0: every shard sample and JSON item once
    "shuffle_buffer": 1000,  # samples each loader worker shuffles together (raw bytes in memory)
    "image_res": 256,
    "embed_dim": 256,
}


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
        value = "" if not raw.strip() else _yaml().load(raw)  # `key=`: the empty string, not null
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


_PATH_SUFFIXES = ("_file", "_root", "_config", "_init", "_list", "_dir", "_data")


def _is_path_key(key: str) -> bool:
    return key == "toy_world" or key.endswith(_PATH_SUFFIXES)


def _inside(path: str, folder: str) -> bool:
    return os.path.normpath(path) == os.path.normpath(folder) or os.path.normpath(path).startswith(
        os.path.normpath(folder) + os.sep)


def resolve_path(path: str, toy_world: str = "") -> str:
    """A relative ``path`` as the project means it, made absolute (the config of a run then names its files
    whatever folder a resume starts from): the file from the working directory when it exists there, else the
    project's own file when that exists (``configs/config_bert.json`` from anywhere), else the project's when it
    lies in the (relative) ``toy_world`` folder, which is generated under the project. Otherwise unchanged."""
    if not path or os.path.isabs(path) or "://" in path:
        return path
    if os.path.exists(path):
        return os.path.abspath(path)
    in_project = os.path.join(PROJECT_ROOT, path)
    if os.path.exists(in_project):
        return in_project
    if toy_world and not os.path.isabs(toy_world) and not os.path.exists(toy_world) and _inside(path, toy_world):
        return in_project
    return path


def resolve_paths(config: dict) -> dict:
    """``config`` with every path-valued key (``*_file``, ``*_root``, ``*_config``, ``*_init``, ``*_list``,
    ``*_dir``, ``*_data``, ``toy_world``; strings or lists of strings) passed through ``resolve_path``."""
    world = config.get("toy_world") if isinstance(config.get("toy_world"), str) else ""
    out = dict(config)
    for key, value in config.items():
        if not _is_path_key(key):
            continue
        if isinstance(value, str):
            out[key] = resolve_path(value, world)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = [resolve_path(v, world) for v in value]
    return out


def load_config(path: str, defaults: dict, overrides: list[str] | None = None, resolve: bool = True) -> dict:
    """Load the YAML config at ``path``, validated against ``defaults``, then apply ``overrides``.

    ``defaults`` lists every allowed key with its default value; nested dicts (``optimizer``, ``schedular``) are
    validated recursively. A default of ``None`` accepts any value; ints are accepted for floats, and so are
    strings that parse as floats. ``overrides`` are ``key=value`` strings, dotted for nested keys, with the value
    parsed as YAML (``schedular.epochs=2``, ``train_file=[a.json,b.json]``; ``key=`` is the empty string).
    ``path`` and, with ``resolve``, the paths inside resolve from the project folder where the working directory
    lacks them (``resolve_paths``). Raises ``ConfigError``.
    """
    path = resolve_path(path)
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
    return resolve_paths(config) if resolve else config


def save_config(config: dict, path: str) -> None:
    """Write ``config`` as block-style YAML to ``path``."""
    yaml = _yaml()
    yaml.default_flow_style = False
    with open(path, "w", encoding="utf-8") as f:
        yaml.dump(config, f)


class _BoolFlag(argparse.Action):
    """``--flag`` / ``--flag true|false``: a real boolean (the official ``type=bool`` made ``--distributed False``
    true); ``--no-flag`` is a separate plain switch (``_FalseFlag``)."""

    _TRUE: ClassVar[frozenset[str]] = frozenset({"1", "true", "yes", "on"})
    _FALSE: ClassVar[frozenset[str]] = frozenset({"0", "false", "no", "off"})

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", metavar="BOOL", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        text = "true" if values is None else str(values).lower()
        if text not in self._TRUE | self._FALSE:
            parser.error(f"{option_string}: expected true or false, got {values!r}")
        setattr(namespace, self.dest, text in self._TRUE)


class _FalseFlag(argparse.Action):
    """``--no-flag``: sets ``flag`` to False (a switch: no value, no default of its own in ``--help``)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, False)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description (the script's usage examples) as written, and every flag's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.nargs == 0 or "default" in text or action.default is argparse.SUPPRESS:
            return text
        default = action.default
        shown = "none" if default is None or default == [] else repr(default) if default == "" else "%(default)s"
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """Records the command line on the parsed arguments (``args.script``, ``args.argv``: provenance, and the
    exact ``--resume`` command a stopped run prints)."""

    script = ""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        parsed, rest = super().parse_known_args(argv, namespace)
        parsed.script, parsed.argv = self.script, argv
        return parsed, rest


def _caller_script() -> str:
    """The file of the entry script that called ``get_parser``, relative to the working directory when inside."""
    path = sys._getframe(2).f_globals.get("__file__") or sys.argv[0]
    rel = os.path.relpath(path) if os.path.isabs(path) else path
    return path if rel.startswith("..") else rel


def get_parser(description: str) -> argparse.ArgumentParser:
    """Return a parser with the flags every official ALBEF script takes; scripts add their own.

    ``description`` (the script's docstring with its usage examples) is shown as written by ``--help``.
    """
    p = _Parser(description=description, formatter_class=_HelpFormatter)
    p.script = _caller_script()
    p.add_argument("--config", required=True, help="YAML config file (configs/... resolve from the project)")
    p.add_argument("--output_dir", required=True,
                   help="folder for config.yaml, train.log, log.txt and checkpoints; a folder holding a run's "
                        "checkpoints needs --resume")
    p.add_argument("--checkpoint", default="", help="weights to initialise from (fine-tuning, evaluation)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue a run: alone = the newest checkpoint in output_dir, or a checkpoint path")
    p.add_argument("--evaluate", action="store_true", help="only evaluate the --checkpoint weights")
    p.add_argument("--allow_partial", action="store_true",
                   help="load a --checkpoint even when keys beyond the expected ones are missing or unexpected (they "
                        "keep their initialisation); without it such a checkpoint stops the run, naming the keys")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=42, help="random seed (each process adds its rank)")
    p.add_argument("--text_encoder", default="bert-base-uncased",
                   help="tokenizer vocabulary (bert-base-uncased ships with the project) and BERT weights for "
                        "bert_init: a name or a local folder")
    p.add_argument("--world_size", type=int, default=1,
                   help="kept for the official command lines: the number of processes comes from torchrun")
    p.add_argument("--dist_url", default="env://", help="process-group init method under torchrun")
    p.add_argument("--distributed", action=_BoolFlag, default=None,
                   help="true/false; default: auto-detect from torchrun's RANK/WORLD_SIZE")
    p.add_argument("--no-distributed", dest="distributed", action=_FalseFlag,
                   help="one process even under a launcher's environment")
    p.add_argument("--override", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides: dotted keys for nested values, YAML values (key= is the empty "
                        "string); repeatable")
    return p
