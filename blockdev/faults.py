"""Fault injection below the block device: a test and lab facility.

`FaultyBacking(inner, plan)` wraps any Backing and misbehaves as `plan` says — the
ways real disks fail, so the layers above can be shown to report them instead of
returning bad data or dying:

- EIO on reads or writes touching chosen blocks, or on a seeded fraction of requests;
- torn block writes: a write touching a chosen block (or a fraction of writes) stores
  only the first `torn_bytes` of that block and *reports success*, like a device that
  lost power half-way through a sector train. The checksum then disagrees, so every
  reader gets a ChecksumError: a torn block is detected, never returned as data;
- failing flushes (fsync EIO): the n-th flushes, or a fraction of them;
- latency spikes: a fraction of requests first waits `latency_s` on the trio clock
  (so tests on MockClock see exact times).

Everything is deterministic: the random draws come from `random.Random(seed)`, one per
request and kind of fault in call order, so the same request sequence meets the same
faults.

A mounted daemon loads a plan from the JSON file named by the environment variable
`SLUICE_FAULT_PLAN` (read in one place: the wiring in fs/mount.py). Its keys are the
fields of `FaultPlan`, for example

    {"seed": 7, "read_error_blocks": [120, 121], "flush_errors": [1],
     "torn_write_rate": 0.01, "latency_rate": 0.05, "latency_s": 0.02}

Never set it on a volume whose data you care about.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import trio

from .backing import Backing
from .errors import FormatError

log = logging.getLogger(__name__)

#: the environment variable a mounted daemon reads its fault plan from
FAULT_PLAN_ENV = "SLUICE_FAULT_PLAN"

_TARGETS = ("device", "checksums", "both")


@dataclasses.dataclass(frozen=True, slots=True)
class FaultPlan:
    """What to break. Block numbers are in units of the wrapped backing's block size
    (device blocks for the data, pages for the checksum file)."""

    seed: int = 0
    #: which backing of a device the plan applies to: "device", "checksums" or "both"
    target: str = "device"
    read_error_blocks: frozenset[int] = frozenset()
    write_error_blocks: frozenset[int] = frozenset()
    #: fraction (0..1) of read / write requests that fail with EIO
    read_error_rate: float = 0.0
    write_error_rate: float = 0.0
    torn_write_blocks: frozenset[int] = frozenset()
    torn_write_rate: float = 0.0
    #: bytes of a torn block that land (0: half the block)
    torn_bytes: int = 0
    #: 1-based ordinals of the flushes that fail with EIO
    flush_errors: frozenset[int] = frozenset()
    flush_error_rate: float = 0.0
    #: fraction of requests (reads, writes, discards, flushes) delayed by `latency_s`
    latency_rate: float = 0.0
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.target not in _TARGETS:
            raise ValueError(f"target must be one of {', '.join(_TARGETS)}, not {self.target!r}")
        for name in ("read_error_rate", "write_error_rate", "torn_write_rate",
                     "flush_error_rate", "latency_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within 0..1, not {v!r}")
        if self.latency_s < 0 or self.torn_bytes < 0:
            raise ValueError("latency_s and torn_bytes must not be negative")

    def describe(self) -> str:
        """The fields that differ from the defaults, for the log line."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                parts.append(f"{f.name}={sorted(v) if isinstance(v, frozenset) else v}")
        return ", ".join(parts) or "no faults"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaultPlan:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown keys {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(fields)})")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            default = fields[k].default
            if isinstance(default, frozenset):
                if not isinstance(v, list) or not all(isinstance(x, int) and x >= 0 for x in v):
                    raise ValueError(f"{k} must be a list of non-negative integers")
                kw[k] = frozenset(v)
            elif isinstance(default, float):
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise ValueError(f"{k} must be a number")
                kw[k] = float(v)
            elif isinstance(default, int):
                if not isinstance(v, int) or isinstance(v, bool):
                    raise ValueError(f"{k} must be an integer")
                kw[k] = v
            else:
                if not isinstance(v, str):
                    raise ValueError(f"{k} must be a string")
                kw[k] = v
        return cls(**kw)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FaultPlan:
        """Read a JSON plan; FormatError (one clear line) when it cannot be used."""
        try:
            d = json.loads(Path(path).read_text())
            if not isinstance(d, dict):
                raise ValueError("the plan must be a JSON object")
            return cls.from_dict(d)
        except (OSError, ValueError) as exc:
            raise FormatError(f"fault plan {os.fspath(path)}: {exc}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class FaultStatistics:
    read_errors: int
    write_errors: int
    torn_writes: int
    flush_errors: int
    latency_spikes: int


class FaultyBacking:
    """A Backing that fails as `plan` says. See the module docstring."""

    def __init__(self, inner: Backing, plan: FaultPlan, *, block_size: int) -> None:
        self.inner = inner
        self.plan = plan
        self.block_size = block_size
        self._rng = random.Random(plan.seed)
        self._flushes = 0
        self.read_errors = self.write_errors = self.torn_writes = 0
        self.flush_errors = self.latency_spikes = 0
        log.warning("fault injection active on %s: %s", inner.name, plan.describe())

    @property
    def name(self) -> str:
        return f"faulty:{self.inner.name}"

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def can_discard(self) -> bool:
        return self.inner.can_discard

    def _draw(self, rate: float) -> bool:
        # No draw for a rate of 0: a plan without rates consumes no randomness, so
        # adding one kind of fault leaves the others where they were.
        return rate > 0.0 and self._rng.random() < rate

    def _blocks(self, offset: int, length: int) -> range:
        bs = self.block_size
        return range(offset // bs, -(-(offset + length) // bs))

    async def _maybe_delay(self) -> None:
        if self._draw(self.plan.latency_rate) and self.plan.latency_s:
            self.latency_spikes += 1
            await trio.sleep(self.plan.latency_s)

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    async def read_into(self, offset: int, out: memoryview) -> None:
        await self._maybe_delay()
        hit = self.plan.read_error_blocks.intersection(self._blocks(offset, len(out)))
        if self._draw(self.plan.read_error_rate) or hit:
            self.read_errors += 1
            raise OSError(errno.EIO, "injected read error")
        await self.inner.read_into(offset, out)

    async def write(self, offset: int, data: memoryview) -> None:
        await self._maybe_delay()
        blocks = self._blocks(offset, len(data))
        if self._draw(self.plan.write_error_rate) or \
                self.plan.write_error_blocks.intersection(blocks):
            self.write_errors += 1
            raise OSError(errno.EIO, "injected write error")
        torn = sorted(self.plan.torn_write_blocks.intersection(blocks))
        if not torn and self._draw(self.plan.torn_write_rate):
            torn = [self._rng.choice(blocks)]
        if not torn:
            await self.inner.write(offset, data)
            return
        # Store everything but the torn blocks' tails, and say nothing.
        bs = self.block_size
        keep = self.plan.torn_bytes or bs // 2
        mv = memoryview(data).cast("B")
        pos = offset
        end = offset + len(mv)
        for b in torn:
            cut = min(max(b * bs, offset) + keep, (b + 1) * bs, end)
            if cut > pos:
                await self.inner.write(pos, mv[pos - offset:cut - offset])
            pos = max(pos, min((b + 1) * bs, end))
            self.torn_writes += 1
            log.info("injected torn write: %d of %d bytes of block %d landed", keep, bs, b)
        if pos < end:
            await self.inner.write(pos, mv[pos - offset:])

    async def discard(self, offset: int, length: int) -> None:
        await self._maybe_delay()
        await self.inner.discard(offset, length)

    async def flush(self) -> None:
        await self._maybe_delay()
        self._flushes += 1
        if self._flushes in self.plan.flush_errors or self._draw(self.plan.flush_error_rate):
            self.flush_errors += 1
            raise OSError(errno.EIO, "injected flush error")
        await self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    def statistics(self) -> FaultStatistics:
        return FaultStatistics(self.read_errors, self.write_errors, self.torn_writes,
                               self.flush_errors, self.latency_spikes)
