"""Durable replacement of small files: the volume's JSON headers and state files.

A crash (or power loss) while one of them is replaced must leave either the old file or
the new one, whole: never a truncated file, never neither. The recipe is the usual one:
write a temporary file in the same directory, fsync it, rename it over the target, fsync
the directory (the rename is only durable once the directory is). This lives in
blockdev, the bottom layer, so that every layer above may use it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

#: mode of every file the volume holds (the directory is 0700): other users of the
#: host must not read the device, the metadata or the principals
PRIVATE_FILE_MODE = 0o600


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the directory's entries (creations, renames, unlinks) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str | os.PathLike[str], data: bytes, *,
                  mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace `path` with `data` so that after a crash it holds the old or the new
    contents, whole; the new file has exactly `mode` whatever the umask.

    Blocks (two fsyncs): call it from a worker thread where latency matters. Raises
    OSError; on failure the old file is left as it was and no temporary file remains.
    """
    path = Path(path)
    directory = path.parent
    # A name of our own: O_EXCL never follows or reuses what someone else put there.
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits away
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)
