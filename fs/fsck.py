"""Offline consistency check of a volume (the daemon must not be running).

Checks, and with `repair` fixes:
- dangling names: entries whose parent or inode is missing, or whose parent is not
  a directory (repair: remove the entry)
- link counts: nlink of files = names pointing at them; of directories = 2 + subdirs
  (repair: set the counted value)
- orphans: inodes no name points to (unlinked while open at a crash; repair: free)
- extents: of missing or non-regular inodes (dangling), past the device end, or
  overlapping another extent (doubly-owned block) (repair: drop the later owner's)
- block counts: an inode's `blocks` equals its extents' total (repair: recount)
- stale blocks: device blocks holding data that no extent owns (left by a killed
  daemon before it committed; the next mount discards them, and so does repair).
  Reported, not an error: the free-space map is rebuilt from the extents, so they
  are free space, never leaked.
- with `verify_data`: every owned written block is read and its checksum verified.
"""

from __future__ import annotations

import dataclasses
import stat
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from kernelshim import BlockDevice, BlockNo, ChecksumError
from kernelshim import WRITTEN

from .metadata import Metadata
from .volume import DB, VolumeLock, read_header


@dataclasses.dataclass
class FsckReport:
    errors: int = 0
    lines: list[str] = dataclasses.field(default_factory=list)

    def error(self, msg: str) -> None:
        self.errors += 1
        self.lines.append("error: " + msg)

    def note(self, msg: str) -> None:
        self.lines.append(msg)


def fsck(path: Path, *, repair: bool = False, verify_data: bool = False,
         progress: bool = False) -> FsckReport:
    read_header(path)
    r = FsckReport()
    with VolumeLock(path, purpose="fsck"):
        md = Metadata(path / DB)
        dev = BlockDevice.open(path)
        try:
            _check(md, dev, r, repair, verify_data, progress)
            if repair:
                md.commit()
        finally:
            md.close()
            dev.close()
    verdict = "clean" if not r.errors else (f"{r.errors} errors repaired" if repair
                                             else f"{r.errors} errors found")
    r.lines.append(f"{path}: {verdict}")
    return r


def _check(md: Metadata, dev: BlockDevice, r: FsckReport, repair: bool, verify: bool,
           progress: bool) -> None:
    inodes = {row[0]: row for row in md.all_inodes()}
    MODE, NLINK, BLOCKS, PARENT = 2, 5, 7, 12
    if 1 not in inodes or not stat.S_ISDIR(inodes[1][MODE]):
        r.error("root directory (inode 1) is missing")
        return
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    for did, parent, name, ino in md.all_dentries():
        p = inodes.get(parent)
        if ino not in inodes or p is None or not stat.S_ISDIR(p[MODE]):
            r.error(f"dangling entry {bytes(name)!r} in {parent} -> inode {ino}")
            if repair:
                md.delete_dentry_id(did)
            continue
        names[ino] += 1
        if stat.S_ISDIR(inodes[ino][MODE]):
            subdirs[parent] += 1
            if inodes[ino][PARENT] != parent:
                r.error(f"directory {ino} is named in {parent} but records parent "
                        f"{inodes[ino][PARENT]}")
                if repair:
                    md.update_inode(ino, parent=parent)
    for ino, row in inodes.items():
        is_dir = stat.S_ISDIR(row[MODE])
        if ino != 1 and names[ino] == 0:
            r.error(f"orphaned inode {ino} (no name points to it)")
            if repair:
                md.delete_inode(ino)
            continue
        if is_dir and names[ino] > 1:
            r.error(f"directory {ino} has {names[ino]} names")
        want = 2 + subdirs[ino] if is_dir else names[ino]
        if row[NLINK] != want:
            r.error(f"inode {ino} has nlink {row[NLINK]}, expected {want}")
            if repair:
                md.update_inode(ino, nlink=want)
    if progress:
        print(f"fsck: {len(inodes)} inodes, {sum(names.values())} names checked",
              file=sys.stderr)

    owned = np.zeros(dev.nblocks, dtype=np.bool_)
    per_inode: Counter[int] = Counter()
    written_runs: list[tuple[int, int]] = []
    for ino, fb, devb, count, state in md.all_extents():
        row = inodes.get(ino)  # type: ignore[assignment]
        if row is None or (repair and names[ino] == 0 and ino != 1):
            r.error(f"extent of missing inode {ino} at device block {devb}")
            if repair:
                md.delete_extent(ino, fb)
            continue
        if not stat.S_ISREG(row[MODE]):
            r.error(f"extent on non-regular inode {ino}")
            if repair:
                md.delete_extent(ino, fb)
            continue
        if devb < 0 or count <= 0 or devb + count > dev.nblocks:
            r.error(f"extent of inode {ino} at blocks {devb}+{count} is outside the device")
            if repair:
                md.delete_extent(ino, fb)
            continue
        if owned[devb:devb + count].any():
            r.error(f"device blocks {devb}+{count} of inode {ino} are owned twice")
            if repair:
                md.delete_extent(ino, fb)
            continue
        owned[devb:devb + count] = True
        per_inode[ino] += count
        if state == WRITTEN:
            written_runs.append((devb, count))
    for ino, row in inodes.items():
        if stat.S_ISREG(row[MODE]) and row[BLOCKS] != per_inode[ino] and \
                (names[ino] or ino == 1):
            r.error(f"inode {ino} records {row[BLOCKS]} blocks, its extents hold {per_inode[ino]}")
            if repair:
                md.update_inode(ino, blocks=per_inode[ino])
    written = dev.written_blocks()
    stale = written[~owned[written]]
    if len(stale):
        r.note(f"{len(stale)} free blocks still hold data from an interrupted session "
               "(discarded at the next mount" + (", and now)" if repair else ")"))
        if repair:
            import trio
            from kernelshim import ROOT_PRINCIPAL

            async def _discard() -> None:
                for b in stale.tolist():
                    await dev.discard(b, 1, principal=ROOT_PRINCIPAL)
            trio.run(_discard)
    if verify:
        import trio
        from kernelshim import ROOT_PRINCIPAL
        bad = 0

        async def _verify() -> int:
            nbad = 0
            for devb, count in written_runs:
                for b in range(devb, devb + count):
                    try:
                        await dev.read(BlockNo(b), 1, principal=ROOT_PRINCIPAL)
                    except ChecksumError:
                        nbad += 1
                        r.error(f"checksum mismatch in device block {b}")
            return nbad
        bad = trio.run(_verify)
        r.note(f"verified {sum(c for _, c in written_runs)} data blocks, {bad} bad")
    r.note(f"{int(owned.sum())} of {dev.nblocks} blocks in use by {len(inodes)} inodes")
