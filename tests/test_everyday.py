"""Everyday use without surprises, through a real mount: a write that does not fit writes
what fits, timestamps out of the storable range, many xattrs on one file, and space
freed by rm showing in df at once."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from conftest import make_volume

pytestmark = pytest.mark.mounted

BS = 4096
KiB, MiB = 1 << 10, 1 << 20


def free_bytes(path: Path) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def test_a_write_that_does_not_fit_writes_what_fits(tmp_path: Path, mount_factory) -> None:
    m = mount_factory(make_volume(tmp_path / "small", "16M"))
    filler = os.urandom(MiB)
    with open(m.path / "filler", "wb") as f:
        while free_bytes(m.path) > MiB + 900 * KiB:
            f.write(filler)
    with open(m.path / "filler", "ab") as f:  # leave exactly 900 KiB
        f.write(filler[:free_bytes(m.path) - 900 * KiB])
    assert free_bytes(m.path) == 900 * KiB
    data = os.urandom(MiB)
    fd = os.open(m.path / "last", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        n = os.write(fd, data)
        assert n == 900 * KiB, "a short write of what fits, not ENOSPC for all of it"
        with pytest.raises(OSError) as ei:
            os.write(fd, data[n:])
        assert ei.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert (m.path / "last").read_bytes() == data[:900 * KiB]
    assert free_bytes(m.path) == 0


@pytest.mark.parametrize("when_ns, stored_ns", [
    (2 ** 70, 2 ** 63 - 1),                  # far beyond 2262: clamped, as ext4 clamps
    (-(2 ** 70), -(2 ** 63)),                # before 1677
    (4_102_444_800_123_456_789, 4_102_444_800_123_456_789),  # 2100: stored exactly
])
def test_timestamps_out_of_range_are_clamped_not_an_error(mnt: Path, when_ns: int,
                                                          stored_ns: int) -> None:
    p = mnt / "t"
    p.write_bytes(b"x")
    os.utime(p, ns=(when_ns, when_ns))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (stored_ns, stored_ns)
    assert p.read_bytes() == b"x"


def test_thousands_of_xattrs_on_one_file(mnt: Path) -> None:
    """Correct at the limit (the list size is kept per inode now, not recounted on every
    set; its speed is measured in scripts/bench_fs.py)."""
    p = mnt / "x"
    p.write_bytes(b"")
    names = [f"user.a{i:05d}" for i in range(5000)]
    for i, name in enumerate(names):
        os.setxattr(p, name, str(i).encode())
    assert sorted(os.listxattr(p)) == names
    assert os.getxattr(p, names[4321]) == b"4321"
    for name in names[:2500]:
        os.removexattr(p, name)
    assert sorted(os.listxattr(p)) == names[2500:]
    # the list limit (64 KiB of names) still holds, counted from the kept size
    extra = 0
    with pytest.raises(OSError) as ei:
        while True:
            os.setxattr(p, f"user.b{extra:050d}", b"")
            extra += 1
    assert ei.value.errno == errno.ENOSPC
    total = sum(len(n) + 1 for n in os.listxattr(p))
    assert 65536 - 60 < total <= 65536


def test_space_freed_by_rm_shows_in_df_at_once(tmp_path: Path, mount_factory) -> None:
    m = mount_factory(make_volume(tmp_path / "vol", "64M"))
    before = free_bytes(m.path)
    (m.path / "big").write_bytes(os.urandom(8 * MiB))
    assert free_bytes(m.path) == before - 8 * MiB
    os.unlink(m.path / "big")
    assert free_bytes(m.path) == before  # not 1-2 s later
    # and a writer can use it at once, though the freeing commit may not be durable yet
    chunk = os.urandom(MiB)
    with open(m.path / "again", "wb") as f:
        for _ in range(before // MiB):
            f.write(chunk)
    assert free_bytes(m.path) == before - (before // MiB) * MiB


# -- file handles: name_to_handle_at / open_by_handle_at (NFS export) ---------------------------

import ctypes  # noqa: E402
import subprocess  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def name_to_handle(path: Path) -> _FileHandle:
    fh = _FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(fh),
                               ctypes.byref(mount_id), 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    return fh


def open_by_handle(mount_point: Path, fh: _FileHandle, flags: int = os.O_RDONLY) -> int:
    mfd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _libc.open_by_handle_at(mfd, ctypes.byref(fh), flags)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd
    finally:
        os.close(mfd)


def read_fd(fd: int) -> bytes:
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


def drop_kernel_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def test_file_handles_survive_forget_and_remount_and_go_stale_on_delete(
        volume: Path, mount_factory) -> None:
    m = mount_factory(volume)
    (m.path / "d").mkdir()
    (m.path / "d" / "f").write_bytes(b"handle me")
    (m.path / "gone").write_bytes(b"soon deleted")
    fh_file = name_to_handle(m.path / "d" / "f")
    fh_dir = name_to_handle(m.path / "d")
    fh_gone = name_to_handle(m.path / "gone")
    assert read_fd(open_by_handle(m.path, fh_file)) == b"handle me"
    # the kernel forgets the inodes: the handle still resolves (LOOKUP of ".")
    drop_kernel_caches()
    assert read_fd(open_by_handle(m.path, fh_file)) == b"handle me"
    dfd = open_by_handle(m.path, fh_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(dfd) == ["f"]
    finally:
        os.close(dfd)
    # deleted: stale, and nothing else
    os.unlink(m.path / "gone")
    drop_kernel_caches()
    with pytest.raises(OSError) as ei:
        open_by_handle(m.path, fh_gone)
    assert ei.value.errno == errno.ESTALE
    # across a remount
    m.stop()
    m2 = mount_factory(volume, name="mnt2")
    assert read_fd(open_by_handle(m2.path, fh_file)) == b"handle me"
    fd = open_by_handle(m2.path, fh_file, os.O_RDWR)
    try:
        os.pwrite(fd, b"HANDLE", 0)
    finally:
        os.close(fd)
    assert (m2.path / "d" / "f").read_bytes() == b"HANDLE me"


# -- the command line: a lost reader or daemon, a bad interval --------------------------------

def test_stats_watch_into_a_closed_pipe_and_bad_intervals(mnt: Path) -> None:
    from conftest import REPO, SLUICE, sluice
    r = subprocess.run(f"{' '.join(SLUICE)} stats {mnt} --watch 0.2 | head -3",
                       shell=True, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert len(r.stdout.splitlines()) == 3 and r.stdout.startswith("volume:")
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    for bad in ("-1", "0", "nan", "inf", "soon"):
        r = sluice("stats", str(mnt), "--watch", bad, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "positive number of seconds" in r.stderr


@pytest.mark.parametrize("args", [["--size", "99999T"], ["--size", "1E"],
                                  ["--size", "64M", "--profile", "a,b,c,d"],
                                  ["--size", "64M", "--inodes", "-5"]])
@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_mkfs_leaves_nothing_behind(tmp_path: Path, args: list[str],
                                             existing: bool) -> None:
    from conftest import sluice
    vol = tmp_path / "vol"
    if existing:
        vol.mkdir()
    r = sluice("mkfs", str(vol), *args, check=False)
    # (a bad --profile, or --inodes out of its range, is a usage error: exit 2, as the
    # README says; the rest fail: 1)
    usage = "--profile" in args or "--inodes" in args
    assert r.returncode == (2 if usage else 1), r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    if existing:
        assert vol.is_dir() and os.listdir(vol) == []
    else:
        assert not vol.exists()
    sluice("mkfs", str(vol), "--size", "64M", "-q")  # and a retry just works
    assert (vol / "volume.json").exists()


# -- read-only mounts -----------------------------------------------------------------------

def _digest(p: Path) -> str:
    import hashlib
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("how", ["flag", "mount -o ro"])
def test_read_only_mount(tmp_path: Path, mount_factory, how: str) -> None:
    from conftest import sluice
    from kernelshim.client import Client
    vol = make_volume(tmp_path / "vol", "64M")
    m = mount_factory(vol)
    (m.path / "f").write_bytes(b"kept")
    os.setxattr(m.path / "f", "user.x", b"1")
    m.stop()
    before = {n: _digest(vol / n) for n in ("meta.db", "device.img", "checksums")}
    if how == "flag":
        ro = mount_factory(vol, "--read-only", name="ro")
        mp = ro.path
    else:
        mp = tmp_path / "romnt"
        mp.mkdir()
        r = subprocess.run(["mount", "-t", "fuse.sluice", "-o", "ro", str(vol), str(mp)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    try:
        assert (mp / "f").read_bytes() == b"kept"
        assert os.getxattr(mp / "f", "user.x") == b"1"
        assert os.statvfs(mp).f_flag & os.ST_RDONLY
        changes = [lambda: (mp / "f").write_bytes(b"x"), lambda: os.mkdir(mp / "d"),
                   lambda: os.unlink(mp / "f"), lambda: os.chmod(mp / "f", 0o600),
                   lambda: os.setxattr(mp / "f", "user.y", b"2"),
                   lambda: os.truncate(mp / "f", 0), lambda: os.rename(mp / "f", mp / "g")]
        for change in changes:
            with pytest.raises(OSError) as ei:
                change()
            assert ei.value.errno == errno.EROFS
        with Client.connect(mp) as c:  # the direct path refuses writes too
            with pytest.raises(OSError) as ei:
                c.open("f", "r+")
            assert ei.value.errno == errno.EROFS
            with c.open("f") as f:
                assert f.read() == b"kept"
    finally:
        if how != "flag":
            sluice("umount", str(mp))
        else:
            ro.stop()
    # nothing of the volume was written
    assert {n: _digest(vol / n) for n in ("meta.db", "device.img", "checksums")} == before


# -- the daemon's log: what --foreground shows, what sluice.log gets, SIGHUP reopens it -------

def _wait_for(cond, what: str, timeout: float = 30) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.02)


def test_foreground_logs_to_stderr_and_sighup_reopens_the_log(tmp_path: Path,
                                                              mount_factory) -> None:
    import json
    import signal

    from conftest import sluice
    vol = make_volume(tmp_path / "vol", "64M")
    m = mount_factory(vol)  # --foreground, stderr into m.log
    _wait_for(lambda: "INFO fs.mount: mounted" in m.log.read_text(), "mount line on stderr")
    m.stop()
    # detached: the same lines in the volume's sluice.log
    mp = tmp_path / "mnt2"
    mp.mkdir()
    sluice("mount", str(vol), str(mp))
    try:
        log = vol / "sluice.log"
        assert f"INFO fs.mount: mounted {vol} at {mp}" in log.read_text()
        pid = json.loads((vol / "mount.json").read_text())["pid"]
        # logrotate: move the log away, then SIGHUP; the daemon keeps serving
        os.rename(log, vol / "sluice.log.1")
        os.kill(pid, signal.SIGHUP)
        _wait_for(lambda: log.exists() and "SIGHUP: log reopened" in log.read_text(),
                  "reopened log")
        (mp / "f").write_bytes(b"still mounted")
        sluice("remount", str(mp), "-o", "noatime")
        assert "mount flags: rw,nosuid,nodev,noatime" in log.read_text()
        assert "noatime" not in (vol / "sluice.log.1").read_text()
        assert (mp / "f").read_bytes() == b"still mounted"
    finally:
        sluice("umount", str(mp))
    assert f"INFO fs.mount: unmounted {mp}" in log.read_text()


# -- errors: one line, no [Errno N], 2 for a bad argument and 1 at run time ----------------------

def test_errors_are_one_line_without_errno_and_exit_codes_agree(tmp_path: Path) -> None:
    from conftest import sluice
    (tmp_path / "afile").write_text("")
    cases = [
        # (arguments, exit status, what the line says)
        (["mkfs", str(tmp_path / "afile" / "vol"), "--size", "64M"], 1,
         f"{tmp_path / 'afile'} is not a directory"),
        (["mkfs", "/proc/vol", "--size", "64M"], 1, "No such file or directory: /proc/vol"),
        (["mkfs", str(tmp_path / "big"), "--size", "99999T"], 1, "File too large"),
        (["stats", str(tmp_path / "nowhere")], 1, "is not a mounted sluice volume"),
        (["fsck", str(tmp_path / "nowhere")], 8, "no such volume"),  # (could not check)
        (["mkfs"], 2, "the following arguments are required: volume"),
        (["mount", str(tmp_path), str(tmp_path), "--cache-mode", "weird"], 2,
         "invalid choice: 'weird'"),
        (["mount", str(tmp_path), str(tmp_path), "-o", "noatime,turbo"], 2,
         "unknown mount option 'turbo'"),
        (["stats", str(tmp_path), "--watch", "-1"], 2, "not a positive number of seconds"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ]
    for argv, code, fragment in cases:
        r = sluice(*argv, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code, (argv, r.returncode, r.stderr)
        assert len(lines) == 1 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert "[Errno" not in lines[0] and fragment in lines[0], (argv, lines[0])
        assert lines[0].startswith("sluice"), lines[0]


# -- principals: a refused `sluice run` leaves none behind; rates keep their units -------------

from shim_util import USER_PY, pubmnt, user_run  # noqa: E402,F401 (pubmnt: a fixture)


def _principals(mnt: Path) -> dict[str, dict]:
    import json

    from conftest import sluice
    return {r["name"]: r for r in json.loads(sluice("principal", "ls", str(mnt),
                                                    "--json").stdout)}


def _saved_names(volume: Path) -> set[str]:
    import json
    return {p["name"] for p in json.loads((volume / "principals.json").read_text()
                                          )["principals"]}


def test_a_refused_run_makes_no_principal_and_a_parents_owner_runs_as_the_child(
        volume: Path, pubmnt: Path) -> None:
    from conftest import sluice
    sluice("principal", "add", str(pubmnt), "alice")  # owned by root
    sluice("principal", "add", str(pubmnt), "bob", "--owner", "1000")
    sluice("principal", "add", str(pubmnt), "bob-batch", "--parent", "bob")  # root's
    os.chmod(pubmnt, 0o1777)
    r = user_run([USER_PY, "-m", "fs.cli", "run", str(pubmnt), "--principal", "alice", "--",
                  "true"])
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "uid 1000 may not run as principal 'alice'" in r.stderr
    # and requests through the mount and the socket that charge nothing make none either
    r = user_run(["stat", str(pubmnt)])
    assert r.returncode == 0, r.stderr
    r = user_run([USER_PY, "-m", "fs.cli", "stats", str(pubmnt)])
    assert r.returncode == 0, r.stderr
    assert "uid-1000" not in _principals(pubmnt)
    assert "uid-1000" not in _saved_names(volume)
    # the owner of bob may run as bob's child, though bob-batch is root's
    r = user_run([USER_PY, "-m", "fs.cli", "run", str(pubmnt), "--principal", "bob-batch",
                  "--", "sh", "-c", f"echo batch > {pubmnt}/by-batch"])
    assert r.returncode == 0, r.stderr
    assert _principals(pubmnt)["bob-batch"]["usage"]["inodes"] == 1
    # uid-1000 exists once it is used: charged storage, and saved then
    r = user_run(["sh", "-c", f"echo mine > {pubmnt}/mine"])
    assert r.returncode == 0, r.stderr
    t = _principals(pubmnt)
    assert t["uid-1000"]["usage"]["inodes"] == 1 and t["uid-1000"]["owner_uid"] == 1000
    assert "uid-1000" in _saved_names(volume)


def test_json_io_rates_are_strings_with_units_that_survive_a_remount(
        volume: Path, mount_factory) -> None:
    from conftest import sluice
    m = mount_factory(volume)
    sluice("principal", "add", str(m.path), "fast", "--io-limit", "2000000iops",
           "--io-reserve", "1.5GiB/s")
    sluice("principal", "add", str(m.path), "slow", "--io-limit", "20MB/s",
           "--io-reserve", "0.5KB/s")
    want = {"fast": ("1536MiB/s", "2Miops"), "slow": ("500B/s", "20MB/s")}

    def rates(mnt: Path) -> dict[str, tuple[str, str]]:
        t = _principals(mnt)
        return {n: (t[n]["banks"]["io_reserve"], t[n]["banks"]["io_limit"]) for n in want}
    assert rates(m.path) == want
    assert isinstance(_principals(m.path)["fast"]["banks"]["space"], (int, type(None)))
    # ... and beside each, the same rates as plain numbers in base units (ops/s, B/s),
    # as every other bank is given
    fast = _principals(m.path)["fast"]["banks"]
    assert (fast["io_reserve_iops"], fast["io_reserve_bps"]) == (None, 1.5 * (1 << 30))
    assert (fast["io_limit_iops"], fast["io_limit_bps"]) == (2e6, None)
    assert _principals(m.path)["slow"]["banks"]["io_reserve_bps"] == 500
    table = sluice("principal", "ls", str(m.path)).stdout
    assert "1536MiB/s/100/2Miops" in table and "500B/s/100/20MB/s" in table
    m.stop()
    m2 = mount_factory(volume, name="again")  # principals.json parses what it saved
    assert rates(m2.path) == want


def test_the_volume_holds_the_files_the_readme_lists(tmp_path: Path) -> None:
    from conftest import sluice
    vol = make_volume(tmp_path / "vol", "64M")
    base = {"volume.json", "device.json", "device.img", "checksums", "meta.db", "lock"}
    assert set(os.listdir(vol)) == base
    mp = tmp_path / "mnt"
    mp.mkdir()
    sluice("mount", str(vol), str(mp))
    try:
        assert set(os.listdir(vol)) == base | {"mount.json", "sluice.log", "meta.db-wal",
                                               "meta.db-shm"}
        sluice("principal", "add", str(mp), "a")
    finally:
        sluice("umount", str(mp))
    assert set(os.listdir(vol)) == base | {"sluice.log", "principals.json"}
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("A volume is a directory"):]
    section = section[:section.index("\n\n")]
    for name in base | {"mount.json", "sluice.log", "principals.json", "-wal", "-shm"}:
        assert f"`{name}`" in section, name


def test_none_removes_a_principals_own_limit_and_its_ancestors_still_bind(
        volume: Path, mount_factory) -> None:
    """Probe 15, F7: `--space none` and `--cache-max none` were refused, so a limit once
    set could not be taken off again (`--cache-max 0` means no cache at all). `none`
    takes a size or count bank's own limit off; its ancestors' still hold, and the
    change survives a remount."""
    from conftest import sluice
    m = mount_factory(volume)
    mnt = str(m.path)
    sluice("principal", "add", mnt, "team", "--space", "64K", "--inodes", "100")
    sluice("principal", "add", mnt, "dev", "--parent", "team", "--space", "8K",
           "--cache-max", "1M", "--grants", "10", "--connections", "5")
    sluice("principal", "set", mnt, "dev", "--space", "none", "--cache-max", "NONE",
           "--grants", "none", "--connections", "none", "--inodes", "none")
    b = _principals(m.path)["dev"]["banks"]
    assert (b["space"], b["cache_max"], b["grants"], b["connections"], b["inodes"]) == \
        (None, None, None, None, None)
    assert "space" in sluice("principal", "show", mnt, "dev").stdout
    # the parent's 64 KiB still binds: 40 KiB fits where 8 KiB did not, 100 KiB does not
    r = sluice("run", mnt, "--principal", "dev", "--", "sh", "-c",
               f"head -c 40960 /dev/zero > {mnt}/a && sync {mnt}/a", check=False)
    assert r.returncode == 0, r.stderr
    r = sluice("run", mnt, "--principal", "dev", "--", "sh", "-c",
               f"head -c 102400 /dev/zero > {mnt}/b", check=False)
    assert r.returncode != 0 and "quota" in r.stderr.lower(), r.stderr
    # a new principal given none at once; a cache-min stays a size (none is refused)
    sluice("principal", "add", mnt, "free", "--parent", "team", "--children", "none")
    assert _principals(m.path)["free"]["banks"]["children"] is None
    for bad in (["--cache-min", "none"], ["--inodes", "-1"], ["--grants", "lots"]):
        r = sluice("principal", "set", mnt, "free", *bad, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    m.stop()
    m2 = mount_factory(volume, name="again")
    assert _principals(m2.path)["dev"]["banks"]["space"] is None
    assert _principals(m2.path)["team"]["banks"]["space"] == 65536

