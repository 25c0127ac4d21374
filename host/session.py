"""One VM's session on the host: protocol, S1 checks, the call to the reclaimer, the ack.

No sockets and no libvirt here: the daemon feeds bytes in and writes ``take_outbox()`` out;
the memory map and the discard function are handed in. That keeps the safety logic (S1, S4,
S5) testable on its own and the daemon a thin loop.

Leases (agent/protocol.py, "Leases"). A report is served only while the token it carries is
inside the host's window, and the discard function gets checks that it runs right before
each slice it punches (host/punch.py): the lease is still open, and the session was not
revoked. Revocation is how a guest reset or a stopped domain reaches a discard already under
way: libvirt's event thread calls ``revoke()``, which writes one attribute (atomic under the
GIL) that the next check reads; it does not wait for the loop thread, which may be the one
busy punching.
"""

from __future__ import annotations

import collections
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from aerate.agent import protocol
from aerate.agent.protocol import Clock, HostEndpoint, HostState, Probe, Report
from aerate.host.probe import ProbeUnknown
from aerate.host.punch import Check, PunchFailed, PunchRefused
from aerate.host.refusal import PUNCH, Decision

#: Discard ``length`` bytes at guest-physical ``gpa``, running every check right before each
#: slice; returns bytes discarded. Raises PunchRefused (``done`` bytes were discarded before
#: a check or the map said no), PunchFailed or OSError (host/punch.py).
Discard = Callable[[int, int, Sequence[Check]], int]
#: Is [gpa, gpa+length) wholly inside this VM's RAM? (S1, from the QEMU memory map)
InRam = Callable[[int, int], bool]
#: The reclaimer allowed for this VM *now* (a migration may have started meanwhile).
Permit = Callable[[], Decision]
#: A reported range as the parts that each lie in one RAM block (host/qemu_map.py).
Split = Callable[[int, int], List[Tuple[int, int]]]
#: For each probed range: has it a backed byte on the host? ProbeUnknown with the reason
#: where the host cannot tell (host/probe.py ``backed_ranges`` is the production one).
Backed = Callable[[List[Tuple[int, int]]], List[bool]]


#: New sessions a guest may ask for (need-sync): a rate per second and a burst.
NEED_SYNC_PER_S = 0.5
NEED_SYNC_BURST = 4.0
#: Probes a guest may have answered (agent/protocol.py "Probes"): a rate and a burst; beyond
#: them the answer is unknown "rate", which costs the host one line (the agent probes every
#: agent/cycle.py PROBE_EVERY, 5 s).
PROBE_PER_S = 1.0
PROBE_BURST = 2.0


@dataclass
class Counters:
    """What a session did, for status and metrics (bytes)."""

    reported: int = 0
    discarded: int = 0
    refused: int = 0
    batches: int = 0
    sessions: int = 0
    errors: int = 0
    #: batches (and their bytes) refused because their lease token was stale or missing
    lease_refused_batches: int = 0
    lease_refused: int = 0
    #: discards stopped part-way because the lease ran out or the session was revoked
    cut_short: int = 0
    #: batches accepted under a fresh token whose check before their first slice refused
    #: them (the window closed or the session was revoked while they waited, e.g. a daemon
    #: stalled between reading a report and discarding it): nothing of them discarded
    refused_at_start: int = 0
    #: slices whose fallocate ended after the lease window closed (the safety margin was
    #: eaten: a stalled daemon); should stay 0
    lease_overruns: int = 0
    #: discards stopped because a reported range did not read as zeroes (host/punch.py):
    #: the guest's page was no longer the one it reported; 0 for an honest agent
    content_refused: int = 0
    #: probes answered (agent/protocol.py "Probes"), the bytes they named, the bytes of the
    #: ranges found backed, and the probes answered unknown (rate-limited ones included)
    probes: int = 0
    probed: int = 0
    probe_backed: int = 0
    probes_unknown: int = 0


class SliceCheck:
    """A check whose question right after a slice differs from the one before it
    (host/punch.py asks ``after`` there when a check has one); a ``cheap`` one (a clock or
    an attribute read) is also asked right before each granule's fallocate, after the
    content check's read of that granule."""

    def __init__(self, before: Check, after: Check, cheap: bool = False) -> None:
        self.before = before
        self.after = after
        self.cheap = cheap

    def __call__(self) -> str:
        return self.before()


@dataclass
class DiscardJob:
    """One report's discard, run by ``run()`` on whichever thread the caller picks.

    It touches nothing of the session while it runs: what it did is kept here and applied
    by ``VmSession.finish`` on the session's own thread, which then sends the ack. The
    checks (lease window, revocation) go with it and run before every slice.
    """

    vm: str
    session: int
    batch: int
    ranges: List[Tuple[int, int]]
    total: int
    discard: Discard
    checks: Tuple[Check, ...]
    done: int = 0
    reason: str = ""
    cut_short: int = 0
    refused_at_start: int = 0
    overruns: int = 0
    content_refused: int = 0
    #: probes answered (agent/protocol.py "Probes"), the bytes they named, the bytes of the
    #: ranges found backed, and the probes answered unknown (rate-limited ones included)
    probes: int = 0
    probed: int = 0
    probe_backed: int = 0
    probes_unknown: int = 0
    #: (level, message, event kind) for the daemon's journal (host/journal.py EVENTS)
    notes: List[Tuple[str, str, str]] = field(default_factory=list)

    def _note(self, level: str, msg: str) -> None:
        self.notes.append((level, "%s: batch %d: %s" % (self.vm, self.batch, msg), "discard"))

    def run(self) -> DiscardJob:
        """Discard the ranges in order; the first refusal or failure ends the job (the rest
        counts as refused, and the ack says why). Never raises for a discard problem."""
        for gpa, length in self.ranges:
            try:
                self.done += self.discard(gpa, length, self.checks)
            except PunchRefused as e:
                self.done += e.done
                self.reason = str(e)
                if e.overrun:
                    # The window was found closed right after a slice: the daemon was
                    # stalled around that fallocate (SIGSTOP, a debugger, CPU starvation).
                    # A stall that began inside the syscall or after it is harmless (the
                    # kernel does not stop a punch half-way for a signal; the slice ran
                    # while the guest still held the pages); one that began between the
                    # check and the syscall's entry, microseconds, may have discarded pages
                    # the guest had taken back. Nothing tells the two apart from here, so
                    # every overrun is an incident (agent/protocol.py "Leases").
                    self.overruns += 1
                    self._note("error", "a discard slice ended after the guest may have "
                               "taken its pages back (its lease ran out or its session was "
                               "revoked): the daemon was stalled around the syscall; if the "
                               "stall began before it, the guest may have lost data (run "
                               "its checkers): %s" % self.reason)
                elif e.content:
                    # An honest agent reports only pages it holds untouched, which read as
                    # zeroes; anything else means the page went back to the guest (a reset
                    # or a moved page raced the report) and the check kept it. An incident:
                    # the granules discarded before it had the same exposure.
                    self.content_refused += 1
                    self._note("error", "%s (the guest had this page back: if the guest is "
                               "honest a reset or a moved page raced the report; the "
                               "granules before it were zeroes and are discarded)"
                               % self.reason)
                else:
                    # Cut short when anything of the batch was discarded (an earlier range
                    # or this one's first slices), refused at its start when nothing was:
                    # each stop is counted once, so a stall between a report's read and its
                    # first slice shows in status, not only in last_refusal.
                    if self.done:
                        self.cut_short += 1
                    else:
                        self.refused_at_start += 1
                    self._note("warning", self.reason)
                break
            except (PunchFailed, OSError) as e:
                # Abandoned for good: the ack tells the guest nothing more will come.
                self.reason = "discard failed at [%#x, +%#x): %s" % (gpa, length, e)
                self._note("error", self.reason)
                break
        return self


@dataclass
class TokenBucket:
    """Bounds a guest's reports per second (S5): a flood is refused, not served."""

    rate: float
    burst: float
    tokens: float = 0.0
    t: float = field(default_factory=time.monotonic)

    def take(self, n: float = 1.0, now: Optional[float] = None) -> bool:
        """Spend ``n`` tokens if there are enough."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class VmSession:
    """The host's view of one guest's agent across reconnects.

    ``permit`` is asked at every batch (and the reclaimer asks again before each punch), so
    a refusal takes effect for the next report (S1: "discard is allowed for that VM now").
    """

    def __init__(self, vm: str, granule: int, in_ram: InRam, discard: Discard,
                 permit: Permit, settings: Optional[Dict[str, Any]] = None,
                 reports_per_s: float = 50.0, burst: float = 100.0,
                 lease_s: float = 2.0, clock: Optional[Clock] = None,
                 backed: Optional[Backed] = None, split: Optional[Split] = None) -> None:
        self.vm = vm
        #: cuts a reported range at the host's RAM block boundaries (host/qemu_map.py
        #: ``split_at_pieces``); None: ranges are taken as they come
        self.split: Split = split or (lambda gpa, length: [(gpa, length)])
        self.granule = granule
        self.in_ram = in_ram
        self.discard = discard
        self.permit = permit
        #: answers probes (None: every probe is answered unknown)
        self.backed = backed
        self.decision = Decision("refuse", "no batch seen yet")
        self.settings = dict(settings or {})
        self.endpoint = HostEndpoint(clock=clock, lease_s=lease_s)
        #: (session id, why) once the guest was reset or the domain stopped: no discard of
        #: that session may start any more (set from libvirt's event thread)
        self.revoked: Tuple[int, str] = (0, "")
        self.last_refusal = ""
        #: events received and not acted on yet (behind a discard in progress)
        self._events: Deque[Tuple[str, Any]] = collections.deque()
        #: the discard in progress, if any: nothing else of this session happens meanwhile
        self.job: Optional[DiscardJob] = None
        self.counters = Counters()
        self.bucket = TokenBucket(rate=reports_per_s, burst=burst, tokens=burst)
        # Statistics come every few seconds; a guest sending them much faster is flooding.
        self.stats_bucket = TokenBucket(rate=5.0, burst=20.0, tokens=20.0)
        # The agent asks for a new session when it starts or recovers, at most once every
        # agent/service.py NEED_SYNC_EVERY (5 s). Each one costs the host a new session and,
        # with the hello that answers it, a decision and a map rebuild through the VM's
        # worker (QMP round trips): a guest asking faster is flooding (S5).
        self.sync_bucket = TokenBucket(rate=NEED_SYNC_PER_S, burst=NEED_SYNC_BURST,
                                       tokens=NEED_SYNC_BURST)
        # On the endpoint's clock (tests drive it), unlike the buckets above.
        self.probe_bucket = TokenBucket(rate=PROBE_PER_S, burst=PROBE_BURST,
                                        tokens=PROBE_BURST, t=self.endpoint.clock())
        self.last_probe_unknown = ""
        self.hello: Dict[str, Any] = {}
        #: counts hellos and session starts: what a decision made with "the hello" means
        self.hello_gen = 0
        self.stats: Dict[str, Any] = {}
        self.last_error = ""
        #: (level, message, event kind or "") for the daemon to emit (host/journal.py)
        self.log: List[Tuple[str, str, str]] = []

    @property
    def state(self) -> HostState:
        """The protocol state of the current connection."""
        return self.endpoint.state

    def _note(self, level: str, msg: str, kind: str = "") -> None:
        self.log.append((level, "%s: %s" % (self.vm, msg), kind))

    def revoke(self, why: str) -> int:
        """End the current session for discards at once (any thread: one attribute write).

        Called from libvirt's event thread on a guest reset (REBOOT) or a domain that stops:
        the guest's memory is no longer what its reports described. The loop thread still
        has to close the connection and start a new session; until then every check of the
        revoked session fails and its reports are refused. Returns the revoked session.
        """
        session = self.endpoint.session
        self.revoked = (session, why)
        return session

    def revocation(self, session: int) -> str:
        """Why ``session`` was revoked, or ""."""
        sid, why = self.revoked
        return why if sid == session and why else ""

    def connected(self) -> None:
        """A fresh connection to the guest's port: start a new session with a new nonce.

        S4: the guest may give back every batch of an older session once it sees the new
        sync, so no discard of this session may still be under way. The session refuses
        here while a job is out (``feed``/``finish``): its caller must wait for it.
        """
        if self.job is not None:
            raise RuntimeError("%s: a new session while batch %d is being discarded (S4)"
                               % (self.vm, self.job.batch))
        session = secrets.randbits(62) + 1
        # The old hello's facts (page poisoning: host/refusal.py) must not outlive their
        # session: until the new hello arrives, nothing the guest said counts.
        self.hello = {}
        self.hello_gen += 1
        self.endpoint.start(nonce=secrets.randbits(62), session=session,
                            granule=self.granule, settings=self.settings)
        self.counters.sessions += 1

    def configure(self, settings: Dict[str, Any]) -> None:
        """Send new live settings to the guest (now if a session is up, else at the sync)."""
        self.settings.update(settings)
        self.endpoint.configure(settings)

    def take_outbox(self) -> bytes:
        """Bytes to write to the guest."""
        return bytes(self.endpoint.take_outbox())

    def receive(self, data: bytes) -> None:
        """Act on bytes from the guest, running each discard inline (tests, simple callers).

        The daemon uses ``feed``/``finish`` instead, so that discards run off its loop."""
        job = self.feed(data)
        while job is not None:
            job.run()
            job = self.finish(job)

    def feed(self, data: bytes) -> Optional[DiscardJob]:
        """Take bytes from the guest; act on what they say up to the first report that needs
        a discard, which is returned for the caller to ``run()`` (on any thread) and hand
        back to ``finish``. Until then the session takes nothing more (S4: the session cannot
        change, re-sync or close while its discard runs): the caller stops feeding.
        """
        if self.job is not None:
            raise RuntimeError("%s: feed() while batch %d is being discarded"
                               % (self.vm, self.job.batch))
        self._events.extend(self.endpoint.receive(data))
        return self._pump()

    def finish(self, job: DiscardJob) -> Optional[DiscardJob]:
        """Account for a finished discard and ack it; then go on with what was queued
        behind it. Returns the next job, if any."""
        if job is not self.job:
            raise RuntimeError("%s: finish() of a job that is not this session's" % self.vm)
        self.job = None
        c = self.counters
        c.cut_short += job.cut_short
        c.refused_at_start += job.refused_at_start
        c.lease_overruns += job.overruns
        c.content_refused += job.content_refused
        self.log.extend(job.notes)
        c.discarded += job.done
        c.refused += job.total - job.done
        if job.reason:
            self.last_refusal = job.reason
        if self.endpoint.session == job.session and job.batch in self.endpoint.pending:
            self.endpoint.ack(job.batch, discarded=job.done, refused=job.total - job.done,
                              reason=job.reason)
        return self._pump()

    def _pump(self) -> Optional[DiscardJob]:
        while self._events and self.job is None:
            kind, payload = self._events.popleft()
            if kind == "hello":
                # Bounded like stats (S5): status, the journal and permit() read it.
                self.hello = _plain(payload, HELLO_DEPTH)
                self.hello_gen += 1
                self._note("info", "session up: agent %s, arena %s"
                           % (_word(self.hello.get("agent")), _word(self.hello.get("arena"))),
                           "session")
            elif kind == "report":
                if self.endpoint.state is HostState.CLOSED:
                    # A later line of the same read broke the protocol: the session is
                    # over, and nothing of it is discarded (S5), not even what came before.
                    continue
                self.job = self._report(payload)
            elif kind == "probe":
                if self.endpoint.state is not HostState.CLOSED:
                    self._probe(payload)
            elif kind == "stats":
                if not self.stats_bucket.take():
                    self._fail("statistics flood (more than %.0f messages/s)"
                               % self.stats_bucket.rate)
                    return None
                # Kept as plain JSON of bounded depth and size: status, aeratectl and the
                # metrics scrape read it for every VM, so one guest must not break them (S5).
                self.stats = _plain(payload, STATS_DEPTH)
            elif kind == "need-sync":
                if not self.sync_bucket.take():
                    self._fail("need-sync flood (more than %g new sessions/s asked, burst "
                               "%g)" % (self.sync_bucket.rate, self.sync_bucket.burst))
                    return None
                self._note("info", "guest agent asked for a new session (it restarted)",
                           "session")
                self.connected()
                # Everything queued behind it was parsed under the old session (its
                # reports, pending batches and tokens are void now): drop it.
                self._events.clear()
            elif kind == "error":
                self._fail("guest broke the protocol: %s" % payload)
        return self.job

    def cut_off(self, why: str) -> None:
        """End the session for a reason found outside the protocol (the daemon's input
        budget): as a protocol error, nothing more of it is served, and status shows why."""
        self._fail(why)

    def _fail(self, why: str) -> None:
        # S5: the session ends, nothing of it is discarded; the daemon drops the connection
        # and other VMs carry on.
        self.counters.errors += 1
        self.last_error = why
        self.endpoint.close()
        self._events.clear()
        self._note("warning", why + "; session closed, nothing discarded", "session")

    def _checks(self, session: int, token: int, deadline: float,
                hold_end: float) -> Tuple[Check, ...]:
        """What host/punch.py asks right before each slice of this report's discard (and,
        through ``after``, right after it). Both read only values fixed now or written
        atomically, so a worker thread may ask.

        The lease: a slice starts only inside the window (``deadline``, half the lease
        after the token's send time); after it, the slice must have ended before the guest
        may take the pages back (``hold_end``, ``HOLD_SHARE`` of the lease after the send):
        only a slice ending later is an overrun (agent/protocol.py "Leases")."""
        clock = self.endpoint.clock

        def alive() -> str:
            why = self.revocation(session)
            return "session ended: %s" % why if why else ""

        lease = SliceCheck(lambda: protocol.deadline_problem(token, deadline, clock()),
                           lambda: protocol.hold_problem(token, hold_end, clock()),
                           cheap=True)
        return (SliceCheck(alive, alive, cheap=True), lease)

    def _refuse(self, batch: int, total: int, reason: str, stale: bool = False) -> None:
        self.counters.refused += total
        self.last_refusal = reason
        if batch in self.endpoint.pending:
            self.endpoint.ack(batch, discarded=0, refused=total, reason=reason, stale=stale)

    def _probe(self, probe: Probe) -> None:
        """Answer a guest's probe here, on the session's thread (the loop): one call of
        ``backed`` over at most ``PROBE_MAX_RANGES`` ranges, a sweep of lseeks on an
        in-memory filesystem (host/probe.py argues the cost, S8), at most ``PROBE_PER_S``
        probes a second, the rate checked before anything else.

        Nothing here discards or reaches a discard: no token is looked at, no batch is
        made, no job is returned; the answer changes only what the guest believes
        (agent/protocol.py "Probes"). A range outside the VM's RAM ends the session as in
        a report (S5): an honest agent probes only blocks the host once accepted."""
        c = self.counters
        # The rate first: a probe beyond it costs one line, whatever it names.
        if not self.probe_bucket.take(now=self.endpoint.clock()):
            c.probes += 1
            c.probes_unknown += 1
            self.endpoint.probed(probe.id, unknown="rate", retry=True)
            return
        if not self._all_in_ram("probe %d" % probe.id, probe.ranges):
            return
        c.probes += 1
        c.probed += sum(n for _, n in probe.ranges)
        why, retry = "", False
        found: List[Tuple[int, int]] = []
        if self.backed is None:
            why = "this host does not look at its backings for probes"
        else:
            try:
                hits = self.backed(list(probe.ranges))
                found = [r for r, hit in zip(probe.ranges, hits) if hit]
            except ProbeUnknown as e:
                why, retry = e.reason, e.retry
            except OSError as e:
                why, retry = "cannot tell what is backed: %s" % e, True
        if why:
            c.probes_unknown += 1
            self.last_probe_unknown = why
            self.endpoint.probed(probe.id, unknown=why, retry=retry)
            return
        c.probe_backed += sum(n for _, n in found)
        self.endpoint.probed(probe.id, backed=found)

    def _all_in_ram(self, what: str, ranges: List[Tuple[int, int]]) -> bool:
        """True when every range lies in the VM's RAM; else the session ends (S5), naming
        the first range outside it."""
        for gpa, length in ranges:
            if not self.in_ram(gpa, length):
                self._fail("%s: range [%#x, +%#x) is not inside this VM's RAM"
                           % (what, gpa, length))
                return False
        return True

    def _report(self, report: Report) -> Optional[DiscardJob]:
        batch, ranges = report.batch, report.ranges
        total = sum(n for _, n in ranges)
        if not self.bucket.take():
            self._fail("report flood (more than %.0f reports/s)" % self.bucket.rate)
            return None
        # A range across two RAM blocks that touch (NUMA nodes) is an honest guest's
        # coalescing: it is served as its parts; anything else outside RAM ends the session.
        ranges = [part for gpa, length in ranges for part in self.split(gpa, length)]
        if not self._all_in_ram("batch %d" % batch, ranges):
            return None
        self.counters.reported += total
        self.counters.batches += 1
        session = self.endpoint.session
        # A stale token is told first, whatever else ended the session: the guest learns
        # that its report waited too long (stale, no back-off), and the reason is the same
        # whether a reset, a closed port or a lost libvirt connection raced the report in.
        lease = self.endpoint.lease_problem(report.token)
        deadline = self.endpoint.lease_deadline(report.token)
        hold_end = self.endpoint.lease_hold_end(report.token)
        if lease or deadline is None or hold_end is None or report.token is None:
            # S1: the guest may have taken these pages back already; refused, not fatal: an
            # honest guest whose report waited behind a slow daemon keeps its session.
            self.counters.lease_refused_batches += 1
            self.counters.lease_refused += total
            self._note("warning", "batch %d refused: %s (if this repeats on an honest "
                       "guest, its channel is slower than the window: raise lease_s)"
                       % (batch, lease), "refusal")
            self._refuse(batch, total, lease, stale=True)
            return None
        revoked = self.revocation(session)
        if revoked:
            self._refuse(batch, total, "session ended: %s" % revoked)
            return None
        decision = self.decision = self.permit()
        if decision.action != PUNCH:
            self._refuse(batch, total, decision.reason)
            return None
        return DiscardJob(self.vm, session, batch, list(ranges), total, self.discard,
                          self._checks(session, report.token, deadline, hold_end))

    def status(self) -> Dict[str, Any]:
        """A JSON-able picture for aeratectl and metrics."""
        c = self.counters
        return {"vm": self.vm, "state": self.state.value, "reclaimer": self.decision.action,
                "reason": self.decision.reason, "granule": self.granule,
                "reported_bytes": c.reported, "discarded_bytes": c.discarded,
                "refused_bytes": c.refused, "batches": c.batches, "sessions": c.sessions,
                "errors": c.errors, "last_error": self.last_error,
                "last_refusal": self.last_refusal,
                "lease": {"lease_s": self.endpoint.lease_s,
                          "refused_batches": c.lease_refused_batches,
                          "refused_bytes": c.lease_refused, "cut_short": c.cut_short,
                          "refused_at_start": c.refused_at_start,
                          "overruns": c.lease_overruns},
                "content_refused_batches": c.content_refused,
                "probes": {"answered": c.probes, "probed_bytes": c.probed,
                           "backed_bytes": c.probe_backed, "unknown": c.probes_unknown,
                           "last_unknown": self.last_probe_unknown},
                "agent": _word(self.hello.get("agent")),
                "proto": self.endpoint.proto,
                "arena": _word(self.hello.get("arena")),
                # What the guest's arena cannot do there (e.g. no pins on Linux < 5.13).
                "arena_weakness": _weakness(self.hello.get("arena_weakness")),
                "capabilities": _capabilities(self.hello.get("capabilities")),
                "guest": {k: v for k, v in self.stats.items()
                          if k not in ("type", "proto", "session")},
                "settings": dict(self.settings)}


_CAP_NAME = re.compile(r"[a-z0-9_]{1,32}")
#: Nesting kept of a guest's stats message: stats -> engine -> counters -> value.
STATS_DEPTH = 4
#: Nesting kept of a hello: hello -> capabilities -> name -> detail.
HELLO_DEPTH = 3


def _word(value: Any) -> Optional[str]:
    """A hello field shown as one short printable string (None when not a string)."""
    return _text(value, 64) if isinstance(value, str) else None


def _weakness(value: Any) -> Optional[str]:
    """The hello's ``arena_weakness``: one printable line, None when there is none."""
    return _text(value) if isinstance(value, str) and value else None


def _text(value: str, limit: int = 300) -> str:
    return "".join(c if c.isprintable() else "?" for c in value[:limit])


def _plain(value: Any, depth: int) -> Any:
    """``value`` cut to ``depth`` levels of nesting, 64 items a level, strings of 300
    printable characters; deeper parts become None. Never raises."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return _text(value)
    if depth <= 0:
        return None
    if isinstance(value, list):
        return [_plain(v, depth - 1) for v in value[:64]]
    if isinstance(value, dict):
        return {_text(str(k), 64): _plain(v, depth - 1) for k, v in list(value.items())[:64]}
    return None


def _capabilities(value: Any) -> Dict[str, Dict[str, Any]]:
    """The guest's capability list as told in its hello, keeping only well-formed entries.

    The guest is not trusted (S5): names must be short identifiers (they reach terminals in
    ``aeratectl status``), details plain strings without control characters, and only the
    first 32 entries count. Nothing here can raise, whatever JSON the guest sent.
    """
    if not isinstance(value, dict):
        return {}
    out: Dict[str, Dict[str, Any]] = {}
    for name, cap in list(value.items())[:32]:
        if not (isinstance(cap, dict) and _CAP_NAME.fullmatch(name)):
            continue
        detail = cap.get("detail")
        detail = detail if isinstance(detail, str) else ""
        out[name] = {"available": cap.get("available") is True,
                     "detail": _text(detail)}
    return out


__all__ = ["Backed", "Discard", "InRam", "Permit", "TokenBucket", "VmSession", "protocol"]
