"""The host's answer to a guest's probe (agent/protocol.py "Probes", host/probe.py): the
production ``backed`` on a real memfd, where it refuses to tell, and the session's checks
(RAM, rate) driven through the real endpoints. Nothing here may discard: each test that
answers a probe also checks the discard function was never called."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from daemon_sim import GRANULE, RAM, MiB, SimVm, open_vm, simulated, until
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from aerate.agent import protocol as p
from aerate.host import control, metrics, pressure
from aerate.host.backing import BackingKind
from aerate.host.probe import ProbeUnknown, backed, backed_ranges
from aerate.host.punch import Check, fallocate_punch
from aerate.host.refusal import Decision
from aerate.host.session import PROBE_BURST, VmSession

pytestmark = pytest.mark.unit
PAGE = 4096


def _backed(v: SimVm, gpa: int, length: int) -> bool:
    return backed(v.gmap, {"pc.ram": v.backing}, gpa, length, GRANULE)


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


@settings(max_examples=60, deadline=None)
@given(pages=st.lists(st.integers(0, RAM // PAGE - 1), max_size=12),
       asked=st.sets(st.integers(0, RAM // GRANULE - 1), min_size=1, max_size=40))
def test_the_sweep_answers_every_range_as_its_own_lseek_would(
        pages: list[int], asked: set[int]) -> None:
    """backed_ranges answers a probe with one open and as few lseeks as it can (it skips
    ranges that end before the data found last): the answer must be, range by range, what
    an lseek of that range alone says, in the order asked."""
    with tempfile.TemporaryDirectory() as tmp, open_vm("sweep", tmp) as v:
        for page in pages:
            os.pwrite(v.fd, b"x", page * PAGE + 100)
        ranges = [(i * GRANULE, GRANULE) for i in sorted(asked, reverse=True)]
        want = [any(gpa <= q * PAGE < gpa + n for q in pages) for gpa, n in ranges]
        got = backed_ranges(v.gmap, {"pc.ram": v.backing}, ranges, GRANULE, 0)
        assert got == want
        assert got == [_backed(v, gpa, n) for gpa, n in ranges]


def test_with_host_swap_the_host_does_not_tell_and_says_whether_to_ask_again(
        vm: SimVm) -> None:
    """Review finding: shmem's lseek takes the inode lock, which a punch of the same file
    may hold while it waits on a swap-in: with swap on the host a probe is not answered
    (for good: no retry); with the swap figure not known yet, later."""
    with pytest.raises(ProbeUnknown, match="this host has swap") as e:
        backed_ranges(vm.gmap, {"pc.ram": vm.backing}, [(0, GRANULE)], GRANULE, 1 << 30)
    assert not e.value.retry
    with pytest.raises(ProbeUnknown, match="not known yet") as e:
        backed_ranges(vm.gmap, {"pc.ram": vm.backing}, [(0, GRANULE)], GRANULE, None)
    assert e.value.retry


def test_where_the_host_cannot_tell_it_says_why(vm: SimVm) -> None:
    with pytest.raises(ProbeUnknown, match="is on hugetlbfs"):
        backed(vm.gmap, {"pc.ram": dataclasses.replace(vm.backing, fs_type="hugetlbfs")},
               0, GRANULE, GRANULE)
    with pytest.raises(ProbeUnknown, match="on ext4, not shmem"):
        backed(vm.gmap, {"pc.ram": dataclasses.replace(vm.backing, fs_type="ext4")},
               0, GRANULE, GRANULE)
    private = dataclasses.replace(vm.backing, kind=BackingKind.ANON_PRIVATE, path=None,
                                  reason="private anonymous memory")
    with pytest.raises(ProbeUnknown, match="not a shared file: private anonymous"):
        backed(vm.gmap, {"pc.ram": private}, 0, GRANULE, GRANULE)
    with pytest.raises(ProbeUnknown, match="not guest RAM"):
        _backed(vm, RAM, GRANULE)
    with pytest.raises(ProbeUnknown, match="no longer"):
        backed(vm.gmap, {"pc.ram": dataclasses.replace(vm.backing, ino=vm.backing.ino + 1)},
               0, GRANULE, GRANULE)


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
                  backed=(lambda rs: [_backed(vm, g, n) for g, n in rs])
                  if with_backed else None)
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
    s.backed = lambda rs: backed_ranges(vm.gmap, {"pc.ram": dataclasses.replace(
        vm.backing, fs_type="ext4")}, rs, GRANULE, 0)
    answer = ask(s, guest, [(0, GRANULE)])
    assert answer.backed is None and "not shmem" in answer.unknown
    assert s.status()["probes"]["last_unknown"] == answer.unknown


def test_an_older_agent_gets_no_probe_answers(vm: SimVm) -> None:
    s, guest, _, _ = session(vm, guest_protos=(2, 2))
    assert s.endpoint.proto == 2 and not guest.can_probe()
    s.receive(p.encode({"type": "probe", "session": s.endpoint.session, "id": 1,
                        "ranges": [[0, GRANULE]]}, proto=2))
    assert s.state is p.HostState.CLOSED and "unknown message type 'probe'" in s.last_error


async def _through_the_daemon(run_dir: str) -> tuple[dict[str, p.Probed], dict[str, Any], str]:
    with open(os.path.join(run_dir, "none.toml"), "w"):
        pass
    async with simulated(run_dir, ("A", "P")) as (daemon, conn, guests):
        conn.private.add("P")
        conn.balloon["P"] = (4096 * MiB, 4096 * MiB)
        daemon.host_memory = pressure.HostMemory(6 << 30, 8 << 30, 0.5, swap_total=0)
        for n in ("A", "P"):
            daemon.start_runner(n)
        for n in ("A", "P"):
            await until(lambda n=n: daemon.runners[n].state.value == "running"
                        and guests[n].ep is not None and guests[n].ep.can_probe(), 5,
                        f"{n} running")
        os.pwrite(conn.vms["A"].fd, b"x", 2 * GRANULE + PAGE)
        answers: dict[str, p.Probed] = {}
        for n in ("A", "P"):
            g = guests[n]
            assert g.ep is not None and g.writer is not None
            g.ep.probe([(0, GRANULE), (2 * GRANULE, GRANULE)])
            g.writer.write(g.ep.take_outbox())
            await until(lambda g=g: bool(g.probed), 5, f"{n}'s answer")
            answers[n] = g.probed[0]
        text = generate_latest(metrics.registry(lambda: control.views(daemon))).decode()
        return answers, {v["vm"]: v for v in control.views(daemon)}, text


def test_the_daemon_answers_probes_from_the_backing(tmp_path: Path) -> None:
    """Through the real daemon (its runner's ``_backed``, the session, the map of
    daemon_sim's MOCK of libvirtd): A's memfd backs the second range only; P's private RAM
    cannot tell. Nothing is discarded; status and metrics count the probes."""
    answers, views, text = asyncio.run(_through_the_daemon(str(tmp_path)))
    assert answers["A"].backed == [(2 * GRANULE, GRANULE)]
    assert answers["P"].backed is None and "not a shared file" in answers["P"].unknown
    assert views["A"]["probes"]["backed_bytes"] == GRANULE
    assert views["A"]["discarded_bytes"] == 0 and views["A"]["batches"] == 0
    assert views["P"]["probes"]["unknown"] == 1
    assert 'aerate_probe_backed_bytes_total{vm="A"} 2.097152e+06' in text
    assert 'aerate_probes_answered_total{vm="P"} 1.0' in text
