"""Typed ids shared by every layer (blockdev is the lowest, so they live here)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, NewType

BlockNo = NewType("BlockNo", int)
"""A block number on the device (0 .. nblocks-1)."""

PrincipalId = NewType("PrincipalId", int)
"""The principal a request is charged to."""

ROOT_PRINCIPAL = PrincipalId(0)
"""The root of the principal tree; requests with no other owner are charged here."""


@dataclasses.dataclass(frozen=True, slots=True)
class BankNode:
    """One principal's memory and I/O banks as the layers that enforce them see them:
    the pager its memory bank, the scheduler its I/O bank. The principal tree itself
    (names, owners, storage and kernel-object banks, admin policy) stays in kernelshim;
    the layers below get a snapshot of this shape through `configure_banks` at mount
    and after every principal change."""

    id: PrincipalId
    #: the parent's id (None for the root); the tree is hierarchical for both banks
    parent: PrincipalId | None
    name: str
    #: memory bank in bytes: guaranteed (protected, memcg memory.min) and ceiling
    cache_min: int = 0
    cache_max: int | None = None
    #: I/O bank: reservation and limit in operations/s and in bytes/s (None: none),
    #: and a relative weight for what is left over
    io_reserve_iops: float | None = None
    io_reserve_bps: float | None = None
    io_weight: int = 100
    io_limit_iops: float | None = None
    io_limit_bps: float | None = None


BankTree = Mapping[PrincipalId, BankNode]
"""A snapshot of every principal's banks, keyed by id; parents are present for every
child. Immutable once handed down: a change sends a whole new snapshot."""
