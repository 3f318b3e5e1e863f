"""What the shim server's parts share: a connection's state, the server's limits, and
the attributes every part of the server relies on (`ServerBase`).

The server is split by concern: `server.py` moves frames (accept, read, send queue,
push, dispatch), `fileops.py` serves the file and data operations through the
connection's capability space, `adminops.py` the principals and statistics. They are
mixed into one `ShimServer`; this module is what they have in common.
"""

from __future__ import annotations

import collections
import dataclasses
import errno as _errno
import mmap
import socket
from typing import Callable

import trio

from pager import ReclaimSubscription

from .grants import Grant
from .kernel import Kernel
from .principals import Principal, PrincipalTable
from .rooterror import SluiceError
from .service import Credentials, MetadataService

#: largest file offset a request may name (JSON integers are bounded the same way)
MAX_OFFSET = 1 << 62
#: largest shared buffer a connection may attach
MAX_SHM = 64 << 20
#: connections served at once (each holds a descriptor, a capability space and maybe a
#: buffer); each principal's `connections` bank is well below it
MAX_CONNECTIONS = 512
#: ... of which only root's processes may use the last ROOT_CONNECTIONS, so that
#: tenants together cannot lock the administrator out
ROOT_CONNECTIONS = 32
#: shared buffers of all connections together (bounds the daemon's memory); each
#: principal's `shm` bank is well below it, and the last ROOT_SHM bytes are root's
MAX_SHM_TOTAL = 1 << 30
ROOT_SHM = 128 << 20
#: seconds a new connection has to send its first complete request
HANDSHAKE_SECONDS = 5.0
#: rows per page of `principal_ls` and `stats` (a row is at most ~1 KB as JSON)
PAGE_ROWS = 32
#: large direct requests are served in slices of this size, and give the event loop
#: back between slices once they have held it for HOG_SECONDS
SLICE_BYTES = 256 << 10
HOG_SECONDS = 1e-3
#: bytes of replies and notifications queued for one connection at most
MAX_SEND_QUEUE = 1 << 20
#: while more than this is queued, the connection's requests are not read
SEND_HIGH_WATER = 256 << 10
#: seconds a connection may leave queued output unread before it is closed
SEND_STALL_SECONDS = 10.0
#: notification kinds a connection may subscribe to ("reclaim": release N frames by a
#: deadline; "revoked": a grant was revoked; "notice": free text from the administrator)
PUSH_KINDS = frozenset({"reclaim", "revoked", "notice"})
#: bytes asked of a socket per read
RECV_BYTES = 256 << 10


class BadSlot(SluiceError):
    """No capability in that slot of the connection's capability space."""

    errno = _errno.EBADF


class _InternalError(SluiceError):
    """The reply to a request that failed with a bug (logged with its traceback)."""

    errno = _errno.EIO


@dataclasses.dataclass(eq=False)
class Connection:
    creds: Credentials
    #: what the connection acts for, and is charged to (fixed at connect)
    principal: Principal
    sock: socket.socket
    slots: dict[int, Grant] = dataclasses.field(default_factory=dict)
    #: slots whose grant the metadata server issued (closing them closes the file)
    opened: set[int] = dataclasses.field(default_factory=set)
    next_slot: int = 1
    shm: mmap.mmap | None = None
    shm_view: memoryview | None = None
    #: notification kinds the client asked for
    subscribed: frozenset[str] = frozenset()
    push_seq: int = 0
    #: frames (and the descriptors riding on the first byte of one) not yet sent
    sendq: collections.deque[tuple[memoryview, list[int]]] = dataclasses.field(
        default_factory=collections.deque)
    queued: int = 0
    #: when the queue last moved (or became non-empty)
    last_sent: float = 0.0
    #: why the connection is being closed (None: it is not)
    doomed: str | None = None
    #: set when the writer should look at the queue; when it sent some; replaced after
    wake_writer: trio.Event = dataclasses.field(default_factory=trio.Event)
    progress: trio.Event = dataclasses.field(default_factory=trio.Event)
    #: the wait the reader is in (cancelled to close the connection)
    wait_scope: trio.CancelScope | None = None
    nursery: trio.Nursery | None = None
    #: the pager subscription pushing "reclaim" to this connection (while subscribed)
    reclaim: ReclaimSubscription | None = None

    def doom(self, reason: str) -> None:
        if self.doomed is None:
            self.doomed = reason
            if self.wait_scope is not None:
                self.wait_scope.cancel()
            self.wake_writer.set()

    def signal_progress(self) -> None:
        ev, self.progress = self.progress, trio.Event()
        ev.set()


class ServerBase:
    """The attributes the parts of ShimServer share (set by ShimServer.__init__)."""

    kernel: Kernel
    principals: PrincipalTable
    service: MetadataService
    #: whether metadata requests are waiting (the mount's FUSE queue is readable)
    metadata_pending: Callable[[], bool] | None
    #: shared buffers of all connections together, in bytes
    shm_bytes: int
    #: when a long request last gave the event loop back
    _last_yield: float
