"""kernelshim: the small kernel between clients and the blocks — grants and the data path.

Clients (the FUSE metadata server's own handles, and direct clients over the control
socket) do their data I/O through grants; the kernel checks each request and forwards
it to the pager. It imports pager and blockdev; fs imports only this package.

The package has separate rooms:
  kernel.py, granttable.py, lowerlayers.py,     the kernel proper (the data path; the
  grants.py, extents.py, errors.py              grants in force; what fs may ask below)
  principals.py, service.py                     principals and banks; what the shim
                                                needs from the metadata server
  banks.py, bankrules.py, accounting.py,        (the principal tree's records, the rules
  processes.py                                  of its banks, hierarchical charging, the
                                                pid registry: principals.py re-exports)
  server.py, connection.py, sendpath.py,        the RPC server (control socket, push,
  fileops.py, adminops.py, pagerops.py          the direct clients' and admin ops)
  protocol.py                                   the wire format (sans-IO, light)
  clientcore.py, client.py                      the client library (light)

The names below are loaded when first used (PEP 562), so that `import
kernelshim.client` in a direct client process does not load the kernel, the block
device or numpy. Type checkers see the imports in the TYPE_CHECKING block.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockdev import PROFILES as PROFILES
    from blockdev import ROOT_PRINCIPAL as ROOT_PRINCIPAL
    from blockdev import BankNode as BankNode
    from blockdev import BankTree as BankTree
    from blockdev import BlockDevice as BlockDevice
    from blockdev import BlockNo as BlockNo
    from blockdev import ChecksumError as ChecksumError
    from blockdev import DeviceError as DeviceError
    from blockdev import FormatError as FormatError
    from blockdev import PrincipalId as PrincipalId
    from blockdev import Rate as Rate
    from blockdev import SluiceError as SluiceError
    from blockdev import UnitError as UnitError
    from blockdev import format_size as format_size
    from blockdev import format_size_approx as format_size_approx
    from blockdev import fsync_directory as fsync_directory
    from blockdev import parse_profile as parse_profile
    from blockdev import parse_size as parse_size
    from blockdev import write_durably as write_durably
    from blockdev import StoreFileError as StoreFileError
    from blockdev import open_store_file as open_store_file
    from blockdev import read_json_file as read_json_file
    from blockdev import set_miss_on_loop as set_miss_on_loop

    from .errors import BadRequest as BadRequest
    from .errors import GrantRevoked as GrantRevoked
    from .errors import NotAllocated as NotAllocated
    from .errors import RightsError as RightsError
    from .errors import Sealed as Sealed
    from .errors import ShimError as ShimError
    from .extents import FRESH as FRESH
    from .extents import HOLE as HOLE
    from .extents import UNWRITTEN as UNWRITTEN
    from .extents import WRITTEN as WRITTEN
    from .extents import ExtentMap as ExtentMap
    from .extents import Segment as Segment
    from .grants import Grant as Grant
    from .grants import Rights as Rights
    from .kernel import Kernel as Kernel

#: exported name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("PROFILES", "ROOT_PRINCIPAL", "BankNode", "BankTree", "BlockDevice",
                     "BlockNo", "ChecksumError", "DeviceError", "FormatError", "PrincipalId",
                     "SluiceError", "fsync_directory", "parse_profile", "write_durably",
                     "StoreFileError", "open_store_file", "read_json_file",
                     "set_miss_on_loop"),
                    "blockdev"),
    # units (blockdev/units.py): the one parser of sizes and rates, shared vocabulary
    **dict.fromkeys(("Rate", "UnitError", "format_size", "format_size_approx",
                     "parse_size"), "blockdev"),
    **dict.fromkeys(("BadRequest", "GrantRevoked", "NotAllocated", "RightsError", "Sealed",
                     "ShimError"), "kernelshim.errors"),
    **dict.fromkeys(("FRESH", "HOLE", "UNWRITTEN", "WRITTEN", "ExtentMap", "Segment"),
                    "kernelshim.extents"),
    **dict.fromkeys(("Grant", "Rights"), "kernelshim.grants"),
    "Kernel": "kernelshim.kernel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kernelshim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
