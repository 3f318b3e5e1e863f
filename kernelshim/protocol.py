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
connection where it could not (bad length, truncated frame). A payload nested deeper
than MAX_DEPTH is refused before the JSON decoder sees it (the decoder recurses once
per level: a 60 KB frame of `[` would otherwise raise RecursionError).

Every frame either side sends fits MAX_FRAME: `encode` raises ReplyTooLarge rather
than produce a longer one, error messages quote client input only as a short prefix
(`brief`), and long listings are paged (a reply with `next_cursor` not null has more:
ask again with `cursor` set to it).
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import json
import re
import struct
from typing import Any

from blockdev import SluiceError

VERSION = 1
MAX_FRAME = 64 * 1024
#: deepest nesting of arrays and objects a payload may have (requests are flat)
MAX_DEPTH = 32
#: characters of an error message that travel (client input is quoted shorter still)
MAX_MESSAGE = 1024
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


class ReplyTooLarge(ProtocolError):
    """A message would not fit in one frame (a bug in its sender: listings are paged)."""

    errno = _errno.EMSGSIZE


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    kind: int
    request_id: int
    payload: dict[str, Any]


def encode(kind: int, request_id: int, payload: dict[str, Any]) -> bytes:
    body = _HDR.pack(VERSION, kind, request_id & 0xFFFFFFFF) + \
        json.dumps(payload, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ReplyTooLarge(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
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
