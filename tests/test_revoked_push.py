"""The "revoked" and "notice" notifications (README, "Direct access"; docs/dev/protocol.md,
"Push"):
a direct client that subscribed to "revoked" is told, slot and inode, when a grant it
holds is revoked under it — a truncate or an unlink through the mount, or its own
`revoke` of the grant another was minted from — and is told nothing when it closes a
file itself; `sluice notice` sends root's (or the volume owner's) text to clients
subscribed to "notice". Probe 27 (a new user following the README): the subscriptions
were taken and nothing ever sent either."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import SLUICE
from kernelshim import GrantRevoked, Rights
from kernelshim.client import Client
from shim_util import pubmnt, user_python  # noqa: F401 - the fixture

BS = 4096


class Notes:
    """The notifications a client's callback got."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict]] = []
        self.cond = threading.Condition()

    def __call__(self, note) -> None:
        with self.cond:
            self.got.append((note.kind, dict(note.payload)))
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple[str, dict]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, timeout), self.got
            return list(self.got)


@pytest.mark.mounted
def test_a_truncate_through_the_mount_tells_the_holder(mnt: Path) -> None:
    (mnt / "F").write_bytes(b"A" * (3 * BS))
    ino = os.stat(mnt / "F").st_ino
    notes = Notes()
    with Client.connect(mnt) as c:
        c.subscribe(["revoked"], notes)
        f = c.open("F", "r+")
        r = f.mint(Rights.READ)
        assert f.pread(BS, 0) == b"A" * BS
        os.truncate(mnt / "F", 5)  # another's truncate: the grants go
        got = notes.wait_for(2)
        assert {(k, p["slot"], p["inode"]) for k, p in got} == \
            {("revoked", f.slot, ino), ("revoked", r.slot, ino)}
        with pytest.raises(GrantRevoked):
            f.pread(1, 0)


@pytest.mark.mounted
def test_an_unlink_and_a_minted_handles_revoke_tell_the_holder(mnt: Path) -> None:
    (mnt / "G").write_bytes(b"B" * BS)
    (mnt / "H").write_bytes(b"C" * BS)
    ino_g, ino_h = os.stat(mnt / "G").st_ino, os.stat(mnt / "H").st_ino
    notes = Notes()
    with Client.connect(mnt) as c:
        c.subscribe(["revoked"], notes)
        g = c.open("G", "r+")
        g.write(b"x")  # (uncommitted: the unlink revokes the grant all the same)
        os.unlink(mnt / "G")
        assert notes.wait_for(1) == [("revoked", {"slot": g.slot, "inode": ino_g,
                                                  "kind": "revoked"})]
        h = c.open("H")
        m = h.mint(Rights.READ)
        h.revoke()  # its own revoke: the minted handle goes too, and is told; h is not
        got = notes.wait_for(2)
        assert [(k, p["slot"], p["inode"]) for k, p in got[1:]] == [("revoked", m.slot, ino_h)]
        h2 = c.open("H")
        m2 = h2.mint(Rights.READ)
        h2.close()  # its own close: the same (review of stop 31, 3: m2 went unsaid)
        got = notes.wait_for(3)
        assert [(k, p["slot"]) for k, p in got[2:]] == [("revoked", m2.slot)]
        time.sleep(0.2)
        assert len(notes.got) == 3  # (nothing for h, h2 themselves)


@pytest.mark.mounted
def test_a_close_or_an_unsubscribed_client_gets_no_notice(mnt: Path) -> None:
    (mnt / "K").write_bytes(b"D" * BS)
    notes = Notes()
    with Client.connect(mnt) as c, Client.connect(mnt) as quiet:
        c.subscribe(["revoked"], notes)
        f = c.open("K")
        assert f.pread(BS, 0) == b"D" * BS
        f.close()  # the holder's own close: nothing to tell
        q = quiet.open("K")  # never subscribed: its grant goes, silently
        os.truncate(mnt / "K", 0)
        time.sleep(0.3)
        assert notes.got == []
        with pytest.raises(GrantRevoked):
            q.pread(1, 0)


@pytest.mark.mounted
def test_sluice_notice_reaches_subscribed_clients(mnt: Path) -> None:
    """`sluice notice` (root or the volume's owner): the text reaches the clients that
    subscribed to "notice", with the sender's uid; `--principal` narrows it to the
    clients connected as that principal."""
    notes, others = Notes(), Notes()
    with Client.connect(mnt) as c, Client.connect(mnt) as d:
        c.subscribe(["notice"], notes)
        d.subscribe(["revoked"], others)  # not to notices
        r = subprocess.run([*SLUICE, "notice", str(mnt), "maintenance at 5 pm"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stderr.strip() == "sent to 1 connection", r.stderr
        assert notes.wait_for(1) == [("notice", {"text": "maintenance at 5 pm", "uid": 0,
                                                 "kind": "notice"})]
        r = subprocess.run([*SLUICE, "notice", str(mnt), "x" * 1025],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "1024" in r.stderr, r.stderr
        assert c.notice("only root's", principal="root") == 1
        assert notes.wait_for(2)[1][1]["text"] == "only root's"
        time.sleep(0.2)
        assert others.got == []


@pytest.mark.mounted
def test_a_tenant_may_not_send_notices(pubmnt: Path) -> None:  # noqa: F811
    out = user_python(f"""
        from kernelshim.client import Client
        from kernelshim import SluiceError
        with Client.connect({str(pubmnt)!r}) as c:
            try:
                c.notice("free pizza")
            except SluiceError as exc:
                print(type(exc).__name__, exc)
        """)
    assert out.startswith("NotAllowed") and "root or the volume's owner" in out, out
