"""Free first (DESIGN.md, cycle step 6): turn the guest's cold page cache into free memory
the cycle (or the kernel's own free page reporting) then hands back to the host.

Free page reporting returns only memory that is already free; most of a long-running guest's
memory is page cache. This stage reclaims it through cgroup v2 ``memory.reclaim`` on the root
cgroup (agent/memreclaim.py), in the manner of senpai (Meta's TMO): probe slowly, a small
step that grows while nothing hurts, and back off fast. It is off by default
(``free_first``) and tuned per VM through the settings table.

Why it is safe for the guest:

- **It stops on pressure.** Every step is preceded by a read of memory PSI ``some`` avg10;
  above ``free_first_psi_ceiling`` (default 0.2 %, fifty times below the cycle's own
  ``psi_threshold``) nothing is reclaimed, the step falls back to its minimum, and the
  stage waits ``COOLDOWN_S`` of quiet before it probes again. Without a PSI reading it never
  reclaims: it cannot see the harm it would do.
- **It never goes below the floor.** A step is cut to half the file LRU (Active(file) +
  Inactive(file)) above ``free_first_cache_floor_mib``, so steps shrink as the floor nears;
  within 2 MiB of it the stage stops. The kernel reclaims somewhat more than asked
  (measured in the Debian 12 guest with whole-headroom steps: 112 MiB left of a 128 MiB
  floor after a 256 MiB step); asking half leaves that overshoot above the floor.
- **It never touches anonymous memory unless allowed.** Writes carry ``swappiness=0`` (file
  pages only) where the kernel takes it; where it does not (Linux < 6.11, Debian 12's 6.1)
  the plain write is used only without swap (then the kernel cannot reclaim anon pages) or
  with ``free_first_anon``; otherwise the stage stays off and says why.
- **Refaults slow it.** A refault is a reclaimed page read back: reclaim that costs I/O.
  Refaults above ``REFAULT_BUDGET_FRACTION`` of the budget (at least
  ``REFAULT_NOISE_BYTES_S``) halve the step and stop its growth.
- **It is bounded in rate.** Over any stretch of time it asks for at most
  ``free_first_mib_s`` times the seconds elapsed (a long gap banks at most ``MAX_DT_S``).
- **It leaves the arena alone.** The blocks the cycle holds are hugetlb pages, on no LRU
  list, so ``memory.reclaim`` never sees them, and compaction does not migrate hugetlb
  pages (only alloc_contig_range does, and the arena pins them against that): S2/S3 hold.

What it costs: one read each of /proc/pressure/memory, /proc/vmstat, /proc/meminfo and
/proc/buddyinfo per second while on (files kept open, agent/kernelview.py), and the reclaim
itself, done synchronously in the agent's thread: the kernel's work to reclaim at most the
budget per second (clean cache is cheap to drop, dirty cache waits for writeback; not yet
measured on a VM), plus, at most every ``COMPACT_EVERY_S``, a full compaction when free
memory is plentiful but fragmented (it walks every zone: long on a large guest, more so
under TCG). The guest pays later in refaults for whatever it reads again, which is what
the PSI and refault bounds keep small. Off, it reads and writes nothing.

``free_first_drop_caches`` (opt-in only) is the fallback where ``memory.reclaim`` is missing:
at most every ``DROP_EVERY_S`` it drops all clean unmapped page cache at once, which does not
honour the floor (mapped and dirty pages stay); PSI still gates it.
"""

from __future__ import annotations

import enum
import os
from typing import Any, Dict, Iterable, Mapping, NamedTuple, Optional, Tuple

from . import memreclaim, procfs
from .kernelview import KernelFile

PAGE = 4096
MiB = 1 << 20
#: The stage looks at most this often (PSI avg10 itself moves every 2 s).
INTERVAL_S = 1.0
#: Smallest step; the step doubles after each quiet, fully done step.
MIN_STEP = 1 * MiB
GROWTH = 2
#: A gap between two looks banks at most this many seconds of budget.
MAX_DT_S = 5.0
#: Quiet needed after pressure before probing again.
COOLDOWN_S = 10.0
#: Refault rate (bytes/s) that slows the stage: this share of the budget, at least the noise.
REFAULT_BUDGET_FRACTION = 0.1
REFAULT_NOISE_BYTES_S = 256 << 10
#: Short writes (EAGAIN) in a row after which the kernel is taken at its word: nothing cold
#: is left; the stage rests for EXHAUSTED_REST_S.
SHORT_LIMIT = 3
EXHAUSTED_REST_S = 60.0
#: Compaction: when at least COMPACT_MIN_BYTES are free in blocks below order 9 and they are
#: most of the free memory; at most every COMPACT_EVERY_S.
COMPACT_ORDER = 9
COMPACT_MIN_BYTES = 256 * MiB
COMPACT_EVERY_S = 120.0
#: drop_caches fallback: at most this often.
DROP_EVERY_S = 600.0
__all__ = ["Controller", "Decision", "Limits", "Sample", "Stage", "State",
           "compaction_reason"]


class State(enum.Enum):
    """Where the stage is; the reason string says why."""

    OFF = "off"                  # the setting is off, or the kernel offers no safe way
    WAITING = "waiting"          # first look, or quiet again after pressure: cooling down
    PROBING = "probing"          # reclaiming; the step grows while nothing hurts
    SLOWED = "slowed"            # refaults over the limit: the step halves, no growth
    BACKED_OFF = "backed_off"    # memory PSI over the ceiling (or unreadable): nothing
    AT_FLOOR = "at_floor"        # page cache at its floor: nothing
    EXHAUSTED = "exhausted"      # the kernel keeps reclaiming less than asked: resting


class Sample(NamedTuple):
    """One look at the guest: PSI some avg10 (%, None unreadable), refaults (pages since
    boot: workingset_refault_file + _anon), MemAvailable and the file LRU (bytes)."""

    now: float
    psi_some_avg10: Optional[float]
    refaults: int
    mem_available: int
    file_cache: int


class Limits(NamedTuple):
    """The per-VM bounds, from the settings table."""

    psi_ceiling: float
    budget_bytes_s: int
    cache_floor: int

    @classmethod
    def from_settings(cls, cfg: Mapping[str, Any]) -> Limits:
        """The bounds of the layered settings ``cfg``."""
        return cls(float(cfg["free_first_psi_ceiling"]), int(cfg["free_first_mib_s"]) * MiB,
                   int(cfg["free_first_cache_floor_mib"]) * MiB)


class Decision(NamedTuple):
    """Reclaim this many bytes now (0: none), and the state with its reason."""

    reclaim_bytes: int
    state: State
    reason: str


class Controller:
    """Pure policy: from a sample and the limits, how much to reclaim now (module docstring).

    MemAvailable is recorded, not a bound: reclaim moves memory from cache to free, and
    MemAvailable counts both, so it cannot tell whether a reclaim hurt; PSI and refaults can.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.step = MIN_STEP
        self.state = State.WAITING
        self.reason = "no sample yet"
        self._last: Optional[Sample] = None
        self._quiet_since = float("-inf")   # quiet since ever: no cool-down at start
        self._shorts = 0
        self._rest_until = float("-inf")
        self.first_refaults: Optional[int] = None
        self.last: Optional[Sample] = None

    def _say(self, state: State, reason: str, nbytes: int = 0) -> Decision:
        self.state, self.reason = state, reason
        return Decision(nbytes, state, reason)

    def refaults_since_start(self) -> int:
        """Refaulted pages since the first sample."""
        if self.last is None or self.first_refaults is None:
            return 0
        return max(0, self.last.refaults - self.first_refaults)

    def decide(self, s: Sample, lim: Limits) -> Decision:
        """The step to take at ``s.now`` (never more than the limits allow)."""
        prev, self._last, self.last = self._last, s, s
        if self.first_refaults is None:
            self.first_refaults = s.refaults
        if s.psi_some_avg10 is None:
            self.step, self._quiet_since = MIN_STEP, float("inf")
            return self._say(State.BACKED_OFF, "memory PSI unreadable: no reclaim while "
                             "pressure cannot be seen")
        if s.psi_some_avg10 > lim.psi_ceiling:
            self.step, self._quiet_since = MIN_STEP, float("inf")
            return self._say(State.BACKED_OFF, "memory PSI some avg10 %.2f%% > ceiling %.2f%%"
                             % (s.psi_some_avg10, lim.psi_ceiling))
        if self._quiet_since > s.now:
            self._quiet_since = s.now
        if s.now - self._quiet_since < COOLDOWN_S:
            return self._say(State.WAITING, "pressure cleared %.0f s ago; probing again "
                             "after %.0f s of quiet" % (s.now - self._quiet_since, COOLDOWN_S))
        if prev is None:
            return self._say(State.WAITING, "first sample: refault rate not known yet")
        dt = s.now - prev.now
        if dt <= 0:
            return self._say(self.state, self.reason)
        headroom = s.file_cache - lim.cache_floor
        if headroom < 2 * MIN_STEP:
            return self._say(State.AT_FLOOR, "page cache %d MiB is at its floor %d MiB"
                             % (s.file_cache // MiB, lim.cache_floor // MiB))
        if s.now < self._rest_until:
            return self._say(State.EXHAUSTED, self.reason)
        refault_rate = max(0, s.refaults - prev.refaults) * PAGE / dt
        refault_limit = max(REFAULT_NOISE_BYTES_S, REFAULT_BUDGET_FRACTION * lim.budget_bytes_s)
        allowance = int(lim.budget_bytes_s * min(dt, MAX_DT_S))
        self.step = min(self.step, max(MIN_STEP, int(lim.budget_bytes_s * MAX_DT_S)))
        if refault_rate > refault_limit:
            self.step = max(MIN_STEP, self.step // 2)
            state, reason = State.SLOWED, "refaults %.2f MiB/s > %.2f MiB/s: step %d KiB" % (
                refault_rate / MiB, refault_limit / MiB, self.step >> 10)
        else:
            state, reason = State.PROBING, "quiet (PSI %.2f%%, refaults %.2f MiB/s): step " \
                "%d KiB" % (s.psi_some_avg10, refault_rate / MiB, self.step >> 10)
        # Half the headroom at most: the kernel reclaims somewhat more than asked (measured
        # in the Debian 12 guest: 16 MiB past a 256 MiB request), so the last steps shrink
        # as the floor nears and the overshoot stays above it.
        nbytes = min(self.step, allowance, headroom // 2) // PAGE * PAGE
        return self._say(state, reason, nbytes)

    def outcome(self, nbytes: int, full: bool, now: float) -> None:
        """What the kernel did with the last step: all of it (``full``) or less (EAGAIN)."""
        if full:
            self._shorts = 0
            if self.state is State.PROBING and nbytes >= self.step:
                self.step *= GROWTH
            return
        self._shorts += 1
        self.step = max(MIN_STEP, self.step // 2)
        if self._shorts >= SHORT_LIMIT:
            self._shorts = 0
            self._rest_until = now + EXHAUSTED_REST_S
            self.state, self.reason = State.EXHAUSTED, (
                "the kernel reclaimed less than asked %d times in a row (EAGAIN): nothing "
                "cold left; resting %.0f s" % (SHORT_LIMIT, EXHAUSTED_REST_S))

    def off(self, reason: str) -> None:
        """The stage is off (setting or capability): forget the step and the history."""
        self._reset()
        self.state, self.reason = State.OFF, reason


def compaction_reason(zones: Iterable[procfs.BuddyZone]) -> str:
    """Why compaction is worth running now, or "": plenty of free memory, little of it in
    blocks of order >= 9 (what the cycle and the kernel's reporting can hand back)."""
    summary = procfs.summarize_free(zones, COMPACT_ORDER)
    free = summary.free_pages * PAGE
    big = summary.blocks * summary.block_pages * PAGE
    small = free - big
    if small >= COMPACT_MIN_BYTES and small > big:
        return "free %d MiB, only %d MiB of it in order-%d blocks" % (
            free // MiB, big // MiB, COMPACT_ORDER)
    return ""


class Stage:
    """The stage in the agent: once per tick, look, decide, act (``tick``); ``status`` for
    the statistics message. Reads and writes under ``root``; settings from ``cfg``, the
    engine's live settings (read on every tick, so ``aeratectl set`` applies at once)."""

    def __init__(self, cfg: Mapping[str, Any], root: str = "/",
                 reclaimer: Optional[memreclaim.Reclaimer] = None) -> None:
        self.cfg = cfg
        self.root = root
        self.reclaimer = reclaimer or memreclaim.Reclaimer(root)
        self.controller = Controller()
        self.controller.off("free_first is off")
        self._files: Dict[str, KernelFile] = {}
        self._on = False
        self._problem = ""
        self._mode = "reclaim"
        self._probed_drop = False
        self._next = 0.0
        self._next_compact = 0.0
        self._next_drop = 0.0
        self.counters = {"reclaimed_bytes": 0, "requests": 0, "short_writes": 0,
                         "compactions": 0, "drops": 0}
        self.last_error = ""

    def _file(self, rel: str) -> KernelFile:
        f = self._files.get(rel)
        if f is None:
            f = self._files[rel] = KernelFile(os.path.join(self.root, rel))
        return f

    def close(self) -> None:
        """Close the /proc files kept open."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def next_due(self) -> float:
        """When the stage wants its next tick (infinity while off: it needs none)."""
        return self._next if self._on and not self._problem else float("inf")

    def _probe(self) -> str:
        """Why the stage cannot run here ("" if it can); picks memory.reclaim or, opted in
        and only without it, drop_caches."""
        if not os.path.exists(os.path.join(self.root, "proc/pressure/memory")):
            return "no /proc/pressure/memory (PSI: Linux >= 4.20 with psi=1)"
        problem = memreclaim.probe(self.root)
        self._mode = "reclaim"
        if problem and self.cfg["free_first_drop_caches"]:
            if os.access(os.path.join(self.root, memreclaim.DROP_CACHES_PATH), os.W_OK):
                self._mode = "drop_caches"
                return ""
            problem += "; /%s is not writable either" % memreclaim.DROP_CACHES_PATH
        return problem

    def _sample(self, now: float) -> Tuple[Sample, bool]:
        """This moment's figures, and whether the guest has swap (SwapTotal > 0)."""
        try:
            psi: Optional[float] = procfs.parse_pressure(
                self._file("proc/pressure/memory").read()).some.avg10
        except (OSError, procfs.ProcParseError):
            psi = None
        vm = procfs.parse_vmstat(self._file("proc/vmstat").read())
        refaults = vm.get("workingset_refault_file", 0) + vm.get("workingset_refault_anon", 0)
        if "workingset_refault_file" not in vm:
            refaults = vm.get("workingset_refault", 0)   # before 5.9: one counter
        info = procfs.parse_meminfo(self._file("proc/meminfo").read())
        cache = (info.get("Active(file)", 0) or 0) + (info.get("Inactive(file)", 0) or 0)
        swap = (info.get("SwapTotal", 0) or 0) > 0
        return Sample(now, psi, refaults, info.available or 0, cache), swap

    def _off(self, reason: str) -> None:
        self.controller.off(reason)
        self.close()

    def tick(self, now: float) -> None:
        """Run the stage if it is on and due; never raises for a kernel that says no."""
        if not self.cfg["free_first"]:
            if self._on:
                self._on = False
                self._off("free_first is off")
            return
        drop = bool(self.cfg["free_first_drop_caches"])
        if not self._on or drop != self._probed_drop:
            # Switched on, or the fallback opted in or out: look at the kernel again.
            self._on, self._next, self._probed_drop = True, now, drop
            self._problem = self._probe()
            if self._problem:
                self._off(self._problem)
        if self._problem or now < self._next:
            return
        self._next = now + INTERVAL_S
        try:
            sample, swap = self._sample(now)
        except (OSError, procfs.ProcParseError) as e:
            self.controller.state, self.controller.reason = State.BACKED_OFF, (
                "cannot read the guest's memory figures: %s" % e)
            return
        d = self.controller.decide(sample, Limits.from_settings(self.cfg))
        if d.reclaim_bytes:
            self._act(d.reclaim_bytes, swap, now)
        if self.controller.state in (State.PROBING, State.SLOWED, State.AT_FLOOR,
                                     State.EXHAUSTED) and now >= self._next_compact:
            self._maybe_compact(now)

    def _act(self, nbytes: int, swap: bool, now: float) -> None:
        if self._mode == "drop_caches":
            if now >= self._next_drop:
                self._next_drop = now + DROP_EVERY_S
                try:
                    self.reclaimer.drop_caches()
                    self.counters["drops"] += 1
                except OSError as e:
                    self._problem = "drop_caches failed: %s" % e
                    self._off(self._problem)
            return
        self.counters["requests"] += 1
        try:
            full = self.reclaimer.reclaim(nbytes, bool(self.cfg["free_first_anon"]), swap)
        except memreclaim.Refused as e:
            # Not permanent: swap may go off, or the operator may allow anon.
            self.controller.state, self.controller.reason = State.OFF, str(e)
            self.controller.step = MIN_STEP
            return
        except OSError as e:
            self._problem = "writing %s failed: %s (errno %s); free first is off until it " \
                "is switched on again" % (self.reclaimer.reclaim_path, e.strerror or e, e.errno)
            self._off(self._problem)
            return
        self.controller.outcome(nbytes, full, now)
        if full:
            self.counters["reclaimed_bytes"] += nbytes
        else:
            self.counters["short_writes"] += 1

    def _maybe_compact(self, now: float) -> None:
        try:
            why = compaction_reason(procfs.parse_buddyinfo(self._file("proc/buddyinfo").read()))
        except (OSError, procfs.ProcParseError) as e:
            self.last_error = "buddyinfo: %s" % e
            return
        if not why:
            return
        self._next_compact = now + COMPACT_EVERY_S
        try:
            self.reclaimer.compact()
            self.counters["compactions"] += 1
            self.last_error = ""
        except OSError as e:
            self.last_error = "compaction failed: %s" % e

    def status(self) -> Dict[str, Any]:
        """A JSON-able picture for the statistics message (key ``free_first``)."""
        c = self.controller
        last = c.last
        return {"state": c.state.value, "reason": c.reason, "step_bytes": c.step,
                "refaults_since_start": c.refaults_since_start(),
                "psi_some_avg10": last.psi_some_avg10 if last else None,
                "file_cache_bytes": last.file_cache if last else None,
                "mem_available_bytes": last.mem_available if last else None,
                "mode": self._mode, "swappiness_key": self.reclaimer.swappiness_key,
                "last_error": self.last_error, **self.counters}
