#!/usr/bin/env python3
"""Pager policies on the same traces, at the same cache size, in the same run:
sluice's `hinted`, `principal` and `global-lru` (the real pager code, replayed by
pager/replay.py with write-back on), the replacement policies of libCacheSim (LRU,
ARC, LIRS, S3-FIFO, SIEVE, ...; `pip install -e '.[bench]'`), and Belady's MIN, the
optimum for hit ratio on a known future.

Mixes (synthetic, seeded; parameters fixed below and printed):
- `loop-scan`: principal 1 loops over a working set (75% of the cache) that its
  guarantee covers; principal 2 reads a file twice the cache size over and over, and
  advises priority 1 for the part of it that fits beside the loop.
- `zipf`: two principals read Zipf-distributed blocks of their own files (exponent
  ZIPF_ALPHA); no hints, no guarantees: hints carry no information here.
- `db`: a database principal with a guarantee: a hot index (3 reads per query, Zipf
  0.6, priority 2; 85% of the cache), one uniform point read of a large cold table per query (priority
  0) and appends to a log (priority -1); an analytics principal scans the table over
  and over (sequential hint).
- `scratch`: a build principal re-reads its sources, writes object files (kept,
  priority -1) and large temporary files (discardable), read back once, dropped
  (dontneed) and deleted later.
- `recorded`: real programs run as three principals on a freshly made and mounted
  volume (profile `none`, pager `hinted`) while `sluice trace record` runs: `sqlite3`
  builds a table with an index and then answers point queries by key (principal
  `db`, its directory hinted priority 10; three rounds of queries), `cp -r` copies a
  tree of Python's standard library in and `tar` archives it into a discardable
  scratch directory (`archiver`), `grep -r` and `sha256sum` scan the tree and the
  archive (`scanner`); the query rounds run beside the copy and the scans. The
  recorded trace is replayed like the synthetic mixes, at a cache of
  RECORDED_CACHE_FRAC of its footprint, with `db` guaranteed a quarter of that cache
  (as `sluice principal add --cache-min` would). No goal is set for it. `--quick`
  records a tiny version (a smaller tree, fewer rows and queries); `--no-recorded`
  leaves it out; `--save-trace FILE` keeps the recorded trace.
- `--trace FILE`: a trace recorded earlier (`sluice trace record`), as one more mix.

Hit ratio counts reads (block accesses) only: writes install blocks without a hit or
a miss, discards remove them, for every policy alike. Write-back bytes are what the
pager wrote to the device for dirty frames, including the final flush; the library's
policies and MIN have no dirty-page model (null).

Also measured, in the same run: the cost of a 4 KiB hit inside the pager against a
miss on a device with profile `none`.

Usage: scripts/bench_pager.py [--quick] [--json FILE] [--png FILE] [--trace FILE]
                              [--no-recorded] [--save-trace FILE]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from blockdev import BankNode, BlockDevice, BlockNo, PrincipalId  # noqa: E402
from pager import Pager, read_trace  # noqa: E402
from pager import trace as tr  # noqa: E402
from pager.replay import replay  # noqa: E402

import benchlib  # noqa: E402  (scripts/, sys.path[0])

BS = 4096
ZIPF_ALPHA = 0.9          # the Zipf exponent of the `zipf` mix
SEED = 20261130
#: cache size (frames) and trace length (block accesses per mix)
FULL = dict(cache=1024, length=200_000)
QUICK = dict(cache=128, length=30_000)

SLUICE_POLICIES = ("hinted", "principal", "global-lru")
LIB_POLICIES = ("LRU", "Clock", "ARC", "LIRS", "S3FIFO", "Sieve", "TwoQ", "WTinyLFU")
NO_HINT = ("principal", "global-lru") + tuple(f"lib:{p}" for p in LIB_POLICIES)

#: the `recorded` mix: cache size relative to the trace's footprint (blocks touched)
RECORDED_CACHE_FRAC = 0.10
#: the db principal's guarantee in the replay, as a fraction of that cache
RECORDED_DB_MIN = 0.25
PYLIB = Path("/usr/lib/python3.11")
#: what the recorded workload copies, archives and scans, and how big its table is
RECORDED_FULL = dict(tree=("email", "asyncio", "unittest", "xml", "http", "logging",
                           "multiprocessing", "pydoc_data", "lib2to3", "encodings"),
                     rows=100_000, queries=2000)
RECORDED_QUICK = dict(tree=("json", "http", "concurrent"), rows=4000, queries=200)


# -- mixes ----------------------------------------------------------------------------


class Mix:
    """A trace being generated: block accesses as TRACE_DTYPE records, files laid out
    contiguously on the device, banks for the principals."""

    def __init__(self, name: str, cache: int) -> None:
        self.name = name
        self.cache = cache
        self.rows: list[tuple] = []
        self.next_block = 0
        self.files: dict[int, tuple[int, int]] = {}  # file -> (first device block, size)
        self.banks: dict[PrincipalId, BankNode] = {
            PrincipalId(0): BankNode(PrincipalId(0), None, "root")}
        self.hints: dict[int, tuple[int, int]] = {}  # file -> (flags, priority)
        self.notes: list[str] = []

    def principal(self, pid: int, name: str, *, min_frames: int = 0,
                  max_frames: int | None = None) -> None:
        self.banks[PrincipalId(pid)] = BankNode(
            PrincipalId(pid), PrincipalId(0), name, cache_min=min_frames * BS,
            cache_max=None if max_frames is None else max_frames * BS)

    def file(self, fid: int, size: int, *, priority: int = 0, discardable: bool = False,
             sequential: bool = False) -> None:
        self.files[fid] = (self.next_block, size)
        self.next_block += size
        self.hints[fid] = ((tr.F_DISCARDABLE if discardable else 0)
                           | (tr.F_SEQUENTIAL if sequential else 0), priority)

    def access(self, p: int, fid: int, fblock: int, op: int = tr.READ, count: int = 1) -> None:
        first, _ = self.files[fid]
        flags, prio = self.hints[fid]
        self.rows.append((0.0, p, count, fid, fblock, first + fblock, op, flags, prio))

    def advise(self, p: int, fid: int, fblock: int, count: int, *, priority: int) -> None:
        first, _ = self.files[fid]
        self.rows.append((0.0, p, count, fid, fblock, first + fblock, tr.ADVISE,
                          tr.F_SET_PRIORITY, priority))

    def dontneed(self, p: int, fid: int) -> None:
        first, size = self.files[fid]
        self.rows.append((0.0, p, size, fid, 0, first, tr.ADVISE, tr.F_DONTNEED, 0))

    def delete(self, p: int, fid: int) -> None:
        first, size = self.files[fid]
        self.rows.append((0.0, p, size, fid, 0, first, tr.DISCARD, 0, 0))
        self.rows.append((0.0, p, 0, fid, 0, 0, tr.FORGET, 0, 0))

    def records(self) -> np.ndarray:
        return tr.make_records(self.rows)

    def footprint(self) -> int:
        return len(np.unique(self.records()["block"]))


def zipf_ranks(rng: np.random.Generator, n: int, alpha: float, size: int) -> np.ndarray:
    """`size` draws of ranks 0..n-1 with P(rank k) ~ 1/(k+1)^alpha, ranks shuffled
    over the file so hot blocks are not adjacent."""
    w = 1.0 / np.arange(1, n + 1) ** alpha
    w /= w.sum()
    perm = rng.permutation(n)
    return perm[rng.choice(n, size=size, p=w)]


def mix_loop_scan(cache: int, length: int, rng: np.random.Generator) -> Mix:
    m = Mix("loop-scan", cache)
    w = int(cache * 0.75)
    scan = cache * 2
    m.principal(1, "app", min_frames=w)
    m.principal(2, "scanner")
    m.file(1, w, priority=1)
    m.file(2, scan)
    keep = cache - w - 1
    m.notes.append(f"loop of {w} blocks (guarantee {w}), re-read file of {scan} blocks, "
                   f"2 loop reads per scan read; the re-reader advises priority 1 for "
                   f"the first {keep} blocks of its file (what fits beside the loop)")
    m.advise(2, 2, 0, keep, priority=1)
    i = j = 0
    while len(m.rows) < length:
        m.access(1, 1, i % w)
        m.access(1, 1, (i + 1) % w)
        i += 2
        m.access(2, 2, j % scan)
        j += 1
    return m


def mix_zipf(cache: int, length: int, rng: np.random.Generator) -> Mix:
    m = Mix("zipf", cache)
    n = cache * 8
    m.principal(1, "a")
    m.principal(2, "b")
    m.file(1, n)
    m.file(2, n)
    m.notes.append(f"two principals, Zipf alpha={ZIPF_ALPHA} over {n} blocks each")
    a = zipf_ranks(rng, n, ZIPF_ALPHA, length // 2)
    b = zipf_ranks(rng, n, ZIPF_ALPHA, length // 2)
    who = rng.integers(0, 2, size=length)
    ia = ib = 0
    for k in range(length):
        if who[k] == 0 and ia < len(a):
            m.access(1, 1, int(a[ia]))
            ia += 1
        elif ib < len(b):
            m.access(2, 2, int(b[ib]))
            ib += 1
    return m


def mix_db(cache: int, length: int, rng: np.random.Generator, *, index_frac: float = 0.85,
           index_reads: int = 3, alpha: float = 0.6) -> Mix:
    m = Mix("db", cache)
    index, table, logsize = int(cache * index_frac), cache * 16, cache * 4
    m.principal(1, "db", min_frames=index + cache // 16)
    m.principal(2, "analytics")
    m.file(1, index, priority=2)
    m.file(2, table, priority=0)
    m.file(3, logsize, priority=-1)
    m.file(4, table, sequential=True)  # the analytics principal's view: same blocks
    m.files[4] = m.files[2]
    m.notes.append(f"db: guarantee {index + cache // 16} frames, index {index} blocks "
                   f"(priority 2, {index_reads} reads per query, Zipf {alpha}), table "
                   f"{table} blocks (priority 0, 1 uniform point read per query), "
                   f"log appends (priority -1); "
                   "analytics scans the table over and over (sequential)")
    idx = zipf_ranks(rng, index, alpha, length * index_reads)
    tab = rng.integers(0, table, size=length)
    k = scanpos = logpos = 0
    while len(m.rows) < length:
        for r in range(index_reads):
            m.access(1, 1, int(idx[k * index_reads + r]))
        m.access(1, 2, int(tab[k]))
        if k % 4 == 0:
            m.access(1, 3, logpos % logsize, tr.WRITE)
            logpos += 1
        m.access(2, 4, scanpos)
        scanpos = (scanpos + 1) % table
        k += 1
    return m


def mix_scratch(cache: int, length: int, rng: np.random.Generator) -> Mix:
    m = Mix("scratch", cache)
    src = int(cache * 0.5)
    m.principal(1, "build")
    m.file(1, src)
    m.notes.append(f"sources {src} blocks re-read (Zipf 0.7), object files written and "
                   "kept (priority -1: the output directory's xattr), temporary files of a cache's size written, read back once, "
                   "dropped with dontneed, deleted two files later (discardable)")
    srcr = zipf_ranks(rng, src, 0.7, length)
    fid = 10
    k = 0
    live: list[int] = []
    while len(m.rows) < length:
        # one compile step: read sources, write a temp file, read it back, write an object
        tmp = fid
        fid += 1
        tsize = int(cache * 0.5)
        m.file(tmp, tsize, discardable=True)
        for b in range(tsize):
            for _ in range(2):
                m.access(1, 1, int(srcr[k % length]))
                k += 1
            m.access(1, tmp, b, tr.WRITE)
        for b in range(tsize):
            m.access(1, tmp, b)
            m.access(1, 1, int(srcr[k % length]))
            k += 1
        m.dontneed(1, tmp)  # the compiler is done with it (removed later)
        obj = fid
        fid += 1
        m.file(obj, cache // 16, priority=-1)
        for b in range(cache // 16):
            m.access(1, obj, b, tr.WRITE)
        live.append(tmp)
        if len(live) > 2:
            m.delete(1, live.pop(0))
    return m


MIXES = {"loop-scan": mix_loop_scan, "zipf": mix_zipf, "db": mix_db, "scratch": mix_scratch}


# -- the recorded mix: real programs on a mount ----------------------------------------

SLUICE = benchlib.SLUICE


def _sluice(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*SLUICE, *args], cwd=benchlib.REPO, check=True,
                          capture_output=True, text=True, **kw)


def _run_as(mnt: Path, principal: str, script: str) -> subprocess.Popen:
    """Start `sh -c script` as `principal` (sluice run); the caller waits."""
    return subprocess.Popen([*SLUICE, "run", str(mnt), "--principal", principal, "--",
                             "sh", "-ec", script], cwd=benchlib.REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_all(procs: list[tuple[str, subprocess.Popen]]) -> None:
    for what, pr in procs:
        _, err = pr.communicate(timeout=1800)
        if pr.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {pr.returncode}): {err.strip()[-400:]}")


def _sql_build(rows: int) -> str:
    """A table of `rows` rows (key, 200-byte payload) and an index on the key, built by
    sqlite3 itself (a recursive CTE), with a small page cache of its own so its
    reads reach the pager."""
    return (f"PRAGMA page_size=4096; PRAGMA cache_size=-256;\n"
            f"CREATE TABLE t(k INTEGER, v TEXT);\n"
            f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {rows})\n"
            f"INSERT INTO t SELECT (i * 7919) % {rows}, hex(randomblob(100)) FROM c;\n"
            f"CREATE INDEX tk ON t(k);\n")


def _sql_queries(rows: int, n: int, seed: int) -> str:
    """n point queries by key (an index lookup, then the row), keys Zipf-skewed over the
    table (a few hot customers, a long tail)."""
    rng = np.random.default_rng(seed)
    keys = zipf_ranks(rng, rows, 0.8, n)
    return ("PRAGMA cache_size=-256;\n"
            + "".join(f"SELECT length(v) FROM t WHERE k = {int(k)};\n" for k in keys))


def record_workload(quick: bool, out: Path) -> tuple[dict[str, int], list[str]]:
    """Make a volume, mount it, run the programs as principals while `sluice trace
    record` runs, and leave the trace in `out`. Returns the principals' ids and the
    notes printed with the mix. Always unmounts."""
    cfg = RECORDED_QUICK if quick else RECORDED_FULL
    tree = [PYLIB / d for d in cfg["tree"] if (PYLIB / d).is_dir()]
    if not tree:
        raise RuntimeError(f"none of {cfg['tree']} under {PYLIB}")
    rows, nq = int(cfg["rows"]), int(cfg["queries"])
    notes = [f"sqlite3: {rows} rows + index, 3 rounds of {nq} point queries (db, "
             f"priority 10); cp -r + tar of {len(tree)} dirs of {PYLIB} "
             f"(archiver, archive in a discardable dir); grep -r + sha256sum (scanner)"]
    with tempfile.TemporaryDirectory(prefix="bench_pager.") as td:
        t = Path(td)
        vol, mnt = t / "vol", t / "mnt"
        mnt.mkdir()
        sm = benchlib.SluiceMount(vol, mnt, size="4G")
        rec: subprocess.Popen | None = None
        try:
            sm.mkfs()
            sm.mount()
            for name in ("db", "archiver", "scanner"):
                _sluice("principal", "add", str(mnt), name)
            ids = {r["name"]: int(r["id"]) for r in
                   json.loads(_sluice("principal", "ls", str(mnt), "--json").stdout)}
            for d in ("db", "src", "scratch"):
                (mnt / d).mkdir()
            _sluice("hint", "-q", str(mnt / "db"), "--priority", "10")
            _sluice("hint", "-q", str(mnt / "scratch"), "--discardable")
            (t / "build.sql").write_text(_sql_build(rows))
            for r in range(3):
                (t / f"q{r}.sql").write_text(_sql_queries(rows, nq, SEED + r))
            db = shlex.quote(str(mnt / "db" / "t.sqlite"))
            src, scratch = shlex.quote(str(mnt / "src")), shlex.quote(str(mnt / "scratch"))
            rec = subprocess.Popen([*SLUICE, "trace", "record", str(mnt), str(out)],
                                   cwd=benchlib.REPO, stderr=subprocess.PIPE, text=True)
            assert rec.stderr is not None
            line = rec.stderr.readline()  # "recording the pager trace of ..."
            if "recording" not in line:
                raise RuntimeError(f"sluice trace record: {line.strip()}")
            t0 = time.perf_counter()
            _wait_all([("sqlite3 build", _run_as(
                mnt, "db", f"sqlite3 {db} < {shlex.quote(str(t / 'build.sql'))}"))])
            _wait_all([("sqlite3 queries", _run_as(
                mnt, "db", f"sqlite3 {db} < {shlex.quote(str(t / 'q0.sql'))} > /dev/null"))])
            copy = " ".join(shlex.quote(str(d)) for d in tree)
            _wait_all([
                ("sqlite3 queries", _run_as(
                    mnt, "db", f"sqlite3 {db} < {shlex.quote(str(t / 'q1.sql'))} > /dev/null")),
                ("cp + tar", _run_as(
                    mnt, "archiver", f"cp -r {copy} {src}/ && "
                    f"tar -cf {scratch}/src.tar -C {src} .")),
            ])
            _wait_all([
                ("sqlite3 queries", _run_as(
                    mnt, "db", f"sqlite3 {db} < {shlex.quote(str(t / 'q2.sql'))} > /dev/null")),
                ("grep + sha256sum", _run_as(
                    mnt, "scanner", f"grep -rc import {src} > /dev/null; "
                    f"grep -rc def {src} > /dev/null; sha256sum {scratch}/src.tar > /dev/null")),
            ])
            secs = time.perf_counter() - t0
            rec.send_signal(signal.SIGINT)
            _, err = rec.communicate(timeout=120)
            if rec.returncode != 0:
                raise RuntimeError(f"sluice trace record failed: {err.strip()}")
            rec = None
            notes.append(f"programs ran {secs:.1f} s; trace {out.stat().st_size} bytes")
        finally:
            if rec is not None and rec.poll() is None:
                rec.send_signal(signal.SIGINT)
                try:
                    rec.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    rec.kill()
                    rec.wait()
            sm.cleanup()
    return ids, notes


def recorded_banks(ids: dict[str, int], cache: int) -> dict:
    """The principals of the recording, `db` guaranteed RECORDED_DB_MIN of the cache."""
    root = PrincipalId(ids.get("root", 0))
    banks = {root: BankNode(root, None, "root")}
    for name, pid in ids.items():
        if pid == root:
            continue
        mn = int(cache * RECORDED_DB_MIN) if name == "db" else 0
        banks[PrincipalId(pid)] = BankNode(PrincipalId(pid), root, name, cache_min=mn * BS)
    return banks


# -- reference policies -------------------------------------------------------------------


def block_accesses(records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trace as one entry per block: (block, op, principal)."""
    n = np.maximum(records["count"], 1)
    n = np.where(np.isin(records["op"], (tr.READ, tr.WRITE, tr.DISCARD)), n, 0)
    rep = np.repeat(np.arange(len(records)), n)
    offs = np.arange(len(rep)) - np.repeat(np.cumsum(n) - n, n)
    return (records["block"][rep] + offs, records["op"][rep], records["principal"][rep])


def belady(records: np.ndarray, cache: int) -> tuple[float, dict[int, float]]:
    """Belady's MIN (demand paging: every miss is installed; on eviction, the resident
    block used farthest in the future goes). Discards remove blocks."""
    blocks, ops, prin = block_accesses(records)
    n = len(blocks)
    nxt = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    last: dict[int, int] = {}
    bl = blocks.tolist()
    opl = ops.tolist()
    for i in range(n - 1, -1, -1):
        b = bl[i]
        if opl[i] == tr.DISCARD:
            last.pop(b, None)  # data after a discard is new: no reuse across it
            continue
        nxt[i] = last.get(b, np.iinfo(np.int64).max)
        last[b] = i
    nx = nxt.tolist()
    resident: dict[int, int] = {}  # block -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, block), lazily cleaned
    hits: dict[int, int] = {}
    reads: dict[int, int] = {}
    for i in range(n):
        b, op, p = bl[i], opl[i], int(prin[i])
        if op == tr.DISCARD:
            resident.pop(b, None)
            continue
        if op == tr.READ:
            reads[p] = reads.get(p, 0) + 1
            if b in resident:
                hits[p] = hits.get(p, 0) + 1
        if b not in resident and len(resident) >= cache:
            while True:
                negu, v = heapq.heappop(heap)
                if resident.get(v) == -negu:
                    del resident[v]
                    break
        resident[b] = nx[i]
        heapq.heappush(heap, (-nx[i], b))
    total = sum(hits.values()) / max(1, sum(reads.values()))
    return total, {p: hits.get(p, 0) / r for p, r in reads.items()}


def libcachesim_policy(name: str, records: np.ndarray, cache: int
                       ) -> tuple[float, dict[int, float]]:
    import libcachesim as lcs
    c = getattr(lcs, name)(cache_size=cache)
    req = lcs.Request()
    req.obj_size = 1
    blocks, ops, prin = block_accesses(records)
    hits: dict[int, int] = {}
    reads: dict[int, int] = {}
    for b, op, p in zip(blocks.tolist(), ops.tolist(), prin.tolist()):
        if op == tr.DISCARD:
            try:
                c.remove(b)
            except Exception:
                pass
            continue
        req.obj_id = b
        hit = c.get(req)
        if op == tr.READ:
            reads[p] = reads.get(p, 0) + 1
            if hit:
                hits[p] = hits.get(p, 0) + 1
    total = sum(hits.values()) / max(1, sum(reads.values()))
    return total, {p: hits.get(p, 0) / r for p, r in reads.items()}


# -- cost of a hit ------------------------------------------------------------------------


def hit_vs_miss(n: int) -> tuple[float, float]:
    """Microseconds per 4 KiB read inside the pager: a hit, and a miss (eviction, device
    read with checksum) on a device with profile `none`, in a temporary directory."""
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        BlockDevice.format(d, size=(n + 64) * BS, block_size=BS, profile="none")
        dev = BlockDevice.open(d)
        try:
            return trio.run(_hit_vs_miss, dev, n)
        finally:
            dev.close()


async def _hit_vs_miss(dev: BlockDevice, n: int) -> tuple[float, float]:
    p = PrincipalId(1)
    data = bytes(range(256)) * (BS // 256)
    for b in range(0, n, 256):
        k = min(256, n - b)
        await dev.write(BlockNo(b), data * k, principal=p)
    buf = memoryview(bytearray(BS))
    best_hit = best_miss = float("inf")
    for _ in range(3):
        pager = Pager(dev, nframes=64)
        await pager.read_into(BlockNo(0), 1, buf, principal=p)
        t = time.perf_counter()
        for _ in range(n):
            await pager.read_into(BlockNo(0), 1, buf, principal=p)
        best_hit = min(best_hit, (time.perf_counter() - t) / n * 1e6)
        t = time.perf_counter()
        for b in range(n):  # every block once: each a miss, evicting once the pool is full
            await pager.read_into(BlockNo(b), 1, buf, principal=p)
        best_miss = min(best_miss, (time.perf_counter() - t) / n * 1e6)
    return best_hit, best_miss


# -- the run -----------------------------------------------------------------------------


def run_mix(name: str, records: np.ndarray, cache: int, banks, have_lib: bool,
            out: dict, per: dict) -> None:
    res: dict[str, dict] = {}
    pp: dict[str, dict] = {}
    for pol in SLUICE_POLICIES:
        r = replay(records, policy=pol, nframes=cache, banks=banks, writeback=True,
                   block_size=BS)
        res[pol] = {"hit_ratio": round(r.hit_ratio, 4), "writeback_bytes": r.writeback_bytes}
        pp[pol] = {str(p): {"hit_ratio": round(x.hit_ratio, 4),
                            "writeback_bytes": x.writeback_bytes}
                   for p, x in sorted(r.per_principal.items()) if x.reads or x.writeback_bytes}
    if have_lib:
        for lp in LIB_POLICIES:
            h, hp = libcachesim_policy(lp, records, cache)
            res[f"lib:{lp}"] = {"hit_ratio": round(h, 4), "writeback_bytes": None}
            pp[f"lib:{lp}"] = {str(p): {"hit_ratio": round(x, 4), "writeback_bytes": None}
                               for p, x in sorted(hp.items())}
    h, hp = belady(records, cache)
    res["belady"] = {"hit_ratio": round(h, 4), "writeback_bytes": None}
    pp["belady"] = {str(p): {"hit_ratio": round(x, 4), "writeback_bytes": None}
                    for p, x in sorted(hp.items())}
    out[name] = res
    per[name] = pp


def goals(out: dict) -> list[tuple[str, bool, str]]:
    """The issue's goals, checked on the results: (goal, met, numbers)."""
    rows = []
    for mix in ("loop-scan", "db", "scratch"):
        if mix not in out:
            continue
        r = out[mix]
        h = r["hinted"]["hit_ratio"]
        mn = r["belady"]["hit_ratio"]
        rows.append((f"{mix}: hinted within 10% of MIN", h >= 0.9 * mn,
                     f"{h:.3f} vs MIN {mn:.3f} ({h / mn:.0%} of MIN)" if mn else "MIN 0"))
        best = max((r[p]["hit_ratio"], p) for p in r if p in NO_HINT)
        rows.append((f"{mix}: hinted >= every policy without hints", h >= best[0],
                     f"{h:.3f} vs best {best[1]} {best[0]:.3f}"))
    if "zipf" in out:
        r = out["zipf"]
        h = r["hinted"]["hit_ratio"]
        best = max((r[p]["hit_ratio"], p) for p in r if p in NO_HINT)
        rows.append(("zipf: hinted within 2 points of the best policy without hints",
                     h >= best[0] - 0.02, f"{h:.3f} vs best {best[1]} {best[0]:.3f}"))
    for mix in ("loop-scan", "db"):
        if mix in out:
            r = out[mix]
            d = r["hinted"]["hit_ratio"] - r["global-lru"]["hit_ratio"]
            rows.append((f"{mix} (a scan): hinted >= 20 points above global-lru", d >= 0.20,
                         f"+{d * 100:.1f} points"))
    if "scratch" in out:
        r = out["scratch"]
        wh, wp = r["hinted"]["writeback_bytes"], r["principal"]["writeback_bytes"]
        rows.append(("scratch: discardable hints cut write-back bytes at least in half",
                     wh * 2 <= wp, f"{wh} vs {wp} bytes without hints (principal)"))
    return rows


def draw(out: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[bench]'): no {path}")
        return False
    mixes = list(out)
    pols = list(next(iter(out.values())))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(mixes) * len(pols) / 4), 4.5))
    width = 0.8 / len(pols)
    cmap = plt.get_cmap("tab20")
    for k, pol in enumerate(pols):
        xs = [i + k * width for i in range(len(mixes))]
        ys = [out[m].get(pol, {}).get("hit_ratio", 0) for m in mixes]
        color = "black" if pol == "belady" else cmap(k % 20)
        ax.bar(xs, ys, width, label=pol, color=color,
               edgecolor="black" if pol == "hinted" else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(mixes))])
    ax.set_xticklabels(mixes)
    ax.set_ylabel("hit ratio (reads)")
    ax.set_title("sluice pager policies vs libCacheSim and Belady's MIN")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small cache and short traces")
    ap.add_argument("--json", type=Path, help="write {mix: {policy: {...}}} here")
    ap.add_argument("--png", type=Path, help="draw the hit ratios here")
    ap.add_argument("--trace", type=Path, action="append", default=[],
                    help="a trace recorded from a mount (sluice trace record), as a mix")
    ap.add_argument("--cache", type=int, help="cache size in frames (default: by mode)")
    ap.add_argument("--no-lib", action="store_true", help="leave out libCacheSim")
    ap.add_argument("--no-recorded", action="store_true",
                    help="leave out the `recorded` mix (real programs on a mount)")
    ap.add_argument("--save-trace", type=Path, metavar="FILE",
                    help="keep the trace the `recorded` mix recorded")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.cache:
        cfg["cache"] = args.cache
    cache, length = cfg["cache"], cfg["length"]
    have_lib = False
    if not args.no_lib:
        try:
            import libcachesim  # noqa: F401
            have_lib = True
        except ImportError:
            print("libcachesim is not installed (pip install -e '.[bench]'): comparing "
                  "with sluice's policies and Belady's MIN only")
    print(f"cache {cache} frames of {BS} bytes; trace length about {length} block "
          f"accesses per mix; Zipf exponent {ZIPF_ALPHA}; seed {SEED}")
    out: dict = {}
    per: dict = {}
    for name, gen in MIXES.items():
        m = gen(cache, length, np.random.default_rng(SEED))
        recs = m.records()
        nb = int(np.maximum(recs["count"], 1)[recs["op"] != tr.FORGET].sum())
        fp = m.footprint()
        print(f"\n== {name}: {nb} block accesses, footprint {fp} blocks "
              f"(cache = {cache / fp:.1%} of it); {'; '.join(m.notes)}")
        t = time.perf_counter()
        run_mix(name, recs, cache, m.banks, have_lib, out, per)
        print_mix(name, out[name], per[name], time.perf_counter() - t)
    if not args.no_recorded:
        run_recorded(args.quick, args.save_trace, have_lib, out, per)
    for path in args.trace:
        recs = read_trace(path)
        name = f"trace:{path.name}"
        nb = int(np.maximum(recs["count"], 1).sum())
        print(f"\n== {name}: {len(recs)} records, {nb} block accesses")
        run_mix(name, recs, cache, None, have_lib, out, per)
        print_mix(name, out[name], per[name], 0)
    hit, miss = hit_vs_miss(2000 if args.quick else 20000)
    print(f"\ncost inside the pager, profile none: 4 KiB hit {hit:.1f} us, miss "
          f"{miss:.1f} us: a hit costs {hit / miss:.2f} of a miss (goal <= 0.5)")
    print("\ngoals:")
    met = goals(out)
    for g, ok, nums in met:
        print(f"  [{'met' if ok else 'NOT MET'}] {g}: {nums}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    if args.png:
        draw(out, args.png)
    return 0


def run_recorded(quick: bool, save: Path | None, have_lib: bool, out: dict,
                 per: dict) -> None:
    """Record the real programs' trace (record_workload) and replay it as `recorded`."""
    if not os.path.exists("/dev/fuse"):
        print("\n== recorded: skipped (no /dev/fuse: cannot mount a volume here)")
        return
    with tempfile.TemporaryDirectory(prefix="bench_pager.") as td:
        path = save or Path(td) / "recorded.trace"
        t = time.perf_counter()
        ids, notes = record_workload(quick, path)
        rec_secs = time.perf_counter() - t
        recs = read_trace(path)
    nb = int(np.maximum(recs["count"], 1)[np.isin(recs["op"], (tr.READ, tr.WRITE))].sum())
    blocks, ops, _ = block_accesses(recs)
    fp = len(np.unique(blocks[ops != tr.DISCARD]))
    cache = max(16, int(fp * RECORDED_CACHE_FRAC))
    banks = recorded_banks(ids, cache)
    names = {pid: n for n, pid in ids.items()}
    ops_n = {nm: int((recs["op"] == op).sum()) for nm, op in
             (("reads", tr.READ), ("writes", tr.WRITE), ("discards", tr.DISCARD),
              ("advise", tr.ADVISE))}
    print(f"\n== recorded: {len(recs)} records ({', '.join(f'{v} {k}' for k, v in ops_n.items())}), "
          f"{nb} block reads and writes, footprint {fp} blocks; cache {cache} frames = "
          f"{RECORDED_CACHE_FRAC:.0%} of the footprint; db guaranteed {RECORDED_DB_MIN:.0%} "
          f"of it; recorded in {rec_secs:.1f} s{' (quick: a tiny version)' if quick else ''}")
    for n in notes:
        print(f"   {n}")
    print("   principals: " + ", ".join(f"p{pid} = {names[pid]}" for pid in sorted(names)))
    t = time.perf_counter()
    run_mix("recorded", recs, cache, banks, have_lib, out, per)
    print_mix("recorded", out["recorded"], per["recorded"], time.perf_counter() - t)
    r = out["recorded"]
    h, mn = r["hinted"]["hit_ratio"], r["belady"]["hit_ratio"]
    best = max((r[p]["hit_ratio"], p) for p in r if p in NO_HINT)
    wh, wp = r["hinted"]["writeback_bytes"], r["principal"]["writeback_bytes"]
    print(f"  recorded (no goal set): hinted {h:.3f} = {h / mn if mn else 0:.0%} of MIN "
          f"{mn:.3f}; best without hints {best[1]} {best[0]:.3f}; principal "
          f"{r['principal']['hit_ratio']:.3f}, global-lru {r['global-lru']['hit_ratio']:.3f}; "
          f"write-back {wh} bytes under hinted vs {wp} under principal")


def print_mix(name: str, res: dict, per: dict, secs: float) -> None:
    principals = sorted({p for d in per.values() for p in d}, key=int)
    head = f"  {'policy':<14} {'hit ratio':>9} {'write-back MiB':>14}"
    for p in principals:
        head += f" {'p' + p + ' hits':>8} {'p' + p + ' wb MiB':>10}"
    print(head)
    for pol, r in res.items():
        wb = r["writeback_bytes"]
        line = (f"  {pol:<14} {r['hit_ratio']:>9.3f} "
                f"{'-' if wb is None else f'{wb / 2**20:.1f}':>14}")
        for p in principals:
            x = per[pol].get(p)
            if x is None:
                line += f" {'':>8} {'':>10}"
                continue
            w = x["writeback_bytes"]
            line += (f" {x['hit_ratio']:>8.3f} "
                     f"{'-' if w is None else f'{w / 2**20:.1f}':>10}")
        print(line)
    if secs:
        print(f"  ({secs:.1f} s)")


if __name__ == "__main__":
    from benchlib import main_quietly
    sys.exit(main_quietly(main))
