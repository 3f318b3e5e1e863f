"""The `sluice` command: mkfs, mount, umount, fsck (and the mount.fuse.sluice helper).

User mistakes print one line on stderr and exit with a documented code, no traceback:
    0  success
    1  error at run time (missing volume, busy mount point, refused, daemon lost, ...)
    2  usage error: a bad argument (unknown option or -o option, malformed number)
    4  fsck found errors it did not repair
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from kernelshim import SluiceError

from . import volume as vol
from .errors import VolumeError

log = logging.getLogger("sluice")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FSCK_UNCORRECTED = 4


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2), not usage text too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _setup_logging(debug: bool, *, daemon: bool = False) -> None:
    """Commands log warnings to stderr; the daemon (`mount --foreground`, and the
    detached daemon, whose stderr is the volume's sluice.log) logs what it does."""
    level = logging.DEBUG if debug else logging.INFO if daemon else logging.WARNING
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _message(exc: BaseException) -> str:
    """An exception as a user reads it: 'No such file or directory: /x', not
    '[Errno 2] No such file or directory: ...'."""
    if isinstance(exc, OSError) and exc.strerror:
        return vol.os_error_text(exc)
    # (a message that quotes an OSError: the daemon's, a lost connection's)
    return re.sub(r"\[Errno \d+\] ", "", str(exc))


# -- mkfs ---------------------------------------------------------------------------------

def cmd_mkfs(args: argparse.Namespace) -> int:
    size = vol.parse_size(args.size)
    bs = vol.parse_size(args.block_size)
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
                    vol.parse_size(str(val))
                except VolumeError as exc:
                    raise MountOptionError(str(exc)) from None
            if key == "cache_mode" and val not in ("direct", "kernel"):
                raise MountOptionError(f"cache_mode={val}: direct or kernel")
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
    return MountOptions(cache_bytes=vol.parse_size(args.cache_size), profile=args.profile,
                        cache_mode=args.cache_mode, debug_fuse=args.debug_fuse,
                        read_only=flags.read_only, atime=flags.atime,
                        nodiratime=flags.nodiratime, suid=not flags.nosuid,
                        dev=not flags.nodev, noexec=flags.noexec)


def _check_private(volume: Path, args: argparse.Namespace) -> None:
    """Refuse a volume other users can read or write, or fix it when asked to."""
    fixed = vol.check_private(volume, fix=args.fix_permissions, option=args.fix_hint)
    if fixed:
        log.warning("made %d files of %s private (go-rwx)", len(fixed), volume)


def cmd_mount(args: argparse.Namespace) -> int:
    opts = _mount_options(args)  # arguments first: a bad -o is a usage error
    volume = Path(args.volume).resolve()
    vol.read_header(volume)
    _check_private(volume, args)
    mp = os.path.abspath(args.mountpoint)
    state = vol.read_mount_state(volume)
    if state:
        from .mount import clean_dead_mount
        with vol.VolumeLock(volume):  # raises "in use" if a daemon is alive
            clean_dead_mount(volume)
    _check_mountpoint(mp)
    if args.foreground:
        return _run_foreground(volume, mp, opts, args)
    return _run_background(volume, mp, args, opts)


def _run_foreground(volume: Path, mp: str, opts, args: argparse.Namespace) -> int:
    import trio

    from .mount import serve
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
            fd = os.open(volume / vol.LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                         | os.O_CLOEXEC | os.O_NOFOLLOW, vol.FILE_MODE)
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
        trio.run(serve, volume, mp, opts, ready_once, reopen_log)
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
    return 0


def _run_background(volume: Path, mp: str, args: argparse.Namespace, opts) -> int:
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "fs.cli", "mount", str(volume), mp, "--foreground",
           "--ready-fd", str(w), "--cache-size", args.cache_size, "--cache-mode", args.cache_mode,
           "-o", opts.vfs_flags().text()]
    if args.profile:
        cmd += ["--profile", args.profile]
    if args.debug:
        cmd.insert(3, "--debug")  # the top-level option, before the subcommand
    logf = os.fdopen(os.open(volume / vol.LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                             | os.O_CLOEXEC | os.O_NOFOLLOW, vol.FILE_MODE), "ab")
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

def cmd_umount(args: argparse.Namespace) -> int:
    from .mount import mounted_fs
    mp = os.path.abspath(args.mountpoint)
    m = mounted_fs(mp)
    if m is None or m[1] != "fuse.sluice":
        raise CliError(f"{mp} is not a mounted sluice volume")
    volume = Path(m[0])
    state = vol.read_mount_state(volume) or {}
    pid = state.get("pid")
    r = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "fusermount3 failed"
        raise CliError(f"cannot unmount {mp}: {msg}")
    if pid:
        deadline = time.monotonic() + args.timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise CliError(f"daemon pid {pid} did not exit within {args.timeout:g} s")
            time.sleep(0.05)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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
        raise CliError(str(exc)) from None


def _bank_args(args: argparse.Namespace) -> dict:
    from kernelshim.principals import Rate
    out: dict = {}
    for k in ("space", "cache_min", "cache_max", "shm"):
        v = getattr(args, k, None)
        if v is not None:
            out[k] = vol.parse_size(v)
    for k in ("inodes", "io_weight", "grants", "caps", "connections", "children"):
        v = getattr(args, k, None)
        if v is not None:
            out[k] = v
    for k in ("io_reserve", "io_limit"):
        v = getattr(args, k, None)
        if v is not None:
            out[k] = str(Rate.parse(v))
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
        else:
            rows = c.call("principal_ls")["principals"]
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                print(_principal_table(rows))
    return 0


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _principal_table(rows: list[dict]) -> str:
    depth: dict[str, int] = {}
    lines = [f"{'PRINCIPAL':20} {'OWNER':>6} {'SPACE used/limit':>20} {'INODES used/limit':>18}"
             f" {'GRANTS':>12} {'CACHE min/max':>16} {'IO res/wt/lim':>24}"]
    for r in rows:
        d = depth[r["name"]] = depth.get(r["parent"], -1) + 1 if r["parent"] else 0
        b, u = r["banks"], r["usage"]
        name = "  " * d + r["name"]
        space = f"{_fmt_bytes(u['space'])}/{_fmt_bytes(b['space'])}"
        inodes = f"{u['inodes']}/{b['inodes'] if b['inodes'] is not None else '-'}"
        grants = f"{u['grants']}/{b['grants'] if b['grants'] is not None else '-'}"
        cache = f"{_fmt_bytes(b['cache_min'])}/{_fmt_bytes(b['cache_max'])}"
        io = f"{b['io_reserve'] or '-'}/{b['io_weight']}/{b['io_limit'] or '-'}"
        lines.append(f"{name:20} {r['owner_uid']:>6} {space:>20} {inodes:>18} {grants:>12}"
                     f" {cache:>16} {io:>24}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.command)
    if not cmd:
        raise CliError("no command given (sluice run MOUNTPOINT --principal NAME -- CMD ...)")
    with _control(args.mountpoint) as c:
        c.register(args.principal)
    # Same pid after exec: the program, and every process it starts, act for NAME.
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        raise CliError(f"cannot run {cmd[0]}: {exc.strerror}") from None
    return 0


def _size(text: str) -> str:
    """A size argument (512M, 8G): checked by argparse, so a malformed one is a usage
    error (exit 2); the text is kept (parse_size again where it is used)."""
    try:
        vol.parse_size(text)
    except VolumeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _rate(text: str) -> str:
    """An I/O rate argument (20MB/s, 500iops), checked like _size."""
    from kernelshim.principals import PrincipalError, Rate
    try:
        Rate.parse(text)
    except PrincipalError as exc:
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


def cmd_stats(args: argparse.Namespace) -> int:
    import json
    while True:
        with _control(args.mountpoint) as c:
            try:
                st = c.call("stats")
            except (OSError, EOFError) as exc:  # the daemon went away mid-request
                raise CliError(f"lost the connection to the daemon of {args.mountpoint}: "
                               f"{exc}") from None
        if args.json:
            print(json.dumps(st, indent=1), flush=True)
        else:
            print(_stats_text(st), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def _stats_text(st: dict) -> str:
    f, d, p = st["fs"], st["device"], st["pager"]
    out = [f"volume: {f['blocks'] - f['blocks_free']}/{f['blocks']} blocks used "
           f"({f['block_size']} B), {f['inodes']}/{f['max_inodes']} inodes, "
           f"{f['open_handles']} open files, {f['live_grants']} live grants",
           f"device: profile {d['profile']}, scheduler {d['scheduler']}, "
           f"{d['checksum_errors']} checksum errors",
           f"pager:  {p['frames_used']}/{p['frames']} frames, {p['hits']} hits, "
           f"{p['misses']} misses, {p['bypassed_blocks']} blocks bypassed, "
           f"{p['evictions']} evictions",
           "",
           f"{'PRINCIPAL':16} {'READS':>8} {'WRITES':>8} {'MB READ':>9} {'MB WRITTEN':>10}"
           f" {'p50 ms':>8} {'p99 ms':>8} {'FRAMES':>7} {'SPACE':>9} {'INODES':>7}"]
    usage = {r["name"]: r["usage"] for r in st["principals"]}
    names = [r["name"] for r in st["principals"]]
    io = d["per_principal"]
    for n in names:
        s = io.get(n, {})
        u = usage.get(n, {})
        out.append(f"{n:16} {s.get('reads', 0):>8} {s.get('writes', 0):>8} "
                   f"{s.get('bytes_read', 0) / 1e6:>9.1f} {s.get('bytes_written', 0) / 1e6:>10.1f} "
                   f"{s.get('p50_s', 0) * 1e3:>8.3f} {s.get('p99_s', 0) * 1e3:>8.3f} "
                   f"{p['resident'].get(n, 0):>7} {_fmt_bytes(u.get('space', 0)):>9} "
                   f"{u.get('inodes', 0):>7}")
    return "\n".join(out)


# -- argument parsing ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sluice", description="sluice: a user-space storage laboratory. Make a volume, "
        "mount it with FUSE, run programs on it as principals, measure what happens.")
    p.add_argument("--debug", action="store_true", help="verbose logging")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("mkfs", help="make a new volume")
    s.add_argument("volume", help="volume directory (created if missing)")
    s.add_argument("--size", default="8G", type=_size,
                   help="device size, e.g. 512M, 8G (default 8G, sparse)")
    s.add_argument("--block-size", default="4096", type=_size,
                   help="block size in bytes (default 4096)")
    s.add_argument("--profile", default="none",
                   help="timing profile: none, nvme, ssd, hdd, or latency_us,MBps,seek_ms,depth")
    s.add_argument("--inodes", type=int, default=None, help="maximum number of inodes")
    s.add_argument("--device", default=None, help="use this block device instead of a sparse file")
    s.add_argument("--force", action="store_true", help="overwrite an existing volume")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_mkfs)

    s = sub.add_parser("mount", help="mount a volume (returns once the mount is live)")
    s.add_argument("volume")
    s.add_argument("mountpoint")
    s.add_argument("-f", "--foreground", action="store_true", help="do not detach")
    s.add_argument("--cache-size", default="64M", type=_size, help="pager cache size (default 64M)")
    s.add_argument("--profile", default=None, help="override the volume's timing profile")
    s.add_argument("--cache-mode", default="direct", choices=["direct", "kernel"],
                   help="default cache mode for files (direct: every I/O reaches the pager)")
    s.add_argument("--fix-permissions", action="store_true",
                   help="make the volume private (chmod -R go-rwx) instead of refusing it")
    s.add_argument("-r", "--read-only", action="store_true",
                   help="mount read-only: every change gets EROFS, nothing is written "
                        "(also -o ro)")
    s.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="mount options, as with mount(8): ro, rw, noatime, relatime "
                        "(default), strictatime, nodiratime, noexec; suid, dev (root only; "
                        "default nosuid,nodev)")
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
    s.add_argument("--timeout", type=float, default=60.0)
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("principal", help="manage principals and their banks (mounted volume)")
    psub = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    for act, hlp in (("add", "add a principal"), ("set", "change a principal's banks")):
        a = psub.add_parser(act, help=hlp)
        a.add_argument("mountpoint")
        a.add_argument("name")
        if act == "add":
            a.add_argument("--parent", default="root", help="parent principal (default root)")
            a.add_argument("--owner", type=int, default=None,
                           help="uid that owns it (may run as it and manage it; default: you)")
        a.add_argument("--space", type=_size,
                       help="storage bank: bytes of data and entries, e.g. 10G")
        a.add_argument("--inodes", type=int, help="storage bank: inodes")
        a.add_argument("--cache-min", type=_size, help="guaranteed cache, e.g. 64M")
        a.add_argument("--cache-max", type=_size, help="cache ceiling, e.g. 256M")
        a.add_argument("--io-reserve", type=_rate,
                       help="reserved I/O rate, e.g. 20MB/s or 500iops")
        a.add_argument("--io-weight", type=int, help="share of spare I/O (default 100)")
        a.add_argument("--io-limit", type=_rate, help="I/O ceiling, e.g. 100MB/s or 2000iops")
        a.add_argument("--grants", type=int, help="open grants it may hold (kernel objects)")
        a.add_argument("--caps", type=int, help="capability slots it may hold")
        a.add_argument("--connections", type=int,
                       help="control-socket connections it may hold open (default 64)")
        a.add_argument("--shm", type=_size, help="shared memory its direct clients may "
                                                 "attach, e.g. 256M (default 256M)")
        a.add_argument("--children", type=int,
                       help="principals it may create below it, at any depth (default 256)")
    a = psub.add_parser("ls", help="list principals with use against each bank")
    a.add_argument("mountpoint")
    a.add_argument("--json", action="store_true")
    a = psub.add_parser("rm", help="remove a principal")
    a.add_argument("mountpoint")
    a.add_argument("name")
    a.add_argument("--move-to", default=None,
                   help="principal that takes over its storage (required if it owns any)")
    s.set_defaults(func=cmd_principal)

    s = sub.add_parser("run", help="run a program whose file operations are charged to a principal")
    s.add_argument("mountpoint")
    s.add_argument("--principal", required=True)
    s.add_argument("command", nargs="*", help="-- CMD ARGS...")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("stats", help="per-principal I/O, cache and quota use")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--watch", type=_interval, default=0, metavar="SECONDS",
                   help="print again every SECONDS")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("fsck", help="check (and repair) an unmounted volume")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "run" in argv and "--" in argv and argv.index("run") < argv.index("--"):
        # Everything after `--` is the program and its arguments, options included.
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if command is not None:
        args.command = command
    if args.cmd != "mount" or not args.foreground:
        _setup_logging(args.debug)
    from .mount import MountOptionError
    try:
        return args.func(args)
    except MountOptionError as exc:
        print(f"sluice {args.cmd}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CliError, VolumeError, SluiceError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _quiet_broken_pipe()
        print(f"sluice {args.cmd}: {_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
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
        elif val is None:
            # fix_permissions is explicit, like the command's flag: an fstab line asks
            # for it by name.
            cli.append(f"--{key.replace('_', '-')}")
        else:
            cli += [f"--{key.replace('_', '-')}", val]
    return main(cli)


if __name__ == "__main__":
    sys.exit(main())
