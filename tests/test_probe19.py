"""Probe 19 (a new user's afternoon, everyday expectations): what it found, each fixed
with a test that fails on the code before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_volume, sluice
from shim_util import pubmnt  # noqa: F401 (a fixture)

pytestmark = pytest.mark.mounted


def test_a_copy_of_a_mounted_volume_is_refused_and_leaves_the_original_served(
        tmp_path: Path, mount_factory) -> None:
    """F1: a copy of a volume (`cp -a`) has the same uuid, so the same control socket
    path; mounted beside its source, it took the source's socket (`sluice run`,
    `principal`, `stats` and direct clients of the source acted on the copy), and its
    unmount left the source with no socket at all. The copy's mount is refused, in
    one line, and the source is untouched; once the source is unmounted the copy
    mounts."""
    vol = make_volume(tmp_path / "orig", "256M")
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", "--sparse=always", str(vol), str(copy)], check=True)
    m = mount_factory(vol)
    sluice("principal", "add", str(m.path), "inorig")
    mp2 = tmp_path / "m2"
    mp2.mkdir()
    r = sluice("mount", str(copy), str(mp2), check=False)
    if r.returncode == 0:  # (the defect: do not leave the copy mounted)
        sluice("umount", str(mp2), check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "same uuid" in r.stderr and "copy" in r.stderr, r.stderr
    assert not any(line.split()[1] == str(mp2)
                   for line in Path("/proc/mounts").read_text().splitlines())
    # the source still answers on its socket, as itself
    names = {p["name"] for p in json.loads(sluice("principal", "ls", str(m.path),
                                                  "--json").stdout)}
    assert "inorig" in names
    (m.path / "f").write_bytes(b"original")
    assert json.loads(sluice("stats", str(m.path), "--json").stdout)["fs"]["inodes"] == 2
    m.stop()
    m2 = mount_factory(copy, name="m2")
    assert not (m2.path / "f").exists()
    assert "inorig" not in {p["name"] for p in json.loads(
        sluice("principal", "ls", str(m2.path), "--json").stdout)}



def test_a_volume_directory_moved_while_mounted_is_never_written_by_its_old_path(
        tmp_path: Path, mount_factory) -> None:
    """F7: the daemon wrote its files by the volume's path. After `mv vol vol2` of a
    mounted volume, `principal add` failed with a raw FileNotFoundError yet took effect
    in memory, a later write of mount.json (the mount-flag follower's) turned the
    volume read-only, and once a new volume was made at the old path the old mount's
    principals were saved into it. The daemon now writes mount.json and
    principals.json through a descriptor of the volume directory: they follow it."""
    vol = make_volume(tmp_path / "vol", "256M")
    m = mount_factory(vol)
    moved = tmp_path / "vol2"
    vol.rename(moved)
    sluice("principal", "add", str(m.path), "alice")
    assert "alice" in (moved / "principals.json").read_text()
    make_volume(vol, "256M")  # a new volume where the old one was
    before = {p.name: p.stat().st_mtime_ns for p in vol.iterdir()}
    sluice("principal", "add", str(m.path), "bob")
    (m.path / "kept").write_bytes(b"data")
    m.stop()
    assert {p.name: p.stat().st_mtime_ns for p in vol.iterdir()} == before
    assert not (moved / "mount.json").exists()  # cleared where the volume is now
    m2 = mount_factory(moved, name="again")
    assert (m2.path / "kept").read_bytes() == b"data"
    assert {"alice", "bob"} <= {p["name"] for p in json.loads(
        sluice("principal", "ls", str(m2.path), "--json").stdout)}


def test_mkfs_numbers_out_of_range_are_usage_errors(tmp_path: Path) -> None:
    """F5: `mkfs --inodes 0` and `mkfs --size 1K` said what was wrong but exited 1, where
    the README says a number out of its range is a usage error (exit 2), as
    `--size 0` was."""
    for args, words in ((["--inodes", "0"], "at least 1"),
                        (["--size", "1K"], "at least 16 blocks")):
        r = sluice("mkfs", str(tmp_path / "v"), *args, check=False)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
        assert not (tmp_path / "v").exists()


def test_a_user_refused_a_principal_under_root_is_told_what_works(volume: Path,
                                                                  pubmnt: Path) -> None:
    """F6: on a mount it may use, a user's `principal add MNT NAME` (the README's first
    example) was refused with no hint that `--parent uid-N` works. Probe 27, F12: and
    the default parent was one the user could never use; without `--parent` a user's
    principal now goes under its own `uid-N`, and `--parent root` is refused saying
    what works."""
    from shim_util import USER_PY, user_run
    r = user_run([USER_PY, "-m", "fs.cli", "principal", "add", str(pubmnt), "kid",
                  "--parent", "root"])
    assert r.returncode == 1 and "--parent uid-1000" in r.stderr, r.stderr
    r = user_run([USER_PY, "-m", "fs.cli", "principal", "add", str(pubmnt), "mine",
                  "--parent", "uid-1000"])
    assert r.returncode == 0, r.stderr
    r = user_run([USER_PY, "-m", "fs.cli", "principal", "add", str(pubmnt), "also"])
    assert r.returncode == 0, r.stderr
    shown = sluice("principal", "show", str(pubmnt), "also").stdout.splitlines()[0]
    assert "parent uid-1000" in shown, shown
    assert "mine" in sluice("principal", "ls", str(pubmnt)).stdout
    # root's default stays root
    sluice("principal", "add", str(pubmnt), "rootkid")
    assert "parent root," in sluice("principal", "show", str(pubmnt),
                                    "rootkid").stdout.splitlines()[0]


def test_sluice_run_says_127_and_126_as_env_does(volume: Path, mount_factory,
                                                 tmp_path: Path) -> None:
    """F12: `sluice run` exited 1 when it could not exec the program, which a caller
    cannot tell from the program's own 1 (make's failed build). Not found is 127,
    found but not runnable 126, as env, nice and the shells say it; the program's own
    status still passes through."""
    m = mount_factory(volume)
    sluice("principal", "add", str(m.path), "alice")
    notexec = tmp_path / "data.txt"
    notexec.write_text("not a program\n")
    for prog, code, words in ((str(tmp_path / "nope"), 127, "No such file"),
                              (str(notexec), 126, "Permission denied")):
        r = sluice("run", str(m.path), "--principal", "alice", "--", prog, check=False)
        assert r.returncode == code, (prog, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    r = sluice("run", str(m.path), "--principal", "alice", "--", "sh", "-c", "exit 7",
               check=False)
    assert r.returncode == 7



def test_a_users_mount_without_user_allow_other_says_so(tmp_path: Path) -> None:
    """F15: on a host whose /etc/fuse.conf lacks user_allow_other a user's mount failed
    with `fuse_session_mount failed` only (fusermount3's reason went to the volume's
    log). `sluice mount` checks it with /dev/fuse and fusermount3 first. (In a private
    mount namespace: a fuse.conf without the line, and a /dev/fuse the user may open,
    bound over the host's.)"""
    import shlex
    import tempfile

    from shim_util import USER_ENV, USER_PY, user_cmd
    base = Path(tempfile.mkdtemp(prefix="sluice-user-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        os.chown(base, 1000, 1000)
        r = subprocess.run(user_cmd(1000, [USER_PY, "-m", "fs.cli", "mkfs", str(base / "vol"),
                                           "--size", "64M", "-q"]),
                           capture_output=True, text=True, cwd=REPO, env=USER_ENV, timeout=60)
        assert r.returncode == 0, r.stderr
        (base / "mnt").mkdir()
        os.chown(base / "mnt", 1000, 1000)
        conf = tmp_path / "fuse.conf"
        conf.write_text("# mount_max = 1000\n#user_allow_other\n")
        dev = tmp_path / "fuse"
        mount = shlex.join(user_cmd(1000, [USER_PY, "-m", "fs.cli", "mount",
                                           str(base / "vol"), str(base / "mnt")]))
        script = (f"mount --bind {conf} /etc/fuse.conf && mknod {dev} c 10 229 && "
                  f"chmod 666 {dev} && mount --bind {dev} /dev/fuse && {mount}")
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                           capture_output=True, text=True, cwd=REPO, env=USER_ENV, timeout=60)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "user_allow_other" in r.stderr and "/etc/fuse.conf" in r.stderr, r.stderr
    finally:
        import shutil
        shutil.rmtree(base, ignore_errors=True)


def test_commands_without_the_fuse_binding_say_so_in_one_line(tmp_path: Path) -> None:
    """F16: while .build/libfuse was missing or being rebuilt every `sluice` command,
    mkfs and fsck too, died with an ImportError traceback. What needs no mount runs;
    a mount says in one line what to do. (A pyfuse3 that cannot load, first on the
    path.)"""
    fake = tmp_path / "fake" / "pyfuse3"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise ImportError("libfuse3.so.4: cannot open shared object file")\n')
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}:{REPO}"}
    vol = tmp_path / "vol"
    r = sluice("mkfs", str(vol), "--size", "64M", "-q", check=False, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = sluice("fsck", str(vol), check=False, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr
    (tmp_path / "mnt").mkdir()
    r = sluice("mount", str(vol), str(tmp_path / "mnt"), check=False, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "scripts/setup.sh" in r.stderr


def test_fsck_says_a_volume_was_not_cleanly_unmounted(volume: Path, mount_factory) -> None:
    """F17: fsck of a volume whose daemon was killed said only `clean`, as e2fsck would
    not: it now notes that the volume was not cleanly unmounted, by which daemon, and
    what that means (exit 0: nothing is wrong)."""
    m = mount_factory(volume)
    pid = json.loads((volume / "mount.json").read_text())["pid"]
    m.kill()
    r = sluice("fsck", str(volume), "-q", check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr
    assert f"note: the volume was not cleanly unmounted (daemon pid {pid} at " in r.stdout
    m.stop()  # (cleans the dead mount)
    m.start()
    m.stop()
    r = sluice("fsck", str(volume), "-q", check=False)
    assert r.returncode == 0 and "note:" not in r.stdout, r.stdout


def test_df_says_no_more_room_than_the_host_filesystem_has(tmp_path: Path, small_tmpfs,
                                                           mount_factory) -> None:
    """F13: a 1 GiB volume on a 48 MiB host filesystem said ~1 GiB available in `df`
    while writes already got ENOSPC from the host. What statfs calls available is now
    no more than the host has room for past the headroom the device keeps; the free
    blocks stay the device's (df's "used" is what the volume holds), and a writer gets
    about what df said."""
    host = small_tmpfs("48m")
    vol = make_volume(host / "vol", "1G")
    m = mount_factory(vol)
    st, hst = os.statvfs(m.path), os.statvfs(host)
    avail, host_avail = st.f_bavail * st.f_frsize, hst.f_bavail * hst.f_frsize
    assert avail <= host_avail, (avail, host_avail)  # old code: ~1 GiB
    assert st.f_bfree * st.f_frsize > 900 << 20  # the device's free blocks
    assert avail > 8 << 20  # (the headroom is an eighth of the host here: 6 MiB)
    # a writer gets what df said, give or take one reserved chunk of the device
    chunk = 1 << 20
    written = 0
    fd = os.open(m.path / "fill", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        while True:
            try:
                written += os.write(fd, b"x" * chunk)
            except OSError as exc:
                assert exc.errno == 28, exc
                break
    finally:
        os.close(fd)
    assert avail - (2 << 20) <= written <= avail + (17 << 20), (written, avail)
    after = os.statvfs(m.path)
    assert after.f_bavail * after.f_frsize <= (1 << 20) + after.f_frsize


def test_names_and_attributes_on_a_full_host_get_enospc_not_a_read_only_volume(
        tmp_path: Path, small_tmpfs, mount_factory) -> None:
    """Probe 22, F3: a 1 GiB volume on a 48 MiB host. A tenant wrote data until ENOSPC
    (the device keeps a headroom for metadata), then made files with 4 KB attributes
    (one principal may put 8 MiB of attributes into one transaction, more than the
    headroom): the commit failed ("database or disk is full") and the volume went
    read-only for every tenant. Names and attributes now get ENOSPC once the host's
    room is down to half the headroom, counting what the open transaction holds;
    the volume stays writable and fsck is clean."""
    import errno as _errno
    host = small_tmpfs("48m")
    vol = make_volume(host / "vol", "1G")
    m = mount_factory(vol)
    d = m.path / "d"
    d.mkdir()
    with open(d / "big", "wb") as f:
        with pytest.raises(OSError) as full:
            while True:
                f.write(b"z" * (1 << 20))
                f.flush()
        assert full.value.errno == _errno.ENOSPC
    errs: dict[int, int] = {}
    made = 0
    for i in range(20000):
        p = d / (f"m{i:06d}" + "q" * 200)
        try:
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
            os.setxattr(p, b"user.k", b"v" * 4000)
            made += 1
        except OSError as exc:
            errs[exc.errno] = errs.get(exc.errno, 0) + 1
            if errs[exc.errno] > 200:
                break
    assert set(errs) == {_errno.ENOSPC}, errs  # old code: EROFS after the failed commit
    assert made > 100
    import time as _time
    _time.sleep(2.5)  # two commits: none failed
    os.unlink(d / "big")  # (old code: EROFS)
    deadline = _time.monotonic() + 20
    while True:  # the host's room comes back once the unlink's commit has discarded
        try:
            (m.path / "still").write_bytes(b"writable")
            break
        except OSError as exc:
            assert exc.errno == _errno.ENOSPC and _time.monotonic() < deadline, exc
            _time.sleep(0.5)
    fd = os.open(m.path / "still", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    assert "read-only" not in m.log.read_text()
    m.stop()
    out = sluice("fsck", str(vol)).stdout
    assert out.strip().endswith("clean"), out


REFUSED_MKDIRS = r"""
import errno, os, sys
d, n = sys.argv[1], int(sys.argv[2])
got = {}
for i in range(n):
    try:
        os.mkdir(os.path.join(d, "x%06d" % i))
        got["made"] = got.get("made", 0) + 1
    except OSError as e:
        got[errno.errorcode[e.errno]] = got.get(errno.errorcode[e.errno], 0) + 1
print(" ".join(f"{k}={v}" for k, v in sorted(got.items())))
"""


def test_refused_names_do_not_use_up_the_hosts_room_for_others(
        tmp_path: Path, small_tmpfs, mount_factory) -> None:
    """Review of stop 27, F1: the full-host rule counted a name's rows before the
    request's own checks, and only a commit reset the count; refused requests commit
    nothing. A tenant's child principal with no space made 10,000 mkdirs that got
    EDQUOT, and then every tenant's new names, root's too, got ENOSPC on a host 90%
    free. Rows are counted once made."""
    host = small_tmpfs("32m")
    vol = make_volume(host / "vol", "16M")
    m = mount_factory(vol)
    sluice("principal", "add", str(m.path), "starved", "--space", "0")
    d = m.path / "d"
    d.mkdir()
    os.chmod(d, 0o777)
    r = sluice("run", str(m.path), "--principal", "starved", "--", sys.executable, "-c",
               REFUSED_MKDIRS, str(d), "10000", check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["EDQUOT=10000"], r.stdout
    hst = os.statvfs(host)
    assert hst.f_bavail * hst.f_frsize > 24 << 20  # the host is nowhere near full
    (m.path / "root-dir").mkdir()  # old code: ENOSPC
    os.symlink("target", m.path / "root-link")
    os.setxattr(m.path / "root-dir", b"user.k", b"v" * 1000)
