"""Benchmark: the daemon's cost and ack latency with N simulated guests (S8, issue 10).

The daemon side is the real code (``Daemon``, ``VmRunner``, ``VmWorker``, ``VmSession``,
``HostEndpoint``, the permit cache, the map checks and a real ``fallocate(PUNCH_HOLE)``
through host/punch.py on one sparse **memfd** per VM) on a **MOCK of libvirtd**
(tests/unit/daemon_sim.FakeLibvirt, which can be made to hang per VM). The guests are
the real ``aerate.agent.protocol.GuestEndpoint`` behind unix sockets the daemon connects
to, as to QEMU's chardev; they run in a child process, so the daemon's CPU (getrusage of
this process: its loop thread and its worker threads) is measured apart from theirs. Each
guest reports a batch of 4 x 2 MiB every 2 s and statistics every 5 s; the latency is
from the report's write to the ack's arrival, measured in the guests' process.

Scenarios per N: "normal", and "hung": one neighbour (vm0) whose every libvirt call hangs
30 s from the start of the measurement. Then the largest N again with a tenth of the guests
reporting and the rest idle (statistics only), as on a real host most of the time: what the
daemon and its libvirt calls cost for guests that have nothing to give. Then the input
floods of the issue's "Bad input" with 10 guests: 10 MB of 0xFF bytes, and 10 MB of
need-sync lines, from vm0: the daemon's extra CPU, whether the flood ended vm0's session,
the neighbours' p99.

    .venv/bin/python tests/perf/bench_daemon.py [--smoke] [--sizes 10,100,1000] [--window S]

This is a benchmark, not a test: it asserts nothing about speed; it prints what it measured
beside the targets of issue 10.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

# The code of this checkout (not whatever aerate the venv was installed from), and the
# simulation helpers beside the unit tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from daemon_sim import (
    FakeLibvirt,
    SimGuest,
    new_daemon,
    new_vm,
    percentile,
    stop_daemon,
)

from aerate.agent.protocol import GuestEndpoint
from aerate.host import punch as punch_mod
from aerate.host.budget import LOOP_BURST_S, LOOP_SHARE

HANG_S = 30.0
FLOOD_BYTES = 10 * 1000 * 1000


def cpu_s() -> float:
    """CPU seconds of this process so far (every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mib() -> float:
    """Resident set of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------- guests (child)


async def guests_main(sock_dir: str, names: List[str], window: float, active: int) -> None:
    # The first ``active`` guests report every 2 s; the others only send statistics (an
    # idle guest: most of a real host's VMs at any moment).
    guests = [SimGuest(n, os.path.join(sock_dir, f"{n}.sock"),
                       report_s=2.0 if i < active else 1e9) for i, n in enumerate(names)]
    for g in guests:
        await g.start()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while (line := (await reader.readline()).decode().split()) != ["GO"]:
        if not line:
            return
    for g in guests:
        g.latencies.clear()
    t_go = time.monotonic()
    flood_task = None
    while time.monotonic() - t_go < window:
        try:
            cmd = (await asyncio.wait_for(reader.readline(), 0.2)).decode().split()
        except TimeoutError:
            continue
        if cmd[:1] == ["FLOOD"]:
            flood_task = loop.create_task(flood(guests[0], cmd[1]))
    if flood_task is not None:
        flood_task.cancel()
    out = {g.name: {"lat": g.latencies, "sessions": g.sessions} for g in guests}
    print("RESULT " + json.dumps(out), flush=True)
    await reader.readline()  # the parent stops its runners first, then says BYE
    for g in guests:
        await g.stop()


async def flood(g: SimGuest, kind: str) -> None:
    """vm0 turns hostile: 10 MB of 0xFF, or of need-sync lines, as fast as it can."""
    assert g.writer is not None
    if kind == "ff":
        chunk = b"\xff" * 65536
    else:
        ep = GuestEndpoint({"agent": "hostile"})
        one = b""
        while len(one) < 65536:
            ep.request_sync()
            one += ep.take_outbox()
        chunk = one
    sent = 0
    while sent < FLOOD_BYTES:
        g.writer.write(chunk)
        sent += len(chunk)
        await g.writer.drain()


# --------------------------------------------------------------------- daemon (parent)


async def scenario(n: int, hung: bool, window: float, flood_kind: str = "",
                   settle: float = 2.5, active: int | None = None) -> Dict[str, Any]:
    active = n if active is None else active
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        names = [f"vm{i}" for i in range(n)]
        conn = FakeLibvirt()
        for name in names:
            conn.add(new_vm(name, tmp))
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", tmp, "--names", ",".join(names),
             "--window", str(window), "--active", str(active)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "READY"
        daemon = new_daemon(conn, tmp)
        punch_time = [0.0, 0]
        real_punch = daemon.punch

        def timed_punch(*args: Any, **kw: Any) -> int:
            t = time.perf_counter()
            try:
                return int(real_punch(*args, **kw))
            finally:
                punch_time[0] += time.perf_counter() - t
                punch_time[1] += 1

        daemon.punch = timed_punch
        # The content check (S1: every reported byte is read before its punch) is timed
        # apart: its cost is per byte reported, not per message, and no protocol change
        # can remove it (host/punch.py).
        content_time = [0.0]
        real_check = punch_mod.first_nonzero

        def timed_check(*args: Any) -> int:
            t = time.perf_counter()
            try:
                return real_check(*args)
            finally:
                content_time[0] += time.perf_counter() - t

        punch_mod.first_nonzero = timed_check  # type: ignore[assignment]
        t_start = time.monotonic()
        for name in names:
            daemon.start_runner(name)
        while not all(r.state.value == "running" for r in daemon.runners.values()):
            await asyncio.sleep(0.1)
            if time.monotonic() - t_start > 120:
                raise RuntimeError("not every simulated VM reached running in 120 s")
        ready_s = time.monotonic() - t_start
        await asyncio.sleep(settle)  # every guest reported once; steady state
        if hung:
            conn.slow[("vm0", "*")] = HANG_S
        c0, t0, p0, k0 = cpu_s(), time.monotonic(), punch_time[0], content_time[0]
        rpc0 = sum(conn.calls.values())
        child.stdin.write("GO\n")
        child.stdin.flush()
        if flood_kind:
            await asyncio.sleep(min(2.0, window / 3))
            child.stdin.write(f"FLOOD {flood_kind}\n")
            child.stdin.flush()
        line = await asyncio.to_thread(child.stdout.readline)
        c1, t1 = cpu_s(), time.monotonic()
        punch_s, content_s = punch_time[0] - p0, content_time[0] - k0
        rpcs = sum(conn.calls.values()) - rpc0
        punch_mod.first_nonzero = real_check  # type: ignore[assignment]
        rss = rss_mib()
        vm0 = daemon.runners["vm0"]
        vm0_state = {"state": vm0.state.value, "permit": vm0.permit().reason[:70],
                     "floods": vm0.input_budget.floods,
                     "loop_s": vm0.input_budget.cpu_used,
                     "burst_kib": vm0.input_budget.bucket.burst / 1024,
                     "error": vm0.session.last_error[:90] if vm0.session else ""}
        await stop_daemon(daemon, conn)
        child.stdin.write("BYE\n")
        child.stdin.flush()
        child.wait(30)
        for vm in conn.vms.values():
            os.close(vm.fd)
        if not line.startswith("RESULT "):
            raise RuntimeError(f"guests' process said {line!r}")
        res = json.loads(line[len("RESULT "):])
        others = [x for k, v in res.items() if k != "vm0" or not (hung or flood_kind)
                  for x in v["lat"]]
        return {"n": n, "active": active, "rpc_s": rpcs / (t1 - t0),
                "hung": hung, "flood": flood_kind, "ready_s": ready_s,
                "cpu_pct": 100 * (c1 - c0) / (t1 - t0), "cpu_s": c1 - c0, "wall_s": t1 - t0,
                "rss_mib": rss, "acks": len(others),
                "p50_ms": 1e3 * percentile(others, 0.5), "p99_ms": 1e3 * percentile(others, 0.99),
                "max_ms": 1e3 * max(others, default=float("nan")),
                "punch_ms": 1e3 * punch_time[0] / max(1, punch_time[1]),
                "punch_pct": 100 * punch_s / (t1 - t0),
                "content_pct": 100 * content_s / (t1 - t0),
                "reported_gib_s": 4 * 2 * len(others) / 1024 / (t1 - t0),
                "vm0": vm0_state}


def show(r: Dict[str, Any], base_cpu_pct: float | None = None) -> None:
    what = ("flood " + r["flood"]) if r["flood"] else ("hung vm0" if r["hung"] else "normal")
    if r["active"] < r["n"]:
        what = f"{r['active']} reporting"
    print(f"N={r['n']:>5} {what:<14} CPU {r['cpu_pct']:5.1f} % of a core, RSS "
          f"{r['rss_mib']:6.0f} MiB, ack p50/p99/max {r['p50_ms']:6.2f}/{r['p99_ms']:6.2f}/"
          f"{r['max_ms']:7.2f} ms over {r['acks']} acks (punch {r['punch_ms']:.3f} ms/range; "
          f"all running after {r['ready_s']:.1f} s)")
    print(f"        of that CPU: discards {r['punch_pct']:.1f} % of a core (content check "
          f"{r['content_pct']:.1f} % for {r['reported_gib_s']:.2f} GiB/s reported), the rest "
          f"{r['cpu_pct'] - r['punch_pct']:.1f} %; libvirt calls {r['rpc_s']:.0f}/s")
    if r["hung"]:
        ok = r["p99_ms"] < 100
        print(f"        target: every other VM's p99 < 100 ms -> {'met' if ok else 'MISSED'}; "
              f"vm0: {r['vm0']['state']}, permit: {r['vm0']['permit']}")
    elif r["flood"]:
        extra = r["cpu_s"] - (base_cpu_pct or 0) / 100 * r["wall_s"]
        v = r["vm0"]
        # The input budget's bound (host/budget.py InputBudget): per connection, the byte
        # burst, and loop time of LOOP_BURST_S plus LOOP_SHARE of the time since.
        bound = LOOP_BURST_S + LOOP_SHARE * r["wall_s"]
        print(f"        flood of {FLOOD_BYTES / 1e6:.0f} MB from vm0: its input cost the loop "
              f"{v['loop_s']:.3f} s (bound: {LOOP_BURST_S:g} s + {100 * LOOP_SHARE:g} % of "
              f"the {r['wall_s']:.0f} s = {bound:.2f} s, and {v['burst_kib']:.0f} KiB a "
              f"connection -> {'met' if v['loop_s'] <= bound else 'MISSED'}); extra daemon "
              f"CPU {extra:.2f} s (issue's baseline: 8.9 s for 0xFF, 4.4 s for need-sync); "
              f"vm0 {v['state']}, cut off: {'yes' if 'flood' in v['error'] else 'NO'} "
              f"({v['error'] or '-'}); "
              f"neighbours' p99 {r['p99_ms']:.2f} ms (target < 100 ms -> "
              f"{'met' if r['p99_ms'] < 100 else 'MISSED'})")
    elif r["n"] >= 1000 and r["active"] == r["n"]:
        # The issue's 10 % predates S1's content check, which reads every reported byte
        # (a third of a core at these 4 GiB/s by itself): the target is shown against the
        # whole CPU and against the CPU outside the discards (the protocol's own cost).
        rest = r["cpu_pct"] - r["punch_pct"]
        print(f"        target at 1,000 guests: CPU < 10 % -> "
              f"{'met' if r['cpu_pct'] < 10 else 'MISSED'} (outside the discards: "
              f"{rest:.1f} % -> {'met' if rest < 10 else 'MISSED'}); p99 < 10 ms + punch "
              f"time -> {'met' if r['p99_ms'] < 10 + 4 * r['punch_ms'] else 'MISSED'}")


async def bench(sizes: List[int], window: float, settle: float) -> None:
    print(f"bench_daemon: guests report 4 x 2 MiB every 2 s, stats every 5 s; window "
          f"{window:.0f} s; fake libvirt (MOCK), real punch on memfds")
    base: Dict[int, float] = {}
    for n in sizes:
        r = await scenario(n, False, window, settle=settle)
        base[n] = r["cpu_pct"]
        show(r)
        show(await scenario(n, True, window, settle=settle))
    # A host's VMs are mostly idle: the largest size again with a tenth of them reporting
    # (what the daemon costs for the rest: statistics, the permit refresh, libvirt calls).
    show(await scenario(sizes[-1], False, window, settle=settle, active=sizes[-1] // 10))
    n = sizes[0]
    for kind in ("ff", "needsync"):
        show(await scenario(n, False, window, kind, settle=settle), base[n])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="10 and 100 guests, 3 s windows")
    ap.add_argument("--sizes", default="", help="comma-separated guest counts")
    ap.add_argument("--window", type=float, default=0.0, help="measurement seconds")
    ap.add_argument("--child", metavar="SOCK_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--names", default="", help=argparse.SUPPRESS)
    ap.add_argument("--active", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--verbose", action="store_true", help="show the daemon's warnings")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.child:
        asyncio.run(guests_main(args.child, args.names.split(","), args.window, args.active))
        return 0
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else \
        ([10, 100] if args.smoke else [10, 100, 1000])
    window = args.window or (3.0 if args.smoke else 30.0)
    asyncio.run(bench(sizes, window, 1.0 if args.smoke else 2.5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
