"""The project's root exception and the block device's error family.

`SluiceError` lives here because blockdev is the lowest layer: every other package
may import it, and it may import none of them.
"""

from __future__ import annotations

import errno as _errno


class SluiceError(Exception):
    """Root of every error sluice raises on purpose.

    `errno` is the one errno this error becomes at the FUSE boundary.
    """

    errno: int = _errno.EIO


class DeviceError(SluiceError):
    """The block device could not serve a request.

    `block` is the first device block of the failed request (None when the failure
    belongs to no block, e.g. a flush). `errno` defaults to the class's; an OSError of
    the backing store passes its own (EIO, ENOSPC, ...) so the FUSE boundary answers
    with what the host said.
    """

    errno = _errno.EIO

    def __init__(self, message: str, *, block: int | None = None,
                 errno: int | None = None) -> None:
        super().__init__(message)
        self.block = block
        if errno is not None:
            self.errno = errno


class DeviceFull(DeviceError):
    """The host filesystem under a sparse backing file has no space for a block:
    ENOSPC to the writer, as a full disk would answer."""

    errno = _errno.ENOSPC


class ChecksumError(DeviceError):
    """A block's contents do not match the checksum stored beside it."""

    errno = _errno.EIO

    def __init__(self, block: int, count: int = 1) -> None:
        super().__init__(f"checksum mismatch in device block {block}"
                         + (f" (of {count} read)" if count > 1 else ""), block=block)


class OutOfRange(DeviceError):
    """A request names blocks past the end of the device."""

    errno = _errno.EINVAL


class FormatError(DeviceError):
    """A device header is missing, unreadable or of an unknown version."""

    errno = _errno.EINVAL


class OverReserved(SluiceError):
    """I/O reservations that add up to more than the device can serve (a principal
    change or a mount is refused; the message names each reservation's share)."""

    errno = _errno.EINVAL
