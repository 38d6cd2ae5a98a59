"""Atomic writes: build a file or folder under a temporary name, then `os.replace` it into place.

A crash or an exception part-way through never leaves a half-written result under the real
name: either the old content is still there or the complete new one is. Temporaries live in
the destination's own folder (dot-prefixed, so globs like `step_*.pt` skip them) because
`os.replace` is only atomic within one file system; on an error they are removed. A temporary
name carries the writer's process id, so the temporaries of a run that was killed (SIGKILL,
power loss) are recognised and removed by the next write to the same destination, while those
of a live concurrent writer are left alone. Results get the permissions the umask gives
(`mkstemp`/`mkdtemp` would otherwise leave them private, 0600/0700).

`check_out_dir` is the one check of an output folder, run by every command before any work.
Writers that report a failed write as something other than OSError (`torch.save` raises a
RuntimeError "file write failed", safetensors its own error on a full disk) are translated
into the OSError they stand for (`as_os_error`) by every context manager here, so a full disk
is the same one message whichever library was writing.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moe_unlearn.errors import BadInputError

__all__ = ["as_os_error", "atomic_dir", "atomic_path", "check_out_dir", "clean_dead_temps", "clean_stale_temps", "is_out_of_space",
           "staged_files", "write_json", "write_text"]

# .<dest name>.<kind>-<pid>-<8 random characters of mkstemp/mkdtemp>[suffix]
_TEMP_RE = re.compile(r"^\.(?P<dest>.+)\.(?:tmp|staging|file|old)-(?P<pid>\d+)-[a-z0-9_]{8}(?:\.[^/]*)?$")


# what writers that do not raise OSError say when the file system refused a write
_WRITE_FAILED_RE = re.compile(r"write failed|No space left|StorageFull|os error 28|Disk quota|IoError|"
                              r"Input/output error|unexpected pos", re.IGNORECASE)


def as_os_error(exc: BaseException, path: str | os.PathLike) -> BaseException:
    """`exc` itself, or, for a non-OSError a writer raised because the write failed (torch.save's
    RuntimeError, safetensors' error), an OSError for `path` (ENOSPC when the disk is full, else EIO)."""
    if isinstance(exc, OSError) or not isinstance(exc, Exception) or not _WRITE_FAILED_RE.search(str(exc)):
        return exc
    full = bool(re.search(r"space|StorageFull|os error 28|quota", str(exc), re.IGNORECASE))
    try:
        full = full or shutil.disk_usage(Path(path).parent).free < 2**20
    except OSError:
        pass
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code), os.fspath(path))


def _reraise(exc: BaseException, path: str | os.PathLike) -> None:
    translated = as_os_error(exc, path)
    if translated is exc:
        raise exc
    raise translated from exc


def _prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def _dead_writers_temp(entry: Path, dest_name: str | None = None) -> bool:
    """Whether `entry` is a temporary of this module whose writer no longer runs (of `dest_name` if given)."""
    m = _TEMP_RE.match(entry.name)
    if m is None or (dest_name is not None and m.group("dest") != dest_name):
        return False
    return not _alive(int(m.group("pid")))


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def clean_stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that writers of `dest` which no longer run left beside it; returns them."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed = [e for e in dest.parent.iterdir() if _dead_writers_temp(e, dest.name)]
    for entry in removed:
        _remove(entry)
    return removed


def clean_dead_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove every temporary in `folder` (of any destination) whose writer no longer runs; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [e for e in folder.iterdir() if _dead_writers_temp(e)]
    for entry in removed:
        _remove(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, *, directory: bool) -> None:
    """Give a finished temporary the mode a plain open()/mkdir() would have had under the umask."""
    mask = _umask()
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)
    if directory:
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                fp = os.path.join(root, f)
                if not os.path.islink(fp) and (os.stat(fp).st_mode & 0o777) == 0o600:  # a nested mkstemp
                    os.chmod(fp, 0o666 & ~mask)


@contextmanager
def atomic_path(dest: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield an (empty, existing) temp file path beside `dest` for writers that want a path
    (savefig, torch.save, safetensors); on a clean exit it replaces `dest`, on an error it is
    removed and `dest` is untouched. Parent folders are created. The suffix defaults to
    `dest`'s, so writers that infer the format from the extension still see it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(dest, "file"), suffix=dest.suffix if suffix is None else suffix,
                               dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish_mode(Path(tmp), directory=False)
        os.replace(tmp, dest)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _reraise(exc, dest)


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
    `.<name>.old-<pid>-...`, the new one renamed in, and the old one deleted."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(dest, "tmp"), dir=dest.parent))
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        if dest.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=_prefix(dest, "old"), dir=dest.parent))
            old.rmdir()
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
            return
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _reraise(exc, dest)


@contextmanager
def staged_files(out_dir: str | os.PathLike, *, last: str | None = None,
                 owned: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging folder for several outputs that belong together; only when the block exits
    cleanly is each of its entries moved into `out_dir`, replacing a file or folder of the same
    name (entry `last`, if given, goes last: a completion marker). Other entries already in
    `out_dir` are kept, except those named in `owned` (the outputs a run of this kind can write) that this
    run did not write: they are removed, so a stale file of an earlier run never sits beside the new
    ones. On an error nothing moves, and the moves themselves are all-or-nothing: the entries they
    replace or remove are first moved aside into a backup folder in `out_dir`; if a move fails, what was
    moved in is taken out again and the backups are put back (`_swap_in`). A missing `out_dir` is created
    by renaming the whole staging folder into place; an existing one gets the staging folder inside it,
    so the moves stay on its file system. The staging and backup folders are always removed."""
    out = Path(out_dir)
    existed = out.exists()
    if not existed:
        out.parent.mkdir(parents=True, exist_ok=True)
    key = out / "files" if existed else out  # the staging folder's name: inside out_dir, or beside it
    clean_stale_temps(key)
    stage = Path(tempfile.mkdtemp(prefix=_prefix(key, "staging"), dir=key.parent))
    try:
        yield stage
        _publish_mode(stage, directory=True)
        if not out.exists():
            os.replace(stage, out)
            return
        _swap_in(stage, out, owned=owned, last=last)
    except BaseException as exc:
        _reraise(exc, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap_in(stage: Path, out: Path, *, owned: tuple[str, ...], last: str | None) -> None:
    """Move every entry of `stage` into `out` (and take away the `owned` names the stage lacks), all or
    nothing: replaced entries wait in a backup folder until every move succeeded."""
    written = {entry.name for entry in stage.iterdir()}
    backup = Path(tempfile.mkdtemp(prefix=_prefix(out / "files", "old"), dir=out))
    aside: list[str] = []
    moved: list[str] = []
    try:
        for name in sorted(written | {n for n in owned if (out / n).exists() or (out / n).is_symlink()}):
            if (out / name).exists() or (out / name).is_symlink():
                os.replace(out / name, backup / name)
                aside.append(name)
        for entry in sorted(stage.iterdir(), key=lambda p: (p.name == last, p.name)):
            os.replace(entry, out / entry.name)
            moved.append(entry.name)
    except BaseException:
        for name in moved:  # take the new entries out again, then put the old ones back
            os.replace(out / name, stage / name)
        for name in aside:
            os.replace(backup / name, out / name)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def check_out_dir(out: str | os.PathLike, *, model_dirs: tuple[str | os.PathLike | None, ...] = (),
                  must_be_empty: bool = False, what: str = "--out", need_bytes: int = 0) -> Path:
    """The one check of an output folder, done before any work; returns it resolved.

    Refused with one message each: the current directory or a file system root (a named sub-folder is
    needed, since outputs are renamed into place beside it), a path that exists and is not a folder, a
    folder inside (or equal to) one of `model_dirs` (the originals must stay intact), a non-empty folder when
    `must_be_empty`, a place that is not writable, and a disk with less than `need_bytes` (plus 1 MiB) free.
    Stale temporaries of killed runs there are removed."""
    raw = Path(out)
    path = raw.expanduser().resolve()
    if str(out).strip() == "" or path == Path.cwd().resolve() or path.parent == path:
        raise BadInputError(f"{what} {str(out)!r} is the current directory or a root; name a new sub-directory")
    for model_dir in model_dirs:
        if model_dir is None:
            continue
        m = Path(model_dir).expanduser().resolve()
        if path == m or m in path.parents:
            raise BadInputError(f"{what} {raw} is inside the model's own directory {model_dir}; choose a directory "
                                "outside it (the original model must stay intact)")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise BadInputError(f"{what} {raw} exists and is not a directory; choose a new directory")
        if must_be_empty and any(p for p in path.iterdir() if not _dead_writers_temp(p)):
            raise BadInputError(f"{what} {raw} already exists and is not empty; choose a new directory")
    anchor = path
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise BadInputError(f"{what} {raw}: {anchor} is a file, so the directory cannot be created there")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise BadInputError(f"{what} {raw}: {anchor} is not writable; choose another place")
    clean_stale_temps(path)
    if path.is_dir():
        clean_dead_temps(path)
    free = shutil.disk_usage(anchor).free
    if free < need_bytes + 2**20:
        raise BadInputError(f"{what} {raw}: only {free / 2**20:.1f} MiB free on its disk, about "
                            f"{(need_bytes + 2**20) / 2**20:.1f} MiB needed; free some space or choose another disk")
    return path


def is_out_of_space(exc: BaseException) -> bool:
    """Whether an OSError says the disk (or quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
