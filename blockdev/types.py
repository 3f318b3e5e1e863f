"""Typed ids shared by every layer (blockdev is the lowest, so they live here)."""

from __future__ import annotations

from typing import NewType

BlockNo = NewType("BlockNo", int)
"""A block number on the device (0 .. nblocks-1)."""

PrincipalId = NewType("PrincipalId", int)
"""The principal a request is charged to."""

ROOT_PRINCIPAL = PrincipalId(0)
"""The root of the principal tree; requests with no other owner are charged here."""
