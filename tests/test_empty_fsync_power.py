"""Empty fsyncs and power loss (hostile-probe finding 14, the review of the backed-out
ctime shortcut): the changes that shortcut let an fsync skip are made durable by the
fsync after them, and survive a simulated power loss right after that fsync returned.

A mounted volume records every device write and barrier and every commit and WAL
fsync (SLUICE_RECORD_DIR, the recorder of scripts/crashtest.py); the state a power loss
leaves right after an fsync's acknowledgement — no unflushed device block kept, the
WAL cut at its last fsync — is built and checked. Each change is followed by a wait
past the 1 s timer commit, so only the metadata layer's change mark (not the data the
kernel knows is unflushed) can tell the fsync that something is left to make durable.
(The third review case, a wall-clock step back, needs a clock the daemon does not
have a seam for: tests/test_empty_fsync.py shows the marks ignore the clock.)
"""

from __future__ import annotations

import bisect
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from kernelshim.client import Client
from test_crashtest import _at, _judge_state, _recorded_run, ct
from test_fallocate import fallocate

pytestmark = pytest.mark.mounted

BS = 4096
FALLOC_FL_KEEP_SIZE = 0x01


def _state_extents(run: dict[str, Any], tmp_path: Path, name: str, position: int,
                   ino: int, *, early: bool = False) -> list[tuple[int, int, int]]:
    """(file_block, count, state) of the inode's extents in the power-loss state at
    device-log byte `position`: no pending piece kept, the WAL at its lowest cut
    (`early`: the WAL fsyncs logged at exactly `position` not done yet)."""
    n = bisect.bisect_right(run["ends"], position)
    cut = ct.wal_cuts(run["events"], position, early=early)[0]
    vol = ct.build_state(tmp_path / name, run["volume"], run["rec"], run["wal"],
                         crash_at=n, keep=set(), wal=cut)
    db = sqlite3.connect(vol / "meta.db")
    try:
        return db.execute("SELECT file_block, count, state FROM extents WHERE inode=?"
                          " ORDER BY file_block", (ino,)).fetchall()
    finally:
        db.close()


def _covered(extents: list[tuple[int, int, int]], b0: int, b1: int) -> bool:
    blocks: set[int] = set()
    for fb, count, _st in extents:
        blocks.update(range(fb, fb + count))
    return set(range(b0, b1)) <= blocks


def test_reservations_and_relocated_direct_writes_survive_a_power_loss_after_fsync(
        tmp_path: Path, monkeypatch) -> None:
    ops: dict[str, int] = {}
    info: dict[str, int] = {}

    def script(w) -> None:
        ino = info["ino"] = w.do_create("f")
        w.do_write("f", ino, 0, 16 * BS)
        w.do_truncate("f", ino, 256 * BS)  # a hole inside the size: 16..256
        w.do_fsync("f", ino)
        # Review case 1: fallocate mode 0 and KEEP_SIZE inside the size change no
        # ctime and write no data. Not a workload operation: it changes no byte.
        fd = os.open(os.path.join(w.root, "f"), os.O_RDWR)
        try:
            fallocate(fd, 0, 32 * BS, 16 * BS)
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 64 * BS, 16 * BS)
        finally:
            os.close(fd)
        time.sleep(1.6)  # the timer's commit (not durable) stores them
        ops["fsync-falloc"] = w.next_id
        w.do_fsync("f", ino)
        # Review case 3: a direct client's write over sealed blocks, relocated by the
        # server with no ctime change; committed, then the timer's commit, then the
        # direct fsync.
        c = w._client()
        f = c.open("f", "r+")
        try:
            off, n = 4 * BS, 2 * BS
            w.op("dwrite", lambda oid: (f.pwrite(ct.pattern(oid, off, n), off),
                                        {"size": f.commit()})[1],
                 path="f", ino=ino, off=off, n=n)
            time.sleep(1.6)
            ops["fsync-direct"] = w.next_id
            w.op("fsync", lambda _o: f.fsync(), path="f", ino=ino, via="direct")
        finally:
            f.close()
        # Something unsynced after it, so the recording goes on past the fsync.
        w.do_write("f", ino, 200 * BS, BS)
        c.close()
        w.client = None

    run = _recorded_run(tmp_path, monkeypatch, script)
    recs = run["records"]
    ino = info["ino"]
    # The fsync after the fallocates made a durable commit holding them.
    at = _at(recs, ops["fsync-falloc"], "A")
    ext = _state_extents(run, tmp_path, "after-falloc", at, ino)
    assert _covered(ext, 32, 48) and _covered(ext, 64, 80), ext
    # And one before its WAL fsync does not: the control shows the state is cut where
    # we think (the timer's commit did not make them durable; the fsync's barrier
    # wrote nothing, so its WAL fsync is logged at the same device position).
    before = _at(recs, ops["fsync-falloc"], "B")
    ext = _state_extents(run, tmp_path, "before-falloc", before, ino, early=True)
    assert not _covered(ext, 32, 48), ext
    # The relocated direct write: the whole state judged by the crash oracle (the
    # file's bytes are the direct write's), mounted and fsck'd.
    at = _at(recs, ops["fsync-direct"], "A")
    found = _judge_state(run, tmp_path, "after-direct", position=at, keep=lambda c: [])
    assert found == [], [str(v) for v in found]


def _stats(mnt: Path) -> dict:
    import json

    from conftest import sluice
    return json.loads(sluice("stats", str(mnt), "--json").stdout)


def test_a_loop_of_fsyncs_on_an_unchanged_file_makes_no_barrier(mnt: Path) -> None:
    """The probe's loop, through the mount: after the first fsync of its file, a
    tenant's fsyncs of it make no barrier and no durable commit (sluice stats counts
    them); a write makes the next one durable again, charged to the tenant."""
    path = mnt / "own"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * BS, 0)
        os.fsync(fd)
        before = _stats(mnt)["fs"]
        for _ in range(200):
            os.fsync(fd)
            os.fdatasync(fd)
        after = _stats(mnt)["fs"]
        assert after["empty_fsyncs"] - before["empty_fsyncs"] == 400
        assert after["durable_commits"] == before["durable_commits"]
        assert after["barriers"] <= before["barriers"] + 1  # (at most a timer commit's)
        os.pwrite(fd, b"y", 10)
        os.fsync(fd)
        assert _stats(mnt)["fs"]["durable_commits"] == after["durable_commits"] + 1
    finally:
        os.close(fd)
