"""The pager's errors (one family under blockdev's root SluiceError)."""

from __future__ import annotations

import errno as _errno

from blockdev import SluiceError


class PagerError(SluiceError):
    """Root of the pager's own errors."""


class GuaranteeExceeded(PagerError):
    """The principals' memory guarantees (cache_min) add up to more than the pool:
    admitting them would promise frames the pager does not have."""

    errno = _errno.ENOSPC


class UnknownPolicy(PagerError):
    errno = _errno.EINVAL
