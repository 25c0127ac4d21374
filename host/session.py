"""One VM's session on the host: protocol, S1 checks, the call to the reclaimer, the ack.

No sockets and no libvirt here: the daemon feeds bytes in and writes ``take_outbox()`` out;
the memory map and the discard function are handed in. That keeps the safety logic (S1, S4,
S5) testable on its own and the daemon a thin loop.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from aerate.agent import protocol
from aerate.agent.protocol import HostEndpoint, HostState, Range
from aerate.host.punch import PunchFailed, PunchRefused
from aerate.host.refusal import PUNCH, Decision

#: Discard ``length`` bytes at guest-physical ``gpa``; returns bytes discarded. Raises
#: PunchRefused (nothing touched), PunchFailed or OSError (host/punch.py).
Discard = Callable[[int, int], int]
#: Is [gpa, gpa+length) wholly inside this VM's RAM? (S1, from the QEMU memory map)
InRam = Callable[[int, int], bool]
#: The reclaimer allowed for this VM *now* (a migration may have started meanwhile).
Permit = Callable[[], Decision]


@dataclass
class Counters:
    """What a session did, for status and metrics (bytes)."""

    reported: int = 0
    discarded: int = 0
    refused: int = 0
    batches: int = 0
    sessions: int = 0
    errors: int = 0


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
                 reports_per_s: float = 50.0, burst: float = 100.0) -> None:
        self.vm = vm
        self.granule = granule
        self.in_ram = in_ram
        self.discard = discard
        self.permit = permit
        self.decision = Decision("refuse", "no batch seen yet")
        self.settings = dict(settings or {})
        self.endpoint = HostEndpoint()
        self.counters = Counters()
        self.bucket = TokenBucket(rate=reports_per_s, burst=burst, tokens=burst)
        # Statistics come every few seconds; a guest sending them much faster is flooding.
        self.stats_bucket = TokenBucket(rate=5.0, burst=20.0, tokens=20.0)
        self.hello: Dict[str, Any] = {}
        self.stats: Dict[str, Any] = {}
        self.last_error = ""
        self.log: List[Tuple[str, str]] = []   # (level, message) for the daemon to emit

    @property
    def state(self) -> HostState:
        """The protocol state of the current connection."""
        return self.endpoint.state

    def _note(self, level: str, msg: str) -> None:
        self.log.append((level, "%s: %s" % (self.vm, msg)))

    def connected(self) -> None:
        """A fresh connection to the guest's port: start a new session with a new nonce.

        Safe by construction (S4): discards run synchronously inside ``receive``, so when
        this is called no discard of the previous session can still be under way.
        """
        session = secrets.randbits(62) + 1
        # The old hello's facts (page poisoning: host/refusal.py) must not outlive their
        # session: until the new hello arrives, nothing the guest said counts.
        self.hello = {}
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
        """Act on bytes from the guest: reports are checked, discarded, acked here."""
        for kind, payload in self.endpoint.receive(data):
            if kind == "hello":
                # Bounded like stats (S5): status, the journal and permit() read it.
                self.hello = _plain(payload, HELLO_DEPTH)
                self._note("info", "session up: agent %s, arena %s"
                           % (_word(self.hello.get("agent")), _word(self.hello.get("arena"))))
            elif kind == "report":
                batch, ranges = payload
                self._report(batch, ranges)
            elif kind == "stats":
                if not self.stats_bucket.take():
                    self._fail("statistics flood (more than %.0f messages/s)"
                               % self.stats_bucket.rate)
                    return
                # Kept as plain JSON of bounded depth and size: status, aeratectl and the
                # metrics scrape read it for every VM, so one guest must not break them (S5).
                self.stats = _plain(payload, STATS_DEPTH)
            elif kind == "need-sync":
                self._note("info", "guest agent asked for a new session (it restarted)")
                self.connected()
            elif kind == "error":
                self._fail("guest broke the protocol: %s" % payload)

    def _fail(self, why: str) -> None:
        # S5: the session ends, nothing of it is discarded; the daemon drops the connection
        # and other VMs carry on.
        self.counters.errors += 1
        self.last_error = why
        self.endpoint.state = HostState.CLOSED
        self.endpoint.pending.clear()
        self._note("warning", why + "; session closed, nothing discarded")

    def _report(self, batch: int, ranges: Sequence[Range]) -> None:
        total = sum(n for _, n in ranges)
        if not self.bucket.take():
            self._fail("report flood (more than %.0f reports/s)" % self.bucket.rate)
            return
        for gpa, length in ranges:
            if not self.in_ram(gpa, length):
                self._fail("batch %d: range [%#x, +%#x) is not inside this VM's RAM"
                           % (batch, gpa, length))
                return
        self.counters.reported += total
        self.counters.batches += 1
        decision = self.decision = self.permit()
        if decision.action != PUNCH:
            self.counters.refused += total
            self.endpoint.ack(batch, discarded=0, refused=total, reason=decision.reason)
            return
        done = 0
        reason = ""
        for gpa, length in ranges:
            try:
                done += self.discard(gpa, length)
            except PunchRefused as e:
                reason = str(e)
                self._note("warning", "batch %d: %s" % (batch, reason))
                break
            except (PunchFailed, OSError) as e:
                # Abandoned for good: the ack below tells the guest nothing more will come.
                reason = "discard failed at [%#x, +%#x): %s" % (gpa, length, e)
                self._note("error", "batch %d: %s" % (batch, reason))
                break
        self.counters.discarded += done
        self.counters.refused += total - done
        self.endpoint.ack(batch, discarded=done, refused=total - done, reason=reason)

    def status(self) -> Dict[str, Any]:
        """A JSON-able picture for aeratectl and metrics."""
        c = self.counters
        return {"vm": self.vm, "state": self.state.value, "reclaimer": self.decision.action,
                "reason": self.decision.reason, "granule": self.granule,
                "reported_bytes": c.reported, "discarded_bytes": c.discarded,
                "refused_bytes": c.refused, "batches": c.batches, "sessions": c.sessions,
                "errors": c.errors, "last_error": self.last_error,
                "agent": _word(self.hello.get("agent")),
                "arena": _word(self.hello.get("arena")),
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


__all__ = ["Discard", "InRam", "Permit", "TokenBucket", "VmSession", "protocol"]
