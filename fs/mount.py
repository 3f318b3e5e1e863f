"""Wiring of a mounted volume: every service of the daemon is created here, in one
AsyncExitStack and one nursery, with its cleanup pushed right after it.
(After s3ql's mount.py.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import select
import signal
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import pyfuse3
import trio

from kernelshim import Kernel
from kernelshim.principals import PrincipalTable
from kernelshim.server import ShimServer

from .filesystem import FileSystem
from .metadata import Metadata
from .errors import VolumeError
from .operations import PRINCIPAL_REQUESTS, Operations
from .service import DirectService
from .volume import (DB, VolumeLock, clear_mount_state, read_header, read_mount_state,
                     write_mount_state)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class MountOptions:
    cache_bytes: int = 64 << 20
    profile: str | None = None
    cache_mode: str = "direct"
    allow_other: bool = True
    #: pyfuse3 request workers (trio tasks; a busy one holds a request buffer). Far more
    #: than one principal may use at once (`principal_requests`), because a request
    #: waiting for its principal's admission still holds a worker (fs/operations.py,
    #: Admission): what saturating principals hold is their executing requests plus
    #: the ones they have waiting, and 512 leaves room for a good many of both.
    max_tasks: int = 512
    #: FUSE handlers one principal (and each of its ancestors below root) may have
    #: executing at once
    principal_requests: int = PRINCIPAL_REQUESTS
    commit_interval: float = 1.0
    debug_fuse: bool = False
    #: a read-only mount: EROFS for every change, nothing written to the volume
    read_only: bool = False


def fuse_options(volume: Path, opts: MountOptions) -> set[str]:
    if not hasattr(pyfuse3, "negotiated"):  # Operations asks for what only it can
        raise VolumeError("this pyfuse3 is not sluice's own build (binding/): run "
                          "scripts/setup.sh")
    o = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    o |= {f"fsname={volume}", "subtype=sluice"}
    if opts.allow_other:
        o.add("allow_other")
    if opts.debug_fuse:
        o.add("debug")
    if opts.read_only:
        o.add("ro")  # the kernel refuses changes itself; FileSystem does too
    return o


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
    with open("/proc/self/mounts") as f:
        for line in f:
            src, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if mnt == real:
                found = (src, fstype)
    return found


def lazy_unmount(mountpoint: str) -> None:
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def clean_dead_mount(volume: Path) -> str | None:
    """If the daemon that last mounted `volume` died, unmount its dead mount point."""
    state = read_mount_state(volume)
    if not state:
        return None
    mp = state.get("mountpoint", "")
    m = mounted_fs(mp) if mp else None
    if m and m[1] == "fuse.sluice" and mount_is_dead(mp):
        log.warning("cleaning up the dead mount at %s (daemon pid %s died)", mp, state.get("pid"))
        lazy_unmount(mp)
        clear_mount_state(volume)
        return mp
    clear_mount_state(volume)
    return None


async def serve(volume: Path, mountpoint: str, opts: MountOptions,
                ready: Callable[[str | None], None]) -> None:
    """Mount `volume` at `mountpoint` and serve it until unmounted or signalled.
    `ready(None)` is called once the mount is live, `ready(message)` on failure."""
    read_header(volume)
    # Resolve before mounting: touching the mount point once it is mounted, before the
    # main loop runs, would wait for this very process.
    mountpoint = os.path.realpath(mountpoint)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(VolumeLock(volume))
        clean_dead_mount(volume)
        # Lab facilities (tests, fault and power-loss experiments), read here and only
        # here: a fault plan injected below the device, a recording of its writes.
        fault_plan = os.environ.get("SLUICE_FAULT_PLAN")
        record_dir = os.environ.get("SLUICE_RECORD_DIR")
        kernel = Kernel.open(volume, cache_bytes=opts.cache_bytes, profile=opts.profile,
                             fault_plan=Path(fault_plan) if fault_plan else None,
                             record_dir=Path(record_dir) if record_dir else None)
        stack.callback(kernel.close)
        md = Metadata(volume / DB, record=Path(record_dir) if record_dir else None)
        stack.callback(md.close)
        principals = PrincipalTable.load(volume)
        fs = await FileSystem.load(md, kernel, default_cache_mode=opts.cache_mode,
                                   principals=principals, read_only=opts.read_only)
        scrubbed = 0 if opts.read_only else await fs.scrub_stale_blocks()
        if scrubbed:
            log.info("discarded %d blocks written but never committed before the last crash",
                     scrubbed)
        sock_path = control_socket_path(read_header(volume).uuid)
        ops = Operations(fs, control_socket=str(sock_path),
                         principal_requests=opts.principal_requests)
        pyfuse3.init(ops, mountpoint, fuse_options(volume, opts))
        server = ShimServer(kernel, principals, DirectService(fs), sock_path,
                            metadata_pending=_fuse_queue_probe())
        # Unmount only after a clean end (umount, SIGTERM/SIGINT/SIGHUP). When an
        # exception escapes the loop the daemon exits and leaves the mount dead, as
        # pyfuse3's examples do: programs then get ENOTCONN instead of writing into the
        # bare mount-point directory on the host, and the next `sluice mount` of the
        # volume (which finds the mount point in mount.json) cleans it up.
        # (A failure before the mount was announced live is a failed `sluice mount`:
        # that one unmounts, since nobody was told to use the mount.)
        clean_exit = False
        announced = False

        def _close() -> None:
            pyfuse3.close(unmount=clean_exit or not announced)
        stack.callback(_close)
        write_mount_state(volume, mountpoint=mountpoint, pid=os.getpid())

        def _clear_state() -> None:
            if clean_exit or not announced:
                clear_mount_state(volume)
        stack.callback(_clear_state)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(fs.run_committer,
                                                      interval=opts.commit_interval))
                await nursery.start(server.run)
                nursery.start_soon(_prune_registrations, principals, name="pid-pruner")
                nursery.start_soon(_watch_signals, name="signal-watcher")
                log.info("mounted %s at %s (pid %d, control socket %s)", volume, mountpoint,
                         os.getpid(), sock_path)
                ready(None)
                announced = True
                await pyfuse3.main(min_tasks=1, max_tasks=opts.max_tasks)
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
                await fs.sync()
        log.info("unmounted %s", mountpoint)


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


def _fuse_queue_probe() -> Callable[[], bool] | None:
    """A cheap check whether the kernel has FUSE requests queued for this daemon: poll
    the session's /dev/fuse descriptor (pyfuse3 does not export it, /proc names it)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                fds.append(int(name))
        except OSError:
            continue
    if len(fds) != 1:
        return None
    poller = select.poll()
    poller.register(fds[0], select.POLLIN)
    return lambda: bool(poller.poll(0))


async def _prune_registrations(principals: PrincipalTable) -> None:
    while True:
        await trio.sleep(5)
        principals.prune_registrations()


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
