"""host/punch.py's checks around every slice, on a real memfd (no QEMU needed): the checks
run right before each slice's fallocate (a reason stops the discard there, nothing of that
slice is touched) and right after it (a reason then is an overrun). The lease and
revocation checks of host/session.py and the pinning scan of host/pinning.py all ride on
this; the session-level tests use their own discard function, so this is where punch()
itself is held to it."""

from __future__ import annotations

import os

import pytest
from daemon_sim import GRANULE, SimVm

from aerate.host.punch import CHECK_BYTES, PunchRefused, first_nonzero, punch
from aerate.host.refusal import Decision
from aerate.host.session import SliceCheck

pytestmark = pytest.mark.unit
PAGE = 4096


def _fill(v: SimVm, gpa: int, length: int) -> None:
    """Back the range with zeroes, the way a guest's page the agent took is (a hole would
    read as zeroes too, but could not show whether it was discarded)."""
    for off in range(gpa, gpa + length, PAGE):
        os.pwrite(v.fd, b"\0", off)


def _present(v: SimVm, gpa: int, length: int) -> list[bool]:
    """Per granule of [gpa, +length): is its first page still backed (not discarded)?"""
    def backed(off: int) -> bool:
        try:
            return os.lseek(v.fd, off, os.SEEK_DATA) == off
        except OSError:   # ENXIO: no data from here to the end
            return False
    return [backed(off) for off in range(gpa, gpa + length, GRANULE)]


def _punch(v: SimVm, length: int, checks: list, slice_bytes: int = GRANULE) -> int:  # type: ignore[type-arg]
    return punch(v.name, v.gmap, {"pc.ram": v.backing}, 0, length, GRANULE,
                 lambda: Decision("punch", "test"), checks, slice_bytes=slice_bytes)


def test_a_check_that_fails_at_once_stops_the_discard_before_any_slice(vm: SimVm) -> None:
    _fill(vm, 0, 4 * GRANULE)
    with pytest.raises(PunchRefused) as e:
        _punch(vm, 4 * GRANULE, [lambda: "session ended: the guest was reset"])
    assert e.value.done == 0 and not e.value.overrun
    assert _present(vm, 0, 4 * GRANULE) == [True] * 4


def test_the_checks_run_before_and_after_every_slice(vm: SimVm) -> None:
    """Slices of one granule: the check answers a reason from its 5th call, which is the
    one right before the third slice (calls: before 1, after 1, before 2, after 2, before
    3): two slices are discarded, the rest untouched, and no overrun is counted."""
    _fill(vm, 0, 4 * GRANULE)
    calls: list[int] = []

    def lease() -> str:
        calls.append(1)
        return "lease token 3 expired" if len(calls) >= 5 else ""

    with pytest.raises(PunchRefused) as e:
        _punch(vm, 4 * GRANULE, [lease])
    assert (e.value.done, e.value.overrun, len(calls)) == (2 * GRANULE, False, 5)
    assert _present(vm, 0, 4 * GRANULE) == [False, False, True, True]


def test_a_check_that_fails_right_after_a_slice_is_an_overrun(vm: SimVm) -> None:
    _fill(vm, 0, 2 * GRANULE)
    calls: list[int] = []

    def lease() -> str:
        calls.append(1)
        return "window closed" if len(calls) == 2 else ""   # the check after slice 1

    with pytest.raises(PunchRefused) as e:
        _punch(vm, 2 * GRANULE, [lease])
    assert (e.value.done, e.value.overrun) == (GRANULE, True)
    assert _present(vm, 0, 2 * GRANULE) == [False, True]


def test_a_whole_range_without_a_reason_is_discarded(vm: SimVm) -> None:
    _fill(vm, 0, 4 * GRANULE)
    calls: list[int] = []
    assert _punch(vm, 4 * GRANULE, [lambda: calls.append(1) or ""]) == 4 * GRANULE
    assert len(calls) == 8   # before and after each of the 4 slices
    assert _present(vm, 0, 4 * GRANULE) == [False] * 4


def test_only_zeroes_are_discarded(vm: SimVm) -> None:
    """The content check (host/punch.py): a granule holding one non-zero byte is not the
    agent's untouched page any more (a reset or a moved page reused it); it and everything
    after it stay, the granules before it are discarded, and the refusal says so."""
    _fill(vm, 0, 4 * GRANULE)
    spot = 2 * GRANULE + GRANULE // 2 + 123
    os.pwrite(vm.fd, b"\x01", spot)
    with pytest.raises(PunchRefused) as e:
        _punch(vm, 4 * GRANULE, [], slice_bytes=4 * GRANULE)
    assert e.value.content and not e.value.overrun
    assert e.value.done == 2 * GRANULE
    assert f"gpa {spot // (2 << 20) * (2 << 20):#x} does not read as zeroes" in e.value.reason
    assert _present(vm, 0, 4 * GRANULE) == [False, False, True, True]
    assert os.pread(vm.fd, 1, spot) == b"\x01"


def test_holes_and_backed_zeroes_are_discarded(vm: SimVm) -> None:
    # Never-backed granules read as zeroes without being backed by the check's read.
    _fill(vm, GRANULE, GRANULE)
    assert _punch(vm, 4 * GRANULE, [], slice_bytes=4 * GRANULE) == 4 * GRANULE
    assert _present(vm, 0, 4 * GRANULE) == [False] * 4
    assert os.fstat(vm.fd).st_blocks == 0


def test_after_a_slice_a_check_is_asked_its_after_question(vm: SimVm) -> None:
    """A check with an ``after`` (host/session.py's lease: the window before a slice, the
    guest's hold after it): a window that closes during the first slice stops the second
    one before it starts, and the first is no overrun, since the hold was not over."""
    _fill(vm, 0, 4 * GRANULE)
    window: list[str] = ["", "window closed"]

    def before() -> str:
        return window.pop(0) if len(window) > 1 else window[0]

    with pytest.raises(PunchRefused) as e:
        _punch(vm, 4 * GRANULE, [SliceCheck(before, lambda: "")])
    assert (e.value.done, e.value.overrun, e.value.reason) == (GRANULE, False, "window closed")
    with pytest.raises(PunchRefused) as e:
        _punch(vm, 4 * GRANULE, [SliceCheck(lambda: "", lambda: "the hold is over")])
    assert (e.value.done, e.value.overrun) == (GRANULE, True)


def test_the_cheap_checks_are_asked_again_after_each_granules_read(vm: SimVm) -> None:
    """The content check's read takes time: a lease window that closes during it stops the
    granule's fallocate (a refusal, nothing discarded), not only the next slice's."""
    _fill(vm, 0, 2 * GRANULE)
    answers = ["", "lease token 7 expired"]

    def window() -> str:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    with pytest.raises(PunchRefused) as e:
        _punch(vm, 2 * GRANULE, [SliceCheck(window, lambda: "", cheap=True)],
               slice_bytes=2 * GRANULE)
    assert (e.value.done, e.value.overrun, e.value.reason) == (0, False,
                                                                "lease token 7 expired")
    assert _present(vm, 0, 2 * GRANULE) == [True, True]


def test_a_granule_larger_than_one_read_is_checked_to_its_last_byte(vm: SimVm) -> None:
    """A granule of several read chunks (1 GiB host pages are read 2 MiB at a time): a
    non-zero last byte keeps the whole granule."""
    big = 4 * CHECK_BYTES
    _fill(vm, 0, big)
    os.pwrite(vm.fd, b"\x01", big - 1)
    with pytest.raises(PunchRefused) as e:
        punch(vm.name, vm.gmap, {"pc.ram": vm.backing}, 0, big, big,
              lambda: Decision("punch", "test"), [])
    assert e.value.content and e.value.done == 0
    assert _present(vm, 0, big) == [True] * (big // GRANULE)


def test_reading_a_hole_backs_nothing(vm: SimVm) -> None:
    before = os.fstat(vm.fd).st_blocks
    assert first_nonzero(vm.fd, 64 * GRANULE, 8 * GRANULE) == -1
    assert os.fstat(vm.fd).st_blocks == before
