"""Run directories: atomic writes and config-keyed stage caching.

A stage writes into ``runs/<name>/store/<stage>/<key>/``, ``key`` being the hash of the config sections that produced
it, and ``runs/<name>/<stage>`` links to the variant the latest command used. Rerunning with the same hash reuses the
output; a different hash computes a variant beside the others, so going back to earlier settings reuses theirs
(``wsss runs`` lists the variants, ``wsss gc`` removes those the latest config does not use).
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


def _file_mode() -> int:
    """The mode ``open()`` gives a new file (0666 less the umask); ``mkstemp``'s own 0600 would leave the masks,
    models and reports wsss writes readable by their owner alone."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
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
        os.fchmod(fd, _file_mode())
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()
        return False


#: the folder of a run directory that holds every variant of every stage: ``<run>/store/<stage>/<key>/``
STORE = "store"


class Stage:
    """One variant of a stage: the outputs of the settings whose hash is ``key``.

    Variants live side by side in ``<run>/store/<name>/<key>/``; ``<run>/<name>`` is a symbolic link to the variant
    the latest command used (:meth:`activate`), so readers see the current outputs at a fixed path. A variant is only
    trusted by later stages once its ``stage.json`` says ``complete``; ``stage.json`` also lists the entries the
    stage wrote, so that wsss never deletes a file it did not write (``wsss gc`` keeps a variant holding one).

    A run directory of the layout before the store (``<run>/<name>/`` a folder with a ``stage.json``) is moved into
    the store under its recorded key on first use; a folder at ``<run>/<name>`` without ``stage.json`` that holds
    files is refused with an error naming them, never moved or emptied.
    """

    def __init__(self, run_dir: Path, name: str, key: str):
        self.run_dir = Path(run_dir)
        self.name = name
        self.key = key
        self.link = self.run_dir / name
        self.dir = self.run_dir / STORE / name / key
        self._meta_path = self.dir / "stage.json"

    def _meta(self) -> dict:
        return read_meta(self.dir)

    @property
    def complete(self) -> bool:
        meta = self._meta()
        return meta.get("key") == self.key and meta.get("complete", False)

    def foreign_entries(self) -> list[str]:
        """Entries of the variant's folder that wsss did not write."""
        return foreign_entries(self.dir)

    def _adopt_legacy(self) -> None:
        """``<run>/<name>`` as a plain folder: a stage of the layout before the store is moved into it under its
        recorded key; an empty folder is removed; anything else is refused."""
        link = self.link
        if link.is_symlink() or not link.exists():
            return
        if not link.is_dir():
            raise DataError(f"{link} is a file that wsss did not write, where stage '{self.name}' links to its outputs; "
                            "move it elsewhere (or use another run name) and rerun")
        meta = read_meta(link)
        if isinstance(meta.get("key"), str) and meta["key"]:
            target = self.run_dir / STORE / self.name / meta["key"]
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(link, target)
                return
        entries = sorted(p.name for p in link.iterdir())
        if not entries:
            link.rmdir()
            return
        raise DataError(f"{link} holds {', '.join(entries[:10])}{' ...' if len(entries) > 10 else ''}, which wsss did "
                        f"not write; stage '{self.name}' keeps its outputs in {self.run_dir / STORE / self.name} and "
                        f"links them at {link}. Move these files elsewhere (or use another run name) and rerun")

    def activate(self) -> None:
        """Point ``<run>/<name>`` at this variant (atomically)."""
        self._adopt_legacy()
        target = Path(STORE) / self.name / self.key
        if self.link.is_symlink() and Path(os.readlink(self.link)) == target:
            return
        tmp = self.run_dir / f".{self.name}.{os.getpid()}.link"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, self.link)

    def open(self) -> bool:
        """Prepare the variant for (re)computation and make it the current one. Returns True when earlier partial
        work of this variant is kept. Other variants are never touched."""
        self._adopt_legacy()
        meta = self._meta()
        resumed = meta.get("key") == self.key
        if not resumed:
            if self.dir.exists():  # created, but killed before its record was written: nothing in it is finished
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            atomic_write_json(self._meta_path, {"key": self.key, "complete": False})
        self.activate()
        return resumed

    def finish(self, **info: Any) -> None:
        atomic_write_json(self._meta_path, {"key": self.key, "complete": True, **info, "entries": _entries(self.dir)})

    def info(self) -> dict:
        return self._meta()


def read_meta(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "stage.json").read_text())
    except (OSError, ValueError):
        return {}


def _entries(folder: Path) -> list[str]:
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.name != "stage.json") if folder.is_dir() else []


def foreign_entries(folder: Path) -> list[str]:
    """Entries of a stage folder that wsss did not write (and so will not delete): everything, without a record;
    what a finished record does not list; nothing in an unfinished one (written by the computation cut short)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if not (folder / "stage.json").exists():
        return _entries(folder)
    meta = read_meta(folder)
    if meta.get("complete") and "entries" in meta:
        return [e for e in _entries(folder) if e not in set(meta["entries"]) and not e.startswith(".")]
    return []


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder`` (links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _holder_line(fd: int) -> str:
    """What the holder of a run lock wrote into it (:class:`RunLock`)."""
    return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"


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
            holder = _holder_line(fd)
            os.close(fd)
            raise DataError(f"run directory {self.path.parent} is in use by another wsss command ({holder}); wait for "
                            "it to finish, or give this run another name (name=...)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def holder(path: Path) -> str | None:
        """The command holding the lock file ``path`` now (pid and command line), or None when nobody holds it."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return _holder_line(fd)
        finally:
            os.close(fd)

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False
