"""Atomic writing: files and folders appear whole or not at all, and a folder being deleted never keeps its name."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "replace_dir", "remove_dir", "clear_trash"]

TRASH_PREFIX = ".trash-"  # folders on their way out (`remove_dir`, `replace_dir`): hidden, never read


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed to disk and renamed onto `path`.

    If the body raises, the temporary file is removed and `path` is left as it was. The temporary file
    is created with mode 0666 less the process umask (as `open` would), the file is fsynced before
    `os.replace` and the directory after it, so a crash leaves either the old file or the whole new one.
    The suffix is kept so that writers that infer the format from it (imageio) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{path.suffix}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        if tmp.is_file():
            _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the finished folder `tmp` (beside `path`, on the same file system) onto `path`; returns `path`.

    Every file and folder under `tmp` is fsynced first; an existing `path` is renamed to a hidden trash
    name, `tmp` renamed onto `path`, the parent fsynced, then the old folder deleted. A crash at any moment
    leaves under `path` the old folder whole, the new one whole, or nothing; never a part of either.
    """
    tmp, path = Path(tmp), Path(path)
    for folder, _, files in os.walk(tmp, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))
    old = _to_trash(path) if path.exists() else None
    os.rename(tmp, path)
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def remove_dir(path: str | os.PathLike) -> None:
    """Delete the folder `path`: first renamed to a hidden trash name, so that a crash part way through
    never leaves part of it under its name (`clear_trash` removes what such a crash left)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(_to_trash(path), ignore_errors=True)


def clear_trash(parent: str | os.PathLike, prefix: str = "") -> None:
    """Delete what `remove_dir` / `replace_dir` calls on folders of `parent` whose names start with
    `prefix` left when killed part way."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if not p.name.startswith(TRASH_PREFIX + prefix):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _to_trash(path: Path) -> Path:
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    _fsync(path.parent)
    return trash


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
