"""The shim server's file and data operations: a connection's capability space (slots),
its shared buffer, and every request that goes through a grant.

Each operation checks the rights its table row in `server.py` names (through
`Kernel.check` or the kernel call itself) and raises the errors listed there. The data
operations (read, write, append) arrive as binary DATA frames or as JSON; both end in
`_read`, `_write` and `_append`.
"""

from __future__ import annotations

import contextlib

import fcntl
import functools
import logging
import mmap
import os
from typing import Any

import trio

from .budget import yield_to_loop
from .connection import (FLOOR_SHM, HOG_SECONDS, MAX_SHM, MAX_SHM_TOTAL, PUSH_KINDS,
                         ROOT_SHM, SLICE_BYTES, TENANT_SHM, BadSlot, Connection,
                         ServerBase, tenant_of)
from .errors import NotAllocated, Sealed
from .extents import block_span
from .grants import Grant, Rights
from .principals import TooManyObjects
from .protocol import MAX_FRAME, VERSION, ProtocolError, arg_int, arg_str

log = logging.getLogger(__name__)

#: a read or write request is served in slices of this size while the mount's metadata
#: is quiet (while it is not: SLICE_BYTES), the event loop given back between
#: slices as `_yield_if_hogging` says. Each slice pays the pager's, the device's and the
#: scheduler's per-request costs: 256 KiB slices cost a 1 MiB read four times those
#: (docs/BENCHMARKS.md, "Direct sequential reads"; 2 MiB since "Direct path: pipelined
#: writes"), about 0.7 ms of a quiet machine's time at 3 GB/s. A slice is also the longest a
#: metadata request waits behind a stream, so large slices are used only when no
#: metadata request was seen waiting for METADATA_QUIET seconds. (Writes too since
#: "Direct 4 KiB reads: the schedule points a FUSE read does not pay": in 256 KiB slices
#: a 4 MiB direct write cost the daemon 1.16-1.17 s per GB, in 2 MiB slices 0.75-0.85.)
READ_SLICE = 2 << 20
METADATA_QUIET = 0.05
#: times a write slice that meets a hole (or blocks sealed under it) is laid out and
#: tried again before its error goes back to the client
WRITE_ATTEMPTS = 8


class FileOps(ServerBase):
    """Slots, the shared buffer, and the `_op_*` of files and data (mixed into
    ShimServer)."""

    #: when a stream last found a metadata request waiting (trio time; see READ_SLICE)
    _metadata_seen = float("-inf")

    async def _release_all(self, conn: Connection) -> None:
        for slot in list(conn.slots):
            try:
                await self._close_slot(conn, slot)
            except Exception:  # noqa: BLE001
                log.exception("releasing slot %d failed", slot)
        self._drop_shm(conn)

    def _drop_shm(self, conn: Connection, *, refund: bool = True) -> None:
        # A request cancelled mid-way (an unmount cancels the connections' tasks) may
        # still hold a view of the buffer (its data, waiting at its writer's limit in
        # `repay_limit`): the mapping then goes with that last view, when it is
        # collected — counted and refunded here all the same. Before, the close's
        # BufferError ended the teardown with a traceback (hostile probe 7, L1).
        view, conn.shm_view = conn.shm_view, None
        if view is not None:
            with contextlib.suppress(BufferError):
                view.release()
        shm, conn.shm = conn.shm, None
        if shm is not None:
            self.shm_bytes -= len(shm)
            if conn.shm_floor:
                self.floor_shm -= len(shm)
                conn.shm_floor = False
            if refund:
                self.principals.refund_object(conn.principal, "shm", len(shm))
            with contextlib.suppress(BufferError):
                shm.close()

    def _new_slot(self, conn: Connection, grant: Grant) -> int:
        self.principals.charge_object(conn.principal, "caps")
        slot = conn.next_slot
        conn.next_slot += 1
        conn.slots[slot] = grant
        grant.alive = conn.alive  # (R6: see Kernel._pending_in)
        grant.on_revoke = functools.partial(self._revoked_under, conn, slot)
        return slot

    def _revoked_under(self, conn: Connection, slot: int, grant: Grant) -> None:
        """`grant`, in `slot` of `conn`, was revoked under it (a truncate, an unlink, a
        chmod, a rename over its file, a read-only remount; or the client's own
        `revoke` or `close` of the grant it was minted from): tell the client if it
        subscribed to "revoked" (its next request through the slot fails with
        GrantRevoked anyway: this says so early)."""
        if conn.slots.get(slot) is grant and conn.doomed is None:
            self.push_to((conn,), "revoked", {"slot": slot, "inode": grant.inode})

    def _slot(self, conn: Connection, p: dict[str, Any]) -> Grant:
        return self._grant(conn, arg_int(p, "slot", hi=1 << 31))

    @staticmethod
    def _grant(conn: Connection, slot: int) -> Grant:
        g = conn.slots.get(slot)
        if g is None:
            raise BadSlot(f"no capability in slot {slot}")
        return g

    async def _close_slot(self, conn: Connection, slot: int) -> None:
        g = conn.slots.pop(slot)
        self.principals.refund_object(conn.principal, "caps")
        if slot in conn.opened:
            conn.opened.discard(slot)
            self.kernel.release(g)
            await self.service.close(g)
        else:
            self.kernel.release(g)

    @staticmethod
    def _buf(conn: Connection, off: int, length: int) -> memoryview:
        if conn.shm_view is None:
            raise ProtocolError("no shared buffer attached (send 'attach' first)")
        if length > MAX_SHM:
            raise ProtocolError(f"length {length} exceeds {MAX_SHM}")
        if off > len(conn.shm_view) or off + length > len(conn.shm_view):
            raise ProtocolError(f"buffer range {off}+{length} exceeds the shared buffer "
                                f"({len(conn.shm_view)} bytes)")
        return conn.shm_view[off:off + length]

    async def _op_hello(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        return {"version": VERSION, "principal": conn.principal.name, "pid": conn.creds.pid,
                "uid": conn.creds.uid, "max_frame": MAX_FRAME, "max_shm": MAX_SHM,
                "block_size": self.kernel.block_size}

    async def _op_subscribe(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        kinds = p.get("kinds")
        if not isinstance(kinds, list) or len(kinds) > len(PUSH_KINDS) or \
                not all(isinstance(k, str) and k in PUSH_KINDS for k in kinds):
            raise ProtocolError(f"argument 'kinds' must list notification kinds of "
                                f"{sorted(PUSH_KINDS)}")
        conn.subscribed = frozenset(kinds)
        # (un)register with the pager as "reclaim" is in the set or not (PagerOps)
        self._watch_reclaim(conn)  # type: ignore[attr-defined]
        return {"kinds": sorted(conn.subscribed)}

    async def _op_attach(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        size = arg_int(p, "size", lo=4096, hi=MAX_SHM)
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        held = len(conn.shm) if conn.shm is not None else 0
        # A tenant's first TENANT_SHM bytes are its own, whatever the global budget says
        # (its bank still decides); the rest come from the budget, whose last ROOT_SHM
        # bytes are root's.
        floor_held = held if conn.shm_floor else 0
        floor = conn.creds.uid != 0 and \
            tenant_of(conn.principal).usage.shm - held + size <= TENANT_SHM and \
            self.floor_shm - floor_held + size <= FLOOR_SHM
        pooled = self.shm_bytes - self.floor_shm
        budget = MAX_SHM_TOTAL if conn.creds.uid == 0 else MAX_SHM_TOTAL - ROOT_SHM
        if not floor and pooled - (held - floor_held) + size > budget:
            raise TooManyObjects(f"shared memory budget exhausted ({pooled} of {budget} "
                                 f"bytes attached beyond each user's first {TENANT_SHM}); "
                                 "ask for less")
        # The new buffer replaces the old: the principal pays the difference (its bank
        # must hold the new one whole).
        self.principals.charge_object(conn.principal, "shm", size - held)
        fd = os.memfd_create("sluice-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Sealed before the client gets it: a client that shrank the memfd would
            # kill this daemon with SIGBUS at its next touch of the mapping.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            m = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            self.principals.refund_object(conn.principal, "shm", size - held)
            raise
        try:
            self._drop_shm(conn, refund=False)
        except BufferError:  # requests in flight use the old buffer
            m.close()
            os.close(fd)
            self.principals.refund_object(conn.principal, "shm", size - held)
            raise ProtocolError("the shared buffer is in use by requests in flight") from None
        conn.shm, conn.shm_view = m, memoryview(m)
        conn.shm_floor = floor
        self.shm_bytes += size
        self.floor_shm += size if floor else 0
        # The fd travels with the reply and is closed here once sent: the client has its
        # own copy, and the mapping keeps the memory alive on this side.
        return {"size": size, "_fds": [fd]}

    async def _op_open(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        path = arg_str(p, "path")
        flags = arg_int(p, "flags", hi=0o77777777)
        mode = arg_int(p, "mode", hi=0o7777) if "mode" in p else 0o644
        grant = await self.service.open_path(path, flags, mode, conn.creds, conn.principal)
        try:
            slot = self._new_slot(conn, grant)
        except BaseException:
            self.kernel.release(grant)
            await self.service.close(grant)
            raise
        conn.opened.add(slot)
        return {"slot": slot, "inode": grant.inode, "rights": int(grant.rights),
                "size": self.service.size_of(grant)}

    async def _op_read(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        offset = arg_int(p, "offset")
        length = arg_int(p, "length", hi=MAX_SHM)
        return {"n": await self._read(conn, g, offset, length,
                                      arg_int(p, "buf", hi=1 << 62))}

    async def _read(self, conn: Connection, g: Grant, offset: int, length: int,
                    at: int) -> int:
        buf = self._buf(conn, at, length)
        if g.revoked:  # before size_of: a revoked grant learns nothing more
            self.kernel.check(g, Rights.READ)
        n = max(0, min(length, self.service.size_of(g) - offset))
        if not n:  # (otherwise Kernel.read_into checks the rights)
            self.kernel.check(g, Rights.READ)
        if 0 < n <= SLICE_BYTES:  # one slice whatever the metadata does (a 4 KiB read)
            await self.kernel.read_into(g, offset, buf[:n], revocable=True)
            return n
        pos = 0
        while pos < n:
            quiet = trio.current_time() - self._metadata_seen >= METADATA_QUIET
            k = min(READ_SLICE if quiet else SLICE_BYTES, n - pos)
            await self.kernel.read_into(g, offset + pos, buf[pos:pos + k], revocable=True)
            pos += k
            if pos < n:
                await self._yield_if_hogging()
        return n

    async def _yield_if_hogging(self) -> None:
        """Give the event loop back if this request has held it for a while, so that the
        metadata requests of the mount wait behind a stream for at most that long."""
        pending = self.metadata_pending
        if pending is not None and pending():
            if trio.current_time() < self.turns.contended_until:
                # Tenants compete, and FUSE requests are their tenants' steps
                # (FairTurns.serves), run first in the next batch: one yield. Eight
                # let a tenant flooding the mount take four fifths of the loop from
                # another's stream of large requests (hostile probe 25, F3).
                await yield_to_loop()
            else:
                # Metadata first (the stream's own tenant's, or nobody else's work
                # waits): let the FUSE workers take what is queued (a bounded number of
                # rounds, so a storm of metadata cannot stall a stream for good).
                for _ in range(8):
                    await yield_to_loop()  # (really: also inside a request's budget)
                    if not pending():
                        break
            self._last_yield = self._metadata_seen = trio.current_time()
            return
        now = trio.current_time()
        if now - self._last_yield >= HOG_SECONDS:
            self._last_yield = now
            await yield_to_loop()

    async def _op_write(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        offset = arg_int(p, "offset")
        length = arg_int(p, "length", hi=MAX_SHM)
        return {"n": await self._write(conn, g, offset, length,
                                       arg_int(p, "buf", hi=1 << 62))}

    async def _write(self, conn: Connection, g: Grant, offset: int, length: int,
                     at: int, *, allocate: bool = False) -> int:
        buf = self._buf(conn, at, length)
        self.kernel.check_pending(g)  # (its uncommitted ranges: PENDING_RANGES)
        pos = 0
        while pos < length:
            quiet = trio.current_time() - self._metadata_seen >= METADATA_QUIET
            k = min(READ_SLICE if quiet else SLICE_BYTES, length - pos)
            if pos + k < length:
                k -= (offset + pos + k) % self.kernel.block_size  # slices end on blocks
            # A copy: the client may change its shared buffer meanwhile, and the daemon
            # must checksum exactly what it stores (else the tenant's own file reads as
            # a bad medium, and the device's error count rises for all).
            with self.kernel.limit_scope(g.principal):  # (its place grows with its requests)
                await self._write_piece(g, offset + pos, bytearray(buf[pos:pos + k]),
                                        allocate)
            pos += k
            if pos < length:
                await self._yield_if_hogging()
        return length

    async def _write_piece(self, g: Grant, offset: int, piece: bytearray,
                           allocate: bool) -> None:
        """One slice of a write. Committed blocks: the metadata server relocates them
        with this data (one write, as through the mount) rather than the client asking
        for a layout that copies them first (docs/BENCHMARKS.md, "Direct 4 KiB writes").
        A hole raises NotAllocated, unless `allocate` (WRITE_ALLOC): then the write
        layout is taken here, for the slice's range (charged to the grant's principal,
        as the client's `layout_get` would be), so that a pipelined write never needs its
        reply to go on (docs/dev/protocol.md). The periodic commit may seal freshly
        laid-out blocks before the write lands: a few attempts."""
        bs = self.kernel.block_size
        # (the host kernel's dirty pages of the file written back first: F2)
        await self.service.before_direct_change(g)
        paid = False
        for attempt in range(WRITE_ATTEMPTS):
            try:
                b0, b1 = block_span(offset, len(piece), bs)
                if g.extents.sealed_allocated(b0, b1 - b0):
                    # Committed data under the write (a random overwrite, the common
                    # case): straight to the relocation, not through a kernel write
                    # that would only find the seal and raise (its write barrier, grant
                    # check and exception cost ~10 % of a 4 KiB write's daemon time).
                    # The kernel write inside the relocation checks the rights; the
                    # relocation takes the write's place at its limits itself.
                    self.kernel.check(g, Rights.WRITE)
                    await self.service.write_relocating(g, offset, memoryview(piece))
                    return
                if not paid:
                    # The write's place at its principal's I/O limits (and, under
                    # write-back, what a barrier expedited of its write-back repaid),
                    # holding no lock: the kernel's write then goes past its limits
                    # (F1). Once a slice, whatever the attempts.
                    await self.kernel.repay_limit(g.principal, len(piece), offset)
                    paid = True
                try:
                    await self.kernel.write(g, offset, piece)
                except Sealed:
                    await self.service.write_relocating(g, offset, memoryview(piece))
                return
            except NotAllocated:
                if not allocate or attempt == WRITE_ATTEMPTS - 1:
                    raise
                self.kernel.check(g, Rights.WRITE)
                await self.service.layout_get(g, offset, len(piece))

    async def _op_append(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        length = arg_int(p, "length", hi=MAX_SHM)
        offset, size = await self._append(conn, g, length, arg_int(p, "buf", hi=1 << 62))
        return {"offset": offset, "n": length, "size": size}

    async def _append(self, conn: Connection, g: Grant, length: int,
                      at: int) -> tuple[int, int]:
        self.kernel.check(g, Rights.WRITE)
        buf = self._buf(conn, at, length)
        await self.service.before_direct_change(g)
        return await self.service.append(g, memoryview(bytearray(buf)))  # a copy: see _write

    async def _op_layout_get(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        self.kernel.check(g, Rights.WRITE)
        offset = arg_int(p, "offset")
        length = arg_int(p, "length", hi=1 << 40)
        return {"allocated": await self.service.layout_get(g, offset, length)}

    async def _op_commit(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        self.kernel.check(g, Rights.WRITE)
        offset = arg_int(p, "offset")
        length = arg_int(p, "length", hi=1 << 40)
        return {"size": await self.service.layout_commit(g, offset, length)}

    async def _op_truncate(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        self.kernel.check(g, Rights.WRITE)
        size = arg_int(p, "size")
        await self.service.before_direct_change(g)
        await self.service.truncate(g, size)
        return {"size": self.service.size_of(g)}

    async def _op_fsync(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        self.kernel.check(g, Rights.NONE)
        await self.service.fsync(g)
        return {}

    async def _op_stat(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        self.kernel.check(g, Rights.NONE)
        return self.service.stat_of(g)

    async def _op_mint(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        rights = Rights(arg_int(p, "rights", hi=int(Rights.RW)))
        child = self.kernel.mint(g, rights)
        try:
            slot = self._new_slot(conn, child)
        except BaseException:
            self.kernel.release(child)
            raise
        return {"slot": slot, "rights": int(child.rights)}

    async def _op_revoke(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        g = self._slot(conn, p)
        await self.kernel.revoke(g, holder_knows=True)  # (the minted ones are told)
        return {}

    async def _op_close(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        slot = arg_int(p, "slot", hi=1 << 31)
        if slot not in conn.slots:
            raise BadSlot(f"no capability in slot {slot}")
        await self._close_slot(conn, slot)
        return {}
