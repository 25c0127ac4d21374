"""Carry file descriptors (the arena memfd) across agent restarts through systemd's fd store.

Storing: a ``FDSTORE=1`` / ``FDNAME=<name>`` datagram with the fds attached (SCM_RIGHTS) to
``$NOTIFY_SOCKET`` -- what ``sd_pid_notify_with_fds()`` sends. The raw sender here needs
nothing beyond the standard library; systemd-python's ``notify()`` is used instead when
``backend="systemd"`` (or "auto" and it is installed). The unit needs
``FileDescriptorStoreMax=`` > 0 and a notify access that admits the agent.

Taking back: on start systemd passes stored fds from fd 3 on, with ``LISTEN_FDS``,
``LISTEN_PID`` and ``LISTEN_FDNAMES``, exactly like socket activation.

Without systemd a test (or any supervisor) can play systemd's part on the same path: bind
an AF_UNIX datagram socket, point NOTIFY_SOCKET at it, receive the fds with SCM_RIGHTS,
and start the next agent with the fds at 3.. and the three LISTEN_* variables.
"""

from __future__ import annotations

import array
import fcntl
import importlib
import os
import socket
from types import ModuleType
from typing import Dict, List, Optional, Sequence

ARENA_FDNAME = "aerate-arena"
SD_LISTEN_FDS_START = 3
#: Longest wait for a service manager's notify queue to take a blocking message (seconds).
SEND_TIMEOUT = 10.0
_ENV_KEYS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class FdStoreError(RuntimeError):
    """Storing or taking back fds failed; the message says which step and what to do."""


def _check_name(name: str) -> None:
    # systemd accepts up to 255 printable characters without ':' (the LISTEN_FDNAMES separator).
    if not name or len(name) > 255 or ":" in name or not name.isprintable():
        raise ValueError(f"invalid fd store name {name!r}: 1-255 printable characters, no ':'")


def notify_address(env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """The AF_UNIX address in ``$NOTIFY_SOCKET`` ('@' means abstract), or None when unset."""
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if not value.startswith("/"):
        raise FdStoreError(
            f"NOTIFY_SOCKET={value!r} is not an AF_UNIX path; this agent only speaks AF_UNIX"
        )
    return value


def send_notify(message: str, fds: Sequence[int] = (), address: Optional[str] = None,
                block: bool = True) -> bool:
    """Send one sd_notify datagram (with ``fds`` attached); False when there is no socket.

    With ``block=False`` a full notify queue drops the message (False) instead of stalling
    the caller: right for STATUS= and WATCHDOG= lines, never for FDSTORE=.
    """
    addr = address if address is not None else notify_address()
    if addr is None:
        return False
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # A service manager that reads nothing must not hang the agent for good.
            sock.settimeout(SEND_TIMEOUT if block else 0.0)
            sock.sendmsg([message.encode()], ancillary, 0, addr)
    except BlockingIOError:
        return False
    except OSError as exc:
        raise FdStoreError(
            f"sending {message.splitlines()[0]!r} to notify socket {addr!r} failed: {exc}"
        ) from exc
    return True


def _systemd_daemon() -> Optional[ModuleType]:
    try:
        return importlib.import_module("systemd.daemon")
    except ImportError:
        return None


def store(fds: Sequence[int], name: str = ARENA_FDNAME, backend: str = "auto") -> bool:
    """Hand ``fds`` to the service manager's fd store under ``name``.

    Returns False when not run by a service manager (no NOTIFY_SOCKET): nothing carries
    the fds then, so held pages die with the process. ``backend`` is "raw", "systemd"
    (systemd-python) or "auto" (systemd-python when importable).
    """
    _check_name(name)
    message = f"FDSTORE=1\nFDNAME={name}"
    if backend not in ("auto", "raw", "systemd"):
        raise ValueError(f"fd store backend must be auto, raw or systemd, not {backend!r}")
    daemon = _systemd_daemon() if backend != "raw" else None
    if backend == "systemd" and daemon is None:
        raise FdStoreError("fd store backend 'systemd' needs systemd-python (import systemd)")
    if daemon is not None:
        if notify_address() is None:
            return False
        try:
            sent = bool(daemon.notify(message, fds=list(fds)))
        except OSError as exc:
            raise FdStoreError(f"systemd notify({message!r}) failed: {exc}") from exc
        if not sent:
            raise FdStoreError(f"systemd notify({message!r}) sent nothing; check NOTIFY_SOCKET")
        return True
    return send_notify(message, fds)


def remove(name: str = ARENA_FDNAME) -> bool:
    """Ask the service manager to drop (and close) the fds stored under ``name``."""
    _check_name(name)
    return send_notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def take(unset_environment: bool = True) -> Dict[str, List[int]]:
    """Take the fds the service manager passed at start, grouped by name.

    Empty when LISTEN_PID is missing or names another process (the variables were meant for
    someone else). Each fd is made close-on-exec; the LISTEN_* variables are removed so
    children do not inherit them. Unnamed fds are filed under "unknown", as systemd does.
    """
    env = os.environ
    try:
        if int(env.get("LISTEN_PID", "0")) != os.getpid():
            return {}
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError as exc:
        raise FdStoreError(f"malformed LISTEN_PID/LISTEN_FDS in the environment: {exc}") from exc
    names_raw = env.get("LISTEN_FDNAMES")
    names = names_raw.split(":") if names_raw else []
    if names and len(names) != count:
        raise FdStoreError(
            f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}; "
            "the service manager and agent disagree"
        )
    out: Dict[str, List[int]] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as exc:
            raise FdStoreError(
                f"LISTEN_FDS={count} but fd {fd} is not open ({exc}); the passed fds were lost"
            ) from exc
        out.setdefault(names[i] if names else "unknown", []).append(fd)
    if unset_environment:
        for key in _ENV_KEYS:
            env.pop(key, None)
    return out
