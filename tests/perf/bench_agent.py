"""Benchmark: aerate-agent's cost while idle, and through one pass, on real kernels.

Two agents, measured the same way, printed side by side:

- "host": the agent as its own process on this machine's kernel, on a raw pty; a host end
  (the real protocol endpoint) syncs and acks.
- "guest": the agent as the systemd service inside the project's Debian guest (QEMU under
  libvirt), served by a real aerated; its CPU time is read from the guest's /proc.

Phase 1 lets each aerate once (on this host a bounded amount, with hwm=1 so the pass starts
at once; in the guest, what the guest has free). Phase 2 puts the operator's default hwm
back and measures the agent idle, with the host connected and statistics flowing, for
--idle seconds. Passes that the machine's own churn starts in that window are counted: they
are work, not idle cost. Targets of issue 2: idle CPU < 0.2 % of one core, RSS < 30 MiB.

Under TCG (no KVM here) a guest CPU second is worth much less than a host one; the factor is
measured in the same run (the same pure-Python loop timed on both sides) and printed, so the
guest figure can be read in host terms.

    sudo .venv/bin/python tests/perf/bench_agent.py [--smoke] [--idle 60] [--no-guest]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "host"))

from test_agent import Host, agent_argv, reserve_for  # noqa: E402

from aerate.agent.settings import BY_NAME  # noqa: E402

MiB = 1 << 20
#: A fixed pure-Python workload, timed by the interpreter itself on both sides.
LOOP = "import time; t=time.process_time(); sum(i*i for i in range(3000000)); " \
       "print(time.process_time()-t)"


def host_agent(idle: float, aerate_mib: int) -> dict[str, Any]:
    """The agent on this machine's kernel, on a pty."""
    host = Host()
    with tempfile.TemporaryDirectory(prefix="aerate-bench-agent-") as tmp:
        proc = subprocess.Popen(
            agent_argv(host.path, Path(tmp) / "run", "hwm=1", "capacity=32",
                       f"reserve_mib={reserve_for(aerate_mib)}", "stats_interval_s=5"),
            stderr=subprocess.DEVNULL)
        try:
            p = psutil.Process(proc.pid)
            host.sync()
            t0 = time.monotonic()
            c0 = p.cpu_times()
            host.pump(120, until=lambda: host.reported_bytes() > 0 and bool(host.stats)
                      and host.stats["engine"]["phase"] == "idle")
            pass_s = time.monotonic() - t0
            c_pass = p.cpu_times()
            reported = host.reported_bytes()
            host.ep.configure({"hwm": BY_NAME["hwm"].default})
            os.write(host.master, host.ep.take_outbox())
            host.pump(2)
            c1 = p.cpu_times()
            before = dict(host.stats["engine"]["counters"])
            host.pump(idle)
            c2 = p.cpu_times()
            after = host.stats["engine"]["counters"]
            rss = p.memory_info().rss
        finally:
            proc.terminate()
            proc.wait(20)
            host.close()
    busy_pass = (c_pass.user + c_pass.system) - (c0.user + c0.system)
    loop = float(subprocess.run([sys.executable, "-c", LOOP], check=True, text=True,
                                capture_output=True).stdout)
    return {"where": "host " + os.uname().release,
            "idle_pct": 100 * ((c2.user + c2.system) - (c1.user + c1.system)) / idle,
            "passes": after["passes"] - before["passes"], "rss": rss,
            "reported": reported, "pass_s": pass_s, "pass_cpu": busy_pass, "loop_s": loop}


def guest_agent(idle: float) -> dict[str, Any]:
    """The agent as the systemd service in the Debian guest, under a real aerated."""
    from aerate.deploy.image import ensure_image
    from aerate.deploy.scenario import aerated, wait_for
    from aerate.deploy.vm import booted

    def counters() -> dict[str, Any]:
        guest = d.vm(g.name).get("guest") or {}
        return dict((guest.get("engine") or {}).get("counters") or {})

    def agent_cpu() -> tuple[float, int]:
        pid = g.check("systemctl show -p MainPID --value aerate-agent").strip()
        fields = g.check(f"cat /proc/{pid}/stat").rsplit(")", 1)[1].split()
        hz = int(g.check("getconf CLK_TCK").strip() or 100)
        rss_kib = int(g.check(f"awk '/^VmRSS/ {{print $2}}' /proc/{pid}/status").strip())
        return (int(fields[11]) + int(fields[12])) / hz, rss_kib * 1024

    image = ensure_image()
    with tempfile.TemporaryDirectory(prefix="aerate-bench-agent-") as tmp, \
            booted(image, backing="memfd", memory_mib=1024) as g, \
            aerated(Path(tmp), "[defaults]\nhwm = 1\n", ("--vm", g.name)) as d:
        wait_for(lambda: d.vm(g.name).get("state") == "running", 300, "the aerate session")
        t0 = time.monotonic()
        c0, _ = agent_cpu()
        wait_for(lambda: counters().get("passes", 0) >= 1, 300, "the first pass")
        pass_s = time.monotonic() - t0
        c_pass, _ = agent_cpu()
        reported = int(counters().get("reported_bytes", 0))
        d.set(g.name, hwm=BY_NAME["hwm"].default)
        time.sleep(2)
        before = counters()
        c1, _ = agent_cpu()
        t1 = time.monotonic()
        time.sleep(idle)
        c2, rss = agent_cpu()
        wall = time.monotonic() - t1
        after = counters()
        loop = float(g.check(["python3", "-c", LOOP]).strip())
        release = g.check("uname -r").strip()
    return {"where": f"guest {release} ({g.spec.domain_type})",
            "idle_pct": 100 * (c2 - c1) / wall,
            "passes": after.get("passes", 0) - before.get("passes", 0), "rss": rss,
            "reported": reported, "pass_s": pass_s, "pass_cpu": c_pass - c0, "loop_s": loop}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="10 s idle instead of 60")
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--aerate-mib", type=int, default=256)
    ap.add_argument("--no-guest", action="store_true", help="only the agent on this host")
    args = ap.parse_args(argv)
    if args.smoke:
        args.idle = 10.0
    if os.geteuid() != 0:
        print("bench_agent: needs root (pagemap PFNs, hugetlb knob)", file=sys.stderr)
        return 1
    results = [host_agent(args.idle, args.aerate_mib)]
    if not args.no_guest:
        results.append(guest_agent(args.idle))
    slow = [r["loop_s"] / results[0]["loop_s"] for r in results]
    w = 36
    print(f"\naerate-agent, Python {sys.version.split()[0]} on the host; "
          f"idle window {args.idle:.0f} s")
    print("".ljust(w) + "".join(r["where"].rjust(28) for r in results) + "target".rjust(10))
    rows = [
        ("idle CPU (% of one core)", [f"{r['idle_pct']:.3f}" for r in results], "< 0.2"),
        ("  same, in host CPU terms", [f"{r['idle_pct'] / s:.3f}"
                                       for r, s in zip(results, slow)], "< 0.2"),
        ("passes started in the idle window", [str(r["passes"]) for r in results], ""),
        ("RSS (MiB)", [f"{r['rss'] / MiB:.1f}" for r in results], "< 30"),
        ("CPU slowdown vs host (same loop)", [f"{s:.1f}x" for s in slow], ""),
        ("first pass: MiB reported", [f"{r['reported'] / MiB:.0f}" for r in results], ""),
        ("first pass: wall s / agent CPU s", [f"{r['pass_s']:.1f} / {r['pass_cpu']:.2f}"
                                              for r in results], ""),
    ]
    for name, cells, target in rows:
        print(name.ljust(w) + "".join(c.rjust(28) for c in cells) + target.rjust(10))
    return 0


if __name__ == "__main__":
    sys.exit(main())
