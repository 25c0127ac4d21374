"""The host session's safety logic (S1, S4, S5) against a real guest endpoint, no sockets.

The discard function here records calls instead of punching memory: that is the point of
these tests (what would be discarded); real punching is tested in tests/host/.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Dict, List, Optional, Tuple

import pytest

from aerate.agent.protocol import PROTO, GuestEndpoint, GuestState, HostState
from aerate.host.ctl import format_status
from aerate.host.punch import Check, PunchFailed, PunchRefused
from aerate.host.refusal import Decision
from aerate.host.session import VmSession

pytestmark = pytest.mark.unit
MiB2 = 2 * 1024 * 1024
RAM = (0, 1024 * MiB2)   # a 2 GiB guest, one piece


def make(decision: str = "punch", hello: Optional[Dict[str, Any]] = None
         ) -> Tuple[VmSession, GuestEndpoint, List[Tuple[int, int]]]:
    calls: List[Tuple[int, int]] = []

    def discard(gpa: int, length: int, checks: Sequence[Check]) -> int:
        for check in checks:   # what host/punch.py does before each slice
            why = check()
            if why:
                raise PunchRefused("vm1", gpa, length, why)
        calls.append((gpa, length))
        return length

    def in_ram(gpa: int, length: int) -> bool:
        return RAM[0] <= gpa and gpa + length <= RAM[0] + RAM[1]

    verdict = [Decision(decision, "test")]
    s = VmSession("vm1", MiB2, in_ram, discard, lambda: verdict[0])
    s.verdict = verdict  # type: ignore[attr-defined]
    g = GuestEndpoint(hello or {"agent": "t"})
    s.connected()
    g.receive(s.take_outbox())
    s.receive(g.take_outbox())
    assert s.state is HostState.RUNNING and g.state is GuestState.RUNNING
    return s, g, calls


def test_report_is_discarded_then_acked() -> None:
    s, g, calls = make()
    b = g.report([(10 * MiB2, MiB2), (11 * MiB2, MiB2)])
    s.receive(g.take_outbox())
    assert calls == [(10 * MiB2, 2 * MiB2)]
    assert g.receive(s.take_outbox()) == [("release", (b, 2 * MiB2, 0))]
    st = s.status()
    assert st["discarded_bytes"] == 2 * MiB2 and st["batches"] == 1


def test_range_outside_ram_ends_session_and_nothing_is_discarded() -> None:
    """S1: one bad range poisons the whole batch, before any discard."""
    s, g, calls = make()
    g.report([(10 * MiB2, MiB2), (RAM[1], MiB2)])
    s.receive(g.take_outbox())
    assert calls == [] and s.state is HostState.CLOSED
    assert "not inside this VM's RAM" in s.last_error
    assert s.take_outbox() == b""   # no ack: the guest keeps the pages (S2)


def test_refusing_reclaimer_acks_without_discard() -> None:
    s, g, calls = make(decision="refuse")
    b = g.report([(0, MiB2)])
    s.receive(g.take_outbox())
    assert calls == []
    assert g.receive(s.take_outbox()) == [("release", (b, 0, MiB2))]
    assert s.status()["refused_bytes"] == MiB2


def test_decision_change_applies_to_the_next_batch() -> None:
    s, g, calls = make()
    g.report([(0, MiB2)])
    s.receive(g.take_outbox())
    g.receive(s.take_outbox())
    s.verdict[0] = Decision("refuse", "migration in progress")  # type: ignore[attr-defined]
    g.report([(2 * MiB2, MiB2)])
    s.receive(g.take_outbox())
    assert calls == [(0, MiB2)]
    assert b"migration in progress" in s.take_outbox()


def test_failed_discard_is_abandoned_and_acked_with_reason() -> None:
    s, g, _ = make()

    def broken(gpa: int, length: int, checks: Sequence[Check]) -> int:
        raise PunchFailed("vm1", gpa, length, "fallocate: Input/output error", 5)

    s.discard = broken
    b = g.report([(0, MiB2)])
    s.receive(g.take_outbox())
    assert g.receive(s.take_outbox()) == [("release", (b, 0, MiB2))]
    # The journal event of a discard incident (host/journal.py EVENTS).
    assert any("discard failed" in m and k == "discard" for _, m, k in s.log)


def test_flood_is_cut_off() -> None:
    s, g, calls = make()
    s.bucket.rate, s.bucket.tokens, s.bucket.burst = 0.0, 3.0, 3.0
    for i in range(5):
        assert g.token is not None
        line = json.dumps({"proto": PROTO, "type": "report", "session": s.endpoint.session,
                           "batch": i + 1, "token": g.token.token,
                           "ranges": [[i * MiB2, MiB2]]}).encode() + b"\n"
        s.receive(line)
        g.receive(s.take_outbox())
    assert len(calls) == 3 and s.state is HostState.CLOSED and "flood" in s.last_error


def test_guest_restart_gets_a_new_session_and_orphans_released() -> None:
    s, _, _ = make()
    old_session = s.endpoint.session
    fresh = GuestEndpoint({"agent": "restarted"})
    fresh.request_sync()
    s.receive(fresh.take_outbox())
    assert s.state is HostState.SYNCING and s.endpoint.session != old_session
    assert [k for k, _ in fresh.receive(s.take_outbox())] == ["session"]
    s.receive(fresh.take_outbox())
    assert s.state is HostState.RUNNING and s.status()["sessions"] == 2


def test_a_need_sync_flood_ends_the_session_beyond_its_rate() -> None:
    """S5: every need-sync costs the host a new session (and, with the hello answering it,
    a decision and a map rebuild); a guest that keeps asking is cut off once its burst is
    spent, with the reason, and nothing more of it is served."""
    s, _, _ = make()
    burst = int(s.sync_bucket.burst)
    s.sync_bucket.rate = 0.0   # no refill while the test runs, whatever the machine's speed
    for i in range(burst + 1):
        fresh = GuestEndpoint({"agent": "hostile"})
        fresh.request_sync()
        s.receive(fresh.take_outbox())
        if i < burst:
            assert s.state is HostState.SYNCING and s.status()["sessions"] == i + 2
            fresh.receive(s.take_outbox())
            s.receive(fresh.take_outbox())   # the hello: running again
            assert s.state is HostState.RUNNING
    assert s.state is HostState.CLOSED and "need-sync flood" in s.last_error
    assert s.status()["sessions"] == burst + 1 and s.counters.errors == 1


def test_stats_flood_is_cut_off() -> None:
    s, g, _ = make()
    for _ in range(30):
        g.send({"type": "stats", "engine": {}})
    s.receive(g.take_outbox())
    assert s.state is HostState.CLOSED and "statistics flood" in s.last_error


def test_capabilities_the_guest_told_reach_status_and_the_table() -> None:
    caps = {"psi": {"available": False, "detail": "no /proc/pressure/memory (kernel 4.18)"},
            "kpageflags": {"available": True, "detail": "readable"}}
    s, _, _ = make(hello={"agent": "t", "capabilities": caps})
    st = s.status()
    assert st["capabilities"] == caps
    table = format_status({"vms": [st]})
    assert "vm1: guest kernel lacks psi" in table and "kpageflags" not in table
    assert st["arena_weakness"] is None and "arena weakness" not in table


def test_the_arena_weakness_the_guest_told_reaches_status_bounded() -> None:
    weak = "io_uring has no sparse buffer tables here (Linux 5.13+); held pages are not pinned"
    st = make(hello={"agent": "t", "arena": "hugetlb", "arena_weakness": weak})[0].status()
    assert st["arena_weakness"] == weak
    assert f"vm1: guest arena weakness: {weak}" in format_status({"vms": [st]})
    for told in ("\x1b[2J" + "w" * 500, _nested(900), 7):
        st = make(hello={"agent": "t", "arena_weakness": told})[0].status()
        assert st["arena_weakness"] is None or (st["arena_weakness"].isprintable()
                                                and len(st["arena_weakness"]) <= 300)


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("told", ["not a dict", [1, 2], {"psi": "yes"},
                                  {f"c{i}": {"available": True} for i in range(100)},
                                  {"psi": {"available": True, "detail": _nested(900)}},
                                  {"\x1b[2J": {"available": False, "detail": "\x1b[31mred"}},
                                  {"psi": {"available": "yes", "detail": "ok\x07"}}])
def test_malformed_capabilities_from_a_guest_are_dropped_or_bounded(told: Any) -> None:
    s, _, _ = make(hello={"agent": "t", "capabilities": told})
    caps = s.status()["capabilities"]
    assert isinstance(caps, dict) and len(caps) <= 32
    assert all(set(v) == {"available", "detail"} for v in caps.values())
    assert all(n.isidentifier() and v["detail"].isprintable() for n, v in caps.items())
    assert all(v["available"] in (True, False) for v in caps.values())
    json.dumps(caps)
    format_status({"vms": [s.status()]})   # the table never sees a control character


def test_hostile_stats_cannot_break_status_for_anyone() -> None:
    """S5: status (aeratectl, metrics) serialises every VM's last stats; a guest sending
    deeply nested or oversized stats must not make that raise, here or from a deep stack."""
    s, g, _ = make()
    g.send({"type": "stats", "engine": {"phase": _nested(950), "counters": {"passes": 3}},
            "free_by_order": {f"0/Z{i}": list(range(80)) for i in range(100)},
            "arena": "\x1b]0;pwned\x07"})
    s.receive(g.take_outbox())
    assert s.state is HostState.RUNNING

    def deep(n: int) -> str:
        return json.dumps(s.status()) if n == 0 else deep(n - 1)

    text = deep(100)
    guest = s.status()["guest"]
    assert guest["engine"]["counters"] == {"passes": 3}
    assert len(guest["free_by_order"]) == 64 and len(text) < 200_000
    assert guest["arena"].isprintable()


def test_a_discard_off_the_loop_freezes_the_session_until_it_is_finished() -> None:
    """S4 with discards on a worker thread: while a job is out, nothing else of the session
    happens -- no new input is taken, no new session can start -- and what arrived behind
    the report is acted on only after its ack."""
    s, g, calls = make()
    b1 = g.report([(0, MiB2)])
    fresh = GuestEndpoint({"agent": "restarted"})
    fresh.request_sync()     # a need-sync queued right behind the report
    job = s.feed(g.take_outbox() + fresh.take_outbox())
    assert job is not None and job.batch == b1 and calls == []
    with pytest.raises(RuntimeError, match="being discarded"):
        s.feed(b"")
    with pytest.raises(RuntimeError, match="S4"):
        s.connected()
    session = s.endpoint.session
    job.run()                          # what the worker thread does
    assert calls == [(0, MiB2)] and s.endpoint.session == session
    assert s.finish(job) is None
    # The ack went out for the old session, then the need-sync started a new one.
    out = s.take_outbox()
    assert b'"type":"ack"' in out and b'"type":"sync"' in out
    assert out.index(b'"type":"ack"') < out.index(b'"type":"sync"')
    assert s.endpoint.session != session and s.status()["discarded_bytes"] == MiB2


def test_hostile_hello_is_bounded_like_stats() -> None:
    """S5: the hello's agent/arena strings reach the journal and status; nested or
    escape-laden values are cut, and the old hello does not outlive its session."""
    s, _, _ = make(hello={"agent": "\x1b]0;pwned\x07" + "v" * 500, "arena": _nested(950),
                          "capabilities": {"poison_safe": {"available": True,
                                                           "detail": _nested(900)}},
                          "extra": {"k%d" % i: _nested(50) for i in range(200)}})
    st = s.status()
    assert st["agent"].isprintable() and len(st["agent"]) <= 64 and st["arena"] is None
    assert all(msg.isprintable() and len(msg) < 300 for _, msg, _k in s.log)
    assert len(s.hello["extra"]) == 64
    json.dumps(st)
    format_status({"vms": [st]})
    s.connected()
    assert s.hello == {}


def test_reports_before_a_protocol_error_in_the_same_read_are_not_served() -> None:
    """S5: a read whose fifth report overflows the in-flight window ends the session; the
    four before it are neither discarded nor acked, and the session does not crash."""
    s, g, calls = make()
    assert g.token is not None
    lines = b"".join(json.dumps({"proto": PROTO, "type": "report", "session": s.endpoint.session,
                                 "batch": b, "token": g.token.token,
                                 "ranges": [[b * MiB2, MiB2]]}).encode() + b"\n"
                     for b in range(1, 7))
    s.receive(lines)
    assert calls == [] and s.state is HostState.CLOSED and "in flight" in s.last_error
    assert b'"type":"ack"' not in s.take_outbox()


def test_a_report_across_two_numa_nodes_is_served_as_its_parts_not_cut_off() -> None:
    """Review finding: on a NUMA guest (two memory backends that touch in guest-physical
    space) an honest guest's coalesced report can span both; the range check refused it
    and ended the session as if the guest were hostile. It is split at the host's blocks
    (host/qemu_map.py split_at_pieces) and each part discarded; a range into a hole still
    ends the session."""
    from test_qemu_map import GIB, gmap

    from aerate.host import qemu_map as qm
    m = gmap("q35-3g-numa-memfd")
    s, g, calls = make()
    s.in_ram = lambda gpa, n: qm.may_report(m, gpa, n, MiB2)
    s.split = lambda gpa, n: qm.split_at_pieces(m, gpa, n)
    b = g.report([(GIB - MiB2, MiB2), (GIB, MiB2)])     # coalesced by the guest into one
    s.receive(g.take_outbox())
    assert calls == [(GIB - MiB2, MiB2), (GIB, MiB2)]
    assert g.receive(s.take_outbox()) == [("release", (b, 2 * MiB2, 0))]
    assert s.state is HostState.RUNNING
    g.report([(2 * GIB - MiB2, MiB2), (2 * GIB, MiB2)])  # into the PCI hole: hostile
    s.receive(g.take_outbox())
    assert s.state is HostState.CLOSED and "not inside this VM's RAM" in s.last_error
