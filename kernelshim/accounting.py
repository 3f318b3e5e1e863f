"""Hierarchical charging: the one implementation of "charging a principal charges each
ancestor too".

Usage (`banks.Usage`) is held per principal and counts its descendants' too. A charge
is checked against every limit along the chain first and applied only if all of them
allow it, so a refused charge changes nothing. Storage (space, inodes) over a limit is
QuotaExceeded; kernel objects (grants, caps, connections, shm, children) over a limit
are TooManyObjects. Refunds are never refused.

Storage usage is not stored: the metadata server recounts it from the volume at mount
(`recount_storage`), through the same walk, so it is exact after a crash.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .banks import OBJECT_BANKS, Principal, QuotaExceeded, TooManyObjects

#: storage banks: what the error says of each
_STORAGE = {"space": "space bank", "inodes": "inode bank"}


def check(p: Principal, amounts: Mapping[str, int]) -> None:
    """Raise unless p and each ancestor may hold `amounts` more (negative: a refund,
    always allowed)."""
    for q in p.chain():
        for kind, n in amounts.items():
            if n <= 0:
                continue
            lim = getattr(q.banks, kind)
            used = getattr(q.usage, kind)
            if lim is None or used + n <= lim:
                continue
            if kind in _STORAGE:
                unit = " bytes" if kind == "space" else ""
                raise QuotaExceeded(f"principal {q.name!r} is over its {_STORAGE[kind]} "
                                    f"({used} + {n} > {lim}{unit})")
            what = f"{used} bytes of shared memory" if kind == "shm" else f"{used} {kind}"
            raise TooManyObjects(f"principal {q.name!r} holds {what} of its limit {lim}")


def apply(p: Principal, amounts: Mapping[str, int]) -> None:
    """Add `amounts` to the usage of p and each ancestor, unchecked."""
    for q in p.chain():
        u = q.usage
        for kind, n in amounts.items():
            setattr(u, kind, getattr(u, kind) + n)


def charge(p: Principal, amounts: Mapping[str, int]) -> None:
    """Check, then apply: `amounts` charged to p and its ancestors, or an error and
    nothing changed."""
    check(p, amounts)
    apply(p, amounts)


def storage(space: int, inodes: int) -> dict[str, int]:
    return {k: v for k, v in (("space", space), ("inodes", inodes)) if v}


def kernel_object(kind: str, n: int) -> dict[str, int]:
    if kind not in OBJECT_BANKS:
        raise ValueError(f"not a kernel-object bank: {kind!r}")
    return {kind: n}


def recount_storage(principals: Iterable[Principal],
                    held: Iterable[tuple[Principal, int, int]]) -> None:
    """Set the storage usage of every principal of `principals` (all of the tree) from
    what each holds itself: `held` gives (principal, space, inodes), any principal any
    number of times; descendants count towards ancestors as in `charge`, unchecked (the
    volume holds it already, whatever the banks say now)."""
    for p in principals:
        p.usage.space = 0
        p.usage.inodes = 0
    for p, space, inodes in held:
        apply(p, storage(space, inodes))
