"""The direct-access wire protocol, version 2: length-prefixed frames with a size limit,
JSON for control operations and a fixed binary layout for data operations, several
requests in flight per connection, and server push.

    frame   = length:u32be  body            (HEADER <= length <= MAX_FRAME)
    body    = version:u8  kind:u8  request_id:u32be  payload

    kind      direction  payload
    REQUEST   c -> s     JSON object {"op": NAME, ...arguments}
    OK        s -> c     JSON object: the result
    ERROR     s -> c     JSON object {"error": TypeName, "errno": N, "message": text}
    DATA      c -> s     op:u8 slot:u32be offset:u64be length:u32be buf:u64be  (DATA_REQ)
    DATA_OK   s -> c     n:u64be offset:u64be size:u64be                       (DATA_REP)
    PUSH      s -> c     JSON object {"kind": NAME, ...}; request_id = push sequence no.

Every request (REQUEST or DATA) gets exactly one reply with its request id: OK or
ERROR for REQUEST, DATA_OK or ERROR for DATA. A client may send many requests before
reading a reply (ids are the client's business; the server echoes them); replies may
come in any order. ERROR with request id 0 answers no request: the stream or a frame
was bad. PUSH frames come only to connections that subscribed to their kind.

File data never travels in frames: it goes through a shared memory buffer the server
hands out (op "attach", the memfd riding on the reply as SCM_RIGHTS), and data
requests name offsets in it (`buf`). DATA ops: READ (the server fills the range and
answers the bytes read, short at end of file), WRITE, APPEND (answers the offset the
data landed at and the new size), WRITE_ALLOC (WRITE that lays out the holes it meets
itself, where WRITE answers NotAllocated; the client's pipelined writes use it).

Versions: the version byte of every frame must be VERSION. A frame of version 1 (the
JSON-only protocol before push) is answered by an ERROR frame encoded as version 1,
so an old client raises a ProtocolError saying to upgrade; the connection stays open.

Decoding is strict: a bad length, version, kind or payload raises ProtocolError; the
server answers with an error reply where the frame could be delimited and closes the
connection where it could not (bad length, truncated frame). A payload nested deeper
than MAX_DEPTH is refused before the JSON decoder sees it (the decoder recurses once
per level: a 60 KB frame of `[` would otherwise raise RecursionError).

Every frame either side sends fits MAX_FRAME: `encode` raises ReplyTooLarge rather
than produce a longer one, error messages quote client input only as a short prefix
(`brief`), and long listings are paged (a reply with `next_cursor` not null has more:
ask again with `cursor` set to it).

This module does no I/O and imports nothing heavy (no trio, numpy or blockdev device
code): the client library and the server share it.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import json
import re
import struct
from typing import Any, NamedTuple, Union

from .rooterror import SluiceError

VERSION = 2
#: the longest text of a "notice" (characters; `sluice notice`)
NOTICE_CHARS = 1024
#: the JSON-only protocol before push: its frames get an error reply it can read
OLD_VERSION = 1
MAX_FRAME = 64 * 1024
#: deepest nesting of arrays and objects a payload may have (requests are flat)
MAX_DEPTH = 32
#: characters of an error message that travel (client input is quoted shorter still)
MAX_MESSAGE = 1024
_LEN = struct.Struct(">I")
_HDR = struct.Struct(">BBI")
HEADER = _HDR.size

REQUEST = 1
OK = 2
ERROR = 3
DATA = 4
DATA_OK = 5
PUSH = 6
#: kinds whose payload is a JSON object
KINDS = (REQUEST, OK, ERROR, PUSH)
BINARY_KINDS = (DATA, DATA_OK)

#: DATA ops
READ = 1
WRITE = 2
APPEND = 3
#: WRITE that also takes the write layout of a hole it meets (a pipelined write must
#: not need its reply to go on); WRITE answers NotAllocated there
WRITE_ALLOC = 4
DATA_OPS = {READ: "read", WRITE: "write", APPEND: "append", WRITE_ALLOC: "write_alloc"}

_DATA_REQ = struct.Struct(">BIQIQ")
_DATA_REP = struct.Struct(">QQQ")
#: one whole DATA frame (length prefix, header, payload), and one whole DATA_OK frame
_DATA_FRAME = struct.Struct(">IBBIBIQIQ")
_DATA_OK_FRAME = struct.Struct(">IBBIQQQ")


class ProtocolError(SluiceError):
    """A malformed, oversized or out-of-order message."""

    errno = _errno.EPROTO


class FramingError(ProtocolError):
    """The stream cannot be delimited any more (bad length, truncated): close it."""

    #: what the same feed() decoded before the bad length (each still wants its reply)
    messages: list = []


class ReplyTooLarge(ProtocolError):
    """A message would not fit in one frame (a bug in its sender: listings are paged)."""

    errno = _errno.EMSGSIZE


class OldVersion(ProtocolError):
    """A frame of protocol version 1: answer it in version 1 (see the module doc)."""

    def __init__(self, request_id: int) -> None:
        super().__init__(f"protocol version {OLD_VERSION} is no longer served: this daemon "
                         f"speaks version {VERSION} (upgrade the sluice client library)")
        self.request_id = request_id


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """A frame with a JSON payload (REQUEST, OK, ERROR, PUSH)."""

    kind: int
    request_id: int
    payload: dict[str, Any]


class DataRequest(NamedTuple):  # a tuple: built per request, so cheap to build
    """A DATA frame: `op` (READ, WRITE, APPEND) on capability `slot`, `length` bytes at
    file `offset` (ignored by APPEND), to or from shared buffer offset `buf`."""

    request_id: int
    op: int
    slot: int
    offset: int
    length: int
    buf: int


class DataReply(NamedTuple):
    """A DATA_OK frame: `n` bytes done; APPEND also says where (`offset`) and the new
    `size`; READ and WRITE leave both 0."""

    request_id: int
    n: int
    offset: int = 0
    size: int = 0


Decoded = Union[Message, DataRequest, DataReply]


def encode(kind: int, request_id: int, payload: dict[str, Any], *,
           version: int = VERSION) -> bytes:
    body = _HDR.pack(version, kind, request_id & 0xFFFFFFFF) + \
        json.dumps(payload, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ReplyTooLarge(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


def encode_data(request_id: int, op: int, slot: int, offset: int, length: int,
                buf: int) -> bytes:
    """A DATA frame (struct.error for a field out of its range)."""
    return _DATA_FRAME.pack(_DATA_FRAME.size - 4, VERSION, DATA, request_id & 0xFFFFFFFF,
                            op, slot, offset, length, buf)


def encode_data_ok(request_id: int, n: int, offset: int = 0, size: int = 0) -> bytes:
    return _DATA_OK_FRAME.pack(_DATA_OK_FRAME.size - 4, VERSION, DATA_OK, request_id,
                               n, offset, size)


#: a whole DATA frame's size, and its first six bytes (length prefix, version, kind)
DATA_FRAME_SIZE = _DATA_FRAME.size
_DATA_HEAD = _DATA_FRAME.pack(_DATA_FRAME.size - 4, VERSION, DATA, 0, 0, 0, 0, 0, 0)[:6]


def decode_data_frames(data: bytes) -> list[DataRequest] | None:
    """The DATA requests `data` holds if it is nothing but whole, valid DATA frames (the
    common case on the data path: one 4 KiB read, or a burst of pipelined writes), else
    None and the caller feeds the general Decoder. The same requests the Decoder would
    produce, without its per-frame slicing and dispatch."""
    if len(data) % DATA_FRAME_SIZE or not data.startswith(_DATA_HEAD):
        return None
    # (tuple.__new__ on the fields: DataRequest(...) is a Python-level __new__, a
    # frame per request)
    if len(data) == DATA_FRAME_SIZE:  # one request (a read, a write waited for)
        t = _DATA_FRAME.unpack(data)
        if t[4] not in DATA_OPS:  # (length, version and kind: the head above)
            return None
        return [_tuple_new(DataRequest, t[3:])]
    out = []
    for t in _DATA_FRAME.iter_unpack(data):
        if t[0] != DATA_FRAME_SIZE - 4 or t[1] != VERSION or t[2] != DATA or \
                t[4] not in DATA_OPS:
            return None
        out.append(_tuple_new(DataRequest, t[3:]))
    return out


_tuple_new = tuple.__new__


def frame_length(header: bytes) -> int:
    """The body length announced by a 4-byte frame header (FramingError if impossible)."""
    (n,) = _LEN.unpack(header)
    if n < _HDR.size or n > MAX_FRAME:
        raise FramingError(f"frame length {n} outside {_HDR.size}..{MAX_FRAME}")
    return n


def decode_body(body: bytes) -> Decoded:
    if len(body) < _HDR.size:
        raise ProtocolError("frame shorter than its header")
    version, kind, rid = _HDR.unpack_from(body)
    if version != VERSION:
        if version == OLD_VERSION:
            raise OldVersion(rid)
        raise ProtocolError(f"protocol version {version} not supported (this is {VERSION})")
    if kind == DATA:
        if len(body) != _HDR.size + _DATA_REQ.size:
            raise ProtocolError(f"DATA frame of {len(body)} bytes "
                                f"(must be {_HDR.size + _DATA_REQ.size})")
        op, slot, offset, length, buf = _DATA_REQ.unpack_from(body, _HDR.size)
        if op not in DATA_OPS:
            raise ProtocolError(f"unknown data operation {op}")
        return DataRequest(rid, op, slot, offset, length, buf)
    if kind == DATA_OK:
        if len(body) != _HDR.size + _DATA_REP.size:
            raise ProtocolError(f"DATA_OK frame of {len(body)} bytes")
        return DataReply(rid, *_DATA_REP.unpack_from(body, _HDR.size))
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    text = body[_HDR.size:]
    if nesting_depth(text) > MAX_DEPTH:
        raise ProtocolError(f"payload nested deeper than {MAX_DEPTH} levels")
    try:
        payload = json.loads(text.decode())
    except RecursionError:  # cannot happen after the depth check; never let it escape
        raise ProtocolError(f"payload nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"payload is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ProtocolError("payload is not a JSON object")
    return Message(kind, rid, payload)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_depth(text: bytes) -> int:
    """How deep arrays and objects nest in JSON `text` (brackets inside strings do not
    count). Cheap for ordinary payloads: they have fewer brackets than the limit."""
    if text.count(b"[") + text.count(b"{") <= MAX_DEPTH:
        return text.count(b"[") + text.count(b"{")
    brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for c in brackets:
        if c in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    break
        else:
            depth -= 1
    return deepest


class Decoder:
    """Incremental decoder: feed bytes, take whole messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Decoded | ProtocolError]:
        """Decode what is complete. A frame that can be delimited but not decoded yields
        a ProtocolError in place of its message; an undelimitable stream raises
        FramingError (its `messages`: those this call decoded before the bad length)."""
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data  # the common case: whole frames, nothing left over
        out: list[Decoded | ProtocolError] = []
        pos, end = 0, len(buf)
        unpack = _LEN.unpack_from
        try:
            while end - pos >= 4:
                (n,) = unpack(buf, pos)
                if n < _HDR.size or n > MAX_FRAME:
                    exc = FramingError(f"frame length {n} outside {_HDR.size}..{MAX_FRAME}")
                    exc.messages = out
                    raise exc
                if end - pos - 4 < n:
                    break
                body = bytes(buf[pos + 4:pos + 4 + n])
                pos += 4 + n
                try:
                    out.append(decode_body(body))
                except ProtocolError as exc:
                    out.append(exc)
        finally:
            if buf is self._buf:
                del self._buf[:pos]
            else:
                self._buf += buf[pos:]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)

    def frame_rest(self, data: bytes, pos: int = 0) -> int:
        """Bytes that complete the frame being decoded if `data[pos:]` is fed next: the
        rest of the frame begun by the bytes held, or else the whole frame starting at
        `data[pos]`; 0 while its length header is incomplete. (A length no frame can
        have is not checked here: `feed` raises FramingError for it.)"""
        held = len(self._buf)
        if held >= 4:
            (n,) = _LEN.unpack_from(self._buf)
        elif held:
            head = bytes(self._buf) + data[pos:pos + 4 - held]
            if len(head) < 4:
                return 0
            (n,) = _LEN.unpack(head)
        elif len(data) - pos >= 4:
            (n,) = _LEN.unpack_from(data, pos)
        else:
            return 0
        return max(0, 4 + n - held)


# -- argument checking -----------------------------------------------------------------

def arg_int(p: dict[str, Any], key: str, *, lo: int = 0, hi: int = 1 << 62) -> int:
    v = p.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"argument {key!r} must be an integer in {lo}..{hi}")
    return v


def arg_str(p: dict[str, Any], key: str, *, optional: bool = False, maxlen: int = 4096) -> str:
    v = p.get(key)
    if v is None and optional:
        return ""
    if not isinstance(v, str) or len(v) > maxlen:
        raise ProtocolError(f"argument {key!r} must be a string of at most {maxlen} characters")
    try:  # JSON admits lone surrogates; only those os.fsdecode makes name bytes
        v.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ProtocolError(f"argument {key!r} is not a valid string (lone surrogate)") from None
    return v


def brief(value: object, limit: int = 64) -> str:
    """`value` as a short quotable text for an error message: a client's input echoed at
    full length could make the reply longer than a frame (or than the request was)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def error_payload(exc: BaseException) -> dict[str, Any]:
    code = getattr(exc, "errno", None)
    if not isinstance(code, int) or code <= 0:
        code = _errno.EIO
    msg = str(exc)
    if len(msg) > MAX_MESSAGE:
        msg = msg[:MAX_MESSAGE] + "..."
    return {"error": type(exc).__name__, "errno": code, "message": msg}
