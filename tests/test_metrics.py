"""Live metrics (`sluice mount --metrics ADDRESS:PORT`): a real mount, real programs run
as two principals, the endpoint scraped over TCP and parsed with the Prometheus client
library's own parser, and compared with `sluice stats --json`. Hostile scrapers
(garbage, oversized heads, connections that never finish their request) do not stop
it, nor the mount."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import is_mounted, make_volume, sluice
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from fs.metrics import MAX_CONNECTIONS, StatsCollector, io_rows, parse_address

# -- pure: the address and the rendering ----------------------------------------------------

def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("localhost:80") == ("localhost", 80)
    for bad in ("9464", ":9464", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:x", "::1:9464",
                "[nope]:1"):
        with pytest.raises(ValueError):
            parse_address(bad)


def _families(text: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of a scrape, by the library's parser."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_collector_renders_the_documented_io_shape_and_escapes_names() -> None:
    """The scheduler's statistics shape (`io`, per principal name) becomes counters and a
    summary; a principal name with quotes, a backslash and a newline is escaped, and
    reads back exactly through the parser."""
    evil = 'a"b\\c\nd'
    st = {"io": {"alice": {"read_bytes": 4096, "write_bytes": 8192, "ops": 3,
                           "latency_us": {"p50": 100.0, "p95": 200.0, "p99": 300.0,
                                          "max": 400.0}, "waiting": 2},
                 evil: {"read_bytes": 1, "write_bytes": 0, "ops": 1,
                        "latency_us": {"p50": 1.0, "p95": 1.0, "p99": 1.0, "max": 1.0}}},
          "device": {"profile": "hdd", "scheduler": "mclock", "checksum_errors": 0,
                     "capacity": {"iops": 200.0, "bytes_per_s": 180e6}},
          "pager": {"frames": 10, "frames_used": 1, "hits": 5, "misses": 6, "evictions": 0,
                    "bypassed_blocks": 0, "resident": {"alice": 1}}}
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatsCollector(lambda: st))
    m = _families(generate_latest(reg).decode())
    assert m["sluice_io_bytes_total"][(("op", "read"), ("principal", "alice"))] == 4096
    assert m["sluice_io_bytes_total"][(("op", "write"), ("principal", "alice"))] == 8192
    assert m["sluice_io_requests_total"][(("principal", "alice"),)] == 3
    lat = m["sluice_io_latency_seconds"]
    assert lat[(("principal", "alice"), ("quantile", "0.95"))] == pytest.approx(200e-6)
    assert lat[(("principal", "alice"), ("quantile", "0.99"))] == pytest.approx(300e-6)
    assert m["sluice_io_latency_max_seconds"][(("principal", "alice"),)] == pytest.approx(4e-4)
    assert m["sluice_io_waiting_requests"][(("principal", "alice"),)] == 2
    assert m["sluice_io_bytes_total"][(("op", "read"), ("principal", evil))] == 1
    assert m["sluice_device_capacity_iops"][()] == 200
    assert m["sluice_cache_frames"][(("principal", "alice"),)] == 1


# -- a live mount ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, timeout: float = 30) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def stats_json(mnt: Path) -> dict:
    return json.loads(sluice("stats", str(mnt), "--json").stdout)


def run_as(mnt: Path, principal: str, cmd: str) -> str:
    return sluice("run", str(mnt), "--principal", principal, "--", "sh", "-c", cmd).stdout


@pytest.fixture
def metrics_mount(tmp_path: Path, mount_factory):
    vol = make_volume(tmp_path / "vol", "1G", "--profile", "ssd")
    port = free_port()
    m = mount_factory(vol, "--metrics", f"127.0.0.1:{port}", "--cache-size", "4M")
    yield m, port
    assert m.daemon_alive, "the daemon died during the test"


@pytest.mark.mounted
def test_scrape_matches_stats_json_after_real_io_by_two_principals(metrics_mount) -> None:
    m, port = metrics_mount
    mnt = m.path
    for name in ("alice", "bob"):
        sluice("principal", "add", str(mnt), name)
    # Real programs, each as its principal: alice writes 8 MiB and reads it back (the
    # 4 MiB pool cannot hold it, so the reads reach the device), bob copies 1 MiB.
    run_as(mnt, "alice", f"dd if=/dev/urandom of={mnt}/a bs=1M count=8 conv=fsync status=none"
                         f" && cat {mnt}/a > /dev/null")
    run_as(mnt, "bob", f"head -c 1M /dev/urandom > {mnt}/b && cp {mnt}/b {mnt}/b2 && sync")
    assert (mnt / "b").read_bytes() == (mnt / "b2").read_bytes()
    # The daemon is idle now: two scrapes around one `stats --json` agree with each other
    # (nothing moved in between) and with it.
    first = _families(scrape(port))
    st = stats_json(mnt)
    time.sleep(0.2)  # past the render reuse interval: the second scrape is a fresh render
    second = _families(scrape(port))
    assert first["sluice_io_bytes_total"] == second["sluice_io_bytes_total"]
    rows = io_rows(st)
    assert {"alice", "bob"} <= set(rows)
    for name in ("alice", "bob"):
        r = rows[name]
        assert r.write_bytes > 0 and r.ops > 0, (name, r)
        lbl = ("principal", name)
        assert second["sluice_io_bytes_total"][(("op", "read"), lbl)] == r.read_bytes
        assert second["sluice_io_bytes_total"][(("op", "write"), lbl)] == r.write_bytes
        assert second["sluice_io_requests_total"][(lbl,)] == r.ops
        assert second["sluice_io_latency_seconds_count"][(lbl,)] == r.ops
        lat = second["sluice_io_latency_seconds"]
        assert lat[(lbl, ("quantile", "0.5"))] == pytest.approx(r.p50_s, rel=1e-9)
        assert lat[(lbl, ("quantile", "0.99"))] == pytest.approx(r.p99_s, rel=1e-9)
        assert second["sluice_io_latency_max_seconds"][(lbl,)] == pytest.approx(r.max_s,
                                                                               rel=1e-9)
        assert second["sluice_cache_frames"].get((lbl,), 0) == st["pager"]["resident"].get(name, 0)
    # alice wrote 8 MiB and read what the pool could not keep; bob wrote at least 2 MiB.
    assert rows["alice"].write_bytes >= 8 << 20 and rows["alice"].read_bytes >= 4 << 20
    assert rows["bob"].write_bytes >= 2 << 20
    assert second["sluice_cache_misses_total"][()] == st["pager"]["misses"]
    assert second["sluice_device_info"][(("profile", "ssd"),
                                         ("scheduler", st["device"]["scheduler"]))] == 1


def _raw(port: int, payload: bytes, *, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except ConnectionResetError:
                break
            if not c:
                break
            chunks.append(c)
    return b"".join(chunks)


@pytest.mark.mounted
def test_hostile_scrapers_do_not_stop_it(metrics_mount) -> None:
    m, port = metrics_mount
    mnt = m.path
    # Garbage, a wrong method, an unknown path, an oversized head: each gets an error
    # status and the connection closed.
    assert _raw(port, b"\x00\xff" * 100 + b"\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _raw(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert _raw(port, b"GET /secret HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"
    try:
        assert _raw(port, big).startswith(b"HTTP/1.1 431")
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while we were still sending: refused all the same
    # Slowloris: many more connections than it serves at once, each sending half a
    # request line and then nothing (and one trickling a byte at a time).
    held = []
    try:
        for _ in range(4 * MAX_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /met")
            held.append(s)
        # A real scrape still gets through while they hold on, and so does the mount.
        text = scrape(port)
        assert "sluice_io_bytes_total" in text
        (mnt / "still").write_bytes(b"served")
        assert (mnt / "still").read_bytes() == b"served"
        assert stats_json(mnt)["fs"]["inodes"] >= 2
    finally:
        for s in held:
            s.close()
    # A scraper that never sends anything is cut off by the deadline, not held forever.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < 29
    assert "sluice_io_requests_total" in scrape(port)
    assert m.daemon_alive


@pytest.mark.mounted
def test_metrics_option_errors_are_one_line(tmp_path: Path) -> None:
    vol = make_volume(tmp_path / "vol", "64M")
    mp = tmp_path / "mnt"
    mp.mkdir()
    for bad, words in (("9464", "not ADDRESS:PORT"), ("127.0.0.1:70000", "port"),
                       ("::1:9464", "brackets")):
        r = sluice("mount", str(vol), str(mp), "--metrics", bad, check=False)
        assert r.returncode == 2, r.stderr  # (a malformed value: a usage error, stop 23)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "--metrics" in lines[0] and words in lines[0], r.stderr
        assert not is_mounted(mp)
    # A port someone else holds: the mount fails with one line and nothing is mounted.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = sluice("mount", str(vol), str(mp), "--metrics", f"127.0.0.1:{port}", check=False)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot serve metrics on 127.0.0.1" in lines[0], r.stderr
    assert not is_mounted(mp)
    assert not os.listdir(mp)
    # ... and the daemon's log says it in its own format, not as a bare line (probe 27,
    # F11): a timestamp and the level, as every other line
    said = [ln for ln in (vol / "sluice.log").read_text().splitlines()
            if "cannot serve metrics" in ln]
    assert said and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ERROR ", ln)
                        for ln in said), said


# -- sluice stats --watch --------------------------------------------------------------------

def _tables(text: str) -> list[list[str]]:
    """The tables of `stats --watch` output printed into a pipe (blank-line separated
    blocks from each `volume:` line on)."""
    out: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("volume:"):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def _row(table: list[str], name: str) -> list[str]:
    return next(line.split() for line in table if line.split()[:1] == [name])


@pytest.mark.mounted
def test_stats_watch_into_a_pipe_prints_one_table_per_interval_with_rates(metrics_mount) -> None:
    import subprocess
    import sys

    from conftest import REPO, SLUICE
    m, _ = metrics_mount
    mnt = m.path
    sluice("principal", "add", str(mnt), "alice")
    # alice writes through the mount for as long as the watch runs.
    writer = subprocess.Popen(
        [*SLUICE, "run", str(mnt), "--principal", "alice", "--", sys.executable, "-c",
         f"import os\nfd = os.open({str(mnt / 'w')!r}, os.O_WRONLY | os.O_CREAT)\n"
         "for i in range(100000):\n    os.pwrite(fd, b'w' * 65536, (i % 64) * 65536)\n"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watch = None
    try:
        while not (mnt / "w").exists() or (mnt / "w").stat().st_size < 65536:
            assert writer.poll() is None, writer.stderr.read()
            time.sleep(0.05)
        watch = subprocess.Popen([*SLUICE, "stats", str(mnt), "--watch", "0.5"], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        while len(_tables("\n".join(lines))) < 4:
            line = watch.stdout.readline()
            assert line, watch.stderr.read()
            lines.append(line.rstrip("\n"))
    finally:
        if watch is not None:
            watch.terminate()
            watch.communicate(timeout=30)
        writer.kill()
        writer.communicate(timeout=30)
    text = "\n".join(lines)
    assert "\x1b" not in text  # not a terminal: no escape codes
    tables = _tables(text)[:3]
    for t in tables:
        assert any(line.split()[:3] == ["PRINCIPAL", "IOPS", "READ"] for line in t), t
        assert _row(t, "root") and _row(t, "alice")
    assert _row(tables[0], "alice")[1] == "-"  # no rate before a second sample
    for t in tables[1:]:
        r = _row(t, "alice")
        iops, write_mbs = float(r[1]), float(r[3])
        assert iops > 0 and write_mbs > 0, t  # it was writing all along
        assert float(r[5]) >= float(r[4]) > 0  # p99 >= p50, both recorded


def test_cache_hits_are_read_from_the_statistics_cache_part() -> None:
    """Per-principal hits and misses are where `stats --json` keeps them, under "cache"
    (they were looked for under "pager", where they never were: W-1 of the new user's
    report)."""
    from fs.metrics import cache_hits
    st = {"pager": {"frames": 16, "frames_used": 3, "hits": 9, "misses": 3, "resident": {}},
          "cache": {"alice": {"frames": 3, "hits": 9, "misses": 3}, "bob": {"hits": 0}}}
    assert cache_hits(st) == {"alice": (9, 3), "bob": (0, None)}
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatsCollector(lambda: st))
    m = _families(generate_latest(reg).decode())
    assert m["sluice_cache_principal_hits_total"] == {(("principal", "alice"),): 9,
                                                      (("principal", "bob"),): 0}
    assert m["sluice_cache_principal_misses_total"] == {(("principal", "alice"),): 3}


@pytest.mark.mounted
def test_a_principals_cache_hits_reach_watch_and_metrics(metrics_mount) -> None:
    """After alice reads a file she has read before, her cache hits rise in the
    /metrics scrape and show in `stats --watch`'s HITS column (it was always `-`)."""
    import subprocess

    from conftest import REPO, SLUICE
    m, port = metrics_mount
    mnt = m.path
    sluice("principal", "add", str(mnt), "alice")
    run_as(mnt, "alice", f"head -c 1M /dev/urandom > {mnt}/a && cat {mnt}/a > /dev/null")
    lbl = (("principal", "alice"),)
    before = _families(scrape(port))["sluice_cache_principal_hits_total"][lbl]
    run_as(mnt, "alice", f"cat {mnt}/a {mnt}/a > /dev/null")
    time.sleep(0.2)  # past the render reuse interval
    after = _families(scrape(port))
    st = stats_json(mnt)
    hits = after["sluice_cache_principal_hits_total"][lbl]
    assert hits == st["cache"]["alice"]["hits"] and hits >= before + 256, (before, hits)
    assert after["sluice_cache_principal_misses_total"][lbl] == st["cache"]["alice"]["misses"]
    watch = subprocess.Popen([*SLUICE, "stats", str(mnt), "--watch", "0.2"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        while len(_tables("\n".join(lines))) < 2:
            line = watch.stdout.readline()
            assert line, watch.stderr.read()
            lines.append(line.rstrip("\n"))
    finally:
        watch.terminate()
        watch.communicate(timeout=30)
    t = _tables("\n".join(lines))[0]
    assert any(line.split()[-1:] == ["HITS"] for line in t), t
    assert int(_row(t, "alice")[-1]) == hits, t


@pytest.mark.mounted
def test_stats_watch_on_a_terminal_redraws_in_place(metrics_mount) -> None:
    import pty
    import signal
    import subprocess

    from conftest import REPO, SLUICE
    m, _ = metrics_mount
    master, slave = pty.openpty()
    watch = subprocess.Popen([*SLUICE, "stats", str(m.path), "--watch", "0.2"], cwd=REPO,
                             stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = b""
    try:
        while out.count(b"\x1b[H") < 3:
            chunk = os.read(master, 65536)
            assert chunk
            out += chunk
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=30) == 130
        try:
            while chunk := os.read(master, 65536):
                out += chunk
        except OSError:  # EIO: the other side is closed
            pass
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        os.close(master)
    text = out.decode()
    assert text.startswith("\x1b[?25l\x1b[2J\x1b[H")  # hide the cursor, clear, home
    frames = text.split("\x1b[H")[1:]
    assert all("PRINCIPAL" in f and "root" in f for f in frames[:3])
    assert text.rstrip().endswith("\x1b[?25h")  # the cursor is given back
    assert "Traceback" not in text


@pytest.mark.mounted
def test_metrics_show_every_principal_unlike_a_users_stats(tmp_path: Path) -> None:
    """The README's warning, checked: a non-root user's `sluice stats` hides other
    tenants; the metrics endpoint (the operator's view) shows them all."""
    import shutil
    import tempfile

    from conftest import Mount
    from shim_util import USER_PY, user_run
    vol = make_volume(tmp_path / "vol", "256M", "--profile", "ssd")
    base = Path(tempfile.mkdtemp(prefix="sluice-pub-", dir="/tmp"))  # reachable by uid 1000
    os.chmod(base, 0o755)
    mp = base / "mnt"
    mp.mkdir()
    port = free_port()
    m = Mount(vol, mp, None, tmp_path / "pub-daemon.log")
    try:
        m.start("--metrics", f"127.0.0.1:{port}")
        sluice("principal", "add", str(mp), "alice")
        run_as(mp, "alice", f"head -c 64K /dev/urandom > {mp}/secret-work && sync")
        r = user_run([USER_PY, "-m", "fs.cli", "stats", str(mp), "--json"], 1000)
        assert r.returncode == 0, r.stderr
        theirs = json.loads(r.stdout)
        assert "alice" not in theirs["io"] and "alice" not in json.dumps(theirs["principals"])
        ours = _families(scrape(port))
        assert ours["sluice_io_bytes_total"][(("op", "write"), ("principal", "alice"))] > 0
        assert m.daemon_alive
    finally:
        m.stop()
        if not os.path.ismount(mp):
            shutil.rmtree(base, ignore_errors=True)
