"""Benchmark: aerate-agent's cost while idle, and through one pass, on this machine's kernel.

The agent runs as its own process on a raw pty; a host end (the real protocol endpoint)
syncs and acks. Phase 1 lets it aerate once (a bounded amount of memory, so the machine
keeps its free memory); phase 2 measures it idle, with the host connected and statistics
flowing, for --idle seconds. Printed beside the targets of issue 2: idle CPU < 0.2 % of one
core, RSS < 30 MiB.

    sudo .venv/bin/python tests/perf/bench_agent.py [--smoke] [--idle 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "host"))

from test_agent import Host, agent_argv, reserve_for  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="10 s idle instead of 60")
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--aerate-mib", type=int, default=256)
    args = ap.parse_args(argv)
    if args.smoke:
        args.idle = 10.0
    if os.geteuid() != 0:
        print("bench_agent: needs root (pagemap PFNs, hugetlb knob)", file=sys.stderr)
        return 1
    host = Host()
    with tempfile.TemporaryDirectory(prefix="aerate-bench-agent-") as tmp:
        proc = subprocess.Popen(
            agent_argv(host.path, Path(tmp) / "run", "hwm=1", "capacity=32",
                       f"reserve_mib={reserve_for(args.aerate_mib)}", "stats_interval_s=5"),
            stderr=subprocess.DEVNULL)
        try:
            p = psutil.Process(proc.pid)
            host.sync()
            t0 = time.monotonic()
            c0 = p.cpu_times()
            host.pump(120, until=lambda: host.reported_bytes() > 0 and bool(host.stats)
                      and host.stats["engine"]["phase"] == "idle")
            pass_s = time.monotonic() - t0
            c1 = p.cpu_times()
            reported = host.reported_bytes()
            host.pump(args.idle)
            c2 = p.cpu_times()
            rss = p.memory_info().rss
        finally:
            proc.terminate()
            proc.wait(20)
            host.close()
    busy_pass = (c1.user + c1.system) - (c0.user + c0.system)
    busy_idle = (c2.user + c2.system) - (c1.user + c1.system)
    idle_pct = 100 * busy_idle / args.idle
    rate = reported / max(busy_pass, 1e-6) / (1 << 30)
    print(f"\naerate-agent on {os.uname().release}, Python {sys.version.split()[0]}")
    print(f"{'':34}{'measured':>14}{'target':>14}")
    print(f"{'idle CPU over %.0f s (%% of a core)' % args.idle:34}{idle_pct:>14.3f}{'< 0.2':>14}")
    print(f"{'RSS (MiB)':34}{rss / (1 << 20):>14.1f}{'< 30':>14}")
    print(f"{'one pass: MiB reported':34}{reported / (1 << 20):>14.0f}{'':>14}")
    print(f"{'one pass: wall s / CPU s':34}{f'{pass_s:.1f} / {busy_pass:.2f}':>14}{'':>14}")
    print(f"{'one pass: GiB per agent CPU s':34}{rate:>14.2f}{'':>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
