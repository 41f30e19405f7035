"""File-system helpers shared by saving and reading: all-or-nothing writes, refusing non-regular files, and a
file's SHA-256."""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import Optional


def regular_file_problem(path) -> Optional[str]:
    """Why ``path`` cannot be read as a regular file (``None`` if it can). Checked with ``stat`` before any
    open, because opening a FIFO for reading blocks until a writer appears: a hang, not an error."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"no such file {path}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    return None


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new empty hidden file beside ``path`` and its mode: created with 0o666, so the umask decides the mode
    (not mkstemp's 0600), without reading or changing the process-wide umask."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            os.close(fd)
            return tmp, stat.S_IMODE(os.stat(tmp).st_mode)
        except BaseException:
            _unlink_if_present(tmp)
            raise
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def fsync_path(path) -> None:
    """fsync a file or a directory (a directory's entry for a renamed file is durable only after this)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory; the file data itself was synced
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path, write) -> None:
    """Write ``path`` through ``write(tmp_name)``, fsync, rename: readers see the old file or the whole new one.

    The temporary file is hidden (``.<name>.<random>.tmp``) in the same directory and removed on any
    exception, KeyboardInterrupt included; the rename is the commit point, then the directory is fsynced."""
    path = Path(path)
    tmp, mode = _create_temp(path)
    try:
        write(str(tmp))
        os.chmod(tmp, mode)  # a writer may replace the file with a 0600 one (safetensors 0.8 does)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _unlink_if_present(tmp)
        raise
    fsync_path(path.parent)


def _unlink_if_present(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
