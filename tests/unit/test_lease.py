"""Leases (agent/protocol.py, "Leases"): no report is discarded after its pages went back.

The endpoints and the host session are the real ones, driven on simulated clocks: the host's
clock is real time, the guest's runs at any rate from stopped (a paused VM) to slightly fast
(NTP slew). The property test lets hypothesis pick every interleaving of sends, deliveries
(in order, any delay), keepalives, reports, expiries, daemon stalls and slice durations, and
checks the one thing that matters: every byte the host discards was discarded before the
guest returned that batch's pages to its kernel, in real time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aerate.agent import protocol as p
from aerate.host.punch import Check, PunchRefused
from aerate.host.refusal import Decision
from aerate.host.session import VmSession

pytestmark = pytest.mark.unit
MiB2 = 2 << 20


class Clock:
    """A settable clock."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def before_slice(gpa: int, length: int, checks: Sequence[Check]) -> None:
    """What host/punch.py asks before a slice: the first reason refuses it."""
    for c in checks:
        why = c()
        if why:
            raise PunchRefused("vm", gpa, length, why)


def after_slice(checks: Sequence[Check]) -> list[str]:
    """What host/punch.py asks right after a slice (a check's ``after`` where it has one):
    any reason makes the slice an overrun."""
    return [why for c in checks if (why := getattr(c, "after", c)())]


def pair(lease_s: float = 2.0) -> tuple[VmSession, p.GuestEndpoint, Clock, Clock,
                                         list[tuple[int, int]]]:
    host_clock, guest_clock = Clock(), Clock()
    calls: list[tuple[int, int]] = []

    def discard(gpa: int, length: int, checks: Sequence[Check]) -> int:
        before_slice(gpa, length, checks)
        calls.append((gpa, length))
        return length

    s = VmSession("vm", MiB2, lambda g, n: True, discard, lambda: Decision("punch", "test"),
                  lease_s=lease_s, clock=host_clock)
    g = p.GuestEndpoint({"agent": "t"}, clock=guest_clock)
    s.connected()
    g.receive(s.take_outbox())
    s.receive(g.take_outbox())
    assert s.state is p.HostState.RUNNING and g.state is p.GuestState.RUNNING
    return s, g, host_clock, guest_clock, calls


def test_every_host_message_carries_a_token_and_reports_echo_the_newest() -> None:
    s, g, hc, gc, _ = pair()
    assert g.token is not None and g.token.token == 1 and g.token.lease_s == 2.0
    hc.t += 0.4
    s.endpoint.keepalive()
    gc.t += 0.4
    g.receive(s.take_outbox())
    assert g.token.token == 2 and g.token.received == gc.t
    b = g.report([(0, MiB2)])
    events = s.endpoint.receive(g.outbox)
    assert events[0][1].token == 2 and events[0][1].batch == b


def test_report_under_a_stale_token_is_refused_and_the_session_stays() -> None:
    """Bad input from the issue: a report whose token the host sent more than half the
    lease ago is refused with the reason, nothing is discarded, the honest guest stays."""
    s, g, hc, _gc, calls = pair()
    b = g.report([(0, MiB2)])
    hc.t += 1.0   # the report waited behind a slow daemon for half the lease
    s.receive(g.take_outbox())
    assert calls == []
    assert s.state is p.HostState.RUNNING
    st_ = s.status()
    assert st_["lease"]["refused_batches"] == 1 and st_["lease"]["refused_bytes"] == MiB2
    assert "lease token 1 expired" in st_["last_refusal"]
    assert any("refused: lease token 1 expired" in m and k == "refusal" for _, m, k in s.log)
    # Acked as stale: the guest returns the pages without counting a policy refusal.
    assert g.receive(s.take_outbox()) == [("release", (b, 0, 0))]


@pytest.mark.parametrize("token, why", [(None, "carries no lease token"),
                                        (True, "carries no lease token"),
                                        ("1", "carries no lease token"),
                                        (99, "was never sent in this session")])
def test_report_with_a_missing_or_foreign_token_is_refused(token: Any, why: str) -> None:
    s, _g, _, _, calls = pair()
    msg: dict[str, Any] = {"type": "report", "session": s.endpoint.session, "batch": 1,
                           "ranges": [[0, MiB2]]}
    if token is not None:
        msg["token"] = token
    s.receive(p.encode(msg))
    assert calls == [] and s.state is p.HostState.RUNNING
    assert why in s.status()["last_refusal"]


def test_a_token_of_an_older_session_is_refused() -> None:
    s, g, hc, _, calls = pair()
    old = g.token
    assert old is not None
    hc.t += 0.1
    s.connected()                       # a new session: the old tokens are void
    g.receive(s.take_outbox())
    s.receive(g.take_outbox())
    s.receive(p.encode({"type": "report", "session": s.endpoint.session, "batch": 1,
                        "token": old.token + 5, "ranges": [[0, MiB2]]}))
    assert calls == [] and "never sent" in s.status()["last_refusal"]


def test_guest_returns_unacked_pages_only_a_full_lease_after_receiving_the_token() -> None:
    _s, g, _, gc, _ = pair()
    b = g.report([(0, MiB2)])
    assert g.expire() == []
    gc.t += 1.999
    assert g.expire() == []
    assert g.next_expiry() == pytest.approx(gc.t + 0.001)
    gc.t += 0.001
    assert g.expire() == [("release", (b, 0, 0))] and g.inflight == {}


def test_a_late_ack_of_an_expired_batch_is_ignored_not_an_error() -> None:
    s, g, hc, gc, _ = pair()
    b = g.report([(0, MiB2)])
    gc.t += 2.0
    assert g.expire() == [("release", (b, 0, 0))]
    s.receive(g.take_outbox())          # the host refuses it: its window closed meanwhile
    hc.t += 2.0
    assert g.receive(s.take_outbox()) == []
    assert g.state is p.GuestState.RUNNING
    # An ack of a batch never reported is still a protocol error.
    bogus = p.encode({"type": "ack", "session": s.endpoint.session, "batch": 77,
                      "discarded": 0, "refused": 0, "token": 50, "lease_ms": 2000})
    assert g.receive(bogus)[0][0] == "error"


def test_guest_waits_for_a_fresh_token_before_reporting() -> None:
    s, g, hc, gc, _ = pair()
    gc.t += 0.61   # past FRESH_SHARE (0.3) of a 2 s lease
    assert not g.can_report()
    with pytest.raises(RuntimeError):
        g.report([(0, MiB2)])
    hc.t += 0.61
    # An idle guest gets no keepalive: it asks, and the host answers at once.
    assert s.endpoint.keepalive_due() is None
    g.request_token()
    s.receive(g.take_outbox())
    g.receive(s.take_outbox())
    assert g.can_report()
    # Busy now: keepalives every quarter of the lease, for BUSY_S, then none again.
    due = s.endpoint.keepalive_due()
    assert due is not None and due == pytest.approx(0.5)
    hc.t += p.BUSY_S
    assert s.endpoint.keepalive_due() is None


def test_a_need_token_flood_costs_one_keepalive_per_period() -> None:
    s, g, hc, _, _ = pair()
    hc.t += 1.0
    for _ in range(500):
        g.request_token()
    s.receive(g.take_outbox())
    assert s.take_outbox().count(b'"type":"keepalive"') == 1
    assert s.state is p.HostState.RUNNING


def test_lease_ms_outside_the_bounds_ends_the_session_on_the_guest() -> None:
    g = p.GuestEndpoint({"agent": "t"})
    sync = p.encode({"type": "sync", "session": 1, "nonce": 1, "granule": MiB2,
                     "token": 1, "lease_ms": p.LEASE_MS_MAX + 1}, sync=True)
    assert g.receive(sync)[0][0] == "error" and g.state is p.GuestState.IDLE
    with pytest.raises(ValueError):
        p.HostEndpoint().set_lease(0.1)


def test_revoked_session_discards_nothing_more_even_mid_batch() -> None:
    """A guest reset seen by libvirt's event thread stops a discard already under way."""
    s, g, _, _, _ = pair()
    done: list[tuple[int, int]] = []

    def discard(gpa: int, length: int, checks: Sequence[Check]) -> int:
        before_slice(gpa, length, checks)
        done.append((gpa, length))
        s.revoke("the guest was reset")   # the event arrives while this batch runs
        return length

    s.discard = discard
    g.report([(0, MiB2), (4 * MiB2, MiB2)])
    s.receive(g.take_outbox())
    assert done == [(0, MiB2)]
    assert "session ended: the guest was reset" in s.status()["last_refusal"]
    g.report([(8 * MiB2, MiB2)])
    s.receive(g.take_outbox())
    assert done == [(0, MiB2)]
    s.connected()   # the loop starts a new session: revocation was for the old one
    assert s.revocation(s.endpoint.session) == ""


# ----------------------------------------------------------------- the property

#: The fastest a guest clock runs against real time (NTP slews at most 500 ppm).
FAST = 1.0005
ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.floats(0.0, 3.0), st.floats(0.0, 1.0005)),
    st.tuples(st.just("advance"), st.floats(0.0, 0.2), st.just(1.0005)),
    st.tuples(st.just("keepalive")),
    st.tuples(st.just("ask")),
    st.tuples(st.just("to_guest")),
    st.tuples(st.just("to_host"), st.floats(0.0, 0.9)),
    st.tuples(st.just("report"), st.integers(1, 3)),
    st.tuples(st.just("expire")),
), max_size=60)


@settings(max_examples=400, deadline=None)
@given(actions=ACTIONS, lease_ms=st.integers(p.LEASE_MS_MIN, 8000),
       stalls=st.sampled_from([1.0, 1.0, 3.0]))
def test_property_no_discard_after_the_guest_returned_the_pages(
        actions: list[tuple[Any, ...]], lease_ms: int, stalls: float) -> None:
    """Whatever the delays, the order of events, a stopped or fast guest clock and a daemon
    stalled mid-batch (up to 0.9 of the host's window per slice), no range is discarded
    after the guest returned it. ``real`` is real time; the host's clock is real time.

    With ``stalls`` 3.0 a slice may stall up to 2.7 windows (1.35 leases), past the guest's
    hold: then what the check after the slice must do is see every slice during which the
    guest may have taken its pages back (an overrun, the incident), as host/punch.py asks
    it (a check's ``after``)."""
    lease = lease_ms / 1000.0
    real = Clock()
    guest_clock = Clock()
    h2g: list[bytes] = []
    g2h: list[bytes] = []
    # The simulation runs events in real-time order, so "after" is a later step: each
    # discard and each return gets the step number at which it happened.
    step = [0]
    returned: dict[int, int] = {}        # gpa of a range -> step its batch went back
    punched: list[tuple[int, int]] = []  # (gpa, step the discard ended)
    stall = [0.0]
    during: list[int] = []     # slices the guest's lease ran out in
    missed: list[int] = []     # ... that the check after the slice did not see

    def discard(gpa: int, length: int, checks: Sequence[Check]) -> int:
        before_slice(gpa, length, checks)
        # The slice runs (or the daemon is stopped inside it) while the guest's clock goes
        # on, at its fastest: had the guest's lease run out meanwhile, it could have freed
        # the pages while they were being punched.
        real.t += stall[0]
        guest_clock.t += stall[0] * FAST
        step[0] += 1
        punched.append((gpa, step[0]))
        held = g.inflight.get(batches[gpa])
        late = after_slice(checks)
        if held is not None and guest_clock.t >= held.release_at:
            during.append(gpa)
            if not late:
                missed.append(gpa)
        if late:
            raise PunchRefused("vm", gpa, length, late[0], done=length, overrun=True)
        return length

    s = VmSession("vm", MiB2, lambda g, n: True, discard, lambda: Decision("punch", "t"),
                  lease_s=lease, clock=real, reports_per_s=1e9, burst=1e9)
    g = p.GuestEndpoint({"agent": "t"}, clock=guest_clock)
    batches: dict[int, int] = {}         # gpa of each reported range -> its batch
    next_gpa = [0]

    def guest_events(events: list[tuple[str, Any]]) -> None:
        for kind, payload in events:
            if kind == "release":
                step[0] += 1
                for gpa, batch in batches.items():
                    if batch == payload[0]:
                        returned.setdefault(gpa, step[0])

    s.connected()
    h2g.append(s.take_outbox())
    for action in actions:
        kind = action[0]
        if kind == "advance":
            dt, rate = action[1], action[2]
            real.t += dt
            guest_clock.t += dt * rate
        elif kind == "keepalive":
            s.endpoint.keepalive()
        elif kind == "ask":
            g.request_token()
        elif kind == "to_guest" and h2g:
            guest_events(g.receive(h2g.pop(0)))
        elif kind == "to_host" and g2h:
            # The share of the host's window one slice takes (a stall inside it).
            stall[0] = action[1] * stalls * p.HOST_SHARE * lease
            s.receive(g2h.pop(0))
        elif kind == "report" and g.can_report():
            # 1-3 ranges apart from each other: one discard call (one slice) each, so a
            # stall in one slice delays the start of the next.
            ranges = [(next_gpa[0] + 2 * i * MiB2, MiB2) for i in range(action[1])]
            next_gpa[0] += 2 * action[1] * MiB2
            batch = g.report(ranges)
            for gpa, _ in ranges:
                batches[gpa] = batch
        elif kind == "expire":
            guest_events(g.expire())
        out = g.take_outbox()
        if out:
            g2h.append(out)
        out = s.take_outbox()
        if out:
            h2g.append(out)
    assert missed == []
    if stalls > 1.0:
        return   # past the window by design: only the incident's detection is asked
    for gpa, at in punched:
        assert gpa not in returned or at < returned[gpa], (gpa, at, returned)
    assert during == []
    # Overruns may still be counted here: a slice stalled to 0.9 of the window can end past
    # 90 % of the lease (the hold minus a 10 %-fast guest clock) with this 0.05 %-fast one:
    # the flag is on the safe side; what it must never do is miss (``missed`` above).


def test_window_is_checked_before_every_slice_not_only_on_arrival() -> None:
    """A daemon that stalls inside a long discard stops at the next slice once the window
    closed: the rest of the batch is refused, the done part counted as discarded."""
    s, g, hc, _, _ = pair(lease_s=2.0)
    done: list[int] = []

    def slow(gpa: int, length: int, checks: Sequence[Check]) -> int:
        before_slice(gpa, length, checks)
        hc.t += 0.6   # each slice (or a stall inside it) takes 0.6 s of a 1 s window
        done.append(gpa)
        return length

    s.discard = slow
    b = g.report([(0, MiB2), (4 * MiB2, MiB2), (8 * MiB2, MiB2)])
    s.receive(g.take_outbox())
    assert done == [0, 4 * MiB2]
    assert g.receive(s.take_outbox()) == [("release", (b, 2 * MiB2, MiB2))]
    assert "lease token 1 expired" in s.status()["last_refusal"]
    # Counted as cut short although the refused range itself had nothing discarded: two
    # ranges of the batch were.
    lz = s.status()["lease"]
    assert (lz["cut_short"], lz["refused_at_start"], lz["overruns"]) == (1, 0, 0), lz


def test_a_batch_whose_window_closed_before_its_first_slice_is_counted_refused_at_start(
        ) -> None:
    """A daemon stalled between reading a report (its token fresh) and its first slice: the
    check before that slice refuses the whole batch, nothing is discarded, and status counts
    it (refused_at_start), not only in last_refusal."""
    s, g, hc, _, calls = pair(lease_s=2.0)
    discard = s.discard

    def stalled_first(gpa: int, length: int, checks: Sequence[Check]) -> int:
        hc.t += 1.5   # the stall: the 1 s window closes before the first slice's check
        return discard(gpa, length, checks)

    s.discard = stalled_first
    b = g.report([(0, MiB2), (4 * MiB2, MiB2)])
    s.receive(g.take_outbox())
    assert calls == []
    assert g.receive(s.take_outbox()) == [("release", (b, 0, 2 * MiB2))]
    st_ = s.status()
    lz = st_["lease"]
    assert (lz["refused_at_start"], lz["cut_short"], lz["refused_batches"]) == (1, 0, 0), lz
    assert st_["discarded_bytes"] == 0 and st_["refused_bytes"] == 2 * MiB2, st_
    assert "not discarding" in st_["last_refusal"], st_


@pytest.mark.parametrize(("slice_s", "overrun"), [(0.1, False), (1.5, False), (1.99, True)])
def test_a_slice_is_an_overrun_only_if_it_ends_after_the_guest_may_have_freed_its_pages(
        slice_s: float, overrun: bool) -> None:
    """The check after a slice asks the guest's hold (a whole lease after the token's send,
    less 10 % for a fast guest clock), not the window (half a lease): a slice that started
    in the window and ended past it, but before the guest could take the pages back (1.5 s
    of a 2 s lease here), ran while they were held; one that ends later is the incident."""
    s, g, hc, _, _ = pair(lease_s=2.0)
    ends: list[str] = []

    def one_slice(gpa: int, length: int, checks: Sequence[Check]) -> int:
        before_slice(gpa, length, checks)
        hc.t += slice_s
        late = after_slice(checks)
        ends.extend(late)
        if late:
            raise PunchRefused("vm", gpa, length, late[0], done=length, overrun=True)
        return length

    s.discard = one_slice
    g.report([(0, MiB2)])
    s.receive(g.take_outbox())
    assert s.counters.lease_overruns == int(overrun), ends
    if overrun:
        assert "after the guest may have taken the pages back" in ends[0]
    if slice_s > p.HOST_SHARE * 2.0:
        # The window alone would have called it late: it is the hold that is asked.
        assert p.deadline_problem(1, p.HOST_SHARE * 2.0, hc.t)


def test_the_host_measures_leases_on_a_clock_that_counts_a_host_suspend() -> None:
    """Review finding: CLOCK_MONOTONIC stops while the host is suspended, a KVM guest's
    clock jumps forward on resume, so a monotonic host window would still be open when the
    guest's lease has run out. The host's default lease clock is CLOCK_BOOTTIME."""
    import time as _time
    host = p.HostEndpoint()
    assert host.clock is p.boottime
    assert abs(p.boottime() - _time.clock_gettime(_time.CLOCK_BOOTTIME)) < 0.5
    # The scenario on simulated clocks: a suspend of 30 s; the guest's clock jumped, and the
    # host's boot-time clock counted it too, so the report is refused.
    s, g, hc, gc, calls = pair()
    g.report([(0, MiB2)])
    gc.t += 30.0
    assert [k for k, _ in g.expire()] == ["release"]   # the guest took its pages back
    hc.t += 30.0                                        # CLOCK_BOOTTIME counted the suspend
    s.receive(g.take_outbox())
    assert calls == []


def test_a_need_sync_voids_the_reports_queued_behind_it() -> None:
    """Review finding: reports parsed under the old session in the same read as a
    need-sync must not reach the new session (they were served under a predictable token,
    or crashed the runner on the ack of a batch the new session did not know)."""
    s, g, _, _, calls = pair()
    fresh = p.GuestEndpoint({"agent": "restarted"})
    fresh.request_sync()
    assert g.token is not None
    predicted = g.token.token + 1   # what the new sync's token will be
    line = p.encode({"type": "report", "session": s.endpoint.session, "batch": 1,
                     "token": predicted, "ranges": [[0, MiB2]]})
    s.receive(fresh.take_outbox() + line)
    assert calls == [] and s.endpoint.pending == {}
    assert s.state is p.HostState.SYNCING


def test_a_lease_refusal_does_not_make_the_guest_back_off() -> None:
    """Review finding: a report that lost the race against its window is refused as
    stale: the guest returns the pages without counting a policy refusal."""
    s, g, hc, _, _ = pair()
    b = g.report([(0, MiB2)])
    hc.t += 1.5
    s.receive(g.take_outbox())
    assert g.receive(s.take_outbox()) == [("release", (b, 0, 0))]
