"""The filesystem's error family.

Every error sluice raises on purpose derives from SluiceError and names its errno;
the FUSE boundary (fs/operations.py) answers with that errno, the control socket
sends it in a typed error reply.
"""

from __future__ import annotations

import errno as _errno

from kernelshim import SluiceError


class FsError(SluiceError):
    errno = _errno.EIO


class NotFound(FsError):
    errno = _errno.ENOENT


class Exists(FsError):
    errno = _errno.EEXIST


class NotEmpty(FsError):
    errno = _errno.ENOTEMPTY


class NotADirectory(FsError):
    errno = _errno.ENOTDIR


class IsADirectory(FsError):
    errno = _errno.EISDIR


class SymlinkLoop(FsError):
    errno = _errno.ELOOP


class NameTooLong(FsError):
    errno = _errno.ENAMETOOLONG


class NoSpace(FsError):
    errno = _errno.ENOSPC


class InvalidArgument(FsError):
    errno = _errno.EINVAL


class PermissionDenied(FsError):
    errno = _errno.EACCES


class NotPermitted(FsError):
    errno = _errno.EPERM


class NoData(FsError):
    errno = _errno.ENODATA


class OutOfRange(FsError):
    errno = _errno.ERANGE


class TooBig(FsError):
    errno = _errno.E2BIG


class FileTooLarge(FsError):
    errno = _errno.EFBIG


class NotSupported(FsError):
    errno = _errno.EOPNOTSUPP


class NoSuchOffset(FsError):
    """SEEK_DATA/SEEK_HOLE at or past the end of the file, or no data after it."""
    errno = _errno.ENXIO


class TooManyLinks(FsError):
    errno = _errno.EMLINK


class ReadOnly(FsError):
    """The volume is read-only: mounted so, or turned so after a metadata or device
    failure (see FileSystem.fail)."""

    errno = _errno.EROFS


class WriteFailed(FsError):
    """Data written through this open file may not have reached the device (a failed
    barrier or commit); reported once per open file, as Linux reports write-back errors."""

    errno = _errno.EIO


class BadHandle(FsError):
    errno = _errno.EBADF


class Damaged(FsError):
    """An inode's row in meta.db makes no sense (a damaged or crafted volume): requests
    for it get EIO and the mount stays up; `sluice fsck --repair` fixes the row."""

    errno = _errno.EIO


class VolumeError(FsError):
    """A volume cannot be made, opened or mounted (a user mistake or a damaged volume)."""

    errno = _errno.EINVAL
