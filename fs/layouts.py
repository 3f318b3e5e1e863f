# mypy: disable-error-code="misc"
# (a mixin of FileSystem: its methods take `self: FileSystem`, which mypy flags as "misc")
"""The layout server for direct clients (the shim's socket server calls these through
fs/service.py): grants, write layouts (layout_get), commits (layout_commit), O_APPEND,
close, and revoking direct clients' grants."""

from __future__ import annotations

from typing import Callable, TYPE_CHECKING

import trio

from kernelshim import Grant, HOLE, Rights, UNWRITTEN
from kernelshim.extents import block_span, blocks_to_cover

from .errors import InvalidArgument, NotFound
from .inodes import Caller, Inode, MAX_FILE_SIZE, now_ns

#: written ranges a commit marks between two yields of the event loop
COMMIT_STEP = 256

if TYPE_CHECKING:
    from .filesystem import FileSystem


#: blocks copied per request when a write layout relocates sealed blocks
COPY_BLOCKS = 256

#: separate sealed runs one layout_get relocates at most (docs/dev/protocol.md): each
#: relocation edits the file's map, so a range of tens of thousands of one-block runs
#: kept the daemon busy for seconds to a minute per call (RELIABILITY 2026-12-01). The
#: runs past the cap stay sealed: a write there is relocated by the daemon, as any
#: write over committed blocks is (FileOps._write_piece -> write_relocating).
LAYOUT_COW_RUNS = 256


class Layouts:
    """The layout server for direct clients (a `FileSystem` concern; see filesystem.py).

    State it owns: the grants held by direct clients (`_direct`)."""

    #: grants held by direct clients: grant -> the caller it was issued to
    _direct: dict[Grant, Caller]

    def grant_direct(self: FileSystem, node: Inode, readable: bool, writable: bool,
                     caller: Caller) -> Grant:
        if writable:
            self._writable()
        if node.nlink == 0 and node.opens == 0:
            # being freed (`_destroy`): as `open` refuses it (review of stop 23, 5)
            raise NotFound(f"inode {node.id} was removed")
        g = self._grant_for(node, readable, writable, caller.principal)
        self._direct[g] = caller
        if writable:
            # A write grant lets the client write blocks it holds (fresh ones) behind
            # this server's back, with no request in which to clear the set-ID bits as
            # a write through the mount does (killpriv, docs/dev/invariants.md): they
            # go now, for a non-root opener. Writes, commits and appends clear them too
            # (`_direct_kill_priv`: bits set again while the grant is held).
            self._direct_kill_priv(node, g)
        self._push_hints(node)
        return g

    def _direct_kill_priv(self: FileSystem, node: Inode, grant: Grant) -> None:
        """A direct client changes `node` through `grant`: clear set-user-ID (and
        set-group-ID with group execute) unless the client is root, as the mount does
        for a write or truncate by an opener without CAP_FSETID."""
        g: Grant | None = grant
        while g is not None and g not in self._direct:
            g = g.parent  # (a grant minted from the one the client opened)
        who = self._direct.get(g) if g is not None else None
        if who is not None and who.uid != 0 and node.is_reg:
            self._drop_setid(node)

    def _direct_node(self: FileSystem, grant: Grant) -> Inode:
        if grant.revoked or grant not in self._direct and grant.parent is None:
            from kernelshim import GrantRevoked
            raise GrantRevoked(f"grant {grant.id} on inode {grant.inode} was revoked")
        return self.inode(grant.inode)

    async def _revoke_direct(self: FileSystem, node: Inode,
                             keep: Callable[[Grant, Caller], bool] | None = None) -> None:
        """Revoke direct clients' grants on `node` (those `keep` rejects, or all) and wait
        until no request through them is in flight."""
        gone: list[Grant] = []
        for g, who in list(self._direct.items()):
            if g.inode == node.id and (keep is None or not keep(g, who)):
                gone.extend(self.kernel.revoke_nowait(g))
                del self._direct[g]
        await self._release_unmapped([], gone)  # nothing unmapped: revoke and drain

    async def layout_get(self: FileSystem, grant: Grant, offset: int, length: int) -> int:
        """Write layout: allocate unwritten extents for the holes in the range."""
        self._writable()
        node = self._direct_node(grant)
        if offset < 0 or length < 0 or offset + length > MAX_FILE_SIZE:
            raise InvalidArgument(f"layout range {offset}+{length}")
        if not length:
            return 0
        bs = self.block_size
        b0, b1 = block_span(offset, length, bs)
        # The copy of sealed blocks below: its place at the writer's limits, before the
        # lock (its reads and writes under it then go past them: review of F1, R2),
        # priced at what it does — the runs it copies (the first LAYOUT_COW_RUNS), each
        # piece of COPY_BLOCKS read and written (probe 20, F4: the writes alone, 2x a
        # bytes/s limit; the runs past the cap, which it leaves, priced too: review of
        # 5422135, F1-F2). A layout of holes makes no device request.
        with self.kernel.limit_scope(grant.principal):  # (grows with the requests made)
            runs = self._extents(node).sealed_runs(b0, b1 - b0, LAYOUT_COW_RUNS)
            if runs:
                await self.kernel.repay_limit(
                    grant.principal, 2 * sum(c for _b, c in runs) * bs,
                    ios=2 * sum(-(-c // COPY_BLOCKS) for _b, c in runs))
            async with self._limited_lock(node, 2 * sum(c for _b, c in runs)):
                with self.kernel.past_limits():
                    self._direct_node(grant)
                    self._direct_kill_priv(node, grant)
                    emap = self._extents(node)
                    n = await self._allocate(node, emap, b0, b1 - b0, grant.principal)
                    if n:
                        self._save_extents(node)
                        self._save(node, "blocks")
                    # Sealed blocks in the range are copied to fresh ones the client may write
                    # in place (a pNFS copy-on-write layout): the first LAYOUT_COW_RUNS runs,
                    # the loop given back after each (the file's lock is held meanwhile).
                    for k, (fb, cnt) in enumerate(emap.sealed_runs(b0, b1 - b0,
                                                                    LAYOUT_COW_RUNS)):
                        if k:
                            await trio.lowlevel.cancel_shielded_checkpoint()
                        g = self.kernel.grant(inode=node.id, generation=node.generation,
                                              extents=emap, rights=Rights.RW,
                                              principal=grant.principal, charge=False)
                        try:
                            for at in range(fb, fb + cnt, COPY_BLOCKS):
                                k = min(COPY_BLOCKS, fb + cnt - at)
                                old = bytes(await self.kernel.read(g, at * bs, k * bs))
                                await self._write_data(node, g, at * bs, old)
                        finally:
                            self.kernel.release(g)
        return n

    async def write_relocating(self: FileSystem, grant: Grant, offset: int,
                               data: memoryview) -> int:
        """A direct client's write over committed (sealed) blocks, relocated here as a
        write through the mount is (`_write_data`: fresh blocks, the map changed and the
        old blocks freed by the same transaction, R1), instead of a write layout that
        first copies the old contents to fresh blocks and a second write over the copy.
        Not committed: as for any direct write, the client's commit makes the range
        part of the file (size, mtime). Needs WRITE (checked by the kernel's write);
        NotAllocated for holes (those need a write layout: storage is charged there)."""
        self._writable()
        node = self._direct_node(grant)
        with self.kernel.limit_scope(grant.principal):  # (grows with the requests made)
            await self.kernel.repay_limit(grant.principal, len(data), offset)  # before the lock
            async with self._limited_lock(node, -(-len(data) // self.block_size) + 2):
                self._direct_node(grant)  # revoked while waiting for the lock?
                self._direct_kill_priv(node, grant)
                await self._write_data(node, grant, offset, data)
        return len(data)

    async def write_relocating_many(self: FileSystem, grant: Grant,
                                    writes: list[tuple[int, memoryview]]) -> bool:
        """A burst of a direct client's whole-block writes over committed (sealed)
        blocks, each (offset, data), relocated together: one allocation for all their
        new blocks, one kernel call that writes them (device blocks that continue each
        other in one pager write), the map changed per write and saved once, the old
        blocks freed in one call. Each write is exactly what `write_relocating` would
        have made of it on its own, in order (the writes name distinct blocks). All or
        nothing: False, with nothing done, when a write is not whole blocks or not
        entirely over sealed blocks once the lock is held; an error (NoSpace, the
        device's, a revoked grant) leaves nothing exposed and no block taken, so the
        caller can serve the writes one by one and each gets its own result."""
        self._writable()
        node = self._direct_node(grant)
        bs = self.block_size
        with self.kernel.limit_scope(grant.principal):  # (grows with the requests made)
            for k, (off, data) in enumerate(writes):
                # Each write paced on its own while the principal is in debt (at least
                # LIMIT_DEBT_MIN_WAIT each, as one by one): paced once for all their bytes,
                # a tenant in debt dirtied several times faster in bursts (review of
                # direct6, B4). Not in debt: no wait, no checkpoint. Under write-through
                # the burst is priced at its least, one request (it goes down as one
                # when its new blocks continue each other), its place growing by each
                # request it makes beyond (a place a write: 12 requests a second at 100
                # IOPS; review of F1's first fix, G).
                await self.kernel.repay_limit(grant.principal, len(data), off,
                                              ios=0.0 if k else 1.0)
            async with self._limited_lock(node, sum(len(d) for _o, d in writes) // bs):
                self._direct_node(grant)  # revoked while waiting for the lock?
                emap = self._extents(node)
                spans: list[tuple[int, int]] = []
                for offset, data in writes:
                    if offset % bs or len(data) % bs or not data:
                        return False
                    fb, n = offset // bs, len(data) // bs
                    if emap.sealed_runs(fb, n) != [(fb, n)]:
                        return False
                    spans.append((fb, n))
                self._direct_kill_priv(node, grant)
                total = sum(n for _fb, n in spans)
                await self._ensure_free(total, reserve=False, relocation=True)
                got = self.alloc.allocate(total, relocation=True)
                # (gives `got` back to the relocations' pool itself if it fails)
                await self._reserve_host_space(got, relocation=True, cow=True,
                                               principal=grant.principal)
                # The new blocks, in allocation order, to the writes in their order.
                blocks: list[tuple[int, int, memoryview]] = []
                placed: list[tuple[int, int, int]] = []  # (file block, device block, count)
                k = 0  # (run of `got`, blocks of it used)
                used = 0
                for (fb, n), (_offset, data) in zip(spans, writes):
                    at = 0
                    while at < n:
                        start, length = got[k]
                        m = min(n - at, length - used)
                        blocks.append((fb + at, start + used, data[at * bs:(at + m) * bs]))
                        placed.append((fb + at, start + used, m))
                        at += m
                        used += m
                        if used == length:
                            k, used = k + 1, 0
                try:
                    await self.kernel.write_relocated(grant, blocks)
                except BaseException:
                    self.alloc.give_back(got)  # never exposed: back to the relocations' pool
                    raise
                freed: list[tuple[int, int]] = []
                for fb, dev, m in placed:
                    freed.extend((d, c) for d, c, _o in emap.relocate(fb, dev, m))
                self.alloc.free_later(freed, (node.id,), recycle=True)
                self._unsealed.add(emap)
                self._save_extents(node)
        return True

    async def layout_commit(self: FileSystem, grant: Grant, offset: int, length: int) -> int:
        """The range was written: extents become written, size and mtime update."""
        self._writable()
        node = self._direct_node(grant)
        if offset < 0 or length < 0 or offset + length > MAX_FILE_SIZE:
            raise InvalidArgument(f"commit range {offset}+{length}")
        bs = self.block_size
        await self.kernel.repay_limit(grant.principal, 0)  # before the lock, as `write` does
        async with self._lock(node):
            self._direct_node(grant)
            # Exactly what was written through this grant becomes part of the file:
            # laid-out blocks never written stay unwritten (they read as zeros, and on a
            # real device they may still hold a deleted file's data).
            end = grant.pending_end(offset, offset + length)
            if end:
                self._direct_kill_priv(node, grant)
                if end > node.size:
                    # Growing: the old last block's bytes past the old end that no live
                    # grant wrote and has yet to commit (this one's included) must
                    # read as zeros (R6). Up to that block's end, not just this
                    # commit's: the grant's writes may note more meanwhile.
                    await self._zero_past_eof(node, node.size, MAX_FILE_SIZE,
                                              grant.principal)
                    self._direct_node(grant)  # (revoked meanwhile: nothing to commit)
            # The ranges leave the grant here and stay pending as `committing` until
            # their blocks are marked written: another grant's merge of one of those
            # blocks meanwhile (the loop is given back below) reads it, where before
            # it found neither a pending range nor a written block and merged zeros
            # over this commit's bytes (probe 6, W3).
            # A client may commit many ranges at once (as many as the blocks it wrote):
            # they are taken, marked written and saved COMMIT_STEP at a time, the event
            # loop given back in between (taken and saved all at once, 100,000 ranges
            # held it 0.3-0.4 s: probe 11, F4). A checkpoint meanwhile commits and seals
            # what is marked so far (data written before the commit: as a commit of
            # part of the ranges); blocks marked past the old size before the size is
            # saved are, after a crash, a layout never committed (R4). The ranges not
            # taken yet stay pending, as before the commit.
            end = 0
            while True:
                ranges = grant.take_written(offset, offset + length, COMMIT_STEP)
                if not ranges:
                    break
                emap = self._extents(node)
                end = max(end, ranges[-1][1])
                grant.committing = ranges
                try:
                    self._unsealed.add(emap)
                    for start, stop in ranges:
                        b0, b1 = block_span(start, stop - start, bs)
                        emap.mark_written(b0, b1 - b0)
                finally:
                    grant.committing = []
                self._unsealed.add(emap)
                self._save_extents(node)
                if len(ranges) < COMMIT_STEP:
                    break
                await trio.lowlevel.cancel_shielded_checkpoint()
            if end:
                now = now_ns()
                if end > node.size:
                    node.size = end
                node.mtime_ns = node.ctime_ns = now
                self._save(node, "size", "blocks", "mtime_ns", "ctime_ns")
                self.changed_behind_kernel(node, grant.principal)
            return node.size

    async def append_direct(self: FileSystem, grant: Grant, data: memoryview) -> tuple[int, int]:
        """O_APPEND for a direct client: find EOF, allocate, write and commit under the
        inode lock, as `write` does for the kernel's O_APPEND handles, so appends through
        the mount and through the socket never overlap or interleave. Must keep the same
        crash rules as `write` (sealed blocks are written copy-on-write through
        `_write_data`). All or nothing: a bank or the device too full for the whole
        piece is an error. Returns (the offset written at, the new size)."""
        self._writable()
        node = self._direct_node(grant)
        n = len(data)
        # before the lock, as `write` does, priced at the blocks the append spans at the
        # size seen now (probe 20, F2: priced at its bytes, 32 one-byte appends took
        # their places at once, 16x a bytes/s limit)
        with self.kernel.limit_scope(grant.principal):  # (grows with the requests made)
            await self.kernel.repay_limit(grant.principal, n, node.size)
            async with self._limited_lock(node, -(-n // self.block_size) + 2):
                self._direct_node(grant)  # revoked while waiting for the lock?
                offset = node.size
                if n:
                    self._direct_kill_priv(node, grant)
                    await self._write_locked(node, grant, offset, data, short_ok=False)
                    self.changed_behind_kernel(node, grant.principal)
                return offset, node.size

    async def before_direct_change(self: FileSystem, grant: Grant) -> None:
        """A direct client is about to change the file's data (a write, an append, a
        truncate) behind the kernel's back. While the file is open for writing through
        the mount, the kernel may hold dirty pages of it (a shared writable mapping):
        dropped only after the change (`changed_behind_kernel`), such a page was first
        written back whole, stale bytes and all, over the client's committed and
        fsync'd ones (hostile probe 7, F2). So they are written back and dropped
        first, as Linux does for an O_DIRECT write (`write_back_pages`: bounded, in a
        worker thread, holding no lock — the kernel's write-back comes to this daemon
        as WRITE requests). A mapping dirtied again meanwhile races the client's change
        as it would on Linux."""
        if self.write_back_pages is None:
            return
        node = self._inodes.get(grant.inode)
        if node is not None and node.kernel_writers > 0:
            await self.write_back_pages(node.id)

    def changed_behind_kernel(self: FileSystem, node: Inode, principal: int) -> None:
        """A direct client acting for `principal` changed `node`: drop what the kernel
        caches of it (the notification is queued for the changer's tenant)."""
        if self._cache_mode(node) == "kernel":
            self.on_data_changed(node.id, principal)
        else:
            self.on_attr_changed(node.id)

    async def close_direct(self: FileSystem, grant: Grant) -> None:
        """A direct client closed its file: drop unused preallocation past the end."""
        self._direct.pop(grant, None)
        node = self._inodes.get(grant.inode)
        if node is None or not node.is_reg or node.nlink == 0 and node.opens == 0:
            return
        bs = self.block_size
        async with self._lock(node):
            # Another direct client writes this file: its layout may cover this
            # preallocation, and trimming it would revoke that client's grant and
            # fail its next request for nothing. The last direct writer's close
            # trims it; a commit that grows the file zeroes what no live grant has
            # pending between the old end and its range (R6), so nothing a gone
            # writer left uncommitted shows.
            shared = any(g.inode == node.id and g.rights & Rights.WRITE and not g.revoked
                         for g in self._direct)
            emap = self._extents(node)
            keep = blocks_to_cover(node.size, bs)
            if not shared and emap.end_block() > keep:
                tail = [s for s in emap.segments(keep, emap.end_block() - keep)
                        if s.dev_block != HOLE and s.state != UNWRITTEN]
                if not tail:  # only unwritten preallocation past EOF
                    # Readers never touch unwritten blocks past EOF: they keep their
                    # grants. Writers may have written (uncommitted) into the range.
                    old = self._regrant(node, keep=lambda g: not g.rights & Rights.WRITE)
                    freed = emap.remove_owned(keep)
                    node.blocks = emap.blocks
                    self._save_extents(node)
                    self._save(node, "blocks")
                    await self._release_unmapped(freed, old, ino=node.id)
        self._maybe_evict(node)  # the kernel may never have looked this inode up
