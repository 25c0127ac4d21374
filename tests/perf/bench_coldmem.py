"""Benchmark: free first (issue 14) against aerate alone, the kernel's reporting and nothing.

Each config boots a fresh guest of the same shape (memfd shared RAM) and runs the same
work in it: write FILES MiB of files once and read them once (``dd if=/dev/urandom ...
conv=fsync``, then ``cat > /dev/null``: page cache nobody uses again), a job that touches
and frees HOG MiB (deploy/scenario.py's Hog), then an idle of IDLE seconds. The files live
on a scratch ext4 disk of their own (a sparse raw file next to the image cache, made with
the host's mkfs.ext4): the image's root file system has about 1 GiB free, less than the
files. The configs:

- "free first": aerated and the agent, free first switched on when the idle starts with
  the ``set`` request ``aeratectl set VM free_first=true free_first_mib_s=B
  free_first_cache_floor_mib=F`` sends (the same workload as "aerate" up to that moment);
  ``--via config`` instead puts the three in the host config file's [defaults], so the
  stage runs from boot, through the workload, as an operator's deployment would.
- "aerate": aerated and the agent, free first off (the default).
- "kernel FPR": the virtio balloon with free-page-reporting=on; aerated runs beside it and
  the agent sees the feature negotiated and stays statistics-only (as bench_reclaim).
- "nothing": no aerated; the agent waits for a session that never comes (deploy/demo.py's
  reference trial).

The host figure is the RAM memfd's st_blocks, read from the host kernel every 0.5 s (not
from aerated). aerate-checker (64 MiB) verifies its pages over the idle in every config.
Printed side by side: MiB returned 30/60/120 s after the idle starts (peak before the idle
minus now), the cold page cache when the idle starts (guest Cached then minus Cached
before the files) and the share of it returned by 60 s (host MiB returned beyond the job's
HOG MiB, over that cache), the guest's memory PSI ``some`` avg10 at its highest over the
idle (read every 3 s), refaults (workingset_refault_file + _anon) over the idle and over a
second read of the files, the time of the first read and of the second (``cat`` again
after the idle: the cost of the dropped cache; the scratch disk is cache=unsafe, as the
root disk, so a dropped page comes back from the host's page cache: a lower bound on the
cost), the guest's Cached when the idle starts and ends, and the stage's own figures
(state, reclaimed MiB). Beside them the issue's target: free first returns at least 70 %
of the cold page cache within 60 s while PSI some avg10 stays under 1 %, where the
kernel's reporting returns almost none of it.

Full run (four configs, 2048 MiB guests, 1536 MiB of files, a 512 MiB job, 120 s idle;
about half an hour under TCG):

    .venv/bin/python tests/perf/bench_coldmem.py [--via set|config] [--budget-mib-s 64]
                                                 [--floor-mib 128] [--json PATH]

``--smoke`` (CI): 1024 MiB guests, 512 MiB of files, a 256 MiB job, 45 s idle, "free
first" and "kernel FPR" only; the same table. It exits non-zero when a trial failed (a
guest or harness error, aerate-checker finding a corrupted page), never on a figure.

This is a benchmark, not a test: it asserts nothing about speed; it prints what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from aerate.agent import procfs
from aerate.deploy.demo import Trial, sampling
from aerate.deploy.image import cache_dir, ensure_image
from aerate.deploy.scenario import (
    Aerated,
    Hog,
    aerated,
    checker_result,
    columns,
    guest_meminfo,
    ram_allocated,
    scratch_disk,
    start_checker,
    steady_of,
    wait_for,
)
from aerate.deploy.vm import Guest, booted

MiB = 1 << 20
FREE_FIRST, AERATE, KERNEL, NOTHING = "free first", "aerate", "kernel FPR", "nothing"
MODES = (FREE_FIRST, AERATE, KERNEL, NOTHING)
#: Seconds after the idle starts at which the table reads the host curve.
MARKS = (30, 60, 120)
#: Seconds between two reads of the guest's memory PSI over the idle.
PSI_EVERY_S = 3.0
#: The issue's target: this share of the cold cache back by TARGET_S, PSI under TARGET_PSI.
TARGET_SHARE, TARGET_S, TARGET_PSI = 0.70, 60, 1.0
CONFIG = "[defaults]\nreserve_mib = 128\nhwm = 8\nstats_interval_s = 1\n"
CHECKER_MIB = 64
#: The scratch disk: its label, where the guest mounts it, one file per FILE_MIB.
LABEL, MOUNT, FILE_MIB = "aerate-cold", "/mnt/cold", 256
TIMED_CAT = (f"s=$(date +%s.%N); cat {MOUNT}/f* > /dev/null; e=$(date +%s.%N); "
             "echo $s $e")


def refaults(g: Guest) -> int:
    """Refaulted pages since the guest booted (workingset_refault_file + _anon)."""
    vm = procfs.parse_vmstat(g.check("cat /proc/vmstat"))
    return vm.get("workingset_refault_file", 0) + vm.get("workingset_refault_anon", 0)


def psi_some_avg10(g: Guest) -> float:
    """The guest's memory PSI ``some`` avg10 (%)."""
    return procfs.parse_pressure(g.check("cat /proc/pressure/memory")).some.avg10


def timed_cat(g: Guest) -> float:
    """Seconds the guest takes to read every file once."""
    start, end = g.check(TIMED_CAT, 1800).split()
    return float(end) - float(start)


def config_for(mode: str, args: argparse.Namespace) -> str:
    if mode == FREE_FIRST and args.via == "config":
        return CONFIG + (f"free_first = true\nfree_first_mib_s = {args.budget_mib_s}\n"
                         f"free_first_cache_floor_mib = {args.floor_mib}\n")
    return CONFIG


def trial(image: Any, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh guest, one run; {"mode", "error"} and the figures (error "" if it ran)."""
    out: dict[str, Any] = {"mode": mode, "error": ""}
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="aerate-bench-coldmem-", dir=_scratch_dir())))
            disk = scratch_disk(tmp / "cold.raw", args.files_mib + 256, LABEL)
            g = stack.enter_context(booted(image, backing="memfd", memory_mib=args.memory_mib,
                                           free_page_reporting=mode == KERNEL,
                                           extra_devices=(disk,)))
            out["guest"] = g.spec.domain_type
            d: Aerated | None = None
            if mode != NOTHING:
                d = stack.enter_context(aerated(tmp / "run", config_for(mode, args),
                                                ("--vm", g.name)))
                wait_for(lambda: d is not None and d.vm(g.name).get("state") == "running",
                         300, "the aerate session")
                if mode == KERNEL:
                    wait_for(lambda: d is not None and d.guest(g.name, "engine").get("phase")
                             == "disabled", 60, "the agent to go stats-only")
                else:
                    wait_for(lambda: d is not None and d.pass_over(g.name), 600,
                             "the first pass", 2)
            run(g, d, mode, args, out)
    except Exception as e:   # any failure of a trial is reported; the others still run
        out["error"] = f"{type(e).__name__}: {e}"[-3000:]
        print(f"{mode}: trial failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    return out


def run(g: Guest, d: Aerated | None, mode: str, args: argparse.Namespace,
        out: dict[str, Any]) -> None:
    """The workload and the idle in a booted guest; the figures go into ``out``."""
    # By label: the disk is the second virtio disk, but its name follows PCI order.
    g.check(f"mkdir -p {MOUNT} && (mount -L {LABEL} {MOUNT} || mount /dev/vdb {MOUNT})")
    out["baseline"] = steady_of(lambda: ram_allocated(g), limit=240)
    cached0 = guest_meminfo(g)["Cached"]
    curve = Trial(mode, args.hog_mib)
    sizes = [min(FILE_MIB, args.files_mib - i) for i in range(0, args.files_mib, FILE_MIB)]
    with sampling(curve, lambda: ram_allocated(g)):
        g.check(" && ".join(f"dd if=/dev/urandom of={MOUNT}/f{i} bs=1M count={n} "
                            "conv=fsync status=none" for i, n in enumerate(sizes)), 1800)
        out["first_read_s"] = timed_cat(g)
        hog = Hog(g, args.hog_mib, hold_s=3)
        hog.start()
        curve.freed_at = idle_at = hog.join()
        if mode == FREE_FIRST and args.via == "set" and d is not None:
            d.set(g.name, free_first=True, free_first_mib_s=args.budget_mib_s,
                  free_first_cache_floor_mib=args.floor_mib)
        start_checker(g, mib=CHECKER_MIB, duration=args.idle_s)
        m0, r0 = guest_meminfo(g), refaults(g)
        psi: list[tuple[float, float]] = []
        while (t := time.monotonic() - idle_at) < args.idle_s:
            psi.append((t, psi_some_avg10(g)))
            time.sleep(min(PSI_EVERY_S, max(0.0, args.idle_s - t)))
        m1, r1 = guest_meminfo(g), refaults(g)
        out["stage"] = d.guest(g.name, "free_first") if d is not None else {}
        out["reason"] = d.guest(g.name, "engine").get("reason", "") if d is not None else ""
    curve.peak = max((b for t, b in curve.samples if t <= idle_at), default=0)
    out["checker"] = checker_result(g)
    out["second_read_s"] = timed_cat(g)
    r2 = refaults(g)
    out.update(peak=curve.peak, idle_start=_at_or_after(curve, idle_at),
               returned={m: curve.returned_at(m) for m in MARKS},
               cold=max(0, m0["Cached"] - cached0), cached=(m0["Cached"], m1["Cached"]),
               psi=psi, psi_max=max((p for _, p in psi), default=None),
               refaults_idle=r1 - r0, refaults_read=r2 - r1,
               samples=[(t - idle_at, b) for t, b in curve.samples])
    if out["checker"].get("corrupted", 0) or not out["checker"].get("pages_checked"):
        out["error"] = f"aerate-checker: {out['checker']}"


def _at_or_after(curve: Trial, when: float) -> int | None:
    return next((b for t, b in curve.samples if t >= when), None)


def _scratch_dir() -> Path:
    """Where the scratch disks go: beside the image cache (on disk; /run may be RAM)."""
    path = cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_share(r: dict[str, Any], hog_mib: int) -> float | None:
    """Share of the cold cache the host got back by TARGET_S: MiB returned beyond the
    job's freed memory over the cold cache (None if either is unknown)."""
    back = (r.get("returned") or {}).get(TARGET_S)
    cold = r.get("cold")
    if back is None or not cold:
        return None
    return max(0.0, float(back) - hog_mib) * MiB / float(cold)


def verdict(r: dict[str, Any], hog_mib: int) -> str:
    share, psi = cache_share(r, hog_mib), r.get("psi_max")
    if share is None or psi is None:
        return "-"
    return "met" if share >= TARGET_SHARE and psi < TARGET_PSI else "not met"


def table(results: list[dict[str, Any]], hog_mib: int) -> str:
    """The side-by-side figures."""
    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v / MiB:.0f}"

    def num(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    def pages(v: int | None) -> str:
        return "-" if v is None else f"{v * 4096 / MiB:.1f}"

    rows = [("", *[r["mode"] for r in results]),
            ("host backing before the files (MiB)", *[mib(r.get("baseline")) for r in results]),
            ("peak before the idle (MiB)", *[mib(r.get("peak")) for r in results]),
            ("backing when the idle starts (MiB)",
             *[mib(r.get("idle_start")) for r in results])]
    for m in MARKS:
        rows.append((f"MiB returned {m} s into the idle",
                     *[num((r.get("returned") or {}).get(m), ".0f") for r in results]))
    rows += [("cold page cache at idle start (MiB)", *[mib(r.get("cold")) for r in results]),
             (f"... returned by {TARGET_S} s (% of it)",
              *[num(None if (s := cache_share(r, hog_mib)) is None else 100 * s, ".0f")
                for r in results]),
             ("memory PSI some avg10, idle max (%)",
              *[num(r.get("psi_max"), ".2f") for r in results]),
             ("refaults over the idle (MiB)", *[pages(r.get("refaults_idle")) for r in results]),
             ("refaults in the second read (MiB)",
              *[pages(r.get("refaults_read")) for r in results]),
             ("first read of the files (s)", *[num(r.get("first_read_s")) for r in results]),
             ("second read, after the idle (s)",
              *[num(r.get("second_read_s")) for r in results]),
             ("guest Cached idle start/end (MiB)",
              *[f"{mib(r['cached'][0])}/{mib(r['cached'][1])}" if "cached" in r else "-"
                for r in results]),
             ("free first: state", *[str((r.get("stage") or {}).get("state", "-"))
                                     for r in results]),
             ("free first: reclaimed (MiB)",
              *[mib((r.get("stage") or {}).get("reclaimed_bytes")) for r in results]),
             ("checker pages / corrupted",
              *[f"{(r.get('checker') or {}).get('pages_checked', '-')}/"
                f"{(r.get('checker') or {}).get('corrupted', '-')}" for r in results]),
             (f"target ({TARGET_SHARE:.0%} by {TARGET_S} s, PSI < {TARGET_PSI:g} %)",
              *[verdict(r, hog_mib) if r["mode"] == FREE_FIRST else "-" for r in results])]
    return columns(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="short run for CI: a smaller guest, free first and the kernel's "
                         "reporting only")
    ap.add_argument("--memory-mib", type=int, default=2048)
    ap.add_argument("--files-mib", type=int, default=1536,
                    help="MiB of files written and read once")
    ap.add_argument("--hog-mib", type=int, default=512,
                    help="MiB the job touches and frees before the idle")
    ap.add_argument("--idle-s", type=float, default=120.0)
    ap.add_argument("--via", choices=("set", "config"), default="set",
                    help="free first on through the set request when the idle starts "
                         "(default), or in the host config file's [defaults] from boot")
    ap.add_argument("--budget-mib-s", type=int, default=64, help="free_first_mib_s")
    ap.add_argument("--floor-mib", type=int, default=128, help="free_first_cache_floor_mib")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.memory_mib, args.files_mib, args.hog_mib, args.idle_s = 1024, 512, 256, 45.0
        args.modes = f"{FREE_FIRST},{KERNEL}"
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        ap.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    image = ensure_image()
    results = []
    for mode in modes:
        results.append(trial(image, mode, args))
        print(table(results[-1:], args.hog_mib), file=sys.stderr, flush=True)   # as it goes
    print(f"\n{args.files_mib} MiB of files written and read once, a {args.hog_mib} MiB job, "
          f"{args.idle_s:.0f} s idle, in a {args.memory_mib} MiB guest "
          f"({results[0].get('guest', '?')}, memfd shared RAM); backing read from the kernel; "
          f"free first {'on at the idle (set)' if args.via == 'set' else 'on from boot'}, "
          f"{args.budget_mib_s} MiB/s, floor {args.floor_mib} MiB")
    print(table(results, args.hog_mib))
    print(f"target (issue 14): free first returns at least {TARGET_SHARE:.0%} of the cold "
          f"page cache within {TARGET_S} s while memory PSI some avg10 stays under "
          f"{TARGET_PSI:g} %; the kernel's reporting returns almost none of it (share = "
          f"host MiB returned beyond the job's {args.hog_mib} MiB, over the cold cache)")
    for r in results:
        if (r.get("stage") or {}).get("reason") and r["mode"] == FREE_FIRST:
            print(f"{r['mode']}: stage: {r['stage']['reason']}")
        if r.get("reason"):
            print(f"{r['mode']}: agent: {r['reason']}")
        if r["error"]:
            print(f"{r['mode']}: FAILED: {r['error']}")
    if args.json:
        with contextlib.suppress(OSError):
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
