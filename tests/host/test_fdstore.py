"""The fd store path without systemd: the test plays the service manager.

It binds the NOTIFY_SOCKET datagram socket, receives fds with SCM_RIGHTS, and starts the
next process with the fds at 3.. and LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES, the way
systemd hands its fd store back to a restarted service.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
from supervisor import NotifyStandIn, spawn_with_listen_fds

from aerate.agent import fdstore

pytestmark = pytest.mark.host

@pytest.fixture()
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyStandIn]:
    s = NotifyStandIn(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", s.path)
    yield s
    s.close()


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("aerate-test")
    os.write(fd, data)
    return fd


BACKENDS = ["raw", "systemd"]


def _skip_without_systemd_python(backend: str) -> None:
    if backend == "systemd":
        pytest.importorskip("systemd.daemon", reason="systemd-python not installed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_sends_fdstore_message_with_the_fd(standin: NotifyStandIn, backend: str) -> None:
    _skip_without_systemd_python(backend)
    fd = memfd_with(b"held pages")
    try:
        assert fdstore.store([fd], "aerate-arena", backend=backend) is True
        msg, fds = standin.receive()
        assert msg.split("\n") == ["FDSTORE=1", "FDNAME=aerate-arena"]
        assert len(fds) == 1
        # The received fd is the same open file: same inode, same contents.
        assert os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino
        assert os.pread(fds[0], 10, 0) == b"held pages"
        os.close(fds[0])
    finally:
        os.close(fd)


def test_abstract_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"aerate-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert fdstore.remove("aerate-arena") is True
        assert sock.recv(4096) == b"FDSTOREREMOVE=1\nFDNAME=aerate-arena"


@pytest.mark.parametrize("backend", ["raw", "auto"])
def test_store_without_a_service_manager_says_so(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    fd = memfd_with(b"x")
    try:
        assert fdstore.store([fd], backend=backend) is False
    finally:
        os.close(fd)


def test_store_to_a_missing_socket_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with pytest.raises(fdstore.FdStoreError, match="nobody-listens"):
        fdstore.store([0], backend="raw")


def test_bad_names_are_refused() -> None:
    for name in ("", "a:b", "x" * 256, "new\nline"):
        with pytest.raises(ValueError):
            fdstore.store([0], name, backend="raw")


TAKER = """
import json, os, fcntl
from aerate.agent import fdstore
got = fdstore.take()
out = {}
for name, fds in got.items():
    out[name] = [
        [fd, os.pread(fd, 64, 0).decode(), bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)]
        for fd in fds
    ]
env = {k: os.environ.get(k) for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
print(json.dumps({"fds": out, "env": env}))
"""


def run_taker(fds: List[int], names: List[str]) -> Dict[str, object]:
    proc = spawn_with_listen_fds([sys.executable, "-c", TAKER], fds, names, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    result: Dict[str, object] = json.loads(out)
    return result


def test_take_returns_named_fds_at_3_cloexec_and_clears_env() -> None:
    a, b = memfd_with(b"arena"), memfd_with(b"other")
    try:
        got = run_taker([a, b], ["aerate-arena", "aerate-extra"])
    finally:
        os.close(a)
        os.close(b)
    assert got["fds"] == {
        "aerate-arena": [[3, "arena", True]],
        "aerate-extra": [[4, "other", True]],
    }
    assert got["env"] == {"LISTEN_FDS": None, "LISTEN_PID": None, "LISTEN_FDNAMES": None}


def test_take_without_names_files_fds_as_unknown() -> None:
    a = memfd_with(b"arena")
    try:
        got = run_taker([a], [])
    finally:
        os.close(a)
    assert got["fds"] == {"unknown": [[3, "arena", True]]}


def test_take_ignores_fds_meant_for_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert fdstore.take() == {}
    assert os.environ.get("LISTEN_FDS") == "1"  # not ours: left alone


def test_take_rejects_names_that_do_not_match_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "a:b")
    with pytest.raises(fdstore.FdStoreError, match="LISTEN_FDNAMES"):
        fdstore.take()


HOLDER = """
import os, signal, sys
from aerate.agent import fdstore
fd = os.memfd_create("aerate-arena")
os.write(fd, b"survives the holder")
assert fdstore.store([fd], "aerate-arena", backend=sys.argv[1])
print("stored", flush=True)
signal.pause()
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_fd_survives_sigkill_of_its_holder_and_reaches_the_next_process(
    standin: NotifyStandIn, backend: str
) -> None:
    _skip_without_systemd_python(backend)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, backend], stdout=subprocess.PIPE, text=True
    )
    kept: Optional[int] = None
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "stored"
        msg, fds = standin.receive()
        assert msg == "FDSTORE=1\nFDNAME=aerate-arena" and len(fds) == 1
        kept = fds[0]
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
        got = run_taker([kept], ["aerate-arena"])
        assert got["fds"] == {"aerate-arena": [[3, "survives the holder", True]]}
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if kept is not None:
            os.close(kept)
