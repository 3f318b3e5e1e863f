"""What a principal is and may hold: the records of the principal tree (`Principal`,
its `Banks` and `Usage`), the errors about them, and the defaults.

The behaviour lives beside it: the tree and its persistence in `principals.py`,
the rules a bank change must keep in `bankrules.py`, hierarchical charging in
`accounting.py`, the pid registry in `processes.py`. Rates (`Rate`) and sizes are
parsed by `blockdev.units`, the one home of units.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
from typing import Any, Iterator

from blockdev import BankNode, PrincipalId, Rate

# The principals' errors live in the light errors module: a direct client receives them
# without importing this one, which loads the block device.
from .errors import NoSuchPrincipal as NoSuchPrincipal
from .errors import NotAllowed as NotAllowed
from .errors import PrincipalError as PrincipalError
from .errors import PrincipalExists as PrincipalExists
from .errors import QuotaExceeded as QuotaExceeded
from .errors import TooManyObjects as TooManyObjects

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
#: FUSE requests waiting for admission that have given their worker back ("parked",
#: fs/operations.py Admission), and the bytes they hold (payloads plus 4 KiB each);
#: one more is answered EAGAIN
DEFAULT_PARKED = 4096
DEFAULT_PARKED_BYTES = 64 << 20
#: costly control-socket operations (`stats`, `principal_ls`, principal changes:
#: each walks the principal table) a second, beyond a burst (kernelshim/connection.py
#: ADMIN_BURST); one beyond waits its turn
DEFAULT_COSTLY_RATE = 50

#: kernel-object banks: charged with charge_object, each a count but `shm` (bytes)
OBJECT_BANKS = ("grants", "caps", "connections", "shm", "children")
#: banks of requests the daemon holds or serves for a principal, enforced where they
#: wait (parked FUSE requests: fs Admission; the costly-op rate: the shim server),
#: charged to the principal and each ancestor below root (root's count its own only:
#: a tenant cannot fill root's); each a ceiling like the kernel objects
QUEUE_BANKS = ("parked", "parked_bytes", "costly_rate")
#: banks that are ceilings: a child's may not exceed its parent's
LIMIT_BANKS = ("space", "inodes", "cache_max", *OBJECT_BANKS, *QUEUE_BANKS)
#: the value that asks for no limit of a principal's own on a bank of LIMIT_BANKS (its
#: ancestors' only), on the command line and on the wire
NO_LIMIT = "none"


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
    parked: int | None = DEFAULT_PARKED
    parked_bytes: int | None = DEFAULT_PARKED_BYTES
    costly_rate: int | None = DEFAULT_COSTLY_RATE

    def to_json(self) -> dict[str, Any]:
        # Fields by name, not dataclasses.asdict (which deep-copies field by field, and
        # recursed into the rates only for them to be replaced below): `principal ls`
        # and `stats` build this for every row, within one step of the event loop.
        d = {k: getattr(self, k) for k in _BANK_FIELDS}
        for k in ("io_reserve", "io_limit"):
            r = getattr(self, k)
            d[k] = None if r is None else str(r)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], *, base: Banks | None = None) -> Banks:
        """Banks from their JSON form; a field the record lacks (written before the field
        existed) comes from `base`, else the default. Rates are strings as `str(Rate)`
        wrote them ("500iops,20MB/s"); a bad one raises UnitError (a ValueError)."""
        if not isinstance(d, dict):
            raise TypeError(f"banks {d!r} are not a JSON object")
        d = dict(d)
        for k in ("io_reserve", "io_limit"):
            if d.get(k) is not None:
                if not isinstance(d[k], str):
                    raise TypeError(f"bank {k} {d[k]!r} is not a rate string")
                d[k] = Rate.parse(d[k])
        for k, v in d.items():
            # (a file is input from someone else: every count a number the daemon can
            # compare and add, never a string, a float or more than 64 bits)
            if k not in ("io_reserve", "io_limit") and v is not None and (
                    type(v) is not int or not 0 <= v < 1 << 63):
                raise ValueError(f"bank {k} {v!r} is not a count in 0..2**63-1")
        out = dataclasses.replace(base) if base is not None else cls()
        for f in dataclasses.fields(cls):
            if f.name in d:
                setattr(out, f.name, d[f.name])
        return out

    def normalised(self) -> Banks:
        """`none` rates are no rate at all."""
        out = self
        if out.io_reserve is not None and out.io_reserve.empty:
            out = dataclasses.replace(out, io_reserve=None)
        if out.io_limit is not None and out.io_limit.empty:
            out = dataclasses.replace(out, io_limit=None)
        return out

    def row(self) -> dict[str, Any]:
        """The JSON form plus each rate as plain numbers in base units (see
        PrincipalTable.info)."""
        d = self.to_json()
        for k in ("io_reserve", "io_limit"):
            r = getattr(self, k)
            d[f"{k}_iops"] = r.iops if r is not None else None
            d[f"{k}_bps"] = r.bps if r is not None else None
        return d


_BANK_FIELDS = tuple(f.name for f in dataclasses.fields(Banks))


def root_banks() -> Banks:
    """Root's own banks: no kernel-object limits (the shim server's global caps bound
    it); the request banks (QUEUE_BANKS) at their defaults, which bound root's own
    requests and, as ceilings, every principal's (root raises its own to give more)."""
    return Banks(grants=None, caps=None, connections=None, shm=None, children=None)


def bank_node(pid: PrincipalId, parent: PrincipalId | None, name: str, b: Banks) -> BankNode:
    """The memory and I/O banks of one principal, as the pager and the scheduler see them."""
    r, lim = b.io_reserve, b.io_limit
    return BankNode(pid, parent, name, cache_min=b.cache_min, cache_max=b.cache_max,
                    io_reserve_iops=r.iops if r is not None else None,
                    io_reserve_bps=r.bps if r is not None else None,
                    io_weight=b.io_weight,
                    io_limit_iops=lim.iops if lim is not None else None,
                    io_limit_bps=lim.bps if lim is not None else None)


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
    #: FUSE requests parked, and their bytes (counted by fs Admission; root's are its
    #: own requests only, see QUEUE_BANKS)
    parked: int = 0
    parked_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        """As `dataclasses.asdict` (every field is an int), a tenth of its cost."""
        return {k: getattr(self, k) for k in _USAGE_FIELDS}


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
    #: null where hidden from the caller (PrincipalTable.context_only)
    usage: dict[str, int | None]

    def as_dict(self) -> dict[str, Any]:
        """As `dataclasses.asdict`, without its deep copy: `banks` and `usage` are
        plain dicts made for this row (PrincipalTable.info), so sharing them is safe."""
        return {"id": self.id, "name": self.name, "parent": self.parent,
                "owner_uid": self.owner_uid, "banks": self.banks, "usage": self.usage}


_USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(Usage))
