"""kernelshim: the small kernel between clients and the blocks — grants and the data path.

Clients (the FUSE metadata server's own handles, later direct clients over a socket)
do their data I/O through grants; the kernel checks each request and forwards it to
the pager. It imports pager and blockdev; fs imports only this package.
"""

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
from blockdev import SluiceError as SluiceError
from blockdev import fsync_directory as fsync_directory
from blockdev import write_durably as write_durably

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
