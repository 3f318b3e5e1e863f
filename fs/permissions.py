"""Permission checks as the kernel makes them: `check_access` (access(2) and every
direct client's open) and `in_group` (setgid inheritance, group permission bits).

Plain functions of an inode and a caller: they own no state."""

from __future__ import annotations

import os

from .errors import PermissionDenied
from .inodes import Caller, Inode


def in_group(pid: int, gid: int) -> bool:
    """Whether process `pid` has `gid` among its groups (for setgid inheritance)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return str(gid).encode() in line.split()[1:]
                if line.startswith(b"Gid:") and str(gid).encode() in line.split()[1:]:
                    return True
    except OSError:
        pass
    return False


def check_access(node: Inode, mask: int, caller: Caller) -> None:
    """Permission check as the kernel does it (used when default_permissions is off
    and by direct clients): PermissionDenied unless `caller` may `mask` `node`."""
    ino = node.id
    if mask == os.F_OK:
        return
    if caller.uid == 0:
        if mask & os.X_OK and not node.is_dir and not node.mode & 0o111:
            raise PermissionDenied(f"access {mask:#o} to inode {ino} denied")
        return
    if caller.uid == node.uid:
        bits = (node.mode >> 6) & 7
    elif caller.gid == node.gid or in_group(caller.pid, node.gid):
        bits = (node.mode >> 3) & 7
    else:
        bits = node.mode & 7
    if mask & ~bits & 7:
        raise PermissionDenied(f"access {mask:#o} to inode {ino} denied")
