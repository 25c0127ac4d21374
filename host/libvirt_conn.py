"""The one place in aerate that talks to libvirt.

One connection to qemu:///system, driven by libvirt's default event loop in a thread of
its own (domain lifecycle and device events arrive there, and keepalive runs there). When
libvirtd goes away the close callback fires and a supervisor thread reconnects with
exponential backoff, re-registers the events and tells the owner through `on_connect`,
so the owner resynchronises from `running_domains()` instead of polling.

Callbacks run on libvirt's event thread: keep them short and hand work to your own loop.

Calls. Every RPC the daemon makes (job state, XML, QMP/HMP passthrough, the balloon,
metadata) runs on a pool thread (host/vm_worker.py), and each such thread has a call
connection of its own, opened on its first call and again after every reconnect of the
event connection. One shared connection would let one VM stall every other: measured on
this host's libvirt 9.0 with one SIGSTOPped QEMU whose query-migrate never returns, every
other VM's calls on the same connection waited for the client's next keepalive tick, 5 s
again and again (1 s with a 1 s keepalive; without the event loop they waited for good),
so healthy VMs' refreshes timed out and they were refused (tests/vm/test_hung_neighbour.py
saw it once in five runs). On its own connection a stuck call holds up nothing but its own
thread, which the VM's worker already accounts for (one per hung VM). The call
connections carry no events and no keepalive: a libvirtd that dies closes their sockets
(their calls fail), and a hung one is the call timeout's business.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu

from aerate.host.backing import Backing
from aerate.host.backing import resolve as resolve_backings
from aerate.host.qemu_map import GuestMemoryMap, build_map, gather
from aerate.host.refusal import JobInfo

log = logging.getLogger("aerate.host.libvirt")

DEFAULT_URI = "qemu:///system"
AGENT_CHANNEL = "org.aerate.agent.0"
PID_DIR = "/run/libvirt/qemu"

LIFECYCLE_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

_JOB_OPERATIONS = {
    0: "unknown", 1: "start", 2: "save", 3: "restore", 4: "migration-in",
    5: "migration-out", 6: "snapshot", 7: "snapshot-revert", 8: "dump", 9: "backup",
    10: "snapshot-delete",
}
_PAUSED_REASONS = {
    0: "unknown", 1: "user", 2: "migration", 3: "save", 4: "dump", 5: "ioerror",
    6: "watchdog", 7: "from-snapshot", 8: "shutting-down", 9: "snapshot", 10: "crashed",
    11: "starting-up", 12: "postcopy", 13: "postcopy-failed", 14: "api-error",
}


class LibvirtUnavailable(RuntimeError):
    """No live connection to libvirtd right now (it restarts; the supervisor reconnects)."""


class DomainError(RuntimeError):
    """A libvirt call about one domain failed; the message names the domain."""


@dataclass(frozen=True)
class DomainRef:
    """A running domain as libvirt lists it."""

    name: str
    uuid: str
    id: int


@dataclass(frozen=True)
class LifecycleEvent:
    """A domain lifecycle event: event is one of LIFECYCLE_EVENTS' names."""

    name: str
    uuid: str
    event: str
    detail: int


_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def _log_libvirt_error(ctx: object, err: tuple[Any, ...]) -> None:
    log.debug("libvirt: %s", err[2] if len(err) > 2 else err)


def ensure_event_loop() -> None:
    """Register libvirt's default event loop once per process and run it in a thread.

    Must happen before the first connection is opened, or that connection gets no
    events and no keepalive.
    """
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; ours are raised and logged.
        libvirt.registerErrorHandler(_log_libvirt_error, None)

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _loop_thread.start()


def channel_path(domain_xml: str, channel: str = AGENT_CHANNEL) -> str | None:
    """Unix socket path of the virtio-serial channel named `channel` in a live domain XML."""
    root = ET.fromstring(domain_xml)
    for ch in root.findall("devices/channel"):
        target = ch.find("target")
        if target is None or target.get("type") != "virtio" or target.get("name") != channel:
            continue
        source = ch.find("source")
        if ch.get("type") == "unix" and source is not None and source.get("path"):
            return source.get("path")
    return None


def channel_alias(domain_xml: str, channel: str = AGENT_CHANNEL) -> str | None:
    """QEMU's id of the virtio-serial channel named ``channel`` (its live XML <alias>), the
    ``id`` QEMU's VSERPORT_CHANGE events carry; None when the XML has none."""
    root = ET.fromstring(domain_xml)
    for ch in root.findall("devices/channel"):
        target = ch.find("target")
        alias = ch.find("alias")
        if target is not None and target.get("name") == channel and alias is not None:
            return alias.get("name")
    return None


@dataclass(frozen=True)
class BalloonLimits:
    """What the domain XML says about how far its balloon may be inflated."""

    present: bool  # a <memballoon model='virtio'> exists
    autodeflate: bool  # <memballoon autodeflate='on'>: the guest may deflate under OOM
    min_guarantee: int  # <memtune><min_guarantee>, bytes (0 when absent)


_UNITS = {"b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20,
          "mib": 1 << 20, "mb": 1000**2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3,
          "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4}


def balloon_limits(domain_xml: str) -> BalloonLimits:
    """Parse the memballoon's autodeflate and <memtune><min_guarantee> (libvirt units,
    KiB by default) from a domain XML; raises DomainError on an unreadable value."""
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as e:
        raise DomainError(f"the domain XML libvirt gave cannot be parsed: {e}") from e
    name = root.findtext("name", "?")
    bal = root.find("devices/memballoon")
    present = bal is not None and bal.get("model") == "virtio"
    autodeflate = bal is not None and bal.get("autodeflate") == "on"
    guarantee = 0
    el = root.find("memtune/min_guarantee")
    if el is not None:
        unit = (el.get("unit") or "KiB").lower()
        try:
            guarantee = int((el.text or "").strip()) * _UNITS[unit]
        except (ValueError, KeyError) as e:
            raise DomainError(f"VM {name}: <memtune><min_guarantee unit={unit!r}>"
                              f"{el.text}</min_guarantee> is not a size ({e}); fix the "
                              "domain XML") from e
    return BalloonLimits(present, autodeflate, guarantee)


def job_from_stats(stats: Mapping[str, Any], state: tuple[int, int]) -> JobInfo:
    """JobInfo from virDomainGetJobStats() and virDomainGetState() results."""
    active = stats.get("type", 0) in (libvirt.VIR_DOMAIN_JOB_BOUNDED,
                                      libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
    op = _JOB_OPERATIONS.get(int(stats.get("operation", 0)), "unknown") if active else "none"
    paused = ""
    if state[0] == libvirt.VIR_DOMAIN_PAUSED:
        paused = _PAUSED_REASONS.get(state[1], "unknown")
    return JobInfo(active=active, operation=op, paused_reason=paused)


def _pid_is_domain(pid: int, name: str) -> bool:
    """QEMU started by libvirt carries `-name guest=<name>,...` (commas doubled)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    want = ("guest=" + name.replace(",", ",,")).encode()
    for i, arg in enumerate(args[:-1]):
        if arg == b"-name":
            return args[i + 1].split(b",debug-threads")[0] == want
    return False


class LibvirtConnection:
    """A self-healing connection to libvirtd with domain events.

    on_connect(conn) runs after every (re)connect, on_disconnect(reason) after the
    connection is lost, on_lifecycle(event) per lifecycle event, on_device(name, alias,
    added) when a device (e.g. a DIMM) is added or removed, on_reset(name) when the guest
    was reset (libvirt's REBOOT event: QEMU's RESET, a guest reboot or ``virsh reset``),
    on_job(name, what) when a migration iterates or a job completes (the owner re-checks
    its permit at once), on_balloon(name, actual_bytes) when the balloon's size changed
    (QEMU's BALLOON_CHANGE, which QEMU rate-limits to one a second), on_port(name, id,
    open) when the guest opened or closed a virtio-serial port (QEMU's VSERPORT_CHANGE).
    """

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        *,
        on_connect: Callable[[LibvirtConnection], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        on_lifecycle: Callable[[LifecycleEvent], None] | None = None,
        on_device: Callable[[str, str, bool], None] | None = None,
        on_reset: Callable[[str], None] | None = None,
        on_job: Callable[[str, str], None] | None = None,
        on_balloon: Callable[[str, int], None] | None = None,
        on_port: Callable[[str, str, bool], None] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        keepalive: tuple[int, int] = (5, 3),
    ) -> None:
        self.uri = uri
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_lifecycle = on_lifecycle
        self._on_device = on_device
        self._on_reset = on_reset
        self._on_job = on_job
        self._on_balloon = on_balloon
        self._on_port = on_port
        self._backoff = (backoff_initial, backoff_max)
        self._keepalive = keepalive
        self._conn: libvirt.virConnect | None = None
        #: this thread's call connection and the ``connects`` count it was opened under
        self._local = threading.local()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = threading.Event()
        self._connected = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.connects = 0  # how many times a connection was established

    # -- lifecycle of the connection -------------------------------------------------

    def start(self) -> None:
        """Start the event loop (once per process) and the connect/reconnect supervisor."""
        ensure_event_loop()
        self._stop.clear()
        self._supervisor = threading.Thread(
            target=self._supervise, name="libvirt-supervisor", daemon=True
        )
        self._supervisor.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the connection and stop reconnecting."""
        self._stop.set()
        self._closed.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (True) or timeout (False)."""
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        """A connection is up right now."""
        return self._connected.is_set()

    def _supervise(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            try:
                conn = self._open()
            except libvirt.libvirtError as exc:
                log.warning("cannot connect to %s: %s; retrying in %.1fs", self.uri, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            with self._lock:
                self._conn = conn
            self._closed.clear()
            self._connected.set()
            self.connects += 1
            log.info("connected to %s", self.uri)
            self._call(self._on_connect, self)
            self._closed.wait()
            self._connected.clear()
            with self._lock:
                self._conn = None
            self._teardown(conn)
            if not self._stop.is_set():
                self._call(self._on_disconnect, f"connection to {self.uri} lost")

    def _open(self) -> libvirt.virConnect:
        conn = libvirt.open(self.uri)
        try:
            conn.registerCloseCallback(self._close_cb, None)
            conn.setKeepAlive(*self._keepalive)
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle_cb, None
            )
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._device_added_cb, None
            )
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._device_removed_cb, None
            )
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._reboot_cb, None
            )
            # Where libvirt has job events, they shorten the window in which a permit may
            # predate a job (host/permit.py); the periodic refresh covers the rest.
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, self._migration_cb,
                None
            )
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._job_completed_cb, None
            )
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, self._balloon_cb, None
            )
            # libvirt raises its own event for the guest agent's channel only: QEMU's
            # VSERPORT_CHANGE for every channel comes through the QEMU monitor events.
            try:
                libvirt_qemu.qemuMonitorEventRegister(conn, None, "VSERPORT_CHANGE",
                                                      self._vserport_cb, None, 0)
            except libvirt.libvirtError as exc:
                log.warning("no VSERPORT_CHANGE events from %s (%s): a guest closing its "
                            "aerate port is seen only through its reset or its leases",
                            self.uri, exc)
        except libvirt.libvirtError:
            conn.close()
            raise
        return conn

    def _teardown(self, conn: libvirt.virConnect) -> None:
        # The peer may already be gone: closing only releases our side.
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError as exc:
            log.debug("unregistering close callback: %s", exc)
        try:
            conn.close()
        except libvirt.libvirtError as exc:
            log.debug("closing connection: %s", exc)

    @staticmethod
    def _call(cb: Callable[..., None] | None, *args: Any) -> None:
        if cb is None:
            return
        try:
            cb(*args)
        except Exception:  # a faulty owner callback must not kill the event thread
            log.exception("libvirt callback %r failed", cb)

    def _close_cb(self, conn: libvirt.virConnect, reason: int, opaque: object) -> None:
        log.warning("connection to %s closed (reason %d)", self.uri, reason)
        self._closed.set()

    def _lifecycle_cb(self, conn: libvirt.virConnect, dom: libvirt.virDomain, event: int,
                      detail: int, opaque: object) -> None:
        ev = LifecycleEvent(dom.name(), dom.UUIDString(),
                            LIFECYCLE_EVENTS.get(event, str(event)), detail)
        self._call(self._on_lifecycle, ev)

    def _reboot_cb(self, conn: libvirt.virConnect, dom: libvirt.virDomain,
                   opaque: object) -> None:
        self._call(self._on_reset, dom.name())

    def _device_added_cb(self, conn: libvirt.virConnect, dom: libvirt.virDomain, alias: str,
                         opaque: object) -> None:
        self._call(self._on_device, dom.name(), alias, True)

    def _device_removed_cb(self, conn: libvirt.virConnect, dom: libvirt.virDomain,
                           alias: str, opaque: object) -> None:
        self._call(self._on_device, dom.name(), alias, False)

    def _migration_cb(self, conn: libvirt.virConnect, dom: libvirt.virDomain,
                      iteration: int, opaque: object) -> None:
        self._call(self._on_job, dom.name(), f"migration iteration {iteration}")

    def _job_completed_cb(self, conn: libvirt.virConnect, dom: libvirt.virDomain,
                          params: object, opaque: object) -> None:
        self._call(self._on_job, dom.name(), "job completed")

    def _vserport_cb(self, conn: libvirt.virConnect, dom: libvirt.virDomain, event: str,
                     seconds: int, micros: int, details: str, opaque: object) -> None:
        try:
            data = json.loads(details) if details else {}
        except ValueError:
            data = {}
        if isinstance(data, dict) and isinstance(data.get("id"), str):
            self._call(self._on_port, dom.name(), data["id"], data.get("open") is True)

    def _balloon_cb(self, conn: libvirt.virConnect, dom: libvirt.virDomain, actual_kib: int,
                    opaque: object) -> None:
        self._call(self._on_balloon, dom.name(), int(actual_kib) << 10)

    # -- helpers ---------------------------------------------------------------------

    def connection(self) -> libvirt.virConnect:
        """This thread's call connection (module docstring, "Calls"), opened now if it has
        none since the last (re)connect; LibvirtUnavailable while the event connection is
        down or a call connection cannot be opened."""
        with self._lock:
            conn, generation = self._conn, self.connects
        if conn is None:
            raise LibvirtUnavailable(f"not connected to {self.uri} (libvirtd down?)")
        mine = getattr(self._local, "conn", None)
        if mine is not None and mine[0] == generation:
            return mine[1]
        if mine is not None:
            # Opened before libvirtd went away: its socket is dead; release our side.
            self._local.conn = None
            try:
                mine[1].close()
            except libvirt.libvirtError as exc:
                log.debug("closing a stale call connection: %s", exc)
        try:
            own = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise LibvirtUnavailable(
                f"cannot open a call connection to {self.uri}: {exc}") from exc
        self._local.conn = (generation, own)
        return own

    def _domain(self, name: str) -> libvirt.virDomain:
        try:
            return self.connection().lookupByName(name)
        except libvirt.libvirtError as exc:
            raise DomainError(f"VM {name}: lookup failed: {exc}") from exc

    def running_domains(self) -> list[DomainRef]:
        """Domains that are running (active) now."""
        try:
            doms = self.connection().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as exc:
            raise LibvirtUnavailable(f"listing domains on {self.uri}: {exc}") from exc
        return [DomainRef(d.name(), d.UUIDString(), d.ID()) for d in doms]

    def lookup(self, ident: str) -> DomainRef | None:
        """A domain (running or only defined) by name, UUID or id, as virsh finds it; None
        when there is none. ``id`` is -1 for a domain that is not running."""
        conn = self.connection()
        finders: list[Callable[[], libvirt.virDomain]] = [lambda: conn.lookupByName(ident)]
        if len(ident) == 36 and ident.count("-") == 4:
            finders.insert(0, lambda: conn.lookupByUUIDString(ident))
        if ident.isdigit():
            finders.append(lambda: conn.lookupByID(int(ident)))
        for find in finders:
            try:
                dom = find()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise LibvirtUnavailable(f"looking up {ident!r} on {self.uri}: {exc}") \
                        from exc
                continue
            return DomainRef(dom.name(), dom.UUIDString(), dom.ID())
        return None

    def domain_xml(self, name: str, inactive: bool = False) -> str:
        """The live (or, with inactive=True, the persistent) domain XML."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        try:
            xml: str = self._domain(name).XMLDesc(flags)
        except libvirt.libvirtError as exc:
            raise DomainError(f"VM {name}: reading its XML failed: {exc}") from exc
        return xml

    def channel_socket_path(self, name: str, channel: str = AGENT_CHANNEL) -> str | None:
        """Host unix socket of the domain's `channel`, or None when it has none."""
        return channel_path(self.domain_xml(name), channel)

    def qemu_pid(self, name: str) -> int:
        """PID of the domain's QEMU, from libvirt's pid file, checked against /proc."""
        path = os.path.join(PID_DIR, f"{name}.pid")
        try:
            with open(path) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError) as exc:
            raise DomainError(f"VM {name}: cannot read QEMU pid from {path}: {exc}") from exc
        if not _pid_is_domain(pid, name):
            raise DomainError(f"VM {name}: pid {pid} from {path} is not its QEMU (stale file?)")
        return pid

    def qmp(self, name: str, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run a QMP command in the domain's QEMU through libvirt; return its 'return'."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        try:
            raw = libvirt_qemu.qemuMonitorCommand(self._domain(name), json.dumps(msg), 0)
        except libvirt.libvirtError as exc:
            raise DomainError(f"VM {name}: QMP {command} failed: {exc}") from exc
        reply = json.loads(raw)
        if "error" in reply:
            raise DomainError(f"VM {name}: QMP {command}: {reply['error'].get('desc')}")
        return reply["return"]

    def hmp(self, name: str, line: str) -> str:
        """Run an HMP command (e.g. 'info mtree -f') in the domain's QEMU through libvirt."""
        try:
            out: str = libvirt_qemu.qemuMonitorCommand(
                self._domain(name), line, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            )
        except libvirt.libvirtError as exc:
            raise DomainError(f"VM {name}: HMP {line!r} failed: {exc}") from exc
        return out

    def qmp_function(self, name: str) -> Callable[[str, Mapping[str, Any] | None], Any]:
        """`qmp` bound to one domain, the shape qemu_map.gather wants."""
        return lambda command, arguments: self.qmp(name, command, arguments)

    def hmp_function(self, name: str) -> Callable[[str], str]:
        """`hmp` bound to one domain, the shape backing.resolve wants."""
        return lambda line: self.hmp(name, line)

    def metadata(self, name: str, namespace: str, config: bool = False) -> str | None:
        """The domain's <metadata> element in `namespace`, or None: of its current state
        (the live XML of a running domain), or with ``config`` of its saved definition."""
        dom = self._domain(name)
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0
        try:
            xml: str = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, flags)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise DomainError(f"VM {name}: reading metadata {namespace} failed: {exc}") from exc
        return xml

    def set_metadata(self, name: str, xml: str | None, key: str, namespace: str,
                     live: bool | None = None, config: bool | None = None) -> None:
        """Store `xml` as the domain's <metadata> element in `namespace` (prefix `key`);
        None removes the element.

        By default written to the running domain and, for a persistent domain, to its
        saved definition too, so the setting survives a restart of the VM (S6); ``live``
        or ``config`` True writes only there (virsh's --live, --config).
        """
        dom = self._domain(name)
        try:
            flags = 0
            if live is None and config is None:
                live, config = bool(dom.isActive()), bool(dom.isPersistent())
            if live:
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            if config:
                flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml,
                            key if xml is not None else None, namespace, flags)
        except libvirt.libvirtError as exc:
            raise DomainError(f"VM {name}: storing metadata {namespace} failed: {exc}") from exc

    def job_info(self, name: str) -> JobInfo:
        """What the domain is doing (migration, save, snapshot...), for the refusal check."""
        dom = self._domain(name)
        try:
            state = dom.state()
            return job_from_stats(dom.jobStats(), (int(state[0]), int(state[1])))
        except libvirt.libvirtError as exc:
            raise DomainError(f"VM {name}: reading its job state failed: {exc}") from exc

    def guest_map(self, name: str) -> GuestMemoryMap:
        """The VM's guest-physical map alone, as QEMU shows it now (a rebuild after the
        guest's firmware ran). Blocking: the daemon runs it off the loop."""
        return build_map(gather(self.qmp_function(name)))

    def memory_map(self, name: str) -> tuple[GuestMemoryMap, dict[str, Backing]]:
        """The VM's guest-physical map (QMP/HMP through libvirt) and the proven backing of
        each RAM block (QEMU's /proc). Blocking: the daemon runs it in the VM's worker."""
        gmap = build_map(gather(self.qmp_function(name)))
        return gmap, resolve_backings(self.qemu_pid(name), gmap, self.hmp_function(name))

    def balloon_info(self, name: str) -> tuple[int, int]:
        """(actual balloon size, maximum memory) of the domain, bytes."""
        dom = self._domain(name)
        try:
            actual = int(dom.memoryStats()["actual"]) * 1024
            maximum = int(dom.maxMemory()) * 1024
        except (libvirt.libvirtError, KeyError) as e:
            raise DomainError(f"VM {name}: reading the balloon size failed: {e}") from e
        return actual, maximum

    def set_balloon(self, name: str, target: int) -> None:
        """Ask the domain's balloon for ``target`` bytes of guest memory (live only: the
        persistent definition keeps the operator's size)."""
        try:
            self._domain(name).setMemoryFlags(target // 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            raise DomainError(f"VM {name}: setting the balloon to {target >> 20} MiB "
                              f"failed: {e}") from e
