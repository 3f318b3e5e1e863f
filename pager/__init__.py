"""pager: device blocks cached in frames charged to principals, replaced per principal
by policy and application hints, written back by whoever dirtied them (imports only
blockdev). See pager/pool.py for the design, pager/trace.py for the trace format and
pager/replay.py for running a trace through every policy."""

from .cache import BYPASS_BLOCKS as BYPASS_BLOCKS
from .cache import POLICIES as POLICIES
from .pool import FrameNo as FrameNo
from .pool import Pager as Pager
from .cache import PagerStatistics as PagerStatistics
from .cache import PrincipalCacheStats as PrincipalCacheStats
from .pool import ReclaimSubscription as ReclaimSubscription
from .errors import GuaranteeExceeded as GuaranteeExceeded
from .errors import PagerError as PagerError
from .errors import UnknownPolicy as UnknownPolicy
from .trace import TRACE_DTYPE as TRACE_DTYPE
from .trace import TraceFormatError as TraceFormatError
from .trace import load_trace as load_trace
from .trace import name_principals as name_principals
from .trace import read_trace as read_trace
from .trace import write_trace as write_trace
