"""Many extended attributes on one file: sluice against a plain directory, same run.

Sets N xattrs on one file (then reads the list and removes them all), in batches, and
prints the time per batch. A setxattr that rescanned the whole list would make the
later batches slower than the first (quadratic in N); kept linear, each batch costs
about the same. The reference is a plain tmpfs directory (ext4 keeps a file's xattrs
in one block and refuses thousands of them), mounted by the script for the run.

    .venv/bin/python scripts/bench_xattr.py [--count 5000] [--batches 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import SluiceMount, is_mounted, log, run


def run_batches(path: Path, count: int, batches: int) -> dict[str, object]:
    path.write_bytes(b"")
    per = count // batches
    times = []
    for b in range(batches):
        t0 = time.perf_counter()
        for i in range(b * per, (b + 1) * per):
            os.setxattr(path, f"user.a{i:05d}", b"v")
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    names = os.listxattr(path)
    t_list = time.perf_counter() - t0
    assert len(names) == per * batches, len(names)
    t0 = time.perf_counter()
    for name in names:
        os.removexattr(path, name)
    t_remove = time.perf_counter() - t0
    return {"batches": times, "list": t_list, "remove": t_remove}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=5000, help="xattrs on the file (5000)")
    ap.add_argument("--batches", type=int, default=5, help="timed batches (5)")
    ap.add_argument("--workdir", default="/var/tmp", help="where both runs go (/var/tmp)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-xattr-", dir=args.workdir))
    m = SluiceMount(work / "vol", work / "mnt", size="1G")
    plain = work / "plain"
    plain.mkdir()
    try:
        run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(plain)])
        log("plain tmpfs directory")
        ref = run_batches(plain / "f", args.count, args.batches)
        (work / "mnt").mkdir()
        m.mkfs()
        m.mount()
        log("sluice")
        got = run_batches(m.mountpoint / "f", args.count, args.batches)
    finally:
        m.cleanup()
        if is_mounted(plain):
            subprocess.run(["umount", str(plain)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    per = args.count // args.batches
    print(f"{args.count} xattrs on one file, {args.batches} batches of {per}; "
          f"ms per batch (ratio to a plain tmpfs directory)")
    print(f"{'batch':>12} {'plain ms':>10} {'sluice ms':>10} {'ratio':>7}")
    for i, (a, b) in enumerate(zip(ref["batches"], got["batches"])):  # type: ignore[call-overload]
        print(f"{f'{i * per}-{(i + 1) * per}':>12} {a * 1e3:10.1f} {b * 1e3:10.1f} {b / a:7.2f}")
    for k in ("list", "remove"):
        a, b = ref[k], got[k]
        print(f"{k:>12} {a * 1e3:10.1f} {b * 1e3:10.1f} {b / a:7.2f}")  # type: ignore[operator]
    first, last = got["batches"][0], got["batches"][-1]  # type: ignore[index]
    print(f"sluice: last batch / first batch = {last / first:.2f} (1.0 = linear)")


if __name__ == "__main__":
    from benchlib import main_quietly
    main_quietly(main)
