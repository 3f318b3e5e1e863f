"""Live metrics: the daemon's counters and latency figures in the Prometheus text format.

`sluice mount ... --metrics ADDRESS:PORT` serves `GET /metrics` from the daemon's own
trio event loop (no thread, no server of the client library): each scrape renders the
same statistics `sluice stats --json` shows root — every principal, whoever asks — with
`prometheus_client.generate_latest` over a registry holding one custom collector.

It is the operator's view of every tenant, so it is off unless whoever mounts asks for
it and is bound only to the address given. The endpoint is input from someone else
like every socket of the daemon, and bounded so that a slow or hostile scraper cannot
hold it: at most MAX_CONNECTIONS at once (when full, a new connection takes the place
of the one that has been sending its request the longest, so idle or trickling
connections cannot lock real scrapers out), one request per connection, a request head of at most MAX_REQUEST bytes, and REQUEST_SECONDS for
the whole exchange (reading the request and sending the reply); a render is reused by
scrapes arriving within MIN_RENDER_INTERVAL, so a tight scrape loop costs the loop at
most a few renders a second.

Metric names follow the Prometheus conventions (base units, `_total` for counters,
labels for dimensions):

    sluice_io_bytes_total{principal, op="read"|"write"}        counter
    sluice_io_requests_total{principal}                        counter
    sluice_io_latency_seconds{principal, quantile}             summary (queue + service,
                                                               the scheduler's own figures)
    sluice_io_latency_max_seconds{principal}                   gauge
    sluice_io_waiting_requests{principal}                      gauge
    sluice_io_reservation_requests_total{principal, outcome="met"|"missed"}   counter
    sluice_io_throttled_requests_total{principal}              counter
    sluice_cache_frames{principal} / sluice_cache_frames_capacity / _used
    sluice_cache_hits_total, sluice_cache_misses_total, sluice_cache_evictions_total, ...
    sluice_device_capacity_iops, sluice_device_capacity_bytes_per_second (when known)
    sluice_principal_space_bytes{principal}, sluice_principal_inodes{principal}
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .errors import VolumeError

log = logging.getLogger(__name__)

#: scrapes served at once; more are closed without a reply
MAX_CONNECTIONS = 8
#: bytes of request line and headers accepted (a scraper sends a few hundred)
MAX_REQUEST = 8192
#: seconds one connection may take, from accept to the last byte of the reply
REQUEST_SECONDS = 5.0
#: scrapes within this many seconds of a render get that render again
MIN_RENDER_INTERVAL = 0.1

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes


# -- the statistics, one shape for `stats --json`, `stats --watch` and the collector ------

@dataclasses.dataclass(frozen=True, slots=True)
class IoRow:
    """One principal's I/O as the scheduler recorded it (cumulative since mount)."""

    read_bytes: int
    write_bytes: int
    ops: int
    #: requests read / written, when the statistics separate them (else None)
    reads: int | None
    writes: int | None
    #: latency percentiles, queue + service, seconds
    p50_s: float
    p95_s: float | None
    p99_s: float
    max_s: float
    #: sum of the latencies, seconds, when the statistics carry it
    sum_s: float | None
    #: requests queued in the scheduler right now, when it says
    waiting: int | None
    #: requests of a reserved principal dispatched within one reservation interval of
    #: being due (met) and later (missed); requests that waited for a limit
    reservation_met: int | None = None
    reservation_missed: int | None = None
    throttled: int | None = None


def io_rows(st: dict[str, Any]) -> dict[str, IoRow]:
    """Per-principal I/O rows of a `stats` reply.

    The statistics' own shape is a top-level `io` mapping, principal name to
    `{read_bytes, write_bytes, ops, latency_us: {p50, p95, p99, max}, ...}`; volumes
    served by a daemon without it report `device.per_principal` (reads, writes,
    bytes_read, bytes_written, p50_s, p99_s, max_s), which is read the same way.
    """
    out: dict[str, IoRow] = {}
    io = st.get("io")
    if isinstance(io, dict):
        for name, r in io.items():
            if not isinstance(r, dict):
                continue
            lat = r.get("latency_us") or {}
            reads, writes = r.get("reads"), r.get("writes")
            total_us = lat.get("sum", r.get("latency_sum_us"))
            if total_us is None and lat.get("mean") is not None:
                total_us = lat["mean"] * int(r.get("ops", 0))
            waiting = r.get("waiting", r.get("queued"))
            resv = r.get("reservation") or {}
            out[name] = IoRow(
                read_bytes=int(r.get("read_bytes", 0)), write_bytes=int(r.get("write_bytes", 0)),
                ops=int(r.get("ops", 0)),
                reads=int(reads) if reads is not None else None,
                writes=int(writes) if writes is not None else None,
                p50_s=_us(lat.get("p50")), p95_s=_us(lat.get("p95")) if "p95" in lat else None,
                p99_s=_us(lat.get("p99")), max_s=_us(lat.get("max")),
                sum_s=_us(total_us) if total_us is not None else None,
                waiting=int(waiting) if waiting is not None else None,
                reservation_met=_int(resv.get("met")),
                reservation_missed=_int(resv.get("missed")),
                throttled=_int(r.get("throttled")))
        return out
    for name, r in st.get("device", {}).get("per_principal", {}).items():
        out[name] = IoRow(
            read_bytes=int(r.get("bytes_read", 0)), write_bytes=int(r.get("bytes_written", 0)),
            ops=int(r.get("reads", 0)) + int(r.get("writes", 0)),
            reads=int(r.get("reads", 0)), writes=int(r.get("writes", 0)),
            p50_s=float(r.get("p50_s", 0.0)), p95_s=None, p99_s=float(r.get("p99_s", 0.0)),
            max_s=float(r.get("max_s", 0.0)), sum_s=None, waiting=None)
    return out


def _int(v: Any) -> int | None:
    return int(v) if v is not None else None


def _us(v: Any) -> float:
    return float(v or 0.0) * 1e-6


def cache_hits(st: dict[str, Any]) -> dict[str, tuple[int | None, int | None]]:
    """Per-principal (hits, misses) of the pager: the `cache` part of the statistics
    (principal name to the pager's account of it, fsstats.CACHE_FIELDS)."""
    out: dict[str, tuple[int | None, int | None]] = {}
    per = st.get("cache")
    if isinstance(per, dict):
        for name, r in per.items():
            if isinstance(r, dict):
                out[name] = (_int(r.get("hits")), _int(r.get("misses")))
    return out


def capacity(st: dict[str, Any]) -> tuple[float | None, float | None]:
    """The device's capacity (4 KiB random IOPS, sequential bytes/s), when reported."""
    dev = st.get("device", {})
    cap = dev.get("capacity")
    if isinstance(cap, dict):
        iops = cap.get("iops", cap.get("random_4k_iops"))
        bps = cap.get("bytes_per_s", cap.get("bps", cap.get("seq_bytes_per_s")))
        return (float(iops) if iops is not None else None,
                float(bps) if bps is not None else None)
    iops, bps = dev.get("capacity_iops"), dev.get("capacity_bps")
    return (float(iops) if iops is not None else None,
            float(bps) if bps is not None else None)


# -- the collector --------------------------------------------------------------------------

class StatsCollector(Collector):
    """Turns one `statistics_dict()` snapshot into metric families, per scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        st = self._snapshot()
        yield from _io_families(st)
        yield from _cache_families(st)
        yield from _device_families(st)
        yield from _fs_families(st)


def _io_families(st: dict[str, Any]) -> Iterator[Metric]:
    rows = io_rows(st)
    nbytes = CounterMetricFamily("sluice_io_bytes", "Bytes the device served for a principal "
                                 "(reads and writes charged to it)", labels=["principal", "op"])
    reqs = CounterMetricFamily("sluice_io_requests", "Device requests served for a principal",
                               labels=["principal"])
    by_op = CounterMetricFamily("sluice_io_requests_by_op", "Device requests served for a "
                                "principal, by direction", labels=["principal", "op"])
    lat = Metric("sluice_io_latency_seconds", "Device request latency of a principal, queue "
                 "plus service, as the scheduler recorded it (quantiles since mount)", "summary")
    lmax = GaugeMetricFamily("sluice_io_latency_max_seconds", "Largest device request latency "
                             "of a principal since mount", labels=["principal"])
    waiting = GaugeMetricFamily("sluice_io_waiting_requests", "Requests of a principal waiting "
                                "in the scheduler", labels=["principal"])
    resv = CounterMetricFamily("sluice_io_reservation_requests", "Requests of a reserved "
                               "principal dispatched within one reservation interval of being "
                               "due (met) or later (missed)", labels=["principal", "outcome"])
    throttled = CounterMetricFamily("sluice_io_throttled_requests", "Requests of a principal "
                                    "that waited for an I/O limit (its own or an ancestor's)",
                                    labels=["principal"])
    any_split = any_waiting = any_resv = any_throttled = False
    for name, r in sorted(rows.items()):
        nbytes.add_metric([name, "read"], r.read_bytes)
        nbytes.add_metric([name, "write"], r.write_bytes)
        reqs.add_metric([name], r.ops)
        if r.reads is not None and r.writes is not None:
            any_split = True
            by_op.add_metric([name, "read"], r.reads)
            by_op.add_metric([name, "write"], r.writes)
        for q, v in (("0.5", r.p50_s), ("0.95", r.p95_s), ("0.99", r.p99_s)):
            if v is not None:
                lat.add_sample("sluice_io_latency_seconds", {"principal": name, "quantile": q}, v)
        lat.add_sample("sluice_io_latency_seconds_count", {"principal": name}, r.ops)
        if r.sum_s is not None:
            lat.add_sample("sluice_io_latency_seconds_sum", {"principal": name}, r.sum_s)
        lmax.add_metric([name], r.max_s)
        if r.waiting is not None:
            any_waiting = True
            waiting.add_metric([name], r.waiting)
        if r.reservation_met is not None and r.reservation_missed is not None:
            any_resv = True
            resv.add_metric([name, "met"], r.reservation_met)
            resv.add_metric([name, "missed"], r.reservation_missed)
        if r.throttled is not None:
            any_throttled = True
            throttled.add_metric([name], r.throttled)
    yield nbytes
    yield reqs
    if any_split:
        yield by_op
    yield lat
    yield lmax
    if any_waiting:
        yield waiting
    if any_resv:
        yield resv
    if any_throttled:
        yield throttled


def _cache_families(st: dict[str, Any]) -> Iterator[Metric]:
    pg = st.get("pager")
    if not isinstance(pg, dict):
        return
    frames = GaugeMetricFamily("sluice_cache_frames", "Cache frames charged to a principal",
                               labels=["principal"])
    for name, n in sorted((pg.get("resident") or {}).items()):
        frames.add_metric([name], n)
    yield frames
    for key, doc in (("frames", "Frames in the pager's pool"),
                     ("frames_used", "Frames of the pool holding a block")):
        if key in pg:
            yield GaugeMetricFamily(f"sluice_cache_{key if key != 'frames' else 'capacity_frames'}",
                                    doc, value=pg[key])
    for key, doc in (("hits", "Block reads served from the cache"),
                     ("misses", "Block reads that went to the device"),
                     ("evictions", "Frames reclaimed for another block"),
                     ("bypassed_blocks", "Blocks of large reads that skipped the cache")):
        if key in pg:
            yield CounterMetricFamily(f"sluice_cache_{key}", doc, value=pg[key])
    per = cache_hits(st)
    if per:
        hits = CounterMetricFamily("sluice_cache_principal_hits", "Block reads of a principal "
                                   "served from the cache", labels=["principal"])
        misses = CounterMetricFamily("sluice_cache_principal_misses", "Block reads of a "
                                     "principal that went to the device", labels=["principal"])
        for name, (h, m) in sorted(per.items()):
            if h is not None:
                hits.add_metric([name], h)
            if m is not None:
                misses.add_metric([name], m)
        yield hits
        yield misses


def _device_families(st: dict[str, Any]) -> Iterator[Metric]:
    dev = st.get("device")
    if not isinstance(dev, dict):
        return
    info = GaugeMetricFamily("sluice_device_info", "The simulated device's timing profile and "
                             "scheduler", labels=["profile", "scheduler"])
    info.add_metric([str(dev.get("profile", "")), str(dev.get("scheduler", ""))], 1)
    yield info
    if "checksum_errors" in dev:
        yield CounterMetricFamily("sluice_device_checksum_errors", "Blocks that failed their "
                                  "checksum on read", value=dev["checksum_errors"])
    iops, bps = capacity(st)
    if iops is not None:
        yield GaugeMetricFamily("sluice_device_capacity_iops", "4 KiB random requests per "
                                "second the device's profile can serve", value=iops)
    if bps is not None:
        yield GaugeMetricFamily("sluice_device_capacity_bytes_per_second", "Sequential bytes "
                                "per second the device's profile can serve", value=bps)


def _fs_families(st: dict[str, Any]) -> Iterator[Metric]:
    f = st.get("fs")
    if isinstance(f, dict):
        bs = f.get("block_size", 0)
        if "blocks" in f and "blocks_free" in f:
            yield GaugeMetricFamily("sluice_fs_size_bytes", "Size of the volume's device",
                                    value=f["blocks"] * bs)
            yield GaugeMetricFamily("sluice_fs_free_bytes", "Free bytes on the volume",
                                    value=f["blocks_free"] * bs)
        for key, doc in (("inodes", "Inodes in use"), ("open_handles", "Open files"),
                         ("live_grants", "Grants not revoked")):
            if key in f:
                yield GaugeMetricFamily(f"sluice_fs_{key}", doc, value=f[key])
    rows = st.get("principals")
    if isinstance(rows, list):
        space = GaugeMetricFamily("sluice_principal_space_bytes", "Storage charged to a "
                                  "principal (its children's included)", labels=["principal"])
        inodes = GaugeMetricFamily("sluice_principal_inodes", "Inodes charged to a principal "
                                   "(its children's included)", labels=["principal"])
        for r in rows:
            u = r.get("usage") or {}
            if u.get("space") is not None:
                space.add_metric([r["name"]], u["space"])
            if u.get("inodes") is not None:
                inodes.add_metric([r["name"]], u["inodes"])
        yield space
        yield inodes


# -- the address ----------------------------------------------------------------------------

def parse_address(text: str) -> tuple[str, int]:
    """`ADDRESS:PORT` (`127.0.0.1:9464`, `[::1]:9464`, `localhost:9464`) -> (host, port).

    Raises ValueError with a one-line reason."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not ADDRESS:PORT (e.g. 127.0.0.1:9464)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9464")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number from 0 to 65535")
    return host, port


# -- the server -----------------------------------------------------------------------------

class MetricsServer:
    """Serves `GET /metrics` over HTTP/1.x on one listening address, from the trio loop."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]],
                 listeners: list[trio.SocketListener]) -> None:
        self._listeners = listeners
        sockname = listeners[0].socket.getsockname()
        #: where it listens (port 0 asks the kernel for a free one: this is the one it gave)
        self.host: str = sockname[0]
        self.port: int = sockname[1]
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(StatsCollector(snapshot))
        #: connections being served, and the cancel scopes of those still sending
        #: their request (oldest first)
        self._active = 0
        self._reading: dict[object, trio.CancelScope] = {}
        self._rendered = b""
        self._rendered_at = -math.inf
        #: connections closed unanswered because MAX_CONNECTIONS were being served
        #: (refused: nobody to drop; dropped: a slow one made room for a new one)
        self.refused = 0
        self.dropped = 0

    @classmethod
    async def bind(cls, snapshot: Callable[[], dict[str, Any]], host: str,
                   port: int) -> MetricsServer:
        """Listen on `host:port` (before the mount goes live, so that a busy port fails
        the mount with one line); serving starts with `serve`."""
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise VolumeError(f"cannot serve metrics on {_bracket(host)}:{port}: "
                              f"{exc.strerror or exc}") from None
        return cls(snapshot, listeners)

    @property
    def url(self) -> str:
        return f"http://{_bracket(self.host)}:{self.port}/metrics"

    def render(self) -> bytes:
        now = trio.current_time()
        if now - self._rendered_at >= MIN_RENDER_INTERVAL:
            self._rendered = generate_latest(self._registry)
            self._rendered_at = now
        return self._rendered

    async def aclose(self) -> None:
        for ln in self._listeners:
            await ln.aclose()

    async def serve(self) -> None:
        """Accept and answer scrapes until cancelled."""
        log.info("metrics at %s", self.url)
        async with trio.open_nursery() as nursery:
            for ln in self._listeners:
                nursery.start_soon(self._accept_loop, ln, name=f"metrics-accept-{self.port}")

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM):
                    # the daemon's business goes on; try again in a moment.
                    log.warning("metrics: cannot accept a connection: %s", exc)
                    await trio.sleep(0.1)
                    continue
                if self._active >= MAX_CONNECTIONS:
                    # Full: make room by dropping the connection that has been
                    # sending its request the longest (a slow or silent scraper), so
                    # that holding connections open cannot lock scrapers out. A real
                    # scraper sends its request at once and is never the oldest.
                    reading = next(iter(self._reading.values()), None)
                    if reading is None or self._active >= 2 * MAX_CONNECTIONS:
                        self.refused += 1
                        await trio.aclose_forcefully(stream)
                        continue
                    self.dropped += 1
                    reading.cancel()
                    self._reading = {k: v for k, v in self._reading.items()
                                     if v is not reading}
                self._active += 1
                nursery.start_soon(self._serve_one, stream, name="metrics-scrape")

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        key = object()
        try:
            with trio.move_on_after(REQUEST_SECONDS):
                with trio.CancelScope() as reading:
                    self._reading[key] = reading
                    answer = await self._answer(stream)
                self._reading.pop(key, None)
                if reading.cancelled_caught:
                    return
                status, body, ctype = answer
                head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
                await stream.send_all(head.encode() + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the scraper went away
        except Exception:
            log.exception("metrics: unexpected error serving a scrape")
        finally:
            self._reading.pop(key, None)
            self._active -= 1
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream) -> tuple[str, bytes, str]:
        """Read one request head and say what to answer: (status, body, content type)."""
        text = "text/plain; charset=utf-8"
        data = bytearray()
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            if len(data) > MAX_REQUEST:
                return "431 Request Header Fields Too Large", b"request too large\n", text
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
        if len(data) > MAX_REQUEST:
            return "431 Request Header Fields Too Large", b"request too large\n", text
        line = bytes(data).split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", b"bad request\n", text
        method, target = parts[0], parts[1]
        if method != b"GET":
            return "405 Method Not Allowed", b"only GET\n", text
        path = target.split(b"?", 1)[0]
        if path == b"/metrics":
            return "200 OK", self.render(), CONTENT_TYPE
        if path == b"/":
            return "200 OK", b"sluice metrics: GET /metrics\n", text
        return "404 Not Found", b"not found: try /metrics\n", text


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
