"""Churn (issue 15): a guest that allocates and frees all the time gets its memory back to
the host once the churn ends, without corruption and without the agent looping.

Real pieces only: the guest image, libvirt + QEMU (TCG here), aerated from this checkout, a
seeded churn of overlapping ``stress-ng --vm --verify`` jobs in the guest (deploy/scenario.py
``Churn``), the host backing of the guest's RAM memfd read from the kernel (st_blocks).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from aerate.deploy.image import GuestImage
from aerate.deploy.scenario import Churn, aerated, free_backed, steady_of, wait_for
from aerate.deploy.vm import booted

# wip (out of tests/run until it passes here). Final code, under TCG: a first run measured
# the raw backing and failed (402 MiB against a 211 MiB baseline: the guest's own use had
# grown, hence free_backed); two runs with free_backed were back within the margin 4.3 and
# 7.7 s after the churn; the first then failed a stricter quiet check (2 passes, 448 MiB
# in 20 s; the loop of issue 15 measured 9 passes, 972 MiB), the second had 1 pass and then
# read 79 MiB over its baseline at the last read, 14 MiB over the margin (the guest freeing
# memory under hwm late, or drift of the aerated estimate: not told apart yet).
# Run: AERATE_TIERS=wip ./tests/run tests/vm/test_churn.py
pytestmark = [pytest.mark.vm, pytest.mark.wip]
MiB = 1 << 20
#: Seconds of churn (CI's default keeps the test to about four minutes under TCG).
CHURN_S = int(os.environ.get("AERATE_CHURN_S", "60"))
#: Free memory left backed after the churn, beyond the idle baseline (``free_backed``: the
#: guest's own use, which grows by 100-400 MiB of page cache and slab over a churn, is taken
#: out): what no pass reports by design, free memory under ``hwm`` (16 MiB here), plus
#: order < 9 fragments the churn leaves in free memory, which no 2 MiB report can take.
MARGIN_MIB = 64


def engine(d: Any, name: str) -> dict[str, Any]:
    return dict((d.vm(name).get("guest") or {}).get("engine") or {})


def test_memory_comes_back_after_churn_and_the_agent_goes_quiet(
        guest_image: GuestImage, tmp_path: Path) -> None:
    config = "[defaults]\nreserve_mib = 128\nhwm = 8\nstats_interval_s = 1\n"
    with booted(guest_image, backing="memfd", memory_mib=1024) as g, \
            aerated(tmp_path, config, ("--vm", g.name)) as d:
        wait_for(lambda: engine(d, g.name).get("counters", {}).get("passes", 0) >= 1
                 and engine(d, g.name).get("phase") == "idle", 600, "the first pass", 2)
        baseline = steady_of(lambda: free_backed(g), limit=120)
        churn = Churn(g, seed=15, seconds=CHURN_S, lo_mib=64, hi_mib=384, life_s=12)
        churn.start()
        summary = churn.join()
        assert summary["failed"] == [], f"churn jobs failed (a verify among them?): {summary}"
        assert summary["jobs"] >= 3, summary
        limit = baseline + MARGIN_MIB * MiB

        def back() -> bool:
            return free_backed(g) <= limit

        try:
            wait_for(back, 60, "the backing to return within the margin of the baseline")
        except Exception:
            print(f"free but backed: baseline {baseline >> 20} MiB, now "
                  f"{free_backed(g) >> 20} MiB; "
                  f"{engine(d, g.name)}\n{d.log_text()[-3000:]}")
            raise
        took = time.monotonic() - summary["ended"]
        # Quiet: once the memory is back, passes do not keep starting (the churn back-off
        # spaces them by up to 8 s at most while free memory still moves).
        before = engine(d, g.name).get("counters", {})
        time.sleep(20)
        after = engine(d, g.name).get("counters", {})
        reported = after["reported_bytes"] - before["reported_bytes"]
        started = after["passes_started"] - before["passes_started"]
        print(f"{summary['jobs']} churn jobs; free-but-backed back within {MARGIN_MIB} MiB "
              f"of the {baseline >> 20} MiB baseline {took:.1f} s after the churn; then 20 s: "
              f"{started} passes, {reported >> 20} MiB reported")
        # Measured: 2 passes (448 MiB) with the fix; 9 passes (972 MiB) with the pass budget
        # counting aerated blocks and no churn back-off (the loop of issue 15).
        assert started <= 4, (before, after)
        assert free_backed(g) <= limit
