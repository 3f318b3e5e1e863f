"""The checksums of a run of blocks (blockdev/checksums.py `block_checksums`): the C
helper built by scripts/setup.sh (blockdev/xxh3blocks.c) gives exactly what
python-xxhash, the reference, gives for every block — the on-disk format must not
depend on which one ran — and a device written through it reads back verified."""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest
import xxhash

from blockdev import BlockDevice, BlockNo, ChecksumError, PrincipalId
from blockdev import checksums as cs


P0 = PrincipalId(0)


def test_the_helper_is_built() -> None:
    """scripts/setup.sh builds it (on x86-64); without it every write is hashed block by
    block."""
    if platform.machine() != "x86_64":
        pytest.skip("the helper is built on x86-64 only")
    assert cs.BLOCK_HASHER.startswith("c-"), (
        f"{cs.HELPER_DIR} has no _xxh3blocks module: run scripts/setup.sh")


@pytest.mark.parametrize("block_size", [512, 4096, 65536])
def test_helper_and_python_xxhash_agree(block_size: int) -> None:
    rng = np.random.default_rng(7)
    for count in (1, 3, 4, 5, 64, 256):
        data = rng.integers(0, 256, count * block_size, dtype=np.uint8).tobytes()
        # special blocks: zeros, all ones, one bit set
        data = (bytes(block_size) + b"\xff" * block_size + data)[:count * block_size]
        got = cs.block_checksums(data, block_size)
        want = [xxhash.xxh3_64_intdigest(data[o:o + block_size])
                for o in range(0, len(data), block_size)]
        assert got.dtype == np.uint64 and got.tolist() == want
        assert cs.block_checksums_reference(data, block_size).tolist() == want
        if cs._native is not None:  # the helper itself, whatever the run's length
            out = np.empty(count, dtype=np.uint64)
            cs._native(data, block_size, out)
            assert out.tolist() == want


def test_views_and_offsets() -> None:
    """Any buffer: a read-only view at an odd offset (a FUSE payload), a bytearray."""
    raw = os.urandom(1 << 20)
    view = memoryview(raw)[16:16 + 255 * 4096]
    want = [xxhash.xxh3_64_intdigest(view[o:o + 4096]) for o in range(0, len(view), 4096)]
    assert cs.block_checksums(view, 4096).tolist() == want
    assert cs.block_checksums(bytearray(view), 4096).tolist() == want


def test_helper_refuses_bad_arguments() -> None:
    if cs._native is None:
        pytest.skip("helper not built")
    with pytest.raises(ValueError, match="whole blocks"):
        cs._native(bytes(4097), 4096, np.empty(1, dtype=np.uint64))
    with pytest.raises(ValueError, match="output"):
        cs._native(bytes(8192), 4096, np.empty(1, dtype=np.uint64))
    with pytest.raises(TypeError):
        cs._native(bytes(8192), 4096, bytes(16))  # read-only output


async def test_device_round_trip_and_corruption(tmp_path) -> None:
    """A large write's checksums (the helper) verify on read by either path, and a
    changed byte in the backing file is still found."""
    d = tmp_path / "dev"
    d.mkdir()
    BlockDevice.format(d, size=1024 * 4096, block_size=4096, profile="none")
    dev = BlockDevice.open(d)
    try:
        data = os.urandom(256 * 4096)
        await dev.write(BlockNo(8), data, principal=P0)
        sums = dev._csum[8:8 + 256].tolist()
        assert sums == [xxhash.xxh3_64_intdigest(data[o:o + 4096]) or 1
                        for o in range(0, len(data), 4096)]
        assert bytes(await dev.read(BlockNo(8), 256, principal=P0)) == data
        assert bytes(await dev.read(BlockNo(9), 1, principal=P0)) == data[4096:8192]
        await dev.flush()
    finally:
        dev.close()
    with open(d / "device.img", "r+b") as f:
        f.seek(200 * 4096 + 5)
        f.write(b"!")
    dev = BlockDevice.open(d)
    try:
        with pytest.raises(ChecksumError):
            await dev.read(BlockNo(8), 256, principal=P0)
    finally:
        dev.close()
