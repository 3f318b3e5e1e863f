"""Kernel notifications are queued per tenant and bounded (fs/invalidator.py; probe 3 F1:
one tenant's directory lock stopped every tenant's notifications, and the queued tasks
grew the daemon without bound)."""

from __future__ import annotations

import threading

import pytest
import trio

from fs import invalidator as inv_mod
from fs.invalidator import MAX_PENDING, Invalidator


async def test_a_blocked_tenant_holds_up_only_itself() -> None:
    release = threading.Event()
    done: list[tuple] = []

    def notify_entry(parent: int, name: bytes) -> None:
        if parent == 1:  # tenant 1's directory is locked by someone in the kernel
            release.wait(10)
        done.append((parent, name))

    inv = Invalidator(notify_entry, lambda ino: done.append(("d", ino)))
    for i in range(MAX_PENDING + 500):
        inv.entry(1, 1, b"n%d" % i)
    inv.entry(1, 1, b"n1")  # queued already: not again, and not counted as dropped
    inv.entry(2, 2, b"victim")
    inv.data(2, 77)
    with trio.fail_after(5):
        while ("d", 77) not in done:
            await trio.sleep(0.01)
    assert (2, b"victim") in done
    # tenant 1: one call in the kernel, the rest waiting, and no more than the bound
    assert inv.pending <= MAX_PENDING
    assert inv.dropped == 500
    assert not any(p == 1 for p, _ in done if p != "d")
    release.set()

    def tenant1() -> int:
        return len([x for x in done if x[0] == 1])

    # (`pending` counts what waits: the last calls may still be running when it is 0)
    with trio.fail_after(10):
        while inv.pending or tenant1() < MAX_PENDING:
            await trio.sleep(0.01)
    await trio.sleep(0.05)  # and no more come
    assert tenant1() == MAX_PENDING
    assert done.count((1, b"n1")) == 1


async def test_threads_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inv_mod, "MAX_THREADS", 3)
    release = threading.Event()
    inside = []
    lock = threading.Lock()

    def notify_entry(parent: int, name: bytes) -> None:
        with lock:
            inside.append(parent)
        release.wait(10)

    inv = Invalidator(notify_entry, lambda ino: None)
    for tenant in range(10):
        inv.entry(tenant, tenant, b"x")
    await trio.sleep(0.5)
    assert len(inside) == 3
    release.set()
    with trio.fail_after(10):
        while inv.pending or len(inside) < 10:
            await trio.sleep(0.01)


async def test_one_stuck_notification_does_not_hold_the_tenants_others() -> None:
    release = threading.Event()
    done: list[bytes] = []

    def notify_entry(parent: int, name: bytes) -> None:
        if name == b"stuck":  # its directory's lock is held (by someone else, say)
            release.wait(10)
        done.append(name)

    inv = Invalidator(notify_entry, lambda ino: None)
    inv.entry(1, 1, b"stuck")
    await trio.sleep(0.2)
    for i in range(5):
        inv.entry(1, 2, b"n%d" % i)
    with trio.fail_after(5):
        while len(done) < 5:
            await trio.sleep(0.01)
    assert b"stuck" not in done
    release.set()
    with trio.fail_after(10):
        while inv.pending or len(done) < 6:
            await trio.sleep(0.01)
    inv.close()
    inv.entry(1, 1, b"after")  # closed: nothing more
    await trio.sleep(0.1)
    assert b"after" not in done
