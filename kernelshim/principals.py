"""Principals and their banks: who is charged for what, and how much each may hold.

A tree of principals rooted at `root`. Each has banks carved from its parent's:

- storage: `space` (bytes: data blocks, plus a fixed cost per directory entry) and
  `inodes`;
- memory: cache frames, `cache_min` (guaranteed) and `cache_max` (ceiling), in bytes;
- I/O: `io_reserve`, `io_weight`, `io_limit` (enforced by the device's scheduler); a
  reservation or a limit is a `Rate` in IOPS, in bytes/s or both (the tighter applies);
- kernel objects: `grants` (open grants), `caps` (capability slots), `connections`
  (control-socket connections acting for it), `shm` (bytes of shared buffers its
  connections have attached) and `children` (principals below it, at any depth).

Every new principal gets the kernel-object defaults below (DEFAULT_*); root (the
owner of the whole device) has none of its own, so the shim server's global caps bound
it. Root may change any principal's banks (`principal_set`); an owner may give its own
children at most what it holds itself.

Limits (space, inodes, cache_max, io_limit, grants, caps) are ceilings: a child's may
not exceed its parent's. Guarantees (cache_min, io_reserve) are carved: the children's
together may not exceed their parent's. Asking for more is an error, never a silent
downgrade.

Usage is charged hierarchically: charging a principal charges each ancestor too, and
the charge fails (QuotaExceeded, nothing changed) if any of them would go over a
limit. Usage is not stored: the metadata server recomputes it from the volume at
mount, so it is exact after a crash.

The tree is stored in the volume as `principals.json` (written atomically on change).

Identity: a process belongs to the principal registered for it or for its nearest
registered ancestor (`sluice run` registers itself, then execs the program);
otherwise to its uid's default principal (`uid-N`, made on first use under root;
uid 0 falls to root).
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from blockdev import (BankNode, BankTree, PrincipalId, ROOT_PRINCIPAL, SluiceError,
                      write_durably)

log = logging.getLogger(__name__)

FILE = "principals.json"
#: bytes a directory entry costs in the space bank, besides its name
ENTRY_COST = 64
#: default kernel-object limits of a new principal (per principal, across connections;
#: a principal's descendants count against it too)
DEFAULT_GRANTS = 4096
DEFAULT_CAPS = 4096
#: control-socket connections (each holds a descriptor and a capability space in the
#: daemon); well below the shim server's global cap, so one tenant cannot reach it
DEFAULT_CONNECTIONS = 64
#: bytes of shared buffers attached (daemon memory once touched)
DEFAULT_SHM = 256 << 20
#: principals below it (each is a row in every listing and in principals.json)
DEFAULT_CHILDREN = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class PrincipalError(SluiceError):
    """A bad request about principals (unknown name, bad bank, not allowed)."""

    errno = _errno.EINVAL


class NoSuchPrincipal(PrincipalError):
    errno = _errno.ENOENT


class PrincipalExists(PrincipalError):
    errno = _errno.EEXIST


class NotAllowed(PrincipalError):
    errno = _errno.EPERM


class QuotaExceeded(SluiceError):
    """The principal (or an ancestor) would go over a storage bank limit."""

    errno = _errno.EDQUOT


class TooManyObjects(SluiceError):
    """The principal holds as many kernel objects of a kind (grants, capability slots,
    connections, shared memory, child principals) as its bank allows."""

    errno = _errno.EMFILE


@dataclasses.dataclass(frozen=True, slots=True)
class Rate:
    """An I/O rate in operations per second (`iops`), in bytes per second (`bps`), or in
    both (None: not that unit). With both, the tighter applies: a limit of
    `1000iops,20MB/s` stops at whichever is reached first, and so does a reservation.

    Written `500iops`, `20MB/s` (SI) or `1.5GiB/s` (binary), or both comma-separated,
    `500iops,20MB/s`; `none` is no rate at all."""

    iops: float | None = None
    bps: float | None = None

    _RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b/s|iops)\s*$", re.IGNORECASE)

    @classmethod
    def parse(cls, text: str) -> Rate:
        if text.strip().lower() == "none":
            return cls()
        iops: float | None = None
        bps: float | None = None
        parts = text.split(",")
        if len(parts) > 2:
            raise PrincipalError(f"bad rate {text!r}: at most one IOPS and one bytes/s rate")
        for part in parts:
            m = cls._RE.match(part)
            if not m:
                raise PrincipalError(f"bad rate {text!r}: use e.g. 20MB/s, 1.5GiB/s, 500iops "
                                     "or both, 500iops,20MB/s")
            num, prefix, unit = m.groups()
            p = prefix.lower()
            if unit.lower() == "iops":
                if iops is not None:
                    raise PrincipalError(f"bad rate {text!r}: two IOPS rates")
                iops = float(num) * (1000 ** "_kmgt".index(p) if p else 1)
            else:
                if bps is not None:
                    raise PrincipalError(f"bad rate {text!r}: two bytes/s rates")
                base = 1024 if unit.lower().startswith("i") else 1000
                bps = float(num) * (base ** "_kmgt".index(p) if p else 1)
        for v in (iops, bps):
            if v is not None and not 0 < v < 1e15:
                raise PrincipalError(f"bad rate {text!r}: must be positive")
        return cls(iops, bps)

    @property
    def empty(self) -> bool:
        return self.iops is None and self.bps is None

    def units(self) -> tuple[str, ...]:
        return tuple(u for u, v in (("iops", self.iops), ("bps", self.bps)) if v is not None)

    def get(self, unit: str) -> float | None:
        return self.iops if unit == "iops" else self.bps

    def __str__(self) -> str:
        """Exact and parseable again (the string is what principals.json stores): a
        decimal prefix only where it divides evenly (20MB/s, 2Kiops, 1536MiB/s), never
        '2e+06' or a rounded 1.61061GB/s; both rates as '500iops,20MB/s'."""
        out = []
        if self.iops is not None:
            out.append(_exact(self.iops, "iops"))
        if self.bps is not None:
            out.append(_exact(self.bps, "B/s"))
        return ",".join(out) or "none"


def _exact(v: float, unit: str) -> str:
    prefix = ""
    if v == int(v):
        n = int(v)
        names: tuple[str, ...] = ("K", "M", "G", "T")
        base = 1000
        if n % 1000 and not n % 1024 and unit != "iops":
            base, names = (1024, ("Ki", "Mi", "Gi", "Ti"))  # 1.5GiB/s: 1536MiB/s
        if unit == "iops":  # plain below a whole million (4000iops, not 4Kiops)
            base, names = (1000 ** 2, ("M", "T")) if n and not n % 1000 ** 2 else (1, ())
        for p in names:
            if n == 0 or n % base:
                break
            n, prefix = n // base, p
        text = str(n)
    else:
        text = repr(v) if "e" not in repr(v) else f"{v:f}"
    return f"{text}{prefix}{unit}"


def _rate_str(unit: str, v: float) -> str:
    return str(Rate(iops=v) if unit == "iops" else Rate(bps=v))


@dataclasses.dataclass(slots=True)
class Banks:
    """What a principal may hold (None: no limit of its own, only its ancestors')."""

    space: int | None = None
    inodes: int | None = None
    cache_min: int = 0
    cache_max: int | None = None
    io_reserve: Rate | None = None
    io_weight: int = 100
    io_limit: Rate | None = None
    grants: int | None = DEFAULT_GRANTS
    caps: int | None = DEFAULT_CAPS
    connections: int | None = DEFAULT_CONNECTIONS
    shm: int | None = DEFAULT_SHM
    children: int | None = DEFAULT_CHILDREN

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("io_reserve", "io_limit"):
            r = getattr(self, k)
            d[k] = None if r is None else str(r)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], *, base: Banks | None = None) -> Banks:
        """Banks from their JSON form; a field the record lacks (written before the field
        existed) comes from `base`, else the default."""
        d = dict(d)
        for k in ("io_reserve", "io_limit"):
            if d.get(k) is not None:
                d[k] = Rate.parse(d[k])
        out = dataclasses.replace(base) if base is not None else cls()
        for f in dataclasses.fields(cls):
            if f.name in d:
                setattr(out, f.name, d[f.name])
        return out


def _normalise(banks: Banks) -> Banks:
    """`none` rates are no rate at all."""
    if banks.io_reserve is not None and banks.io_reserve.empty:
        banks = dataclasses.replace(banks, io_reserve=None)
    if banks.io_limit is not None and banks.io_limit.empty:
        banks = dataclasses.replace(banks, io_limit=None)
    return banks


def _bank_node(pid: PrincipalId, parent: PrincipalId | None, name: str, b: Banks) -> BankNode:
    r, lim = b.io_reserve, b.io_limit
    return BankNode(pid, parent, name, cache_min=b.cache_min, cache_max=b.cache_max,
                    io_reserve_iops=r.iops if r is not None else None,
                    io_reserve_bps=r.bps if r is not None else None,
                    io_weight=b.io_weight,
                    io_limit_iops=lim.iops if lim is not None else None,
                    io_limit_bps=lim.bps if lim is not None else None)


def root_banks() -> Banks:
    """Root's own banks: no kernel-object limits (the shim server's global caps bound it)."""
    return Banks(grants=None, caps=None, connections=None, shm=None, children=None)


#: kernel-object banks: charged with charge_object, each a count but `shm` (bytes)
OBJECT_BANKS = ("grants", "caps", "connections", "shm", "children")


@dataclasses.dataclass(slots=True)
class Usage:
    """What a principal and its descendants hold now."""

    space: int = 0
    inodes: int = 0
    grants: int = 0
    caps: int = 0
    connections: int = 0
    shm: int = 0
    children: int = 0


@dataclasses.dataclass(eq=False, slots=True)
class Principal:
    id: PrincipalId
    name: str
    parent: Principal | None
    owner_uid: int
    banks: Banks
    usage: Usage = dataclasses.field(default_factory=Usage)
    children: list[Principal] = dataclasses.field(default_factory=list)

    def chain(self) -> Iterator[Principal]:
        p: Principal | None = self
        while p is not None:
            yield p
            p = p.parent

    def __repr__(self) -> str:
        return f"<Principal {self.id} {self.name!r}>"


@dataclasses.dataclass(frozen=True, slots=True)
class PrincipalInfo:
    """A row of `sluice principal ls`."""

    id: int
    name: str
    parent: str | None
    owner_uid: int
    banks: dict[str, Any]
    usage: dict[str, int]


_LIMIT_BANKS = ("space", "inodes", "cache_max", *OBJECT_BANKS)


class PrincipalTable:
    """The tree of principals of one volume, and the pid registry of a mount."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._by_id: dict[int, Principal] = {}
        self._by_name: dict[str, Principal] = {}
        #: the next principal id: ids are never reused (storage tagged with a removed
        #: id must not be charged to whoever is added next), so it is saved too
        self._next_id = 1
        self.root = self._insert(ROOT_PRINCIPAL, "root", None, 0, root_banks())
        #: pid -> (process start time, principal) registered by `sluice run`
        self._registered: dict[int, tuple[int, Principal]] = {}
        #: pid -> (expiry, principal) resolved through the parent chain
        self._resolved: dict[int, tuple[float, Principal]] = {}
        #: called with the snapshot a change would make, before it is made; one that
        #: raises refuses the change (see add_bank_validator)
        self._bank_validators: list[Callable[[BankTree], None]] = []
        #: uid-N defaults made in memory for a request or a connection, not yet used:
        #: neither saved nor listed until they hold storage, a child or banks of their
        #: own (a refused `sluice run`, a stat, must leave no principal behind)
        self._provisional: set[Principal] = set()
        #: called with a new bank snapshot after every change of the tree or a bank
        self._watchers: list[Callable[[BankTree], None]] = []

    # -- persistence ---------------------------------------------------------------------

    @classmethod
    def load(cls, directory: Path) -> PrincipalTable:
        t = cls(directory / FILE)
        try:
            data = json.loads((directory / FILE).read_text())
        except FileNotFoundError:
            return t
        except (OSError, ValueError) as exc:
            raise PrincipalError(f"cannot read {directory / FILE}: {exc}") from None
        try:
            t._load(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PrincipalError(f"{directory / FILE} is malformed: {exc!r}") from None
        return t

    def _load(self, data: dict) -> None:
        t = self
        directory = self.path.parent if self.path is not None else Path(".")
        t.root.banks = Banks.from_json(data["root"]["banks"], base=root_banks())
        pending = [p for p in data["principals"]]
        # Parents before children (the file lists them so, but be forgiving).
        while pending:
            progressed = False
            for rec in list(pending):
                parent = t._by_name.get(rec["parent"])
                if parent is None:
                    continue
                t._insert(PrincipalId(rec["id"]), rec["name"], parent, rec["owner_uid"],
                          Banks.from_json(rec["banks"]))
                pending.remove(rec)
                progressed = True
            if not progressed:
                raise PrincipalError(f"{directory / FILE}: principals with unknown parents: "
                                     + ", ".join(r["name"] for r in pending))
        t._next_id = max(int(data.get("next_id", 0)), max(t._by_id) + 1)

    def save(self) -> None:
        if self.path is None:
            return
        recs = []
        for p in self.walk():
            if p is self.root or p in self._provisional:
                continue
            assert p.parent is not None
            recs.append({"id": p.id, "name": p.name, "parent": p.parent.name,
                         "owner_uid": p.owner_uid, "banks": p.banks.to_json()})
        data = {"root": {"banks": self.root.banks.to_json()}, "principals": recs,
                "next_id": self._next_id}
        # Durable (a principal change must survive a power loss) and 0600: it names
        # every tenant and its owner uid.
        write_durably(self.path, (json.dumps(data, indent=1) + "\n").encode())

    # -- pushing banks down -------------------------------------------------------------

    def bank_tree(self) -> BankTree:
        """A snapshot of every principal's memory and I/O banks, for the pager and the
        scheduler (which may not see this table: they sit below kernelshim)."""
        out: dict[PrincipalId, BankNode] = {}
        for p in self.walk():
            out[p.id] = _bank_node(p.id, p.parent.id if p.parent is not None else None,
                                   p.name, p.banks)
        return out

    def watch(self, callback: Callable[[BankTree], None]) -> None:
        """Call `callback(bank_tree())` now and after every change of the tree or of a
        bank (add, set, remove, a uid's default principal made on first use)."""
        self._watchers.append(callback)
        callback(self.bank_tree())

    def add_bank_validator(self, validator: Callable[[BankTree], None]) -> None:
        """Have `validator(tree)` admission-check every change of a bank (`add`, `set`)
        before it is saved: it gets the snapshot the change would make, and raises
        PrincipalError to refuse it (nothing changes then). The layers below use this
        for what only they can know, e.g. the pager whether the guarantees together
        still fit its pool."""
        self._bank_validators.append(validator)

    def _validate_change(self, undo: Callable[[], None]) -> None:
        """Run the bank validators on the tree as it is now (with the change applied);
        if one refuses, `undo` the change and re-raise."""
        if not self._bank_validators:
            return
        tree = self.bank_tree()
        try:
            for v in self._bank_validators:
                v(tree)
        except BaseException:
            undo()
            raise

    def _changed(self) -> None:
        if self._watchers:
            tree = self.bank_tree()
            for cb in self._watchers:
                cb(tree)

    # -- the tree ------------------------------------------------------------------------

    def _take_id(self) -> PrincipalId:
        pid = PrincipalId(self._next_id)
        self._next_id += 1
        return pid

    def _insert(self, pid: PrincipalId, name: str, parent: Principal | None, owner: int,
                banks: Banks) -> Principal:
        p = Principal(pid, name, parent, owner, banks)
        self._by_id[pid] = p
        self._by_name[name] = p
        if parent is not None:
            parent.children.append(p)
            for q in parent.chain():  # checked by add(); recounted so at load
                q.usage.children += 1
        return p

    def _uninsert(self, p: Principal) -> None:
        """Undo `_insert` of a principal nothing refers to yet (a refused `add`); its id
        is not given out again (ids are never reused)."""
        assert p.parent is not None and not p.children
        p.parent.children.remove(p)
        for q in p.parent.chain():
            q.usage.children -= 1
        del self._by_id[p.id]
        del self._by_name[p.name]

    def walk(self, top: Principal | None = None) -> Iterator[Principal]:
        stack = [top or self.root]
        while stack:
            p = stack.pop()
            yield p
            stack.extend(reversed(p.children))

    def get(self, name: str) -> Principal:
        p = self._by_name.get(name)
        if p is None:
            raise NoSuchPrincipal(f"no principal named {name!r}")
        return p

    def by_id(self, pid: int) -> Principal:
        p = self._by_id.get(pid)
        if p is None:
            # Charges recorded for a principal that was removed go to root.
            return self.root
        return p

    def _check_banks(self, p_parent: Principal, banks: Banks, *, exclude: Principal | None) -> None:
        pb = p_parent.banks
        for k in _LIMIT_BANKS:
            mine, theirs = getattr(banks, k), self._effective(p_parent, k)
            if theirs is not None and mine is not None and mine > theirs:
                raise PrincipalError(f"{k} {mine} exceeds what parent {p_parent.name!r} "
                                     f"holds ({theirs})")
        if banks.cache_min:
            carved = sum(c.banks.cache_min for c in p_parent.children if c is not exclude)
            avail = (pb.cache_min if p_parent is not self.root or pb.cache_min else None)
            if avail is not None and carved + banks.cache_min > avail:
                raise PrincipalError(
                    f"cache_min {banks.cache_min} exceeds what parent {p_parent.name!r} has "
                    f"left to guarantee ({avail - carved})")
            mx = self._effective(p_parent, "cache_max")
            if banks.cache_max is not None and banks.cache_min > banks.cache_max:
                raise PrincipalError("cache_min exceeds cache_max")
            if mx is not None and banks.cache_min > mx:
                raise PrincipalError(f"cache_min exceeds parent's cache_max ({mx})")
        if banks.io_reserve is not None:
            for unit in banks.io_reserve.units():
                mine_r = banks.io_reserve.get(unit)
                theirs_r = pb.io_reserve.get(unit) if pb.io_reserve is not None else None
                carved_r = sum(c.banks.io_reserve.get(unit) or 0.0 for c in p_parent.children
                               if c is not exclude and c.banks.io_reserve is not None)
                if theirs_r is not None:
                    assert mine_r is not None
                    if carved_r + mine_r > theirs_r * (1 + 1e-9):
                        raise PrincipalError(
                            f"io_reserve {_rate_str(unit, mine_r)} exceeds what parent "
                            f"{p_parent.name!r} has left to reserve "
                            f"({_rate_str(unit, max(0.0, theirs_r - carved_r))})")
                elif p_parent is not self.root or (pb.io_reserve is not None
                                                   and not pb.io_reserve.empty):
                    raise PrincipalError(
                        f"parent {p_parent.name!r} has no {'IOPS' if unit == 'iops' else 'bytes/s'}"
                        " io_reserve to carve from")
        if banks.io_limit is not None:
            for unit in banks.io_limit.units():
                lim = self._effective_rate(p_parent, unit)
                mine_l = banks.io_limit.get(unit)
                assert mine_l is not None
                if lim is not None and mine_l > lim:
                    raise PrincipalError(f"io_limit {_rate_str(unit, mine_l)} exceeds parent's "
                                         f"{_rate_str(unit, lim)}")
        if banks.io_weight <= 0:
            raise PrincipalError("io_weight must be positive")
        for k in ("space", "inodes", "cache_max", *OBJECT_BANKS):
            v = getattr(banks, k)
            if v is not None and v < 0:
                raise PrincipalError(f"{k} must not be negative")

    def effective(self, p: Principal, bank: str) -> int | None:
        """The tightest limit on `bank` along p's chain (None: no limit)."""
        return self._effective(p, bank)

    def _effective(self, p: Principal, bank: str) -> int | None:
        """The tightest limit on `bank` along p's chain."""
        vals = [getattr(q.banks, bank) for q in p.chain() if getattr(q.banks, bank) is not None]
        return min(vals) if vals else None

    def _effective_rate(self, p: Principal, unit: str) -> float | None:
        """The tightest io_limit in `unit` along p's chain."""
        vals = [q.banks.io_limit.get(unit) for q in p.chain() if q.banks.io_limit is not None]
        vals_f = [v for v in vals if v is not None]
        return min(vals_f) if vals_f else None

    def _may_administer(self, p: Principal, uid: int) -> bool:
        return uid == 0 or any(q.owner_uid == uid and q is not self.root for q in p.chain())

    def add(self, name: str, *, parent: str = "root", owner_uid: int, banks: Banks,
            caller_uid: int) -> Principal:
        banks = _normalise(banks)
        if not _NAME_RE.match(name):
            raise PrincipalError(f"bad principal name {name!r} (letters, digits, _ . -; "
                                 "at most 64)")
        if name in self._by_name:
            raise PrincipalExists(f"principal {name!r} exists")
        par = self.get(parent)
        if not self._may_administer(par, caller_uid):
            raise NotAllowed(f"uid {caller_uid} may not add principals under {parent!r}")
        self._check_banks(par, banks, exclude=None)
        self._check_object(par, "children", 1)
        p = self._insert(self._take_id(), name, par, owner_uid, banks)
        self._validate_change(lambda: self._uninsert(p))
        self._keep(par)
        self.save()
        self._changed()
        return p

    def set(self, name: str, caller_uid: int, **changes: Any) -> Principal:
        p = self.get(name)
        if p.parent is None:
            if caller_uid != 0:
                raise NotAllowed("only root may change the root principal")
            par = None
        else:
            par = p.parent
            if not self._may_administer(par, caller_uid):
                raise NotAllowed(f"uid {caller_uid} may not change principal {name!r}")
        banks = _normalise(dataclasses.replace(p.banks, **changes))
        old = p.banks  # put back if a bank validator refuses the change
        if par is not None:
            self._check_banks(par, banks, exclude=p)
        # Children must still fit.
        for c in p.children:
            for k in _LIMIT_BANKS:
                mine, theirs = getattr(c.banks, k), getattr(banks, k)
                if mine is not None and theirs is not None and mine > theirs:
                    raise PrincipalError(f"child {c.name!r} has {k} {mine}, more than {theirs}")
        # ... and so must the guarantees carved from it (root without one: no limit).
        carved = sum(c.banks.cache_min for c in p.children)
        if carved > banks.cache_min and (p is not self.root or banks.cache_min):
            raise PrincipalError(f"children of {name!r} hold cache_min {carved}, more than "
                                 f"{banks.cache_min}")
        reserved = [c.banks.io_reserve for c in p.children if c.banks.io_reserve is not None]
        r = banks.io_reserve
        if reserved and (r is not None or p is not self.root):
            for unit in ("iops", "bps"):
                total = sum(x.get(unit) or 0.0 for x in reserved)
                have = r.get(unit) if r is not None else None
                if total and (have is None or total > have * (1 + 1e-9)):
                    raise PrincipalError(
                        f"children of {name!r} reserve {_rate_str(unit, total)}, more than "
                        f"{_rate_str(unit, have) if have is not None else 'nothing'}")
            for c in p.children:
                lim = c.banks.io_limit
                if lim is None or banks.io_limit is None:
                    continue
                for unit in lim.units():
                    mine, theirs = lim.get(unit), banks.io_limit.get(unit)
                    if mine is not None and theirs is not None and mine > theirs:
                        raise PrincipalError(f"child {c.name!r} has io_limit {lim}, more than "
                                             f"{banks.io_limit}")
        p.banks = banks
        self._validate_change(lambda: setattr(p, "banks", old))
        self._keep(p)
        self.save()
        self._changed()
        return p

    def remove(self, name: str, caller_uid: int, *, move_to: str | None = None,
               save: bool = True) -> Principal | None:
        """Remove a principal with no children. If it still owns storage, `move_to` must
        name the principal that takes it (the caller then re-tags the storage, makes
        that durable, and only then saves the table: pass `save=False`, so that a crash
        in between leaves the principal in place rather than its storage tagged with a
        removed id). Returns the principal that takes its storage, if any."""
        p = self.get(name)
        if p is self.root:
            raise NotAllowed("the root principal cannot be removed")
        assert p.parent is not None
        if not self._may_administer(p.parent, caller_uid):
            raise NotAllowed(f"uid {caller_uid} may not remove principal {name!r}")
        if p.children:
            raise PrincipalError(f"principal {name!r} has children: "
                                 + ", ".join(c.name for c in p.children))
        if p.usage.grants or p.usage.caps:
            raise PrincipalError(f"principal {name!r} holds {p.usage.grants} open grants and "
                                 f"{p.usage.caps} capability slots: close them first")
        heir: Principal | None = None
        if p.usage.space or p.usage.inodes:
            if move_to is None:
                raise PrincipalError(
                    f"principal {name!r} owns {p.usage.space} bytes and {p.usage.inodes} "
                    "inodes: say where they go (--move-to PRINCIPAL)")
            heir = self.get(move_to)
            if heir is p:
                raise PrincipalError("cannot move storage to the principal being removed")
            # Move the charge: into heir's chain (which must have room), out of p's.
            space, inodes = p.usage.space, p.usage.inodes
            self.refund(p, space=space, inodes=inodes)
            try:
                self.charge(heir, space=space, inodes=inodes)
            except QuotaExceeded:
                self.charge(p, space=space, inodes=inodes)  # undo: p keeps it
                raise
        p.parent.children.remove(p)
        for q in p.parent.chain():
            q.usage.children -= 1
        del self._by_id[p.id]
        del self._by_name[p.name]
        self._provisional.discard(p)
        for pid, (_st, q) in list(self._registered.items()):
            if q is p:
                del self._registered[pid]
        self._resolved.clear()
        if save:
            self.save()
        self._changed()
        return heir

    # -- charging ------------------------------------------------------------------------

    def charge(self, p: Principal, *, space: int = 0, inodes: int = 0) -> None:
        """Charge storage to p and its ancestors, or raise QuotaExceeded and change nothing."""
        if space > 0 or inodes > 0:
            for q in p.chain():
                b, u = q.banks, q.usage
                if space > 0 and b.space is not None and u.space + space > b.space:
                    raise QuotaExceeded(f"principal {q.name!r} is over its space bank "
                                        f"({u.space} + {space} > {b.space} bytes)")
                if inodes > 0 and b.inodes is not None and u.inodes + inodes > b.inodes:
                    raise QuotaExceeded(f"principal {q.name!r} is over its inode bank "
                                        f"({u.inodes} + {inodes} > {b.inodes})")
        for q in p.chain():
            q.usage.space += space
            q.usage.inodes += inodes
        if (space > 0 or inodes > 0) and self._provisional:
            # First storage of a uid-N default: it exists from now on, saved before
            # the metadata commit that tags storage with its id.
            if self._keep(p):
                self.save()

    def _keep(self, p: Principal) -> bool:
        """Make provisional defaults in p's chain permanent; True if there were any."""
        kept = False
        for q in p.chain():
            if q in self._provisional:
                self._provisional.discard(q)
                kept = True
        return kept

    def listed(self, p: Principal) -> bool:
        """Whether p shows in listings: a provisional default only while it holds
        something (a connection, an open grant)."""
        return p not in self._provisional or any(dataclasses.astuple(p.usage))

    def refund(self, p: Principal, *, space: int = 0, inodes: int = 0) -> None:
        self.charge(p, space=-space, inodes=-inodes)

    def _check_object(self, p: Principal, kind: str, n: int) -> None:
        for q in p.chain():
            lim = getattr(q.banks, kind)
            used = getattr(q.usage, kind)
            if lim is not None and used + n > lim:
                what = f"{used} bytes of shared memory" if kind == "shm" else f"{used} {kind}"
                raise TooManyObjects(f"principal {q.name!r} holds {what} of its limit {lim}")

    def charge_object(self, p: Principal, kind: str, n: int = 1) -> None:
        """`n` more of kernel object `kind` (one of OBJECT_BANKS) held by p, charged to it
        and its ancestors; or TooManyObjects and nothing changed."""
        self._check_object(p, kind, n)
        for q in p.chain():
            setattr(q.usage, kind, getattr(q.usage, kind) + n)

    def refund_object(self, p: Principal, kind: str, n: int = 1) -> None:
        for q in p.chain():
            setattr(q.usage, kind, getattr(q.usage, kind) - n)

    def reset_storage_usage(self) -> None:
        for p in self.walk():
            p.usage.space = 0
            p.usage.inodes = 0

    # -- identity ------------------------------------------------------------------------

    def default_for_uid(self, uid: int) -> Principal:
        if uid == 0:
            return self.root
        name = f"uid-{uid}"
        p = self._by_name.get(name)
        if p is None:
            # Made in memory only: saved when it is first charged storage (charge) or
            # given children or banks; until then nothing of it outlives the daemon.
            p = self._insert(self._take_id(), name, self.root, uid, Banks())
            self._provisional.add(p)
            self._changed()  # the layers below serve it meanwhile (its I/O, its cache)
        return p

    def may_run_as(self, principal: Principal, uid: int) -> bool:
        """Whether `uid` may act for `principal`: root, or the owner of it or of one of
        its ancestors below root."""
        return uid == 0 or any(q.owner_uid == uid and q is not self.root
                               for q in principal.chain())

    def visible_to(self, uid: int, acting_for: Principal | None = None) -> list[Principal]:
        """The principals `uid` may see listed, in tree order: all for root; for anyone
        else those it may run as (and the one it acts for), with their ancestors, so
        that an EDQUOT from a parent's bank can be explained — not other tenants'."""
        if uid == 0:
            return [p for p in self.walk() if self.listed(p)]
        keep: set[Principal] = set()
        if acting_for is not None:
            keep.update(acting_for.chain())
        for p in self.walk():
            if p not in keep and self.may_run_as(p, uid):
                keep.update(p.chain())
        return [p for p in self.walk() if p in keep and self.listed(p)]

    def register(self, pid: int, principal: Principal, *, uid: int) -> None:
        """Attach process `pid` (authenticated by the caller) to `principal`."""
        if not self.may_run_as(principal, uid):
            raise NotAllowed(f"uid {uid} may not run as principal {principal.name!r} "
                             "(only its owner or root may)")
        self._registered[pid] = (_start_time(pid), principal)
        self._resolved.clear()

    def resolve(self, pid: int, uid: int, *, now: float | None = None) -> Principal:
        """The principal process `pid` (of `uid`) acts for."""
        if self._registered:
            now = time.monotonic() if now is None else now
            hit = self._resolved.get(pid)
            if hit is not None and hit[0] > now:
                return hit[1]
            p = self._walk_ancestry(pid)
            if p is not None:
                self._resolved[pid] = (now + 2.0, p)
                if len(self._resolved) > 65536:
                    self._resolved.clear()
                return p
        return self.default_for_uid(uid)

    def _walk_ancestry(self, pid: int) -> Principal | None:
        seen = 0
        while pid > 1 and seen < 64:
            reg = self._registered.get(pid)
            if reg is not None:
                if reg[0] == _start_time(pid):
                    return reg[1]
                del self._registered[pid]  # that process is gone; the pid was reused
            pid = _parent_pid(pid)
            seen += 1
        return None

    def prune_registrations(self) -> None:
        """Forget registrations of processes that exited."""
        for pid, (st, _p) in list(self._registered.items()):
            if _start_time(pid) != st:
                del self._registered[pid]
        self._resolved.clear()

    def registered(self) -> dict[int, str]:
        return {pid: p.name for pid, (_st, p) in self._registered.items()}

    def info(self, only: Iterable[Principal] | None = None) -> list[PrincipalInfo]:
        """Rows of `principal ls` for `only` (default: all, in tree order). The banks
        are as stored (I/O rates as strings with their units, e.g. "500iops,20MB/s"),
        plus each rate as plain numbers in base units, like every other bank:
        `io_reserve_iops`, `io_reserve_bps`, `io_limit_iops`, `io_limit_bps`
        (operations/s and bytes/s; null where none)."""
        return [PrincipalInfo(p.id, p.name, p.parent.name if p.parent else None, p.owner_uid,
                              _banks_row(p.banks), dataclasses.asdict(p.usage))
                for p in (self.walk() if only is None else only) if self.listed(p)]


def _banks_row(b: Banks) -> dict[str, Any]:
    d = b.to_json()
    for k in ("io_reserve", "io_limit"):
        r = getattr(b, k)
        d[f"{k}_iops"] = r.iops if r is not None else None
        d[f"{k}_bps"] = r.bps if r is not None else None
    return d


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].decode().split()


def _start_time(pid: int) -> int:
    f = _stat_fields(pid)
    return int(f[19]) if f else -1


def _parent_pid(pid: int) -> int:
    f = _stat_fields(pid)
    return int(f[1]) if f else 0
