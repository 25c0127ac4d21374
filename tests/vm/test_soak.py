"""Kill soaks on a real guest (S2, S3, S4): SIGKILL of the agent and of the daemon at random
points of the cycle, with memory churning in the guest, lose no page.

A seeded random schedule kills ``aerate-agent`` (systemd restarts it; it recovers its arena)
or ``aerated`` (a new one takes over) while aerate-checker churns and verifies, and a hog
keeps freeing memory so that batches are in flight at the moment of many kills. At the end
every checker (aerate-checker, ``stress-ng --verify``) must have found nothing.

Counts: ``AERATE_SOAK_KILLS`` agent kills (CI default 8; the issue's full soak is 100) and
``AERATE_SOAK_DAEMON_KILLS`` daemon kills (CI default 3; full 20), with the seed in
``AERATE_SOAK_SEED`` (printed) so a failing schedule can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from aerate.deploy.image import GuestImage
from aerate.deploy.scenario import Hog, aerated, checker_result, start_checker, wait_for
from aerate.deploy.vm import booted

pytestmark = [pytest.mark.vm, pytest.mark.fault]
CONFIG = "[defaults]\nreserve_mib = 128\nhwm = 4\ncapacity = 8\ndelay_ms = 200\n" \
         "stats_interval_s = 1\n"


def count(name: str, default: int) -> int:
    return max(0, int(os.environ.get(name, default)))


def test_random_kills_of_agent_and_daemon_lose_no_page(guest_image: GuestImage,
                                                       tmp_path: Path) -> None:
    seed = int(os.environ.get("AERATE_SOAK_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    agent_kills = count("AERATE_SOAK_KILLS", 8)
    daemon_kills = count("AERATE_SOAK_DAEMON_KILLS", 3)
    print(f"soak seed {seed}: {agent_kills} agent kills, {daemon_kills} daemon kills")
    schedule = ["agent"] * agent_kills + ["daemon"] * daemon_kills
    rnd.shuffle(schedule)
    with booted(guest_image, backing="memfd", memory_mib=1536) as g:
        start_checker(g, mib=192, duration=60 + 25 * len(schedule), churn=2)
        g.check("systemd-run --unit=aerate-soak-stress --collect -p StandardOutput=file:"
                "/run/aerate-soak-stress.log -p StandardError=file:/run/aerate-soak-stress.log"
                f" stress-ng --vm 1 --vm-bytes 128M --verify --timeout "
                f"{60 + 25 * len(schedule)}s --metrics-brief")
        kills = {"agent": 0, "daemon": 0}
        for i, what in enumerate(schedule):
            with aerated(tmp_path / f"d{i}", CONFIG, ("--vm", g.name)) as d:
                wait_for(lambda: d.vm(g.name).get("state") == "running", 300, "a session")
                hog = Hog(g, rnd.choice((128, 256, 384)), hold_s=rnd.uniform(0.2, 2))
                hog.start()
                hog.join()
                # Somewhere in the pass the freed memory starts: fill, report, ack, drain.
                time.sleep(rnd.uniform(0.0, 4.0))
                if what == "agent":
                    pid = g.check("systemctl show -p MainPID --value aerate-agent").strip()
                    g.check("systemctl kill -s KILL aerate-agent")
                    wait_for(lambda pid=pid: g.check("systemctl show -p MainPID --value "
                                                     "aerate-agent").strip()
                             not in ("0", pid),
                             90, "systemd to restart the agent")
                    # Let the new agent get its session (its orphans go back then).
                    wait_for(lambda: d.vm(g.name).get("state") == "running", 120,
                             "the restarted agent's session")
                else:
                    d.proc.send_signal(signal.SIGKILL)
                    d.proc.wait()
                kills[what] += 1
        wait_for(lambda: g.run("systemctl is-active -q aerate-soak-stress", 30)[0] != 0,
                 900, "stress-ng to finish", interval=2)
        stress = g.check("cat /run/aerate-soak-stress.log")
        assert "fail" not in stress.lower() and "successful run completed" in stress, stress
        result = checker_result(g, timeout=900)
        assert result["corrupted"] == 0, (seed, result)
        assert kills == {"agent": agent_kills, "daemon": daemon_kills}
