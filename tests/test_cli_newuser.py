"""What a new user's first session found (the report of 2026-12-01, docs/RELIABILITY.md):
usage errors that exited 1 instead of 2, messages that leaked errno text or said less
than they knew, a traceback into a closed pipe, and a user's mount refused without the
reason. Each case runs the real command (as root, or as uid 1000 through setpriv)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, SLUICE, is_mounted, make_volume, sluice
from shim_util import USER_PY, pubmnt, user_python, user_run  # noqa: F401 - pubmnt is a fixture

pytestmark = pytest.mark.mounted


def one_line(r: subprocess.CompletedProcess, *fragments: str, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "[Errno" not in lines[0] and "No data available" not in lines[0], lines[0]
    return lines[0]


# -- P-4, P-5, P-6: a bad argument is a usage error, exit 2 -----------------------------------

def test_bad_arguments_exit_2_with_one_line(mnt: Path, tmp_path: Path) -> None:
    (mnt / "f").write_bytes(b"1")
    sluice("principal", "add", str(mnt), "alice", "--io-weight", "7")
    vol2 = make_volume(tmp_path / "v2", "64M")
    mp = tmp_path / "mp"
    mp.mkdir()
    weight = "must be a whole number of at least 1"
    cases = [
        (["hint", str(mnt / "f"), "--priority", "500"], "500: must be a whole number from -100"),
        (["mount", str(vol2), str(mp), "--idle-poll", "5000"], "5000 µs is outside"),
        (["mount", str(vol2), str(mp), "--profile", "bogus"], "unknown profile 'bogus'"),
        (["mkfs", str(tmp_path / "v3"), "--block-size", "1000"],
         "block size 1000: must be a power of two"),
        (["principal", "set", str(mnt), "alice", "--io-weight", "0"], f"0: {weight}"),
        # one message for every bad weight (no internal bound, no "0.." range)
        (["principal", "set", str(mnt), "alice", "--io-weight=-3"], f"-3: {weight}"),
        (["principal", "set", str(mnt), "alice", "--io-weight", "many"], f"many: {weight}"),
        (["principal", "add", str(mnt), "bob", "--io-weight", "0"], f"0: {weight}"),
        (["run", str(mnt), "--principal", "alice"], "no command given"),
        # stop 23's new user: these exited 1
        (["principal", "add", str(mnt), "bad name!"], "a principal's name is 1 to 64"),
        (["mount", str(vol2), str(mp), "--metrics", "localhost"],
         "--metrics: 'localhost' is not ADDRESS:PORT"),
        # the program without `--`: told how to write it, as `sluice run`
        (["run", str(mnt), "--principal", "alice", "true"],
         f"put the program after --: sluice run {mnt} --principal alice -- true"),
    ]
    for args, text in cases:
        r = sluice(*args, check=False)
        one_line(r, f"sluice {args[0]}", text, code=2)
    assert not is_mounted(mp) and not (tmp_path / "v3").exists()
    rows = {r["name"]: r for r in json.loads(
        sluice("principal", "ls", str(mnt), "--json").stdout)}
    assert rows["alice"]["banks"]["io_weight"] == 7 and "bob" not in rows
    # With `--` it runs, as the principal.
    r = sluice("run", str(mnt), "--principal", "alice", "--", "sh", "-c",
               f"echo hi > {mnt}/by-alice")
    assert r.returncode == 0 and (mnt / "by-alice").read_text() == "hi\n"


def test_hint_and_a_fixed_volume_count_in_good_english(mnt: Path, tmp_path: Path) -> None:
    (mnt / "f").write_bytes(b"1")
    r = sluice("hint", str(mnt / "f"), "--priority", "7")
    assert r.stdout.strip() == "set priority=7 on 1 file or directory", r.stdout
    vol = make_volume(tmp_path / "v", "64M")
    os.chmod(vol / "volume.json", 0o644)
    r = sluice("fsck", str(vol), "--fix-permissions", "-q", check=False)
    assert "made 1 file of" in r.stderr and "1 files" not in r.stderr, r.stderr


# -- S-3: a cache below the smallest pool is refused ---------------------------------------

def test_cache_size_below_the_smallest_pool_is_refused(volume: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    for args in (["--cache-size", "1"], ["-o", "cache_size=32K"]):
        r = sluice("mount", str(volume), str(mp), *args, check=False)
        one_line(r, "below the smallest pager pool, 64.0KiB (16 blocks of 4096 bytes)",
                 code=2)
        assert not is_mounted(mp)


# -- P-2, P-7: say what the path is ----------------------------------------------------------

def test_not_a_mount_says_what_the_path_is(volume: Path, mount_factory, tmp_path: Path) -> None:
    m = mount_factory(volume)
    plain = tmp_path / "plain"
    plain.mkdir()
    for args in (["stats", str(plain)], ["principal", "ls", str(plain)],
                 ["run", str(plain), "--principal", "root", "--", "true"],
                 ["umount", str(plain)]):
        one_line(sluice(*args, check=False), f"{plain} is not a mounted sluice volume",
                 code=1)
    # The volume directory given for the mount point: where it is mounted.
    for args in (["stats", str(volume)], ["umount", str(volume)],
                 ["principal", "ls", str(volume)]):
        one_line(sluice(*args, check=False), f"{volume} is a sluice volume, not a mount "
                 f"point: it is mounted at {m.path}", code=1)
    # A directory inside the mount: which mount to give (probe 27, F6: "is not a
    # mounted sluice volume", of a path that is on one)
    sub = m.path / "doc"
    sub.mkdir()
    for args in (["stats", str(sub)], ["principal", "ls", str(sub)],
                 ["run", str(sub), "--principal", "root", "--", "true"]):
        one_line(sluice(*args, check=False), f"{sub} is inside the sluice mount "
                 f"{m.path}: give the mount point", code=1)
    assert is_mounted(m.path)


def test_repair_of_a_read_only_mount_says_to_unmount(volume: Path, mount_factory) -> None:
    m = mount_factory(volume, "--read-only")
    r = sluice("fsck", str(volume), "--repair", check=False)
    one_line(r, f"mounted at {m.path}", "--repair needs it unmounted",
             f"sluice umount {m.path}", code=8)  # (fsck could not check: 8)
    assert sluice("fsck", str(volume), "-q").returncode == 0  # a check is fine
    assert m.daemon_alive


def test_a_dead_mount_says_its_daemon_is_gone(volume: Path, mount_factory) -> None:
    m = mount_factory(volume)
    m.kill()
    for args in (["stats", str(m.path)], ["principal", "ls", str(m.path)]):
        one_line(sluice(*args, check=False), f"{m.path} is a dead mount: its daemon is "
                 "not running", "sluice mount", code=1)


# -- P-1: output into a pipe whose reader went away -----------------------------------------

def _reader_gone(argv: list[str]) -> tuple[int, str]:
    """Run `argv` with its stdout a pipe closed before it writes (`| head -0`)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                         text=True)
    assert p.stdout is not None
    p.stdout.close()
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def test_a_reader_that_went_away_ends_output_quietly(mnt: Path, tmp_path: Path) -> None:
    from pager.trace import READ, make_records, write_trace
    trace = tmp_path / "t.bin"
    write_trace(trace, make_records([(i * 1e-3, 0, 1, 5, i % 40, i % 40, READ, 0, 0)
                                     for i in range(400)]))
    py = sys.executable
    for argv in ([py, "-m", "pager.replay", str(trace), "--frames", "16"],
                 [py, "-m", "pager.replay", "--help"],
                 [*SLUICE, "principal", "ls", str(mnt)],
                 [*SLUICE, "stats", str(mnt), "--json"],
                 [*SLUICE, "--help"],
                 [py, "scripts/bench_pager.py", "--help"],
                 [py, "scripts/bench_qos.py", "--help"]):
        rc, err = _reader_gone(argv)
        assert rc == 0 and "Traceback" not in err and "BrokenPipe" not in err, (argv, rc, err)


def test_replay_of_a_missing_trace_is_one_plain_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pager.replay", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=REPO)
    one_line(r, f"cannot read {tmp_path / 'none'}: No such file or directory", code=1)


# -- as another user: P-3, W-5, and a direct client's refusal (P-2) -------------------------

def test_a_user_may_not_unmount_roots_mount_and_is_told_why(pubmnt: Path) -> None:
    r = user_run([USER_PY, "-m", "fs.cli", "umount", str(pubmnt)])
    one_line(r, f"{pubmnt} is uid 0's mount, not yours", code=1)
    assert "mtab" not in r.stderr
    assert is_mounted(pubmnt)


def test_a_direct_clients_refusal_names_the_path(pubmnt: Path) -> None:
    (pubmnt / "secret").write_bytes(b"s")
    os.chmod(pubmnt / "secret", 0o600)
    out = user_python(f"""
        from kernelshim.client import Client
        with Client.connect({str(pubmnt)!r}, shm_size=0) as c:
            try:
                c.open("secret", "r")
            except PermissionError as exc:
                print(exc)
    """)
    assert "secret: permission denied (read on the file)" in out, out
    assert "inode" not in out and "0o" not in out, out


def test_a_users_mount_without_dev_fuse_says_so(tmp_path: Path) -> None:
    if os.stat("/dev/fuse").st_mode & 0o006 == 0o006:
        pytest.skip("/dev/fuse is open to every user on this host")
    base = Path(tempfile.mkdtemp(prefix="sluice-user-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        vol = make_volume(base / "vol", "64M")
        mp = base / "mp"
        mp.mkdir()
        for p in (vol, mp, *vol.iterdir()):
            os.chown(p, 1000, 1000)
        r = user_run([USER_PY, "-m", "fs.cli", "mount", str(vol), str(mp)])
        mode = stat.filemode(os.stat("/dev/fuse").st_mode)
        one_line(r, "cannot open /dev/fuse for reading and writing", mode,
                 "a mount by a user other than root needs it", code=1)
        assert not is_mounted(mp)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- the new user's report of stop 23 (docs/RELIABILITY.md) ---------------------------------

def test_version() -> None:
    r = subprocess.run([*SLUICE, "--version"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith("sluice 0."), (r.stdout, r.stderr)


def test_mkfs_does_not_make_missing_parents(tmp_path: Path) -> None:
    """A typo in mkfs's path made a tree of directories (`/nonexistent/dir/vol`)."""
    r = subprocess.run([*SLUICE, "mkfs", str(tmp_path / "typo" / "dir" / "vol"), "--size",
                        "64M", "-q"], capture_output=True, text=True, cwd=REPO)
    one_line(r, f"its parent directory {tmp_path / 'typo' / 'dir'} does not exist",
             "mkdir -p", code=1)
    assert not (tmp_path / "typo").exists()


def test_adding_a_uid_principal_without_its_owner_says_which(mnt: Path) -> None:
    r = subprocess.run([*SLUICE, "principal", "add", str(mnt), "uid-5"],
                       capture_output=True, text=True, cwd=REPO)
    one_line(r, "'uid-5' is reserved for the default principal of uid 5", "--owner 5",
             code=1)
    sluice("principal", "add", str(mnt), "uid-5", "--owner", "5")
    assert "uid-5" in sluice("principal", "ls", str(mnt)).stdout


def test_principal_set_and_rm_refusals_say_what_to_do(mnt: Path) -> None:
    """The new user's lows of stop 23: `principal set` of a uid's default not made yet,
    and `principal rm` of a principal with children, said what was wrong, not what to
    do about it."""
    r = subprocess.run([*SLUICE, "principal", "set", str(mnt), "uid-7", "--space", "1M"],
                       capture_output=True, text=True, cwd=REPO)
    one_line(r, "no principal named 'uid-7'", "has not used the volume yet",
             "principal add uid-7 --owner 7", code=1)
    sluice("principal", "add", str(mnt), "par")
    sluice("principal", "add", str(mnt), "kid", "--parent", "par")
    r = subprocess.run([*SLUICE, "principal", "rm", str(mnt), "par"],
                       capture_output=True, text=True, cwd=REPO)
    one_line(r, "'par' has children: kid", "remove them first", code=1)


def test_errors_of_a_command_family_name_its_action(mnt: Path, tmp_path: Path) -> None:
    """Every error of `sluice principal ACTION` begins `sluice principal ACTION:`, whether
    argparse, the CLI's own checks or the daemon refused it; so does `sluice trace
    ACTION`'s. Left from probe 27: argparse's said `sluice principal set:`, the others
    `sluice principal:`."""
    m = str(mnt)
    cases = [
        # (argparse: a value that does not parse, and unknown arguments)
        (["principal", "set", m, "nosuch", "--io-limit", "5zz"], 2),
        (["principal", "ls", m, "--bogus"], 2),
        # (the CLI's own: a path that is no mount, a principal the caller may not see)
        (["principal", "ls", str(tmp_path)], 1),
        (["principal", "show", m, "nosuch"], 1),
        # (the daemon's refusals)
        (["principal", "set", m, "nosuch", "--cache-min", "2M", "--cache-max", "1M"], 1),
        (["principal", "set", m, "nosuch", "--space", "1M"], 1),
        (["principal", "rm", m, "nosuch"], 1),
        (["principal", "add", m, "kid", "--parent", "nosuch"], 1),
        (["trace", "record", str(tmp_path), str(tmp_path / "t.bin")], 1),
    ]
    for args, code in cases:
        r = sluice(*args, check=False)
        line = one_line(r, code=code)
        assert line.startswith(f"sluice {args[0]} {args[1]}: "), (args, line)


def test_another_users_volume_is_refused_in_one_line(volume: Path) -> None:
    """A user who may not enter root's (0700) volume got a bare `Permission denied:
    .../volume.json` from fsck and mount; one who cannot reach it, a bare `Permission
    denied: PATH`."""
    base = Path(tempfile.mkdtemp(prefix="sluice-user-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        vol = make_volume(base / "vol", "64M")
        for argv in (["fsck", str(vol)], ["mount", str(vol), "/tmp"]):
            r = user_run([USER_PY, "-m", "fs.cli", *argv])
            one_line(r, f"{vol}: permission denied: the volume belongs to uid 0 (mode 0700)",
                     "only its owner or root", code=8 if argv[0] == "fsck" else 1)
        # (pytest's directory is closed to other users)
        r = user_run([USER_PY, "-m", "fs.cli", "fsck", str(volume)])
        one_line(r, f"{volume}: permission denied: a directory on the way to it is closed "
                 "to uid 1000", code=8)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unmounting_a_busy_mount_says_what_to_do(volume: Path, mount_factory) -> None:
    m = mount_factory(volume)
    p = subprocess.Popen(["sleep", "30"], cwd=m.path)
    try:
        r = subprocess.run([*SLUICE, "umount", str(m.path)], capture_output=True, text=True,
                           cwd=REPO)
        one_line(r, f"cannot unmount {m.path}: it is busy", f"fuser -vm {m.path}", code=1)
        assert "fusermount3" not in r.stderr
        assert is_mounted(m.path)
    finally:
        p.kill()
        p.wait()
