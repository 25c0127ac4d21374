"""Benchmark: aerate against the kernel's own free page reporting, same VM, same run.

Each trial boots the same guest shape from the project's image; the guest touches HOG MiB
and frees it; the host memory behind the guest is sampled from the kernel while it falls.

Shared memfd RAM (st_blocks of the memfd): "aerate" (no balloon free page reporting;
aerate-agent and aerated punch) against "kernel FPR" (the virtio balloon with
free-page-reporting=on; the agent sees the feature negotiated and stays statistics-only).

Private RAM, libvirt's default (RssAnon of the QEMU process): "aerate balloon" (aerated's
balloon reclaimer), "kernel FPR" (the kernel's reporting, no aerated), "aerate + kernel FPR"
(both: aerate must not fight the kernel) and "nothing" (neither: what the host keeps paying
for). After the window each private trial allocates HOG MiB again at once and prints how
long the guest took (the balloon must give memory back fast) and whether anything was
OOM-killed.

Printed side by side: MiB returned 5/10/30/60 s after the free, time to 50 % and 90 % of the
freed memory, guest CPU and QEMU CPU spent meanwhile; under the private rows, issue 11's
targets for each aerate row against the kernel's reporting of the same run (t90 at most
the kernel's, MiB back at 30 s at least the kernel's, no OOM kill in the second burst),
met or MISSED.

    .venv/bin/python tests/perf/bench_reclaim.py [--smoke] [--hog-mib N] [--window S]
                                                 [--only memfd|private]

This is a benchmark, not a test: it asserts nothing about speed; it prints what it measured
(a missed target is printed, and the exit status stays 0).
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
from aerate.deploy.scenario import (
    Aerated,
    Hog,
    aerated,
    columns,
    guest_cpu_seconds,
    qemu_pid,
    steady_of,
    wait_for,
)
from aerate.deploy.vm import booted

MiB = 1 << 20
MARKS = (5, 10, 30, 60)
#: aerated's settings in the private trials: a floor of a quarter of the guest (the default
#: half would cap what the balloon may take below what the kernel's reporting returns on
#: this shape), statistics at their default interval (the agent sends more when free
#: memory moves).
PRIVATE_CONFIG = "[defaults]\nreserve_mib = 128\nfloor = 0.25\n"
BURST = r"""
import mmap, sys, time
t = time.monotonic()
m = mmap.mmap(-1, int(sys.argv[1]) << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
chunk = b"\x5a" * (1 << 20)
for i in range(int(sys.argv[1])):
    m.write(chunk)
print(time.monotonic() - t)
"""


def qemu_cpu(name: str) -> float:
    """User+system CPU seconds of the VM's QEMU process so far."""
    pid = qemu_pid(name)
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def rss_anon(name: str) -> int:
    """RssAnon of the VM's QEMU process (bytes): private guest RAM the host backs."""
    pid = qemu_pid(name)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) << 10
    return -1


def oom_kills(g: Any) -> int:
    """OOM kills in the guest's kernel log so far."""
    out = g.check("journalctl -k -b --no-pager -o cat | grep -c 'Out of memory' || true")
    return int(out.strip() or 0)


def private_trial(image: Any, mode: str, hog_mib: int, window: float, memory_mib: int
                  ) -> dict[str, Any]:
    """One boot of a private-RAM guest, one free, one curve of QEMU's RssAnon, then a
    second burst of the same size, timed inside the guest."""
    kernel = "kernel" in mode
    with tempfile.TemporaryDirectory(prefix="aerate-bench-") as tmp, \
            booted(image, backing="private", memory_mib=memory_mib,
                   free_page_reporting=kernel) as g, contextlib.ExitStack() as stack:
        if "aerate" in mode:
            d = stack.enter_context(aerated(Path(tmp), PRIVATE_CONFIG, ("--vm", g.name)))
            wait_for(lambda: d.vm(g.name).get("state") == "running", 300, "the session")
        else:
            d = None
        baseline = steady_of(lambda: rss_anon(g.name))
        hog = Hog(g, hog_mib, hold_s=3)
        hog.start()
        peak = rss_anon(g.name)
        cpu0, q0 = guest_cpu_seconds(g), qemu_cpu(g.name)
        freed_at = hog.join()
        samples: list[tuple[float, int]] = []
        while (t := time.monotonic() - freed_at) < window:
            samples.append((t, peak - rss_anon(g.name)))
            time.sleep(0.5)
        cpu1, q1 = guest_cpu_seconds(g), qemu_cpu(g.name)
        ooms = oom_kills(g)
        seen = d.vm(g.name) if d is not None else {}
        rc, out, err = g.run(["python3", "-c", BURST, str(hog_mib)], timeout=600)
        burst = float(out.strip()) if rc == 0 else None
        return {"mode": mode, "guest": g.spec.domain_type, "baseline": baseline, "peak": peak,
                "samples": samples, "guest_cpu": cpu1 - cpu0, "qemu_cpu": q1 - q0,
                "burst_s": burst, "burst_error": "" if rc == 0 else (err or out)[-300:],
                "oom_kills": oom_kills(g) - ooms,
                "reclaimer": seen.get("reclaimer", "-"),
                "balloon": seen.get("balloon"), "reason": seen.get("reason", ""),
                "boot_to_ready": g.timings.get("boot_to_ready")}


def backing(d: Aerated, name: str) -> int:
    value = d.vm(name).get("backing_allocated_bytes")
    return int(value) if isinstance(value, int) else -1


def steady(d: Aerated, name: str, seconds: float = 6.0) -> int:
    """Wait until the backing stops moving (within 4 MiB over ``seconds``); return it."""
    return steady_of(lambda: backing(d, name), seconds)


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
        def engine_phase() -> Any:
            return ((d.vm(g.name).get("guest") or {}).get("engine") or {}).get("phase")

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
    for share in (0.5, 0.9):
        rows.append((f"time to {share:.0%} of freed (s)",
                     *[_fmt(time_to(r["samples"], share * hog_mib * MiB), 1)
                       for r in results]))
    rows.append(("guest CPU during window (s)", *[f"{r['guest_cpu']:.1f}" for r in results]))
    rows.append(("QEMU CPU during window (s)", *[f"{r['qemu_cpu']:.1f}" for r in results]))
    rows.append(("host backing before touch (MiB)",
                 *[_fmt(r["baseline"], MiB) for r in results]))
    if any("burst_s" in r for r in results):
        rows.append((f"second {hog_mib} MiB burst (s)",
                     *[_fmt(r.get("burst_s"), 1) for r in results]))
        rows.append(("OOM kills in it", *[str(r.get("oom_kills", "-")) for r in results]))
    return columns(rows, 14)


def _verdict(ok: bool | None) -> str:
    return "not judged" if ok is None else ("met" if ok else "MISSED")


def targets(results: list[dict[str, Any]], hog_mib: int) -> list[str]:
    """Issue 11's targets for each aerate private-RAM row against the kernel's reporting of
    the same run: t90 at most the kernel's, MiB back at 30 s at least the kernel's, no OOM
    kill (and the burst ran) in the second burst. Printed, never asserted: a miss is a
    figure to read, not a failed benchmark. "not judged" where the window holds no figure
    to compare (neither reached 90 %, a window shorter than 30 s)."""
    kernel = next((r for r in results if r["mode"] == "kernel FPR"), None)
    ours = [r for r in results if r["mode"].startswith("aerate")]
    if kernel is None:
        return [f"targets (issue 11): no kernel FPR trial in this run; {len(ours)} aerate "
                "row(s) not judged"] if ours else []
    k90 = time_to(kernel["samples"], 0.9 * hog_mib * MiB)
    k30 = at(kernel["samples"], 30)
    out = []
    for r in ours:
        t90 = time_to(r["samples"], 0.9 * hog_mib * MiB)
        b30 = at(r["samples"], 30)
        fast = None if t90 is None and k90 is None else (
            t90 is not None and (k90 is None or t90 <= k90))
        much = None if b30 is None or k30 is None else b30 >= k30
        ooms = r.get("oom_kills")
        ran = r.get("burst_s") is not None and not r.get("burst_error")
        safe = ran and ooms == 0
        kills = f"{ooms if ooms is not None else '-'} kills" + ("" if ran else ", it failed")
        out += [f"targets (issue 11) for {r['mode']}, against kernel FPR in this run:",
                f"  t90 <= kernel's: {_fmt(t90, 1)} s vs {_fmt(k90, 1)} s -> "
                f"{_verdict(fast)}",
                f"  MiB back at 30 s >= kernel's: {_fmt(b30, MiB)} vs {_fmt(k30, MiB)} -> "
                f"{_verdict(much)}",
                f"  no OOM kill in the second {hog_mib} MiB burst: {kills} -> "
                f"{_verdict(safe)} (corruption: the vm tier's checker, not run here)"]
    return out


def _fmt(v: float | None, unit: float) -> str:
    return "-" if v is None else (f"{v / unit:.0f}" if unit > 1 else f"{v:.1f}")


def parser() -> argparse.ArgumentParser:
    """The command line (main's, apart so a unit test parses it without booting)."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="short run for CI")
    ap.add_argument("--hog-mib", type=int, default=1024)
    ap.add_argument("--window", type=float, default=70.0)
    ap.add_argument("--memory-mib", type=int, default=2048)
    ap.add_argument("--json", help="also write the raw samples here")
    ap.add_argument("--only", choices=("memfd", "private"), help="one RAM kind only")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.hog_mib, args.window, args.memory_mib = 256, 35.0, 1024
    image = ensure_image()
    raw: dict[str, list[dict[str, Any]]] = {}
    if args.only != "private":
        results = [trial(image, mode, args.hog_mib, args.window, args.memory_mib)
                   for mode in ("aerate", "kernel FPR")]
        raw["memfd"] = results
        print(f"\nfreed {args.hog_mib} MiB in a {args.memory_mib} MiB guest "
              f"({results[0]['guest']}, memfd shared RAM); backing read from the kernel")
        print(table(results, args.hog_mib))
    if args.only != "memfd":
        modes = ("aerate balloon", "kernel FPR") if args.smoke else (
            "aerate balloon", "kernel FPR", "aerate + kernel FPR", "nothing")
        results = [private_trial(image, mode, args.hog_mib, args.window, args.memory_mib)
                   for mode in modes]
        raw["private"] = results
        print(f"\nfreed {args.hog_mib} MiB in a {args.memory_mib} MiB guest "
              f"({results[0]['guest']}, private RAM); QEMU's RssAnon read from the kernel")
        print(table(results, args.hog_mib))
        print("\n".join(targets(results, args.hog_mib)))
        print(f"aerated's settings: {PRIVATE_CONFIG!r}")
        for r in results:
            if r.get("reclaimer", "-") != "-":
                b = r.get("balloon") or {}
                print(f"{r['mode']}: reclaimer {r['reclaimer']}; balloon "
                      f"{(b.get('actual_bytes') or 0) >> 20} MiB: {b.get('reason', '')}")
            if r.get("burst_error"):
                print(f"{r['mode']}: second burst failed: {r['burst_error']}")
    if args.json:
        with contextlib.suppress(OSError):
            Path(args.json).write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
