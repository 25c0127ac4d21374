"""Verified reclaim (host/verify.py): the bytes the backing really fell per discard.

Real memfds of this process and the real host/punch.py; the daemon-level test runs the
real daemon over daemon_sim's MOCK of libvirtd (tests/unit/metrics_page.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from daemon_sim import GRANULE, MiB, new_vm
from metrics_page import everything, fill

from aerate.host.punch import PunchRefused, punch
from aerate.host.refusal import PUNCH, Decision
from aerate.host.verify import ReclaimTally, fall

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def blocks(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def punch_through(tally: ReclaimTally, vm: Any, gpa: int, length: int,
                  checks: Any = ()) -> int:
    return punch(vm.name, vm.gmap, {"pc.ram": vm.backing}, gpa, length, GRANULE,
                 lambda: Decision(PUNCH, "test"), checks, slice_bytes=GRANULE,
                 verify=tally.range_done)


def test_verified_bytes_are_the_real_fall_of_the_memfds_blocks(tmp_path: Path) -> None:
    """Punch 6 MiB of a real memfd of which 4 MiB are backed: verified moves by exactly the
    kernel's st_blocks delta (4 MiB), the 2 MiB hole counts unverified; punching the same
    range again verifies nothing (it is all holes: discarded, not reclaimed)."""
    vm = new_vm("v", str(tmp_path))
    try:
        fill(vm.fd, 0, 4 * MiB)
        fill(vm.fd, 10 * MiB, GRANULE)   # outside the range: must stay allocated
        tally = ReclaimTally()
        before = blocks(vm.fd)
        assert punch_through(tally, vm, 0, 6 * MiB) == 6 * MiB
        delta = before - blocks(vm.fd)
        assert delta == 4 * MiB
        assert tally.status() == {"verified_bytes": delta, "unverified_bytes": 2 * MiB}
        assert punch_through(tally, vm, 0, 6 * MiB) == 6 * MiB
        assert tally.status()["verified_bytes"] == 4 * MiB
        assert tally.status()["unverified_bytes"] == 8 * MiB
        assert blocks(vm.fd) == GRANULE
    finally:
        os.close(vm.fd)


def test_a_punch_stopped_part_way_counts_what_it_discarded(tmp_path: Path) -> None:
    """A check that stops the punch after its first 2 MiB slice: the refusal says 2 MiB were
    done, the tally verifies those 2 MiB (they were backed) and counts nothing of the rest."""
    vm = new_vm("v", str(tmp_path))
    try:
        fill(vm.fd, 0, 8 * MiB)
        calls = []

        def second_slice_refused() -> str:
            calls.append(1)
            return "window closed" if len(calls) >= 3 else ""  # before, after, before...

        tally = ReclaimTally()
        with pytest.raises(PunchRefused) as got:
            punch_through(tally, vm, 0, 8 * MiB, (second_slice_refused,))
        assert got.value.done == GRANULE
        assert blocks(vm.fd) == 6 * MiB
        assert tally.status() == {"verified_bytes": GRANULE, "unverified_bytes": 0}
    finally:
        os.close(vm.fd)


def test_verified_is_clamped_to_what_was_asked() -> None:
    """Another writer's frees never make verified exceed what was asked; the guest's
    faults during the punch (the file grew) verify nothing, never a negative figure."""
    assert fall(10 * MiB, 0, 2 * MiB) == 2 * MiB
    assert fall(2 * MiB, 3 * MiB, 2 * MiB) == 0
    t = ReclaimTally()
    t.range_done(2 * MiB, 10 * MiB, 0)
    t.range_done(2 * MiB, 2 * MiB, 3 * MiB)
    assert t.status() == {"verified_bytes": 2 * MiB, "unverified_bytes": 2 * MiB}


def test_a_failed_fallocate_counts_nothing(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The second slice's fallocate fails (MOCK of the kernel's error: no filesystem here
    fails a punch on demand) after the first freed 2 MiB: PunchFailed, and the tally
    counts nothing, as the session counts nothing of a failed discard."""
    import errno

    from aerate.host import punch as punch_mod
    real = punch_mod.fallocate_punch
    calls = []

    def second_fails(fd: int, offset: int, length: int) -> None:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd, offset, length)

    monkeypatch.setattr(punch_mod, "fallocate_punch", second_fails)
    vm = new_vm("v", str(tmp_path))
    try:
        fill(vm.fd, 0, 4 * MiB)
        tally = ReclaimTally()
        with pytest.raises(punch_mod.PunchFailed):
            punch_through(tally, vm, 0, 4 * MiB)
        assert blocks(vm.fd) == GRANULE   # the first slice was freed
        assert tally.status() == {"verified_bytes": 0, "unverified_bytes": 0}
    finally:
        os.close(vm.fd)


def test_the_daemon_exports_verified_reclaim(tmp_path: Path) -> None:
    """Through the real daemon: A's report of four 2 MiB ranges, two of them backed in its
    memfd: 8 MiB discarded, 4 MiB verified (the real fall), 4 MiB unverified, in status,
    in the metrics and in explain; VMs without a proven backing carry no such figure."""
    text, views, said = asyncio.run(everything(str(tmp_path)))
    a = views["A"]
    assert a["discarded_bytes"] == 8 * MiB
    assert a["reclaim"] == {"verified_bytes": 4 * MiB, "unverified_bytes": 4 * MiB}
    assert a["backing_allocated_bytes"] == 0   # what is left of A's memfd: nothing
    assert 'aerate_discard_verified_bytes_total{vm="A"} 4.194304e+06' in text
    assert 'aerate_discard_unverified_bytes_total{vm="A"} 4.194304e+06' in text
    assert "reclaim" not in views["N"]
    assert 'aerate_discard_verified_bytes_total{vm="N"}' not in text
    assert any("the backing fell 4 MiB (verified)" in s for s in said), said


def test_a_range_the_content_check_stops_counts_what_went_before(tmp_path: Path) -> None:
    """host/punch.py discards only zeroes: a non-zero page in the second granule stops the
    punch there; the first granule was discarded and is verified, the rest counts nothing
    and stays allocated."""
    vm = new_vm("v", str(tmp_path))
    try:
        fill(vm.fd, 0, 6 * MiB)
        os.pwrite(vm.fd, b"\x01", GRANULE + 4096)
        tally = ReclaimTally()
        with pytest.raises(PunchRefused) as got:
            punch_through(tally, vm, 0, 6 * MiB)
        assert got.value.content and got.value.done == GRANULE
        assert blocks(vm.fd) == 4 * MiB
        assert tally.status() == {"verified_bytes": GRANULE, "unverified_bytes": 0}
    finally:
        os.close(vm.fd)
