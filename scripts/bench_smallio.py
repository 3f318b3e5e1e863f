#!/usr/bin/env python3
"""What one small request costs the daemon: 4 KiB random reads and writes through the
FUSE mount and through the direct client, on one mount, phase after phase.

For each phase (fr: FUSE reads, dr: direct reads, fw: FUSE writes, dw: direct writes)
it prints the IOPS, the daemon's CPU per 1000 requests (user and system apart, and the
daemon's busiest threads: is it the loop thread or a helper), and the client's. The
phases alternate --reps times on the same mount, so the CPU per request of the two
paths is compared in the same minutes; CPU per request is steadier than IOPS on a
shared machine. Writes overwrite a file the phase before wrote (relocations, R1), and a
direct write phase ends with its commit, inside the time.

Options: --idle-poll 0 mounts without the loop's idle polling (fs/idlepoll.py), so
the daemon's CPU is its work and wake-ups only, not its polls for the next request;
--spy PHASE,... records the daemon with py-spy during those phases
(`py-spy record -r RATE -f raw --nonblocking`, one file per phase in --out);
--spin sets the direct client's polling for its reply (Client.connect(spin=...)).
--split times each direct read's round trip in parts on the client (a wrapper around
the client's socket notes when `sendall` starts and ends and when the `recv` that
brought the reply returned): the client's Python before the send, the send, the wait
for the reply, and the client's Python after it; and reads the daemon's own service
time per request (`shim_stats`: from the request's turn to its reply written, p50)
for every direct phase. The wrapper costs about a µs a read: compare the IOPS with a
phase run without it. --spy-client records the client with py-spy too. --syscalls counts the daemon's
system calls per request during each phase, and of them its `epoll_wait` calls (one
per pass of the event loop), with `perf stat -e raw_syscalls:sys_enter,
syscalls:sys_enter_epoll_wait -p PID` (kernel tracepoints: counts, not samples, the
same on a loaded machine as on a quiet one; with --idle-poll 0 no poll adds to them).

Run as root:  .venv/bin/python scripts/bench_smallio.py [--size-mb 1024] [--seconds 4]
              [--reps 2] [--phases fr,dr,fw,dw] [--idle-poll 0] [--spy dr,dw]
              [--rate 400] [--out /tmp] [--spin 250e-6] [--split] [--spy-client]
              [--syscalls]
Everything made (mount, volume) is removed in `finally`.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (BS, REPO, SLUICE, MiB, SluiceMount, cpu_seconds, loadavg, log,
                      random_offsets, run)

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def thread_ticks(pid: int) -> dict[tuple[str, str], int]:
    """CPU clock ticks (user + system) of each thread of `pid`, by (tid, name)."""
    out: dict[tuple[str, str], int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        st = raw.rsplit(")", 1)[1].split()
        out[(tid, name)] = int(st[11]) + int(st[12])
    return out


class TimedSocket:
    """The client's socket, noting (perf_counter_ns) when `sendall` started and ended
    and when a `recv` last returned bytes: --split's parts of a round trip."""

    __slots__ = ("_s", "send0", "send1", "got")

    def __init__(self, s: socket.socket) -> None:
        self._s = s
        self.send0 = self.send1 = self.got = 0

    def sendall(self, data: bytes) -> None:
        self.send0 = time.perf_counter_ns()
        self._s.sendall(data)
        self.send1 = time.perf_counter_ns()

    def recv(self, n: int, flags: int = 0) -> bytes:
        data = self._s.recv(n, flags)
        self.got = time.perf_counter_ns()
        return data

    def recv_into(self, buf: bytearray, n: int = 0, flags: int = 0) -> int:
        k = self._s.recv_into(buf, n, flags)
        self.got = time.perf_counter_ns()
        return k

    def __getattr__(self, name: str) -> object:
        return getattr(self._s, name)


def user_sys(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    return int(st[11]), int(st[12])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--phases", default="fr,dr,fw,dw")
    p.add_argument("--idle-poll", default=None, help="the mount's --idle-poll (µs)")
    p.add_argument("--spy", default="", help="phases to record with py-spy")
    p.add_argument("--rate", type=int, default=400, help="py-spy samples per second")
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    p.add_argument("--spin", type=float, default=None)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--split", action="store_true",
                   help="time direct reads in parts, and the daemon's service time")
    p.add_argument("--syscalls", action="store_true",
                   help="count the daemon's system calls and loop passes per request (perf)")
    p.add_argument("--spy-client", action="store_true",
                   help="record the client with py-spy too (the --spy phases)")
    a = p.parse_args()
    from kernelshim.client import Client

    size = a.size_mb * MiB
    secs = a.seconds
    spy = set(filter(None, a.spy.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="sluice-smallio-", dir=a.workdir))
    m = SluiceMount(tmp / "vol", tmp / "mnt", size=f"{max(4 * a.size_mb, 2048)}M")
    (tmp / "mnt").mkdir()
    try:
        m.mkfs()
        if a.idle_poll is None:
            m.mount()
        else:
            run([*SLUICE, "mount", str(m.volume), str(m.mountpoint), "--profile", "none",
                 "--idle-poll", a.idle_poll], cwd=REPO)
            m.pid = int(json.loads((m.volume / "mount.json").read_text())["pid"])
        assert m.pid is not None
        pid = m.pid
        path = m.mountpoint / "data.bin"
        chunk = os.urandom(4 * MiB)
        with open(path, "wb") as fh:
            for _ in range(size // len(chunk)):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        with open(path, "rb") as fh:  # the backing file into the host's page cache
            while fh.read(4 * MiB):
                pass
        kw = {} if a.spin is None else {"spin": a.spin}
        client = Client.connect(m.mountpoint, **kw)
        log(f"{size // MiB} MiB file, {secs} s phases, load {loadavg()}")

        def phase(name: str) -> None:
            write, direct = name[1] == "w", name[0] == "d"
            offs = random_offsets(size, 777 if write else 555)
            buf = bytearray(chunk[:BS])
            if direct:
                f = client.open("data.bin", "r+" if write else "r")
                op = f.pwrite if write else f.readinto
            else:
                fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
                mb = mmap.mmap(-1, BS)
                mb[:] = buf
                call = os.pwritev if write else os.preadv

                def op(_b: bytearray, off: int) -> int:
                    return call(fd, [mb], off)
            sp = spc = None
            timed = a.split and direct and not write
            if direct and a.split:
                client.call("shim_stats", reset=True)
            if timed:
                client.sock = TimedSocket(client.sock)  # type: ignore[assignment]
            if name in spy:
                sp = subprocess.Popen(
                    [str(REPO / ".venv/bin/py-spy"), "record", "-r", str(a.rate),
                     "--nonblocking", "-f", "raw", "-o", str(a.out / f"smallio-{name}.txt"),
                     "--pid", str(pid), "-d", str(int(secs))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if a.spy_client:
                    spc = subprocess.Popen(
                        [str(REPO / ".venv/bin/py-spy"), "record", "-r", str(a.rate),
                         "--nonblocking", "-f", "raw", "-o",
                         str(a.out / f"smallio-{name}-client.txt"),
                         "--pid", str(os.getpid()), "-d", str(int(secs))],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            perf = None
            if a.syscalls:
                perf = subprocess.Popen(
                    ["perf", "stat", "-x", ",", "-e",
                     "raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait", "-p", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                time.sleep(0.3)  # (perf attaches)
            t_before, us0, d0 = thread_ticks(pid), user_sys(pid), cpu_seconds(pid)
            c0, t0, n = time.process_time(), time.perf_counter(), 0
            parts = [0, 0, 0, 0]  # ns: before the send, the send, the wait, after
            if timed:
                ns, ts = time.perf_counter_ns, client.sock
                while True:
                    for k in range(32):
                        a0 = ns()
                        op(buf, offs[(n + k) & 0xFFFF])
                        a1 = ns()
                        parts[0] += ts.send0 - a0
                        parts[1] += ts.send1 - ts.send0
                        parts[2] += ts.got - ts.send1
                        parts[3] += a1 - ts.got
                    n += 32
                    if time.perf_counter() - t0 >= secs:
                        break
            else:
                while True:
                    for k in range(32):
                        op(buf, offs[(n + k) & 0xFFFF])
                    n += 32
                    if time.perf_counter() - t0 >= secs:
                        break
            if direct and write:
                f.commit()
            dt = time.perf_counter() - t0
            c1, d1, us1, t_after = time.process_time(), cpu_seconds(pid), user_sys(pid), \
                thread_ticks(pid)
            if timed:
                client.sock = client.sock._s
            served = ""
            if direct and a.split:
                rows = client.call("shim_stats", reset=True)["per_principal"]
                served = "  daemon service p50 " + ", ".join(
                    f"{r['p50_ms'] * 1e3:.0f} µs ({r['n']} requests)" for r in rows.values()
                    if r["n"])
            if direct:
                f.close()
            else:
                os.close(fd)
            if sp is not None:
                sp.wait()
            if spc is not None:
                spc.wait()
            tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
            busiest = sorted(((v - t_before.get(k, 0), k) for k, v in t_after.items()),
                             reverse=True)[:3]
            print(f"{name}: {n / dt:8.0f} IOPS  daemon {1000 * (d1 - d0) / n:.3f} s/1000 "
                  f"(user {(us1[0] - us0[0]) * tick_us / n:.0f} µs, sys "
                  f"{(us1[1] - us0[1]) * tick_us / n:.0f} µs per request; threads "
                  + ", ".join(f"{k[1]} {v * tick_us / n:.0f} µs" for v, k in busiest)
                  + f")  client {1000 * (c1 - c0) / n:.3f} s/1000  load {loadavg()}"
                  + served, flush=True)
            if perf is not None:
                perf.send_signal(signal.SIGINT)
                counts = {}
                for line in perf.communicate()[1].splitlines():
                    f = line.split(",")
                    if len(f) > 2 and f[0].isdigit():
                        counts[f[2]] = int(f[0])
                # (counted from perf's start to its end: a little more than the phase)
                print(f"    per request: {counts.get('raw_syscalls:sys_enter', 0) / n:.2f} "
                      f"system calls, {counts.get('syscalls:sys_enter_epoll_wait', 0) / n:.2f} "
                      f"passes of the event loop (epoll_wait)", flush=True)
            if timed:
                print(f"    per read: {1e6 * dt / n:.1f} µs; client before send "
                      f"{parts[0] / n / 1e3:.1f} µs, send {parts[1] / n / 1e3:.1f} µs, wait "
                      f"{parts[2] / n / 1e3:.1f} µs, after {parts[3] / n / 1e3:.1f} µs; the "
                      f"bench loop {1e6 * dt / n - sum(parts) / n / 1e3:.1f} µs", flush=True)

        for _ in range(a.reps):
            for name in a.phases.split(","):
                phase(name)
        client.close()
    finally:
        m.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from benchlib import main_quietly
    sys.exit(main_quietly(main))
