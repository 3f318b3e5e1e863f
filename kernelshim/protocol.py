"""The direct-access wire protocol: versioned, length-prefixed frames with a size limit.

    frame   = length:u32be  body            (1 <= length <= MAX_FRAME)
    body    = version:u8  kind:u8  request_id:u32be  payload
    payload = a UTF-8 JSON object

Requests (kind REQUEST) carry {"op": NAME, ...arguments}. Each gets exactly one reply
with the same request id: kind OK with the result object, or kind ERROR with
{"error": TypeName, "errno": N, "message": text}. File data never travels in frames:
it goes through a shared memory buffer the server hands out (op "attach", the memfd
riding on the reply as SCM_RIGHTS), and read/write requests name offsets in it.

Decoding is strict: a bad length, version, kind or payload raises ProtocolError; the
server answers with an error reply where the frame could be delimited and closes the
connection where it could not (bad length, truncated frame).
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import json
import struct
from typing import Any

from blockdev import SluiceError

VERSION = 1
MAX_FRAME = 64 * 1024
_LEN = struct.Struct(">I")
_HDR = struct.Struct(">BBI")

REQUEST = 1
OK = 2
ERROR = 3
KINDS = (REQUEST, OK, ERROR)


class ProtocolError(SluiceError):
    """A malformed, oversized or out-of-order message."""

    errno = _errno.EPROTO


class FramingError(ProtocolError):
    """The stream cannot be delimited any more (bad length, truncated): close it."""

    #: what the same feed() decoded before the bad length (each still wants its reply)
    messages: list = []


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    kind: int
    request_id: int
    payload: dict[str, Any]


def encode(kind: int, request_id: int, payload: dict[str, Any]) -> bytes:
    body = _HDR.pack(VERSION, kind, request_id & 0xFFFFFFFF) + \
        json.dumps(payload, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length announced by a 4-byte frame header (FramingError if impossible)."""
    (n,) = _LEN.unpack(header)
    if n < _HDR.size or n > MAX_FRAME:
        raise FramingError(f"frame length {n} outside {_HDR.size}..{MAX_FRAME}")
    return n


def decode_body(body: bytes) -> Message:
    if len(body) < _HDR.size:
        raise ProtocolError("frame shorter than its header")
    version, kind, rid = _HDR.unpack_from(body)
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this is {VERSION})")
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    try:
        payload = json.loads(body[_HDR.size:].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"payload is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ProtocolError("payload is not a JSON object")
    return Message(kind, rid, payload)


class Decoder:
    """Incremental decoder: feed bytes, take whole messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message | ProtocolError]:
        """Decode what is complete. A frame that can be delimited but not decoded yields
        a ProtocolError in place of its message; an undelimitable stream raises
        FramingError (its `messages`: those this call decoded before the bad length)."""
        self._buf += data
        out: list[Message | ProtocolError] = []
        while len(self._buf) >= _LEN.size:
            try:
                n = frame_length(bytes(self._buf[:_LEN.size]))
            except FramingError as exc:
                exc.messages = out
                raise
            if len(self._buf) < _LEN.size + n:
                break
            body = bytes(self._buf[_LEN.size:_LEN.size + n])
            del self._buf[:_LEN.size + n]
            try:
                out.append(decode_body(body))
            except ProtocolError as exc:
                out.append(exc)
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


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


def error_payload(exc: BaseException) -> dict[str, Any]:
    code = getattr(exc, "errno", None) or _errno.EIO
    return {"error": type(exc).__name__, "errno": int(code), "message": str(exc)}
