"""``aerated``: the host daemon. One process per host, one session per VM.

An asyncio loop owns everything that changes state: the VM runners (one task per running
domain with an aerate channel), the control socket and the timers. libvirt's events
arrive on libvirt's own thread (host/libvirt_conn.py) and are handed to the loop with
``call_soon_threadsafe``. Discards run synchronously inside a session's ``receive``, so a
session is never closed or re-synced while a discard is under way (S4).

VM sessions talk straight to QEMU's chardev socket, not through libvirtd: a libvirtd
restart does not drop them. While libvirtd is away nothing new is started and every
batch is refused, because the daemon cannot tell whether a migration began (S1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import fnmatch
import json
import logging
import math
import os
import signal
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any

import libvirt
from prometheus_client import start_http_server

from aerate.agent import settings as table
from aerate.agent.fdstore import send_notify
from aerate.agent.protocol import HostState
from aerate.host import balloon as balloon_mod
from aerate.host import config as config_mod
from aerate.host import metrics as metrics_mod
from aerate.host import pinning
from aerate.host.backing import Backing, BackingKind, allocated_bytes
from aerate.host.backing import resolve as resolve_backings
from aerate.host.libvirt_conn import (
    DomainError,
    LibvirtConnection,
    LibvirtUnavailable,
    LifecycleEvent,
    channel_path,
)
from aerate.host.punch import punch
from aerate.host.qemu_map import GuestMemoryMap, MapError, build_map, gather, may_report
from aerate.host.refusal import (
    BALLOON,
    REFUSE,
    Decision,
    VmFacts,
    decide,
    domain_facts,
    hugetlb_reservations,
    migration_from_qmp,
    poison_from_hello,
)
from aerate.host.session import VmSession

log = logging.getLogger("aerated")
RUN_DIR = config_mod.RUN_DIR
#: Per-VM locks live here whatever --run-dir says: two daemons (an operator's and a test's,
#: say) must never serve the same VM at once (S4).
VM_LOCK_DIR = "/run/aerate/vms"
SYNC_RETRY = 5.0
PERMIT_TTL = 0.25
MIN_GRANULE = 2 << 20
#: Host page size from which the agent cannot assemble a reportable granule (agent/cycle.py).
GIANT_GRANULE = 1 << 30
#: How often the balloon controller looks again without a new statistics message (it
#: notices a silent guest this way).
BALLOON_TICK = 1.0


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


class VmRunner:
    """Everything the daemon knows and does for one VM."""

    def __init__(self, daemon: Daemon, name: str) -> None:
        self.daemon = daemon
        self.name = name
        self.session: VmSession | None = None
        self.gmap: GuestMemoryMap | None = None
        self.backings: dict[str, Backing] = {}
        self.channel: str | None = None
        self.qemu_pid: int | None = None
        self.state = "starting"
        self.reason = ""
        self.task: asyncio.Task[None] | None = None
        self.stop_reason = ""
        self._permit: tuple[float, Decision] = (0.0, Decision(REFUSE, "not decided yet"))
        self.settings: dict[str, Any] = {}
        self.metadata: dict[str, Any] = {}
        self.live: dict[str, Any] = {}
        self.backing_before = 0
        # Balloon reclaimer: the last target we asked libvirt for (None: we never moved
        # it, or it is back at full memory), what libvirt last said, and why.
        self.balloon_target: int | None = None
        self.balloon_actual = 0
        self.balloon_max = 0
        self.balloon_reason = ""
        self._balloon_error = ""
        self._last_deflate = -math.inf
        self._settled_at: float | None = -math.inf  # balloon first seen at its target
        self._stats_seen: object = None
        self._stats_at = -math.inf
        # -- refusal facts (issue 9) that are not in the domain XML
        #: S6: why the VM's stored settings cannot be used ("" = they are fine)
        self.settings_error = ""
        #: S7: a pinning device fd once seen in QEMU; latched until the VM restarts
        self.pinning_fd = ""
        #: the hello the cached permit was decided with (a new hello re-decides at once)
        self._permit_hello: object = None
        #: why the map could not be rebuilt after the last hello ("" = it was)
        self.map_error = ""
        #: why nothing can be reported with these settings ("" = nothing known against it)
        self.idle_note = ""

    # -- facts and policy

    def effective_settings(self) -> dict[str, Any]:
        """Built-in < host file < VM metadata < live set (DESIGN "Live tunables")."""
        layers = [*self.daemon.config.layers_for(self.name), self.metadata, self.live]
        return table.layered(layers)

    def permit(self) -> Decision:
        """The reclaimer allowed now; job state is re-read at most every PERMIT_TTL s."""
        now = time.monotonic()
        hello = self.session.hello if self.session is not None else None
        if now - self._permit[0] < PERMIT_TTL and hello is self._permit_hello:
            return self._permit[1]
        conn = self.daemon.conn
        if hello and hello is not self._permit_hello:
            self.refresh_map()
        try:
            xml = conn.domain_xml(self.name)
            job = conn.job_info(self.name)
            migration = migration_from_qmp(conn.qmp(self.name, "query-migrate", None))
            values = self.effective_settings()
            # The balloon reclaimer is built; decide() still refuses a domain without a
            # virtio memballoon or with locked RAM, with that reason. The poisoning fact is
            # the current session's hello (none yet: refuse punching).
            facts = VmFacts(domain_facts(xml), job, self.backings or None,
                            poison=poison_from_hello(hello), mode=values["mode"],
                            balloon_available=True, settings_error=self.settings_error,
                            pinning_fd=self.pinning_fd,
                            vhost_user_trusted=bool(values["vhost_user_trusted"]),
                            reservations=hugetlb_reservations(self.gmap, self.backings),
                            qemu_migration=migration, map_error=self.map_error)
            decision = decide(facts)
        except (LibvirtUnavailable, DomainError) as e:
            decision = Decision(REFUSE, f"cannot ask libvirt whether discard is safe now: {e}")
        except (ValueError, KeyError, ET.ParseError) as e:
            # A domain XML (or an answer) we cannot read is an unknown fact: refuse.
            decision = Decision(REFUSE, f"cannot weigh the refusal facts of {self.name}: "
                                f"{type(e).__name__}: {e}")
        if decision != self._permit[1]:
            # Journal every change of mind, once (the first hello often turns a refusal
            # for want of the guest's word into punch).
            log.info("%s: reclaimer %s: %s", self.name, decision.action, decision.reason)
        self._permit = (now, decision)
        self._permit_hello = hello
        return decision

    def refresh_map(self) -> None:
        """Rebuild the memory map from QEMU now (S1): after a hello, the guest's firmware
        has run (OVMF sets up SMM, PAM and TSEG after the map of domain start), so a
        report whose range the current flat view no longer shows as RAM is refused at
        the discard. A map that cannot be rebuilt refuses the VM until one can."""
        try:
            self.gmap = build_map(gather(self.daemon.conn.qmp_function(self.name)))
            self.map_error = ""
        except (MapError, LibvirtUnavailable, DomainError) as e:
            self.map_error = f"the memory map could not be rebuilt after the hello: {e}"
            log.warning("%s: %s", self.name, self.map_error)

    def pinning_check(self) -> str:
        """punch()'s check (S7): "" while QEMU holds no pinning device fd, else the refusal.

        Runs right before and right after each fallocate. A hit is latched in
        ``pinning_fd``, so permit() refuses the VM from then on (a VFIO hot-plug pins RAM
        before the live XML shows the device, and the permit is cached); only a restart of
        the VM's QEMU (a new runner) clears it. A /proc that cannot be read refuses too.
        """
        if self.pinning_fd:
            return f"QEMU holds {self.pinning_fd}"
        found = pinning.scan(self.qemu_pid)
        if found:
            self.pinning_fd = found
            self._permit = (0.0, Decision(REFUSE, f"QEMU holds {found}"))
            log.error("%s: QEMU holds %s, which can pin guest RAM for DMA; refusing every "
                      "discard of this VM until it restarts", self.name, found)
        return found

    def guest_settings(self) -> dict[str, Any]:
        """The settings the agent gets: a ballooned VM's agent stays stats-only, because
        an arena isolating free memory would fight the balloon for the same pages."""
        values = table.guest_view(self.effective_settings())
        if self._permit[1].action == BALLOON:
            values["enabled"] = False
        return values

    # -- the balloon reclaimer (private RAM): libvirt I/O here, policy in host/balloon.py

    def _balloon_dom(self) -> Any:
        try:
            return self.daemon.conn.connection().lookupByName(self.name)
        except libvirt.libvirtError as e:
            raise DomainError(f"VM {self.name}: lookup failed: {e}") from e

    def _balloon_read(self) -> tuple[int, int]:
        """(actual balloon size, maximum memory) in bytes, from libvirt."""
        dom = self._balloon_dom()
        try:
            actual = int(dom.memoryStats()["actual"]) * 1024
            maximum = int(dom.maxMemory()) * 1024
        except (libvirt.libvirtError, KeyError) as e:
            raise DomainError(f"VM {self.name}: reading the balloon size failed: {e}") from e
        return actual, maximum

    def _balloon_set(self, target: int) -> None:
        try:
            self._balloon_dom().setMemoryFlags(target // 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            raise DomainError(f"VM {self.name}: setting the balloon to {target >> 20} MiB "
                              f"failed: {e}") from e

    def balloon_tick(self) -> None:
        """Run the balloon controller once and apply its target (never raises: a libvirt
        failure is logged once and retried at the next tick)."""
        private = any(b.kind is BackingKind.ANON_PRIVATE for b in self.backings.values())
        if self._permit[1].action != BALLOON and self.balloon_target is None and not private:
            return  # not a balloon VM and we never moved its balloon: no libvirt calls
        now = time.monotonic()
        decision = self.permit()
        values = self.effective_settings()
        allowed = decision.action == BALLOON and bool(values["enabled"])
        why_not = decision.reason if decision.action != BALLOON else \
            "disabled by setting 'enabled'"
        if decision.action != BALLOON and self.balloon_target is None:
            return
        try:
            actual, maximum = self._balloon_read()
            settings = balloon_mod.BalloonSettings.from_settings(values)
            raw = self.session.stats if self.session is not None else None
            stats, why = balloon_mod.parse_stats(raw if self._stats_seen is not None else None,
                                                 now - self._stats_at, maximum)
            current = self.balloon_target if self.balloon_target is not None else actual
            if self._settled_at is None and abs(actual - current) <= settings.settle:
                self._settled_at = now
            step = balloon_mod.next_target(
                stats, why, actual, self.balloon_target, maximum, settings,
                now - self._last_deflate, allowed, why_not,
                None if self._settled_at is None else now - self._settled_at)
            self.balloon_actual, self.balloon_max = actual, maximum
            self.balloon_reason = step.reason
            if step.target != current:
                self._settled_at = None
                log.info("%s: balloon %d -> %d MiB (actual %d MiB): %s", self.name,
                         current >> 20, step.target >> 20, actual >> 20, step.reason)
                self._balloon_set(step.target)
                if step.deflate:
                    self._last_deflate = now
                self.balloon_target = step.target
            if self.balloon_target == maximum and actual >= maximum:
                self.balloon_target = None  # back at full memory: nothing of ours to undo
            self._balloon_error = ""
        except (LibvirtUnavailable, DomainError) as e:
            if str(e) != self._balloon_error:
                log.warning("%s: balloon: %s; retrying", self.name, e)
            self._balloon_error = str(e)

    def balloon_release(self, why: str) -> None:
        """No controller will watch this VM any more: give the guest all its memory back,
        so no hidden squeeze stays behind (called when the daemon stops serving it)."""
        target = self.balloon_target
        if target is None:
            return
        try:
            _, maximum = self._balloon_read()
            self._balloon_set(maximum)
            self.balloon_target = None
            log.info("%s: balloon deflated to full memory (%d MiB): %s, so no controller "
                     "watches it any more", self.name, maximum >> 20, why)
        except (LibvirtUnavailable, DomainError) as e:
            if why in ("stopped", "crashed", "undefined"):
                log.debug("%s: balloon not reset, the VM is gone (%s): %s", self.name, why, e)
                return
            log.warning("%s: balloon left at %d MiB: %s (%s); give the VM its memory back "
                        "with virsh setmem", self.name, target >> 20, e, why)

    async def _balloon_loop(self) -> None:
        while True:
            await asyncio.sleep(BALLOON_TICK)
            self.balloon_tick()

    def _discard(self, gpa: int, length: int) -> int:
        assert self.gmap is not None and self.session is not None
        return punch(self.name, self.gmap, self.backings, gpa, length,
                     self.session.granule, self.permit, checks=(self.pinning_check,))

    def _in_ram(self, gpa: int, length: int) -> bool:
        assert self.gmap is not None and self.session is not None
        return may_report(self.gmap, gpa, length, self.session.granule)

    def prepare(self) -> bool:
        """Learn the VM's channel, memory map, backing and settings. False: nothing to do."""
        conn = self.daemon.conn
        xml = conn.domain_xml(self.name)
        self.channel = channel_path(xml)
        if self.channel is None:
            self.state, self.reason = "no-channel", (
                "the domain has no virtio-serial channel org.aerate.agent.0 "
                "(see deploy/domain.py for the XML to add)")
            return False
        self.load_metadata()
        self.gmap = build_map(gather(conn.qmp_function(self.name)))
        pid = self.qemu_pid = conn.qemu_pid(self.name)
        self.backings = resolve_backings(pid, self.gmap, conn.hmp_function(self.name))
        self._permit = (0.0, self._permit[1])
        decision = self.permit()
        self.reason = decision.reason
        granule = max([MIN_GRANULE] + [b.page_size for b in self.backings.values()])
        self.idle_note = giant_granule_note(granule, self.effective_settings())
        if self.idle_note:
            log.warning("%s: %s", self.name, self.idle_note)
        with contextlib.suppress(OSError, RuntimeError):
            self.backing_before = self.backing_allocated()
        if self.session is None:
            self.session = VmSession(self.name, granule, self._in_ram, self._discard,
                                     self.permit, self.guest_settings())
        else:
            self.session.granule = granule
            self.session.configure({"enabled": self.guest_settings()["enabled"]})
        return True

    def load_metadata(self) -> None:
        """Read the VM's stored settings. S6 fails closed: a layer that does not validate
        is not applied and refuses the VM with the reason (settings_error) until it is
        fixed; what is stored stays stored (``set`` merges into the stored entries)."""
        try:
            self.metadata = config_mod.metadata_from_xml(
                self.daemon.conn.metadata(self.name, config_mod.METADATA_NS), self.name)
            if self.settings_error:
                log.info("%s: stored settings valid again", self.name)
            self.settings_error = ""
        except config_mod.ConfigError as e:
            if str(e) != self.settings_error:
                log.error("%s", e)
            self.metadata, self.settings_error = {}, str(e)
        self._permit = (0.0, self._permit[1])

    def backing_allocated(self) -> int:
        """Host memory allocated to this VM's RAM right now, bytes (from the kernel)."""
        total = 0
        for b in self.backings.values():
            total += allocated_bytes(b)
        return total

    # -- the connection loop

    def _lock(self) -> int | None:
        """Take this VM's lock (S4), or None when another daemon holds it."""
        path = os.path.join(VM_LOCK_DIR, self.name.replace("/", "_") + ".lock")
        fd, other = pid_lock(path)
        if fd is None:
            self.state, self.reason = "busy", (
                f"another aerated (pid {other}) serves this VM ({path})")
        return fd

    async def run(self) -> None:
        """Hold the VM's lock, then connect, sync, serve; reconnect with backoff on any
        failure, until cancelled. The balloon goes back to full memory at the end."""
        while (lock := self._lock()) is None:
            log.warning("%s: %s; waiting", self.name, self.reason)
            await asyncio.sleep(5)
        ticker = asyncio.get_running_loop().create_task(self._balloon_loop(),
                                                        name=f"balloon:{self.name}")
        try:
            await self._run_locked()
        finally:
            ticker.cancel()
            self.balloon_release(self.stop_reason or "aerated stopped serving this VM")
            os.close(lock)

    async def _run_locked(self) -> None:
        delay = 1.0
        while True:
            try:
                if not self.prepare():
                    return
                await self._serve()
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except (OSError, LibvirtUnavailable, DomainError, MapError, RuntimeError) as e:
                self.state, self.reason = "retrying", f"{type(e).__name__}: {e}"
                log.warning("%s: %s; retrying in %.0fs", self.name, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _serve(self) -> None:
        assert self.session is not None and self.channel is not None
        s = self.session
        reader, writer = await asyncio.open_unix_connection(self.channel)
        try:
            s.connected()
            self.state = "syncing"
            while True:
                self._flush_log()
                out = s.take_outbox()
                if out:
                    writer.write(out)
                    await writer.drain()
                if s.state is HostState.CLOSED:
                    self.state = "closed"
                    return  # reconnect: a new connection, a new session
                timeout = SYNC_RETRY if s.state is HostState.SYNCING else None
                try:
                    data = await asyncio.wait_for(reader.read(65536), timeout)
                except TimeoutError:
                    s.connected()   # no answer: the agent may not run yet; sync again
                    continue
                if not data:
                    raise ConnectionResetError("QEMU closed the channel socket")
                s.receive(data)
                if s.state is HostState.RUNNING:
                    self.state = "running"
                if s.stats is not self._stats_seen:
                    # A new statistics message: the balloon controller acts on it now.
                    self._stats_seen, self._stats_at = s.stats, time.monotonic()
                    self.balloon_tick()
        finally:
            self._flush_log()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _flush_log(self) -> None:
        if self.session is None:
            return
        for level, msg in self.session.log:
            log.log(logging.getLevelName(level.upper()), "%s", msg)
        self.session.log.clear()

    def apply_live(self, values: dict[str, Any]) -> None:
        """Settings set now by the operator: to the guest at once and into the session."""
        self.live.update(values)
        was = self._permit[1].action
        self._permit = (0.0, self._permit[1])
        action = self.permit().action
        if self.session is not None:
            guest = table.guest_view(values)
            if BALLOON in (was, action) or "enabled" in guest:
                guest["enabled"] = self.guest_settings()["enabled"]
            if guest:
                self.session.configure(guest)

    def status(self) -> dict[str, Any]:
        """What aeratectl shows for this VM."""
        out: dict[str, Any] = {"vm": self.name, "state": self.state, "reason": self.reason}
        if self.session is not None:
            out.update(self.session.status())
            out["state"] = self.state
            if self.session.counters.batches == 0 and self._permit[1].action == REFUSE:
                out["reclaimer"], out["reason"] = self._permit[1]
        if self.idle_note:
            out["idle_note"] = self.idle_note
        if self._permit[1].action == BALLOON or self.balloon_target is not None:
            # No batches flow on a ballooned VM, so the session has no decision to show.
            out["reclaimer"], out["reason"] = self._permit[1]
            out["balloon"] = {"target_bytes": self.balloon_target
                              if self.balloon_target is not None else self.balloon_actual,
                              "actual_bytes": self.balloon_actual,
                              "max_bytes": self.balloon_max, "reason": self.balloon_reason}
        with contextlib.suppress(OSError, RuntimeError):
            out["backing_allocated_bytes"] = self.backing_allocated()
        out["backing_allocated_at_start"] = self.backing_before
        out["backings"] = {n: {"kind": b.kind.value, "page_size": b.page_size,
                               "reason": b.reason} for n, b in self.backings.items()}
        out["settings"] = self.effective_settings()
        return out


class Daemon:
    """The aerated process: lock, libvirt, runners, control socket."""

    def __init__(self, uri: str, config_path: str, run_dir: str,
                 metrics: tuple[str, int] | None = None, only: tuple[str, ...] = ()) -> None:
        self.metrics = metrics
        self.only = only
        self.config_path = config_path
        self.config = config_mod.load(config_path)
        self.run_dir = run_dir
        self.runners: dict[str, VmRunner] = {}
        self.loop = asyncio.get_running_loop()
        self.conn = LibvirtConnection(uri, on_connect=self._on_connect,
                                      on_disconnect=self._on_disconnect,
                                      on_lifecycle=self._on_lifecycle,
                                      on_device=self._on_device)
        self.stopping = asyncio.Event()

    # libvirt's thread calls these three: they only hand over to the loop.

    def _on_connect(self, conn: LibvirtConnection) -> None:
        self.loop.call_soon_threadsafe(self.resync)

    def _on_disconnect(self, why: str) -> None:
        self.loop.call_soon_threadsafe(
            log.warning, "libvirt: %s; VM sessions carry on, discards are refused until it "
            "is back", why)

    def _on_lifecycle(self, ev: LifecycleEvent) -> None:
        self.loop.call_soon_threadsafe(self.on_lifecycle, ev)

    def _on_device(self, name: str, alias: str, added: bool) -> None:
        self.loop.call_soon_threadsafe(self.on_device, name, alias, added)

    def on_device(self, name: str, alias: str, added: bool) -> None:
        """A device came or went (a DIMM, virtio-mem): the memory map is stale. Restart
        the VM's session so the map is rebuilt before anything more is discarded."""
        if name in self.runners:
            self.stop_runner(name, f"device {alias} {'added' if added else 'removed'}")
            self.start_runner(name)

    def resync(self) -> None:
        """After (re)connecting to libvirt: start runners for running VMs, drop the rest."""
        try:
            running = {d.name for d in self.conn.running_domains()}
        except LibvirtUnavailable as e:
            log.warning("%s", e)
            return
        for name in running - set(self.runners):
            self.start_runner(name)
        for name in set(self.runners) - running:
            self.stop_runner(name, "no longer running")

    def on_lifecycle(self, ev: LifecycleEvent) -> None:
        """Domain events from libvirt: no polling for VMs coming and going."""
        if ev.event in ("started", "resumed") and ev.name not in self.runners:
            self.start_runner(ev.name)
        elif ev.event in ("stopped", "crashed", "undefined"):
            self.stop_runner(ev.name, ev.event)
        elif ev.name in self.runners:
            # suspended (migration, save...), resumed: the next batch re-reads job state.
            self.runners[ev.name]._permit = (0.0, Decision(REFUSE, f"domain {ev.event}"))

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
        log.info("%s: serving", name)

    def stop_runner(self, name: str, why: str) -> None:
        """Stop serving a VM (its QEMU is gone; no discard can be under way: S4)."""
        r = self.runners.pop(name, None)
        if r is not None and r.task is not None:
            r.stop_reason = why
            r.task.cancel()
            log.info("%s: session ended (%s)", name, why)

    # -- control socket (aeratectl)

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One JSON request per line, one JSON answer per line."""
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    answer = self.handle(req)
                except (ValueError, KeyError, TypeError) as e:
                    answer = {"ok": False, "error": str(e)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """Serve one control request."""
        cmd = req.get("cmd")
        if cmd == "status":
            vms = [r.status() for r in sorted(self.runners.values(), key=lambda r: r.name)]
            return {"ok": True, "libvirt": self.conn.connected, "vms": vms,
                    "config": self.config.path}
        if cmd == "set":
            vm = str(req["vm"])
            r = self.runners.get(vm)
            if r is None:
                return {"ok": False, "error": f"VM {vm} is not running or not known to aerated"}
            values = table.validate(req.get("settings", {}), origin=f"aeratectl set {vm}")
            host_keys = sorted(k for k in values if table.BY_NAME[k].scope == "host")
            if host_keys:
                return {"ok": False, "error": (
                    f"VM {vm}: {', '.join(host_keys)} can only be set in the host config file "
                    f"([vm.{vm}] in {self.config.path}, then 'aeratectl reload'): the VM's "
                    "metadata travels with its XML and is not trusted for it")}
            try:
                # S6: merge into what is stored now, bad entries included, so nothing the
                # operator stored is lost; the result is validated as a whole below.
                stored = config_mod.metadata_entries(
                    self.conn.metadata(vm, config_mod.METADATA_NS), vm)
            except config_mod.ConfigError:
                stored = {}  # not XML at all: nothing in it can be kept entry by entry
            except (LibvirtUnavailable, DomainError) as e:
                return {"ok": False, "error": f"VM {vm}: cannot read the stored settings, so "
                        f"nothing saved or applied: {e}"}
            persisted: dict[str, Any] = dict(stored, **values)
            try:
                self.conn.set_metadata(vm, config_mod.metadata_to_xml(persisted),
                                       config_mod.METADATA_KEY, config_mod.METADATA_NS)
            except (LibvirtUnavailable, DomainError) as e:
                return {"ok": False, "error": f"VM {vm}: not saved, so not applied: {e}"}
            r.load_metadata()
            if r.settings_error:
                return {"ok": False, "error": f"saved, but the stored settings are still "
                        f"invalid, so the VM stays refused: {r.settings_error}"}
            r.apply_live(values)
            return {"ok": True, "vm": vm, "settings": r.effective_settings()}
        if cmd == "reload":
            try:
                self.config = config_mod.load(self.config_path)
            except config_mod.ConfigError as e:
                return {"ok": False, "error": f"{e}; the old configuration stays in force"}
            for r in self.runners.values():
                with contextlib.suppress(LibvirtUnavailable, DomainError):
                    r.load_metadata()  # a layer fixed with virsh metadata counts again
                r.apply_live({})
                if r.session is not None:
                    r.session.configure(r.guest_settings())
            return {"ok": True, "config": self.config.path}
        return {"ok": False, "error": f"unknown command {cmd!r} (status, set, reload)"}

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
        self.loop.add_signal_handler(signal.SIGHUP, lambda: log.info(
            "reload: %s", self.handle({"cmd": "reload"})))
        if self.metrics is not None:
            addr, port = self.metrics
            start_http_server(port, addr=addr, registry=metrics_mod.registry(
                lambda: [r.status() for r in list(self.runners.values())]))
            log.info("metrics on http://%s:%d/metrics", addr, port)
        self.conn.start()
        send_notify("READY=1\nSTATUS=serving")
        log.info("aerated ready; control socket %s", sock)
        await self.stopping.wait()
        send_notify("STOPPING=1")
        server.close()
        tasks = [r.task for r in self.runners.values() if r.task is not None]
        for name in list(self.runners):
            self.stop_runner(name, "daemon stopping")
        # Let each runner finish (its balloon goes back to full memory) while libvirt is up.
        await asyncio.gather(*tasks, return_exceptions=True)
        self.conn.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aerated``."""
    ap = argparse.ArgumentParser(prog="aerated", description="aerate host daemon")
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--config", default=config_mod.DEFAULT_PATH)
    ap.add_argument("--run-dir", default=RUN_DIR)
    ap.add_argument("--metrics", default="127.0.0.1:9848", metavar="ADDR:PORT",
                    help="Prometheus endpoint, loopback only ('off' to disable)")
    ap.add_argument("--vm", action="append", default=[], metavar="GLOB",
                    help="serve only VMs whose name matches (repeatable; default: all)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
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

