"""Record a host memory trace for the host pressure policy tests.

Used by tests/unit/test_pressure_trace.py.

After ``--before-s``, a memory hog in a child process allocates and touches ``--step-mib``
every ``--step-s`` up to ``--hog-mib``, holds it ``--hold-s``, frees it all; the parent
samples, on its own clock until ``--after-s`` after the hog exited, MemAvailable
(/proc/meminfo) and the memory PSI line ``some avg10`` (/proc/pressure/memory) every
``--period`` s into a CSV (seconds since start, MemAvailable in MiB, PSI some avg10 %,
the hog's MiB then).
The hog never takes MemAvailable below ``--floor-mib``: it stops growing first.

    python3 tests/data/pressure/record.py --out tests/data/pressure/hog-6g.csv

No VM, no privileges; the machine is left as it was (the child exits, its memory returns).
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import sys
import time
from typing import Any

MiB = 1 << 20
#: --hog-mib, --step-mib, ... and their defaults (the recorded trace's run)
OPTIONS = {"hog_mib": 6144, "step_mib": 512, "floor_mib": 4096, "period": 0.5,
           "before_s": 5.0, "step_s": 1.0, "hold_s": 10.0, "after_s": 20.0}


def mem_available_mib() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def psi_some_avg10() -> str:
    try:
        with open("/proc/pressure/memory", encoding="ascii") as f:
            first = f.readline().split()
    except OSError:
        return ""
    return next((x.split("=", 1)[1] for x in first[1:] if x.startswith("avg10=")), "")


def hog(held: Any, args: argparse.Namespace) -> None:
    """Grow by ``step_mib`` every ``step_s`` (while MemAvailable stays above ``floor_mib``)
    up to ``hog_mib``, hold ``hold_s``, free it all, exit; ``held`` says how much now."""
    maps: list[mmap.mmap] = []
    while held.value + args.step_mib <= args.hog_mib and \
            mem_available_mib() - args.step_mib >= args.floor_mib:
        began = time.monotonic()
        m = mmap.mmap(-1, args.step_mib * MiB)
        for off in range(0, args.step_mib * MiB, 4096):  # touch every page: really allocated
            m[off] = 1
        maps.append(m)
        held.value += args.step_mib
        time.sleep(max(0.0, args.step_s - (time.monotonic() - began)))
    time.sleep(args.hold_s)
    for m in maps:
        m.close()
    held.value = 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    for name, default in OPTIONS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    args = ap.parse_args()
    held = mp.Value("i", 0)
    proc = mp.Process(target=hog, args=(held, args), daemon=True)
    rows: list[str] = []
    t0 = time.monotonic()
    n = 0
    ended_at: float | None = None
    try:
        while ended_at is None or time.monotonic() - ended_at < args.after_s:
            now = time.monotonic() - t0
            rows.append(f"{now:.1f},{mem_available_mib()},{psi_some_avg10()},{held.value}")
            if now >= args.before_s and proc.pid is None:
                proc.start()
            if ended_at is None and proc.pid is not None and not proc.is_alive():
                ended_at = time.monotonic()
            n += 1
            time.sleep(max(0.0, t0 + n * args.period - time.monotonic()))
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
    with open(args.out, "w", encoding="ascii") as f:
        f.write(f"# recorded by tests/data/pressure/record.py on {os.uname().release}, "
                f"{time.strftime('%Y-%m-%d')}: {' '.join(sys.argv[1:])}\n")
        f.write("t_s,mem_available_mib,psi_some_avg10,hog_mib\n")
        f.write("\n".join(rows) + "\n")
    print(f"{len(rows)} samples, hog peak {max(int(r.split(',')[3]) for r in rows)} MiB, "
          f"MemAvailable {min(int(r.split(',')[1]) for r in rows)}..."
          f"{max(int(r.split(',')[1]) for r in rows)} MiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
