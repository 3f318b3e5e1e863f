"""The kernel's mount tables (/proc/self/mounts, /proc/self/mountinfo), read safely.

Any user may put a FUSE mount on a directory it owns (fusermount3), anywhere on the
host, so every path in these tables is someone else's input. A name's bytes that are
not UTF-8 are kept as surrogate escapes, as Python's own path strings are
(`os.fsdecode`, `sys.argv`), never an error: the daemon's mount follower reads the
table at every change of it, and a tenant's mount at a path with byte 0xfe raised
UnicodeDecodeError there and stopped every sluice daemon on the host (probe 22).
Imports nothing of the FUSE binding: the CLI's commands use it too.
"""

from __future__ import annotations

import re
from typing import Iterator

MOUNTS = "/proc/self/mounts"
MOUNTINFO = "/proc/self/mountinfo"


def unescape(field: str) -> str:
    """A path field with the tables' octal escapes (space, tab, newline, backslash as
    \\ooo) undone."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_table(path: str = MOUNTINFO) -> str:
    """The whole table, decoded as paths are (see the module's docstring)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def table_rows(path: str = MOUNTS) -> Iterator[list[str]]:
    """Each line of the table, split into its fields (escaped as the kernel wrote
    them: `unescape` a path field before comparing it)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            yield fields(line)


def fields(line: str) -> list[str]:
    """A line of a table split at its single spaces: only space, tab, newline and
    backslash are escaped in a path, so `str.split()` would split a path at another
    whitespace character (a vertical tab, a form feed) and a mount at `MNT\vx` would
    read as one at MNT (probe 22)."""
    return line.rstrip("\n").split(" ")
