#!/usr/bin/env python3
"""What the direct client's own Python costs per lone 4 KiB read, without a daemon.

The steps a small random read runs around its `sendall` and its `recv`, on prepared
bytes and without a socket, timed in CPU seconds over --reads reads, alternated:

  plan   the way before `Client._small_read`: `FileCore.small_read` (a SendData),
         `ClientProtocol.data_request` (encode_data: a new bytes), the reply's bytes
         (encode_data_ok stands for what `recv` returned) taken by
         `receive_data_reply` (a DataReply), `small_read_done` (the copy out)
  short  `Client._small_read`'s way: `small_read_pos`, the frame packed into a kept
         buffer, the reply unpacked in place from another, `small_read_done`

Neither includes the system calls, the socket's method calls or the hybrid poll's
decisions (the same for both); scripts/bench_smallio.py --split times the mounted
round trip in parts. docs/BENCHMARKS.md, "Direct 4 KiB requests: the round trip on
each side".

Run:  .venv/bin/python scripts/bench_client_steps.py [--reads 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import mmap
import random
import sys
import time

from benchlib import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reads", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    from kernelshim import client as cl
    from kernelshim.clientcore import ClientProtocol, FileCore, SharedBuffer
    from kernelshim.protocol import (_DATA_OK_FRAME, DATA, DATA_OK, READ, VERSION,
                                     encode_data_ok)

    shm = mmap.mmap(-1, 8 << 20)
    buffer = SharedBuffer(memoryview(shm))
    core = FileCore(buffer, 4096, 1, 1 << 30, 1, append=False)
    buffer.holder = core
    proto = ClientProtocol()
    out = bytearray(4096)
    n = a.reads
    rnd = random.Random(1)
    # even blocks only: no read continues the last one (that one would take the plan)
    offs = [rnd.randrange(1 << 17) * 8192 for _ in range(n)]

    def plan() -> None:
        for off in offs:
            mv = memoryview(out).cast("B")
            small = core.small_read(len(mv), off)
            assert small is not None
            rid, _data = proto.data_request(small.op, small.slot, small.offset,
                                            small.length, small.buf)
            got = encode_data_ok(rid, 4096)  # (stands for the bytes recv returned)
            r = proto.receive_data_reply(got, rid)
            assert r is not None
            core.small_read_done(mv, off, r.n)

    def short() -> None:
        req, rep = bytearray(cl._DATA_FRAME.size), bytearray(cl.RECV_BYTES)
        frame, ok = cl._DATA_FRAME, _DATA_OK_FRAME
        for off in offs:
            mv = memoryview(out).cast("B")
            pos = core.small_read_pos(len(mv), off)
            rid = next(proto._rids) & 0xFFFFFFFF
            frame.pack_into(req, 0, frame.size - 4, VERSION, DATA, rid, READ, 1, pos, 4096, 0)
            proto.outstanding.add(rid)
            ok.pack_into(rep, 0, ok.size - 4, VERSION, DATA_OK, rid, 4096, 0, 0)  # (recv_into)
            got = 0
            if not proto._decoder.pending:
                t = ok.unpack_from(rep)
                if t[3] == rid and t[2] == DATA_OK and t[1] == VERSION and t[0] == ok.size - 4:
                    proto.outstanding.discard(rid)
                    got = t[4]
            core.small_read_done(mv, off, got)

    for _ in range(a.rounds):
        for fn in (plan, short):
            t0 = time.process_time()
            fn()
            dt = time.process_time() - t0
            print(f"{fn.__name__:6} {dt / n * 1e6:6.2f} µs per read (CPU)", flush=True)
    return 0


if __name__ == "__main__":
    from benchlib import main_quietly
    sys.exit(main_quietly(main))
