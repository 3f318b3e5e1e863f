"""Wiring of a mounted volume: every service of the daemon is created here, in one
AsyncExitStack and one nursery, with its cleanup pushed right after it.
(After s3ql's mount.py.)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import inspect
import logging
import os
import select
import signal
import sqlite3
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pyfuse3
import trio

from kernelshim import Kernel, SluiceError, set_miss_on_loop
from kernelshim.connection import order_batches
from kernelshim.principals import PrincipalTable
from kernelshim.server import ShimServer, socket_in_use

from .filesystem import FileSystem
from .gcwatch import GcLog, freeze_start_up_heap
from .idlepoll import (DEFAULT_WINDOW as IDLE_POLL_DEFAULT, IdlePoll, epoll_ready_probe,
                       parse_window, ThreadCpuWait)
from .metrics import MetricsServer
from .mounttable import (MOUNTINFO, MOUNTS, fields as table_fields, read_table, table_rows,
                         unescape)
from .errors import VolumeError
from .operations import (HANDLER_CHECKPOINT_BUDGET, PARKED_BYTES, PARKED_REQUESTS,
                         PRINCIPAL_REQUESTS, Operations)
from .service import DirectService
from .volume import (DB, VolumeLock, clear_mount_state, open_metadata, pid_alive,
                     read_header, read_mount_state, write_mount_state)

log = logging.getLogger(__name__)


#: the daemon's nice value by default: it serves every tenant, so the tenants' own
#: CPU-bound processes must not take the CPU it needs to serve the others (bench_hostile:
#: the daemon thread runnable but off a CPU while 14 attacker processes ran). It
#: only uses CPU on its tenants' behalf, so running it ahead of them takes nothing from
#: them that they did not ask it to do. Not realtime: a busy daemon must never lock
#: the machine up.
DAEMON_NICE = -5


@dataclasses.dataclass(frozen=True, slots=True)
class MountOptions:
    cache_bytes: int = 64 << 20
    #: the pager's replacement policy (pager.POLICIES): hinted, principal or global-lru
    pager_policy: str = "hinted"
    profile: str | None = None
    #: the device's I/O scheduler: "mclock" (per-principal QoS) or "fifo" (the baseline)
    scheduler: str = "mclock"
    cache_mode: str = "direct"
    allow_other: bool = True
    #: pyfuse3 request workers (trio tasks; a busy one holds a request buffer). A
    #: request waiting for its principal's admission gives its worker back (it is
    #: parked: fs/operations.py, Admission), so what one tenant holds is its executing
    #: requests (`principal_requests`) and the pool is shared by the tenants running.
    max_tasks: int = 512
    #: FUSE handlers one principal (and each of its ancestors below root) may have
    #: executing at once in each of its two lanes (namespace and data requests)
    principal_requests: int = PRINCIPAL_REQUESTS
    #: the mount's ceiling on the parked requests and bytes root may give one principal;
    #: each principal's own bound is its bank (`parked`, `parked_bytes`, changeable while
    #: mounted); beyond it: EAGAIN
    parked_requests: int = PARKED_REQUESTS
    parked_bytes: int = PARKED_BYTES
    commit_interval: float = 1.0
    #: the pager caches writes and writes them back before the commit that exposes
    #: them (docs/dev/invariants.md R2); False: writes go through to the device
    writeback: bool = False
    debug_fuse: bool = False
    #: a read-only mount: EROFS for every change, nothing written to the volume
    read_only: bool = False
    #: serve Prometheus metrics of every principal at (host, port) (fs/metrics.py);
    #: None: off
    metrics: tuple[str, int] | None = None
    #: the VFS flags asked for besides ro (see VfsFlags): atime mode, suid, dev, exec
    atime: str = "relatime"
    nodiratime: bool = False
    suid: bool = False
    dev: bool = False
    noexec: bool = False
    #: seconds the event loop polls for the next request before it sleeps, after
    #: serving (fs/idlepoll.py); 0: off
    idle_poll: float = IDLE_POLL_DEFAULT

    #: the daemon's CPU priority (nice value, -20..19; `apply_priority`); None: leave it
    nice: int | None = DAEMON_NICE

    def vfs_flags(self) -> VfsFlags:
        return VfsFlags(read_only=self.read_only, nosuid=not self.suid, nodev=not self.dev,
                        noexec=self.noexec, atime=self.atime, nodiratime=self.nodiratime)


_LAB_WORKERS = ("max_tasks", "principal_requests", "parked_requests", "parked_bytes")


def _lab_workers(opts: MountOptions, text: str | None) -> MountOptions:
    """SLUICE_FUSE_WORKERS (tests only): NAME=N,... for the fields in _LAB_WORKERS."""
    if not text:
        return opts
    changes: dict[str, Any] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in _LAB_WORKERS or not value.isdigit() or int(value) < 1:
            raise VolumeError(f"SLUICE_FUSE_WORKERS: {item!r} is not one of "
                              f"{', '.join(_LAB_WORKERS)} = a positive number")
        changes[name] = int(value)
    log.warning("lab setting SLUICE_FUSE_WORKERS: %s", text)
    return dataclasses.replace(opts, **changes)


def _lab_extents_per_step(text: str | None) -> int | None:
    """SLUICE_EXTENTS_PER_STEP=N (the crash harness): `FileSystem.extents_per_step`."""
    if text is None:
        return None
    if not text.isdigit() or not 1 <= int(text) <= 1_000_000:
        raise VolumeError(f"SLUICE_EXTENTS_PER_STEP: {text!r} is not a number of extents "
                          "from 1 to 1000000")
    log.warning("lab setting SLUICE_EXTENTS_PER_STEP: %s", text)
    return int(text)


def _lab_idle_poll(opts: MountOptions, text: str | None) -> MountOptions:
    """SLUICE_IDLE_POLL=USEC (benchmarks): idle polling as `--idle-poll USEC`."""
    if text is None:
        return opts
    try:
        window = parse_window(text)
    except ValueError as exc:
        raise VolumeError(f"SLUICE_IDLE_POLL: {exc}") from None
    log.warning("lab setting SLUICE_IDLE_POLL: %s µs", text)
    return dataclasses.replace(opts, idle_poll=window)


def _lab_miss_on_loop(text: str | None) -> None:
    """SLUICE_MISS_ON_LOOP_S=SECONDS (benchmarks): reads that miss the host's page
    cache are made on the event loop while they take less than this on average
    (blockdev/backing.py MISS_ON_LOOP_SECONDS; `inf`: always, as before stop 28)."""
    if text is None:
        return
    try:
        seconds = float(text)
        if not seconds >= 0:
            raise ValueError
    except ValueError:
        raise VolumeError(f"SLUICE_MISS_ON_LOOP_S: {text!r} is not a number of seconds "
                          "(0 or more, or inf)") from None
    log.warning("lab setting SLUICE_MISS_ON_LOOP_S: %s s", text)
    set_miss_on_loop(seconds)


def _start_idle_poll(window: float, stack: contextlib.ExitStack | contextlib.AsyncExitStack
                     ) -> IdlePoll | None:
    """Add the idle-polling instrument to the running loop (None: off)."""
    if window <= 0:
        log.info("idle polling off")
        return None
    ready = epoll_ready_probe()
    if ready is None:
        log.warning("idle polling off: this trio %s keeps no epoll descriptor where "
                    "sluice looks for it", trio.__version__)
        return None
    # (made in the loop's thread: ThreadCpuWait reads the thread that opened it)
    cpu_wait = ThreadCpuWait.open()
    idle = IdlePoll(window, ready, cpu_wait=cpu_wait)
    trio.lowlevel.add_instrument(idle)

    def stop() -> None:
        # The loop runs on while the stack unwinds (the final sync): the instrument
        # goes first, then the descriptor it reads.
        with contextlib.suppress(KeyError):  # trio dropped it already
            trio.lowlevel.remove_instrument(idle)
        if cpu_wait is not None:
            cpu_wait.close()
    stack.callback(stop)
    log.info("idle polling on: up to %.0f µs before the loop sleeps", window * 1e6)
    return idle


def checkpoint_budget_works() -> bool:
    """Whether the binding answers a handler's schedule point within its budget.

    run_handler recognises trio's schedule point by what it yields, a private name
    of trio's (trio._core._traps); with another trio it finds none and every schedule
    point gives the loop back again — correct, only slower. Probed by behaviour (a
    bare cancel_shielded_checkpoint needs no running loop), not by the name."""
    async def one_schedule_point() -> None:
        await trio.lowlevel.cancel_shielded_checkpoint()

    blocked: list[bool] = []
    run_handler = getattr(pyfuse3, "run_handler")
    step = run_handler(one_schedule_point(), lambda: blocked.append(True), 1.0)
    try:
        step.send(None)
    except StopIteration:
        return not blocked
    step.close()
    return False


def fuse_options(volume: Path, opts: MountOptions) -> set[str]:
    # Operations and serve() ask for what only sluice's own build can (release_worker,
    # the handlers' checkpoint budget of sluice.5).
    run_handler = getattr(pyfuse3, "run_handler", None)
    if not hasattr(pyfuse3, "release_worker") or run_handler is None or \
            "budget" not in inspect.signature(run_handler).parameters:
        raise VolumeError("this pyfuse3 is not sluice's own build (binding/) or is an "
                          "older one: run scripts/setup.sh")
    o = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    o |= {f"fsname={volume}", "subtype=sluice"}
    if opts.allow_other:
        o.add("allow_other")
    if opts.debug_fuse:
        o.add("debug")
    if opts.read_only:
        o.add("ro")  # the kernel refuses changes itself; FileSystem does too
    # What libfuse can pass to mount(2) itself (it defaults to nosuid,nodev and the
    # kernel to relatime); strictatime and nodiratime it does not know: serve() sets
    # them with a remount once the mount is up.
    if opts.atime == "noatime":
        o.add("noatime")
    if opts.suid:
        o.add("suid")
    if opts.dev:
        o.add("dev")
    if opts.noexec:
        o.add("noexec")
    return o


# -- mount options and remounting --------------------------------------------------------
#
# FUSE leaves the VFS flags of a mount to the kernel, and the kernel never tells the
# daemon about them: `mount -o remount,ro` (mount(2) with MS_REMOUNT) flips the
# superblock and mount flags without a FUSE request, and FUSE inodes are S_NOATIME, so
# the kernel's atime modes do nothing for it. The daemon therefore follows its mount's
# flags in /proc/self/mountinfo (poll() wakes on every change of the mount table) and
# applies them itself: read-only (commit, then EROFS for every change and for direct
# clients), read-write again, and the atime mode its reads keep. `sluice remount`, and
# mount.fuse.sluice called by mount(8) for `-o remount`, do the mount(2) and then wait
# until mount.json shows that the daemon applied what the kernel now says.

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME = 32, 1024, 2048
_MS_RELATIME, _MS_STRICTATIME = 1 << 21, 1 << 24

ATIME_MODES = ("relatime", "noatime", "strictatime")


class MountOptionError(VolumeError):
    """A `-o` option that is not known or not allowed here (a usage error: exit 2)."""


@dataclasses.dataclass(frozen=True, slots=True)
class VfsFlags:
    """The kernel's flags of one mount that a user may set with -o: the defaults are
    a FUSE mount's (rw, nosuid, nodev, relatime)."""

    read_only: bool = False
    nosuid: bool = True
    nodev: bool = True
    noexec: bool = False
    atime: str = "relatime"
    nodiratime: bool = False

    def with_option(self, opt: str) -> VfsFlags | None:
        """These flags with mount option `opt` applied; None if it is not a VFS flag."""
        change = _VFS_OPTIONS.get(opt)
        return None if change is None else dataclasses.replace(self, **change)

    def ms_flags(self) -> int:
        f = _MS_RDONLY if self.read_only else 0
        f |= (_MS_NOSUID if self.nosuid else 0) | (_MS_NODEV if self.nodev else 0)
        f |= _MS_NOEXEC if self.noexec else 0
        f |= {"noatime": _MS_NOATIME, "relatime": _MS_RELATIME,
              "strictatime": _MS_STRICTATIME}[self.atime]
        return f | (_MS_NODIRATIME if self.nodiratime else 0)

    def options(self) -> str:
        """Every flag named, as `-o` takes them: parsed over any base (even the FUSE
        defaults, nosuid,nodev) they give these flags again. (text() leaves out what
        is off, so "suid" read back over the defaults was nosuid again.)"""
        return ",".join(["ro" if self.read_only else "rw",
                         "nosuid" if self.nosuid else "suid", "nodev" if self.nodev else "dev",
                         "noexec" if self.noexec else "exec", self.atime,
                         "nodiratime" if self.nodiratime else "diratime"])

    def text(self) -> str:
        """As mount(8) would write them: ro,nosuid,nodev,noatime."""
        parts = ["ro" if self.read_only else "rw"]
        parts += [n for n, on in (("nosuid", self.nosuid), ("nodev", self.nodev),
                                  ("noexec", self.noexec)) if on]
        parts.append(self.atime)
        if self.nodiratime:
            parts.append("nodiratime")
        return ",".join(parts)


_VFS_OPTIONS: dict[str, dict[str, Any]] = {
    "ro": {"read_only": True}, "rw": {"read_only": False},
    "suid": {"nosuid": False}, "nosuid": {"nosuid": True},
    "dev": {"nodev": False}, "nodev": {"nodev": True},
    "exec": {"noexec": False}, "noexec": {"noexec": True},
    "noatime": {"atime": "noatime"}, "relatime": {"atime": "relatime"},
    "strictatime": {"atime": "strictatime"},
    # mount(8)'s "atime" clears noatime; the kernel's default is then relatime
    "atime": {"atime": "relatime"},
    "nodiratime": {"nodiratime": True}, "diratime": {"nodiratime": False},
}
#: fstab and mount(8) options that are mount(8)'s or systemd's business, accepted and
#: ignored (mount(8) passes some of them on to the helper: nofail, _netdev, user, users)
_IGNORED = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
            "owner", "group", "async", "silent", "loud",
            # always on for a sluice mount
            "allow_other", "default_permissions"}
_IGNORED_PREFIXES = ("x-", "comment=", "user=")
#: what mount(8) passes back from the mounted superblock when it remounts
_REMOUNT_ECHO = ("user_id=", "group_id=", "max_read=", "blksize=", "fsname=", "subtype=")
#: sluice's own options (mount -t fuse.sluice, fstab): name -> takes a value
SLUICE_OPTIONS = {"cache_size": True, "profile": True, "cache_mode": True,
                  "scheduler": True, "pager": True, "metrics": True,
                  "fix_permissions": False, "foreground": False, "debug": False,
                  "writeback": False, "nowriteback": False, "idle_poll": True}


@dataclasses.dataclass(frozen=True, slots=True)
class ParsedOptions:
    flags: VfsFlags
    #: sluice's own options given (cache_size=..., fix_permissions, ...)
    settings: dict[str, str | None]
    remount: bool
    #: which VFS flags were named (a remount changes only those)
    named: tuple[str, ...]


def parse_mount_options(options: list[str], base: VfsFlags = VfsFlags()) -> ParsedOptions:
    """Options of `-o a,b,c=d` (in order, the last one wins, as with mount(8)); an
    unknown one is a MountOptionError naming it."""
    flags = base
    settings: dict[str, str | None] = {}
    named: list[str] = []
    remount = "remount" in options
    for opt in options:
        if not opt or opt == "remount":
            continue
        new = flags.with_option(opt)
        if new is not None:
            flags = new
            named.append(opt)
            continue
        key, eq, val = opt.partition("=")
        key = key.replace("-", "_")
        if opt in _IGNORED or opt.startswith(_IGNORED_PREFIXES) or (
                remount and opt.startswith(_REMOUNT_ECHO)):
            continue
        if key in SLUICE_OPTIONS:
            if SLUICE_OPTIONS[key] != bool(eq) or (eq and not val):
                raise MountOptionError(
                    f"mount option {opt!r}: " + (f"{key}=VALUE expected" if SLUICE_OPTIONS[key]
                                                 else f"{key} takes no value"))
            if remount:
                raise MountOptionError(f"mount option {key} cannot be changed by a remount "
                                       "(unmount and mount again)")
            settings[key] = val if eq else None
            continue
        # (a remount changes only the VFS flags; foreground and debug are the mount
        # helper's, and `sluice mount` wants --foreground/--debug instead)
        own = [] if remount else sorted(set(SLUICE_OPTIONS) - {"foreground", "debug"})
        known = ", ".join([*_VFS_OPTIONS, *own])
        raise MountOptionError(f"unknown mount option {opt!r} (known: {known})")
    return ParsedOptions(flags, settings, remount, tuple(named))


def read_mount_flags(mountpoint: str, mountinfo: str | None = None, dev: str | None = None
                     ) -> tuple[VfsFlags, str] | None:
    """The kernel's flags of the (topmost) mount at `mountpoint` — of device `dev`
    ("major:minor") only, when given — and the mountinfo text they came from (mount
    options, then the superblock's); None if not mounted. With `dev`, a mount someone
    put over this one (a tenant may: `fusermount3 -o ro` on a mount point it can
    write) is not taken for it: its read-only flag made the whole volume read-only
    for every tenant (probe 22, F1)."""
    if mountinfo is None:
        mountinfo = read_table(MOUNTINFO)
    found = None
    for line in mountinfo.split("\n"):
        fields = table_fields(line)
        if len(fields) < 10 or unescape(fields[4]) != mountpoint or \
                (dev is not None and fields[2] != dev) or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        mnt_opts, sb_opts = fields[5].split(","), fields[sep + 3].split(",")
        atime = "noatime" if "noatime" in mnt_opts else (
            "relatime" if "relatime" in mnt_opts else "strictatime")
        flags = VfsFlags(read_only="ro" in mnt_opts or "ro" in sb_opts,
                         nosuid="nosuid" in mnt_opts, nodev="nodev" in mnt_opts,
                         noexec="noexec" in mnt_opts, atime=atime,
                         nodiratime="nodiratime" in mnt_opts)
        found = (flags, f"{fields[5]} {fields[sep + 3]}")
    return found


def mount_device(mountpoint: str) -> str | None:
    """The device ("major:minor", mountinfo's third field) of the topmost mount at
    `mountpoint` in this namespace, or None."""
    found = None
    for fields in table_rows(MOUNTINFO):
        if len(fields) >= 10 and unescape(fields[4]) == mountpoint:
            found = fields[2]
    return found


def device_mounted(dev: str) -> bool:
    """Whether a mount of device `dev` ("major:minor") is anywhere in this namespace: a
    FUSE connection's mounts share its device, wherever they were moved or bound."""
    return any(len(fields) >= 10 and fields[2] == dev for fields in table_rows(MOUNTINFO))


_libc = ctypes.CDLL(None, use_errno=True)


def remount_kernel(mountpoint: str, flags: VfsFlags) -> None:
    """mount(2) with MS_REMOUNT: the kernel's flags of the mount become `flags`
    (root only; fusermount3 cannot remount). OSError on failure."""
    if _libc.mount(None, os.fsencode(mountpoint), None,
                   ctypes.c_ulong(_MS_REMOUNT | flags.ms_flags()), None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), mountpoint)


#: how long a remount read-only waits for the discards of freed blocks (they may wait
#: for a tenant's held requests) before leaving them undiscarded (settle_reaper)
REMOUNT_REAP_SECONDS = 10.0
#: how long files still open through a mount that is gone from the daemon's namespace
#: (a lazy unmount) are served before the session ends (`FlagFollower._after_unmount`)
UNMOUNT_GRACE_SECONDS = 30


class FlagFollower:
    """The daemon's side of remounting: applies its mount's kernel flags (read-only,
    atime mode) to the FileSystem whenever they change, and records what it applied
    in mount.json for `sluice remount` to wait on."""

    def __init__(self, fs: FileSystem, volume: Path, mountpoint: str, lock: VolumeLock
                 ) -> None:
        self.fs = fs
        self.volume = volume
        self.mountpoint = mountpoint
        self.lock = lock
        #: the mountinfo text last applied (the table changes for every mount on the
        #: host; only a change of ours is applied and recorded)
        self._seen: str | None = None
        #: why the last remount read-write was refused, until one succeeds
        self._refused: str | None = None
        #: applies so far (in mount.json: a remount waits for a later one)
        self._seq = 0

    async def run(self, *, wanted: VfsFlags | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        poller = select.poll()
        poller.register(fd, select.POLLPRI)  # POLLPRI|POLLERR: the mount table changed
        try:
            now = await trio.to_thread.run_sync(read_mount_flags, self.mountpoint)
            if wanted is not None and now is not None and now[0] != wanted:
                # strictatime, nodiratime: what libfuse could not pass to mount(2). The
                # loop serves this mount meanwhile (mount(2) looks the mount point up).
                try:
                    await trio.to_thread.run_sync(remount_kernel, self.mountpoint, wanted)
                except OSError as exc:
                    log.warning("cannot set %s on %s: %s", wanted.text(), self.mountpoint,
                                exc.strerror)
            started = False
            dev = await trio.to_thread.run_sync(mount_device, self.mountpoint)
            while True:
                now = await trio.to_thread.run_sync(read_mount_flags, self.mountpoint,
                                                    None, dev)
                if now is None and started and dev is not None and \
                        not await trio.to_thread.run_sync(device_mounted, dev):
                    # (gone by its device, not by its path: a mount moved, a parent
                    # directory renamed, a bind mount left, still serve here; review of
                    # stop 26, 1)
                    if await self._after_unmount(dev):
                        return
                if now is not None and now[1] != self._seen:
                    try:
                        await self.apply(*now)
                    except Exception as exc:  # noqa: BLE001 - a bug: never the mount's end
                        log.exception("applying the mount flags %s failed", now[1])
                        fs = self.fs
                        if fs.read_only is None or not fs.write_errors:
                            fs.fail(f"applying the mount flags failed: {exc}")
                if not started:
                    task_status.started()
                    started = True
                await trio.to_thread.run_sync(poller.poll, None, abandon_on_cancel=True)
        finally:
            os.close(fd)

    async def _after_unmount(self, dev: str) -> bool:
        """No mount of this connection's device `dev` is left in this daemon's mount
        namespace, yet the kernel has not ended the FUSE session: a copy of it lives in another mount namespace (a
        tenant's `unshare -Urm` made before the unmount), or a lazy unmount left
        files open. The files open through it are served for up to
        UNMOUNT_GRACE_SECONDS more; then the session ends, as the unmount asked, and
        any copy left is dead (ENOTCONN). A tenant's copy kept the daemon, and the
        volume, for as long as it liked, and `sluice umount` waited for it (probe
        18, F8)."""
        log.info("%s is no longer mounted here; serving the files still open through it "
                 "for at most %d s", self.mountpoint, UNMOUNT_GRACE_SECONDS)
        deadline = trio.current_time() + UNMOUNT_GRACE_SECONDS
        while self.fs.open_handle_count() and trio.current_time() < deadline:
            await trio.sleep(0.2)
        if await trio.to_thread.run_sync(device_mounted, dev):
            log.info("%s is mounted here again: serving it", self.mountpoint)
            return False
        if self.fs.open_handle_count():
            log.warning("%d files still open through %s after %d s: ending the session "
                        "(they get ENOTCONN)", self.fs.open_handle_count(), self.mountpoint,
                        UNMOUNT_GRACE_SECONDS)
        pyfuse3.terminate()
        return True

    async def apply(self, flags: VfsFlags, seen: str) -> None:
        fs = self.fs
        self._seen = seen
        self._seq += 1
        fs.atime, fs.nodiratime = flags.atime, flags.nodiratime
        if flags.read_only and fs.read_only is None:
            # No change from now on (direct clients' write grants revoked); then what
            # was written is committed, and the volume is left to readers (and fsck).
            fs.set_read_only("remounted read-only")
            try:
                await fs.sync()
                # the freed blocks' discards too, or none: nothing is written after
                await fs.settle_reaper(REMOUNT_REAP_SECONDS)
            except SluiceError as exc:
                log.error("committing before the remount read-only failed: %s", exc)
            self.lock.release_writer()
            log.info("remounted read-only: %s", flags.text())
        elif not flags.read_only and fs.read_only is not None:
            try:
                if fs.write_errors:
                    await fs.set_writable()  # raises ReadOnly: the volume failed
                self.lock.hold_writer()
                try:
                    scrubbed = await fs.set_writable()
                except BaseException:
                    self.lock.release_writer()
                    raise
                if scrubbed:
                    log.info("discarded %d blocks written but never committed", scrubbed)
                self._refused = None
                log.info("remounted read-write: %s", flags.text())
            except SluiceError as exc:
                self._refused = str(exc)
                log.warning("refusing to go read-write: %s", exc)
                if os.geteuid() == 0:  # and make the kernel's flags say so again
                    back = dataclasses.replace(flags, read_only=True)
                    with contextlib.suppress(OSError):
                        await trio.to_thread.run_sync(remount_kernel, self.mountpoint, back)
        else:
            if flags.read_only and fs.write_errors:
                await fs.settle_reaper(REMOUNT_REAP_SECONDS)  # (freed blocks' discards)
                self.lock.release_writer()  # failed: nothing more is written; fsck may check
            log.info("mount flags: %s", flags.text())
        write_mount_state(self.volume, mountpoint=self.mountpoint, pid=os.getpid(),
                          flags=seen, applied=dataclasses.replace(
                              flags, read_only=fs.read_only is not None).text(),
                          refused=self._refused, seq=self._seq)


def remount(mountpoint: str, options: list[str], *, complete: bool = False,
            timeout: float = 30.0) -> VfsFlags:
    """`mount -o remount,OPTIONS MOUNTPOINT` of a sluice mount: changes the kernel's
    flags (mount(2)), then waits until the daemon has applied them (mount.json).
    Returns the flags in force; VolumeError (one line) if refused.

    The options change the mount's current flags; with `complete` (from mount(8),
    which passes the mount's flags merged with the new ones, and drops `nodiratime`
    for `diratime`) they are all of them but the atime mode, which stays unless one
    is named, as the kernel keeps it."""
    mp = os.path.realpath(mountpoint)
    m = mounted_fs(mp)
    if m is None or m[1] != "fuse.sluice":
        raise VolumeError(f"{mp} is not a mounted sluice volume")
    now = read_mount_flags(mp)
    assert now is not None
    base = now[0]
    if complete:
        base = VfsFlags(read_only=False, nosuid=False, nodev=False, noexec=False,
                        atime=base.atime, nodiratime=False)
    parsed = parse_mount_options(["remount", *options], base=base)
    if os.geteuid() != 0:
        raise VolumeError("remounting needs root (fusermount3 cannot remount a FUSE "
                          f"mount): unmount {mp} and mount it again with the options")
    volume = Path(m[0])
    if parsed.flags == now[0]:
        return now[0]  # nothing changes
    seq = (read_mount_state(volume) or {}).get("seq", 0)
    try:
        remount_kernel(mp, parsed.flags)
    except OSError as exc:
        why = ("files are open for writing on it" if exc.errno == errno.EBUSY
               else exc.strerror)
        raise VolumeError(f"cannot remount {mp} {parsed.flags.text()}: {why}") from None
    deadline = time.monotonic() + timeout
    while True:
        # Until the daemon has applied what the kernel says now (which the daemon
        # itself may have turned back to read-only, refusing read-write).
        after = read_mount_flags(mp)
        state = read_mount_state(volume) or {}
        if after is None:
            raise VolumeError(f"{mp} was unmounted")
        if state.get("seq", 0) > seq and state.get("flags") == after[1]:
            break
        pid = state.get("pid")
        if not pid or not pid_alive(pid):
            raise VolumeError(f"the daemon of {mp} is gone")
        if time.monotonic() > deadline:
            raise VolumeError(f"the daemon of {mp} did not take the new flags within "
                              f"{timeout:g} s")
        time.sleep(0.01)
    # (what the daemon applied: a daemon not run by root cannot turn the kernel's
    # flag back when it refuses to go read-write)
    if not parsed.flags.read_only and (
            after[0].read_only or str(state.get("applied", "")).startswith("ro")):
        raise VolumeError(f"{mp} stays read-only: {state.get('refused') or 'refused'}")
    return after[0]


def mount_is_dead(mountpoint: str) -> bool:
    """A FUSE mount whose daemon is gone answers ENOTCONN. Asks with statfs, which
    always reaches the daemon: stat may be answered from the kernel's attribute cache
    (long attr timeouts) and then succeeds on a dead mount."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def mounted_fs(mountpoint: str) -> tuple[str, str] | None:
    """(source, fstype) of the mount at `mountpoint`, or None."""
    real = os.path.realpath(mountpoint)
    found = None
    for fields in table_rows(MOUNTS):
        src, mnt, fstype = fields[:3]
        if unescape(mnt) == real:
            found = (src, fstype)
    return found


def lazy_unmount(mountpoint: str) -> None:
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def clean_dead_mount(volume: Path, *, keep_state: bool = False) -> str | None:
    """If the daemon that last mounted `volume` died, unmount its dead mount point;
    its mount.json goes too, unless `keep_state` (a read-only mount: the volume still
    was not unmounted, and says so to fsck until a read-write mount cleans it up)."""
    state = read_mount_state(volume)
    if not state:
        return None
    mp = state.get("mountpoint", "")
    m = mounted_fs(mp) if mp else None
    cleaned = None
    if m and m[1] == "fuse.sluice" and mount_is_dead(mp):
        log.warning("cleaning up the dead mount at %s (daemon pid %s died)", mp, state.get("pid"))
        lazy_unmount(mp)
        cleaned = mp
    if not keep_state:
        clear_mount_state(volume)
    return cleaned


def apply_priority(nice: int) -> str | None:
    """Run the daemon at `nice`: every thread of the process (Linux: nice is per thread;
    threads made later inherit it) and, if the daemon leads its own session (`sluice
    mount` detaches with setsid), its autogroup, since with autogroup scheduling
    (sched_autogroup_enabled) a thread's nice only ranks it among the threads of its
    own session, and the sessions share the CPU by the autogroups' nice. A daemon in
    someone else's session (`--foreground` from a shell) leaves the session's autogroup
    alone. What was not possible (lowering it needs CAP_SYS_NICE: a daemon not run by
    root keeps its niceness) is returned as one line for the log; None: all done."""
    missed = []
    try:
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    except OSError as exc:
        missed.append(f"nice {nice} ({exc.strerror}; keeping "
                      f"{os.getpriority(os.PRIO_PROCESS, 0)})")
    if os.getsid(0) == os.getpid():
        # Without CAP_SYS_ADMIN the kernel takes one autogroup change a tenth of a second
        # machine-wide (sched_autogroup_set_nice: EAGAIN before then, whoever made the
        # last): try again a few times rather than give up on another process's change.
        for attempt in range(5):
            try:
                with open("/proc/self/autogroup", "w") as f:
                    f.write(str(nice))
            except FileNotFoundError:
                pass  # a kernel without autogroup scheduling: the thread's nice is all
            except BlockingIOError:
                if attempt < 4:
                    time.sleep(0.11)
                    continue
                missed.append(f"autogroup nice {nice} (the kernel refused five changes "
                              f"in half a second: another process's were first)")
            except OSError as exc:
                missed.append(f"autogroup nice {nice} ({exc.strerror})")
            break
    return "; ".join(missed) or None


def _pinned(volume: Path, stack: contextlib.AsyncExitStack) -> Path:
    """A path to `volume` that follows the directory itself wherever it is moved while
    this process holds it (/proc/self/fd/N of a descriptor closed by `stack`); the
    plain path where /proc is not mounted."""
    fd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    pinned = Path(f"/proc/self/fd/{fd}")
    try:
        if os.path.samefile(pinned, volume):
            return pinned
    except OSError:
        pass
    return volume


async def serve(volume: Path, mountpoint: str, opts: MountOptions,
                ready: Callable[[str | None], None],
                on_hangup: Callable[[], None] | None = None) -> int:
    """Mount `volume` at `mountpoint` and serve it until unmounted or signalled.
    `ready(None)` is called once the mount is live, `ready(message)` on failure;
    `on_hangup()` on SIGHUP (reopen the log). Returns the daemon's exit status: 0, or
    1 when the volume failed while mounted (a metadata or device write: it turned
    read-only) or its last commit failed — said in one log line, not a traceback."""
    read_header(volume)
    if opts.nice is not None:
        missed = apply_priority(opts.nice)
        if missed:
            log.info("the daemon keeps its CPU priority: cannot set %s (lowering it needs "
                     "root; tenants' CPU-bound processes may then delay others' requests)",
                     missed)
        else:
            log.info("daemon CPU priority: nice %d", opts.nice)
    # Resolve before mounting: touching the mount point once it is mounted, before the
    # main loop runs, would wait for this very process.
    mountpoint = os.path.realpath(mountpoint)
    #: why the volume is left for fsck (a failure while mounted, a failed last commit)
    failures: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        vlock = stack.enter_context(VolumeLock(volume))
        # A read-only mount of a volume whose daemon died leaves it saying so (its
        # mount.json, which fsck reads as "not unmounted": the crash's leftovers are
        # then notes, not damage): put back at the unmount unless it went read-write.
        dead_state = read_mount_state(volume) if opts.read_only else None
        clean_dead_mount(volume, keep_state=opts.read_only)
        if not opts.read_only:
            vlock.hold_writer()  # else fsck may be checking it (a read-only mount)
        # The files the daemon rewrites while it runs (mount.json, principals.json) go
        # through a descriptor of the volume directory, not its path: a volume moved
        # while mounted keeps them, and a volume made at the old path is never written
        # (probe 19, F7). (SQLite names meta.db's WAL by the path it opened.)
        here = _pinned(volume, stack)
        # Lab facilities (tests, fault and power-loss experiments), read here and only
        # here: a fault plan injected below the device, a recording of its writes.
        fault_plan = os.environ.get("SLUICE_FAULT_PLAN")
        # ... and FUSE worker pool sizes small enough for a test to fill
        # ("max_tasks=8,principal_requests=2,parked_requests=16").
        opts = _lab_workers(opts, os.environ.get("SLUICE_FUSE_WORKERS"))
        # ... and idle polling set for benchmarks that mount without the option
        # (SLUICE_IDLE_POLL=USEC, as --idle-poll)
        opts = _lab_idle_poll(opts, os.environ.get("SLUICE_IDLE_POLL"))
        # ... and the time a read that misses the host's page cache may take on the
        # event loop (SLUICE_MISS_ON_LOOP_S, scripts/bench_slowhost.py)
        _lab_miss_on_loop(os.environ.get("SLUICE_MISS_ON_LOOP_S"))
        record_dir = os.environ.get("SLUICE_RECORD_DIR")
        # ... and parts of a few extents (SLUICE_EXTENTS_PER_STEP=N, the crash harness:
        # every truncate, unlink, punch, zero and allocation of more than N extents
        # goes through the parts, and their crash rules, on files of a few extents)
        extents_per_step = _lab_extents_per_step(os.environ.get("SLUICE_EXTENTS_PER_STEP"))
        # ... and a log of every cyclic garbage collection (SLUICE_GC_LOG=FILE:
        # fs/gcwatch.py), for benchmarks that place collections against requests
        gc_log_path = os.environ.get("SLUICE_GC_LOG")
        if gc_log_path:
            stack.callback(GcLog.open(gc_log_path).close)
        kernel = Kernel.open(volume, cache_bytes=opts.cache_bytes, profile=opts.profile,
                             scheduler=opts.scheduler,
                             fault_plan=Path(fault_plan) if fault_plan else None,
                             record_dir=Path(record_dir) if record_dir else None,
                             pager_policy=opts.pager_policy, writeback=opts.writeback)
        stack.callback(kernel.close)
        md = open_metadata(volume, record=Path(record_dir) if record_dir else None,
                           read_only=opts.read_only)

        def _close_metadata() -> None:
            try:
                md.close()
            except sqlite3.Error as exc:
                # (a full or failing host: one line at the end, not a traceback)
                failures.append(f"the last metadata commit failed: {exc}")
        stack.callback(_close_metadata)
        principals = PrincipalTable.load(here)
        try:
            fs = await FileSystem.load(md, kernel, default_cache_mode=opts.cache_mode,
                                       principals=principals, read_only=opts.read_only)
            scrubbed = 0 if opts.read_only else await fs.scrub_stale_blocks()
        except sqlite3.Error as exc:  # (a page of it is damaged: its schema was fine)
            raise VolumeError(f"{volume / DB}: the metadata database is unreadable: {exc}; "
                              "run sluice fsck") from None
        if extents_per_step is not None:
            fs.extents_per_step = extents_per_step
        if scrubbed:
            log.info("discarded %d blocks written but never committed before the last crash",
                     scrubbed)
        uuid = read_header(volume).uuid
        sock_path = control_socket_path(uuid)
        if socket_in_use(sock_path):
            # The volume's lock is in the volume directory, and a copy of the directory
            # has its own: a copy mounted beside its source took the source's socket,
            # and every client of the source talked to the copy (probe 19, F1).
            raise VolumeError(f"{volume}: a volume with the same uuid ({uuid}) is already "
                              f"mounted (its daemon serves {sock_path}): this is a copy of "
                              "it; unmount that one first")
        metrics = None
        if opts.metrics is not None:
            # Bound before the mount goes live: a busy port fails the mount, not later.
            metrics = await MetricsServer.bind(fs.statistics_dict, *opts.metrics)
            stack.push_async_callback(metrics.aclose)
        ops = Operations(fs, control_socket=str(sock_path),
                         principal_requests=opts.principal_requests,
                         parked_requests=opts.parked_requests,
                         parked_bytes=opts.parked_bytes)
        # The start-up heap out of the collector's full collections (fs/gcwatch.py): it
        # lives as long as the daemon. Before the mount goes live, so that no request
        # waits behind this one full collection.
        t0 = time.perf_counter()
        frozen = freeze_start_up_heap()
        log.info("garbage collector: froze %d objects of the start-up heap (%.1f ms)",
                 frozen, (time.perf_counter() - t0) * 1e3)
        pyfuse3.init(ops, mountpoint, fuse_options(volume, opts))
        # Every tenant's requests in turn, not in the kernel's one queue's order.
        set_intake = getattr(pyfuse3, "set_intake", None)
        if set_intake is not None:
            set_intake(ops.intake)
        else:
            log.warning("the FUSE binding has no fair intake (an older build): one "
                        "tenant's backlog of requests delays the others'; run "
                        "scripts/setup.sh")
        fuse_fd = _fuse_fd()
        server = ShimServer(kernel, principals, DirectService(fs), sock_path,
                            metadata_pending=_fuse_queue_probe(fuse_fd))
        # FUSE requests in the shim's fair turns: each is its tenant's step
        # (kernelshim/connection.py, `FairTurns.serves`). (Not in the side poll: a
        # request the kernel holds cut every backlogged step to one request, whoever's
        # it was, a flooding tenant's too: hostile probe 25, F1.)
        ops.on_request = server.turns.serves
        # trio's batches in queue order, so that the requests a poll brings run before
        # the backlogged work already runnable (kernelshim/connection.py)
        server.turns.ordered = order_batches()
        # Unmount only after a clean end (umount, SIGTERM/SIGINT). When an
        # exception escapes the loop the daemon exits and leaves the mount dead, as
        # pyfuse3's examples do: programs then get ENOTCONN instead of writing into the
        # bare mount-point directory on the host, and the next `sluice mount` of the
        # volume (which finds the mount point in mount.json) cleans it up.
        # (A failure before the mount was announced live is a failed `sluice mount`:
        # that one unmounts, since nobody was told to use the mount.)
        clean_exit = False
        announced = False

        def _close() -> None:
            ops.invalidator.close()  # no kernel notification once the session closes
            pyfuse3.close(unmount=clean_exit or not announced)
        stack.callback(_close)
        write_mount_state(here, mountpoint=mountpoint, pid=os.getpid())

        def _clear_state() -> None:
            if clean_exit or not announced:
                if dead_state is not None and not fs.recovered:
                    write_mount_state(here, **dead_state)
                else:
                    clear_mount_state(here)
        stack.callback(_clear_state)
        try:
            async with trio.open_nursery() as nursery:
                # The pager's own tasks (write-back, reclaim deadlines) first: everything
                # after it may write.
                await nursery.start(kernel.pager.run, name="pager")
                await nursery.start(functools.partial(fs.run_committer,
                                                      interval=opts.commit_interval))
                await nursery.start(fs.run_discarder, name="discarder")
                await nursery.start(fs.run_reaper, name="reaper")
                await nursery.start(server.run)
                await nursery.start(ops.run_releases, name="deferred-releases")
                nursery.start_soon(_prune_registrations, principals, name="pid-pruner")
                nursery.start_soon(_watch_signals, on_hangup, name="signal-watcher")
                if metrics is not None:
                    nursery.start_soon(metrics.serve, name="metrics-server")
                follower = FlagFollower(fs, here, mountpoint, vlock)

                async def announce() -> None:
                    # Once the kernel's flags are what was asked for and applied (that
                    # may need a remount, served by the loop below).
                    nonlocal announced
                    await nursery.start(functools.partial(follower.run,
                                                          wanted=opts.vfs_flags()),
                                        name="mount-flags")
                    log.info("mounted %s at %s (pid %d, control socket %s)", volume,
                             mountpoint, os.getpid(), sock_path)
                    ready(None)
                    announced = True
                nursery.start_soon(announce, name="announce")
                if HANDLER_CHECKPOINT_BUDGET > 0 and not checkpoint_budget_works():
                    log.warning("the binding cannot answer handlers' schedule points "
                                "with this trio %s (it recognises 0.35's): every one "
                                "gives the event loop back", trio.__version__)
                # Added after the shim server's fair turns (server.run above), so that
                # they count a poll as the loop's waiting, not as a batch's work.
                idle = _start_idle_poll(opts.idle_poll, stack)
                server.idle_poll = idle  # its connections poll for their next request too
                await pyfuse3.main(min_tasks=1, max_tasks=opts.max_tasks,
                                   checkpoint_budget=HANDLER_CHECKPOINT_BUDGET)
                server.idle_poll = None  # (the instrument goes with the stack)
                if idle is not None:
                    log.info("%s", idle.summary())
                nursery.cancel_scope.cancel()
            clean_exit = True
        except BaseException:
            if announced:
                log.critical("the daemon failed: leaving %s dead (ENOTCONN) until the "
                             "next 'sluice mount %s' cleans it up", mountpoint, volume)
            raise
        finally:
            # Whatever ended the loop, what was written is made durable if it can be.
            with trio.CancelScope(shield=True):
                try:
                    await fs.sync(final=True)
                except SluiceError as exc:
                    # The final commit failed (the volume turned read-only: logged):
                    # said once below, not as a traceback.
                    log.debug("the final sync failed: %s", exc)
            if fs.write_errors:
                failures.append(f"the volume failed while mounted ({fs.read_only})")
        log.info("unmounted %s", mountpoint)
    if failures:
        log.error("%s: nothing was committed after that; run `sluice fsck %s` before "
                  "the next mount", "; ".join(failures), volume)
        return 1
    return 0


def control_socket_path(uuid: str) -> Path:
    """Where a volume's shim socket lives: short (sun_path is 108 bytes), per volume.

    Root's daemon uses /run/sluice (0755: every uid may reach the socket, which is 0666;
    identity comes from SO_PEERCRED). Any other daemon uses a directory of its own,
    $XDG_RUNTIME_DIR/sluice or else $TMPDIR/sluice-UID, made 0700 by itself and
    verified before use (owner, mode, not a symlink): in /tmp another user could
    otherwise create it first and own the daemon's socket path. That daemon's socket
    serves its own uid only, as everything under $XDG_RUNTIME_DIR does.
    """
    euid = os.geteuid()
    if euid == 0:
        candidates = [("/run/sluice", 0o755)]
    else:
        candidates = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        candidates.append((os.path.join(runtime, "sluice"), 0o700))
    candidates.append((os.path.join(tempfile.gettempdir(), f"sluice-{euid}"), 0o700))
    for path, mode in candidates:
        if _own_directory(path, mode):
            return Path(path) / f"{uuid}.sock"
    raise VolumeError("no directory for the control socket: tried "
                      + ", ".join(p for p, _ in candidates))


def _own_directory(path: str, mode: int) -> bool:
    """Make `path` a directory of this process's uid with no more than `mode`, or check
    that it is one. False if it cannot be made here (try elsewhere); VolumeError if it
    exists and is not safe to use."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        # O_NOFOLLOW: a symbolic link planted there is refused, not followed.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise VolumeError(f"control socket directory {path} is not a directory of ours "
                          f"({exc.strerror}): remove it") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise VolumeError(f"control socket directory {path} belongs to uid {st.st_uid},"
                              f" not to this daemon's uid {os.geteuid()}: remove it")
        if stat.S_IMODE(st.st_mode) & ~mode:
            raise VolumeError(f"control socket directory {path} has mode "
                              f"{stat.S_IMODE(st.st_mode):04o}, more open than {mode:04o}: "
                              f"chmod {mode:o} {path} or remove it")
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask took away
    finally:
        os.close(fd)
    return True


def _fuse_fd() -> int | None:
    """The session's /dev/fuse descriptor (pyfuse3 does not export it, /proc names it;
    None: not exactly one)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                fds.append(int(name))
        except OSError:
            continue
    return fds[0] if len(fds) == 1 else None


def _fuse_queue_probe(fd: int | None) -> Callable[[], bool] | None:
    """A cheap check whether the kernel has FUSE requests queued for this daemon: poll
    the session's /dev/fuse descriptor `fd`."""
    if fd is None:
        return None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return lambda: bool(poller.poll(0))


async def _prune_registrations(principals: PrincipalTable) -> None:
    while True:
        await trio.sleep(5)
        principals.prune_registrations()


async def _watch_signals(on_hangup: Callable[[], None] | None = None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:  # the convention (logrotate): reopen the log
                try:
                    if on_hangup is not None:
                        on_hangup()
                except (OSError, SluiceError) as exc:
                    # (sluice.log replaced by a symbolic link, a FIFO; the host's disk
                    # full): the daemon keeps serving, logging where it did
                    log.error("SIGHUP: cannot reopen the log: %s", exc)
                    continue
                log.info("SIGHUP: log reopened")
                continue
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
