"""CI's smoke run of bench_daemon: it runs, every scenario prints its figures (no speed is
asserted: a benchmark reports, it does not pass or fail on timing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.perf, pytest.mark.timeout(120)]
BENCH = Path(__file__).with_name("bench_daemon.py")


def test_bench_daemon_smoke() -> None:
    r = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True,
                       text=True, timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("N=")]
    assert len(lines) == 6, r.stdout
    assert all("CPU" in ln and "p50/p99/max" in ln and "nan" not in ln for ln in lines), \
        r.stdout
    # Both floods cost the loop less than the input budget's bound; the 0xFF one is cut
    # off by it (the need-sync one is cut off by the need-sync rate when the guests'
    # process answers each sync fast enough: not asserted, it depends on the machine).
    assert r.stdout.count("-> met); extra daemon CPU") == 2, r.stdout
    assert "cut off: yes (input flood" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
