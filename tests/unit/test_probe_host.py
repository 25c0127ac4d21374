"""The host's answer to a guest's probe (agent/protocol.py "Probes", host/probe.py): the
production ``backed`` on a real memfd, where it refuses to tell, and the session's checks
(RAM, rate) driven through the real endpoints. Nothing here may discard: each test that
answers a probe also checks the discard function was never called."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Optional

import pytest
from daemon_sim import GRANULE, RAM, SimVm

from aerate.agent import protocol as p
from aerate.host.backing import BackingKind
from aerate.host.probe import ProbeUnknown, backed
from aerate.host.punch import Check, fallocate_punch
from aerate.host.refusal import Decision
from aerate.host.session import PROBE_BURST, VmSession

pytestmark = pytest.mark.unit
PAGE = 4096


def _backed(v: SimVm, gpa: int, length: int, swap_total: Optional[int] = 0) -> bool:
    return backed(v.gmap, {"pc.ram": v.backing}, gpa, length, GRANULE, swap_total)


def test_a_written_page_is_backed_and_a_punched_one_is_not(vm: SimVm) -> None:
    g = 5 * GRANULE
    assert not _backed(vm, g, GRANULE)                 # never written: a hole
    os.pwrite(vm.fd, b"x", g + 7 * PAGE)
    assert _backed(vm, g, GRANULE)
    assert not _backed(vm, g - GRANULE, GRANULE)       # the data after it is not in range
    assert not _backed(vm, g + GRANULE, GRANULE)
    assert _backed(vm, g - GRANULE, 2 * GRANULE)       # half written: backed
    fallocate_punch(vm.fd, g, GRANULE)
    assert not _backed(vm, g, GRANULE)
    assert not _backed(vm, 0, RAM)                     # nothing left anywhere (ENXIO)


def test_where_the_host_cannot_tell_it_says_why(vm: SimVm) -> None:
    with pytest.raises(ProbeUnknown, match="is on hugetlbfs"):
        backed(vm.gmap, {"pc.ram": dataclasses.replace(vm.backing, fs_type="hugetlbfs")},
               0, GRANULE, GRANULE, 0)
    with pytest.raises(ProbeUnknown, match="not known to stay in memory"):
        _backed(vm, 0, GRANULE, swap_total=1 << 30)
    with pytest.raises(ProbeUnknown, match="not known to stay in memory"):
        _backed(vm, 0, GRANULE, swap_total=None)
    private = dataclasses.replace(vm.backing, kind=BackingKind.ANON_PRIVATE, path=None,
                                  reason="private anonymous memory")
    with pytest.raises(ProbeUnknown, match="not a shared file: private anonymous"):
        backed(vm.gmap, {"pc.ram": private}, 0, GRANULE, GRANULE, 0)
    with pytest.raises(ProbeUnknown, match="not guest RAM"):
        _backed(vm, RAM, GRANULE)
    with pytest.raises(ProbeUnknown, match="no longer"):
        backed(vm.gmap, {"pc.ram": dataclasses.replace(vm.backing, ino=vm.backing.ino + 1)},
               0, GRANULE, GRANULE, 0)


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def session(vm: SimVm, in_ram_bytes: int = RAM, with_backed: bool = True,
            guest_protos: tuple[int, int] = (p.PROTO_MIN, p.PROTO)
            ) -> tuple[VmSession, p.GuestEndpoint, Clock, list[tuple[int, int]]]:
    clock = Clock()
    discards: list[tuple[int, int]] = []

    def discard(gpa: int, length: int, checks: Sequence[Check]) -> int:
        discards.append((gpa, length))
        return length

    s = VmSession("vm", GRANULE, lambda g, n: g + n <= in_ram_bytes, discard,
                  lambda: Decision("punch", "test"), clock=clock,
                  backed=(lambda g, n: _backed(vm, g, n)) if with_backed else None)
    guest = p.GuestEndpoint({"agent": "t"}, clock=clock, protos=guest_protos)
    s.connected()
    guest.receive(s.take_outbox())
    s.receive(guest.take_outbox())
    assert s.state is p.HostState.RUNNING
    return s, guest, clock, discards


def ask(s: VmSession, guest: p.GuestEndpoint, ranges: list[tuple[int, int]]) -> p.Probed:
    pid = guest.probe(ranges)
    s.receive(guest.take_outbox())
    (kind, answer), = guest.receive(s.take_outbox())
    assert kind == "probed" and answer.id == pid
    assert isinstance(answer, p.Probed)
    return answer


def test_the_session_answers_which_ranges_are_backed_and_discards_nothing(vm: SimVm) -> None:
    s, guest, _, discards = session(vm)
    os.pwrite(vm.fd, b"x", 3 * GRANULE + PAGE)
    answer = ask(s, guest, [(0, GRANULE), (3 * GRANULE, GRANULE), (9 * GRANULE, GRANULE)])
    assert answer == p.Probed(answer.id, [(3 * GRANULE, GRANULE)], "")
    assert discards == [] and s.endpoint.pending == {}
    st = s.status()["probes"]
    assert st == {"answered": 1, "probed_bytes": 3 * GRANULE, "backed_bytes": GRANULE,
                  "unknown": 0, "last_unknown": ""}


def test_probes_beyond_the_rate_are_answered_unknown_rate(vm: SimVm) -> None:
    s, guest, clock, _ = session(vm)
    for _ in range(int(PROBE_BURST)):
        assert ask(s, guest, [(0, GRANULE)]).backed == []
    assert ask(s, guest, [(0, GRANULE)]).unknown == "rate"
    clock.t += 1.0
    assert ask(s, guest, [(0, GRANULE)]).backed == []
    assert s.status()["probes"]["unknown"] == 1 and s.state is p.HostState.RUNNING


def test_a_probe_outside_the_vms_ram_ends_the_session_unanswered(vm: SimVm) -> None:
    s, guest, _, discards = session(vm, in_ram_bytes=8 * GRANULE)
    guest.probe([(0, GRANULE), (8 * GRANULE, GRANULE)])
    s.receive(guest.take_outbox())
    assert s.state is p.HostState.CLOSED and "not inside this VM's RAM" in s.last_error
    assert s.take_outbox() == b"" and discards == []


def test_unknown_answers_carry_the_reason(vm: SimVm) -> None:
    s, guest, _, _ = session(vm, with_backed=False)
    assert ask(s, guest, [(0, GRANULE)]).unknown == \
        "this host does not look at its backings for probes"
    s, guest, _, _ = session(vm)
    s.backed = lambda g, n: _backed(vm, g, n, swap_total=None)
    answer = ask(s, guest, [(0, GRANULE)])
    assert answer.backed is None and "not known to stay in memory" in answer.unknown
    assert s.status()["probes"]["last_unknown"] == answer.unknown


def test_an_older_agent_gets_no_probe_answers(vm: SimVm) -> None:
    s, guest, _, _ = session(vm, guest_protos=(2, 2))
    assert s.endpoint.proto == 2 and not guest.can_probe()
    s.receive(p.encode({"type": "probe", "session": s.endpoint.session, "id": 1,
                        "ranges": [[0, GRANULE]]}, proto=2))
    assert s.state is p.HostState.CLOSED and "unknown message type 'probe'" in s.last_error
