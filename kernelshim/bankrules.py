"""The rules a principal's banks must keep, checked before a change is made.

Limits (space, inodes, cache_max, io_limit, grants, caps, ..., parked, parked_bytes,
costly_rate) are ceilings: a child's
may not exceed its parent's (the tightest along the chain). Guarantees (cache_min,
io_reserve) are carved: the children's together may not exceed their parent's; root
without a guarantee of its own carves from the whole device (the layers below check
that against what they have: the pager's pool, the device's capacity). Asking for more
is an error, never a silent downgrade.

Pure functions over the tree's records (`banks.Principal`); the table calls them from
`add` and `set` (kernelshim/principals.py).
"""

from __future__ import annotations

from blockdev.units import format_rate, format_size_approx

from .banks import LIMIT_BANKS, OBJECT_BANKS, Banks, Principal, PrincipalError

#: float slack when adding reservations given in decimal and binary units
_EPS = 1e-9
#: banks counted in bytes: shown in binary units in messages (probe 27, F7: "has space
#: 2147483648, more than 1572864000")
_BYTE_BANKS = frozenset({"space", "cache_min", "cache_max", "shm", "parked_bytes"})


def _shown(bank: str, v: int) -> str:
    return format_size_approx(v) if bank in _BYTE_BANKS else str(v)


def effective(p: Principal, bank: str) -> int | None:
    """The tightest limit on `bank` along p's chain (None: no limit)."""
    vals = [getattr(q.banks, bank) for q in p.chain() if getattr(q.banks, bank) is not None]
    return min(vals) if vals else None


def effective_rate(p: Principal, unit: str) -> float | None:
    """The tightest io_limit in `unit` ('iops' or 'bps') along p's chain."""
    vals = [q.banks.io_limit.get(unit) for q in p.chain() if q.banks.io_limit is not None]
    vals_f = [v for v in vals if v is not None]
    return min(vals_f) if vals_f else None


def check_child_banks(parent: Principal, banks: Banks, *, exclude: Principal | None,
                      parent_is_root: bool) -> None:
    """Raise PrincipalError unless a child of `parent` may have `banks` (`exclude`: the
    child itself when its banks change, whose current guarantees do not count)."""
    pb = parent.banks
    for k in LIMIT_BANKS:
        mine, theirs = getattr(banks, k), effective(parent, k)
        if theirs is not None and mine is not None and mine > theirs:
            raise PrincipalError(f"{k} {_shown(k, mine)} exceeds what parent "
                                 f"{parent.name!r} holds ({_shown(k, theirs)})")
    siblings = [c for c in parent.children if c is not exclude]
    if banks.cache_min:
        carved = sum(c.banks.cache_min for c in siblings)
        avail = pb.cache_min if not parent_is_root or pb.cache_min else None
        if avail is not None and carved + banks.cache_min > avail:
            raise PrincipalError(
                f"cache_min {format_size_approx(banks.cache_min)} exceeds what parent "
                f"{parent.name!r} has left to guarantee "
                f"({format_size_approx(avail - carved)})")
        mx = effective(parent, "cache_max")
        if banks.cache_max is not None and banks.cache_min > banks.cache_max:
            raise PrincipalError(f"cache_min {format_size_approx(banks.cache_min)} exceeds "
                                 f"cache_max {format_size_approx(banks.cache_max)} (a "
                                 "guarantee above the ceiling)")
        if mx is not None and banks.cache_min > mx:
            raise PrincipalError(f"cache_min {format_size_approx(banks.cache_min)} exceeds "
                                 f"parent's cache_max ({format_size_approx(mx)})")
    if banks.io_reserve is not None:
        for unit in banks.io_reserve.units():
            mine_r = banks.io_reserve.get(unit)
            assert mine_r is not None
            theirs_r = pb.io_reserve.get(unit) if pb.io_reserve is not None else None
            carved_r = sum(c.banks.io_reserve.get(unit) or 0.0 for c in siblings
                           if c.banks.io_reserve is not None)
            if theirs_r is not None:
                if carved_r + mine_r > theirs_r * (1 + _EPS):
                    raise PrincipalError(
                        f"io_reserve {format_rate(unit, mine_r)} exceeds what parent "
                        f"{parent.name!r} has left to reserve "
                        f"({format_rate(unit, max(0.0, theirs_r - carved_r))})")
            elif not parent_is_root or (pb.io_reserve is not None and not pb.io_reserve.empty):
                raise PrincipalError(
                    f"parent {parent.name!r} has no {'IOPS' if unit == 'iops' else 'bytes/s'}"
                    " io_reserve to carve from")
    if banks.io_limit is not None:
        for unit in banks.io_limit.units():
            lim = effective_rate(parent, unit)
            mine_l = banks.io_limit.get(unit)
            assert mine_l is not None
            if lim is not None and mine_l > lim:
                raise PrincipalError(f"io_limit {format_rate(unit, mine_l)} exceeds parent's "
                                     f"{format_rate(unit, lim)}")
    check_own_banks(banks)


def check_own_banks(banks: Banks) -> None:
    """The checks that need no tree: no negative bank, a positive weight."""
    if banks.io_weight <= 0:
        raise PrincipalError("io_weight must be positive")
    for k in ("space", "inodes", "cache_max", *OBJECT_BANKS, "parked", "parked_bytes"):
        v = getattr(banks, k)
        if v is not None and v < 0:
            raise PrincipalError(f"{k} must not be negative")
    if banks.costly_rate is not None and banks.costly_rate < 1:
        # (a rate of 0 would hold a `stats` for ever; to refuse, there is nothing to set)
        raise PrincipalError("costly_rate must be at least 1 (operations a second)")


def check_children_fit(p: Principal, banks: Banks, *, is_root: bool) -> None:
    """Raise PrincipalError unless p's children still fit under `banks` (p's new banks):
    their limits no higher, their guarantees together no more (root without a
    guarantee of its own: no bound here)."""
    for c in p.children:
        for k in LIMIT_BANKS:
            mine, theirs = getattr(c.banks, k), getattr(banks, k)
            if mine is not None and theirs is not None and mine > theirs:
                raise PrincipalError(f"child {c.name!r} has {k} {_shown(k, mine)}, more "
                                     f"than {_shown(k, theirs)}")
    carved = sum(c.banks.cache_min for c in p.children)
    if carved > banks.cache_min and (not is_root or banks.cache_min):
        raise PrincipalError(f"children of {p.name!r} hold cache_min "
                             f"{format_size_approx(carved)}, more than "
                             f"{format_size_approx(banks.cache_min)}")
    reserved = [c.banks.io_reserve for c in p.children if c.banks.io_reserve is not None]
    r = banks.io_reserve
    if reserved and (r is not None or not is_root):
        for unit in ("iops", "bps"):
            total = sum(x.get(unit) or 0.0 for x in reserved)
            have = r.get(unit) if r is not None else None
            if total and (have is None or total > have * (1 + _EPS)):
                raise PrincipalError(
                    f"children of {p.name!r} reserve {format_rate(unit, total)}, more than "
                    f"{format_rate(unit, have) if have is not None else 'nothing'}")
    for c in p.children:
        lim = c.banks.io_limit
        if lim is None or banks.io_limit is None:
            continue
        for unit in lim.units():
            mine_l, theirs_l = lim.get(unit), banks.io_limit.get(unit)
            if mine_l is not None and theirs_l is not None and mine_l > theirs_l:
                raise PrincipalError(f"child {c.name!r} has io_limit {lim}, more than "
                                     f"{banks.io_limit}")
