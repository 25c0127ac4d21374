"""What the real systemd-python library sends to the journal for aerated's refusals.

No journald runs on this machine, so the test plays it: it binds the journal's native
socket (/run/systemd/journal/socket, where libsystemd's sd_journal_send writes; only when
nothing is there) and parses the datagrams of the native protocol (``KEY=value`` lines, or
``KEY``, a 64-bit little-endian length and the bytes for a value with a newline). The
sender is a separate process whose stderr is the "journal stream" (``$JOURNAL_STREAM``
names it, as systemd sets it), set up by aerated's own logging setup (host/journal.py)
and refusing a VM through the real runner: its stored settings are invalid (S6). A second
test runs the real ``aerated`` (main()) and reloads it with a bad file by SIGHUP, as
``systemctl reload`` does.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


def entries_until(sock: socket.socket, done: Callable[[dict[str, str]], bool],
                  timeout: float = 30) -> list[dict[str, str]]:
    """Journal entries received until one satisfies ``done`` (that one included)."""
    out: list[dict[str, str]] = []
    end = time.monotonic() + timeout
    while not out or not done(out[-1]):
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            out.append(parse_native(sock.recv(1 << 20)))
        except TimeoutError:
            raise AssertionError(f"no such journal entry in {timeout} s: {out}") from None
    return out


def test_the_real_aerated_logs_a_refused_reload_at_err_and_tells_systemd(
        journal_socket: socket.socket, tmp_path: Path) -> None:
    """The installed entry point's main() as systemd runs it (JOURNAL_STREAM, NOTIFY_SOCKET):
    SIGHUP with a bad file gives RELOADING=1 then READY=1, the error at err with the file,
    line and key, and nothing on stderr. libvirt's test driver stands for the connection
    (it never connects: no VM is served, which this test does not need)."""
    pytest.importorskip("systemd.journal")
    config = tmp_path / "aerated.toml"
    config.write_text("[defaults]\nhwm = 16\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)

    def notified(first: str) -> str:
        while True:
            msg = notify.recv(4096).decode()
            if msg.startswith(first):
                return msg
            assert msg.startswith(("STATUS=", "WATCHDOG=")), msg

    with open(tmp_path / "stderr", "w+") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
                   NOTIFY_SOCKET=str(tmp_path / "notify"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "aerate.host.daemon", "--uri", "test:///default",
             "--run-dir", str(tmp_path), "--metrics", "off", "--config", str(config)],
            stderr=err, env=env)
        try:
            notified("READY=1")
            config.write_text("[defaults]\nhwm = 16\nmode = 'sometimes'\n")
            proc.send_signal(signal.SIGHUP)
            assert notified("RELOADING=1").splitlines()[1].startswith("MONOTONIC_USEC=")
            notified("READY=1")
            got = entries_until(journal_socket,
                                lambda e: e.get("MESSAGE_ID") == journal.EVENTS["config"])
        finally:
            proc.terminate()
            rc = proc.wait(30)
            notify.close()
        err.seek(0)
        stderr = err.read()
    e = got[-1]
    assert e["PRIORITY"] == "3" and e["SYSLOG_IDENTIFIER"] == "aerated"
    assert f"{config}:3: [defaults]: mode='sometimes' is not one of" in e["MESSAGE"]
    assert "the old configuration stays in force" in e["MESSAGE"]
    assert rc == 0 and stderr == ""
