"""The kernel's capability table: grants, minting, revocation and fencing.

`Kernel` inherits this table (kernel.py holds the data path through the grants). It
owns the grants in force, by id and by inode, the principal table grants are charged
to, and the count of requests in flight per grant and per epoch, which `revoke`,
`wait_drained` and `wait_quiescent` wait on.

Fencing: `revoke` marks the grant and everything minted from it revoked before its
first checkpoint, so no request that starts afterwards passes the check; it then
waits until the requests already past the check have finished. After it returns no
request through the old grant reaches the device.
"""

from __future__ import annotations

import logging
from typing import Iterable

import trio

from blockdev import PrincipalId

from .errors import GrantRevoked, RightsError
from .extents import ExtentMap
from .grants import PENDING_RANGES, Grant, Rights
from .principals import PrincipalTable, TooManyObjects
from .ranges import Meter


log = logging.getLogger(__name__)

_int_and = int.__and__
_int_invert = int.__invert__


class GrantTable:
    """Grants in force, and the requests in flight through them (see the module)."""

    def __init__(self) -> None:
        self._grants: dict[int, Grant] = {}
        self._by_inode: dict[int, set[Grant]] = {}
        #: the principal table charged for grants (kernel objects); set by the owner
        self.principals: PrincipalTable | None = None
        #: requests in flight per epoch (wait_quiescent waits for the older epochs)
        self._epoch = 0
        self._in_epoch: dict[int, int] = {}
        #: the same per inode (wait_quiescent of the files some blocks were freed from)
        self._in_inode: dict[int, dict[int, int]] = {}
        #: inodes a grace-period waiter watches -> how many watch each: `_leave` wakes
        #: the waiters when one of those goes quiet for an epoch (or a whole epoch does)
        self._watched: dict[int, int] = {}
        self._quiesced: trio.Event | None = None
        #: each tenant's pending written ranges, all its live grants together
        #: (PENDING_RANGES): one meter a tenant that held a grant (at most the
        #: principals there are)
        self._meters: dict[int, Meter] = {}

    def grant(self, *, inode: int, generation: int, extents: ExtentMap, rights: Rights,
              principal: PrincipalId, charge: bool = True) -> Grant:
        """A new grant, charged to `principal`'s kernel-object bank (TooManyObjects when
        it holds its limit) unless `charge` is false (short-lived internal grants)."""
        if charge and self.principals is not None:
            self.principals.charge_object(self.principals.by_id(principal), "grants")
        g = Grant(inode, generation, extents, rights, principal)
        g.charged = charge and self.principals is not None
        key = self._tenant(principal)
        meter = self._meters.get(key)
        if meter is None:
            meter = self._meters[key] = Meter()
        g._written.meter = meter
        self._grants[g.id] = g
        self._by_inode.setdefault(inode, set()).add(g)
        return g

    def mint(self, grant: Grant, rights: Rights) -> Grant:
        """A copy of `grant` with `rights` (which must be a subset of the grant's)."""
        self.check(grant, Rights.NONE)
        if rights & ~grant.rights:
            raise RightsError(f"cannot mint {rights!r} from a grant holding {grant.rights!r}")
        g = self.grant(inode=grant.inode, generation=grant.generation, extents=grant.extents,
                       rights=rights, principal=grant.principal)
        g.file = grant.file
        g.parent = grant
        grant.children.append(g)
        return g

    def _tenant(self, principal: PrincipalId) -> int:
        """The meter a principal's grants count into: its tenant's (the top-most
        principal below root on its path; root's own), or its own without a table."""
        if self.principals is None:
            return principal
        p = self.principals.by_id(principal)  # (root for an id no longer there)
        while p.parent is not None and p.parent.parent is not None:
            p = p.parent
        return p.id

    def check_pending(self, grant: Grant) -> None:
        """TooManyObjects if `grant`'s tenant holds PENDING_RANGES pending written ranges
        over all its live grants: its direct client must commit before it writes more
        (probe 16, F5)."""
        meter = grant._written.meter
        if meter is not None and meter.n >= PENDING_RANGES:
            raise TooManyObjects(f"principal {grant.principal}'s tenant holds {meter.n} "
                                 f"uncommitted written ranges (limit {PENDING_RANGES}): "
                                 "commit first")

    def grants_for(self, inode: int) -> list[Grant]:
        return [g for g in self._by_inode.get(inode, ()) if not g.revoked]

    def revoke_nowait(self, grant: Grant, *, holder_knows: bool = False) -> list[Grant]:
        """Revoke `grant` and everything minted from it; returns the grants revoked.
        Each one's holder is told (`Grant.on_revoke`), except `grant`'s own when
        `holder_knows` (it closed or revoked the grant itself: `release`, `revoke`);
        the holders of grants minted from it are told all the same (review of stop 31,
        3: a client's close of a handle revoked the ones minted from it unsaid)."""
        out: list[Grant] = []
        stack = [grant]
        while stack:
            g = stack.pop()
            stack.extend(g.children)
            if g.revoked:
                continue
            g.revoked = True
            g.stop_counting()
            if g.charged and self.principals is not None:
                self.principals.refund_object(self.principals.by_id(g.principal), "grants")
                g.charged = False
            out.append(g)
            if g.on_revoke is not None and not (holder_knows and g is grant):
                try:
                    g.on_revoke(g)
                except Exception:  # noqa: BLE001 - a notice is no reason to stop a revoke
                    log.exception("telling the holder of grant %d it was revoked", g.id)
            self._grants.pop(g.id, None)
            s = self._by_inode.get(g.inode)
            if s is not None:
                s.discard(g)
                if not s:
                    del self._by_inode[g.inode]
        return out

    async def wait_drained(self, grants: Iterable[Grant]) -> None:
        """Wait until no request through any of `grants` is still in flight."""
        for g in grants:
            while g.inflight:
                if g._drained is None:
                    g._drained = trio.Event()
                await g._drained.wait()
        await trio.lowlevel.checkpoint()

    async def wait_writes_drained(self, grants: Iterable[Grant]) -> None:
        """Wait until no write through any of `grants` is still in flight (reads may
        be: they change nothing, and the blocks they address are not reused before
        they end — `wait_quiescent`)."""
        for g in grants:
            while g.inflight_writes:
                if g._writes_drained is None:
                    g._writes_drained = trio.Event()
                await g._writes_drained.wait()
        await trio.lowlevel.checkpoint()

    async def revoke(self, grant: Grant, *, holder_knows: bool = False) -> None:
        await self.wait_drained(self.revoke_nowait(grant, holder_knows=holder_knows))

    def release(self, grant: Grant) -> None:
        """The holder is done with the grant (close); same as revoke without waiting,
        and the holder is not told (the holders of grants minted from it are)."""
        self.revoke_nowait(grant, holder_knows=True)

    @property
    def live_grants(self) -> int:
        return len(self._grants)

    @staticmethod
    def check(grant: Grant, need: Rights) -> None:
        """Raise GrantRevoked or RightsError unless `grant` is live and holds `need`."""
        if grant.revoked:
            raise GrantRevoked(f"grant {grant.id} on inode {grant.inode} was revoked")
        # (as plain ints: IntFlag's & and ~ make new flags, ~1 us a check, every request)
        if _int_and(need, _int_invert(grant.rights)):
            raise RightsError(f"grant {grant.id} does not hold {need!r}")

    def _enter(self, grant: Grant, need: Rights) -> int:
        """Count a request in (after its rights check); returns its epoch for _leave."""
        self.check(grant, need)
        grant.inflight += 1
        e = self._epoch
        self._in_epoch[e] = self._in_epoch.get(e, 0) + 1
        per = self._in_inode.get(grant.inode)
        if per is None:
            self._in_inode[grant.inode] = {e: 1}
        else:
            per[e] = per.get(e, 0) + 1
        return e

    def _enter_grant_write(self, grant: Grant) -> int:
        """`_enter` for a write (counted in `inflight_writes` too)."""
        epoch = self._enter(grant, Rights.WRITE)
        grant.inflight_writes += 1
        return epoch

    def _leave_grant_write(self, grant: Grant, epoch: int) -> None:
        grant.inflight_writes -= 1
        if not grant.inflight_writes and grant._writes_drained is not None:
            grant._writes_drained.set()
            grant._writes_drained = None
        self._leave(grant, epoch)

    def _leave(self, grant: Grant, epoch: int) -> None:
        wake = False
        grant.inflight -= 1
        if not grant.inflight and grant._drained is not None:
            grant._drained.set()
            grant._drained = None
        per = self._in_inode[grant.inode]
        left = per[epoch] - 1
        if left:
            per[epoch] = left
        else:
            del per[epoch]
            if not per:
                del self._in_inode[grant.inode]
            if grant.inode in self._watched:
                wake = True
        left = self._in_epoch[epoch] - 1
        if left:
            self._in_epoch[epoch] = left
        else:
            del self._in_epoch[epoch]
            wake = True
        if wake and self._quiesced is not None:
            self._quiesced.set()
            self._quiesced = None

    def grace_mark(self) -> int:
        """Start a grace period: the requests that begin from now on are not part of it
        (see `quiet_since`)."""
        self._epoch += 1
        return self._epoch

    def quiet_since(self, inodes: set[int] | None, mark: int) -> bool:
        """Whether no request that began before `mark` is still in flight on `inodes`
        (None: on any file). Removes from `inodes` the files found quiet (they stay
        quiet: later requests belong to later epochs)."""
        if inodes is None:
            return not (self._in_epoch and min(self._in_epoch) < mark)
        for i in list(inodes):
            per = self._in_inode.get(i)
            if not per or min(per) >= mark:
                inodes.discard(i)
        return not inodes

    async def wait_grace_change(self, inodes: Iterable[int]) -> None:
        """Wait until the requests of an epoch on one of `inodes` have all ended, or
        those of a whole epoch, or `poke`."""
        watch = list(inodes)
        for i in watch:
            self._watched[i] = self._watched.get(i, 0) + 1
        try:
            if self._quiesced is None:
                self._quiesced = trio.Event()
            await self._quiesced.wait()
        finally:
            for i in watch:
                n = self._watched[i] - 1
                if n:
                    self._watched[i] = n
                else:
                    del self._watched[i]

    def poke(self) -> None:
        """Wake the grace-period waiters (they have something new to look at)."""
        if self._quiesced is not None:
            self._quiesced.set()
            self._quiesced = None

    async def wait_quiescent(self, inodes: Iterable[int] | None = None) -> None:
        """Wait until every request that started before this call has finished (an RCU
        grace period). Blocks unmapped before the call are then touched by no request,
        whichever grant it came through: they may be discarded and reused. With
        `inodes`, only the requests on those files (blocks unmapped from them, which no
        other file's map holds)."""
        mark = self.grace_mark()
        if inodes is not None:
            busy = set(inodes)
            while not self.quiet_since(busy, mark):
                await self.wait_grace_change(busy)
            await trio.lowlevel.checkpoint()
            return
        while self._in_epoch and min(self._in_epoch) < mark:
            if self._quiesced is None:
                self._quiesced = trio.Event()
            await self._quiesced.wait()
        await trio.lowlevel.checkpoint()
