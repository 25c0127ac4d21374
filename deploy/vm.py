"""Boot a throwaway aerate guest under libvirt and drive it from the host.

``booted(image, ...)`` is the whole life of one test guest: start virtlogd/libvirtd if no
service manager did, put a qcow2 overlay over the cached image, create a transient domain
with a unique name, wait for qemu-guest-agent, then for a systemd unit (aerate-agent) to be
active, hand a :class:`Guest` to the caller, and always destroy the domain and remove the
overlay afterwards. ``Guest.run`` runs commands through ``guest-exec`` of a qemu-guest-agent
on the harness port, reached over its own socket (:mod:`aerate.deploy.qga`), so commands keep
working while libvirtd is stopped; the domain is torn down even if a test left libvirtd
stopped or the test process was killed (:func:`reap_stale`, at the next boot).
"""

from __future__ import annotations

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
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from aerate.deploy.domain import (
    DEFAULT_CMDLINE,
    DomainSpec,
    detect_domain_type,
    domain_xml,
    hugepages_needed,
)
from aerate.deploy.image import GuestImage, output_tail
from aerate.deploy.qga import QgaClient, QgaError
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


class Guest:
    """A running test domain and the ways into it.

    Commands go to a qemu-guest-agent on the harness port, straight over its socket, so they
    work while libvirtd is down. ``conn`` and ``dom`` reconnect to libvirtd when it restarted.
    """

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain, spec: DomainSpec,
                 qga: QgaClient) -> None:
        self._conn = conn
        self._dom = dom
        self.spec = spec
        self.qga = qga
        self.timings: dict[str, float] = {}
        self._cond = threading.Condition()
        self._stopped = ""

    @property
    def name(self) -> str:
        """The libvirt domain name."""
        return self.spec.name

    # -- libvirt, surviving a libvirtd restart --

    @property
    def conn(self) -> libvirt.virConnect:
        """A live libvirt connection (reopened if libvirtd restarted since)."""
        if not self._alive():
            try:
                self._conn = libvirt.open(URI)
                self._dom = self._conn.lookupByName(self.name)
            except libvirt.libvirtError as exc:
                raise HarnessError(f"guest {self.name}: cannot reach libvirt again at {URI}: "
                                   f"{exc}; is libvirtd running?") from exc
        return self._conn

    @property
    def dom(self) -> libvirt.virDomain:
        """The libvirt domain, on a live connection."""
        _ = self.conn
        return self._dom

    def _alive(self) -> bool:
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def destroy(self, timeout: float = 60.0) -> None:
        """Stop the domain now; starts libvirtd first if a test left it stopped."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not self._alive():
                    ensure_daemons()
                _destroy(self.dom)
                return
            except HarnessError as exc:
                if time.monotonic() > deadline:
                    print(f"aerate harness: could not destroy {self.name}: {exc}",
                          file=sys.stderr)
                    return
                time.sleep(1.0)  # libvirtd is coming back: retry

    def start_again(self, timeout: float = DEFAULT_BOOT_TIMEOUT) -> None:
        """Start the stopped (persistent) domain again and wait, as ``booted`` does, until
        the harness's guest agent answers and READY_UNIT is active."""
        with self._cond:
            self._stopped = ""
        self.qga.close()
        created = time.monotonic()
        try:
            self.dom.create()
        except libvirt.libvirtError as exc:
            raise BootError(f"libvirt refused to start domain {self.name} again: {exc}") \
                from exc
        deadline = created + timeout
        self.wait_guest_agent(deadline)
        self.wait_unit_active(READY_UNIT, deadline)

    def close(self) -> None:
        """Close the agent socket and a libvirt connection this guest reopened."""
        self.qga.close()
        _close(self._conn)

    # -- libvirt events (called on the event loop thread) --

    def on_lifecycle(self, event: int, detail: int) -> None:
        """Domain lifecycle event: remember why the domain stopped, if it did."""
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            with self._cond:
                self._stopped = f"event {event} detail {detail}"
                self._cond.notify_all()

    # -- guest agent --

    def wait_guest_agent(self, deadline: float) -> None:
        """Block until the harness's guest agent answers (or the domain stopped)."""
        # Each try blocks on the socket for up to 2 s: the answer ends the wait at once.
        while not self.qga.try_sync(timeout=2.0):
            with self._cond:
                stopped = self._stopped
            if stopped:
                raise BootError(self._with_console(
                    f"guest {self.name} stopped ({stopped}) while booting"))
            if time.monotonic() > deadline:
                raise BootError(self._with_console(
                    f"guest {self.name}: no answer from {self.qga.describe()} after "
                    f"{time.monotonic() - self.timings['created']:.0f}s"))

    def agent_command(self, execute: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any:
        """Run one qemu-guest-agent command; return its ``return`` value."""
        try:
            return self.qga.command(execute, arguments, timeout)
        except QgaError as exc:
            raise HarnessError(str(exc)) from exc

    def run(self, cmd: str | Sequence[str], timeout: float = 120.0,
            stdin: bytes | None = None) -> tuple[int, str, str]:
        """Run ``cmd`` in the guest (a string goes to ``sh -c``); return (rc, stdout, stderr).

        The command is killed in the guest after ``timeout`` seconds (rc 124, like timeout(1)).
        """
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        argv = ["timeout", "-k", "5", str(int(timeout)), *argv]
        try:
            return self.qga.exec(argv, stdin, timeout + 30)
        except QgaError as exc:
            raise HarnessError(f"{exc} (running {shlex.join(argv)})") from exc

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


def _process_token(pid: int) -> str:
    """pid plus its start time: survives nothing but that very process (pids get reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"


def reap_stale(conn: libvirt.virConnect, root: Path | None = None) -> list[str]:
    """Destroy domains and remove work dirs left by harness processes that died (SIGKILL).

    Each work dir records its owner process; a dir whose owner is gone, or that has no owner
    record and no domain, is stale. So is a running domain whose disk lies in a work dir that
    no longer exists. Returns the names reaped.
    """
    root = root or run_dir()
    reaped = []
    for work in sorted(root.glob("aerate-*")) if root.is_dir() else []:
        owner = work / "owner"
        try:
            token = owner.read_text().strip()
        except OSError:
            token = ""
        if token and _process_token(int(token.split()[0])) == token:
            continue  # its harness is alive
        try:
            dom = conn.lookupByName(work.name)
        except libvirt.libvirtError:
            dom = None
        if dom is not None:
            if not token:
                continue  # not made by this harness version: leave it alone
            _destroy_for_good(dom)
        shutil.rmtree(work, ignore_errors=True)
        reaped.append(work.name)
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        work = root / dom.name()
        if not dom.name().startswith("aerate-") or work.exists():
            continue
        disks = [el.get("file") for el in
                 ET.fromstring(dom.XMLDesc(0)).iterfind("devices/disk/source")]
        if str(work / "disk.qcow2") in disks:
            _destroy_for_good(dom)
            reaped.append(dom.name())
    return reaped


def _destroy_for_good(dom: libvirt.virDomain) -> None:
    persistent = dom.isPersistent()
    _destroy(dom)
    if persistent:
        _undefine(dom)


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
           domain_type: str | None = None, on_reboot: str = "destroy",
           extra_cmdline: str = "", firmware: str = "seabios") -> Iterator[Guest]:
    """Boot a guest from ``image`` and yield it once ``ready_unit`` is active.

    Always destroys (and, if ``persistent``, undefines) the domain and removes its overlay
    and sockets, whatever happens. ``Guest.timings`` holds ``boot_to_agent`` and
    ``boot_to_ready`` in seconds. ``extra_cmdline`` is appended to the guest kernel's
    command line (e.g. ``page_poison=1``). ``firmware="ovmf-smm"`` boots through OVMF with
    SMM on (its variable store lives in the work dir).
    """
    image.check()
    name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    work = run_dir() / name
    logs = log_dir()
    with ExitStack() as stack:
        conn = connect()
        stack.callback(_close, conn)
        kind = domain_type or detect_domain_type(image.kernel)
        reap_stale(conn)
        work.mkdir(parents=True, exist_ok=True)
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        (work / "owner").write_text(_process_token(os.getpid()) + "\n")
        logs.mkdir(parents=True, exist_ok=True)
        _keep_recent_logs(logs)
        disk = stack.enter_context(_overlay(image.root, work / "disk.qcow2"))
        spec = DomainSpec(
            name=name, kernel=image.kernel, initrd=image.initrd, disk=disk,
            agent_socket=work / "aerate.sock", serial_log=logs / f"{name}-serial.log",
            harness_socket=work / "harness-ga.sock",
            backing=backing, memory_mib=memory_mib, vcpus=vcpus, domain_type=kind,
            free_page_reporting=free_page_reporting, extra_devices=tuple(extra_devices),
            extra_domain=tuple(extra_domain), on_reboot=on_reboot,
            firmware=firmware, nvram=work / "OVMF_VARS.fd" if firmware != "seabios" else None,
            cmdline=f"{DEFAULT_CMDLINE} {extra_cmdline}".strip(),
        )
        xml = domain_xml(spec)
        stack.enter_context(reserved_hugepages(hugepages_needed(spec)))
        created = time.monotonic()
        guest: Guest | None = None
        try:
            if persistent:
                dom = conn.defineXML(xml)
                # Undefine through the guest once it exists: libvirtd may have restarted.
                stack.callback(lambda: _undefine(guest.dom if guest else dom))
                dom.create()
            else:
                dom = conn.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise BootError(f"libvirt refused to start domain {name} ({kind}, {backing}): "
                            f"{exc}\n--- domain XML ---\n{xml}") from exc
        guest = Guest(conn=conn, dom=dom, spec=spec,
                      qga=QgaClient(work / "harness-ga.sock", name))
        guest.timings["created"] = created
        stack.callback(guest.close)
        stack.callback(guest.destroy)
        cb_id = conn.domainEventRegisterAny(
            dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            lambda _c, _d, ev, det, _o: guest.on_lifecycle(ev, det), None)
        stack.callback(_deregister, guest, cb_id)
        deadline = created + timeout
        guest.wait_guest_agent(deadline)
        guest.timings["boot_to_agent"] = round(time.monotonic() - created, 1)
        if ready_unit:
            guest.wait_unit_active(ready_unit, deadline)
        guest.timings["boot_to_ready"] = round(time.monotonic() - created, 1)
        yield guest


def _destroy(dom: libvirt.virDomain) -> None:
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            print(f"aerate harness: destroying {dom.name()} failed: {exc}", file=sys.stderr)


def _close(conn: libvirt.virConnect) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def _undefine(dom: libvirt.virDomain) -> None:
    try:
        dom.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            print(f"aerate harness: undefining {dom.name()} failed: {exc}", file=sys.stderr)


def _deregister(guest: Guest, cb_id: int) -> None:
    # A connection already gone (libvirtd restarted) took its callbacks with it.
    if guest._alive():
        with contextlib.suppress(libvirt.libvirtError):
            guest._conn.domainEventDeregisterAny(cb_id)


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
