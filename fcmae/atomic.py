"""Files written whole or not at all: every file this package writes goes through here, so a
crash, a signal or a full disk never leaves a truncated file under its final name."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

TEMP_SUFFIX = ".fcmae-tmp"


class WriteError(OSError):
    """A file could not be written (full disk, read-only folder, …); the previous one is intact."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, then rename it over
    ``path``: a crash mid-write never leaves a truncated file at ``path``."""
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.chmod(tmp_name, 0o666 & ~_umask())   # mkstemp makes 0600; honour the umask instead
        with os.fdopen(handle, "wb") as tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):   # full disk, read-only folder, ...: one line, old file intact
            raise WriteError(f"cannot write {path}: {error.strerror or error}; "
                             f"the previous {path.name}, if any, is unchanged") from None
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that interrupted :func:`atomic_write` calls of earlier runs
    left in ``folder`` (hidden ``.NAME.*.fcmae-tmp``); returns what was removed."""
    stale = sorted(Path(folder).glob(f".*{TEMP_SUFFIX}")) if Path(folder).is_dir() else []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def atomic_folder(path: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Call ``fill(folder)`` on a temporary folder beside ``path``, then move it to ``path``
    (an existing ``path`` is replaced only once the new folder is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    old = path.with_name(f".{path.name}.old")
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        for file in tmp.iterdir():
            os.chmod(file, 0o666 & ~_umask())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda file: torch.save(obj, file))


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """``path`` becomes another name of the file ``source`` (a hard link: no second copy on
    disk; a copy where the file system has no hard links), replacing ``path`` atomically."""
    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {error.strerror or error}; "
                         f"{source.name} holds the same state") from None
