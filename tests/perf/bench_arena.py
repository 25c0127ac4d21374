"""Arena fill/release throughput beside this machine's raw fault-in bandwidth (a benchmark).

Run as root from the repository root:

    python tests/perf/bench_arena.py            # 1 GiB, 5 rounds
    python -m tests.perf.bench_arena --smoke    # 64 MiB, 2 rounds (CI)

Each round measures every method once, in the same order, on the same amount of memory, so
all of them see the same state of the machine. On a VM whose host backs guest memory lazily
(or reclaims it through free page reporting), the first touch of never-used guest memory is
an order of magnitude slower than later ones; medians over rounds hide that first round, the
min column shows it. Arena figures include everything the agent does per fill: fallocate of
each 2 MiB page, mapping it, reading its PFN from pagemap, and the surplus-budget writes.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

from aerate.agent import arena as ar
from aerate.agent.hugetlb import SurplusBudget

GiB = 1 << 30
Timing = Callable[[int], Tuple[float, float]]  # bytes -> (seconds to fill, seconds to free)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hugetlb_arena(budget: SurplusBudget) -> Timing:
    """The agent's real path: HugetlbArena.fill(n) and release()."""

    def run(size: int) -> Tuple[float, float]:
        n = size // ar.BLOCK_BYTES
        with ar.HugetlbArena(n, budget) as arena:
            blocks: List[ar.Block] = []
            fill = _timed(lambda: blocks.extend(arena.fill(n)))
            if len(blocks) != n:
                raise SystemExit(f"hugetlb arena filled {len(blocks)} of {n} blocks")
            release = _timed(lambda: arena.release(blocks))
        return fill, release

    return run


def hugetlb_populate(budget: SurplusBudget) -> Timing:
    """Alternative fill: one MADV_POPULATE_WRITE over the arena mapping (no PFN lookup)."""

    def run(size: int) -> Tuple[float, float]:
        n = size // ar.BLOCK_BYTES
        with ar.HugetlbArena(n, budget) as arena:
            fd = arena.fileno()
            assert fd is not None
            budget.set(n)
            try:
                err: List[int] = []
                fill = _timed(
                    lambda: err.append(ar._madvise(arena._base, size, ar.MADV_POPULATE_WRITE))
                )
                if err[0]:
                    raise SystemExit(f"MADV_POPULATE_WRITE on hugetlb: {os.strerror(err[0])}")
                release = _timed(lambda: ar._punch(fd, 0, size))
            finally:
                budget.set(0)
        return fill, release

    return run


def thp_arena(size: int) -> Tuple[float, float]:
    """The fallback arena: anonymous THP with mlock."""
    n = size // ar.BLOCK_BYTES
    with ar.ThpArena(n, backing="anon") as arena:
        blocks: List[ar.Block] = []
        fill = _timed(lambda: blocks.extend(arena.fill(n)))
        release = _timed(lambda: arena.release(blocks))
    if len(blocks) < n:
        print(f"  (THP arena kept {len(blocks)} of {n} blocks)", file=sys.stderr)
    return fill, release


def raw_populate(huge: bool) -> Timing:
    """Raw fault-in: anonymous mmap + MADV_POPULATE_WRITE (4 KiB pages, or THP)."""

    def run(size: int) -> Tuple[float, float]:
        addr = ar._mmap(0, size, ar._MAP_PRIVATE | ar._MAP_ANONYMOUS)
        try:
            if huge:
                ar._madvise(addr, size, ar._MADV_HUGEPAGE)
            err: List[int] = []
            fill = _timed(lambda: err.append(ar._madvise(addr, size, ar.MADV_POPULATE_WRITE)))
            if err[0]:
                raise SystemExit(f"MADV_POPULATE_WRITE needs Linux 5.14+: {os.strerror(err[0])}")
        finally:
            release = _timed(lambda: ar._libc.munmap(addr, size))
        return fill, release

    return run


def raw_touch(size: int) -> Tuple[float, float]:
    """Raw fault-in by touching: one byte per 4 KiB page (a C-speed strided slice write)."""
    m = mmap.mmap(-1, size)
    ones = b"\x01" * (size // mmap.PAGESIZE)

    def touch() -> None:
        m[:: mmap.PAGESIZE] = ones

    fill = _timed(touch)
    release = _timed(m.close)
    return fill, release


def main(argv: List[str]) -> int:
    """Print fill and release throughput for each method, median over rounds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="memory per method and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="64 MiB, 2 rounds (for CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size_mib, args.rounds = 64, 2
    if os.geteuid() != 0:
        print("bench_arena needs root (hugetlb budget, pagemap PFNs)", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    size -= size % ar.BLOCK_BYTES
    run_dir = tempfile.mkdtemp(prefix="aerate-bench-")
    budget = SurplusBudget(run_dir)
    methods: Dict[str, Timing] = {
        "hugetlb arena (fallocate+pagemap)": hugetlb_arena(budget),
        "hugetlb MADV_POPULATE_WRITE": hugetlb_populate(budget),
        "THP arena (anon, mlock)": thp_arena,
        "raw anon 4K MADV_POPULATE_WRITE": raw_populate(huge=False),
        "raw anon 4K touch": raw_touch,
        "raw anon THP MADV_POPULATE_WRITE": raw_populate(huge=True),
    }
    results: Dict[str, List[Tuple[float, float]]] = {name: [] for name in methods}
    try:
        for _ in range(args.rounds):
            for name, fn in methods.items():
                results[name].append(fn(size))
    finally:
        budget.restore()
        budget.close()
    gib = size / GiB
    print(f"{args.size_mib} MiB per method, {args.rounds} rounds; GiB/s median (min-max)")
    print(f"{'method':36} {'fill':>22} {'release':>22}")
    medians: Dict[str, float] = {}
    for name, runs in results.items():
        fills = [gib / f for f, _ in runs]
        frees = [gib / r for _, r in runs]
        medians[name] = statistics.median(fills)
        print(
            f"{name:36} {medians[name]:7.2f} ({min(fills):5.2f}-{max(fills):5.2f})"
            f" {statistics.median(frees):8.1f} ({min(frees):5.1f}-{max(frees):6.1f})"
        )
    arena = medians["hugetlb arena (fallocate+pagemap)"]
    for raw in [name for name in medians if name.startswith("raw")]:
        print(f"aeration fill / {raw}: {arena / medians[raw]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
