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

Messages (``type``)
    host -> guest: ``sync`` {nonce, session, granule, settings}, ``ack`` {batch, discarded,
    refused, reason}, ``config`` {settings}.
    guest -> host: ``hello`` {nonce, agent, capabilities, arena, page_size}, ``report``
    {batch, ranges: [[gpa, length], ...]}, ``stats`` {...}, and, 0xFF-prefixed and outside
    any session, ``need-sync``: a guest that has no session (it just started, or recovered
    held pages after a crash) asks the host to begin one. The host answers with a new sync
    once no discard of its current session can still happen.
    Unknown fields are ignored; unknown types and malformed lines end the session (not the
    process).
"""

from __future__ import annotations

import enum
import json
from typing import Any, Dict, List, Optional, Tuple, Union

PROTO = 1
#: The virtio-serial port name both ends use.
PORT_NAME = "org.aerate.agent.0"
#: Longest line either side accepts, newline included. A report of ``MAX_RANGES`` ranges fits.
LINE_MAX = 64 * 1024
#: Most ranges one report may carry.
MAX_RANGES = 1024
#: Most batches a guest may have reported and not yet seen acked.
MAX_INFLIGHT = 4
SYNC_BYTE = b"\xff"
PAGE_SIZE = 4096

Range = Tuple[int, int]


class ProtocolError(Exception):
    """The peer broke the protocol; the session ends, the process carries on."""


# --------------------------------------------------------------------------- framing


class LineReader:
    """Split a byte stream into lines and 0xFF markers, with a hard cap on line length.

    ``feed`` returns, in stream order, ``None`` for every 0xFF marker (the partial line
    before it is dropped), ``bytes`` for every complete line (without its newline), and a
    ``ProtocolError`` for every line that grew past ``limit``; the rest of such a line is
    skipped up to its newline or the next marker, so a flood cannot grow memory.
    """

    def __init__(self, limit: int = LINE_MAX) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> List[Union[bytes, ProtocolError, None]]:
        """Consume ``data``; return lines, markers and over-long-line errors in order."""
        out: List[Union[bytes, ProtocolError, None]] = []
        start, n = 0, len(data)
        while start < n:
            ff = data.find(SYNC_BYTE, start)
            nl = data.find(b"\n", start)
            if ff != -1 and (nl == -1 or ff < nl):
                self.reset()
                start = ff + 1
                out.append(None)
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
            start = nl + 1
            if self._skipping:
                self._skipping = False
            else:
                out.append(bytes(self._buf))
                self._buf.clear()
        return out

    def reset(self) -> None:
        """Forget buffered input (a marker, or a new connection)."""
        self._buf.clear()
        self._skipping = False


def encode(msg: Dict[str, Any], sync: bool = False) -> bytes:
    """Encode one message as a line (prefixed with 0xFF when ``sync``)."""
    body = dict(msg)
    body.setdefault("proto", PROTO)
    line = json.dumps(body, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    if len(line) > LINE_MAX:
        raise ValueError("message of type %r is %d bytes, over the %d-byte line cap"
                         % (msg.get("type"), len(line), LINE_MAX))
    return SYNC_BYTE + line if sync else line


def decode(line: bytes) -> Dict[str, Any]:
    """Decode one line into a message dict with a known ``type`` and a compatible ``proto``."""
    try:
        msg = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("malformed line (%s): %r" % (e, line[:80])) from e
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object, got %s" % type(msg).__name__)
    t = msg.get("type")
    if not isinstance(t, str):
        raise ProtocolError("message without a string 'type'")
    proto = msg.get("proto")
    if proto != PROTO:
        raise ProtocolError("peer speaks protocol %r, this side speaks %d" % (proto, PROTO))
    return msg


def _int(msg: Dict[str, Any], key: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    v = msg.get(key)
    # bool is an int in Python; a JSON true is not a number here.
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError("%s message: field %r must be an integer in [%d, %d], got %r"
                            % (msg.get("type"), key, lo, hi, v))
    return v


def validate_ranges(raw: Any, granule: int) -> List[Range]:
    """Check a report's ranges: well-formed, granule-aligned, in order, disjoint, bounded.

    Returns the ranges as ``(gpa, length)`` tuples sorted by address. Whether they lie in the
    VM's RAM is for the host's memory map to decide (S1); this is the schema part (S5).
    """
    if not isinstance(raw, list) or not raw:
        raise ProtocolError("report: 'ranges' must be a non-empty list")
    if len(raw) > MAX_RANGES:
        raise ProtocolError("report: %d ranges, more than the %d allowed"
                            % (len(raw), MAX_RANGES))
    out: List[Range] = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            raise ProtocolError("report: each range must be [gpa, length] integers, got %r"
                                % (item,))
        gpa, length = item
        if gpa < 0 or length <= 0 or gpa + length > 2**64:
            raise ProtocolError("report: range [%#x, +%#x) is out of bounds" % (gpa, length))
        if gpa % granule or length % granule:
            raise ProtocolError("report: range [%#x, +%#x) is not aligned to the %d-byte "
                                "granule" % (gpa, length, granule))
        out.append((gpa, length))
    out.sort()
    for (a, alen), (b, _) in zip(out, out[1:]):
        if a + alen > b:
            raise ProtocolError("report: ranges overlap at %#x" % b)
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


class GuestEndpoint:
    """The guest's end of the channel, as a socket-free state machine.

    ``receive(data)`` returns the events the agent must act on, as ``(kind, payload)`` pairs:

    - ``("session", sync_msg)`` a new session began; ``reply`` holds the hello to send.
      Every batch still in flight from before is released in the same call (S2).
    - ``("release", (batch_id, discarded, refused))`` the host is done with that batch: its
      pages may be returned. A batch dropped by a new session comes with (0, 0): nothing is
      known to be discarded, so nothing is counted as aerated.
    - ``("config", settings)`` the host changed live settings.
    - ``("error", reason)`` the host broke the protocol; the session ended (batches stay held).

    Outgoing bytes accumulate in ``outbox``; the caller writes them to the port.
    """

    def __init__(self, hello: Dict[str, Any]) -> None:
        self.state = GuestState.IDLE
        self.session: Optional[int] = None
        self.granule = 2 * 1024 * 1024
        self._hello = dict(hello)
        self._reader = LineReader()
        # True once a marker was seen since the last error or disconnect: a sync may follow.
        self._after_marker = False
        self._next_batch = 1
        # batch id -> session it was reported in; released only on that session's ack
        # or when a newer session starts.
        self.inflight: Dict[int, int] = {}
        self.outbox = bytearray()

    # -- outgoing

    def can_report(self) -> bool:
        """True when a session is up and the in-flight window has room."""
        return self.state is GuestState.RUNNING and len(self.inflight) < MAX_INFLIGHT

    def report(self, ranges: List[Range]) -> int:
        """Queue a report of ``ranges``; return its batch id."""
        if not self.can_report():
            raise RuntimeError("report needs a running session with room in the window")
        assert self.session is not None
        batch = self._next_batch
        self._next_batch += 1
        self.outbox += encode({"type": "report", "session": self.session, "batch": batch,
                               "ranges": [list(r) for r in coalesce(ranges)]})
        self.inflight[batch] = self.session
        return batch

    def request_sync(self) -> None:
        """Ask the host for a session (sent while IDLE; harmless if nobody listens)."""
        self.outbox += encode(dict(self._hello, type="need-sync"), sync=True)

    def send(self, msg: Dict[str, Any]) -> None:
        """Queue a session-scoped message (stats); dropped when no session is up."""
        if self.state is GuestState.RUNNING:
            body = dict(msg)
            body["session"] = self.session
            self.outbox += encode(body)

    def take_outbox(self) -> bytes:
        """Return and clear the bytes waiting to be written."""
        data = bytes(self.outbox)
        self.outbox.clear()
        return data

    def disconnected(self) -> None:
        """The host went away (HUP). In-flight batches stay held until ack or a new sync."""
        self.state = GuestState.IDLE
        self._after_marker = False
        self._reader.reset()

    # -- incoming

    def receive(self, data: bytes) -> List[Tuple[str, Any]]:
        """Feed bytes from the host; return the events to act on."""
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
                    self._handle(decode(item), events)
            except ProtocolError as e:
                self.state = GuestState.IDLE
                self._after_marker = False
                events.append(("error", str(e)))
        return events

    def _handle(self, msg: Dict[str, Any], events: List[Tuple[str, Any]]) -> None:
        t = msg["type"]
        if t == "sync":
            session = _int(msg, "session", 1)
            nonce = _int(msg, "nonce")
            granule = _int(msg, "granule", PAGE_SIZE, 1 << 40)
            if granule & (granule - 1):
                raise ProtocolError("sync: granule %d is not a power of two" % granule)
            # S2: a new session means the host dropped every older batch.
            for batch, s in sorted(self.inflight.items()):
                if s != session:
                    del self.inflight[batch]
                    events.append(("release", (batch, 0, 0)))
            self.state = GuestState.RUNNING
            self.session = session
            self.granule = granule
            hello = dict(self._hello, type="hello", nonce=nonce, session=session)
            self.outbox += encode(hello, sync=True)
            events.append(("session", msg))
            settings = msg.get("settings")
            if isinstance(settings, dict):
                events.append(("config", settings))
            return
        if self.state is not GuestState.RUNNING or msg.get("session") != self.session:
            return  # stale: an older session's message, or one before our sync answer
        if t == "ack":
            batch = _int(msg, "batch", 1)
            if self.inflight.get(batch) != self.session:
                raise ProtocolError("ack for batch %d, which is not in flight" % batch)
            del self.inflight[batch]
            discarded = _int(msg, "discarded")
            refused = _int(msg, "refused")
            events.append(("release", (batch, discarded, refused)))
        elif t == "config":
            settings = msg.get("settings")
            if not isinstance(settings, dict):
                raise ProtocolError("config: 'settings' must be an object")
            events.append(("config", settings))
        else:
            raise ProtocolError("unknown message type %r from host" % t)


# --------------------------------------------------------------------------- host end


class HostState(enum.Enum):
    """Where the host end stands with one guest."""

    IDLE = "idle"            # not connected
    SYNCING = "syncing"      # sync sent, discarding input until the guest's answer
    RUNNING = "running"      # session established
    CLOSED = "closed"        # the guest broke the protocol; reconnect to start again


class HostEndpoint:
    """The host's end of one guest's channel, as a socket-free state machine.

    ``start(nonce, session, granule, settings)`` queues the sync; ``receive(data)`` returns
    ``(kind, payload)`` events: ``("hello", msg)``, ``("report", (batch, ranges))``,
    ``("stats", msg)``, ``("need-sync", msg)`` (the guest lost its session: finish or abandon
    in-flight discards, then ``start`` again), ``("error", reason)``. After an error the
    state is CLOSED and no more events come until ``start`` is called again on a fresh
    connection.
    """

    def __init__(self, max_ranges: int = MAX_RANGES) -> None:
        self.state = HostState.IDLE
        self.session = 0
        self.nonce = 0
        self.granule = 2 * 1024 * 1024
        self.max_ranges = max_ranges
        self._reader = LineReader()
        self._seen_marker = False
        self._last_batch = 0
        #: batches reported and not yet acked, id -> ranges
        self.pending: Dict[int, List[Range]] = {}
        self.outbox = bytearray()

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
        self.pending.clear()
        msg: Dict[str, Any] = {"type": "sync", "nonce": nonce, "session": session,
                               "granule": granule}
        if settings:
            msg["settings"] = settings
        self.outbox += encode(msg, sync=True)

    def ack(self, batch: int, discarded: int, refused: int = 0, reason: str = "") -> None:
        """Queue the ack of a batch; the guest may then return its pages.

        Call only after every discard of the batch finished or was abandoned for good (S4).
        """
        if batch not in self.pending:
            raise KeyError("batch %d is not pending in session %d" % (batch, self.session))
        del self.pending[batch]
        msg: Dict[str, Any] = {"type": "ack", "session": self.session, "batch": batch,
                               "discarded": discarded, "refused": refused}
        if reason:
            msg["reason"] = reason
        self.outbox += encode(msg)

    def configure(self, settings: Dict[str, Any]) -> None:
        """Queue a live settings change for the guest."""
        if self.state is HostState.RUNNING:
            self.outbox += encode({"type": "config", "session": self.session,
                                   "settings": settings})

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
                        self.state = HostState.RUNNING
                        events.append(("hello", msg))
                    continue
                if not item.strip():
                    continue
                msg = decode(item)
                if msg["type"] == "need-sync":
                    events.append(("need-sync", msg))
                    continue
                if msg.get("session") != self.session:
                    continue  # an older session's line, still in the pipe
                self._handle(msg, events)
            except ProtocolError as e:
                self.state = HostState.CLOSED
                events.append(("error", str(e)))
        return events

    @staticmethod
    def _try_decode(line: bytes) -> Optional[Dict[str, Any]]:
        # While syncing, junk is expected (an old session's tail); it is skipped, not fatal.
        try:
            return decode(line)
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
            self._last_batch = batch
            self.pending[batch] = ranges
            events.append(("report", (batch, ranges)))
        elif t == "stats":
            events.append(("stats", msg))
        elif t == "hello":
            raise ProtocolError("hello outside a sync")
        else:
            raise ProtocolError("unknown message type %r from guest" % t)
