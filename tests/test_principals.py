"""Principals and their banks on a mounted volume: space and inode quotas (EDQUOT through
FUSE, exact usage accounting, recount at mount), the hierarchy rules (limits are
ceilings, guarantees are carved, charges go up the tree), and attribution of file
operations to principals (`sluice run`, uid defaults, ownership of principals).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, SLUICE, Mount, sluice
from shim_util import USER_PY, pubmnt, user_run  # noqa: F401 (fixture)
from kernelshim.client import Client
from kernelshim.principals import ENTRY_COST, PrincipalError

pytestmark = pytest.mark.mounted

BS = 4096
MiB = 1 << 20
#: writes 64 KiB chunks to argv[1] until argv[2] bytes are written or a write fails
WRITER = textwrap.dedent("""
    import os, sys
    path, total = sys.argv[1], int(sys.argv[2])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    n = 0
    chunk = b"q" * 65536
    try:
        while n < total:
            n += os.write(fd, chunk)
        os.fsync(fd)
        print("ok", n)
    except OSError as e:
        print("err", e.errno, n)
    os.close(fd)
""")


def table(mnt: Path) -> dict[str, dict]:
    rows = json.loads(sluice("principal", "ls", str(mnt), "--json").stdout)
    return {r["name"]: r for r in rows}


def usage(mnt: Path) -> dict[str, tuple[int, int]]:
    """name -> (space, inodes) used."""
    return {n: (r["usage"]["space"], r["usage"]["inodes"]) for n, r in table(mnt).items()}


def stats(mnt: Path) -> dict:
    return json.loads(sluice("stats", str(mnt), "--json").stdout)


def entry(name: str) -> int:
    return ENTRY_COST + len(name.encode())


def file_cost(path: Path) -> int:
    """What a file with one name costs: its blocks, and its directory entry."""
    st = os.stat(path)
    assert st.st_blocks * 512 == -(-st.st_size // BS) * BS  # no preallocation left over
    return st.st_blocks * 512 + entry(path.name)


def run_writer(mnt: Path, principal: str, path: Path, total: int) -> subprocess.Popen:
    return subprocess.Popen([*SLUICE, "run", str(mnt), "--principal", principal, "--",
                             sys.executable, "-c", WRITER, str(path), str(total)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def fails_one_line(*args: str) -> str:
    r = sluice(*args, check=False)
    assert r.returncode == 1, (args, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    # (a family of commands says its action too: `sluice principal set: ...`)
    cmd = " ".join(args[:2]) if args[0] in ("principal", "trace") else args[0]
    assert lines[0].startswith(f"sluice {cmd}: "), lines
    assert "Traceback" not in r.stderr
    return lines[0]


# -- 1. quotas -----------------------------------------------------------------------------

def test_space_quota_edquot_while_other_writes(mnt: Path) -> None:
    m = str(mnt)
    sluice("principal", "add", m, "a", "--space", "8M")
    sluice("principal", "add", m, "b", "--space", "64M")
    (mnt / "qa").mkdir()
    (mnt / "qb").mkdir()
    before = usage(mnt)
    assert before["a"] == (0, 0) and before["b"] == (0, 0)
    assert before["root"] == (entry("qa") + entry("qb"), 3)  # root dir, qa, qb
    pa = run_writer(mnt, "a", mnt / "qa" / "big", 16 * MiB)
    pb = run_writer(mnt, "b", mnt / "qb" / "big", 32 * MiB)
    out_a, err_a = pa.communicate(timeout=120)
    out_b, err_b = pb.communicate(timeout=120)
    assert pa.returncode == 0 and pb.returncode == 0, (err_a, err_b)
    word, code, n = out_a.split()
    assert (word, int(code)) == ("err", errno.EDQUOT), out_a
    n = int(n)
    # Everything up to the bank fits, the next chunk does not.
    assert 8 * MiB - 65536 - entry("big") < n <= 8 * MiB - entry("big"), n
    assert out_b.split() == ["ok", str(32 * MiB)], out_b
    assert os.path.getsize(mnt / "qa" / "big") == n
    assert (mnt / "qb" / "big").stat().st_size == 32 * MiB

    u = usage(mnt)
    cost_a, cost_b = file_cost(mnt / "qa" / "big"), file_cost(mnt / "qb" / "big")
    assert cost_a == -(-n // BS) * BS + entry("big")
    assert u["a"] == (cost_a, 1)
    assert u["b"] == (32 * MiB + entry("big"), 1) == (cost_b, 1)
    assert u["root"] == (before["root"][0] + cost_a + cost_b, 5)
    assert u["a"][0] <= 8 * MiB
    io = stats(mnt)["device"]["per_principal"]
    assert io["a"]["bytes_written"] == n
    assert io["b"]["bytes_written"] == 32 * MiB

    # Deleting gives back exactly what was charged; then a may write again.
    os.unlink(mnt / "qa" / "big")
    os.unlink(mnt / "qb" / "big")
    assert usage(mnt) == before
    p = run_writer(mnt, "a", mnt / "qa" / "again", 4 * MiB)
    out, err = p.communicate(timeout=60)
    assert out.split() == ["ok", str(4 * MiB)], err
    assert usage(mnt)["a"] == (4 * MiB + entry("again"), 1)


def test_inode_quota(mnt: Path) -> None:
    sluice("principal", "add", str(mnt), "c", "--inodes", "5")
    (mnt / "qc").mkdir()
    code = textwrap.dedent("""
        import os, sys
        d = sys.argv[1]
        for i in range(10):
            try:
                if i == 2:
                    os.mkdir(os.path.join(d, "sub"))  # a directory is an inode too
                    continue
                open(os.path.join(d, f"f{i}"), "wb").close()
            except OSError as e:
                print(i, e.errno)
                break
        else:
            print("no error")
    """)
    r = sluice("run", str(mnt), "--principal", "c", "--", sys.executable, "-c", code,
               str(mnt / "qc"))
    assert r.stdout.split() == ["5", str(errno.EDQUOT)]
    names = sorted(os.listdir(mnt / "qc"))
    assert names == ["f0", "f1", "f3", "f4", "sub"]
    assert usage(mnt)["c"] == (sum(entry(n) for n in names), 5)
    # Symlinks, mknod and hard links: the same bank (links cost an entry, no inode).
    r = sluice("run", str(mnt), "--principal", "c", "--", sys.executable, "-c",
               "import os, sys; d = sys.argv[1]\n"
               "for fn in (lambda: os.symlink('f0', d + '/s'), lambda: os.mkfifo(d + '/p')):\n"
               "    try: fn()\n"
               "    except OSError as e: print(e.errno)\n"
               "os.link(d + '/f0', d + '/hard')\n", str(mnt / "qc"))
    assert r.stdout.split() == [str(errno.EDQUOT)] * 2
    assert usage(mnt)["c"] == (sum(entry(n) for n in names) + entry("hard"), 5)
    os.unlink(mnt / "qc" / "f0")
    assert usage(mnt)["c"] == (sum(entry(n) for n in names if n != "f0") + entry("hard"), 5)
    os.unlink(mnt / "qc" / "hard")
    assert usage(mnt)["c"] == (sum(entry(n) for n in names if n != "f0"), 4)
    r = sluice("run", str(mnt), "--principal", "c", "--", "touch", str(mnt / "qc" / "new"))
    assert usage(mnt)["c"][1] == 5


def test_usage_recounted_at_mount(volume: Path, mount_factory) -> None:
    m: Mount = mount_factory(volume)
    mp = str(m.path)
    sluice("principal", "add", mp, "a", "--space", "64M", "--inodes", "100")
    sluice("principal", "add", mp, "kid", "--parent", "a", "--space", "32M")
    sluice("principal", "add", mp, "b")
    (m.path / "d").mkdir()
    os.chmod(m.path / "d", 0o777)
    script = ("set -e; mkdir d/sub; dd if=/dev/urandom of=d/sub/x bs=1000 count=77 status=none;"
              " printf hi > d/y; ln d/y d/y2; ln -s y d/sym; truncate -s 100000 d/sparse")
    for who in ("a", "kid", "b"):
        sluice("run", mp, "--principal", who, "--", "sh", "-c",
               f"cd {mp}; " + script.replace("d/", f"d/{who}-"))
    # A uid's default principal (root writes as uid 1000 here: no traversal needed).
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(m.path / "d")  # the path to it is root's only
            os.setgroups([])
            os.setgid(1000)
            os.setuid(1000)
            with open("user", "wb") as f:
                f.write(b"12345")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert (m.path / "d" / "user").read_bytes() == b"12345"
    os.unlink(m.path / "d" / "a-y")  # a-y2 keeps the inode
    before = table(m.path)

    def cost(who: str) -> int:  # 77000 bytes: 19 blocks; "hi": 1; sparse: none; the
        # symlink: its one-byte target "y" (issue 6: targets are charged)
        return (20 * BS + entry("x") + len("y") + sum(
            entry(f"{who}-{n}") for n in ("sub", "y", "y2", "sym", "sparse")))
    assert before["kid"]["usage"]["space"] == cost("kid")
    assert before["kid"]["usage"]["inodes"] == 5
    assert before["a"]["usage"]["space"] == cost("kid") + cost("a") - entry("a-y")
    assert before["a"]["usage"]["inodes"] == 10
    assert before["b"]["usage"]["space"] == cost("b")
    assert before["uid-1000"]["usage"] == {"space": BS + entry("user"), "inodes": 1,
                                           "grants": 0, "caps": 0, "connections": 0,
                                           "shm": 0, "children": 0, "parked": 0,
                                           "parked_bytes": 0}
    m.stop()
    m.start()
    after = table(m.path)
    assert after == before
    m.stop()
    assert "clean" in sluice("fsck", str(volume)).stdout


# -- 2. hierarchy ----------------------------------------------------------------------------

def test_hierarchy_limits_and_carving(mnt: Path) -> None:
    m = str(mnt)
    sluice("principal", "add", m, "par", "--space", "8M", "--inodes", "50", "--cache-min",
           "16M", "--cache-max", "64M", "--io-reserve", "20MB/s", "--io-limit", "100MB/s")
    # Limits are ceilings: a child may not hold more than its parent (the CLI says so in
    # one line and exits 1).
    for bad in (["--space", "16M"], ["--cache-max", "128M"]):
        msg = fails_one_line("principal", "add", m, "kid", "--parent", "par", *bad)
        assert "exceeds" in msg and "par" in msg, msg
    fails_one_line("principal", "add", m, "c2", "--parent", "par", "--cache-min", "17M")
    with Client.connect(mnt, shm_size=0) as ctl:
        def add(name: str, **banks) -> None:
            ctl.call("principal_add", name=name, parent="par", **banks)

        def refused(op: str, name: str, **banks) -> None:
            with pytest.raises(PrincipalError):
                if op == "add":
                    add(name, **banks)
                else:
                    ctl.call("principal_set", name=name, **banks)

        for bad in ({"space": 8 * MiB + 1}, {"cache_max": 64 * MiB + 1}, {"inodes": 51},
                    {"io_limit": "200MB/s"}, {"grants": 5000}, {"caps": 4097}):
            refused("add", "kid", **bad)
        assert "kid" not in table(mnt)
        add("kid", space=8 * MiB, cache_max=64 * MiB, inodes=50, io_limit="100MB/s")
        # Guarantees are carved: the children's together fit in the parent's.
        add("c1", cache_min=10 * MiB, io_reserve="15MB/s", space=4 * MiB)
        refused("add", "c2", cache_min=10 * MiB)
        refused("add", "c2", io_reserve="10MB/s")
        refused("add", "c2", io_reserve="100iops")  # other units than the parent's
        add("c2", cache_min=6 * MiB, io_reserve="5MB/s")
        refused("add", "c3", cache_min=1)
        refused("set", "c2", cache_min=7 * MiB)
        refused("set", "c1", io_reserve="16MB/s")
        refused("set", "c1", cache_min=65 * MiB)  # over the parent's cache_max too
        ctl.call("principal_set", name="c1", cache_min=4 * MiB)  # gives 6M back
        add("c3", cache_min=6 * MiB)
        # Nothing to carve from: a parent with no io_reserve of its own.
        with pytest.raises(PrincipalError):
            ctl.call("principal_add", name="gk", parent="c3", io_reserve="1MB/s")
        # A parent cannot shrink below what its children hold.
        refused("set", "par", space=8 * MiB - 1)       # kid holds 8M
        refused("set", "par", cache_min=8 * MiB)       # children carve 16M of it
        refused("set", "par", io_reserve="10MB/s")     # children reserve 20MB/s
        refused("set", "par", io_reserve="1000iops")
        ctl.call("principal_set", name="par", cache_min=32 * MiB, io_reserve="40MB/s")
    fails_one_line("principal", "set", m, "par", "--cache-min", "8M")
    # Unknown names and bad values: one line, exit 1.
    fails_one_line("principal", "add", m, "x", "--parent", "nosuch")
    fails_one_line("principal", "add", m, "kid")  # exists
    r = sluice("principal", "add", m, "bad name!", check=False)  # a usage error (stop 23)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "1 to 64" in r.stderr
    r = sluice("principal", "add", m, "w", "--io-limit", "fast", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad rate 'fast'" in r.stderr
    fails_one_line("principal", "rm", m, "par")  # has children
    t = table(mnt)
    assert {n for n in t if t[n]["parent"] == "par"} == {"kid", "c1", "c2", "c3"}
    assert t["c1"]["banks"]["cache_min"] == 4 * MiB
    assert t["c1"]["banks"]["io_reserve"] == "15MB/s"
    assert t["c2"]["banks"]["cache_min"] == 6 * MiB
    assert t["par"]["banks"] | {} == {**t["par"]["banks"], "space": 8 * MiB,
                                      "cache_min": 32 * MiB, "io_reserve": "40MB/s"}
    sluice("principal", "rm", m, "c3")
    assert "c3" not in table(mnt)


def test_parent_limit_binds_child(mnt: Path) -> None:
    m = str(mnt)
    sluice("principal", "add", m, "par", "--space", "8M")
    sluice("principal", "add", m, "kid", "--parent", "par")  # no limit of its own
    sluice("principal", "add", m, "gkid", "--parent", "kid")
    (mnt / "w").mkdir()
    p = run_writer(mnt, "gkid", mnt / "w" / "f", 32 * MiB)
    out, err = p.communicate(timeout=120)
    word, code, n = out.split()
    assert (word, int(code)) == ("err", errno.EDQUOT), (out, err)
    n = int(n)
    assert 8 * MiB - 65536 - entry("f") < n <= 8 * MiB
    u = usage(mnt)
    cost = file_cost(mnt / "w" / "f")
    # The charge went to gkid and every ancestor.
    assert u["gkid"] == u["kid"] == u["par"] == (cost, 1)
    assert u["root"][0] == cost + entry("w")
    # A sibling shares the parent's bank: nothing left for it either.
    sluice("principal", "add", m, "sib", "--parent", "par")
    r = sluice("run", m, "--principal", "sib", "--", sys.executable, "-c",
               "import os, sys\nfd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)\n"
               "try: os.write(fd, b'x' * 131072)\nexcept OSError as e: print(e.errno)\n",
               str(mnt / "w" / "g"))
    assert r.stdout.split() == [str(errno.EDQUOT)]
    assert usage(mnt)["sib"] == (entry("g"), 1)
    os.unlink(mnt / "w" / "f")
    u = usage(mnt)
    assert u["gkid"] == u["kid"] == (0, 0)
    assert u["par"] == u["sib"] == (entry("g"), 1)


# -- 3. attribution --------------------------------------------------------------------------

def test_run_attributes_children_and_defaults(pubmnt: Path) -> None:
    mnt = pubmnt
    m = str(mnt)
    sluice("principal", "add", m, "p")
    w = mnt / "w"
    w.mkdir()
    os.chmod(w, 0o777)
    script = ('mkdir sub && dd if=/dev/zero of=f1 bs=4096 count=256 status=none && '
              '(cd sub && python3 -c "open(\'f2\', \'wb\').write(b\'y\' * 40960)") && '
              'sh -c "printf abc > sub/f3" & wait')
    r = sluice("run", m, "--principal", "p", "--", "sh", "-c", f"cd {w} && {{ {script}; }}")
    assert r.returncode == 0
    assert (w / "sub" / "f2").read_bytes() == b"y" * 40960
    u = usage(mnt)
    names = ("sub", "f1", "f2", "f3")
    assert u["p"] == ((256 + 10 + 1) * BS + sum(entry(n) for n in names), 4)
    io = stats(mnt)["device"]["per_principal"]
    assert io["p"]["bytes_written"] == (256 + 10 + 1) * BS
    assert io["p"]["writes"] >= 3
    assert u["root"][0] == u["p"][0] + entry("w")

    # After `sluice run` exited, new processes are not p's.
    (w / "rootfile").write_bytes(b"r" * BS)
    u2 = usage(mnt)
    assert u2["p"] == u["p"]
    assert u2["root"][0] == u["root"][0] + BS + entry("rootfile")

    # An unregistered process of uid 1000 is charged to uid-1000 (made on first use).
    assert "uid-1000" not in u2
    r = user_run([USER_PY, "-c", f"open({str(w / 'mine')!r}, 'wb').write(b'z' * 8192)"])
    assert r.returncode == 0, r.stderr
    t = table(mnt)
    assert t["uid-1000"]["owner_uid"] == 1000 and t["uid-1000"]["parent"] == "root"
    assert (t["uid-1000"]["usage"]["space"], t["uid-1000"]["usage"]["inodes"]) == \
        (2 * BS + entry("mine"), 1)
    assert stats(mnt)["device"]["per_principal"]["uid-1000"]["bytes_written"] == 2 * BS
    assert usage(mnt)["p"] == u["p"]


def _user_sluice(uid: int, *args: str) -> subprocess.CompletedProcess:
    return user_run([USER_PY, "-m", "fs.cli", *args], uid)


def test_run_as_someone_elses_principal(pubmnt: Path) -> None:
    mnt = pubmnt
    m = str(mnt)
    w = mnt / "w"
    w.mkdir()
    os.chmod(w, 0o777)
    sluice("principal", "add", m, "mine", "--owner", "1000")
    sluice("principal", "add", m, "theirs")  # owned by root (the caller)
    t = table(mnt)
    assert t["mine"]["owner_uid"] == 1000 and t["theirs"]["owner_uid"] == 0
    r = _user_sluice(1000, "run", m, "--principal", "theirs", "--", "touch", str(w / "no"))
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "may not run as" in r.stderr, r.stderr
    assert not (w / "no").exists()
    r = _user_sluice(1000, "run", m, "--principal", "root", "--", "true")
    assert r.returncode == 1 and "may not run as" in r.stderr
    r = _user_sluice(1000, "run", m, "--principal", "mine", "--", "sh", "-c",
                     f"printf 1234567 > {w}/yes && touch {w}/yes2")
    assert r.returncode == 0, r.stderr
    assert os.stat(w / "yes").st_uid == 1000
    u = usage(mnt)
    assert u["mine"] == (BS + entry("yes") + entry("yes2"), 2)
    assert u["theirs"] == (0, 0)
    # The owner manages what is below its principal, nothing else.
    r = _user_sluice(1000, "principal", "add", m, "sub", "--parent", "mine", "--space", "1M")
    assert r.returncode == 0, r.stderr
    r = _user_sluice(1000, "principal", "add", m, "top", "--parent", "root")
    assert r.returncode == 1 and "may not" in r.stderr
    # (without --parent, a user's principal goes below its own uid-N)
    r = _user_sluice(1000, "principal", "add", m, "own")
    assert r.returncode == 0, r.stderr
    assert table(mnt)["own"]["parent"] == "uid-1000"
    r = _user_sluice(1000, "principal", "set", m, "theirs", "--space", "1M")
    assert r.returncode == 1 and "may not" in r.stderr
    r = _user_sluice(1000, "run", m, "--principal", "sub", "--", "touch", str(w / "s"))
    assert r.returncode == 0, r.stderr
    assert usage(mnt)["sub"] == (entry("s"), 1)
    # uid 1001 owns nothing here.
    r = _user_sluice(1001, "run", m, "--principal", "mine", "--", "true")
    assert r.returncode == 1 and "may not run as" in r.stderr
    # Root may run as anyone's principal.
    sluice("run", m, "--principal", "mine", "--", "touch", str(w / "byroot"))
    # (and "sub", below "mine", is part of its usage)
    assert usage(mnt)["mine"] == (BS + entry("yes") + entry("yes2") + entry("byroot")
                                  + entry("s"), 4)


def test_kernel_object_banks_from_the_cli(mnt: Path) -> None:
    """`principal add/set` take the kernel-object banks root may change: connections,
    shared memory and children, beside grants and caps."""
    sluice("principal", "add", str(mnt), "objs", "--connections", "3", "--shm", "8M",
           "--children", "2", "--grants", "10")
    banks = table(mnt)["objs"]["banks"]
    assert (banks["connections"], banks["shm"], banks["children"], banks["grants"]) == \
        (3, 8 << 20, 2, 10)
    sluice("principal", "set", str(mnt), "objs", "--connections", "5", "--shm", "1G")
    banks = table(mnt)["objs"]["banks"]
    assert (banks["connections"], banks["shm"], banks["children"]) == (5, 1 << 30, 2)
    sluice("principal", "add", str(mnt), "k1", "--parent", "objs")
    sluice("principal", "add", str(mnt), "k2", "--parent", "objs")
    fails_one_line("principal", "add", str(mnt), "k3", "--parent", "objs")  # children: 2


def test_request_banks_from_the_cli(pubmnt: Path) -> None:
    """The parking and costly-op banks (`--parked`, `--parked-bytes`, `--costly-rate`):
    defaults as documented, root changes them live, an owner may give its children no
    more than its own, a user cannot raise its own, and `principal show` prints them."""
    m = str(pubmnt)
    sluice("principal", "add", m, "mine", "--owner", "1000")
    t = table(pubmnt)
    for name in ("root", "mine"):
        b = t[name]["banks"]
        assert (b["parked"], b["parked_bytes"], b["costly_rate"]) == (4096, 64 * MiB, 50)
    sluice("principal", "set", m, "mine", "--parked", "8", "--parked-bytes", "1M",
           "--costly-rate", "5")
    shown = sluice("principal", "show", m, "mine").stdout.splitlines()
    assert shown[0] == "principal mine (id 1, parent root, owner uid 1000)"
    rows = {ln.split()[0]: ln.split()[1:4] for ln in shown[1:]}
    assert rows["parked"] == ["0", "/", "8"] and rows["parked_bytes"] == ["0B", "/", "1.0MiB"]
    assert rows["costly_rate"][0] == "5"
    # The owner may not raise its own principal (its parent is root's) ...
    r = _user_sluice(1000, "principal", "set", m, "mine", "--parked", "10000")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "sluice principal set: uid 1000 may not change principal 'mine'"], r.stderr
    # ... nor give a child more than it holds; what it does not say is what it holds.
    r = _user_sluice(1000, "principal", "add", m, "kid", "--parent", "mine",
                     "--costly-rate", "6")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "sluice principal add: costly_rate 6 exceeds what parent 'mine' holds (5)"], r.stderr
    r = _user_sluice(1000, "principal", "add", m, "kid", "--parent", "mine")
    assert r.returncode == 0, r.stderr
    r = _user_sluice(1000, "principal", "set", m, "kid", "--parked", "3")
    assert r.returncode == 0, r.stderr
    kid = table(pubmnt)["kid"]["banks"]
    assert (kid["parked"], kid["parked_bytes"], kid["costly_rate"]) == (3, MiB, 5)
    rows = {r["name"]: r for r in stats(pubmnt)["principals"]}  # `stats --json` too
    assert (rows["kid"]["banks"]["parked"], rows["kid"]["usage"]["parked"]) == (3, 0)
    # Root is held to the same rules: not below what a child has, not above its parent.
    assert fails_one_line("principal", "set", m, "mine", "--parked", "2").endswith(
        "child 'kid' has parked 3, more than 2")
    assert fails_one_line("principal", "set", m, "mine", "--parked", "5000").endswith(
        "parked 5000 exceeds what parent 'root' holds (4096)")
    assert fails_one_line("principal", "set", m, "mine", "--costly-rate", "0").endswith(
        "costly_rate must be at least 1 (operations a second)")
    # Sizes in the binary units they were given in (probe 27, F7: raw byte counts)
    assert fails_one_line("principal", "set", m, "mine", "--parked-bytes", "512K").endswith(
        "child 'kid' has parked_bytes 1.0MiB, more than 512.0KiB")
    assert fails_one_line("principal", "set", m, "mine", "--cache-min", "2M",
                          "--cache-max", "1M").endswith(
        "cache_min 2.0MiB exceeds cache_max 1.0MiB (a guarantee above the ceiling)")
    # Root raises its own ceiling first, then the tenant's.
    sluice("principal", "set", m, "root", "--parked", "10000")
    sluice("principal", "set", m, "mine", "--parked", "5000")
    assert table(pubmnt)["mine"]["banks"]["parked"] == 5000
    # A user sees its own principal's banks; not another's.
    r = _user_sluice(1000, "principal", "show", m, "kid", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["banks"]["parked"] == 3, r.stderr
    sluice("principal", "add", m, "other", "--owner", "1001")
    r = _user_sluice(1000, "principal", "show", m, "other")
    assert r.returncode == 1 and r.stderr.strip() == \
        "sluice principal show: no principal named 'other' that you may see", r.stderr
