"""bench_coldmem's figures on recorded results (the VM half is what the benchmark runs):
the share of the cold cache it credits, the target's verdict, and a table that still
prints when a trial failed before it measured anything (CI's smoke prints it then)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from perf_bench import load

pytestmark = pytest.mark.unit
MiB = 1 << 20


def bench() -> ModuleType:
    return load("bench_coldmem")


def result(mode: str, back_60: float | None, psi: float | None) -> dict[str, Any]:
    return {"mode": mode, "error": "", "baseline": 500 * MiB, "peak": 1900 * MiB,
            "idle_start": 1850 * MiB, "returned": {30: 600.0, 60: back_60, 120: None},
            "cold": 1000 * MiB, "cached": (1100 * MiB, 200 * MiB), "psi_max": psi,
            "refaults_idle": 256, "refaults_read": 2560, "first_read_s": 3.0,
            "second_read_s": 9.5, "stage": {"state": "at_floor", "reclaimed_bytes": 900 * MiB},
            "checker": {"pages_checked": 10, "corrupted": 0}}


def test_the_cache_share_counts_only_what_came_back_beyond_the_job() -> None:
    b = bench()
    # 512 MiB of the 1312 returned are the job's; 800 of the 1000 MiB cold cache came back.
    assert b.cache_share(result("free first", 1312.0, 0.1), 512) == pytest.approx(0.8)
    assert b.cache_share(result("kernel FPR", 400.0, 0.0), 512) == 0.0
    assert b.cache_share(result("free first", None, 0.1), 512) is None
    assert b.verdict(result("free first", 1312.0, 0.1), 512) == "met"
    assert b.verdict(result("free first", 1312.0, 1.5), 512) == "not met"
    assert b.verdict(result("free first", 1100.0, 0.1), 512) == "not met"


def test_the_table_prints_a_failed_trial_beside_one_that_ran() -> None:
    b = bench()
    text = b.table([result("free first", 1312.0, 0.1),
                    {"mode": "kernel FPR", "error": "HarnessError: the guest went away"}], 512)
    lines = text.splitlines()
    assert lines[0].split() == ["free", "first", "kernel", "FPR"]
    row = next(ln for ln in lines if ln.startswith("... returned by 60 s"))
    assert row.split()[-2:] == ["80", "-"]
    assert next(ln for ln in lines if ln.startswith("target")).split()[-2:] == ["met", "-"]
