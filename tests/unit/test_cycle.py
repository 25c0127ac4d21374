"""The cycle engine's decisions, on a scripted kernel and arena (pure logic, no I/O).

The scripted kernel below is a model of the buddy allocator's counts, not a mock of a
function: it keeps free memory consistent as the scripted arena takes and returns blocks,
and hands out the most recently returned blocks first, as the real allocator does.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest

from aerate.agent.cycle import (
    CHURN_GAP_MAX_S,
    LEASE_MAX_S,
    PROBE_EVERY,
    REVALIDATE_EVERY,
    REVALIDATE_MAX_AGE,
    Block,
    Engine,
    Phase,
    granule_ranges,
)
from aerate.agent.protocol import PROBE_MAX_RANGES

pytestmark = pytest.mark.unit
MiB = 1024 * 1024
BLOCK_PAGES = 512


class ScriptedKernel:
    def __init__(self, free_blocks: int) -> None:
        # LIFO free list of order-9 block head pfns, as the buddy allocator behaves.
        self.free_list: List[int] = [BLOCK_PAGES * (100 + i) for i in range(free_blocks)]
        self.other_free_pages = 0
        self.psi: Optional[float] = 0.0
        self.high = 0
        self.low = 0
        self.still_free_calls = 0
        self.psi_reads = 0

    def free_units(self, min_order: int) -> int:
        return len(self.free_list) * BLOCK_PAGES >> min_order

    def reserve_pages(self) -> int:
        return self.high

    def free_pages(self) -> int:
        return len(self.free_list) * BLOCK_PAGES + self.other_free_pages

    def low_pages(self) -> int:
        return self.low

    def psi_some_avg10(self) -> Optional[float]:
        self.psi_reads += 1
        return self.psi

    def still_free(self, pfns: List[int]) -> List[bool]:
        self.still_free_calls += 1
        return [p in self.free_list for p in pfns]


class ScriptedArena:
    granule_bytes = 2 * MiB

    def __init__(self, kernel: ScriptedKernel) -> None:
        self.k = kernel
        self.held: List[Block] = []
        self.moved: set = set()   # head pfns the "kernel" migrated after the fill

    def fill(self, n: int) -> List[Block]:
        out = []
        for _ in range(min(n, len(self.k.free_list))):
            pfn = self.k.free_list.pop()
            out.append(Block(pfn, BLOCK_PAGES, 0))
        self.held.extend(out)
        return out

    def release(self, blocks: List[Block]) -> None:
        for b in blocks:
            self.held.remove(b)
            self.k.free_list.append(b.pfn)

    def verify(self, blocks: List[Block]) -> List[Block]:
        return [b for b in blocks if b.pfn in self.moved]


def run(engine: Engine, steps: int, ack: bool = True, discarded: bool = True,
        start: float = 0.0) -> List[List]:
    """Drive the engine like the agent does, from ``start`` on the cycle's clock; the
    'host' acks every batch at once."""
    batch = 0
    reports = []
    now = start
    for _ in range(steps):
        ranges, wait = engine.tick(now, can_report=True)
        if ranges:
            batch += 1
            engine.reported(batch)
            reports.append(ranges)
            if ack:
                total = sum(n for _, n in ranges)
                engine.on_release(batch, discarded=total if discarded else 0,
                                  refused=0 if discarded else total)
        now += wait
    return reports


def blocks_of(reports: List[List]) -> List[int]:
    """Every 2 MiB block address in the reported ranges (ranges arrive coalesced)."""
    return [g for r in reports for gpa, n in r for g in range(gpa, gpa + n, 2 * MiB)]


def settings(**kw: int) -> dict:
    base = {"reserve_mib": 0, "hwm": 4, "capacity": 8}
    base.update(kw)
    return base


def test_a_pass_aerates_free_memory_once_and_then_rests() -> None:
    k = ScriptedKernel(free_blocks=64)
    a = ScriptedArena(k)
    e = Engine(k, a, settings())
    reports = run(e, 200)
    reported = blocks_of(reports)
    # Every free block was reported exactly once: the pass held acked blocks, so the LIFO
    # allocator could not hand the same blocks back.
    assert len(reported) == len(set(reported)) == 64
    assert a.held == [] and len(k.free_list) == 64
    assert e.aerated_bytes() == 64 * 2 * MiB and e.phase is Phase.IDLE
    assert e.counters["refilled_aerated"] == 0


def test_reused_memory_counts_as_raw_again() -> None:
    k = ScriptedKernel(free_blocks=16)
    e = Engine(k, ScriptedArena(k), settings(hwm=4))
    run(e, 100)
    assert e.raw_units() == 0
    taken = [k.free_list.pop() for _ in range(8)]   # the guest allocates 16 MiB...
    k.free_list.extend(taken)                         # ...and frees it again
    # The blocks are free again, but the engine cannot know the host still has them
    # discarded; its estimate stays (safe side: at worst a reclaim is missed).
    assert e.raw_units() == 0
    k.free_list.extend(BLOCK_PAGES * (900 + i) for i in range(8))  # new free memory
    assert e.raw_units() == 8
    reports = run(e, 100)
    assert len(blocks_of(reports)) == 8


def test_idle_ticks_read_no_page_flags_until_free_memory_moves() -> None:
    """Idle cost: re-validating aerated blocks reads kpageflags for each of them, so the
    engine does it only when the free count moved, at most every REVALIDATE_EVERY s."""
    k = ScriptedKernel(free_blocks=16)
    e = Engine(k, ScriptedArena(k), settings(hwm=4))
    run(e, 100)
    assert e.aerated_bytes() == 16 * 2 * MiB
    now = 1000.0
    e.tick(now, True)
    calls = k.still_free_calls
    for i in range(1, 60):                  # a quiet minute: nothing moves
        e.tick(now + i, True)
    assert k.still_free_calls == calls
    for _ in range(4):                      # the guest takes 8 MiB of aerated memory
        k.free_list.pop()
    e.tick(now + 61, True)
    assert k.still_free_calls == calls + 1
    assert e.aerated_bytes() == 12 * 2 * MiB
    k.free_list.pop()                       # moves a little again: waits for the interval
    e.tick(now + 62, True)
    assert k.still_free_calls == calls + 1 and e.aerated_bytes() == 12 * 2 * MiB
    e.tick(now + 61 + REVALIDATE_EVERY, True)
    assert k.still_free_calls == calls + 2 and e.aerated_bytes() == 11 * 2 * MiB
    # The guest takes an aerated block while another block frees: the count stands still,
    # so only the age limit re-validates, and the estimate is right again after it.
    k.free_list[0] = BLOCK_PAGES * 5000
    t = now + 61 + REVALIDATE_EVERY
    for i in range(1, int(REVALIDATE_MAX_AGE)):
        e.tick(t + i, True)
    assert k.still_free_calls == calls + 2 and e.aerated_bytes() == 11 * 2 * MiB
    e.tick(t + REVALIDATE_MAX_AGE, True)
    assert k.still_free_calls == calls + 3 and e.aerated_bytes() == 10 * 2 * MiB


def test_a_large_allocation_is_seen_before_it_is_freed_again() -> None:
    """The guest takes hwm units or more of aerated memory and frees it 2.5 s later: the
    engine must notice in between, or those blocks stay 'aerated' while the host backs them
    again, and the pass after the free would leave them out."""
    k = ScriptedKernel(free_blocks=32)
    a = ScriptedArena(k)
    e = Engine(k, a, settings(hwm=4))
    run(e, 200)
    assert e.aerated_bytes() == 32 * 2 * MiB
    t = 1000.0
    e.tick(t, True)
    taken = [k.free_list.pop() for _ in range(8)]   # a 16 MiB allocation, within a tick
    e.tick(t + 1, True)
    assert e.aerated_bytes() == 32 * 2 * MiB          # once could be a transient dip...
    e.tick(t + 2, True)
    assert e.aerated_bytes() == 24 * 2 * MiB          # ...twice is seen, not 5 s later
    k.free_list.extend(taken)                         # freed again at t + 2.5
    ranges, _ = e.tick(t + 3, True)
    assert ranges and len(blocks_of([ranges])) == 8   # a pass reports them again


def test_idle_ticks_skip_psi_but_no_pass_starts_under_psi_pressure() -> None:
    k = ScriptedKernel(free_blocks=2)
    a = ScriptedArena(k)
    e = Engine(k, a, settings(hwm=4))
    k.psi = 50.0
    for i in range(30):                     # idle, holding nothing: PSI is never read
        assert e.tick(float(i), True)[0] is None
    assert k.psi_reads == 0 and e.phase is Phase.IDLE
    k.free_list.extend(BLOCK_PAGES * (900 + i) for i in range(8))
    ranges, _ = e.tick(40.0, True)          # a pass would start: PSI is read and wins
    assert ranges is None and k.psi_reads == 1 and e.phase is Phase.BACKOFF
    assert a.held == [] and "PSI" in e.last_reason


def test_unacked_blocks_stay_held_under_pressure_acked_ones_go() -> None:
    """S2 under pressure: back off fast, but never give back a batch the host has not acked."""
    k = ScriptedKernel(free_blocks=64)
    a = ScriptedArena(k)
    e = Engine(k, a, settings(capacity=4))
    run(e, 3)                       # some batches acked and held within the pass
    acked = list(e.held_acked)
    assert acked
    ranges, _ = e.tick(10.0, True)
    assert ranges
    e.reported(99)                  # in flight, not acked
    k.psi = 50.0
    ranges, wait = e.tick(11.0, True)
    assert ranges is None and e.phase is Phase.BACKOFF and wait >= 1.0
    assert all(b not in a.held for b in acked)            # acked: returned at once
    assert all(b in a.held for b in e.inflight[99])       # un-acked: still held
    e.on_release(99, discarded=4 * 2 * MiB)
    k.psi = 0.0
    # Probe slowly after pressure: the first batch is small again.
    ranges, _ = e.tick(100.0, True)
    assert ranges is not None and len(ranges) == 1


def test_low_watermark_is_pressure_too() -> None:
    k = ScriptedKernel(free_blocks=8)
    k.low = 9 * BLOCK_PAGES
    e = Engine(k, ScriptedArena(k), settings())
    ranges, _ = e.tick(0.0, True)
    assert ranges is None and e.phase is Phase.BACKOFF and "low watermark" in e.last_reason


def test_reserve_and_hwm_gate_work() -> None:
    k = ScriptedKernel(free_blocks=10)
    e = Engine(k, ScriptedArena(k), settings(reserve_mib=12, hwm=5))   # 6 blocks reserved
    assert e.raw_units() == 4
    assert e.tick(0.0, True)[0] is None
    e.apply({"hwm": 4})
    assert e.tick(1.0, True)[0] is not None


def test_refused_batches_go_back_at_once_and_are_not_counted_aerated() -> None:
    k = ScriptedKernel(free_blocks=16)
    a = ScriptedArena(k)
    e = Engine(k, a, settings())
    reports = run(e, 2, discarded=False)
    assert a.held == [] and e.aerated_bytes() == 0
    assert e.counters["refused_bytes"] > 0 and e.counters["discarded_bytes"] == 0
    # A refusing host is not asked again at once: the tick after the refusal backs off.
    assert len(reports) == 1 and e.phase is Phase.BACKOFF and "refused" in e.last_reason


def test_refusals_back_off_exponentially_then_recover() -> None:
    k = ScriptedKernel(free_blocks=64)
    e = Engine(k, ScriptedArena(k), settings())
    times = []
    now, batch = 0.0, 0
    for _ in range(40):
        ranges, wait = e.tick(now, True)
        if ranges:
            batch += 1
            e.reported(batch)
            times.append(now)
            e.on_release(batch, discarded=0, refused=sum(n for _, n in ranges))
        now += wait
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert [round(g) for g in gaps[:3]] == [5, 10, 20] and max(gaps) <= 301.0
    ranges, _ = e.tick(now + 400, True)
    assert ranges
    e.reported(batch + 1)
    e.on_release(batch + 1, discarded=sum(n for _, n in ranges))
    assert e.tick(now + 401, True)[0] is not None   # the host discards again: full speed


def test_orphans_from_a_crash_wait_for_a_new_session() -> None:
    """S3: blocks recovered after a restart are returned only when a new session begins."""
    k = ScriptedKernel(free_blocks=8)
    a = ScriptedArena(k)
    e = Engine(k, a, settings())
    recovered = a.fill(3)
    e.orphans = list(recovered)
    e.tick(0.0, can_report=False)
    assert all(b in a.held for b in recovered)
    assert e.on_session() == recovered and a.held == []


def test_orphans_go_back_raw_once_no_lease_can_still_cover_them() -> None:
    """S2 with leases: a dead agent's tokens were all received before this agent started,
    so its orphans may go back LEASE_MAX_S after the start even with no host at all; not
    a moment earlier, and not counted as aerated (nobody knows if they were discarded)."""
    k = ScriptedKernel(free_blocks=8)
    a = ScriptedArena(k)
    e = Engine(k, a, settings())
    recovered = a.fill(3)
    e.adopt_orphans(recovered, started=10.0)
    e.tick(10.0 + LEASE_MAX_S - 0.01, can_report=False)
    assert all(b in a.held for b in recovered)
    e.tick(10.0 + LEASE_MAX_S, can_report=False)
    assert a.held == [] and e.orphans == [] and e.aerated == {}
    assert e.counters["orphans_returned"] == 3


def test_an_expired_batch_goes_back_raw_and_is_counted() -> None:
    k = ScriptedKernel(free_blocks=16)
    a = ScriptedArena(k)
    e = Engine(k, a, settings())
    ranges, _ = e.tick(0.0, can_report=True)
    assert ranges
    e.reported(1)
    held = list(e.inflight[1])
    e.on_expired(1)
    assert not any(b in a.held for b in held) and e.aerated == {}
    assert e.counters["expired_batches"] == 1 and e.counters["refused_bytes"] == 0
    e.on_expired(1)   # a second expiry (or a late ack) of the same batch changes nothing
    assert e.counters["expired_batches"] == 1


def test_a_stale_token_pauses_the_pass_without_ending_it() -> None:
    k = ScriptedKernel(free_blocks=32)
    a = ScriptedArena(k)
    e = Engine(k, a, settings(capacity=2))
    run(e, 2)
    acked = list(e.held_acked)
    assert acked
    k.free_list.extend(BLOCK_PAGES * (900 + i) for i in range(16))   # more work arrives
    ranges, _ = e.tick(5.0, can_report=True, paused="waiting for a fresh lease token")
    assert ranges is None and e.held_acked == acked and e.wants_token
    assert e.last_reason == "waiting for a fresh lease token"
    k.psi = 50.0   # pressure is still acted on while paused
    e.tick(6.0, can_report=True, paused="waiting for a fresh lease token")
    assert e.held_acked == [] and e.phase is Phase.BACKOFF


def test_an_idle_engine_never_wants_a_token() -> None:
    """An idle agent must not ask the host for tokens (that would keep the host sending
    keepalives to every idle guest)."""
    k = ScriptedKernel(free_blocks=2)   # under hwm: nothing to report
    a = ScriptedArena(k)
    e = Engine(k, a, settings())
    e.tick(0.0, can_report=True, paused="waiting for a fresh lease token")
    assert not e.wants_token and a.held == []


def test_a_stopping_engine_starts_nothing_new() -> None:
    k = ScriptedKernel(free_blocks=32)
    a = ScriptedArena(k)
    e = Engine(k, a, settings())
    e.stopping = True
    assert e.tick(0.0, can_report=True)[0] is None and a.held == []


def test_a_block_that_moved_before_its_report_is_not_reported() -> None:
    """The PFN re-check right before a report: a held page migrated since the fill is an
    incident, counted, and its old frame is never reported."""
    k = ScriptedKernel(free_blocks=16)
    a = ScriptedArena(k)
    e = Engine(k, a, settings(capacity=16))   # the first batch takes 4 blocks
    first = k.free_list[-1]   # the fill takes the top of the LIFO list first
    a.moved.add(first)
    ranges, _ = e.tick(0.0, can_report=True)
    assert ranges and all(not (g <= first * 4096 < g + n) for g, n in ranges)
    assert e.counters["moved_blocks"] == 1
    assert any(b.pfn == first for b in e.unreported)


def test_a_weak_arena_never_reports_unless_the_operator_allows_it() -> None:
    k = ScriptedKernel(free_blocks=32)
    a = ScriptedArena(k)
    a.refusal = lambda allow: "" if allow else "THP arena: pages die with the agent"  # type: ignore[attr-defined]
    e = Engine(k, a, settings())
    assert e.tick(0.0, can_report=True)[0] is None and a.held == []
    assert e.phase is Phase.DISABLED and "THP arena" in e.last_reason
    e.apply({"allow_weak_arena": True})
    assert e.tick(1.0, can_report=True)[0]


def test_stats_only_and_disabled_never_fill() -> None:
    k = ScriptedKernel(free_blocks=64)
    a = ScriptedArena(k)
    e = Engine(k, a, settings(), stats_only="the guest kernel reports free pages itself")
    assert run(e, 10) == [] and e.phase is Phase.DISABLED and "kernel" in e.last_reason
    e = Engine(k, a, settings(enabled=False))
    assert run(e, 10) == [] and a.held == []


def test_rate_cap_spreads_reports_over_time() -> None:
    k = ScriptedKernel(free_blocks=64)
    e = Engine(k, ScriptedArena(k), settings(max_rate_mib_s=8, capacity=4, delay_ms=100))
    reports = run(e, 30)   # ~3 s of simulated time at >= 100 ms per tick
    sent = sum(n for r in reports for _, n in r)
    assert 0 < sent <= 8 * MiB * 4


def test_granule_ranges_keep_only_whole_aligned_granules() -> None:
    blocks = [Block(512 * i, 512, 0) for i in (1, 2, 3, 4, 9)]
    ranges, covered = granule_ranges(blocks, 4 * MiB)
    assert ranges == [(4 * MiB, 4 * MiB)]
    assert covered == {1024, 1536}
    ranges, covered = granule_ranges(blocks, 2 * MiB)
    assert ranges == [(2 * MiB, 8 * MiB), (18 * MiB, 2 * MiB)] and len(covered) == 5


def test_a_failing_fill_backs_off_with_the_reason() -> None:
    from aerate.agent.arena import ArenaError

    k = ScriptedKernel(free_blocks=64)
    a = ScriptedArena(k)

    def refuse(n: int) -> List[Block]:
        raise ArenaError("the persistent 2 MiB hugepage pool has 3 free pages")

    a.fill = refuse  # type: ignore[method-assign]
    e = Engine(k, a, settings())
    ranges, wait = e.tick(0.0, True)
    assert ranges is None and wait >= 5.0 and e.phase is Phase.BACKOFF
    assert "hugepage pool" in e.last_reason


def test_a_pass_ends_even_when_the_kernel_keeps_adding_free_memory() -> None:
    """Deferred page init / hotplug: free memory grows as the agent takes it. A pass takes
    what was free when it began, then ends and gives everything back."""
    k = ScriptedKernel(free_blocks=32)
    a = ScriptedArena(k)
    real_fill = a.fill
    grown = [0]

    def fill_and_grow(n: int) -> List[Block]:
        out = real_fill(n)
        k.free_list[:0] = [BLOCK_PAGES * (5000 + grown[0] + i) for i in range(len(out))]
        grown[0] += len(out)
        return out

    a.fill = fill_and_grow  # type: ignore[method-assign]
    e = Engine(k, a, settings())
    for _ in range(300):
        run(e, 1)
        if e.counters["passes"]:
            break
    # The first pass ended by itself, having taken about what was free at its start.
    assert e.counters["passes"] == 1
    assert 32 * 2 * MiB <= e.counters["reported_bytes"] <= 40 * 2 * MiB
    assert e.held_acked == [] and "began" in e.last_reason


def test_a_pass_digs_past_aerated_blocks_to_the_raw_ones() -> None:
    """Issue 15's loop. The buddy allocator hands out blocks it has in its order-9 lists
    before it splits larger ones, so the aerated blocks a pass returned (their buddies still
    in use) come first, and blocks the guest freed since (merged into larger blocks) come
    later. Raw units counted aerated blocks as if they were raw: a pass took as many
    blocks as there were raw units, got only aerated ones, returned them, found the same raw
    count and began again, forever, never reaching the raw memory."""
    k = ScriptedKernel(free_blocks=32)
    a = ScriptedArena(k)
    e = Engine(k, a, settings(hwm=4))
    run(e, 200)
    assert e.aerated_bytes() == 32 * 2 * MiB
    raw = [BLOCK_PAGES * (900 + i) for i in range(8)]
    k.free_list[:0] = raw          # freed by the guest, behind the aerated blocks
    before = dict(e.counters)
    reported = blocks_of(run(e, 400))
    assert {p * 4096 for p in raw} <= set(reported)       # the raw memory was reached...
    assert e.counters["passes_started"] - before["passes_started"] == 1   # ...in one pass
    assert e.counters["refilled_aerated"] - before["refilled_aerated"] <= 32
    assert e.aerated_bytes() == 40 * 2 * MiB and a.held == [] and e.raw_units() == 0


def flap(e: Engine, k: ScriptedKernel, seconds: float, blocks: int = 8,
         reasons: Optional[set] = None) -> List[float]:
    """A guest that frees ``blocks`` blocks and takes as many again on alternate ticks (its
    free memory flaps as fast as the agent polls), taking the oldest free blocks first;
    the host acks every batch at once. Returns the times passes began."""
    began, now, batch, freed = [], 0.0, 0, False
    fresh = iter(range(10_000, 1_000_000))
    while now < seconds:
        if freed:
            del k.free_list[:blocks]
        else:
            k.free_list.extend(BLOCK_PAGES * next(fresh) for _ in range(blocks))
        freed = not freed
        n = e.counters["passes_started"]
        ranges, wait = e.tick(now, True)
        if reasons is not None:
            reasons.add(e.last_reason.split(";")[0])
        if e.counters["passes_started"] > n:
            began.append(now)
        if ranges:
            batch += 1
            e.reported(batch)
            e.on_release(batch, discarded=sum(n for _, n in ranges))
        now += max(wait, 0.05)
    return began


def test_free_memory_that_flaps_every_tick_backs_passes_off_and_says_so() -> None:
    k = ScriptedKernel(free_blocks=64)
    e = Engine(k, ScriptedArena(k), settings(hwm=4, capacity=16))
    reasons: set = set()
    began = flap(e, k, 120.0, reasons=reasons)
    # Without the back-off a pass began every other tick or so: 34 of them after 30 s.
    late = [t for t in began if t >= 30.0]
    assert len(late) <= 90.0 / CHURN_GAP_MAX_S + 2, began
    assert e.counters["churn_backoffs"] >= 1
    assert any(r.startswith("churn: ") and "back to back" in r for r in reasons), reasons
    # Once the flapping stops, new free memory is reported within the longest gap plus a
    # pass, and the streak is over: the pass after a quiet spell begins at once.
    now = 200.0
    k.free_list.extend(BLOCK_PAGES * (2_000_000 + i) for i in range(8))
    reported = []
    while now < 200.0 + CHURN_GAP_MAX_S + 3 and not reported:
        ranges, wait = e.tick(now, True)
        if ranges:
            reported = ranges
        now += max(wait, 0.05)
    assert reported


# ----------------------------------------------------------------- probes (issue 15)

#: When the probe tests look, on the cycle's clock (after the passes ``run`` drove).
T = 1000.0


def aerated_engine(free_blocks: int, steps: int = 100,
                   **kw: int) -> Tuple[ScriptedKernel, Engine]:
    """A kernel whose free blocks are not adjacent (each is its own probe range), and an
    engine that aerated them all and is idle at ``T``."""
    k = ScriptedKernel(0)
    k.free_list = [BLOCK_PAGES * (100 + 2 * i) for i in range(free_blocks)]
    e = Engine(k, ScriptedArena(k), settings(**kw))
    run(e, steps)
    assert len(e.aerated) == free_blocks
    assert e.tick(T, True)[0] is None and e.phase is Phase.IDLE
    return k, e


def probe(e: Engine, pid: int, now: float) -> List[Tuple[int, int]]:
    """Ask the engine for a probe at ``now`` and send it as ``pid``."""
    ranges = e.probe_request(now, 2 * MiB)
    assert ranges
    e.probe_sent(pid, now)
    return ranges


def test_aerated_blocks_the_host_backs_become_raw_and_a_pass_takes_them() -> None:
    k, e = aerated_engine(16, hwm=4)
    # The churn of issue 15: 8 aerated blocks allocated, written and freed again between
    # two looks. Their buddy flags say free: the engine cannot see it by itself.
    churned = [k.free_list.pop() for _ in range(8)]
    k.free_list.extend(churned)
    assert e.raw_units(T) == 0
    assert len(probe(e, 1, T)) == 16
    assert e.probe_request(T + 1, 2 * MiB) is None  # at most every PROBE_EVERY
    backed = [(pfn * 4096, 2 * MiB) for pfn in churned]
    assert e.on_probed(1, backed) == 8
    assert e.counters["probe_stale_blocks"] == 8 and e.aerated_bytes() == 8 * 2 * MiB
    assert "host backs 8 blocks" in e.last_reason
    assert e.on_probed(1, backed) == 0              # answered once
    # The next pass takes them (and nothing else).
    reports = run(e, 50, start=T)
    assert sorted(blocks_of(reports)) == sorted(p * 4096 for p in churned)
    assert e.aerated_bytes() == 16 * 2 * MiB


def test_unknown_answers_change_nothing_and_back_probing_off() -> None:
    _, e = aerated_engine(8, hwm=4)
    before = dict(e.aerated)
    probe(e, 1, T)
    assert e.on_probed(1, None, "rate") == 0 and e.aerated == before
    t = T + PROBE_EVERY
    e.tick(t, True)
    assert e.probe_request(t, 2 * MiB) is None       # "rate": the wait doubled
    t += PROBE_EVERY
    e.tick(t, True)
    probe(e, 2, t)
    assert e.on_probed(2, None, "block 'pc.ram' is on hugetlbfs") == 0
    assert e.aerated == before and "hugetlbfs" in e.probe_off
    assert e.counters["probes_unknown"] == 2
    t += 1000
    e.tick(t, True)
    assert e.probe_request(t, 2 * MiB) is None       # off for this session
    e.on_session()
    assert e.probe_request(t, 2 * MiB)               # a new host may tell


def test_probes_go_oldest_first_at_most_max_ranges_and_only_while_idle() -> None:
    k, e = aerated_engine(PROBE_MAX_RANGES + 100, steps=400, hwm=4, capacity=1024)
    first = probe(e, 1, T)
    assert len(first) == PROBE_MAX_RANGES
    e.on_probed(1, [])
    t = T + PROBE_EVERY
    e.tick(t, True)
    second = probe(e, 2, t)
    # The 100 never probed come first, then the oldest probed of the first round.
    assert len(second) == PROBE_MAX_RANGES and len(set(second) - set(first)) == 100
    # A pass under way (or anything held or in flight): no probe.
    k.free_list.extend(BLOCK_PAGES * (20000 + 2 * i) for i in range(8))
    t += 1000
    out, _ = e.tick(t, True)
    assert out and e.probe_request(t, 2 * MiB) is None


def test_an_answer_about_a_block_aerated_again_since_the_probe_is_ignored() -> None:
    k, e = aerated_engine(8, hwm=1)
    probe(e, 1, T)
    x = k.free_list.pop()                    # the guest takes block x...
    e.raw_units()                            # ...the engine sees it (re-validation)
    k.free_list.append(x)                    # ...frees it, a pass aerates it again
    run(e, 50)
    assert x in e.aerated
    # The host's answer was true when it looked, before x was discarded again.
    assert e.on_probed(1, [(x * 4096, 2 * MiB)]) == 0 and x in e.aerated


def test_adjacent_aerated_blocks_are_asked_one_granule_each() -> None:
    """A run of adjacent blocks is asked granule by granule, so one backed granule turns
    only its own block raw, not the whole run (one range for the run would)."""
    k = ScriptedKernel(0)
    k.free_list = [BLOCK_PAGES * (100 + i) for i in range(8)]   # one adjacent run
    e = Engine(k, ScriptedArena(k), settings(hwm=4))
    run(e, 100)
    assert len(e.aerated) == 8
    assert e.tick(T, True)[0] is None and e.phase is Phase.IDLE
    ranges = probe(e, 1, T)
    assert ranges == [(BLOCK_PAGES * (100 + i) * 4096, 2 * MiB) for i in range(8)]
    assert e.on_probed(1, [ranges[3]]) == 1
    assert BLOCK_PAGES * 103 not in e.aerated and len(e.aerated) == 7


def test_an_unknown_the_host_may_answer_later_backs_off_instead_of_stopping() -> None:
    """Review finding: any unknown but "rate" stopped probing for the whole session, also
    a transient one (a map being rebuilt, a failed open). One marked retry backs off."""
    _, e = aerated_engine(8, hwm=4)
    probe(e, 1, T)
    assert e.on_probed(1, None, "no memory map yet", retry=True) == 0
    assert e.probe_off == ""
    t = T + PROBE_EVERY
    e.tick(t, True)
    assert e.probe_request(t, 2 * MiB) is None       # the wait doubled
    t += PROBE_EVERY
    e.tick(t, True)
    assert probe(e, 2, t)


def test_beliefs_dropped_by_revalidation_leave_no_probe_bookkeeping_behind() -> None:
    """Review finding: the per-block probe record was pruned only inside probe_request, so
    an agent that never probes (protocol 2, probing off) kept one for every block it ever
    aerated. It goes with the belief."""
    k, e = aerated_engine(8, hwm=4)
    assert set(e._aerated_meta) == set(e.aerated)
    taken = [k.free_list.pop() for _ in range(5)]
    e.raw_units(T + REVALIDATE_MAX_AGE + 1)        # re-validation sees them taken
    assert not set(taken) & set(e.aerated)
    assert set(e._aerated_meta) == set(e.aerated)
