"""The FUSE boundary: one `Operations` class that translates between pyfuse3 requests
and `FileSystem` calls, and nothing else.

Two rules hold for every handler:
- Only `pyfuse3.FUSEError` may leave a handler (anything else kills the mount): domain
  errors become their errno, unexpected exceptions are logged with the operation and
  inode and answered with EIO (`_guard`).
- Answer what the kernel can cache, so it asks less: long entry and attribute timeouts
  (every change goes through this daemon, which invalidates what it changes behind
  the kernel's back), negative lookups cached, attributes returned with readdirplus.
- A handler runs only once its principal is admitted (`Admission`): one tenant's slow
  or blocked requests cannot occupy every request worker of the daemon (a request
  waiting for admission gives its worker back, within a per-principal bound).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import math
import os
import stat
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import pyfuse3
import trio

from kernelshim import PrincipalId, SluiceError
from kernelshim.connection import tenant_of
from kernelshim.loglimit import LogLimiter
from kernelshim.principals import Principal

from .errors import NotFound
from .invalidator import Invalidator
from .filesystem import Caller, FileSystem, Inode
from .xattrs import CONTROL_XATTR

RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
#: file capabilities (setcap): refused, see `setxattr`
FCAPS_XATTR = b"security.capability"

log = logging.getLogger(__name__)

#: how long a direct client's change waits for the kernel to write back (and drop) the
#: file's dirty pages first (fs/layouts.py, before_direct_change), and the worker
#: threads that may do it at once
WRITE_BACK_WAIT = 0.25
WRITE_BACK_THREADS = 4

#: seconds the kernel may cache names and attributes (changes made behind its back are
#: invalidated explicitly)
TIMEOUT = 300.0
#: directory entries fetched per readdir query: about what one READDIRPLUS reply holds
#: (18-77 entries of a 4 KiB reply); 256 instantiated (and cached) every entry's inode
#: for a reply that took a fifth of them, 2-5 ms a request (probe 11, F8)
READDIR_BATCH = 32
#: seconds from its start during which a handler's schedule points (an uncontended
#: trio.Lock, trio.lowlevel.checkpoint) do not give the event loop back: each would
#: cost a pass of the loop (a system call, the instruments' hooks) and, at the first,
#: the hand-over of reading to another worker — three of them in every WRITE (the inode
#: lock, the device's scheduler), 0.86 extra loop steps per request of an untar
#: (sluice's binding: pyfuse3.main's checkpoint_budget). Handlers that really wait
#: give the loop back as before; the bound is the shim server's turn while principals
#: contend (kernelshim TURN_SECONDS), so a victim's request waits no longer behind
#: another tenant's handler than behind one of its shim requests.
HANDLER_CHECKPOINT_BUDGET = 0.1e-3

#: FUSE handlers one principal may have executing at once (the rest of its requests
#: wait for admission); see `Admission` and MountOptions.max_tasks in fs/mount.py
PRINCIPAL_REQUESTS = 16
#: the mount's ceiling on the requests one principal may have parked — waiting for
#: admission without holding a pyfuse3 worker (`Admission`), and the bytes they hold
#: (payloads plus PARKED_OVERHEAD each). Each principal's own bound is its bank
#: (`parked`, `parked_bytes`: 4096 and 64 MiB by default, kernelshim/banks.py), which
#: root changes on a live mount; this only caps what root may give one principal.
PARKED_REQUESTS = 1 << 16
PARKED_BYTES = 1 << 30
#: requests of one tenant the fair intake lets through as they come in one intake round
#: (until the kernel's queue is found empty), before the rest of them wait their turn
#: (`Operations.intake`)
INTAKE_QUANTUM = 4
#: seconds after the last change of tenant between two requests read from which one
#: tenant is taken to be alone, and its requests are no longer deferred
INTAKE_ALONE = 1.0
#: what a parked request holds besides its payload: its trio task, the coroutine
#: frames of the handler chain and its copied arguments (tracemalloc: about 3.5 KiB)
PARKED_OVERHEAD = 4096
#: handlers never refused for a full parking: the kernel does not retry them (a lost
#: RELEASE leaks the open file). The kernel sends them as background requests, at most
#: max_background (12) at a time for the whole mount, and sends no other background
#: request (every tenant's readahead of page-cache files, and their RELEASEs) while 12
#: are unanswered. So one that cannot be admitted at once is answered at once and its
#: work waits for admission in a task of its own (`Operations.run_releases`), charged
#: to its principal's parking but never refused: a tenant whose releases wait behind
#: its own held requests no longer holds the mount's background slots. (Before, 12
#: parked RELEASEs of one tenant held another's 1 MiB read of a page-cache file for
#: 25.6 s.)
_NEVER_REFUSED = frozenset({"release", "releasedir"})
#: handlers not admitted at all: FLUSH (sent on every close(2), its error becomes
#: close's, never retried) only checks the handle — nothing to bound, and an EAGAIN
#: would make `cp` or `tar` report a failed close of data they wrote. (FSYNC is
#: admitted like any request: beyond the parking bound it gets EAGAIN, which says the
#: data is not yet durable — true — rather than waiting while holding a worker.)
_UNADMITTED = frozenset({"flush"})

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: handlers whose first argument is a file handle (pyfuse3 passes them no context: the
#: principal is the one the file was opened for, charged for its I/O too)
_FILE_HANDLERS = frozenset({"read", "write", "flush", "release", "fsync", "fallocate",
                            "lseek"})
#: handlers whose first argument is a directory handle (from `opendir`)
_DIR_HANDLERS = frozenset({"readdir", "releasedir", "fsyncdir"})
#: how a handler's principal is found (`Operations._principal_of`): by the request's
#: context (its last argument), by its file handle, by its directory handle
_CTX, _FILE, _DIR = 0, 1, 2
#: handlers admitted as data requests; every other one is a namespace request (see
#: `Admission`: the kernel holds directory locks across namespace requests, so they
#: must not wait behind the same tenant's data requests, which its own I/O limit may
#: hold for as long as it likes). A SETATTR that changes the size and an OPEN with
#: O_TRUNC are data requests too (a truncate waits for the file's writes in flight; the
#: kernel holds only that file's lock for them).
_DATA_HANDLERS = frozenset({"read", "write", "fsync", "fallocate", "lseek", "release"})
#: the two kinds of request (`Admission.run`'s `lane`)
NAMESPACE, DATA = 0, 1


def _no_release() -> bool:
    return False


class Tokens:
    """A principal's admission tokens: `trio.CapacityLimiter` without borrower
    identities (a request takes one token per level and gives back the same), so that
    the common case — a token free, nobody waiting — is two integer updates; the
    limiter's borrower set and its wake-up pass on every release cost about 2.5 µs a
    request. Waiters are served in arrival order: a released token goes to the first
    waiter directly, and nobody takes a token while others wait for one (no barging)."""

    __slots__ = ("total_tokens", "borrowed_tokens", "_lot")

    def __init__(self, total_tokens: int) -> None:
        self.total_tokens = total_tokens
        #: tokens held by running requests (a token handed to a waiter stays counted)
        self.borrowed_tokens = 0
        self._lot = trio.lowlevel.ParkingLot()

    def acquire_nowait(self) -> bool:
        """Take a token if one is free and nobody waits; no checkpoint."""
        if self.borrowed_tokens < self.total_tokens and not self._lot:
            self.borrowed_tokens += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a token, waiting in line for one (a checkpoint)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.acquire_nowait():
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        # Handed over by `release` (park returns only once unparked; a cancelled
        # waiter leaves the lot without a token).
        await self._lot.park()

    def release(self) -> None:
        """Give a token back: to the first waiter if any (it stays borrowed)."""
        if self._lot:
            self._lot.unpark()
        else:
            self.borrowed_tokens -= 1

    @property
    def tasks_waiting(self) -> int:
        return len(self._lot)


class Admission:
    """Per-principal admission of FUSE requests.

    pyfuse3 serves requests in a pool of worker tasks (`pyfuse3.main(max_tasks=...)`);
    a worker reads the next request only once the handler of its last one returns.
    Without admission one tenant with enough threads blocked in slow requests — a slow
    device profile, an inode lock another request holds — holds every worker, and
    nobody else's `stat` is even read from the kernel.

    So each principal has `per_principal` tokens (`Tokens`), and a
    request runs its handler only while holding a token of its principal and of each of
    its ancestors below root (banks are hierarchical: a tenant cannot multiply its share
    by making child principals). Tokens are taken bottom-up — one consistent order, so
    no cycle of waits — and a request waiting at its own level holds no ancestor token.
    Root's own requests (uid 0) count against root's limiter alone.

    Data requests (read, write, fsync, fallocate, lseek, release, a truncate) may hold
    at most `data_requests` of those tokens (3/4 of them: 12 of 16), so the rest are
    always left to namespace requests (everything else). A tenant's data requests may
    wait as long as its own I/O limit says, and while a namespace request of it waits
    for a token the kernel may hold a directory's lock for it — a readdir holds it
    shared, a create or an unlink exclusively — which stops every tenant's lookups,
    listings and kernel notifications in that directory (a shared, world-writable one
    included). So a namespace request never waits for a token behind data requests
    alone, and a namespace handler does not wait for the tenant's I/O limit (an
    unlink's or a truncate's drain waits only for writes, their limits waived:
    `Kernel.drain_writes`).

    A request that must wait for a token is *parked*: it gives its worker back
    (`pyfuse3.release_worker()`, sluice's binding: the request's arguments were copied
    out of the request buffer when it was read, so the buffer is freed and another
    worker reads in its place) and waits as a plain task. Parking is bounded per
    principal by its banks and charged, like the tokens, to the principal and each
    ancestor below root (their `usage.parked` and `usage.parked_bytes`): at each level
    at most `parked` requests and `parked_bytes` bytes (payloads plus PARKED_OVERHEAD
    each), the tightest of that principal's banks and its ancestors' (root's included:
    its banks are ceilings for everyone, though root counts only its own requests, so
    that no tenant can fill it), and never more than the mount's `parked_requests` and
    `parked_bytes`. The banks are read when a request parks, so `sluice principal set`
    takes effect at once. A request beyond either bound is answered EAGAIN at once
    ("Resource temporarily unavailable", what fork(2) says at RLIMIT_NPROC): its
    principal then has thousands of threads stuck in this file system, and the only
    other choices — waiting while holding a worker, or parking without bound — would
    let it take every worker or unbounded memory from the other tenants. RELEASE and
    RELEASEDIR are never refused (the kernel does not retry them), and never keep the
    kernel waiting for admission: one that cannot be admitted at once is answered at
    once and waits as a task of its own (see _NEVER_REFUSED).

    What one tenant (a principal below root with all its descendants) can hold at once
    with the default banks: `per_principal` workers running its handlers (16), a
    deferred release per handle it had open (its `grants` bank), and 4096 parked requests holding at
    most 64 MiB (payloads and 4 KiB each: e.g. about 60 parked 1 MiB writes); the rest of
    the pool (fs/mount.py: 512 workers) is left to the others.
    """

    def __init__(self, per_principal: int = PRINCIPAL_REQUESTS, *,
                 parked_requests: int = PARKED_REQUESTS, parked_bytes: int = PARKED_BYTES,
                 release_worker: Callable[[], bool] | None = None) -> None:
        if per_principal < 1:
            raise ValueError("per_principal must be at least 1")
        if parked_requests < 0 or parked_bytes < 0:
            raise ValueError("parked_requests and parked_bytes must not be negative")
        self.per_principal = per_principal
        #: of those, what data requests may hold (the rest wait for namespace requests)
        self.data_requests = max(1, per_principal - max(1, per_principal // 4))
        #: the mount's ceilings (each principal's own bound is its bank)
        self.parked_requests = parked_requests
        self.parked_bytes = parked_bytes
        # (an older build has none: fs/mount.py refuses to mount with it)
        if release_worker is None:
            release_worker = getattr(pyfuse3, "release_worker", _no_release)
        self._release_worker: Callable[[], bool] = release_worker
        self._limiters: dict[tuple[PrincipalId, int], Tokens] = {}
        #: principal id -> (that principal, its chain, their limiters): a principal's
        #: ancestors never change (principals are not moved), so both lists are built
        #: once; the entry is used only for the same Principal object (a principal
        #: removed and made again gets a new one)
        self._paths: dict[tuple[PrincipalId, int],
                          tuple[Principal, list[Principal], list[Tokens]]] = {}
        #: requests answered EAGAIN because their principal's parking was full
        self.refused = 0

    def limiter(self, principal: Principal, lane: int = NAMESPACE) -> Tokens:
        """`principal`'s tokens (NAMESPACE: all of them), or its data requests' share
        of them (DATA)."""
        lim = self._limiters.get((principal.id, lane))
        if lim is None:
            lim = self._limiters[principal.id, lane] = Tokens(
                self.per_principal if lane == NAMESPACE else self.data_requests)
        return lim

    def _chain(self, principal: Principal) -> list[Principal]:
        """The principals a request of `principal` is charged to, bottom-up."""
        return [p for p in principal.chain() if p.parent is not None] or [principal]

    def limiters(self, principal: Principal, lane: int = NAMESPACE) -> list[Tokens]:
        """The limiters a request of `principal` must pass, bottom-up (one order for
        every request: at each level a data request's share first, then the tokens)."""
        out = []
        for p in self._chain(principal):
            if lane == DATA:
                out.append(self.limiter(p, DATA))
            out.append(self.limiter(p, NAMESPACE))
        return out

    def parked(self, principal: Principal) -> tuple[int, int]:
        """(requests, bytes) parked now by `principal` and its descendants."""
        return principal.usage.parked, principal.usage.parked_bytes

    def bounds(self, principal: Principal) -> tuple[int, int]:
        """(requests, bytes) `principal` may have parked: the tightest of its banks, its
        ancestors' and the mount's."""
        n, b = self.parked_requests, self.parked_bytes
        for q in principal.chain():
            qb = q.banks
            if qb.parked is not None and qb.parked < n:
                n = qb.parked
            if qb.parked_bytes is not None and qb.parked_bytes < b:
                b = qb.parked_bytes
        return n, b

    def acquire_nowait(self, principal: Principal, lane: int = NAMESPACE
                       ) -> list[Tokens] | None:
        """Take a token of `principal` and of each ancestor below root (for a request
        of `lane`) if every one is free now (nobody waiting): the tokens, for
        `release`; else None, nothing taken. No checkpoint."""
        lims = self.limiters(principal, lane)
        for n, lim in enumerate(lims):
            if not lim.acquire_nowait():
                for held in reversed(lims[:n]):
                    held.release()
                return None
        return lims

    @staticmethod
    def release(lims: list[Tokens]) -> None:
        """Give back the tokens `acquire_nowait` took."""
        for lim in reversed(lims):
            lim.release()

    def _park(self, chain: list[Principal], cost: int, must: bool) -> bool:
        """Charge one parked request of `cost` bytes to `chain`; False (nothing
        charged) if that would pass a bound and the request may be refused."""
        for p in chain:
            u = p.usage
            max_n, max_b = self.bounds(p)
            if u.parked + 1 > max_n or u.parked_bytes + cost > max_b:
                if must:
                    return False
                self.refused += 1
                log.debug("parking of %s full (%d of %d requests, %d of %d bytes): EAGAIN",
                          p.name, u.parked, max_n, u.parked_bytes, max_b)
                raise pyfuse3.FUSEError(errno.EAGAIN)
        for p in chain:
            p.usage.parked += 1
            p.usage.parked_bytes += cost
        return True

    def _unpark(self, chain: list[Principal], cost: int) -> None:
        for p in chain:
            p.usage.parked -= 1
            p.usage.parked_bytes -= cost

    async def run(self, principal: Principal, fn: Callable[..., Awaitable[Any]],
                  *args: Any, payload: int | None = None, must: bool = False,
                  lane: int = NAMESPACE, in_worker: bool = True) -> Any:
        """`await fn(*args)` once admitted for `principal`; the tokens are released when
        it returns or raises (cancellation included). A request that has to wait is
        parked (see the class): `payload` is the bytes its arguments hold (default: the
        bytes arguments' lengths, counted only if it parks); `must`: never refused, it
        waits holding its worker when the parking is full; `lane`: NAMESPACE or DATA;
        `in_worker`: false for a task that is no pyfuse3 worker (a deferred release):
        none to give back."""
        path = self._paths.get((principal.id, lane))
        if path is None or path[0] is not principal:
            chain = self._chain(principal)
            path = self._paths[principal.id, lane] = (principal, chain,
                                                      self.limiters(principal, lane))
        _, chain, lims = path
        # The common case, every request of an untar: a token free at each level and
        # nobody waiting. No checkpoint, nothing allocated but the list.
        n = 0
        for lim in lims:
            if not lim.acquire_nowait():
                break
            n += 1
        if n == len(lims):
            try:
                return await fn(*args)
            finally:
                for lim in reversed(lims):
                    lim.release()
        held = lims[:n]
        parked = -1  # bytes charged while parked; -1: not parked
        try:
            for lim in lims[n:]:
                if not lim.acquire_nowait():
                    if parked < 0:
                        if payload is None:  # (a large write's payload is a view of
                            # the whole request buffer, which it keeps alive)
                            payload = sum(len(a.obj) if isinstance(a, memoryview)
                                          and isinstance(a.obj, bytes) else len(a)
                                          for a in args
                                          if isinstance(a, (bytes, bytearray, memoryview)))
                        cost = PARKED_OVERHEAD + payload
                        if self._park(chain, cost, must):
                            parked = cost
                            if in_worker:
                                self._release_worker()
                    await lim.acquire()
                held.append(lim)
            if parked >= 0:
                self._unpark(chain, parked)
                parked = -1
            return await fn(*args)
        finally:
            if parked >= 0:
                self._unpark(chain, parked)
            for lim in reversed(held):
                lim.release()


def _whom(who: Principal | None) -> str:
    """The key a request's log lines are rate-limited by (`LogLimiter`): its tenant."""
    return "the kernel" if who is None else f"principal {tenant_of(who).name!r}"


def _guard(fn: F, *, name: str | None = None) -> F:
    """Admit the request for its principal (`Admission`), then run the handler. Let
    only FUSEError out of it: domain errors become their errno; anything else is a bug,
    logged with the operation and its arguments and answered with EIO. `name`: the
    request's (default: the handler's own name)."""
    name = name or fn.__name__
    # Decided once per handler, not per request: how its principal is found
    # (`Operations._principal_of`) and whether it may be refused.
    kind = (None if name in _UNADMITTED else _FILE if name in _FILE_HANDLERS else
            _DIR if name in _DIR_HANDLERS else _CTX)
    must = name in _NEVER_REFUSED
    lane = DATA if name in _DATA_HANDLERS else NAMESPACE
    # (a truncate: SETATTR with the size, OPEN with O_TRUNC)
    truncates = {"setattr": lambda a: a[2].update_size,
                 "open": lambda a: a[1] & os.O_TRUNC}.get(name)

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        self.fs.fuse_requests[name] += 1
        who: Principal | None = None
        try:
            who = None if kind is None else self._principal_of(kind, args)
            if who is None:
                return await fn(self, *args)
            on_request = self.on_request
            if on_request is not None:
                on_request(who)
            if must and self._releases is not None:
                # RELEASE, RELEASEDIR: never hold the kernel's background slot
                lims = self.admission.acquire_nowait(who, lane)
                if lims is None:
                    self._release_later(who, fn, args, lane)
                    return None
                try:
                    return await fn(self, *args)
                finally:
                    self.admission.release(lims)
            return await self.admission.run(
                who, fn, self, *args, must=must,
                lane=DATA if truncates is not None and truncates(args) else lane)
        except pyfuse3.FUSEError:
            raise
        except SluiceError as exc:
            if exc.errno == errno.EIO:  # a bad block, a device failure: worth a line
                self.loglimit.log(log, logging.ERROR, _whom(who), "%s%r: %s", name,
                                  _brief(args), exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            self.loglimit.log(log, logging.WARNING, _whom(who), "%s%r: %s", name,
                              _brief(args), exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing else may escape
            self.loglimit.log(log, logging.ERROR, _whom(who), "unexpected error in %s%r: %s: %s",
                              name, _brief(args), type(exc).__name__, exc, exc_info=True)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _brief(args: tuple) -> tuple:
    return tuple(a if isinstance(a, int) or isinstance(a, bytes) and len(a) <= 64
                 else f"<{type(a).__name__}>" for a in args
                 if not isinstance(a, pyfuse3.RequestContext))


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False
    # Both need sluice's own pyfuse3 build (binding/): shared mmap of files opened with
    # direct I/O (Linux 6.6+), and no `security.capability` GETXATTR before each first
    # write — sluice clears set-user-ID/set-group-ID itself on write, truncate and
    # O_TRUNC (FileSystem._drop_setid) and keeps no security.capability of its own.
    enable_direct_io_allow_mmap = True
    enable_killpriv_v2 = True

    def __init__(self, fs: FileSystem, *, control_socket: str | None = None,
                 principal_requests: int = PRINCIPAL_REQUESTS,
                 parked_requests: int = PARKED_REQUESTS,
                 parked_bytes: int = PARKED_BYTES) -> None:
        super().__init__()
        self.fs = fs
        self.admission = Admission(principal_requests, parked_requests=parked_requests,
                                   parked_bytes=parked_bytes)
        #: open directory handle -> (inode, principal it was opened for)
        self._dirs: dict[int, tuple[int, PrincipalId]] = {}
        self._dir_fhs = itertools.count(1)
        #: answered for the root's `user.sluice.control` xattr: how direct clients find
        #: the shim's socket from the mount point
        self.control_socket = control_socket.encode() if control_socket else None
        #: where releases that could not be admitted at once wait (`run_releases`)
        self._releases: trio.Nursery | None = None
        #: releases answered at once and run later (their principal was busy)
        self.deferred_releases = 0
        #: the log lines requests cause, rate-limited per tenant (probe 16, F2)
        self.loglimit = LogLimiter()
        fs.on_attr_changed = self._invalidate_attr
        #: kernel notifications that may block, queued per tenant
        self.invalidator = Invalidator(self._invalidate_entry_sync, self._invalidate_data_sync)
        fs.on_data_changed = self._invalidate_data
        fs.on_entry_created = self._invalidate_entry
        fs.write_back_pages = self._write_back_pages
        #: worker threads writing a file's dirty pages back before a direct change
        self._pages_limiter = trio.CapacityLimiter(WRITE_BACK_THREADS)
        #: the fair intake's round, and each tenant's requests let through in it
        self._intake_round = -1
        self._intake_counts: dict[int, int] = {}
        #: the tenant of the last request read, and when a request of another was
        #: last read after one of a different tenant (the intake takes turns only then)
        self._intake_last: int | None = None
        self._intake_mixed = -math.inf
        #: told of every admitted request's principal as its handler starts (the
        #: mount sets the shim server's fair turns here: a FUSE request is its
        #: tenant's step of the event loop, kernelshim/connection.py, `FairTurns.serves`)
        self.on_request: Callable[[Principal], None] | None = None

    def intake(self, uid: int, pid: int, opcode: int, rnd: int) -> tuple[int | None, bool]:
        """The fair intake's hook (sluice's binding, `pyfuse3.set_intake`), called for
        each small request read from the kernel: its tenant, and whether it waits its
        turn. The kernel queues every caller's requests in one FIFO, so a tenant with
        3,000 threads in cached 4 KiB reads put another tenant's `stat` behind its
        whole backlog: p99 0.8 s, max 1.5 s (probe 18, F5). Each tenant's first
        INTAKE_QUANTUM requests of a round (until the kernel's queue is found empty)
        are processed as they come; the rest are copied out and processed a tenant at
        a time in turn, between the requests read, so that the kernel's queue stays
        short and another tenant's request is read, and served, at once. Never raises
        (it runs in the binding's read loop)."""
        try:
            key = tenant_of(self.fs.principals.resolve(pid, uid)).id
        except Exception:  # noqa: BLE001 - never break the read loop: as it came
            return None, False
        # Only while another tenant has been seen lately: a tenant alone gains nothing
        # from turns, and its parallel requests would pay the copies.
        now = time.monotonic()
        if key != self._intake_last:
            self._intake_last = key
            self._intake_mixed = now
        elif now - self._intake_mixed > INTAKE_ALONE:
            return key, False
        if rnd != self._intake_round:
            self._intake_round = rnd
            self._intake_counts.clear()
        n = self._intake_counts.get(key, 0)
        if n >= INTAKE_QUANTUM:
            return key, True
        self._intake_counts[key] = n + 1
        return key, False

    async def run_releases(self, *, task_status: trio.TaskStatus[None] =
                           trio.TASK_STATUS_IGNORED) -> None:
        """The service in whose nursery deferred releases wait for admission (see
        _NEVER_REFUSED). Cancelled at unmount: a release still waiting is dropped (an
        unlinked file it would have freed is freed by the next mount, as after a
        crash)."""
        async with trio.open_nursery() as nursery:
            self._releases = nursery
            task_status.started()
            await trio.sleep_forever()

    def _release_later(self, who: Principal, fn: Callable[..., Awaitable[Any]],
                       args: tuple, lane: int = NAMESPACE) -> None:
        """Run RELEASE/RELEASEDIR handler `fn` once admitted for `who`, in a task of
        its own; the kernel has its answer already."""
        assert self._releases is not None
        self.deferred_releases += 1

        async def later() -> None:
            try:
                await self.admission.run(who, fn, self, *args, must=True, lane=lane,
                                         in_worker=False)
            except SluiceError as exc:
                log.warning("deferred %s%r: %s", fn.__name__, _brief(args), exc)
            except Exception:  # noqa: BLE001 - a background task: log, never crash
                log.exception("deferred %s%r failed", fn.__name__, _brief(args))

        self._releases.start_soon(later, name=f"release-{fn.__name__}")

    def init(self) -> None:
        # Called by pyfuse3 once the kernel's INIT is answered: say what was agreed.
        got = pyfuse3.negotiated()
        missing = {"direct_io_allow_mmap", "handle_killpriv_v2"} - got["want"]
        log.info("FUSE capabilities in use: %s", ", ".join(sorted(got["want"])))
        if missing:
            log.warning("the kernel did not offer %s: shared mmap of direct-I/O files "
                        "and/or killpriv v2 are off", ", ".join(sorted(missing)))

    # -- helpers ----------------------------------------------------------------------

    def _caller(self, ctx: pyfuse3.RequestContext) -> Caller:
        return Caller(ctx.uid, ctx.gid, ctx.pid, ctx.umask,
                      self.fs.principals.resolve(ctx.pid, ctx.uid).id)

    def _principal_of(self, kind: int, args: tuple) -> Principal | None:
        """Who a request is admitted for: the calling process's principal (`_CTX`:
        pyfuse3 passes the context last), or for requests on an open file (`_FILE`) or
        directory (`_DIR`) the principal it was opened for. None when the handle is
        unknown (the handler answers that)."""
        if kind == _CTX:
            a = args[-1]
            return self.fs.principals.resolve(a.pid, a.uid)
        if kind == _FILE:
            try:
                h = self.fs.handle(args[0])
            except SluiceError:
                return None
            return self.fs.principal(h.grant.principal)
        d = self._dirs.get(args[0])
        return None if d is None else self.fs.principal(d[1])

    def _dir_inode(self, fh: int) -> int:
        d = self._dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return d[0]

    def _attr(self, node: Inode) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.id
        e.generation = node.generation
        e.entry_timeout = TIMEOUT
        e.attr_timeout = TIMEOUT
        e.st_mode = node.mode
        e.st_nlink = node.nlink
        e.st_uid = node.uid
        e.st_gid = node.gid
        e.st_rdev = node.rdev
        e.st_blksize = self.fs.block_size
        if node.id in self.fs.discarded:  # dropped by the pager, being emptied
            e.st_size = e.st_blocks = 0
        else:
            e.st_size = node.size
            e.st_blocks = node.blocks * (self.fs.block_size // 512)
        e.st_atime_ns = node.atime_ns
        e.st_mtime_ns = node.mtime_ns
        e.st_ctime_ns = node.ctime_ns
        return e

    def _invalidate_attr(self, ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except Exception as exc:  # noqa: BLE001 - the kernel may not know the inode
            log.debug("invalidate_inode(%d) failed: %s", ino, exc)

    def _tenant(self, principal: int) -> int:
        return tenant_of(self.fs.principals.by_id(principal)).id

    def _invalidate_data(self, ino: int, principal: int) -> None:
        # Dropping cached pages may wait for a page the kernel is reading through this
        # very daemon: from a worker thread, so the loop can answer that read; queued
        # for the tenant whose file it is (fs/invalidator.py).
        self.invalidator.data(self._tenant(principal), ino)

    async def _write_back_pages(self, ino: int) -> None:
        # The kernel writes each dirty page back (FUSE launder: a WRITE to this daemon,
        # which the loop answers meanwhile) before it drops it, and the call returns
        # once it has: from a worker thread, awaited (fs/layouts.py,
        # before_direct_change). Bounded: a page held in the kernel (a read this daemon
        # has parked) must not hold a direct writer for long — past WRITE_BACK_WAIT the
        # change goes on, and the thread finishes on its own (it holds a place of the
        # limiter until then, so at most WRITE_BACK_THREADS are ever stuck).
        with trio.move_on_after(WRITE_BACK_WAIT) as scope:
            await trio.to_thread.run_sync(self._invalidate_data_sync, ino,
                                           abandon_on_cancel=True,
                                           limiter=self._pages_limiter)
        if scope.cancelled_caught:
            log.debug("write-back of inode %d's cached pages before a direct change: "
                      "still waiting after %.1f s, going on", ino, WRITE_BACK_WAIT)

    @staticmethod
    def _invalidate_data_sync(ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except Exception as exc:  # noqa: BLE001 - the kernel may not know the inode
            log.debug("invalidate_inode(%d) failed: %s", ino, exc)

    def _invalidate_entry(self, parent: int, name: bytes, principal: int) -> None:
        # From a worker thread: the kernel may hold the directory's lock for a request
        # this daemon has yet to answer; queued for the tenant that made the name
        # (fs/invalidator.py). (Not pyfuse3's invalidate_entry_async: its queue may still
        # hold the request when the session closes at unmount, and then logs the failure
        # as an error with a traceback.)
        self.invalidator.entry(self._tenant(principal), parent, name)

    @staticmethod
    def _invalidate_entry_sync(parent: int, name: bytes) -> None:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except Exception as exc:  # noqa: BLE001 - gone already, or the session closed
            log.debug("invalidate_entry(%d, %r) failed: %s", parent, name, exc)

    def _file_info(self, h: Any) -> pyfuse3.FileInfo:
        # noflush: `flush` has nothing to do (data reaches the pager at each write,
        # errors are reported at fsync; no POSIX locks are kept here), so the kernel
        # need not send FLUSH at every close.
        # parallel_direct_writes (FOPEN_PARALLEL_DIRECT_WRITES): the kernel holds the
        # file's inode lock only shared across a direct-I/O write that does not extend
        # the file, as Linux does for O_DIRECT. The daemon orders a file's writes
        # itself (its inode lock and the merge locks); held exclusive, one tenant's
        # write waiting for its place at its own I/O limit held every other process's
        # write of the file in the host kernel (review of F1, R5: 18 s at 0.5 IOPS).
        return pyfuse3.FileInfo(fh=h.fh, direct_io=h.direct_io, keep_cache=False,
                                noflush=True, parallel_direct_writes=h.direct_io)

    # -- names ----------------------------------------------------------------------------

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        try:
            node = self.fs.lookup(parent_inode, name)
        except NotFound:
            # A negative entry the kernel may cache: st_ino 0 with a timeout. Names
            # created later come through this daemon, which the kernel then knows.
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = TIMEOUT
            return e
        return self._attr(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.fs.fuse_requests["forget"] += 1
        for ino, n in inode_list:
            try:
                self.fs.forget(ino, n)
            except Exception:  # noqa: BLE001 - forget has no reply; never kill the loop
                log.exception("forget(%d, %d) failed", ino, n)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.fs.inode(inode))

    @_guard
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        mode = attr.st_mode if fields.update_mode else self._killpriv_mode(inode, fields, ctx)
        node = await self.fs.setattr(
            inode,
            mode=mode,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
            caller=self._caller(ctx))
        return self._attr(node)

    def _killpriv_mode(self, inode: int, fields: pyfuse3.SetattrFields,
                       ctx: pyfuse3.RequestContext) -> int | None:
        """The mode a SETATTR must leave behind under FUSE_HANDLE_KILLPRIV_V2, which
        makes clearing set-user-ID/set-group-ID the filesystem's job (the kernel drops
        the mode it computed): a chown (uid or gid given, or no field at all: chown(-1, -1))
        clears them whoever calls, a truncate when the caller is not root (CAP_FSETID;
        libfuse does not pass FATTR_KILL_SUIDGID on). set-group-ID goes only with group
        execute, as in the VFS. Regular files only. None when nothing changes."""
        chown = fields.update_uid or fields.update_gid or not (
            fields.update_size or fields.update_atime or fields.update_mtime)
        if not (chown or fields.update_size and ctx.uid != 0):
            return None
        node = self.fs.inode(inode)
        if not node.is_reg:
            return None
        mode = node.mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            mode &= ~stat.S_ISGID
        return mode if mode != node.mode else None

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @_guard
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.fs.mknod(parent_inode, name, mode, rdev, self._caller(ctx)))

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.fs.mkdir(parent_inode, name, mode, self._caller(ctx)))

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, name)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(parent_inode, name)

    @_guard
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.fs.symlink(parent_inode, name, target, self._caller(ctx)))

    @_guard
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & RENAME_WHITEOUT:
            # overlayfs (sluice as its upper layer) renames with a whiteout left behind:
            # a character device 0/0 under the old name. The kernel has checked
            # CAP_MKNOD and holds both directories' locks, so no lookup through the
            # mount sees the name missing in between; the whiteout is made with no
            # checkpoint after the rename returns.
            if flags & RENAME_EXCHANGE:
                raise pyfuse3.FUSEError(errno.EINVAL)
            await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new,
                                 flags & ~RENAME_WHITEOUT)
            self.fs.mknod(parent_inode_old, name_old, stat.S_IFCHR, 0, self._caller(ctx))
            return
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_guard
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.fs.link(inode, new_parent_inode, new_name, self._caller(ctx)))

    # -- files ------------------------------------------------------------------------------

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        caller = self._caller(ctx)
        # The extent map of a file of many extents is loaded a part a step before the
        # handle's grant takes it (probe 11, F5).
        await self.fs.preload_extents(self.fs.inode(inode))
        h = self.fs.open(inode, flags, caller)
        await self.fs.kernel.settle_hints()  # (hints pushed at open: in force on return)
        if flags & os.O_TRUNC:
            try:
                await self.fs.open_truncate(h.inode, caller)
            except BaseException:
                await self.fs.release(h.fh)
                raise
        return self._file_info(h)

    @_guard
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        h, node = self.fs.create(parent_inode, name, mode, flags, self._caller(ctx))
        return self._file_info(h), self._attr(node)

    @_guard
    async def tmpfile(self, parent_inode: int, mode: int, flags: int,
                      ctx: pyfuse3.RequestContext
                      ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        h, node = await self.fs.tmpfile(parent_inode, mode, flags, self._caller(ctx))
        return self._file_info(h), self._attr(node)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> Any:
        return await self.fs.read(fh, off, size)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes | memoryview) -> int:
        return await self.fs.write(fh, off, buf)

    async def _write_synced(self, fh: int, off: int, buf: bytes | memoryview,
                            datasync: bool) -> int:
        """A write with O_SYNC or O_DSYNC in its flags (the binding's
        `write_synced`): written, then made durable before the reply, under the write's
        one admission (an fsync admitted apart could be refused, EAGAIN, after the
        bytes were in the file: a retried append would write them twice)."""
        n = await self.fs.write(fh, off, buf)
        if n:
            await self.fs.fsync(fh, datasync)
        return n

    write_synced = _guard(_write_synced, name="write")

    async def _write_with_flags(self, fh: int, off: int, buf: bytes | memoryview,
                                flags: int) -> int:
        """A write with the flags the kernel sent (the binding's `write_with_flags`):
        the file's flags now for a write(2), 0 for a write-back of cached pages. An
        append is placed at the file's end here, a write at a time: a write-back of
        mmap stores through a file opened O_APPEND lands at its page, and a write
        after fcntl(F_SETFL) took O_APPEND away at its offset (probe 21, F2: both
        went to the end of the file, the stored bytes lost). A write-back (flags 0: a
        write(2) has at least its access mode) leaves the set-ID bits alone, as the
        kernel's own filesystems do (probe 21, F3)."""
        append = bool(flags & os.O_APPEND)
        n = await self.fs.write(fh, off, buf, append=append, write_back=not flags)
        if n and flags & os.O_DSYNC:
            await self.fs.fsync(fh, (flags & os.O_SYNC) != os.O_SYNC)
        return n

    write_with_flags = _guard(_write_with_flags, name="write")

    @_guard
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        await self.fs.fallocate(fh, mode, off, length)

    @_guard
    async def lseek(self, fh: int, off: int, whence: int) -> int:
        return await self.fs.seek(fh, off, whence)

    @_guard
    async def flush(self, fh: int) -> None:
        self.fs.handle(fh)

    @_guard
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    # -- directories --------------------------------------------------------------------------

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # A handle of its own (not the inode): readdir and fsyncdir are admitted for the
        # principal that opened the directory, and it is charged for the handle.
        principal = self.fs.principals.resolve(ctx.pid, ctx.uid).id
        self.fs.opendir(inode, principal)
        fh = next(self._dir_fhs)
        self._dirs[fh] = (inode, principal)
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        ino = self._dir_inode(fh)
        after = start_id
        while True:
            entries = self.fs.readdir(ino, after, READDIR_BATCH)
            if not entries:
                return
            for cookie, name, node in entries:
                if not pyfuse3.readdir_reply(token, name, self._attr(node), cookie):
                    return
                if name not in (b".", b".."):
                    self.fs.count_lookup(node)  # readdirplus instantiates the entry
                after = cookie

    @_guard
    async def releasedir(self, fh: int) -> None:
        d = self._dirs.pop(fh, None)
        if d is not None:
            self.fs.releasedir(d[1])

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        ino = self._dir_inode(fh)
        await self.fs.fsync_inode(ino, self._dirs[fh][1])

    # -- volume and xattrs ------------------------------------------------------------------------

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.fs.statistics()
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.block_size
        s.f_frsize = st.block_size
        s.f_blocks = st.blocks
        s.f_bfree = st.blocks_free
        s.f_bavail = st.blocks_avail
        s.f_files = st.max_inodes
        s.f_ffree = max(0, st.max_inodes - st.inodes)
        s.f_favail = s.f_ffree
        s.f_namemax = 255
        return s

    @_guard
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
                       ) -> None:
        # pyfuse3 checks XATTR_CREATE/XATTR_REPLACE itself (through getxattr) before this.
        if name == FCAPS_XATTR:
            # File capabilities are not kept: under killpriv v2 the kernel leaves their
            # removal on write and chown to the filesystem, and the mount is nosuid
            # (exec ignores them anyway).
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        # What it makes the daemon write goes at the caller's I/O limits (probe 18, F1).
        who = self._caller(ctx).principal
        await self.fs.kernel.repay_metadata(who, len(name) + len(value))
        await self.fs.xattr_room(who, len(name) + len(value))
        self.fs.setxattr(inode, name, value, 0, uid=ctx.uid)
        # A hint xattr's new value applies to the file's cached pages a part a step
        # (probe 11, F6): in force when the request returns.
        await self.fs.kernel.settle_hints()

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == FCAPS_XATTR and self.fs.has_no_xattrs(inode):
            # The kernel asks for security.capability before each chown of a file
            # (ATTR_KILL_PRIV: one request per file of an untar). An inode known to
            # have no xattrs is answered from the inode cache, without admission, as
            # FLUSH is: it neither waits nor holds anything (has_no_xattrs never raises).
            self.fs.fuse_requests["getxattr"] += 1
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._getxattr(inode, name, ctx)

    @functools.partial(_guard, name="getxattr")
    async def _getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == CONTROL_XATTR and self.control_socket:
            return self.control_socket
        return self.fs.getxattr(inode, name)

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = self.fs.listxattr(inode)
        if ctx.uid != 0:
            # trusted.* names are for CAP_SYS_ADMIN only (ext4's and tmpfs's list
            # handlers leave them out; the VFS filters get and set, not the list): for
            # FUSE callers, root (probe 11, F7).
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @_guard
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.removexattr(inode, name, uid=ctx.uid)
        await self.fs.kernel.settle_hints()

    @_guard
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self.fs.access(inode, mode, self._caller(ctx))
        return True
