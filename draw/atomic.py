"""The one way this project writes a file: to a temporary file beside it, then an atomic rename.

A crash, a kill or a full disk at any moment leaves either the old file or the new one under the
real name, never a half-written one. Temporary files are named `.NAME.PID.RANDOM.tmp`, are created
with the mode the umask gives (like any other output), and are removed when the write fails;
`remove_stale_temporaries` clears those a killed process left behind.
"""

import os
import pathlib
import re
import secrets
import time
from collections.abc import Callable
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def temp_path(target: pathlib.Path) -> pathlib.Path:
    """A fresh empty file next to target, created exclusively (mode from the umask)."""
    while True:
        temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            temp.open("xb").close()
            return temp
        except FileExistsError:
            continue


def atomic_write(path, write: Callable[[BinaryIO], object], *, durable: bool = True) -> pathlib.Path:
    """write(file) to a temporary file next to `path`, then os.replace it onto `path`.

    durable: fsync the file before the rename and the directory after it, so that the new content, and the
    name pointing at it, survive a power loss too.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(path)
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(temp, path)
        if durable:
            _fsync_directory(path.parent)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a write's error (a full disk) names no file: the target
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        temp.unlink(missing_ok=True)
    return path


def _fsync_directory(directory: pathlib.Path) -> None:
    """Flush a directory's entries (a rename in it) to disk; where a directory cannot be opened (not POSIX), nothing."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path, text: str, *, durable: bool = True) -> pathlib.Path:
    return atomic_write(path, lambda f: f.write(text.encode()), durable=durable)


_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))  # temp_path's names


def remove_stale_temporaries(directory, *, name: str | None = None, older_than_s: float | None = None) -> list[pathlib.Path]:
    """Remove the temporary files this module left in `directory` (`.NAME.PID.RANDOM.tmp`, of any file written
    there, or of `name` alone) whose writer process is gone; returns their paths. Other files, hidden `.tmp`
    ones too, stay. `older_than_s`: only those last written that long ago, for a directory that processes on
    other machines may write into (a shared data directory: their pids mean nothing here)."""
    removed = []
    for temp in sorted(pathlib.Path(directory).glob(f".*{TEMP_SUFFIX}")):
        named = _TEMP_NAME.fullmatch(temp.name)
        if named is None or name not in (None, named["name"]) or not temp.is_file() or _alive(int(named["pid"])):
            continue  # not one of ours (or not of `name`), or its writer is still at work
        if older_than_s is not None and time.time() - temp.stat().st_mtime < older_than_s:
            continue
        temp.unlink(missing_ok=True)
        removed.append(temp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
