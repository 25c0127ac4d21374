"""The aeration cycle: notify, fill, report, drain, back off (DESIGN.md "The aeration cycle").

Pure decision logic. The kernel (free blocks, watermarks, PSI, which pages are still free)
and the arena (isolating and returning blocks) are injected, so the same engine runs on the
real kernel in the agent and on scripted views in unit tests.

Passes. The buddy allocator hands out the most recently freed blocks first, so a block given
back right after its ack would be the first one the next fill takes, and the agent would
aerate the same memory over and over. The engine therefore works in *passes*: within a pass
it keeps every acked block isolated while it goes on filling, and returns all of them
together when the raw free memory beyond the reserve falls under ``hwm``, or at once when the
guest comes under memory pressure. Returned blocks are then *aerated* (free in the guest,
discarded on the host) until the kernel hands them out again, which the engine notices by
re-reading their buddy flag: every error there counts a block as raw (safe side: a missed
reclaim, never a double punch, since the host only ever discards what the agent holds).

Churn (issue 15). The buddy allocator's order is not the engine's: a fill gets whole order-9
blocks from the order-9 free lists before it splits larger blocks, and the aerated blocks a
pass returned whose buddies are in use sit exactly there, while memory the guest frees
merges into larger blocks further back. So fills keep getting aerated blocks first. Such a
block moves nothing from raw to aerated (the fill zeroes it, the host backs it again, the
ack discards it again), so it does not count against the pass's budget (``_pass_left``,
raw units only): the pass digs on, holding every block it took, until it has taken the
raw units it set out for. A pass re-takes each aerated block at most once (it holds it
until the pass ends), so a pass is bounded by the free memory; before, the budget counted
aerated blocks too, the pass ended on them, found the same raw count and began again, in
a loop that never reached raw memory (293 batches, 15 GB reported in a 1 GiB guest).
Digging re-takes blocks the engine believes aerated, and under churn many of those beliefs
are stale: the guest allocated the block and freed it again between two re-validations,
so the host backs it, and re-taking it is a reclaim, not waste. Measured (tests/perf/
bench_churn.py, 120 s of churn, 1.5 GiB guest): holding such blocks across passes instead
("parking", while the guest kept low + 2x reserve + all parked free) cut re-taken blocks
1,211 -> 374 and agent CPU 34.5 -> 24.3 s, but left 795 MiB backed 60 s after the churn
against 292 MiB (idle baseline 226-295) with digging alone: the churn then reused the other
aerated blocks and their staleness went unseen. So blocks are not parked.
A guest whose free memory keeps moving (allocate/free loops faster than the poll) would
still start a pass each time it frees ``hwm`` units: passes that begin back to back
(``CHURN_QUICK_S``) three times in a row wait a gap doubling up to ``CHURN_GAP_MAX_S``,
and the status says so ("churn: ..."); pressure still backs off at once.

Probes (issue 15). Re-validation reads only the buddy flag, which a block the guest
allocated, wrote and freed again between two looks keeps: the engine goes on believing it
aerated while the host backs it again (measured: 432 MiB backed 30 s after a churn, idle
baseline 229, and "pass done: 0 raw units"). Only the host sees that, so an idle engine
asks it (agent/protocol.py "Probes", sessions of protocol >= 3): at most every
``PROBE_EVERY`` seconds, while no pass runs and nothing is held or in flight, it names up
to ``PROBE_MAX_RANGES`` aerated blocks, the longest unprobed first (a block's discard
counts as its first probe), one range per whole granule (``probe_request``). Every block lying in
a range the host answers backed stops counting as aerated: it is raw free memory, which the
next pass takes (``on_probed``, counted in ``probe_stale_blocks``). An answer applies only
to blocks aerated without a break since the probe went out (each aeration has its own
generation): one a pass took and aerated again meanwhile keeps its newer belief.
What it cannot break: the blocks concerned are free in the guest and held by no batch;
an answer only moves a belief, never a page (S2, S3 unchanged), so a wrong one costs a
missed or a repeated reclaim. What it costs: one line each way per ``PROBE_EVERY``; a
granule (2 MiB, or 1 GiB on a 1 GiB-backed guest) with one backed page turns raw whole.
An answer ``unknown`` changes no belief; one the host marks ``retry`` ("rate", a map being
rebuilt) doubles the wait (up to ``PROBE_BACKOFF_MAX_S``), any other (the host cannot tell
for this VM: private RAM, hugetlbfs, a disk file, host swap) stops probing until the next
session.

Safety (S2): blocks leave the arena only on an ack of their batch, a new session, the end
of the batch's lease (agent/protocol.py, "Leases": the host starts no discard of it any
more), or pressure when they were already acked. Blocks of a batch without ack stay held
until one of those, whatever else happens, including pressure. Blocks recovered from an
agent that died (orphans) go back on a new session or once ``LEASE_MAX_S`` has passed since
this agent started: every token the dead agent held was received before that start, and no
lease is longer. Neither an expired batch nor an orphan counts as aerated: whether the host
discarded it is not known.
"""

from __future__ import annotations

import bisect
import enum
from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Set, Tuple

from . import settings as settings_mod
from .arena import ArenaError, Block
from .hugetlb import BudgetError
from .protocol import LEASE_MS_MAX, PROBE_MAX_RANGES, Range, coalesce

PAGE = 4096
#: Re-read the buddy flags of aerated blocks at most this often (seconds). Between two
#: re-validations the estimate can only be stale on the safe side: a block the guest took
#: back still counts as aerated, so a reclaim is at worst delayed, never doubled.
REVALIDATE_EVERY = 5.0
#: ... and at least this often, moved or not: a guest can take aerated blocks while as many
#: others become free, which leaves the count where it was.
REVALIDATE_MAX_AGE = 60.0
#: No lease is longer than this (seconds): the bound for orphans of a dead agent.
LEASE_MAX_S = LEASE_MS_MAX / 1000.0
#: Churn back-off ("Churn" in the module docstring): a pass that starts within
#: CHURN_QUICK_S seconds (plus the gap in force) of the previous pass's end is back to back;
#: from the CHURN_STREAK-th such pass in a row, the next one waits a gap that doubles from
#: 1 s up to CHURN_GAP_MAX_S. Bounded so that memory freed when the churn ends is reported
#: within CHURN_GAP_MAX_S plus one pass.
CHURN_QUICK_S = 5.0
CHURN_STREAK = 3
CHURN_GAP_MAX_S = 8.0
#: Probes ("Probes" in the module docstring): an idle engine asks the host about its
#: aerated blocks at most this often (seconds); an answer not come within PROBE_TIMEOUT_S
#: no longer holds the next one back; "rate" answers double the wait up to the maximum.
PROBE_EVERY = 5.0
PROBE_TIMEOUT_S = 30.0
PROBE_BACKOFF_MAX_S = 60.0
__all__ = ["Block", "Engine", "KernelView", "Phase", "granule_ranges"]


class KernelView(Protocol):
    """What the engine needs to know of the guest kernel right now."""

    def free_units(self, min_order: int) -> int:
        """Free memory in blocks of order >= min_order, counted in 2**min_order-page units."""

    def reserve_pages(self) -> int:
        """Pages the kernel itself wants free (zone high watermarks, summed)."""

    def free_pages(self) -> int:
        """Free pages now (all zones)."""

    def low_pages(self) -> int:
        """Sum of the zone low watermarks: kswapd wakes below this."""

    def psi_some_avg10(self) -> Optional[float]:
        """Memory PSI 'some' avg10 in percent, or None where the kernel has no PSI."""

    def still_free(self, pfns: List[int]) -> List[bool]:
        """For each pfn: is it still a free buddy page? Unknown answers are False."""


class Arena(Protocol):
    """Where isolated blocks are held (agent/arena.py)."""

    granule_bytes: int

    def fill(self, n: int) -> List[Block]:
        """Take up to n blocks out of the kernel; fewer when it has no more."""

    def release(self, blocks: List[Block]) -> None:
        """Return blocks to the kernel."""

    def verify(self, blocks: List[Block]) -> List[Block]:
        """Re-read the frames of held blocks; return those whose frame changed."""


class Phase(enum.Enum):
    """What the engine is doing, for status and tests."""

    DISABLED = "disabled"      # settings say off, or stats-only
    IDLE = "idle"              # no session or nothing worth reporting
    WAITING = "waiting"        # a batch is out, waiting for its ack
    FILLING = "filling"        # a pass is under way
    BACKOFF = "backoff"        # memory pressure: holding nothing acked, waiting


class Engine:
    """The cycle's state and decisions. Call ``tick`` when it asks; feed protocol events.

    ``tick(now, can_report)`` returns ``(ranges_to_report or None, seconds_to_next_tick)``;
    after sending a report the caller hands the batch id back with ``reported``.
    """

    def __init__(self, kernel: KernelView, arena: Arena,
                 values: Optional[Mapping[str, Any]] = None, stats_only: str = "") -> None:
        self.kernel = kernel
        self.arena = arena
        self.cfg: Dict[str, Any] = settings_mod.layered([values or {}])
        #: non-empty: why this agent only reports statistics (e.g. the kernel does it)
        self.stats_only = stats_only
        self.phase = Phase.IDLE
        self.inflight: Dict[int, List[Block]] = {}
        self._unsent: Optional[List[Block]] = None
        self.held_acked: List[Block] = []
        #: blocks isolated in this pass that could not form a whole host granule: held so
        #: the next fill does not take them again, returned (not aerated) at the pass end
        self.unreported: List[Block] = []
        #: blocks held from before this agent started (crash recovery): released on a new
        #: session, which proves the host dropped whatever it knew of them (S2, S3)
        self.orphans: List[Block] = []
        #: when orphans may go back without a session (set by ``adopt_orphans``)
        self.orphans_release_at = float("inf")
        #: head pfn -> nr_pages of blocks returned after discard, believed still free
        self.aerated: Dict[int, int] = {}
        #: head pfn -> (generation of its aeration, when it was last probed or aerated);
        #: an entry goes wherever its block leaves ``aerated`` (same keys, always)
        self._aerated_meta: Dict[int, Tuple[int, float]] = {}
        self._aerated_gen = 0
        #: the probe chosen by probe_request and not yet sent: head pfn -> generation
        self._probe_unsent: Optional[Dict[int, int]] = None
        #: (probe id, head pfn -> generation, sent at) of the probe awaiting its answer
        self._probe_out: Optional[Tuple[int, Dict[int, int], float]] = None
        self._probe_next = 0.0      # no probe before this (cycle clock)
        self._probe_wait = 0.0      # the back-off in force after "rate" answers
        #: non-empty: why this session's host is not probed any more
        self.probe_off = ""
        self._capacity_now = max(1, self.cfg["capacity"] // 4)
        self._backoff_s = 0.0
        self._backoff_until = 0.0
        self._rate_tokens = 0.0
        self._pass_left = 0         # units the current pass may still take
        self._refusals = 0          # refused batches in a row
        self._refusals_waited = 0   # how many of them were already waited out
        self._rate_t = 0.0
        #: (free units, time) at the last re-validation of the aerated blocks
        self._revalidated: Optional[Tuple[int, float]] = None
        self._fell = False          # free units had fallen by hwm at the last look
        self._now = 0.0             # the cycle's clock at the last tick
        self._in_pass = False       # a pass began and has not ended yet
        self._pass_ended = float("-inf")
        self._decided_for = float("-inf")  # the pass end _churn_wait last decided on
        self._streak = 0            # passes in a row that began back to back
        self._churn_gap = 0.0       # the gap in force before the next pass may begin
        self.counters = {"reported_bytes": 0, "discarded_bytes": 0, "refused_bytes": 0,
                         "returned_bytes": 0, "passes": 0, "backoffs": 0, "refilled_aerated": 0,
                         "passes_started": 0, "filled_blocks": 0, "churn_backoffs": 0,
                         "expired_batches": 0, "orphans_returned": 0, "moved_blocks": 0,
                         "probes_sent": 0, "probes_unknown": 0, "probe_stale_blocks": 0}
        self.last_reason = "starting"
        #: raw free memory beyond the reserve at the last look (bytes; an estimate)
        self.last_raw_bytes = 0
        #: the agent is stopping: no new pass, no new fill
        self.stopping = False
        #: the last tick had work but was paused for want of a fresh lease token
        self.wants_token = False

    # ------------------------------------------------------------------ settings

    def apply(self, values: Mapping[str, Any]) -> None:
        """Apply live settings (already validated or not: invalid ones raise SettingError)."""
        checked = settings_mod.validate(values, origin="host config")
        self.cfg.update(checked)
        self._capacity_now = min(self._capacity_now, self.cfg["capacity"])

    # ------------------------------------------------------------------ protocol events

    def adopt_orphans(self, blocks: List[Block], started: float) -> None:
        """Blocks a dead agent left held; they go back on a new session or at
        ``started + LEASE_MAX_S`` (``started``: this agent's start, on the cycle's clock)."""
        self.orphans = list(blocks)
        self.orphans_release_at = started + LEASE_MAX_S

    def _return_orphans(self) -> List[Block]:
        out, self.orphans = self.orphans, []
        if out:
            # Raw, not aerated: nobody knows whether the host discarded them.
            self.arena.release(out)
            self.counters["returned_bytes"] += sum(b.nr_pages for b in out) * PAGE
            self.counters["orphans_returned"] += len(out)
        return out

    def on_session(self) -> List[Block]:
        """A new session began: the host dropped all it knew; orphans may go back. A probe
        of an older session will get no answer, and the new host may answer probes."""
        self._probe_unsent = self._probe_out = None
        self._probe_next, self._probe_wait, self.probe_off = 0.0, 0.0, ""
        return self._return_orphans()

    # ------------------------------------------------------------------ probes

    def probe_request(self, now: float, granule: int = 0) -> Optional[List[Range]]:
        """Ranges of aerated blocks to ask the host about now, or None ("Probes" in the
        module docstring). The caller sends them and hands the probe id to
        ``probe_sent``; a request it could not send is forgotten at the next call."""
        self._probe_unsent = None
        if (self.probe_off or not self.aerated or self.stopping or self._in_pass
                or self.phase is not Phase.IDLE or now < self._probe_next
                or self.inflight or self.held_acked or self.unreported):
            return None
        if self._probe_out is not None and now - self._probe_out[2] < PROBE_TIMEOUT_S:
            return None
        meta = self._aerated_meta
        never = (0, float("-inf"))
        chosen = sorted(self.aerated, key=lambda p: (meta.get(p, never)[1], p))[
            :PROBE_MAX_RANGES]
        self._probe_next = now + max(PROBE_EVERY, self._probe_wait)
        blocks = [Block(p, self.aerated[p], 0) for p in chosen]
        unit = max(granule, self.arena.granule_bytes)
        runs, covered = granule_ranges(blocks, unit)
        # One range per granule, not per coalesced run: the host answers range by range, so
        # a run of adjacent blocks asked as one would all turn raw for one backed page.
        # At most PROBE_MAX_RANGES: every granule holds at least one chosen block.
        ranges = [(gpa + off, unit) for gpa, n in runs for off in range(0, n, unit)]
        for p in chosen:
            # Probed now, covered or not: a block that forms no whole granule must not keep
            # the others from their turn.
            meta[p] = (meta.get(p, never)[0], now)
        if not ranges:
            return None
        self._probe_unsent = {p: meta[p][0] for p in chosen if p in covered}
        return ranges

    def probe_sent(self, pid: int, now: float) -> None:
        """The ranges of the last ``probe_request`` went out as probe ``pid``."""
        assert self._probe_unsent is not None, "probe_sent() without a probe_request"
        self._probe_out = (pid, self._probe_unsent, now)
        self._probe_unsent = None
        self.counters["probes_sent"] += 1

    def on_probed(self, pid: int, backed: Optional[List[Range]], unknown: str = "",
                  retry: bool = False) -> int:
        """The host answered probe ``pid``: the probed ranges it backs (None: it could not
        tell, ``unknown`` says why, ``retry`` whether it may later). Returns how many blocks
        became raw."""
        out = self._probe_out
        if out is None or out[0] != pid:
            return 0    # an answer to an older probe, or after a new session
        self._probe_out = None
        if backed is None:
            self.counters["probes_unknown"] += 1
            if retry or unknown == "rate":
                self._probe_wait = min(PROBE_BACKOFF_MAX_S,
                                       max(2 * PROBE_EVERY, 2 * self._probe_wait))
                self._probe_next = max(self._probe_next, self._now + self._probe_wait)
            else:
                self.probe_off = "the host cannot tell what it backs: %s" % unknown[:200]
            return 0
        self._probe_wait = 0.0
        spans = sorted(backed)
        starts = [gpa for gpa, _ in spans]
        stale = 0
        for pfn, gen in out[1].items():
            nr = self.aerated.get(pfn)
            if nr is None or self._aerated_meta.get(pfn, (-1, 0.0))[0] != gen:
                continue    # taken (and maybe aerated again) since the probe went out
            gpa, end = pfn * PAGE, (pfn + nr) * PAGE
            i = bisect.bisect_right(starts, gpa) - 1
            if i >= 0 and end <= spans[i][0] + spans[i][1]:
                del self.aerated[pfn]
                del self._aerated_meta[pfn]
                stale += 1
        if stale:
            self.counters["probe_stale_blocks"] += stale
            self.last_reason = ("probe: the host backs %d blocks believed aerated; they "
                                "count as raw" % stale)
        return stale

    def on_expired(self, batch: int) -> None:
        """The lease of an un-acked ``batch`` ran out: the host will not discard it any
        more, so its pages go back (raw: it may or may not have been discarded)."""
        if batch in self.inflight:
            self.counters["expired_batches"] += 1
        self.on_release(batch, 0, 0)

    def reported(self, batch: int) -> None:
        """The caller sent the ranges of the last ``tick`` as ``batch``."""
        assert self._unsent is not None, "reported() without a pending fill"
        self.inflight[batch] = self._unsent
        self.counters["reported_bytes"] += sum(b.nr_pages for b in self._unsent) * PAGE
        self._unsent = None

    def on_release(self, batch: int, discarded: int = 0, refused: int = 0) -> None:
        """The host is done with ``batch`` (an ack, or a new session dropped it)."""
        blocks = self.inflight.pop(batch, None)
        if blocks is None:
            return
        self.counters["discarded_bytes"] += discarded
        self.counters["refused_bytes"] += refused
        if discarded:
            self._refusals = self._refusals_waited = 0
            self.held_acked.extend(blocks)
            # Probe slowly: every acked batch without pressure grows the next one.
            self._capacity_now = min(self.cfg["capacity"], self._capacity_now * 2)
        else:
            # Nothing was discarded (refused or a dropped session): holding it buys nothing.
            self.arena.release(blocks)
            self.counters["returned_bytes"] += sum(b.nr_pages for b in blocks) * PAGE
            if refused:
                # The host will not discard for now (private RAM, a migration...): reporting
                # the same blocks again at once would only burn CPU on both sides.
                self._refusals += 1

    def abandon_unsent(self) -> None:
        """The fill of the last tick could not be sent (no session any more)."""
        if self._unsent is not None:
            self.arena.release(self._unsent)
            self._unsent = None

    # ------------------------------------------------------------------ the cycle

    def _pressure(self, read_psi: bool = True) -> str:
        if read_psi:
            psi = self.kernel.psi_some_avg10()
            if psi is not None and psi > self.cfg["psi_threshold"]:
                return "memory PSI some avg10 %.1f%% > %.1f%%" % (psi,
                                                                  self.cfg["psi_threshold"])
        margin = self.cfg["reserve_mib"] * 256 // 2
        free, low = self.kernel.free_pages(), self.kernel.low_pages()
        if free < low + margin:
            return "free %d MiB is near the low watermark %d MiB" % (free // 256, low // 256)
        return ""

    def _back_off(self, now: float, pressure: str, idle: float) -> Tuple[None, float]:
        # Back off fast: acked blocks go back at once; un-acked ones must wait (S2).
        if self.phase is not Phase.BACKOFF:
            self.counters["backoffs"] += 1
        self.end_pass("backoff: " + pressure)
        self.phase = Phase.BACKOFF
        self._backoff_s = min(60.0, max(1.0, self._backoff_s * 2))
        self._backoff_until = now + self._backoff_s
        self._capacity_now = 1
        return None, min(idle, self._backoff_s)

    def raw_units(self, now: Optional[float] = None) -> int:
        """Free units (2**min_order pages) beyond reserve and beyond what is aerated.

        With ``now`` (the cycle's clock) the aerated blocks are re-validated only when the
        kernel's count of free units moved since the last time, at most every
        ``REVALIDATE_EVERY`` seconds (an aerated block the guest allocates splits, so the
        count moves), and at least every ``REVALIDATE_MAX_AGE`` seconds. A fall of ``hwm``
        units or more, seen on two ticks in a row, re-validates at once: an allocation that
        large takes the most recently freed blocks first, the aerated ones, and if it is
        freed again before the engine looks, those blocks would stay counted as aerated
        while the host backs them again (a reclaim missed for good). An idle guest costs one
        kpageflags read per block a minute. Without ``now`` the re-validation always runs.
        """
        order = self.cfg["min_order"]
        per_unit = 1 << order
        reserve = (self.kernel.reserve_pages() + self.cfg["reserve_mib"] * 256) // per_unit
        free = self.kernel.free_units(order)
        last = self._revalidated
        # A fall seen on two ticks in a row: the kernel's own free page reporting (where it
        # runs beside the agent) takes batches of free blocks off the lists for a moment,
        # which must not read as the guest allocating them.
        fell = last is not None and last[0] - free >= self.cfg["hwm"]
        fell_twice, self._fell = fell and self._fell, fell
        if now is None or last is None or now - last[1] >= REVALIDATE_MAX_AGE or (
                free != last[0] and now - last[1] >= REVALIDATE_EVERY) or fell_twice:
            self._revalidate()
            self._revalidated = (free, now if now is not None else float("-inf"))
        aerated = sum(n for n in self.aerated.values()) // per_unit
        self.last_raw_bytes = max(0, int(free - reserve - aerated)) * per_unit * PAGE
        return int(free - reserve - aerated)

    def _revalidate(self) -> None:
        if not self.aerated:
            return
        pfns = sorted(self.aerated)
        for pfn, free in zip(pfns, self.kernel.still_free(pfns)):
            if not free:
                del self.aerated[pfn]
                self._aerated_meta.pop(pfn, None)

    def _give_back(self, blocks: Iterable[Block]) -> None:
        blocks = list(blocks)
        if not blocks:
            return
        self.arena.release(blocks)
        self.counters["returned_bytes"] += sum(b.nr_pages for b in blocks) * PAGE
        self._aerated_gen += 1
        for b in blocks:
            self.aerated[b.pfn] = b.nr_pages
            # Just discarded: as good as a probe that found it a hole.
            self._aerated_meta[b.pfn] = (self._aerated_gen, self._now)

    def end_pass(self, reason: str) -> None:
        """Return every acked block: they are aerated now."""
        if self.held_acked:
            self.counters["passes"] += 1
        if self._in_pass:
            self._in_pass = False
            self._pass_ended = self._now
        blocks, self.held_acked = self.held_acked, []
        self._give_back(blocks)
        if self.unreported:
            self.arena.release(self.unreported)
            self.unreported = []
        self.last_reason = reason

    def _churn_wait(self, now: float) -> float:
        """Seconds a new pass must still wait under churn (0: it may begin now).

        Decided once per pass end, at the first tick that would begin a new pass: it is back
        to back if it comes within ``CHURN_QUICK_S`` plus the gap in force of that end; from
        the ``CHURN_STREAK``-th back-to-back pass in a row the gap doubles (1 s up to
        ``CHURN_GAP_MAX_S``); a pass that begins later than that ends the streak."""
        if self._decided_for != self._pass_ended:
            self._decided_for = self._pass_ended
            if now - self._pass_ended < CHURN_QUICK_S + self._churn_gap:
                self._streak += 1
            else:
                self._streak, self._churn_gap = 0, 0.0
            if self._streak >= CHURN_STREAK:
                self._churn_gap = min(CHURN_GAP_MAX_S, max(1.0, self._churn_gap * 2))
                self.counters["churn_backoffs"] += 1
        return max(0.0, self._pass_ended + self._churn_gap - now)

    def _rate_allows(self, now: float, nbytes: int) -> bool:
        cap = self.cfg["max_rate_mib_s"] * 1024 * 1024
        if not cap:
            return True
        self._rate_tokens = min(float(cap), self._rate_tokens + (now - self._rate_t) * cap)
        self._rate_t = now
        if self._rate_tokens < nbytes:
            return False
        self._rate_tokens -= nbytes
        return True

    def tick(self, now: float, can_report: bool,
             granule: int = 0, paused: str = "") -> Tuple[Optional[List[Range]], float]:
        """Decide what to do now. Returns (ranges to report, seconds until the next tick).

        ``granule`` is the host's discard unit for this session (0: the arena's own); only
        whole, aligned granules are reported. ``paused`` non-empty: a session is up but no
        report may go now (its lease token is not fresh): the pass stays as it is, pressure
        is still acted on.
        """
        self.wants_token = False
        self._now = now
        if self.orphans and now >= self.orphans_release_at:
            self._return_orphans()
        idle = self.cfg["idle_poll_ms"] / 1000.0
        delay = self.cfg["delay_ms"] / 1000.0
        stats_only = "" if self.cfg["override_kernel_reporting"] else self.stats_only
        if not stats_only:
            # An arena that cannot keep S2/S3 (the THP fallback) never reports unless the
            # operator opted in (allow_weak_arena): agent/arena.py says why.
            refusal = getattr(self.arena, "refusal", None)
            stats_only = refusal(bool(self.cfg["allow_weak_arena"])) if refusal else ""
        if stats_only or not self.cfg["enabled"]:
            self.end_pass("disabled")
            self.phase = Phase.DISABLED
            self.last_reason = stats_only or "disabled by setting 'enabled'"
            return None, idle
        if self.stopping:
            self.end_pass("stopping: waiting for acks or leases of batches in flight")
            self.phase = Phase.WAITING if self.inflight else Phase.IDLE
            return None, idle
        # PSI is read while the engine holds or waits for something, and before a new
        # pass starts; an idle engine holding nothing has nothing to give back, so its tick
        # only checks free memory against the low watermark (from /proc/buddyinfo, read
        # anyway) and skips the PSI read.
        holding = bool(self.inflight or self.held_acked or self.unreported)
        pressure = self._pressure(read_psi=holding or self.phase is Phase.BACKOFF)
        if pressure:
            return self._back_off(now, pressure, idle)
        if now < self._backoff_until:
            return None, self._backoff_until - now
        self._backoff_s = max(0.0, self._backoff_s / 2)
        if self.inflight:
            self.phase = Phase.WAITING
            return None, idle
        if self._refusals > self._refusals_waited:
            wait = min(300.0, 5.0 * 2 ** (self._refusals - 1))
            self._backoff_until = now + wait
            self._refusals_waited = self._refusals
            self.end_pass("the host refused the last batch; next try in %.0f s" % wait)
            self.phase = Phase.BACKOFF
            return None, wait
        if not can_report:
            self.end_pass("no session")
            self.phase = Phase.IDLE
            return None, idle
        raw = self.raw_units(now)
        in_pass = bool(self.held_acked or self.unreported)
        if raw < (1 if in_pass else self.cfg["hwm"]):
            self.end_pass("pass done: %d raw units under hwm %d" % (max(raw, 0),
                                                                    self.cfg["hwm"]))
            self.phase = Phase.IDLE
            return None, idle
        if not in_pass:
            pressure = self._pressure()
            if pressure:
                return self._back_off(now, pressure, idle)
            wait = self._churn_wait(now)
            if wait > 0:
                self.phase = Phase.BACKOFF
                self.last_reason = ("churn: %d passes began back to back (free memory keeps "
                                    "moving); next pass in %.1f s" % (self._streak, wait))
                return None, wait
            # A pass takes at most what was raw when it began: where the kernel keeps adding
            # free memory (deferred struct page init, memory hotplug) it must still end.
            self._pass_left = raw
            self._in_pass = True
            self.counters["passes_started"] += 1
        elif self._pass_left <= 0:
            self.end_pass("pass done: took what was free when it began")
            self.phase = Phase.IDLE
            return None, idle
        if paused:
            # Work is there but no report may go yet: the caller asks for a fresh token
            # (only now, so an idle agent never asks) and the pass stays as it is.
            self.wants_token = True
            self.last_reason = paused
            return None, max(delay, 0.05)
        units_per_block = max(1, (self.arena.granule_bytes // PAGE) >> self.cfg["min_order"])
        want = min(self._capacity_now, max(1, min(raw, self._pass_left) // units_per_block))
        if not self._rate_allows(now, want * self.arena.granule_bytes):
            return None, max(delay, 0.05)
        try:
            blocks = self.arena.fill(want)
        except (ArenaError, BudgetError, OSError) as e:
            # The kernel or the operator's hugepage setup refused; say so and retry later.
            self.end_pass("fill failed: %s" % e)
            self.phase = Phase.BACKOFF
            self._backoff_s = min(60.0, max(5.0, self._backoff_s * 2))
            self._backoff_until = now + self._backoff_s
            return None, self._backoff_s
        if not blocks:
            self.end_pass("the kernel gave no block")
            self.phase = Phase.IDLE
            return None, idle
        moved = self._moved(blocks)
        if moved:
            # A held page moved between the fill and the report (migration, compaction of
            # a CMA range, memory offlining): its old frame is not ours any more, so it is
            # not reported; the block stays held (unreported) and goes back at the pass end.
            self.counters["moved_blocks"] += len(moved)
            self.last_reason = "%d held blocks moved before their report" % len(moved)
            self.unreported.extend(moved)
            gone = {b.pfn for b in moved}   # verify() returns the blocks passed in
            blocks = [b for b in blocks if b.pfn not in gone]
        refilled = [b for b in blocks + moved if b.pfn in self.aerated]
        # Only raw blocks count against the pass: a block already aerated moves nothing from
        # raw to aerated, so counting it would end the pass before it reached raw memory,
        # and the next pass would take the same aerated blocks again (module docstring).
        self._pass_left -= (len(blocks) + len(moved) - len(refilled)) * units_per_block
        for b in refilled:
            del self.aerated[b.pfn]
            self._aerated_meta.pop(b.pfn, None)
        self.counters["refilled_aerated"] += len(refilled)
        self.counters["filled_blocks"] += len(blocks) + len(moved)
        ranges, covered = granule_ranges(blocks, max(granule, self.arena.granule_bytes))
        self.unreported.extend(b for b in blocks if b.pfn not in covered)
        self.phase = Phase.FILLING
        self.last_reason = "pass under way"
        if not ranges:
            return None, delay
        self._unsent = [b for b in blocks if b.pfn in covered]
        return ranges, delay

    # ------------------------------------------------------------------ status

    def _moved(self, blocks: List[Block]) -> List[Block]:
        """The blocks whose frame changed since the fill (re-read right before the report);
        an arena that cannot tell counts all as moved (safe side: nothing reported)."""
        if not blocks:
            return []
        try:
            return list(self.arena.verify(blocks))
        except (ArenaError, OSError):
            return list(blocks)

    def held_bytes(self) -> int:
        """Bytes isolated in the arena right now (in flight, acked, orphaned)."""
        blocks: List[Block] = self.held_acked + self.orphans + self.unreported
        for bl in self.inflight.values():
            blocks.extend(bl)
        return sum(b.nr_pages for b in blocks) * PAGE

    def aerated_bytes(self) -> int:
        """Estimate of guest memory free in the guest and discarded on the host."""
        return sum(self.aerated.values()) * PAGE

    def status(self) -> Dict[str, Any]:
        """A JSON-able picture of the engine for stats messages and the journal."""
        return {"phase": self.phase.value, "reason": self.last_reason,
                "held_bytes": self.held_bytes(), "aerated_bytes": self.aerated_bytes(),
                "raw_bytes": self.last_raw_bytes,
                "inflight_batches": sorted(self.inflight), "capacity_now": self._capacity_now,
                "probe_off": self.probe_off,
                "counters": dict(self.counters),
                "arena_counters": dict(getattr(self.arena, "counters", {}))}


def granule_ranges(blocks: Iterable[Block], granule: int) -> Tuple[List[Range], Set[int]]:
    """The whole, aligned ``granule``-sized ranges that ``blocks`` cover together.

    Returns the coalesced ranges and the head pfns of the blocks lying wholly inside them.
    With a 2 MiB granule every 2 MiB block qualifies; with 1 GiB only runs of 512 adjacent,
    aligned blocks do (a 1 GiB host page can only be discarded whole).
    """
    blocks = list(blocks)
    ranges: List[Range] = []
    for gpa, length in coalesce([(b.phys_addr, b.nbytes) for b in blocks]):
        start = -(-gpa // granule) * granule
        end = (gpa + length) // granule * granule
        if end > start:
            ranges.append((start, end - start))
    covered = set()
    for b in blocks:
        gpa, length = b.phys_addr, b.nbytes
        if any(s <= gpa and gpa + length <= s + n for s, n in ranges):
            covered.add(b.pfn)
    return ranges, covered
