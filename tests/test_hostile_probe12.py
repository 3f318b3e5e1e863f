"""Hostile probe 12 (stop 24): can one tenant read what another wrote?

- F1 (tests/test_pager.py, `test_a_dropped_dirty_frame_never_shows_the_blocks_older_
  contents`): a dropped dirty discardable frame left a kept block's previous owner's
  bytes readable.
- F2 (here): a direct client's read held at its own I/O limit when the owner's chmod
  revoked its grant went on afterwards and returned what the owner wrote after the
  chmod. The shim kernel now checks the grant again when the device lets the read go
  (`Kernel.read_into(..., revocable=True)`, what the direct client's reads use).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from blockdev.scheduler import READ
from kernelshim import FRESH, ROOT_PRINCIPAL, BlockDevice, ExtentMap, GrantRevoked, Kernel, Rights

BS = 4096


@pytest.fixture
def kernel(tmp_path: Path):
    d = tmp_path / "vol"
    d.mkdir()
    BlockDevice.format(d, size=64 * BS, block_size=BS)
    k = Kernel.open(d, cache_bytes=16 * BS)  # write-through
    yield k
    k.close()


def _grant(kernel: Kernel, rights: Rights):
    return kernel.grant(inode=2, generation=1, extents=ExtentMap([(0, 8, 4, FRESH)]),
                        rights=rights, principal=ROOT_PRINCIPAL, charge=False)


@pytest.mark.parametrize("revocable", [True, False])
async def test_a_read_held_at_its_limit_does_not_outlive_its_grants_revoke(
        kernel: Kernel, monkeypatch: pytest.MonkeyPatch, revocable: bool) -> None:
    owner = _grant(kernel, Rights.RW)
    await kernel.write(owner, 0, b"public!!" * (4 * BS // 8))
    await kernel.pager.forget_runs([(8, 4)], principal=ROOT_PRINCIPAL)  # a miss, below
    reader = _grant(kernel, Rights.READ)
    gate = trio.Event()
    held = trio.Event()
    serve = kernel.device._serve

    async def at_the_limit(principal, block, nbytes, kind):  # the reader's I/O limit
        if kind == READ and not gate.is_set():
            held.set()
            await gate.wait()
        return await serve(principal, block, nbytes, kind)
    monkeypatch.setattr(kernel.device, "_serve", at_the_limit)
    buf = bytearray(BS)
    outcome: list[object] = []

    async def read() -> None:
        try:
            outcome.append(await kernel.read_into(reader, 0, memoryview(buf),
                                                  revocable=revocable))
        except GrantRevoked as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await held.wait()
        kernel.revoke_nowait(reader)  # the owner's chmod 600
        await kernel.write(owner, 0, b"SECRET-D" * (BS // 8))  # after the chmod returned
        gate.set()
    if revocable:  # a direct client's read: refused, nothing of the new bytes
        assert isinstance(outcome[0], GrantRevoked)
        assert b"SECRET-D" not in buf
    else:  # the mount's own reads go on (their grants are renewed under them)
        assert outcome == [BS]
