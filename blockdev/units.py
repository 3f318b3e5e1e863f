"""Units: the one parser and formatter of sizes and rates, for every layer and the CLI.

It lives in blockdev, the lowest layer, so that every package may import it (the
custom timing profiles parse here too); kernelshim re-exports it for fs.

The convention (README "Units" says the same to users):

- A size is a number of bytes with an optional suffix, case-insensitive:
  `K` `M` `G` `T` `P` `E` alone or with `iB` are binary (1024, 1024^2, ...), as in dd,
  fallocate and mount's size=: `512K`, `64M`, `64MiB`, `1.5G`;
  with a bare `B` they are decimal (1000, 1000^2, ...), as in dd: `64MB` is
  64,000,000 bytes. A plain number, or one ending in `B`, is bytes.
  A fraction is rounded down to a whole byte (`1.1G`); a size that rounds to 0 is
  refused unless zero is allowed. sluice has no bits anywhere: `b` means bytes too.
- A byte rate is a size per second, the same suffixes: `20MB/s` (20,000,000),
  `1.5GiB/s`, `20M/s` (20 MiB/s). `20Mbps` is refused: bits or bytes?
- An operation rate is `500iops`, with decimal prefixes only (`2Kiops` = 2000).
- A `Rate` (a reservation or a limit) is an operation rate, a byte rate or both,
  comma-separated: `500iops,20MB/s`; `none` is no rate at all.

Before this module, `--space 64MB` meant 64 MiB while `--io-limit 64MB/s` meant
64,000,000 bytes/s; the two disagreed and now follow one rule. Nothing persisted
depended on the old reading of `MB` in a size (volume.json and principals.json store
sizes as plain integers, rates as the strings `Rate` prints, which parse the same).

Formatting is exact and parses back to the same value (`format_size`, `str(Rate)`):
a decimal prefix where it divides evenly, else a binary one, else none
(`20MB/s`, `1536MiB/s`, `4KiB`, `4000iops`); `format_size_approx` is for tables.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import re
from decimal import Decimal, InvalidOperation

from .errors import SluiceError

#: the largest size accepted (what the control protocol's integers carry)
MAX_SIZE = 1 << 62
#: the largest rate accepted, in its unit per second
MAX_RATE = 1e15

_PREFIXES = "kmgtpe"

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(rf"^\s*{_NUMBER}\s*(?:([kmgtpe])(i?)(b?)|(b?))\s*$", re.IGNORECASE)
#: a bare number per second is refused (bytes or operations?), and so is `Mbps` (bits or
#: bytes?): '20B/s', '20M/s', '20MB/s'
_BYTE_RATE_RE = re.compile(rf"^\s*{_NUMBER}\s*(?:([kmgtpe])(i?)(b?)|(b))\s*/s\s*$",
                           re.IGNORECASE)
_IOPS_RE = re.compile(rf"^\s*{_NUMBER}\s*([kmgt]?)\s*iops\s*$", re.IGNORECASE)

SIZE_HELP = ("a number of bytes with an optional suffix: K, M, G, T (or KiB, MiB, ...) "
             "binary, KB, MB, GB, TB decimal")
RATE_HELP = "e.g. 20MB/s, 1.5GiB/s, 500iops, or both: 500iops,20MB/s; none for no rate"


class UnitError(SluiceError, ValueError):
    """A size or a rate that does not parse (the message names the bad text)."""

    errno = _errno.EINVAL


def _multiplier(prefix: str | None, binary: str, byte: str) -> int:
    """What a suffix multiplies by: a bare prefix or one with `i` is binary, one with
    a bare `B` decimal (see the module docstring)."""
    if not prefix:
        return 1
    power = _PREFIXES.index(prefix.lower()) + 1
    if byte and not binary:
        return 1000 ** power
    return 1024 ** power


def _decimal(num: str) -> Decimal:
    try:
        return Decimal(num)
    except InvalidOperation:  # the regex admits only digits and a point: cannot happen
        raise UnitError(f"bad number {num!r}") from None


def parse_size(text: str | int, *, allow_zero: bool = False, what: str = "size") -> int:
    """'4096', '512K', '1.5G', '10GiB' -> bytes (binary); '64MB' -> 64,000,000 (decimal).

    Raises UnitError naming `text` if it does not parse, is 0 (unless `allow_zero`) or
    exceeds MAX_SIZE."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    m = _SIZE_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise UnitError(f"bad {what} {text!r}: {SIZE_HELP}")
    num, prefix, binary, byte, _plain_b = m.groups()
    value = int(_decimal(num) * _multiplier(prefix, binary, byte))  # rounds down
    if value <= 0 and not (allow_zero and value == 0):
        raise UnitError(f"bad {what} {text!r}: must be positive")
    if value > MAX_SIZE:
        raise UnitError(f"bad {what} {text!r}: larger than the largest allowed "
                        f"({format_size(MAX_SIZE)})")
    return value


def parse_byte_rate(text: str) -> float:
    """'20MB/s' -> 20e6, '1.5GiB/s' -> 1.5 * 2**30 bytes per second (UnitError if bad)."""
    m = _BYTE_RATE_RE.match(text)
    if not m:
        raise UnitError(f"bad rate {text!r}: {RATE_HELP}")
    num, prefix, binary, byte, _plain_b = m.groups()
    return _positive_rate(text, float(_decimal(num) * _multiplier(prefix, binary, byte)))


def parse_iops(text: str) -> float:
    """'500iops' -> 500.0, '2Kiops' -> 2000.0 (decimal prefixes only; UnitError if bad)."""
    m = _IOPS_RE.match(text)
    if not m:
        raise UnitError(f"bad rate {text!r}: {RATE_HELP}")
    num, prefix = m.groups()
    mult = 1000 ** (_PREFIXES.index(prefix.lower()) + 1) if prefix else 1
    return _positive_rate(text, float(_decimal(num) * mult))


def _positive_rate(text: str, v: float) -> float:
    if not 0 < v < MAX_RATE:
        raise UnitError(f"bad rate {text!r}: must be positive and below {MAX_RATE:.0e}")
    return v


def _exact(v: float, unit: str) -> str:
    """`v` with the largest prefix that divides it evenly: decimal first, binary if only
    that divides (1536MiB, not 1.610612736GB); counts (iops) plain below a million."""
    prefix = ""
    if v == int(v):
        n = int(v)
        names: tuple[str, ...] = ("K", "M", "G", "T", "P", "E")
        base = 1000
        if n % 1000 and not n % 1024 and unit != "iops":
            base, names = (1024, ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))
        if unit == "iops":  # plain below a whole million (4000iops, not 4Kiops)
            base, names = (1000 ** 2, ("M", "T")) if n and not n % 1000 ** 2 else (1, ())
        for p in names:
            if n == 0 or n % base:
                break
            n, prefix = n // base, p
        text = str(n)
    else:
        text = repr(v) if "e" not in repr(v) else f"{v:f}"
    return f"{text}{prefix}{unit}"


def format_size(n: int) -> str:
    """Exact and parseable again: 4096 -> '4KiB', 67108864 -> '64MiB', 10**9 -> '1GB',
    1000 -> '1KB', 1500 -> '1500B'."""
    return _exact(n, "B")


def format_size_approx(n: int | None) -> str:
    """For tables: binary units with one decimal, '1.5GiB', '512.0KiB', '100B'; '-'
    for None (no limit)."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n}B"
    x = float(n)
    for p in ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"):
        x /= 1024
        if abs(x) < 1024 or p == "Ei":
            break
    return f"{x:.1f}{p}B"


def format_byte_rate(v: float) -> str:
    """Exact and parseable again: 20e6 -> '20MB/s', 1.5 * 2**30 -> '1536MiB/s'."""
    return _exact(v, "B/s")


def format_iops(v: float) -> str:
    """Exact and parseable again: 500 -> '500iops', 2e6 -> '2Miops'."""
    return _exact(v, "iops")


@dataclasses.dataclass(frozen=True, slots=True)
class Rate:
    """An I/O rate in operations per second (`iops`), in bytes per second (`bps`), or in
    both (None: not that unit). With both, the tighter applies: a limit of
    `1000iops,20MB/s` stops at whichever is reached first, and so does a reservation.

    Written `500iops`, `20MB/s` (decimal) or `1.5GiB/s` (binary), or both
    comma-separated, `500iops,20MB/s`; `none` is no rate at all (module docstring)."""

    iops: float | None = None
    bps: float | None = None

    @classmethod
    def parse(cls, text: str) -> Rate:
        if not isinstance(text, str):
            raise UnitError(f"bad rate {text!r}: {RATE_HELP}")
        if text.strip().lower() == "none":
            return cls()
        iops: float | None = None
        bps: float | None = None
        parts = text.split(",")
        if len(parts) > 2:
            raise UnitError(f"bad rate {text!r}: at most one IOPS and one bytes/s rate")
        for part in parts:
            if _IOPS_RE.match(part):
                if iops is not None:
                    raise UnitError(f"bad rate {text!r}: two IOPS rates")
                iops = parse_iops(part)
            elif _BYTE_RATE_RE.match(part):
                if bps is not None:
                    raise UnitError(f"bad rate {text!r}: two bytes/s rates")
                bps = parse_byte_rate(part)
            else:
                raise UnitError(f"bad rate {text!r}: {RATE_HELP}")
        return cls(iops, bps)

    @property
    def empty(self) -> bool:
        return self.iops is None and self.bps is None

    def units(self) -> tuple[str, ...]:
        return tuple(u for u, v in (("iops", self.iops), ("bps", self.bps)) if v is not None)

    def get(self, unit: str) -> float | None:
        return self.iops if unit == "iops" else self.bps

    def __str__(self) -> str:
        """Exact and parseable again (the string is what principals.json stores): a
        decimal prefix only where it divides evenly (20MB/s, 2Miops, 1536MiB/s), never
        '2e+06' or a rounded 1.61061GB/s; both rates as '500iops,20MB/s'."""
        out = []
        if self.iops is not None:
            out.append(format_iops(self.iops))
        if self.bps is not None:
            out.append(format_byte_rate(self.bps))
        return ",".join(out) or "none"


def format_rate(unit: str, v: float) -> str:
    """One rate in `unit` ('iops' or 'bps'), as in messages: '500iops', '20MB/s'."""
    return format_iops(v) if unit == "iops" else format_byte_rate(v)
