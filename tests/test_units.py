"""Units: one parser and formatter of sizes and rates (blockdev/units.py) for the CLI,
the principal banks, the mount options and the custom timing profiles.

The convention: bare K/M/G/T and KiB/MiB/... are binary, KB/MB/GB/... decimal, for
sizes and byte rates alike; IOPS prefixes are decimal. What the code before it wrote
(principals.json rates, device.json profile specs) still loads to the same values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import sluice
from blockdev import parse_profile
from kernelshim import Rate, UnitError, format_size, format_size_approx, parse_size
from kernelshim.principals import FILE, PrincipalError, PrincipalTable

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize("text, value", [
    ("4096", 4096), ("4096B", 4096), ("4096b", 4096), (" 7 ", 7),
    ("512K", 512 * KiB), ("512k", 512 * KiB), ("512KiB", 512 * KiB), ("512kib", 512 * KiB),
    ("64M", 64 * MiB), ("64MiB", 64 * MiB), ("64Mi", 64 * MiB), ("1.5G", 3 * GiB // 2), ("10GiB", 10 * GiB),
    ("2T", 2 * TiB), ("1P", 1 << 50), ("1E", 1 << 60),
    # a bare B makes the prefix decimal, as in dd and fallocate
    ("64MB", 64_000_000), ("64mb", 64_000_000), ("1KB", 1000), ("1kB", 1000),
    ("8GB", 8_000_000_000), ("2TB", 2 * 10 ** 12),
    # fractions round down to a whole byte
    ("0.3K", 307), ("1.1G", 1181116006), (".5K", 512), ("5.", 5),
])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "12Q", "5zz", "-5G", "1e3", "lots", "1.2.3M",
                                  "64 M B", "0x10", "64MBs", "64iB", "20MB/s", "nan", "inf"])
def test_bad_sizes_name_the_text(text: str) -> None:
    with pytest.raises(UnitError) as e:
        parse_size(text)
    assert f"bad size {text!r}" in str(e.value)
    assert "\n" not in str(e.value)


def test_size_bounds() -> None:
    for zero in ("0", "0K", "0.1", "0.0001K"):
        with pytest.raises(UnitError, match="must be positive"):
            parse_size(zero)
        assert parse_size(zero, allow_zero=True) == 0
    assert parse_size("4E") == 1 << 62
    with pytest.raises(UnitError, match="larger than"):
        parse_size("4.1E")
    with pytest.raises(UnitError, match="bad block size '3Q'"):
        parse_size("3Q", what="block size")
    assert isinstance(UnitError("x"), ValueError)  # a malformed file: "malformed"


@pytest.mark.parametrize("text, iops, bps", [
    ("500iops", 500, None), ("500 IOPS", 500, None), ("2Kiops", 2000, None),
    ("2Miops", 2e6, None), ("1.5kiops", 1500, None),
    ("20MB/s", None, 20e6), ("20mb/s", None, 20e6), ("20KB/s", None, 20e3),
    ("1.5GiB/s", None, 1.5 * GiB), ("1536MiB/s", None, 1536 * MiB),
    ("20M/s", None, 20 * MiB), ("20B/s", None, 20), ("0.5B/s", None, 0.5),
    ("500iops,20MB/s", 500, 20e6), ("20MB/s, 500iops", 500, 20e6),
    ("none", None, None), (" NONE ", None, None),
])
def test_rates(text: str, iops: float | None, bps: float | None) -> None:
    r = Rate.parse(text)
    assert (r.iops, r.bps) == (iops, bps)


@pytest.mark.parametrize("text, why", [
    ("fast", "e.g. 20MB/s"), ("5zz", "e.g. 20MB/s"), ("20/s", "e.g."),
    ("20Mbps", "e.g."), ("20MBps", "e.g."), ("20MB", "e.g."), ("2Kiiops", "e.g."),
    ("1Piops", "e.g."),
    ("0iops", "positive"), ("0MB/s", "positive"), ("2000TB/s", "below"),
    ("1iops,2iops", "two IOPS"), ("1MB/s,2MB/s", "two bytes/s"),
    ("1iops,2MB/s,3iops", "at most one"),
])
def test_bad_rates_name_the_text(text: str, why: str) -> None:
    with pytest.raises(UnitError) as e:
        Rate.parse(text)
    assert f"bad rate {text!r}" in str(e.value) and why in str(e.value)


def test_the_two_old_parsers_agree_now() -> None:
    """The bug this module fixes: `--space 64MB` read 64 MiB, `--io-limit 64MB/s`
    64,000,000 bytes/s. One rule for both now."""
    assert parse_size("64MB") == Rate.parse("64MB/s").bps == 64_000_000
    assert parse_size("64M") == parse_size("64MiB") == Rate.parse("64M/s").bps \
        == Rate.parse("64MiB/s").bps == 64 * MiB


@pytest.mark.parametrize("value, text", [
    (4096, "4KiB"), (64 * MiB, "64MiB"), (GiB, "1GiB"), (10 ** 9, "1GB"), (1000, "1KB"),
    (1500, "1500B"), (1, "1B"), (3 * GiB // 2, "1536MiB"),
])
def test_format_size(value: int, text: str) -> None:
    assert format_size(value) == text
    assert parse_size(text) == value


def test_format_size_approx() -> None:
    assert [format_size_approx(n) for n in (None, 0, 1023, 1024, 1536 * MiB, 5 * TiB)] \
        == ["-", "0B", "1023B", "1.0KiB", "1.5GiB", "5.0TiB"]


@given(st.integers(min_value=1, max_value=1 << 62))
def test_sizes_print_exactly_and_parse_back(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.one_of(st.integers(min_value=1, max_value=10 ** 14).map(float),
                 st.floats(min_value=0.001, max_value=1e14, allow_nan=False)),
       st.booleans())
def test_rates_print_exactly_and_parse_back(v: float, iops: bool) -> None:
    r = Rate(iops=v) if iops else Rate(bps=v)
    assert Rate.parse(str(r)) == r
    both = Rate(iops=v, bps=v)
    assert Rate.parse(str(both)) == both


# -- what the code before this module wrote still loads ------------------------------------

#: principals.json as the previous code saved it (its Rate printed these strings; the
#: sizes are plain integers), with the spellings its parser accepted
OLD_PRINCIPALS = {
    "root": {"banks": {"space": None, "inodes": None, "cache_min": 0, "cache_max": None,
                       "io_reserve": "4000iops,40MB/s", "io_weight": 100, "io_limit": None,
                       "grants": None, "caps": None, "connections": None, "shm": None,
                       "children": None}},
    "principals": [
        {"id": 1, "name": "alice", "parent": "root", "owner_uid": 1000,
         "banks": {"space": 10 * GiB, "inodes": 100000, "cache_min": 64 * MiB,
                   "cache_max": 512 * MiB, "io_reserve": "500iops,20MB/s", "io_weight": 200,
                   "io_limit": "2Miops,1536MiB/s", "grants": 4096, "caps": 4096}},
        {"id": 3, "name": "batch", "parent": "alice", "owner_uid": 1000,
         "banks": {"space": 2 * GiB, "io_reserve": "100iops,1500.5B/s",
                   "io_limit": "1.5gib/s"}},
        {"id": 4, "name": "bob", "parent": "root", "owner_uid": 1001,
         "banks": {"io_reserve": "2Kiops", "io_limit": "20kb/s"}},
    ],
    "next_id": 5,
}


def test_principals_saved_by_the_old_code_load(tmp_path: Path) -> None:
    (tmp_path / FILE).write_text(json.dumps(OLD_PRINCIPALS, indent=1))
    t = PrincipalTable.load(tmp_path)
    root, alice, batch, bob = (t.get(n) for n in ("root", "alice", "batch", "bob"))
    assert root.banks.io_reserve == Rate(4000, 40e6)
    assert (alice.banks.space, alice.banks.cache_min, alice.banks.cache_max) \
        == (10 * GiB, 64 * MiB, 512 * MiB)
    assert alice.banks.io_reserve == Rate(500, 20e6)
    assert alice.banks.io_limit == Rate(2e6, 1536 * MiB)
    assert batch.banks.io_reserve == Rate(100, 1500.5)
    assert batch.banks.io_limit == Rate(None, 1.5 * GiB)
    assert bob.banks.io_reserve == Rate(2000, None) and bob.banks.io_limit == Rate(None, 20e3)
    assert [p.name for p in t.walk()] == ["root", "alice", "batch", "bob"]
    # Saved again: the same values, each rate in its exact printed form.
    t.save()
    again = PrincipalTable.load(tmp_path)
    for name in ("root", "alice", "batch", "bob"):
        assert again.get(name).banks == t.get(name).banks
    saved = {r["name"]: r["banks"] for r in json.loads((tmp_path / FILE).read_text())
             ["principals"]}
    assert saved["alice"]["io_limit"] == "2Miops,1536MiB/s"
    assert saved["batch"]["io_limit"] == "1536MiB/s"
    assert saved["bob"]["io_limit"] == "20KB/s"


def test_a_bad_rate_in_principals_json_is_one_clear_error(tmp_path: Path) -> None:
    bad = json.loads(json.dumps(OLD_PRINCIPALS))
    bad["principals"][0]["banks"]["io_limit"] = "20 parsecs"
    (tmp_path / FILE).write_text(json.dumps(bad))
    with pytest.raises(PrincipalError, match="malformed.*bad rate '20 parsecs'"):
        PrincipalTable.load(tmp_path)


def test_profile_specs_of_the_old_code_parse_the_same() -> None:
    """device.json keeps a custom profile's spec as given: plain numbers are MB/s and
    MiB as before; units are accepted too."""
    old = parse_profile("lat=2000,bw=50,seek=0,qd=2,wlat=500,wcache=16")
    assert (old.bandwidth_bps, old.write_cache_bytes) == (50e6, 16 * MiB)
    assert parse_profile("2000,50,0,2,500,16") == \
        parse_profile("2000,50,0,2,500,16")  # positional, as before
    new = parse_profile("lat=2000,bw=50MB/s,seek=0,qd=2,wlat=500,wcache=16M")
    assert (new.bandwidth_bps, new.write_cache_bytes) == (50e6, 16 * MiB)
    assert parse_profile("lat=1,bw=1.5GiB/s,qd=1,wcache=100MB").bandwidth_bps == 1.5 * GiB
    assert parse_profile("lat=1,bw=1,qd=1,wcache=100MB").write_cache_bytes == 100_000_000
    # Whatever float() took before is still a plain number (such specs are saved).
    assert parse_profile("lat=100,bw=1e3,qd=2").bandwidth_bps == 1e9
    assert parse_profile("lat=100,bw=+50,qd=2").bandwidth_bps == 50e6
    assert parse_profile("lat=100,bw=50,qd=2,wcache=1e1").write_cache_bytes == 10 * MiB
    with pytest.raises(ValueError, match="bad rate '5zz'"):
        parse_profile("lat=1,bw=5zz,qd=1")


# -- the CLI: usage errors name the bad value --------------------------------------------

def _usage_error(r, *fragments: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.mark.parametrize("args, bad", [
    (("principal", "set", "/nonexistent", "x", "--io-limit", "5zz"), "bad rate '5zz'"),
    (("principal", "add", "/nonexistent", "x", "--io-reserve", "20Mbps"), "bad rate '20Mbps'"),
    (("principal", "add", "/nonexistent", "x", "--space", "1.5X"), "bad size '1.5X'"),
    (("principal", "set", "/nonexistent", "x", "--cache-min=-1M"), "bad size '-1M'"),
    (("principal", "set", "/nonexistent", "x", "--cache-max", "64MBi"), "bad size '64MBi'"),
    (("mkfs", "/nonexistent/v", "--size", "8QB"), "bad size '8QB'"),
    (("mkfs", "/nonexistent/v", "--size", "0"), "must be positive"),
    (("mount", "/nonexistent/v", "/nonexistent/m", "--cache-size", "lots"), "bad size 'lots'"),
])
def test_cli_units_are_checked_before_anything_runs(args: tuple[str, ...], bad: str) -> None:
    _usage_error(sluice(*args, check=False), bad)


@pytest.mark.mounted
def test_banks_with_units_on_a_mounted_volume(mnt: Path) -> None:
    """Each spelling reaches the table as the convention says, and `principal ls`
    shows it in base units."""
    sluice("principal", "add", str(mnt), "u", "--space", "64MB", "--cache-max", "1MiB",
           "--cache-min", "512K", "--io-limit", "20M/s", "--io-limit", "2Kiops",
           "--shm", "1M")
    rows = {r["name"]: r for r in json.loads(sluice("principal", "ls", str(mnt),
                                                    "--json").stdout)}
    b = rows["u"]["banks"]
    assert (b["space"], b["cache_max"], b["cache_min"], b["shm"]) \
        == (64_000_000, MiB, 512 * KiB, MiB)
    assert (b["io_limit"], b["io_limit_iops"], b["io_limit_bps"]) \
        == ("2000iops,20MiB/s", 2000, 20 * MiB)
    # A guarantee of 0 is a bank, not a usage error; so is an empty space bank.
    sluice("principal", "set", str(mnt), "u", "--cache-min", "0", "--space", "0")
    rows = {r["name"]: r for r in json.loads(sluice("principal", "ls", str(mnt),
                                                    "--json").stdout)}
    assert (rows["u"]["banks"]["cache_min"], rows["u"]["banks"]["space"]) == (0, 0)
    table = sluice("principal", "ls", str(mnt)).stdout
    assert "0B/0B" in table and "0B/1.0MiB" in table, table
