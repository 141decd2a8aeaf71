"""Name -> implementation registries (backbones, methods, localizers). No global mutable state beyond the tables
filled at import time by decorators."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from wsss.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, key: str | None = None) -> T:
        """The entry ``name``; else a ConfigError with the nearest registered name, naming the config ``key`` (e.g.
        ``model.backbone``) when given."""
        if name not in self._items:
            close = difflib.get_close_matches(str(name), list(self._items), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            where = f"{key}: " if key else ""
            raise ConfigError(f"{where}unknown {self.kind} '{name}'.{hint} Registered: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
