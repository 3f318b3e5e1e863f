#!/usr/bin/env python3
"""The main job: make a volume, mount it, run real programs on it, show what happened.

Run through scripts/demo.sh (which installs everything first). Everything happens in
a temporary directory that is removed afterwards (pass --keep to keep it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLUICE = [sys.executable, "-m", "fs.cli"]


def sh(cmd: str, cwd: Path, **kw) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, **kw)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"demo: '{cmd}' failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return dt, r.stdout.strip()


def _tenant(mnt: Path, principal: str, cmd: str) -> subprocess.Popen:
    """A shell acting for `principal` that runs `cmd` once per line it reads and
    answers each with a line."""
    loop = f"while read -r _; do {cmd} || exit 1; echo done; done"
    return subprocess.Popen([*SLUICE, "run", str(mnt), "--principal", principal, "--",
                             "sh", "-c", loop], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1, cwd=REPO)


def _turn(tenant: subprocess.Popen) -> None:
    tenant.stdin.write("go\n")  # type: ignore[union-attr]
    if tenant.stdout.readline() != "done\n":  # type: ignore[union-attr]
        raise SystemExit(f"demo: a tenant failed (exit {tenant.wait()})")


def pager_part(work: Path) -> bool:
    """The cooperative pager: principal A, with a 1 MiB guarantee, reads a 768 KiB working
    set in a loop with cat while principal B scans a 16 MiB file (four times the 4 MiB
    pool) between A's rounds, on a volume mounted once per policy. Prints A's hit ratio
    under each, from `sluice stats --json`. True if the guarantee held where it should."""
    vol, mnt = work / "pager-volume", work / "pager-mnt"
    mnt.mkdir()
    sl = " ".join(SLUICE)
    sh(f"{sl} mkfs {vol} --size 1G -q", REPO)
    ws = [f"{mnt}/ws/{i}" for i in range(12)]
    print("\npager: A (cache-min 1M) loops over 768 KiB with cat; B scans 16 MiB between "
          "A's rounds; pool 4 MiB")
    sh(f"{sl} mount {vol} {mnt} --cache-size 4M", REPO)
    try:
        sh("mkdir ws && for i in $(seq 0 11); do head -c 65536 /dev/urandom > ws/$i; done && "
           "head -c 16M /dev/urandom > scan", mnt)
        sh(f"{sl} principal add {mnt} A --cache-min 1M && {sl} principal add {mnt} B", REPO)
    finally:
        sh(f"{sl} umount {mnt}", REPO)
    ok = True
    print(f"  {'policy':12} {'A hits':>7} {'A misses':>9} {'A hit ratio':>12} {'B lookups':>10}")
    for policy in ("global-lru", "principal", "hinted"):
        # Each mount starts with an empty pool.
        sh(f"{sl} mount {vol} {mnt} --cache-size 4M --pager {policy}", REPO)
        # Two long-lived tenants, each a shell started with `sluice run` that runs its
        # cat whenever it reads a line: the rounds take turns without new processes.
        a_sh = _tenant(mnt, "A", f"cat {' '.join(ws)} > /dev/null")
        b_sh = _tenant(mnt, "B", f"cat {mnt}/scan > /dev/null")
        try:
            _turn(a_sh)
            before = json.loads(sh(f"{sl} stats {mnt} --json", REPO)[1])["cache"]["A"]
            for _ in range(3):
                _turn(b_sh)
                _turn(a_sh)
            cache = json.loads(sh(f"{sl} stats {mnt} --json", REPO)[1])["cache"]
        finally:
            for t in (a_sh, b_sh):
                t.stdin.close()  # type: ignore[union-attr]
                t.wait(timeout=60)
            sh(f"{sl} umount {mnt}", REPO)
        a, b = cache["A"], cache["B"]
        hits, misses = a["hits"] - before["hits"], a["misses"] - before["misses"]
        ratio = hits / max(1, hits + misses)
        ok &= ratio < 0.5 if policy == "global-lru" else ratio > 0.9
        print(f"  {policy:12} {hits:>7} {misses:>9} {ratio:>11.1%} "
              f"{b['hits'] + b['misses']:>10}")
    print("  (global-lru: one CLOCK for everyone, B's scan pushes A out; principal and "
          "hinted: A's guarantee is its own)")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true", help="keep the volume and mount point")
    ap.add_argument("--size", default="4G")
    ap.add_argument("--no-qos", action="store_true", help="skip the I/O QoS part")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sluice-demo-"))
    vol, mnt = work / "volume", work / "mnt"
    mnt.mkdir()
    rows: list[tuple[str, float, str]] = []
    print(f"sluice demo in {work}")
    subprocess.run([*SLUICE, "mkfs", str(vol), "--size", args.size], check=True, cwd=REPO)
    subprocess.run([*SLUICE, "mount", str(vol), str(mnt)], check=True, cwd=REPO)
    try:
        sl = " ".join(SLUICE)
        for name, opts in (("build", "--space 1G --inodes 50000"),
                           ("db", "--space 256M"),
                           ("tiny", "--space 2M")):
            sh(f"cd {REPO} && {sl} principal add {mnt} {name} {opts}", mnt)
        print("principals: build (1 GiB), db (256 MiB), tiny (2 MiB)\n")
        steps = [
            ("cp -a /usr/include/linux", "cp -a /usr/include/linux src && diff -r /usr/include/linux src && echo identical"),
            ("tar round trip", "tar -cf t.tar src && mkdir x && tar -xf t.tar -C x && diff -r src x/src && echo identical"),
            ("git init/add/commit/gc/fsck/clone", "git init -q repo && cp -a src repo/ && cd repo && git add -A && "
             "git -c user.name=demo -c user.email=demo@sluice commit -qm import && git gc -q && "
             "git fsck --full 2>&1 | tail -1; cd .. && git clone -q repo clone && "
             "echo \"$(git -C clone log --oneline | wc -l) commit(s) in the clone\""),
            ("sqlite3 10,000 rows", "sqlite3 db.sqlite 'create table t(a integer primary key, b text);' && "
             "python3 -c \"import sqlite3;c=sqlite3.connect('db.sqlite');c.executemany('insert into t(b) values(?)',"
             "[('row %d'%i,) for i in range(10000)]);c.commit()\" && "
             "sqlite3 db.sqlite 'select count(*) from t; pragma integrity_check;' | tr '\\n' ' '"),
            ("python compileall + import", "mkdir -p pkg/demo && printf 'def f():\\n    return 42\\n' > pkg/demo/__init__.py && "
             "python3 -m compileall -q pkg && PYTHONPATH=pkg python3 -c 'import demo; print(\"demo.f() returned\", demo.f())'"),
            ("gcc + make, run binary", "mkdir -p c && cd c && printf '#include <stdio.h>\\nint main(){puts(\"hello from sluice\");return 0;}\\n' > h.c && "
             "printf 'h: h.c\\n\\tgcc -O2 -o h h.c\\n' > Makefile && make -s && ./h"),
            ("rm -rf", "rm -rf src x clone && echo \"$(ls | wc -l) entries left\""),
        ]
        steps.insert(-1, ("tiny writes 4 MiB (over its bank)",
                          "if head -c 4M /dev/urandom > tiny.bin 2>/dev/null; then r=written; "
                          "else r='refused (EDQUOT)'; fi; "
                          "echo \"$r, kept $(stat -c %s tiny.bin) bytes\""))
        who = {"sqlite3 10,000 rows": "db", "tiny writes 4 MiB (over its bank)": "tiny"}
        print(f"  {'[as]':7} {'step':36s} {'time':>9}   result (the step's last line of output)")
        for name, cmd in steps:
            principal = who.get(name, "build")
            runner = f"cd {REPO} && {sl} run {mnt} --principal {principal} -- sh -c "
            quoted = "'" + f"cd {mnt} && " + cmd.replace("'", "'\\''") + "'"
            dt, out = sh(runner + quoted, mnt)
            rows.append((name, dt, out.splitlines()[-1] if out else ""))
            print(f"  [{principal:5}] {name:36s} {dt:7.2f} s   {rows[-1][2]}")
        st = os.statvfs(mnt)
        print(f"\nvolume: {st.f_blocks * st.f_frsize / 2**30:.1f} GiB, "
              f"{(st.f_blocks - st.f_bfree) * st.f_frsize / 2**20:.1f} MiB used, "
              f"{st.f_files - st.f_ffree} inodes")
        for cmd in (["principal", "ls", str(mnt)], ["stats", str(mnt)]):
            out = subprocess.run([*SLUICE, *cmd], capture_output=True, text=True, cwd=REPO)
            print(f"\n$ sluice {' '.join(cmd)}\n{out.stdout}{out.stderr}")
    finally:
        subprocess.run([*SLUICE, "umount", str(mnt)], cwd=REPO)
    r = subprocess.run([*SLUICE, "fsck", str(vol), "-q"], capture_output=True, text=True,
                       cwd=REPO)
    print("fsck:", r.stdout.strip().splitlines()[-1])
    pager_ok = pager_part(work)
    qos_ok = True if args.no_qos else qos_demo(work)
    if not args.keep:
        shutil.rmtree(work)
    return 0 if r.returncode == 0 and pager_ok and qos_ok else 1


def qos_demo(work: Path) -> bool:
    """I/O QoS in seconds: a reserved reader (small reads at a fixed rate, a deadline
    each) alone and then while another principal floods the device, under fifo and
    under mclock, on a slow simulated device; the reader's latency as the scheduler
    recorded it and as the program saw it. (The measurement is scripts/bench_qos.py's
    audio case, shortened; the full benchmark is in docs/BENCHMARKS.md.)"""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_qos as bq
    pname, spec = bq.CUSTOM
    s = bq.Settings(True, pname)
    print(f"\nI/O QoS: device profile {spec} (10 ms a request, 4 channels, "
          f"400 IOPS); a reader doing {s.rate:.0f} random 4 KiB reads/s (deadline "
          f"{s.deadline * 1e3:.0f} ms each, reserved {int(s.rate * 1.5)} IOPS), alone and "
          f"then beside a bulk writer\n(another principal: {s.writers}x{s.writer_threads} "
          f"threads through the mount + {s.direct_writers} direct-client threads, "
          f"{s.write_size >> 10} KiB writes)")
    v = bq.Volume(work, "qos", spec, "2G", "4M")
    results = {}
    try:
        for i, sched in enumerate(("fifo", "mclock")):
            if i:
                v.umount()
            v.mount(sched)
            if not i:
                bq.prepare(v, s)
            results[sched] = bq.case_audio(v, s, sched, v.dir / "stop")
            v.forget()
    finally:
        v.umount()
    print(f"  {'scheduler':10} {'p50 ms':>8} {'p99 ms':>8} {'p99 alone':>10} "
          f"{'p99 as seen':>12} {'deadlines missed':>17}")
    for sched, a in results.items():
        print(f"  {sched:10} {a['p50_ms']:>8.1f} {a['p99_ms']:>8.1f} {a['p99_ms_solo']:>10.1f} "
              f"{a['program_p99_ms']:>12.1f} {a['deadline_miss_ratio']:>17.0%}")
    f, m = results["fifo"], results["mclock"]
    print(f"  (p50/p99: the scheduler's figures, queue + service; 'as seen': the program's "
          f"own, through FUSE)\n  beside the flood the reader's p99 is "
          f"{f['p99_ms'] / max(m['p99_ms'], 1e-9):.1f}x better under mclock than under "
          f"fifo, and {m['p99_ms'] / max(m['p99_ms_solo'], 1e-9):.1f}x its p99 alone")
    return m["p99_ms"] < f["p99_ms"]


if __name__ == "__main__":
    from benchlib import main_quietly
    sys.exit(main_quietly(main))
