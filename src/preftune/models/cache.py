"""Where preftune keeps derived files, and how it writes files and folders so readers never see half
of one (the one home of atomic writes: :func:`atomic_dir`, :func:`atomic_path`, :func:`write_json`,
:func:`write_jsonl`).

Converted GGUF models live under :func:`cache_dir`; checkpoints reuse :func:`atomic_dir`. Both matter
when several processes (data-parallel ranks, two users' jobs) share one cache: a reader must find
either nothing or a complete folder, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable


def cache_dir() -> Path:
    """Return preftune's cache root: ``$PREFTUNE_CACHE``, else ``$XDG_CACHE_HOME/preftune``,
    else ``~/.cache/preftune``. The folder is not created here."""
    explicit = os.environ.get("PREFTUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "preftune"


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; when the body succeeds, move it to ``target`` atomically.

    The temp folder sits beside ``target`` (``.<name>.tmp-XXXX``) so the final ``os.replace`` stays
    on one filesystem and is atomic: readers see no folder or a complete one. If the body raises,
    the temp folder is removed, ``target`` is untouched and the exception propagates.

    If ``target`` already exists when the body finishes:

    * ``overwrite=False`` (caches): a non-empty existing folder wins and ours is discarded. It is a
      concurrent writer's complete result for the same key, and swapping it could pull a folder out
      from under a process reading it. An empty folder is simply replaced.
    * ``overwrite=True`` (``save_model``, checkpoints): the old folder is renamed aside, ours moved
      in, then the old one deleted; at no moment does ``target`` hold a mix of old and new files.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        # mkdtemp makes the folder private (0700); give it a normal folder's permissions.
        os.chmod(tmp, 0o755)
        if overwrite and target.exists():
            _replace_existing(tmp, target)
        else:
            _move_into_place(tmp, target)
    finally:
        # After a successful move tmp no longer exists; otherwise this is the clean-up.
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, target: Path) -> None:
    """``os.replace`` tmp onto target unless another writer already put a non-empty folder there."""
    try:
        os.replace(tmp, target)
    except OSError:
        # ENOTEMPTY/EEXIST on POSIX (or a permission error on Windows) when target is already there.
        if not target.is_dir():
            raise
        # Keep the existing folder: it is the concurrent writer's complete result.


def _replace_existing(tmp: Path, target: Path) -> None:
    """Swap ``tmp`` in for an existing ``target`` (file or folder), then delete the old one."""
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old = trash / "old"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)  # put the old one back rather than leave nothing
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside ``target``; when the body has written it, move it onto
    ``target`` atomically (a crash never leaves a half-written file under the final name). If the
    body raises, the temporary file is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; give it a normal file's permissions
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: str | os.PathLike, text: str | bytes) -> Path:
    """Write ``text`` (str as UTF-8, or bytes) to ``target`` atomically, flushed to disk; return the path."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
    return Path(target)


def write_json(target: str | os.PathLike, data: Any, *, default: Callable | None = None) -> Path:
    """``data`` as indented JSON (and a final newline), written atomically."""
    return write_text(target, json.dumps(data, indent=2, default=default) + "\n")


def write_jsonl(rows: Iterable[dict], target: str | os.PathLike, *, default: Callable | None = None) -> Path:
    """One JSON object per line (non-ASCII kept), written atomically."""
    return write_text(target, "".join(json.dumps(row, ensure_ascii=False, default=default) + "\n" for row in rows))
