"""Typed config sections: build a dataclass tree from plain values, with types and ranges checked and errors that
name the key (:func:`build`), and serialise it back (:func:`to_dict`, :func:`config_hash`).

This module imports no plugin: methods and refiners build their own options with it, and
:mod:`wsss.config.load` (which checks the plugins' names) imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

from wsss.config.schema import Bounds, Config
from wsss.errors import ConfigError


def _suggest(key: str, valid: list[str]) -> str:
    if not valid:
        return " It takes no keys."
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}."


#: keys of older configs and where those settings live now: such a key still fails as unknown, with this as its hint
MOVED_KEYS = {
    "train.precision": "runtime.precision", "train.channels_last": "runtime.channels_last",
    "train.accelerator": "runtime.accelerator", "train.devices": "runtime.devices",
    "train.progress": "runtime.progress", "maps.precision": "runtime.precision",
    "seg.backbone": "seg.model.backbone", "seg.output_stride": "seg.model.output_stride",
    "seg.pretrained": "seg.model.pretrained", "seg.atrous_rates": "seg.model.atrous_rates",
    "seg.epochs": "seg.train.epochs", "seg.batch_size": "seg.train.batch_size", "seg.lr": "seg.train.lr",
    "seg.head_lr_mult": "seg.train.head_lr_mult", "seg.crop_size": "seg.train.crop_size",
    "seg.scale_range": "seg.train.scale_range",
    "seg.sec.output_stride": "seg.sec.loss_stride",
}


def _unknown(key: str, valid: list[str]) -> str:
    moved = MOVED_KEYS.get(key)
    if moved is not None:
        return f"unknown config key '{key}': it moved to '{moved}'."
    return f"unknown config key '{key}'.{_suggest(key.rpartition('.')[2], valid)}"


def _error(keys: str | tuple[str, ...], message: str) -> ConfigError:
    """A ConfigError about the setting(s) ``keys`` (dotted paths), which it carries for :func:`load_config` to say
    where the values came from."""
    e = ConfigError(message)
    e.keys = (keys,) if isinstance(keys, str) else keys  # type: ignore[attr-defined]
    return e


#: a dotted setting in a message of a check outside this module, e.g. "maps.normalize" in "... maps.normalize=minmax"
_SECTIONS = "|".join(f.name for f in dataclasses.fields(Config))
_KEY_IN_TEXT = re.compile(rf"\b((?:{_SECTIONS})(?:\.[A-Za-z_]\w*)+)")


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
        return build(tp, value, where)
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


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def build(cls: type, data: dict, where: str, base: Any = None) -> Any:
    """A ``cls`` from the mapping ``data``; the fields it leaves out keep the values of ``base`` (else the class
    defaults). A section's base is the default of the field holding it, so ``seg.train`` keeps the segmentation
    network's own schedule defaults (lr 0.001, batch 8) when a config sets only some of its keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        prefix = f"{where}." if where else ""
        if key not in fields:
            raise _error(f"{prefix}{key}", _unknown(f"{prefix}{key}", list(fields)))
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            inner = getattr(base, key) if base is not None else _default(fields[key])
            kwargs[key] = build(tp, value, f"{prefix}{key}", inner)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
        bounds = fields[key].metadata.get("bounds")
        if bounds is not None:
            _check_bounds(kwargs[key], bounds, f"{prefix}{key}", type(None) in get_args(hints[key]))
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


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


def config_hash(*parts: Any) -> str:
    """Stable short hash of config sections (dataclasses, dicts, scalars)."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
