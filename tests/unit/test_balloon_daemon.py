"""The balloon reclaimer's wiring in the daemon (host/daemon.py VmRunner.balloon_tick and the
paths that wake it), through the real Daemon on daemon_sim's MOCK of libvirtd: what wakes
the controller, what it measures and what it is fed. The policy itself is
test_balloon_controller.py's.

BALLOON_TICK is set to an hour here, so that only the wake under test can make the
controller look again: with the real 1 s tick each wake would be hidden behind it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_sim import FakeLibvirt, SimGuest, make_private, until
from daemon_sim import run_simulated as run

from aerate.host import balloon as balloon_mod
from aerate.host import daemon as daemon_mod

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

MiB = 1 << 20
FULL = 4096 * MiB
FIRST = FULL - balloon_mod.MIN_STEP  # the first inflation: the least step, rate unknown


@pytest.fixture(autouse=True)
def no_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_mod, "BALLOON_TICK", 3600.0)


async def serving(daemon: Any, guests: dict[str, SimGuest], name: str = "P") -> Any:
    """Start ``name`` and wait until its controller looked once (woken by the balloon
    decision, with no statistics yet): from here only a wake makes it look again."""
    daemon.start_runner(name)
    runner = daemon.runners[name]
    await until(lambda: guests[name].ep is not None and runner.state.value == "running"
                and runner.cache.last().action == "balloon" and runner.balloon_reason,
                5, f"{name}'s controller to look once")
    return runner


def stats(guests: dict[str, SimGuest], name: str = "P") -> None:
    g = guests[name]
    assert g.ep is not None and g.writer is not None
    g.send_stats(g.ep, g.writer)


def sets(conn: FakeLibvirt, name: str = "P") -> list[int]:
    return [t for n, t in conn.balloon_sets if n == name]


def test_a_statistics_message_wakes_the_controller_at_once(tmp_path: Path) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        make_private(conn, guests, "P")
        runner = await serving(daemon, guests)
        assert sets(conn) == [] and "statistics" in runner.balloon_reason
        t0 = time.monotonic()
        stats(guests)
        await until(lambda: sets(conn) == [FIRST], 3, "the first inflate")
        assert time.monotonic() - t0 < 1.0
        assert "inflating by 256 MiB" in runner.balloon_reason

    run(tmp_path, body, names=("P",))


def test_libvirts_balloon_event_wakes_the_controller_and_the_measured_rate_sizes_the_next_step(
        tmp_path: Path) -> None:
    """The balloon's arrival is seen through libvirt's BALLOON_CHANGE event (delivered on
    libvirt's event thread), not at the next tick; the time from the target to that arrival
    is the guest driver's inflation rate, and the next step is what the driver moves in
    STEP_HORIZON_S at that rate, not the fixed least step."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        make_private(conn, guests, "P")
        runner = await serving(daemon, guests)
        t_set = time.monotonic()  # before the target is set
        stats(guests)
        await until(lambda: sets(conn) == [FIRST], 3, "the first inflate")
        assert runner.balloon_rate is None and "inflating" in runner.balloon_reason
        await asyncio.sleep(0.5)  # the guest's driver takes 256 MiB in half a second
        event = threading.Thread(target=daemon._on_balloon, args=("P", FIRST))
        event.start()
        event.join()
        await until(lambda: "taken after the balloon reached" in runner.balloon_reason, 2,
                    "the controller to see the balloon arrive")
        took = time.monotonic() - t_set
        rate = runner.balloon_rate
        assert rate is not None and balloon_mod.MIN_STEP / took <= rate \
            <= balloon_mod.MIN_STEP / 0.5, (rate, took)
        # Statistics taken after the arrival: the next step, sized by that rate (the floor,
        # half of 4 GiB, and the 3 GiB the guest says are free bound it).
        stats(guests)
        await until(lambda: len(sets(conn)) == 2, 3, "the second inflate")
        step = balloon_mod.step_for(rate)
        assert step >= 2 * balloon_mod.MIN_STEP
        assert sets(conn)[1] == max(FULL // 2, FIRST - step), (sets(conn), step >> 20)

    run(tmp_path, body, names=("P",))


def test_the_guests_demand_rate_deflates_before_its_free_memory_runs_out(
        tmp_path: Path) -> None:
    """600 MiB free is no shortage by itself (more than reserve/2, and beyond the reserve
    + watermarks: alone it would inflate further), but 2 GiB gone since the last message,
    a fraction of a second ago, is: the rate between the two messages (MemFree plus what
    the balloon holds, so the balloon's own take is no demand) deflates at once."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        make_private(conn, guests, "P")
        g = guests["P"]
        g.balloon_bytes = 0
        runner = await serving(daemon, guests)
        stats(guests)
        await until(lambda: sets(conn) == [FIRST], 3, "the first inflate")
        await asyncio.sleep(0.2)
        g.mem_free, g.balloon_bytes = 600 * MiB, FULL - FIRST
        stats(guests)
        await until(lambda: len(sets(conn)) == 2, 3, "the controller's answer")
        assert sets(conn)[1] == FULL, sets(conn)
        assert "falling" in runner.balloon_reason, runner.balloon_reason

    run(tmp_path, body, names=("P",))


def test_a_guest_whose_statistics_flap_is_held_and_status_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon keeps the balloon's reversals (host/balloon.py Flaps) across ticks: after
    two inflate-then-deflate cycles the next plentiful message does not inflate again."""
    monkeypatch.setattr(balloon_mod, "COOLDOWN_CAP_S", 0.0)  # cycles as fast as messages

    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        make_private(conn, guests, "P")
        g = guests["P"]
        runner = await serving(daemon, guests)
        for cycle in range(balloon_mod.FLAP_REVERSALS):
            g.mem_free, g.balloon_bytes = 3072 * MiB, 0
            stats(guests)
            await until(lambda n=2 * cycle + 1: len(sets(conn)) == n, 3, f"inflate {cycle}")
            g.mem_free, g.balloon_bytes = 100 * MiB, FULL - FIRST
            stats(guests)
            await until(lambda n=2 * cycle + 2: len(sets(conn)) == n, 3, f"deflate {cycle}")
            assert sets(conn)[-1] == FULL and "short of memory" in runner.balloon_reason
        g.mem_free, g.balloon_bytes = 3072 * MiB, 0
        stats(guests)
        await until(lambda: "flapping" in runner.balloon_reason, 3, "the hold")
        await asyncio.sleep(0.2)
        assert len(sets(conn)) == 2 * balloon_mod.FLAP_REVERSALS, sets(conn)
        (vm,) = (await daemon.handle({"cmd": "status"}))["vms"]
        assert "balloon flapping" in vm["balloon"]["reason"], vm

    run(tmp_path, body, names=("P",))
