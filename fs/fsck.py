"""Offline check and repair of a volume (`sluice fsck`; the daemon must not be running).

What is checked, in this order, and what `repair` does. A repair only drops or zeroes
what the report names, and each repair is reported on the line after its error:

- volume values: max_inodes not a positive integer (repair: set it as mkfs does),
  the `unflushed` list not a list of inode numbers (repair: empty it).
- inodes: a row whose id, file type or symlink target makes no sense (repair: free
  the inode with its extents and xattrs; its names are then dangling); other columns
  out of range or not integers (`fs.inodes.row_problems`: uid and gid, times,
  generation, rdev, the principal tag, a size past MAX_FILE_SIZE) (repair: set uid and
  gid to 0, root, times to 0, a size to the end of the file's extents); link and block
  counts are left to their own checks below.
- names: entries naming a missing or invalid inode, in a missing or non-directory
  parent, with an invalid name, naming the root, or giving a directory a second name
  (repair: drop the entry).
- orphans: inodes no name reachable from the root points to, including directories
  in a cycle cut off from the root (repair: free the inode with its extents, xattrs
  and entries). An inode unlinked while open when the daemon stopped (nlink 0, no
  name) is the same state legitimately left by a crash, which the next mount frees:
  a note, not an error (repair frees it too).
- link counts: nlink of a file = its names; of a directory 2 + its subdirectories;
  a directory's parent field = the directory naming it (repair: set them).
- extents: of missing or non-regular inodes, malformed, past the device end, mapping
  a file block twice, sharing device blocks with another extent (a doubly-owned
  block), and unwritten (laid out, never committed) or written blocks past the end of
  the file (repair: drop exactly the blocks concerned; the rest of the extent stays,
  the dropped range reads as zeros). Unwritten blocks past the end on a volume whose
  daemon did not unmount it (its mount.json is still there: killed, or running
  read-only) are the state a crash legitimately leaves — an open file's KEEP_SIZE
  reservation or a direct client's write layout — which the next mount drops: a
  note, not an error (repair drops them too). A doubly-owned block stays with the owner that
  most plausibly wrote it last (written before unwritten, then the newer mtime): the
  other owner's view of it is another file's data, which is what must not survive.
- block counts: an inode's `blocks` = the blocks its extents hold (repair: set).
- xattrs: rows no sluice writes, which the daemon never serves: of a missing inode,
  a name that is not bytes or is empty or longer than 255 bytes, a value that is not
  bytes or is over 64 KiB (repair: remove the row).
- charges: the principals that inodes, entries and extents are tagged with exist in
  principals.json. Storage usage is never stored: the mount recounts it from these
  tags and silently charges an unknown tag to root (repair: zero the tag, i.e. charge
  root). Principals whose recounted usage is over their bank are noted (no error:
  lowering a bank below the usage is allowed; they get EDQUOT until they free space).
- leaked blocks: device blocks holding data (a nonzero checksum) no extent owns.
  A killed daemon leaves them (written, never committed) and so do the repairs above;
  the free-space map is rebuilt from the extents, so they are free space and the next
  mount discards them: a note, not an error (repair discards them).
- data, with `verify_data`: every block of every written extent is read and its
  checksum verified; a bad block is reported with its file (path if it has one, else
  inode) and byte offset (repair: zero the block, so the file reads zeros there
  instead of EIO; its old contents are lost either way).

Repairs happen in one metadata transaction, made durable before any block is
discarded or zeroed (a crash during fsck leaves the old metadata or the new). Then the
volume is checked again (metadata in full, data where it was zeroed): what is still
wrong is reported as left, so `--repair` followed by a plain run is clean, or the
repair run itself says what it could not fix and exits 4.

The device is reached through `_Device` only, the one place to adapt when the block
device's construction changes.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import sqlite3
import stat
import sys
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import trio

from kernelshim import (ROOT_PRINCIPAL, WRITTEN, UNWRITTEN, BlockDevice, BlockNo, ChecksumError,
                        SluiceError)
from kernelshim.principals import ENTRY_COST, PrincipalError, PrincipalTable

from .commit import UNFLUSHED_KEY, unflushed_list
from .errors import VolumeError
from .inodes import MAX_FILE_SIZE, row_problems
from .metadata import INODE_COLUMNS, Metadata
from .xattrs import XATTR_NAME_MAX, XATTR_SIZE_MAX
from .volume import (DB, MOUNT_STATE, VolumeLock, checking_lock, daemon_alive, open_metadata,
                     read_header, read_mount_state)

#: exit statuses of `sluice fsck` (README): clean, errors repaired, errors left
EXIT_CLEAN = 0
EXIT_REPAIRED = 1
EXIT_UNCORRECTED = 4

ROOT_INODE = 1
NAME_MAX = 255
#: blocks read per device request when verifying data
_VERIFY_CHUNK = 256
#: leaked-block runs named in a report line before "..."
_SHOW_RUNS = 8


@dataclasses.dataclass
class FsckReport:
    """What a run found and did. `lines` is the report as printed (stdout)."""

    #: errors found by the first pass (before any repair)
    errors: int = 0
    #: of those (and of any a repair uncovered), still wrong at the end of the run
    left: int = 0
    repair: bool = False
    lines: list[str] = dataclasses.field(default_factory=list)

    @property
    def repaired(self) -> int:
        return max(0, self.errors - self.left) if self.repair else 0

    @property
    def exit_status(self) -> int:
        if self.left:
            return EXIT_UNCORRECTED
        return EXIT_REPAIRED if self.errors else EXIT_CLEAN

    def verdict(self) -> str:
        if not self.errors and not self.left:
            return "clean"
        n = f"{self.errors} error{'' if self.errors == 1 else 's'}"
        if not self.repair:
            return f"{n} found"
        if not self.left:
            return f"{n} repaired"
        return f"{n} found, {self.repaired} repaired, {self.left} left"


class _Pass:
    """The findings of one pass over the volume, before they become report lines."""

    def __init__(self, repair: bool) -> None:
        self.repair = repair
        self.errors = 0
        self.lines: list[str] = []

    def error(self, msg: str, fix: str | None) -> None:
        """An inconsistency; `fix` says what the repair did (None: nothing can)."""
        self.errors += 1
        self.lines.append("error: " + msg)
        if self.repair:
            self.lines.append("  " + (f"repaired: {fix}" if fix else
                                      "not repaired: fsck cannot fix this"))

    def note(self, msg: str, done: str | None = None) -> None:
        """Something worth knowing that is not an error (and, with `done`, what the
        repair did about it)."""
        self.lines.append("note: " + msg)
        if self.repair and done:
            self.lines.append(f"  repaired: {done}")

    def info(self, msg: str) -> None:
        self.lines.append(msg)


class _Progress:
    """Progress of a long run, on stderr (stdout is the report)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = time.monotonic()  # (a run shorter than a second shows no ticks)

    def phase(self, msg: str) -> None:
        if self.enabled:
            print(f"fsck: {msg}", file=sys.stderr, flush=True)

    def tick(self, done: int, total: int, what: str) -> None:
        """At most one line a second."""
        now = time.monotonic()
        if self.enabled and now - self._last >= 1.0:
            self._last = now
            pct = 100 * done // total if total else 100
            print(f"fsck: {what}: {done} of {total} ({pct}%)", file=sys.stderr, flush=True)


# -- the device, offline ----------------------------------------------------------------

class _Device:
    """The volume's block device as fsck uses it: the only code here that touches it.

    Opened with the `none` timing profile (fsck should not pay modeled service time).
    Each call runs its own short trio loop: fsck is synchronous, and callers (tests)
    may run it in a worker thread, where no loop is running."""

    def __init__(self, path: Path) -> None:
        self._dev = BlockDevice.open(path, profile="none")
        self.nblocks = self._dev.nblocks
        self.block_size = self._dev.block_size

    def close(self) -> None:
        self._dev.close()

    def written_blocks(self) -> np.ndarray:
        """Blocks that hold data (nonzero checksum), sorted."""
        return self._dev.written_blocks()

    def find_bad(self, runs: list[tuple[int, int]],
                 on_progress: Callable[[int], None]) -> list[int]:
        """Read the runs (device block, count) and return the blocks that fail their
        checksum, in order."""
        dev = self._dev
        bs = dev.block_size
        buf = memoryview(bytearray(_VERIFY_CHUNK * bs))

        async def scan() -> list[int]:
            bad: list[int] = []
            done = 0
            for start, count in runs:
                b, end = start, start + count
                while b < end:
                    n = min(_VERIFY_CHUNK, end - b)
                    try:
                        await dev.read_into(BlockNo(b), n, buf[:n * bs],
                                            principal=ROOT_PRINCIPAL)
                    except ChecksumError as exc:
                        # The error names the first bad block: go on after it.
                        first = exc.block if exc.block is not None else b
                        bad.append(first)
                        done += first + 1 - b
                        b = first + 1
                    else:
                        done += n
                        b += n
                    on_progress(done)
            return bad
        return trio.run(scan)

    def zero(self, blocks: Iterable[int]) -> None:
        """Overwrite blocks with zeros (and their checksums to match)."""
        dev = self._dev
        zeros = bytes(dev.block_size)

        async def run() -> None:
            for b in blocks:
                await dev.write(BlockNo(b), zeros, principal=ROOT_PRINCIPAL)
        trio.run(run)

    def discard(self, runs: Iterable[tuple[int, int]]) -> None:
        dev = self._dev

        async def run() -> None:
            for b, n in runs:
                await dev.discard(BlockNo(b), n, principal=ROOT_PRINCIPAL)
        trio.run(run)

    def flush(self) -> None:
        """Make the writes and discards above durable (data, then checksums)."""
        trio.run(self._dev.flush)


# -- the metadata model ---------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class _Inode:
    id: int
    mode: int
    nlink: int
    size: int
    blocks: int
    parent: int
    mtime_ns: int
    is_dir: bool = False
    is_reg: bool = False

    def __post_init__(self) -> None:
        # (fields, not properties: the checks ask them for every entry and extent)
        self.is_dir = stat.S_ISDIR(self.mode)
        self.is_reg = stat.S_ISREG(self.mode)


@dataclasses.dataclass(slots=True)
class _Extent:
    """An extent row and what is left of it: `pieces` (file block, device block, count)
    shrink as checks drop blocks from it."""

    ino: int
    fb: int
    dev: int
    count: int
    state: int
    pieces: list[tuple[int, int, int]]

    def drop_file_range(self, lo: int, hi: int) -> int:
        """Drop file blocks [lo, hi) from the pieces; returns how many were held."""
        out: list[tuple[int, int, int]] = []
        dropped = 0
        for fb, dev, n in self.pieces:
            a, b = max(fb, lo), min(fb + n, hi)
            if a >= b:
                out.append((fb, dev, n))
                continue
            dropped += b - a
            if fb < a:
                out.append((fb, dev, a - fb))
            if b < fb + n:
                out.append((b, dev + (b - fb), fb + n - b))
        self.pieces = out
        return dropped

    def drop_dev_range(self, lo: int, hi: int) -> int:
        """Drop device blocks [lo, hi) (a piece maps device blocks to file blocks
        linearly)."""
        dropped = 0
        for fb, dev, n in list(self.pieces):
            a, b = max(dev, lo), min(dev + n, hi)
            if a < b:
                dropped += self.drop_file_range(fb + a - dev, fb + b - dev)
        return dropped

    @property
    def changed(self) -> bool:
        return self.pieces != [(self.fb, self.dev, self.count)]

    @property
    def held(self) -> int:
        return sum(n for _fb, _dev, n in self.pieces)


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


def _runs(blocks: np.ndarray) -> list[tuple[int, int]]:
    """Sorted block numbers -> (start, count) runs."""
    if not len(blocks):
        return []
    cut = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [len(blocks)]))
    return [(int(blocks[s]), int(e - s)) for s, e in zip(starts, ends)]


def _is_int(v: object) -> bool:
    return type(v) is int  # (SQLite columns are loosely typed: '7' and 7.0 are not ids)


def _all_int(values: tuple[object, ...]) -> bool:
    return all(type(v) is int for v in values)


class _Checker:
    """One pass over an open volume. With `repair`, metadata repairs go into the open
    transaction of `md` at once; device repairs are collected in `discard`/`zero` for
    the caller to apply after the transaction is durable."""

    def __init__(self, path: Path, md: Metadata, dev: _Device, out: _Pass,
                 progress: _Progress, *, repair: bool, verify_data: bool,
                 verify_only: set[int] | None = None) -> None:
        self.path = path
        self.md = md
        self.dev = dev
        self.out = out
        self.progress = progress
        self.repair = repair
        self.verify_data = verify_data
        #: verify only these device blocks (the re-check after a repair)
        self.verify_only = verify_only
        #: the daemon that mounted the volume last did not unmount it (killed, or it
        #: still runs read-only): state a crash leaves is a note, not an error
        self.unclean = (path / MOUNT_STATE).exists()
        self.bs = dev.block_size
        self.inodes: dict[int, _Inode] = {}
        #: inodes freed by this pass (orphans, invalid): their extents go with them
        self.freed: set[int] = set()
        self.paths: dict[int, str] = {}
        #: the extents of live inodes, as the repair leaves them
        self.extents: list[_Extent] = []
        #: (start, end) of every extent row as it is, clipped to the device
        self.owned_now: list[tuple[int, int]] = []
        self.blocks_in_use = 0
        #: device work for after the metadata commit
        self.discard: list[tuple[int, int]] = []
        self.zero: list[int] = []

    # -- naming things in the report ----------------------------------------------------

    def where(self, ino: int) -> str:
        p = self.paths.get(ino)
        return f"{p} (inode {ino})" if p else f"inode {ino}"

    def at(self, ino: int, file_block: int) -> str:
        return f"{self.where(ino)} at byte offset {file_block * self.bs}"

    # -- the pass -------------------------------------------------------------------------

    def run(self) -> None:
        if self.unclean:
            # (as e2fsck says it: the reader should know; probe 19, F17)
            state = read_mount_state(self.path) or {}
            if daemon_alive(self.path, state):
                # (probe 27: a healthy read-only mount was told its daemon was killed)
                self.out.note(f"the volume is mounted at {state['mountpoint']} (daemon "
                              f"pid {state['pid']}), read-only: checked as it stands")
            else:
                who = (f" (daemon pid {state['pid']} at {state['mountpoint']})"
                       if state else "")
                self.out.note(f"the volume was not cleanly unmounted{who}: its daemon "
                              "was killed; the next read-write mount finishes what it "
                              "left, and changes not fsync'd in its last second may be "
                              "gone")
        self.progress.phase("checking inodes and names")
        self.check_meta()
        if not self.check_inodes():
            return
        self.check_names()
        self.progress.phase(f"{len(self.inodes)} inodes, {len(self.paths)} reachable; "
                            "checking extents")
        self.check_extents()
        self.check_xattrs()
        self.progress.phase("checking principal charges")
        self.check_charges()
        self.progress.phase("checking for leaked blocks")
        self.check_leaked()
        if self.verify_data:
            self.check_data()
        live = sum(1 for ino in self.inodes if ino not in self.freed) if self.repair \
            else len(self.inodes)
        self.out.info(f"{self.blocks_in_use} of {self.dev.nblocks} blocks in use by "
                      f"{live} inodes")

    def check_meta(self) -> None:
        """The volume-wide values the mount reads: max_inodes (the mount refuses one
        that is not a positive integer) and the `unflushed` list (the mount ignores one
        that is not a list of inode numbers, and empties no discardable file)."""
        max_inodes = self.md.meta("max_inodes")
        if max_inodes is not None and (type(max_inodes) is not int or max_inodes < 1):
            fix = max(1024, self.dev.nblocks)  # (what mkfs sets without --inodes)
            self.out.error(f"max_inodes {max_inodes!r} in meta.db is not a positive integer",
                           f"set it to {fix}")
            if self.repair:
                self.md.set_meta("max_inodes", fix)
        if unflushed_list(self.md.meta(UNFLUSHED_KEY)) is None:
            self.out.error(f"the {UNFLUSHED_KEY!r} list in meta.db is not a list of inode "
                           "numbers (which discardable files a crash caught is unknown)",
                           "emptied the list")
            if self.repair:
                self.md.set_meta(UNFLUSHED_KEY, "[]")

    def check_inodes(self) -> bool:
        """Load the inodes; drop those that cannot be told apart (id, type, a symlink's
        target), set the columns that are out of range to safe values, and leave link
        and block counts to the checks that count them. False: no root."""
        for row in self.md.all_inodes():
            ino = row[0]
            bad = row_problems(row)
            if {"id", "mode", "target"} & bad.keys():
                self.out.error(f"inode {ino!r} is malformed ("
                               + ", ".join(f"{k} {v}" for k, v in bad.items()) + ")",
                               "freed it (with its extents and xattrs)")
                if self.repair:
                    self.md.delete_inode(ino)  # type: ignore[arg-type]
                self.freed.add(ino)  # (its extents go with it, not reported again)
                continue
            values = dict(zip(INODE_COLUMNS, row))
            # Counted later: an unusable count is reported and set there.
            for col in ("nlink", "blocks"):
                bad.pop(col, None)
                if type(values[col]) is not int:
                    values[col] = -1
            if "size" in bad:
                values["size"] = self._fitting_size(ino, values["mode"], values["target"])
            for col, why in bad.items():
                fix = {"uid": 0, "gid": 0, "generation": 1, "rdev": 0,
                       "principal": ROOT_PRINCIPAL}.get(col, values.get(col) if col == "size"
                                                        else 0)
                values[col] = fix
                self.out.error(f"inode {ino}: {col} {why}",
                               f"set it to {fix}" + (" (root)" if col in ("uid", "gid")
                                                     else ""))
                if self.repair:
                    self.md.update_inode(ino, **{col: fix})
            self.inodes[ino] = _Inode(ino, values["mode"], values["nlink"], values["size"],
                                      values["blocks"], values["parent"], values["mtime_ns"])
        root = self.inodes.get(ROOT_INODE)
        if root is None or not root.is_dir:
            self.out.error("the root directory (inode 1) is missing or not a directory", None)
            return False
        return True

    def _fitting_size(self, ino: int, mode: int, target: object) -> int:
        """A size for an inode whose size is out of range: a file's covers its extents
        (so none is dropped as past its end), a symlink's is its target's length."""
        if stat.S_ISLNK(mode) and isinstance(target, bytes):
            return len(target)
        if not stat.S_ISREG(mode):
            return 0
        ends = [fb + n for fb, _d, n, _s, _p in self.md.load_extents(ino)
                if _is_int(fb) and _is_int(n) and 0 <= fb and 0 < n]
        return min(max(ends, default=0) * self.bs, MAX_FILE_SIZE)

    def check_names(self) -> None:
        """Entries, reachability from the root, link counts."""
        inodes = self.inodes
        children: dict[int, list[tuple[int, bytes, int]]] = defaultdict(list)
        for did, parent, name, ino in self.md.all_dentries():
            p = inodes.get(parent)
            shown = _show(name) if isinstance(name, bytes) else repr(name)
            problem = None
            if not isinstance(name, bytes) or not name or len(name) > NAME_MAX \
                    or b"/" in name or b"\0" in name or name in (b".", b".."):
                problem = f"entry {shown!r} in inode {parent} has an invalid name"
            elif p is None or not p.is_dir:
                problem = (f"dangling entry {shown!r}: its directory, inode {parent}, is "
                           + ("missing" if p is None else "not a directory"))
            elif ino not in inodes:
                problem = f"dangling entry {shown!r} in inode {parent} -> missing inode {ino}"
            elif ino == ROOT_INODE:
                problem = f"entry {shown!r} in inode {parent} names the root directory"
            if problem:
                self.out.error(problem, "removed the entry")
                if self.repair:
                    self.md.delete_dentry_id(did)
                continue
            children[parent].append((did, name, ino))

        # Which entry is a directory's name: first those agreeing with the parent the
        # directory records, walking down from the root; then, for directories that
        # leaves out, any entry in a reached directory. Any other entry naming a
        # directory is a second name (a hard link to a directory, or a cycle).
        named_by: dict[int, tuple[int, int, bytes]] = {}  # dir -> (dentry, parent, name)
        for consistent_only in (True, False):
            queue = deque([ROOT_INODE, *named_by])
            while queue:
                d = queue.popleft()
                for did, name, ino in sorted(children.get(d, ())):
                    node = inodes[ino]
                    if node.is_dir and ino not in named_by and \
                            (node.parent == d or not consistent_only):
                        named_by[ino] = (did, d, name)
                        queue.append(ino)
        self.paths[ROOT_INODE] = "/"
        order = [ROOT_INODE]
        for d in order:  # (grows while iterating: a walk down the chosen names)
            base = self.paths[d].rstrip("/")
            for did, name, ino in sorted(children.get(d, ())):
                if inodes[ino].is_dir and named_by[ino][0] == did:
                    self.paths[ino] = f"{base}/{_show(name)}"
                    order.append(ino)
        names: dict[int, int] = defaultdict(int)
        subdirs: dict[int, int] = defaultdict(int)
        for d in order:
            base = self.paths[d].rstrip("/")
            for did, name, ino in sorted(children.get(d, ())):
                if not inodes[ino].is_dir:
                    names[ino] += 1
                    self.paths.setdefault(ino, f"{base}/{_show(name)}")
                elif named_by[ino][0] == did:
                    subdirs[d] += 1
                else:
                    self.out.error(f"directory {self.where(ino)} has a second name "
                                   f"{_show(name)!r} in {self.where(d)}",
                                   "removed the second name")
                    if self.repair:
                        self.md.delete_dentry_id(did)
        named_in = {ino: parent for ino, (_did, parent, _name) in named_by.items()}

        # What the walk did not reach is orphaned.
        has_entry = {ino for ents in children.values() for _did, _n, ino in ents}
        for ino in sorted(inodes):
            if ino in self.paths:
                continue
            node = inodes[ino]
            if node.nlink == 0 and ino not in has_entry and not children.get(ino):
                self.out.note(f"inode {ino} was unlinked while open when the daemon stopped "
                              "(the next mount frees it)", "freed it")
            else:
                why = ("its names are in directories cut off from the root"
                       if ino in has_entry else "no name points to it")
                self.out.error(f"orphaned inode {ino} ({why})",
                               "freed it (with its extents, xattrs"
                               + (" and entries)" if children.get(ino) else ")"))
            self.freed.add(ino)
            if self.repair:
                for did, _name, _ino in children.get(ino, ()):
                    self.md.delete_dentry_id(did)
                self.md.delete_inode(ino)

        for ino, node in inodes.items():
            if ino in self.freed:
                continue
            want = 2 + subdirs[ino] if node.is_dir else names[ino]
            if node.nlink != want:
                self.out.error(f"{self.where(ino)} has link count {node.nlink}, "
                               f"its names make {want}", f"set it to {want}")
                if self.repair:
                    self.md.update_inode(ino, nlink=want)
            if node.is_dir:
                parent = named_in.get(ino, ROOT_INODE)
                if node.parent != parent:
                    self.out.error(f"directory {self.where(ino)} records parent "
                                   f"{node.parent}, it is named in {parent}",
                                   f"set it to {parent}")
                    if self.repair:
                        self.md.update_inode(ino, parent=parent)

    def check_extents(self) -> None:
        inodes, nblocks = self.inodes, self.dev.nblocks
        by_inode: dict[int, list[_Extent]] = defaultdict(list)
        recorded: dict[int, int] = defaultdict(int)  # blocks of each inode's extents
        for ino, fb, dev, count, state in self.md.all_extents():
            node = inodes.get(ino)
            where = f"extent at file block {fb!r} of inode {ino}"
            if _is_int(dev) and _is_int(count) and max(0, dev) < min(nblocks, dev + count):
                self.owned_now.append((max(0, dev), min(nblocks, dev + count)))
            if ino in self.freed:
                continue  # freed with its inode
            problem = None
            if node is None:
                problem = f"{where} belongs to a missing inode"
            elif not node.is_reg:
                problem = f"{where} belongs to {self.where(ino)}, which is not a regular file"
            elif not _all_int((fb, dev, count, state)) or fb < 0 \
                    or dev < 0 or count <= 0 or state not in (WRITTEN, UNWRITTEN):
                problem = (f"{where} is malformed (device block {dev!r}, count {count!r}, "
                           f"state {state!r})")
            elif dev >= nblocks:
                problem = (f"{where} ({self.where(ino)}) maps device blocks {dev}+{count}, "
                           f"outside the device ({nblocks} blocks)")
            if problem:
                self.out.error(problem, f"dropped the extent ({count!r} blocks)")
                if self.repair:
                    self.md.delete_extent(ino, fb)
                continue
            e = _Extent(ino, fb, dev, count, state, [(fb, dev, count)])
            recorded[ino] += count
            if dev + count > nblocks:
                n = e.drop_dev_range(nblocks, dev + count)
                self.out.error(f"extent of {self.at(ino, fb)} runs past the end of the "
                               f"device: its last {n} blocks (from device block {nblocks}) "
                               "do not exist", f"dropped those {n} blocks")
            by_inode[ino].append(e)

        # A file block mapped twice (ExtentMap refuses to load such a file).
        for ino, exts in by_inode.items():
            exts.sort(key=lambda x: x.fb)
            end = -1
            for e in exts:
                if e.fb < end:
                    n = e.drop_file_range(e.fb, end)
                    self.out.error(f"file blocks {e.fb}+{n} of {self.where(ino)} are mapped "
                                   "by two extents",
                                   f"dropped the second mapping ({n} blocks at device "
                                   f"block {e.dev})")
                end = max(end, e.fb + e.count)
            self.extents.extend(exts)

        self.check_shared_blocks([e for e in self.extents if e.ino not in self.freed])

        # Blocks past the end of the file: unwritten ones were laid out for a write
        # that was never committed (a direct client gone without closing: closing
        # trims them); written ones, a truncate in parts cut short by a crash, would
        # show stale bytes if the file grew (the next mount drops both).
        for ino, exts in by_inode.items():
            eof = -(-inodes[ino].size // self.bs)
            for e in exts:
                if not any(fb + n > eof for fb, _d, n in e.pieces):
                    continue
                first = max(eof, min(fb for fb, _d, _n in e.pieces))
                n = e.drop_file_range(eof, max(fb + n for fb, _d, n in e.pieces))
                if e.state == UNWRITTEN:
                    report = self.out.note if self.unclean else self.out.error
                    report(f"{n} unwritten blocks of {self.where(ino)} from byte "
                           f"offset {first * self.bs} lie past its end of file: laid "
                           "out for a write that was never committed"
                           + (" (the volume was not unmounted: the next mount drops "
                              "them)" if self.unclean else ""),
                           f"dropped those {n} blocks")
                else:
                    # A truncate of many extents saves the new size first and unmaps
                    # the rest a part at a time (docs/dev/invariants.md, R4): a crash
                    # between parts leaves written blocks past the end, which the next
                    # mount drops. On a volume unmounted cleanly they are damage.
                    report = self.out.note if self.unclean else self.out.error
                    report(f"{n} written blocks of {self.where(ino)} from byte "
                           f"offset {first * self.bs} lie past its end of file "
                           f"({inodes[ino].size} bytes)"
                           + (" (the volume was not unmounted: a truncate cut short; the "
                              "next mount drops them)" if self.unclean else ""),
                           f"dropped those {n} blocks")

        if self.repair:
            self._rewrite_extents(by_inode)
        # The count is wrong if it disagrees with the extents as they were; one that
        # only the drops above made wrong is part of those repairs.
        for ino, node in inodes.items():
            if ino in self.freed or not node.is_reg:
                continue
            held = sum(e.held for e in by_inode.get(ino, ()))
            if node.blocks != recorded[ino]:
                self.out.error(f"{self.where(ino)} records {node.blocks} blocks, its extents "
                               f"hold {recorded[ino]}", f"set it to {held}")
            if self.repair and node.blocks != held:
                self.md.update_inode(ino, blocks=held)

    def check_shared_blocks(self, extents: list[_Extent]) -> None:
        """Device blocks owned by two extents: the owner that most plausibly wrote the
        block last keeps it, the other loses it (see the module docstring)."""
        def rank(e: _Extent) -> tuple[int, int, int, int]:
            return (e.state == WRITTEN, self.inodes[e.ino].mtime_ns, e.ino, -e.fb)

        pieces = sorted((dev, dev + n, fb, i) for i, e in enumerate(extents)
                        for fb, dev, n in e.pieces)
        active: list[tuple[int, int, int, int]] = []  # heap of (end, start, fb, index)
        clashes: list[tuple[int, int, int, int, int, int]] = []
        for start, end, fb, i in pieces:
            while active and active[0][0] <= start:
                heapq.heappop(active)
            for a_end, a_start, a_fb, j in active:
                lo, hi = start, min(end, a_end)
                if lo < hi:
                    clashes.append((lo, hi, i, fb + lo - start, j, a_fb + lo - a_start))
            heapq.heappush(active, (end, start, fb, i))
        for lo, hi, i, fb_i, j, fb_j in clashes:
            a, b = extents[i], extents[j]
            win, lose, fb_w, fb_l = (a, b, fb_i, fb_j) if rank(a) > rank(b) else \
                (b, a, fb_j, fb_i)
            lose.drop_dev_range(lo, hi)
            self.out.error(f"device blocks {lo}+{hi - lo} are owned twice: by "
                           f"{self.at(a.ino, fb_i)} and by {self.at(b.ino, fb_j)}",
                           f"dropped them from {self.at(lose.ino, fb_l)} (it reads zeros "
                           f"there now); {self.where(win.ino)} keeps them")

    def _rewrite_extents(self, by_inode: dict[int, list[_Extent]]) -> None:
        for ino, exts in by_inode.items():
            changed = [e for e in exts if e.changed]
            if not changed:
                continue
            owner = {fb: p for fb, _d, _n, _s, p in self.md.load_extents(ino)}
            self.md.save_extent_changes(
                ino, [e.fb for e in changed],
                [(fb, dev, n, e.state, owner.get(e.fb, ROOT_PRINCIPAL))
                 for e in changed for fb, dev, n in e.pieces])

    def check_xattrs(self) -> None:
        """xattr rows no sluice could have written (a damaged or crafted meta.db): the
        daemon never serves them (a value over the limit, a name that is not bytes),
        so each is an error and the repair removes it."""
        for ino, name, why in self.md.bad_xattrs(XATTR_NAME_MAX, XATTR_SIZE_MAX):
            if ino in self.freed:
                continue  # freed with its inode
            shown = _show(name[:64]) if isinstance(name, bytes) else repr(name)[:64]
            owner = self.where(ino) if isinstance(ino, int) else repr(ino)
            self.out.error(f"xattr {shown!r} of {owner}"
                           f" is damaged: {why}", "removed it")
            if self.repair:
                self.md.delete_xattr_row(ino, name)

    def check_charges(self) -> None:
        """Every charge tag names a principal of principals.json."""
        try:
            table = PrincipalTable.load(self.path)
        except (PrincipalError, KeyError, TypeError, ValueError, AttributeError) as exc:
            self.out.error(f"principals.json cannot be loaded ({exc!r}); charges not checked "
                           "(fix or restore the file)", None)
            return
        usage = self.md.usage_by_principal()
        for pid in sorted(usage, key=repr):
            if table.by_id(pid).id == pid:  # (by_id answers root for unknown ids)
                continue
            blocks, inodes, entries, _names = usage[pid]
            self.out.error(f"{blocks or 0} blocks, {inodes} inodes and {entries} entries are "
                           f"charged to principal id {pid!r}, which principals.json does not "
                           "have (the mount would charge them to root)",
                           "zeroed the tag: charged them to root")
            if self.repair:
                self.md.move_principal(pid, ROOT_PRINCIPAL)  # type: ignore[arg-type]
        # Recount as the mount does, and compare with the banks.
        if self.repair:
            usage = self.md.usage_by_principal()
        space: dict[int, int] = defaultdict(int)
        count: dict[int, int] = defaultdict(int)
        for pid, (blocks, inodes, entries, name_bytes) in usage.items():
            for q in table.by_id(pid).chain():
                space[q.id] += (blocks or 0) * self.bs + entries * ENTRY_COST + (name_bytes or 0)
                count[q.id] += inodes
        for p in table.walk():
            b = p.banks
            if b.space is not None and space[p.id] > b.space:
                self.out.note(f"principal {p.name!r} holds {space[p.id]} bytes, over its space "
                              f"bank of {b.space} (its writes get EDQUOT until it frees space)")
            if b.inodes is not None and count[p.id] > b.inodes:
                self.out.note(f"principal {p.name!r} holds {count[p.id]} inodes, over its bank "
                              f"of {b.inodes}")

    def check_leaked(self) -> None:
        """Blocks holding data no extent owns: as the volume is (plain run), or as the
        repair leaves it (what it freed is discarded in the same run)."""
        if self.repair:
            ranges = [(dev, dev + n) for e in self.extents for _fb, dev, n in e.pieces]
        else:
            ranges = self.owned_now
        merged: list[list[int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.blocks_in_use = sum(hi - lo for lo, hi in merged)
        written = self.dev.written_blocks()
        if merged:
            starts = np.array([lo for lo, _hi in merged], dtype=np.int64)
            ends = np.array([hi for _lo, hi in merged], dtype=np.int64)
            idx = np.searchsorted(starts, written, side="right") - 1
            inside = (idx >= 0) & (written < ends[np.maximum(idx, 0)])
            leaked = written[~inside]
        else:
            leaked = written
        if not len(leaked):
            return
        runs = _runs(leaked)
        shown = ", ".join(f"{b}+{n}" for b, n in runs[:_SHOW_RUNS])
        more = f", ... ({len(runs)} runs)" if len(runs) > _SHOW_RUNS else ""
        if self.repair:
            self.out.note(f"{len(leaked)} device blocks hold data no extent owns once "
                          f"repaired ({shown}{more}): leaked, or freed by the repairs above",
                          f"discarded {len(leaked)} blocks")
        else:
            self.out.note(f"{len(leaked)} leaked blocks: device blocks holding data no "
                          f"extent owns ({shown}{more}); free space, which the next mount "
                          "discards")
        self.discard = runs

    def check_data(self) -> None:
        """Read every block of every written extent (or only `verify_only`)."""
        owner: list[tuple[int, int, int, int]] = []  # (dev, n, ino, fb)
        for e in self.extents:
            if e.state != WRITTEN or e.ino in self.freed:
                continue
            for fb, dev, n in e.pieces:
                owner.append((dev, n, e.ino, fb))
        owner.sort()
        runs = [(dev, n) for dev, n, _i, _f in owner]
        if self.verify_only is not None:
            keep = self.verify_only
            runs = [(b, 1) for dev, n in runs for b in range(dev, dev + n) if b in keep]
        total = sum(n for _b, n in runs)
        self.progress.phase(f"verifying {total} data blocks")
        bad = self.dev.find_bad(runs, lambda done: self.progress.tick(done, total,
                                                                      "verified blocks"))
        starts = [dev for dev, _n, _i, _f in owner]
        for b in bad:
            dev, _n, ino, fb = owner[bisect.bisect_right(starts, b) - 1]
            offset = (fb + b - dev) * self.bs
            self.out.error(f"checksum mismatch in device block {b}: {self.where(ino)} "
                           f"bytes {offset}..{offset + self.bs - 1}",
                           f"zeroed bytes {offset}..{offset + self.bs - 1} of "
                           f"{self.where(ino)} (its data there is lost; it reads zeros, "
                           "not EIO)")
        self.zero = bad
        self.out.info(f"verified {total} data blocks, {len(bad)} bad")


def fsck(path: Path, *, repair: bool = False, verify_data: bool = False,
         progress: bool = False) -> FsckReport:
    """Check (and with `repair`, repair) the volume at `path`: unmounted, or for a
    check also mounted read-only."""
    read_header(path)
    report = FsckReport(repair=repair)
    prog = _Progress(progress)
    # A check may run while the volume is mounted read-only; a repair only unmounted.
    with VolumeLock(path, purpose="fsck") if repair else checking_lock(path):
        md = open_metadata(path, read_only=not repair)  # (a check writes nothing)
        try:
            dev = _Device(path)
        except (OSError, ValueError, SluiceError) as exc:
            md.close()
            raise VolumeError(f"{path}: cannot open the block device: {exc}") from None
        except BaseException:
            md.close()
            raise
        try:
            first = _Pass(repair)
            check = _Checker(path, md, dev, first, prog, repair=repair,
                             verify_data=verify_data)
            check.run()
            report.errors = first.errors
            report.lines += first.lines
            report.left = first.errors
            if repair:
                _apply(md, dev, check, prog)
                # Check again: what is still wrong is left (and said so).
                prog.phase("checking the repaired volume")
                again = _Pass(False)
                _Checker(path, md, dev, again, _Progress(False), repair=False,
                         verify_data=bool(check.zero),
                         verify_only=set(check.zero)).run()
                report.left = again.errors
                if again.errors:
                    report.lines.append("still wrong after the repair:")
                    report.lines += ["  " + line for line in again.lines
                                     if line.startswith("error: ")]
        except BaseException as exc:
            # Close without committing (Metadata.close would commit): repairs cut
            # short, by an error or ^C, are rolled back as a whole.
            md.db.close()
            dev.close()
            if isinstance(exc, sqlite3.Error):
                raise VolumeError(f"{path / DB}: the metadata database is unreadable: "
                                  f"{exc}") from None
            raise
        md.close()
        dev.close()
    report.lines.append(f"{path}: {report.verdict()}")
    return report


def _apply(md: Metadata, dev: _Device, check: _Checker, prog: _Progress) -> None:
    """Make the metadata repairs durable, then do the device's: a block is discarded
    only once no committed extent can point at it (DESIGN: crash rules)."""
    md.commit()
    md.make_durable()
    if check.discard:
        prog.phase(f"discarding {sum(n for _b, n in check.discard)} leaked blocks")
        dev.discard(check.discard)
    if check.zero:
        prog.phase(f"zeroing {len(check.zero)} bad blocks")
        dev.zero(check.zero)
    dev.flush()
