"""Volumes: a directory holding a block device, its checksums and the metadata database.

Layout (see DESIGN.md "Volume"):
    volume.json   format header: format version, uuid, creation time
    device.json, device.img, checksums   the simulated block device (blockdev)
    meta.db       the metadata database (SQLite, WAL)
    lock          held (flock) by the daemon that has the volume mounted
    mount.json    pid and mount point of that daemon, while it runs
    sluice.log    the daemon's log when it runs in the background
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import time
import uuid as uuidlib
from pathlib import Path

from kernelshim import PROFILES, BlockDevice, FormatError

from .errors import VolumeError
from .metadata import Metadata

FORMAT_VERSION = 1
HEADER = "volume.json"
DB = "meta.db"
LOCK = "lock"
MOUNT_STATE = "mount.json"
LOG = "sluice.log"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4096', '512K', '1.5G', '10GiB', '64MB' -> bytes (binary multiples)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise VolumeError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix")
    num, unit, _ = m.groups()
    mult = 1024 ** "bkmgtpe".index(unit.lower() or "b")
    value = int(float(num) * mult)
    if value <= 0:
        raise VolumeError(f"bad size {text!r}: must be positive")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class VolumeInfo:
    path: Path
    uuid: str
    created_ns: int


def is_volume(path: Path) -> bool:
    return (path / HEADER).is_file()


def read_header(path: Path) -> VolumeInfo:
    if not path.exists():
        raise VolumeError(f"{path}: no such volume (make one with 'sluice mkfs {path}')")
    if not is_volume(path):
        raise VolumeError(f"{path} is not a sluice volume ({HEADER} missing)")
    try:
        h = json.loads((path / HEADER).read_text())
    except (OSError, ValueError) as exc:
        raise VolumeError(f"{path}: unreadable volume header: {exc}") from None
    if h.get("format") != FORMAT_VERSION:
        raise VolumeError(f"{path}: unsupported volume format {h.get('format')!r}")
    return VolumeInfo(path, h["uuid"], h["created_ns"])


def mkfs(path: Path, *, size: int, block_size: int = 4096, profile: str = "none",
         inodes: int | None = None, device: str | None = None, force: bool = False) -> VolumeInfo:
    """Make a new, empty volume in directory `path` (created if missing)."""
    if profile not in PROFILES and profile.count(",") != 3:
        raise VolumeError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})")
    path.mkdir(parents=True, exist_ok=True)
    if is_volume(path) and not force:
        raise VolumeError(f"{path} already holds a sluice volume (use --force to overwrite)")
    # (a lone lock file is what an earlier mkfs that failed, e.g. on a bad size, leaves)
    if not force and not is_volume(path) and any(p.name != LOCK for p in path.iterdir()):
        raise VolumeError(f"{path} is not empty and not a sluice volume")
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
        tmp = path / (HEADER + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, "uuid": vid, "created_ns": now},
                                  indent=2) + "\n")
        os.replace(tmp, path / HEADER)
    return VolumeInfo(path, vid, now)


class VolumeLock:
    """An exclusive flock on the volume's lock file: one daemon (or mkfs, or fsck) at a
    time. The kernel drops it when the holder dies, even by SIGKILL."""

    def __init__(self, path: Path, *, purpose: str = "mount") -> None:
        self.path = path
        self.purpose = purpose
        self._fd: int | None = None

    def __enter__(self) -> VolumeLock:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            state = read_mount_state(self.path)
            where = f" at {state['mountpoint']} (daemon pid {state['pid']})" if state else ""
            raise VolumeError(f"volume {self.path} is in use{where}") from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_mount_state(path: Path) -> dict | None:
    try:
        return json.loads((path / MOUNT_STATE).read_text())
    except (OSError, ValueError):
        return None


def write_mount_state(path: Path, *, mountpoint: str, pid: int) -> None:
    tmp = path / (MOUNT_STATE + ".tmp")
    tmp.write_text(json.dumps({"mountpoint": mountpoint, "pid": pid}) + "\n")
    os.replace(tmp, path / MOUNT_STATE)


def clear_mount_state(path: Path) -> None:
    try:
        (path / MOUNT_STATE).unlink()
    except FileNotFoundError:
        pass
