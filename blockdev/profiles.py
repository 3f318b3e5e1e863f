"""Timing profiles: the modeled service time of a simulated device.

The backing file is usually in the host's page cache and far faster than any real
device; a profile adds the time a real device of that class would take, so that
queueing, contention and scheduling are visible. `none` adds nothing.
"""

from __future__ import annotations

import dataclasses


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

    def service_time(self, nbytes: int, *, write: bool, seek_fraction: float = 0.0) -> float:
        """Modeled seconds to serve one request of `nbytes`.

        `seek_fraction` is the head travel as a fraction of the device (0..1).
        """
        t = self.latency_s + (self.write_latency_s if write else 0.0)
        if self.bandwidth_bps:
            t += nbytes / self.bandwidth_bps
        if self.full_seek_s and seek_fraction:
            # Short seeks cost roughly the square root of the distance (head settle
            # dominates), long ones approach the full-stroke time.
            t += self.full_seek_s * min(1.0, seek_fraction) ** 0.5
        return t

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
    "hdd": TimingProfile("hdd", 4.2e-3, 180e6, 15e-3, queue_depth=1),
}


def parse_profile(spec: str) -> TimingProfile:
    """A named profile, or custom numbers `latency_us,MBps,full_seek_ms,depth`."""
    if spec in PROFILES:
        return PROFILES[spec]
    try:
        lat, mbps, seek, depth = spec.split(",")
        return TimingProfile("custom:" + spec, float(lat) * 1e-6, float(mbps) * 1e6,
                             float(seek) * 1e-3, int(depth))
    except ValueError:
        raise ValueError(
            f"unknown timing profile {spec!r}: use one of {', '.join(PROFILES)} "
            "or latency_us,MBps,full_seek_ms,queue_depth") from None
