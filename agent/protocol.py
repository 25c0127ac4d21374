"""The aerate wire protocol, shared by the guest agent and the host daemon.

One module, imported by both ends; it lives on the guest side because the agent must stand
alone (Python 3.8, standard library only). Nothing here does I/O: bytes go in, messages and
bytes come out, so both ends are tested without sockets.

Framing
    Newline-delimited JSON objects, UTF-8, one message per line, at most ``LINE_MAX`` bytes.
    The byte 0xFF never occurs in UTF-8 text, so it serves as a resynchronisation marker (the
    qemu-guest-agent pattern): the host sends 0xFF followed by a ``sync`` carrying a fresh
    nonce after every (re)connect; the guest drops any partial input when it sees 0xFF and
    answers 0xFF + ``hello`` with that nonce; the host discards everything it reads until a
    0xFF-delimited ``hello`` carrying its nonce arrives. Stale bytes from an earlier host
    connection can therefore never be taken for an answer in the current one.

Sessions
    The ``sync`` names a session id chosen by the host. Every later message carries it;
    messages of any other session are stale and are dropped. A host sends a new ``sync`` only
    once no discard of an older session can still happen (S4), which is why a guest may give
    back every batch of an older session when a new session begins (S2).

Leases (S1, S2: no report outlives its pages)
    A report is a claim on guest pages that the guest cannot revoke once written: it may sit
    in the virtqueue, in QEMU, in the daemon's socket buffer or behind a slow call for any
    time. Leases bound that time from both ends with one rule each, and no clock shared:

    - The host stamps a *token* (increasing within a session) on every sync, ack, config and
      ``keepalive`` it sends (every ``KEEPALIVE_SHARE`` of the lease while the guest is busy
      reporting, and at once when a guest asks with ``need-token``), with the lease
      ``lease_ms`` in force for it, and records its send time ``S(t)`` *before* the bytes
      are written. A report carries the newest token the guest holds. The host starts a
      discard of that report (each slice of it, host/punch.py) only while
      ``now < S(t) + HOST_SHARE * lease``; a report with an unknown, expired or missing token
      is refused whole (acked as refused, with the reason), never a protocol error.
    - The guest records the receive time ``R(t)`` of each token it reads and, for any reason
      other than that batch's ack or a new session (agent stop, shutdown, reboot, kexec,
      pressure, a host gone silent), returns a batch's pages only once its own clock says
      ``now >= R(t) + lease``, where ``t`` is the token the batch's report carried.

    Why this holds under any delay. A token is read after it was sent, so ``R(t) >= S(t)``
    in real time, whatever the queues, a paused VM or a stalled daemon do. The guest
    returns pages no earlier than ``R(t) + lease >= S(t) + lease`` and the host starts its
    last slice before ``S(t) + lease/2``: a slice would have to take longer than half the
    lease (1 s by default; one slice is at most host/punch.py's SLICE_BYTES, milliseconds)
    for the two to meet. Clocks: both ends measure only durations, the guest on
    CLOCK_MONOTONIC, the host on CLOCK_BOOTTIME. A guest clock that stops (paused VM, TCG,
    guest suspend) makes the guest wait *longer* in real time: the safe side. A guest clock
    that runs fast (NTP slew, at most 500 ppm) eats 0.05 % of the lease. A host suspend
    stops the host's CLOCK_MONOTONIC while a KVM guest's clock jumps forward on resume;
    CLOCK_BOOTTIME counts the suspend (``boottime``). The residual risk: the daemon process
    stopped for more than half the lease between its deadline check and the entry of that
    one fallocate call; the check is asked again right before each granule's fallocate,
    after host/punch.py's read of that granule, so that is the time between a clock read
    and a syscall's entry (a signal does not stop a punch half-way: a stop that lands
    inside the syscall takes effect after it). host/punch.py re-checks after every slice
    against ``S(t) + HOLD_SHARE * lease`` (``lease_hold_end``), the earliest the guest may
    return the pages with a guest clock up to 10 % fast, and counts a slice that ended later
    as an overrun, an incident; a slice that ends between the window's close and that
    moment used the margin, no more.
    Un-acked pages are therefore held at most ``lease`` after their last token, even when
    the host is gone for good; a report the host reads later is refused by its token age.

    What no guest rule can cover: a reset, kexec, watchdog or crash of the guest hands
    every page to the next kernel at once, inside the lease. The host learns of it through
    libvirt (a reset or the port closing revokes the session before the next slice,
    host/daemon.py), but that event is read on another thread than the report it must
    stop, so a daemon that was stalled can read the stale report first. What closes it
    without any timing: the host discards only what reads as zeroes (host/punch.py). The
    pages an agent reports are zeroes (the guest kernel clears a page it allocates to the
    arena, and the agent never writes one); a page the next boot has written to is not,
    and is not discarded; one it has not written to reads as zeroes after the discard as
    before it. The residue is a write landing between a granule's read and its punch.

Versions
    Each end speaks a range of protocol versions, ``PROTO_MIN`` to ``PROTO``, so host and
    guests need not upgrade in lock-step. The host's sync carries its range (``protos``
    [oldest, newest], ``proto`` its newest); the guest takes the newest version both speak
    and names it in its hello's ``proto`` (with its own ``protos``); the host accepts a
    hello only in a version of its range, and every later message of the session carries
    that version: a message of any other version ends the session. A peer of the
    single-version era (aerate 0.1.0) sends no ``protos``: its range is its ``proto``.
    No common version: the guest answers no hello and reports both ranges; the host ends
    a session whose hello names a version outside its range.

    Which versions are safe to accept: only those whose rules carry the lease argument
    above, on both ends. Protocol 1 has no leases (no tokens, no host window, no guest
    hold): a lease-keeping agent under a protocol-1 host would return pages the host may
    still punch, so ``LEASES_SINCE`` (2) bounds every range from below and no endpoint can
    be built to accept less. A new version N may only add to the rules of N-1 (message
    types or fields sent only in sessions of version >= N; unknown fields are ignored);
    a version that drops or weakens a check of an older one (a window, a hold, a field's
    meaning) raises ``PROTO_MIN`` to N on both ends, so an older peer is refused, never
    misread.

Messages (``type``)
    host -> guest: ``sync`` {nonce, session, granule, settings, token, lease_ms}, ``ack``
    {batch, discarded, refused, reason, token, lease_ms}, ``config`` {settings, token,
    lease_ms}, ``keepalive`` {token, lease_ms}.
    guest -> host: ``hello`` {nonce, agent, capabilities, arena, page_size}, ``report``
    {batch, token, ranges: [[gpa, length], ...]}, ``need-token`` {} (its newest token is too
    old to report under), ``stats`` {...}, and, 0xFF-prefixed and outside
    any session, ``need-sync``: a guest that has no session (it just started, or recovered
    held pages after a crash) asks the host to begin one. The host answers with a new sync
    once no discard of its current session can still happen.
    Since protocol 3 (``PROBE_SINCE``), in sessions of version >= 3 only (see "Probes"):
    guest -> host ``probe`` {id, ranges: [[gpa, length], ...]}; host -> guest ``probed``
    {id, backed: [[gpa, length], ...], token, lease_ms} or {id, unknown: reason, retry?,
    token, lease_ms}. In an older session either is an unknown type.
    Unknown fields are ignored; unknown types and malformed lines end the session (not the
    process).

Probes (issue 15: beliefs the guest cannot check)
    A guest believes the blocks it got back after an ack are free in its kernel and
    discarded on the host ("aerated", agent/cycle.py) until their buddy flag says the
    kernel took them; a block allocated, written and freed again between two looks keeps
    its flag and its belief while the host backs it again. Only the host can tell: a
    ``probe`` names up to ``PROBE_MAX_RANGES`` ranges, one granule each, not coalesced
    (checked as a report's are: granule-aligned, disjoint, inside the VM's RAM on the
    host) and the ``probed`` answer with the same ``id`` lists, in ``backed``, every
    probed range that has at least one backed byte on the host (an empty list: none has),
    or says ``unknown`` with the reason (private RAM, a
    backing whose holes the host cannot see or read without waiting, no map yet, ``rate``:
    more than the host answers per second); ``retry`` true when a later probe may get an
    answer (``rate``, a map being rebuilt), absent when this host never will for this VM.

    Why this cannot break S1. A probe carries no lease token and asks for nothing to be
    discarded; the host answers it without ever discarding, and nothing of a probe reaches
    a discard path. The answer changes only the guest's beliefs about blocks it no longer
    holds: a range said to be backed makes its blocks count as raw free memory, which the
    next pass may take and report like any other (under a lease, S1/S2 unchanged); a wrong
    answer, either way, costs a reclaim missed or one done twice, never the discard of a
    page the guest uses. The ``probed`` answer carries a token like every host message: it
    is as good for a report as a keepalive's.
"""

from __future__ import annotations

import enum
import json
import re
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

#: Protocol 2 added leases. A protocol-1 host never checks a token, so a lease-keeping
#: agent must not talk to it (it would return pages the old host may still punch).
LEASES_SINCE = 2
#: Protocol 3 added probes ("Probes" in the module docstring): ``probe`` and ``probed`` are
#: sent only in sessions of version >= PROBE_SINCE.
PROBE_SINCE = 3
#: Most ranges one probe names (each is one granule the guest asks about; the host's cost
#: per probe is bounded by it, host/probe.py).
PROBE_MAX_RANGES = 128
#: The versions this build speaks, oldest and newest ("Versions" in the module docstring).
PROTO_MIN = LEASES_SINCE
PROTO = PROBE_SINCE
#: The virtio-serial port name both ends use.
PORT_NAME = "org.aerate.agent.0"
#: Longest line either side accepts, newline included. A report of ``MAX_RANGES`` ranges fits.
LINE_MAX = 64 * 1024
#: Most ranges one report may carry.
MAX_RANGES = 1024
#: Most batches a guest may have reported and not yet seen acked.
MAX_INFLIGHT = 4
SYNC_BYTE = b"\xff"
#: The first byte after a run of newlines (LineReader).
_NOT_NEWLINE = re.compile(b"[^\n]")
PAGE_SIZE = 4096
#: Bounds of a lease either side accepts (milliseconds); the settings table's ``lease_s``
#: row has the same range.
LEASE_MS_MIN = 500
LEASE_MS_MAX = 60_000
#: The host starts no discard later than this share of the lease after sending the token.
HOST_SHARE = 0.5
#: Of a lease, what the host counts the guest's hold as when it judges a slice that already
#: ran (``lease_hold_end``): short of the whole lease by a guest clock running fast (the
#: kernel's NTP slew alone is 500 ppm, but chrony slews CLOCK_MONOTONIC up to 83,333 ppm by
#: default after a pause or a migration; 10 % is left).
HOLD_SHARE = 0.9
#: The host sends a keepalive token this often (share of the lease); a guest whose newest
#: token is older than ``FRESH_SHARE`` of the lease waits for the next one before reporting,
#: so an honest report reaches the host with plenty of its window left.
KEEPALIVE_SHARE = 0.25
FRESH_SHARE = 0.3
#: After a report or a need-token the host keeps sending keepalives for this long (seconds),
#: so a pass runs without asking; an idle guest costs the host no keepalive at all.
BUSY_S = 10.0
#: Most tokens the host remembers per session (older ones count as expired: safe side).
MAX_TOKENS = 4096

Range = Tuple[int, int]


class ProtocolError(Exception):
    """The peer broke the protocol; the session ends, the process carries on."""


# --------------------------------------------------------------------------- framing


class LineReader:
    """Split a byte stream into lines and 0xFF markers, with a hard cap on line length.

    ``feed`` returns, in stream order, ``None`` for the markers before a line (the partial
    line before a marker is dropped; the markers between two newlines count once: both
    ends treat a marker as "forget what came before", so two mean what one means),
    ``bytes`` for every complete line (without its newline; of a run of blank lines only
    the first is returned, both ends skip blank lines), and a ``ProtocolError`` for every
    line that grew past ``limit``; the rest of such a line is skipped up to its newline or
    the next marker, so a flood cannot grow memory.

    Cost is linear in the bytes fed (S5: a guest's input is parsed on the daemon's loop
    thread): where the next newline and the next marker are is remembered and looked up
    again only once the reader has passed it, so each ``find`` scans bytes no earlier
    ``find`` for the same byte scanned, the markers before a newline are crossed with one
    ``rfind`` and a run of newlines with one scan (``_skip_run``), and the Python work is
    one step per line. The reader
    before this one looked for the next newline again after every marker: quadratic in a
    run of 0xFF.
    """

    def __init__(self, limit: int = LINE_MAX) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> List[Union[bytes, ProtocolError, None]]:
        """Consume ``data``; return lines, markers and over-long-line errors in order."""
        out: List[Union[bytes, ProtocolError, None]] = []
        start, n = 0, len(data)
        nl = ff = -2  # where the next newline / marker is; -2: not looked up, -1: none
        while start < n:
            if -1 != nl < start:
                nl = data.find(b"\n", start)
            if -1 != ff < start:
                ff = data.find(SYNC_BYTE, start)
            if ff != -1 and (nl == -1 or ff < nl):
                # Every marker up to the next newline counts as one: what lies between
                # them is a partial line, dropped unread. Go on after the last one.
                self.reset()
                out.append(None)
                start = data.rfind(SYNC_BYTE, ff, nl if nl != -1 else n) + 1
                continue
            end = nl if nl != -1 else n
            if not self._skipping:
                self._buf += data[start:end]
                if len(self._buf) >= self.limit:
                    self._buf.clear()
                    self._skipping = True
                    out.append(ProtocolError("line longer than %d bytes" % self.limit))
            if nl == -1:
                break
            if self._skipping:
                self._skipping = False
                start = nl + 1  # a blank line after it still counts (a marker's line)
            else:
                out.append(bytes(self._buf))
                self._buf.clear()
                start = _skip_run(data, nl)
        return out

    def reset(self) -> None:
        """Forget buffered input (a marker, or a new connection)."""
        self._buf.clear()
        self._skipping = False


def _skip_run(data: bytes, at: int) -> int:
    """Where the run of newlines starting at ``at`` ends (one C-level scan)."""
    if data[at + 1:at + 2] != b"\n":
        return at + 1  # the common case, a single newline: no regex call
    m = _NOT_NEWLINE.search(data, at + 1)
    return m.start() if m is not None else len(data)


def encode(msg: Dict[str, Any], sync: bool = False, proto: int = PROTO) -> bytes:
    """Encode one message of protocol version ``proto`` as a line (0xFF first when
    ``sync``)."""
    body = dict(msg)
    body.setdefault("proto", proto)
    line = json.dumps(body, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    if len(line) > LINE_MAX:
        raise ValueError("message of type %r is %d bytes, over the %d-byte line cap"
                         % (msg.get("type"), len(line), LINE_MAX))
    return SYNC_BYTE + line if sync else line


def decode(line: bytes, proto: Optional[int] = PROTO) -> Dict[str, Any]:
    """Decode one line into a message dict with a string ``type`` and version ``proto``
    (None: any integer version, for the messages that negotiate one)."""
    try:
        msg = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("malformed line (%s): %r" % (e, line[:80])) from e
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object, got %s" % type(msg).__name__)
    t = msg.get("type")
    if not isinstance(t, str):
        raise ProtocolError("message without a string 'type'")
    got = msg.get("proto")
    if proto is None:
        if not isinstance(got, int) or isinstance(got, bool) or got < 1:
            raise ProtocolError("%s message: 'proto' must be a positive integer, got %r"
                                % (t, got))
    elif got != proto:
        raise ProtocolError("peer speaks protocol %r, this session speaks %d" % (got, proto))
    return msg


Versions = Tuple[int, int]


def check_range(protos: Versions) -> Versions:
    """``protos`` as an endpoint's own range; ValueError below ``LEASES_SINCE``."""
    lo, hi = protos
    if not LEASES_SINCE <= lo <= hi:
        raise ValueError("protocol range %d..%d: an endpoint speaks versions >= %d only "
                         "(protocol 1 has no leases)" % (lo, hi, LEASES_SINCE))
    return lo, hi


def peer_range(msg: Dict[str, Any]) -> Versions:
    """The range a sync, hello or need-sync announces (``protos``, else its ``proto``)."""
    raw = msg.get("protos")
    if raw is None:
        return msg["proto"], msg["proto"]
    if (not isinstance(raw, list) or len(raw) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw)
            or not 1 <= raw[0] <= raw[1]):
        raise ProtocolError("%s message: 'protos' must be [oldest, newest] versions, got %r"
                            % (msg.get("type"), raw))
    return raw[0], raw[1]


def choose_version(ours: Versions, theirs: Versions) -> int:
    """The newest version in both ranges; ProtocolError naming both when there is none."""
    lo, hi = max(ours[0], theirs[0]), min(ours[1], theirs[1])
    if lo > hi:
        raise ProtocolError("no protocol version in common: the peer speaks %d..%d, this "
                            "side %d..%d" % (theirs + ours))
    return hi


def _int(msg: Dict[str, Any], key: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    v = msg.get(key)
    # bool is an int in Python; a JSON true is not a number here.
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError("%s message: field %r must be an integer in [%d, %d], got %r"
                            % (msg.get("type"), key, lo, hi, v))
    return v


def validate_ranges(raw: Any, granule: int, what: str = "report",
                    empty: bool = False) -> List[Range]:
    """Check a report's (or probe's, ``what``) ranges: well-formed, granule-aligned, in
    order, disjoint, bounded; ``empty``: an empty list is allowed (a probe's answer).

    Returns the ranges as ``(gpa, length)`` tuples sorted by address. Whether they lie in the
    VM's RAM is for the host's memory map to decide (S1); this is the schema part (S5).
    """
    if isinstance(raw, list) and not raw and empty:
        return []
    if not isinstance(raw, list) or not raw:
        raise ProtocolError("%s: 'ranges' must be a non-empty list" % what)
    if len(raw) > MAX_RANGES:
        raise ProtocolError("%s: %d ranges, more than the %d allowed"
                            % (what, len(raw), MAX_RANGES))
    out: List[Range] = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            raise ProtocolError("%s: each range must be [gpa, length] integers, got %r"
                                % (what, item))
        gpa, length = item
        if gpa < 0 or length <= 0 or gpa + length > 2**64:
            raise ProtocolError("%s: range [%#x, +%#x) is out of bounds"
                                % (what, gpa, length))
        if gpa % granule or length % granule:
            raise ProtocolError("%s: range [%#x, +%#x) is not aligned to the %d-byte "
                                "granule" % (what, gpa, length, granule))
        out.append((gpa, length))
    out.sort()
    for (a, alen), (b, _) in zip(out, out[1:]):
        if a + alen > b:
            raise ProtocolError("%s: ranges overlap at %#x" % (what, b))
    return out


def coalesce(ranges: List[Range]) -> List[Range]:
    """Merge adjacent ``(gpa, length)`` ranges (input in any order, disjoint)."""
    out: List[Range] = []
    for gpa, length in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == gpa:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((gpa, length))
    return out


# --------------------------------------------------------------------------- guest end


class GuestState(enum.Enum):
    """Where the guest end stands with its host."""

    IDLE = "idle"          # no session: waiting for a 0xFF + sync
    RUNNING = "running"    # a session is established


Clock = Callable[[], float]


class Token(NamedTuple):
    """The newest lease token a guest holds: its number, when it was read, its lease."""

    token: int
    received: float
    lease_s: float


class InFlight(NamedTuple):
    """A reported batch the guest still holds, and the lease its report carried."""

    session: int
    token: int
    received: float
    lease_s: float

    @property
    def release_at(self) -> float:
        """When the lease rule lets the guest return this batch without an ack (guest clock)."""
        return self.received + self.lease_s


class Probed(NamedTuple):
    """A host's answer to a probe ("Probes" in the module docstring): ``backed`` holds the
    probed ranges with a backed byte, None when the host could not tell (``unknown`` says
    why, ``retry`` whether asking again later may help)."""

    id: int
    backed: Optional[List[Range]]
    unknown: str
    retry: bool = False


def _lease_fields(msg: Dict[str, Any]) -> Tuple[int, float]:
    token = _int(msg, "token", 1)
    lease_ms = _int(msg, "lease_ms", LEASE_MS_MIN, LEASE_MS_MAX)
    return token, lease_ms / 1000.0


class GuestEndpoint:
    """The guest's end of the channel, as a socket-free state machine.

    ``receive(data, now)`` returns the events the agent must act on, as ``(kind, payload)``
    pairs:

    - ``("session", sync_msg)`` a new session began; ``reply`` holds the hello to send.
      Every batch still in flight from before is released in the same call (S2).
    - ``("release", (batch_id, discarded, refused))`` the host is done with that batch: its
      pages may be returned. A batch dropped by a new session comes with (0, 0): nothing is
      known to be discarded, so nothing is counted as aerated.
    - ``("config", settings)`` the host changed live settings.
    - ``("probed", Probed)`` the host's answer to a ``probe`` of this session.
    - ``("error", reason)`` the host broke the protocol; the session ended (batches stay held).

    ``expire(now)`` returns the same ``release`` events, (0, 0), for batches whose lease ran
    out (module docstring, "Leases"): the only way un-acked pages go back without the host.
    ``now`` is the guest's CLOCK_MONOTONIC when the bytes were read (default: the clock).
    Outgoing bytes accumulate in ``outbox``; the caller writes them to the port.
    """

    def __init__(self, hello: Dict[str, Any], clock: Optional[Clock] = None,
                 protos: Versions = (PROTO_MIN, PROTO)) -> None:
        self.state = GuestState.IDLE
        self.protos = check_range(protos)
        #: the version of the current session (the newest this side speaks before one)
        self.proto = self.protos[1]
        self.session: Optional[int] = None
        self.granule = 2 * 1024 * 1024
        self.clock: Clock = clock or time.monotonic
        self._hello = dict(hello)
        self._reader = LineReader()
        # True once a marker was seen since the last error or disconnect: a sync may follow.
        self._after_marker = False
        self._next_batch = 1
        self._next_probe = 1
        #: the newest token of the current session, None before the first sync
        self.token: Optional[Token] = None
        # batch id -> (session, lease); released on that session's ack, a newer session,
        # or once the lease ran out.
        self.inflight: Dict[int, InFlight] = {}
        self.outbox = bytearray()

    # -- outgoing

    def token_fresh(self, now: Optional[float] = None) -> bool:
        """True when the newest token is young enough for the host to accept a report."""
        t = self.token
        now = self.clock() if now is None else now
        return t is not None and now - t.received < FRESH_SHARE * t.lease_s

    def can_report(self, now: Optional[float] = None) -> bool:
        """True when a session is up, the window has room and the newest token is fresh."""
        return (self.state is GuestState.RUNNING and len(self.inflight) < MAX_INFLIGHT
                and self.token_fresh(now))

    def report(self, ranges: List[Range], now: Optional[float] = None) -> int:
        """Queue a report of ``ranges`` under the newest token; return its batch id."""
        if not self.can_report(now):
            raise RuntimeError("report needs a running session, room in the window and a "
                               "fresh lease token")
        assert self.session is not None and self.token is not None
        batch = self._next_batch
        self._next_batch += 1
        t = self.token
        self.outbox += encode({"type": "report", "session": self.session, "batch": batch,
                               "token": t.token,
                               "ranges": [list(r) for r in coalesce(ranges)]}, proto=self.proto)
        self.inflight[batch] = InFlight(self.session, t.token, t.received, t.lease_s)
        return batch

    def can_probe(self) -> bool:
        """True when a session is up whose version has probes (``PROBE_SINCE``)."""
        return self.state is GuestState.RUNNING and self.proto >= PROBE_SINCE

    def probe(self, ranges: List[Range]) -> int:
        """Queue a probe of ``ranges`` (at most ``PROBE_MAX_RANGES``, disjoint);
        return its id. It carries no token and holds nothing: no batch, no lease."""
        if not self.can_probe():
            raise RuntimeError("a probe needs a running session of protocol >= %d"
                               % PROBE_SINCE)
        # Sent as given, not coalesced: the host answers range by range, and a range that
        # spanned two of the host's RAM blocks (NUMA nodes) would not be inside one of them.
        asked = sorted(ranges)
        if not asked or len(asked) > PROBE_MAX_RANGES:
            raise ValueError("a probe names 1 to %d ranges, not %d"
                             % (PROBE_MAX_RANGES, len(asked)))
        if any(a + n > b for (a, n), (b, _) in zip(asked, asked[1:])):
            raise ValueError("a probe's ranges must not overlap")
        pid = self._next_probe
        self._next_probe += 1
        self.outbox += encode({"type": "probe", "session": self.session, "id": pid,
                               "ranges": [list(r) for r in asked]}, proto=self.proto)
        return pid

    def expire(self, now: Optional[float] = None) -> List[Tuple[str, Any]]:
        """Release events for in-flight batches whose lease has run out (S2's lease rule)."""
        now = self.clock() if now is None else now
        events: List[Tuple[str, Any]] = []
        for batch, f in sorted(self.inflight.items()):
            if now >= f.release_at:
                del self.inflight[batch]
                events.append(("release", (batch, 0, 0)))
        return events

    def next_expiry(self) -> Optional[float]:
        """The earliest time ``expire`` will release something, or None."""
        return min((f.release_at for f in self.inflight.values()), default=None)

    def request_token(self) -> None:
        """Ask the host for a fresh lease token (the newest one is too old to report)."""
        if self.state is GuestState.RUNNING:
            self.outbox += encode({"type": "need-token", "session": self.session},
                                  proto=self.proto)

    def request_sync(self) -> None:
        """Ask the host for a session (sent while IDLE; harmless if nobody listens)."""
        self.outbox += encode(dict(self._hello, type="need-sync", protos=list(self.protos)),
                              sync=True, proto=self.protos[1])

    def send(self, msg: Dict[str, Any]) -> None:
        """Queue a session-scoped message (stats); dropped when no session is up."""
        if self.state is GuestState.RUNNING:
            body = dict(msg)
            body["session"] = self.session
            self.outbox += encode(body, proto=self.proto)

    def take_outbox(self) -> bytes:
        """Return and clear the bytes waiting to be written."""
        data = bytes(self.outbox)
        self.outbox.clear()
        return data

    def disconnected(self) -> None:
        """The host went away (HUP). In-flight batches stay held until ack, a new sync or
        the end of their lease."""
        self.state = GuestState.IDLE
        self._after_marker = False
        self._reader.reset()

    # -- incoming

    def receive(self, data: bytes, now: Optional[float] = None) -> List[Tuple[str, Any]]:
        """Feed bytes from the host, read at ``now``; return the events to act on."""
        now = self.clock() if now is None else now
        events: List[Tuple[str, Any]] = []
        for item in self._reader.feed(data):
            if item is None:
                # A marker: what follows is a new sync; until it arrives nothing counts.
                self.state = GuestState.IDLE
                self._after_marker = True
                continue
            if self.state is GuestState.IDLE and not self._after_marker:
                continue  # after an error, skip everything up to the next marker
            try:
                if isinstance(item, ProtocolError):
                    raise item
                if item.strip():
                    self._handle(decode(item, None), events, now)
            except ProtocolError as e:
                self.state = GuestState.IDLE
                self._after_marker = False
                events.append(("error", str(e)))
        return events

    def _take_token(self, msg: Dict[str, Any], now: float) -> None:
        token, lease_s = _lease_fields(msg)
        if self.token is None or token > self.token.token:
            self.token = Token(token, now, lease_s)

    def _handle(self, msg: Dict[str, Any], events: List[Tuple[str, Any]], now: float) -> None:
        t = msg["type"]
        if t == "sync":
            proto = choose_version(self.protos, peer_range(msg))
            session = _int(msg, "session", 1)
            nonce = _int(msg, "nonce")
            granule = _int(msg, "granule", PAGE_SIZE, 1 << 40)
            if granule & (granule - 1):
                raise ProtocolError("sync: granule %d is not a power of two" % granule)
            token, lease_s = _lease_fields(msg)
            # S2: a new session means the host dropped every older batch.
            for batch, f in sorted(self.inflight.items()):
                if f.session != session:
                    del self.inflight[batch]
                    events.append(("release", (batch, 0, 0)))
            self.state = GuestState.RUNNING
            self.session = session
            self.proto = proto
            self.granule = granule
            self.token = Token(token, now, lease_s)
            hello = dict(self._hello, type="hello", nonce=nonce, session=session,
                         protos=list(self.protos))
            self.outbox += encode(hello, sync=True, proto=proto)
            events.append(("session", msg))
            settings = msg.get("settings")
            if isinstance(settings, dict):
                events.append(("config", settings))
            return
        if self.state is not GuestState.RUNNING or msg.get("session") != self.session:
            return  # stale: an older session's message, or one before our sync answer
        if msg["proto"] != self.proto:
            raise ProtocolError("host sent protocol %r in a session of protocol %d"
                                % (msg["proto"], self.proto))
        self._take_token(msg, now)
        if t == "ack":
            batch = _int(msg, "batch", 1)
            held = self.inflight.get(batch)
            if held is None or held.session != self.session:
                if batch < self._next_batch:
                    return  # a late ack of a batch whose lease ran out: already returned
                raise ProtocolError("ack for batch %d, which was never reported" % batch)
            del self.inflight[batch]
            discarded = _int(msg, "discarded")
            refused = _int(msg, "refused")
            if msg.get("stale") is True and not discarded:
                # Refused only because the report's token was too old when the host read
                # it: not the host's policy, so no back-off; the next report asks for a
                # fresh token.
                refused = 0
            events.append(("release", (batch, discarded, refused)))
        elif t == "keepalive":
            pass
        elif t == "config":
            settings = msg.get("settings")
            if not isinstance(settings, dict):
                raise ProtocolError("config: 'settings' must be an object")
            events.append(("config", settings))
        elif t == "probed" and self.proto >= PROBE_SINCE:
            pid = _int(msg, "id", 1)
            if pid >= self._next_probe:
                raise ProtocolError("probed: answer to probe %d, which was never sent" % pid)
            unknown = msg.get("unknown")
            if unknown is not None:
                if not isinstance(unknown, str):
                    raise ProtocolError("probed: 'unknown' must be a string")
                events.append(("probed", Probed(pid, None, unknown[:512] or "unknown",
                                                msg.get("retry") is True)))
            else:
                backed = validate_ranges(msg.get("backed"), self.granule, "probed",
                                         empty=True)
                events.append(("probed", Probed(pid, backed, "")))
        else:
            raise ProtocolError("unknown message type %r from host" % t)


# --------------------------------------------------------------------------- host end


class HostState(enum.Enum):
    """Where the host end stands with one guest."""

    IDLE = "idle"            # not connected
    SYNCING = "syncing"      # sync sent, discarding input until the guest's answer
    RUNNING = "running"      # session established
    CLOSED = "closed"        # the guest broke the protocol; reconnect to start again


class Report(NamedTuple):
    """A report as the host received it: the lease token is checked by the caller."""

    batch: int
    ranges: List[Range]
    token: Optional[int]


class Probe(NamedTuple):
    """A probe as the host received it (schema-checked; RAM is the caller's check)."""

    id: int
    ranges: List[Range]


def boottime() -> float:
    """The host's lease clock: CLOCK_BOOTTIME, which goes on while the host is suspended.

    CLOCK_MONOTONIC stops during a host suspend while a KVM guest's kvm-clock (derived from
    the host's boot-based time) jumps forward on resume: a host window measured on the
    monotonic clock would still be open when the guest's lease, rightly, has run out.
    Boot time never advances more slowly than the monotonic clock, so it can only close the
    host's window earlier: the safe side."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def deadline_problem(token: int, deadline: float, now: float) -> str:
    """Why no discard under ``token`` may start at ``now`` given its ``deadline``, or ""."""
    if now < deadline:
        return ""
    return ("lease token %d expired: its window closed %.2f s ago (the host serves a report "
            "only within half of lease_s after sending its token)" % (token, now - deadline))


def hold_problem(token: int, hold_end: float, now: float) -> str:
    """Why a slice of a report under ``token`` that ended at ``now`` may have run after the
    guest took its pages back (``hold_end``: HostEndpoint.lease_hold_end), or ""."""
    if now < hold_end:
        return ""
    return ("lease token %d: the slice ended %.2f s after the guest may have taken the "
            "pages back" % (token, now - hold_end))


class HostEndpoint:
    """The host's end of one guest's channel, as a socket-free state machine.

    ``start(nonce, session, granule, settings)`` queues the sync; ``receive(data)`` returns
    ``(kind, payload)`` events: ``("hello", msg)``, ``("report", Report)``,
    ``("stats", msg)``, ``("probe", Probe)`` (sessions of version >= ``PROBE_SINCE``;
    answer with ``probed``), ``("need-sync", msg)`` (the guest lost its session: finish or abandon
    in-flight discards, then ``start`` again), ``("error", reason)``. After an error the
    state is CLOSED and no more events come until ``start`` is called again on a fresh
    connection.

    Every message the host queues carries a fresh lease token whose send time is recorded
    when it is queued, which is before it can be written: the safe side of the lease
    argument (module docstring). ``lease_deadline(token)`` is the moment after which no
    discard of a report carrying that token may start.
    """

    def __init__(self, max_ranges: int = MAX_RANGES, clock: Optional[Clock] = None,
                 lease_s: float = 2.0, protos: Versions = (PROTO_MIN, PROTO)) -> None:
        self.state = HostState.IDLE
        self.protos = check_range(protos)
        #: the version of the current session (set by the guest's hello)
        self.proto = self.protos[1]
        self.session = 0
        self.nonce = 0
        self.granule = 2 * 1024 * 1024
        self.max_ranges = max_ranges
        self.clock: Clock = clock or boottime
        self.lease_s = lease_s
        self._reader = LineReader()
        self._seen_marker = False
        self._last_batch = 0
        self._next_token = 1
        #: token -> (send time, lease in force for it); only tokens still inside their window
        self._tokens: Dict[int, Tuple[float, float]] = {}
        #: when the newest token was queued (the keepalive timer runs from it)
        self.last_stamp = float("-inf")
        #: keepalives are due until then (a report or need-token extends it)
        self.busy_until = float("-inf")
        #: batches reported and not yet acked, id -> ranges
        self.pending: Dict[int, List[Range]] = {}
        self.outbox = bytearray()

    # -- leases

    def set_lease(self, lease_s: float) -> None:
        """Use ``lease_s`` for tokens sent from now on (earlier ones keep theirs)."""
        if not LEASE_MS_MIN <= lease_s * 1000 <= LEASE_MS_MAX:
            raise ValueError("lease %.3f s is outside [%.1f, %.1f] s"
                             % (lease_s, LEASE_MS_MIN / 1000, LEASE_MS_MAX / 1000))
        self.lease_s = lease_s

    def _stamp(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        now = self.clock()
        token = self._next_token
        self._next_token += 1
        lease_ms = round(self.lease_s * 1000)
        # Forget the oldest tokens once their window closed (they are in send order), and
        # any beyond MAX_TOKENS: a forgotten token is refused like an expired one.
        while self._tokens:
            first = next(iter(self._tokens))
            sent, lease_s = self._tokens[first]
            if now < sent + HOST_SHARE * lease_s and len(self._tokens) < MAX_TOKENS:
                break
            del self._tokens[first]
        self._tokens[token] = (now, lease_ms / 1000.0)
        self.last_stamp = now
        msg["token"], msg["lease_ms"] = token, lease_ms
        return msg

    def lease_hold_end(self, token: Optional[int]) -> Optional[float]:
        """The earliest moment (host clock) the guest may return the pages of a report
        carrying ``token`` without an ack: its send time plus the lease (the guest waits a
        lease from its *receive* time, which is later), less a fast guest clock's share
        (``HOLD_SHARE``). A slice that ends before this ran while the guest still held the
        pages, even if it ended after ``lease_deadline``."""
        return self._after_send(token, HOLD_SHARE)

    def lease_deadline(self, token: Optional[int]) -> Optional[float]:
        """No discard of a report carrying ``token`` may start at or after this (host
        clock); None for a token this session never sent or has forgotten."""
        return self._after_send(token, HOST_SHARE)

    def _after_send(self, token: Optional[int], share: float) -> Optional[float]:
        """``share`` of its lease after ``token`` was sent (host clock), or None for a token
        this session never sent or has forgotten."""
        entry = self._tokens.get(token) if token is not None else None
        if entry is None:
            return None
        sent, lease_s = entry
        return sent + share * lease_s

    def lease_problem(self, token: Optional[int], now: Optional[float] = None) -> str:
        """Why a report carrying ``token`` must be refused now, or "" when it may be served."""
        if token is None:
            return "the report carries no lease token"
        deadline = self.lease_deadline(token)
        if deadline is None:
            if token >= self._next_token:
                return "lease token %d was never sent in this session" % token
            return "lease token %d expired (older than this session's window)" % token
        return deadline_problem(token, deadline, self.clock() if now is None else now)

    def close(self) -> None:
        """The guest broke the protocol: no more events until ``start`` on a new connection;
        every pending batch is forgotten (none of it will be discarded)."""
        self.state = HostState.CLOSED
        self.pending.clear()

    def keepalive_due(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds until the next keepalive is due (<= 0: now), or None while the guest is
        idle (no report or need-token for ``BUSY_S``): an idle guest gets none."""
        now = self.clock() if now is None else now
        if self.state is not HostState.RUNNING or now >= self.busy_until:
            return None
        return self.last_stamp + KEEPALIVE_SHARE * self.lease_s - now

    def keepalive(self) -> None:
        """Queue a keepalive: a fresh token, so the guest can keep reporting."""
        if self.state is HostState.RUNNING:
            self.outbox += encode(self._stamp({"type": "keepalive", "session": self.session}),
                                  proto=self.proto)

    # -- session

    def start(self, nonce: int, session: int, granule: int,
              settings: Optional[Dict[str, Any]] = None) -> None:
        """Begin a new session on a fresh connection: queue 0xFF + sync.

        The caller guarantees no discard of an older session is still under way (S4).
        """
        self._reader.reset()
        self.state = HostState.SYNCING
        self.session, self.nonce, self.granule = session, nonce, granule
        self._seen_marker = False
        self._last_batch = 0
        self._tokens = {}
        self.busy_until = float("-inf")
        self.pending.clear()
        self.proto = self.protos[1]
        msg: Dict[str, Any] = {"type": "sync", "nonce": nonce, "session": session,
                               "granule": granule, "protos": list(self.protos)}
        if settings:
            msg["settings"] = settings
        self.outbox += encode(self._stamp(msg), sync=True, proto=self.proto)

    def ack(self, batch: int, discarded: int, refused: int = 0, reason: str = "",
            stale: bool = False) -> None:
        """Queue the ack of a batch; the guest may then return its pages. ``stale``: it was
        refused for its lease token alone (the guest asks for a fresh one, no back-off).

        Call only after every discard of the batch finished or was abandoned for good (S4).
        """
        if batch not in self.pending:
            raise KeyError("batch %d is not pending in session %d" % (batch, self.session))
        del self.pending[batch]
        msg: Dict[str, Any] = {"type": "ack", "session": self.session, "batch": batch,
                               "discarded": discarded, "refused": refused}
        if reason:
            msg["reason"] = reason[:512]
        if stale:
            msg["stale"] = True
        self.outbox += encode(self._stamp(msg), proto=self.proto)

    def probed(self, pid: int, backed: Optional[List[Range]] = None,
               unknown: str = "", retry: bool = False) -> None:
        """Queue the answer to probe ``pid``: the probed ranges with a backed byte, or
        ``unknown`` with the reason (``backed`` None) and whether a later probe may get an
        answer (``retry``). Only in a session that has probes."""
        if self.state is not HostState.RUNNING or self.proto < PROBE_SINCE:
            return
        msg: Dict[str, Any] = {"type": "probed", "session": self.session, "id": pid}
        if backed is None:
            msg["unknown"] = (unknown or "unknown")[:512]
            if retry:
                msg["retry"] = True
        else:
            msg["backed"] = [list(r) for r in backed]
        self.outbox += encode(self._stamp(msg), proto=self.proto)

    def configure(self, settings: Dict[str, Any]) -> None:
        """Queue a live settings change for the guest."""
        if self.state is HostState.RUNNING:
            self.outbox += encode(self._stamp({"type": "config", "session": self.session,
                                               "settings": settings}), proto=self.proto)

    def take_outbox(self) -> bytes:
        """Return and clear the bytes waiting to be written."""
        data = bytes(self.outbox)
        self.outbox.clear()
        return data

    def receive(self, data: bytes) -> List[Tuple[str, Any]]:
        """Feed bytes from the guest; return events (see the class docstring)."""
        events: List[Tuple[str, Any]] = []
        for item in self._reader.feed(data):
            if self.state in (HostState.IDLE, HostState.CLOSED):
                break
            if item is None:
                self._seen_marker = True
                continue
            try:
                if isinstance(item, ProtocolError):
                    if self.state is HostState.SYNCING:
                        continue  # junk before the guest's answer is skipped, not fatal
                    raise item
                if self.state is HostState.SYNCING:
                    if not self._seen_marker:
                        continue  # stale output from before our sync
                    self._seen_marker = False
                    msg = self._try_decode(item)
                    if (msg is not None and msg["type"] == "hello"
                            and msg.get("nonce") == self.nonce
                            and msg.get("session") == self.session):
                        if not self.protos[0] <= msg["proto"] <= self.protos[1]:
                            raise ProtocolError(
                                "the guest's hello speaks protocol %d, this host %d..%d"
                                % (msg["proto"], self.protos[0], self.protos[1]))
                        self.proto = msg["proto"]
                        self.state = HostState.RUNNING
                        events.append(("hello", msg))
                    continue
                if not item.strip():
                    continue
                msg = decode(item, None)
                if msg["type"] == "need-sync":
                    events.append(("need-sync", msg))
                    continue
                if msg.get("session") != self.session:
                    continue  # an older session's line, still in the pipe
                if msg["proto"] != self.proto:
                    raise ProtocolError("guest sent protocol %r in a session of protocol %d"
                                        % (msg["proto"], self.proto))
                self._handle(msg, events)
            except ProtocolError as e:
                self.close()
                events.append(("error", str(e)))
        return events

    @staticmethod
    def _try_decode(line: bytes) -> Optional[Dict[str, Any]]:
        # While syncing, junk is expected (an old session's tail); it is skipped, not fatal.
        try:
            return decode(line, None)
        except ProtocolError:
            return None

    def _handle(self, msg: Dict[str, Any], events: List[Tuple[str, Any]]) -> None:
        t = msg["type"]
        if t == "report":
            batch = _int(msg, "batch", 1)
            if batch <= self._last_batch:
                raise ProtocolError("report: batch %d replayed or out of order (last was %d)"
                                    % (batch, self._last_batch))
            if len(self.pending) >= MAX_INFLIGHT:
                raise ProtocolError("report: more than %d batches in flight" % MAX_INFLIGHT)
            ranges = validate_ranges(msg.get("ranges"), self.granule)
            if len(ranges) > self.max_ranges:
                raise ProtocolError("report: %d ranges, over this host's cap of %d"
                                    % (len(ranges), self.max_ranges))
            raw_token = msg.get("token")
            # A missing or ill-typed token is refused by the caller (lease_problem), not
            # fatal: the batch is acked as refused and the guest keeps its session.
            token = raw_token if (isinstance(raw_token, int)
                                  and not isinstance(raw_token, bool)) else None
            self._last_batch = batch
            self.pending[batch] = ranges
            self.busy_until = self.clock() + BUSY_S
            events.append(("report", Report(batch, ranges, token)))
        elif t == "need-token":
            # Answered at once, at most once per keepalive period: a flood of asks costs
            # one keepalive a period, not one per line.
            now = self.clock()
            self.busy_until = now + BUSY_S
            if now - self.last_stamp >= KEEPALIVE_SHARE * self.lease_s / 4:
                self.keepalive()
        elif t == "probe" and self.proto >= PROBE_SINCE:
            ranges = validate_ranges(msg.get("ranges"), self.granule, "probe")
            cap = min(self.max_ranges, PROBE_MAX_RANGES)
            if len(ranges) > cap:
                raise ProtocolError("probe: %d ranges, over the cap of %d"
                                    % (len(ranges), cap))
            events.append(("probe", Probe(_int(msg, "id", 1), ranges)))
        elif t == "stats":
            events.append(("stats", msg))
        elif t == "hello":
            raise ProtocolError("hello outside a sync")
        else:
            raise ProtocolError("unknown message type %r from guest" % t)
