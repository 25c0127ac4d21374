"""Boot a throwaway aerate guest under libvirt and drive it from the host.

``booted(image, ...)`` is the whole life of one test guest: start virtlogd/libvirtd if no
service manager did, put a qcow2 overlay over the cached image, create a transient domain
with a unique name, wait for qemu-guest-agent, then for a systemd unit (aerate-agent) to be
active, hand a :class:`Guest` to the caller, and always destroy the domain and remove the
overlay afterwards. ``Guest.run`` runs commands through qemu-guest-agent's ``guest-exec``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from aerate.deploy.domain import DomainSpec, detect_domain_type, domain_xml, hugepages_needed
from aerate.deploy.image import GuestImage, output_tail
from aerate.host.libvirt_conn import ensure_event_loop

URI = "qemu:///system"
HUGEPAGES_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
READY_UNIT = "aerate-agent.service"
# Under TCG on two host cores the guest needs about a minute to boot; leave ample margin.
DEFAULT_BOOT_TIMEOUT = 420.0


class HarnessError(RuntimeError):
    """The VM harness cannot do its job; the message names the missing piece."""


class BootError(HarnessError):
    """The guest did not become ready; the message carries the console tail."""


def run_dir() -> Path:
    """Per-run scratch space (overlays, sockets): $AERATE_RUN or /run/aerate."""
    return Path(os.environ.get("AERATE_RUN", "/run/aerate"))


def log_dir() -> Path:
    """Where serial console logs are kept: $AERATE_LOGS or /var/log/aerate."""
    return Path(os.environ.get("AERATE_LOGS", "/var/log/aerate"))


# ---------------------------------------------------------------------------------------------
# Daemons


@dataclass(frozen=True)
class Daemon:
    """A libvirt daemon this harness may have to start itself (no systemd as PID 1 here)."""

    name: str
    pidfile: Path
    socket: Path
    package: str


DAEMONS = (
    Daemon("virtlogd", Path("/run/virtlogd.pid"), Path("/run/libvirt/virtlogd-sock"),
           "libvirt-daemon-system"),
    Daemon("libvirtd", Path("/run/libvirtd.pid"), Path("/run/libvirt/libvirt-sock"),
           "libvirt-daemon-system"),
)


def _pid_alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def ensure_daemons(daemons: Sequence[Daemon] = DAEMONS, timeout: float = 30.0) -> list[str]:
    """Start each daemon (``NAME -d``) unless it already runs; return the names started.

    Raises HarnessError naming the daemon and its package when it is missing or does not
    come up.
    """
    started = []
    for d in daemons:
        if _pid_alive(d.pidfile) and _socket_accepts(d.socket):
            continue
        exe = shutil.which(d.name)
        if exe is None:
            raise HarnessError(
                f"{d.name} is not running and not installed: install the Debian package "
                f"{d.package} (deploy/setup-host does it)")
        proc = subprocess.run([exe, "-d"], capture_output=True, text=True, timeout=timeout,
                              check=False)
        if proc.returncode != 0:
            raise HarnessError(
                f"{d.name} -d failed (exit {proc.returncode}): "
                f"{output_tail(proc.stdout + proc.stderr, 10)}")
        deadline = time.monotonic() + timeout
        while not _socket_accepts(d.socket):
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"started {d.name} but its socket {d.socket} accepts no connection after "
                    f"{timeout:.0f}s; look at its log (journal or /var/log/libvirt)")
            time.sleep(0.1)
        started.append(d.name)
    return started


def connect(uri: str = URI) -> libvirt.virConnect:
    """Open ``uri`` with libvirt's event loop running, starting the daemons when needed."""
    ensure_event_loop()
    if uri == URI:
        ensure_daemons()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HarnessError(f"cannot connect to libvirt at {uri}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Host hugepages


@contextmanager
def reserved_hugepages(count: int, pool: Path = HUGEPAGES_2M) -> Iterator[None]:
    """Add ``count`` 2 MiB pages to the host pool for the block, and give them back after."""
    if count <= 0:
        yield
        return
    nr = pool / "nr_hugepages"
    before = int(nr.read_text())
    nr.write_text(str(before + count))
    got = int(nr.read_text()) - before
    try:
        if got < count:
            raise HarnessError(
                f"could reserve only {got} of {count} 2 MiB host hugepages in {nr}: host "
                f"memory is short or fragmented; free memory or run "
                f"`echo 1 > /proc/sys/vm/compact_memory` and retry")
        yield
    finally:
        now = int(nr.read_text())
        nr.write_text(str(max(0, now - max(got, 0))))


# ---------------------------------------------------------------------------------------------
# The guest


@dataclass
class Guest:
    """A running test domain and the ways into it."""

    conn: libvirt.virConnect
    dom: libvirt.virDomain
    spec: DomainSpec
    timings: dict[str, float] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _agent_up: bool = False
    _stopped: str = ""

    @property
    def name(self) -> str:
        """The libvirt domain name."""
        return self.spec.name

    # -- libvirt events (called on the event loop thread) --

    def on_lifecycle(self, event: int, detail: int) -> None:
        """Domain lifecycle event: remember why the domain stopped, if it did."""
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            with self._cond:
                self._stopped = f"event {event} detail {detail}"
                self._cond.notify_all()

    def on_agent(self, state: int) -> None:
        """qemu-guest-agent connected or went away in the guest."""
        with self._cond:
            connected = libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
            self._agent_up = state == connected
            self._cond.notify_all()

    def _wait(self, what: str, pred: Callable[[], bool], deadline: float) -> None:
        with self._cond:
            while not pred():
                if self._stopped:
                    raise BootError(self._with_console(
                        f"guest {self.name} stopped ({self._stopped}) while waiting for {what}"))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BootError(self._with_console(
                        f"guest {self.name}: no {what} after "
                        f"{time.monotonic() - self.timings['created']:.0f}s"))
                # Events drive this wait; the cap only bounds how stale a missed one can be.
                self._cond.wait(min(left, 2.0))

    # -- qemu-guest-agent --

    def agent_command(self, execute: str, arguments: dict[str, Any] | None = None,
                      timeout: int = 10) -> Any:
        """Run one qemu-guest-agent command; return its ``return`` value."""
        cmd: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            cmd["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(cmd), timeout, 0)
        except libvirt.libvirtError as exc:
            raise HarnessError(f"guest {self.name}: guest agent {execute} failed: {exc}") from exc
        return json.loads(reply).get("return")

    def wait_guest_agent(self, deadline: float) -> None:
        """Block until qemu-guest-agent answers a ping."""
        while True:
            self._wait("qemu-guest-agent connection", lambda: self._agent_up, deadline)
            try:
                self.agent_command("guest-ping", timeout=5)
                return
            except HarnessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # connected port, agent not serving yet: nothing to wait on

    def run(self, cmd: str | Sequence[str], timeout: float = 120.0,
            stdin: bytes | None = None) -> tuple[int, str, str]:
        """Run ``cmd`` in the guest (a string goes to ``sh -c``); return (rc, stdout, stderr).

        The command is killed in the guest after ``timeout`` seconds (rc 124, like timeout(1)).
        """
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        argv = ["timeout", "-k", "5", str(int(timeout)), *argv]
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = self.agent_command("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout + 30
        delay = 0.02
        while True:
            st = self.agent_command("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                raise HarnessError(f"guest {self.name}: {shlex.join(argv)} never finished")
            # guest-exec has no completion event; back off to at most 0.5 s between polls.
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
        rc = st.get("exitcode")
        if rc is None:
            rc = 128 + int(st.get("signal", 0))
        return int(rc), out, err

    def check(self, cmd: str | Sequence[str], timeout: float = 120.0) -> str:
        """Run ``cmd`` in the guest and return stdout; HarnessError with its output if rc != 0."""
        rc, out, err = self.run(cmd, timeout)
        if rc != 0:
            raise HarnessError(f"guest {self.name}: {cmd!r} exited {rc}\n"
                               f"stdout: {output_tail(out, 20)}\nstderr: {output_tail(err, 20)}")
        return out

    def wait_unit_active(self, unit: str, deadline: float) -> None:
        """Block until ``systemctl is-active unit`` says active (the loop runs in the guest)."""
        left = int(max(1, deadline - time.monotonic()))
        q = shlex.quote(unit)
        rc, _out, _ = self.run(f"until systemctl is-active -q {q}; do sleep 0.2; done", left)
        if rc != 0:
            _, status, _ = self.run(f"systemctl status --no-pager -l {q}; "
                                    f"journalctl -b --no-pager -n 60 -u {q}", 60)
            raise BootError(self._with_console(
                f"guest {self.name}: {unit} not active after {left}s\n{status}"))

    # -- the aerate channel --

    def open_channel(self, timeout: float = 10.0) -> socket.socket:
        """Connect to the host end of ``org.aerate.agent.0`` (QEMU listens; one client)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(self.spec.agent_socket))
        except OSError as exc:
            s.close()
            raise HarnessError(f"guest {self.name}: cannot connect to the aerate channel "
                               f"{self.spec.agent_socket}: {exc}") from exc
        return s

    # -- diagnostics --

    def console(self) -> str:
        """The serial console log so far."""
        try:
            return self.spec.serial_log.read_text(errors="replace")
        except OSError as exc:
            return f"(no serial log at {self.spec.serial_log}: {exc})"

    def _with_console(self, msg: str) -> str:
        return (f"{msg}\n--- serial console tail ({self.spec.serial_log}) ---\n"
                f"{output_tail(self.console(), 60)}")

    def diagnostics(self) -> dict[str, str]:
        """Serial console and guest journal, for a failed test's report."""
        out = {"serial console": self.console()}
        try:
            # qemu-ga logs every guest-exec call (ours): drop that noise.
            _, journal, _ = self.run(
                "journalctl -b --no-pager -o short-monotonic | grep -v 'qemu-ga.*guest-exec' "
                "| tail -n 400; systemctl --failed --no-pager", 60)
            out["guest journal"] = journal
        except HarnessError as exc:
            out["guest journal"] = f"(unavailable: {exc})"
        return out


@contextmanager
def _overlay(base: Path, path: Path) -> Iterator[Path]:
    """A qcow2 overlay on ``base`` at ``path`` so the cached image stays clean."""
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base),
                           "-F", "raw", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"qemu-img create overlay {path} over {base} failed: "
                           f"{proc.stderr.strip()}")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _keep_recent_logs(directory: Path, keep: int = 30) -> None:
    logs = sorted(directory.glob("*-serial.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-keep]:
        old.unlink(missing_ok=True)


@contextmanager
def booted(image: GuestImage, *, backing: str = "memfd", memory_mib: int = 1024,
           vcpus: int = 2, free_page_reporting: bool = False,
           extra_devices: Sequence[str] = (), extra_domain: Sequence[str] = (),
           ready_unit: str | None = READY_UNIT, timeout: float = DEFAULT_BOOT_TIMEOUT,
           name_prefix: str = "aerate-test", persistent: bool = False,
           domain_type: str | None = None) -> Iterator[Guest]:
    """Boot a guest from ``image`` and yield it once ``ready_unit`` is active.

    Always destroys (and, if ``persistent``, undefines) the domain and removes its overlay
    and sockets, whatever happens. ``Guest.timings`` holds ``boot_to_agent`` and
    ``boot_to_ready`` in seconds.
    """
    image.check()
    name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    work = run_dir() / name
    logs = log_dir()
    with ExitStack() as stack:
        conn = connect()
        stack.callback(conn.close)
        kind = domain_type or detect_domain_type(image.kernel)
        work.mkdir(parents=True, exist_ok=True)
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        logs.mkdir(parents=True, exist_ok=True)
        _keep_recent_logs(logs)
        disk = stack.enter_context(_overlay(image.root, work / "disk.qcow2"))
        spec = DomainSpec(
            name=name, kernel=image.kernel, initrd=image.initrd, disk=disk,
            agent_socket=work / "aerate.sock", serial_log=logs / f"{name}-serial.log",
            backing=backing, memory_mib=memory_mib, vcpus=vcpus, domain_type=kind,
            free_page_reporting=free_page_reporting, extra_devices=tuple(extra_devices),
            extra_domain=tuple(extra_domain),
        )
        xml = domain_xml(spec)
        stack.enter_context(reserved_hugepages(hugepages_needed(spec)))
        created = time.monotonic()
        try:
            if persistent:
                dom = conn.defineXML(xml)
                stack.callback(_undefine, dom)
                dom.create()
            else:
                dom = conn.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise BootError(f"libvirt refused to start domain {name} ({kind}, {backing}): "
                            f"{exc}\n--- domain XML ---\n{xml}") from exc
        guest = Guest(conn=conn, dom=dom, spec=spec)
        guest.timings["created"] = created
        stack.callback(_destroy, dom)
        ids = [
            conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                lambda _c, _d, ev, det, _o: guest.on_lifecycle(ev, det), None),
            conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE,
                lambda _c, _d, st, _r, _o: guest.on_agent(st), None),
        ]
        for cb_id in ids:
            stack.callback(_deregister, conn, cb_id)
        # The agent may have connected before the callbacks were in place.
        guest._agent_up = _agent_connected(dom)
        deadline = created + timeout
        guest.wait_guest_agent(deadline)
        guest.timings["boot_to_agent"] = round(time.monotonic() - created, 1)
        if ready_unit:
            guest.wait_unit_active(ready_unit, deadline)
        guest.timings["boot_to_ready"] = round(time.monotonic() - created, 1)
        yield guest


def _agent_connected(dom: libvirt.virDomain) -> bool:
    try:
        libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 2, 0)
    except libvirt.libvirtError:
        return False
    return True


def _destroy(dom: libvirt.virDomain) -> None:
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            print(f"aerate harness: destroying {dom.name()} failed: {exc}", file=sys.stderr)


def _undefine(dom: libvirt.virDomain) -> None:
    try:
        dom.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            print(f"aerate harness: undefining {dom.name()} failed: {exc}", file=sys.stderr)


def _deregister(conn: libvirt.virConnect, cb_id: int) -> None:
    # A connection already gone took its callbacks with it.
    with contextlib.suppress(libvirt.libvirtError):
        conn.domainEventDeregisterAny(cb_id)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aerate.deploy.vm [SHAPE]``: boot a guest, print how to reach it, wait."""
    import argparse

    from aerate.deploy.image import ImageError, ensure_image

    ap = argparse.ArgumentParser(prog="python -m aerate.deploy.vm", description=__doc__)
    ap.add_argument("backing", nargs="?", default="memfd",
                    choices=("memfd", "hugetlbfs", "private"))
    ap.add_argument("--memory-mib", type=int, default=1024)
    ap.add_argument("--free-page-reporting", action="store_true")
    args = ap.parse_args(argv)
    try:
        image = ensure_image()
        with booted(image, backing=args.backing, memory_mib=args.memory_mib,
                    free_page_reporting=args.free_page_reporting,
                    name_prefix="aerate-demo") as guest:
            print(json.dumps({"domain": guest.name, "channel": str(guest.spec.agent_socket),
                              "serial_log": str(guest.spec.serial_log), **guest.timings}))
            print(f"virsh console {guest.name}   # Ctrl-C here destroys it", flush=True)
            threading.Event().wait()
    except KeyboardInterrupt:
        return 0
    except (HarnessError, ImageError) as exc:
        print(f"aerate vm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
