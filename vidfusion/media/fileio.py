"""The one atomic writer: every file and folder vidfusion writes appears complete or not at all, under a temp name
beside it until then, with the permissions the umask gives any program's files (0644 / 0755 under umask 022).

    with atomic_file(path, suffix=".mp4") as tmp:   # write tmp however you like (an encoder, save_file, ...)
        ...
    with atomic_folder(path, replace=True) as tmp:  # fill the folder; it replaces `path` whole
        ...

Temp names start with TEMP_PREFIX, so a cleanup after a killed run removes only vidfusion's own leftovers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".vidfusion-tmp."
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask: read from /proc/self/status where the kernel reports it (Linux 4.7+), without touching
    it; elsewhere by setting and restoring it under a lock (os has no read-only call)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _publish(path: Path) -> None:
    """Give a finished temp file (or folder tree) the modes open()/mkdir() would have: 0666 / 0777 minus umask.
    mkstemp / mkdtemp / safetensors' save_file create owner-only (0600 / 0700) entries."""
    mask = current_umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp", durable: bool = False) -> Iterator[Path]:
    """Yield a temp path in `path`'s folder (ending in `suffix`, for writers that pick a format by extension);
    on success it is renamed over `path`, on any error removed (no file at all, not an empty one). `durable`: the
    file's data and then its folder's entry are flushed to the disk (fsync) before returning, so the file survives
    a power loss from then on."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(Path(tmp))
        if durable:
            _fsync(Path(tmp))
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent, directory=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success it becomes `path` (an existing `path` is removed first
    when `replace`, else the rename fails if it is not empty), on any error it is removed."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent))
    try:
        yield tmp
        _publish(tmp)
        if replace and path.exists():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> Path:
    """Write `data` to `path` atomically (and `durable`: flushed to the disk, see atomic_file); returns the path."""
    with atomic_file(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders a killed vidfusion run left in `folder` (only names with TEMP_PREFIX:
    a user's own hidden files stay); returns what was removed."""
    removed = []
    for entry in Path(folder).glob(f"{TEMP_PREFIX}*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
