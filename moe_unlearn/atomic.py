"""Atomic writes: build a file or folder under a temporary name, then `os.replace` it into place.

A crash or an exception part-way through never leaves a half-written result under the real
name: either the old content is still there or the complete new one is. Temporaries live in
the destination's own folder (dot-prefixed, so globs like `step_*.pt` skip them) because
`os.replace` is only atomic within one file system; on an error they are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_path", "staged_files", "write_json", "write_text"]


@contextmanager
def atomic_path(dest: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield an (empty, existing) temp file path beside `dest` for writers that want a path
    (savefig, torch.save, safetensors); on a clean exit it replaces `dest`, on an error it is
    removed and `dest` is untouched. Parent folders are created. The suffix defaults to
    `dest`'s, so writers that infer the format from the extension still see it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=dest.suffix if suffix is None else suffix,
                               dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(dest: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `dest` atomically; returns `dest` as a Path."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(dest)


def write_json(dest: str | os.PathLike, obj: Any, *, indent: int | None = 2, **dumps_kwargs: Any) -> Path:
    """Write `obj` as JSON (plus a final newline) to `dest` atomically. Serialization happens before
    anything touches the disk, so an unserializable object leaves no temp file either."""
    return write_text(dest, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


@contextmanager
def atomic_dir(dest: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `dest` to fill; on a clean exit it is renamed to `dest`, on an
    error it is deleted. An existing `dest` must be an empty folder (it is removed first; a
    non-empty one raises OSError) unless `replace=True`: then the old folder is moved aside to
    `.<name>.old`, the new one renamed in, and the old one deleted."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists() and replace:
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
            return
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_files(out_dir: str | os.PathLike, *, last: str | None = None) -> Iterator[Path]:
    """Yield a staging folder for several outputs that belong together; only when the block exits
    cleanly is each of its entries moved into `out_dir`, replacing a file or folder of the same
    name (entry `last`, if given, goes last: a completion marker). Other entries already in
    `out_dir` are kept. On an error nothing moves. A missing `out_dir` is created by renaming
    the whole staging folder into place; an existing one gets the staging folder inside it, so
    the moves stay on its file system. The staging folder is always removed."""
    out = Path(out_dir)
    existed = out.exists()
    if not existed:
        out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out if existed else out.parent))
    try:
        yield stage
        if not out.exists():
            os.replace(stage, out)
            return
        for entry in sorted(stage.iterdir(), key=lambda p: (p.name == last, p.name)):
            target = out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
