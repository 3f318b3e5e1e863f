"""Helpers for tests that let unprivileged uids use a mounted volume (test_grants.py,
test_principals.py, test_protocol.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, Mount

#: an interpreter every uid can run (the venv's points into /root), with the venv's
#: packages (numpy, trio: the same CPython minor version) and the repository importable
USER_PY = "/usr/bin/python3"
USER_ENV = {"PATH": "/usr/bin:/bin",
            "PYTHONPATH": f"{REPO}:{sysconfig.get_paths()['purelib']}"}
UID, GID = 1000, 1000


@contextlib.contextmanager
def public_mount(volume: Path, log: Path, *extra: str,
                 prefix: str = "sluice-pub-") -> Iterator[Path]:
    """`volume` mounted with the options `extra` where every uid can reach it, the
    daemon logging to `log`; afterwards the daemon must have lived to the unmount
    and logged no traceback. (Not below tmp_path: every pytest run that starts
    resets /tmp/pytest-of-root to 0700, which would cut other uids off in the middle
    of a test when sessions overlap.)"""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)
    mp = base / "mnt"
    mp.mkdir()
    m = Mount(volume, mp, None, log)
    try:
        m.start(*extra)
        yield mp
        assert m.daemon_alive, "the daemon died during the test"
    finally:
        m.stop()
        if not os.path.ismount(mp):
            shutil.rmtree(base, ignore_errors=True)
    text = log.read_text() if log.exists() else ""
    assert not ("Traceback" in text and "unexpected" not in text), text[-3000:]


@pytest.fixture
def pubmnt(volume: Path, tmp_path: Path) -> Iterator[Path]:
    """The volume mounted where every uid can reach it (`public_mount`)."""
    with public_mount(volume, tmp_path / "pub-daemon.log") as mp:
        yield mp


def user_cmd(uid: int, argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


def user_popen(code: str, uid: int = UID) -> subprocess.Popen:
    """Start Python `code` as `uid` with line-buffered text pipes."""
    return subprocess.Popen(user_cmd(uid, [USER_PY, "-c", textwrap.dedent(code)]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, cwd=REPO,
                            env=USER_ENV)


def user_run(argv: list[str], uid: int = UID, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(user_cmd(uid, argv), capture_output=True, text=True, cwd=REPO,
                          env=USER_ENV, timeout=60, **kw)


def user_python(code: str, uid: int = UID) -> str:
    """Run Python `code` as `uid`; its stdout (it must succeed)."""
    p = user_run([USER_PY, "-c", textwrap.dedent(code)], uid)
    assert p.returncode == 0, p.stderr
    return p.stdout
