"""``aerate-agent``: the guest service. Wires the port, the protocol, the engine and systemd.

One thread, one poll loop: the port (while a host listens), the engine's next tick, the
statistics timer and the systemd watchdog decide how long to sleep. Nothing here decides
policy: the engine (cycle.py) does; this file only moves bytes and events between parts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from aerate import __version__ as VERSION

from . import capabilities, carrier, fdstore, logprefix, procfs
from . import settings as settings_mod
from .arena import BLOCK_BYTES, Arena, ArenaError, HugetlbArena, create_arena
from .channel import DEFAULT_PATH, Port, PortError
from .cycle import Engine, Phase
from .freefirst import Stage
from .hugetlb import DEFAULT_RUN_DIR, BudgetError, SurplusBudget
from .kernelview import ProcKernel
from .protocol import GuestEndpoint, GuestState
from .reporting_order import ReportingOrder

log = logging.getLogger("aerate-agent")
#: While no session exists, ask the host for one this often.
NEED_SYNC_EVERY = 5.0
#: While a session is up but the newest lease token is stale, ask for one this often.
NEED_TOKEN_EVERY = 0.25
#: Event-driven statistics (the balloon reclaimer's pace, host/balloon.py): an agent the
#: host turned off (``enabled`` false, as on every ballooned VM) looks at
#: MemFree this often, and sends statistics at once when it moved by STATS_MOVE_BYTES since
#: the last ones sent, or moved by STATS_SETTLE_BYTES and then held still for one probe (the
#: balloon arrived): the host's next step needs figures taken after the balloon stopped.
#: At most one such message per STATS_GAP_S, whatever the guest's memory does.
STATS_PROBE_S = 0.25
STATS_MOVE_BYTES = 64 << 20
STATS_SETTLE_BYTES = 8 << 20
STATS_GAP_S = 0.5
#: Longest a stop waits for acks, leases and orphans (below systemd's TimeoutStopSec=90s
#: default); past it the agent exits holding pages, which the arena keeps for the next
#: agent (S3).
STOP_LIMIT = 75.0


def _notify(msg: str) -> None:
    # Never block the cycle on a slow service manager: a dropped STATUS= line is harmless.
    try:
        fdstore.send_notify(msg, block=False)
    except fdstore.FdStoreError as e:
        log.warning("sd_notify failed: %s", e)


def log_formatter(stream: Any, env: Any) -> logging.Formatter:
    """Prefixed records when ``stream`` is systemd's journal stream (agent/logprefix.py);
    the level as a word anywhere else."""
    if logprefix.under_journal(stream, env):
        return logprefix.PrefixFormatter("%(message)s")
    return logging.Formatter("%(levelname)s %(message)s")


def stats_only_reason(root: str = "/") -> str:
    """Why this agent should only report statistics, or "" (DESIGN: kernel FPR active)."""
    try:
        balloon = procfs.read_balloon_features(root)
    except (OSError, ValueError) as e:
        log.warning("cannot read virtio-balloon features: %s", e)
        return ""
    if balloon is not None and balloon.free_page_reporting_active:
        return ("the guest kernel already reports free pages (virtio-balloon "
                "free-page-reporting negotiated on %s): statistics only" % balloon.device)
    return ""


def open_arena(capacity: int, run_dir: str,
               arena_dir: Optional[str] = None) -> Tuple[Arena, List[Any], str]:
    """Recover the arena a previous agent left, or make a new one.

    Returns (arena, orphaned blocks, status note). Orphans are every block found held at
    start: the previous agent may have reported any of them, so the caller releases them
    only when S2 allows (a new session, or the lease run out since this agent started);
    nothing here releases one.

    Where held pages wait between agents (see :mod:`aerate.agent.carrier`): preferably the
    named file ``<arena_dir>/aerate-agent-arena`` on a hugetlbfs mount of the init mount
    namespace, which needs no service manager and survives a stop that flushes the fd
    store; else a memfd in systemd's fd store. ``arena_dir`` defaults to
    ``$AERATE_ARENA_DIR`` or /dev/hugepages ("" turns the named file off).

    Both carriers are looked at on every start: a named file is recovered first; a memfd
    from the fd store is recovered when there is no file. If both exist (a previous agent
    fell back to the fd store while the mount was unusable), the file wins and the memfd is
    left in the fd store, logged: releasing it would need its own orphan bookkeeping, and
    keeping it is the safe side (S2).
    """
    try:
        budget: Optional[SurplusBudget] = SurplusBudget(run_dir)
    except BudgetError as e:
        log.warning("no hugetlb surplus budget: %s", e)
        budget = None
    if arena_dir is None:
        arena_dir = carrier.arena_dir_from_env()
    problem = carrier.check_dir(arena_dir, BLOCK_BYTES) if budget is not None else "no budget"
    path = os.path.join(arena_dir, carrier.ARENA_FILE) if not problem else None
    stored = fdstore.take().get(fdstore.ARENA_FDNAME, [])
    for extra in stored[1:]:
        os.close(extra)
    if path is not None and budget is not None and os.path.exists(path):
        arena: Arena = HugetlbArena.open_named(path, budget)
        if stored:
            same = os.fstat(stored[0]).st_ino == os.fstat(arena.fileno() or -1).st_ino
            if not same:
                log.warning("the fd store also holds an older arena memfd; it stays there "
                            "(its pages stay held until the unit is stopped)")
            os.close(stored[0])
        orphans = arena.held()
        note = "recovered arena from %s: %d blocks held from before" % (path, len(orphans))
        return arena, orphans, note
    if stored:
        arena = Arena.recover(stored[0], budget)
        orphans = arena.held()
        note = "recovered arena from the fd store: %d blocks held from before" % len(orphans)
        return arena, orphans, note
    arena = create_arena(capacity, budget, path)
    if arena.path is not None:
        note = "new %s arena in %s (outlives the agent without the fd store)" % (
            arena.kind, arena.path)
        warn = carrier.propagation_note(arena_dir, carrier.read_mountinfo())
        if warn:
            log.warning("%s", warn)
        return arena, [], note
    note = "new %s arena" % arena.kind
    if problem and budget is not None:
        note += " (no named arena file: %s)" % problem
    fd = arena.fileno()
    if fd is not None:
        try:
            if fdstore.store([fd]):
                note += ", fd kept in the systemd fd store"
            else:
                note += ", no service manager: held pages will not survive a crash"
        except fdstore.FdStoreError as e:
            note += ", fd store failed (%s)" % e
    return arena, [], note


class StatsTrigger:
    """When statistics go out between their intervals: free memory moved (module constants).

    Bounded by construction: ``due`` answers at most once per ``gap_s`` (a guest whose free
    memory flaps sends no more than that), and only the figures, never a decision, go out:
    the host's controller (host/balloon.py) treats them as hostile input anyway.
    """

    def __init__(self, move: int = STATS_MOVE_BYTES, settle: int = STATS_SETTLE_BYTES,
                 gap_s: float = STATS_GAP_S) -> None:
        self.move, self.settle, self.gap_s = move, settle, gap_s
        self.sent_free: Optional[int] = None
        self.sent_at = -1e18
        self._probe: Optional[int] = None

    def sent(self, free: Optional[int], now: float) -> None:
        """Statistics with MemFree ``free`` (None: unknown) went out at ``now``."""
        self.sent_free, self.sent_at, self._probe = free, now, free

    def due(self, free: int, now: float) -> str:
        """Why statistics should go now ("" if not), given MemFree ``free`` read at ``now``."""
        last, self._probe = self._probe, free
        if self.sent_free is None or now - self.sent_at < self.gap_s:
            return ""
        moved = abs(free - self.sent_free)
        if moved >= self.move:
            return "free memory moved by %d MiB" % (moved >> 20)
        if moved >= self.settle and last is not None and abs(free - last) < self.settle:
            return "free memory moved by %d MiB and settled" % (moved >> 20)
        return ""


class Agent:
    """The running agent: owns the port, endpoint, engine and timers."""

    def __init__(self, port: Port, engine: Engine, arena: Arena, note: str,
                 kernel: ProcKernel,
                 caps: Tuple[capabilities.Capability, ...] = (),
                 order: Optional[ReportingOrder] = None,
                 freefirst: Optional[Stage] = None) -> None:
        self.port = port
        # Free first (agent/freefirst.py): off by default; reads the engine's live settings.
        self.freefirst = freefirst if freefirst is not None else Stage(engine.cfg)
        # The kernel's own reporting, tuned where it runs (agent/reporting_order.py).
        self.order = order if engine.stats_only and any(
            c.name == capabilities.FREE_PAGE_REPORTING and c.available for c in caps) else None
        self.engine = engine
        self.kernel = kernel
        self.arena = arena
        self.note = note
        # What this kernel offers, told once per session (the hello), not every stats tick.
        self.endpoint = GuestEndpoint({"agent": VERSION, "arena": arena.kind,
                                       "arena_weakness": arena.weakness,
                                       "arena_refusal": arena.refusal(
                                           bool(engine.cfg.get("allow_weak_arena"))),
                                       "page_size": 4096,
                                       "stats_only": engine.stats_only,
                                       "capabilities": {c.name: {"available": c.available,
                                                                 "detail": c.detail}
                                                        for c in caps}})
        self.stopping = False
        self._next_tick = 0.0
        self._next_stats = 0.0
        self._next_probe = 0.0
        self.trigger = StatsTrigger()
        self.event_stats = 0  # statistics sent because free memory moved
        self._next_need_sync = 0.0
        self._next_token_ask = 0.0
        self._watchdog = float(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        self._next_watchdog = 0.0
        self._last_status = ""

    # -- events

    def _apply(self, settings: Dict[str, Any]) -> None:
        known = {k: v for k, v in settings.items()
                 if k in settings_mod.BY_NAME and settings_mod.BY_NAME[k].scope == "guest"}
        try:
            self.engine.apply(known)
            log.info("settings applied: %s", known)
        except settings_mod.SettingError as e:
            log.warning("host sent invalid settings, keeping the old ones: %s", e)
            return
        self.tune_kernel_reporting()

    def tune_kernel_reporting(self) -> None:
        """Apply ``kernel_reporting_order`` where the kernel reports its own free pages."""
        if self.order is not None:
            before = self.order.note
            note = self.order.apply(int(self.engine.cfg["kernel_reporting_order"]))
            if note and note != before:
                log.info("%s", note)

    def _on_events(self, events: List[Tuple[str, Any]]) -> None:
        for kind, payload in events:
            if kind == "session":
                back = self.engine.on_session()
                log.info("session %s with the host; %d orphaned blocks returned",
                         payload.get("session"), len(back))
                self._next_tick = 0.0
            elif kind == "release":
                batch, discarded, refused = payload
                self.engine.on_release(batch, discarded, refused)
                self._next_tick = 0.0
            elif kind == "expired":
                log.info("batch %d: no ack within its lease; its pages go back un-aerated",
                         payload)
                self.engine.on_expired(payload)
                self._next_tick = 0.0
            elif kind == "config":
                self._apply(payload)
            elif kind == "probed":
                stale = self.engine.on_probed(payload.id, payload.backed, payload.unknown,
                                              payload.retry)
                if stale:
                    log.info("probe %d: the host backs %d blocks believed aerated; the next "
                             "pass takes them", payload.id, stale)
                    self._next_tick = 0.0
                elif self.engine.probe_off:
                    log.info("probes stopped for this session: %s", self.engine.probe_off)
            elif kind == "error":
                log.warning("host protocol error: %s (session dropped; held pages stay "
                            "held until the host syncs again)", payload)

    def _read_port(self) -> None:
        while True:
            data = self.port.read()
            if data is None:
                if self.endpoint.state is GuestState.RUNNING:
                    log.info("host disconnected")
                self.endpoint.disconnected()
                return
            if not data:
                return
            # The read time is the token's receive time: never earlier than the host's send.
            self._on_events(self.endpoint.receive(data, time.monotonic()))

    # -- timers

    def _stats(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"type": "stats", "engine": self.engine.status(),
                               "arena": self.arena.kind}
        out.update(self.kernel.stats())
        out["event_stats"] = self.event_stats
        out["free_first"] = self.freefirst.status()
        if self.order is not None and self.order.note:
            out["kernel_reporting"] = self.order.note
        return out

    def _probing(self) -> bool:
        """Whether free memory is watched between statistics: only where the host turned
        reporting off (what it does for every ballooned VM, host/daemon.py guest_settings),
        so an agent that reports itself, or a guest left to its kernel's own reporting,
        spends nothing on it."""
        return self.engine.phase is Phase.DISABLED and not self.engine.cfg["enabled"]

    def _send_stats(self, now: float) -> None:
        """Statistics every ``stats_interval_s``, and sooner when free memory moved on an
        agent that reports nothing itself (StatsTrigger): a ballooned guest's figures then
        follow its balloon, and a guest that allocates again is seen within a probe."""
        why = ""
        if now < self._next_stats:
            if not self._probing() or now < self._next_probe:
                return
            self._next_probe = now + STATS_PROBE_S
            try:
                why = self.trigger.due(self.kernel.mem_free(), now)
            except (OSError, procfs.ProcParseError):
                return  # the interval's message says what is missing
            if not why:
                return
            self.event_stats += 1
        msg = self._stats()
        free = msg.get("mem_free")
        self.trigger.sent(free if isinstance(free, int) else None, now)
        if why:
            msg["trigger"] = why
        self.endpoint.send(msg)
        self._next_stats = now + self.engine.cfg["stats_interval_s"]
        self._next_probe = now + STATS_PROBE_S

    def _status_line(self) -> str:
        st = self.engine.status()
        stale = st["counters"]["probe_stale_blocks"]
        return ("%s: %s; held %d MiB, aerated ~%d MiB%s; %s" % (
            st["phase"], st["reason"], st["held_bytes"] >> 20, st["aerated_bytes"] >> 20,
            ", %d stale found by probes" % stale if stale else "",
            "host connected" if self.endpoint.state is GuestState.RUNNING else "no host"))

    def step(self, now: float) -> float:
        """Run what is due at ``now``; return seconds until something is due again."""
        self._on_events([("expired", batch) for _, (batch, _, _)
                         in self.endpoint.expire(now)])
        if now >= self._next_tick:
            running = self.endpoint.state is GuestState.RUNNING
            paused = ""
            if running and not self.endpoint.token_fresh(now):
                paused = "waiting for a fresh lease token from the host"
            ranges, wait = self.engine.tick(now, running, self.endpoint.granule
                                            if running else 0, paused)
            if self.engine.wants_token and now >= self._next_token_ask:
                # Only when there is something to report: an idle agent never asks.
                self.endpoint.request_token()
                self._next_token_ask = now + NEED_TOKEN_EVERY
            if ranges:
                if self.endpoint.can_report(now):
                    self.engine.reported(self.endpoint.report(ranges, now))
                else:
                    self.engine.abandon_unsent()
            elif self.endpoint.can_probe():
                # Only a session of protocol >= 3 has probes; the engine decides when.
                probe = self.engine.probe_request(now, self.endpoint.granule)
                if probe:
                    self.engine.probe_sent(self.endpoint.probe(probe), now)
            self._next_tick = now + wait
        self.freefirst.tick(now)  # returns at once when off or not due
        if self.endpoint.state is GuestState.RUNNING:
            self._send_stats(now)
        if self.endpoint.state is not GuestState.RUNNING and now >= self._next_need_sync:
            if self.port.check_host():
                self.endpoint.request_sync()
            self._next_need_sync = now + NEED_SYNC_EVERY
        if self._watchdog and now >= self._next_watchdog:
            _notify("WATCHDOG=1")
            self._next_watchdog = now + self._watchdog / 3
        line = self._status_line()
        if line != self._last_status:
            _notify("STATUS=" + line)
            self._last_status = line
        self.port.queue(self.endpoint.take_outbox())
        self.port.flush()
        due = [self._next_tick]
        due.append(self.freefirst.next_due())
        expiry = self.endpoint.next_expiry()
        if expiry is not None:
            due.append(expiry)
        if self.endpoint.state is GuestState.RUNNING:
            due.append(self._next_stats)
            if self._probing():
                due.append(self._next_probe)
        else:
            due.append(self._next_need_sync)
        if self._watchdog:
            due.append(self._next_watchdog)
        return max(0.0, min(due) - now)

    def settled(self, now: float) -> bool:
        """Nothing is held that S2 forbids returning now: no batch in flight (each is acked
        or its lease ran out, see ``step``) and no orphan still inside its bound."""
        return not self.engine.inflight and not (
            self.engine.orphans and now < self.engine.orphans_release_at)

    def run(self) -> None:
        """The poll loop, until SIGTERM/SIGINT and every held page may go back.

        A stop (``systemctl stop``, shutdown, reboot, kexec) keeps the loop running until
        each batch in flight is acked or its lease has run out, and orphans are past their
        bound: then the agent exits holding nothing, and the guest can reuse every page,
        because the host will discard none of them any more (agent/protocol.py, "Leases").
        Only a stop that waits past ``STOP_LIMIT`` exits holding pages (for the next agent).
        """
        poller = select.poll()
        stop_deadline = 0.0
        while True:
            now = time.monotonic()
            if self.stopping:
                if not stop_deadline:
                    stop_deadline = now + STOP_LIMIT
                    self.engine.end_pass("stopping")
                    self.engine.stopping = True
                if self.settled(now):
                    self.engine.end_pass("stopped")
                    if self.engine.orphans:
                        self.engine.on_session()  # past their bound: S2 allows it
                    return
                if now >= stop_deadline:
                    return
            timeout = self.step(now)
            if self.stopping:
                timeout = min(timeout, 0.1)
            # Poll the port only while a host is there: POLLHUP would otherwise spin.
            listening = self.port.check_host()
            with contextlib.suppress(KeyError):
                poller.unregister(self.port.fileno())
            if listening:
                mask = select.POLLIN | (select.POLLOUT if self.port.pending() else 0)
                poller.register(self.port.fileno(), mask)
            for _, ev in poller.poll(timeout * 1000):
                if ev & (select.POLLIN | select.POLLHUP):
                    self._read_port()


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``aerate-agent``."""
    ap = argparse.ArgumentParser(prog="aerate-agent", description=__doc__)
    ap.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    ap.add_argument("--port", default=DEFAULT_PATH, help="virtio-serial port device")
    ap.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                    help="state kept across agent restarts (hugetlb budget record)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting until the host sends its own (repeatable)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    stream_handler = logging.StreamHandler(sys.stderr)
    stream_handler.setFormatter(log_formatter(sys.stderr, os.environ))
    logging.basicConfig(level=args.log_level.upper(), handlers=[stream_handler])
    try:
        values = settings_mod.parse_assignments(args.set, origin="aerate-agent --set")
    except settings_mod.SettingError as e:
        log.error("%s", e)
        return 2
    port = Port(args.port)
    try:
        port.open()
    except PortError as e:
        log.error("%s", e)
        return 1
    page_total = procfs.read_meminfo().total
    capacity = max(1, page_total // (2 << 20))
    try:
        arena, orphans, note = open_arena(capacity, args.run_dir)
    except (ArenaError, OSError) as e:
        log.error("cannot set up the arena: %s", e)
        return 1
    try:
        caps = capabilities.detect_all()
    except (OSError, ValueError) as e:
        # Telling the host what the kernel offers is not worth refusing to start over.
        log.warning("capability detection failed, the hello will carry none: %s", e)
        caps = ()
    for c in caps:
        if not c.available:
            log.info("capability %s unavailable: %s", c.name, c.detail)
    kernel = ProcKernel()
    engine = Engine(kernel, arena, values, stats_only=stats_only_reason())
    engine.adopt_orphans(orphans, time.monotonic())
    agent = Agent(port, engine, arena, note, kernel, caps,
                  ReportingOrder(run_dir=args.run_dir))
    agent.tune_kernel_reporting()
    log.info("aerate-agent %s on %s: %s%s", VERSION, args.port, note,
             "; arena weakness: %s" % arena.weakness if arena.weakness else "")
    if engine.stats_only:
        log.info("%s", engine.stats_only)

    def stop(signum: int, frame: object) -> None:
        agent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _notify("READY=1\nSTATUS=" + note)
    try:
        agent.run()
    finally:
        _notify("STOPPING=1")
        if agent.order is not None:
            agent.order.restore()
        held = engine.held_bytes()
        if held:
            log.warning("stopping with %d MiB still held (batches without an ack); they stay "
                        "in the arena for the next agent", held >> 20)
        else:
            try:
                fdstore.remove()
            except fdstore.FdStoreError as e:
                log.warning("%s", e)
            arena.close()
        port.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
