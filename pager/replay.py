"""Replay a trace through the real pager code, under any policy, against a device in
memory, and count what happened: hit ratio and write-back bytes per principal and in
total.

The device is a real `BlockDevice` (checksums, profile `none`) over `MemoryBacking`,
a sparse in-memory `Backing` (only blocks ever written take memory). The replay calls
the pager exactly as the shim does — read, write, discard, advise, flush,
writeback_file — with the principal, file and file block of each record, and applies
the file hints carried in the records with `set_file_hints`, so `hinted` sees the
hints and `principal` and `global-lru` (which ignore them) see the same requests. The
trace's times are not replayed (there is no background write-back aging during a
replay): dirty frames go out when reclaimed, throttled or at the final `flush()`,
which is part of the count.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Mapping

import numpy as np
import trio

from blockdev import (BankTree, BlockDevice, BlockNo, ChecksumStore, DeviceGeometry,
                      PrincipalId, parse_profile)

from . import trace as tr
from .pool import Pager


class MemoryBacking:
    """A sparse, in-memory `Backing` in units of `unit` bytes (the device's block size,
    or a checksum page)."""

    def __init__(self, size: int, *, unit: int, image: bytes | None = None) -> None:
        self._size = size
        self._unit = unit
        self._chunks: dict[int, bytes] = {}
        if image is not None:
            for off in range(0, len(image), unit):
                chunk = image[off:off + unit]
                self._chunks[off // unit] = chunk + bytes(unit - len(chunk))

    name = "memory"
    can_discard = True

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        u = self._unit
        out = bytearray(length)
        pos = offset
        while pos < offset + length:
            k, r = divmod(pos, u)
            n = min(u - r, offset + length - pos)
            c = self._chunks.get(k)
            if c is not None:
                out[pos - offset:pos - offset + n] = c[r:r + n]
            pos += n
        return bytes(out)

    async def read_into(self, offset: int, out: memoryview) -> None:
        out[:] = self.pread(offset, len(out))

    async def write(self, offset: int, data: memoryview) -> None:
        u = self._unit
        mv = memoryview(data).cast("B")
        pos = 0
        while pos < len(mv):
            k, r = divmod(offset + pos, u)
            n = min(u - r, len(mv) - pos)
            if r == 0 and n == u:
                self._chunks[k] = bytes(mv[pos:pos + n])
            else:
                c = bytearray(self._chunks.get(k, bytes(u)))
                c[r:r + n] = mv[pos:pos + n]
                self._chunks[k] = bytes(c)
            pos += n

    async def discard(self, offset: int, length: int) -> None:
        u = self._unit
        for k in range(offset // u, (offset + length) // u):
            self._chunks.pop(k, None)

    async def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def memory_device(nblocks: int, *, block_size: int = 4096) -> BlockDevice:
    """A `BlockDevice` of `nblocks` blocks held in memory, profile `none`."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(nblocks, dtype="<u8"))
    sums = MemoryBacking(len(buf.getvalue()), unit=4096, image=buf.getvalue())
    geo = DeviceGeometry(block_size, nblocks, "memory", "none", "replay")
    return BlockDevice(geo, parse_profile("none"), data=MemoryBacking(
        nblocks * block_size, unit=block_size), checksums=ChecksumStore.load(sums, nblocks))


@dataclasses.dataclass(frozen=True, slots=True)
class PrincipalResult:
    reads: int
    hits: int
    writeback_bytes: int
    discarded: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.reads if self.reads else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayResult:
    policy: str
    nframes: int
    reads: int
    hits: int
    writeback_bytes: int
    discarded_files: int
    per_principal: dict[int, PrincipalResult]

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.reads if self.reads else 0.0


def replay(records: np.ndarray, *, policy: str, nframes: int,
           banks: BankTree | None = None, writeback: bool = True, block_size: int = 4096,
           readahead: int = 16, pager_hook=None) -> ReplayResult:
    """Run `records` (TRACE_DTYPE) through a fresh pager; see the module docstring."""
    return trio.run(lambda: replay_async(
        records, policy=policy, nframes=nframes, banks=banks, writeback=writeback,
        block_size=block_size, readahead=readahead, pager_hook=pager_hook))


async def replay_async(records: np.ndarray, *, policy: str, nframes: int,
                       banks: BankTree | None = None, writeback: bool = True,
                       block_size: int = 4096, readahead: int = 16,
                       pager_hook=None) -> ReplayResult:
    """`replay` inside a running trio loop."""
    last = records["block"] + np.maximum(records["count"], 1)
    nblocks = int(last.max()) + 1 if len(records) else 16
    device = memory_device(max(16, nblocks), block_size=block_size)
    discarded: set[int] = set()
    pager = Pager(device, nframes=nframes, policy=policy, writeback=writeback,
                  readahead=readahead, on_discarded=discarded.add)
    if banks:
        pager.configure_banks(banks)
    if pager_hook is not None:
        pager_hook(pager)
    bs = block_size
    maxcount = int(records["count"].max()) if len(records) else 1
    buf = memoryview(bytearray(max(1, maxcount) * bs))
    wbuf = bytearray(max(1, maxcount) * bs)
    hints: dict[int, tuple[int, bool, bool]] = {}
    reads: dict[int, int] = {}
    cols = [records[c].tolist() for c in ("principal", "count", "file", "fblock", "block",
                                          "op", "flags", "priority")]
    for p, n, file, fb, b, op, flags, prio in zip(*cols):
        if file and op in (tr.READ, tr.WRITE):
            h = (prio, bool(flags & tr.F_DISCARDABLE), bool(flags & tr.F_SEQUENTIAL))
            if hints.get(file, (0, False, False)) != h:
                hints[file] = h
                pager.set_file_hints(file, priority=h[0], discardable=h[1], sequential=h[2])
        principal = PrincipalId(p)
        if op == tr.READ:
            reads[p] = reads.get(p, 0) + n
            await pager.read_into(BlockNo(b), n, buf[:n * bs], principal=principal,
                                  file=file, fblock=fb)
        elif op == tr.WRITE:
            # contents: the block number and the record's index stamp each block
            await pager.write(BlockNo(b), memoryview(wbuf)[:n * bs], principal=principal,
                              file=file, fblock=fb)
        elif op == tr.DISCARD:
            await pager.discard(BlockNo(b), n, principal=principal)
        elif op == tr.ADVISE:
            await pager.advise(
                file, [(fb, b, n)], principal=principal,
                priority=prio if flags & tr.F_SET_PRIORITY else None,
                discardable=bool(flags & tr.F_DISCARDABLE) if flags & tr.F_SET_DISCARDABLE
                else None,
                willneed=bool(flags & tr.F_WILLNEED), dontneed=bool(flags & tr.F_DONTNEED))
        elif op == tr.FORGET:
            hints.pop(file, None)
            pager.forget_file(file)
        elif op == tr.FLUSH:
            await pager.flush()
        elif op == tr.WRITEBACK_FILE:
            await pager.writeback_file(file)
    await pager.flush()
    st = pager.statistics()
    per = {}
    for pid, s in st.per_principal.items():
        per[int(pid)] = PrincipalResult(reads.get(int(pid), 0), s.hits, s.writeback_bytes,
                                        s.discarded)
    for q, n in reads.items():
        if q not in per:
            per[q] = PrincipalResult(n, 0, 0, 0)
    device.close()
    return ReplayResult(policy, nframes, sum(reads.values()), st.hits,
                        st.writeback_bytes, len(discarded), per)


def replay_all(records: np.ndarray, *, nframes: int, banks: Mapping | None = None,
               policies: tuple[str, ...] = ("hinted", "principal", "global-lru"),
               writeback: bool = True) -> dict[str, ReplayResult]:
    """The same trace through each policy."""
    return {pol: replay(records, policy=pol, nframes=nframes, banks=banks,
                        writeback=writeback) for pol in policies}


def main(argv: list[str] | None = None) -> int:
    """`python -m pager.replay TRACE [--frames N]`: a recorded trace through each
    policy, one line per policy and principal. Into a pipe whose reader went away
    (`... | head`) it stops quietly, as command-line tools do."""
    import os
    import sys
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # (here, not at exit, where a failure is a traceback)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    import argparse
    import sys

    from .trace import TraceFormatError, load_trace

    ap = argparse.ArgumentParser(prog="python -m pager.replay",
                                 description="Replay a sluice trace through every pager "
                                             "policy (write-back on) and print hit ratio "
                                             "and write-back bytes.")
    ap.add_argument("trace", help="a trace file (sluice trace record)")
    ap.add_argument("--frames", type=int, default=16384,
                    help="cache size in frames (default 16384: 64 MiB of 4 KiB blocks)")
    ap.add_argument("--block-size", type=int, default=4096)
    args = ap.parse_args(argv)
    if args.frames < 1:
        print("python -m pager.replay: --frames must be at least 1", file=sys.stderr)
        return 2
    try:
        records, names = load_trace(args.trace)
    except OSError as exc:
        print(f"python -m pager.replay: cannot read {args.trace}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    except TraceFormatError as exc:
        print(f"python -m pager.replay: {exc}", file=sys.stderr)  # (it names the file)
        return 1
    _print_replay(records, args.frames, args.block_size, names)
    return 0


def _print_replay(records: np.ndarray, frames: int, block_size: int,
                  names: Mapping[int, str]) -> None:
    """A principal is shown by its name, or by its id where the trace names none (a
    trace of `write_trace`, a principal removed before the recording ended)."""
    import sys
    print(f"{len(records)} records, cache {frames} frames of {block_size} bytes")
    print(f"{'policy':<12} {'principal':>9} {'reads':>9} {'hit ratio':>9} {'write-back':>12}")
    for pol in ("hinted", "principal", "global-lru"):
        r = replay(records, policy=pol, nframes=frames, block_size=block_size)
        print(f"{pol:<12} {'all':>9} {r.reads:>9} {r.hit_ratio:>9.3f} {r.writeback_bytes:>12}")
        for pid, x in sorted(r.per_principal.items()):
            if x.reads or x.writeback_bytes:
                who = names.get(pid, str(pid))
                print(f"{'':<12} {who:>9} {x.reads:>9} {x.hit_ratio:>9.3f} "
                      f"{x.writeback_bytes:>12}")
        sys.stdout.flush()  # a line per policy as it is done


if __name__ == "__main__":
    raise SystemExit(main())
