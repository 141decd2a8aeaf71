"""Load, override, validate and serialise configs.

``load_config("configs/msrc21.yaml", ["train.epochs=5", "maps.localizer=grad_cam"])`` returns a fully typed
:class:`~wsss.config.schema.Config`. Everything the config alone can tell is checked here, before any data is read:
types and ranges (:func:`~wsss.config.schema.bounded`), registered names (method, backbones, localizer, saliency
source, refiners) with the nearest valid name, the method's options (filled in with every default, so the written
``config.yaml`` lists them and ``{}`` hashes like the spelled-out defaults), and combinations that cannot run.

Every error is a :class:`ConfigError` naming the key and where its value came from: ``override 'train.lr=0'`` for
a ``key=value`` override, the YAML file's path for a file key.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from wsss.config.plugins import check_config
from wsss.config.runtime import resolved
from wsss.config.schema import Config
from wsss.config.typed import MOVED_KEYS, _keys_of, build, config_hash, to_dict  # noqa: F401  (re-exported)
from wsss.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(part.strip() for part in path):
        raise ConfigError(f"override '{text}': '{key.strip()}' is not a dotted key (e.g. train.epochs=5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': the value is not valid YAML: {str(e).splitlines()[0]}") from None
    return path, value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _blame(e: ConfigError, file_tree: dict, file_label: str | None,
           overrides: Sequence[tuple[str, list[str]]]) -> str | None:
    """Where the value(s) at fault came from: ``override '<text>'`` for a key an override set (the last one wins, as
    it does for the value), the YAML file for a key of the file; None when the error names no setting."""
    sources: list[str] = []
    for key in _keys_of(e):
        path = re.sub(r"\[\d+\]", "", key).split(".")
        setting = [text for text, p in overrides if p == path[: len(p)]]
        if setting:  # the override set this key or a section that holds it
            sources.append(f"override '{setting[-1]}'")
            continue
        sources += [f"override '{text}'" for text, p in overrides if p[: len(path)] == path]
        node: Any = file_tree
        for part in path:
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if file_label and node is not _ABSENT:
            sources.append(file_label)
    sources = list(dict.fromkeys(sources))
    return ", ".join(sources) if sources else file_label


_ABSENT = object()


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML file's tree (``yaml.safe_load``; empty file: ``{}``); ConfigError naming the file (as ``what``) if it is
    missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply ``key=value`` overrides, validate
    everything the config alone can tell (:func:`check_config`); ``runtime.precision: auto`` becomes what this
    machine runs natively (:mod:`wsss.config.runtime`). Reads no data."""
    file_tree = read_yaml(path) if path is not None else {}
    label = str(path) if path is not None else None
    tree = copy.deepcopy(file_tree)
    applied: list[tuple[str, list[str]]] = []
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
        applied.append((text, key))
    try:
        cfg = check_config(build(Config, tree, ""))
    except ConfigError as e:
        where = _blame(e, file_tree, label, applied)
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    return resolved(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    from wsss.runs import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


