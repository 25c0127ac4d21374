"""The wire protocol: framing, sync, sessions, validation (S2, S5), driven without sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aerate.agent import protocol as p

pytestmark = pytest.mark.unit

MiB2 = 2 * 1024 * 1024


def connect(session: int = 7, nonce: int = 99) -> tuple[p.HostEndpoint, p.GuestEndpoint]:
    """A host and guest endpoint with an established session."""
    host, guest = p.HostEndpoint(), p.GuestEndpoint({"agent": "test"})
    host.start(nonce=nonce, session=session, granule=MiB2)
    events = guest.receive(host.take_outbox())
    assert [k for k, _ in events] == ["session"]
    hev = host.receive(guest.take_outbox())
    assert [k for k, _ in hev] == ["hello"]
    assert host.state is p.HostState.RUNNING and guest.state is p.GuestState.RUNNING
    return host, guest


def test_line_reader_splits_lines_markers_and_caps_length() -> None:
    r = p.LineReader(limit=16)
    assert r.feed(b"ab\ncd") == [b"ab"]
    assert r.feed(b"e\n\xffxy") == [b"cde", None]
    out = r.feed(b"z" * 40 + b"\nok\n")
    assert isinstance(out[0], p.ProtocolError) and out[1:] == [b"ok"]
    # A marker drops the partial line before it, however long, and ends any skipping.
    assert r.feed(b"q" * 40 + b"\xff" + b"fine\n") == [None, b"fine"]
    out = r.feed(b"q" * 40)
    assert isinstance(out[0], p.ProtocolError)
    assert r.feed(b"qq\xffnext\n") == [None, b"next"]


def test_report_ack_release_roundtrip() -> None:
    host, guest = connect()
    batch = guest.report([(4 * MiB2, MiB2), (5 * MiB2, MiB2), (9 * MiB2, MiB2)])
    events = host.receive(guest.take_outbox())
    assert events == [("report", (batch, [(4 * MiB2, 2 * MiB2), (9 * MiB2, MiB2)], 1))]
    host.ack(batch, discarded=3 * MiB2)
    assert guest.receive(host.take_outbox()) == [("release", (batch, 3 * MiB2, 0))]
    assert guest.inflight == {}


def test_guest_keeps_batches_held_until_ack_or_new_session() -> None:
    """S2: neither a disconnect nor garbage releases a batch; only an ack or a new sync."""
    _, guest = connect(session=1)
    b1 = guest.report([(0, MiB2)])
    guest.disconnected()
    assert guest.receive(b"garbage\n{not json}\n") == []  # no session: ignored, nothing freed
    assert b1 in guest.inflight
    host2 = p.HostEndpoint()
    host2.start(nonce=5, session=2, granule=MiB2)
    events = guest.receive(host2.take_outbox())
    assert ("release", (b1, 0, 0)) in events and guest.inflight == {}


def test_stale_ack_from_old_session_is_ignored() -> None:
    host, guest = connect(session=1)
    b1 = guest.report([(0, MiB2)])
    host.receive(guest.take_outbox())
    host.ack(b1, discarded=MiB2)
    old_ack = host.take_outbox()
    # A new session begins before the old ack is read: the batch is released by the sync.
    host2 = p.HostEndpoint()
    host2.start(nonce=6, session=2, granule=MiB2)
    assert ("release", (b1, 0, 0)) in guest.receive(host2.take_outbox())
    b2 = guest.report([(2 * MiB2, MiB2)])
    assert guest.receive(old_ack) == []
    assert b2 in guest.inflight


def test_host_discards_stale_output_until_its_nonce() -> None:
    guest = p.GuestEndpoint({"agent": "t"})
    host = p.HostEndpoint()
    host.start(nonce=1, session=1, granule=MiB2)
    guest.receive(host.take_outbox())
    stale_hello = guest.take_outbox()  # answer to the first sync, never read by that host
    host2 = p.HostEndpoint()
    host2.start(nonce=2, session=2, granule=MiB2)
    guest.receive(host2.take_outbox())
    fresh = guest.take_outbox()
    assert host2.receive(b"junk line\n" + stale_hello) == []
    assert host2.state is p.HostState.SYNCING
    assert [k for k, _ in host2.receive(fresh)] == ["hello"]


@pytest.mark.parametrize(
    "ranges, why",
    [
        ([[MiB2 + 4096, MiB2]], "aligned"),
        ([[0, 0]], "out of bounds"),
        ([[-MiB2, MiB2]], "out of bounds"),
        ([[0, 2 * MiB2], [MiB2, MiB2]], "overlap"),
        ([[0, MiB2], [0, MiB2]], "overlap"),
        ([[0, True]], "integers"),
        ([["0", MiB2]], "integers"),
        ([], "non-empty"),
        ("nope", "non-empty"),
        ([[0, MiB2]] * (p.MAX_RANGES + 1), "more than"),
    ],
)
def test_hostile_reports_end_the_session(ranges: Any, why: str) -> None:
    """S5: a malformed report closes the session; nothing reaches the reclaimer."""
    host, _ = connect()
    line = json.dumps({"proto": p.PROTO, "type": "report", "session": 7, "batch": 1,
                       "ranges": ranges}).encode() + b"\n"
    events = host.receive(line)
    assert len(events) == 1 and events[0][0] == "error" and why in events[0][1]
    assert host.state is p.HostState.CLOSED and host.pending == {}


def test_replayed_batch_and_window_overflow_are_refused() -> None:
    host, _ = connect()
    rep = b'{"proto":%d,"type":"report","session":7,"batch":3,"ranges":[[0,2097152]]}\n' % p.PROTO
    assert host.receive(rep)[0][0] == "report"
    events = host.receive(rep)
    assert events[0][0] == "error" and "replayed" in events[0][1]
    host, _ = connect()
    for b in range(1, p.MAX_INFLIGHT + 2):
        line = json.dumps({"proto": p.PROTO, "type": "report", "session": 7, "batch": b,
                           "ranges": [[b * MiB2, MiB2]]}).encode() + b"\n"
        events = host.receive(line)
    assert events[0][0] == "error" and "in flight" in events[0][1]


def test_giant_line_and_wrong_proto_close_the_host_session() -> None:
    host, _ = connect()
    events = host.receive(b"{" + b" " * (p.LINE_MAX + 10) + b"}\n")
    assert events[0][0] == "error" and host.state is p.HostState.CLOSED
    host, _ = connect()
    events = host.receive(b'{"proto":1,"type":"stats","session":7}\n')
    assert events[0][0] == "error" and "protocol 1" in events[0][1]


def test_guest_survives_host_garbage_and_resyncs() -> None:
    host, guest = connect(session=3)
    b = guest.report([(0, MiB2)])
    events = guest.receive(b"\x00\x01{{{\n")
    assert events[0][0] == "error" and guest.state is p.GuestState.IDLE
    assert b in guest.inflight  # S2: garbage is no licence to release
    # A sync of the same session after an error: the host still knows this batch.
    host.start(nonce=8, session=4, granule=MiB2)
    events = guest.receive(host.take_outbox())
    assert ("release", (b, 0, 0)) in events and guest.state is p.GuestState.RUNNING


def test_config_is_delivered_and_unknown_fields_ignored() -> None:
    host, guest = connect()
    host.configure({"hwm": 16})
    assert guest.receive(host.take_outbox()) == [("config", {"hwm": 16})]
    line = b'{"proto":%d,"type":"stats","session":7,"future_field":[1,2]}\n' % p.PROTO
    assert host.receive(line)[0][0] == "stats"


# ----------------------------------------------------------------- properties


def _stream_pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for c in points:
        pieces.append(data[last:c])
        last = c
    pieces.append(data[last:])
    return pieces


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 5000), max_size=20))
def test_property_arbitrary_bytes_never_release_or_report_outside_a_session(
        garbage: bytes, cuts: list[int]) -> None:
    """Arbitrary host bytes can only release a batch through a well-formed ack or sync."""
    host, guest = connect(session=11)
    b = guest.report([(0, MiB2)])
    host.receive(guest.take_outbox())
    for piece in _stream_pieces(garbage, cuts):
        for kind, payload in guest.receive(piece):
            if kind == "release":
                # Only possible if the garbage itself contained a valid sync or ack line.
                assert payload[0] == b
                assert b"sync" in garbage or b"ack" in garbage
    # Arbitrary guest bytes never produce a report the host would act on unless well formed.
    for piece in _stream_pieces(garbage, cuts):
        for kind, payload in host.receive(piece):
            if kind == "report":
                ranges = payload.ranges
                assert all(g % MiB2 == 0 and n % MiB2 == 0 and n > 0 for g, n in ranges)


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=30),
       dup=st.booleans(), stale=st.binary(max_size=300))
def test_property_split_duplicated_and_stale_streams(cuts: list[int], dup: bool,
                                                     stale: bytes) -> None:
    """However the stream is cut, duplicated or prefixed with stale bytes, the host acts only
    on the current session's batches, and each batch at most once."""
    old_guest = p.GuestEndpoint({"agent": "old"})
    old_host = p.HostEndpoint()
    old_host.start(nonce=1, session=1, granule=MiB2)
    old_guest.receive(old_host.take_outbox())
    old_guest.report([(64 * MiB2, MiB2)])
    old_bytes = old_guest.take_outbox()

    guest = p.GuestEndpoint({"agent": "t"})
    host = p.HostEndpoint()
    host.start(nonce=2, session=2, granule=MiB2)
    guest.receive(host.take_outbox())
    guest.report([(0, MiB2)])
    guest.report([(2 * MiB2, MiB2)])
    current = guest.take_outbox()
    stream = stale + old_bytes + current + (current if dup else b"")
    seen: list[int] = []
    for piece in _stream_pieces(stream, cuts):
        for kind, payload in host.receive(piece):
            if kind == "report":
                batch, ranges = payload.batch, payload.ranges
                assert (64 * MiB2, MiB2) not in ranges  # the old session's batch
                seen.append(batch)
    assert len(seen) == len(set(seen))
    if host.state is p.HostState.RUNNING:
        assert seen == [1, 2]


def test_restarted_guest_asks_for_a_session_and_gets_one() -> None:
    """A guest that lost its session (agent restart) asks; the host resyncs; orphans go."""
    host, _ = connect(session=5)
    fresh = p.GuestEndpoint({"agent": "restarted"})
    fresh.request_sync()
    events = host.receive(fresh.take_outbox())
    assert [k for k, _ in events] == ["need-sync"]
    host.start(nonce=77, session=6, granule=MiB2)
    assert [k for k, _ in fresh.receive(host.take_outbox())] == ["session"]
    assert [k for k, _ in host.receive(fresh.take_outbox())] == ["hello"]
    # While syncing, a need-sync is not acted on: the sync is already on its way.
    host.start(nonce=78, session=7, granule=MiB2)
    assert host.receive(fresh.take_outbox() + p.encode({"type": "need-sync"}, sync=True)) == []


def negotiate(host_protos: tuple[int, int], guest_protos: tuple[int, int]
              ) -> tuple[p.HostEndpoint, p.GuestEndpoint, list[Any], list[Any]]:
    """A sync and its answer between endpoints speaking the given version ranges."""
    host = p.HostEndpoint(protos=host_protos)
    guest = p.GuestEndpoint({"agent": "test"}, protos=guest_protos)
    host.start(nonce=3, session=5, granule=MiB2)
    gev = guest.receive(host.take_outbox())
    hev = host.receive(guest.take_outbox())
    return host, guest, gev, hev


@pytest.mark.parametrize("host_protos, guest_protos, version", [
    ((2, 3), (2, 2), 2),   # a newer host serves an older agent
    ((2, 2), (2, 3), 2),   # a newer agent talks to an older host
    ((2, 4), (3, 5), 4),   # the newest both speak
])
def test_versions_negotiate_to_the_newest_common_one(
        host_protos: tuple[int, int], guest_protos: tuple[int, int], version: int) -> None:
    host, guest, gev, hev = negotiate(host_protos, guest_protos)
    assert [k for k, _ in gev] == ["session"] and [k for k, _ in hev] == ["hello"]
    assert host.proto == guest.proto == version
    # Every later message carries the session's version, both ways.
    b = guest.report([(0, MiB2)])
    (kind, rep), = host.receive(guest.take_outbox())
    assert kind == "report" and rep.batch == b
    host.ack(b, discarded=MiB2)
    assert json.loads(host.outbox)["proto"] == version
    assert guest.receive(host.take_outbox()) == [("release", (b, MiB2, 0))]


def test_no_common_version_is_refused_by_both_ends_with_both_ranges() -> None:
    _, guest, gev, hev = negotiate((3, 4), (2, 2))
    assert gev == [("error", "no protocol version in common: the peer speaks 3..4, this side "
                             "2..2")]
    assert guest.state is p.GuestState.IDLE and hev == []
    # A guest that answers in a version the host does not speak ends the session.
    host = p.HostEndpoint(protos=(2, 2))
    host.start(nonce=1, session=2, granule=MiB2)
    hello = {"type": "hello", "nonce": 1, "session": 2, "agent": "x"}
    events = host.receive(p.encode(hello, sync=True, proto=3))
    assert events == [("error", "the guest's hello speaks protocol 3, this host 2..2")]
    assert host.state is p.HostState.CLOSED


def test_protocol_1_has_no_leases_and_stays_refused() -> None:
    """A protocol-1 host never checks a token: an agent that holds pages one lease would
    return pages it may still punch. Neither end talks protocol 1, and neither can be
    built to."""
    guest = p.GuestEndpoint({"agent": "test"})
    old_sync = {"type": "sync", "nonce": 1, "session": 1, "granule": MiB2, "token": 1,
                "lease_ms": 2000}
    events = guest.receive(p.encode(old_sync, sync=True, proto=1))
    assert events[0][0] == "error" and "peer speaks 1..1" in events[0][1]
    assert guest.state is p.GuestState.IDLE and guest.take_outbox() == b""
    host = p.HostEndpoint()
    host.start(nonce=1, session=2, granule=MiB2)
    events = host.receive(p.encode({"type": "hello", "nonce": 1, "session": 2}, sync=True,
                                   proto=1))
    assert events[0][0] == "error" and host.state is p.HostState.CLOSED
    assert p.PROTO_MIN >= p.LEASES_SINCE == 2
    with pytest.raises(ValueError, match="no leases"):
        p.GuestEndpoint({}, protos=(1, 2))
    with pytest.raises(ValueError, match="no leases"):
        p.HostEndpoint(protos=(1, 2))


def test_a_0_1_0_peer_without_a_range_still_talks() -> None:
    """aerate 0.1.0 sent only ``proto`` (2): its range is that one version."""
    guest = p.GuestEndpoint({"agent": "test"}, protos=(2, 3))
    old_sync = {"type": "sync", "nonce": 1, "session": 1, "granule": MiB2, "token": 1,
                "lease_ms": 2000}
    assert [k for k, _ in guest.receive(p.encode(old_sync, sync=True, proto=2))] == ["session"]
    assert guest.proto == 2
    assert json.loads(guest.take_outbox()[1:])["proto"] == 2


def test_a_message_of_another_version_mid_session_ends_it() -> None:
    host, guest = connect()
    events = guest.receive(p.encode({"type": "keepalive", "session": 7, "token": 9,
                                     "lease_ms": 2000}, proto=p.PROTO + 1))
    assert events[0][0] == "error" and guest.state is p.GuestState.IDLE
    host, _ = connect()
    events = host.receive(p.encode({"type": "stats", "session": 7}, proto=p.PROTO + 1))
    assert events[0][0] == "error" and host.state is p.HostState.CLOSED


class _OldLineReader:
    """The reader before it was made linear (quadratic in a run of 0xFF), kept here as
    written then: the oracle for what the lines and markers of a stream mean (its line
    handling is alike the new reader's on purpose)."""

    def __init__(self, limit: int) -> None:
        self.limit, self._buf, self._skipping = limit, bytearray(), False

    def feed(self, data: bytes) -> list[Any]:
        out: list[Any] = []
        start, n = 0, len(data)
        while start < n:
            ff, nl = data.find(b"\xff", start), data.find(b"\n", start)
            if ff != -1 and (nl == -1 or ff < nl):
                self._buf.clear()
                self._skipping = False
                start = ff + 1
                out.append(None)
                continue
            end = nl if nl != -1 else n
            if not self._skipping:
                self._buf += data[start:end]
                if len(self._buf) >= self.limit:
                    self._buf.clear()
                    self._skipping = True
                    out.append(p.ProtocolError("too long"))
            if nl == -1:
                break
            start = nl + 1
            if self._skipping:
                self._skipping = False
            else:
                out.append(bytes(self._buf))
                self._buf.clear()
        return out


def _meaning(items: list[Any]) -> list[tuple[bool, Any]]:
    """What both endpoints make of a reader's output (HostEndpoint.receive while syncing,
    the strictest reader): a marker arms a flag, the next line (a blank one included)
    takes it; other blank lines are skipped; errors are kept in place."""
    armed, out = False, []
    for item in items:
        if item is None:
            armed = True
        elif isinstance(item, p.ProtocolError):
            out.append((armed, "error"))
        elif item.strip() or armed:
            out.append((armed, item))
            armed = False
    return [*out, (armed, "end")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"bc", b"\n", b"\n\n", b"\xff", b"\xff\xff", b"{}"]),
                max_size=60), st.lists(st.integers(1, 12), min_size=1, max_size=8))
def test_line_reader_means_what_the_old_reader_meant(parts: list[bytes],
                                                     cuts: list[int]) -> None:
    """Collapsing runs of markers and blank lines changes what is returned, never what the
    endpoints do with it, however the stream is cut into reads."""
    data = b"".join(parts)
    new, old = p.LineReader(limit=8), _OldLineReader(limit=8)
    got, want, at, i = [], [], 0, 0
    while at < len(data):
        chunk = data[at:at + cuts[i % len(cuts)]]
        got += new.feed(chunk)
        want += old.feed(chunk)
        at, i = at + len(chunk), i + 1
    assert _meaning(got) == _meaning(want)


class _CountingBytes(bytes):
    """bytes that count how many bytes their searches examine (the reader's work)."""

    scanned = 0

    def find(self, sub: Any, start: Any = 0, end: Any = None) -> int:  # type: ignore[override]
        r = super().find(sub, start, end)
        _CountingBytes.scanned += (r + 1 if r != -1 else len(self)) - start
        return r

    def rfind(self, sub: Any, start: Any = 0, end: Any = None) -> int:  # type: ignore[override]
        r = super().rfind(sub, start, end)
        stop = len(self) if end is None else end
        _CountingBytes.scanned += stop - (r if r != -1 else start)
        return r


@pytest.mark.parametrize("unit", [b"\xff", b"\xffx", b"\n", b"\xff\n", b"x" * 100 + b"\n",
                                  b"a", b"\xff" * 7 + b"\n" * 3 + b"y"])
def test_line_reader_work_is_linear_in_the_bytes(unit: bytes,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """S5 (issue 10, "Bad input"): the reader's searches examine each byte a bounded
    number of times, whatever the stream (the old reader examined a run of n 0xFF bytes
    n^2/2 times: 8.9 s of the daemon's CPU for a 10 MB flood), so 256 KiB costs about four
    times what 64 KiB costs. Counted, not timed: the bound holds on any machine."""
    runs = []
    real = p._NOT_NEWLINE

    class CountingPattern:
        def search(self, data: bytes, pos: int) -> Any:
            m = real.search(data, pos)
            runs.append((m.start() if m else len(data)) - pos)
            return m

    monkeypatch.setattr(p, "_NOT_NEWLINE", CountingPattern())
    work = {}
    for size in (1 << 16, 1 << 18):
        data = _CountingBytes(unit * (size // len(unit)))
        _CountingBytes.scanned, runs[:] = 0, []
        items = p.LineReader().feed(data)
        work[size] = _CountingBytes.scanned + sum(runs)
        assert work[size] <= 3 * len(data) + 3, (unit, size, work[size])
        # One item per line at most, and one per marker run before it: a pure 0xFF flood
        # is a single marker, a flood of newlines a single blank line.
        assert len(items) <= 2 * data.count(b"\n") + 2
    assert work[1 << 18] <= 4.5 * work[1 << 16] + 16


# ----------------------------------------------------------------- probes (protocol 3)


def test_probe_and_its_answers_round_trip() -> None:
    host, guest = connect()
    assert host.proto == guest.proto == p.PROBE_SINCE and guest.can_probe()
    pid = guest.probe([(MiB2, MiB2), (0, MiB2), (8 * MiB2, MiB2)])
    line = json.loads(guest.outbox)
    # Sorted, not coalesced: the host answers range by range (and a coalesced range could
    # span two of its RAM blocks).
    assert "token" not in line and line["ranges"] == [[0, MiB2], [MiB2, MiB2],
                                                      [8 * MiB2, MiB2]]
    assert host.receive(guest.take_outbox()) == [
        ("probe", p.Probe(pid, [(0, MiB2), (MiB2, MiB2), (8 * MiB2, MiB2)]))]
    assert host.pending == {}   # a probe holds nothing and is not a batch
    host.probed(pid, backed=[(8 * MiB2, MiB2)])
    assert guest.receive(host.take_outbox()) == [
        ("probed", p.Probed(pid, [(8 * MiB2, MiB2)], ""))]
    host.probed(pid, backed=[])
    assert guest.receive(host.take_outbox()) == [("probed", p.Probed(pid, [], ""))]
    host.probed(pid, unknown="rate", retry=True)
    assert guest.receive(host.take_outbox()) == [("probed", p.Probed(pid, None, "rate", True))]
    assert guest.inflight == {} and guest.token is not None and guest.token.token == 4


@pytest.mark.parametrize("ranges, why", [
    ([[0, MiB2]] * (p.MAX_RANGES + 1), "more than"),
    ([[i * 2 * MiB2, MiB2] for i in range(p.PROBE_MAX_RANGES + 1)], "over the cap"),
    ([[MiB2 + 4096, MiB2]], "aligned"),
    ([[0, 2 * MiB2], [MiB2, MiB2]], "overlap"),
    ([], "non-empty"),
    ([[0, True]], "integers"),
])
def test_hostile_probes_end_the_session(ranges: Any, why: str) -> None:
    host, _ = connect()
    events = host.receive(p.encode({"type": "probe", "session": 7, "id": 1,
                                    "ranges": ranges}))
    assert len(events) == 1 and events[0][0] == "error" and why in events[0][1]
    assert events[0][1].startswith("probe:") and host.state is p.HostState.CLOSED


def test_probes_of_another_session_are_dropped_both_ways() -> None:
    host, guest = connect()
    assert host.receive(p.encode({"type": "probe", "session": 8, "id": 1,
                                  "ranges": [[0, MiB2]]})) == []
    guest.probe([(0, MiB2)])
    host2, _ = connect(session=8)
    host2.probed(1, backed=[(0, MiB2)])
    assert guest.receive(host2.take_outbox()) == []   # session 8's answer, guest is in 7
    assert guest.state is p.GuestState.RUNNING


def test_an_answer_to_a_probe_never_sent_ends_the_session() -> None:
    host, guest = connect()
    host.probed(5, backed=[])
    events = guest.receive(host.take_outbox())
    assert events[0][0] == "error" and "never sent" in events[0][1]


def test_a_protocol_2_session_neither_sends_nor_answers_probes() -> None:
    """Versions: probes exist only in sessions of version >= PROBE_SINCE."""
    host, guest, _, _ = negotiate((2, 3), (2, 2))     # an older agent
    assert host.proto == guest.proto == 2 and not guest.can_probe()
    with pytest.raises(RuntimeError, match="protocol >= 3"):
        guest.probe([(0, MiB2)])
    host.probed(1, backed=[])
    assert host.take_outbox() == b""                 # the host answers nothing in it
    # A probe in a protocol-2 session is an unknown type: the session ends.
    events = host.receive(p.encode({"type": "probe", "session": 5, "id": 1,
                                    "ranges": [[0, MiB2]]}, proto=2))
    assert events[0][0] == "error" and "unknown message type 'probe'" in events[0][1]
    host, guest, _, _ = negotiate((2, 2), (2, 3))     # an older host
    assert guest.proto == 2 and not guest.can_probe()
    events = guest.receive(p.encode({"type": "probed", "session": 5, "id": 1, "backed": [],
                                     "token": 9, "lease_ms": 2000}, proto=2))
    assert events[0][0] == "error" and "unknown message type 'probed'" in events[0][1]
