"""Helpers shared by the tests of the fifth hostile-tenant probe's items: the
in-process set-up of test_probe5_left.py, test_probe5_review.py,
test_probe5_review2.py and test_probe5_review3.py (a small kernel on a device with a
latency, principals and their bank trees), and the mounted tests' wait for a full
host to have room again (test_hostile_probe5.py, test_probe5_review.py)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from blockdev import BankNode, BlockDevice, PrincipalId
from blockdev.types import ROOT_PRINCIPAL
from kernelshim import Kernel

BS = 4096
#: the device's latency and queue depth: each request takes 125 µs, one at a time
PROFILE = "lat=125,qd=1"
MiB = 1 << 20


def P(i: int) -> PrincipalId:
    return PrincipalId(i)


def node(i: int, parent: int | None = 0, **kw) -> BankNode:
    """Principal `i`'s bank under `parent` (None: the root itself), with `kw` (limits,
    guarantees) as BankNode takes them."""
    return BankNode(P(i), None if parent is None else P(parent), f"p{i}", **kw)


def tree(*nodes: BankNode) -> dict:
    """A bank tree of the root and `nodes` (Kernel.configure_banks)."""
    out = {ROOT_PRINCIPAL: node(0, None)}
    out.update({n.id: n for n in nodes})
    return out


def make_kernel(tmp_path: Path, *, blocks: int = 1024, frames: int = 64,
                writeback: bool = True) -> Kernel:
    """A kernel on a new device of `blocks` blocks (PROFILE) in tmp_path/vol, with a
    pool of `frames` frames, write-back on by default, and no timeline slack (so
    that trio's autojump clock sees exactly the device's latency and the limits)."""
    d = tmp_path / "vol"
    d.mkdir()
    BlockDevice.format(d, size=blocks * BS, block_size=BS, profile=PROFILE)
    k = Kernel.open(d, cache_bytes=frames * BS, writeback=writeback)
    k.device.timeline_slack = 0.0
    return k


def write_when_host_has_room(path: Path, data: bytes, *, timeout: float = 30.0) -> None:
    """Write `data` to `path` on a mount whose host was full, once a commit has made
    the freeing of space durable and its blocks are discarded: sync, try, and on
    ENOSPC again every half second until `timeout` (then the ENOSPC is raised; any
    other error at once: EROFS was the old code's answer)."""
    deadline = time.monotonic() + timeout
    while True:
        os.sync()
        try:
            path.write_bytes(data)
            return
        except OSError as e:
            if e.errno != errno.ENOSPC or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
