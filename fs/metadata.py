"""The metadata database: every SQL statement sluice runs lives in this module.

SQLite in WAL mode, one connection on the event-loop thread. Changes accumulate in
one open transaction that `commit()` ends: the filesystem commits on a timer (about
once a second), on fsync and at unmount, so that a burst of creates costs one commit,
not thousands. A daemon killed at any moment leaves the database as of the last
commit. `make_durable()` additionally fsyncs the WAL so a commit survives power loss.

Opened `read_only` (a read-only mount, a check without repair) the connection writes
nothing to the volume: SQLite's read-only mode, so that closing it neither checkpoints
a crashed daemon's WAL into meta.db nor removes it, and nothing this module runs can
change a row by mistake (SQLite refuses the statement). With a WAL on disk it is read
through (its index, -shm, is rebuilt as SQLite does for any reader); without one the
file is opened `immutable`, so that no -wal or -shm is made: the volume's lock keeps
every writer out meanwhile (a remount read-write first reopens it, `reopen_writable`).

The metadata server's updates of inode rows (`update_inode_later`: a chmod, a chown, the
size and times after a write) are gathered per inode and run together, still inside
the open transaction, before anything reads the inodes table and before the commit:
every read and every commit sees exactly what running each update at once would have
left (a file's three or four updates of an untar cost one statement, not four).

Every write method also marks the inodes whose rows it touches (the change marks,
docs/dev/invariants.md R8): an fsync of an inode that no change since the last durable
commit marked has no metadata to make durable. Code outside this module never writes
SQL, so the marks see every change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Iterable, Iterator

from .errors import Damaged

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,   -- 'schema', 'uuid', 'created_ns', 'max_inodes', 'unflushed'
                              -- (JSON list: discardable files whose data a crash may
                              -- have lost, emptied at the next mount)
    value                     -- its value
);
CREATE TABLE IF NOT EXISTS inodes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT, -- st_ino; never reused, so generation stays 1
    generation INTEGER NOT NULL DEFAULT 1,        -- NFS-style generation, carried in grants
    mode       INTEGER NOT NULL,                  -- st_mode: type and permission bits
    uid        INTEGER NOT NULL,                  -- owner
    gid        INTEGER NOT NULL,                  -- group
    nlink      INTEGER NOT NULL,                  -- names pointing here (+1 and subdirs for dirs)
    size       INTEGER NOT NULL DEFAULT 0,        -- st_size in bytes
    blocks     INTEGER NOT NULL DEFAULT 0,        -- device blocks allocated (st_blocks basis)
    rdev       INTEGER NOT NULL DEFAULT 0,        -- device number of a device node
    atime_ns   INTEGER NOT NULL,                  -- last access, ns since the epoch
    mtime_ns   INTEGER NOT NULL,                  -- last data change
    ctime_ns   INTEGER NOT NULL,                  -- last status change
    parent     INTEGER NOT NULL DEFAULT 0,        -- for directories: the directory holding it
    target     BLOB,                              -- for symlinks: the target
    principal  INTEGER NOT NULL DEFAULT 0         -- principal charged for this inode
);
CREATE TABLE IF NOT EXISTS dentries (
    id     INTEGER PRIMARY KEY AUTOINCREMENT, -- also the readdir cookie: stable, never reused
    parent INTEGER NOT NULL,                  -- directory inode
    name   BLOB NOT NULL,                     -- entry name (bytes, no '/' or NUL)
    inode  INTEGER NOT NULL,                  -- the inode it names
    principal INTEGER NOT NULL DEFAULT 0,     -- principal charged for the entry
    UNIQUE (parent, name)
);
CREATE INDEX IF NOT EXISTS dentries_readdir ON dentries (parent, id);
CREATE TABLE IF NOT EXISTS extents (
    inode      INTEGER NOT NULL,  -- file
    file_block INTEGER NOT NULL,  -- first file block of the extent
    dev_block  INTEGER NOT NULL,  -- first device block
    count      INTEGER NOT NULL,  -- length in blocks
    state      INTEGER NOT NULL,  -- 1 written, 0 unwritten (reads as zeros)
    principal  INTEGER NOT NULL DEFAULT 0,  -- principal charged for these blocks
    PRIMARY KEY (inode, file_block)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS xattrs (
    inode INTEGER NOT NULL,  -- owner
    name  BLOB NOT NULL,     -- full name with namespace, e.g. b'user.foo'
    value BLOB NOT NULL,     -- value bytes
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
"""

INODE_COLUMNS = ("id", "generation", "mode", "uid", "gid", "nlink", "size", "blocks", "rdev",
                 "atime_ns", "mtime_ns", "ctime_ns", "parent", "target", "principal")
_INODE_SELECT = "SELECT " + ", ".join(INODE_COLUMNS) + " FROM inodes"

Row = tuple

#: inodes marked changed (`Metadata._mark`) before the marks turn into one "everything"
#: mark: a million creates between two durable commits would otherwise hold a million
#: ints (about 50 MiB) until the next fsync
MAX_MARKED = 1 << 16


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class ChangeMarks:
    """The change marks one commit took (`Metadata.take_changes`)."""

    #: inodes whose rows the changes touched
    inodes: set[int]
    #: whether one touched something no single inode owns
    everything: bool


class Metadata:
    """SQL access for the filesystem. See the module docstring."""

    def __init__(self, path: Path, *, record: Path | None = None,
                 read_only: bool = False) -> None:
        self.path = path
        #: opened read-only (see the module's docstring) until `reopen_writable`
        self.read_only = read_only
        self.db = self._connect(read_only)
        self._in_tx = False
        self.pending = 0  # statements since the last commit
        #: the volume failed (`FileSystem.fail`): nothing is committed any more, not
        #: even at `close`
        self.failed = False
        #: inode row updates not run yet: inode -> {column: value}, the later value of
        #: a column winning (`update_inode_later`, run by `flush_inodes`)
        self._later: dict[int, dict[str, object]] = {}
        #: the last (parent, name) `lookup` found absent. The kernel looks a new name
        #: up right before it creates it (CREATE, MKDIR, ...), and the create's own
        #: check that the name is free then needs no query. Forgotten by whatever can
        #: add that name (`add_dentry`, `move_dentry`) and by `rollback` (a removal
        #: undone); removing entries cannot make a name exist.
        self._absent: tuple[int, bytes] | None = None
        #: inodes whose rows a change since the last durable commit touched (the change
        #: mark: an fsync of an inode with none, and no `_changed_all`, has no metadata
        #: of it to make durable; docs/dev/invariants.md R8), and whether a change
        #: touched something no single inode owns (`set_meta`, a repair by id, a
        #: `move_principal` of more than MAX_MARKED inodes). Cleared only by the
        #: durable commit that contains them: `take_changes` at the commit,
        #: `settle_changes` when it is over.
        self._changed: set[int] = set()
        #: (set at open: a daemon killed before its last commit was durable left the
        #: database in the host's cache, not on disk)
        self._changed_all = True
        #: marks taken by commits whose WAL fsync has not returned yet
        self._settling: list[ChangeMarks] = []
        #: durable commits (make_durable calls) so far (statistics, tests)
        self.durable_commits = 0
        self._record: MetaRecorder | None = None
        if record is not None:
            self._record = MetaRecorder.start(self, record)

    def _connect(self, read_only: bool) -> sqlite3.Connection:
        if read_only:
            wal = Path(f"{self.path}-wal").exists()
            uri = (f"file:{urllib.parse.quote(str(self.path))}"
                   f"?{'mode=ro' if wal else 'immutable=1'}")
            db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                 check_same_thread=False)
        else:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            if not read_only:
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=OFF")
            db.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache
            db.execute("PRAGMA temp_store=MEMORY")
        except BaseException:
            db.close()
            raise
        return db

    def reopen_writable(self) -> None:
        """Go from a read-only connection to a writable one (a remount read-write:
        the caller holds the volume's writer lock). Between two steps of the loop, no
        transaction open: every read runs to its end within one step. sqlite3.Error
        if SQLite cannot open it so; the read-only connection then stays."""
        if not self.read_only:
            return
        db = self._connect(False)
        old, self.db = self.db, db
        self.read_only = False
        old.close()

    @classmethod
    def create(cls, path: Path, *, uuid: str, root_uid: int, root_gid: int, now_ns: int,
               max_inodes: int) -> None:
        md = cls(path)
        try:
            md.db.executescript(SCHEMA)
            md.db.execute("BEGIN")
            md.db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                              [("schema", SCHEMA_VERSION), ("uuid", uuid),
                               ("created_ns", now_ns), ("max_inodes", max_inodes)])
            md.db.execute(
                "INSERT INTO inodes (id, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns,"
                " parent) VALUES (1, ?, ?, ?, 2, ?, ?, ?, 1)",
                (0o40755, root_uid, root_gid, now_ns, now_ns, now_ns))
            md.db.execute("COMMIT")
        finally:
            md.close()

    def schema_problem(self) -> str | None:
        """What makes this database not a sluice metadata database of this version (a
        table or column missing, a schema version from another release), or None."""
        want: dict[str, set[str]] = {
            "meta": {"key", "value"}, "inodes": set(INODE_COLUMNS),
            "dentries": {"id", "parent", "name", "inode", "principal"},
            "extents": {"inode", "file_block", "dev_block", "count", "state", "principal"},
            "xattrs": {"inode", "name", "value"}}
        for table, cols in want.items():
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if not have:
                return f"table {table} is missing"
            if cols - have:
                return f"table {table} lacks column {sorted(cols - have)[0]}"
        version = self.meta("schema")
        if version is None:
            return "it records no schema version"
        if version != SCHEMA_VERSION or type(version) is not int:
            return (f"its schema version is {version!r}, this sluice knows "
                    f"{SCHEMA_VERSION}" + (" (made by a newer sluice?)"
                                           if type(version) is int and version > SCHEMA_VERSION
                                           else ""))
        return None

    def meta(self, key: str) -> object:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: object) -> None:
        """Set a volume-wide value, in the open transaction."""
        self._changed_all = True
        self._w("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- transactions -----------------------------------------------------------------

    def _w(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True
        self.pending += 1
        return self.db.execute(sql, args)

    def _wmany(self, sql: str, rows: Iterable[tuple]) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True
        self.pending += 1
        self.db.executemany(sql, rows)

    def commit(self) -> None:
        self.flush_inodes()
        if self._in_tx:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                # SQLite rolls the transaction back itself on some errors (SQLITE_FULL,
                # SQLITE_IOERR): then none is open any more, and a ROLLBACK or COMMIT
                # of it would fail again ("no transaction is active").
                if not self.db.in_transaction:
                    self._in_tx = False
                raise
            self._in_tx = False
            self.pending = 0
            if self._record is not None:
                self._record.event("commit")

    # -- change marks (which inodes a durable commit would change) ----------------------

    def _mark(self, *inos: int) -> None:
        self._changed.update(inos)
        if len(self._changed) > MAX_MARKED:
            # Bounded memory: past this many, "everything" says the same, conservatively
            # (the next fsync of any file makes a durable commit, which clears it).
            self._changed_all = True
            self._changed = set()

    def changed_since_durable(self, ino: int) -> bool:
        """Whether a change not yet made durable touched `ino`'s rows (its inode row,
        extents, xattrs, a name in it or naming it) or something no single inode
        owns. A change in a commit whose WAL fsync is still running counts until it
        returns. Conservative: a change rolled back still counts."""
        if self._changed_all or ino in self._changed:
            return True
        return any(t.everything or ino in t.inodes for t in self._settling)

    def take_changes(self) -> ChangeMarks:
        """The marks of every change made so far, at a commit (no checkpoint between
        this and `commit()`): they still count (`changed_since_durable`) until the
        caller settles them (`settle_changes`)."""
        taken = ChangeMarks(self._changed, self._changed_all)
        self._changed, self._changed_all = set(), False
        self._settling.append(taken)
        return taken

    def settle_changes(self, taken: ChangeMarks, *, durable: bool) -> None:
        """The commit that took `taken` is over: made durable (the marks go), or not
        (committed only, or failed: they are merged back with the ones made since)."""
        self._settling = [t for t in self._settling if t is not taken]
        if not durable:
            self._changed |= taken.inodes
            self._changed_all = self._changed_all or taken.everything
            if len(self._changed) > MAX_MARKED:  # (the bound `_mark` keeps)
                self._changed = set()
                self._changed_all = True

    def rollback(self) -> None:
        """Drop the open transaction (the volume failed: nothing more is committed)."""
        self._later.clear()
        self._absent = None
        if self._in_tx:
            self._in_tx = False
            self.pending = 0
            if self.db.in_transaction:  # (a failed COMMIT may have ended it already)
                self.db.execute("ROLLBACK")

    def make_durable(self) -> None:
        """fsync the WAL (and the database file): committed changes survive power loss.
        Blocking: call from a worker thread."""
        covered = _size(Path(str(self.path) + "-wal"))  # what this fsync surely covers
        for suffix in ("-wal", ""):
            p = str(self.path) + suffix
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.durable_commits += 1
        if self._record is not None:
            self._record.event("durable", wal=covered)

    def close(self) -> None:
        """Commit the open transaction — or, once the volume failed (`failed`), drop
        it: nothing is committed after a failure (s3ql's failsafe) — and close the
        database. sqlite3.Error if that commit fails; closed all the same."""
        try:
            if self.failed:
                self.rollback()
            else:
                self.commit()
        finally:
            self.db.close()
            if self._record is not None:
                self._record.close()

    # -- inodes -----------------------------------------------------------------------------

    def get_inode(self, ino: int) -> Row | None:
        self.flush_inodes()
        return self.db.execute(_INODE_SELECT + " WHERE id=?", (ino,)).fetchone()

    def insert_inode(self, *, mode: int, uid: int, gid: int, nlink: int, rdev: int,
                     now_ns: int, parent: int, target: bytes | None, principal: int) -> int:
        cur = self._w(
            "INSERT INTO inodes (mode, uid, gid, nlink, rdev, atime_ns, mtime_ns, ctime_ns,"
            " parent, target, principal, size) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (mode, uid, gid, nlink, rdev, now_ns, now_ns, now_ns, parent, target, principal,
             len(target) if target is not None else 0))
        ino = int(cur.lastrowid)  # type: ignore[arg-type]
        self._mark(ino)
        return ino

    def update_inode(self, ino: int, **fields: object) -> None:
        self.flush_inodes()
        self._mark(ino)
        cols = ", ".join(f"{k}=?" for k in fields)
        self._w(f"UPDATE inodes SET {cols} WHERE id=?", (*fields.values(), ino))

    def update_inode_later(self, ino: int, fields: dict[str, object]) -> None:
        """`update_inode`, run with the inode's other gathered updates before the inodes
        table is next read or the transaction commits (see the module docstring).
        `fields` becomes this object's: the caller must not change it afterwards."""
        self._mark(ino)
        had = self._later.get(ino)
        if had is None:
            self._later[ino] = fields
        else:
            had.update(fields)
        self.pending += 1

    def flush_inodes(self) -> None:
        """Run the gathered inode updates, in the open transaction: one statement per
        set of columns, for every inode that set."""
        if not self._later:
            return
        later, self._later = self._later, {}
        by_cols: dict[tuple[str, ...], list[tuple]] = {}
        for ino, fields in later.items():
            by_cols.setdefault(tuple(fields), []).append((*fields.values(), ino))
        try:
            for cols, rows in by_cols.items():
                self._wmany("UPDATE inodes SET " + ", ".join(f"{c}=?" for c in cols) +
                            " WHERE id=?", rows)
        except BaseException:
            # (e.g. SQLITE_FULL) Nothing gathered is dropped: the updates are plain
            # SETs, so running them again at the next flush or commit is right; what
            # came in meanwhile for the same inode is newer and wins.
            for ino, fields in later.items():
                self._later[ino] = {**fields, **self._later.get(ino, {})}
            raise

    def delete_inode(self, ino: int) -> None:
        self._later.pop(ino, None)  # the row goes: its updates would change nothing
        self._mark(ino)
        self._w("DELETE FROM inodes WHERE id=?", (ino,))
        self._w("DELETE FROM extents WHERE inode=?", (ino,))
        self._w("DELETE FROM xattrs WHERE inode=?", (ino,))

    def orphans(self) -> list[int]:
        """Inodes no name points to (unlinked while open when the daemon stopped). An
        inode with a link count of 0 that a name points to, or that holds names, is not
        one: a damaged count (fsck sets it), never a reason to free what is named."""
        self.flush_inodes()
        return [r[0] for r in self.db.execute(
            "SELECT id FROM inodes WHERE nlink=0 AND id NOT IN (SELECT inode FROM dentries)"
            " AND id NOT IN (SELECT parent FROM dentries)")]

    def inode_count(self) -> int:
        self.flush_inodes()
        return self.db.execute("SELECT COUNT(*) FROM inodes").fetchone()[0]

    # -- directory entries ----------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int | None:
        key = (parent, name)
        if key == self._absent:
            return None
        row = self.db.execute("SELECT inode FROM dentries WHERE parent=? AND name=?",
                              key).fetchone()
        if row is None:
            self._absent = key
            return None
        return row[0]

    def dentry_principal(self, parent: int, name: bytes) -> int:
        """The principal charged for an entry."""
        row = self.db.execute("SELECT principal FROM dentries WHERE parent=? AND name=?",
                              (parent, name)).fetchone()
        return 0 if row is None else row[0]

    def add_dentry(self, parent: int, name: bytes, ino: int, principal: int = 0) -> None:
        self._absent = None
        self._mark(parent, ino)
        self._w("INSERT INTO dentries (parent, name, inode, principal) VALUES (?,?,?,?)",
                (parent, name, ino, principal))

    def remove_dentry(self, parent: int, name: bytes) -> int:
        """Remove an entry; returns the principal that was charged for it."""
        row = self.db.execute("SELECT principal, inode FROM dentries WHERE parent=? AND name=?",
                              (parent, name)).fetchone()
        self._mark(parent)
        if row is not None:
            self._mark(row[1])
        self._w("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
        return 0 if row is None else row[0]

    def retarget_dentry(self, parent: int, name: bytes, ino: int) -> None:
        old = self.lookup(parent, name)
        self._mark(parent, ino)
        if old is not None:
            self._mark(old)
        self._w("UPDATE dentries SET inode=? WHERE parent=? AND name=?", (ino, parent, name))

    def move_dentry(self, parent: int, name: bytes, new_parent: int, new_name: bytes) -> None:
        """Rename an entry in place (keeps its readdir cookie when the directory is the same)."""
        moved = self.lookup(parent, name)
        self._absent = None
        self._mark(parent, new_parent)
        if moved is not None:
            self._mark(moved)
        self._w("UPDATE dentries SET parent=?, name=? WHERE parent=? AND name=?",
                (new_parent, new_name, parent, name))

    def has_entries(self, parent: int) -> bool:
        return self.db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1",
                               (parent,)).fetchone() is not None

    def readdir(self, parent: int, after: int, limit: int) -> list[Row]:
        """Entries with cookie > after, in cookie order: (cookie, name, *inode columns)."""
        self.flush_inodes()
        return self.db.execute(
            "SELECT d.id, d.name, i." + ", i.".join(INODE_COLUMNS) +
            " FROM dentries d JOIN inodes i ON i.id = d.inode"
            " WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?",
            (parent, after, limit)).fetchall()

    # -- extents ----------------------------------------------------------------------------

    def load_extents(self, ino: int) -> list[tuple[int, int, int, int, int]]:
        """(file_block, dev_block, count, state, principal) of a file's extents."""
        return self.db.execute(
            "SELECT file_block, dev_block, count, state, principal FROM extents WHERE inode=?"
            " ORDER BY file_block", (ino,)).fetchall()

    def load_extents_after(self, ino: int, after: int, limit: int
                           ) -> list[tuple[int, int, int, int, int]]:
        """`load_extents`, a page at a time: the first `limit` extents whose file block
        is past `after` (-1: from the start)."""
        return self.db.execute(
            "SELECT file_block, dev_block, count, state, principal FROM extents"
            " WHERE inode=? AND file_block>? ORDER BY file_block LIMIT ?",
            (ino, after, limit)).fetchall()

    def inodes_with_blocks_past_eof(self, block_size: int) -> list[int]:
        """Regular files with extents past the block that holds their last byte."""
        self.flush_inodes()
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT e.inode FROM extents e JOIN inodes i ON i.id = e.inode"
            " WHERE e.file_block + e.count > (i.size + ? - 1) / ?",
            (block_size, block_size)).fetchall()]

    def save_extent_changes(self, ino: int, deleted: list[int],
                            upserts: list[tuple[int, ...]]) -> None:
        self._mark(ino)
        if deleted:
            self._wmany("DELETE FROM extents WHERE inode=? AND file_block=?",
                        [(ino, fb) for fb in deleted])
        if upserts:
            self._wmany("INSERT OR REPLACE INTO extents (inode, file_block, dev_block, count,"
                        " state, principal) VALUES (?,?,?,?,?,?)",
                        [(ino, *e) for e in upserts])

    def all_extents(self) -> Iterator[tuple[int, int, int, int, int]]:
        """(inode, file_block, dev_block, count, state) of every extent (mount and fsck)."""
        return self.db.execute(
            "SELECT inode, file_block, dev_block, count, state FROM extents ORDER BY dev_block")

    def usage_by_principal(self) -> dict[int, tuple[int, int, int, int]]:
        """principal -> (blocks, inodes, entries, other bytes) charged to it. Other
        bytes: entry names, and of the inodes charged to it (whatever their link
        count: refunded when the row goes) symlink targets and xattr names and values
        but the daemon's own discarded mark (fs.xattrs.xattr_cost)."""
        self.flush_inodes()
        out: dict[int, list[int]] = {}
        for p, n in self.db.execute("SELECT principal, SUM(count) FROM extents GROUP BY principal"):
            out.setdefault(p, [0, 0, 0, 0])[0] = n
        # (every row: an inode unlinked while open, or an O_TMPFILE one, is charged
        # until it is freed; an orphan a crash left, until the mount frees it)
        for p, n in self.db.execute("SELECT principal, COUNT(*) FROM inodes"
                                    " GROUP BY principal"):
            out.setdefault(p, [0, 0, 0, 0])[1] = n
        for p, n, b in self.db.execute("SELECT principal, COUNT(*), SUM(LENGTH(name))"
                                       " FROM dentries GROUP BY principal"):
            o = out.setdefault(p, [0, 0, 0, 0])
            o[2], o[3] = n, o[3] + (b or 0)
        for p, b in self.db.execute("SELECT principal, SUM(LENGTH(target)) FROM inodes"
                                    " WHERE target IS NOT NULL GROUP BY principal"):
            out.setdefault(p, [0, 0, 0, 0])[3] += b or 0
        for p, b in self.db.execute(
                "SELECT i.principal, SUM(LENGTH(x.name) + LENGTH(x.value)) FROM xattrs x"
                " JOIN inodes i ON i.id = x.inode WHERE x.name != ? GROUP BY i.principal",
                (b"user.sluice.discarded",)):
            out.setdefault(p, [0, 0, 0, 0])[3] += b or 0
        return {p: tuple(v) for p, v in out.items()}  # type: ignore[misc]

    def move_principal(self, src: int, dst: int) -> None:
        """Charge everything charged to `src` to `dst` instead. Marks the inodes whose
        rows it re-tags (an inode row, its extents, an entry: its directory and the
        inode it names), as any write of a row does; "everything" only past
        MAX_MARKED of them (docs/dev/invariants.md, R8: the tag is no file's data,
        size or name, so the marks are not what keeps a crash consistent here:
        `FileSystem.wait_durable` is)."""
        self.flush_inodes()
        hit = [r[0] for r in self.db.execute(
            "SELECT id FROM inodes WHERE principal=?1"
            " UNION SELECT inode FROM extents WHERE principal=?1"
            " UNION SELECT parent FROM dentries WHERE principal=?1"
            " UNION SELECT inode FROM dentries WHERE principal=?1 LIMIT ?2",
            (src, MAX_MARKED + 1))]
        if len(hit) > MAX_MARKED:
            self._changed_all = True
        else:
            self._mark(*hit)
        for table in ("inodes", "dentries", "extents"):
            self._w(f"UPDATE {table} SET principal=? WHERE principal=?", (dst, src))

    # -- xattrs -----------------------------------------------------------------------------

    def get_xattr(self, ino: int, name: bytes, *, limit: int | None = None) -> bytes | None:
        """The value, or None if there is none. With `limit`, a value longer than that
        (only a damaged or crafted meta.db holds one: set_xattr's callers refuse them)
        or not a blob raises Damaged without reading it into memory."""
        if limit is None:
            row = self.db.execute("SELECT value FROM xattrs WHERE inode=? AND name=?",
                                  (ino, name)).fetchone()
            return None if row is None else bytes(row[0])
        row = self.db.execute(
            "SELECT CASE WHEN typeof(value)='blob' AND length(value)<=? THEN value END,"
            " typeof(value), length(value) FROM xattrs WHERE inode=? AND name=?",
            (limit, ino, name)).fetchone()
        if row is None:
            return None
        if row[0] is None and not (row[1] == "blob" and row[2] == 0):
            raise Damaged(f"inode {ino}: xattr {name!r} in meta.db is a {row[1]} of "
                          f"{row[2]} bytes, not a value of at most {limit}: run sluice fsck")
        return bytes(row[0] or b"")

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        # INSERT ... SELECT, not VALUES: SQLite then keeps a statement journal, so
        # when the value does not fit (SQLITE_FULL: the host filesystem is full) it
        # undoes this statement alone. With VALUES it rolls back the whole open
        # transaction, everyone's changes since the last commit.
        self._mark(ino)
        self._w("INSERT OR REPLACE INTO xattrs (inode, name, value) SELECT ?,?,?",
                (ino, name, value))

    def xattr_list_size(self, ino: int) -> int:
        """Bytes listxattr returns for the inode (each name and its NUL)."""
        return self.db.execute("SELECT COALESCE(SUM(length(name) + 1), 0) FROM xattrs"
                               " WHERE inode=?", (ino,)).fetchone()[0]

    def xattr_total(self, ino: int, *, skip: bytes = b"") -> int:
        """Bytes of the inode's xattr names and values, but the one named `skip`."""
        return self.db.execute("SELECT COALESCE(SUM(length(name) + length(value)), 0)"
                               " FROM xattrs WHERE inode=? AND name!=?", (ino, skip)).fetchone()[0]

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        self._mark(ino)
        return self._w("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name)).rowcount > 0

    def hint_xattrs(self, ino: int, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """The xattrs whose names start with `prefix` (a range scan of the primary key)."""
        hi = prefix[:-1] + bytes([prefix[-1] + 1])
        return [(bytes(n), bytes(v)) for n, v in self.db.execute(
            "SELECT name, value FROM xattrs WHERE inode=? AND name>=? AND name<?"
            " AND typeof(value)='blob' AND length(value)<=65536",  # (else damage: absent)
            (ino, prefix, hi))]

    def list_xattrs(self, ino: int) -> list[bytes]:
        # (a name that is not a blob is damage, never listed: fsck removes it)
        return [bytes(r[0]) for r in
                self.db.execute("SELECT name FROM xattrs WHERE inode=? AND typeof(name)='blob'"
                                " ORDER BY name", (ino,))]

    # -- whole-volume queries (fsck) ----------------------------------------------------

    def all_inodes(self) -> list[Row]:
        self.flush_inodes()
        return self.db.execute(_INODE_SELECT).fetchall()

    def all_dentries(self) -> list[tuple[int, int, bytes, int]]:
        return self.db.execute("SELECT id, parent, name, inode FROM dentries").fetchall()

    def bad_xattrs(self, name_max: int, size_max: int) -> list[tuple[object, object, str]]:
        """(inode, name, why) of every xattr row no sluice could have written: of a
        missing inode, its name or value not a blob, its name empty or longer than
        `name_max`, its value longer than `size_max` (fsck). Values are not read."""
        return self.db.execute(
            "SELECT x.inode, x.name, CASE"
            " WHEN i.id IS NULL THEN 'its inode is missing'"
            " WHEN typeof(x.name) != 'blob' THEN 'its name is a ' || typeof(x.name)"
            " WHEN length(x.name) = 0 OR length(x.name) > ? THEN"
            "  'its name is ' || length(x.name) || ' bytes'"
            " WHEN typeof(x.value) != 'blob' THEN 'its value is a ' || typeof(x.value)"
            " ELSE 'its value is ' || length(x.value) || ' bytes' END"
            " FROM xattrs x LEFT JOIN inodes i ON i.id = x.inode"
            " WHERE i.id IS NULL OR typeof(x.name) != 'blob' OR length(x.name) = 0"
            " OR length(x.name) > ? OR typeof(x.value) != 'blob' OR length(x.value) > ?",
            (name_max, name_max, size_max)).fetchall()

    def delete_xattr_row(self, ino: object, name: object) -> None:
        """Remove one xattr row as it is (fsck: `name` may be of any type)."""
        self._changed_all = True
        self._w("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name))

    def delete_dentry_id(self, dentry_id: int) -> None:
        self._changed_all = True  # (fsck: the entry's inodes are not looked up)
        self._w("DELETE FROM dentries WHERE id=?", (dentry_id,))

    def delete_extent(self, ino: int, file_block: int) -> None:
        self._mark(ino)
        self._w("DELETE FROM extents WHERE inode=? AND file_block=?", (ino, file_block))


class MetaRecorder:
    """The metadata side of a power-loss recording (a lab facility, see
    blockdev/recording.py for the device side; the same directory holds both).

    SQLite's files do not go through the device's backing seam, so they are recorded by
    their own durability points: the database is checkpointed and copied as
    `base-meta.db` at the start, automatic checkpoints are turned off (the WAL only
    grows, so the WAL left behind holds every commit in order), and each commit and each
    fsync of the WAL appends a line to `meta-log`: the event, the WAL's size then, and
    the device log's size then (the position of the event among the device's writes
    and barriers). A power loss at some point of the device log leaves the WAL cut at a
    commit boundary at least as long as the last "durable" before that point and at
    most as long as the last "commit" before it (WAL frames are checksummed in a chain:
    only a prefix survives). A recording ends with the daemon killed: a clean unmount
    checkpoints the WAL into the database and empties it."""

    def __init__(self, md: Metadata, directory: Path, fd: int) -> None:
        self.md = md
        self.directory = directory
        self._fd = fd

    @classmethod
    def start(cls, md: Metadata, directory: Path) -> MetaRecorder:
        md.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        md.db.execute("PRAGMA wal_autocheckpoint=0")
        directory.mkdir(mode=0o700, exist_ok=True)
        base = os.open(directory / "base-meta.db", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(md.path, "rb") as src, open(base, "wb") as dst:
            shutil.copyfileobj(src, dst)
        fd = os.open(directory / "meta-log", os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | os.O_APPEND | os.O_CLOEXEC, 0o600)
        rec = cls(md, directory, fd)
        rec.event("start")
        return rec

    def event(self, kind: str, *, wal: int | None = None) -> None:
        if wal is None:
            wal = _size(Path(str(self.md.path) + "-wal"))
        at = _size(self.directory / "log")
        os.write(self._fd, json.dumps({"event": kind, "wal": wal, "at": at}).encode() + b"\n")

    def close(self) -> None:
        os.close(self._fd)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0
