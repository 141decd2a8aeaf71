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

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from wsss.config.schema import Bounds, Config
from wsss.errors import ConfigError


def _suggest(key: str, valid: list[str]) -> str:
    if not valid:
        return " It takes no keys."
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}."


def _error(keys: str | tuple[str, ...], message: str) -> ConfigError:
    """A ConfigError about the setting(s) ``keys`` (dotted paths), which it carries for :func:`load_config` to say
    where the values came from."""
    e = ConfigError(message)
    e.keys = (keys,) if isinstance(keys, str) else keys  # type: ignore[attr-defined]
    return e


#: a dotted setting in a message of a check outside this module, e.g. "maps.normalize" in "... maps.normalize=minmax"
_KEY_IN_TEXT = re.compile(r"\b((?:%s)(?:\.[A-Za-z_]\w*)+)" % "|".join(f.name for f in dataclasses.fields(Config)))


def _keys_of(e: ConfigError) -> tuple[str, ...]:
    return getattr(e, "keys", None) or tuple(dict.fromkeys(_KEY_IN_TEXT.findall(str(e))))


@contextlib.contextmanager
def _about(*keys: str) -> Iterator[None]:
    """Errors of a check made elsewhere are about ``keys`` (default: the settings their message names)."""
    try:
        yield
    except ConfigError as e:
        if not getattr(e, "keys", None):
            e.keys = keys or _keys_of(e)  # type: ignore[attr-defined]
        raise


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless (int -> float, list -> tuple,
    a numeric string such as "1e-3", which YAML 1.1 reads as a string, -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        last: ConfigError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                last = e
        raise last or _error(where, f"{where}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise _error(where, f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _error(where, f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _error(where, f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise _error(where, f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _error(where, f"{where}: expected a mapping of {tp.__name__} settings, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        # YAML already turns true/false into bools; a string such as "False" is an error, never truthy.
        if not isinstance(value, bool):
            raise _error(where, f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(where, f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise _error(where, f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _error(where, f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise _error(where, f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _error(where, f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - schema bug


def _check_bounds(value: Any, b: Bounds, where: str, nullable: bool) -> None:
    """``value`` (already coerced) against the range declared with the field (:func:`~wsss.config.schema.bounded`)."""
    if value is None:
        return
    null = " (or null)" if nullable else ""
    if isinstance(value, (list, tuple)):
        if b.nonempty and not value:
            raise _error(where, f"{where}: needs at least one value, got []")
        for i, v in enumerate(value):
            if isinstance(v, (int, float)) and not b.admits(v):
                raise _error(where, f"{where}[{i}]: every value must be {b.describe()}, got {v!r}")
        if b.ordered and len(value) == 2 and value[0] > value[1]:
            raise _error(where, f"{where}: the low value must not exceed the high one, got {list(value)}")
        return
    if isinstance(value, (int, float)) and not b.admits(value):
        raise _error(where, f"{where}: must be {b.describe()}{null}, got {value!r}")


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        prefix = f"{where}." if where else ""
        if key not in fields:
            raise _error(f"{prefix}{key}", f"unknown config key '{prefix}{key}'.{_suggest(str(key), list(fields))}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
        bounds = fields[key].metadata.get("bounds")
        if bounds is not None:
            _check_bounds(kwargs[key], bounds, f"{prefix}{key}", type(None) in get_args(hints[key]))
    return cls(**kwargs)


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


def check_config(cfg: Config) -> Config:
    """What the config alone can tell beyond types and ranges: registered names (with the nearest valid one), the
    method's options, and combinations that cannot run. Raises :class:`ConfigError` naming the keys. Fills
    ``method.options`` (and, through ``wsss.refine.resolve_refiners``, the refiners' options) with every default.
    Imports the registries, hence torch."""
    from wsss import refine
    from wsss.localize import LOCALIZERS, build_localizer
    from wsss.localize.localizers import _GradientCAM
    from wsss.methods import METHODS
    from wsss.methods.adv_erase import AdversarialErasing, check_maps_config
    from wsss.models.backbones import BACKBONES, check_backbone_config, is_transformer
    from wsss.saliency import SALIENCY_SOURCES

    with _about("method.name"):
        method = METHODS.get(cfg.method.name, key="method.name")
    try:
        cfg.method.options = method.resolve_options(cfg.method.options)
    except ConfigError as e:  # about the option keys its message names (an unknown one, one out of range)
        e.keys = _keys_of(e) or ("method.options",)  # type: ignore[attr-defined]
        raise
    with _about():
        check_backbone_config(cfg.model.backbone, cfg.model.output_stride, "model")
        check_backbone_config(cfg.seg.backbone, cfg.seg.output_stride, "seg")

    loc = cfg.maps.localizer
    with _about("maps.localizer"):
        loc_cls = LOCALIZERS.get(loc, key="maps.localizer")
    with _about("maps.target_layer", "maps.localizer"):
        build_localizer(loc, cfg.maps.target_layer)  # a localizer checks its own settings when built
    # the rules the localizers apply to the model at run time, told from the names alone
    if getattr(loc_cls, "needs_attention", False) and not is_transformer(cfg.model.backbone):
        others = [n for n in LOCALIZERS.names() if not getattr(LOCALIZERS.get(n), "needs_attention", False)]
        vits = [n for n in BACKBONES.names() if is_transformer(n)]
        raise _error(
            ("maps.localizer", "model.backbone"),
            f"maps.localizer '{loc}' reads a vision transformer's attention, but the model's backbone "
            f"(model.backbone={cfg.model.backbone}) has none (a CNN); localizers that apply to it: {', '.join(others)}. "
            f"Transformer backbones: {', '.join(vits)}")
    if cfg.maps.target_layer and is_transformer(cfg.model.backbone):
        others = [n for n in LOCALIZERS.names() if not issubclass(LOCALIZERS.get(n), _GradientCAM)]
        raise _error(
            ("maps.target_layer", "model.backbone"),
            f"gradient localizers need a spatial (B, C, h, w) activation, but maps.target_layer "
            f"'{cfg.maps.target_layer}' of the transformer backbone '{cfg.model.backbone}' outputs tokens; use "
            f"maps.target_layer '' (the backbone's feature map) or one of: {', '.join(others)}")
    if cfg.method.name == AdversarialErasing.name:
        with _about("maps.normalize", "method.name"):
            check_maps_config(cfg.maps)
    if cfg.seg.loss == "sec" and cfg.seg.masks != "pseudo":
        raise _error(("seg.loss", "seg.masks"),
                     "seg.loss=sec trains on localization cues from the maps; it needs seg.masks=pseudo")

    saliency = getattr(cfg, "saliency", None)
    if saliency is not None:
        with _about("saliency.source"):
            SALIENCY_SOURCES.get(saliency.source, key="saliency.source")
    crf = getattr(cfg, "crf", None)
    check_crf = getattr(refine, "check_crf_config", None)
    if crf is not None and check_crf is not None:
        with _about():
            check_crf(crf)
    resolve_refiners = getattr(refine, "resolve_refiners", None)  # being added to wsss.refine
    if resolve_refiners is not None:
        with _about():
            out = resolve_refiners(cfg)
        if isinstance(out, Config):
            cfg = out
    return cfg


def read_yaml(path: str | Path) -> dict:
    """A config file's tree (``yaml.safe_load``); ConfigError naming the file if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply ``key=value`` overrides, validate
    everything the config alone can tell (:func:`check_config`). Reads no data."""
    file_tree = read_yaml(path) if path is not None else {}
    label = str(path) if path is not None else None
    tree = copy.deepcopy(file_tree)
    applied: list[tuple[str, list[str]]] = []
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
        applied.append((text, key))
    try:
        return check_config(_build(Config, tree, ""))
    except ConfigError as e:
        where = _blame(e, file_tree, label, applied)
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def to_dict(cfg: Any) -> dict:
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    from wsss.runs import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(*parts: Any) -> str:
    """Stable short hash of config sections (dataclasses, dicts, scalars)."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
