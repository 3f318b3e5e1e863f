"""The metadata's memo of the last name found absent (fs/metadata.py, Metadata.lookup):
the kernel looks a new name up right before it creates it, and the create's check that
the name is free is answered from the memo. Whatever can make that name exist must
forget it: adding the entry, renaming another entry to it, rolling back its removal."""

from __future__ import annotations

from pathlib import Path

from fs import volume
from fs.metadata import Metadata
from fs.inodes import ROOT_INODE


def _md(tmp_path: Path) -> Metadata:
    volume.mkfs(tmp_path / "vol", size=16 << 20)
    return Metadata(tmp_path / "vol" / volume.DB)


def _new_inode(md: Metadata) -> int:
    return md.insert_inode(mode=0o100644, uid=0, gid=0, nlink=1, rdev=0, now_ns=1,
                           parent=0, target=None, principal=0)


def test_added_name_is_found_after_a_miss(tmp_path: Path) -> None:
    md = _md(tmp_path)
    try:
        assert md.lookup(ROOT_INODE, b"a") is None
        assert md.lookup(ROOT_INODE, b"a") is None  # the memo's answer, the same
        ino = _new_inode(md)
        md.add_dentry(ROOT_INODE, b"a", ino)
        assert md.lookup(ROOT_INODE, b"a") == ino
        assert md.lookup(ROOT_INODE, b"b") is None
        md.commit()
    finally:
        md.close()


def test_renamed_to_name_is_found_after_a_miss(tmp_path: Path) -> None:
    md = _md(tmp_path)
    try:
        ino = _new_inode(md)
        md.add_dentry(ROOT_INODE, b"old", ino)
        assert md.lookup(ROOT_INODE, b"new") is None
        md.move_dentry(ROOT_INODE, b"old", ROOT_INODE, b"new")
        assert md.lookup(ROOT_INODE, b"new") == ino
        assert md.lookup(ROOT_INODE, b"old") is None
        md.commit()
    finally:
        md.close()


def test_a_removal_rolled_back_is_found_again(tmp_path: Path) -> None:
    md = _md(tmp_path)
    try:
        ino = _new_inode(md)
        md.add_dentry(ROOT_INODE, b"kept", ino)
        md.commit()
        md.remove_dentry(ROOT_INODE, b"kept")
        assert md.lookup(ROOT_INODE, b"kept") is None
        md.rollback()
        assert md.lookup(ROOT_INODE, b"kept") == ino
    finally:
        md.close()
