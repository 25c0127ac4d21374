"""Simulated guests and a fake libvirt for driving the real daemon code paths.

Used by tests/unit/test_isolation.py, tests/unit/test_balloon_daemon.py and
tests/perf/bench_daemon.py:

- :class:`FakeLibvirt` is a **MOCK of libvirtd** (no libvirt daemon can be made slow per VM
  on demand here): the same methods as ``LibvirtConnection`` for the daemon's needs, each
  of which can be made to sleep (``slow[(vm, method)]``, ``slow[(vm, "*")]``). Everything
  else is real: ``Daemon``, ``VmRunner``, ``VmWorker``, ``VmSession``, ``HostEndpoint``,
  the permit logic, the memory map and ``punch``.
- Each simulated VM's RAM is a real **memfd** of the daemon's process, so every discard is
  a real ``fallocate(PUNCH_HOLE)`` through host/punch.py (the memfd stays sparse: the punch
  frees nothing, so punch time is the bare syscall).
- :class:`SimGuest` is the real ``aerate.agent.protocol.GuestEndpoint`` behind a unix socket
  that it listens on, as QEMU's chardev does: the daemon connects to it. It reports every
  ``report_s`` and sends stats every ``stats_s``, and records report -> ack latencies.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from aerate.agent.protocol import MAX_INFLIGHT, GuestEndpoint, GuestState
from aerate.host import pressure
from aerate.host.backing import Backing, BackingKind
from aerate.host.libvirt_conn import DomainError, DomainRef
from aerate.host.qemu_map import GuestMemoryMap, RamBlockInfo, RamRange
from aerate.host.refusal import JobInfo

MiB = 1 << 20
GRANULE = 2 * MiB
#: Simulated guest RAM per VM (sparse memfd: costs nothing until written).
RAM = 256 * MiB


def domain_xml(name: str, sock: str, private: bool = False, channel: bool = True,
               autodeflate: bool = True) -> str:
    """A live domain XML with shared memfd RAM (or libvirt's default private RAM), the aerate
    channel at ``sock`` and a virtio balloon."""
    backing = "" if private else \
        "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
    chan = (f"<channel type='unix'><source mode='bind' path='{sock}'/>"
            "<target type='virtio' name='org.aerate.agent.0'/></channel>") if channel else ""
    deflate = " autodeflate='on'" if autodeflate else ""
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid_of(name)}</uuid>"
            f"<memory unit='KiB'>262144</memory>{backing}<devices>{chan}"
            f"<memballoon model='virtio'{deflate}/></devices></domain>")


def uuid_of(name: str) -> str:
    """The fake domain's UUID: derived from its name, so tests can name it."""
    import uuid
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.aerate.test"))


@dataclass
class SimVm:
    """One simulated VM on the host side: its RAM memfd and channel socket path."""

    name: str
    sock: str
    fd: int
    backing: Backing
    gmap: GuestMemoryMap


def new_vm(name: str, sock_dir: str) -> SimVm:
    """Create the VM's RAM memfd and describe it as the daemon's map would."""
    fd = os.memfd_create(f"sim-{name}", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    st = os.fstat(fd)
    path = f"/proc/{os.getpid()}/fd/{fd}"
    backing = Backing(vm_pid=os.getpid(), block_name="pc.ram", kind=BackingKind.MEMFD_SHARED,
                      reason="memfd of a simulated guest", page_size=4096, path=path,
                      link=os.readlink(path), dev=st.st_dev, ino=st.st_ino, file_offset=0,
                      file_size=RAM, fs_type="tmpfs", length=RAM)
    gmap = GuestMemoryMap(ranges=(RamRange(0, RAM, "pc.ram", 0),),
                          blocks={"pc.ram": RamBlockInfo("pc.ram", 4096, 0, RAM, RAM)},
                          memdevs={})
    return SimVm(name, os.path.join(sock_dir, f"{name}.sock"), fd, backing, gmap)


@contextlib.contextmanager
def open_vm(name: str, sock_dir: str) -> Iterator[SimVm]:
    """``new_vm`` whose memfd is closed at the end (a fixture's body)."""
    v = new_vm(name, sock_dir)
    try:
        yield v
    finally:
        os.close(v.fd)


_STAND_IN: List[subprocess.Popen[bytes]] = []


def _stand_in_qemu() -> int:
    """The pid of one idle child process (started on first use, killed at exit)."""
    if not _STAND_IN:
        proc = subprocess.Popen(["sleep", "86400"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _STAND_IN.append(proc)
        atexit.register(proc.kill)
    return _STAND_IN[0].pid


class FakeLibvirt:
    """MOCK of libvirtd for the daemon (see the module docstring). Thread-safe: the daemon
    calls it from its worker threads."""

    def __init__(self) -> None:
        self.vms: Dict[str, SimVm] = {}
        self.slow: Dict[Tuple[str, str], float] = {}
        self.calls: Dict[str, int] = {}
        self.connected = True
        self.balloon: Dict[str, Tuple[int, int]] = {}  # name -> (actual, maximum)
        self.balloon_sets: List[Tuple[str, int]] = []
        self.job: Dict[str, JobInfo] = {}
        self.private: set[str] = set()  # VMs with private anonymous RAM (balloon reclaimer)
        self.no_channel: set[str] = set()
        self.no_autodeflate: set[str] = set()
        #: domains defined but not running (their XML is the inactive one)
        self.defined: set[str] = set()
        #: running domains without a definition (libvirt's createXML): no config to read
        #: or write, as libvirt says for them
        self.transient: set[str] = set()
        #: stored aerate metadata: (name, "live" | "config") -> XML
        self.stored: Dict[Tuple[str, str], str] = {}
        #: calls of each VM inside the fake now, and the most at once (libvirtd serves a
        #: few calls of one connection at once: host/daemon.py "libvirt's request limit")
        self.inflight: Dict[str, int] = {}
        self.most_inflight: Dict[str, int] = {}
        self._lock = threading.Lock()
        self.release = threading.Event()  # set: every sleeping call returns at once

    def add(self, vm: SimVm) -> None:
        """Make ``vm`` a running domain."""
        self.vms[vm.name] = vm
        self.balloon.setdefault(vm.name, (RAM, RAM))

    def _enter(self, name: str, method: str) -> SimVm:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
        delay = self.slow.get((name, method), self.slow.get((name, "*"), 0.0))
        if delay:
            with self._lock:
                now = self.inflight[name] = self.inflight.get(name, 0) + 1
                self.most_inflight[name] = max(self.most_inflight.get(name, 0), now)
            try:
                self.release.wait(delay)
            finally:
                with self._lock:
                    self.inflight[name] -= 1
        vm = self.vms.get(name)
        if vm is None:
            raise DomainError(f"VM {name}: lookup failed: no such domain (fake libvirt)")
        return vm

    # the LibvirtConnection methods the daemon uses

    def start(self) -> None:
        """Nothing to start: the fake is always connected."""

    def stop(self) -> None:
        """Unblock every sleeping call."""
        self.release.set()

    def running_domains(self) -> List[DomainRef]:
        """Every added VM."""
        return [DomainRef(n, uuid_of(n), i) for i, n in enumerate(self.vms)]

    def lookup(self, ident: str) -> Optional[DomainRef]:
        """By name, UUID (the fake's UUIDs are uuid_of(name)) or id, running or defined."""
        running = list(self.vms)
        for i, n in enumerate(running):
            if ident in (n, uuid_of(n), str(i)):
                return DomainRef(n, uuid_of(n), i)
        for n in sorted(self.defined):
            if ident in (n, uuid_of(n)):
                return DomainRef(n, uuid_of(n), -1)
        return None

    def domain_xml(self, name: str, inactive: bool = False) -> str:
        """The simulated domain's XML."""
        vm = self._enter(name, "domain_xml")
        return domain_xml(name, vm.sock, name in self.private, name not in self.no_channel,
                          name not in self.no_autodeflate)

    def job_info(self, name: str) -> JobInfo:
        """Idle, unless a test set ``job[name]``."""
        self._enter(name, "job_info")
        return self.job.get(name, JobInfo(active=False, operation="none"))

    def _known(self, name: str, method: str) -> bool:
        """Count the call; True for a running domain, False for a defined one."""
        if name in self.defined and name not in self.vms:
            with self._lock:
                self.calls[method] = self.calls.get(method, 0) + 1
            return False
        self._enter(name, method)
        return True

    def metadata(self, name: str, namespace: str, config: bool = False) -> Optional[str]:
        """What set_metadata stored: the live copy of a running domain unless ``config``."""
        running = self._known(name, "metadata")
        if config and name in self.transient:
            raise DomainError(f"VM {name}: transient domains do not have any persistent "
                              "config (fake libvirt)")
        return self.stored.get((name, "live" if running and not config else "config"))

    def set_metadata(self, name: str, xml: Optional[str], key: str, namespace: str,
                     live: Optional[bool] = None, config: Optional[bool] = None) -> None:
        """Stored as libvirt does (None removes): live and config by default."""
        running = self._known(name, "set_metadata")
        if live is None and config is None:
            live, config = running, name not in self.transient
        if config and name in self.transient:
            raise DomainError(f"VM {name}: transient domains do not have any persistent "
                              "config (fake libvirt)")
        if live and not running:
            raise DomainError(f"VM {name}: domain is not running (fake libvirt)")
        for where, yes in (("live", live), ("config", config)):
            if not yes:
                continue
            if xml is None:
                self.stored.pop((name, where), None)
            else:
                self.stored[(name, where)] = xml

    def memory_map(self, name: str) -> Tuple[GuestMemoryMap, Dict[str, Backing]]:
        """The memfd-backed map of the simulated VM."""
        vm = self._enter(name, "memory_map")
        if name in self.private:
            return vm.gmap, {"pc.ram": Backing(
                vm_pid=os.getpid(), block_name="pc.ram", kind=BackingKind.ANON_PRIVATE,
                reason="private anonymous RAM of a simulated guest", page_size=4096,
                length=RAM)}
        return vm.gmap, {"pc.ram": vm.backing}

    def guest_map(self, name: str) -> GuestMemoryMap:
        """The simulated VM's map (rebuilt after each hello by the daemon)."""
        return self._enter(name, "guest_map").gmap

    def qemu_pid(self, name: str) -> int:
        """A ``sleep`` child stands in for the QEMU whose fds the pinning scan reads before
        and after every slice: a process with a handful of fds, like a QEMU (this test
        process, with a socket and a memfd per simulated VM, would make each scan cost
        what a thousand QEMUs' would)."""
        self._enter(name, "qemu_pid")
        return _stand_in_qemu()

    def qmp(self, name: str, command: str, arguments: Any = None) -> Any:
        """Only ``query-migrate``: no migration ever started (QEMU answers {})."""
        self._enter(name, "qmp")
        if command != "query-migrate":
            raise DomainError(f"VM {name}: the fake libvirt has no QMP {command!r}")
        return {}

    def balloon_info(self, name: str) -> Tuple[int, int]:
        """(actual, maximum) as last set."""
        self._enter(name, "balloon_info")
        return self.balloon[name]

    def set_balloon(self, name: str, target: int) -> None:
        """The balloon arrives at once."""
        self._enter(name, "set_balloon")
        with self._lock:
            self.balloon[name] = (target, self.balloon[name][1])
            self.balloon_sets.append((name, target))


@dataclass
class SimGuest:
    """A guest agent's protocol end (the real GuestEndpoint) listening on a unix socket."""

    name: str
    sock: str
    report_s: float = 2.0
    stats_s: float = 5.0
    blocks: int = 4  # 2 MiB blocks per report
    mem_free: int = 128 * MiB  # what its stats say
    #: what its stats say its balloon holds (None: the figure is left out, as by an agent
    #: on a guest kernel without the vmstat counter)
    balloon_bytes: Optional[int] = None
    latencies: List[float] = field(default_factory=list)
    acks: List[Tuple[int, int, int, str]] = field(default_factory=list)  # batch, disc, ref, why
    sessions: int = 0
    #: capabilities added to the hello (the poison_safe one is always there)
    capabilities: Dict[str, Any] = field(default_factory=dict)
    #: settings the host sent (sync and config messages), in order
    configs: List[Dict[str, Any]] = field(default_factory=list)
    on_ack: Optional[Callable[[SimGuest], None]] = None
    #: the host's answers to this guest's probes (agent/protocol.py Probed), in order
    probed: List[Any] = field(default_factory=list)
    _sent: Dict[int, float] = field(default_factory=dict)
    _want_report: bool = False
    _server: Optional[asyncio.AbstractServer] = None
    _tasks: List[asyncio.Task[None]] = field(default_factory=list)
    _writers: List[asyncio.StreamWriter] = field(default_factory=list)
    _next: int = 0
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    #: The live connection's endpoint and writer (None until the daemon connects).
    ep: Optional[GuestEndpoint] = None
    writer: Optional[asyncio.StreamWriter] = None

    async def start(self) -> None:
        """Listen on the channel socket (the daemon connects, as to QEMU's chardev)."""
        self._server = await asyncio.start_unix_server(self._serve, path=self.sock)

    async def stop(self) -> None:
        """Close the socket and every connection (closing, not cancelling: a cancelled
        stream handler makes asyncio log a traceback)."""
        for t in self._tasks:
            t.cancel()
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ep = GuestEndpoint({"agent": "sim", "arena": "memfd", "page_size": 4096,
                            # What the real agent says in a guest without page
                            # poisoning (without it the daemon never punches).
                            "capabilities": {"poison_safe": {
                                "available": True, "detail": "simulated: no poisoning"},
                                **self.capabilities}})
        self.ep, self.writer = ep, writer
        self._writers.append(writer)
        ticker = asyncio.get_running_loop().create_task(self._tick(ep, writer))
        self._tasks.append(ticker)
        try:
            while data := await reader.read(65536):
                now = time.monotonic()
                for kind, payload in ep.receive(data):
                    if kind == "session":
                        self.sessions += 1
                        self.connected.set()
                    elif kind == "config":
                        self.configs.append(dict(payload))
                    elif kind == "probed":
                        self.probed.append(payload)
                    elif kind == "release":
                        batch, discarded, refused = payload
                        sent = self._sent.pop(batch, None)
                        if sent is not None:
                            self.latencies.append(now - sent)
                        self.acks.append((batch, discarded, refused, ""))
                        if self.on_ack is not None:
                            self.on_ack(self)
                if self._want_report and ep.can_report():
                    self.report_now(ep, writer)   # the fresh token it asked for came
                out = ep.take_outbox()
                if out:
                    writer.write(out)
        except (ConnectionError, OSError):
            pass
        finally:
            ticker.cancel()
            writer.close()

    def _ranges(self) -> List[Tuple[int, int]]:
        out = []
        for _ in range(self.blocks):
            gpa = (self._next * GRANULE) % RAM
            self._next += 2  # every other block: ranges stay apart (no coalescing)
            out.append((gpa, GRANULE))
        return out

    def report_now(self, ep: GuestEndpoint, writer: asyncio.StreamWriter) -> Optional[int]:
        """Send one report if the window has room; its batch id. Without a fresh lease
        token it asks for one first, as the agent does, and reports when it comes."""
        if not ep.can_report():
            if ep.state is GuestState.RUNNING and len(ep.inflight) < MAX_INFLIGHT \
                    and not ep.token_fresh():
                self._want_report = True
                ep.request_token()
                writer.write(ep.take_outbox())
            return None
        self._want_report = False
        batch = ep.report(self._ranges())
        self._sent[batch] = time.monotonic()
        writer.write(ep.take_outbox())
        return batch

    async def _tick(self, ep: GuestEndpoint, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        # Spread guests over the period so a thousand do not report in the same instant.
        start = loop.time() + (hash(self.name) % 1000) / 1000 * self.report_s
        next_report, next_stats = start, start + self.stats_s / 2
        while True:
            await asyncio.sleep(max(0.0, min(next_report, next_stats) - loop.time()))
            now = loop.time()
            if now >= next_report:
                next_report += self.report_s
                self.report_now(ep, writer)
            if now >= next_stats:
                next_stats += self.stats_s
                self.send_stats(ep, writer)

    def send_stats(self, ep: GuestEndpoint, writer: asyncio.StreamWriter) -> None:
        """One statistics message, as the agent sends every stats_interval_s."""
        msg: Dict[str, Any] = {"type": "stats", "mem_free": self.mem_free,
                               "watermark_high_bytes": 8 * MiB, "psi_some_avg10": 0.0,
                               "engine": {"held_bytes": 0, "aerated_bytes": 0}}
        if self.balloon_bytes is not None:
            msg["balloon_bytes"] = self.balloon_bytes
        ep.send(msg)
        out = ep.take_outbox()
        if out:
            writer.write(out)


def percentile(values: List[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def new_daemon(conn: FakeLibvirt, run_dir: str, **timing: float) -> Any:
    """The real Daemon on the fake libvirt; VM locks under ``run_dir``; timing overrides
    (call_timeout, map_timeout, permit_refresh, permit_max_age) as keyword arguments."""
    from aerate.host import daemon as daemon_mod
    d = daemon_mod.Daemon("fake:///", os.path.join(run_dir, "none.toml"), run_dir, None, (),
                          conn=conn)
    d.vm_lock_dir = os.path.join(run_dir, "vms")
    # What control.watch_pressure would have sampled by now: this host's real memory and
    # swap (whether small discards run on the loop depends on the swap, host/backing.py
    # reads_stay_in_memory).
    d.host_memory = pressure.sample()
    for k, v in timing.items():
        if not hasattr(d, k):
            raise AttributeError(f"Daemon has no timing knob {k!r}")
        setattr(d, k, v)
    return d


async def stop_daemon(daemon: Any, conn: FakeLibvirt) -> None:
    """Stop every runner and wait for them (their finally blocks use the pool), then the
    pool; sleeping fake calls are released first."""
    conn.stop()
    tasks = [r.task for r in daemon.runners.values() if r.task is not None]
    for name in list(daemon.runners):
        daemon.stop_runner(name, "test over")
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
    if time.monotonic() - t0 > 5:
        print(f"(stopping {len(tasks)} runners took {time.monotonic() - t0:.1f} s)")
    daemon.pool.shutdown(wait=False, cancel_futures=True)


@contextlib.asynccontextmanager
async def simulated(run_dir: str, names: Tuple[str, ...], **timing: float
                    ) -> AsyncIterator[Tuple[Any, FakeLibvirt, Dict[str, SimGuest]]]:
    """The real daemon on the fake libvirt with one listening SimGuest per name (reports
    and stats are sent by the test itself); everything stopped and closed afterwards."""
    conn = FakeLibvirt()
    guests: Dict[str, SimGuest] = {}
    for n in names:
        vm = new_vm(n, run_dir)
        conn.add(vm)
        guests[n] = SimGuest(n, vm.sock, report_s=3600, stats_s=3600)
        await guests[n].start()
    daemon = new_daemon(conn, run_dir, **timing)
    try:
        yield daemon, conn, guests
    finally:
        await stop_daemon(daemon, conn)
        for g in guests.values():
            await g.stop()
        for vm in conn.vms.values():
            os.close(vm.fd)


def run_simulated(tmp_path: Any, body: Callable[[Any, FakeLibvirt, Dict[str, SimGuest]],
                                                 Awaitable[None]],
                  names: Tuple[str, ...] = ("A", "B"), **timing: float) -> None:
    """``body(daemon, conn, guests)`` inside :func:`simulated`, on a new event loop."""
    async def main() -> None:
        async with simulated(str(tmp_path), names, **timing) as (daemon, conn, guests):
            await body(daemon, conn, guests)

    asyncio.run(main())


async def report_and_wait(daemon: Any, guest: SimGuest, timeout: float) -> float:
    """Send one report from ``guest`` through its live connection; seconds to its ack."""
    got = asyncio.Event()
    guest.on_ack = lambda g: got.set()
    runner = daemon.runners[guest.name]
    await until(lambda: runner.state.value == "running", 5, f"{guest.name} running")
    assert guest.ep is not None and guest.writer is not None
    t0 = time.monotonic()
    assert guest.report_now(guest.ep, guest.writer) is not None
    await asyncio.wait_for(got.wait(), timeout)
    return time.monotonic() - t0


def make_private(conn: FakeLibvirt, guests: Dict[str, SimGuest], name: str) -> None:
    """Make ``name`` a 4 GiB VM with private RAM (the balloon reclaimer's) whose guest
    says 3 GiB are free."""
    conn.private.add(name)
    conn.balloon[name] = (4096 << 20, 4096 << 20)
    guests[name].mem_free = 3072 << 20


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (on the loop) until ``cond()``; AssertionError naming ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
