"""The `sluice` command: mkfs, mount, umount, fsck (and the mount.fuse.sluice helper).

User mistakes print one line on stderr and exit with a documented code, no traceback:
    0  success
    1  error at run time (missing volume, busy mount point, refused, daemon lost, ...)
    2  usage error: a bad argument (unknown option or -o option, malformed number)
    4  fsck found errors it did not repair
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from kernelshim import Rate, SluiceError, UnitError, format_size_approx, parse_size
from kernelshim.banks import NO_LIMIT
from kernelshim.kernel import MIN_CACHE_FRAMES, PRIORITY_MAX, PRIORITY_MIN
from kernelshim.protocol import NOTICE_CHARS

from . import volume as vol
from .errors import VolumeError
from .mounttable import MOUNTS, table_rows, unescape
from .idlepoll import DEFAULT_WINDOW as IDLE_POLL_DEFAULT, parse_window as parse_idle_window

log = logging.getLogger("sluice")

EXIT_ERROR = 1
#: whether `sluice mount` caches writes (--writeback/--no-writeback)
WRITEBACK_DEFAULT = False
#: pager.POLICIES, spelled out here so that `sluice --help` needs no numpy
PAGER_POLICIES = ("hinted", "principal", "global-lru")
#: fs.mount.DAEMON_NICE (the daemon's default CPU priority), spelled out here so that
#: `sluice --help` needs no pyfuse3
DAEMON_NICE = -5
EXIT_USAGE = 2
EXIT_FSCK_UNCORRECTED = 4
#: fsck could not check the volume at all (missing, in use, unreadable): e2fsck's 8, so
#: that `fsck ...; [ $? -le 1 ]` never takes an unchecked volume for a repaired one
EXIT_FSCK_OPERATIONAL = 8


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


class UsageError(CliError):
    """A bad argument found after parsing: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2), not usage text too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _setup_logging(debug: bool, *, daemon: bool = False, cmd: str | None = None) -> None:
    """Commands log warnings to stderr, as their other lines ("sluice fsck: ..."); the
    daemon (`mount --foreground`, and the detached daemon, whose stderr is the volume's
    sluice.log) logs what it does, with times and where from (so does --debug)."""
    level = logging.DEBUG if debug else logging.INFO if daemon else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if not daemon and not debug:
        fmt = f"sluice {cmd}: %(message)s" if cmd else "sluice: %(message)s"
    logging.basicConfig(stream=sys.stderr, level=level, format=fmt)
    if cmd == "fsck" and not debug:
        # The device's own log lines (a checksum mismatch) are what fsck reports on
        # stdout, with the file and range: not twice (probe 19, F8).
        logging.getLogger("blockdev").setLevel(logging.CRITICAL)


def _message(exc: BaseException) -> str:
    """An exception as a user reads it: 'No such file or directory: /x', not
    '[Errno 2] No such file or directory: ...'."""
    if isinstance(exc, OSError) and exc.strerror:
        return vol.os_error_text(exc)
    # (a message that quotes an OSError: the daemon's, a lost connection's)
    return re.sub(r"\[Errno \d+\] ", "", str(exc))


# -- mkfs ---------------------------------------------------------------------------------

def _plural(n: int, one: str, many: str | None = None) -> str:
    """'1 file', '2 files'."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def cmd_mkfs(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    bs = parse_size(args.block_size, what="block size")
    if args.device is None and 0 < bs and size // bs < 16:
        # (a number out of its range is a usage error, as --size 0 is; probe 19, F5)
        raise UsageError(f"--size {args.size} is too small: at least 16 blocks "
                         f"({16 * bs} bytes with {bs}-byte blocks)")
    info = vol.mkfs(Path(args.volume), size=size, block_size=bs, profile=args.profile,
                    inodes=args.inodes, device=args.device, force=args.force)
    if not args.quiet:
        print(f"made sluice volume {info.path} (uuid {info.uuid}): {size // bs} blocks of "
              f"{bs} bytes, profile {args.profile}")
    return 0


# -- mount --------------------------------------------------------------------------------

def _check_mountpoint(mp: str) -> None:
    from .mount import lazy_unmount, mount_is_dead, mounted_fs
    if mount_is_dead(mp):
        m = mounted_fs(mp)
        if m and m[1] == "fuse.sluice":
            lazy_unmount(mp)  # left behind by a daemon that died
        else:
            raise CliError(f"mount point {mp} is a dead mount of another filesystem")
    if not os.path.isdir(mp):
        raise CliError(f"mount point {mp} does not exist or is not a directory")
    if os.path.ismount(mp):
        raise CliError(f"mount point {mp} is busy (something is already mounted there)")
    if os.listdir(mp):
        raise CliError(f"mount point {mp} is not empty")


def _mount_options(args: argparse.Namespace):
    from .mount import MountOptionError, MountOptions, VfsFlags, parse_mount_options
    flags = VfsFlags(read_only=args.read_only)
    for text in args.options or ():
        parsed = parse_mount_options(text.split(","), base=flags)
        for key, val in parsed.settings.items():  # -o cache_size=256M as in fstab
            if key in ("foreground", "debug"):
                raise MountOptionError(f"use --{key} with sluice mount, not -o {key}")
            if key == "cache_size":
                try:
                    parse_size(str(val), what="cache_size")
                except UnitError as exc:
                    raise MountOptionError(str(exc)) from None
            if key == "cache_mode" and val not in ("pager", "direct", "kernel"):
                raise MountOptionError(f"cache_mode={val}: pager or kernel")
            if key == "scheduler" and val not in ("mclock", "fifo"):
                raise MountOptionError(f"scheduler={val}: mclock or fifo")
            if key == "idle_poll":
                try:
                    parse_idle_window(str(val))
                except ValueError as exc:
                    raise MountOptionError(f"idle_poll={val}: {exc}") from None
            if key == "pager" and val not in PAGER_POLICIES:
                raise MountOptionError(f"pager={val}: {', '.join(PAGER_POLICIES)}")
            if key in ("writeback", "nowriteback"):
                args.writeback = key == "writeback"
                continue
            setattr(args, key, True if val is None else val)
        flags = parsed.flags
    if os.geteuid() != 0:
        # fusermount3 makes a user's FUSE mounts nosuid,nodev and cannot remount to
        # set what libfuse does not pass (strictatime, nodiratime).
        asked = [n for n, on in (("suid", not flags.nosuid), ("dev", not flags.nodev),
                                 ("strictatime", flags.atime == "strictatime"),
                                 ("nodiratime", flags.nodiratime)) if on]
        if asked:
            raise CliError(f"-o {','.join(asked)} needs a mount made by root")
    if args.profile is not None:  # (from -o profile=; --profile is checked by argparse)
        try:
            vol.check_profile(args.profile)
        except VolumeError as exc:
            raise MountOptionError(str(exc)) from None
    return MountOptions(cache_bytes=parse_size(args.cache_size), profile=args.profile,
                        scheduler=args.scheduler, cache_mode=args.cache_mode,
                        pager_policy=args.pager, metrics=_metrics_address(args.metrics),
                        writeback=args.writeback, idle_poll=parse_idle_window(args.idle_poll),
                        debug_fuse=args.debug_fuse,
                        read_only=flags.read_only, atime=flags.atime,
                        nodiratime=flags.nodiratime, suid=not flags.nosuid,
                        dev=not flags.nodev, noexec=flags.noexec, nice=args.nice)


def _nice(text: str) -> int | None:
    """--nice N (-20..19) or 'keep' (None)."""
    if text == "keep":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 99
    if not -20 <= n <= 19:
        raise argparse.ArgumentTypeError(f"{text!r}: a nice value -20..19, or keep")
    return n


def _idle_poll_arg(text: str) -> str:
    """--idle-poll USEC: checked by argparse (a bad one is a usage error, exit 2); the
    text is kept (the detached daemon is given it again)."""
    try:
        parse_idle_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _profile_arg(text: str) -> str:
    """--profile: a profile's name or custom numbers, checked by argparse (exit 2)."""
    try:
        vol.check_profile(text)
    except VolumeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


#: the block sizes a device takes (blockdev/device.py)
BLOCK_SIZES = (512, 1 << 20)


def _block_size_arg(text: str) -> str:
    """--block-size: a power of two in 512..1M, checked by argparse (exit 2)."""
    n = parse_size(_size(text), what="block size")
    lo, hi = BLOCK_SIZES
    if not lo <= n <= hi or n & (n - 1):
        raise argparse.ArgumentTypeError(f"block size {text}: must be a power of two "
                                         f"from 512 to 1M")
    return text


#: what --io-weight takes (the wire protocol's bound for an integer)
IO_WEIGHT_MAX = 1 << 62


def _io_weight_arg(text: str) -> int:
    """--io-weight: a positive whole number (one message for every bad value)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= IO_WEIGHT_MAX:
        raise argparse.ArgumentTypeError(f"{text}: must be a whole number of at least 1 "
                                         "(the default is 100)")
    return n


def _owner_arg(text: str) -> int:
    """--owner: a uid, or a user name looked up in the password database."""
    if text.isdigit():
        return int(text)
    import pwd
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text}: no such user") from None


def _priority_arg(text: str) -> int:
    """hint --priority N: a whole number in PRIORITY_RANGE (exit 2 otherwise)."""
    lo, hi = PRIORITY_RANGE
    try:
        n = int(text)
    except ValueError:
        n = hi + 1
    if not lo <= n <= hi:
        raise argparse.ArgumentTypeError(f"{text}: must be a whole number from {lo} "
                                         f"to {hi}")
    return n


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("sluice")
    except PackageNotFoundError:
        return "(not installed: run scripts/setup.sh)"


def _principal_name(text: str) -> str:
    """A new principal's name, as the principal table checks it (a usage error here)."""
    from kernelshim.principals import _NAME_RE
    if not _NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a principal's name is 1 to 64 "
                                         "letters, digits, '_', '.' or '-'")
    return text


def _metrics_address(text: str | None) -> tuple[str, int] | None:
    """--metrics ADDRESS:PORT, checked before the daemon starts."""
    if text is None:
        return None
    from .metrics import parse_address
    try:
        return parse_address(text)
    except ValueError as exc:
        raise UsageError(f"--metrics: {exc}") from None


def _check_private(volume: Path, args: argparse.Namespace) -> None:
    """Refuse a volume other users can read or write, or fix it when asked to."""
    fixed = vol.check_private(volume, fix=args.fix_permissions, option=args.fix_hint)
    if fixed:
        log.warning("made %s of %s private (go-rwx)", _plural(len(fixed), "file"), volume)


def _check_cache_size(volume: Path, cache_bytes: int) -> None:
    """Refuse a --cache-size below the pager's smallest pool (MIN_CACHE_FRAMES blocks)
    rather than silently mounting with a larger one."""
    try:
        bs = int(json.loads((volume / "device.json").read_text())["block_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # (the daemon says what is wrong with the device)
    least = MIN_CACHE_FRAMES * bs
    if cache_bytes < least:
        raise UsageError(f"cache size {format_size_approx(cache_bytes)} is below the "
                         f"smallest pager pool, {format_size_approx(least)} "
                         f"({MIN_CACHE_FRAMES} blocks of {bs} bytes)")


def _check_user_fuse() -> None:
    """What a mount by a user other than root needs, checked first so that a refusal
    says what is missing (libfuse's reason reaches only the daemon's log)."""
    if os.geteuid() == 0:
        return
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        try:
            st = os.stat("/dev/fuse")
            how = f" (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid})"
        except OSError:
            how = " (it does not exist: is the fuse module loaded?)"
        raise CliError(f"cannot open /dev/fuse for reading and writing{how}: a mount by a "
                       "user other than root needs it (usually mode 0666)")
    import shutil
    fm = shutil.which("fusermount3")
    if fm is None:
        raise CliError("fusermount3 not found: a mount by a user other than root needs it "
                       "(package fuse3)")
    st = os.stat(fm)
    if not (st.st_mode & stat.S_ISUID and st.st_uid == 0):
        raise CliError(f"{fm} is not set-user-ID root: a mount by a user other than root "
                       "needs it to be (chmod u+s)")
    # A user's mount is allow_other (every tenant reaches it), which fusermount3 allows
    # only with user_allow_other in /etc/fuse.conf (probe 19, F15).
    try:
        conf = Path("/etc/fuse.conf").read_text(errors="replace")
    except OSError:
        conf = ""
    if not any(line.strip() == "user_allow_other" for line in conf.splitlines()):
        raise CliError("/etc/fuse.conf does not say user_allow_other: a mount by a user "
                       "other than root needs it (add that line, as root)")


def cmd_mount(args: argparse.Namespace) -> int:
    opts = _mount_options(args)  # arguments first: a bad -o is a usage error
    volume = Path(args.volume).resolve()
    vol.read_header(volume)
    _check_cache_size(volume, opts.cache_bytes)
    _check_private(volume, args)
    _check_user_fuse()
    mp = os.path.abspath(args.mountpoint)
    state = vol.read_mount_state(volume)
    if state:
        from .mount import clean_dead_mount
        with vol.VolumeLock(volume):  # raises "in use" if a daemon is alive
            clean_dead_mount(volume, keep_state=opts.read_only)
    _check_mountpoint(mp)
    if args.foreground:
        return _run_foreground(volume, mp, opts, args)
    return _run_background(volume, mp, args, opts)


def _run_foreground(volume: Path, mp: str, opts, args: argparse.Namespace) -> int:
    import trio

    from .mount import serve
    # SIGTERM, SIGINT and SIGHUP stop the daemon or reopen its log (fs/mount.py's signal
    # receiver): a daemon that inherited them blocked (a parent holding them across its
    # fork, as a script does while it records what it started) would never get them, and
    # `kill PID` would do nothing.
    import signal
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    # Whatever the daemon creates in the volume (its log, SQLite's -wal and -shm, the
    # state files) is private to its owner; nothing it serves depends on its umask.
    os.umask(vol.PRIVATE_UMASK)
    _setup_logging(args.debug, daemon=True)
    ready_fd = args.ready_fd
    detached = ready_fd is not None

    def reopen_log() -> None:
        # Detached, stdout and stderr are the volume's sluice.log: after a rotation
        # (logrotate moves it, then sends SIGHUP) they go to a new file of that name.
        if detached:
            fd = vol.open_log(volume)
            sys.stderr.flush()
            sys.stdout.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)

    def ready(err: str | None) -> None:
        if ready_fd is not None:
            os.write(ready_fd, (err or "ok").encode() + b"\n")
            os.close(ready_fd)

    started = False

    def ready_once(err: str | None) -> None:
        nonlocal started
        if not started:
            started = True
            ready(err)

    try:
        status = trio.run(serve, volume, mp, opts, ready_once, reopen_log)
    except SluiceError as exc:
        ready_once(str(exc))
        raise
    except RuntimeError as exc:  # pyfuse3.init failures
        ready_once(f"cannot mount {volume} at {mp}: {exc}")
        raise CliError(f"cannot mount {volume} at {mp}: {exc}") from None
    except BaseException as exc:
        log.exception("daemon failed")
        ready_once(f"daemon failed: {type(exc).__name__}: {exc}; see {volume / vol.LOG}")
        raise
    return status  # (1: the volume failed while mounted, said in the log's last line)


def _run_background(volume: Path, mp: str, args: argparse.Namespace, opts) -> int:
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "fs.cli", "mount", str(volume), mp, "--foreground",
           "--ready-fd", str(w), "--cache-size", args.cache_size, "--cache-mode", args.cache_mode,
           "-o", opts.vfs_flags().options(), "--pager", args.pager, "--scheduler", args.scheduler,
           "--writeback" if opts.writeback else "--no-writeback",
           "--idle-poll", args.idle_poll]
    if args.profile:
        cmd += ["--profile", args.profile]
    if args.metrics:
        cmd += ["--metrics", args.metrics]
    cmd += ["--nice", "keep" if args.nice is None else str(args.nice)]
    if args.debug:
        cmd.insert(3, "--debug")  # the top-level option, before the subcommand
    logf = os.fdopen(vol.open_log(volume), "ab")
    proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=logf,
                            stderr=logf, start_new_session=True, cwd="/")
    os.close(w)
    logf.close()
    with os.fdopen(r, "rb") as f:
        line = f.readline().decode().strip()
    if line == "ok":
        return 0
    rc = proc.wait()
    msg = line or f"daemon exited with status {rc}; see {volume / vol.LOG}"
    raise CliError(msg)


# -- umount -------------------------------------------------------------------------------

def _not_mounted(path: str) -> str:
    """Why `path` is not a mounted sluice volume, in words: a dead mount says its daemon
    is gone; a volume directory says where it is mounted."""
    from .mount import mount_is_dead
    if mount_is_dead(os.path.abspath(path)):
        return (f"{path} is a dead mount: its daemon is not running (`sluice mount` the "
                "volume there again)")
    try:
        is_volume = vol.is_volume(Path(path))
    except OSError:
        is_volume = False
    if is_volume:
        state = vol.read_mount_state(Path(path))
        if state and vol.daemon_alive(Path(path), state):
            return (f"{path} is a sluice volume, not a mount point: it is mounted at "
                    f"{state['mountpoint']}")
        return f"{path} is a sluice volume, not a mount point (and it is not mounted)"
    if not os.path.lexists(path):
        return f"{path} is not a mounted sluice volume (it does not exist)"
    inside = _sluice_mount_of(path)
    if inside is not None:
        return (f"{path} is inside the sluice mount {inside}: give the mount point "
                f"({inside})")
    return f"{path} is not a mounted sluice volume"


def _fuse_owner(mp: str) -> int | None:
    """The uid that made the FUSE mount at `mp` (its user_id= option), or None."""
    try:
        for fields in table_rows(MOUNTS):
            if len(fields) > 3 and unescape(fields[1]) == mp:
                for opt in fields[3].split(","):
                    if opt.startswith("user_id="):
                        return int(opt[len("user_id="):])
    except (OSError, ValueError):
        pass
    return None


def cmd_umount(args: argparse.Namespace) -> int:
    from .mount import mounted_fs
    mp = os.path.abspath(args.mountpoint)
    m = mounted_fs(mp)
    if m is None or m[1] != "fuse.sluice":
        raise CliError(_not_mounted(args.mountpoint))
    owner = _fuse_owner(mp)
    if os.geteuid() != 0 and owner is not None and owner != os.geteuid():
        raise CliError(f"{mp} is uid {owner}'s mount, not yours: only uid {owner} or "
                       "root may unmount it")
    volume = Path(m[0])
    state = vol.read_mount_state(volume) or {}
    pid = state.get("pid")
    log_at = _log_size(volume)
    r = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "fusermount3 failed"
        if "busy" in msg:
            raise CliError(f"cannot unmount {mp}: it is busy (a process has a file or its "
                           f"working directory on it; `fuser -vm {mp}` lists them): close "
                           "them and run this again")
        msg = msg.removeprefix("fusermount3: ").replace(f"failed to unmount {mp}: ", "")
        raise CliError(f"cannot unmount {mp}: {msg}")
    if pid:
        deadline = time.monotonic() + args.timeout
        while vol.pid_alive(pid):
            if time.monotonic() > deadline:
                raise CliError(f"unmounted {mp}, but its daemon (pid {pid}) has not exited "
                               f"within {args.timeout:g} s: it is still saving the volume, "
                               "which is in use until it exits")
            time.sleep(0.05)
        failed = _failure_logged(volume, log_at)
        if failed:
            # Unmounted, but the volume failed while mounted (it turned read-only) or
            # its last commit failed: the daemon's last log line says so; so do we.
            raise CliError(f"unmounted {mp}, but {failed}")
        after = vol.read_mount_state(volume)
        if after is not None and after.get("pid") == pid:
            # A daemon that exits cleanly removes its mount.json (or, mounted read-only
            # over a crash, puts the dead one's back): this one died before it had
            # saved the volume — killed, or already dead (hostile probe 13, F3).
            raise CliError(f"unmounted {mp}, but its daemon (pid {pid}) died before it "
                           "finished saving the volume: what was not fsync'd may be "
                           "lost, and the next mount of the volume recovers it")
    return 0


#: how the daemon's last log line begins when the volume is left for fsck (fs/mount.py
#: `serve`, its exit status 1)
_FAILED_LINE = " ERROR fs.mount: "
_FAILED_END = "before the next mount"


def _log_size(volume: Path) -> int:
    try:
        return (volume / vol.LOG).stat().st_size
    except OSError:
        return 0


def _failure_logged(volume: Path, since: int) -> str | None:
    """The daemon's closing line saying the volume failed while mounted, if it wrote
    one after byte `since` of its log (an unmount ends the daemon's log)."""
    try:
        with open(volume / vol.LOG, "rb") as f:
            f.seek(since)
            tail = f.read(1 << 20).decode(errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        i = line.find(_FAILED_LINE)
        if i >= 0 and line.rstrip().endswith(_FAILED_END):
            return line[i + len(_FAILED_LINE):].strip()
    return None


# -- remount ------------------------------------------------------------------------------

def cmd_remount(args: argparse.Namespace) -> int:
    from .mount import remount
    options = [o for text in args.options for o in text.split(",")]
    flags = remount(args.mountpoint, options, complete=args.complete)
    if not args.quiet:
        print(f"{os.path.abspath(args.mountpoint)}: {flags.text()}")
    return 0


# -- fsck ---------------------------------------------------------------------------------

def cmd_fsck(args: argparse.Namespace) -> int:
    from .fsck import fsck
    vol.read_header(Path(args.volume))
    _check_private(Path(args.volume), args)
    state = vol.read_mount_state(Path(args.volume)) if args.repair else None
    if state and vol.daemon_alive(Path(args.volume), state):
        raise CliError(f"volume {args.volume} is in use, mounted at {state['mountpoint']} "
                       f"(daemon pid {state['pid']}): --repair needs it unmounted (`sluice "
                       f"umount {state['mountpoint']}` first; without --repair it checks "
                       "a read-only mount)")
    report = fsck(Path(args.volume), repair=args.repair, verify_data=args.verify_data,
                  progress=not args.quiet)
    for line in report.lines:
        print(line)
    return report.exit_status  # 0 clean, 1 all repaired, 4 errors left (see fs/fsck.py)


# -- principals, run, stats (through the mounted volume's control socket) ----------------

def _control(mountpoint: str):
    from kernelshim.client import Client
    try:
        return Client.connect(mountpoint, shm_size=0)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOTCONN, errno.ENOENT,
                         errno.ENOTDIR):
            raise CliError(_not_mounted(mountpoint)) from None
        raise CliError(_message(exc)) from None


def _bank_args(args: argparse.Namespace) -> dict:
    out: dict = {}
    for k in ("space", "cache_min", "cache_max", "shm", "parked_bytes"):
        v = getattr(args, k, None)
        if v is not None:
            out[k] = NO_LIMIT if v == NO_LIMIT else parse_size(v, allow_zero=True)
    for k in ("inodes", "io_weight", "grants", "caps", "connections", "children", "parked",
              "costly_rate"):
        v = getattr(args, k, None)
        if v is not None:
            out[k] = v
    for k in ("io_reserve", "io_limit"):
        v = getattr(args, k, None)
        if v is not None:
            # given twice (once per unit) or as a comma list: one rate
            out[k] = str(Rate.parse(",".join(v)))
    return out


def cmd_principal(args: argparse.Namespace) -> int:
    import json
    with _control(args.mountpoint) as c:
        if args.action == "add":
            c.call("principal_add", name=args.name, parent=args.parent, owner_uid=args.owner,
                   **_bank_args(args))
        elif args.action == "set":
            c.call("principal_set", name=args.name, **_bank_args(args))
        elif args.action == "rm":
            r = c.call("principal_rm", name=args.name, move_to=args.move_to)
            if r.get("storage_to"):
                print(f"storage of {args.name} now charged to {r['storage_to']}")
        elif args.action == "show":
            rows = [r for r in c.call("principal_ls")["principals"] if r["name"] == args.name]
            if not rows:
                # (a principal the caller may not see is not named either)
                raise CliError(f"no principal named {args.name!r} that you may see")
            if args.json:
                print(json.dumps(rows[0], indent=1))
            else:
                print(_principal_show(rows[0]))
        else:
            rows = c.call("principal_ls")["principals"]
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                print(_principal_table(rows))
    return 0


def _count(n: int | None) -> str:
    """A count for tables; '-' for None (no limit; or, for usage, not shown to this
    caller: an ancestor's use of a bank it does not limit is other tenants')."""
    return "-" if n is None else str(n)


def _principal_table(rows: list[dict]) -> str:
    depth: dict[str, int] = {}
    lines = [f"{'PRINCIPAL':20} {'OWNER':>6} {'SPACE used/limit':>20} {'INODES used/limit':>18}"
             f" {'GRANTS':>12} {'CACHE min/max':>16} {'IO res/wt/lim':>24}"]
    for r in rows:
        d = depth[r["name"]] = depth.get(r["parent"], -1) + 1 if r["parent"] else 0
        b, u = r["banks"], r["usage"]
        name = "  " * d + r["name"]
        space = f"{format_size_approx(u['space'])}/{format_size_approx(b['space'])}"
        inodes = f"{_count(u['inodes'])}/{_count(b['inodes'])}"
        grants = f"{_count(u['grants'])}/{_count(b['grants'])}"
        cache = f"{format_size_approx(b['cache_min'])}/{format_size_approx(b['cache_max'])}"
        io = f"{b['io_reserve'] or '-'}/{b['io_weight']}/{b['io_limit'] or '-'}"
        lines.append(f"{name:20} {r['owner_uid']:>6} {space:>20} {inodes:>18} {grants:>12}"
                     f" {cache:>16} {io:>24}")
    return "\n".join(lines)


#: what `principal show` prints of each bank: (bank, usage key or None, is a size, what)
_SHOW_BANKS = (
    ("space", "space", True, "storage: data and entries"),
    ("inodes", "inodes", False, "storage: inodes"),
    ("cache_min", None, True, "cache guaranteed"),
    ("cache_max", None, True, "cache ceiling"),
    ("io_reserve", None, False, "I/O reserved"),
    ("io_weight", None, False, "I/O weight"),
    ("io_limit", None, False, "I/O ceiling"),
    ("grants", "grants", False, "open grants"),
    ("caps", "caps", False, "capability slots"),
    ("connections", "connections", False, "control-socket connections"),
    ("shm", "shm", True, "shared buffers attached"),
    ("children", "children", False, "principals below it"),
    ("parked", "parked", False, "FUSE requests parked (beyond: EAGAIN)"),
    ("parked_bytes", "parked_bytes", True, "bytes of parked FUSE requests"),
    ("costly_rate", None, False, "costly socket operations a second"),
)


def _principal_show(r: dict) -> str:
    """One principal's banks, one a line: use (where counted) against the limit."""
    b, u = r["banks"], r["usage"]
    lines = [f"principal {r['name']} (id {r['id']}, parent {r['parent'] or '-'}, "
             f"owner uid {r['owner_uid']})"]
    for bank, used, size, what in _SHOW_BANKS:
        lim = b.get(bank)
        show = (lambda v: format_size_approx(v)) if size else _count
        limit = "-" if lim is None else show(lim)
        val = f"{show(u.get(used, 0))} / {limit}" if used is not None else limit
        lines.append(f"  {bank:13} {val:>22}   {what}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.command)
    if not cmd:
        raise UsageError("no command given (sluice run MOUNTPOINT --principal NAME -- CMD ...)")
    with _control(args.mountpoint) as c:
        c.register(args.principal)
    # Same pid after exec: the program, and every process it starts, act for NAME.
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        # 127 not found, 126 found but not runnable: as env, nice, timeout and the
        # shells say it, so a caller can tell it from the program's own 1 (probe 19, F12)
        print(f"sluice run: cannot run {cmd[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if exc.errno == errno.ENOENT else 126
    return 0


def _positive_int(text: str) -> int:
    """A whole number of at least 1 (mkfs --inodes)."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return v


def _size(text: str) -> str:
    """A size argument (512M, 8G; units as in blockdev/units.py): checked by argparse, so
    a malformed one is a usage error (exit 2); the text is kept (parse_size again where
    it is used)."""
    try:
        parse_size(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _bank_size(text: str) -> str:
    """A size bank argument (--space, --cache-min, ...): as _size, but 0 is allowed
    (no cache guaranteed, no room)."""
    try:
        parse_size(text, allow_zero=True)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _limit_size(text: str) -> str:
    """A size limit (--space, --cache-max, --shm, --parked-bytes): a size as
    _bank_size, or `none`: no limit of its own, its ancestors' only."""
    if text.strip().lower() == NO_LIMIT:
        return NO_LIMIT
    return _bank_size(text)


def _limit_count(text: str) -> int | str:
    """A count limit (--inodes, --grants, ...): a whole number of at least 0, or
    `none` (no limit of its own, its ancestors' only)."""
    if text.strip().lower() == NO_LIMIT:
        return NO_LIMIT
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of at least 0, or none")
    return v


def _rate(text: str) -> str:
    """An I/O rate argument (20MB/s, 500iops), checked like _size."""
    try:
        Rate.parse(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _interval(text: str) -> float:
    """--watch SECONDS: a positive, finite number."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return v


def _fetch_stats(mountpoint: str) -> dict:
    with _control(mountpoint) as c:
        try:
            return c.call("stats")
        except (OSError, EOFError) as exc:  # the daemon went away mid-request
            raise CliError(f"lost the connection to the daemon of {mountpoint}: "
                           f"{exc}") from None


def _ctrl_c_stops() -> None:
    """For the commands that run until Ctrl-C (`stats --watch`, `trace record`): SIGINT
    raises KeyboardInterrupt even when the process inherited it ignored or blocked (a
    parent that ignores SIGINT for its children, as a non-interactive shell does for
    `cmd &`: then SIGINT, the documented way to stop them, did nothing)."""
    import signal
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def cmd_stats(args: argparse.Namespace) -> int:
    import json
    if args.watch:
        _ctrl_c_stops()
    if args.watch and not args.json:
        return _watch_stats(args)
    while True:
        st = _fetch_stats(args.mountpoint)
        if args.json:
            print(json.dumps(st, indent=1), flush=True)
        else:
            print(_stats_text(st), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def _capacity_text(cap: dict) -> str:
    if cap.get("iops") is None or cap.get("bps") is None:
        return "unlimited (profile none: no modeled time)"
    return (f"{cap['iops']:,.0f} IOPS (4 KiB random reads), "
            f"{cap['bps'] / 1e6:,.1f} MB/s sequential")


def _stats_text(st: dict) -> str:
    from .metrics import io_rows
    f, d, p = st["fs"], st["device"], st["pager"]
    out = [f"volume: {f['blocks'] - f['blocks_free']}/{f['blocks']} blocks used "
           f"({f['block_size']} B), {f['inodes']}/{f['max_inodes']} inodes, "
           f"{f['open_handles']} open files, {f['live_grants']} live grants",
           f"device: profile {d['profile']}, scheduler {d['scheduler']}, "
           f"{d['checksum_errors']} checksum errors",
           f"capacity: {_capacity_text(d.get('capacity', {}))}",
           f"pager:  policy {p.get('policy', '?')}, {p['frames_used']}/{p['frames']} frames, "
           f"{p['hits']} hits, "
           f"{p['misses']} misses, {p['bypassed_blocks']} blocks bypassed, "
           f"{p['evictions']} evictions",
           "",
           f"{'PRINCIPAL':16} {'DEV REQS':>9} {'DEV MB RD':>9} {'DEV MB WR':>10}"
           f" {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'FRAMES':>7} {'SPACE+':>9}"
           f" {'INODES+':>7}"]
    usage = {r["name"]: r["usage"] for r in st["principals"]}
    names = [r["name"] for r in st["principals"]]
    io = io_rows(st)
    for n in names:
        s = io.get(n)
        u = usage.get(n, {})
        if s is None:
            iocols = f"{0:>9} {0:>9.1f} {0:>10.1f} {'-':>8} {'-':>8} {'-':>8}"
        else:
            p95 = f"{s.p95_s * 1e3:>8.3f}" if s.p95_s is not None else f"{'-':>8}"
            iocols = (f"{s.ops:>9} {s.read_bytes / 1e6:>9.1f} {s.write_bytes / 1e6:>10.1f} "
                      f"{s.p50_s * 1e3:>8.3f} {p95} {s.p99_s * 1e3:>8.3f}")
        out.append(f"{n:16} {iocols} {p['resident'].get(n, 0):>7} "
                   f"{format_size_approx(u.get('space', 0)):>9} {_count(u.get('inodes', 0)):>7}")
    out += STATS_LEGEND
    cache = st.get("cache") or {}
    if cache:
        out += ["", _cache_table(cache, names)]
    return "\n".join(out)


#: what the columns of `sluice stats` count (printed under its table)
STATS_LEGEND = [
    "DEV: the principal's own requests to the device and their bytes; reads the cache "
    "served are",
    "  its HITS in the CACHE table. p50-p99: their latency since mount, queue + service "
    "(device",
    "  flushes, real fsyncs of the host, included: they take time even on profile none).",
    "SPACE+, INODES+: what it holds with everything below it (root's: the volume's)."]


def _watch_table(st: dict, prev: dict | None, dt: float, interval: float) -> str:
    """What `stats --watch` shows: the volume lines, then per principal the rates over
    the last interval (IOPS, MB/s) beside its latency percentiles since mount, the
    requests it has waiting in the scheduler and its cache frames and hits."""
    from .metrics import cache_hits, io_rows
    lines = _stats_text(st).split("\n")[:4]
    over = f"rates over the last {dt:.1f} s" if prev is not None else "rates from the next one on"
    lines += [f"every {interval:g} s, {time.strftime('%H:%M:%S')}; {over}, "
              "latency (queue + service) since mount",
              "IOPS, READ and WRITE MB/s: requests to the device; HITS: block reads the "
              "cache served, since mount", "",
              f"{'PRINCIPAL':16} {'IOPS':>8} {'READ MB/s':>10} {'WRITE MB/s':>10} "
              f"{'p50 ms':>8} {'p99 ms':>8} {'WAITING':>8} {'FRAMES':>7} {'HITS':>9}"]
    now, before = io_rows(st), io_rows(prev) if prev is not None else {}
    hits = cache_hits(st)
    resident = st["pager"].get("resident", {})
    for r in st["principals"]:
        n = r["name"]
        s, b = now.get(n), before.get(n)
        if s is not None and prev is not None and dt > 0:
            ops0, rb0, wb0 = (b.ops, b.read_bytes, b.write_bytes) if b else (0, 0, 0)
            rates = (f"{(s.ops - ops0) / dt:>8.0f} {(s.read_bytes - rb0) / dt / 1e6:>10.2f} "
                     f"{(s.write_bytes - wb0) / dt / 1e6:>10.2f}")
        else:
            rates = f"{'-':>8} {'-':>10} {'-':>10}"
        if s is not None and s.ops:
            lat = f"{s.p50_s * 1e3:>8.3f} {s.p99_s * 1e3:>8.3f}"
        else:
            lat = f"{'-':>8} {'-':>8}"
        waiting = s.waiting if s is not None and s.waiting is not None else "-"
        h = hits.get(n, (None, None))[0]
        lines.append(f"{n[:16]:16} {rates} {lat} {waiting:>8} {resident.get(n, 0):>7} "
                     f"{h if h is not None else '-':>9}")
    return "\n".join(lines)


#: ANSI: clear the screen, cursor home, clear to the end of the line / of the screen,
#: hide and show the cursor
_CLEAR, _HOME, _EOL, _EOS, _HIDE, _SHOW = ("\x1b[2J", "\x1b[H", "\x1b[K", "\x1b[J",
                                           "\x1b[?25l", "\x1b[?25h")


def _watch_stats(args: argparse.Namespace) -> int:
    """Redraw the per-principal table in place every --watch seconds on a terminal; into
    a pipe or a file, print one table per interval with no escape codes."""
    tty = sys.stdout.isatty()
    prev: dict | None = None
    prev_t = 0.0
    if tty:
        sys.stdout.write(_HIDE + _CLEAR)
    try:
        while True:
            st = _fetch_stats(args.mountpoint)
            t = time.monotonic()
            table = _watch_table(st, prev, t - prev_t, args.watch)
            prev, prev_t = st, t
            if tty:
                sys.stdout.write(_HOME + "".join(line + _EOL + "\n"
                                                 for line in table.split("\n")) + _EOS)
                sys.stdout.flush()
            else:
                print(table + "\n", flush=True)
            time.sleep(max(0.0, args.watch - (time.monotonic() - t)))
    finally:
        if tty:
            sys.stdout.write(_SHOW)
            sys.stdout.flush()


def _cache_table(cache: dict, order: list[str]) -> str:
    """The pager's account per principal (frames held against min/max; hits, misses,
    evictions, discards, dirty frames, write-back, reclaim requests sent/answered/missed)."""
    lines = [f"{'CACHE':16} {'FRAMES':>7} {'MIN':>6} {'MAX':>6} {'HITS':>9} {'MISSES':>9}"
             f" {'HIT%':>6} {'EVICTED':>8} {'DISCARD':>8} {'DIRTY':>6} {'WB MB':>8}"
             f" {'RECLAIM s/a/m':>14}"]
    for n in [n for n in order if n in cache] + sorted(set(cache) - set(order)):
        c = cache[n]
        looked = c["hits"] + c["misses"]
        ratio = f"{100 * c['hits'] / looked:.1f}" if looked else "-"
        mx = "-" if c["max"] is None else c["max"]
        rec = f"{c['reclaim_sent']}/{c['reclaim_answered']}/{c['reclaim_missed']}"
        lines.append(f"{n:16} {c['frames']:>7} {c['min']:>6} {mx:>6} {c['hits']:>9}"
                     f" {c['misses']:>9} {ratio:>6} {c['evictions']:>8} {c['discarded']:>8}"
                     f" {c['dirty']:>6} {c['writeback_bytes'] / 1e6:>8.1f} {rec:>14}")
    return "\n".join(lines)


# -- pager hints and traces -----------------------------------------------------------------

HINT_XATTRS = {"priority": "user.sluice.priority", "discardable": "user.sluice.discardable",
               "cache": "user.sluice.cache"}
#: the range `user.sluice.priority` takes
PRIORITY_RANGE = (PRIORITY_MIN, PRIORITY_MAX)


def _sluice_mount_of(path: str) -> str | None:
    """The mount point of the sluice volume `path` is on, or None."""
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for fields in table_rows(MOUNTS):
        _src, mnt, fstype = fields[:3]
        mnt = unescape(mnt)
        if real == mnt or real.startswith(mnt.rstrip("/") + "/"):
            if best is None or len(mnt) > len(best[0]):
                best = (mnt, fstype)
    return best[0] if best is not None and best[1] == "fuse.sluice" else None


def _hint_targets(root: str, recursive: bool, failed: list[str]):
    """(shown, path) for `root` (a symbolic link given by name stands for its target, as
    for setfattr) and, with `recursive`, every directory and regular file below it on
    the same filesystem: `shown` to print, `path` to hand to the xattr calls (with
    follow_symlinks=False). Symbolic links below are neither followed nor hinted (Linux
    keeps user.* xattrs off them).

    The tree may be changed by others while it is walked (root hinting a shared
    directory): a name checked as a directory may be a symbolic link to anywhere by
    the time it is used. So the walk holds each directory open (os.fwalk, which
    descends only into what it opened and lstat'ed as the same directory) and names an
    entry through that descriptor, `/proc/self/fd/N/NAME`: no path is resolved again
    from the top, and a name swapped for a link meanwhile is the link itself, which
    takes no user.* xattr. Mounts inside the tree (another filesystem) are left out.
    Entries that vanish or cannot be read are appended to `failed` as messages."""
    if os.path.islink(root):
        root = os.path.realpath(root)
    yield root, root
    if not recursive or not os.path.isdir(root):
        return
    dev = os.stat(root).st_dev

    def onerror(exc: OSError) -> None:
        failed.append(f"{exc.filename or root}: {exc.strerror or exc}")

    for dirpath, dirnames, filenames, dirfd in os.fwalk(root, onerror=onerror):
        keep = []
        for name in sorted(dirnames + filenames):
            shown = os.path.join(dirpath, name)
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except OSError as exc:
                failed.append(f"{shown}: {exc.strerror or exc}")
                continue
            if st.st_dev != dev or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                continue
            if stat.S_ISDIR(st.st_mode):
                keep.append(name)
            yield shown, f"/proc/self/fd/{dirfd}/{name}"
        dirnames[:] = [d for d in dirnames if d in keep]  # not into other filesystems


def cmd_hint(args: argparse.Namespace) -> int:
    changes: list[tuple[str, bytes | None]] = []  # (None: the hint removed)
    if args.clear:
        changes += [(x, None) for x in HINT_XATTRS.values()]
    if args.priority is not None:
        changes.append((HINT_XATTRS["priority"], str(args.priority).encode()))
    if args.discardable is not None:
        changes.append((HINT_XATTRS["discardable"], b"1" if args.discardable else b"0"))
    if args.cache is not None:
        changes.append((HINT_XATTRS["cache"], args.cache.encode()))
    for path in args.path:
        if not os.path.lexists(path):
            raise CliError(f"{path}: no such file or directory")
        if _sluice_mount_of(path) is None:
            raise CliError(f"{path} is not on a mounted sluice volume")
    done = failed = 0
    walk_errors: list[str] = []
    for root in args.path:
        for shown, path in _hint_targets(root, args.recursive, walk_errors):
            try:
                if changes:
                    for name, value in changes:
                        if value is not None:
                            os.setxattr(path, name, value, follow_symlinks=False)
                            continue
                        try:
                            os.removexattr(path, name, follow_symlinks=False)
                        except OSError as exc:
                            if exc.errno != errno.ENODATA:  # (not set: nothing to do)
                                raise
                else:
                    print(f"{shown}: " + " ".join(
                        f"{k}={_get_hint(path, x)}" for k, x in HINT_XATTRS.items()))
                done += 1
            except OSError as exc:
                failed += 1
                why = exc.strerror or str(exc)
                if exc.errno in (errno.EPERM, errno.EACCES):
                    # (probe 27, F8: a directory's rule is not a file's)
                    why += (" (a directory's hints are set by its owner or root)"
                            if os.path.isdir(path) else
                            " (hints are set by whoever may write the file)")
                print(f"sluice hint: {shown}: {why}", file=sys.stderr)
            for line in walk_errors:  # entries the walk could not look at
                failed += 1
                print(f"sluice hint: {line}", file=sys.stderr)
            walk_errors.clear()
        for line in walk_errors:
            failed += 1
            print(f"sluice hint: {line}", file=sys.stderr)
        walk_errors.clear()
    if changes and not args.quiet:
        what = ", ".join(f"{n.removeprefix('user.sluice.')}={v.decode()}" for n, v in changes
                         if v is not None)
        if args.clear:
            what = "cleared the hints" + (f", then set {what}" if what else "")
        else:
            what = f"set {what}"
        print(f"{what} on {_plural(done, 'file or directory', 'files and directories')}"
              + (f"; {failed} failed" if failed else ""))
    return EXIT_ERROR if failed else 0


def _get_hint(path: str, name: str) -> str:
    try:
        return os.getxattr(path, name, follow_symlinks=False).decode(errors="replace")
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return "-"
        raise


def _open_trace_out(path: str) -> int:
    """Open OUT of `trace record` for writing, 0600 whatever the umask (the trace names
    every principal's files and accesses). Root often names a file in a shared
    directory (/tmp), where another user may have put a symbolic or hard link to a
    file of root's first: on a host without fs.protected_symlinks/protected_hardlinks
    the trace then replaced that file. So OUT must be a regular file of the caller's,
    with no other name, and not a symbolic link; it is emptied only once checked. A
    bad OUT fails here, before tracing."""
    try:
        if os.path.islink(path):  # (for the message: O_NOFOLLOW is the guard)
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK |
                     os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CliError(f"{path} is a symbolic link: give the file itself") from None
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CliError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise CliError(f"{path} belongs to uid {st.st_uid}, not to you: "
                           "remove it or name another file")
        if st.st_nlink != 1:
            raise CliError(f"{path} has other names (hard links): remove it or name "
                           "another file")
        os.set_blocking(fd, True)
        os.ftruncate(fd, 0)
        os.fchmod(fd, 0o600)  # (an existing file keeps its mode otherwise)
    except OSError as exc:
        os.close(fd)
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def cmd_notice(args: argparse.Namespace) -> int:
    """`sluice notice MOUNTPOINT TEXT [--principal NAME]`."""
    if _sluice_mount_of(args.mountpoint) is None:
        raise CliError(_not_mounted(args.mountpoint))
    with _control(args.mountpoint) as c:
        n = c.notice(args.text, args.principal)
    print(f"sent to {n} connection{'' if n == 1 else 's'}", file=sys.stderr)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """`sluice trace record MOUNTPOINT OUT [--duration S]`."""
    if _sluice_mount_of(args.mountpoint) is None:
        raise CliError(_not_mounted(args.mountpoint))
    created = not os.path.lexists(args.out)
    out = _open_trace_out(args.out)
    written = False
    _ctrl_c_stops()
    try:
        with _control(args.mountpoint) as c:
            c.start_trace()
            until = f"for {args.duration:g} s" if args.duration else "until Ctrl-C"
            try:  # (the line inside: a Ctrl-C right after it is a stop, not an error)
                print(f"recording the pager trace of {args.mountpoint} {until}",
                      file=sys.stderr, flush=True)
                if args.duration:
                    time.sleep(args.duration)
                else:
                    while True:
                        time.sleep(3600)
            except KeyboardInterrupt:
                pass
            reply, fd = c.stop_trace()
        try:
            while os.sendfile(out, fd, None, 1 << 24) > 0:
                pass
            written = True
        finally:
            os.close(fd)
    finally:
        os.close(out)
        if not written and created:
            os.unlink(args.out)  # no trace: leave nothing that looks like one
    print(f"wrote {reply['bytes']} bytes of pager trace to {args.out}"
          + (" (cut short at the daemon's limit)" if reply.get("truncated") else ""),
          file=sys.stderr)
    return 0


# -- argument parsing ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sluice", description="sluice: a user-space storage laboratory. Make a volume, "
        "mount it with FUSE, run programs on it as principals, measure what happens.")
    p.add_argument("--debug", action="store_true",
                   help="verbose logging (before the command: sluice --debug mount ...)")
    p.add_argument("--version", action="version", version=f"sluice {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("mkfs", help="make a new volume")
    s.add_argument("volume", help="volume directory (created if missing; its parent must exist)")
    s.add_argument("--size", default="8G", type=_size,
                   help="device size, e.g. 512M, 8G (K, M, G binary; KB, MB, GB decimal; "
                        "default 8G, sparse)")
    s.add_argument("--block-size", default="4096", type=_block_size_arg,
                   help="block size in bytes, a power of two from 512 to 1M (default 4096)")
    s.add_argument("--profile", default="none", type=_profile_arg,
                   help="timing profile: none, nvme, ssd, hdd, or custom "
                        "latency_us,MBps,seek_ms,depth[,write_us[,write_cache_MiB]] "
                        "(also lat=,bw=,seek=,qd=,wlat=,wcache=,antic=)")
    s.add_argument("--inodes", type=_positive_int, default=None, help="maximum number of inodes")
    s.add_argument("--device", default=None, help="use this block device instead of a sparse file")
    s.add_argument("--force", action="store_true", help="overwrite an existing volume")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_mkfs)

    s = sub.add_parser("mount", help="mount a volume (returns once the mount is live)")
    s.add_argument("volume", help="the volume directory (sluice mkfs made it)")
    s.add_argument("mountpoint", help="an existing directory to mount it on")
    s.add_argument("-f", "--foreground", action="store_true", help="do not detach")
    s.add_argument("--cache-size", default="64M", type=_size,
                   help=f"pager cache size (default 64M; at least {MIN_CACHE_FRAMES} blocks, "
                        f"64K with 4 KiB blocks)")
    s.add_argument("--profile", default=None, type=_profile_arg,
                   help="override the volume's timing profile (as mkfs --profile)")
    s.add_argument("--scheduler", default="mclock", choices=["mclock", "fifo"],
                   help="the device's I/O scheduler: mclock (per-principal reservation, "
                        "weight and limit; default) or fifo (one global order, the baseline)")
    s.add_argument("--cache-mode", default="direct", choices=["pager", "direct", "kernel"],
                   help="default cache mode for files (pager, also called direct: every "
                        "I/O reaches the pager; kernel: the kernel's page cache)")
    s.add_argument("--pager", default="hinted", choices=list(PAGER_POLICIES),
                   help="pager policy: hinted (default: per-principal banks and "
                        "application hints), principal (banks, no hints), global-lru "
                        "(one global CLOCK, principals ignored: the baseline)")
    s.add_argument("--writeback", action=argparse.BooleanOptionalAction,
                   default=WRITEBACK_DEFAULT,
                   help="cache writes in the pager and write them back later, before the "
                        "metadata commit that exposes them (data=ordered; fsync = commit). "
                        f"Default: {'on' if WRITEBACK_DEFAULT else 'off'} (also -o writeback, "
                        "-o nowriteback)")
    s.add_argument("--idle-poll", default=f"{IDLE_POLL_DEFAULT * 1e6:g}", metavar="USEC",
                   type=_idle_poll_arg,
                   help="after serving requests, poll up to USEC microseconds for the next "
                        "one before the daemon sleeps: saves the wake-up of an idle CPU per "
                        "request, backs off by itself when polls miss (0: off; default "
                        f"{IDLE_POLL_DEFAULT * 1e6:g}; also -o idle_poll=USEC)")
    s.add_argument("--fix-permissions", action="store_true",
                   help="make the volume private (chmod -R go-rwx) instead of refusing it")
    s.add_argument("-r", "--read-only", action="store_true",
                   help="mount read-only: every change gets EROFS, nothing is written "
                        "(also -o ro)")
    s.add_argument("--metrics", default=None, metavar="ADDRESS:PORT",
                   help="serve every principal's I/O and cache figures in the Prometheus "
                        "text format at http://ADDRESS:PORT/metrics (off by default; "
                        "e.g. 127.0.0.1:9464)")
    s.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="mount options, as with mount(8): ro, rw, noatime, relatime "
                        "(default), strictatime, nodiratime, noexec; suid, dev (root only; "
                        "default nosuid,nodev); and sluice's own, as in fstab: "
                        "cache_size=, profile=, cache_mode=, scheduler=, pager=, metrics=, "
                        "idle_poll=, writeback, nowriteback, fix_permissions")
    s.add_argument("--nice", type=_nice, default=DAEMON_NICE, metavar="N",
                   help="the daemon's CPU priority, -20..19, or 'keep' (default "
                        f"{DAEMON_NICE}: ahead of the tenants' own processes, for which "
                        "alone it works; a daemon not run by root keeps its niceness)")
    s.add_argument("--debug-fuse", action="store_true", help=argparse.SUPPRESS)
    # how the refusal names the fix (mount(8)'s helper says "-o fix_permissions")
    s.add_argument("--fix-hint", default="--fix-permissions", help=argparse.SUPPRESS)
    s.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("remount", help="change the mount options of a mounted volume "
                       "(the same as mount -o remount,OPTIONS)")
    s.add_argument("mountpoint")
    s.add_argument("-o", dest="options", action="append", required=True, metavar="OPTIONS",
                   help="ro, rw, noatime, relatime, strictatime, nodiratime, diratime, "
                        "noexec, exec, suid, dev, nosuid, nodev")
    s.add_argument("-q", "--quiet", action="store_true")
    # mount.fuse.sluice: the options are all of the mount's (mount(8) merged them)
    s.add_argument("--complete", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_remount)

    s = sub.add_parser("umount", help="flush and unmount, wait for the daemon to exit")
    s.add_argument("mountpoint")
    s.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the daemon to exit after the unmount "
                        "(default 60)")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("principal", help="manage principals and their banks (mounted volume)")
    psub = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    for act, hlp in (("add", "add a principal"), ("set", "change a principal's banks")):
        a = psub.add_parser(act, help=hlp)
        a.add_argument("mountpoint")
        a.add_argument("name", type=_principal_name if act == "add" else str)
        if act == "add":
            a.add_argument("--parent", default=None,
                           help="parent principal (default root; for a user who may not "
                                "add principals under root, its own uid-N)")
            a.add_argument("--owner", type=_owner_arg, default=None, metavar="UID",
                           help="user (uid or name) that owns it (may run as it and manage "
                                "it; default: you)")
        a.add_argument("--space", type=_limit_size,
                       help="storage bank: bytes of data and entries, e.g. 10G; `none`: "
                            "no limit of its own (its ancestors' only)")
        a.add_argument("--inodes", type=_limit_count, help="storage bank: inodes (or none)")
        a.add_argument("--cache-min", type=_bank_size, help="guaranteed cache, e.g. 64M")
        a.add_argument("--cache-max", type=_limit_size,
                       help="cache ceiling, e.g. 256M; 0: no cache; none: its ancestors'")
        a.add_argument("--io-reserve", action="append", type=_rate, metavar="RATE",
                       help="reserved I/O rate: 20MB/s, 500iops, or both (give the flag "
                            "twice, or 500iops,20MB/s); `none` removes it")
        a.add_argument("--io-weight", type=_io_weight_arg,
                       help="share of spare I/O, a whole number of at least 1 (default 100)")
        a.add_argument("--io-limit", action="append", type=_rate, metavar="RATE",
                       help="I/O ceiling: 100MB/s, 2000iops, or both (the tighter wins; "
                            "twice, or 2000iops,100MB/s); `none` removes it")
        a.add_argument("--grants", type=_limit_count,
                       help="open grants it may hold (kernel objects; default 4096)")
        a.add_argument("--caps", type=_limit_count, help="capability slots it may hold (default 4096)")
        a.add_argument("--connections", type=_limit_count,
                       help="control-socket connections it may hold open (default 64)")
        a.add_argument("--shm", type=_limit_size, help="shared memory its direct clients may "
                                                 "attach, e.g. 256M (default 256M)")
        a.add_argument("--children", type=_limit_count,
                       help="principals it may create below it, at any depth (default 256)")
        a.add_argument("--parked", type=_limit_count,
                       help="FUSE requests it may have waiting for admission; one more "
                            "gets EAGAIN (default 4096)")
        a.add_argument("--parked-bytes", type=_limit_size,
                       help="bytes those waiting requests may hold, 4 KiB each plus their "
                            "data, e.g. 64M (default 64M)")
        a.add_argument("--costly-rate", type=_limit_count,
                       help="costly control-socket operations (stats, principal ls, "
                            "principal changes, sluice run) a second, after a burst of 32; "
                            "beyond, they wait (default 50)")
    a = psub.add_parser("ls", help="list principals with use against each bank")
    a.add_argument("mountpoint")
    a.add_argument("--json", action="store_true")
    a = psub.add_parser("show", help="one principal's banks and use, one a line")
    a.add_argument("mountpoint")
    a.add_argument("name")
    a.add_argument("--json", action="store_true")
    a = psub.add_parser("rm", help="remove a principal")
    a.add_argument("mountpoint")
    a.add_argument("name")
    a.add_argument("--move-to", default=None,
                   help="principal that takes over its storage (required if it owns any)")
    s.set_defaults(func=cmd_principal)

    s = sub.add_parser("run", help="run a program whose file operations are charged to a principal")
    s.add_argument("mountpoint")
    s.add_argument("--principal", required=True, metavar="NAME",
                   help="the principal the program acts for (you must own it or an "
                        "ancestor of it)")
    s.add_argument("command", nargs="*", help="-- CMD ARGS...: the program, after --")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("stats", help="per-principal I/O, cache and quota use")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--watch", type=_interval, default=0, metavar="SECONDS",
                   help="redraw a live per-principal table (IOPS, MB/s, latency, waiting "
                        "requests, cache) every SECONDS; into a pipe, print one per "
                        "interval (with --json: one JSON document per interval)")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("hint", help="set pager hints on files and directories (what is "
                       "created in a directory inherits its hints)")
    s.add_argument("path", nargs="+", help="files or directories on a mounted volume")
    s.add_argument("--priority", type=_priority_arg, default=None, metavar="N",
                   help=f"keep these pages longer (higher) or shorter (lower) than the "
                        f"same principal's others; {PRIORITY_RANGE[0]} to "
                        f"{PRIORITY_RANGE[1]}, 0 is normal")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--discardable", action="store_true", default=None,
                   help="a cache: under pressure its pages are dropped without write-back "
                        "(a file that loses dirty pages is emptied as a whole)")
    g.add_argument("--no-discardable", dest="discardable", action="store_false", default=None,
                   help="ordinary data again")
    s.add_argument("--cache", choices=["pager", "kernel", "direct"], default=None,
                   help="pager (every I/O reaches the pager; direct is its older name) or "
                        "kernel (all I/O through the kernel's page cache: the pager sees "
                        "only its misses); takes effect at the next open")
    s.add_argument("--clear", action="store_true",
                   help="remove the hints first (priority, discardable, cache: the "
                        "defaults again; new files no longer inherit them)")
    s.add_argument("-R", "--recursive", action="store_true",
                   help="also every file and directory below")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_hint)

    s = sub.add_parser("trace", help="record the pager's block accesses (for "
                       "pager/replay.py and scripts/bench_pager.py)")
    tsub = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = tsub.add_parser("record", help="record until Ctrl-C or --duration (root or the "
                        "volume's owner)")
    a.add_argument("mountpoint")
    a.add_argument("out", help="file to write the trace to")
    a.add_argument("--duration", type=_interval, default=0, metavar="SECONDS",
                   help="stop after SECONDS (default: at Ctrl-C)")
    s.set_defaults(func=cmd_trace)

    s = sub.add_parser("notice", help="send a line of text to the direct clients "
                       "subscribed to notices (root or the volume's owner)")
    s.add_argument("mountpoint")
    s.add_argument("text", help=f"at most {NOTICE_CHARS} characters")
    s.add_argument("--principal", metavar="NAME",
                   help="only to the clients connected as this principal")
    s.set_defaults(func=cmd_notice)

    s = sub.add_parser("fsck", help="check an unmounted or read-only mounted volume "
                       "(and repair an unmounted one)")
    s.add_argument("volume")
    s.add_argument("--repair", action="store_true", help="fix what can be fixed")
    s.add_argument("--verify-data", action="store_true",
                   help="also read every owned block and verify its checksum")
    s.add_argument("--fix-permissions", action="store_true",
                   help="make the volume private (chmod -R go-rwx) instead of refusing it")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_fsck, fix_hint="--fix-permissions")
    return p


def main(argv: list[str] | None = None) -> int:
    """`sluice ...`; output into a pipe whose reader went away (`sluice --help | head
    -1`, `sluice principal ls MNT | head -0`) ends quietly, as command-line tools do."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # (here, not at exit, where a failure is a traceback)
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "run" in argv and "--" in argv and argv.index("run") < argv.index("--"):
        # Everything after `--` is the program and its arguments, options included.
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # What errors are prefixed with: the command, and its action in a family of them
    # (`sluice principal set: ...`, as argparse says a usage error of that action)
    name = f"{args.cmd} {args.action}" if getattr(args, "action", None) else args.cmd
    if extra:
        if args.cmd == "run":
            print(f"sluice run: put the program after --: sluice run {args.mountpoint} "
                  f"--principal {args.principal} -- {' '.join(args.command + extra)}",
                  file=sys.stderr)
        else:
            print(f"sluice {name}: unrecognized arguments: {' '.join(extra)} "
                  f"(see sluice {name} --help)", file=sys.stderr)
        return EXIT_USAGE
    if command is not None:
        args.command = command
    if args.cmd != "mount" or not args.foreground:
        _setup_logging(args.debug, cmd=name)
    missing: ImportError | None = None
    try:
        from .mount import MountOptionError
    except ImportError as exc:
        # The FUSE binding does not load (.build/libfuse removed or being rebuilt):
        # what needs no mount still runs; the rest says so in one line (probe 19, F16).
        missing = exc

        class MountOptionError(Exception):  # type: ignore[no-redef]
            """(never raised without the binding)"""
    try:
        return args.func(args)
    except ImportError as exc:
        print(f"sluice {name}: cannot load {exc.name or 'the FUSE binding'} "
              f"({missing or exc}): run scripts/setup.sh", file=sys.stderr)
        return EXIT_ERROR
    except (MountOptionError, UsageError) as exc:
        print(f"sluice {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CliError, VolumeError, SluiceError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _quiet_broken_pipe()
        if getattr(args, "ready_fd", None) is not None and logging.getLogger().handlers:
            # The daemon of a `sluice mount`: its stderr is the volume's log, and the
            # parent says the error to the user; one line in the log's own format
            # (probe 27, F11: a bare line among the timestamped ones)
            log.error("%s", _message(exc))
        else:
            print(f"sluice {name}: {_message(exc)}", file=sys.stderr)
        return EXIT_FSCK_OPERATIONAL if args.cmd == "fsck" else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _quiet_broken_pipe() -> int:
    # The reader went away (`sluice stats --watch 1 | head -3`): stop quietly, and
    # keep Python from complaining again when it flushes stdout at exit.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def mount_helper_main(argv: list[str] | None = None) -> int:
    """`mount -t fuse.sluice VOLUME MOUNTPOINT -o opts` (and fstab) call this as
    mount.fuse.sluice VOLUME MOUNTPOINT [-o opt,opt=val] [-n] [-s] [-v]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o" and i + 1 < len(argv):
            options += argv[i + 1].split(",")
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options += a[2:].split(",")
        elif a.startswith("-"):
            pass  # -n (no mtab), -s (sloppy), -v (verbose), -f (fake)
        else:
            positional.append(a)
        i += 1
    if len(positional) != 2:
        print("usage: mount.fuse.sluice VOLUME MOUNTPOINT [-o options]", file=sys.stderr)
        return EXIT_USAGE
    from .mount import MountOptionError, parse_mount_options
    try:
        parsed = parse_mount_options(options)
    except MountOptionError as exc:
        print(f"mount.fuse.sluice: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if parsed.remount:
        # mount(8) hands `-o remount,...` to the helper with the mount's current
        # options before the new ones (mount -o remount,ro MOUNTPOINT).
        return main(["remount", positional[1], "-q", "--complete", "-o", ",".join(options)])
    cli = ["mount", positional[0], positional[1], "--fix-hint=-o fix_permissions",
           "-o", parsed.flags.text()]
    for key, val in parsed.settings.items():
        if key == "debug":
            cli.insert(0, "--debug")
        elif key == "nowriteback":
            cli.append("--no-writeback")
        elif val is None:
            # fix_permissions is explicit, like the command's flag: an fstab line asks
            # for it by name.
            cli.append(f"--{key.replace('_', '-')}")
        else:
            cli += [f"--{key.replace('_', '-')}", val]
    return main(cli)


if __name__ == "__main__":
    sys.exit(main())
