# mypy: disable-error-code="misc"
# (a mixin of FileSystem: its methods take `self: FileSystem`, which mypy flags as "misc")
"""Statistics: statfs (`statistics`) and everything `sluice stats` shows
(`statistics_dict`)."""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Collection, Iterator

from kernelshim import BankNode, PrincipalId, SluiceError
from kernelshim.principals import Principal


if TYPE_CHECKING:
    from .filesystem import FileSystem

log = logging.getLogger(__name__)


#: per principal in `sluice stats --json`'s "cache" (pager.PrincipalCacheStats)
CACHE_FIELDS = ("frames", "min", "max", "hits", "misses", "evictions", "discarded", "dirty",
                "writeback_bytes", "reclaim_sent", "reclaim_answered", "reclaim_missed")


@dataclasses.dataclass(frozen=True, slots=True)
class FsStatistics:
    block_size: int
    blocks: int
    #: free blocks (blocks awaiting the commit that freed them included)
    blocks_free: int
    #: of those, what new data may take (the copy-on-write reserve left out), as ext4's
    #: f_bavail leaves out the blocks reserved for root; no more than the host
    #: filesystem under the backing file has room for
    blocks_avail: int
    inodes: int
    max_inodes: int
    open_handles: int
    cached_inodes: int
    live_grants: int
    #: fsyncs that had nothing to make durable (no barrier, no commit: invariants R8),
    #: barriers that flushed the device, and durable commits (WAL fsyncs), since mount
    empty_fsyncs: int = 0
    barriers: int = 0
    durable_commits: int = 0
    #: fsyncs that waited for a commit and found it had made their file durable
    #: (group commit: no barrier, no commit of their own)
    grouped_fsyncs: int = 0


def _flat(record: Any) -> dict[str, Any]:
    """`dataclasses.asdict` of a record whose fields are plain numbers and strings,
    without its field-by-field deep copy (a tenth of the cost: `stats` is served
    within one step of the daemon's event loop)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


class Statistics:
    """Statistics (a `FileSystem` concern; see filesystem.py for the map).

    State it owns: the count of FUSE requests answered, by handler (operations.py counts)."""

    #: FUSE requests answered, by handler name (operations.py counts; `sluice stats`)
    fuse_requests: collections.Counter[str]

    def statistics(self: FileSystem) -> FsStatistics:
        # Blocks waiting for the commit that freed them are in use by no file: free (a
        # writer short of space makes that commit durable and gets them). So are the
        # kept freed blocks (reserved for relocations until a writer short of space
        # has them discarded: `_ensure_free`).
        free = (self.alloc.free + self.alloc.kept_blocks + self.discarding_kept
                + self.alloc.pending_blocks + self.reaping_blocks)
        avail = max(0, free - self.cow_reserve)
        # A host filesystem fuller than the device bounds what new data may take
        # (ENOSPC comes from it then): `df` says so (probe 19, F13). The free blocks
        # stay the device's, so that df's "used" is still what the volume holds.
        host = self.kernel.host_blocks_avail()
        if host is not None:
            avail = min(avail, host)
        return FsStatistics(self.block_size, self.alloc.nblocks, free, avail,
                            self._inode_count, self.max_inodes, len(self._handles),
                            len(self._inodes), self.kernel.live_grants,
                            self.empty_fsyncs, self.kernel.barriers,
                            self.md.durable_commits, self.grouped_fsyncs)

    def statistics_dict(self: FileSystem) -> dict:
        """Everything `sluice stats` shows, as plain data."""
        return dict(self.statistics_parts())

    def statistics_parts(self: FileSystem, names: Collection[str] | None = None,
                         context: Collection[str] = (), *, by_kind: bool = True
                         ) -> Iterator[tuple[str, Any]]:
        """`statistics_dict`'s items, one part of the work at a time (the caller may
        let others run between two: the shim server's `stats` is served in several
        steps of the event loop, not one), with per-principal rows only for the
        principals in `names` (None: all). Only the rows asked for are built (the
        layers below still take their snapshots whole: numbers, cheap). The principals
        named in `context` (a tenant's ancestors that are not its own) are listed with
        their usage cut to their banks, and without rows of activity."""
        keep: set[int] | None = None
        only: list[Principal] | None = None
        listed: list[Principal] | None = None  # the `principals` rows, in order
        ctx: list[Principal] = []
        if names is not None:
            only, listed = [], []
            for n in names:
                try:
                    q = self.principals.get(n)
                except SluiceError:
                    continue  # removed meanwhile
                listed.append(q)
                (ctx if n in context else only).append(q)
            keep = {p.id for p in only}
        # Names of the principals shown (a removed principal's counters keep its id).
        label = {p.id: p.name for p in (self.principals.walk() if only is None else only)}

        def shown(pid: int) -> bool:
            return keep is None or pid in keep

        yield "fs", _flat(self.statistics())
        # (only the rows shown: each costs its latency histogram's percentiles, and a
        # tenant's page shows a few principals of however many the volume has)
        dev = self.kernel.device_statistics(keep)
        rows = [s for s in dev.per_principal if shown(s.principal)]
        yield "device", {
            "block_size": dev.block_size, "nblocks": dev.nblocks,
            "profile": dev.profile, "scheduler": dev.scheduler,
            "checksum_errors": dev.checksum_errors,
            # what the profile can serve (None: unlimited, profile none)
            "capacity": {"iops": dev.capacity_iops, "bps": dev.capacity_bps},
            "timeline_ahead_max_s": dev.timeline_ahead_max_s,
            "per_principal": {label.get(s.principal, str(s.principal)): _flat(s)
                              for s in rows}}
        # The scheduler's view per principal name (blockdev/scheduler.py): bytes and
        # requests, latency from arrival to completion (queue + service), throughput
        # in the last complete second, requests waiting, reservation met/missed.
        yield "io", {label.get(s.principal, str(s.principal)): {
            "read_bytes": s.bytes_read, "write_bytes": s.bytes_written, "ops": s.ops,
            "reads": s.reads, "writes": s.writes, "discards": s.discards,
            "flushes": s.flushes,
            "latency_us": {"p50": s.p50_s * 1e6, "p95": s.p95_s * 1e6,
                           "p99": s.p99_s * 1e6, "max": s.max_s * 1e6,
                           "mean": s.mean_s * 1e6},
            "iops": s.iops, "bps": s.bps, "waiting": s.waiting,
            "reserved_ops": s.reserved_ops,
            "reservation": {"met": s.reservation_met, "missed": s.reservation_missed},
            "throttled": s.throttled} for s in rows}
        pg = self.kernel.pager_statistics(keep)
        yield "pager", {"policy": pg.policy, "frames": pg.frames,
                        "frames_used": pg.frames_used, "hits": pg.hits,
                        "misses": pg.misses, "bypassed_blocks": pg.bypassed_blocks,
                        "evictions": pg.evictions, "writeback": pg.writeback,
                        "dirty": pg.dirty, "writeback_bytes": pg.writeback_bytes,
                        "discarded": pg.discarded, "discarded_files": len(self.discarded),
                        "resident": {label.get(p, str(p)): n for p, n in pg.resident.items()
                                     if shown(p)}}
        yield "principals", [i.as_dict() for i in self.principals.info(listed, context=ctx)]
        # The pager's account per principal: what it holds, and how it fared.
        yield "cache", {label.get(pid, str(pid)): {k: getattr(c, k) for k in CACHE_FIELDS}
                        for pid, c in sorted(pg.per_principal.items()) if shown(pid)}
        # What the layers below enforce, as they were last told (banks pushed down).
        yield "enforced_banks", {
            label.get(pid, str(pid)): {
                "pager": {"cache_min": n.cache_min, "cache_max": n.cache_max},
                "scheduler": {k: getattr(n, k) for k in (
                    "io_reserve_iops", "io_reserve_bps", "io_weight",
                    "io_limit_iops", "io_limit_bps")}}
            for pid, n in self._enforced_banks() if shown(pid)}
        # By kind for root (`by_kind`); another user the total only: by kind, sampled at will,
        # they told one tenant each create, rename and unlink of the others (probe 18,
        # F3), finer than anything Linux tells a user of another's local I/O.
        yield "fuse_requests", (dict(self.fuse_requests) if by_kind else
                                {"total": sum(self.fuse_requests.values())})

    def _enforced_banks(self: FileSystem) -> list[tuple[PrincipalId, BankNode]]:
        pager_banks, sched_banks = self.kernel.enforced_banks()
        # Both are told the same snapshot; report the pager's, checked against the
        # scheduler's (a difference would be a push-down bug worth seeing).
        if pager_banks is not sched_banks and dict(pager_banks) != dict(sched_banks):
            log.error("pager and scheduler hold different bank snapshots")
        return sorted(pager_banks.items())
