"""A qemu-guest-agent client that talks to the guest's harness port directly, not via libvirt.

The test guest runs a second qemu-ga on the virtio-serial port ``org.aerate.harness.0``; its
host end is a unix socket QEMU listens on. Commands therefore keep working while libvirtd is
stopped or restarted (the fault tier does both). Protocol: JSON commands; after every
(re)connect or lost reply, ``guest-sync-delimited`` with a fresh id, whose answer is prefixed
by 0xFF, so stale replies buffered in the channel are skipped.
"""

from __future__ import annotations

import base64
import json
import random
import select
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aerate.deploy.domain import HARNESS_PORT

MAX_REPLY = 64 << 20


class QgaError(RuntimeError):
    """The guest agent did not answer, or answered with an error."""


class QgaClient:
    """One connection to a guest agent's unix socket; thread-safe, reconnects on demand."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._synced = False
        self._lock = threading.Lock()

    def close(self) -> None:
        """Drop the connection (the next command reconnects)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._buf.clear()
        self._synced = False

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
            except OSError as exc:
                s.close()
                raise QgaError(f"guest {self.name}: cannot connect to its agent socket "
                               f"{self.path}: {exc}") from exc
            self._sock = s
        return self._sock

    def _send(self, msg: dict[str, Any]) -> None:
        sock = self._connect()
        try:
            sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            self._drop()
            raise QgaError(f"guest {self.name}: agent socket write failed: {exc}") from exc

    def _read_line(self, deadline: float) -> bytes | None:
        """Next line (without newline), or None at the deadline."""
        sock = self._connect()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                return None
            try:
                data = sock.recv(1 << 16)
            except OSError as exc:
                self._drop()
                raise QgaError(f"guest {self.name}: agent socket read failed: {exc}") from exc
            if not data:
                self._drop()
                raise QgaError(f"guest {self.name}: QEMU closed the agent socket {self.path}")
            self._buf += data
            if len(self._buf) > MAX_REPLY:
                self._drop()
                raise QgaError(f"guest {self.name}: agent reply over {MAX_REPLY} bytes")
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf[:] = rest
        return line

    def _sync(self, timeout: float) -> bool:
        """One guest-sync-delimited round; True when the guest answered this very id."""
        sync_id = random.getrandbits(31)
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}})
        deadline = time.monotonic() + timeout
        while True:
            line = self._read_line(deadline)
            if line is None:
                return False
            if b"\xff" not in line:
                continue  # a stale reply from before this sync
            try:
                reply = json.loads(line.rpartition(b"\xff")[2])
            except ValueError:
                continue
            if isinstance(reply, dict) and reply.get("return") == sync_id:
                self._synced = True
                return True

    def try_sync(self, timeout: float) -> bool:
        """True if the guest agent answers a sync within ``timeout`` (it may not run yet)."""
        with self._lock:
            try:
                return self._sync(timeout)
            except QgaError:
                return False

    def describe(self) -> str:
        """Where this client talks to, for messages."""
        return f"the guest agent on {HARNESS_PORT} ({self.path})"

    def command(self, execute: str, arguments: dict[str, Any] | None = None,
                timeout: float = 30.0) -> Any:
        """Run one agent command and return its ``return`` value."""
        msg: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        with self._lock:
            if not self._synced and not self._sync(timeout=min(timeout, 10.0)):
                raise QgaError(f"guest {self.name}: agent does not answer a sync ({execute})")
            self._send(msg)
            line = self._read_line(time.monotonic() + timeout)
            while line is not None and not line.strip():
                line = self._read_line(time.monotonic() + timeout)
            if line is None:
                self._synced = False  # a late reply may still come: resync next time
                raise QgaError(f"guest {self.name}: no reply to {execute} in {timeout:.0f}s")
            try:
                reply = json.loads(line)
            except ValueError as exc:
                self._synced = False
                raise QgaError(f"guest {self.name}: bad reply to {execute}: {line[:200]!r}"
                               ) from exc
        if "error" in reply:
            raise QgaError(f"guest {self.name}: {execute} failed: {reply['error']}")
        return reply.get("return")

    def exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float
             ) -> tuple[int, str, str]:
        """guest-exec ``argv``, wait for it, return (rc, stdout, stderr)."""
        args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = self.command("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            st = self.command("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                raise QgaError(f"guest {self.name}: {list(argv)} did not finish in "
                               f"{timeout:.0f}s")
            # guest-exec has no completion event: back off to at most 0.5 s between polls.
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
        rc = st.get("exitcode")
        if rc is None:
            rc = 128 + int(st.get("signal", 0))
        return int(rc), out, err
