"""A real metrics page with every series present, rendered from the real daemon.

The real Daemon, runners, sessions, punch and metrics collector over daemon_sim's
**MOCK of libvirtd** (FakeLibvirt) and simulated guests whose RAM is a real memfd:

- ``A``: punch VM; half of its report is backed in its memfd, half holes, so it has
  discarded, verified and unverified bytes; one batch refused by its discard budget;
- ``P``: private RAM, reclaimed by the balloon (target/actual/floor/held back);
- ``N``: no aerate channel (unmanaged, no backing figure);
- ``R``: refused (libvirt says it is migrating out).

Used by tests/unit/test_dashboard.py (the names the dashboard may use) and
tests/unit/test_promtool.py (``promtool check metrics`` on it).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from daemon_sim import GRANULE, MiB, simulated, until
from prometheus_client import generate_latest

from aerate.host import control, metrics, pressure
from aerate.host.refusal import JobInfo


def fill(fd: int, gpa: int, length: int) -> None:
    """Back [gpa, +length) of a simulated guest's RAM memfd with zeroes: allocated host
    memory, as a page the agent took is (zeroes, so host/punch.py's content check lets its
    discard through)."""
    os.pwrite(fd, bytes(length), gpa)


async def everything(run_dir: str) -> tuple[str, dict[str, Any], list[str]]:
    """(the exposition text, the status views by VM, ``explain A``'s sentences) of the
    four VMs above."""
    with open(os.path.join(run_dir, "none.toml"), "w"):
        pass
    async with simulated(run_dir, ("A", "N", "P", "R")) as (daemon, conn, guests):
        conn.no_channel.add("N")
        conn.private.add("P")
        conn.balloon["P"] = (4096 * MiB, 4096 * MiB)
        conn.job["R"] = JobInfo(active=True, operation="migration-out")
        guests["P"].mem_free = 3072 * MiB
        daemon.host_memory = pressure.HostMemory(6 << 30, 8 << 30, 0.5)
        for n in ("A", "P", "R"):
            daemon.start_runner(n)
        daemon.start_runner("N")
        for n in ("A", "P"):
            await until(lambda n=n: daemon.runners[n].state.value == "running", 5,
                        f"{n} running")
        await until(lambda: daemon.runners["N"].state.value == "no-channel", 5, "N idle")
        await until(lambda: daemon.runners["R"].cache.last().action == "refuse"
                    and daemon.runners["R"].state.value == "running", 5, "R refused")
        a = guests["A"]
        assert a.ep is not None and a.writer is not None
        # A reports 0, 4, 8, 12 MiB (2 MiB each): the first two are backed, two are holes.
        fill(conn.vms["A"].fd, 0, GRANULE)
        fill(conn.vms["A"].fd, 4 * MiB, GRANULE)
        got = asyncio.Event()
        a.on_ack = lambda g: got.set()
        assert a.report_now(a.ep, a.writer) is not None
        await asyncio.wait_for(got.wait(), 5)
        # A budget refusal: a batch larger than A's discard budget allows.
        runner = daemon.runners["A"]
        runner.budget.configure(1, runner.effective_settings()["discard_rate_mib_s"])
        got.clear()
        a.report_now(a.ep, a.writer)   # sent now, or once the fresh token it asks for comes
        await asyncio.wait_for(got.wait(), 5)
        p = guests["P"]
        assert p.ep is not None and p.writer is not None
        p.send_stats(p.ep, p.writer)
        await until(lambda: daemon.runners["P"].balloon_actual < 4096 * MiB, 5,
                    "P's first inflate, read back")
        await control.status(daemon)   # fresh backing figures, as a status request takes
        text = generate_latest(metrics.registry(
            lambda: control.views(daemon), lambda: conn.connected,
            lambda: daemon.host_memory)).decode()
        said = (await control.explain(daemon, "A"))["sentences"]
        return text, {v["vm"]: v for v in control.views(daemon)}, said
