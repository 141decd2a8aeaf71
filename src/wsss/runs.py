"""Run directories: atomic writes and config-keyed stage caching.

A stage writes into ``runs/<name>/<stage>/`` and records in ``stage.json`` the hash of the config sections that
produced it. Rerunning with the same hash reuses the output; a different hash clears the folder and recomputes.
Per-item outputs (one map file per image) written under the same hash survive a killed run and are not recomputed.
A stage is only trusted by later stages once ``stage.json`` says ``complete``; ``stage.json`` also lists the entries
the stage wrote, so that wsss never deletes a file it did not write. :class:`RunLock` keeps two commands from writing
into one run at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from wsss.errors import DataError


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
    """One stage's output folder, keyed by the hash of the config that produces it.

    Only what wsss wrote is ever deleted: a folder without ``stage.json`` that holds files, or a finished stage
    folder holding entries its record does not list (files a user put there), is refused with an error naming them,
    never emptied.
    """

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

    def _entries(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.name != "stage.json") if self.dir.is_dir() else []

    def foreign_entries(self) -> list[str]:
        """Entries of the folder that wsss did not write (and so will not delete)."""
        if not self.dir.is_dir():
            return []
        if not self._meta_path.exists():
            return self._entries()
        meta = self._meta()
        if meta.get("complete") and "entries" in meta:
            return [e for e in self._entries() if e not in set(meta["entries"]) and not e.startswith(".")]
        return []  # an unfinished stage: everything in it was written by the computation that was cut short

    def open(self) -> bool:
        """Prepare the folder for (re)computation. Returns True when earlier partial work with the same key is kept.
        Output of a different key is deleted, unless the folder holds entries wsss did not write (DataError)."""
        meta = self._meta()
        if meta.get("key") == self.key:
            return True
        foreign = self.foreign_entries()
        if foreign:
            raise DataError(f"{self.dir} holds {', '.join(foreign[:10])}{' ...' if len(foreign) > 10 else ''}, "
                            f"which wsss did not write; its stage '{self.name}' must be recomputed, but wsss only "
                            "deletes its own outputs. Move these files elsewhere (or use another run name) and rerun")
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._meta_path, {"key": self.key, "complete": False})
        return False

    def finish(self, **info: Any) -> None:
        atomic_write_json(self._meta_path, {"key": self.key, "complete": True, **info, "entries": self._entries()})

    def info(self) -> dict:
        return self._meta()


class RunLock:
    """An exclusive lock on a run directory for the duration of a command (``fcntl.flock`` on ``<run>/.lock``).

    A second command on the same run refuses at once with the holder's pid and command line instead of mixing its
    outputs with the first one's. The lock is released by the OS when the holding process dies, so a killed run never
    leaves a stale lock behind.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DataError(f"run directory {self.path.parent} is in use by another wsss command ({holder}); wait for "
                            "it to finish, or give this run another name (name=...)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False
