"""The principal table without a mount: hierarchical charging (kernelshim/accounting.py,
its one implementation), the bank rules (bankrules.py), the pid registry
(processes.py), and that the split kept the table's public names where they were.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import kernelshim.principals as principals
from kernelshim.processes import start_time
from kernelshim import Rate
from kernelshim.principals import (Banks, PrincipalError, PrincipalTable, QuotaExceeded,
                                   TooManyObjects)

MiB = 1 << 20


def tree() -> PrincipalTable:
    """root > a (space 10 MiB, 100 inodes, 2 grants) > a1 (space 4 MiB); root > b."""
    t = PrincipalTable(None)
    t.add("a", owner_uid=1000, caller_uid=0,
          banks=Banks(space=10 * MiB, inodes=100, grants=2, io_limit=Rate.parse("100MB/s")))
    t.add("a1", parent="a", owner_uid=1000, caller_uid=1000, banks=Banks(space=4 * MiB,
                                                                            grants=2))
    t.add("b", owner_uid=1001, caller_uid=0, banks=Banks())
    return t


def usage(t: PrincipalTable, kind: str) -> dict[str, int]:
    return {p.name: getattr(p.usage, kind) for p in t.walk()}


def test_charges_go_up_the_chain_and_a_refused_one_changes_nothing() -> None:
    t = tree()
    a1, b = t.get("a1"), t.get("b")
    t.charge(a1, space=3 * MiB, inodes=5)
    t.charge(b, space=MiB)
    assert usage(t, "space") == {"root": 4 * MiB, "a": 3 * MiB, "a1": 3 * MiB, "b": MiB}
    assert usage(t, "inodes") == {"root": 5, "a": 5, "a1": 5, "b": 0}
    before = (usage(t, "space"), usage(t, "inodes"))
    with pytest.raises(QuotaExceeded, match="'a1' is over its space bank"):
        t.charge(a1, space=2 * MiB)  # a1's own bank
    t.charge(t.get("a"), space=6 * MiB + MiB // 2)
    with pytest.raises(QuotaExceeded, match="'a' is over its space bank"):
        t.charge(a1, space=MiB)  # fits a1's bank, not its parent's
    assert usage(t, "space") == {"root": 10 * MiB + MiB // 2, "a": 9 * MiB + MiB // 2,
                                 "a1": 3 * MiB, "b": MiB}  # a1 not charged either
    with pytest.raises(QuotaExceeded, match="'a' is over its inode bank"):
        t.charge(a1, inodes=96)
    assert usage(t, "inodes") == before[1]
    t.refund(a1, space=3 * MiB, inodes=5)
    assert usage(t, "space") == {"root": 7 * MiB + MiB // 2, "a": 6 * MiB + MiB // 2,
                                 "a1": 0, "b": MiB}


def test_kernel_objects_charge_the_same_way() -> None:
    t = tree()
    a, a1 = t.get("a"), t.get("a1")
    t.charge_object(a1, "grants")
    t.charge_object(a, "grants")
    with pytest.raises(TooManyObjects, match="'a' holds 2 grants of its limit 2"):
        t.charge_object(a1, "grants")
    assert usage(t, "grants") == {"root": 2, "a": 2, "a1": 1, "b": 0}
    t.refund_object(a1, "grants")
    assert usage(t, "grants") == {"root": 1, "a": 1, "a1": 0, "b": 0}
    assert usage(t, "children") == {"root": 3, "a": 1, "a1": 0, "b": 0}


def test_recount_is_the_same_walk_unchecked() -> None:
    """The volume holds what it holds: a recount at mount sets exact usage, ancestors
    counting their descendants', whatever the banks say now; an id no longer in the
    table counts for root."""
    t = tree()
    t.charge(t.get("b"), space=123)  # stale: replaced by the recount
    t.recount_storage([(t.get("a1").id, 5 * MiB, 7), (t.get("a").id, MiB, 1),
                       (999, 10, 1), (t.get("a1").id, 1, 0)])
    assert usage(t, "space") == {"root": 6 * MiB + 11, "a": 6 * MiB + 1, "a1": 5 * MiB + 1,
                                 "b": 0}
    assert usage(t, "inodes") == {"root": 9, "a": 8, "a1": 7, "b": 0}
    t.reset_storage_usage()
    assert set(usage(t, "space").values()) == {0}


def test_a_childs_limit_stays_under_its_parents() -> None:
    t = tree()
    with pytest.raises(PrincipalError, match="io_limit 200MB/s exceeds parent's 100MB/s"):
        t.add("a2", parent="a", owner_uid=1000, caller_uid=0,
              banks=Banks(io_limit=Rate.parse("200MB/s"), grants=2))
    t.set("a1", 0, io_limit=Rate.parse("50MB/s"))
    # Lowering the parent's limit below a child's is refused too (it used to pass
    # unless a child also held a reservation).
    with pytest.raises(PrincipalError, match="child 'a1' has io_limit 50MB/s"):
        t.set("a", 0, io_limit=Rate.parse("40MB/s"))
    assert t.get("a").banks.io_limit == Rate.parse("100MB/s")
    with pytest.raises(PrincipalError, match="child 'a1' has space 4.0MiB, more than 1.0MiB"):
        t.set("a", 0, space=MiB)
    with pytest.raises(PrincipalError, match="io_weight must be positive"):
        t.set("root", 0, io_weight=0)


def test_removing_moves_storage_only_where_it_fits() -> None:
    t = tree()
    t.charge(t.get("b"), space=5 * MiB, inodes=3)
    with pytest.raises(QuotaExceeded):
        t.remove("b", 0, move_to="a1")  # a1 holds at most 4 MiB
    assert usage(t, "space")["b"] == 5 * MiB and usage(t, "space")["a1"] == 0
    heir = t.remove("b", 0, move_to="a")
    assert heir is t.get("a")
    assert usage(t, "space") == {"root": 5 * MiB, "a": 5 * MiB, "a1": 0}
    assert usage(t, "children")["root"] == 2


def test_a_process_acts_for_its_nearest_registered_ancestor() -> None:
    """Real processes: this one registered, a child of it found through /proc; a
    registration does not outlive its process (pids are reused)."""
    import os
    import threading
    t = tree()
    me = start_time(os.getpid())
    t.register(os.getpid(), t.get("a1"), uid=1000, started=me)
    with pytest.raises(principals.NotAllowed):
        t.register(os.getpid(), t.get("b"), uid=1000, started=me)
    # A second thread (FUSE names the thread) acts for its process's principal.
    tids: list[int] = []
    ready, done = threading.Event(), threading.Event()
    th = threading.Thread(target=lambda: (tids.append(threading.get_native_id()),
                                          ready.set(), done.wait()))
    th.start()
    try:
        ready.wait()
        assert tids[0] != os.getpid()
        assert t.resolve(tids[0], 1000).name == "a1"
    finally:
        done.set()
        th.join()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        assert t.resolve(child.pid, 1000).name == "a1"
        # Only the process that connected may register: not a later one with its pid.
        with pytest.raises(principals.NotAllowed, match="has exited"):
            t.register(child.pid, t.get("b"), uid=0, started=start_time(child.pid) - 1)
        t.register(child.pid, t.get("b"), uid=0, started=start_time(child.pid))
        assert t.resolve(child.pid, 1000, now=1e12).name == "b"
        assert t.registered() == {os.getpid(): "a1", child.pid: "b"}
    finally:
        child.communicate(b"")
    t.prune_registrations()
    assert t.registered() == {os.getpid(): "a1"}
    t.remove("a1", 0)
    assert t.registered() == {}
    assert t.resolve(os.getpid(), 1000).name == "uid-1000"  # made on first use


def test_the_split_kept_the_public_names(tmp_path: Path) -> None:
    """What fs, kernelshim and the tests import from kernelshim.principals is still
    there, and is the same object as where it now lives."""
    from kernelshim import accounting, bankrules, banks, processes  # noqa: F401
    for name in ("Banks", "Principal", "PrincipalError", "QuotaExceeded", "TooManyObjects",
                 "NotAllowed", "NoSuchPrincipal", "PrincipalExists", "PrincipalInfo",
                 "Usage", "ENTRY_COST", "OBJECT_BANKS", "DEFAULT_SHM", "DEFAULT_CHILDREN",
                 "DEFAULT_CONNECTIONS", "DEFAULT_GRANTS", "DEFAULT_CAPS"):
        assert getattr(principals, name) is getattr(banks, name), name
    import blockdev
    assert principals.Rate is blockdev.Rate
    t = tree()
    t.path = tmp_path / principals.FILE
    t.save()
    again = PrincipalTable.load(tmp_path)
    assert [(p.name, p.banks) for p in again.walk()] == [(p.name, p.banks) for p in t.walk()]


def test_an_owner_uid_the_loader_would_refuse_is_refused_at_add(tmp_path: Path) -> None:
    """`add` and the table's loader agree on what a uid is: a principal owned by 2**32
    made principals.json unloadable (merge review); 2**32 - 2 is the largest uid."""
    t = PrincipalTable(tmp_path / "principals.json")
    for bad in (1 << 32, (1 << 32) - 1, -1):
        with pytest.raises(PrincipalError, match="owner uid"):
            t.add(f"p{bad & 0xff}", owner_uid=bad, banks=Banks(), caller_uid=0)
    t.add("ok", owner_uid=(1 << 32) - 2, banks=Banks(), caller_uid=0)
    with pytest.raises(PrincipalError):
        t.add("nl\n", owner_uid=0, banks=Banks(), caller_uid=0)  # a trailing newline
