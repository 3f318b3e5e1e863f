#!/usr/bin/env python3
"""What the victim's requests waited behind, by kind of step (a measurement aid).

    .venv/bin/python scripts/looptrace/waited_behind.py TRACE.PID RESULT.json

TRACE.PID is a log of `bench_hostile.py --loop-trace TRACE` and RESULT.json that run's
`--json` (it holds the victim's timestamps). For every attacked victim request: the
loop steps run between its call and its own step (the step in progress at the call
included), labelled by task (a connection's by its principal) and the operations begun
in the step ("[cont]": none began: a step reading, parking, waking); their CPU time
per request over all requests, the slowest 5% and 1%; and the ten slowest requests.
"""

from __future__ import annotations

import bisect
import collections
import json
import sys


def main(trace: str, result: str) -> None:
    rows = [line.rstrip("\n").split("\t") for line in open(trace)]
    steps = sorted((float(r[4]), float(r[5]), float(r[3]), r[2], r[1]) for r in rows
                   if r[1] not in ("IO", "OP", "SEND", "GC") and len(r) > 5)
    st0 = [s[0] for s in steps]
    ops = sorted((float(r[4]), r[2]) for r in rows if r[1] == "OP")
    op0 = [o[0] for o in ops]
    root = [s for s in steps if s[4] == "shim-connection" and s[3] == "root"]
    root0 = [s[0] for s in root]

    def label(s: tuple[float, float, float, str, str]) -> str:
        i = bisect.bisect_left(op0, s[0])
        names: collections.Counter[str] = collections.Counter()
        while i < len(ops) and ops[i][0] < s[1]:
            names[ops[i][1]] += 1
            i += 1
        kind = "conn:" + s[3] if s[4] == "shim-connection" else s[4]
        kind = "accept" if kind.endswith("run") else kind
        top = ",".join(f"{k}x{v}" if v > 1 else k for k, v in names.most_common(3))
        return kind + (f"[{top}]" if top else "[cont]" if kind.startswith("conn") else "")

    per = []
    for t0, tm, t2, _rd in json.load(open(result))["stamps"]["attacked"]:
        for a, b in ((t0, tm), (tm, t2)):
            k = bisect.bisect_left(root0, a)
            if k >= len(root) or root[k][0] > b:
                continue
            lo, hi = bisect.bisect_left(st0, a), bisect.bisect_left(st0, root[k][0])
            if lo > 0 and steps[lo - 1][1] > a:
                lo -= 1  # the step in progress at the call
            ws = [(label(s), s[2], s[1] - s[0]) for s in steps[lo:hi]]
            per.append((b - a, sum(c for _, c, _ in ws), ws))
    per.sort(key=lambda x: x[0])
    n = len(per)
    print(f"{n} requests, p50 {per[n // 2][0] * 1e3:.3f} p99 {per[int(n * .99)][0] * 1e3:.3f} ms")
    for name, sub in (("all", per), ("slowest 5%", per[int(n * .95):]),
                      ("slowest 1%", per[int(n * .99):])):
        cpu: dict[str, float] = collections.defaultdict(float)
        cnt: collections.Counter[str] = collections.Counter()
        for _, _, ws in sub:
            for lab, c, _w in ws:
                cpu[lab] += c
                cnt[lab] += 1
        print(f"== {name}: {len(sub)} requests; daemon CPU waited behind per request "
              f"{sum(cpu.values()) / len(sub) * 1e3:.3f} ms, wall per request "
              f"{sum(x[0] for x in sub) / len(sub) * 1e3:.3f} ms")
        for lab, c in sorted(cpu.items(), key=lambda kv: -kv[1])[:12]:
            print(f"   {lab:44} {c / len(sub) * 1e3:7.3f} ms/request  {cnt[lab] / len(sub):5.2f} "
                  f"steps/request  {c / cnt[lab] * 1e3:.3f} ms/step")
    print("slowest 10 (label: CPU/wall ms):")
    for t, c, ws in per[-10:]:
        print(f"  {t * 1e3:.3f} ms, CPU behind {c * 1e3:.3f}: "
              + " ".join(f"{lab}:{cc * 1e3:.2f}/{w * 1e3:.2f}" for lab, cc, w in ws))


if __name__ == "__main__":
    main(*sys.argv[1:3])
