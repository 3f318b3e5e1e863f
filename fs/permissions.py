"""Permission checks as the kernel makes them: `check_access` (access(2) and every
direct client's open) and `in_group` (setgid inheritance, group permission bits).

Plain functions of an inode and a caller: they own no state."""

from __future__ import annotations

import os

from .errors import PermissionDenied
from .inodes import Caller, Inode


def in_group(caller: Caller, gid: int) -> bool:
    """Whether `caller` has `gid` as its group or among its supplementary groups (group
    permission bits, setgid inheritance).

    A direct client's groups are those it had when it connected (SO_PEERGROUPS, fixed
    in its Credentials): the process holding the connection may since have exec'd a
    set-group-ID program, whose group must not lend its rights to the connection (a
    forked child still using it). A FUSE request names the process making the call at
    that moment, so its groups are read from /proc then, as the kernel would see them.
    """
    if caller.gid == gid:
        return True
    if caller.groups is not None:
        return gid in caller.groups
    try:
        with open(f"/proc/{caller.pid}/status", "rb") as f:
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
    elif in_group(caller, node.gid):
        bits = (node.mode >> 3) & 7
    else:
        bits = node.mode & 7
    if mask & ~bits & 7:
        raise PermissionDenied(f"access {mask:#o} to inode {ino} denied")
