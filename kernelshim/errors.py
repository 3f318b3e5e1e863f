"""The shim kernel's error family. Each names the one errno it becomes at the FUSE
boundary and the typed error a socket client receives."""

from __future__ import annotations

import errno as _errno

from .rooterror import SluiceError  # light: the client library imports this module


class ShimError(SluiceError):
    errno = _errno.EIO


class GrantRevoked(ShimError):
    """The grant was revoked (its file was truncated, unlinked, re-permissioned or
    renamed over); the holder must ask the filesystem for a new one."""

    errno = _errno.ESTALE


class RightsError(ShimError):
    """The capability lacks a right the operation requires, or a mint asked for rights
    its parent does not hold."""

    errno = _errno.EACCES


class NotAllocated(ShimError):
    """A write touches file blocks the grant has no extents for (ask for a write layout)."""

    errno = _errno.EINVAL


class Sealed(NotAllocated):
    """A write touches blocks whose data a committed transaction exposes: they are never
    written in place (a crash could roll the metadata back onto a half-changed block).
    Ask for a write layout: the filesystem relocates them to fresh blocks."""


class BadRequest(ShimError):
    """A request with impossible arguments (negative offset, and the like)."""

    errno = _errno.EINVAL


# -- principals and their banks (kernelshim/banks.py re-exports these) ---------------

class PrincipalError(SluiceError):
    """A bad request about principals (unknown name, bad bank, not allowed)."""

    errno = _errno.EINVAL


class NoSuchPrincipal(PrincipalError):
    errno = _errno.ENOENT


class PrincipalExists(PrincipalError):
    errno = _errno.EEXIST


class NotAllowed(PrincipalError):
    errno = _errno.EPERM


class PrincipalsReadOnly(PrincipalError):
    """The volume is read-only (mounted so, or failed): the principal tree, which is
    stored in it, cannot change."""

    errno = _errno.EROFS


class QuotaExceeded(SluiceError):
    """The principal (or an ancestor) would go over a storage bank limit."""

    errno = _errno.EDQUOT


class TooManyObjects(SluiceError):
    """The principal holds as many kernel objects of a kind (grants, capability slots,
    connections, shared memory, child principals) as its bank allows."""

    errno = _errno.EMFILE
