"""A bare QEMU (TCG, no guest OS, no default devices) with a QMP socket.

For what needs a real QEMU process and its monitor but no booted guest: the monitor
captures under tests/data/qemu/ and the host tier's punch tests. Guests that boot go
through libvirt (:mod:`aerate.deploy.vm`); the daemon talks to QEMU only through libvirt.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import IO, Any

QEMU_BINARY = "qemu-system-x86_64"


class Qmp:
    """A minimal QMP client on a unix socket. Calling it runs a command, the shape
    :func:`aerate.host.qemu_map.gather` takes."""

    def __init__(self, path: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        # QEMU creates the socket some time after exec; poll until it listens or dies.
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {proc.returncode} before QMP came up "
                                   f"on {path}")
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # the greeting
        self("qmp_capabilities")

    def __call__(self, command: str, arguments: Any = None) -> Any:
        """Run one QMP command; return its result (events in between are skipped)."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"QMP closed while waiting for {command}")
            reply = json.loads(line)
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            return reply["return"]

    def hmp(self, line: str) -> str:
        """Run one human-monitor command line; return its text output."""
        out: str = self("human-monitor-command", {"command-line": line})
        return out

    def close(self) -> None:
        """Close the connection (QEMU keeps running)."""
        self.file.close()
        self.sock.close()


class BareQemu:
    """A running QEMU process and its QMP connection; a context manager that kills it."""

    def __init__(self, args: Sequence[str], sock: str, *, stopped: bool = True,
                 log: IO[bytes] | None = None) -> None:
        """Start QEMU with ``args`` (machine, memory, devices) and connect to its QMP
        ``sock``. ``stopped`` adds -S (no instruction runs); QEMU's output goes to ``log``
        (default: stdout discarded, stderr inherited). QEMU is killed if QMP does not come up.
        """
        argv = [QEMU_BINARY, "-nodefaults", "-display", "none", "-accel", "tcg", *args,
                "-qmp", f"unix:{sock},server=on,wait=off"]
        if stopped:
            argv.append("-S")
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=log or subprocess.DEVNULL, stderr=log)
        try:
            self.qmp = Qmp(sock, self.proc)
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL QEMU (if it still runs) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> BareQemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.qmp.close()
        self.kill()
