"""The guest's virtio-serial port: open, read, write, and notice whether a host listens.

The Linux virtio console driver reports POLLHUP (and reads return EOF) while no host
program has the port's chardev open; writes then go nowhere. The agent must live through
that: it keeps the port open, stops polling it for input while the host is away (POLLHUP is
level-triggered and would spin the loop), and looks again at every tick.
"""

from __future__ import annotations

import errno
import os
import select
from typing import Optional

from .protocol import PORT_NAME

DEFAULT_PATH = "/dev/virtio-ports/" + PORT_NAME
#: Bytes kept for a host that reads slowly; beyond this, the oldest output is dropped
#: (stats are periodic and reports wait for acks, so nothing here must be kept forever).
OUT_MAX = 1 << 20


class PortError(OSError):
    """The port cannot be used; the message names it and what to check."""


class Port:
    """A non-blocking virtio-serial port (or any character device or FIFO in tests)."""

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        self.path = path
        self.fd = -1
        self._out = bytearray()
        self.host_connected = False

    def open(self) -> None:
        """Open the port; raise PortError saying what is missing."""
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PortError(errno.ENOENT, "%s does not exist: the VM has no virtio-serial "
                            "port named %s (add the channel to the domain, see "
                            "deploy/domain.py)" % (self.path, PORT_NAME)) from None
        except OSError as e:
            raise PortError(e.errno, "cannot open %s: %s" % (self.path, e.strerror)) from e

    def close(self) -> None:
        """Close the port."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fileno(self) -> int:
        """The file descriptor, for poll."""
        return self.fd

    def check_host(self) -> bool:
        """Poll without waiting: is a host program connected to the other end now?"""
        p = select.poll()
        p.register(self.fd, select.POLLIN | select.POLLOUT)
        events = p.poll(0)
        mask = events[0][1] if events else 0
        self.host_connected = not mask & (select.POLLHUP | select.POLLERR)
        return self.host_connected

    def read(self) -> Optional[bytes]:
        """Read what is there; b"" when nothing is, None when the host went away."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return b""
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENODEV):
                self.host_connected = False
                return None
            raise
        if not data:
            self.host_connected = False
            return None
        return data

    def queue(self, data: bytes) -> None:
        """Queue bytes to write (bounded: see OUT_MAX)."""
        self._out += data
        if len(self._out) > OUT_MAX:
            del self._out[:len(self._out) - OUT_MAX]

    def pending(self) -> bool:
        """Whether queued output waits for the port."""
        return bool(self._out)

    def flush(self) -> None:
        """Write as much queued output as the port takes now."""
        while self._out:
            try:
                n = os.write(self.fd, self._out)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENODEV):
                    # Nobody listens: what was queued would reach no one.
                    self._out.clear()
                    self.host_connected = False
                    return
                raise
            del self._out[:n]
