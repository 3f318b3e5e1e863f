"""Timing profiles: the modeled service time of a simulated device, and its capacity.

The backing file is usually in the host's page cache and far faster than any real
device; a profile adds the time a real device of that class would take, so that
queueing, contention and scheduling are visible. `none` adds nothing.

The model (blockdev/device.py applies it, on the device's own timeline):

- the device has `queue_depth` channels serving requests in parallel;
- a request first spends its *access* time on its channel: `latency_s` (command
  overhead, flash read, rotational latency), plus `write_latency_s` for a write
  (flash program time), plus for `hdd` a seek of `full_seek_s * sqrt(distance)`,
  the distance being the head travel from the last block served as a fraction of
  the device (short seeks are dominated by head settle, long ones approach a full
  stroke);
- then its *transfer*, `nbytes / bandwidth_bps`, on the one bus all channels share
  (so the device never moves more than `bandwidth_bps`, whatever its queue depth);
- a discard costs `latency_s` (a TRIM command, no transfer); a flush waits for every
  channel and then costs `latency_s` plus the time to destage the write cache;
- optional write cache (`write_cache_bytes`, timing only: it never changes what is
  durable — that stays `flush()`'s job): a write that fits in the cache costs only
  `latency_s` and its transfer; the rest of its access time (program time, seek) is
  owed and paid by the next flush, or by the write that finds the cache full;
- optional anticipation (`anticipation_s`, scheduling only: the device model is the
  same): the longest the mClock scheduler may keep the last free channel idle for a
  reserved principal's predicted next request (blockdev/anticipation.py). On by
  default only for `hdd`, where one non-preemptible head makes a reserved reader
  wait for a whole bulk write; 0 turns it off.

Built-in profiles (reads; the capacity is what `capacity()` computes from them):

| profile | latency | write extra | bandwidth | full seek | depth | anticipation | 4 KiB random IOPS | 1 MiB sequential |
|---------|---------|-------------|-----------|-----------|-------|--------------|-------------------|------------------|
| none    | 0       | 0           | unlimited | 0         | 64    | off          | unlimited         | unlimited        |
| nvme    | 80 us   | 20 us       | 3.0 GB/s  | 0         | 32    | off          | ~393,000          | 3.0 GB/s         |
| ssd     | 150 us  | 50 us       | 500 MB/s  | 0         | 32    | off          | ~122,000          | 500 MB/s         |
| hdd     | 4.2 ms  | 0           | 180 MB/s  | 15 ms     | 1     | 20 ms        | ~82               | ~105 MB/s        |

Custom profiles: `latency_us,MBps,full_seek_ms,queue_depth[,write_us[,write_cache_MiB]]`
(MBps 0: unlimited), or the same as `key=value` pairs in any order, which may also
turn anticipation on (`antic=MS`; off unless given), e.g.
`lat=2000,bw=50,seek=0,qd=2,wlat=500,wcache=16,antic=20`. The bandwidth and the write cache may
carry units instead (blockdev/units.py): `bw=1.5GiB/s`, `wcache=64M`; a plain number is
MB/s (10^6 bytes/s) and MiB as above. The spec is stored as the volume's profile
(device.json) or given at mount (`--profile`).

Cost and capacity: the scheduler charges each request its `cost()`, the device time it
takes in the steady state of this model: `max((access + transfer) / queue_depth,
transfer)` — a request occupies one of `queue_depth` channels for its access and
transfer, and the bus for its transfer. `capacity()` is derived from the same
function: 4 KiB random reads per second (`1 / cost(4 KiB)` with the average random seek,
8/15 of a full stroke) and sequential bytes per second (1 MiB reads, no seek).
"""

from __future__ import annotations

import dataclasses
import math

from .units import UnitError, parse_byte_rate, parse_size

#: average of sqrt(|x - y|) for x, y uniform on [0, 1]: a random seek's cost fraction
RANDOM_SEEK_FRACTION = 8 / 15
#: the request sizes capacity is quoted in
CAPACITY_IO_BYTES = 4096
CAPACITY_SEQ_BYTES = 1 << 20
#: the nominal cost used on the `none` profile, where the model takes no time: weights
#: still share by requests and bytes (1 us a request, 10 GB/s), limits still hold
_NOMINAL_REQ_S = 1e-6
_NOMINAL_BYTE_S = 1e-10


@dataclasses.dataclass(frozen=True, slots=True)
class Capacity:
    """What a device of a profile can serve per second (None: unlimited)."""

    #: 4 KiB random reads per second
    iops: float | None
    #: sequential read bytes per second (1 MiB requests)
    bps: float | None

    def __str__(self) -> str:
        if self.iops is None or self.bps is None:
            return "unlimited"
        return f"{self.iops:,.0f} IOPS (4 KiB random), {self.bps / 1e6:,.1f} MB/s sequential"


@dataclasses.dataclass(frozen=True, slots=True)
class TimingProfile:
    name: str
    #: fixed cost of one request (command overhead, flash read latency), seconds
    latency_s: float
    #: media transfer rate, bytes per second (0 means unlimited)
    bandwidth_bps: float
    #: seconds to move the head across the whole device (hdd only; 0 for flash)
    full_seek_s: float
    #: requests the device serves at once
    queue_depth: int
    #: extra fixed cost for writes (flash program time), seconds
    write_latency_s: float = 0.0
    #: bytes of write cache (0: none); timing only, see the module docstring
    write_cache_bytes: int = 0
    #: the longest the scheduler may idle the last free channel in anticipation of a
    #: reserved principal's next request, seconds (0: off; blockdev/anticipation.py)
    anticipation_s: float = 0.0

    def access_time(self, *, write: bool, seek_fraction: float = 0.0) -> float:
        """The per-request part of the service time (everything but the transfer)."""
        t = self.latency_s + (self.write_latency_s if write else 0.0)
        if self.full_seek_s and seek_fraction:
            t += self.full_seek_s * min(1.0, seek_fraction) ** 0.5
        return t

    def transfer_time(self, nbytes: int) -> float:
        return nbytes / self.bandwidth_bps if self.bandwidth_bps else 0.0

    def service_time(self, nbytes: int, *, write: bool, seek_fraction: float = 0.0) -> float:
        """Modeled seconds to serve one request of `nbytes` alone on an idle device.

        `seek_fraction` is the head travel as a fraction of the device (0..1).
        """
        return self.access_time(write=write, seek_fraction=seek_fraction) \
            + self.transfer_time(nbytes)

    def cost(self, nbytes: int, *, write: bool = False, sequential: bool = False) -> float:
        """Device seconds one request takes in the steady state (see the module
        docstring); the scheduler's cost function. Random placement (the average seek)
        unless `sequential`."""
        if self.is_instant:
            return _NOMINAL_REQ_S + nbytes * _NOMINAL_BYTE_S
        access = self.access_time(write=write)
        if not sequential:
            access += self.full_seek_s * RANDOM_SEEK_FRACTION
        xfer = self.transfer_time(nbytes)
        return max((access + xfer) / self.queue_depth, xfer)

    def capacity(self) -> Capacity:
        if self.is_instant:
            return Capacity(None, None)
        return Capacity(1.0 / self.cost(CAPACITY_IO_BYTES),
                        CAPACITY_SEQ_BYTES / self.cost(CAPACITY_SEQ_BYTES, sequential=True))

    @property
    def is_instant(self) -> bool:
        return (self.latency_s == 0 and self.bandwidth_bps == 0 and self.full_seek_s == 0
                and self.write_latency_s == 0)


PROFILES: dict[str, TimingProfile] = {
    "none": TimingProfile("none", 0.0, 0.0, 0.0, queue_depth=64),
    # A datacenter NVMe drive: ~80 us reads, ~3 GB/s, deep queue.
    "nvme": TimingProfile("nvme", 80e-6, 3.0e9, 0.0, queue_depth=32, write_latency_s=20e-6),
    # A SATA SSD: ~150 us, ~500 MB/s, NCQ depth 32.
    "ssd": TimingProfile("ssd", 150e-6, 500e6, 0.0, queue_depth=32, write_latency_s=50e-6),
    # A 7200 rpm disk: ~4 ms rotational latency, ~180 MB/s, ~15 ms full stroke, one at a time.
    # Anticipation: a 256 KiB write with an average seek takes 13.7 ms by this model;
    # 20 ms covers it and the grace around a predicted arrival.
    "hdd": TimingProfile("hdd", 4.2e-3, 180e6, 15e-3, queue_depth=1, anticipation_s=20e-3),
}

_KEYS = ("lat", "bw", "seek", "qd", "wlat", "wcache", "antic")
_USAGE = ("use one of " + ", ".join(PROFILES) + ", or latency_us,MBps,full_seek_ms,"
          "queue_depth[,write_us[,write_cache_MiB]] (or lat=,bw=,seek=,qd=,wlat=,wcache=,antic=)")


def parse_profile(spec: str) -> TimingProfile:
    """A named profile, or custom numbers (see the module docstring)."""
    if spec in PROFILES:
        return PROFILES[spec]
    err = ValueError(f"unknown timing profile {spec!r}: {_USAGE}")
    parts = [s.strip() for s in spec.split(",")]
    vals: dict[str, str] = {}
    if parts and all("=" in s for s in parts):
        for s in parts:
            k, _, v = s.partition("=")
            if k not in _KEYS or k in vals:
                raise err
            vals[k] = v
        if not {"lat", "qd"} <= set(vals):
            raise err
    elif 4 <= len(parts) <= 6 and not any("=" in s for s in parts):
        vals = dict(zip(_KEYS, parts))
    else:
        raise err
    try:
        lat = float(vals["lat"]) * 1e-6
        bw = _bandwidth(vals.get("bw", "0"))
        seek = float(vals.get("seek", "0")) * 1e-3
        depth = int(vals["qd"])
        wlat = float(vals.get("wlat", "0")) * 1e-6
        wcache = _write_cache(vals.get("wcache", "0"))
        antic = float(vals.get("antic", "0")) * 1e-3
    except UnitError as exc:
        raise ValueError(f"bad timing profile {spec!r}: {exc}") from None
    except ValueError:
        raise err from None
    if not all(math.isfinite(x) and x >= 0 for x in (lat, bw, seek, wlat, antic)) \
            or not 1 <= depth <= 1024 or wcache < 0 or antic > 1.0:
        raise ValueError(f"bad timing profile {spec!r}: times and rates must be finite and "
                         "not negative, queue depth 1..1024, anticipation at most 1000 ms")
    return TimingProfile("custom:" + spec, lat, bw, seek, depth, write_latency_s=wlat,
                         write_cache_bytes=wcache, anticipation_s=antic)


def _plain(text: str) -> bool:
    """A number with no unit, as the spec's historical parser (`float`) took it
    ('100', '2.5', '1e3', '+50'): such specs are stored in device.json and must load."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _bandwidth(text: str) -> float:
    """A profile's bandwidth: plain MB/s (the spec's historical unit), or a byte rate
    with its units ('1.5GiB/s')."""
    return float(text) * 1e6 if _plain(text) else parse_byte_rate(text)


def _write_cache(text: str) -> int:
    """A profile's write cache: plain MiB (the spec's historical unit), or a size with
    its units ('64M', '100MB')."""
    if _plain(text):
        return int(float(text) * (1 << 20))
    return parse_size(text, allow_zero=True, what="write cache")
