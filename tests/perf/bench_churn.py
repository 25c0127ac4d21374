"""Benchmark: memory churn, aerate against the kernel's reporting and nothing, same run.

Each trial boots the same guest shape (memfd shared RAM) and runs the same seeded churn in
it: overlapping ``stress-ng --vm 1 --verify`` jobs of random sizes and lifetimes (the
workload of issue 15); each job checks what it wrote, and a failed verify fails the job.
The host memory behind the guest (st_blocks of its RAM memfd, read from the kernel, not from
aerated) is sampled every 0.5 s during the churn and for a while after it.

Printed side by side: average and peak host MiB over the churn, MiB still backed 10/30/60 s
after the last job (and the idle baseline before the churn), the backed memory that is
free in the guest (backing minus MemTotal - MemFree) before the churn and at the end of
the window (the guest's own use grows over a churn; this takes it out), passes started,
blocks the agent's fills took that were already aerated (re-aerated), the host memory
those fills backed again, the agent's CPU over the churn and after it, verify failures.

    .venv/bin/python tests/perf/bench_churn.py [--smoke] [--seed N] [--churn-s S]
                                               [--memory-mib N] [--modes a,b]

This is a benchmark, not a test: it asserts nothing about speed; it prints what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aerate.deploy.image import ensure_image
from aerate.deploy.scenario import (
    Churn,
    aerated,
    columns,
    free_backed,
    ram_allocated,
    steady_of,
    wait_for,
)
from aerate.deploy.vm import Guest, booted

MiB = 1 << 20
BLOCK = 2 * MiB
MARKS = (10, 30, 60)
MODES = ("aerate", "kernel FPR", "nothing")
CONFIG = "[defaults]\nreserve_mib = 128\nhwm = 8\nstats_interval_s = 1\n"
def agent_cpu(g: Guest) -> float:
    """CPU seconds the agent's service used so far (systemd's accounting, all its
    processes), 0 if the unit has none."""
    out = g.check("systemctl show -p CPUUsageNSec --value aerate-agent").strip()
    return int(out) / 1e9 if out.isdigit() else 0.0


def engine_counters(d: Any, name: str) -> dict[str, Any]:
    guest = d.vm(name).get("guest") or {}
    return dict((guest.get("engine") or {}).get("counters") or {})


def trial(image: Any, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One boot, one baseline, one churn, the curve during and after it."""
    config = CONFIG + ("enabled = false\n" if mode == "nothing" else "")
    with tempfile.TemporaryDirectory(prefix="aerate-bench-churn-") as tmp, \
            booted(image, backing="memfd", memory_mib=args.memory_mib,
                   free_page_reporting=mode == "kernel FPR") as g, \
            aerated(Path(tmp), config, ("--vm", g.name)) as d:
        wait_for(lambda: d.vm(g.name).get("state") == "running", 300, "the aerate session")
        baseline = steady_of(lambda: ram_allocated(g), limit=240)
        c0, cpu0, fb0 = engine_counters(d, g.name), agent_cpu(g), free_backed(g)
        churn = Churn(g, args.seed, args.churn_s, args.lo_mib, args.hi_mib, args.life_s,
                      args.jobs)
        began = time.monotonic()
        churn.start()
        during: list[int] = []
        while churn.running():
            during.append(ram_allocated(g))
            time.sleep(0.5)
        summary = churn.join()
        ended = summary["ended"]
        c1, cpu1 = engine_counters(d, g.name), agent_cpu(g)
        churn_s = ended - began
        after: list[tuple[float, int]] = []
        while (t := time.monotonic() - ended) < args.after_s:
            after.append((t, ram_allocated(g)))
            time.sleep(0.5)
        c2, cpu2, fb2 = engine_counters(d, g.name), agent_cpu(g), free_backed(g)
        reason = ((d.vm(g.name).get("guest") or {}).get("engine") or {}).get("reason")

    def delta(a: dict[str, Any], b: dict[str, Any], key: str) -> int:
        return int(b.get(key, 0)) - int(a.get(key, 0))

    return {"mode": mode, "guest": g.spec.domain_type, "baseline": baseline,
            "avg": sum(during) / max(1, len(during)), "peak": max(during, default=0),
            "after": after, "churn_s": churn_s, "free_backed": (fb0, fb2),
            "passes_started": delta(c0, c2, "passes_started"),
            "passes_started_after": delta(c1, c2, "passes_started"),
            "reaerated": delta(c0, c2, "refilled_aerated"),
            "filled": delta(c0, c2, "filled_blocks"),
            "reported": delta(c0, c2, "reported_bytes"),
            "agent_cpu": cpu1 - cpu0, "agent_cpu_after": cpu2 - cpu1,
            "jobs": summary["jobs"], "failed": summary["failed"],
            "reason": reason}


def at(samples: list[tuple[float, int]], second: float) -> int | None:
    got = [v for t, v in samples if t <= second]
    return got[-1] if got and samples[-1][0] >= second - 1 else None


def table(results: list[dict[str, Any]]) -> str:
    """The side-by-side figures."""
    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v / MiB:.0f}"

    rows = [("", *[r["mode"] for r in results]),
            ("idle baseline before (MiB)", *[mib(r["baseline"]) for r in results]),
            ("average over the churn (MiB)", *[mib(r["avg"]) for r in results]),
            ("peak over the churn (MiB)", *[mib(r["peak"]) for r in results])]
    for m in MARKS:
        rows.append((f"backed {m} s after it (MiB)", *[mib(at(r["after"], m)) for r in results]))
    rows += [("free but backed before/end (MiB)",
              *[f"{mib(r['free_backed'][0])}/{mib(r['free_backed'][1])}" for r in results]),
             ("passes started", *[str(r["passes_started"]) for r in results]),
             ("... of them after the churn", *[str(r["passes_started_after"]) for r in results]),
             ("blocks filled", *[str(r["filled"]) for r in results]),
             ("blocks re-aerated", *[str(r["reaerated"]) for r in results]),
             ("re-backed by fills (MiB)", *[mib(r["reaerated"] * BLOCK) for r in results]),
             ("reported (MiB)", *[mib(r["reported"]) for r in results]),
             ("agent CPU over the churn (s)", *[f"{r['agent_cpu']:.1f}" for r in results]),
             ("agent CPU after it (s)", *[f"{r['agent_cpu_after']:.1f}" for r in results]),
             ("churn jobs / failed", *[f"{r['jobs']}/{len(r['failed'])}" for r in results])]
    return columns(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="short run for CI: aerate and the kernel's reporting, same churn")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--churn-s", type=int, default=360)
    ap.add_argument("--after-s", type=float, default=65.0)
    ap.add_argument("--memory-mib", type=int, default=2048)
    ap.add_argument("--lo-mib", type=int, default=128)
    ap.add_argument("--hi-mib", type=int, default=1024)
    ap.add_argument("--life-s", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=2, help="most jobs at once")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", help="also write the raw samples here")
    args = ap.parse_args(argv)
    if args.smoke:
        # Shorter than the full run, but with the kernel's own reporting on the same guest
        # shape and the same seeded churn beside aerate: a figure without its reference
        # says nothing.
        args.churn_s, args.after_s, args.memory_mib = 45, 32.0, 1024
        args.lo_mib, args.hi_mib, args.life_s = 64, 384, 12
        args.modes = "aerate,kernel FPR"
    image = ensure_image()
    results = []
    for mode in args.modes.split(","):
        results.append(trial(image, mode, args))
        print(table(results[-1:]), file=sys.stderr, flush=True)   # as it goes
    print(f"\nchurn of {args.churn_s} s (seed {args.seed}, {args.lo_mib}-{args.hi_mib} MiB "
          f"jobs, up to {args.jobs} at once) in a {args.memory_mib} MiB guest "
          f"({results[0]['guest']}, memfd shared RAM); backing read from the kernel")
    print(table(results))
    for r in results:
        if r["failed"]:
            print(f"{r['mode']}: FAILED churn jobs: {r['failed']}")
        if r["reason"]:
            print(f"{r['mode']}: agent: {r['reason']}")
    if args.json:
        with contextlib.suppress(OSError):
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
