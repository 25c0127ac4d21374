"""What the real systemd-python library sends to the journal for a refusal by aerated.

No journald runs on this machine, so the test plays it: it binds the journal's native
socket (/run/systemd/journal/socket, where libsystemd's sd_journal_send writes; only when
nothing is there) and parses the datagrams of the native protocol (``KEY=value`` lines, or
``KEY``, a 64-bit little-endian length and the bytes for a value with a newline). The
sender is a separate process whose stderr is the "journal stream" (``$JOURNAL_STREAM``
names it, as systemd sets it), set up by aerated's own logging setup (host/journal.py)
and refusing a VM through the real runner: its stored settings are invalid (S6).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aerate.host import journal

pytestmark = pytest.mark.host
SOCKET = "/run/systemd/journal/socket"
UNIT_TESTS = Path(__file__).resolve().parent.parent / "unit"
UUID = "79239ed1-72ae-4aa6-940e-0e1f213027d0"   # the captured domain XML's

# The refusal: a runner whose VM's metadata holds an unknown key (test_runner_refusals'
# BAD_LAYER), after the runner learned the domain XML (and with it the UUID).
SENDER = f"""
import asyncio, sys
sys.path.insert(0, {str(UNIT_TESTS)!r})
from aerate.host import journal
journal.setup("info")
from test_runner_refusals import BAD_LAYER, FakeLibvirt, daemon
from aerate.host.daemon import VmRunner
conn = FakeLibvirt(metadata=BAD_LAYER)
r = VmRunner(daemon(conn), "web01")
r.xml = conn.xml
asyncio.run(r.load_metadata())
r.daemon.pool.shutdown()
"""


def parse_native(data: bytes) -> dict[str, str]:
    """One datagram of journald's native protocol (systemd's JOURNAL_NATIVE_PROTOCOL)."""
    out: dict[str, str] = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        assert sep, f"unterminated field {line!r}"
        if b"=" in line:
            key, _, value = line.partition(b"=")
            data = rest
        else:
            key = line
            (n,) = struct.unpack("<Q", rest[:8])
            value, data = rest[8:8 + n], rest[8 + n:]
            assert data[:1] == b"\n", "binary field not followed by a newline"
            data = data[1:]
        out[key.decode()] = value.decode()
    return out


@pytest.fixture
def journal_socket() -> Iterator[socket.socket]:
    """The journal's socket, bound by the test; everything it made is removed after."""
    if os.path.lexists(SOCKET):
        pytest.skip(f"{SOCKET} exists (a journald runs here?): not taking its place")
    made = [d for d in ("/run/systemd", "/run/systemd/journal") if not os.path.isdir(d)]
    for d in made:
        os.mkdir(d, 0o755)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(SOCKET)
        sock.settimeout(30)
        yield sock
    finally:
        sock.close()
        os.unlink(SOCKET)
        for d in reversed(made):
            os.rmdir(d)


def test_a_refusal_reaches_the_journal_with_priority_vm_uuid_and_message_id(
        journal_socket: socket.socket, tmp_path: Path) -> None:
    pytest.importorskip("systemd.journal")
    with open(tmp_path / "stderr", "w+") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        got = subprocess.run([sys.executable, "-c", SENDER], stderr=err, env=env,
                             timeout=120, check=False)
        err.seek(0)
        stderr = err.read()
    assert got.returncode == 0, stderr
    # Everything went to the journal, nothing to the stream.
    assert stderr == ""
    journal_socket.settimeout(0.5)
    entries = []
    while True:
        try:
            data, anc, _, _ = journal_socket.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        except TimeoutError:
            break
        assert not anc, "the entry came as a memfd (too big for a datagram)"
        entries.append(parse_native(data))
    refusals = [e for e in entries if e.get("MESSAGE_ID") == journal.EVENTS["refusal"]]
    assert len(refusals) == 1, entries
    (e,) = refusals
    assert e["PRIORITY"] == "3"
    assert e["VM"] == "web01" and e["VM_UUID"] == UUID
    assert e["SYSLOG_IDENTIFIER"] == "aerated"
    assert "VM web01 metadata: unknown setting 'hwmm'" in e["MESSAGE"]
    assert e["CODE_FUNC"] == "load_metadata"
    # Only valid journal field names: JournalHandler hands over the whole record
    # (msg, args, levelname...), host/journal.py keeps the upper-case fields.
    assert all(re.fullmatch(r"[A-Z0-9][A-Z0-9_]*", k) for k in e), sorted(e)
