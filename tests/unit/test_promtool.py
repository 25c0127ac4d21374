"""``promtool check metrics`` (Prometheus' own linter) passes clean on aerated's page.

The page is a real render of the daemon's metrics with every series present: a punch VM
with verified and unverified discards and a budget refusal, a balloon VM, an unmanaged VM
and a refused one (metrics_page.py: the real daemon over daemon_sim's MOCK of libvirtd).
promtool comes from Debian's prometheus package (deploy/setup-host extracts the binary)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from metrics_page import everything

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]
PROMTOOL = shutil.which("promtool")


def check(page: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, "check", "metrics"], input=page, text=True,
                          capture_output=True, timeout=30, check=False)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (deploy/setup-host "
                    "extracts it from Debian's prometheus package)")
def test_promtool_check_metrics_passes_on_the_full_page(tmp_path: Path) -> None:
    page = asyncio.run(everything(str(tmp_path)))[0]
    for series in ('aerate_discard_verified_bytes_total{vm="A"}',
                   'aerate_balloon_actual_bytes{vm="P"}', 'aerate_refused{reason="migration"',
                   'reclaimer="unmanaged"', 'aerate_budget_refused_bytes_total{vm="A"} 2',
                   'aerate_effective_setting{key="hwm",vm="A"}'):
        assert series in page, series
    got = check(page)
    assert got.returncode == 0 and not got.stdout.strip() and not got.stderr.strip(), \
        f"promtool says:\n{got.stdout}{got.stderr}"
    # It does lint: a counter without _total, or a unit-less name, is reported.
    bad = check("# HELP aerate_x_bytes x\n# TYPE aerate_x_bytes counter\naerate_x_bytes 1\n")
    assert bad.returncode != 0 and "_total" in bad.stdout + bad.stderr
