"""bench_reclaim's target lines on recorded private-RAM results (the VM half is what the
benchmark runs): issue 11's targets for each aerate row against the kernel's reporting of
the same run, met or MISSED, printed, never raised."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from perf_bench import load

pytestmark = pytest.mark.unit
MiB = 1 << 20
HOG = 1024


def bench() -> ModuleType:
    return load("bench_reclaim")


def result(mode: str, curve: dict[float, int], oom: int = 0, burst: float | None = 2.0
           ) -> dict[str, Any]:
    """A private trial whose freed MiB reach curve[t] at t s (sampled every 0.5 s to 60)."""
    samples, got = [], 0
    for i in range(121):
        t = i / 2
        got = max([got] + [v for s, v in curve.items() if s <= t])
        samples.append((t, got * MiB))
    return {"mode": mode, "samples": samples, "oom_kills": oom, "burst_s": burst,
            "burst_error": "" if burst is not None else "Killed"}


def test_targets_judge_each_aerate_row_against_the_kernels_of_the_same_run() -> None:
    b = bench()
    kernel = result("kernel FPR", {5: 490, 8: 990})
    fast = result("aerate balloon", {2: 600, 6: 1000})
    slow = result("aerate + kernel FPR", {16: 600, 40: 800}, oom=1)
    lines = b.targets([fast, kernel, slow, result("nothing", {})], HOG)
    text = "\n".join(lines)
    assert "nothing" not in text and len(lines) == 8, text
    mine = text.split("for aerate + kernel FPR")
    assert "t90 <= kernel's: 6.0 s vs 8.0 s -> met" in mine[0]
    assert "MiB back at 30 s >= kernel's: 1000 vs 990 -> met" in mine[0]
    assert "no OOM kill in the second 1024 MiB burst: 0 kills -> met" in mine[0]
    assert "t90 <= kernel's: - s vs 8.0 s -> MISSED" in mine[1]
    assert "MiB back at 30 s >= kernel's: 600 vs 990 -> MISSED" in mine[1]
    assert "1 kills -> MISSED" in mine[1]
    # A burst that failed is no pass, whatever the kill count says.
    failed = b.targets([kernel, result("aerate balloon", {2: 1000}, burst=None)], HOG)
    assert "0 kills, it failed -> MISSED" in failed[-1]


def test_targets_say_when_there_is_nothing_to_compare() -> None:
    b = bench()
    never = result("kernel FPR", {5: 400})
    lines = b.targets([result("aerate balloon", {5: 400}), never], HOG)
    assert "t90 <= kernel's: - s vs - s -> not judged" in lines[1]
    assert b.targets([result("aerate balloon", {5: 400})], HOG) == [
        "targets (issue 11): no kernel FPR trial in this run; 1 aerate row(s) not judged"]
    assert b.targets([never], HOG) == []


def test_the_bench_parses_its_smoke_flag() -> None:
    args = bench().parser().parse_args(["--smoke", "--only", "private"])
    assert args.smoke and args.only == "private" and args.hog_mib == 1024
