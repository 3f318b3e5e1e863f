"""Volumes: a directory holding a block device, its checksums and the metadata database.

Layout (see DESIGN.md "Volume"):
    volume.json   format header: format version, uuid, creation time
    device.json, device.img, checksums   the simulated block device (blockdev)
    meta.db       the metadata database (SQLite, WAL)
    lock          held (flock) by the daemon that has the volume mounted
    mount.json    pid and mount point of that daemon, while it runs
    sluice.log    the daemon's log when it runs in the background

Every file of a volume is 0600 and the directory 0700, whatever the umask: the device
holds every tenant's data and meta.db every name, so no other user of the host may read
them (or flock `lock` and keep the owner out). `sluice mount` and `sluice fsck` refuse
a volume that others can read or write (`check_private`), unless asked to fix it, and
one that belongs to another user (`check_owned`), whose owner could replace its files.
The small JSON files are replaced durably (`write_durably`: temp file, fsync, rename,
fsync of the directory), so a crash leaves the old or the new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import sqlite3
import stat
import struct
import time
import uuid as uuidlib
from pathlib import Path
from typing import Iterator

from kernelshim import (BlockDevice, FormatError, StoreFileError, fsync_directory,
                        open_store_file, parse_profile, read_json_file, write_durably)

from .errors import VolumeError
from .metadata import Metadata

FORMAT_VERSION = 1
HEADER = "volume.json"
DB = "meta.db"
LOCK = "lock"
MOUNT_STATE = "mount.json"
LOG = "sluice.log"

#: the volume directory's mode and its files': owner only
DIR_MODE = 0o700
FILE_MODE = 0o600
#: the umask under which volume files are created (chmod follows anyway: a file made
#: by a library, e.g. SQLite's -wal and -shm, takes the mode it chooses)
PRIVATE_UMASK = 0o077

def os_error_text(exc: BaseException) -> str:
    """'File too large: /srv/v/device.img', not "[Errno 27] File too large: '...'"."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename is not None else exc.strerror
    return str(exc)


@dataclasses.dataclass(frozen=True, slots=True)
class VolumeInfo:
    path: Path
    uuid: str
    created_ns: int


def pid_alive(pid: int) -> bool:
    """Whether process `pid` (a volume's daemon) still runs: a zombie does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): look at its state.
    try:
        # (bytes: the command name in it is the process's own, any bytes at all)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def daemon_alive(path: Path, state: dict | None) -> bool:
    """Whether the volume at `path` is mounted by the daemon its mount.json (`state`)
    names: that pid runs and holds the volume's lock (the flock of `VolumeLock`, which
    the kernel drops when its holder dies). A running pid alone does not say so: after
    the daemon died, another process may have been given its pid."""
    if not state or not state.get("mountpoint"):
        return False
    pid = int(state.get("pid") or 0)
    if not pid_alive(pid):
        return False
    try:
        st = os.stat(path / LOCK, follow_symlinks=False)
        # A line per lock: "1: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF" (a waiter's
        # is "1: -> FLOCK ..."); the pid is the holder's as this process sees pids, the
        # device in hex.
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or parts[1] != "FLOCK" or parts[4] != str(pid):
                    continue
                dev = parts[5].split(":")
                if len(dev) != 3 or dev[2] != str(st.st_ino):
                    continue
                if (int(dev[0], 16), int(dev[1], 16)) == (os.major(st.st_dev),
                                                         os.minor(st.st_dev)):
                    return True
                # (the same inode number on another device; or btrfs, whose locks name
                # the filesystem's device and stat a subvolume's: ask the pid's files)
                return _holds_open(pid, st)
    except (OSError, ValueError):
        return False  # (no lock file: no daemon took it)
    return False


def _holds_open(pid: int, st: os.stat_result) -> bool:
    """Whether process `pid` has the file `st` open."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            other = os.stat(fd)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def is_volume(path: Path) -> bool:
    return (path / HEADER).is_file()


def read_header(path: Path) -> VolumeInfo:
    """The volume's header, checked: VolumeError (one line naming the file) if it is
    missing, not a regular file, not valid JSON or not a header of this format."""
    try:
        path.stat()
    except FileNotFoundError:
        raise VolumeError(f"{path}: no such volume (make one with 'sluice mkfs {path}')"
                          ) from None
    except PermissionError:
        raise VolumeError(f"{path}: permission denied: a directory on the way to it is "
                          f"closed to uid {os.geteuid()}") from None
    except OSError:
        pass  # (a loop, a path too long: said by the checks below)
    if not path.exists():
        raise VolumeError(f"{path}: no such volume (make one with 'sluice mkfs {path}')")
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        st = path.stat()
        raise VolumeError(f"{path}: permission denied: the volume belongs to uid "
                          f"{st.st_uid} (mode {stat.S_IMODE(st.st_mode):04o}); only its "
                          "owner or root may mount or check it")
    if not is_volume(path) and not (path / HEADER).is_symlink():
        raise VolumeError(f"{path} is not a sluice volume ({HEADER} missing)")
    try:
        h = read_json_file(path / HEADER)
    except (OSError, StoreFileError) as exc:
        raise VolumeError(f"{path}: unreadable volume header: {os_error_text(exc)}"
                          ) from None
    if not isinstance(h, dict):
        raise VolumeError(f"{path / HEADER}: not a volume header (a JSON object)")
    if h.get("format") != FORMAT_VERSION or type(h.get("format")) is not int:
        raise VolumeError(f"{path}: unsupported volume format {h.get('format')!r}")
    vid, created = h.get("uuid"), h.get("created_ns")
    # The uuid names the daemon's control socket (/run/sluice/UUID.sock): a crafted
    # one must not name a path elsewhere.
    try:
        ok = isinstance(vid, str) and str(uuidlib.UUID(vid)) == vid
    except ValueError:
        ok = False
    if not ok or not isinstance(vid, str):
        raise VolumeError(f"{path / HEADER}: uuid {vid!r} is not a UUID")
    if type(created) is not int:
        raise VolumeError(f"{path / HEADER}: created_ns {created!r} is not an integer")
    return VolumeInfo(path, vid, created)


def check_profile(profile: str) -> None:
    """A timing profile's name or custom numbers, checked before anything is made or
    started (VolumeError saying what is wrong)."""
    try:
        parse_profile(profile)
    except ValueError as exc:
        raise VolumeError(str(exc).replace("timing profile", "profile")) from None


def mkfs(path: Path, *, size: int, block_size: int = 4096, profile: str = "none",
         inodes: int | None = None, device: str | None = None, force: bool = False) -> VolumeInfo:
    """Make a new, empty volume in directory `path` (created if missing; its parent
    must exist, as for mkdir: a typo must not make a tree of directories)."""
    check_profile(profile)
    if inodes is not None and inodes < 1:
        raise VolumeError(f"--inodes must be a positive number, not {inodes}")
    if path.parent.exists() and not path.parent.is_dir():
        raise VolumeError(f"cannot make a volume in {path}: {path.parent} is not a "
                          "directory")
    if not path.parent.is_dir():
        raise VolumeError(f"cannot make a volume in {path}: its parent directory "
                          f"{path.parent} does not exist (make it first: mkdir -p "
                          f"{path.parent})")
    existed = path.exists()
    before = set(os.listdir(path)) if existed and path.is_dir() else set()
    try:
        with private_umask():
            return _mkfs(path, size=size, block_size=block_size, profile=profile,
                         inodes=inodes, device=device, force=force)
    except BaseException as exc:
        # A failed mkfs leaves nothing behind: what it made goes (a retry must not find
        # "not empty and not a sluice volume").
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        elif not (before - {LOCK}) and path.is_dir():
            for name in set(os.listdir(path)) - before | ({LOCK} & before):
                with contextlib.suppress(OSError):
                    os.unlink(path / name)
        if isinstance(exc, (OSError, ValueError)):
            raise VolumeError(f"cannot make a volume in {path}: {os_error_text(exc)}"
                              ) from None
        raise


def _mkfs(path: Path, *, size: int, block_size: int, profile: str, inodes: int | None,
          device: str | None, force: bool) -> VolumeInfo:
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    check_owned(path)  # a directory another user made: theirs to rewrite later
    if is_volume(path) and not force:
        raise VolumeError(f"{path} already holds a sluice volume (use --force to overwrite)")
    # (a lone lock file is what an earlier mkfs that failed, e.g. on a bad size, leaves)
    if not force and not is_volume(path) and any(p.name != LOCK for p in path.iterdir()):
        raise VolumeError(f"{path} is not empty and not a sluice volume")
    os.chmod(path, DIR_MODE)  # an existing directory keeps its mode otherwise
    with VolumeLock(path, purpose="mkfs"):
        for name in (DB, DB + "-wal", DB + "-shm", MOUNT_STATE, "device.img", "checksums"):
            try:
                (path / name).unlink()
            except FileNotFoundError:
                pass
        try:
            geo = BlockDevice.format(path, size=size, block_size=block_size, profile=profile,
                                     backing=device)
        except FormatError as exc:
            raise VolumeError(str(exc)) from None
        vid = str(uuidlib.uuid4())
        now = time.time_ns()
        Metadata.create(path / DB, uuid=vid, root_uid=os.getuid(), root_gid=os.getgid(),
                        now_ns=now, max_inodes=inodes or max(1024, geo.nblocks))
        make_private(path)
        # The device's files were written through the page cache (device.json, the
        # checksum array): make them durable before the header declares a volume.
        for name in ("device.json", "checksums", DB):  # (blockdev's names, see device.py)
            _fsync_file(path / name)
        fsync_directory(path)
        write_durably(path / HEADER, (json.dumps(
            {"format": FORMAT_VERSION, "uuid": vid, "created_ns": now}, indent=2) + "\n"
        ).encode(), mode=FILE_MODE)
    return VolumeInfo(path, vid, now)


#: the metadata database's files: SQLite opens (and creates) them by name, following
#: symbolic links, so they are checked before it does
DB_FILES = (DB, DB + "-wal", DB + "-shm")


def open_metadata(path: Path, *, record: Path | None = None,
                  read_only: bool = False) -> Metadata:
    """The volume's metadata database, opened and checked: VolumeError (one line, naming
    meta.db) if it or its -wal or -shm is not a regular file (a symbolic link to a file
    elsewhere is never opened: SQLite would read it, write it and make a -wal beside
    it), if SQLite cannot read it, or if it is not a sluice database of this version."""
    for name in DB_FILES:
        try:
            st = os.lstat(path / name)
        except FileNotFoundError:
            if name == DB:  # (SQLite would make an empty one)
                raise VolumeError(f"{path / DB} is missing: the volume has no metadata"
                                  ) from None
            continue
        if not stat.S_ISREG(st.st_mode):
            kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a directory"
                    if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "not a regular file")
            raise VolumeError(f"{path / name} is {kind}, not a regular file: refusing to "
                              "use it")
    try:
        md = Metadata(path / DB, record=record, read_only=read_only)
    except sqlite3.Error as exc:
        raise VolumeError(f"{path / DB}: cannot open the metadata database: {exc}") from None
    try:
        problem = md.schema_problem()
    except sqlite3.Error as exc:
        problem = f"it is unreadable: {exc}"
    except BaseException:
        md.db.close()
        raise
    if problem:
        md.db.close()
        raise VolumeError(f"{path / DB} is not a sluice metadata database of this version: "
                          f"{problem}")
    return md


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Create files with no group or other bits for the duration (process-wide)."""
    old = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(old)


def exposed_files(path: Path) -> list[tuple[Path, int]]:
    """The volume directory and files in it that group or others may read, write or
    enter, with their modes. (Symbolic links have no mode of their own; a real block
    device named by `--device` lives outside the volume and keeps the host's policy.)"""
    out: list[tuple[Path, int]] = []
    st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        out.append((path, stat.S_IMODE(st.st_mode)))
    with os.scandir(path) as it:
        for entry in it:
            est = entry.stat(follow_symlinks=False)
            if not stat.S_ISLNK(est.st_mode) and stat.S_IMODE(est.st_mode) & 0o077:
                out.append((Path(entry.path), stat.S_IMODE(est.st_mode)))
    return out


def foreign_files(path: Path) -> list[tuple[Path, int]]:
    """The volume directory and files in it that belong to another uid than this
    process's, with their owners. The owner of the directory may rename and replace
    every file in it — `device.json`, whose absolute backing path is trusted, or
    `meta.db` — so a volume in a directory another user owns is that user's to
    rewrite, whoever mounts it."""
    me = os.geteuid()
    out: list[tuple[Path, int]] = []
    st = os.lstat(path)
    if st.st_uid != me:
        out.append((path, st.st_uid))
    with os.scandir(path) as it:
        for entry in it:
            est = entry.stat(follow_symlinks=False)
            if est.st_uid != me:
                out.append((Path(entry.path), est.st_uid))
    return out


def check_owned(path: Path) -> None:
    """Refuse (VolumeError, one line) a volume whose directory or files belong to
    another user than the caller (see `foreign_files`)."""
    try:
        foreign = foreign_files(path)
    except OSError as exc:
        raise VolumeError(f"{path}: cannot check its owner: {exc.strerror}") from None
    if foreign:
        first, uid = foreign[0]
        what = "the volume directory" if first == path else first.name
        raise VolumeError(
            f"{path}: {what} belongs to uid {uid}, not to uid {os.geteuid()}: its owner "
            f"could replace the volume's files; if you trust it, run 'chown -R "
            f"{os.geteuid()} {path}'")


def make_private(path: Path) -> list[Path]:
    """chmod go-rwx on the volume directory and every file in it; returns what changed."""
    changed = []
    for p, mode in exposed_files(path):
        os.chmod(p, mode & 0o700, follow_symlinks=False)
        changed.append(p)
    return changed


def check_private(path: Path, *, fix: bool = False, option: str = "--fix-permissions"
                  ) -> list[Path]:
    """Refuse (VolumeError, one line) a volume that others may read or write; with `fix`,
    make it private instead and return what was changed. A volume another user owns is
    refused either way (`check_owned`)."""
    check_owned(path)
    try:
        exposed = exposed_files(path)
    except OSError as exc:
        raise VolumeError(f"{path}: cannot check permissions: {exc.strerror}") from None
    if not exposed:
        return []
    if fix:
        return make_private(path)
    first, mode = exposed[0]
    more = f" and {len(exposed) - 1} more" if len(exposed) > 1 else ""
    raise VolumeError(
        f"{path} is open to other users ({first.name} is {mode:04o}{more}): every tenant's "
        f"data would be readable; run 'chmod -R go-rwx {path}' or use {option}")


def _ofd_lock(fd: int, kind: int) -> bool:
    """An open-file-description record lock on byte 0 of `fd` (F_RDLCK, F_WRLCK or
    F_UNLCK), without waiting: False if another description holds a conflicting one.
    (Separate from the flock on the same file; dropped when the holder dies.)"""
    flock = struct.pack("hhqqii", kind, os.SEEK_SET, 0, 1, 0, 0)  # struct flock
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)
    except (BlockingIOError, PermissionError):
        return False
    return True


class VolumeLock:
    """An exclusive flock on the volume's lock file: one daemon (or mkfs, or fsck) at a
    time. The kernel drops it when the holder dies, even by SIGKILL.

    A second lock on the same file says whether the volume may be written: a daemon
    holds a write lock on byte 0 while it is read-write (`hold_writer`; mkfs and a
    repair from the start), and a check (`checking_lock`) holds a read lock on it: a
    check never reads a changing volume, and never stops a read-only mount."""

    def __init__(self, path: Path, *, purpose: str = "mount") -> None:
        self.path = path
        self.purpose = purpose
        self._fd: int | None = None
        self.writer = False

    def __enter__(self) -> VolumeLock:
        fd = _open_lock(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            state = read_mount_state(self.path)
            where = f" at {state['mountpoint']} (daemon pid {state['pid']})" if state else ""
            raise VolumeError(f"volume {self.path} is in use{where}") from None
        self._fd = fd
        if self.purpose != "mount":  # mkfs, fsck --repair: they write
            try:
                self.hold_writer()
            except VolumeError:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def hold_writer(self) -> None:
        """Before writing to the volume: VolumeError if fsck is checking it."""
        assert self._fd is not None
        if not self.writer and not _ofd_lock(self._fd, fcntl.F_WRLCK):
            raise VolumeError(f"sluice fsck is checking {self.path}: try again when it "
                              "is done")
        self.writer = True

    def release_writer(self) -> None:
        """Read-only from now on (everything written is committed)."""
        if self._fd is not None and self.writer:
            _ofd_lock(self._fd, fcntl.F_UNLCK)
        self.writer = False


@contextlib.contextmanager
def checking_lock(path: Path) -> Iterator[dict | None]:
    """For a check (fsck without --repair): a read lock on what writers hold, so the
    volume is either unmounted or mounted read-only, and stays so while the check
    runs (a read-only mount may even start meanwhile; a read-write one, a remount
    read-write, a repair or mkfs cannot). Yields the mount state if a daemon has it
    mounted; VolumeError if something writes to it."""
    fd = _open_lock(path)
    try:
        state = read_mount_state(path) if _flock_held(fd) else None
        if not _ofd_lock(fd, fcntl.F_RDLCK):
            if state and state.get("mountpoint"):
                raise VolumeError(f"volume {path} is in use, mounted read-write at "
                                  f"{state['mountpoint']}: unmount it, or remount it "
                                  "read-only (mount -o remount,ro ...) to check it")
            raise VolumeError(f"volume {path} is in use (being repaired or made)")
        yield state
    finally:
        os.close(fd)


def open_log(path: Path) -> int:
    """The daemon's log, sluice.log, opened for appending (made if missing): a regular
    file, never a symbolic link, FIFO or directory put in its place (VolumeError)."""
    try:
        return open_store_file(path / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                               mode=FILE_MODE)
    except StoreFileError as exc:
        raise VolumeError(str(exc)) from None


def _open_lock(path: Path) -> int:
    """The volume's lock file, made if missing: a regular file, never a symbolic link,
    FIFO or directory put in its place (VolumeError naming it)."""
    try:
        return open_store_file(path / LOCK, os.O_RDWR | os.O_CREAT, mode=FILE_MODE)
    except StoreFileError as exc:
        raise VolumeError(str(exc)) from None


def _flock_held(fd: int) -> bool:
    """Whether a daemon (or mkfs, or a repair) holds the volume's flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def read_mount_state(path: Path) -> dict | None:
    """mount.json, if it is there and says what a daemon writes: a mount point (a
    string) and a pid. Anything else (not a regular file, not JSON, other types) is no
    state: the next mount replaces it."""
    try:
        state = read_json_file(path / MOUNT_STATE, limit=1 << 20)
    except (OSError, StoreFileError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("mountpoint"), str) \
            or type(state.get("pid")) is not int or not 0 < state["pid"] < 1 << 31:
        return None
    if type(state.get("seq", 0)) is not int:
        state.pop("seq")
    return state


def write_mount_state(path: Path, *, mountpoint: str, pid: int, **more: object) -> None:
    """mount.json: the daemon's pid and mount point, and (`more`) the kernel's mount
    flags it last applied (`flags`, as mountinfo says them), the result (`applied`)
    and why a remount read-write was refused (`refused`)."""
    if (path / MOUNT_STATE).is_dir() and not (path / MOUNT_STATE).is_symlink():
        # (a symbolic link or a FIFO is replaced by the rename; a directory is not)
        raise VolumeError(f"{path / MOUNT_STATE} is a directory, not a regular file: "
                          "refusing to use it")
    # Durable: after a power loss, the next mount must find the dead mount to clean.
    write_durably(path / MOUNT_STATE,
                  (json.dumps({"mountpoint": mountpoint, "pid": pid, **more}) + "\n"
                   ).encode(), mode=FILE_MODE)


def clear_mount_state(path: Path) -> None:
    try:
        (path / MOUNT_STATE).unlink()
    except FileNotFoundError:
        pass
