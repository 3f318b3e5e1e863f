"""The shim kernel: grants, and the data path through them to the pager and device.

One table of operations (the "traps"). Each names the rights it requires and the
errors it returns; policy (who may have which grant, who is charged how much) is the
caller's business (the metadata server, later the principal banks), not the kernel's.

| operation                     | requires            | errors                                  |
|-------------------------------|---------------------|-----------------------------------------|
| grant(inode, gen, map, r, p)  | (trusted caller)    | —                                       |
| mint(grant, rights)           | rights ⊆ grant's    | GrantRevoked, RightsError               |
| revoke(grant)                 | —                   | — (waits for in-flight requests)         |
| read(grant, offset, length)   | READ                | GrantRevoked, RightsError, BadRequest,  |
|                               |                     | ChecksumError, DeviceError              |
| write(grant, offset, data)    | WRITE               | as read, plus NotAllocated, Sealed      |
| write(..., cow=map)           | WRITE (trusted)     | as write                                |
| write_relocated(grant, blocks)| WRITE (trusted)     | as write                                |
| barrier(principal, file)      | (trusted caller)    | DeviceError                             |
| wait_quiescent(inodes=None)   | (trusted caller)    | —                                       |
| discard(runs, principal)      | (trusted caller)    | DeviceError                             |
| forget(runs, principal)       | (trusted caller)    | —                                       |
| sync()                        | —                   | DeviceError                             |
| writeback_file(inode, p, pace=)| (trusted caller)   | DeviceError                             |
| may_be_unflushed(inode)       | (trusted caller)    | —                                       |
| reserve(runs, relocation=, p) | (trusted caller)    | DeviceFull, DeviceError                 |
| host_reserved(runs)           | (trusted caller)    | —                                       |
| repay_limit(principal, n)     | (trusted caller)    | DeviceError (its paced write-back;      |
|                               |                     | waits; call holding no lock)            |
| limit_scope(principal)        | (trusted caller)    | — (around repay_limit and its writes)   |
| limit_hold(most_ios)          | (trusted caller)    | — (before a contended lock's wait)      |
| advise(grant, off, len, ...)  | READ (trusted: the  | GrantRevoked, RightsError, BadRequest,  |
|                               | caller checks WRITE | DeviceError (willneed reads)            |
|                               | for discardable)    |                                         |
| set_file_hints / forget_file  | (trusted caller)    | —                                       |
| on_reclaim / answer_reclaim   | (trusted caller)    | —                                       |
| start_trace / stop_trace      | (trusted caller)    | —                                       |
| writeback, on_discarded,      | (trusted caller)    | — (lowerlayers.py: what fs may ask of   |
| dirty_discardable_files,      |                     | the pager and device, never reaching    |
| device/pager_statistics       |                     | into them)                              |

Every pager request names the file and file block it is for (`file=grant.inode`,
`fblock=`), so that the pager can apply a file's hints (priority, discardable,
sequential) to its frames and record them in a trace.

Fencing: `revoke` marks the grant and everything minted from it revoked before its
first checkpoint, so no request that starts afterwards passes the check; it then
waits until the requests already past the check have finished. After it returns no
request through the old grant reaches the device — except the data of a stream write
the pager acknowledged earlier and writes behind (pager/writeback.py): the device has
claimed its blocks, so it lands before any later read, write or discard of them (a
discard of freed blocks waits for it), and never over a block's next owner's data.

Crash rules (docs/dev/invariants.md, "Crash rules"): WRITTEN blocks are sealed and a
write never changes them in place (`Sealed`); the metadata server relocates them
(`write(..., cow=...)`). `barrier()` holds new writes back, waits for those in flight,
makes everything written durable, and lets the caller commit metadata before writes
resume: what a commit exposes was on the device before it.
"""

from __future__ import annotations

import errno
import functools
import logging
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Sequence

import trio

from blockdev import (ROOT_PRINCIPAL, BankTree, BlockDevice, BlockNo, DeviceError,
                      DeviceFull, FaultPlan, PrincipalId, RecordLog, SluiceError, guard_reads)
from pager import BYPASS_BLOCKS, Pager

from .errors import BadRequest, NotAllocated, Sealed
from .extents import FRESH, HOLE, UNWRITTEN, WRITTEN, ExtentMap, block_span
from .grants import Grant, Rights
from .granttable import GrantTable
from .mergelocks import MergeLocks
from .lowerlayers import LowerLayers
from .principals import PrincipalError, PrincipalTable

log = logging.getLogger(__name__)

#: the range of a priority hint (0 = normal; higher is kept longer, against the same
#: principal's other pages only)
PRIORITY_MIN, PRIORITY_MAX = -100, 100
#: the smallest pager pool, in frames (`sluice mount` refuses a smaller --cache-size;
#: a caller of Kernel.open that asks for less gets this many)
MIN_CACHE_FRAMES = 16
#: a barrier that finds at least this much written since the device's last flush
#: flushes before holding writes back (see `Kernel.barrier`) ...
PREFLUSH_BYTES = 8 << 20
#: ... at most this many times in a row (the periodic commit: its caller asks for
#: them, `preflush_rounds`), as long as what a stream writes during each flush is at
#: most PREFLUSH_SHRINK of what that flush made durable (each round shrinks by a quarter
#: or more: at most 600 + 450 + 338 + 253 MB after a first flush of 600 MB)
PREFLUSH_ROUNDS = 4
PREFLUSH_SHRINK = 3 / 4
#: blocks one `advise` hands the pager between two yields of the event loop (64 MiB)
ADVISE_STEP = 16384
#: under write-back, a writer that owes a limited node on its path more than this many
#: seconds (for write-back a barrier expedited past it) is paced (`repay_limit`)
LIMIT_DEBT_SLACK = 1.0
#: the longest `repay_limit` sleeps before it reads the debt again (a limit removed or
#: raised meanwhile shortens or ends the wait)
LIMIT_DEBT_STEP = 0.25
#: the least a request that dirties frames waits while its principal is in debt
#: (`repay_limit`: each waits its own cost at the limit, at least this)
LIMIT_DEBT_MIN_WAIT = 0.001
#: the longest a request that writes into the metadata database (a setxattr) waits for
#: its place at its principal's I/O limits (`repay_metadata`): the host holds the
#: file's inode lock meanwhile
METADATA_MAX_WAIT = 1.0
#: the longest an fsync of a metadata-only change waits for its place at its
#: principal's I/O limits (`repay_commit`): the kernel holds the file's lock across a
#: FUSE fsync
FSYNC_REPAY_MAX_WAIT = 1.0
#: a refused host-space reservation is logged at most once per principal in this many
#: seconds, the next line counting those refused meanwhile: a tenant at a full host
#: retrying its write must not write one daemon log line per attempt (hostile probe
#: 5, L1)
RESERVE_LOG_INTERVAL = 60.0

#: cached pages a file hint is applied to in one step of the loop (~3 µs each)
REHINT_STEP = 1024

#: runs `reserve` looks at in one step of the loop (each ~5 µs; a chunk not yet
#: reserved, a host fallocate)
RESERVE_RUNS_PER_STEP = 256


def _unless_oserror(ask: Callable[[], int | None]) -> int | None:
    """`ask()`, or None if it raised OSError (a host that cannot answer fstatvfs)."""
    try:
        return ask()
    except OSError:
        return None


class Kernel(GrantTable, LowerLayers):
    """Grants over one device (the grant table itself: granttable.py; the services of
    the pager and device beyond the data path: lowerlayers.py). Create with
    `Kernel.open(volume_dir, ...)`."""

    def __init__(self, device: BlockDevice, pager: Pager) -> None:
        self.device = device
        self.pager = pager
        self.block_size = device.block_size
        self.nblocks = device.nblocks
        GrantTable.__init__(self)
        #: the file blocks partial writes are merging (`write`)
        self._merging = MergeLocks()
        #: writes in flight; while a barrier runs, new writes wait for `_barrier`
        self._writes = 0
        self._writes_done: trio.Event | None = None
        self._barrier: trio.Event | None = None
        #: whether anything was written or discarded since the last barrier
        self._dirty = False
        #: the files that had frames not on the device when the current (or last)
        #: barrier started: only discardable ones once its flush is done (the pager
        #: leaves those out). The commit in the barrier's body records them: a crash
        #: may have lost their data, so they come back empty (crash rule 4).
        self.unflushed_files: set[int] = set()
        #: the files written (`write`; `advise(dontneed)`'s write-back) since the
        #: start of the last completed barrier flush, and those whose writes the
        #: flush running now covers: their data may not be durable (`may_be_unflushed`)
        self._written_files: set[int] = set()
        self._flushing_files: set[int] = set()
        #: whether any file may have data not durable that `_written_files` does not
        #: name: true from the start (a daemon killed before it flushed left writes in
        #: the host's cache) until a barrier flush completes
        self._all_unflushed = self._flushing_all = True
        #: barriers that flushed the device (statistics, tests)
        self.barriers = 0
        #: per principal whose host-space reservation was refused: when its last
        #: refusal was logged, and how many were refused since (`_log_refusal`)
        self._refusals: dict[int, list] = {}

    @classmethod
    def open(cls, directory: Path, *, cache_bytes: int, profile: str | None = None,
             fault_plan: Path | None = None, record_dir: Path | None = None,
             scheduler: str = "mclock", pager_policy: str = "hinted",
             writeback: bool = False) -> Kernel:
        """Open the volume's device and a pager over it; `scheduler` is the device's I/O
        scheduler, "mclock" (per-principal QoS) or "fifo" (the baseline), `pager_policy`
        one of pager.POLICIES (ValueError for another), `writeback` whether the pager
        caches writes (write-back; docs/dev/invariants.md R2: `barrier` writes every
        dirty frame back before the commit that exposes it) or writes through.

        Lab facilities, off unless asked for (the mount passes them from the environment;
        see blockdev/faults.py and blockdev/recording.py): `fault_plan`, a JSON fault plan
        injected below the device; `record_dir`, a new directory in which every write and
        barrier of the device and its checksums is recorded for power-loss experiments."""
        plan = FaultPlan.load(fault_plan) if fault_plan is not None else None
        recorder = RecordLog.create(record_dir) if record_dir is not None else None
        device = BlockDevice.open(directory, profile=profile, fault_plan=plan,
                                  recorder=recorder, scheduler=scheduler)
        try:
            pager = Pager(device, nframes=max(MIN_CACHE_FRAMES, cache_bytes // device.block_size),
                          policy=pager_policy, writeback=writeback)
            # A file hint applies to REHINT_STEP cached pages at once, the rest a part
            # a step (`settle_hints`): a file of 100,000 cached pages held every tenant
            # 0.1-0.3 s in one step (probe 11, F6).
            pager.rehint_step = REHINT_STEP
        except BaseException:
            device.close()
            raise
        return cls(device, pager)

    def close(self) -> None:
        self.device.close()

    # -- banks -----------------------------------------------------------------------

    def attach_principals(self, table: PrincipalTable) -> None:
        """Charge kernel objects to `table`, and push its memory and I/O banks down to
        the pager and the device's scheduler now and after every change. OverReserved
        when the table's I/O reservations exceed what the device can serve."""
        self.principals = table
        # The layers below refuse banks they cannot honour — the device reservations it
        # cannot serve, the pager guarantees its pool cannot give — now (which fails
        # the mount, e.g. under a slower --profile or a smaller --cache-size) and
        # before every later change is saved.
        self.check_banks(table.bank_tree())
        table.add_bank_validator(self.check_banks)
        table.watch(self.configure_banks)

    def check_banks(self, tree: BankTree) -> None:
        """Refuse banks the layers below cannot honour: I/O reservations adding up to
        more than the device can serve (blockdev's capacity check), cache guarantees
        (cache_min) adding up to more than the pager's pool (a guarantee the pool cannot
        give is no guarantee). PrincipalError naming what does not fit."""
        try:
            self.device.check_banks(tree)
            self.pager.check_banks(tree)
        except (SluiceError, ValueError) as exc:
            raise PrincipalError(str(exc)) from None

    def configure_banks(self, tree: BankTree) -> None:
        """The one configure/update interface of the banks below kernelshim."""
        self.pager.configure_banks(tree)
        self.device.configure_banks(tree)

    def enforced_banks(self) -> tuple[BankTree, BankTree]:
        """The bank snapshots the pager and the scheduler hold now (for statistics)."""
        return self.pager.banks, self.device.scheduler.banks

    def may_be_unflushed(self, inode: int) -> bool:
        """Whether data of the file may not be durable: written since the start of the
        last completed barrier flush (or covered only by one still running), dirty in
        the pager (discardable frames: no barrier writes them), or left out of the last
        barrier's flush (`unflushed_files`). False means an fsync of the file has no
        data to make durable. (Discards of freed blocks are not counted: they are of
        blocks no state a crash can bring back maps, R3.)"""
        return (self._all_unflushed or self._flushing_all
                or inode in self._written_files or inode in self._flushing_files
                or inode in self.unflushed_files
                or (self.pager.writeback and self.pager.has_dirty(inode)))

    def _note_written(self, inode: int) -> None:
        self._dirty = True
        self._written_files.add(inode)

    @asynccontextmanager
    async def barrier(self, *, principal: PrincipalId = ROOT_PRINCIPAL,
                      file: int | None = None, durable: bool = False,
                      preflush_rounds: int = 1,
                      stop_preflush: Callable[[], bool] | None = None
                      ) -> AsyncIterator[None]:
        """Hold new writes back, wait for the writes in flight, make everything written
        so far durable (data, then checksums), and run the body (the metadata commit)
        before writes resume. Everything a commit in the body exposes was durable first.

        `principal` asked for it (an fsync's caller; root for the periodic commit): the
        device flush is charged to it. The write-back of dirty frames goes on their
        dirtiers' banks, `file`'s (the fsync'd file) first: it is expedited past the
        dirtiers' I/O limits, and each dirtier repays its own (`repay_limit`), never
        the asker for another's data (review of probe 5, P2). The flush is expedited
        past `principal`'s I/O limit (it repays it afterwards), as the writes the
        barrier waits for are: every writer waits for it.

        `durable`: the body makes a durable commit (an fsync): then the device is
        flushed even with nothing written by this daemon yet, once, for what an
        earlier one may have left in the host's cache (`may_be_unflushed`).

        `preflush_rounds`: at most this many device flushes before writes are held
        back (below). 1, the default, for every barrier a caller waits on (an fsync, a
        sync, a file's write-back): more rounds would make it wait longer for others'
        data. The periodic commit asks for PREFLUSH_ROUNDS, and passes `stop_preflush`,
        true once a caller waits for it to end (an fsync's commit behind it): no round
        starts then."""
        if self.pager.writeback and self._barrier is None:
            # Dirty frames written back before writers are held (the flush below
            # writes only those dirtied meanwhile). Only an optimisation, as below.
            # Past their dirtiers' I/O limits, as the flush below writes them: the
            # commit lock is held, and a tenant's dirty frames under a small limit
            # held every other tenant's fsync for their write-back at that limit —
            # another's, or its own fsync's (10-35 s, hostile probe 5, W1). The
            # dirtiers repay it (`repay_limit`). Each frame on its dirtier's bank
            # (`file`'s first), not the asker's: an fsync of a shared file must not put
            # another's data on the asker's debt (review of probe 5, P2).
            with self.device.scheduler.expedite_writes():
                await self.pager.write_back_dirty(file=file, by_dirtier=True)
        rounds = 0
        while (self.device.unflushed_bytes >= PREFLUSH_BYTES and self._barrier is None
               and rounds < preflush_rounds
               and not (rounds and stop_preflush is not None and stop_preflush())):
            # Much written since the last flush (a stream): make it durable before
            # holding writes back, so that the flush under the barrier — during which
            # every writer waits — has only what arrives meanwhile left to do. A
            # stream writes on during this flush (at 600 MB/s, 300 MB during the
            # half second that 600 MB took: docs/BENCHMARKS.md), so flush again while
            # that is still much and at most PREFLUSH_SHRINK of what the flush before
            # made durable; each round leaves the held flush less. Only an
            # optimisation: the barrier's own flush below is what R2 relies on.
            # Expedited as the barrier's own (the commit lock is held).
            if rounds and self.pager.writeback:
                # (the frames dirtied during the last flush, as before the first)
                with self.device.scheduler.expedite_writes():
                    await self.pager.write_back_dirty(file=file, by_dirtier=True)
            flushed = self.device.unflushed_bytes
            with self.device.scheduler.expedite_writes():
                await self.device.flush(principal=principal)
            rounds += 1
            if self.device.unflushed_bytes > flushed * PREFLUSH_SHRINK:
                break  # the writers nearly keep up with the flushes: more would not end
        while self._barrier is not None:  # one barrier at a time
            await self._barrier.wait()
        done = self._barrier = trio.Event()
        try:
            # Writes held back by their principal's I/O limit go now (and are repaid
            # after): the commit, and every other principal's writes, must not wait
            # for a throttled queue to drain (blockdev/scheduler.py, expedite_writes).
            with self.device.scheduler.expedite_writes():
                while self._writes:
                    if self._writes_done is None:
                        self._writes_done = trio.Event()
                    await self._writes_done.wait()
            # Taken while no write can dirty a frame (writes are held back): a
            # discardable frame dirty now and cleaned during the flush by a write-back
            # other than the flush's own is counted, conservatively, as unflushed.
            wb = self.pager.writeback
            before = self.pager.dirty_discardable_files() if wb else set()
            # (and a file the last barrier left unflushed: its frames may have been
            # written since, outside any barrier — debt-paced ones by their dirtier's
            # write-back, converted ones by aging — a device write no kernel write
            # noted; without this flush the list dropped it while its data sat in
            # the device's volatile cache: review of pager7, P1)
            if before or self.unflushed_files:
                self._dirty = True
            if self._dirty or (durable and self._all_unflushed):
                self._dirty = False
                # Every write noted so far has returned (writes are held, the ones in
                # flight waited for): this flush covers them.
                flushing, self._written_files = self._written_files, set()
                self._flushing_files |= flushing
                every = self._all_unflushed
                self._all_unflushed = False
                try:
                    with self.device.scheduler.expedite_writes():
                        await self.pager.flush(principal=principal, file=file,
                                               by_dirtier=True)
                except BaseException:
                    self._dirty = True
                    self._written_files |= flushing
                    self._all_unflushed = self._all_unflushed or every
                    raise
                finally:
                    self._flushing_files -= flushing
                self._flushing_all = self._all_unflushed
                self.barriers += 1
            self.unflushed_files = before | self.pager.dirty_files() if wb else set()
            yield
        finally:
            self._barrier = None
            done.set()

    async def repay_limit(self, principal: PrincipalId, nbytes: int,
                          offset: int | None = None, *, ios: float = 1.0) -> None:
        """Write-through: give the request that writes `nbytes` of `principal`'s its
        place at the I/O limits on its path and wait for it (`Scheduler.limit_slot`):
        its device requests then go past the limits under the locks (`write`,
        `past_limits`; hostile probe 7, F1). With the write's `offset`, the place is
        priced at the whole blocks the device will write (16 bytes priced as 16 let
        concurrent small writes take their places at once: 17x a bytes/s limit in a
        burst; review of d4a70cd, 2). The read a partial block's merge may need is
        not priced (the pool often holds the block: R1); its request advances the
        limit tags, after which later places come, so it is repaid by the next ones.
        `ios`: the device requests the place is for (`nbytes` in all), when the caller
        knows them to be more than one (a layout's copy reads and writes; a hole
        punched between two partial blocks writes both). Inside `limit_scope()` the
        place grows by every request made past the limits inside it beyond its price,
        as it is made: a large overwrite relocated into fresh blocks goes down as one
        request per run, known only under the lock (priced as one, 16 concurrent
        128 KiB overwrites made 127 requests a second at a 4 IOPS limit: hostile probe
        8, F1), and a merge may read.

        Write-back: pace a request that dirties `nbytes` of `principal`'s
        while it owes a limited node on its path more than LIMIT_DEBT_SLACK seconds
        for write-back a barrier expedited past that node's limit
        (`Scheduler.limit_debt`: the node's whole subtree's requests at its limit,
        owed by the principals whose requests went into it — a tenant's children
        share their parent's debt, R1; a sibling with no I/O there owes none, P1).
        A write into the pool needs no device request, so nothing else makes a
        writer pay for that: without this a tenant rewriting its dirty frames while
        others fsync wrote back at device speed whatever its `io_limit` (hostile
        probe 5, W1).

        It never waits for the whole debt in one request: Linux holds the file's
        i_rwsem across a FUSE write or truncate, so that wait held every other
        process's write and truncate of a shared file (second review of probe 5,
        R2). While in debt, each request waits its own cost at the limit (at least
        LIMIT_DEBT_MIN_WAIT) after the requests of the same debtors ahead of it
        (`Scheduler.limit_pace`): the debtors together dirty at most at the limit
        until the debt has decayed, and one request holds a host lock about as long
        as a write-through write at the limit does.

        Callers call it at the entry of a request that dirties frames, before any
        lock (fs: before the inode lock; the shim: before a direct write's slice) —
        never the discard or reaper tasks: the wait must hold no one else (review of
        probe 5, P4). It sleeps in steps of at most LIMIT_DEBT_STEP, re-reading the
        debt, so that a limit removed or raised meanwhile ends it (P3). Not under
        `_enter_write`: a barrier never waits for it. Cancellable.

        First, the same for the frames the principal dirtied while they were
        discardable and whose hint it cleared over its dirty bound (debt-paced,
        `Pager.pay_paced`): while it is over its bound counting them, the request
        writes back its own size of them at its limit (review of tidy5, R2)."""
        sched = self.device.scheduler
        if not self.pager.writeback:
            if nbytes <= 0:
                return  # (no data: a commit makes no device request of the writer's)
            # Write-through: the write's device requests go past the limits under
            # the locks (`write`, `past_limits`), so each write takes its place at
            # its writer's limits here, before any lock: the writer's requests
            # together go at its limits and none holds a lock while it waits for them
            # (hostile probe 7, F1). A limit removed meanwhile ends the wait, one
            # raised or lowered gives it a new place (R3).
            if offset is not None:
                # (the device writes whole blocks: a 16-byte write is a block's bytes)
                b0, b1 = block_span(offset, nbytes, self.block_size)
                nbytes = (b1 - b0) * self.block_size
            place = sched.limit_slot(principal, nbytes, ios=ios)
            if place is not None and place.until > trio.current_time():
                await sched.wait_place(place)
            return
        await self.pager.pay_paced(principal, -(-nbytes // self.device.block_size))
        until = sched.limit_pace(principal, nbytes, LIMIT_DEBT_SLACK, LIMIT_DEBT_MIN_WAIT)
        if until is None:
            return
        while True:
            left = until - trio.current_time()
            if left <= 0:
                return
            await trio.sleep(min(left, LIMIT_DEBT_STEP))
            if sched.limit_debt(principal) <= LIMIT_DEBT_SLACK:
                return

    async def repay_commit(self, principal: PrincipalId) -> None:
        """An fsync that needs a durable commit and no device flush (a change of
        metadata only: chmod, utimes, rename, then fsync) takes its place at
        `principal`'s I/O limits for the commit's WAL fsync, one request, and waits
        for it before any lock, as `repay_metadata` does. The metadata database's own
        I/O never reaches the device's scheduler, and such an fsync made no request
        of its asker's there: a tenant's chmod + fsync storm (366-636 a second) went at
        the host's speed whatever its limit, each a host fsync other tenants' fsyncs
        queued behind (probe 20, F1). (An fsync that flushes the device is charged
        that flush, past the limit, repaid at the next write's place.) At most
        FSYNC_REPAY_MAX_WAIT: the kernel holds the file's lock across a FUSE fsync.
        Nothing when no limit is on its path. Priced as one request of a block (the
        WAL pages it writes): a bytes/s limit alone holds it too (probe 24, F2: 547
        fsyncs a second under 1 MB/s, priced at nothing)."""
        sched = self.device.scheduler
        place = sched.limit_slot(principal, self.block_size)
        if place is not None and place.until > trio.current_time():
            with trio.move_on_after(FSYNC_REPAY_MAX_WAIT):
                await sched.wait_place(place)

    async def repay_metadata(self, principal: PrincipalId, nbytes: int) -> None:
        """A request that makes the daemon write `nbytes` of `principal`'s into the
        metadata database (an extended attribute's name and value) takes its place at
        the I/O limits on its path and waits for it, before any lock, in either cache
        mode: the database's own I/O never reaches the device's scheduler, and a tenant
        under a 1 MB/s limit rewrote 100 MB/s of attribute values, each second's
        commit of them then holding every tenant's requests 100-230 ms (probe 18,
        F1). Priced as one request of `nbytes`; nothing when no limit is on its path.

        The host kernel holds the file's inode lock across a setxattr, so the wait is
        at most METADATA_MAX_WAIT: a tenant under a tiny limit of its own making (a
        child principal's) must not hold another's writes to a shared file for its
        whole cost. Its place stays in the line, so its next requests come later still;
        each of its requests in flight waits at most METADATA_MAX_WAIT."""
        if nbytes <= 0:
            return
        sched = self.device.scheduler
        place = sched.limit_slot(principal, nbytes)
        if place is not None and place.until > trio.current_time():
            with trio.move_on_after(METADATA_MAX_WAIT):
                await sched.wait_place(place)

    async def _enter_write(self, grant: Grant) -> int:
        """A write through `grant` begins: counted among the writes in flight (after any
        barrier in progress) and entered in the grant (`_enter_grant_write`); the epoch
        to give `_leave_write`, which every path after this call must reach."""
        while self._barrier is not None:
            await self._barrier.wait()
        self._writes += 1
        try:
            return self._enter_grant_write(grant)
        except BaseException:
            self._write_ended()
            raise

    def _leave_write(self, grant: Grant, epoch: int) -> None:
        self._leave_grant_write(grant, epoch)
        self._write_ended()

    def _write_ended(self) -> None:
        self._writes -= 1
        if not self._writes and self._writes_done is not None:
            self._writes_done.set()
            self._writes_done = None

    async def drain_writes(self, grants: Iterable[Grant]) -> None:
        """Wait until the writes in flight through `grants` (revoked) have ended, their
        principals' I/O limits waived meanwhile (they repay it, as for a barrier): a
        truncate or an unlink waits for the device, not for a throttled tenant's queue
        — it may hold a directory's lock in the host kernel while it waits. Reads
        through them may go on: they change nothing, and the blocks they address are
        reused only after them (`wait_quiescent`)."""
        with self.device.scheduler.expedite_writes():
            await self.wait_writes_drained(grants)

    # -- data path -------------------------------------------------------------------

    async def read(self, grant: Grant, offset: int, length: int) -> memoryview | bytes:
        """`length` bytes of the file at `offset` (holes and unwritten extents are zeros).
        The caller clips to the file size."""
        if offset < 0 or length < 0:
            raise BadRequest(f"read of {length} bytes at offset {offset}")
        epoch = self._enter(grant, Rights.READ)
        try:
            if not length:
                return b""
            bs = self.block_size
            b0, b1 = block_span(offset, length, bs)
            head = offset - b0 * bs
            segs = grant.extents.segments(b0, b1 - b0)
            principal = grant.principal
            file = grant.inode
            if len(segs) == 1:
                s = segs[0]
                if s.state != UNWRITTEN:
                    data = await self.pager.read(BlockNo(s.dev_block), s.count,
                                                 principal=principal, file=file,
                                                 fblock=s.file_block)
                    return memoryview(data)[head:head + length]
                return bytes(length)
            out = bytearray((b1 - b0) * bs)
            pos = 0
            for s in segs:
                n = s.count * bs
                if s.state != UNWRITTEN:
                    out[pos:pos + n] = await self.pager.read(BlockNo(s.dev_block), s.count,
                                                             principal=principal, file=file,
                                                             fblock=s.file_block)
                pos += n
            return memoryview(out)[head:head + length]
        finally:
            self._leave(grant, epoch)

    async def read_into(self, grant: Grant, offset: int, out: memoryview, *,
                        revocable: bool = False) -> int:
        """Read len(out) bytes of the file at `offset` straight into `out` (a shared buffer:
        no intermediate copy when `offset` is block-aligned). Returns len(out).

        `revocable` (a direct client's read): the grant is checked again after every
        wait of the read — at the start of each pager read, after the pool's wait for
        a frame, and in each device read once the scheduler lets it go, before its
        data is read (`blockdev.guard_reads`). A read held at its principal's I/O limit while the
        grant is revoked (the owner's chmod) then ends with GrantRevoked, and nothing
        the owner writes after the revoke reaches `out`. The metadata server's own
        reads through the mount are not: a truncate revokes and renews their grants
        under them, and what they read is the file's all the same."""
        if revocable:
            with guard_reads(functools.partial(self.check, grant, Rights.READ)):
                return await self._read_into(grant, offset, out)
        return await self._read_into(grant, offset, out)

    async def _read_into(self, grant: Grant, offset: int, out: memoryview) -> int:
        length = len(out)
        bs = self.block_size
        if offset % bs or offset < 0:
            data = await self.read(grant, offset, length)
            out[:length] = data
            return length
        epoch = self._enter(grant, Rights.READ)
        try:
            b0 = offset // bs
            whole = length // bs
            pos = 0
            principal = grant.principal
            for s in grant.extents.segments(b0, whole) if whole else ():
                n = s.count * bs
                if s.state != UNWRITTEN:
                    await self.pager.read_into(BlockNo(s.dev_block), s.count, out[pos:pos + n],
                                               principal=principal, file=grant.inode,
                                               fblock=s.file_block)
                else:
                    out[pos:pos + n] = bytes(n)
                pos += n
        finally:
            self._leave(grant, epoch)
        if pos < length:  # a partial last block
            out[pos:length] = await self.read(grant, offset + pos, length - pos)
        return length

    async def write(self, grant: Grant, offset: int, data: bytes | bytearray | memoryview, *,
                    cow: ExtentMap | None = None, keep_pending: bool = False) -> int:
        """Write `data` at `offset`. Every block it touches must be allocated in the
        grant (unwritten or fresh extents; sealed WRITTEN blocks raise Sealed); partial
        blocks are merged with their current contents (zeros when unwritten). Does not
        commit: the caller marks the range written in the map (the metadata server's
        commit).

        `cow` (the metadata server's copy-on-write): fresh device blocks for the sealed
        blocks of the range. Those blocks' data goes there, merged with the old contents
        where the write covers a block partly; the caller then relocates the extents.

        `keep_pending` (the metadata server's zeroing of the tail of a file's last block
        when the file grows, R6): inside one block; `data` is not put over the bytes
        that another live grant on the file has written and not yet committed (looked
        at while the block is held, after its contents are read)."""
        with self.past_limits():
            return await self._write(grant, offset, data, cow=cow, keep_pending=keep_pending)

    def limit_scope(self, principal: PrincipalId) -> AbstractContextManager[None]:
        """Write-through: around a write's `repay_limit` and the writes it pays for,
        so that its place grows with the requests it makes beyond its price
        (`Scheduler.place_scope`). Write-back takes no places, nor does a principal with
        no limit (for one set meanwhile the extra requests are repaid by the tags)."""
        sched = self.device.scheduler
        if self.pager.writeback or not sched.limited(principal):
            return nullcontext()
        return sched.place_scope()

    def limit_hold(self, most_ios: float) -> None:
        """Write-through, inside `limit_scope`, before the wait for a lock another holds
        once the write's place has gone: its place is priced at `most_ios` requests (the
        most the write can make) until the scope ends, then at the requests made
        (`Scheduler.hold_place`)."""
        if not self.pager.writeback:
            self.device.scheduler.hold_place(most_ios)

    def past_limits(self) -> AbstractContextManager[None]:
        """Write-through: a write's device requests are made under locks that other
        tenants' writes of the file wait for (the inode lock, merged blocks), so they
        go past the writer's I/O limits, which it repays before it takes them
        (`repay_limit`). The same for the metadata server's reads and writes under a
        file's lock for a direct client's request (`layout_get`'s copy of sealed
        blocks, review of F1, R2). Write-back paces its writers in the pool instead
        (dirty bounds, `Pager.wait_write_room`); its write-back goes at the limits."""
        return nullcontext() if self.pager.writeback else \
            self.device.scheduler.past_limits()

    async def _write(self, grant: Grant, offset: int, data: bytes | bytearray | memoryview, *,
                     cow: ExtentMap | None, keep_pending: bool) -> int:
        length = len(data)
        if offset < 0:
            raise BadRequest(f"write at negative offset {offset}")
        epoch = await self._enter_write(grant)
        try:
            if not length:
                return 0
            bs = self.block_size
            b0, b1 = block_span(offset, length, bs)
            segs = grant.extents.segments(b0, b1 - b0)
            targets = self._write_targets(grant, segs, cow)
            head = offset - b0 * bs
            tail = b1 * bs - (offset + length)
            principal = grant.principal
            src = memoryview(data).cast("B")
            nb = b1 - b0
            if nb == 1 and (head or tail) and segs[0].state == FRESH and \
                    not keep_pending and not self._merging.busy(grant.inode, b0) and \
                    self.pager.write_within_nowait(BlockNo(segs[0].dev_block), head, src,
                                                   principal=principal,
                                                   file=grant.inode, fblock=b0):
                # Part of one FRESH block whose frame is resident: merged in the frame
                # itself, with no copy of the block out and back (fio's 16-byte
                # requests; the frame holds the block's current contents).
                self._note_written(grant.inode)
                grant.note_written(offset, offset + length, bs)
                return length
            # A block covered partly is merged with its current contents: it is held
            # from the read of those until it is written and the range noted, and the
            # map is looked at again once held. Another grant's write merging the same
            # block meanwhile read it before this one wrote it, and one of the two
            # erased the other's bytes (probe 6, W2: `MergeLocks`).
            merged = (() if not head and not tail else
                      (b0, b1 - 1) if tail and nb > 1 else (b0,))
            ino = grant.inode
            sched = self.device.scheduler
            if not merged:
                # Whole blocks: no merge, but registered while written, after any merge
                # holding one of them: a merge of one of these blocks around this
                # write would put its old contents over it (probe 6, W4).
                # (R2: its dirty bound waited for before the merges wait; write-through
                # has no wait here, `_wait_room`)
                paced = self.pager.writeback and sched.limited(principal)
                if paced:
                    await self._wait_room(grant, segs, ())
                merging = self._merging
                if not merging.enter_whole_nowait(ino, b0, b1):
                    await merging.enter_whole(ino, b0, b1)
                    paced = True  # (waited: the map looked at again)
                if paced:
                    segs = grant.extents.segments(b0, b1 - b0)
                    try:
                        targets = self._write_targets(grant, segs, cow)
                    except BaseException:
                        merging.leave_whole(ino, b0, b1)
                        raise
                try:
                    await self._write_blocks(grant, offset, src, segs, targets)
                finally:
                    merging.leave_whole(ino, b0, b1)
                return length
            paced = sched.limited(principal)
            if paced:
                # Its own I/O limit waited for before the blocks are held, not while
                # others' partial writes of them wait (review of probe 6, R2).
                await self._wait_room(grant, segs, merged)
            # The whole blocks between its merged ends are registered as a whole-block
            # write's are (W4): else a merge of one of them in flight around this
            # write put its old contents over them (review of shared7, S1). In block
            # order, as merges take theirs: the first end, then the middle (waiting
            # for the merges holding one of its blocks), then — with no checkpoint
            # after the registration — the last end. A merge holding the last end
            # therefore held no middle block when it was registered, so it never
            # waits for this write while this write waits for it.
            merging = self._merging
            lo, hi = b0 + 1, (b1 - 1 if tail else b1)
            whole = hi > lo
            if not whole:
                waited = await merging.acquire(ino, merged) or paced
            elif merging.enter_nowait(ino, merged, lo, hi):  # (none held: the common case)
                waited = paced
            else:
                waited = await merging.acquire(ino, merged[:1]) or paced
                try:
                    if not merging.enter_whole_nowait(ino, lo, hi):
                        await merging.enter_whole(ino, lo, hi)
                        waited = True
                    try:
                        waited = await merging.acquire(ino, merged[1:]) or waited
                    except BaseException:
                        merging.leave_whole(ino, lo, hi)
                        raise
                except BaseException:
                    merging.release(ino, merged[:1])
                    raise
            try:  # (held from here: whatever fails below lets the blocks go)
                # (a whole-block write of one of them begun earlier: wait for it, W4)
                waited = await merging.wait_whole(ino, merged) or waited
                if waited:  # (another write's marks; sealed or punched meanwhile: an
                    # error, raised while the blocks are held — review of probe 6, R1)
                    segs = grant.extents.segments(b0, b1 - b0)
                    targets = self._write_targets(grant, segs, cow)
                await self._write_blocks(grant, offset, src, segs, targets,
                                         keep_pending=keep_pending)
            finally:
                merging.release(ino, merged)
                if whole:
                    merging.leave_whole(ino, lo, hi)
            return length
        finally:
            self._leave_write(grant, epoch)

    def _write_targets(self, grant: Grant, segs: list, cow: ExtentMap | None
                       ) -> list[tuple[int, int, int]]:
        """(dev_block, count, file block) to write, in order, for `write`'s segments
        `segs`: the unwritten and fresh blocks in place, the sealed ones at their `cow`
        blocks (Sealed without; NotAllocated for a hole)."""
        targets: list[tuple[int, int, int]] = []
        for s in segs:
            if s.dev_block == HOLE:
                raise NotAllocated(f"file blocks {s.file_block}+{s.count} of inode "
                                   f"{grant.inode} are not allocated in grant {grant.id}")
            if s.state != WRITTEN:
                targets.append((s.dev_block, s.count, s.file_block))
                continue
            fresh = cow.segments(s.file_block, s.count) if cow is not None else []
            if not fresh or any(f.dev_block == HOLE for f in fresh):
                raise Sealed(f"file blocks {s.file_block}+{s.count} of inode "
                             f"{grant.inode} are committed: ask for a write layout")
            targets.extend((f.dev_block, f.count, f.file_block) for f in fresh)
        return targets

    async def _wait_room(self, grant: Grant, segs: list, merged: tuple[int, ...]) -> None:
        """Before a write holds blocks that other principals' writes may wait for (a
        merge's, `MergeLocks`) or registers a whole-block write that merges wait for:
        the waits at its principal's own I/O limit done first — the blocks it will
        merge read into the pool (a read at its limit when not resident) and, under
        write-back, the pager's dirty bound (`Pager.wait_write_room`) — so that under
        the lock its reads find the pool and its writes into the pool do not wait at
        its limit (review of probe 6, R2: a rate-limited tenant's partial write of a
        block of a shared file held the block across its limit's waits, and another
        tenant's partial writes of the block waited behind them). The device's limit
        tags are not waited for here (see below). Only an order of waits: under the
        lock the block's contents are read again."""
        principal = grant.principal
        bs = self.block_size
        for fb in merged:
            for s in segs:
                if s.file_block <= fb < s.file_block + s.count:
                    if s.dev_block != HOLE and (s.state != UNWRITTEN or self._wrote_in(
                            grant, fb * bs, (fb + 1) * bs)):
                        await self.pager.read(BlockNo(s.dev_block + fb - s.file_block), 1,
                                              principal=principal, file=grant.inode,
                                              fblock=fb)
                    break
        if self.pager.writeback:
            await self.pager.wait_write_room(principal)
        # Write-through: the device's limit tags are not waited for here. A sleep until
        # they clear, inside the write (`_enter_write`), held every barrier for the
        # limited tenant's whole queue (a commit waited 7 s behind 8 writes at 1 IOPS,
        # tests/test_scheduler.py::test_commit_is_not_stalled_by_a_throttled_writer):
        # the limit's wait must stay the scheduler's, which a barrier expedites. The
        # merged blocks' reads above take the limit's wait before the lock; the write's
        # own device request may still wait at it under the lock (docs/RELIABILITY.md,
        # "Stop 18: the merge").

    async def _write_blocks(self, grant: Grant, offset: int, src: memoryview, segs: list,
                            targets: list[tuple[int, int, int]], *,
                            keep_pending: bool = False) -> None:
        """`write`'s data written: `src` at `offset` into `targets`, the partly covered
        blocks at its ends merged with their current contents (`segs`); the range noted
        as the grant's."""
        length = len(src)
        bs = self.block_size
        b0, b1 = block_span(offset, length, bs)
        head = offset - b0 * bs
        tail = b1 * bs - (offset + length)
        nb = b1 - b0
        principal = grant.principal
        # The request's blocks as pieces (first block index, block count, bytes): the
        # whole blocks straight from the caller's buffer (no copy: a FUSE write from
        # an unaligned user buffer arrives as 1 MiB - 16 bytes and then 16 bytes, and
        # copying the megabyte to merge one edge block cost more than the write), and
        # each partly covered edge block merged with its current contents on its own.
        pieces: list[tuple[int, int, memoryview | bytearray]] = []
        if not head and not tail:
            pieces.append((0, nb, src))
        else:
            first = last = None
            if head or nb == 1:
                first = bytearray(bs)
                await self._fill_block(first, 0, segs[0], principal, grant)
                n0 = min(length, bs - head)
                old = bytes(first) if keep_pending else b""
                first[head:head + n0] = src[:n0]
                if keep_pending:
                    # (R6: the other live grants' uncommitted bytes stay. The block
                    # is held: no other write of it lands until this one is written —
                    # partial ones wait for the block, whole-block ones too, W4)
                    if nb != 1:
                        raise BadRequest("keep_pending: a write inside one block only")
                    base = b0 * bs
                    for s, e in self._pending_in(grant, base + head, base + head + n0):
                        first[s - base:e - base] = old[s - base:e - base]
                pieces.append((0, 1, first))
            if tail and nb - 1 > (0 if first is not None else -1):
                last = bytearray(bs)
                await self._fill_block(last, 0, segs[-1], principal, grant, last=True)
                keep = bs - tail
                last[:keep] = src[length - keep:]
            m0 = 1 if first is not None else 0
            m1 = nb - 1 if last is not None else nb
            if m1 > m0:
                pieces.append((m0, m1 - m0, src[m0 * bs - head:m1 * bs - head]))
            if last is not None:
                pieces.append((nb - 1, 1, last))
        self._note_written(grant.inode)
        pos = 0  # in blocks of the request
        for dev, count, fblock in targets:
            for k0, kn, buf in pieces:  # the pieces' parts inside this target
                lo, hi = max(pos, k0), min(pos + count, k0 + kn)
                if lo < hi:
                    await self.pager.write(BlockNo(dev + lo - pos),
                                           buf[(lo - k0) * bs:(hi - k0) * bs],
                                           principal=principal, file=grant.inode,
                                           fblock=fblock + lo - pos)
            pos += count
        grant.note_written(offset, offset + length, bs)

    async def write_relocated(self, grant: Grant,
                              blocks: Sequence[tuple[int, int, bytes | bytearray | memoryview]]
                              ) -> None:
        """The metadata server's copy-on-write of a burst of whole-block writes over
        sealed blocks (a pipelining direct client's random overwrites): each
        (file block, fresh device block, data of whole blocks) by value, the data put
        in the fresh blocks, which the caller then maps in place of the sealed ones
        (`ExtentMap.relocate`), as `write(..., cow=...)` does for one request. Every
        file block named must be WRITTEN in the grant (else BadRequest: the caller
        checked under the inode lock) and the fresh device
        blocks must be the caller's, unexposed. Device blocks that continue each other
        (and their file blocks too) go down as one pager write, of at most
        BYPASS_BLOCKS (never a stream the pool would be bypassed for). All the writes are
        noted in the grant only once every one of them is on its way: a failure
        leaves nothing noted (the caller gives the fresh blocks back)."""
        with self.past_limits():
            await self._write_relocated(grant, blocks)

    async def _write_relocated(self, grant: Grant,
                               blocks: Sequence[tuple[int, int, bytes | bytearray | memoryview]]
                               ) -> None:
        epoch = await self._enter_write(grant)
        try:
            bs = self.block_size
            emap = grant.extents
            # runs of device blocks to write: [device block, blocks, file block, parts]
            runs: list[list[Any]] = []
            for fb, dev, data in blocks:
                n = len(data) // bs
                if not n or len(data) != n * bs:
                    raise BadRequest(f"relocated write of {len(data)} bytes: not whole blocks")
                for s in emap.segments(fb, n):
                    if s.dev_block == HOLE or s.state != WRITTEN:
                        raise BadRequest(f"file blocks {s.file_block}+{s.count} of inode "
                                         f"{grant.inode} are not committed: not a relocation")
                last = runs[-1] if runs else None
                if last is not None and last[0] + last[1] == dev and \
                        last[2] + last[1] == fb and last[1] + n <= BYPASS_BLOCKS:
                    # Device blocks and file blocks both continue the last run: one
                    # pager write (its per-block file hints stay right). At most
                    # BYPASS_BLOCKS in one: a longer write is a stream to the pager,
                    # which under write-back goes around the pool (a device write or a
                    # write-behind, outside the dirty bound), where the writes one by
                    # one (each at most BURST_BYTES) would be cached (review of
                    # direct6, B1).
                    last[1] += n
                    last[3].append(data)
                else:
                    runs.append([dev, n, fb, [data]])
            self._note_written(grant.inode)
            principal = grant.principal
            for dev, n, fb, parts in runs:
                buf = parts[0] if len(parts) == 1 else b"".join(parts)
                await self.pager.write(BlockNo(dev), buf, principal=principal,
                                       file=grant.inode, fblock=fb)
            for fb, _dev, data in blocks:
                grant.note_written(fb * bs, fb * bs + len(data), bs)
        finally:
            self._leave_write(grant, epoch)

    async def _fill_block(self, buf: bytearray, at: int, seg, principal: PrincipalId,
                          grant: Grant, last: bool = False) -> None:
        """Put the current contents of the first (or last) block of `seg` at buf[at:]:
        zeros for an unwritten block, unless a grant on the file has written part of it
        since that grant's last commit (a partial write put the whole block there,
        merged with zeros: a second partial write must keep the first — probe round 2,
        F6 — whichever grant made it: another direct client's, or the mount's, write
        into the block erased the first one's acknowledged bytes, probe 6, W1)."""
        k = seg.count - 1 if last else 0
        bs = self.block_size
        fb = seg.file_block + k
        if seg.state == UNWRITTEN and not self._wrote_in(grant, fb * bs, (fb + 1) * bs):
            return  # unwritten: zeros, already in buf
        buf[at:at + bs] = await self.pager.read(BlockNo(seg.dev_block + k), 1,
                                                principal=principal, file=grant.inode,
                                                fblock=fb)

    def _pending_in(self, grant: Grant, start: int, end: int) -> list[tuple[int, int]]:
        """The uncommitted written ranges of the live grants on `grant`'s file (same
        generation) other than `grant`, clipped to [start, end) (R6's zeroing keeps
        them: `write(..., keep_pending=True)`)."""
        out: list[tuple[int, int]] = []
        for g in self._others_on_file(grant):
            if g.alive is None or g.alive():
                # (a holder gone — its connection closed, not yet torn down — is no
                # live writer: its bytes are zeroed, as a killed one's)
                out.extend(g.pending_in(start, end))
        return out

    def _others_on_file(self, grant: Grant) -> Iterator[Grant]:
        """The grants on `grant`'s file (same generation) other than `grant` that are
        not revoked."""
        for g in self._by_inode.get(grant.inode, ()):
            if g is not grant and not g.revoked and g.generation == grant.generation:
                yield g

    def _wrote_in(self, grant: Grant, start: int, end: int) -> bool:
        """Whether `grant`, or another live grant on the same file, has an uncommitted
        written range meeting [start, end) (`Grant.wrote_in`). Revoked grants commit
        nothing, and each grant's ranges in blocks the file unmaps are gone with it (a
        truncate, a punch, a trimmed layout revoke every grant but the truncating
        client's, whose ranges there the truncate drops: review of direct5, K2), so a
        range found here is in the block the file maps now."""
        if grant.wrote_in(start, end):
            return True
        return any(g.wrote_in(start, end) for g in self._others_on_file(grant))

    async def discard(self, runs: Iterable[tuple[int, int]], *, principal: PrincipalId) -> None:
        """Forget the contents of freed device blocks. The caller (the metadata server)
        has revoked every grant that mapped them.
        Adjacent runs are merged first: one hole punch per range instead of one per
        freed extent (rm -rf of small files frees thousands of neighbouring runs); the
        runs then go down as one request (`Pager.discard_runs`), not one per run."""
        merged = _merged_runs(runs)
        self._dirty = True
        if merged:
            await self.pager.discard_runs(merged, principal=principal)

    def released_unforgotten(self, runs: Sequence[tuple[int, int]]) -> None:
        """Freed device blocks given back without `discard` or `forget` (their frames
        and contents stay as they are): the pager stops treating any of them as a
        block whose newest contents were dropped (`Pager.freed_unforgotten`)."""
        self.pager.freed_unforgotten(runs)

    async def forget(self, runs: Iterable[tuple[int, int]], *, principal: PrincipalId) -> None:
        """Drop every cached copy of freed device blocks (their frames, once no
        write-back of theirs is in flight) but leave their contents and checksums on
        the device: `discard` without the hole punch, for freed blocks the metadata
        server keeps host-backed for its next relocations. The caller has revoked
        every grant that mapped them, as for `discard`."""
        merged = _merged_runs(runs)
        if merged:
            await self.pager.forget_runs(merged, principal=principal)

    async def sync(self) -> None:
        """Make everything written durable (a barrier without a commit)."""
        async with self.barrier():
            pass

    async def writeback_file(self, inode: int, *,
                             principal: PrincipalId = ROOT_PRINCIPAL,
                             pace: bool = True) -> bool:
        """Write back the file's dirty frames that a barrier leaves out (discardable
        ones: the pager writes them only when asked for that file, an fsync; and
        debt-paced ones, first, on their dirtiers' banks at their limits) and flush
        the device, on `principal`'s bank (the fsync's caller); nobody else's frames
        are written. False (and nothing done) when the file had none.

        `pace=False` (an unmount's final sync): the debt-paced frames too are written
        inside the barrier, expedited, not at their dirtiers' limits — the daemon is
        stopping, no commit of another tenant's waits behind them, and the final
        sync is shielded from cancellation, so a paced debt (a dirty share at a
        small limit: minutes) held SIGTERM and the unmount that long (review of
        pager7, P5)."""
        if not self.pager.writeback or inode not in self.pager.dirty_discardable_files():
            return False  # (its other dirty frames: the commit's barrier writes them)
        # Its debt-paced frames first, at their dirtiers' limits and outside any
        # barrier: nobody's commit, and none of the writers a barrier holds, waits
        # for that pace (review of tidy5, R2). A hint cleared again meanwhile, or a
        # frame rewritten meanwhile, may leave a few more, which the barrier below
        # writes like the rest.
        if pace:
            await self.pager.write_back_paced(inode)
        # Inside a barrier, so that no commit runs while these frames are on their
        # way: a commit sees them either dirty (the file is recorded as unflushed) or
        # clean and flushed to the device.
        async with self.barrier(principal=principal, file=inode):
            # Every writer waits for this barrier: past the asker's I/O limit, as the
            # barrier's own writes and flush are (repaid by its later requests).
            with self.device.scheduler.expedite_writes():
                await self.pager.writeback_file(inode, principal=principal)
        return True

    async def reserve(self, runs: Iterable[tuple[int, int]], *,
                      relocation: bool = False,
                      principal: PrincipalId = ROOT_PRINCIPAL) -> None:
        """Reserve host space under freshly allocated device blocks (a sparse backing
        file: fallocate), so that writing them later — a write-back long after the
        write was acknowledged — cannot fail for lack of host space. DeviceFull when
        the host has no room (nothing is acknowledged then: the caller is allocating).
        `principal`: whose allocation it is (a refusal is logged once per principal
        per RESERVE_LOG_INTERVAL)."""
        # The host's allocation is made durable by the next barrier's flush like a
        # write (an fsync after a fallocate must not leave unwritten extents with no
        # host space under them after a power loss): the flush must not be skipped.
        self._dirty = True
        done: list[tuple[int, int]] = []
        runs = list(runs)
        many = len(runs) > RESERVE_RUNS_PER_STEP
        for i, (dev, count) in enumerate(runs):
            if many and i and not i % RESERVE_RUNS_PER_STEP:
                # The loop given back every RESERVE_RUNS_PER_STEP runs (a fallocate into
                # free space of one-block runs: 10,000 of them, ~6 µs each, held every
                # tenant 60 ms: probe 11, F3); not cancellable, so that a failure
                # alone undoes what was reserved.
                await trio.lowlevel.cancel_shielded_checkpoint()
            try:
                self.device.reserve(BlockNo(dev), count, relocation=relocation)
                done.append((dev, count))
            except OSError as exc:
                # The runs reserved before this one go back to the allocator with
                # their blocks: give their host space back too (second review of
                # probe 5, R5). Nothing has written them.
                for d, c in done:
                    try:
                        self.device.unreserve(BlockNo(d), c)
                    except OSError as undo:
                        log.warning("giving back the host space of device blocks %d+%d "
                                    "failed: %s", d, c, undo.strerror)
                if exc.errno == errno.ENOSPC:
                    msg = (f"reserving device blocks {dev}+{count} failed: {exc.strerror} "
                           "(the host filesystem under the backing store is full)")
                    self._log_refusal(int(principal), msg)
                    raise DeviceFull(msg, block=dev) from None
                raise DeviceError(f"reserving device blocks {dev}+{count}: "
                                  f"{exc.strerror}", block=dev, errno=exc.errno) from None

    def host_blocks_avail(self) -> int | None:
        """Blocks of new data the host filesystem under the device has room for
        (`BlockDevice.host_blocks_avail`); None for a block device, or when the host
        cannot say."""
        return _unless_oserror(self.device.host_blocks_avail)

    def host_metadata_room(self) -> int | None:
        """Bytes of metadata the host under the device has room for
        (`BlockDevice.host_metadata_room`); None as `host_blocks_avail`."""
        return _unless_oserror(self.device.host_metadata_room)

    def host_reserved(self, runs: Iterable[tuple[int, int]]) -> bool:
        """Whether every run lies inside one chunk of the device whose host space is
        reserved already (`BlockDevice.host_reserved`): `reserve` of them would do
        nothing. A caller may skip `reserve` then (the allocation that reserved the
        chunk marked the kernel written, so the next barrier flushes it). Never
        blocks; pure Python (R6)."""
        dev = self.device
        for d, c in runs:
            if not dev.host_reserved(d, c):
                return False
        return True

    def _log_refusal(self, p: int, msg: str) -> None:
        """Log a refused reservation of principal `p`: at most one line per principal
        per RESERVE_LOG_INTERVAL, the next one saying how many were refused meanwhile
        (a shared daemon's log must not grow by a line per tenant's attempt: hostile
        probe 5, L1). The table holds the principals refused within the last interval
        (and those with refusals not yet reported, until reported): bounded by the
        principal table."""
        now = trio.current_time()
        r = self._refusals.get(p)
        if r is not None and now - r[0] < RESERVE_LOG_INTERVAL:
            r[1] += 1
            return
        for q, (at, n) in list(self._refusals.items()):
            if q != p and now - at >= RESERVE_LOG_INTERVAL:
                del self._refusals[q]
                if n:
                    log.error("principal %d: %d more host-space reservations refused "
                              "(the host filesystem under the backing store is full)",
                              q, n)
        more = r[1] if r is not None else 0
        self._refusals[p] = [now, 0]
        log.error("principal %d: %s%s", p, msg,
                  f"; {more} more refused since the last such line" if more else "")

    # -- pager hints -----------------------------------------------------------------

    async def advise(self, grant: Grant, offset: int, length: int, *,
                     priority: int | None = None, discardable: bool | None = None,
                     willneed: bool = False, dontneed: bool = False) -> None:
        """Hints for the bytes [offset, offset + length) of the grant's file, for the
        grant's principal: the range is mapped through the grant's extents to device
        runs (holes and unwritten extents hold no data and are left out) and handed to
        the pager. Needs READ (willneed reads the range in, fenced like a read); the
        caller checks WRITE before passing `discardable` (it lets the pager drop the
        file's unwritten-back data)."""
        if offset < 0 or length < 0:
            raise BadRequest(f"advise of {length} bytes at offset {offset}")
        epoch = self._enter(grant, Rights.READ)
        try:
            if not length:
                return
            bs = self.block_size
            b0, b1 = block_span(offset, length, bs)
            if dontneed:
                # dontneed writes dirty frames back (a barrier flushes)
                self._note_written(grant.inode)
            # ADVISE_STEP blocks at a time, the event loop given back between steps: one
            # request over a large file (a hint of 1 GiB held the loop 25-35 ms) waits
            # behind the other tenants' requests instead of them behind it.
            # (past the last allocated block: holes, no data to hint; a client may
            # ask for any length)
            b1 = min(b1, grant.extents.end_block())
            for c0 in range(b0, b1, ADVISE_STEP):
                if c0 > b0:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    self.check(grant, Rights.READ)  # (revoked meanwhile?)
                c1 = min(b1, c0 + ADVISE_STEP)
                runs = [(s.file_block, s.dev_block, s.count)
                        for s in grant.extents.segments(c0, c1 - c0)
                        if s.dev_block != HOLE and s.state != UNWRITTEN]
                await self.pager.advise(grant.inode, runs, principal=grant.principal,
                                        priority=priority, discardable=discardable,
                                        willneed=willneed, dontneed=dontneed)
        finally:
            self._leave(grant, epoch)


def _merged_runs(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """`runs` (device block, count) sorted, overlapping and adjacent ones merged."""
    merged: list[list[int]] = []
    for dev, count in sorted(runs):
        if merged and dev <= merged[-1][0] + merged[-1][1]:
            last = merged[-1]
            last[1] = max(last[1], dev + count - last[0])
        else:
            merged.append([dev, count])
    return [(dev, count) for dev, count in merged]
