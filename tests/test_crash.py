"""Crash consistency: SIGKILL the daemon under a writer that fsyncs, remount, and check
that everything fsync acknowledged survived intact.

The writer prints the index of a record (to a file OUTSIDE the mount) only after fsync
returned for it: those are the acknowledged records, and every one of them must be
present after any crash. Unacknowledged records may be lost, but what is there must be
a clean prefix of what was written (never garbage or zeros).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import Mount, is_mounted, sluice

pytestmark = pytest.mark.mounted

REC = 64


def record(round_: int, i: int) -> bytes:
    body = f"{round_}:{i:08d} {hashlib.sha256(f'{round_}/{i}'.encode()).hexdigest()}"
    return body.encode().ljust(REC - 1, b".") + b"\n"


def state_content(round_: int, i: int) -> bytes:
    return f"generation {round_}:{i}\n".encode() * 50


WRITER = textwrap.dedent("""\
    import hashlib, os, sys
    REC = %d
    def record(round_, i):
        body = f"{round_}:{i:08d} {hashlib.sha256(f'{round_}/{i}'.encode()).hexdigest()}"
        return body.encode().ljust(REC - 1, b".") + b"\\n"
    def fsync_dir(path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    root, round_ = sys.argv[1], int(sys.argv[2])
    os.makedirs(os.path.join(root, "side"), exist_ok=True)
    fd = os.open(os.path.join(root, f"log{round_}"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    fsync_dir(root)
    i = 0
    while True:
        os.write(fd, record(round_, i))
        os.fsync(fd)
        print("r", i, flush=True)
        if i %% 16 == 5:  # a new small file, made durable with its directory
            p = os.path.join(root, "side", f"{round_}-{i}")
            with open(p, "wb") as f:
                f.write(record(round_, i) * 3)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(os.path.join(root, "side"))
            print("f", i, flush=True)
        if i %% 8 == 3:  # atomic replace: write a temporary, fsync, rename over, fsync dir
            tmp = os.path.join(root, "state.tmp")
            with open(tmp, "wb") as f:
                f.write(f"generation {round_}:{i}\\n".encode() * 50)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, os.path.join(root, "state"))
            fsync_dir(root)
            print("s", round_, i, flush=True)
        i += 1
    """) % REC


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} did not die"
        time.sleep(0.02)


def _daemon_pid(volume: Path) -> int:
    return int(json.loads((volume / "mount.json").read_text())["pid"])


def _assert_dead_mount(mp: Path) -> None:
    assert is_mounted(mp), "the killed daemon's mount should still be listed"
    # (stat of the root may still succeed: the kernel answers it from its attribute
    # cache; statfs and readdir always reach the daemon.)
    for probe in (os.statvfs, os.listdir):
        with pytest.raises(OSError) as ei:
            probe(mp)
        assert ei.value.errno == errno.ENOTCONN


def _start_over_dead_mount(m: Mount) -> None:
    """m.start() over a dead mount. Mount.start returns once the mount point is listed
    in /proc/mounts, which the dead mount still is until the new daemon has cleaned it
    up: wait for the new daemon to record itself (it does once its mount is live)."""
    m.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            if _daemon_pid(m.volume) == m.proc.pid:
                break
        except (OSError, ValueError):
            pass
        assert m.daemon_alive, m.log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the new daemon did not come up"
        time.sleep(0.02)


@pytest.fixture
def background_mounts(tmp_path: Path):
    """Mount points mounted with the CLI in background mode: always cleaned up."""
    started: list[tuple[Path, Path]] = []  # (volume, mountpoint)
    yield started
    for volume, mp in started:
        state = None
        try:
            state = json.loads((volume / "mount.json").read_text())
        except (OSError, ValueError):
            pass
        if is_mounted(mp):
            subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        if is_mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        if state and _pid_alive(state["pid"]):
            try:
                _wait_gone(state["pid"], 30)
            except AssertionError:
                os.kill(state["pid"], signal.SIGKILL)
    logs = [v / "sluice.log" for v, _ in started]
    for log in logs:
        if log.exists():
            text = log.read_text()
            assert "Traceback" not in text, f"daemon logged a traceback:\n{text[-3000:]}"


def _check(root: Path, acked: dict, states: list[tuple[int, int]]) -> None:
    """Every acknowledged record, side file and state generation is there, intact."""
    for round_, last in acked["r"].items():
        data = (root / f"log{round_}").read_bytes()
        want = b"".join(record(round_, i) for i in range(len(data) // REC + 1))
        assert len(data) >= (last + 1) * REC, \
            f"round {round_}: acknowledged {last + 1} records, found {len(data) / REC}"
        assert data == want[:len(data)], f"round {round_}: log is not a clean prefix"
    for round_, idxs in acked["f"].items():
        for i in idxs:
            assert (root / "side" / f"{round_}-{i}").read_bytes() == record(round_, i) * 3
    if states:
        # `state` holds the newest acknowledged generation or a later one, complete.
        data = (root / "state").read_bytes()
        first = data.split(b"\n", 1)[0].decode()
        assert first.startswith("generation "), data[:100]
        gen = tuple(int(x) for x in first.split()[1].split(":"))
        assert data == state_content(*gen), "torn state file"
        assert gen >= max(states) and gen[1] % 8 == 3, (gen, max(states))


def _parse_acks(path: Path, round_: int, acked: dict, states: list) -> int:
    n = 0
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "r":
            acked["r"][round_] = int(parts[1])
            n += 1
        elif parts[0] == "f":
            acked["f"].setdefault(round_, []).append(int(parts[1]))
        elif parts[0] == "s":
            states.append((int(parts[1]), int(parts[2])))
    return n


def test_sigkill_under_fsync_writer(volume: Path, mount_factory, tmp_path: Path,
                                    background_mounts) -> None:
    seed = int(os.environ.get("SLUICE_CRASH_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    print(f"crash seed {seed} (set SLUICE_CRASH_SEED to repeat)")
    m = mount_factory(volume)
    mp = m.path
    acked: dict = {"r": {}, "f": {}}
    states: list[tuple[int, int]] = []
    rounds = 5
    for round_ in range(rounds):
        ackfile = tmp_path / f"acks{round_}"
        with open(ackfile, "wb") as out:
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mp), str(round_)],
                                      stdout=out, stderr=subprocess.PIPE)
        try:
            # Let it get going, then kill the daemon at a random moment.
            deadline = time.monotonic() + 20
            while ackfile.stat().st_size < 200:
                assert writer.poll() is None, writer.stderr.read().decode()
                assert time.monotonic() < deadline, "writer made no progress"
                time.sleep(0.01)
            time.sleep(rnd.uniform(0.05, 1.0))
            if round_ % 2 == 0:
                m.kill()  # the fixture's foreground daemon
            else:
                pid = _daemon_pid(volume)
                os.kill(pid, signal.SIGKILL)  # the background daemon we started
                _wait_gone(pid)
            _, err = writer.communicate(timeout=30)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        # The writer failed on the dead mount (ENOTCONN or ECONNABORTED), not with garbage.
        assert writer.returncode != 0
        assert b"Error" in err, err.decode()
        n = _parse_acks(ackfile, round_, acked, states)
        assert n > 0
        print(f"round {round_}: {n} records acknowledged before the crash")
        _assert_dead_mount(mp)
        if round_ == rounds - 1:
            # The crashed volume, before any mount repaired anything, is consistent:
            # at worst it holds blocks written but never committed (a note, no error).
            r = sluice("fsck", str(volume), check=False)
            assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
        # Remount over the dead mount: even rounds through the CLI in background mode,
        # which must clean up the dead mount itself; odd rounds through the fixture.
        if round_ % 2 == 0:
            r = sluice("mount", str(volume), str(mp), check=False)
            assert r.returncode == 0, r.stderr
            background_mounts.append((volume, mp))
        else:
            _start_over_dead_mount(m)
        assert is_mounted(mp)
        _check(mp, acked, states)

    # Unmount cleanly (the last round left a background-mounted daemon) and fsck.
    pid = _daemon_pid(volume)
    r = sluice("umount", str(mp), check=False)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp) and not _pid_alive(pid)
    r = sluice("fsck", str(volume), "--verify-data", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("clean") and ", 0 bad" in r.stdout, r.stdout
    # And once more after a clean mount: everything is still there.
    m.start()
    _check(mp, acked, states)
    m.stop()
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout


def _fsyncdir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.mounted
@pytest.mark.parametrize("opts", [(), ("--writeback", "--cache-size", "256K")],
                         ids=["write-through", "write-back"])
def test_directories_renamed_across_parents_survive_a_crash(volume: Path, mount_factory,
                                                            opts: tuple[str, ...]) -> None:
    """Directory renames, which scripts/crashtest.py's workload does not do: a directory
    with a subtree moved to another parent and one moved over an empty directory, both
    parents fsync'd, then SIGKILL. The recovered tree has the new names only, every
    fsync'd byte, the link counts it had; fsck after the unmount is clean, no notes."""
    m = mount_factory(volume, *opts)
    mp = m.path
    for d in ("a", "a/x", "a/x/sub", "b", "b/over", "c"):
        os.mkdir(mp / d)
    data = {"a/x/f": os.urandom(10000), "a/x/sub/g": os.urandom(5000), "c/h": os.urandom(3000)}
    for p, b in data.items():
        with open(mp / p, "wb") as f:
            f.write(b)
            os.fsync(f.fileno())
    for d in ("", "a", "a/x", "a/x/sub", "b", "c"):
        _fsyncdir(mp / d)
    os.rename(mp / "a/x", mp / "b/y")        # to another parent
    os.rename(mp / "c", mp / "b/over")       # over an empty directory
    for d in ("a", "b", ""):
        _fsyncdir(mp / d)
    want_tree = {p: os.stat(mp / p).st_nlink for p in ("", "a", "b", "b/y", "b/y/sub", "b/over")}
    m.kill()
    _start_over_dead_mount(m)
    assert sorted(os.listdir(mp)) == ["a", "b"]
    assert os.listdir(mp / "a") == []
    assert sorted(os.listdir(mp / "b")) == ["over", "y"]
    assert (mp / "b/y/f").read_bytes() == data["a/x/f"]
    assert (mp / "b/y/sub/g").read_bytes() == data["a/x/sub/g"]
    assert (mp / "b/over/h").read_bytes() == data["c/h"]
    assert {p: os.stat(mp / p).st_nlink for p in want_tree} == want_tree
    m.stop()
    r = sluice("fsck", str(volume), "--verify-data", check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
    assert "note:" not in r.stdout and "error:" not in r.stdout, r.stdout


def test_new_mount_cleans_dead_mount(volume: Path, mount_factory, background_mounts) -> None:
    m = mount_factory(volume)
    (m.path / "kept").write_bytes(b"fsynced data\n" * 100)
    fd = os.open(m.path / "kept", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    m.kill()
    _assert_dead_mount(m.path)
    # Mounting the same volume at the same place: no 'busy', no 'not empty'.
    r = sluice("mount", str(volume), str(m.path), check=False)
    background_mounts.append((volume, m.path))
    assert r.returncode == 0, r.stderr
    # at most a one-line notice that it cleaned up, no traceback
    assert len(r.stderr.splitlines()) <= 1 and "Traceback" not in r.stderr, r.stderr
    assert not r.stderr or "dead mount" in r.stderr
    assert (m.path / "kept").read_bytes() == b"fsynced data\n" * 100
    pid = _daemon_pid(volume)
    assert _pid_alive(pid) and pid != m.proc.pid
    r = sluice("umount", str(m.path), check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert not is_mounted(m.path) and not _pid_alive(pid)
    assert not (volume / "mount.json").exists()
    assert os.listdir(m.path) == []


def test_new_mount_elsewhere_cleans_dead_mount(volume: Path, mount_factory, tmp_path: Path,
                                               background_mounts) -> None:
    """The dead mount of a volume is cleaned even when it is remounted somewhere else."""
    m = mount_factory(volume)
    (m.path / "f").write_text("x")
    os.sync()
    m.kill()
    _assert_dead_mount(m.path)
    other = tmp_path / "other"
    other.mkdir()
    r = sluice("mount", str(volume), str(other), check=False)
    background_mounts.append((volume, other))
    assert r.returncode == 0, r.stderr
    assert not is_mounted(m.path), "the dead mount was left behind"
    assert os.listdir(m.path) == []  # usable again: no ENOTCONN
    assert is_mounted(other)
    r = sluice("umount", str(other), check=False)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(other)
