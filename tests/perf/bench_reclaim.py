"""Benchmark: aerate against the kernel's own free page reporting, same VM, same run.

Each trial boots the same guest shape (shared memfd RAM) from the project's image; the
guest touches HOG MiB and frees it; the host backing of the guest's RAM is sampled from the
kernel (st_blocks of the memfd) while it falls. Trial "aerate": no balloon free page
reporting, aerate-agent and aerated do the work. Trial "kernel FPR": the virtio balloon with
free-page-reporting=on; the agent sees the feature negotiated and stays statistics-only, so
only the kernel and QEMU return memory. Printed side by side: MiB returned 10/30/60 s after
the free, time to 90 % of the freed memory, guest CPU and QEMU CPU spent meanwhile.

    sudo .venv/bin/python tests/perf/bench_reclaim.py [--smoke] [--hog-mib N] [--window S]

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

import psutil

from aerate.deploy.image import ensure_image
from aerate.deploy.scenario import Aerated, Hog, aerated, guest_cpu_seconds, wait_for
from aerate.deploy.vm import booted

MiB = 1 << 20
MARKS = (10, 30, 60)


def qemu_cpu(name: str) -> float:
    """User+system CPU seconds of the VM's QEMU process so far."""
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def backing(d: Aerated, name: str) -> int:
    value = d.vm(name).get("backing_allocated_bytes")
    return int(value) if isinstance(value, int) else -1


def steady(d: Aerated, name: str, seconds: float = 6.0) -> int:
    """Wait until the backing stops moving (within 4 MiB over ``seconds``); return it."""
    last = backing(d, name)
    while True:
        time.sleep(seconds)
        now = backing(d, name)
        if last >= 0 and abs(now - last) < 4 * MiB:
            return now
        last = now


def trial(image: Any, mode: str, hog_mib: int, window: float, memory_mib: int
          ) -> dict[str, Any]:
    """One boot, one free, one curve of the backing."""
    kernel = mode == "kernel FPR"
    with tempfile.TemporaryDirectory(prefix="aerate-bench-") as tmp, \
            booted(image, backing="memfd", memory_mib=memory_mib,
                   free_page_reporting=kernel) as g, \
            aerated(Path(tmp), "[defaults]\nreserve_mib = 128\nhwm = 8\nstats_interval_s = 1\n",
                    ("--vm", g.name)) as d:
        wait_for(lambda: d.vm(g.name).get("state") == "running", 300, "the aerate session")
        engine_phase = lambda: ((d.vm(g.name).get("guest") or {}).get("engine")  # noqa: E731
                                or {}).get("phase")
        if kernel:
            wait_for(lambda: engine_phase() == "disabled", 60, "the agent to go stats-only")
        baseline = steady(d, g.name)
        hog = Hog(g, hog_mib, hold_s=3)
        hog.start()
        peak = backing(d, g.name)
        cpu0, q0 = guest_cpu_seconds(g), qemu_cpu(g.name)
        freed_at = hog.join()
        samples: list[tuple[float, int]] = []
        while (t := time.monotonic() - freed_at) < window:
            samples.append((t, peak - backing(d, g.name)))
            time.sleep(0.5)
        cpu1, q1 = guest_cpu_seconds(g), qemu_cpu(g.name)
        return {"mode": mode, "guest": g.spec.domain_type, "baseline": baseline, "peak": peak,
                "samples": samples, "guest_cpu": cpu1 - cpu0, "qemu_cpu": q1 - q0,
                "boot_to_ready": g.timings.get("boot_to_ready")}


def at(samples: list[tuple[float, int]], second: float) -> int | None:
    got = [v for t, v in samples if t <= second]
    return got[-1] if got and samples[-1][0] >= second - 1 else None


def time_to(samples: list[tuple[float, int]], target: float) -> float | None:
    return next((t for t, v in samples if v >= target), None)


def table(results: list[dict[str, Any]], hog_mib: int) -> str:
    """The side-by-side figures."""
    rows = [("", *[r["mode"] for r in results])]
    for m in MARKS:
        rows.append((f"MiB returned {m} s after free",
                     *[_fmt(at(r["samples"], m), MiB) for r in results]))
    rows.append(("time to 90% of freed (s)",
                 *[_fmt(time_to(r["samples"], 0.9 * hog_mib * MiB), 1) for r in results]))
    rows.append(("guest CPU during window (s)", *[f"{r['guest_cpu']:.1f}" for r in results]))
    rows.append(("QEMU CPU during window (s)", *[f"{r['qemu_cpu']:.1f}" for r in results]))
    rows.append(("host backing before touch (MiB)",
                 *[_fmt(r["baseline"], MiB) for r in results]))
    width = max(len(r[0]) for r in rows) + 2
    return "\n".join(r[0].ljust(width) + "".join(str(c).rjust(14) for c in r[1:])
                     for r in rows)


def _fmt(v: float | None, unit: float) -> str:
    return "-" if v is None else (f"{v / unit:.0f}" if unit > 1 else f"{v:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="short run for CI")
    ap.add_argument("--hog-mib", type=int, default=1024)
    ap.add_argument("--window", type=float, default=70.0)
    ap.add_argument("--memory-mib", type=int, default=2048)
    ap.add_argument("--json", help="also write the raw samples here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.hog_mib, args.window, args.memory_mib = 256, 35.0, 1024
    image = ensure_image()
    results = [trial(image, mode, args.hog_mib, args.window, args.memory_mib)
               for mode in ("aerate", "kernel FPR")]
    print(f"\nfreed {args.hog_mib} MiB in a {args.memory_mib} MiB guest "
          f"({results[0]['guest']}, memfd shared RAM); backing read from the kernel")
    print(table(results, args.hog_mib))
    if args.json:
        with contextlib.suppress(OSError):
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
