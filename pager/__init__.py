"""pager: device blocks cached in frames charged to principals (imports only blockdev)."""

from .cache import BYPASS_BLOCKS as BYPASS_BLOCKS
from .cache import Pager as Pager
from .cache import PagerStatistics as PagerStatistics
