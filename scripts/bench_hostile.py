#!/usr/bin/env python3
"""Other principals' latency while hostile uids attack the control socket (issue 6).

A sluice volume is mounted where every uid can reach it. A victim (root, a direct
client in this process) does small requests one at a time — `stat` then a 4 KiB
`pread` of a shared file — first on a quiet daemon, then while two hostile uids
attack it at once, in the same run:

  flood       clients that pipeline 64 requests at a time (stat, 4 KiB read, and one
              `stats` and one `principal_ls`) and read the replies as fast as the
              daemon sends them, without pause: the tenant that wants the whole daemon
  never-reads clients that pipeline opens and `stats` and never read a reply
  churn       connections made and dropped without end, with random cuts mid-request
              (some reset), attaching buffers, opening files, minting, writing
  hoard       silent connections (up to the bank) and 64 MiB shared buffers

Printed: p50, p99 and max of the victim's requests quiet and attacked and their ratio,
the daemon's own service time of the victim's requests (from its per-principal
histogram: the time from the request being taken off the socket to its reply being
written), the daemon thread's time spent waiting to be scheduled on a CPU
(/proc/PID/task/PID/schedstat), and the load average.

    .venv/bin/python scripts/bench_hostile.py [--samples N] [--epochs K] [--uid-slices]
                                              [--quick] [--json FILE]
                                              [--py-spy PATH] [--ab-nice A,B]
                                              [--gc-log FILE] [--rss-seconds S]
                                              [--floor] [--pin D,V[,A]]
                                              [--victim-fuse] [--fuse-attack N] [--uids A,B]

`--victim-fuse` makes the victim a program through the mount instead (the same stat and
4 KiB pread, as FUSE requests: the attackers' direct requests and its own share the
daemon's event loop all the same). `--fuse-attack N` makes the attack N programs of the
hostile uids through the mount (the same stat and pread, without pause) instead of the
control-socket attackers.

By default (`--epochs 10`) the quiet and attacked figures come from the same minutes:
one attack runs throughout, and the victim's pairs are taken in K quiet and K attacked
epochs of SAMPLES/K pairs each, alternated (quiet then attacked, then attacked then
quiet, ...): in a quiet epoch every attacker process is stopped (SIGSTOP; its
connections stay open and idle) and the daemon is given EPOCH_SETTLE to finish what they
sent. Printed: p50/p99/p99.9 of each condition's pooled pairs and their ratios, the
spread of the epochs' own p50 and p99, the victim's wait for a CPU, the hostile uids'
requests served a second in the attacked epochs, the load average after each epoch,
and a "pristine" epoch taken before any attacker started (the single-shot mode's
reference). A whole run's 1000 pairs take under a second: one quiet phase followed by
one attacked phase (`--epochs 0`, the single-shot mode) compares two half-second
windows a few seconds apart, and a burst of another session's work in either moved
the ratio as much as the attack did (docs/BENCHMARKS.md, "Stop 16").
`--floor` (epochs mode only) measures what part of the ratio the daemon cannot remove:
the same attacker processes, doing the same work on the same 2 CPUs, attack a second,
separate sluice daemon (a volume and mount of its own, made the same way, serving
them as the first would), while the victim's pairs go to the first daemon, which does
none of the attackers' work. Caveat: it is not the normal run's machine minus the
daemon's work. Two daemons then each want a CPU (the stand-in serving the attackers,
the victim's daemon spinning its idle poll between the victim's requests), and the
victim waits about ten times longer for a CPU than in a normal run; so it is not a
lower bound for a daemon that serves the attackers itself (docs/BENCHMARKS.md, "Stop
17: the floor re-read"). The hostile uids' requests served a second are then the
second daemon's.
`--uid-slices` puts the victim (this process, once the daemon has started) and each
hostile uid's processes in a cpu cgroup of its own (cgroup v1, /sys/fs/cgroup/cpu,
default shares, removed at the end), as systemd's user-UID.slice does on a real
multi-user host: one uid's 14 processes then take no more of the CPUs from the victim
than one would. The daemon stays where it is; it does not control the OS scheduler.
`--pin D,V[,A]` pins the daemon's event-loop thread to CPU D and the victim to CPU V
(the attackers to CPU A, or let them run anywhere), in both conditions. This project's
VMs pack two processes that wake each other onto one vCPU (the kernel's command line
has `sched_vcpu_pack`): a victim asleep in `recv` is woken by the daemon's reply onto
the daemon's CPU while the other idles, and the pair then takes turns on one CPU. Quiet
and attacked epochs are each in that state or not, at random (docs/BENCHMARKS.md, "Stop
19"); pinned, neither can be, and what is left is the daemon's own work and the CPU the
attackers' processes take.
With `--epochs` the default is 3000 samples (300 pairs an epoch: an epoch's p99 is
then its 297th pair, nearest rank; fewer than 200 an epoch are refused).
`--quick` (what the test suite runs) takes fewer samples and shorter attacks, in the
single-shot mode (as do --ab-nice, --gc-log, --rss-seconds, --py-spy, --loop-trace,
which measure one window per phase).
`--ab-nice A,B[,C]` compares the daemon at nice A and B (`sluice mount --nice`; 0,-5:
without and with the default) in one run and mount: each phase alternates blocks of 50
request pairs between the values (set on the live daemon as the mount option does: its
threads and its autogroup) and prints per value p50/p99 quiet and attacked, the daemon
main thread's wait for a CPU (schedstat) and the victim's. The daemon's default is nice
-5 (`sluice mount`), so a plain run measures the daemon at -5.
`--gc-log FILE` has the daemon log every cyclic garbage collection (SLUICE_GC_LOG,
fs/gcwatch.py) and prints per phase the collections of each generation with their wall
and CPU time, the victim's request pairs that overlapped one, and the p99 without
those pairs. `--rss-seconds S` keeps the attack going S seconds after the attacked
phase and samples the daemon's resident set every second (printed: first, max, last).
The daemon's RSS before the quiet phase and after the attacked one is always printed.
`--py-spy PATH` records the daemon with py-spy during the attacked phase and prints
the functions it spent its time in. `--loop-trace FILE` logs every step of the
daemon's event loop and every control operation with its CPU time (the daemon runs
with scripts/looptrace/ on its PYTHONPATH) and prints, for the attacked phase while the
victim runs, what the loop's steps and operations cost: what the victim waits behind;
and it splits each victim request pair end to end, both phases alike (`decompose`: the
call -> the batch in progress -> the poll that picked the socket up -> other steps run
first -> the victim's step -> the client having the reply, with the daemon's CPU and
off-CPU time in between and the victim thread's wait for a CPU). Must run as root (the
attackers are other uids, via setpriv).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

from benchlib import (REPO, SLUICE, SluiceMount, is_mounted, loadavg, log, parse_uids,
                      run, unused_uids)

sys.path.insert(0, str(REPO))

from kernelshim.client import CONTROL_XATTR, Client  # noqa: E402

#: an interpreter every uid can run, with the repository and the venv's packages
USER_PY = "/usr/bin/python3"
USER_ENV = {"PATH": "/usr/bin:/bin",
            "PYTHONPATH": f"{REPO}:{sysconfig.get_paths()['purelib']}"}

_PRELUDE = """
import json, os, random, socket, struct, sys, time
path = sys.argv[1]
def frame(rid, p):
    b = struct.pack(">BBI", 2, 1, rid) + json.dumps(p).encode()
    return struct.pack(">I", len(b)) + b
def recv_frames(s, want, buf=b""):
    got = 0
    while got < want:
        data = s.recv(1 << 20)
        if not data:
            raise EOFError
        buf += data
        while len(buf) >= 4:
            n = struct.unpack(">I", buf[:4])[0]
            if len(buf) < 4 + n:
                break
            buf = buf[4 + n:]
            got += 1
    return buf
"""

#: pipelines 64 requests at a time (stat, 4 KiB read, and one `stats` and one
#: `principal_ls`) and reads every reply, without pause
FLOOD = _PRELUDE + """
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.sendall(frame(1, {"op": "hello"}) + frame(2, {"op": "attach", "size": 1 << 16})
          + frame(3, {"op": "open", "path": "pub/shared", "flags": 0}))
buf = recv_frames(s, 3)
cheap = [frame(0, {"op": "stat", "slot": 1}),
         frame(0, {"op": "read", "slot": 1, "offset": 0, "length": 4096, "buf": 0})]
costly = [frame(0, {"op": "stats"}), frame(0, {"op": "principal_ls"})]
print("flooding", flush=True)
rid = 4
while True:   # 62 cheap requests and 2 costly ones (request ids need not differ)
    batch = b"".join(cheap[i % 2] for i in range(62)) + b"".join(costly)
    rid += 64
    s.sendall(batch)
    buf = recv_frames(s, 64, buf)
"""

#: pipelines opens and stats and never reads a reply
NEVER_READS = _PRELUDE + """
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.settimeout(5)
sent = 0
try:
    for rid in range(1, 20001):
        s.sendall(frame(rid, {"op": "open", "path": "pub/shared", "flags": 0}
                        if rid % 2 else {"op": "stats"}))
        sent += 1
except (socket.timeout, OSError):
    pass
print("sent", sent, flush=True)
sys.stdin.readline()
"""

#: a program of a hostile uid through the mount (`--fuse-attack`): stat + 4 KiB pread of
#: the shared file, without pause
FUSE_FLOOD = """
import os, sys
p = sys.argv[1]
fd = os.open(p, os.O_RDONLY)
print("flooding", flush=True)
while True:
    os.stat(p)
    os.pread(fd, 4096, 0)
"""

#: connections made and dropped without end (or `rounds` of them), cut mid-request
CHURN = _PRELUDE + """
seed, rounds = int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
reqs = [{"op": "hello"}, {"op": "attach", "size": 1 << 20},
        {"op": "open", "path": "pub/shared", "flags": 2},
        {"op": "open", "path": f"pub/churn-{seed}", "flags": 2 | 64},
        {"op": "mint", "slot": 1, "rights": 1},
        {"op": "layout_get", "slot": 2, "offset": 0, "length": 1 << 20},
        {"op": "write", "slot": 2, "offset": 0, "length": 8192, "buf": 0},
        {"op": "stats"}, {"op": "principal_ls"}]
print("churning", flush=True)
n = 0
while rounds < 0 or n < rounds:
    n += 1
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        time.sleep(0.01)
        continue
    data = b"".join(frame(i + 1, r) for i, r in enumerate(rnd.sample(reqs, rnd.randint(1, 9))))
    cut = rnd.randint(0, len(data))
    try:
        s.sendall(data[:cut])
        if rnd.random() < 0.5:
            s.settimeout(0.05)
            try:
                s.recv(rnd.randint(1, 5000))
            except OSError:
                pass
    except OSError:
        pass
    if rnd.random() < 0.3:   # reset instead of a clean close
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
print("done", flush=True)
"""

#: silent connections, as many as the bank takes (the rest are refused at once)
HOARD = _PRELUDE + """
n = int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        continue
    socks.append(s)
print("connected", len(socks), flush=True)
sys.stdin.readline()
"""

#: 64 MiB shared buffers, as many as the bank takes
SHM = """
import sys
from kernelshim.client import Client
held = []
for i in range(16):
    try:
        held.append(Client.connect(sys.argv[1], shm_size=64 << 20))
    except Exception:
        pass
print("attached", len(held), flush=True)
sys.stdin.readline()
"""


#: the cgroup v1 cpu controller's hierarchy (`--uid-slices`)
CPU_CGROUP = Path("/sys/fs/cgroup/cpu")


class UidSlices:
    """`--uid-slices`: a cpu cgroup of its own (default cpu.shares) for the victim (this
    process, moved in after the daemon started: the daemon stays where it was) and for
    each hostile uid (its processes are put in at their start, before they exec), as
    systemd's user-UID.slice does on a multi-user host, so that one uid's 14 processes
    take no more of the CPUs from another uid than one. Made under CPU_CGROUP, removed
    by `close` (this process moved back first)."""

    def __init__(self, uids: tuple[int, ...] | None = None) -> None:
        uids = HOSTILE if uids is None else uids
        tag = f"sluice-hostile-{os.getpid()}"
        self.home = CPU_CGROUP / self._own_cpu_cgroup().lstrip("/")
        self.dirs: dict[str, Path] = {}
        try:
            for key in ("victim", *(f"uid{u}" for u in uids)):
                d = CPU_CGROUP / f"{tag}-{key}"
                d.mkdir()
                self.dirs[key] = d
            (self.dirs["victim"] / "cgroup.procs").write_text(str(os.getpid()))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _own_cpu_cgroup() -> str:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(","):
                return path
        raise RuntimeError("no cgroup v1 cpu controller (/proc/self/cgroup)")

    def enter(self, uid: int) -> Callable[[], None]:
        """A preexec_fn putting the child in `uid`'s slice (as root, before setpriv)."""
        procs = str(self.dirs[f"uid{uid}"] / "cgroup.procs")

        def go() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        return go

    def close(self) -> None:
        with contextlib.suppress(OSError):
            (self.home / "cgroup.procs").write_text(str(os.getpid()))
        for d in self.dirs.values():
            for _ in range(50):  # (a killed attacker leaves its cgroup as it is reaped)
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        with contextlib.suppress(OSError):
                            (self.home / "cgroup.procs").write_text(pid)
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                log(f"could not remove {d}")
        self.dirs.clear()


#: seconds the victim waits after each request pair (`--victim-gap`: a tenant with
#: think time between its requests; 0: back to back, a closed loop)
VICTIM_GAP = 0.0
#: the victim spins through its gap instead of sleeping (--victim-spin)
VICTIM_SPIN = False
#: the victim is a program through the mount, not a direct client (--victim-fuse)
VICTIM_FUSE = False
#: what the printed tables say of the victim
VICTIM_HOW = ", a direct client"
#: the two hostile uids (`--uids`; default: two uids no account of the host has)
HOSTILE: tuple[int, ...] = (61000, 61001)
#: the attack is this many programs through the mount (FUSE_FLOOD), the hostile uids'
#: in turn, instead of the control-socket attackers (`--fuse-attack N`; 0: those)
FUSE_ATTACK = 0
#: what the printed tables say of the attack
ATTACK_HOW = " on the control socket"
#: whether the victim asked for a slice of its own (`--slice-victim`), which the
#: attackers it starts must not inherit
VICTIM_SLICE = False
#: the slices in force (`--uid-slices`), for `start`
SLICES: UidSlices | None = None
#: `--pin`: the CPUs of the daemon's loop thread, the victim and the attackers (None: as
#: the OS places them)
PIN: tuple[int, int, int | None] | None = None


def set_slice(tid: int, ns: int) -> None:
    """Ask the kernel's scheduler for slices of `ns` nanoseconds for thread `tid`
    (sched_setattr with SCHED_OTHER and sched_runtime: EEVDF's custom slice, Linux
    6.12+; the kernel clamps it to 0.1-100 ms)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(struct.pack("=IIQiIQQQII", 56, 0, 0, 0, 0, ns,
                                                   0, 0, 0, 0))
    if libc.syscall(314, tid, attr, 0) != 0:  # SYS_sched_setattr, x86_64
        err = ctypes.get_errno()
        raise OSError(err, f"sched_setattr({tid}): {os.strerror(err)}")


def _attacker_preexec(uid: int) -> Callable[[], None] | None:
    """What an attacker process does before its exec: enter its uid's cgroup
    (`--uid-slices`); with `--pin`, leave the victim's CPU (which it would inherit from
    this process) for its own, or every CPU."""
    slice_in = SLICES.enter(uid) if SLICES is not None else None
    if VICTIM_SLICE:
        # (a forked process keeps its parent's slice: the attackers take the default)
        inner = slice_in

        def slice_in() -> None:
            set_slice(0, 0)
            if inner is not None:
                inner()
    if PIN is None:
        return slice_in
    cpus = [PIN[2]] if PIN[2] is not None else list(range(os.cpu_count() or 1))

    def go() -> None:
        if slice_in is not None:
            slice_in()
        os.sched_setaffinity(0, cpus)
    return go


def start(uid: int, code: str, *args: str) -> subprocess.Popen:
    """`code` as `uid` (setpriv), line-buffered pipes; its first line says it is under way.
    With `--uid-slices`, in that uid's cpu cgroup from before its exec."""
    return subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                             "--", USER_PY, "-c", textwrap.dedent(code), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, cwd=REPO,
                            env=USER_ENV,
                            preexec_fn=_attacker_preexec(uid))


def reap(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    with p:
        pass


def percentiles(xs: list[float]) -> dict[str, float]:
    """p50, p99 and max of `xs`, in milliseconds."""
    s = sorted(xs)
    at = lambda q: s[min(len(s) - 1, int(len(s) * q))]  # noqa: E731
    return {"n": len(s), "p50": at(0.5) * 1e3, "p99": at(0.99) * 1e3, "max": s[-1] * 1e3}


def machine_jitter(seconds: float = 0.5) -> dict[str, float]:
    """What the machine took from a busy thread, per CPU: a loop reading the clock for
    `seconds` on each CPU in turn, nothing else of this benchmark running, counts the
    gaps over 0.1 ms (an interrupt, another task, or — with no task here to take the
    CPU — the host running something else on this vCPU) and their total. A quiet
    machine has a few and a fraction of a millisecond a second; a host busy elsewhere
    takes milliseconds, which land in the victim's p99 whether attacked or not, and
    then the ratio says little (docs/BENCHMARKS.md, "Stop 20")."""
    out: dict[str, float] = {}
    before = os.sched_getaffinity(0)
    try:
        for cpu in range(os.cpu_count() or 1):
            os.sched_setaffinity(0, {cpu})
            t = time.perf_counter()
            end = t + seconds
            n = 0
            lost = worst = 0.0
            while t < end:
                u = time.perf_counter()
                g = u - t
                if g > 1e-4:
                    n += 1
                    lost += g
                    if g > worst:
                        worst = g
                t = u
            out[f"cpu{cpu}_gaps_per_s"] = n / seconds
            out[f"cpu{cpu}_lost_ms_per_s"] = lost / seconds * 1e3
            out[f"cpu{cpu}_worst_ms"] = worst * 1e3
    finally:
        os.sched_setaffinity(0, before)
    return out


def jitter_line(j: dict[str, float]) -> str:
    cpus = sorted({k.split("_")[0] for k in j})
    return ", ".join(f"{c} {j[c + '_gaps_per_s']:.0f} gaps/s over 0.1 ms, "
                     f"{j[c + '_lost_ms_per_s']:.1f} ms/s lost, worst {j[c + '_worst_ms']:.2f} ms"
                     for c in cpus)


def own_run_delay() -> float:
    """Seconds this thread has waited on a run queue (runnable, not running)."""
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def think() -> None:
    """The victim's gap after a request pair (`--victim-gap`), spun or slept
    (`--victim-spin`); nothing without a gap."""
    if VICTIM_GAP:
        if VICTIM_SPIN:
            end = time.perf_counter() + VICTIM_GAP
            while time.perf_counter() < end:
                pass
        else:
            time.sleep(VICTIM_GAP)


def victim(mnt: Path, n: int, waits: list[float] | None = None,
           stamps: list[tuple[float, ...]] | None = None,
           windows: list[tuple[float, float]] | None = None) -> list[float]:
    """Seconds of each of `n` small requests (a stat, then a 4 KiB pread), one at a time,
    by a root direct client; appends to `waits` the seconds this process waited for a
    CPU during them. With `stamps` (--loop-trace, both phases alike): per pair the
    wall clock before the stat, between the two and after the pread, and this thread's
    wait for a CPU (schedstat) read before and after the pair — outside the timed
    interval, so the latency measured is the same as without. With `windows`: per pair
    its start and end (perf_counter), to place the daemon's collections (--gc-log)."""
    if VICTIM_FUSE:
        return fuse_victim(mnt, n, waits)
    out = []
    with Client.connect(mnt, shm_size=1 << 16) as c:
        with c.open("pub/shared") as f:
            for _ in range(5):  # warm
                f.stat()
                f.pread(4096, 0)
            w0 = own_run_delay()
            for _ in range(n):
                r0 = own_run_delay() if stamps is not None else 0.0
                t = time.perf_counter()
                f.stat()
                tm = time.perf_counter()
                f.pread(4096, 0)
                t2 = time.perf_counter()
                out.append(t2 - t)
                if windows is not None:
                    windows.append((t, t2))
                if stamps is not None:
                    stamps.append((t, tm, t2, own_run_delay() - r0))
                think()
            if waits is not None:
                waits.append(own_run_delay() - w0)
    return out


def fuse_victim(mnt: Path, n: int, waits: list[float] | None = None) -> list[float]:
    """`victim` through the mount (`--victim-fuse`): a program's `stat` of the file's
    path, then a 4 KiB `pread` of it (the bench mount's `--cache-mode direct`: each
    goes to the daemon, as far as the kernel's attribute cache lets the stat)."""
    out = []
    path = mnt / "pub" / "shared"
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(5):  # warm
            os.stat(path)
            os.pread(fd, 4096, 0)
        w0 = own_run_delay()
        for _ in range(n):
            t = time.perf_counter()
            os.stat(path)
            os.pread(fd, 4096, 0)
            out.append(time.perf_counter() - t)
            think()
        if waits is not None:
            waits.append(own_run_delay() - w0)
    finally:
        os.close(fd)
    return out


def daemon_service(mnt: Path) -> dict[str, Any]:
    """The daemon's own histograms of each principal's shim requests (service time)
    since the last call, which resets them."""
    with Client.connect(mnt, shm_size=0) as c:
        try:
            r = c.call("shim_stats", reset=True)
        except Exception as exc:  # noqa: BLE001 - a daemon before shim_stats (a baseline)
            log(f"no shim_stats: {exc}")
            return {}
    return {**r["per_principal"], "(event loop batches)": r["loop"]}


def renice(pid: int, nice: int) -> None:
    """Every thread of process `pid` at `nice` (Linux: nice is per thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def set_daemon_nice(pid: int, nice: int) -> None:
    """What `sluice mount --nice N` does (fs/mount.py, apply_priority), to the running
    daemon `pid`: every thread, and its autogroup (it leads its own session)."""
    renice(pid, nice)
    with open(f"/proc/{pid}/autogroup", "w") as f:
        f.write(str(nice))


def ab_phase(mnt: Path, pid: int, n: int, nices: list[int],
             block: int = 50) -> dict[int, dict[str, Any]]:
    """`n` victim request pairs for each nice value of the daemon in `nices`, in
    alternating blocks of `block` (the order of the values turning round each block, so
    that load drifting during the phase falls on all alike): per value, the pairs'
    latencies, the daemon main thread's seconds waiting for a CPU and on a CPU, and the
    victim's own seconds waiting for a CPU in each block."""
    out: dict[int, dict[str, Any]] = {k: {"lat": [], "wait": 0.0, "cpu": 0.0, "wall": 0.0,
                                          "victim_wait": []} for k in nices}
    for b in range(max(1, n // block)):
        order = nices[b % len(nices):] + nices[:b % len(nices)]
        for k in order:
            set_daemon_nice(pid, k)
            rd0, cpu0, t0 = run_delay(pid), cpu_time(pid), time.perf_counter()
            out[k]["lat"] += victim(mnt, block, out[k]["victim_wait"])
            o = out[k]
            o["wall"] += time.perf_counter() - t0
            o["wait"] += run_delay(pid) - rd0
            o["cpu"] += cpu_time(pid) - cpu0
    return out


#: seconds after the attackers are stopped (the daemon finishes what they sent and
#: principals stop competing: CONTENDED_SECONDS is 0.05) or started again, before an
#: epoch's victim requests (`--epochs`)
EPOCH_SETTLE = 0.2


#: fewest request pairs an epoch may have: its p99 is then at worst the 2nd largest
#: (review of victim5, V1: 100 pairs an epoch made each epoch's "p99" its maximum)
MIN_EPOCH_PAIRS = 200


def nearest_rank(s: list[float], q: float) -> float:
    """The `q` quantile of the sorted `s` by nearest rank: the ceil(q*n)-th value."""
    return s[min(len(s), max(1, math.ceil(q * len(s) - 1e-9))) - 1]


def pct3(xs: list[float]) -> dict[str, float]:
    """p50, p99, p99.9 and max of `xs` (seconds), in milliseconds (nearest rank: of 300
    pairs the p99 is the 297th, the 4th largest; the branch's int(n*q) index took the
    next one up, and of 100 pairs the largest)."""
    s = sorted(xs)
    at = lambda q: nearest_rank(s, q) * 1e3  # noqa: E731
    return {"n": len(s), "p50": at(0.5), "p99": at(0.99), "p999": at(0.999),
            "max": s[-1] * 1e3}


def attackers_served(svc: dict[str, Any]) -> int:
    """Requests the daemon served the hostile uids (its per-principal histograms)."""
    return sum(h["n"] for who, h in svc.items() if who.startswith("uid-"))


def epochs_run(mnt: Path, pid: int, n: int, epochs: int, floods: int,
               attack_mnt: Path | None = None) -> dict[str, Any]:
    """The victim's `n` request pairs quiet and `n` attacked, in `epochs` alternating
    epochs of each (n // epochs pairs an epoch), in one mount and one attack: the
    attackers are started once, and stopped (SIGSTOP: their connections open and idle,
    their processes off the CPUs) for each quiet epoch and let go (SIGCONT) for each
    attacked one; the order within an epoch turns round every epoch (quiet first, then
    attacked first), so that the machine's load as it drifts falls on both conditions
    alike. Before the attack, one epoch with no attacker at all (`pristine`): the
    reference the single-shot mode used, to compare with the stopped-attackers quiet.
    Per condition: the pairs pooled, and per epoch its p50/p99, the load average, the
    victim's wait for a CPU and, attacked, the hostile uids' requests served a second.
    With `attack_mnt` (`--floor`) the attackers attack that volume's daemon instead
    (their requests served a second are counted there), the victim's daemon does none
    of their work."""
    target = attack_mnt if attack_mnt is not None else mnt
    per = max(1, n // epochs)
    out: dict[str, Any] = {"epochs": epochs, "per_epoch": per,
                           "quiet": [], "attacked": [], "load": []}
    lat: dict[str, list[float]] = {"quiet": [], "attacked": []}
    vw: list[float] = []
    out["pristine"] = pct3(victim(mnt, per, vw))
    with Attack(target, floods=floods, churn_rounds=-1) as attack:
        # (where each attacker's CPU time is shared: its cpu cgroup, `--uid-slices`)
        out["attacker_cgroups"] = sorted({cpu_cgroup(p.pid) for p in attack.procs})
        out["victim_cgroup"] = cpu_cgroup(os.getpid())
        time.sleep(1.0)  # let the churn and the floods get going
        for e in range(epochs):
            order = ("quiet", "attacked") if e % 2 == 0 else ("attacked", "quiet")
            for cond in order:
                if cond == "quiet":
                    attack.pause()
                else:
                    attack.resume()
                time.sleep(EPOCH_SETTLE)
                spun0 = idle_spun(daemon_service(mnt))  # (resets the daemon's histograms)
                if attack_mnt is not None:
                    daemon_service(attack_mnt)
                rd0, cpu0 = run_delay(pid), cpu_time(pid)
                t0 = time.perf_counter()
                w: list[float] = []
                xs = victim(mnt, per, w)
                t1 = time.perf_counter()
                rd1, cpu1 = run_delay(pid), cpu_time(pid)
                svc = daemon_service(mnt)
                spun1 = idle_spun(svc)
                spun = spun1 - spun0 if spun0 is not None and spun1 is not None else None
                own_hostile = attackers_served(svc)  # (--floor: none)
                if attack_mnt is not None:  # (the hostile uids were served there)
                    svc = {**daemon_service(attack_mnt), "(event loop batches)":
                           svc.get("(event loop batches)", {})}
                lat[cond] += xs
                row = {"epoch": e, **pct3(xs), "seconds": t1 - t0,
                       "victim_cpu_wait_ms": w[0] / per * 1e3,
                       "daemon_cpu": (cpu1 - cpu0) / (t1 - t0),
                       "daemon_wait_cpu": (rd1 - rd0) / (t1 - t0), "load": loadavg(),
                       "mean": sum(xs) / len(xs) * 1e3,
                       # a pair's cycle (the pair and the victim's gap after it), and
                       # the daemon loop thread's CPU time per pair other than polling
                       # for a next request (its idle poll: on a CPU, serving nothing)
                       "cycle_ms": (t1 - t0) / per * 1e3,
                       "loop_ms": ((cpu1 - cpu0) - (spun or 0.0)) / per * 1e3,
                       "polling_left_out": spun is not None}
                loop = svc.get("(event loop batches)", {})
                row["held"] = loop.get("held", 0)  # (the daemon's holds: FairTurns.hold)
                # (quiet too: what the daemon still served the stopped attackers — the
                # floods' requests already in their sockets — during the quiet pairs)
                row["attackers_req_s"] = attackers_served(svc) / (t1 - t0)
                # (the hostile uids' requests the victim's own daemon served: with
                # --floor, 0 — it does none of their work)
                row["victim_daemon_attackers_req_s"] = own_hostile / (t1 - t0)
                out[cond].append(row)
            out["load"].append(loadavg())
        attack.resume()
        out["attackers"] = sum(p.poll() is None for p in attack.procs)
        out["attackers_started"] = len(attack.procs)
    for cond in ("quiet", "attacked"):
        out[cond + "_pooled"] = pct3(lat[cond])
    q, a = out["quiet_pooled"], out["attacked_pooled"]
    out["ratio"] = {k: a[k] / q[k] for k in ("p50", "p99", "p999")}
    # Each attacked epoch over the quiet epoch of the same pair (the next to it): a
    # burst of the machine's own falls in one of ten, and the median leaves it out.
    per = sorted(y["p99"] / x["p99"] for x, y in zip(out["quiet"], out["attacked"]))
    out["ratio"]["p99_epoch_median"] = per[len(per) // 2]
    # (--floor: the victim's daemon serves the victim alone)
    out["fair_share"] = fair_share_bound(out["quiet"], out["attacked"],
                                         1 + len(HOSTILE) if attack_mnt is None else 1)
    return out


def idle_spun(svc: dict[str, Any]) -> float | None:
    """Seconds the daemon's loop has spent polling for a next request (`shim_stats`'
    `idle_spun_ms`); None from a daemon that does not say (an older tree)."""
    v = svc.get("(event loop batches)", {}).get("idle_spun_ms")
    return None if v is None else float(v) / 1e3


def _median(xs: list[float]) -> float:
    v = sorted(xs)
    return v[len(v) // 2]


def fair_share_bound(quiet: list[dict[str, Any]], attacked: list[dict[str, Any]],
                     k: int) -> dict[str, Any]:
    """What fair shares of the daemon's loop allow the victim, from its quiet epochs.

    Quiet, a victim pair costs the loop thread `loop_ms` of CPU (its polling for a next
    request left out, where the daemon says how long that was) and one pair comes every
    `cycle_ms` (the pair and the victim's gap): the victim wants f = loop_ms / cycle_ms
    of the loop. Attacked, `k` principals have work: the victim and each hostile uid,
    whose floods never run dry. Two figures of fair sharing:

    - `bound`, max(1, k f): no scheduler that holds the victim to its fair share over
      time (1/k of the loop while all k have work) can give it a pair more often than
      once every k * loop_ms on average, so its mean cycle cannot be shorter than k f
      times the quiet one, short of giving the hostile uids less than their shares. A
      floor: a scheduler may reach it only by serving the victim first whenever it is
      below its share.
    - `processor_sharing`, 1 + (k - 1) f: each principal served at 1/k of the loop
      whenever it has work (the fluid ideal of fair queueing), the victim's share of a
      pair taking k times as long and the rest of its cycle as long as quiet.

    Both against the measured ratio of the mean cycles (medians of the epochs)."""
    loop = _median([x["loop_ms"] for x in quiet])
    cycle = _median([x["cycle_ms"] for x in quiet])
    f = loop / cycle if cycle else 0.0
    return {"k": k, "loop_ms": loop, "cycle_ms": cycle, "demand": f,
            "polling_left_out": all(x.get("polling_left_out", False) for x in quiet),
            "bound": max(1.0, k * f), "processor_sharing": 1 + (k - 1) * f,
            "cycle_ratio": _median([x["cycle_ms"] for x in attacked]) / cycle if cycle else 0.0}


def print_epochs(r: dict[str, Any], load_start: str, *, floor: bool = False) -> None:
    """`--epochs`' table: each condition pooled, the ratio, and the spread per epoch."""
    if floor:
        print("FLOOR (--floor): the attackers attack a second, separate sluice daemon; "
              "the victim's daemon does none of their work")
    if PIN is not None:
        print(f"pinned (--pin): the daemon's loop thread on CPU {PIN[0]}, the victim on CPU "
              f"{PIN[1]}, the attackers on "
              f"{'CPU %d' % PIN[2] if PIN[2] is not None else 'any CPU'}")
    print(f"victim: root{', uid slices' if SLICES is not None else ''}{VICTIM_HOW}, {r['per_epoch']} request pairs (stat + 4 KiB pread) per epoch, "
          f"{r['epochs']} quiet and {r['epochs']} attacked epochs alternated (attackers "
          f"stopped with SIGSTOP in the quiet ones); attackers: uids {HOSTILE[0]} and {HOSTILE[1]}, "
          f"{r['attackers']} processes{ATTACK_HOW}; load {load_start} -> {r['load'][-1]}")
    print(f"{'':34} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>8} {'max ms':>8}")
    for label, key in (("quiet (pooled)", "quiet_pooled"),
                       ("attacked (pooled)", "attacked_pooled"),
                       ("pristine (before any attacker)", "pristine")):
        x = r[key]
        print(f"{label:34} {x['p50']:8.3f} {x['p99']:8.3f} {x['p999']:8.3f} {x['max']:8.3f}")
    ra = r["ratio"]
    print(f"{'ratio attacked/quiet':34} {ra['p50']:8.2f} {ra['p99']:8.2f} {ra['p999']:8.2f}")
    print(f"{'  p99 ratio, median of the epochs':34} {'':8} {ra['p99_epoch_median']:8.2f}")
    fs = r.get("fair_share")
    if fs and fs["cycle_ms"]:
        how = ("its polling for a next request left out" if fs["polling_left_out"] else
               "its polling included: this daemon does not say how long it polled")
        print(f"  the victim's demand, quiet: {fs['loop_ms']:.3f} ms of the daemon loop's CPU a "
              f"pair ({how}), a pair every {fs['cycle_ms']:.3f} ms: {fs['demand']:.0%} of "
              f"the loop; with {fs['k']} principals with work, a fair share is "
              f"{1 / fs['k']:.0%}")
        print(f"  mean cycle ratio: least fair shares allow {fs['bound']:.2f}"
              + (" (it wants more than its share)" if fs["bound"] > 1 else
                 " (its demand fits its share)")
              + f", processor sharing {fs['processor_sharing']:.2f}; "
              f"measured {fs['cycle_ratio']:.2f}")
    for cond in ("quiet", "attacked"):
        rows = r[cond]

        def span(k: str, rows: list[dict[str, Any]] = rows) -> str:
            v = sorted(x[k] for x in rows)
            return f"{v[len(v) // 2]:.3f} ({v[0]:.3f}-{v[-1]:.3f})"
        v = sorted(x["attackers_req_s"] for x in rows)
        extra = f"; hostile uids served {v[len(v) // 2]:,.0f} ({v[0]:,.0f}-{v[-1]:,.0f}) req/s"
        print(f"  per {cond} epoch, median (range): p50 {span('p50')}, p99 {span('p99')} ms; "
              f"victim's CPU wait {span('victim_cpu_wait_ms')} ms a pair{extra}")
    print("  load average at each epoch's end: " + ", ".join(x.split()[0] for x in r["load"]))
    print(f"  cpu cgroups: victim {r['victim_cgroup']}, attackers "
          + ", ".join(r["attacker_cgroups"]))


def cpu_cgroup(pid: int) -> str:
    """The cpu cgroup (v1) of process `pid` ("?" where not known)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(","):
                return path
    return "?"


def run_delay(pid: int) -> float:
    """Seconds the daemon's main thread has waited on a run queue (schedstat field 2)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def cpu_time(pid: int) -> float:
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


class Attack:
    """The attackers, started and stopped together."""

    def __init__(self, mnt: Path, *, floods: int, churn_rounds: int) -> None:
        self.mnt = mnt
        self.floods = floods
        self.churn_rounds = churn_rounds
        self.procs: list[subprocess.Popen] = []
        self.churn: list[subprocess.Popen] = []

    def __enter__(self) -> "Attack":
        cp = os.getxattr(self.mnt, CONTROL_XATTR).decode()
        try:
            self._go(cp)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _go(self, cp: str) -> None:
        hostile = HOSTILE
        if FUSE_ATTACK:
            self.procs += [start(hostile[i % 2], FUSE_FLOOD, str(self.mnt / "pub" / "shared"))
                           for i in range(FUSE_ATTACK)]
            for p in self.procs:
                if not p.stdout.readline():  # type: ignore[union-attr]
                    raise RuntimeError(f"an attacker failed: {p.stderr.read()}")  # type: ignore[union-attr]
            return
        first = []
        for i in range(2):
            first.append(start(hostile[i], NEVER_READS, cp))
        first.append(start(hostile[1], SHM, str(self.mnt)))
        for i in range(self.floods):
            first.append(start(hostile[i % 2], FLOOD, cp))
        self.procs += first
        for p in first:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"an attacker failed: {p.stderr.read()}")  # type: ignore[union-attr]
        for seed in range(5):
            self.churn.append(start(hostile[seed % 2], CHURN, cp, str(seed),
                                    str(self.churn_rounds)))
        for uid in hostile:
            self.procs.append(start(uid, HOARD, cp, "300"))
        for p in self.churn + self.procs[-2:]:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"an attacker failed: {p.stderr.read()}")  # type: ignore[union-attr]
        self.procs += self.churn

    def pause(self) -> None:
        """Stop every attacker process (SIGSTOP) where it is: their connections stay
        open and idle, their processes take no CPU (`--epochs`' quiet epochs)."""
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGSTOP)

    def resume(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            reap(p)


def py_spy_top(path: str, pid: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([path, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", "200", "--idle", "--format", "raw", "--output",
                             "/tmp/bench_hostile.pyspy.txt", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_py_spy(fname: str, top: int = 25) -> list[tuple[str, float]]:
    """Share of the event loop thread's samples (idle included: waiting for I/O shows
    as `EpollIOManager.get_events`) whose stack includes each function, the largest."""
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(fname) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if "unrolled_run" not in stack:  # a worker thread
                continue
            n = int(count)
            total += n
            seen = set()
            for fr in stack.split(";"):
                name = fr.split(" (")[0]
                if name not in seen:
                    seen.add(name)
                    incl[name] += n
    return [(k, v / total) for k, v in incl.most_common(top)]


def loop_trace_summary(fname: str) -> dict[str, Any]:
    """CPU time of the daemon's loop steps (by task and principal) and operations while
    the victim runs under attack (from its first step after the first attacker's to its
    last), from a --loop-trace log."""
    rows = [r for r in _trace_rows(fname) if r[1] not in ("IO", "SEND")]
    conn = [i for i, r in enumerate(rows) if r[1] == "shim-connection"]
    first_att = next(i for i in conn if rows[i][2].startswith("uid-"))
    victim_steps = [i for i in conn if i > first_att and rows[i][2] == "root"]
    window = rows[victim_steps[0]:victim_steps[-1] + 1]
    steps: dict[str, list[float]] = collections.defaultdict(list)
    ops: dict[str, list[float]] = collections.defaultdict(list)
    for _b, name, who, cpu, *_wall in window:
        if name == "OP":
            ops[who].append(float(cpu))
        elif name == "GC":  # inside some step: its CPU is that step's too
            ops[f"(gc, generation {who})"].append(float(cpu))
        else:
            kind = ("connection of " + who if name == "shim-connection" else
                    "accept loop" if name.endswith("run") else name)
            steps[kind].append(float(cpu))
    total = sum(sum(v) for v in steps.values())

    def pct(v: list[float]) -> dict[str, float]:
        v = sorted(v)
        return {"n": len(v), "p50_ms": v[len(v) // 2] * 1e3,
                "p99_ms": v[min(len(v) - 1, int(len(v) * 0.99))] * 1e3,
                "share": sum(v) / total if total else 0.0}

    long = sum(c for v in steps.values() for c in v if c > 0.25e-3)
    return {"steps": {k: pct(v) for k, v in steps.items()},
            "ops": {k: pct(v) for k, v in ops.items()},
            "cpu_ms": total * 1e3, "share_in_steps_over_0.25ms": long / total if total else 0.0}


def _trace_rows(fname: str) -> list[list[str]]:
    return [line.rstrip("\n").split("\t") for line in open(fname)]


#: the parts of a victim request pair (decompose), in the order they happen
PARTS = (("in_progress", "loop busy from the call to its next poll (batch in progress)"),
         ("more_batches", "further batches before the poll that picked it up"),
         ("poll", "the poll that picked it up (epoll; the wake-up if idle)"),
         ("before_step", "other tasks' steps of that batch before the victim's"),
         ("caught", "picked up without a poll by the victim's step still running"),
         ("serve", "the victim's step: start (or its op, if caught) -> reply sent"),
         ("to_client", "reply sent -> the client has it (its wake-up, recv, decode)"))


def decompose(fname: str, phases: dict[str, list[tuple[float, ...]]],
              pairs_out: dict[str, list[dict[str, float]]] | None = None) -> dict[str, Any]:
    """Split each victim request end to end against the daemon's loop trace (the same
    clock, CLOCK_MONOTONIC): the call -> the loop's poll that picked its socket up (how
    long the batch in progress still ran, how many batches passed) -> other tasks'
    steps before the victim's in that batch -> the victim's step up to its reply sent
    -> the client having it. The victim's requests are matched to root's `stat` and
    `data` operations by order (the daemon's wall times after a send are often late:
    the woken client takes its CPU). Per phase: the mean per request pair over all
    pairs and over the slowest 1% (the p99 tail), with the batches passed, the steps
    run before the victim's, the daemon thread's time off a CPU in those steps (wall
    minus CPU) and the victim thread's own wait for a CPU (schedstat). With
    `pairs_out`, each phase's pairs, split, slowest last (scripts/looptrace/bands.py)."""
    import bisect
    rows = _trace_rows(fname)
    io = sorted((float(r[4]), float(r[5])) for r in rows if r[1] == "IO")
    io0 = [w0 for w0, _ in io]
    io1 = [w1 for _, w1 in io]
    steps = sorted((float(r[4]), float(r[5]), float(r[3]), r[2], r[1]) for r in rows
                   if r[1] not in ("IO", "OP", "SEND", "GC") and len(r) > 5)
    st0 = [x[0] for x in steps]
    root = [x for x in steps if x[4] == "shim-connection" and x[3] == "root"]
    root0 = [x[0] for x in root]
    ops = sorted((float(r[4]), float(r[5])) for r in rows
                 if r[1] == "OP" and len(r) > 6 and r[6] == "root" and r[2] in ("stat", "data"))
    sends = sorted(float(r[4]) for r in rows if r[1] == "SEND")

    def one(a: float, b: float, op: tuple[float, float],
            prev: tuple[float, float] | None) -> dict[str, float]:
        step = root[bisect.bisect_right(root0, op[0]) - 1]
        j = bisect.bisect_left(sends, op[0])
        reply = min(sends[j] if j < len(sends) else b, b)
        d = dict.fromkeys(("in_progress", "more_batches", "poll", "before_step", "caught",
                           "batches", "steps_before", "daemon_off_cpu", "daemon_cpu"), 0.0)
        d["to_client"] = b - reply
        if prev is not None and prev[0] >= step[0] or step[0] < a:
            # The victim's step that answered the previous request read this one too
            # (no poll in between): the daemon's time from the call to the op.
            d["caught"] = max(0.0, op[0] - a)
            d["serve"] = reply - max(op[0], a)
            return d
        d["serve"] = reply - step[0]
        p = bisect.bisect_right(io1, step[0]) - 1  # the poll before the victim's step
        k = bisect.bisect_right(io0, a) - 1        # the last poll begun before the call
        in_poll = k >= 0 and a < io1[k]
        nxt = k if in_poll else k + 1              # the first poll the request could meet
        if p < nxt or nxt >= len(io0):
            d["poll"] = max(0.0, io1[p] - a)
        else:
            d["in_progress"] = max(0.0, io0[nxt] - a)
            d["more_batches"] = max(0.0, io0[p] - io0[nxt])
            d["poll"] = io1[p] - max(io0[p], a)
            d["batches"] = float(p - nxt + (0 if in_poll else 1))
        d["before_step"] = step[0] - io1[p]
        lo, hi = bisect.bisect_left(st0, a), bisect.bisect_left(st0, step[0])
        d["steps_before"] = float(sum(1 for x in steps[lo:hi] if x[0] >= io1[p]))
        d["daemon_off_cpu"] = max(0.0, sum(x[1] - x[0] - x[2] for x in steps[lo:hi]))
        d["daemon_cpu"] = sum(x[2] for x in steps[lo:hi])
        return d

    out: dict[str, Any] = {}
    for phase, stamps in phases.items():
        if not stamps:
            continue
        lo = bisect.bisect_left(ops, (stamps[0][0], 0.0))
        hi = bisect.bisect_right(ops, (stamps[-1][2], 0.0))
        mine = ops[lo:hi]
        pairs = []
        if len(mine) == 2 * len(stamps):
            prev = None
            for i, (t0, tm, t2, rd) in enumerate(stamps):
                x = one(t0, tm, mine[2 * i], prev)
                y = one(tm, t2, mine[2 * i + 1], mine[2 * i])
                prev = mine[2 * i + 1]
                pair = {k: x[k] + y[k] for k in x}
                pair["total"] = t2 - t0
                pair["victim_cpu_wait"] = rd
                pairs.append(pair)
        pairs.sort(key=lambda q: q["total"])
        if pairs_out is not None:
            pairs_out[phase] = pairs
        tail = pairs[int(len(pairs) * 0.99):] or pairs[-1:]

        def mean(ps: list[dict[str, float]]) -> dict[str, float]:
            return {k: sum(q[k] for q in ps) / len(ps) for k in ps[0]} if ps else {}
        cpu = sorted(q["daemon_cpu"] for q in pairs) or [0.0]
        out[phase] = {"matched": len(pairs), "of": len(stamps), "ops": len(mine),
                      "all": mean(pairs), "tail": mean(tail), "tail_n": len(tail),
                      # the daemon's CPU in others' steps that a pair waited behind: the
                      # part of its wait the daemon decides, whatever the machine's load
                      "daemon_cpu_p50": cpu[len(cpu) // 2],
                      "daemon_cpu_p99": cpu[min(len(cpu) - 1, int(len(cpu) * 0.99))]}
    return out


def print_decomposition(dec: dict[str, Any]) -> None:
    ph = list(dec)
    print("a victim request pair end to end (--loop-trace; ms, mean per pair; 'p99 tail': "
          "the slowest 1% of pairs):")
    head = "".join(f" {p + ' all':>14} {p + ' p99 tail':>16}" for p in ph)
    print(f"  {'':62}{head}")

    def row(label: str, key: str, scale: float = 1e3, fmt: str = "{:.3f}") -> None:
        cells = "".join(f" {fmt.format(dec[p]['all'].get(key, 0.0) * scale):>14} "
                        f"{fmt.format(dec[p]['tail'].get(key, 0.0) * scale):>16}" for p in ph)
        print(f"  {label:62}{cells}")
    for key, label in PARTS:
        row(label, key)
    row("= the pair, as the client measured it", "total")
    row("  batches ended between the call and the pick-up (count)", "batches", 1.0, "{:.2f}")
    row("  other tasks' steps of the pick-up batch run first (count)", "steps_before", 1.0,
        "{:.2f}")
    row("  the daemon's CPU in others' steps before the victim's", "daemon_cpu")
    row("  the daemon thread off a CPU in those steps (wall - CPU)", "daemon_off_cpu")
    row("  the victim thread waiting for a CPU (schedstat)", "victim_cpu_wait")
    print("  the daemon's CPU in others' steps a pair waited behind, p50 / p99: " + ", ".join(
        f"{p} {dec[p]['daemon_cpu_p50'] * 1e3:.3f} / {dec[p]['daemon_cpu_p99'] * 1e3:.3f} ms"
        for p in ph))
    print("  pairs matched: " + ", ".join(f"{p} {dec[p]['matched']}/{dec[p]['of']} "
                                          f"({dec[p]['ops']} ops; tail {dec[p]['tail_n']})"
                                          for p in ph))


def rss_kib(pid: int) -> int:
    """The resident set of process `pid` (VmRSS), KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def gc_summary(path: str, phases: dict[str, tuple[float, float, list[tuple[float, float]],
                                                  list[float]]]) -> dict[str, Any]:
    """What the daemon's cyclic collections (its SLUICE_GC_LOG file, fs/gcwatch.py) were
    in each phase's window (start, end, the victim pairs' windows, their latencies):
    per generation the count, the rate and the wall and CPU durations; the victim pairs
    that overlapped a collection, and the pairs' p99 with and without them."""
    rows = []  # (start, generation, wall, cpu, collected): fs/gcwatch.py's lines
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            p = line.split("\t")
            rows.append((float(p[0]), int(p[1]), float(p[2]), float(p[3]), int(p[4])))
    out: dict[str, Any] = {}
    for phase, (t0, t1, wins, lat) in phases.items():
        mine = [r for r in rows if t0 <= r[0] <= t1]
        gens: dict[str, Any] = {}
        for g in (0, 1, 2):
            rs = [r for r in mine if r[1] == g]
            if not rs:
                gens[str(g)] = {"n": 0}
                continue
            w = sorted(r[2] for r in rs)
            c = sorted(r[3] for r in rs)
            gens[str(g)] = {"n": len(rs), "per_s": len(rs) / (t1 - t0),
                            "wall_p50_ms": w[len(w) // 2] * 1e3, "wall_max_ms": w[-1] * 1e3,
                            "cpu_p50_ms": c[len(c) // 2] * 1e3, "cpu_max_ms": c[-1] * 1e3,
                            "cpu_total_ms": sum(c) * 1e3}
        starts = [r[0] for r in mine]
        ends = [r[0] + r[2] for r in mine]
        hit = []
        for (a, b), x in zip(wins, lat):
            k = bisect.bisect_left(ends, a)
            hit.append(k < len(starts) and starts[k] <= b)
        clean = [x for x, h in zip(lat, hit) if not h]
        dirty = sorted(x for x, h in zip(lat, hit) if h)
        out[phase] = {"seconds": t1 - t0, "gens": gens, "pairs": len(lat),
                      "pairs_with_gc": len(dirty),
                      "pairs_with_gc_ms": [round(x * 1e3, 3) for x in dirty],
                      "p99_all": percentiles(lat)["p99"] if lat else 0.0,
                      "p99_without_gc_pairs": percentiles(clean)["p99"] if clean else 0.0}
    return out


def print_gc(gcs: dict[str, Any]) -> None:
    print("the daemon's cyclic garbage collections (--gc-log), per phase window "
          "(the victim's requests; 'run': from the mount to the unmount):")
    for phase, o in gcs.items():
        print(f"  {phase} ({o['seconds']:.2f} s): " + "; ".join(
            f"gen {g}: {h['n']}" + (f" ({h['per_s']:.1f}/s) wall p50 {h['wall_p50_ms']:.3f} "
                                    f"max {h['wall_max_ms']:.3f} ms, CPU p50 "
                                    f"{h['cpu_p50_ms']:.3f} max {h['cpu_max_ms']:.3f} ms"
                                    if h["n"] else "")
            for g, h in o["gens"].items()))
        if not o["pairs"]:
            continue
        worst = o["pairs_with_gc_ms"][-5:]
        print(f"    victim pairs overlapping a collection: {o['pairs_with_gc']} of "
              f"{o['pairs']} (slowest: {worst} ms); p99 {o['p99_all']:.3f} ms, without "
              f"those pairs {o['p99_without_gc_pairs']:.3f} ms")


def print_ab(result: dict[str, Any], n: int) -> None:
    """The table of --ab-nice: per daemon nice value, the victim's p50/p99 quiet and
    attacked, their ratio, and the daemon main thread's wait for a CPU (schedstat)."""
    print(f"victim: root, {n} request pairs (stat + 4 KiB pread) per daemon nice value and "
          f"phase, in alternating blocks of 50; attackers: uids {HOSTILE[0]} and {HOSTILE[1]}, "
          f"{result['attackers']} processes; load {result['load_start']} -> "
          f"{result['load_attacked']}")
    print(f"{'daemon nice':>11} {'quiet p50':>9} {'quiet p99':>9} {'att. p50':>9} "
          f"{'att. p99':>9} {'p99 ratio':>9} {'daemon waits for a CPU, quiet/attacked':>40}"
          f"  {'victim waits, q/a':>17}")
    for k in result["ab_quiet"]:
        q, a = result["ab_quiet"][k], result["ab_attacked"][k]
        pq, pa = percentiles(q["lat"]), percentiles(a["lat"])
        for o, p in ((q, pq), (a, pa)):
            o["p"] = p
        waits = (f"{q['wait'] / len(q['lat']) * 1e3:.3f} / {a['wait'] / len(a['lat']) * 1e3:.3f}"
                 f" ms a pair ({q['wait'] / q['wall']:.0%} / {a['wait'] / a['wall']:.0%})")
        vw = (f"{sum(q['victim_wait']) / len(q['lat']) * 1e3:.3f} / "
              f"{sum(a['victim_wait']) / len(a['lat']) * 1e3:.3f} ms")
        print(f"{k:>11} {pq['p50']:9.3f} {pq['p99']:9.3f} {pa['p50']:9.3f} {pa['p99']:9.3f} "
              f"{pa['p99'] / pq['p99']:9.2f} {waits:>40}  {vw:>17}")
    for ph in ("ab_quiet", "ab_attacked"):
        for o in result[ph].values():
            del o["lat"]


def main() -> int:
    global SLICES, VICTIM_SLICE, VICTIM_GAP, VICTIM_SPIN, VICTIM_FUSE, VICTIM_HOW, FUSE_ATTACK, ATTACK_HOW
    global HOSTILE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=None,
                    help="the victim's request pairs per condition (default 1000; 3000 "
                         "with --epochs, so that each epoch has 300; 300 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--floods", type=int, default=4)
    ap.add_argument("--json")
    ap.add_argument("--epochs", type=int, default=None, metavar="K",
                    help="alternate K quiet and K attacked epochs of SAMPLES/K request pairs "
                         "each in one attack (the attackers stopped with SIGSTOP in the "
                         "quiet ones) and report each condition pooled, the ratio and the "
                         "spread per epoch (default 10; 0: the single-shot mode, one quiet "
                         "phase then one attacked phase, which --quick, --ab-nice, --gc-log, "
                         "--rss-seconds, --py-spy and --loop-trace use)")
    ap.add_argument("--py-spy", dest="py_spy")
    ap.add_argument("--nice", type=int, default=None,
                    help="run the daemon and the victim at this nice value (e.g. -10), in "
                         "both phases: what is left is then not the CPU the attacker "
                         "processes take")
    ap.add_argument("--ab-nice", dest="ab_nice", metavar="A,B",
                    help="compare the daemon's nice values A and B (e.g. 0,-5: without "
                         "and with `sluice mount --nice`'s default) in the same run: "
                         "each phase alternates blocks of 50 requests between them")
    ap.add_argument("--gc-log", dest="gc_log", metavar="FILE",
                    help="have the daemon log every cyclic garbage collection to FILE "
                         "(SLUICE_GC_LOG) and print, per phase, their counts and durations "
                         "per generation and the victim requests they overlapped")
    ap.add_argument("--rss-seconds", dest="rss_seconds", type=float, default=0.0,
                    metavar="S", help="after the attacked phase, keep attacking for S "
                                      "seconds and sample the daemon's RSS every second")
    ap.add_argument("--slice-daemon", dest="slice_daemon", type=float, metavar="US",
                    help="have the daemon's loop thread ask the kernel's scheduler for "
                         "slices of US µs (sched_setattr's sched_runtime; EEVDF, Linux "
                         "6.6+: a shorter slice is an earlier deadline, so its wake-ups "
                         "preempt longer-sliced tasks); 100 is the kernel's minimum")
    ap.add_argument("--victim-gap", dest="victim_gap", type=float, default=0.0,
                    metavar="MS", help="the victim waits MS ms after each request pair "
                    "(a tenant with think time; default 0: its pairs back to back, so "
                    "that it is itself a client that would take the whole daemon)")
    ap.add_argument("--victim-spin", dest="victim_spin", action="store_true",
                    help="the victim spins through its gap (--victim-gap) instead of "
                    "sleeping, so that its CPU does not go idle and wake for each pair "
                    "in either phase (with a sleep the quiet half measured wake-ups: "
                    "docs/BENCHMARKS.md, \"Stop 27\"); run the daemon with an idle poll "
                    "window longer than the gap (SLUICE_IDLE_POLL=USEC) for the same")
    ap.add_argument("--victim-fuse", dest="victim_fuse", action="store_true",
                    help="the victim is a program through the mount (a stat of the "
                    "file's path, then a 4 KiB pread: FUSE requests) instead of a direct "
                    "client; not with --loop-trace (its split matches direct requests)")
    ap.add_argument("--fuse-attack", dest="fuse_attack", type=int, default=0, metavar="N",
                    help="the hostile uids attack through the mount instead: N programs "
                    "(the uids in turn), each a stat + 4 KiB pread of the shared file "
                    "without pause (FUSE requests)")
    ap.add_argument("--slice-victim", dest="slice_victim", type=float, metavar="US",
                    help="the same for the victim (this process, every thread)")
    ap.add_argument("--uids", metavar="A,B", default=None,
                    help="the two hostile uids the attackers run as (default: the first two "
                         "from 61000 that no account has and no process runs as)")
    ap.add_argument("--uid-slices", dest="uid_slices", action="store_true",
                    help="put the victim (this process, after the daemon started) and each "
                         "hostile uid's processes in a cpu cgroup of its own (cgroup v1, "
                         "default shares, under /sys/fs/cgroup/cpu, removed at the end), as "
                         "systemd's user-UID.slice on a multi-user host; the daemon stays "
                         "where it is")
    ap.add_argument("--floor", action="store_true",
                    help="(epochs mode only) the same attackers, pointed at a second, "
                         "separate sluice daemon (its own volume and mount), while the "
                         "victim talks to the first alone, which does none of their work "
                         "(not a lower bound: two daemons then each take a CPU; see the "
                         "docstring)")
    ap.add_argument("--pin", metavar="D,V[,A]",
                    help="pin the daemon's loop thread to CPU D and the victim to CPU V "
                         "(and every attacker process to CPU A; default: any CPU), in both "
                         "conditions: the victim and the daemon then cannot be packed onto "
                         "one CPU, which this project's VMs do to two processes that wake "
                         "each other (docs/BENCHMARKS.md, \"Stop 19\")")
    ap.add_argument("--loop-trace", dest="loop_trace",
                    help="log the daemon's loop steps and operations (CPU time) to "
                         "FILE.<pid> and summarize the attacked phase")
    args = ap.parse_args()
    try:
        HOSTILE = parse_uids(args.uids, 2) if args.uids else unused_uids(2)
    except ValueError as exc:
        ap.error(f"--uids: {exc}")
    VICTIM_GAP = args.victim_gap / 1000.0
    VICTIM_SPIN = args.victim_spin
    VICTIM_FUSE = args.victim_fuse
    FUSE_ATTACK = max(0, args.fuse_attack)
    if FUSE_ATTACK:
        ATTACK_HOW = " through the mount (--fuse-attack)"
    if VICTIM_FUSE:
        VICTIM_HOW = ", a program through the mount (--victim-fuse)"
    if VICTIM_FUSE and args.loop_trace:
        print("bench_hostile.py: --victim-fuse with --loop-trace: the trace's split of the "
              "victim's requests matches direct requests only", file=sys.stderr)
        return 2
    global PIN
    if args.pin:
        try:
            cpus = [int(x) for x in args.pin.split(",")]
            if len(cpus) not in (2, 3) or not set(cpus) <= os.sched_getaffinity(0):
                raise ValueError
        except ValueError:
            print(f"bench_hostile.py: --pin {args.pin}: want D,V[,A], CPUs this process "
                  f"may run on ({sorted(os.sched_getaffinity(0))})", file=sys.stderr)
            return 2
        PIN = (cpus[0], cpus[1], cpus[2] if len(cpus) == 3 else None)
    if os.geteuid() != 0:
        print("bench_hostile.py: must run as root (the attackers are other uids)",
              file=sys.stderr)
        return 2
    single = (args.quick or args.ab_nice or args.gc_log or args.rss_seconds > 0
              or args.py_spy or args.loop_trace)
    if args.epochs is None:
        args.epochs = 0 if single else 10
    n = args.samples or (300 if args.quick else 3000 if args.epochs else 1000)
    if args.epochs and n // args.epochs < MIN_EPOCH_PAIRS:
        print(f"bench_hostile.py: {n // args.epochs} pairs an epoch: an epoch's p99 needs at "
              f"least {MIN_EPOCH_PAIRS} (--samples of at least {MIN_EPOCH_PAIRS} x --epochs)",
              file=sys.stderr)
        return 2
    elif args.epochs and single:
        print("bench_hostile.py: --epochs needs none of --quick, --ab-nice, --gc-log, "
              "--rss-seconds, --py-spy, --loop-trace (they measure one phase window)",
              file=sys.stderr)
        return 2
    if args.floor and not args.epochs:
        print("bench_hostile.py: --floor needs the epochs mode", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="sluice-hostile-", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "mnt").mkdir()
    sm = SluiceMount(base / "vol", base / "mnt", size="1G")
    # --floor: the attackers' own daemon (a second volume, mounted the same way)
    stand_in: SluiceMount | None = None
    if args.floor:
        (base / "mnt-attacked").mkdir()
        # (its idle poll off: it would spin a CPU of its own between the attackers'
        # requests at nice -5, beside the victim's daemon spinning on the other — a
        # load a normal run, one daemon, does not have; it does the attackers' work)
        stand_in = SluiceMount(base / "vol-attacked", base / "mnt-attacked", size="1G",
                               options=("--idle-poll", "0"))
    jitter = machine_jitter()
    log(f"the machine before: {jitter_line(jitter)}")
    result: dict[str, Any] = {"samples": n, "hostile_uids": list(HOSTILE),
                              "load_start": loadavg(), "jitter_before": jitter,
                              "floor": bool(args.floor), "victim_fuse": VICTIM_FUSE,
                              "fuse_attack": FUSE_ATTACK,
                              "mountpoints": [str(base / "mnt")] + (
                                  [str(stand_in.mountpoint)] if stand_in else [])}
    try:
        sm.mkfs()
        if stand_in is not None:
            stand_in.mkfs()
            stand_in.mount()
            (stand_in.mountpoint / "pub").mkdir()
            os.chmod(stand_in.mountpoint / "pub", 0o1777)
            (stand_in.mountpoint / "pub" / "shared").write_bytes(b"s" * 100_000)
            os.chmod(stand_in.mountpoint / "pub" / "shared", 0o666)
        t_mount = time.perf_counter()
        if args.gc_log:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.gc_log)
            os.environ["SLUICE_GC_LOG"] = args.gc_log
        if args.loop_trace:
            saved = {k: os.environ.get(k) for k in ("SLUICE_LOOP_TRACE", "PYTHONPATH")}
            os.environ["SLUICE_LOOP_TRACE"] = args.loop_trace
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(REPO / "scripts" / "looptrace")]
                + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
            try:
                sm.mount()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        else:
            sm.mount()
        mnt = sm.mountpoint
        assert sm.pid is not None
        if PIN is not None:
            # (the loop thread only: its thread id is the daemon's pid; the victim is
            # this process, every thread; attackers in `_attacker_preexec`)
            os.sched_setaffinity(sm.pid, {PIN[0]})
            os.sched_setaffinity(0, {PIN[1]})
            result["pin"] = {"daemon": PIN[0], "victim": PIN[1], "attackers": PIN[2]}
            log(f"pinned: the daemon's loop thread to CPU {PIN[0]}, the victim to CPU "
                f"{PIN[1]}, the attackers to "
                f"{'CPU %d' % PIN[2] if PIN[2] is not None else 'any CPU'}")
        if VICTIM_GAP:
            result["victim_gap_ms"] = args.victim_gap
            result["victim_spin"] = VICTIM_SPIN
            log(f"the victim waits {args.victim_gap} ms after each request pair"
                + (", spinning" if VICTIM_SPIN else ""))
        if args.slice_daemon:
            set_slice(sm.pid, int(args.slice_daemon * 1000))
            result["slice_daemon_us"] = args.slice_daemon
            log(f"the daemon's loop thread asks the scheduler for {args.slice_daemon} µs "
                "slices")
        if args.slice_victim:
            for tid in os.listdir("/proc/self/task"):
                set_slice(int(tid), int(args.slice_victim * 1000))
            result["slice_victim_us"] = args.slice_victim
            VICTIM_SLICE = True
            log(f"the victim asks the scheduler for {args.slice_victim} µs slices")
        if args.nice is not None:
            renice(sm.pid, args.nice)
            renice(os.getpid(), args.nice)
            result["nice"] = args.nice
        if args.uid_slices:
            SLICES = UidSlices()
            result["uid_slices"] = {k: str(d) for k, d in SLICES.dirs.items()}
            log("uid slices: " + ", ".join(str(d) for d in SLICES.dirs.values()))
        (mnt / "pub").mkdir()
        os.chmod(mnt / "pub", 0o1777)
        (mnt / "pub" / "shared").write_bytes(b"s" * 100_000)
        os.chmod(mnt / "pub" / "shared", 0o666)
        if args.ab_nice:
            nices = [int(x) for x in args.ab_nice.split(",")]
            log(f"quiet: {n} requests at each daemon nice of {nices}")
            result["ab_quiet"] = ab_phase(mnt, sm.pid, n, nices)
            with Attack(mnt, floods=args.floods, churn_rounds=-1) as attack:
                time.sleep(1.0)
                log(f"attacked: {n} requests at each daemon nice of {nices}")
                result["ab_attacked"] = ab_phase(mnt, sm.pid, n, nices)
                result["load_attacked"] = loadavg()
                result["attackers"] = sum(p.poll() is None for p in attack.procs)
            return 0
        if args.epochs:
            log(f"{args.epochs} quiet and {args.epochs} attacked epochs of "
                f"{max(1, n // args.epochs)} requests, alternated")
            result["epochs"] = epochs_run(
                mnt, sm.pid, n, args.epochs, args.floods,
                stand_in.mountpoint if stand_in is not None else None)
            return 0
        log(f"quiet: {n} requests")
        daemon_service(mnt)
        rd0, cpu0 = run_delay(sm.pid), cpu_time(sm.pid)
        t0 = time.perf_counter()
        vw: list[float] = []
        stamps: dict[str, list[tuple[float, ...]]] | None = \
            {"quiet": [], "attacked": []} if args.loop_trace else None
        win_q: list[tuple[float, float]] = []
        win_a: list[tuple[float, float]] = []
        rss = {"quiet_start": rss_kib(sm.pid)}
        quiet = victim(mnt, n, vw, stamps["quiet"] if stamps else None, win_q)
        t1 = time.perf_counter()
        rd1, cpu1 = run_delay(sm.pid), cpu_time(sm.pid)
        svc_q = daemon_service(mnt)
        with Attack(mnt, floods=args.floods, churn_rounds=-1) as attack:
            time.sleep(1.0)  # let the churn and the floods get going
            spy = py_spy_top(args.py_spy, sm.pid, 10) if args.py_spy else None
            log(f"attacked: {n} requests")
            daemon_service(mnt)
            rd2, cpu2 = run_delay(sm.pid), cpu_time(sm.pid)
            t2 = time.perf_counter()
            busy = victim(mnt, n, vw, stamps["attacked"] if stamps else None, win_a)
            t3 = time.perf_counter()
            rss["attacked_end"] = rss_kib(sm.pid)
            rd3, cpu3 = run_delay(sm.pid), cpu_time(sm.pid)
            svc_a = daemon_service(mnt)
            if spy is not None:
                spy.wait()
            if args.rss_seconds > 0:
                log(f"attacking for {args.rss_seconds:.0f} s more, sampling the daemon's RSS")
                samples = []
                end = time.monotonic() + args.rss_seconds
                while time.monotonic() < end:
                    time.sleep(1.0)
                    samples.append(rss_kib(sm.pid))
                rss["long_attack_kib"] = samples
            result["load_attacked"] = loadavg()
            result["attackers"] = sum(p.poll() is None for p in attack.procs)
            result["attackers_started"] = len(attack.procs)
        result["quiet"] = percentiles(quiet)
        result["attacked"] = percentiles(busy)
        result["rss_kib"] = rss
        result["windows"] = {"quiet": (t0, t1), "attacked": (t2, t3)}
        result["daemon_quiet"] = svc_q
        result["daemon_attacked"] = svc_a
        result["victim_cpu_wait_ms"] = [w / n * 1e3 for w in vw]
        result["wait_cpu_quiet"] = (rd1 - rd0) / (t1 - t0)
        result["wait_cpu_attacked"] = (rd3 - rd2) / (t3 - t2)
        result["daemon_cpu_quiet"] = (cpu1 - cpu0) / (t1 - t0)
        result["daemon_cpu_attacked"] = (cpu3 - cpu2) / (t3 - t2)
    finally:
        if SLICES is not None:
            SLICES.close()
        daemon_pid = sm.pid
        sm.cleanup()
        if stand_in is not None:
            stand_in.cleanup()
        t_end = time.perf_counter()
        os.environ.pop("SLUICE_GC_LOG", None)
        if not is_mounted(base / "mnt") and not is_mounted(base / "mnt-attacked"):
            shutil.rmtree(base, ignore_errors=True)
        if args.ab_nice and "ab_attacked" in result:
            print_ab(result, n)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1))
        if "epochs" in result:
            result["jitter_after"] = machine_jitter()
            print_epochs(result["epochs"], result["load_start"], floor=args.floor)
            print(f"the machine, a thread alone on each CPU: before {jitter_line(jitter)}; "
                  f"after {jitter_line(result['jitter_after'])}")
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1))
    q, a = result["quiet"], result["attacked"]
    nice = f", daemon and victim at nice {args.nice}" if args.nice is not None else ""
    print(f"victim: root{nice}{VICTIM_HOW}, {n} requests (stat + 4 KiB pread) each; attackers: uids {HOSTILE[0]} and "
          f"{HOSTILE[1]}, {result['attackers']} processes{ATTACK_HOW}; load {result['load_start']} -> "
          f"{result['load_attacked']}")
    print(f"{'':28} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(f"{'quiet':28} {q['p50']:8.3f} {q['p99']:8.3f} {q['max']:8.3f}")
    print(f"{'attacked':28} {a['p50']:8.3f} {a['p99']:8.3f} {a['max']:8.3f}")
    print(f"{'ratio attacked/quiet':28} {a['p50'] / q['p50']:8.2f} {a['p99'] / q['p99']:8.2f} "
          f"{a['max'] / q['max']:8.2f}")
    print("the daemon's own service time (request read -> reply written), per principal:")
    for label, rows in (("quiet", result["daemon_quiet"]),
                        ("attacked", result["daemon_attacked"])):
        for who, h in sorted(rows.items()):
            cpu = (f"; CPU per batch p50 {h['cpu_p50_ms']:.3f} p99 {h['cpu_p99_ms']:.3f} ms"
                   if "cpu_p50_ms" in h else "")
            cpu += f"; {h['parked']} steps parked" if "parked" in h else ""
            cpu += (f", {h['deferred']} let a poll's requests go first"
                    if "deferred" in h else "")
            cpu += (f", {h['preempted']} cut short for a request that came"
                    if "preempted" in h else "")
            cpu += (f", {h['held']} sleeps with parked steps held for a request to come"
                    if "held" in h else "")
            what = (f"{h['n']} batches, the loop thread on a CPU {h['on_cpu']:.0%} of "
                    f"their time{cpu}" if "on_cpu" in h else
                    f"{h['n']} requests, waited for a turn p99 {h['waited_p99_ms']:.3f} ms")
            print(f"  {label + ' ' + who:26} {h['p50_ms']:8.3f} {h['p99_ms']:8.3f} "
                  f"{h['max_ms']:8.3f}   {what}")
    print(f"daemon main thread: CPU {result['daemon_cpu_quiet']:.0%} quiet, "
          f"{result['daemon_cpu_attacked']:.0%} attacked; waiting for a CPU "
          f"{result['wait_cpu_quiet']:.0%} quiet, {result['wait_cpu_attacked']:.0%} attacked "
          "(of wall time)")
    vq, va = result["victim_cpu_wait_ms"]
    print(f"victim process waiting for a CPU, per request pair (mean): {vq:.3f} ms quiet, "
          f"{va:.3f} ms attacked; mean latency {sum(quiet) / n * 1e3:.3f} ms quiet, "
          f"{sum(busy) / n * 1e3:.3f} ms attacked")
    r = result["rss_kib"]
    print(f"daemon RSS: {r['quiet_start'] / 1024:.1f} MiB before the quiet phase, "
          f"{r['attacked_end'] / 1024:.1f} MiB after the attacked one" + (
              f"; over {len(r['long_attack_kib'])} s more of attack: first "
              f"{r['long_attack_kib'][0] / 1024:.1f}, max {max(r['long_attack_kib']) / 1024:.1f}"
              f", last {r['long_attack_kib'][-1] / 1024:.1f} MiB"
              if r.get("long_attack_kib") else ""))
    if args.gc_log:
        result["gc"] = gcs = gc_summary(args.gc_log, {
            "quiet": (t0, t1, win_q, quiet), "attacked": (t2, t3, win_a, busy),
            "run": (t_mount, t_end, [], [])})
        print_gc(gcs)
    if args.py_spy:
        top = summarize_py_spy("/tmp/bench_hostile.pyspy.txt")
        result["py_spy"] = top
        print("daemon's event loop under attack, py-spy (share of samples in each function "
              "or below it, idle included):")
        for name, share in top:
            print(f"  {share:6.1%}  {name}")
    if args.loop_trace:
        lt = loop_trace_summary(f"{args.loop_trace}.{daemon_pid}")
        result["loop_trace"] = lt
        assert stamps is not None
        result["decomposition"] = dec = decompose(f"{args.loop_trace}.{daemon_pid}", stamps)
        result["stamps"] = stamps
        print(f"the daemon's loop while the victim ran under attack (--loop-trace; CPU time, "
              f"{lt['cpu_ms']:.1f} ms in all, {lt['share_in_steps_over_0.25ms']:.1%} of it in "
              "steps over 0.25 ms):")
        for label, rows in (("step", lt["steps"]), ("op", lt["ops"])):
            for k, h in sorted(rows.items(), key=lambda kv: -kv[1]["share"] * kv[1]["n"]):
                print(f"  {label} {k:34} n={h['n']:6} p50 {h['p50_ms']:7.3f} "
                      f"p99 {h['p99_ms']:7.3f} ms" + (f"  {h['share']:6.1%} of the loop"
                                                      if label == "step" else ""))
    if args.loop_trace:
        print_decomposition(dec)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from benchlib import main_quietly
    sys.exit(main_quietly(main))
