"""The fault matrix on a real guest (S2, S3, S4): crashes and restarts mid-work lose nothing.

- libvirtd restarts: the VM's connection (straight to QEMU's socket) carries on; while
  libvirtd is away the daemon cannot tell whether a migration began or the guest was reset,
  so it refuses to discard, and once libvirtd is back the VM gets a new session (reports
  from before the outage are void).
- aerated is SIGKILLed while the guest holds reported pages: a new daemon starts a new
  session, the guest returns the held pages, reclaim resumes.
- aerate-agent is SIGKILLed in the guest with batches held: systemd restarts it, the arena
  comes back from its named file in /dev/hugepages, and the pages go back only with the
  next session.
A checker in the guest verifies every page it wrote all along.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from aerate.deploy.image import GuestImage
from aerate.deploy.scenario import (
    Aerated,
    Hog,
    aerated,
    agent_status,
    checker_result,
    stall_with_a_report_in_flight,
    start_checker,
    wait_for,
)
from aerate.deploy.vm import DAEMONS, Guest, booted, ensure_daemons

pytestmark = [pytest.mark.vm, pytest.mark.fault]
MiB = 1 << 20
CONFIG = "[defaults]\nreserve_mib = 128\nhwm = 8\nstats_interval_s = 1\n"


@pytest.fixture(scope="module")
def guest_and_run(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[Guest, Any]]:
    run = tmp_path_factory.mktemp("aerated-faults")
    with booted(guest_image, backing="memfd", memory_mib=1536) as g:
        start_checker(g, mib=192, duration=400, churn=2)
        yield g, run
        result = checker_result(g, timeout=900)
        assert result["corrupted"] == 0, result


def engine(d: Aerated, name: str) -> dict[str, Any]:
    return dict((d.vm(name).get("guest") or {}).get("engine") or {})


def surplus(g: Guest) -> int:
    return int(g.check("awk '/HugePages_Surp/ {print $2}' /proc/meminfo").strip())


def test_libvirtd_restart_refuses_meanwhile_then_starts_a_new_session(
        guest_and_run: tuple[Guest, Any]) -> None:
    g, run = guest_and_run
    with aerated(run / "a", CONFIG, ("--vm", g.name)) as d:
        wait_for(lambda: d.vm(g.name).get("state") == "running", 300, "the session")
        sessions = d.vm(g.name)["sessions"]
        libvirtd = next(x for x in DAEMONS if x.name == "libvirtd")
        pid = int(libvirtd.pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not d.status().get("libvirt"), 30, "aerated to notice libvirtd gone")
        # While libvirtd is away a freed GiB is reported, and refused: nothing is discarded.
        before = d.vm(g.name)
        hog = Hog(g, 256, hold_s=1)
        hog.start()
        hog.join()
        wait_for(lambda: d.vm(g.name).get("refused_bytes", 0) > before.get("refused_bytes", 0),
                 120, "a refused batch")
        assert d.vm(g.name)["discarded_bytes"] == before["discarded_bytes"]
        assert "cannot ask libvirt" in d.vm(g.name)["reason"] or \
            "cannot ask libvirt" in d.log_text()
        ensure_daemons()
        wait_for(lambda: d.status().get("libvirt"), 60, "aerated to reconnect to libvirtd")
        vm = wait_for(lambda: (v := d.vm(g.name)).get("sessions", 0) > sessions
                      and v.get("state") == "running" and v, 120,
                      "a new session after libvirtd came back")
        # Reclaim works again once libvirtd is back (the agent retries after its back-off).
        hog = Hog(g, 256, hold_s=1)
        hog.start()
        hog.join()
        wait_for(lambda: d.vm(g.name)["discarded_bytes"] > vm["discarded_bytes"], 400,
                 "a discard after libvirtd came back", 2)



def test_aerated_dies_with_a_batch_in_flight_then_a_new_daemon_takes_over(
        guest_and_run: tuple[Guest, Any]) -> None:
    """S2 across a daemon crash: a batch the daemon never acked stays held in the guest
    until a new daemon starts a new session or its lease runs out."""
    g, run = guest_and_run
    # A 12 s lease: the guest may still report in the first seconds after the daemon
    # stopped (a 2 s lease makes it stop reporting at once), and holds that batch for a
    # whole lease, which outlasts the checks below.
    with aerated(run / "b", CONFIG + "capacity = 2\nlease_s = 12\n", ("--vm", g.name)) as d:
        wait_for(lambda: d.vm(g.name).get("state") == "running", 300, "the session")
        try:
            # The daemon reads nothing more, acks nothing, with a report in flight.
            stall_with_a_report_in_flight(g, d)
            held = surplus(g)
            assert held > 0
        finally:
            d.proc.kill()
            d.proc.wait()
    time.sleep(3)
    assert surplus(g) >= held, "pages of an un-acked batch went back inside their lease"
    assert agent_status(g).startswith("waiting")
    with aerated(run / "c", CONFIG, ("--vm", g.name)) as d2:
        wait_for(lambda: d2.vm(g.name).get("state") == "running", 300, "a new session")
        wait_for(lambda: surplus(g) == 0 and engine(d2, g.name).get("phase") == "idle", 300,
                 "the guest to finish its pass with the new daemon", 2)


def test_agent_sigkill_with_pages_held_recovers_them(guest_and_run: tuple[Guest, Any]) -> None:
    g, run = guest_and_run
    # A 12 s lease, as for the daemon kill above: the guest still reports once the daemon
    # is stopped (a 2 s lease leaves it without a fresh token at once).
    with aerated(run / "d", CONFIG + "delay_ms = 2000\ncapacity = 2\nlease_s = 12\n",
                 ("--vm", g.name)) as d:
        wait_for(lambda: d.vm(g.name).get("state") == "running", 300, "the session")
        # Pages held for sure at the kill: a report waits for its ack from a stopped daemon
        # (a pass's acked blocks alone may all be back by the time the kill lands).
        stall_with_a_report_in_flight(g, d, mib=512)
        try:
            held = surplus(g)
            assert held > 0
            pid = g.check("systemctl show -p MainPID --value aerate-agent").strip()
            g.check("systemctl kill -s KILL aerate-agent")
            wait_for(lambda: g.check("systemctl show -p MainPID --value aerate-agent").strip()
                     not in ("0", pid), 60, "systemd to restart the agent")
            line = wait_for(lambda: re.search(
                r"recovered arena from /dev/hugepages/aerate-agent-arena: (\d+) blocks",
                g.check("journalctl -u aerate-agent --no-pager -o cat | "
                        "grep -E 'aerate-agent [0-9.]+ on' | tail -1")), 60,
                "the restarted agent to recover its arena from the named file")
            assert int(line.group(1)) > 0, line.group(0)
            # Nothing goes back before a new session (S2): the daemon is still stopped.
            assert surplus(g) >= held
        finally:
            d.proc.send_signal(signal.SIGCONT)
        # The recovered blocks go back with the new session (the daemon answers the new
        # agent's need-sync at once, so they may be gone by the time we look): the agent
        # says how many it returned then. A later session line (a sync the daemon started
        # for its own reasons) returns none, so every line of the new agent counts.
        new_pid = g.check("systemctl show -p MainPID --value aerate-agent").strip()

        def returned() -> int:
            counts = re.findall(r"(\d+) orphaned blocks returned", g.check(
                f"journalctl -u aerate-agent _PID={new_pid} --no-pager -o cat"))
            return max((int(c) for c in counts), default=0)

        try:
            wait_for(returned, 60, "the new session to return the recovered blocks")
        except Exception:
            print("agent journal:\n" + g.check(
                "journalctl -u aerate-agent --no-pager -o short-monotonic | tail -40"))
            print("daemon log:\n" + d.log_text()[-6000:])
            raise
        wait_for(lambda: surplus(g) == 0 and engine(d, g.name).get("phase") == "idle", 300,
                 "the recovered pages to go back after the new session", 2)
        assert d.vm(g.name)["sessions"] >= 2
