"""Tenants against each other through principals and the control socket (findings 2, 3,
4, 9, 15 and 16 of the hostile-user probe of 2026-12-01): a real volume, mounted, used
by real processes of other uids."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import REPO, Mount, as_uid, child_result, in_child, sluice
from shim_util import (USER_ENV, USER_PY, pubmnt,  # noqa: F401 - pubmnt is a fixture
                        user_cmd, user_run)
# (imported here: a child that became another uid cannot read the venv's modules)
from kernelshim.client import Client
from kernelshim.principals import NotAllowed  # (the client maps errors to it lazily)

BS = 4096


def table(mnt: Path) -> dict[str, dict]:
    r = sluice("principal", "ls", str(mnt), "--json")
    return {row["name"]: row for row in json.loads(r.stdout)}


def user_sluice(uid: int, *args: str) -> subprocess.CompletedProcess:
    return user_run([USER_PY, "-m", "fs.cli", *args], uid)


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0 and r.stdout == "", (r.returncode, r.stdout)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def shared_dir(mnt: Path) -> Path:
    w = mnt / "w"
    w.mkdir(exist_ok=True)
    os.chmod(w, 0o777)
    return w


# -- 2: uid-N names are uid N's ------------------------------------------------------------

def test_no_one_takes_another_uids_default_principal(pubmnt: Path) -> None:
    m = str(pubmnt)
    w = shared_dir(pubmnt)
    assert user_run(["/bin/sh", "-c", f"echo a > {w}/a"], 1000).returncode == 0  # uid-1000
    r = user_sluice(1000, "principal", "add", m, "uid-1003", "--parent", "uid-1000",
                    "--space", "0", "--connections", "0")
    assert "reserved" in one_line(r)
    # Not even root may put one anywhere but under root, owned by its uid.
    for args in (["--parent", "uid-1000", "--owner", "1003"], ["--owner", "1000"]):
        r = sluice("principal", "add", m, "uid-1003", *args, check=False)
        assert "reserved" in one_line(r), args
    # uid 1003 writes as itself, to a default of its own.
    r = user_run(["/bin/sh", "-c", f"echo hello > {w}/from-1003"], 1003)
    assert r.returncode == 0, r.stderr
    assert (w / "from-1003").read_text() == "hello\n"
    t = table(pubmnt)
    assert (t["uid-1003"]["parent"], t["uid-1003"]["owner_uid"]) == ("root", 1003)
    assert t["uid-1003"]["usage"]["inodes"] == 1
    # Root may add a uid's default before first use, as it would be made.
    sluice("principal", "add", m, "uid-1004", "--owner", "1004", "--space", "1M")
    assert (table(pubmnt)["uid-1004"]["parent"], table(pubmnt)["uid-1004"]["owner_uid"]) \
        == ("root", 1004)


@pytest.fixture
def pub_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="sluice-pub-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    if not os.path.ismount(base / "mnt"):
        shutil.rmtree(base, ignore_errors=True)


def test_a_volume_with_a_squatted_default_name(volume: Path, pub_base: Path,
                                                tmp_path: Path) -> None:
    """A volume from before uid-N names were reserved, where uid 1000 took `uid-1003`
    with no space: uid 1003 is not bound by it; the daemon says so in one line."""
    (volume / "principals.json").write_text(json.dumps({
        "root": {"banks": {}}, "next_id": 3,
        "principals": [
            {"id": 1, "name": "uid-1000", "parent": "root", "owner_uid": 1000, "banks": {}},
            {"id": 2, "name": "uid-1003", "parent": "uid-1000", "owner_uid": 1000,
             "banks": {"space": 0, "connections": 0}}]}))
    os.chmod(volume / "principals.json", 0o600)
    mp = pub_base / "mnt"
    mp.mkdir()
    mount = Mount(volume, mp, None, tmp_path / "daemon.log")
    try:
        mount.start()
        w = shared_dir(mp)
        r = user_run(["/bin/sh", "-c", f"echo hello > {w}/from-1003"], 1003)
        assert r.returncode == 0, r.stderr
        assert (w / "from-1003").read_text() == "hello\n"
        who = as_uid(1003, lambda: _whoami(mp))
        assert who["principal"] == "uid-1003:default"
        t = table(mp)
        assert t["uid-1003"]["usage"]["inodes"] == 0
        assert (t["uid-1003:default"]["parent"], t["uid-1003:default"]["owner_uid"],
                t["uid-1003:default"]["usage"]["inodes"]) == ("root", 1003, 1)
        assert mount.daemon_alive
    finally:
        mount.stop()
    log = mount.log.read_text()
    warned = [ln for ln in log.splitlines() if "is not uid 1003's default principal" in ln]
    assert len(warned) == 1, log[-3000:]
    assert "'uid-1003:default'" in warned[0] and "owner uid 1000" in warned[0]
    # What it made is saved (it holds storage now).
    saved = json.loads((volume / "principals.json").read_text())
    assert any(p["name"] == "uid-1003:default" and p["owner_uid"] == 1003
               for p in saved["principals"])


def _whoami(mp: Path) -> dict:
    with Client.connect(mp, shm_size=0) as c:
        return c.whoami()


# -- 3: the heir of a removed principal's storage ----------------------------------------

def test_rm_move_to_needs_the_heir_administered_too(pubmnt: Path) -> None:
    m = str(pubmnt)
    w = shared_dir(pubmnt)
    sluice("principal", "add", m, "t", "--owner", "1000", "--space", "100M")
    assert user_sluice(1000, "principal", "add", m, "ta", "--parent", "t").returncode == 0
    assert user_sluice(1000, "principal", "add", m, "tb", "--parent", "t").returncode == 0
    r = user_sluice(1000, "run", m, "--principal", "ta", "--", "/bin/sh", "-c",
                    f"head -c 65536 /dev/zero > {w}/big")
    assert r.returncode == 0, r.stderr
    assert user_run(["/bin/sh", "-c", f"echo v > {w}/v"], 1001).returncode == 0
    before = table(pubmnt)
    held = before["ta"]["usage"]["space"]
    assert held >= 65536
    for heir in ("uid-1001", "root"):
        r = user_sluice(1000, "principal", "rm", m, "ta", "--move-to", heir)
        assert f"may not move storage to principal '{heir}'" in one_line(r)
    after = table(pubmnt)
    assert after["ta"]["usage"] == before["ta"]["usage"]
    assert after["uid-1001"]["usage"] == before["uid-1001"]["usage"]
    # To a principal of its own it may.
    r = user_sluice(1000, "principal", "rm", m, "ta", "--move-to", "tb")
    assert r.returncode == 0, r.stderr
    t = table(pubmnt)
    assert "ta" not in t and t["tb"]["usage"]["space"] == held
    assert (w / "big").stat().st_size == 65536


# -- 16: names of other tenants' principals ----------------------------------------------

def test_refusals_do_not_tell_which_names_exist(pubmnt: Path) -> None:
    m = str(pubmnt)
    sluice("principal", "add", m, "thr", "--owner", "1000")
    assert user_run(["/bin/true"], 1001).returncode == 0
    assert user_sluice(1001, "principal", "ls", m).returncode == 0  # uid-1001 exists now
    for verb_args, wants in (
            (["principal", "set", m, "{}", "--space", "1M"], "may not change principal"),
            (["principal", "rm", m, "{}"], "may not remove principal"),
            (["principal", "add", m, "x1", "--parent", "{}"], "may not add principals under"),
            (["run", m, "--principal", "{}", "--", "/bin/true"], "may not run as principal"),
            (["principal", "show", m, "{}"], "that you may see")):
        answers = []
        for name in ("thr", "nosuch"):
            r = user_sluice(1001, *[a.replace("{}", name) for a in verb_args])
            answers.append((r.returncode, one_line(r).replace(name, "NAME")))
        assert answers[0] == answers[1], answers
        assert wants in answers[0][1], answers
        assert "exist" not in answers[0][1] and "1000" not in answers[0][1], answers
    # A taken name cannot be added again (names are global), but the answer says no
    # more than that: not that it is a principal, whose, or where.
    r = user_sluice(1001, "principal", "add", m, "thr", "--parent", "uid-1001")
    line = one_line(r)
    assert "not available" in line and "exists" not in line and "1000" not in line, line
    # Its owner, who sees it, is told plainly.
    r = user_sluice(1000, "principal", "add", m, "thr", "--parent", "thr")
    assert "'thr' exists" in one_line(r)


# -- 15: every thread of a program acts for its principal ---------------------------------

def test_second_thread_is_charged_to_the_principal(pubmnt: Path) -> None:
    m = str(pubmnt)
    w = shared_dir(pubmnt)
    sluice("principal", "add", m, "thr", "--owner", "1000", "--space", "200M")
    prog = ("import threading\n"
            f"open('{w}/main.bin', 'wb').write(b'm' * (1 << 20))\n"
            f"t = threading.Thread(target=lambda: open('{w}/other.bin', 'wb')"
            ".write(b't' * (1 << 20)))\n"
            "t.start(); t.join()\n")
    r = user_sluice(1000, "run", m, "--principal", "thr", "--", USER_PY, "-c", prog)
    assert r.returncode == 0, r.stderr
    assert (w / "other.bin").read_bytes() == b"t" * (1 << 20)
    t = table(pubmnt)
    assert t["thr"]["usage"]["inodes"] == 2
    assert t["thr"]["usage"]["space"] >= 2 << 20
    assert t.get("uid-1000", {"usage": {"inodes": 0}})["usage"]["inodes"] == 0


# -- 9: only the process that connected may register ---------------------------------------

def _set_last_pid(pid: int) -> None:
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid))


PR_SET_CHILD_SUBREAPER = 36


def _subreaper(on: bool) -> None:
    """Make this process the reaper of its orphaned descendants (or stop): the holder
    below outlives its parent, and is reaped here on every path."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_register_refused_after_the_connecting_pid_is_reused(pubmnt: Path) -> None:
    """uid 1000 connects, hands the connection to a child and exits; a uid 1001 process
    gets its pid; registering on the old connection must not bind that process."""
    _register_after_pid_reuse(pubmnt, _set_last_pid, [])


def test_pid_reuse_case_reaps_its_children_when_it_skips(pubmnt: Path) -> None:
    """The case above skips when no process gets the opener's pid; its holder of the
    connection, a grandchild waiting on a pipe, was left waiting for ever (and holding
    a connection to the mount) — it is reaped on every path now."""
    holders: list[int] = []
    with pytest.raises(pytest.skip.Exception):
        _register_after_pid_reuse(pubmnt, lambda pid: None, holders)  # never the pid
    assert len(holders) == 1
    assert not os.path.exists(f"/proc/{holders[0]}"), "the holder was left behind"


def _register_after_pid_reuse(pubmnt: Path, set_last_pid: Callable[[int], None],
                              holders: list[int]) -> None:
    m = str(pubmnt)
    w = shared_dir(pubmnt)
    sluice("principal", "add", m, "trap", "--owner", "1000", "--space", "0")
    go_r, go_w = os.pipe()          # tells the holder of the connection to register
    res_r, res_w = os.pipe()        # its answer
    pid_r, pid_w = os.pipe()        # the holder's pid, from the opener

    def connect_and_leave() -> dict:
        c = Client.connect(m, shm_size=0)
        holder = os.fork()
        if holder == 0:  # the holder: keeps the connection after its opener exits
            try:
                os.read(go_r, 1)
                try:
                    out = {"ok": c.register("trap")}
                except (NotAllowed, OSError) as exc:
                    out = {"error": type(exc).__name__, "message": str(exc)}
                os.write(res_w, json.dumps(out).encode())
            finally:
                os._exit(0)
        os.write(pid_w, str(holder).encode())
        return {"pid": os.getpid()}

    holder: int | None = None
    victim: tuple[int, int, int] | None = None
    try:
        # (its result pipe is not read: the holder keeps a copy of its write end open;
        # the holder, orphaned when the opener exits, becomes this process's child)
        _subreaper(True)
        try:
            opener, unread = in_child(1000, connect_and_leave)
            assert os.waitpid(opener, 0)[1] == 0  # exited and reaped
        finally:
            _subreaper(False)
        os.close(unread)
        os.close(pid_w)
        pid_w = -1
        got = os.read(pid_r, 32)
        assert got, "the opener forked no holder"
        holder = int(got)
        holders.append(holder)
        # A uid 1001 process with the opener's pid (pid_max is small; retry if another
        # process took it first).
        for _ in range(20):
            set_last_pid(opener - 1)
            vr, vw = os.pipe()

            def wait_then_write(vr: int = vr) -> dict:
                os.read(vr, 1)
                with open(w / "victim.txt", "w") as f:
                    f.write("mine")
                return {"pid": os.getpid()}

            pid, r = in_child(1001, wait_then_write)
            os.close(vr)  # (the child has its own)
            if pid == opener:
                victim = (pid, r, vw)
                break
            os.write(vw, b"x")
            os.close(vw)
            child_result(pid, r)
            os.unlink(w / "victim.txt")
        if victim is None:
            pytest.skip("could not get the exited opener's pid for the second process")
        os.write(go_w, b"x")
        answer = json.loads(os.read(res_r, 65536))
        pid, r, vw = victim
        victim = None
        os.write(vw, b"x")
        os.close(vw)
        assert child_result(pid, r)["pid"] == opener
        assert answer.get("error") == "NotAllowed", answer
        assert "has exited" in answer["message"]
        assert (w / "victim.txt").read_text() == "mine"
        t = table(pubmnt)
        assert t["trap"]["usage"]["inodes"] == 0
        assert t["uid-1001"]["usage"]["inodes"] == 1
    finally:
        if victim is not None:  # found, never let go: killed and reaped
            os.kill(victim[0], signal.SIGKILL)
            os.waitpid(victim[0], 0)
            os.close(victim[1])
            os.close(victim[2])
        if holder is not None:
            # (exited already on the path that let it register: then a zombie, ours, so
            # its pid is not anyone else's yet)
            os.kill(holder, signal.SIGKILL)
            os.waitpid(holder, 0)
        for fd in (go_r, go_w, res_r, res_w, pid_r, pid_w):
            if fd >= 0:
                os.close(fd)


# -- 4: group rights are those the connection was opened with -----------------------------

GROUP = 4242


@pytest.fixture
def setgid_sleep(pub_base: Path) -> Path:
    """A copy of sleep, set-group-ID group GROUP, that every uid may run."""
    helper = pub_base / "sgid-sleep"
    shutil.copy("/bin/sleep", helper)
    os.chown(helper, 0, GROUP)
    os.chmod(helper, 0o2755)
    assert os.stat(helper).st_mode & stat.S_ISGID
    return helper


def test_direct_client_groups_fixed_at_connect(pubmnt: Path, setgid_sleep: Path) -> None:
    """uid 1000 (not in GROUP) connects, forks, and execs a set-group-ID GROUP program;
    the child, still holding the connection, may not read a 0640 root:GROUP file."""
    secret = pubmnt / "secret"
    secret.write_text("for group 4242 only")
    os.chown(secret, 0, GROUP)
    os.chmod(secret, 0o640)
    m = str(pubmnt)

    def borrow() -> dict:
        c = Client.connect(m)
        opener = os.getpid()
        if os.fork() != 0:
            os.execv(str(setgid_sleep), [str(setgid_sleep), "600"])
        # The child: wait until the opener runs with GROUP as its group.
        while True:
            with open(f"/proc/{opener}/status") as f:
                gids = next(ln for ln in f if ln.startswith("Gid:")).split()[1:]
            if str(GROUP) in gids:
                break
            time.sleep(0.001)
        try:
            with c.open("secret", "r") as f:
                got: dict = {"read": bytes(f.read()).decode()}
        except OSError as exc:
            got = {"errno": exc.errno}
        finally:
            os.kill(opener, signal.SIGTERM)
        return got

    got = as_uid(1000, borrow)
    assert got == {"errno": 13}, got
    # Through the mount (requests name the caller as it is then) the same is refused.
    r = user_run(["/bin/cat", str(secret)], 1000)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_direct_client_has_its_supplementary_groups(pubmnt: Path) -> None:
    """The groups taken at connect are the real ones: a member of GROUP (a supplementary
    group) reads the 0640 root:GROUP file directly; a non-member may not."""
    secret = pubmnt / "secret"
    secret.write_text("for group 4242 only")
    os.chown(secret, 0, GROUP)
    os.chmod(secret, 0o640)
    code = ("import sys\nfrom kernelshim.client import Client\n"
            f"c = Client.connect({str(pubmnt)!r})\n"
            "try:\n"
            "    print(bytes(c.open('secret', 'r').read()).decode())\n"
            "except PermissionError as exc:\n"
            "    print('EACCES', exc.errno)\n")
    for groups, want in ((f"{GROUP}", "for group 4242 only"), ("4243,4244", "EACCES 13")):
        r = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", f"--groups={groups}",
                            "--", USER_PY, "-c", code], capture_output=True, text=True,
                           env=USER_ENV, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == want, (groups, r.stdout)


# -- probe 3, F4: re-tagging storage is no global barrier on demand -----------------------

_CHURN = """
import os, sys, time
from kernelshim.client import Client
mnt, w, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
c = Client.connect(mnt, shm_size=0)
sys.stdin.readline()
t0 = time.monotonic()
k = fails = 0
while time.monotonic() < t0 + secs:
    k += 1
    name = f"ch{k}"
    try:
        c.call("principal_add", name=name, parent="t")
        c.register(name)
        with open(f"{w}/churn-{k}", "wb") as f:
            f.write(b"x")
        c.register("t")
        for _ in range(100):  # (the file's FUSE release, which ends its grant, is async)
            try:
                c.call("principal_rm", name=name, move_to="t")
                break
            except Exception as exc:
                if "open grants" not in str(exc):
                    raise
                time.sleep(0.01)
        else:
            raise RuntimeError(f"{name}: its grant was never released")
    except Exception as exc:
        fails += 1
        print("FAIL", k, exc, file=sys.stderr)
print(k, fails, time.monotonic() - t0)
"""

_FSYNCS = """
import os, sys, time
path, secs = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
os.pwrite(fd, b"y" * 4096, 0)
os.fsync(fd)
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
n = 0
while time.monotonic() < t0 + secs:
    os.fsync(fd)
    n += 1
    time.sleep(0.005)
print(n)
"""


def test_a_tenants_rm_move_to_churn_leaves_others_fsyncs_empty(volume: Path, pub_base: Path,
                                                               tmp_path: Path) -> None:
    """Probe 3, F4: uid 1000 adds a child of its own, creates a 1-byte file as it and
    removes it with its storage moved to the parent, in a loop; uid 1001 fsyncs its
    unchanged file meanwhile. Each re-tag used to set the "everything" change mark
    (uid 1001's next fsync a full one) and force a durable commit of its own (a
    barrier of everyone's, charged to root): now it marks only the re-tagged inodes,
    and the durable commits it makes are shared and at most about one a second."""
    from fs.commit import FORCED_DURABLE_INTERVAL
    mp = pub_base / "mnt"
    mp.mkdir()
    mount = Mount(volume, mp, None, tmp_path / "daemon.log")
    secs = 4.0
    try:
        mount.start()
        m = str(mp)
        sluice("principal", "add", m, "t", "--owner", "1000", "--space", "100M")
        w = shared_dir(mp)
        (w / "u2").mkdir()
        os.chown(w / "u2", 1001, 1001)
        victim = subprocess.Popen(
            user_cmd(1001, [USER_PY, "-c", _FSYNCS, str(w / "u2" / "f"), str(secs)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=USER_ENV)
        churn = subprocess.Popen(
            user_cmd(1000, [USER_PY, "-c", _CHURN, m, str(w), str(secs)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=REPO, env=USER_ENV)
        try:
            assert victim.stdout is not None and victim.stdout.readline() == "ready\n"
            time.sleep(1.5)  # (the timer's commit of the victim's write is behind us)
            before = json.loads(sluice("stats", m, "--json").stdout)["fs"]
            for p in (victim, churn):
                assert p.stdin is not None
                p.stdin.write("\n")
                p.stdin.flush()
            out, err = churn.communicate(timeout=120)
            vout, _ = victim.communicate(timeout=120)
        finally:
            for p in (victim, churn):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        after = json.loads(sluice("stats", m, "--json").stdout)["fs"]
        assert churn.returncode == 0, err
        cycles, fails, took = out.split()
        n = int(vout)
        assert int(cycles) >= 3 and int(fails) == 0, (out, err)
        # Every fsync of the unchanged file was empty: no barrier, no durable commit.
        assert after["empty_fsyncs"] - before["empty_fsyncs"] == n, (before, after, n)
        # The re-tags made at most one durable commit per interval between them.
        made = after["durable_commits"] - before["durable_commits"]
        assert made <= float(took) / FORCED_DURABLE_INTERVAL + 2, (made, out)
        # The storage is the parent's, all of it: nothing lost, nothing twice.
        t = table(mp)
        assert t["t"]["usage"]["inodes"] == int(cycles), t["t"]
        assert not any(name.startswith("ch") for name in t), sorted(t)
        assert mount.daemon_alive
    finally:
        mount.stop()
    r = sluice("fsck", str(volume), check=False)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
