"""Mount options as a user meets them, through real mounts and real programs: the atime
modes, remounting read-only and back and changing the atime mode of a live mount
(`mount -o remount`, `sluice remount`), suid/dev for root, fstab options, unknown
options refused in one line, and fsck of a volume mounted read-only."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, is_mounted, make_volume, sluice

pytestmark = pytest.mark.mounted

HELPER = REPO / ".venv" / "bin" / "mount.fuse.sluice"
HOUR = 3600 * 10**9


def mounted_with(mount_factory, vol: Path, *extra: str, name: str = "mnt"):
    """A foreground daemon (the fixture's), once it has applied its mount flags: those
    libfuse cannot pass (strictatime, nodiratime) it sets by a remount just after the
    mount appears, and records in mount.json (`sluice mount` returns only then)."""
    m = mount_factory(vol, *extra, name=name)
    deadline = time.monotonic() + 30
    while "applied" not in json.loads((vol / "mount.json").read_text() or "{}"):
        assert time.monotonic() < deadline and m.daemon_alive
        time.sleep(0.01)
    return m


def findmnt_options(mp: Path) -> set[str]:
    r = subprocess.run(["findmnt", "-n", "-o", "VFS-OPTIONS", "--mountpoint", str(mp)],
                       capture_output=True, text=True, check=True)
    return set(r.stdout.strip().split(","))


def atime(path: Path) -> int:
    """st_atime in seconds, as stat(1) prints it."""
    return int(subprocess.run(["stat", "-c", "%X", str(path)], capture_output=True,
                              text=True, check=True).stdout)


def cat(path: Path) -> str:
    return subprocess.run(["cat", str(path)], capture_output=True, text=True,
                          check=True).stdout


def ls(path: Path) -> list[str]:
    return subprocess.run(["ls", str(path)], capture_output=True, text=True,
                          check=True).stdout.split()


def one_line_error(r: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "[Errno" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def set_times(p: Path, *, atime_s: int, mtime_s: int) -> None:
    os.utime(p, ns=(atime_s * 10**9, mtime_s * 10**9))


def reads_update_atime(mp: Path) -> dict[str, bool]:
    """What reading does to atime on this mount, per kernel rule:
    - 'stale': atime older than mtime (relatime and strictatime update it)
    - 'fresh': atime newer than mtime and ctime, less than a day old (only strictatime)
    - 'dir':   a directory listed (all but noatime and nodiratime)"""
    now = int(time.time())
    out = {}
    for case in ("stale", "fresh"):
        f = mp / case
        f.write_text("hello\n")
        if case == "stale":
            set_times(f, atime_s=now - 7200, mtime_s=now - 3600)
        else:  # newer than the ctime utime just set, and than mtime
            set_times(f, atime_s=now + 600, mtime_s=now - 3600)
        before = atime(f)
        assert cat(f) == "hello\n"
        out[case] = atime(f) != before
    d = mp / "dir"
    d.mkdir(exist_ok=True)
    (d / "entry").write_text("x")
    set_times(d, atime_s=now - 7200, mtime_s=now - 3600)
    before = atime(d)
    assert ls(d) == ["entry"]
    out["dir"] = atime(d) != before
    return out


RULES = {
    "relatime": {"stale": True, "fresh": False, "dir": True},
    "strictatime": {"stale": True, "fresh": True, "dir": True},
    "noatime": {"stale": False, "fresh": False, "dir": False},
    "strictatime,nodiratime": {"stale": True, "fresh": True, "dir": False},
    "relatime,nodiratime": {"stale": True, "fresh": False, "dir": False},
}


@pytest.mark.parametrize("mode", list(RULES))
def test_atime_modes_have_their_kernel_meanings(tmp_path: Path, mount_factory,
                                                mode: str) -> None:
    vol = make_volume(tmp_path / "vol", "64M")
    m = mounted_with(mount_factory, vol, "-o", mode)
    opts = findmnt_options(m.path)
    for flag in mode.split(","):
        if flag != "strictatime":  # findmnt names no flag for strictatime
            assert flag in opts, opts
    if mode.startswith("strictatime"):
        assert not opts & {"relatime", "noatime"}
    assert reads_update_atime(m.path) == RULES[mode]


def test_remount_changes_the_atime_mode_of_a_live_mount(tmp_path: Path,
                                                        mount_factory) -> None:
    vol = make_volume(tmp_path / "vol", "64M")
    m = mount_factory(vol)
    assert "relatime" in findmnt_options(m.path)
    assert reads_update_atime(m.path) == RULES["relatime"]
    r = sluice("remount", str(m.path), "-o", "strictatime,nodiratime")
    assert r.stdout.strip() == f"{m.path}: rw,nosuid,nodev,strictatime,nodiratime"
    assert reads_update_atime(m.path) == RULES["strictatime,nodiratime"]
    # through mount(8), which hands `-o remount,...` to mount.fuse.sluice
    r = subprocess.run(["mount", "-o", "remount,noatime,diratime", str(m.path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "noatime" in findmnt_options(m.path)
    assert reads_update_atime(m.path) == RULES["noatime"]
    # the later option wins (mount(8) alone would keep MS_NOATIME beside relatime)
    r = subprocess.run(["mount", "-o", "remount,relatime", str(m.path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "relatime" in findmnt_options(m.path)
    assert reads_update_atime(m.path) == RULES["relatime"]
    # a remount that names no atime mode keeps the mode (as the kernel does)
    for opts in ("remount,strictatime", "remount,noexec"):
        r = subprocess.run(["mount", "-o", opts, str(m.path)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    assert not findmnt_options(m.path) & {"relatime", "noatime", "nodiratime"}
    assert "noexec" in findmnt_options(m.path)
    assert reads_update_atime(m.path) == RULES["strictatime"]
    assert m.daemon_alive


def test_remount_read_only_and_back(tmp_path: Path, mount_factory) -> None:
    from kernelshim.client import Client
    vol = make_volume(tmp_path / "vol", "64M")
    m = mount_factory(vol)
    (m.path / "f").write_bytes(b"before")
    # a file open for writing keeps the mount read-write (the kernel says EBUSY)
    with open(m.path / "f", "ab") as busy:
        r = sluice("remount", str(m.path), "-o", "ro", check=False)
        one_line_error(r, 1, "cannot remount", "files are open for writing")
        busy.write(b" and after")
    assert "rw" in findmnt_options(m.path)
    # through mount(8)
    r = subprocess.run(["mount", "-o", "remount,ro", str(m.path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ro" in findmnt_options(m.path)
    assert cat(m.path / "f") == "before and after"
    for change in (lambda: (m.path / "f").write_bytes(b"x"), lambda: os.mkdir(m.path / "d"),
                   lambda: os.unlink(m.path / "f"), lambda: os.utime(m.path / "f")):
        with pytest.raises(OSError) as ei:
            change()
        assert ei.value.errno == errno.EROFS
    r = subprocess.run(["touch", str(m.path / "new")], capture_output=True, text=True)
    assert r.returncode == 1 and "Read-only file system" in r.stderr
    with Client.connect(m.path) as c:  # the daemon refuses too, not only the kernel
        with pytest.raises(OSError) as ei:
            c.open("f", "r+")
        assert ei.value.errno == errno.EROFS
        with c.open("f") as f:
            assert f.read() == b"before and after"
    # what was written before is committed: fsck of the read-only mount finds it clean
    r = sluice("fsck", str(vol), "-q")
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
    # and says the volume is mounted read-only, not that its daemon was killed (probe
    # 27, F5: "its daemon was killed ... changes ... may be gone" on a healthy mount)
    assert f"note: the volume is mounted at {m.path} (daemon pid " in r.stdout, r.stdout
    assert "killed" not in r.stdout and "may be gone" not in r.stdout, r.stdout
    # read-write again
    r = sluice("remount", str(m.path), "-o", "rw")
    assert r.stdout.strip() == f"{m.path}: rw,nosuid,nodev,relatime"
    (m.path / "g").write_bytes(b"written after")
    with Client.connect(m.path) as c:
        with c.open("f", "r+") as f:
            f.pwrite(b"BEFORE", 0)
    assert cat(m.path / "f") == "BEFORE and after"
    m.stop()
    m = mount_factory(vol, name="again")
    assert (m.path / "g").read_bytes() == b"written after"
    assert (m.path / "f").read_bytes() == b"BEFORE and after"


def test_a_read_only_mount_goes_read_write_and_cleans_up_then(tmp_path: Path,
                                                              mount_factory) -> None:
    """Mounted read-only from the start, nothing was cleaned at mount; a remount
    read-write does it before the first change."""
    vol = make_volume(tmp_path / "vol", "64M")
    m = mount_factory(vol, "--read-only")
    assert "ro" in findmnt_options(m.path)
    with pytest.raises(OSError) as ei:
        (m.path / "f").write_bytes(b"x")
    assert ei.value.errno == errno.EROFS
    r = subprocess.run(["mount", "-o", "remount,rw", str(m.path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (m.path / "f").write_bytes(b"now writable")
    assert cat(m.path / "f") == "now writable"
    state = json.loads((vol / "mount.json").read_text())
    assert state["applied"] == "rw,nosuid,nodev,relatime" and state["refused"] is None



def _store_files(vol: Path) -> dict[str, bytes | None]:
    """The bytes of the volume's store files that a read-only mount must leave alone
    (None: absent). Not the log, nor the WAL's index (-shm), which SQLite rebuilds."""
    return {name: (vol / name).read_bytes() if (vol / name).exists() else None
            for name in ("meta.db", "meta.db-wal", "mount.json", "device.img",
                         "checksums", "principals.json", "volume.json")}


def test_a_read_only_mount_of_a_crashed_volume_changes_nothing(tmp_path: Path,
                                                               mount_factory) -> None:
    """Probe 9, F6: a read-only mount of a volume whose daemon was killed checkpointed
    the WAL into meta.db and removed it at unmount, and removed mount.json, so that
    fsck then took the crash's legitimate leftovers for damage. Now the store files are
    byte for byte what they were, the volume still says it was not unmounted, and what
    was fsync'd is read from the WAL all the same."""
    vol = make_volume(tmp_path / "vol", "64M")
    m = mount_factory(vol)
    data = os.urandom(100_000)
    with open(m.path / "f", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())  # a durable commit: in meta.db-wal, not yet in meta.db
    m.kill()
    before = _store_files(vol)
    assert before["meta.db-wal"] and before["mount.json"]
    r = mount_factory(vol, "--read-only", name="ro")
    assert (r.path / "f").read_bytes() == data
    assert os.listdir(r.path) == ["f"]
    r.stop()
    assert _store_files(vol) == before
    # a check changes nothing either, and sees a volume that was not unmounted
    out = sluice("fsck", str(vol), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _store_files(vol) == before
    # the next read-write mount recovers it as after the crash
    w = mount_factory(vol, name="rw")
    assert (w.path / "f").read_bytes() == data
    (w.path / "g").write_bytes(b"writable")
    w.stop()
    assert not (vol / "mount.json").exists()
    assert sluice("fsck", str(vol)).stdout.strip().endswith(f"{vol}: clean")


def test_a_read_only_mount_of_a_clean_volume_leaves_no_files(tmp_path: Path,
                                                             mount_factory) -> None:
    """Unmounted cleanly, a volume has no WAL; a read-only mount and a check leave none
    (nor an index of one) behind, and a remount read-write still works."""
    vol = make_volume(tmp_path / "vol", "64M")
    m = mount_factory(vol)
    (m.path / "f").write_bytes(b"kept")
    m.stop()
    names = sorted(os.listdir(vol))
    before = _store_files(vol)
    r = mount_factory(vol, "--read-only", name="ro")
    assert (r.path / "f").read_bytes() == b"kept"
    sluice("fsck", str(vol))
    assert sorted(os.listdir(r.path)) == ["f"]
    subprocess.run(["mount", "-o", "remount,rw", str(r.path)], check=True, timeout=60)
    (r.path / "g").write_bytes(b"now writable")
    assert (r.path / "g").read_bytes() == b"now writable"
    subprocess.run(["mount", "-o", "remount,ro", str(r.path)], check=True, timeout=60)
    r.stop()
    assert sorted(os.listdir(vol)) == names
    after = _store_files(vol)
    assert after["meta.db"] != before["meta.db"]  # g was made
    w = mount_factory(vol, "--read-only", name="ro2")
    assert (w.path / "g").read_bytes() == b"now writable"
    w.stop()
    assert sorted(os.listdir(vol)) == names and _store_files(vol) == after

def test_fsck_of_a_mounted_volume(tmp_path: Path, mount_factory) -> None:
    from fs.volume import checking_lock
    vol = make_volume(tmp_path / "vol", "64M")
    m = mount_factory(vol)
    (m.path / "f").write_bytes(b"data" * 5000)
    # read-write: refused, in one line that says what to do
    r = sluice("fsck", str(vol), check=False)
    one_line_error(r, 8, "in use, mounted read-write", "remount it read-only")  # (unchecked)
    sluice("remount", str(m.path), "-o", "ro")
    r = sluice("fsck", str(vol), "--verify-data", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith(f"{vol}: clean")
    # a repair needs it unmounted
    r = sluice("fsck", str(vol), "--repair", check=False)
    one_line_error(r, 8, "in use", f"mounted at {m.path}", "--repair needs it unmounted")
    # while a check runs, the mount cannot go read-write (and stays read-only)
    with checking_lock(vol) as state:
        assert state is not None and state["mountpoint"] == str(m.path)
        r = sluice("remount", str(m.path), "-o", "rw", check=False)
        one_line_error(r, 1, "stays read-only", "sluice fsck is checking")
        assert "ro" in findmnt_options(m.path)
        with pytest.raises(OSError) as ei:
            (m.path / "g").write_bytes(b"x")
        assert ei.value.errno == errno.EROFS
    sluice("remount", str(m.path), "-o", "rw")
    (m.path / "g").write_bytes(b"x")
    assert (m.path / "f").read_bytes() == b"data" * 5000


def test_suid_and_dev_for_a_mount_made_by_root(tmp_path: Path, mount_factory) -> None:
    import tempfile

    from conftest import Mount
    from shim_util import user_run
    vol = make_volume(tmp_path / "vol", "64M")
    plain = mounted_with(mount_factory, vol)
    assert {"nosuid", "nodev"} <= findmnt_options(plain.path)
    plain.stop()
    # where uid 1000 can reach it (not below /tmp/pytest-of-root, 0700)
    base = Path(tempfile.mkdtemp(prefix="sluice-suid-", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "mnt").mkdir()
    m = Mount(vol, base / "mnt", None, tmp_path / "suid-daemon.log")
    try:
        m.start("-o", "suid,dev")
        deadline = time.monotonic() + 30
        while "applied" not in json.loads((vol / "mount.json").read_text() or "{}"):
            assert time.monotonic() < deadline and m.daemon_alive
            time.sleep(0.01)
        opts = findmnt_options(m.path)
        assert "nosuid" not in opts and "nodev" not in opts, opts
        # a setuid-root program on it runs as root for another uid, as on any
        # filesystem mounted suid; after a remount nosuid it does not
        shutil.copy("/usr/bin/id", m.path / "id")
        os.chmod(m.path / "id", 0o4755)
        r = user_run([str(m.path / "id"), "-u"])
        assert r.stdout.strip() == "0", r.stderr
        sluice("remount", str(m.path), "-o", "nosuid")
        assert "nosuid" in findmnt_options(m.path)
        r = user_run([str(m.path / "id"), "-u"])
        assert r.stdout.strip() == "1000", r.stderr
    finally:
        m.stop()
        if not os.path.ismount(base / "mnt"):
            shutil.rmtree(base, ignore_errors=True)


def test_fstab_options_are_accepted(tmp_path: Path) -> None:
    vol = make_volume(tmp_path / "vol", "64M")
    mp = tmp_path / "mnt"
    mp.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{vol} {mp} fuse.sluice defaults,noauto,nofail,_netdev,"
                     "x-systemd.automount,x-systemd.device-timeout=5,comment=lab,user,"
                     "noatime,cache_size=32M,allow_other 0 0\n")
    r = subprocess.run(["mount", "-T", str(fstab), str(mp)], capture_output=True, text=True,
                       timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        opts = findmnt_options(mp)
        # `user` implies noexec,nosuid,nodev (mount(8) passes them on)
        assert {"noatime", "noexec", "nosuid", "nodev"} <= opts, opts
        (mp / "f").write_text("fstab")
        assert cat(mp / "f") == "fstab"
    finally:
        if is_mounted(mp):
            sluice("umount", str(mp))


@pytest.mark.parametrize("how", ["sluice", "helper", "mount(8)"])
@pytest.mark.parametrize("bad", ["bogus", "sync", "cache_size", "fix_permissions=yes"])
def test_unknown_mount_options_are_refused_in_one_line(tmp_path: Path, how: str,
                                                       bad: str) -> None:
    vol = make_volume(tmp_path / "vol", "64M")
    mp = tmp_path / "mnt"
    mp.mkdir()
    if how == "sluice":
        r = sluice("mount", str(vol), str(mp), "-o", f"noatime,{bad}", check=False)
        prefix = "sluice mount: "
    elif how == "helper":  # as mount(8) calls it
        r = subprocess.run([str(HELPER), str(vol), str(mp), "-o", f"rw,noatime,{bad}"],
                           capture_output=True, text=True, timeout=60)
        prefix = "mount.fuse.sluice: "
    else:
        r = subprocess.run(["mount", "-t", "fuse.sluice", "-o", f"noatime,{bad}", str(vol),
                            str(mp)], capture_output=True, text=True, timeout=60)
        prefix = "mount.fuse.sluice: "
    try:
        line = one_line_error(r, 2, repr(bad))
        assert line.startswith(prefix), line
        assert not is_mounted(mp)
        assert not (vol / "mount.json").exists()
    finally:
        if is_mounted(mp):
            sluice("umount", str(mp))


def test_remount_of_what_is_not_a_sluice_mount(tmp_path: Path) -> None:
    r = sluice("remount", str(tmp_path), "-o", "ro", check=False)
    one_line_error(r, 1, "is not a mounted sluice volume")
    r = sluice("remount", str(tmp_path), check=False)
    one_line_error(r, 2, "-o")


def test_a_volume_being_checked_mounts_read_only_only(tmp_path: Path,
                                                      mount_factory) -> None:
    from fs.volume import checking_lock
    vol = make_volume(tmp_path / "vol", "64M")
    m = mount_factory(vol)
    (m.path / "f").write_bytes(b"checked")
    m.stop()
    mp = tmp_path / "mp"
    mp.mkdir()
    with checking_lock(vol) as state:  # what `sluice fsck` holds while it checks
        assert state is None  # not mounted
        r = sluice("mount", str(vol), str(mp), check=False)
        one_line_error(r, 1, "sluice fsck is checking")
        assert not is_mounted(mp)
        r = sluice("fsck", str(vol), "--repair", check=False)
        one_line_error(r, 8, "sluice fsck is checking")
        r = sluice("fsck", str(vol), "-q")  # another check may run beside it
        assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
        sluice("mount", str(vol), str(mp), "-o", "ro")
        try:
            assert cat(mp / "f") == "checked"
            assert "ro" in findmnt_options(mp)
        finally:
            sluice("umount", str(mp))
    sluice("mount", str(vol), str(mp))
    try:
        (mp / "g").write_bytes(b"writable")
    finally:
        sluice("umount", str(mp))


def test_a_failed_volume_stays_read_only_on_remount(tmp_path: Path, mount_factory,
                                                    monkeypatch) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"flush_errors": [1]}))  # the first device flush fails
    monkeypatch.setenv("SLUICE_FAULT_PLAN", str(plan))
    vol = make_volume(tmp_path / "vol", "64M")
    m = mounted_with(mount_factory, vol)
    fd = os.open(m.path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 10000)
        with pytest.raises(OSError) as ei:
            os.fsync(fd)
        assert ei.value.errno == errno.EIO
    finally:
        os.close(fd)
    with pytest.raises(OSError) as ei:
        (m.path / "g").write_bytes(b"y")
    assert ei.value.errno == errno.EROFS  # failed: read-only, though the kernel says rw
    sluice("remount", str(m.path), "-o", "ro")
    r = sluice("remount", str(m.path), "-o", "rw", check=False)
    one_line_error(r, 1, "stays read-only", "the volume failed", "run sluice fsck")
    assert "ro" in findmnt_options(m.path)  # the daemon turned the kernel's flag back
    with pytest.raises(OSError) as ei:
        (m.path / "g").write_bytes(b"y")
    assert ei.value.errno == errno.EROFS
    r = sluice("fsck", str(vol), check=False)  # checkable now, and it says what is wrong
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr
    assert m.daemon_alive


def test_the_daemon_follows_a_remount_made_without_the_helper(tmp_path: Path,
                                                              mount_factory) -> None:
    """`mount -i` (no helper) or any mount(2) caller: the daemon still applies it."""
    from kernelshim.client import Client
    vol = make_volume(tmp_path / "vol", "64M")
    m = mounted_with(mount_factory, vol)
    (m.path / "f").write_bytes(b"kept")

    def applied() -> str:
        return json.loads((vol / "mount.json").read_text())["applied"]

    def wait_applied(want: str) -> None:
        deadline = time.monotonic() + 30
        while applied() != want:
            assert time.monotonic() < deadline and m.daemon_alive, applied()
            time.sleep(0.01)
    r = subprocess.run(["mount", "-i", "-o", "remount,ro,noatime", str(m.path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_applied("ro,nosuid,nodev,noatime")
    with Client.connect(m.path) as c:
        with pytest.raises(OSError) as ei:
            c.open("f", "r+")
        assert ei.value.errno == errno.EROFS
    # (mount(8) itself keeps MS_NOATIME beside a later relatime: the kernel's flags
    # stay noatime; mount.fuse.sluice and sluice remount apply options in order)
    r = subprocess.run(["mount", "-i", "-o", "remount,rw", str(m.path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_applied("rw,nosuid,nodev,noatime")
    with Client.connect(m.path) as c:
        with c.open("f", "r+") as f:
            f.pwrite(b"KEPT", 0)
    assert cat(m.path / "f") == "KEPT"


def test_an_older_binding_is_refused_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """serve() asks pyfuse3.main for a checkpoint budget, which only sluice's binding
    from sluice.5 on has: an older build is refused before anything is mounted, with
    the command that fixes it (not a TypeError from a live mount)."""
    import pyfuse3

    from fs.errors import VolumeError
    from fs.mount import MountOptions, fuse_options

    assert "subtype=sluice" in fuse_options(tmp_path, MountOptions())
    real = pyfuse3.run_handler

    def run_handler(coro, on_block):  # what sluice.4 had
        return real(coro, on_block)
    monkeypatch.setattr(pyfuse3, "run_handler", run_handler)
    with pytest.raises(VolumeError, match="older one: run scripts/setup.sh"):
        fuse_options(tmp_path, MountOptions())


def test_the_checkpoint_budget_is_probed_not_assumed(monkeypatch) -> None:
    """The binding knows trio's schedule point by a private name of trio's; with the
    trio pyproject.toml pins, the probe the daemon runs before serving finds the
    budget working. Without that name (the binding's fallback for another trio: set
    here as its import failure would) the probe says so, and serve() logs it."""
    import pyfuse3._pyfuse3

    from fs.mount import checkpoint_budget_works

    assert checkpoint_budget_works()
    monkeypatch.setattr(pyfuse3._pyfuse3, "_CHECKPOINT", None)
    assert not checkpoint_budget_works()


def test_principals_cannot_change_on_a_read_only_mount(tmp_path: Path,
                                                       mount_factory) -> None:
    """A read-only mount wrote principals.json for `principal add`, `set` and `rm`
    (found at stop 24): each gets a one-line read-only error and the file stays as it
    was; a remount read-write lets them change again."""
    vol = make_volume(tmp_path / "vol", "64M")
    m = mount_factory(vol)
    sluice("principal", "add", str(m.path), "kept")
    m.stop()
    before = (vol / "principals.json").read_bytes()
    r = mount_factory(vol, "--read-only", name="ro")
    for args in (["add", str(r.path), "alice"], ["set", str(r.path), "kept", "--space", "1M"],
                 ["rm", str(r.path), "kept"]):
        out = sluice("principal", *args, check=False)
        one_line_error(out, 1, "read-only")
    assert (vol / "principals.json").read_bytes() == before
    listed = sluice("principal", "ls", str(r.path)).stdout
    assert "kept" in listed and "alice" not in listed
    subprocess.run(["mount", "-o", "remount,rw", str(r.path)], check=True, timeout=60)
    sluice("principal", "add", str(r.path), "alice")
    r.stop()
    assert "alice" in (vol / "principals.json").read_text()
