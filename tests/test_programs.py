"""Real programs on a real mount: cp, tar, git, sqlite3, python, gcc/make, coreutils.

Every test runs unmodified host programs against a freshly made sluice volume and
checks what they produced (contents, metadata, error messages), not only exit codes.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import sluice

pytestmark = pytest.mark.mounted


def run(cmd: list[str] | str, *, cwd: Path | None = None, check: bool = True,
        timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       shell=isinstance(cmd, str), **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def tree_digest(root: Path) -> dict[str, tuple]:
    """Relative path -> (type, mode bits, size, content hash or link target)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_size,
                            hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def host_tree(tmp_path: Path) -> Path:
    """A source tree on the host: kernel headers plus odd cases (symlinks, hard links,
    empty and large files, unusual modes, a file with a hole, old mtimes)."""
    src = tmp_path / "src"
    shutil.copytree("/usr/include/linux", src / "linux", symlinks=True)
    extra = src / "extra"
    (extra / "deep" / "er" / "est").mkdir(parents=True)
    (extra / "empty").write_bytes(b"")
    (extra / "deep" / "er" / "est" / "leaf.txt").write_text("leaf\n")
    big = os.urandom(3 * 1024 * 1024 + 123)  # not block aligned, several extents' worth
    (extra / "big.bin").write_bytes(big)
    with open(extra / "sparse.bin", "wb") as f:
        f.write(b"head")
        f.seek(5 * 1024 * 1024)
        f.write(b"tail")
    os.symlink("../linux/fs.h", extra / "link-to-fs.h")
    os.symlink("deep/er", extra / "dirlink")
    os.symlink("does/not/exist", extra / "dangling")
    os.link(extra / "big.bin", extra / "big.hardlink")
    (extra / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(extra / "script.sh", 0o755)
    (extra / "secret").write_text("s\n")
    os.chmod(extra / "secret", 0o600)
    (extra / "sticky").mkdir()
    os.chmod(extra / "sticky", 0o1777)
    old = 1_000_000_000_123_456_789  # 2001, with nanoseconds
    os.utime(extra / "deep" / "er" / "est" / "leaf.txt", ns=(old, old))
    os.utime(extra / "script.sh", ns=(old + 5, old + 7))
    return src


# -- cp -----------------------------------------------------------------------------------

def test_cp_a_tree_and_diff(mnt: Path, host_tree: Path) -> None:
    dst = mnt / "copy"
    run(["cp", "-a", str(host_tree), str(dst)])
    r = run(["diff", "-r", "--no-dereference", str(host_tree), str(dst)], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree_digest(dst) == tree_digest(host_tree)
    # cp -a preserves modes, owners and times (to the nanosecond), links and hard links.
    for rel in ["extra/script.sh", "extra/secret", "extra/deep/er/est/leaf.txt",
                "linux/fs.h", "extra/sticky", "extra", "linux"]:
        a, b = os.lstat(host_tree / rel), os.lstat(dst / rel)
        assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode), rel
        assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), rel
        assert (a.st_uid, a.st_gid) == (b.st_uid, b.st_gid), rel
        assert a.st_mtime_ns == b.st_mtime_ns, rel
    assert os.stat(dst / "extra/deep/er/est/leaf.txt").st_mtime_ns == 1_000_000_000_123_456_789
    assert os.readlink(dst / "extra/link-to-fs.h") == "../linux/fs.h"
    assert (dst / "extra/link-to-fs.h").read_bytes() == (host_tree / "linux/fs.h").read_bytes()
    assert (dst / "extra/dirlink/est/leaf.txt").read_text() == "leaf\n"
    assert os.readlink(dst / "extra/dangling") == "does/not/exist"
    big, hard = os.stat(dst / "extra/big.bin"), os.stat(dst / "extra/big.hardlink")
    assert big.st_ino == hard.st_ino and big.st_nlink == 2
    sp = dst / "extra/sparse.bin"
    data = sp.read_bytes()
    assert len(data) == 5 * 1024 * 1024 + 4
    assert data[:4] == b"head" and data[-4:] == b"tail" and not data[4:-4].strip(b"\0")
    # a hole costs no blocks (cp -a keeps sparseness via SEEK_HOLE or zero detection)
    assert os.stat(sp).st_blocks * 512 < 1024 * 1024
    # And back again: copy from the mount to the host is the same tree.
    back = host_tree.parent / "back"
    run(["cp", "-a", str(dst), str(back)])
    assert tree_digest(back) == tree_digest(host_tree)


# -- tar ----------------------------------------------------------------------------------

def test_tar_round_trip_on_mount(mnt: Path, host_tree: Path, tmp_path: Path) -> None:
    run(["cp", "-a", str(host_tree), str(mnt / "src")])
    tarball = mnt / "src.tar.gz"
    run(["tar", "-C", str(mnt), "-czf", str(tarball), "src"])
    assert tarball.stat().st_size > 100_000
    # The archive is readable and complete (gzip's CRC checks every byte).
    listing = run(["tar", "-tzf", str(tarball)]).stdout.splitlines()
    assert "src/extra/deep/er/est/leaf.txt" in listing
    assert len(listing) == sum(1 for _ in (mnt / "src").rglob("*")) + 1
    (mnt / "out").mkdir()
    run(["tar", "-C", str(mnt / "out"), "-xzpf", str(tarball)])
    assert tree_digest(mnt / "out" / "src") == tree_digest(host_tree)
    r = run(["diff", "-r", "--no-dereference", str(mnt / "src"), str(mnt / "out" / "src")],
            check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    leaf = mnt / "out/src/extra/deep/er/est/leaf.txt"
    assert leaf.stat().st_mtime == pytest.approx(1_000_000_000.123, abs=1)  # tar keeps seconds
    # The same tarball copied to the host extracts to the same tree.
    shutil.copy(tarball, tmp_path / "copy.tar.gz")
    (tmp_path / "hostout").mkdir()
    run(["tar", "-C", str(tmp_path / "hostout"), "-xzf", str(tmp_path / "copy.tar.gz")])
    assert tree_digest(tmp_path / "hostout" / "src") == tree_digest(host_tree)


def test_tar_from_host_into_mount(mnt: Path, host_tree: Path, tmp_path: Path) -> None:
    tarball = tmp_path / "host.tar"
    run(["tar", "-C", str(host_tree.parent), "--sparse", "-cf", str(tarball), "src"])
    run(["tar", "-C", str(mnt), "-xpf", str(tarball)])
    assert tree_digest(mnt / "src") == tree_digest(host_tree)
    # tar --compare reads every file back from the mount and checks it against the archive
    r = run(["tar", "-C", str(mnt), "--compare", "-f", str(tarball)], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # Overwriting extraction (files exist, same names) keeps the result identical.
    (mnt / "src/linux/fs.h").write_text("clobbered\n")
    run(["tar", "-C", str(mnt), "-xpf", str(tarball)])
    assert (mnt / "src/linux/fs.h").read_bytes() == (host_tree / "linux/fs.h").read_bytes()


# -- git ----------------------------------------------------------------------------------

GIT_ID = ["-c", "user.name=Sluice Tester", "-c", "user.email=tester@example.org",
          "-c", "init.defaultBranch=main", "-c", "gc.auto=0", "-c", "core.fsync=all"]


def git(repo: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo.parent),
           "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z"}
    return run(["git", *GIT_ID, *args], cwd=repo, env=env, **kw)


def test_git_commit_gc_fsck_clone(mnt: Path) -> None:
    repo = mnt / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "src").mkdir()
    for i in range(5):
        (repo / "README").write_text(f"version {i}\n")
        (repo / "src" / f"mod{i}.py").write_text(f"VALUE = {i}\n" * (i * 100 + 1))
        (repo / "bin.dat").write_bytes(os.urandom(20_000 + i))
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"commit {i}")
    (repo / "src" / "mod0.py").unlink()
    git(repo, "mv", "src/mod1.py", "src/renamed.py")
    git(repo, "commit", "-q", "-am", "remove and rename")
    git(repo, "tag", "v1")
    loose_before = git(repo, "count-objects", "-v").stdout
    git(repo, "gc", "--aggressive", "--prune=now", "-q")
    counts = dict(line.split(": ") for line in git(repo, "count-objects", "-v").stdout.splitlines())
    assert counts["count"] == "0" and int(counts["in-pack"]) > 15, (loose_before, counts)
    assert list((repo / ".git/objects/pack").glob("*.pack"))
    r = git(repo, "fsck", "--full", "--strict")
    assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert git(repo, "status", "--porcelain").stdout == ""

    clone = mnt / "clone"
    git(mnt, "clone", "-q", str(repo), str(clone))
    log = git(clone, "log", "--format=%s").stdout.splitlines()
    assert log == ["remove and rename"] + [f"commit {i}" for i in range(4, -1, -1)]
    assert git(clone, "describe", "--tags").stdout.strip() == "v1"
    assert (clone / "README").read_text() == "version 4\n"
    assert not (clone / "src" / "mod0.py").exists()
    assert (clone / "src" / "renamed.py").read_text() == "VALUE = 1\n" * 101
    assert (clone / "bin.dat").read_bytes() == (repo / "bin.dat").read_bytes()
    assert git(clone, "rev-parse", "HEAD").stdout == git(repo, "rev-parse", "HEAD").stdout
    r = git(clone, "fsck", "--full")
    assert "error" not in (r.stdout + r.stderr).lower()
    # Old versions come back intact from the packs.
    assert git(clone, "show", "HEAD~3:README").stdout == "version 2\n"
    assert git(clone, "diff", "--stat", "HEAD~5", "HEAD").stdout.strip().endswith(
        "deletions(-)")


# -- sqlite3 --------------------------------------------------------------------------------

def test_sqlite3_cli(mnt: Path) -> None:
    db = mnt / "data" / "cli.db"
    db.parent.mkdir()
    script = textwrap.dedent("""\
        PRAGMA journal_mode=DELETE;
        CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER, v TEXT);
        CREATE INDEX t_k ON t (k);
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
        INSERT INTO t (k, v) SELECT i % 97, printf('row-%06d-%s', i, hex(randomblob(20)))
        FROM n;
        BEGIN; UPDATE t SET k = -1 WHERE id % 1000 = 0; COMMIT;
        BEGIN; DELETE FROM t WHERE id > 19000; ROLLBACK;
        DELETE FROM t WHERE id % 7 = 0;
        VACUUM;
        """)
    r = run(["sqlite3", str(db)], input=script)
    assert r.stdout.strip() == "delete"
    # A rollback journal was used and is gone again.
    assert not Path(str(db) + "-journal").exists() and not Path(str(db) + "-wal").exists()
    q = run(["sqlite3", "-batch", str(db),
             "SELECT count(*), sum(id), count(DISTINCT k), max(length(v)) FROM t;"
             "SELECT count(*) FROM t WHERE k = -1;"
             "PRAGMA integrity_check;"]).stdout.split()
    ids = [i for i in range(1, 20001) if i % 7]
    assert q[0] == f"{len(ids)}|{sum(ids)}|98|51"
    assert q[1] == str(sum(1 for i in ids if i % 1000 == 0))
    assert q[2] == "ok"
    # Same answers through python's sqlite3, which also writes.
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT count(*) FROM t WHERE k = 5").fetchone()[0] == \
            sum(1 for i in ids if i % 97 == 5 and i % 1000)
        with con:
            con.executemany("INSERT INTO t (k, v) VALUES (?, ?)",
                            [(1000 + i, "py%d" % i) for i in range(3000)])
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
    out = run(["sqlite3", str(db), "SELECT count(*) FROM t WHERE k >= 1000;"]).stdout.strip()
    assert out == "3000"


def test_python_sqlite3_module(mnt: Path) -> None:
    path = mnt / "py.db"
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        con.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB, n REAL)")
        rows = [(f"key{i:05d}", os.urandom(i % 300), i / 3) for i in range(5000)]
        for chunk in range(0, len(rows), 500):  # several transactions, each journaled
            with con:
                con.executemany("INSERT INTO kv VALUES (?, ?, ?)", rows[chunk:chunk + 500])
        with con:
            con.execute("UPDATE kv SET n = -n WHERE k LIKE 'key0%'")
        try:
            with con:
                con.execute("DELETE FROM kv")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert con.execute("SELECT count(*) FROM kv").fetchone()[0] == 5000
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
    con = sqlite3.connect(path)
    try:
        got = dict((k, v) for k, v, _ in con.execute("SELECT * FROM kv"))
        assert got == {k: v for k, v, _ in rows}
        total = con.execute("SELECT sum(n) FROM kv").fetchone()[0]
        want = sum(-n if k.startswith("key0") else n for k, _, n in rows)
        assert total == pytest.approx(want)
    finally:
        con.close()


# -- python ---------------------------------------------------------------------------------

def test_python_scripts_packages_and_bytecode(mnt: Path) -> None:
    pkg = mnt / "lib" / "sluicepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .core import answer\nVERSION = '1.0'\n")
    (pkg / "core.py").write_text("def answer():\n    return 6 * 7\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "data.py").write_text("import json\nTABLE = json.loads('[1, 2, 3]')\n")
    script = mnt / "main.py"
    script.write_text(textwrap.dedent("""\
        import sys, sluicepkg, sluicepkg.sub.data as d
        print(sluicepkg.answer(), sluicepkg.VERSION, sum(d.TABLE), sluicepkg.__file__)
        sys.exit(3)
        """))
    env = {**os.environ, "PYTHONPATH": str(mnt / "lib"), "PYTHONDONTWRITEBYTECODE": "1"}
    r = run([sys.executable, str(script)], env=env, check=False)
    assert r.returncode == 3, r.stderr
    assert r.stdout.split() == ["42", "1.0", "6", str(pkg / "__init__.py")]
    assert not (pkg / "__pycache__").exists()

    run([sys.executable, "-m", "compileall", "-q", str(mnt / "lib")])
    tag = sys.implementation.cache_tag
    pyc = pkg / "__pycache__" / f"core.{tag}.pyc"
    assert pyc.is_file() and (pkg / "sub" / "__pycache__" / f"data.{tag}.pyc").is_file()
    # The .pyc is used, not recompiled: the source is gone and the import still works.
    (pkg / "core.py").unlink()
    legacy = mnt / "legacy"
    legacy.mkdir()
    shutil.copy(pyc, legacy / "core.pyc")  # sourceless import needs the legacy location
    r = run([sys.executable, "-c",
             "import core, importlib.util as u; print(core.answer(), core.__file__)"],
            cwd=legacy, env={**env, "PYTHONPATH": str(legacy)})
    assert r.stdout.split() == ["42", str(legacy / "core.pyc")]
    # Writing bytecode from the import system (atomic rename of a temporary file) works.
    (pkg / "core.py").write_text("def answer():\n    return 43\n")
    r = run([sys.executable, "-c", "import sluicepkg; print(sluicepkg.answer())"],
            env={**os.environ, "PYTHONPATH": str(mnt / "lib")})
    assert r.stdout.strip() == "43"
    r = run([sys.executable, "-c", "import sluicepkg; print(sluicepkg.core.__cached__)"],
            env={**os.environ, "PYTHONPATH": str(mnt / "lib")})
    cached = Path(r.stdout.strip())
    assert cached.is_file() and cached.read_bytes()[:4] == pyc.read_bytes()[:4]  # same magic


# -- gcc / make -------------------------------------------------------------------------------

MAKEFILE = """\
CC = gcc
CFLAGS = -O2 -Wall -Werror
OBJS = main.o util.o table.o

app: $(OBJS)
\t$(CC) -o $@ $(OBJS)

%.o: %.c util.h
\t$(CC) $(CFLAGS) -c -o $@ $<

clean:
\trm -f app $(OBJS)
"""

MAIN_C = r"""
#include <stdio.h>
#include <string.h>
#include "util.h"
int main(int argc, char **argv) {
    unsigned long h = 0;
    for (int i = 1; i < argc; i++) h = hash_str(argv[i], h);
    printf("args=%d hash=%lu fib=%ld table=%d\n", argc - 1, h, fib(40), table_sum());
    return argc > 3 ? 7 : 0;
}
"""

UTIL_C = r"""
#include "util.h"
unsigned long hash_str(const char *s, unsigned long h) {
    while (*s) h = h * 31 + (unsigned char)*s++;
    return h;
}
long fib(int n) { long a = 0, b = 1; while (n--) { long t = a + b; a = b; b = t; } return a; }
"""

TABLE_C = r"""
#include "util.h"
static const int table[] = { %s };
int table_sum(void) {
    int s = 0;
    for (unsigned i = 0; i < sizeof table / sizeof *table; i++) s += table[i];
    return s;
}
"""

UTIL_H = """\
#ifndef UTIL_H
#define UTIL_H
unsigned long hash_str(const char *s, unsigned long h);
long fib(int n);
int table_sum(void);
#endif
"""


def _py_hash(args: list[str]) -> int:
    h = 0
    for a in args:
        for c in a.encode():
            h = (h * 31 + c) % 2**64
    return h


def test_gcc_make_build_and_run(mnt: Path) -> None:
    proj = mnt / "proj"
    proj.mkdir()
    (proj / "Makefile").write_text(MAKEFILE)
    (proj / "main.c").write_text(MAIN_C)
    (proj / "util.c").write_text(UTIL_C)
    (proj / "util.h").write_text(UTIL_H)
    (proj / "table.c").write_text(TABLE_C % ", ".join(str(i) for i in range(1000)))
    r = run(["make", "-j2"], cwd=proj)
    assert "gcc" in r.stdout
    app = proj / "app"
    assert os.access(app, os.X_OK) and app.read_bytes()[:4] == b"\x7fELF"
    r = run([str(app), "alpha", "beta"], cwd=proj)
    assert r.stdout == f"args=2 hash={_py_hash(['alpha', 'beta'])} fib=102334155 table=499500\n"
    r = run(["./app", "a", "b", "c"], cwd=proj, check=False)
    assert r.returncode == 7 and r.stdout.startswith("args=3 ")
    # Up to date: timestamps on the mount are consistent, so make does nothing.
    r = run(["make", "-q"], cwd=proj, check=False)
    assert r.returncode == 0, "make thinks the tree is out of date"
    r = run(["make"], cwd=proj)
    assert "is up to date" in r.stdout and "gcc" not in r.stdout
    # Touch one source: exactly that object and the link step are redone.
    before = {p.name: p.stat().st_mtime_ns for p in proj.glob("*.o")}
    os.utime(proj / "util.c")
    r = run(["make"], cwd=proj)
    cmds = [line for line in r.stdout.splitlines() if line.startswith("gcc")]
    assert len(cmds) == 2 and "util.c" in cmds[0] and "-o app" in cmds[1], r.stdout
    after = {p.name: p.stat().st_mtime_ns for p in proj.glob("*.o")}
    assert after["util.o"] > before["util.o"]
    assert after["main.o"] == before["main.o"] and after["table.o"] == before["table.o"]
    # A header change rebuilds everything; the binary still runs.
    (proj / "util.h").write_text(UTIL_H.replace("#endif", "#define UNUSED 1\n#endif"))
    r = run(["make"], cwd=proj)
    assert sum(1 for line in r.stdout.splitlines() if line.startswith("gcc")) == 4
    assert run([str(app)]).stdout.startswith("args=0 hash=0 fib=102334155")
    run(["make", "clean"], cwd=proj)
    assert sorted(p.name for p in proj.iterdir()) == \
        ["Makefile", "main.c", "table.c", "util.c", "util.h"]


# -- coreutils ------------------------------------------------------------------------------

def test_find_du_ln_mv_rm(mnt: Path) -> None:
    root = mnt / "tree"
    for d in range(10):
        sub = root / f"d{d}" / "inner"
        sub.mkdir(parents=True)
        for f in range(d + 1):
            (sub / f"f{f}.txt").write_bytes(b"x" * (f * 4096 + 1))
    nfiles = sum(d + 1 for d in range(10))
    r = run(["find", str(root), "-type", "f"])
    assert len(r.stdout.split()) == nfiles
    r = run(["find", str(root), "-type", "d"])
    assert len(r.stdout.split()) == 1 + 10 * 2
    r = run(["find", str(root), "-name", "f3.txt", "-size", "+12288c"])
    assert len(r.stdout.split()) == 7  # d3..d9
    r = run(["find", str(root), "-size", "-2"])  # files under 512 bytes, dirs ...
    assert sum(1 for p in r.stdout.split() if p.endswith("f0.txt")) == 10
    # du counts allocated blocks: each file holds ceil(size/4096) blocks of 4 KiB.
    want_kib = sum(4 * (f + 1) for d in range(10) for f in range(d + 1))
    r = run(["du", "-s", "--block-size=1K", "-S", str(root / "d9" / "inner")])
    assert int(r.stdout.split()[0]) == sum(4 * (f + 1) for f in range(10))
    r = run(["du", "-s", "--apparent-size", "-B1", str(root / "d9" / "inner")])
    assert int(r.stdout.split()[0]) >= sum(f * 4096 + 1 for f in range(10))
    r = run(["du", "-s", "--block-size=1K", str(root)])
    assert want_kib <= int(r.stdout.split()[0]) <= want_kib + 4 * 21 * 4
    # Symlinks, relative and absolute, to files and directories.
    run(["ln", "-s", "d1/inner/f0.txt", str(root / "rel")])
    run(["ln", "-s", str(root / "d2"), str(root / "abs")])
    run(["ln", str(root / "d1/inner/f1.txt"), str(root / "hard")])
    assert (root / "rel").read_bytes() == b"x"
    assert sorted(os.listdir(root / "abs" / "inner")) == ["f0.txt", "f1.txt", "f2.txt"]
    assert os.stat(root / "hard").st_nlink == 2
    assert run(["readlink", str(root / "rel")]).stdout.strip() == "d1/inner/f0.txt"
    assert len(run(["find", str(root), "-type", "l"]).stdout.split()) == 2
    assert len(run(["find", "-L", str(root), "-type", "f"]).stdout.split()) == nfiles + 1 + 1 + 3
    # mv across directories: files and a whole directory, inode numbers kept.
    ino = os.stat(root / "d3/inner/f0.txt").st_ino
    run(["mv", str(root / "d3/inner/f0.txt"), str(root / "d4/inner/moved.txt")])
    assert os.stat(root / "d4/inner/moved.txt").st_ino == ino
    assert not (root / "d3/inner/f0.txt").exists()
    dino = os.stat(root / "d5").st_ino
    run(["mv", str(root / "d5"), str(root / "d6/inner/")])
    assert os.stat(root / "d6/inner/d5").st_ino == dino
    assert os.stat(root / "d6/inner").st_nlink == 3  # gained a subdirectory
    assert os.stat(root).st_nlink == 2 + 9  # d0..d9 less d5; symlinks do not count
    assert (root / "d6/inner/d5/inner/f5.txt").stat().st_size == 5 * 4096 + 1
    # mv over an existing file replaces it.
    run(["mv", "-f", str(root / "d7/inner/f0.txt"), str(root / "d7/inner/f1.txt")])
    assert (root / "d7/inner/f1.txt").read_bytes() == b"x"
    # rm -rf of everything leaves an empty volume (space given back).
    before = os.statvfs(mnt)
    run(["rm", "-rf", str(root)])
    assert os.listdir(mnt) == []
    assert run(["find", str(mnt)]).stdout.split() == [str(mnt)]
    # Freed blocks count as free at once (df shows an rm right away): every file's
    # blocks but those of the one mv -f replaced, which were free before already.
    after = os.statvfs(mnt)
    assert after.f_bfree - before.f_bfree == want_kib // 4 - 2
    # files (less the one mv -f replaced) + 2 symlinks + 21 directories; the hard link
    # is no inode of its own. Only the root remains.
    assert after.f_ffree - before.f_ffree == nfiles - 1 + 2 + 21
    assert after.f_ffree == after.f_files - 1
    assert after.f_bfree == after.f_blocks
    r = run(["rm", str(mnt / "nope")], check=False)
    assert r.returncode == 1 and "No such file or directory" in r.stderr


def test_fsck_clean_after_programs(volume: Path, mount_factory, host_tree: Path) -> None:
    """A busy session (copy, build, archive, delete) leaves a volume fsck calls clean."""
    m = mount_factory(volume)
    run(["cp", "-a", str(host_tree), str(m.path / "a")])
    run(["tar", "-C", str(m.path), "-cf", str(m.path / "a.tar"), "a"])
    run(["rm", "-rf", str(m.path / "a" / "linux")])
    run(["mv", str(m.path / "a"), str(m.path / "b")])
    m.stop()
    r = sluice("fsck", str(volume), "--verify-data")
    assert r.stdout.strip().endswith("clean"), r.stdout
    assert ", 0 bad" in r.stdout
    m2 = mount_factory(volume, name="mnt2")
    assert tree_digest(m2.path / "b" / "extra") == tree_digest(host_tree / "extra")
    assert (m2.path / "a.tar").stat().st_size > 6_000_000
