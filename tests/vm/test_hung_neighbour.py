"""One VM never stalls another (S8), on two real guests under one daemon.

Guest A's libvirt calls are made to hang the way they do on real hosts when QEMU stops
answering its monitor: A's QEMU process is SIGSTOPped (a wedged QEMU, a QEMU stuck in an
uninterruptible read of its backing). Every libvirt call that needs A's monitor (QMP
query-migrate, the balloon, a map build) then blocks in libvirtd: the first until QEMU
answers, the later ones until libvirt's job lock gives up 30 s on. Meanwhile guest B frees
512 MiB, and must get it back as fast as it did in the same run before A hung; A must be
refused, with the reason in status. SIGCONT ends the hang and A is served again.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from aerate.deploy.image import GuestImage
from aerate.deploy.scenario import Aerated, Hog, aerated, backing_read_after, qemu_pid, wait_for
from aerate.deploy.vm import Guest, booted

# Out of tests/run (wip) until session 8: in session 5 it held in 2 of 3 runs, the third
# failing on B's own churn loop (issue 15's runaway passes, fixed since). Session 8, on the
# fixed cycle, three runs in a row passed: B 90 % back alone / beside the hung A in
# 2.0 / 1.5 s, 1.0 / 1.0 s and 1.5 / 6.1 s (the last with other builds on the host).
pytestmark = [pytest.mark.vm, pytest.mark.fault]
MiB = 1 << 20
FREE_MIB = 512
RESERVE_MIB = 128
CONFIG = f"[defaults]\nreserve_mib = {RESERVE_MIB}\nhwm = 8\nstats_interval_s = 1\n"


def idle(d: Aerated, name: str) -> dict[str, Any]:
    """The VM's status once it is served and its agent holds nothing (a pass is over)."""
    vm = d.vm(name)
    engine = (vm.get("guest") or {}).get("engine") or {}
    if vm.get("state") == "running" and vm.get("reclaimer") == "punch" \
            and engine.get("phase") == "idle" and engine.get("held_bytes") == 0:
        return vm
    return {}


def free_and_time(d: Aerated, g: Guest) -> float:
    """Free FREE_MIB MiB in ``g``; seconds until 90 % of what may come back did."""
    wait_for(lambda: idle(d, g.name), 300, f"{g.name} to be idle", 2)
    before = pacing(d, g.name)
    hog = Hog(g, FREE_MIB, hold_s=8)
    hog.start()
    peak = backing_read_after(d, g.name, time.monotonic())
    freed_at = hog.join()
    want = 0.9 * (FREE_MIB - RESERVE_MIB) * MiB
    try:
        wait_for(lambda: peak - d.vm(g.name)["backing_allocated_bytes"] >= want, 180,
                 f"90% of what {g.name} freed to come back", 0.5)
    except Exception:
        print(f"peak {peak >> 20} MiB; status of {g.name}: {d.vm(g.name)}\n"
              f"{d.log_text()[-6000:]}")
        raise
    took = time.monotonic() - freed_at
    after = pacing(d, g.name)
    # What paced it: the agent's own backoffs and passes, and the host's refusals (a
    # refusal would be the neighbour's doing; a backoff is the guest's own pacing).
    print(f"{g.name}: " + ", ".join(f"{k} +{after[k] - before[k]}" for k in after)
          + f"; last refusal: {d.vm(g.name).get('last_refusal')!r}")
    # The host refused none of it: a refusal here would be a neighbour's doing (a permit
    # gone stale behind its stuck libvirt call, as once on one shared connection).
    assert after["host_refused_MiB"] == before["host_refused_MiB"], \
        (before, after, d.vm(g.name).get("last_refusal"))
    return took


def pacing(d: Aerated, name: str) -> dict[str, int]:
    """The counters that say what paced a return: the agent's and the host's."""
    counters = d.guest(name, "engine").get("counters") or {}
    vm = d.vm(name)
    out = {k: int(counters.get(k, 0)) for k in
           ("passes_started", "churn_backoffs", "backoffs", "expired_batches")}
    out["host_refused_MiB"] = int(vm.get("refused_bytes", 0)) >> 20
    out["host_batches"] = int(vm.get("batches", 0))
    lease = vm.get("lease") or {}
    out["lease_refused_batches"] = int(lease.get("refused_batches", 0))
    out["content_refused_batches"] = int(vm.get("content_refused_batches", 0))
    return out


@pytest.fixture(scope="module")
def pair(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Aerated, Guest, Guest]]:
    run = tmp_path_factory.mktemp("aerated-pair")
    with booted(guest_image, backing="memfd", memory_mib=1024, vcpus=1) as a, \
            booted(guest_image, backing="memfd", memory_mib=1024, vcpus=1) as b, \
            aerated(run, CONFIG, ("--vm", a.name, "--vm", b.name)) as d:
        try:
            yield d, a, b
        finally:
            os.kill(qemu_pid(a.name), signal.SIGCONT)


def test_a_hung_neighbour_neither_stalls_nor_is_served(
        pair: tuple[Aerated, Guest, Guest]) -> None:
    d, a, b = pair
    wait_for(lambda: idle(d, a.name), 300, f"{a.name} to be idle", 2)
    usual = free_and_time(d, b)
    print(f"{b.name}: 90% back in {usual:.1f} s before the hang")
    os.kill(qemu_pid(a.name), signal.SIGSTOP)
    try:
        def refused_for_the_hang() -> dict[str, Any]:
            v = d.vm(a.name)
            calls = v.get("libvirt_calls") or {}
            ok = v.get("reclaimer") == "refuse" and calls.get("timeouts", 0) > 0 \
                and "timed out" in (calls.get("last_timeout") or "") \
                and ("timed out" in v.get("reason", "") or "hung" in v.get("reason", ""))
            return v if ok else {}

        try:
            st = wait_for(refused_for_the_hang, 60,
                          f"{a.name} to be refused for its hung libvirt calls")
        except Exception:
            print("status of", a.name, d.vm(a.name), "\n", d.log_text()[-4000:])
            raise
        hung = free_and_time(d, b)
        print(f"{b.name}: 90% back in {usual:.1f} s alone, {hung:.1f} s beside a hung "
              f"neighbour; {a.name}: {st['reason']}")
        # Same run, same guest, same free: the hung neighbour may cost B scheduling noise,
        # never the 5-30 s of a libvirt call that waits on A.
        assert hung <= 2 * usual + 5, (usual, hung)
        assert d.vm(a.name)["reclaimer"] == "refuse"
    finally:
        os.kill(qemu_pid(a.name), signal.SIGCONT)
    wait_for(lambda: d.vm(a.name).get("reclaimer") == "punch", 120,
             f"{a.name} to be served again once its QEMU answers")
    assert d.proc.poll() is None
