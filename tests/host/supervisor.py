"""Playing systemd's part for tests that run agents without a service manager.

The test binds NOTIFY_SOCKET, receives fds with SCM_RIGHTS (the fd store), and starts the
next process with the fds at 3.. and LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES, the way
systemd hands its fd store back to a restarted service.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
from typing import Dict, List, Tuple

# Moves the given fds to 3.. and sets LISTEN_* for its own pid, then execs the real program:
# the part systemd plays between fork and exec.
TRAMPOLINE = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",") if x]
# Park copies far above the targets first so that no dup2 clobbers a source.
copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(copies):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
if sys.argv[2]:
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.execv(sys.argv[3], sys.argv[3:])
"""


class NotifyStandIn:
    """systemd's end of NOTIFY_SOCKET: a bound AF_UNIX datagram socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(30)

    def receive(self) -> Tuple[str, List[int]]:
        """One notification and the fds attached to it (now owned by the caller)."""
        fd_size = array.array("i").itemsize
        msg, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * fd_size))
        fds: List[int] = []
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(data[: len(data) - len(data) % fd_size])
                fds.extend(got)
        return msg.decode(), fds

    def close(self) -> None:
        self.sock.close()


def spawn_with_listen_fds(
    argv: List[str], fds: List[int], names: List[str], **popen: object
) -> subprocess.Popen[str]:
    """Start ``argv`` as systemd would start a service with a non-empty fd store."""
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", TRAMPOLINE, ",".join(map(str, fds)), ":".join(names), *argv],
        pass_fds=fds,
        text=True,
        **popen,
    )


class FdStoreStandIn(NotifyStandIn):
    """systemd's fd store for one service: keeps what ``FDSTORE=1`` sends, drops what
    ``FDSTOREREMOVE=1`` names, and :meth:`flush` closes everything, which is what systemd
    does when the unit stops (any version without FileDescriptorStorePreserve=yes; on
    systemd < 254 always), e.g. after the main process was SIGKILLed and the start limit
    hit, or on ``systemctl stop``."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.stored: Dict[str, List[int]] = {}
        self.messages: List[str] = []

    def drain(self) -> None:
        """Take every notification waiting on the socket (never blocks)."""
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    msg, fds = self.receive()
                except BlockingIOError:
                    return
                self.messages.append(msg)
                fields = dict(line.partition("=")[::2] for line in msg.splitlines())
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTORE") == "1":
                    self.stored.setdefault(name, []).extend(fds)
                else:
                    for fd in fds:
                        os.close(fd)
                if fields.get("FDSTOREREMOVE") == "1":
                    for fd in self.stored.pop(name, []):
                        os.close(fd)
        finally:
            self.sock.settimeout(30)

    def flush(self) -> int:
        """Close every stored fd, as systemd does on stop; return how many there were."""
        self.drain()
        n = 0
        for fds in self.stored.values():
            for fd in fds:
                os.close(fd)
                n += 1
        self.stored.clear()
        return n

    def close(self) -> None:
        self.flush()
        super().close()
