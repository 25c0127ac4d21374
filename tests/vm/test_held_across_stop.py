"""Held pages outlive a killed agent *and* its unit's stop in the booted guest (S3).

``systemctl kill -s KILL aerate-agent`` then ``systemctl stop aerate-agent`` while a batch
is un-acked (the daemon SIGSTOPped): systemd 252 flushes the fd store on that stop, so only
the named arena file on the guest's /dev/hugepages (dev-hugepages.mount, outside the
agent's PrivateMounts namespace) keeps the pages. Checked in the guest: HugePages_Surp
still counts them and the file exists; a started agent recovers them from the file, and
they go back only with the next session. This also proves the unit's sandbox lets the
agent create and reopen the file there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from aerate.deploy.image import GuestImage
from aerate.deploy.scenario import (
    aerated,
    checker_result,
    stall_with_a_report_in_flight,
    start_checker,
    wait_for,
)
from aerate.deploy.vm import Guest, booted

pytestmark = [pytest.mark.vm, pytest.mark.fault]
# A 12 s lease: the un-acked batch stays held (by the agent, then by the file) for longer
# than the kill and stop below take.
CONFIG = ("[defaults]\nreserve_mib = 128\nhwm = 8\nstats_interval_s = 1\ncapacity = 8\n"
          "lease_s = 12\n")
ARENA = "/dev/hugepages/aerate-agent-arena"


@pytest.fixture(scope="module")
def guest_and_run(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[Guest, Any]]:
    run = tmp_path_factory.mktemp("aerated-holding")
    with booted(guest_image, backing="memfd", memory_mib=1536) as g:
        start_checker(g, mib=192, duration=300, churn=2)
        yield g, run
        result = checker_result(g, timeout=900)
        assert result["corrupted"] == 0, result


def surplus(g: Guest) -> int:
    return int(g.check("awk '/HugePages_Surp/ {print $2}' /proc/meminfo").strip())



def test_kill_then_stop_keeps_held_pages_in_the_named_file(
        guest_and_run: tuple[Guest, Any]) -> None:
    g, run = guest_and_run
    assert "hugetlbfs" in g.check("findmnt -n -o FSTYPE /dev/hugepages"), \
        "the guest image has no /dev/hugepages mount"
    knob = g.check("cat /proc/sys/vm/nr_overcommit_hugepages").strip()
    with aerated(run / "a", CONFIG, ("--vm", g.name)) as d:
        wait_for(lambda: d.vm(g.name).get("state") == "running", 300, "the session")
        assert g.check(f"test -e {ARENA} && echo yes").strip() == "yes", \
            "the agent did not make its arena file (sandbox?)"
        start = g.check("journalctl -u aerate-agent --no-pager -o cat | "
                        "grep -E 'aerate-agent [0-9.]+ on' | tail -1")
        # The guest kernel (6.1) under the unit's seccomp filter pins: no weakness stated.
        assert "not pinned" not in start and "new hugetlb arena in" in start, start
        try:
            # The daemon reads nothing more, acks nothing, with a report in flight.
            stall_with_a_report_in_flight(g, d)
            held = surplus(g)
            assert held > 0
            g.check("systemctl kill -s KILL aerate-agent; systemctl stop aerate-agent")
            assert g.check("systemctl is-active aerate-agent || true").strip() != "active"
            assert surplus(g) == held, "held pages were freed by the kill + stop"
            assert g.check(f"test -e {ARENA} && echo yes").strip() == "yes"
            g.check("systemctl start aerate-agent")
            wait_for(lambda: f"recovered arena from {ARENA}: {held} blocks" in g.check(
                "journalctl -u aerate-agent --no-pager -o cat | grep -E 'aerate-agent [0-9.]+ on' "
                "| tail -1"), 60, "the started agent to recover its arena from the file")
            assert surplus(g) == held, "recovered pages went back without a new session"
        finally:
            d.proc.kill()
            d.proc.wait()
    with aerated(run / "b", CONFIG, ("--vm", g.name)) as d2:
        wait_for(lambda: d2.vm(g.name).get("state") == "running", 300, "a new session")
        wait_for(lambda: surplus(g) == 0, 300, "the orphans to go back after the new session", 2)
    # The budget record survived the stop (RuntimeDirectoryPreserve=yes): the operator's
    # value is back once nothing is held.
    wait_for(lambda: g.check("cat /proc/sys/vm/nr_overcommit_hugepages").strip() == knob, 60,
             "nr_overcommit_hugepages back at its value from before")
