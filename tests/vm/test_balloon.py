"""End to end: the balloon reclaimer gives a private-RAM guest's freed memory back.

Real pieces only: a guest with libvirt's default private anonymous RAM and a virtio
memballoon (autodeflate on), the aerated daemon from this checkout driving the balloon
through libvirt, and QEMU's private anonymous memory read from the kernel
(/proc/PID/smaps_rollup of the pid in libvirt's pid file).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aerate.deploy.image import GuestImage
from aerate.deploy.scenario import (
    Aerated,
    Hog,
    aerated,
    checker_result,
    qemu_pid,
    start_checker,
    wait_for,
)
from aerate.deploy.vm import Guest, booted

pytestmark = pytest.mark.vm
MiB = 1 << 20
GUEST_MIB = 2048
HOG_MIB = 1024
#: The second burst, all at once: three quarters of the guest, more than the squeezed
#: guest has free, so the balloon must give memory back while it runs.
BURST_MIB = 1536
CONFIG = "[defaults]\nreserve_mib = 192\nstats_interval_s = 1\nfloor = 0.25\n"


def qemu_anon(name: str) -> int:
    """Private anonymous memory of the VM's QEMU process, bytes (from the kernel)."""
    pid = qemu_pid(name)
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Anonymous line in /proc/{pid}/smaps_rollup")


def balloon(d: Aerated, name: str) -> dict[str, Any]:
    """The VM's balloon status, or {}."""
    return dict(d.vm(name).get("balloon") or {})


def oom_kills(g: Guest) -> str:
    """OOM-killer lines in the guest's kernel log."""
    return g.run("dmesg | grep -i -e 'out of memory' -e 'oom-kill' || true")[1].strip()


@pytest.fixture(scope="module")
def setup(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Aerated, Guest]]:
    run = tmp_path_factory.mktemp("aerated-balloon")
    with booted(guest_image, backing="private", memory_mib=GUEST_MIB) as g, \
            aerated(run, CONFIG, ("--vm", g.name)) as d:
        yield d, g


def test_status_shows_the_balloon_reclaimer(setup: tuple[Aerated, Guest]) -> None:
    d, g = setup
    vm = wait_for(lambda: (v := d.vm(g.name)).get("state") == "running"
                  and v.get("balloon", {}).get("max_bytes") and v, 300,
                  "the balloon VM's session")
    assert vm["reclaimer"] == "balloon", vm["reason"]
    assert "private anonymous" in vm["reason"] and "virtio balloon" in vm["reason"]
    assert vm["balloon"]["max_bytes"] == GUEST_MIB * MiB
    # The agent stays stats-only: an arena would fight the balloon for the same pages.
    wait_for(lambda: ((d.vm(g.name).get("guest") or {}).get("engine") or {})
             .get("phase") == "disabled", 60, "the agent to turn stats-only")
    assert f"{g.name}: reclaimer balloon" in d.log_text()


def test_freed_memory_returns_and_the_guest_gets_it_again(
        setup: tuple[Aerated, Guest]) -> None:
    """1 GiB freed comes back (90 % of it), then 1.5 GiB at once: no OOM kill, and a
    checker writing and verifying its pages all along finds nothing. How fast it comes back,
    beside the kernel's reporting on the same shape, is tests/perf/bench_reclaim.py's job."""
    d, g = setup
    # The idle guest is squeezed first: its free memory beyond watermarks + reserve.
    wait_for(lambda: balloon(d, g.name).get("target_bytes", GUEST_MIB * MiB)
             < GUEST_MIB * MiB, 120, "the balloon to inflate on the idle guest")
    start_checker(g, mib=64, duration=240, churn=2)
    hog = Hog(g, HOG_MIB, hold_s=8)
    t0 = time.monotonic()
    hog.start()   # 1 GiB more than the squeezed guest has free: the balloon must deflate
    print(f"touched {HOG_MIB} MiB in {time.monotonic() - t0:.1f} s; balloon {balloon(d, g.name)}")
    peak = qemu_anon(g.name)
    freed_at = hog.join()
    want = HOG_MIB * MiB * 9 // 10
    wait_for(lambda: peak - qemu_anon(g.name) >= want, 180,
             f"QEMU's private memory to fall by {want // MiB} MiB (90 % of the freed)")
    took = time.monotonic() - freed_at
    b = balloon(d, g.name)
    print(f"QEMU anon {peak / MiB:.0f} -> {qemu_anon(g.name) / MiB:.0f} MiB; 90% of the "
          f"{HOG_MIB} MiB freed was back {took:.1f} s after the hog's exit; balloon actual "
          f"{b.get('actual_bytes', 0) / MiB:.0f} MiB: {b.get('reason')}")
    assert b["actual_bytes"] < GUEST_MIB * MiB

    again = Hog(g, BURST_MIB, hold_s=2)
    t1 = time.monotonic()
    again.start()
    print(f"second burst: {BURST_MIB} MiB touched in {time.monotonic() - t1:.1f} s; "
          f"balloon {balloon(d, g.name)}")
    again.join()   # raises if the hog failed (an OOM kill ends it with rc != 0)
    assert oom_kills(g) == "", oom_kills(g)
    assert d.vm(g.name).get("errors") == 0
    assert "deflating to full memory" in d.log_text()
    result = checker_result(g, timeout=600)
    assert result["corrupted"] == 0 and result["pages_checked"] > 0, result


def test_daemon_stop_deflates_to_full_memory(setup: tuple[Aerated, Guest]) -> None:
    d, g = setup
    wait_for(lambda: g.dom.memoryStats()["actual"] < GUEST_MIB * 1024, 120,
             "the balloon to inflate again")
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(30)
    wait_for(lambda: g.dom.memoryStats()["actual"] == GUEST_MIB * 1024, 60,
             "the balloon to deflate to full memory after aerated stopped")
    assert "balloon deflated to full memory" in d.log_text()
    assert "daemon stopping" in d.log_text()


def test_a_squeeze_left_by_a_killed_daemon_is_undone_when_the_vm_is_now_refused(
        setup: tuple[Aerated, Guest]) -> None:
    """SIGKILL leaves the balloon squeezed (no handler runs); the next daemon finds the
    record saved before the first inflate and gives the guest its memory back, although
    it now refuses the VM (mode=off): no hidden squeeze outlives a crash."""
    d, g = setup
    if d.proc.poll() is None:   # one daemon serves a VM at a time (its per-VM lock)
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(30)
    run = d.run_dir / "killed"
    with aerated(run, CONFIG, ("--vm", g.name)) as first:
        wait_for(lambda: g.dom.memoryStats()["actual"] < GUEST_MIB * 1024, 180,
                 "the balloon to inflate under the first daemon")
        first.proc.kill()
        first.proc.wait(30)
    squeezed = g.dom.memoryStats()["actual"]
    assert squeezed < GUEST_MIB * 1024 and list((run / "balloon").iterdir()), squeezed
    refused = CONFIG + f'[vm."{g.name}"]\nmode = "off"\n'
    with aerated(run, refused, ("--vm", g.name)) as second:
        wait_for(lambda: g.dom.memoryStats()["actual"] == GUEST_MIB * 1024, 120,
                 "the restarted daemon to give the guest its memory back")
        log = second.log_text()
        assert f"{g.name}: balloon restored " in log and f"-> {GUEST_MIB} MiB" in log, log
        wait_for(lambda: (v := second.vm(g.name)).get("reclaimer") == "refuse"
                 and "mode=off" in v.get("reason", ""), 60, "the VM refused by mode=off")
        assert g.dom.memoryStats()["actual"] == GUEST_MIB * 1024
