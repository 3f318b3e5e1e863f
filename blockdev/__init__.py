"""blockdev: the simulated block device (the lowest layer; imports no other sluice package).

Fixed-size blocks on a backing store (a sparse file or a real block device, behind the
`Backing` seam), an xxh3 checksum per block verified on every read, a timing model per
profile and a per-principal request scheduler in front of it. For tests and crash
experiments the backing can be wrapped in a fault injector or a power-loss recorder.
"""

from .backing import Backing as Backing
from .backing import FileBacking as FileBacking
from .backing import reserve_space as reserve_space
from .backing import set_miss_on_loop as set_miss_on_loop
from .checksums import ChecksumStore as ChecksumStore
from .device import BlockDevice as BlockDevice
from .device import check_read_guard as check_read_guard
from .device import guard_reads as guard_reads
from .device import DeviceGeometry as DeviceGeometry
from .device import DeviceStatistics as DeviceStatistics
from .durable import PRIVATE_FILE_MODE as PRIVATE_FILE_MODE
from .durable import MAX_JSON_FILE as MAX_JSON_FILE
from .durable import StoreFileError as StoreFileError
from .durable import fsync_directory as fsync_directory
from .durable import open_store_file as open_store_file
from .durable import read_json_file as read_json_file
from .durable import write_durably as write_durably
from .errors import ChecksumError as ChecksumError
from .errors import DeviceError as DeviceError
from .errors import DeviceFull as DeviceFull
from .errors import FormatError as FormatError
from .errors import OutOfRange as OutOfRange
from .errors import SluiceError as SluiceError
from .faults import FAULT_PLAN_ENV as FAULT_PLAN_ENV
from .faults import FaultPlan as FaultPlan
from .faults import FaultyBacking as FaultyBacking
from .profiles import PROFILES as PROFILES
from .profiles import TimingProfile as TimingProfile
from .profiles import parse_profile as parse_profile
from .recording import RECORD_DIR_ENV as RECORD_DIR_ENV
from .recording import Recording as Recording
from .recording import RecordingBacking as RecordingBacking
from .recording import RecordLog as RecordLog
from .units import Rate as Rate
from .units import UnitError as UnitError
from .units import format_size as format_size
from .units import format_size_approx as format_size_approx
from .units import parse_size as parse_size
from .errors import OverReserved as OverReserved
from .histogram import LatencyHistogram as LatencyHistogram
from .profiles import Capacity as Capacity
from .scheduler import SCHEDULERS as SCHEDULERS
from .scheduler import FifoScheduler as FifoScheduler
from .scheduler import MClockScheduler as MClockScheduler
from .scheduler import make_scheduler as make_scheduler
from .scheduler import check_reservations as check_reservations
from .scheduler import PrincipalIOStats as PrincipalIOStats
from .types import ROOT_PRINCIPAL as ROOT_PRINCIPAL
from .types import BankNode as BankNode
from .types import BankTree as BankTree
from .types import BlockNo as BlockNo
from .types import PrincipalId as PrincipalId
