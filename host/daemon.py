"""``aerated``: the host daemon. One process per host, one session per VM.

An asyncio loop owns everything that changes state: the VM runners (one task per running
domain with an aerate channel), the control socket and the timers. libvirt's events
arrive on libvirt's own thread (host/libvirt_conn.py) and are handed to the loop with
``call_soon_threadsafe``. Nothing on the loop thread blocks on libvirt or on QEMU's /proc
(S8): every such call runs in the VM's worker (host/vm_worker.py: a shared bounded pool,
per-VM order, a timeout that refuses that VM), and ``permit()``, ``status`` and the
metrics scrape read snapshots those calls refresh. A report's discard runs on the loop
thread when the batch is small (``INLINE_DISCARD_BYTES``: a fallocate and the scans of
QEMU's fd links, which take no lock QEMU holds for long) and its content check's reads
cannot wait on a disk (hugetlbfs, or shmem on a host without swap), else on the VM's own
discard thread; either way the session takes no input until it is finished, so a session is
never closed or re-synced while a discard is under way (S4); each is held to the VM's
discard budget (host/budget.py).

VM sessions talk straight to QEMU's chardev socket, not through libvirtd: a libvirtd
restart does not drop them. While libvirtd is away nothing new is started and every
batch is refused (the permit expires), because the daemon cannot tell whether a
migration began (S1).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import enum
import fcntl
import fnmatch
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from prometheus_client import start_http_server

from aerate import __version__
from aerate.agent import settings as table
from aerate.agent.fdstore import FdStoreError, send_notify
from aerate.agent.protocol import HostState
from aerate.host import balloon as balloon_mod
from aerate.host import config as config_mod
from aerate.host import control, journal, pinning, pressure
from aerate.host import metrics as metrics_mod
from aerate.host.backing import Backing, BackingKind, allocated_bytes, reads_stay_in_memory
from aerate.host.balloon_store import BalloonStore, Saved, StoreError
from aerate.host.budget import DiscardBudget, InputBudget
from aerate.host.libvirt_conn import (
    BalloonLimits,
    DomainError,
    LibvirtConnection,
    LibvirtUnavailable,
    LifecycleEvent,
    balloon_limits,
    channel_alias,
    channel_path,
)
from aerate.host.permit import PermitCache
from aerate.host.probe import ProbeUnknown
from aerate.host.probe import backed_ranges as probe_backed_ranges
from aerate.host.punch import Check, PunchRefused, punch
from aerate.host.qemu_map import (
    GuestMemoryMap,
    MapError,
    may_report,
    split_at_pieces,
)
from aerate.host.refusal import (
    BALLOON,
    KERNEL,
    REFUSE,
    Decision,
    DomainFacts,
    JobInfo,
    VmFacts,
    decide,
    domain_facts,
    hugetlb_reservations,
    job_refusal,
    kernel_reporting_from_hello,
    migration_from_qmp,
    poison_from_hello,
)
from aerate.host.session import DiscardJob, VmSession
from aerate.host.verify import ReclaimTally
from aerate.host.vm_worker import CALL_TIMEOUT, CallTimeout, VmWorker, new_pool

log = logging.getLogger("aerated")
RUN_DIR = config_mod.RUN_DIR
#: Per-VM locks live here whatever --run-dir says: two daemons (an operator's and a test's,
#: say) must never serve the same VM at once (S4).
VM_LOCK_DIR = "/run/aerate/vms"
SYNC_RETRY = 5.0
MIN_GRANULE = 2 << 20
#: How often each VM's permit is re-decided from libvirt's job state (off the loop), and
#: how old a PUNCH/BALLOON may get before permit() refuses (host/permit.py argues it).
PERMIT_REFRESH = 1.0
PERMIT_MAX_AGE = 2.5
#: The domain XML changes through events (devices restart the runner); re-read it anyway.
XML_REFRESH = 30.0
#: How often the backing_allocated figure of status/metrics is re-read (off the loop).
BACKING_REFRESH = 2.0
#: How long a status request waits for each VM's fresh backing figure.
STATUS_READ_TIMEOUT = 1.0
#: A map build is a dozen QMP/HMP round trips and QEMU's smaps: a longer timeout.
MAP_TIMEOUT = 15.0
#: Bytes read from a channel per turn. The protocol's line reader is linear in the bytes
#: (agent/protocol.py LineReader), at worst about a microsecond per line (a flood of
#: one-byte lines); small turns keep one VM's worst read to a few milliseconds of loop
#: time, and the input budget is charged after each.
READ_CHUNK = 4096
#: Report batches up to this many bytes are discarded on the loop thread, bigger ones on
#: the VM's discard thread (VmRunner._run_job): 4 granules of 2 MiB, a read of 8 MiB (the
#: content check, host/punch.py, about 3 ms) and fallocates of about a millisecond in all
#: when every page is populated. Only where the read cannot wait on a disk
#: (host/backing.py reads_stay_in_memory): hugetlbfs, or shmem on a host without swap.
INLINE_DISCARD_BYTES = 8 << 20
#: Host page size from which the agent cannot assemble a reportable granule (agent/cycle.py).
GIANT_GRANULE = 1 << 30
#: How often the balloon controller looks again without a new statistics message (it
#: notices a silent guest this way).
BALLOON_TICK = 1.0
#: After restoring a saved balloon size: how many seconds to watch it arrive, and how close
#: counts as arrived (the settle margin of host/balloon.py).
RESTORE_CHECKS = 10
RESTORE_SLACK = 16 << 20


def giant_granule_note(granule: int, values: dict[str, Any]) -> str:
    """Why a VM backed by 1 GiB host pages never gets anything reported, or "".

    The host can only discard whole, aligned host pages. The agent reports only whole,
    aligned granules formed by the blocks of one fill (agent/cycle.py ``granule_ranges``);
    a fill takes at most the current batch capacity, which starts at capacity/4 and only
    grows after acked batches. A 1 GiB page needs 512 adjacent, aligned 2 MiB blocks in one
    fill; capacity is capped at 1024, so no setting makes the first batch big enough.
    """
    if granule < GIANT_GRANULE:
        return ""
    need = granule // MIN_GRANULE
    first = max(1, int(values["capacity"]) // 4)
    return (f"guest RAM is backed by {granule >> 30} GiB host pages: a discard needs {need} "
            f"adjacent, aligned 2 MiB guest blocks in one batch, and the agent's first batch "
            f"takes at most capacity/4 = {first} blocks (capacity={values['capacity']}, at "
            f"most {table.BY_NAME['capacity'].hi:.0f}), so nothing is ever reported; back the "
            "VM with 2 MiB pages (<hugepages><page size='2' unit='M'/></hugepages>) or plain "
            "memfd to reclaim it (1 GiB reporting is not built yet)")


class Fetched(NamedTuple):
    """What one permit refresh learnt from libvirt and QEMU (host/daemon.py _fetch)."""

    xml: str | None
    job: JobInfo
    backing: int | None
    migration: str | None
    gmap: GuestMemoryMap | None
    map_error: str


class DaemonError(RuntimeError):
    """The daemon cannot start; the message says why and what to do."""


def pid_lock(path: str) -> tuple[int | None, str]:
    """flock ``path`` and write our pid in it: (fd, "") or (None, pid of the holder)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        return None, other
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, ""


def take_lock(run_dir: str) -> int:
    """S4: one daemon per run directory. Returns the lock fd (held for the process life)."""
    path = os.path.join(run_dir, "aerated.lock")
    fd, other = pid_lock(path)
    if fd is None:
        raise DaemonError(f"another aerated (pid {other}) holds {path}; only one may run "
                          "per host. Stop it first.")
    return fd


class RunnerState(str, enum.Enum):
    """Where a VM's runner stands; ``VmRunner._set_state`` is the one transition point."""

    STARTING = "starting"      # created, waiting for its VM lock
    BUSY = "busy"              # another aerated holds the VM's lock
    PREPARING = "preparing"    # asking libvirt for the channel, settings, memory map
    NO_CHANNEL = "no-channel"  # nothing to do: the domain has no aerate channel
    SYNCING = "syncing"        # connected, waiting for the agent's answer to our sync
    RUNNING = "running"        # a session is up
    CLOSED = "closed"          # the guest ended the session (or broke the protocol)
    RETRYING = "retrying"      # a failure (libvirt timeout, QEMU gone...); backing off
    STOPPED = "stopped"        # the daemon no longer serves the VM


class GuestFlood(RuntimeError):
    """The guest sent more input than its budget (S5); its session ends."""


class VmRunner:
    """Everything the daemon knows and does for one VM.

    Its jobs, and where each lives: settings layering (``effective_settings``); the permit
    (facts fetched off the loop by ``refresh_permit``, cached in host/permit.py, read by
    ``permit()`` without blocking); the balloon (policy in host/balloon.py, its record in
    host/balloon_store.py, libvirt calls through the worker); the memory map (built in the
    worker by ``LibvirtConnection.memory_map``); serving the channel (``_serve``, protocol
    and S1 checks in host/session.py); status (snapshots only). Every blocking call goes
    through ``self.worker`` (host/vm_worker.py): ordered for this VM, off the loop, timed.
    """

    def __init__(self, daemon: Daemon, name: str) -> None:
        self.daemon = daemon
        self.name = name
        #: VM= and VM_UUID= on every record about this VM (host/journal.py)
        self.log = journal.VmLog(log, name, lambda: control.runner_uuid(self))
        self.session: VmSession | None = None
        self.writer: asyncio.StreamWriter | None = None  # the channel while _serve runs
        #: the host memory level acted on (host/pressure.py; set by control.watch_pressure)
        self.pressure_level = pressure.PLENTY
        self.gmap: GuestMemoryMap | None = None
        self.backings: dict[str, Backing] = {}
        self.channel: str | None = None
        self.channel_alias: str | None = None  # QEMU's id of it, as VSERPORT_CHANGE names it
        self.qemu_pid: int | None = None
        self.state = RunnerState.STARTING
        self.reason = ""
        self.task: asyncio.Task[None] | None = None
        self.stop_reason = ""
        self.worker = VmWorker(name, daemon.pool, daemon.call_timeout)
        #: The background refresh's job on the pool while it runs (libvirt's request limit)
        self._refresh_job: concurrent.futures.Future[None] | None = None
        self.worker.outside = lambda: self._refresh_job
        self.cache = PermitCache(daemon.permit_max_age)
        self._refresh_timer: asyncio.TimerHandle | None = None
        self._inflight: tuple[int, float, bool] | None = None  # (gen, issued, timed out)
        self._gen = 0
        self._wake_balloon = asyncio.Event()
        self.xml = ""  # the live domain XML the facts were taken from
        self._xml_at = -math.inf
        self._facts_of: tuple[str, DomainFacts | None] = ("", None)  # parsed once per XML
        self.limits = BalloonLimits(False, False, 0)
        self.settings: dict[str, Any] = {}
        self.metadata: dict[str, Any] = {}
        self.backing_before = 0
        self.reclaim = ReclaimTally()  # verified / unverified discarded bytes
        # Snapshot of backing_allocated(), refreshed off the loop (status reads only this).
        self.backing_now: int | None = None
        self._backing_at = -math.inf
        values = self.effective_settings()
        self.budget = DiscardBudget(values["discard_batch_mib"], values["discard_rate_mib_s"])
        self.input_budget = InputBudget(values["input_kib_s"], 4 * values["input_kib_s"])
        self._stopped = False  # run() ended: its helper loops stop
        # Balloon reclaimer: the last target we asked libvirt for (None: we never moved
        # it, or it is back at full memory), what libvirt last said, and why.
        self.balloon_target: int | None = None
        self.balloon_actual = 0
        self.balloon_max = 0
        self.balloon_reason = ""
        self._balloon_error = ""
        self._balloon_record: Saved | None = None  # pre-aerate size, saved on disk
        self._last_deflate = -math.inf
        self._settled_at: float | None = -math.inf  # balloon first seen at its target
        # The inflation under way (time set, actual then, target) and the guest driver's
        # measured inflation rate (bytes/s; None until one inflation was seen through),
        # which sizes the next step (host/balloon.py step_for).
        self._inflating: tuple[float, int, int] | None = None
        self.balloon_rate: float | None = None
        self._flaps = balloon_mod.Flaps()  # its reversals hold inflation while it flaps
        self._stats_seen: object = None
        self._restart = ""   # non-empty: start a new session at the next loop turn
        self._restart_ending: int | None = None   # ... if that session is still current
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # discards (S8)
        self._stats_at = -math.inf
        self._free_rate = 0.0  # bytes/s the guest's free memory moved (host/balloon.py)
        # -- refusal facts (issue 9) that are not in the domain XML
        #: S6: why the VM's stored settings cannot be used ("" = they are fine)
        self.settings_error = ""
        #: S7: a pinning device fd once seen in QEMU; latched until the VM restarts
        self.pinning_fd = ""
        #: the hello generation (VmSession.hello_gen) the cached permit was decided with,
        #: and the one the map was last rebuilt for (a new hello re-decides at once)
        self._permit_gen = -1
        self._map_gen = 0
        self._asked_gen = 0
        #: why the map could not be rebuilt after the last hello ("" = it was)
        self.map_error = ""
        #: why nothing can be reported with these settings ("" = nothing known against it)
        self.idle_note = ""

    def _set_state(self, state: RunnerState, reason: str = "") -> None:
        """The one place a runner changes state; every change is logged with its reason."""
        if state is not self.state:
            self.log.debug("%s: %s -> %s%s", self.name, self.state.value, state.value,
                           f" ({reason})" if reason else "")
        self.state, self.reason = state, reason

    # -- facts and policy

    def configured_settings(self) -> dict[str, Any]:
        """Built-in < host file < VM metadata (the running domain's: ``set --live`` writes
        it too): the VM's settings before host pressure."""
        return table.layered([*self.daemon.config.layers_for(self.name), self.metadata])

    def effective_settings(self) -> dict[str, Any]:
        """``configured_settings``, firmed up by the host's memory pressure
        (host/pressure.py)."""
        return pressure.adjust(self.configured_settings(), self.pressure_level)

    def permit(self) -> Decision:
        """The reclaimer allowed now. Never blocks: it reads the decision the background
        refresh and libvirt's events keep fresh; a PUNCH/BALLOON older than
        ``permit_max_age`` is REFUSE (host/permit.py argues the bound). Safe from any
        thread (the discard thread asks it before each range).

        Two facts are read here, not from the cache, because they must act at once: a
        pinning device fd seen in QEMU (latched by ``pinning_check``), and a hello the
        cached decision was not made with (a new session: its page poisoning and the map
        after its firmware ran are not weighed yet)."""
        if self.pinning_fd:
            return Decision(REFUSE, f"QEMU holds {self.pinning_fd}, which can pin guest RAM "
                                    "for DMA; refused until the VM restarts")
        session = self.session
        if session is not None and session.hello_gen != self._permit_gen:
            return Decision(REFUSE, "a new hello from the guest: deciding again with it")
        return self.cache.get(time.monotonic())

    def _fetch(self, need_xml: bool, need_backing: bool, need_map: bool) -> Fetched:
        """Blocking, in the worker or a refresh thread: the job state, QEMU's migration
        state, and the XML / backing figure / a rebuilt map (after a hello) when due."""
        conn = self.daemon.conn
        xml = conn.domain_xml(self.name) if need_xml else None
        job = conn.job_info(self.name)
        # Refused by the job whatever QEMU says: no monitor call that the job's lock would
        # hold in one of libvirtd's request slots (refusal.job_refusal), no map build
        # either (the first refresh after the job builds it).
        by_job = job_refusal(job) is not None
        migration = None if by_job else migration_from_qmp(
            conn.qmp(self.name, "query-migrate", None))
        backing = None
        if need_backing:
            with contextlib.suppress(OSError, RuntimeError):
                backing = self.backing_allocated()
        gmap: GuestMemoryMap | None = None
        map_error = ""
        if need_map and not by_job:
            # S1: after a hello the guest's firmware has run (OVMF sets up SMM, PAM and
            # TSEG after the map of domain start): a report whose range the current flat
            # view no longer shows as RAM is refused at the discard. A map that cannot be
            # rebuilt refuses the VM until one can.
            try:
                gmap = conn.guest_map(self.name)
            except (MapError, LibvirtUnavailable, DomainError, OSError) as e:
                map_error = f"the memory map could not be rebuilt after the hello: {e}"
        return Fetched(xml, job, backing, migration, gmap, map_error)

    def _domain_facts(self, xml: str) -> DomainFacts:
        # Parsed once per XML text: at 1,000 VMs a parse a second each would cost a core.
        cached = self._facts_of[1]
        if self._facts_of[0] != xml or cached is None:
            cached = domain_facts(xml)
            self._facts_of = (xml, cached)
        return cached

    def facts(self, xml: str, got: Fetched, backings: Mapping[str, Backing],
              gmap: GuestMemoryMap | None, values: Mapping[str, Any],
              hello: Mapping[str, Any] | None) -> VmFacts:
        """Every refusal fact from its source (pure; raises ValueError, KeyError or
        ET.ParseError on a fact that cannot be read): what ``_decide`` weighs and what
        ``aeratectl explain`` lists (host/control.py)."""
        # The balloon reclaimer is built; decide() still refuses a domain without a
        # virtio memballoon or with locked RAM, with that reason.
        return VmFacts(self._domain_facts(xml), got.job, backings or None,
                       poison=poison_from_hello(hello), mode=values["mode"],
                       balloon_available=True, settings_error=self.settings_error,
                       pinning_fd=self.pinning_fd,
                       vhost_user_trusted=bool(values["vhost_user_trusted"]),
                       reservations=hugetlb_reservations(gmap, backings),
                       qemu_migration=got.migration,
                       map_error=got.map_error or self.map_error,
                       kernel_reporting=kernel_reporting_from_hello(hello)
                       and not values["override_kernel_reporting"])

    def _decide(self, xml: str, got: Fetched, backings: Mapping[str, Backing],
                gmap: GuestMemoryMap | None, values: Mapping[str, Any],
                hello: Mapping[str, Any] | None) -> Decision:
        """The decision from the facts (pure; runs on the loop or in a refresh thread).

        Every refusal fact reaches decide() from its source: the domain XML, libvirt's job,
        QEMU's migration state, the backing, the hello (page poisoning; none yet: refuse
        punching), the stored settings (fail closed), a latched pinning fd, vhost-user
        trust from the host file, hugetlb reservations and the map rebuilt after the hello.
        An answer that cannot be read is an unknown fact: refuse."""
        try:
            return decide(self.facts(xml, got, backings, gmap, values, hello))
        except (ValueError, KeyError, ET.ParseError) as e:
            return Decision(REFUSE, f"cannot weigh the refusal facts of {self.name}: "
                                    f"{type(e).__name__}: {e}")

    def _due(self, now: float) -> tuple[bool, bool]:
        """Whether this refresh must re-read (the domain XML, the backing figure)."""
        return not self.xml or now - self._xml_at > XML_REFRESH, \
            now - self._backing_at > BACKING_REFRESH

    def _learn(self, issued: float, new_xml: str | None, backing: int | None,
               need_backing: bool) -> None:
        if new_xml is not None:
            self.xml, self._xml_at = new_xml, issued
            self.limits = balloon_limits(new_xml)
        if need_backing:
            self.backing_now, self._backing_at = backing, issued

    def _apply_decision(self, decision: Decision, issued: float, error: str = "",
                        hello_gen: int | None = None) -> bool:
        before = self.cache.last()
        stored = self.cache.set(decision, issued, error=error)
        if stored and hello_gen is not None:
            self._permit_gen = hello_gen
        if stored and decision != before:
            # Journal every change of mind, once (the first hello often turns a refusal
            # for want of the guest's word into punch).
            self.log.info("%s: reclaimer %s: %s", self.name, decision.action, decision.reason,
                          extra=journal.event("refusal") if decision.action == REFUSE else {})
        if stored and (before.action == BALLOON) != (decision.action == BALLOON):
            self._wake_balloon.set()  # the controller starts (or stops) watching
            if self.session is not None:
                # Balloon VMs keep their agent stats-only: tell the guest when that flips.
                self.session.configure({"enabled": self.guest_settings()["enabled"]})
        return stored

    async def refresh_permit(self) -> Decision:
        """Ask libvirt (through the worker: ordered, off the loop, timed) what the VM is
        doing and decide again; used by ``prepare``. The decision is stamped with the time
        the request was issued (host/permit.py); a failure or timeout refuses at once."""
        issued = time.monotonic()
        need_xml, need_backing = self._due(issued)
        hello, gen = self._hello_now()
        try:
            got = await self.worker.call(
                "job_info", self._fetch, need_xml, need_backing, self._map_gen != gen)
            self._learn(issued, got.xml, got.backing, need_backing)
            self._learn_map(got, gen)
            decision = self._decide(self.xml, got, self.backings, self.gmap,
                                    self.effective_settings(), hello)
            self._apply_decision(decision, issued, hello_gen=gen)
        except (LibvirtUnavailable, DomainError, CallTimeout, ValueError) as e:
            decision = self._refuse_unasked(str(e), issued)
        return decision

    def _refuse_unasked(self, why: str, at: float) -> Decision:
        """Refuse the VM because libvirt could not be asked (``why``), stamped ``at``."""
        decision = Decision(REFUSE, f"cannot ask libvirt whether discard is safe now: {why}")
        self._apply_decision(decision, at, why)
        return decision

    # -- the background refresh, every permit_refresh s. No task, future or lock per
    # round: a loop timer submits one job to the pool, the thread fetches and decides, and
    # posts the result back (Daemon.post batches those wake-ups). At 1,000 VMs the
    # worker-call version of this cost ~20 % of a core. It is read-only, so it needs no
    # order with the VM's worker calls, but it never runs beside one (below): a hung VM
    # pins one pool thread and one libvirt request slot.
    #
    # libvirt's request limit. libvirtd serves at most ``max_client_requests`` (default 5)
    # calls of one client connection at once; the rest wait unread in its socket. A call
    # that needs a VM's monitor while that QEMU does not answer holds one of those slots:
    # the first such call until QEMU answers (a stopped or wedged QEMU: never), a second one
    # until libvirt's state-change lock gives up, 30 s on. Measured on this host's libvirtd
    # 9.0 (Debian 12) with SIGSTOPped QEMUs on one connection: a healthy VM's call took
    # 29 s beside three hung VMs with two calls each, and had no answer after 200 s beside
    # five with one each. Calls now run on per-thread connections (host/libvirt_conn.py,
    # "Calls"), so a stuck call fills no other VM's connection; still, the refresh does not
    # start while a worker call of the VM runs, and a worker call waits for a running
    # refresh (host/vm_worker.py): a hung VM pins one pool thread and one libvirtd worker,
    # not two. More hung VMs at once than pool threads queue the others' calls, which then
    # time out: every VM is refused with the reason, none is served on stale facts, and the
    # loop never waits.

    def _hello_now(self) -> tuple[dict[str, Any] | None, int]:
        """The current session's hello and its generation (read on the loop)."""
        s = self.session
        return (s.hello, s.hello_gen) if s is not None else (None, 0)

    def _learn_map(self, got: Fetched, hello_gen: int) -> None:
        if got.gmap is not None or got.map_error:
            if got.gmap is not None:
                self.gmap = got.gmap   # one attribute write: the discard thread reads it
            self.map_error = got.map_error
            if got.map_error:
                self.log.warning("%s: %s", self.name, got.map_error)
            self._map_gen = hello_gen

    def _start_refresh(self, now: float) -> None:
        if self.worker.busy:
            # A worker call of this VM is in libvirt now (libvirt's request limit, above):
            # it refreshes the facts itself or the next tick asks. Hung, it refuses the VM
            # with the reason meanwhile (the permit would expire anyway).
            hung = self.worker.hung
            if hung:
                why = (f"libvirt call {hung} for this VM is still hung; no other call is "
                       "made for it until that one answers")
                self._refuse_unasked(why, now)
            return
        need_xml, need_backing = self._due(now)
        hello, hello_gen = self._hello_now()
        self._gen += 1
        self._inflight = (self._gen, now, False)
        self._refresh_job = self.daemon.pool.submit(
            self._refresh_in_thread, self._gen, now, need_xml, need_backing,
            self._map_gen != hello_gen, self.xml, self.backings, self.gmap,
            self.effective_settings(), hello, hello_gen)

    def _refresh_in_thread(self, gen: int, issued: float, need_xml: bool,
                           need_backing: bool, need_map: bool, xml: str,
                           backings: Mapping[str, Backing], gmap: GuestMemoryMap | None,
                           values: Mapping[str, Any], hello: Mapping[str, Any] | None,
                           hello_gen: int) -> None:
        try:
            got = self._fetch(need_xml, need_backing, need_map)
            decision = self._decide(got.xml or xml, got, backings, got.gmap or gmap, values,
                                    hello)
            outcome: tuple[Fetched, Decision] | Exception = (got, decision)
        except (LibvirtUnavailable, DomainError, ValueError, OSError, RuntimeError) as e:
            outcome = e
        # Anything else escapes into the pool's future: the tick then refuses the VM as
        # timed out, which is the safe side.
        self.daemon.post(self._refresh_done, gen, issued, need_backing, hello_gen, outcome)

    def _refresh_done(self, gen: int, issued: float, need_backing: bool, hello_gen: int,
                      outcome: tuple[Fetched, Decision] | Exception) -> None:
        if self._inflight is None or self._inflight[0] != gen or self._stopped:
            return
        self._inflight = None
        if isinstance(outcome, Exception):
            why = str(outcome)
            self._refuse_unasked(why, issued)
            return
        got, decision = outcome
        try:
            self._learn(issued, got.xml, got.backing, need_backing)
            self._learn_map(got, hello_gen)
        except DomainError as e:
            decision = Decision(REFUSE, f"cannot read the domain XML: {e}")
        if not self._apply_decision(decision, issued, hello_gen=hello_gen) and \
                issued < self.cache.fence:
            self._start_refresh(time.monotonic())  # asked before an event: ask again now

    def _refresh_tick(self) -> None:
        """Every permit_refresh s: start a refresh, or, when the one in flight is older
        than the call timeout, refuse the VM with the reason (its late answer is dropped:
        it was issued before this refusal)."""
        if self._stopped:
            return
        now = time.monotonic()
        if self._inflight is None:
            self._start_refresh(now)
        else:
            gen, started, reported = self._inflight
            limit = self.daemon.call_timeout
            if now - started > limit and not reported:
                self._inflight = (gen, started, True)
                why = f"libvirt call job_info timed out after {limit:g} s"
                self.worker.timeouts += 1
                self.worker.last_timeout = why
                self.log.event(logging.WARNING, "refusal",
                               "VM %s: %s; refusing it until libvirt answers", self.name, why)
                self._refuse_unasked(why, now)
        self._refresh_timer = asyncio.get_running_loop().call_later(
            self.daemon.permit_refresh, self._refresh_tick)

    def invalidate(self, why: str) -> None:
        """An event says the facts changed: refuse now, decide again at once."""
        now = time.monotonic()
        self.cache.invalidate(why, now)
        if self._inflight is None and self._refresh_timer is not None and not self._stopped:
            self._start_refresh(now)

    def pinning_check(self) -> str:
        """punch()'s check (S7), on the discard thread: "" while QEMU holds no pinning
        device fd, else the refusal.

        Runs right before and right after each slice. A hit is latched in ``pinning_fd``
        (one attribute write), which permit() reads before its cache, so the VM is refused
        from then on (a VFIO hot-plug pins RAM before the live XML shows the device); only
        a restart of the VM's QEMU (a new runner) clears it. A /proc that cannot be read
        refuses too.
        """
        if self.pinning_fd:
            return f"QEMU holds {self.pinning_fd}"
        found = pinning.scan(self.qemu_pid)
        if found:
            self.pinning_fd = found
            self.log.event(logging.ERROR, "refusal",
                           "%s: QEMU holds %s, which can pin guest RAM for DMA; refusing every "
                           "discard of this VM until it restarts", self.name, found)
        return found

    def guest_settings(self) -> dict[str, Any]:
        """The settings the agent gets: a ballooned VM's agent stays stats-only, because
        an arena isolating free memory would fight the balloon for the same pages."""
        values = table.guest_view(self.effective_settings())
        if self.cache.last().action == BALLOON:
            values["enabled"] = False
        return values

    # -- the balloon reclaimer (private RAM): libvirt I/O via the worker, policy in
    # host/balloon.py, the pre-aerate size in host/balloon_store.py

    async def balloon_tick(self) -> None:
        """Run the balloon controller once and apply its target (never raises: a libvirt
        failure is logged once and retried at the next tick)."""
        if not self._balloon_candidate():
            return  # not a balloon VM and we never moved its balloon: no libvirt calls
        now = time.monotonic()
        decision = self.permit()
        values = self.effective_settings()
        allowed = decision.action == BALLOON and bool(values["enabled"])
        why_not = decision.reason if decision.action != BALLOON else \
            "disabled by setting 'enabled'"
        if allowed and not self.limits.autodeflate:
            allowed, why_not = False, (
                "the domain's <memballoon> lacks autodeflate='on' (without it a squeezed "
                "guest cannot take memory back from the balloon under OOM); add it to "
                "the domain XML")
        if decision.action != BALLOON and self.balloon_target is None \
                and self._balloon_record is None:
            return
        try:
            actual, maximum = await self.worker.call(
                "balloon_info", self.daemon.conn.balloon_info, self.name)
            settings = pressure.balloon(dataclasses.replace(
                balloon_mod.BalloonSettings.from_settings(values, self.limits.min_guarantee),
                step=balloon_mod.step_for(self.balloon_rate)), self.pressure_level)
            raw = self.session.stats if self.session is not None else None
            stats, why = balloon_mod.parse_stats(raw if self._stats_seen is not None else None,
                                                 now - self._stats_at, maximum)
            current = self.balloon_target if self.balloon_target is not None else actual
            if self._settled_at is None and abs(actual - current) <= settings.settle:
                self._settled_at = now
                if self._inflating is not None:
                    t0, a0, goal = self._inflating
                    if now > t0 and a0 > goal:
                        self.balloon_rate = (a0 - goal) / (now - t0)
                    self._inflating = None
            step = balloon_mod.next_target(
                stats, why, actual, self.balloon_target, maximum, settings,
                now - self._last_deflate, allowed, why_not,
                None if self._settled_at is None else now - self._settled_at,
                self._free_rate, self._flaps.ages(now))
            self.balloon_actual, self.balloon_max = actual, maximum
            self.balloon_reason = step.reason
            if step.target != current:
                if step.target < current and self._balloon_record is None:
                    # tuned's rule: save what we change before the first change.
                    self._balloon_record = await self.worker.call(
                        "save balloon record", self.daemon.balloons.save, self.name,
                        actual, maximum)
                self._settled_at = None
                self.log.info("%s: balloon %d -> %d MiB (actual %d MiB): %s", self.name,
                              current >> 20, step.target >> 20, actual >> 20, step.reason)
                await self.worker.call("set_balloon", self.daemon.conn.set_balloon,
                                       self.name, step.target)
                self._inflating = None if step.deflate else (now, actual, step.target)
                self._flaps.moved(now, step.deflate)
                if step.deflate:
                    self._last_deflate = now
                self.balloon_target = step.target
            if self.balloon_target == maximum and actual >= maximum:
                self.balloon_target = None  # back at full memory: nothing of ours to undo
            await self._forget_record_if_back(actual, settings.settle)
            self._balloon_error = ""
        except (LibvirtUnavailable, DomainError, CallTimeout, StoreError) as e:
            if str(e) != self._balloon_error:
                self.log.warning("%s: balloon: %s; retrying", self.name, e)
            self._balloon_error = str(e)

    async def _forget_record_if_back(self, actual: int, settle: int) -> None:
        rec = self._balloon_record
        if rec is not None and self.balloon_target is None and actual >= rec.target_bytes \
                - settle:
            await self.worker.call("remove balloon record", self.daemon.balloons.remove,
                                   self.name)
            self._balloon_record = None
            self.log.info("%s: balloon back at its pre-aerate size (%d MiB); record removed",
                          self.name, rec.target_bytes >> 20)

    async def restore_balloon(self, why: str) -> None:
        """Put the balloon back to the size saved before aerate first squeezed it, if a
        record says it did (a previous daemon may have died with it squeezed). Called at
        start-up whatever the VM's decision, and when the daemon stops serving the VM."""
        try:
            rec = await self.worker.call("load balloon record", self.daemon.balloons.load,
                                         self.name)
        except (StoreError, CallTimeout) as e:
            self.log.error("%s: %s", self.name, e)
            return
        if rec is None:
            return
        self._balloon_record = rec
        try:
            actual, _ = await self.worker.call(
                "balloon_info", self.daemon.conn.balloon_info, self.name)
            if actual < rec.target_bytes:
                await self.worker.call("set_balloon", self.daemon.conn.set_balloon,
                                       self.name, rec.target_bytes)
                self.log.info("%s: balloon restored %d -> %d MiB, the size saved before aerate "
                              "squeezed it: %s", self.name, actual >> 20, rec.target_bytes >> 20,
                              why)
            self.balloon_target = None
            # The guest gives pages back at its own pace: look again for a while, so the
            # record goes once the balloon is back (else the next start restores again).
            for _ in range(RESTORE_CHECKS):
                actual, _ = await self.worker.call(
                    "balloon_info", self.daemon.conn.balloon_info, self.name)
                await self._forget_record_if_back(actual, RESTORE_SLACK)
                if self._balloon_record is None:
                    break
                await asyncio.sleep(1.0)
        except (LibvirtUnavailable, DomainError, CallTimeout, StoreError) as e:
            self.log.warning("%s: balloon left at its squeezed size: %s (%s); aerated retries, "
                             "or give the VM its memory back with virsh setmem %s %d KiB",
                             self.name, e, why, self.name, rec.target_bytes >> 10)

    async def balloon_release(self, why: str) -> None:
        """No controller will watch this VM any more: give the guest its memory back,
        so no hidden squeeze stays behind (called when the daemon stops serving it)."""
        if why in ("stopped", "crashed", "undefined"):
            # Its QEMU is gone; a new one starts at the configured size.
            with contextlib.suppress(CallTimeout, OSError):
                await self.worker.call("remove balloon record", self.daemon.balloons.remove,
                                       self.name)
            return
        target = self.balloon_target
        if target is None and self._balloon_record is None:
            return
        try:
            rec = self._balloon_record
            if rec is not None:
                size, maximum = rec.target_bytes, rec.max_bytes
            else:
                _, size = await self.worker.call(
                    "balloon_info", self.daemon.conn.balloon_info, self.name)
                maximum = size
            await self.worker.call("set_balloon", self.daemon.conn.set_balloon,
                                   self.name, size)
            self.balloon_target = None
            actual, _ = await self.worker.call(
                "balloon_info", self.daemon.conn.balloon_info, self.name)
            await self._forget_record_if_back(actual, RESTORE_SLACK)
            what = "full memory" if size >= maximum else "its size before aerate squeezed it"
            self.log.info("%s: balloon deflated to %s (%d MiB): %s, so no controller watches it "
                          "any more", self.name, what, size >> 20, why)
        except (LibvirtUnavailable, DomainError, CallTimeout, StoreError) as e:
            self.log.warning("%s: balloon left squeezed: %s (%s); the record in %s restores it "
                             "at the next start, or use virsh setmem", self.name, e, why,
                             self.daemon.balloons.dir)

    def balloon_moved(self, actual: int) -> None:
        """libvirt says the balloon is now ``actual`` bytes: wake the controller (it reads
        the size itself, through the worker, as on every tick)."""
        if self._balloon_candidate():
            self._wake_balloon.set()

    def _balloon_candidate(self) -> bool:
        """Whether the balloon controller has anything to watch on this VM."""
        return (self.cache.last().action == BALLOON or self.balloon_target is not None
                or self._balloon_record is not None
                or any(b.kind is BackingKind.ANON_PRIVATE for b in self.backings.values()))

    async def _balloon_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopped:  # the flag: wait_for may swallow a cancel (3.11)
            # Ticks every BALLOON_TICK only where there is a balloon to watch; elsewhere
            # it sleeps until a statistics message or a new decision wakes it.
            timer = loop.call_later(BALLOON_TICK, self._wake_balloon.set) \
                if self._balloon_candidate() else None
            try:
                await self._wake_balloon.wait()
            finally:
                if timer is not None:
                    timer.cancel()
            self._wake_balloon.clear()
            if not self._stopped:
                await self.balloon_tick()

    # -- discards

    def _discard(self, gpa: int, length: int, checks: Sequence[Check]) -> int:
        """The session's discard, on this VM's discard thread: the VM's budget first (S5),
        then punch (S1 re-checked, the lease and revocation checks before each slice)."""
        assert self.gmap is not None and self.session is not None
        # The session counts a batch before discarding its ranges: this is its number.
        why = self.budget.check(self.session.counters.batches, length, time.monotonic())
        if why:
            raise PunchRefused(self.name, gpa, length, why)
        return self.daemon.punch(self.name, self.gmap, self.backings, gpa, length,
                                 self.session.granule, self.permit,
                                 (self.pinning_check, *checks),
                                 verify=self.reclaim.range_done)  # host/verify.py

    def _in_ram(self, gpa: int, length: int) -> bool:
        assert self.gmap is not None and self.session is not None
        return may_report(self.gmap, gpa, length, self.session.granule)

    def _split(self, gpa: int, length: int) -> list[tuple[int, int]]:
        if self.gmap is None:
            return [(gpa, length)]
        return split_at_pieces(self.gmap, gpa, length)

    def _backed(self, ranges: list[tuple[int, int]]) -> list[bool]:
        """The session's answer to a probe's ranges, on the loop thread (host/probe.py says
        why that is cheap enough: a sweep of lseeks on an in-memory filesystem, S8)."""
        if self.gmap is None or self.session is None:
            raise ProbeUnknown("no memory map yet", retry=True)
        return probe_backed_ranges(self.gmap, self.backings, ranges, self.session.granule,
                                   self.daemon.host_memory.swap_total)

    async def prepare(self) -> bool:
        """Learn the VM's channel, memory map, backing and settings (all off the loop,
        each call timed). False: nothing to do."""
        self._set_state(RunnerState.PREPARING, "asking libvirt for the channel and map")
        conn = self.daemon.conn
        xml = await self.worker.call("domain_xml", conn.domain_xml, self.name)
        self.channel = channel_path(xml)
        self.channel_alias = channel_alias(xml)
        self.xml, self._xml_at = xml, time.monotonic()  # status shows its UUID either way
        if self.channel is None:
            self._set_state(RunnerState.NO_CHANNEL,
                            "the domain has no virtio-serial channel org.aerate.agent.0 "
                            "(see deploy/domain.py for the XML to add)")
            return False
        self.limits = balloon_limits(xml)
        await self.load_metadata()
        self.gmap, self.backings = await self.worker.call(
            "memory_map", conn.memory_map, self.name, timeout=self.daemon.map_timeout)
        self.qemu_pid = await self.worker.call("qemu_pid", conn.qemu_pid, self.name)
        self._apply_budget()
        self._backing_at = -math.inf  # the refresh below takes a backing snapshot
        decision = await self.refresh_permit()
        self.reason = decision.reason
        granule = max([MIN_GRANULE] + [b.page_size for b in self.backings.values()])
        self.idle_note = giant_granule_note(granule, self.effective_settings())
        if self.idle_note:
            self.log.warning("%s: %s", self.name, self.idle_note)
        self.backing_before = self.backing_now or 0
        lease_s = float(self.effective_settings()["lease_s"])
        if self.session is None:
            self.session = VmSession(self.name, granule, self._in_ram, self._discard,
                                     self.permit, self.guest_settings(), lease_s=lease_s,
                                     backed=self._backed, split=self._split)
        else:
            self.session.granule = granule
            self.session.endpoint.set_lease(lease_s)
            self.session.configure({"enabled": self.guest_settings()["enabled"]})
        return True

    def _apply_budget(self) -> None:
        v = self.effective_settings()
        self.budget.configure(v["discard_batch_mib"], v["discard_rate_mib_s"])
        kib = v["input_kib_s"]
        self.input_budget.bucket.rate, self.input_budget.bucket.burst = kib * 1024, \
            4 * kib * 1024

    async def load_metadata(self) -> None:
        """Read the VM's stored settings (through the worker). S6 fails closed: a layer
        that does not validate is not applied and refuses the VM with the reason
        (settings_error) until it is fixed; what is stored stays stored (``set`` merges
        into the stored entries)."""
        try:
            self.metadata = config_mod.metadata_from_xml(
                await self.worker.call("metadata", self.daemon.conn.metadata, self.name,
                                       config_mod.METADATA_NS), self.name)
            if self.settings_error:
                self.log.info("%s: stored settings valid again", self.name)
            self.settings_error = ""
        except config_mod.ConfigError as e:
            if str(e) != self.settings_error:
                self.log.event(logging.ERROR, "refusal", "%s", e)
            self.metadata, self.settings_error = {}, str(e)
        self.invalidate("stored settings read again; deciding again")
    async def refresh_backing(self, timeout: float) -> None:
        """Re-read the backing figure now, off the loop and timed, for a status request
        (its reader wants the figure of this moment: a test's "peak", an operator's look).
        On a timeout or error the snapshot stays, with its age in status."""
        if not self.backings:
            return
        asked = time.monotonic()
        try:
            value = await self.worker.call("backing_allocated", self.backing_allocated,
                                           timeout=timeout, libvirt=False)
        except (OSError, RuntimeError):  # CallTimeout, BackingError: keep the snapshot
            return
        if asked >= self._backing_at:
            self.backing_now, self._backing_at = value, asked

    def backing_allocated(self) -> int:
        """Host memory allocated to this VM's RAM right now, bytes (from the kernel).
        Blocking (reads QEMU's smaps for private RAM): only the worker calls it."""
        total = 0
        for b in self.backings.values():
            total += allocated_bytes(b)
        return total

    # -- the connection loop

    def _lock(self) -> int | None:
        """Take this VM's lock (S4), or None when another daemon holds it."""
        path = os.path.join(self.daemon.vm_lock_dir, self.name.replace("/", "_") + ".lock")
        fd, other = pid_lock(path)
        if fd is None:
            self._set_state(RunnerState.BUSY,
                            f"another aerated (pid {other}) serves this VM ({path})")
        return fd

    async def run(self) -> None:
        """Hold the VM's lock, give back any balloon squeeze a previous daemon left, then
        connect, sync, serve; reconnect with backoff on any failure, until cancelled. The
        balloon goes back to its pre-aerate size at the end."""
        while (lock := self._lock()) is None:
            self.log.warning("%s: %s; waiting", self.name, self.reason)
            await asyncio.sleep(5)
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        try:
            await self.restore_balloon("a record from an earlier aerated run")
            tasks.append(loop.create_task(self._balloon_loop(), name=f"balloon:{self.name}"))
            await self._run_locked(tasks)
        finally:
            self._stopped = True
            if self._refresh_timer is not None:
                self._refresh_timer.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
            if self.stop_reason:  # cancelled; a no-channel runner keeps saying why it idles
                self._set_state(RunnerState.STOPPED, self.stop_reason)
            try:
                await asyncio.shield(
                    self.balloon_release(self.stop_reason or "aerated stopped serving it"))
            finally:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)   # idle: every job was awaited
                os.close(lock)

    async def _run_locked(self, tasks: list[asyncio.Task[None]]) -> None:
        delay = 1.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not await self.prepare():
                    return
                if self._refresh_timer is None:
                    # The first tick at a random phase within the period (never later than
                    # one period, so the permit's age bound is kept): runners started
                    # together (a daemon start, a libvirt reconnect) would otherwise
                    # refresh in one burst every period, and every ack waits behind it.
                    self._refresh_timer = loop.call_later(
                        self.daemon.permit_refresh * random.uniform(0.1, 1.0),
                        self._refresh_tick)
                await self._serve()
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except (OSError, LibvirtUnavailable, DomainError, MapError, RuntimeError,
                    ValueError) as e:
                # CallTimeout and GuestFlood are RuntimeErrors: refused, with the reason.
                why = str(e) if isinstance(e, (CallTimeout, GuestFlood)) else \
                    f"{type(e).__name__}: {e}"
                self._set_state(RunnerState.RETRYING, why)
                self.log.warning("%s: %s; retrying in %.0fs", self.name, why, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _serve(self) -> None:
        assert self.session is not None and self.channel is not None
        s = self.session
        reader, writer = await asyncio.open_unix_connection(self.channel)
        self.writer = writer  # control.reapply sends new settings to an idle guest at once
        try:
            s.connected()
            self._set_state(RunnerState.SYNCING)
            while True:
                self._flush_log()
                out = s.take_outbox()
                if out:
                    writer.write(out)
                    await writer.drain()
                if s.state is HostState.CLOSED:
                    self._set_state(RunnerState.CLOSED, s.last_error)
                    return  # reconnect: a new connection, a new session
                if self.stop_reason:
                    # Stopped: asyncio.wait_for of Python 3.11 can swallow the cancel when
                    # data arrives in the same turn, so the flag ends the loop too (S4).
                    raise asyncio.CancelledError
                if self._restart and self._take_restart(s.endpoint.session):
                    s.connected()
                    continue
                if s.state is HostState.SYNCING:
                    try:
                        data = await asyncio.wait_for(reader.read(READ_CHUNK), SYNC_RETRY)
                    except asyncio.TimeoutError:  # noqa: UP041 (3.9, 3.10: not the builtin)
                        s.connected()   # no answer: the agent may not run yet; sync again
                        continue
                else:
                    # Keepalives come from a timer, not from a timeout on this read: a
                    # wait_for per read is a task, a timer and a future, and a busy guest's
                    # serve loop turns several times a second. An idle guest gets no
                    # keepalive and costs no timer: it asks (need-token) when it wants to
                    # report. A pending restart waits for its next bytes: the revocation
                    # already refuses every discard of that session.
                    self._arm_keepalive(writer)
                    data = await reader.read(READ_CHUNK)
                if not data:
                    raise ConnectionResetError("QEMU closed the channel socket")
                # Loop time of this read's handling; the discards have their own budget,
                # so only feed() and finish() count. Wall time on the loop thread, not
                # thread CPU time: it is never less than the CPU it stands for (the safe
                # side of the bound) and costs a vDSO read where CLOCK_THREAD_CPUTIME_ID
                # is a system call (4 % of the daemon at 1,000 guests).
                t0 = time.perf_counter()
                job = s.feed(data)
                spent = time.perf_counter() - t0
                while job is not None:
                    await self._run_job(job)
                    t0 = time.perf_counter()
                    job = s.finish(job)
                    spent += time.perf_counter() - t0
                flood = self.input_budget.take(len(data), time.monotonic(), max(0.0, spent))
                if flood:
                    s.cut_off(flood)   # status shows it as the session's last error
                    self._flush_log()
                    raise GuestFlood(f"{flood}; session ended")
                due = s.endpoint.keepalive_due()
                if due is not None and due <= 0:
                    s.endpoint.keepalive()
                if s.hello_gen != self._asked_gen:
                    # A new hello (or session): permit() refuses until a decision is made
                    # with it (its page poisoning, the map after its firmware ran). Decide
                    # now, through the VM's worker, before reading on: the guest's first
                    # report then meets a decision instead of a refusal and its back-off.
                    self._asked_gen = s.hello_gen
                    await self.refresh_permit()
                if s.state is HostState.RUNNING and self.state is not RunnerState.RUNNING:
                    self._set_state(RunnerState.RUNNING)
                if s.stats is not self._stats_seen:
                    # A new statistics message: the balloon controller acts on it now,
                    # with how fast the guest's free memory moved since the last one.
                    now = time.monotonic()
                    self._free_rate = balloon_mod.free_rate(self._stats_seen,
                                                            self._stats_at, s.stats, now)
                    self._stats_seen, self._stats_at = s.stats, now
                    self._wake_balloon.set()
                if len(data) == READ_CHUNK:
                    # More may be buffered: let other VMs' tasks run between chunks.
                    await asyncio.sleep(0)
        finally:
            if self._keepalive_timer is not None:
                self._keepalive_timer.cancel()
                self._keepalive_timer = None
            self.writer = None
            self._flush_log()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _arm_keepalive(self, writer: asyncio.StreamWriter) -> None:
        """Have ``_keepalive`` run when the session's next keepalive is due (none while
        the guest is idle; at most one timer per VM)."""
        s = self.session
        if self._keepalive_timer is not None or s is None:
            return
        due = s.endpoint.keepalive_due()
        if due is not None:
            self._keepalive_timer = asyncio.get_running_loop().call_later(
                max(0.0, due), self._keepalive, writer)

    def _keepalive(self, writer: asyncio.StreamWriter) -> None:
        """The keepalive timer (loop thread): send a fresh lease token if one is due, and
        look again at the next due time (an ack in between carried a token: later)."""
        self._keepalive_timer = None
        s = self.session
        if s is None or s.state is not HostState.RUNNING or s.job is not None \
                or self.stop_reason or writer.is_closing():
            return  # the serve loop arms it again when it reads next
        due = s.endpoint.keepalive_due()
        if due is not None and due <= 0:
            s.endpoint.keepalive()
            writer.write(s.take_outbox())   # small, at most one a keepalive period
        self._arm_keepalive(writer)

    async def _run_job(self, job: DiscardJob) -> None:
        """Run one report's discard: a small one right here on the loop thread, a bigger
        one on this VM's own thread (``_discard_off_loop``).

        A small job (at most ``INLINE_DISCARD_BYTES``) costs the loop about what the thread
        hop would (the hop, its future and the loop's wake-up were a third of the daemon's
        CPU at 1,000 guests), so it is not worth one; a large one may free gigabytes and
        must not hold up other VMs' acks (S8). Both run the same ``job.run``: the checks
        before and after every slice, the lease and the revocation that libvirt's event
        thread writes (it runs while the loop thread sits in fallocate or readlink, which
        release the GIL), so inline changes nothing of S1/S4: the session takes no input
        and cannot re-sync until ``finish``.

        Inline also needs reads that never wait on a disk (``reads_stay_in_memory``): the
        content check reads every granule before its punch, and a guest that reports memory
        the host swapped out (its own cold pages, again and again) would otherwise make
        the loop wait on the swap device for each of them while every other VM's acks
        wait behind it. Those reads go to the VM's thread, where the wait is that VM's own;
        the bytes they read were charged to its discard budget before the read (S5), a
        content refusal included.
        """
        if job.total <= INLINE_DISCARD_BYTES and reads_stay_in_memory(
                self.backings.values(), self.daemon.host_memory.swap_total):
            job.run()
        else:
            await self._discard_off_loop(job)

    async def _discard_off_loop(self, job: DiscardJob) -> None:
        """Run one report's discard on this VM's own thread and wait for it (S8: a slow or
        huge fallocate of one VM never holds up another VM's acks).

        Cancelled meanwhile (the daemon stops serving the VM), it revokes the session so
        the discard stops at its next slice, and still waits for it to end before the
        cancellation goes on (S4: the VM's lock, and with it any new session, is released
        only after its in-flight discard finished).
        """
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"discard:{self.name}")
        fut = asyncio.get_running_loop().run_in_executor(self._pool, job.run)
        cancelled = False
        while not fut.done():
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                cancelled = True
                if self.session is not None:
                    self.session.revoke(self.stop_reason or "aerated stopped serving the VM")
        if cancelled:
            raise asyncio.CancelledError

    def restart_session(self, why: str, ending: int | None = None) -> None:
        """Begin a new session at the next turn of the serve loop (loop thread only: the
        loop is not inside a discard when this runs, S4).

        ``ending``: the session this restart is meant to end (the one a reset or a closed
        port revoked on libvirt's thread). If another session began in between (the next
        agent's need-sync is often read before the loop gets to the event), that session
        already replaced the revoked one: nothing of the revoked one is served (its checks
        fail on the revocation, S4) and the new one was started after it, so a second
        restart would only void the new agent's fresh session and make it sync again. It
        is skipped then. Without ``ending`` the restart always happens.
        """
        self._restart = why  # acted on at the serve loop's next turn
        self._restart_ending = ending

    def _take_restart(self, current: int) -> bool:
        """The serve loop's half of ``restart_session``: whether to start a new session now
        (``current``: the session the loop is serving). Clears the pending restart."""
        why, self._restart = self._restart, ""
        ending, self._restart_ending = self._restart_ending, None
        if not why:
            return False
        if ending is None or ending == current:
            self.log.event(logging.INFO, "session", "%s: new session: %s", self.name, why)
            return True
        self.log.debug("%s: %s: a newer session already replaced the one it ended",
                       self.name, why)
        return False

    def _flush_log(self) -> None:
        if self.session is None:
            return
        journal.emit_notes(self.log, self.session.log)
        self.session.log.clear()

    def settings_changed(self) -> None:
        """The effective settings changed (stored layer, host file, host pressure): the
        budgets and the lease now; the permit is refused until re-decided with them (mode
        may have changed). control.reapply sends the changed guest settings."""
        self._apply_budget()
        self.invalidate("settings changed; deciding again")
        if self.session is not None:
            self.session.endpoint.set_lease(float(self.effective_settings()["lease_s"]))

    def status(self) -> dict[str, Any]:
        """What aeratectl shows for this VM: snapshots only, no libvirt, no /proc."""
        out: dict[str, Any] = {"vm": self.name, "state": self.state.value,
                               "reason": self.reason}
        if self.session is not None:
            out.update(self.session.status())
            out["state"] = self.state.value
        now = time.monotonic()
        current = self.cache.get(now)
        out["permit"] = {"action": current.action, "reason": current.reason,
                         "age_s": round(now - self.cache.issued_at, 3)
                         if math.isfinite(self.cache.issued_at) else None}
        if current.action == REFUSE and self.session is not None:
            out["reason"] = current.reason  # why the next batch would be refused
        if self.idle_note:
            out["idle_note"] = self.idle_note
        last = self.cache.last()
        ballooned = last.action == BALLOON or self.balloon_target is not None
        if ballooned or last.action == KERNEL:
            # No batches flow on a ballooned VM or one left to its kernel: the session has
            # no decision to show.
            out["reclaimer"], out["reason"] = last
        if ballooned:
            out["balloon"] = {"target_bytes": self.balloon_target
                              if self.balloon_target is not None else self.balloon_actual,
                              "actual_bytes": self.balloon_actual,
                              "max_bytes": self.balloon_max, "reason": self.balloon_reason,
                              "saved_bytes": self._balloon_record.target_bytes
                              if self._balloon_record is not None else None}
        if self.backing_now is not None:
            out["backing_allocated_bytes"] = self.backing_now
            out["backing_allocated_age_s"] = round(now - self._backing_at, 3)
        out["backing_allocated_at_start"] = self.backing_before
        out["reclaim"] = self.reclaim.status()
        out["backings"] = {n: {"kind": b.kind.value, "page_size": b.page_size,
                               "reason": b.reason} for n, b in self.backings.items()}
        out["budget"] = self.budget.status()
        out["input_floods"] = self.input_budget.floods
        if self.worker.hung or self.worker.timeouts:
            out["libvirt_calls"] = {"hung": self.worker.hung, "timeouts": self.worker.timeouts,
                                    "last_timeout": self.worker.last_timeout}
        out["settings"] = self.effective_settings()
        return out


class Daemon:
    """The aerated process: lock, libvirt, runners, control socket.

    ``conn`` may be handed in (the tests' and the benchmark's fake libvirt); ``punch`` is the
    discard the runners call (host/punch.py unless a test counts instead).
    """

    #: The host's memory, sampled by control.watch_pressure (unknown: no pressure).
    host_memory: pressure.HostMemory = pressure.UNKNOWN

    def __init__(self, uri: str, config_path: str, run_dir: str,
                 metrics: tuple[str, int] | None = None, only: tuple[str, ...] = (),
                 conn: Any = None) -> None:
        self.metrics = metrics
        self.only = only
        self.config_path = config_path
        self.config = config_mod.load(config_path)
        self.run_dir = run_dir
        self.vm_lock_dir = VM_LOCK_DIR
        self.runners: dict[str, VmRunner] = {}
        self.loop = asyncio.get_running_loop()
        self.pool = new_pool()
        self.call_timeout = CALL_TIMEOUT
        self.map_timeout = MAP_TIMEOUT
        self.permit_refresh = PERMIT_REFRESH
        self.permit_max_age = PERMIT_MAX_AGE
        self.punch = punch
        self.balloons = BalloonStore(run_dir)
        # Calls about no VM in particular (the domain list) keep their own order.
        self.host_worker = VmWorker("(host)", self.pool, CALL_TIMEOUT)
        self.conn = conn if conn is not None else LibvirtConnection(
            uri, on_connect=self._on_connect, on_disconnect=self._on_disconnect,
            on_lifecycle=self._on_lifecycle, on_device=self._on_device, on_job=self._on_job,
            on_balloon=self._on_balloon, on_port=self._on_port,
            on_reset=self._on_reset)
        self.stopping = asyncio.Event()
        self._status_line = ""
        self._notify_error = ""
        self._restoring: set[str] = set()
        self._posted: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._post_lock = threading.Lock()
        self._post_pending = False

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon; callable from any thread. Posts made while
        one wake-up is pending share it (one self-pipe write for a burst of results)."""
        with self._post_lock:
            self._posted.append((fn, args))
            if self._post_pending:
                return
            self._post_pending = True
        self._to_loop(self._run_posted)

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """``call_soon_threadsafe`` for libvirt's and the workers' threads. Once the loop is
        closed the daemon is exiting and every session is gone with it: an event that comes
        in now has nothing left to change, and is dropped (logged at debug), not raised in
        libvirt's event thread."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            if not self.loop.is_closed():
                raise
            log.debug("loop closed; dropped %r", fn)

    def _run_posted(self) -> None:
        with self._post_lock:
            items, self._posted = self._posted, []
            self._post_pending = False
        for fn, args in items:
            fn(*args)

    # libvirt's thread calls these: they only hand over to the loop, except that a guest
    # reset or a stopped domain revokes the session right here (S4): the loop thread may be
    # the one busy discarding for that VM, and the check before its next slice must see it.

    def _revoke(self, name: str, why: str) -> int | None:
        """Revoke the VM's current session; returns which one (None: no session)."""
        runner = self.runners.get(name)
        session = runner.session if runner is not None else None
        if session is not None:
            return session.revoke(why)
        return None

    def _on_reset(self, name: str) -> None:
        self._to_loop(self.on_reset, name, self._revoke(name, "the guest was reset"))

    def on_reset(self, name: str, ending: int | None = None) -> None:
        """A guest reset: its memory is no longer what its reports described. End the
        session (a new one starts on a new connection) before anything more is read."""
        r = self.runners.get(name)
        if r is not None:
            r.log.event(logging.INFO, "session",
                        "%s: guest reset; its session ends, a new one starts", name)
            r.restart_session("the guest was reset", ending)

    def _on_connect(self, conn: LibvirtConnection) -> None:
        self._to_loop(self._start_resync)

    def _start_resync(self) -> None:
        self.loop.create_task(self.resync(), name="resync")

    def _on_disconnect(self, why: str) -> None:
        # A guest reset while libvirt is away sends no event we will ever see: every session
        # of now is revoked (no discard of it any more, even one under way), and each VM
        # gets a new session when libvirt is back (resync).
        for name in list(self.runners):
            self._revoke(name, "the libvirt connection was lost: a guest reset could go "
                               "unseen")
        self._to_loop(
            log.warning, "libvirt: %s; VM sessions are revoked (nothing is discarded) and "
            "start anew once it is back", why)

    def _on_lifecycle(self, ev: LifecycleEvent) -> None:
        if ev.event in ("stopped", "crashed", "shutdown"):
            self._revoke(ev.name, f"the domain {ev.event}")
        self._to_loop(self.on_lifecycle, ev)

    def _on_device(self, name: str, alias: str, added: bool) -> None:
        self._to_loop(self.on_device, name, alias, added)

    def _on_job(self, name: str, what: str) -> None:
        self._to_loop(self.on_job, name, what)

    def _on_port(self, name: str, port: str, is_open: bool) -> None:
        """The guest closed a virtio-serial port (QEMU's VSERPORT_CHANGE, on libvirt's
        thread). If it is the VM's aerate port, its session ends for discards here and now,
        like on a reset: the agent behind it stopped or died, or the guest is going down,
        and no report read after this moment may be served. A defence beside the leases,
        which already hold the pages an agent leaves behind (agent/protocol.py): the next
        agent's need-sync starts a new session."""
        runner = self.runners.get(name)
        if is_open or runner is None or runner.channel_alias is None \
                or port != runner.channel_alias:
            return
        why = "the guest closed its aerate port (its agent stopped or died, or it shuts down)"
        self._to_loop(self.on_port_closed, name, why, self._revoke(name, why))

    def on_port_closed(self, name: str, why: str, ending: int | None = None) -> None:
        """The loop's half of ``_on_port``: say so, and begin a new session as on a reset
        (unless the next agent's need-sync began one since: ``restart_session``)."""
        r = self.runners.get(name)
        if r is not None:
            r.log.event(logging.INFO, "session",
                        "%s: %s; no report of that session is served any more", name, why)
            r.restart_session(why, ending)

    def _on_balloon(self, name: str, actual: int) -> None:
        self._to_loop(self.on_balloon, name, actual)

    def on_balloon(self, name: str, actual: int) -> None:
        """The balloon moved (libvirt's event): the controller looks now, not at its next
        tick, so an arrival is seen (and the next step starts) at once."""
        r = self.runners.get(name)
        if r is not None:
            r.balloon_moved(actual)

    def on_job(self, name: str, what: str) -> None:
        """A migration iterates or a job completed: refuse until re-decided."""
        r = self.runners.get(name)
        if r is not None:
            r.invalidate(f"libvirt job event: {what}")

    def on_device(self, name: str, alias: str, added: bool) -> None:
        """A device came or went (a DIMM, virtio-mem): the memory map is stale. Restart
        the VM's session so the map is rebuilt before anything more is discarded."""
        if name in self.runners:
            self.stop_runner(name, f"device {alias} {'added' if added else 'removed'}")
            self.start_runner(name)

    async def resync(self) -> None:
        """After (re)connecting to libvirt: start runners for running VMs, drop the rest,
        and give back every balloon squeeze a record remembers (served VM or not). The
        domain list comes through the host-wide worker: off the loop, timed."""
        try:
            refs = await self.host_worker.call("running_domains", self.conn.running_domains)
            running = {d.name for d in refs}
        except (LibvirtUnavailable, CallTimeout) as e:
            log.warning("%s; VMs are started again at the next libvirt (re)connect", e)
            return
        for name in running - set(self.runners):
            self.start_runner(name)
        for name in set(self.runners) - running:
            self.stop_runner(name, "no longer running")
        for r in self.runners.values():
            if r.session is not None and r.session.revocation(r.session.endpoint.session):
                # Revoked while libvirt was away (or by a reset): a new session, so that
                # no report from before can be served.
                r.restart_session("libvirt is back; reports from before are void")
        records, errors = self.balloons.all()
        for err in errors:
            log.error("%s", err)
        for rec in records:
            if rec.vm not in running:
                journal.VmLog(log, rec.vm).info(
                    "%s: balloon record dropped: the VM is not running (a new QEMU "
                    "starts at its configured size)", rec.vm)
                self.balloons.remove(rec.vm)
            elif rec.vm not in self.runners and rec.vm not in self._restoring:
                # Not served by this daemon (--vm), yet squeezed by an earlier run.
                self._restoring.add(rec.vm)
                self.loop.create_task(self._restore_unserved(rec.vm))

    async def _restore_unserved(self, name: str) -> None:
        try:
            r = VmRunner(self, name)
            await r.restore_balloon("not served by this aerated (--vm)")
        finally:
            self._restoring.discard(name)

    def on_lifecycle(self, ev: LifecycleEvent) -> None:
        """Domain events from libvirt: no polling for VMs coming and going."""
        if ev.event in ("started", "resumed") and ev.name not in self.runners:
            self.start_runner(ev.name)
        elif ev.event in ("stopped", "crashed", "undefined"):
            self.stop_runner(ev.name, ev.event)
        elif ev.name in self.runners:
            # suspended (migration, save...), resumed: refuse until re-decided.
            self.runners[ev.name].invalidate(f"domain {ev.event}")

    def serves(self, name: str) -> bool:
        """Whether this daemon serves VM ``name`` (all, unless --vm patterns narrow it)."""
        return not self.only or any(fnmatch.fnmatchcase(name, p) for p in self.only)

    def start_runner(self, name: str) -> None:
        """Begin serving a VM."""
        if not self.serves(name):
            return
        r = VmRunner(self, name)
        self.runners[name] = r
        r.task = self.loop.create_task(r.run(), name=f"vm:{name}")
        r.log.event(logging.INFO, "session", "%s: serving", name)

    def stop_runner(self, name: str, why: str) -> None:
        """Stop serving a VM (its QEMU is gone; no discard can be under way: S4)."""
        r = self.runners.pop(name, None)
        if r is not None and r.task is not None:
            r.stop_reason = why
            r.task.cancel()
            r.log.event(logging.INFO, "session", "%s: session ended (%s)", name, why)

    # -- systemd: watchdog and status

    def status_line(self) -> str:
        """STATUS= for systemd: VMs by state, bytes discarded, libvirt up or down."""
        states: dict[str, int] = {}
        discarded = 0
        for r in self.runners.values():
            states[r.state.value] = states.get(r.state.value, 0) + 1
            if r.session is not None:
                discarded += r.session.counters.discarded
        by_state = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no VMs"
        up = "up" if self.conn.connected else "DOWN"
        return f"{len(self.runners)} VMs ({by_state}); {discarded >> 20} MiB discarded; " \
               f"libvirt {up}"

    def _notify(self, message: str) -> None:
        try:
            send_notify(message, block=False)
            self._notify_error = ""
        except FdStoreError as e:
            if str(e) != self._notify_error:
                log.warning("%s", e)
            self._notify_error = str(e)

    async def _systemd_loop(self, watchdog_s: float | None) -> None:
        """Ping the watchdog from the loop thread (a wedged loop misses it and systemd
        restarts the daemon) and refresh STATUS= when it changes; never blocks."""
        period = min(1.0, watchdog_s / 2) if watchdog_s else 1.0
        while True:
            if watchdog_s:
                self._notify("WATCHDOG=1")
            line = self.status_line()
            if line != self._status_line:
                self._status_line = line
                self._notify(f"STATUS={line}")
            await asyncio.sleep(period)

    # -- control socket (aeratectl)

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One JSON request per line, one JSON answer per line."""
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    answer = await self.handle(req)
                except (ValueError, KeyError, TypeError) as e:
                    answer = {"ok": False, "error": str(e)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """Serve one control request (host/control.py; libvirt only through the workers)."""
        return await control.handle(self, req)

    async def _reload(self) -> None:
        """SIGHUP (``systemctl reload``): RELOADING=1 with MONOTONIC_USEC= (what systemd
        >= 253 asks of a reloading service, ignored by older ones), the reload (a bad file
        keeps the old settings and is logged at err by control.reload), then READY=1, so
        systemctl's reload ends only once the new file is in force or refused."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        try:
            await self.handle({"cmd": "reload"})
        finally:
            self._notify("READY=1\nSTATUS=serving")

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT."""
        sock = os.path.join(self.run_dir, "aerated.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        old = os.umask(0o077)
        try:
            server = await asyncio.start_unix_server(self.control, path=sock)
        finally:
            os.umask(old)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        self.loop.add_signal_handler(
            signal.SIGHUP, lambda: self.loop.create_task(self._reload()))
        if self.metrics is not None:
            addr, port = self.metrics
            # The scrape runs on prometheus' own thread and reads status snapshots only.
            start_http_server(port, addr=addr, registry=metrics_mod.registry(
                lambda: control.views(self), lambda: self.conn.connected,
                lambda: self.host_memory))
            log.info("metrics on http://%s:%d/metrics", addr, port)
        self.conn.start()
        self._notify("READY=1\nSTATUS=serving")
        watchdog = watchdog_seconds()
        notifier = self.loop.create_task(self._systemd_loop(watchdog), name="systemd")
        watcher = self.loop.create_task(control.watch_pressure(self), name="host pressure")
        log.info("aerated ready; control socket %s%s", sock,
                 f"; watchdog every {watchdog / 2:g} s" if watchdog else "")
        await self.stopping.wait()
        self._notify("STOPPING=1")
        server.close()
        tasks = [r.task for r in self.runners.values() if r.task is not None]
        for name in list(self.runners):
            self.stop_runner(name, "daemon stopping")
        # Let each runner finish (its balloon goes back to full memory) while libvirt is up.
        await asyncio.gather(*tasks, return_exceptions=True)
        notifier.cancel()
        watcher.cancel()
        self.conn.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


def watchdog_seconds(env: Mapping[str, str] | None = None) -> float | None:
    """systemd's watchdog period for this process (WATCHDOG_USEC, WATCHDOG_PID), or None."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6


#: Descriptors the daemon holds per served VM: its channel socket and its VM lock (S4),
#: and for a moment during a discard the backing and QEMU's /proc fd directory.
FDS_PER_VM = 4


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; (before, after).

    Each served VM holds two descriptors for as long as it is served and two more during a
    discard (``FDS_PER_VM``), so a thousand VMs need some 2,000-4,000. systemd starts
    services with a soft limit of 1,024 (the hard one is 524,288 on current systemd): with
    it, the VMs past about the 500th would fail to open their lock or socket (EMFILE).
    The soft limit is what select() needs kept low; the daemon polls with epoll and
    libvirt with poll(), neither bound by FD_SETSIZE, and it starts no children that
    could inherit the raised limit (what systemd's advice to raise it in the program
    itself, not for the whole system, guards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit: the kernel's default nr_open, above which a soft one fails.
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open-file limit from %d to %d: %s; at most about %d "
                    "VMs can be served", soft, target, e, soft // FDS_PER_VM)
        return soft, soft
    return soft, target


def check_config(path: str) -> int:
    """``aerated --check-config``: the same validation as start-up and reload, offline."""
    try:
        cfg = config_mod.load(path, missing_ok=False)
    except config_mod.ConfigError as e:
        print(f"aerated: {e}", file=sys.stderr)
        return 1
    print(f"{path}: OK: {cfg.summary()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aerated``."""
    ap = argparse.ArgumentParser(prog="aerated", description="aerate host daemon")
    ap.add_argument("--version", action="version", version="%(prog)s " + __version__)
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--config", default=config_mod.DEFAULT_PATH)
    ap.add_argument("--run-dir", default=RUN_DIR)
    ap.add_argument("--metrics", default="127.0.0.1:9848", metavar="ADDR:PORT",
                    help="Prometheus endpoint, loopback only ('off' to disable)")
    ap.add_argument("--vm", action="append", default=[], metavar="GLOB",
                    help="serve only VMs whose name matches (repeatable; default: all)")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--check-config", action="store_true",
                    help="validate the config file (--config) and exit: 0 and a summary "
                         "when it is fine, else the file, line, key and allowed values")
    args = ap.parse_args(argv)
    if args.check_config:
        return check_config(args.config)
    journal.setup(args.log_level)
    before, after = raise_fd_limit()
    if after != before:
        log.debug("open-file limit raised from %d to %d (about %d VMs)", before, after,
                  after // FDS_PER_VM)
    try:
        metrics = None if args.metrics == "off" else metrics_mod.parse_listen(args.metrics)
    except ValueError as e:
        log.error("%s", e)
        return 2
    try:
        lock = take_lock(args.run_dir)
    except (DaemonError, OSError) as e:
        log.error("%s", e)
        return 1

    async def amain() -> None:
        daemon = Daemon(args.uri, args.config, args.run_dir, metrics, tuple(args.vm))
        await daemon.serve()

    try:
        asyncio.run(amain())
    except config_mod.ConfigError as e:
        log.error("%s", e)
        return 2
    finally:
        os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())

