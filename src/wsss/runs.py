"""Run directories: atomic writes and config-keyed stage caching.

A stage writes into ``runs/<name>/<stage>/`` and records in ``stage.json`` the hash of the config sections that
produced it. Rerunning with the same hash reuses the output; a different hash clears the folder and recomputes.
Per-item outputs (one map file per image) written under the same hash survive a killed run and are not recomputed.
A stage is only trusted by later stages once ``stage.json`` says ``complete``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class atomic_path:
    """Context manager yielding a temporary path in the target's folder; renamed onto ``path`` on success."""

    def __init__(self, path: Path, suffix: str = ""):
        self.path = Path(path)
        self.suffix = suffix or self.path.suffix

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.", suffix=".tmp" + self.suffix)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()
        return False


class Stage:
    """One stage's output folder, keyed by the hash of the config that produces it."""

    def __init__(self, run_dir: Path, name: str, key: str):
        self.dir = Path(run_dir) / name
        self.name = name
        self.key = key
        self._meta_path = self.dir / "stage.json"

    def _meta(self) -> dict:
        try:
            return json.loads(self._meta_path.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def complete(self) -> bool:
        meta = self._meta()
        return meta.get("key") == self.key and meta.get("complete", False)

    def open(self) -> bool:
        """Prepare the folder for (re)computation. Returns True when earlier partial work with the same key is kept."""
        meta = self._meta()
        if meta.get("key") == self.key:
            return True
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._meta_path, {"key": self.key, "complete": False})
        return False

    def finish(self, **info: Any) -> None:
        atomic_write_json(self._meta_path, {"key": self.key, "complete": True, **info})

    def info(self) -> dict:
        return self._meta()
