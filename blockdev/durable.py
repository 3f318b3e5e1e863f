"""Durable replacement of small files (the volume's JSON headers and state files), and
reading them back as the hostile input they may be.

A crash (or power loss) while one of them is replaced must leave either the old file or
the new one, whole: never a truncated file, never neither. The recipe is the usual one:
write a temporary file in the same directory, fsync it, rename it over the target, fsync
the directory (the rename is only durable once the directory is). This lives in
blockdev, the bottom layer, so that every layer above may use it.

Every file of a volume directory is input from someone else (a volume handed to root,
a crash, bit rot): `read_json_file` and `open_store_file` never follow a symbolic link
(a store file replaced by a link to a file root owns elsewhere is refused, never read or
written through), never wait on a FIFO, never read more than a bound, and say in one
line which file is wrong and how (`StoreFileError`).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from pathlib import Path

from .errors import FormatError

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


#: the most a small JSON file of a volume (volume.json, device.json, principals.json,
#: mount.json) may hold: a thousand principals take about 300 KiB
MAX_JSON_FILE = 16 << 20


class StoreFileError(FormatError):
    """A file of the volume directory is not what it must be: a symbolic link, a FIFO or
    a directory, too large, or not valid JSON. The message names the file."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_store_file(path: str | os.PathLike[str], flags: int = os.O_RDONLY, *,
                    mode: int = PRIVATE_FILE_MODE, block_device: bool = False) -> int:
    """Open a file of the volume directory: without following a symbolic link, without
    waiting on a FIFO, and only if it is a regular file (or, with `block_device`, a
    block device). FileNotFoundError as the host says it; StoreFileError (one line,
    naming the file) for anything else that is not such a file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            try:
                what = _kind(os.lstat(path).st_mode)
            except OSError:
                what = os.strerror(exc.errno)
            raise StoreFileError(f"{os.fspath(path)} is {what}, not a regular file: "
                                 "refusing to use it") from None
        raise
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or block_device and stat.S_ISBLK(st.st_mode)):
            raise StoreFileError(f"{os.fspath(path)} is {_kind(st.st_mode)}, not a regular "
                                 "file: refusing to use it")
        # Back to blocking I/O (O_NONBLOCK only kept open() from waiting on a FIFO).
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_json_file(path: str | os.PathLike[str], *, limit: int = MAX_JSON_FILE) -> object:
    """The JSON value in a small file of the volume directory (see `open_store_file`).
    FileNotFoundError when it is missing; StoreFileError, naming the file, when it is
    not a regular file, larger than `limit`, not UTF-8 or not valid JSON (including
    nesting too deep for the parser)."""
    fd = open_store_file(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise StoreFileError(f"{os.fspath(path)} is {size} bytes, more than the "
                                 f"{limit} such a file may hold")
        chunks: list[bytes] = []
        got = 0
        while (chunk := os.read(fd, limit + 1 - got)):
            chunks.append(chunk)
            got += len(chunk)
            if got > limit:
                raise StoreFileError(f"{os.fspath(path)} holds more than the {limit} "
                                     "bytes such a file may hold")
    finally:
        os.close(fd)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except RecursionError:
        raise StoreFileError(f"{os.fspath(path)} is not valid JSON: nested too deeply"
                             ) from None
    except ValueError as exc:  # (json.JSONDecodeError, UnicodeDecodeError, int digits)
        raise StoreFileError(f"{os.fspath(path)} is not valid JSON: {exc}") from None
