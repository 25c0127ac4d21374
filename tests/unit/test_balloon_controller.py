"""The balloon controller (host/balloon.py): one test per rule, and hostile statistics.

Byte figures are what a 2 GiB guest reports (agent/kernelview.py ProcKernel.stats).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aerate.agent import settings as table
from aerate.host.balloon import (
    COOLDOWN_CAP_S,
    FLAP_BACKOFF_CAP_S,
    FLAP_BACKOFF_S,
    FLAP_QUICK_S,
    FLAP_REVERSALS,
    FLAP_WINDOW_S,
    LOOKAHEAD_S,
    MIN_STEP,
    STEP_HORIZON_S,
    BalloonSettings,
    Flaps,
    GuestStats,
    MiB,
    Step,
    flap_hold,
    floor_bytes,
    free_rate,
    next_target,
    parse_stats,
    step_for,
)

pytestmark = pytest.mark.unit

MAX = 2048 * MiB
S = BalloonSettings(reserve=256 * MiB, psi_threshold=10.0, floor_fraction=0.25,
                    stats_interval_s=5.0)
WM = 12 * MiB


def stats(free_mib: float, psi: float | None = 0.0, age: float = 1.0) -> GuestStats:
    return GuestStats(int(free_mib * MiB), WM, psi, age)


def step(st_: GuestStats | None, actual: int = MAX, target: int | None = None,
         **kw: Any) -> Step:
    return next_target(st_, "no statistics", actual, target, MAX, S, **kw)


def test_settings_come_from_the_table() -> None:
    s = BalloonSettings.from_settings(table.defaults())
    assert s.reserve == 256 * MiB and s.psi_threshold == 10.0
    assert s.floor_fraction == 0.5 and s.stats_interval_s == 5.0


def test_inflates_by_the_surplus_beyond_watermark_and_reserve_in_bounded_steps() -> None:
    r = step(stats(1500))
    assert r.target == MAX - S.step and not r.deflate and "inflating" in r.reason
    # A small surplus is taken whole, never more: free stays >= watermark + reserve.
    r = step(stats(400))
    surplus = 400 * MiB - WM - S.reserve
    assert r.target == MAX - surplus


def test_no_inflation_within_the_hysteresis_band() -> None:
    free = (WM + S.reserve + S.hysteresis) // MiB - 1
    r = step(stats(free))
    assert r.target == MAX and not r.deflate
    # Between reserve/2 and reserve + hysteresis a ballooned guest is left where it is.
    r = step(stats(200), actual=1024 * MiB, target=1024 * MiB)
    assert r.target == 1024 * MiB and not r.deflate


def test_never_below_the_floor() -> None:
    # Used memory + watermark + reserve is the floor, whatever the step allows.
    big = replace(S, step=MAX)
    r = next_target(stats(700), "", 1000 * MiB, None, MAX, big)
    used = 300 * MiB
    assert r.target == used + WM + S.reserve
    # And never below floor x maximum, even for a guest with nothing used.
    r = step(stats(600), actual=600 * MiB, target=600 * MiB)
    assert r.target == floor_bytes(MAX, S) == 512 * MiB
    r = step(stats(600), actual=512 * MiB, target=512 * MiB)
    assert r.target == 512 * MiB and "floor" in r.reason


def test_waits_until_the_last_target_is_reached() -> None:
    r = step(stats(1500), actual=MAX, target=MAX - S.step)
    assert r.target == MAX - S.step and "moving" in r.reason


def test_deflates_fully_at_once_when_free_falls_under_half_the_reserve() -> None:
    r = step(stats(100), actual=700 * MiB, target=700 * MiB)
    assert r.target == MAX and r.deflate and "short of memory" in r.reason


def test_deflates_fully_on_pressure() -> None:
    r = step(stats(900, psi=25.0), actual=1000 * MiB, target=1000 * MiB)
    assert r.target == MAX and r.deflate and "PSI" in r.reason
    # Above half the threshold: no deflate, but no inflation either.
    r = step(stats(900, psi=6.0), actual=1000 * MiB, target=1000 * MiB)
    assert r.target == 1000 * MiB and not r.deflate


def test_inflation_waits_for_statistics_taken_after_the_balloon_settled() -> None:
    # Statistics older than the balloon's arrival at its target still count the pages it
    # took as free: inflating on them would take those pages twice.
    r = step(stats(1500, age=2.0), actual=1536 * MiB, target=1536 * MiB, settled_s=1.0)
    assert r.target == 1536 * MiB and "taken after" in r.reason
    r = step(stats(1500, age=2.0), actual=1536 * MiB, target=1536 * MiB, settled_s=None)
    assert r.target == 1536 * MiB
    r = step(stats(1500, age=0.5), actual=1536 * MiB, target=1536 * MiB, settled_s=1.0)
    assert r.target == 1536 * MiB - S.step
    # Deflating never waits for fresh statistics.
    r = step(stats(50, age=2.0), actual=1536 * MiB, target=1536 * MiB, settled_s=None)
    assert r.target == MAX and r.deflate


def test_cooldown_after_a_deflate() -> None:
    r = step(stats(1500), since_deflate_s=0.5 * COOLDOWN_CAP_S)
    assert r.target == MAX and "ago" in r.reason
    r = step(stats(1500), since_deflate_s=COOLDOWN_CAP_S + 0.1)
    assert r.target < MAX
    # A short statistics interval shortens it further; a long one never lengthens it.
    quick = replace(S, stats_interval_s=1.0)
    assert next_target(stats(1500), "", MAX, None, MAX, quick, since_deflate_s=3.1).target < MAX


def test_stale_or_missing_statistics_never_inflate() -> None:
    assert step(None).target == MAX
    stale = stats(1500, age=3 * S.stats_interval_s + 1)
    assert step(stale).target == MAX
    assert not step(stale).deflate  # at full memory already: nothing to do


def test_silent_guest_while_ballooned_gets_full_memory_back() -> None:
    stale = stats(1500, age=3 * S.stats_interval_s + 1)
    r = step(stale, actual=700 * MiB, target=700 * MiB)
    assert r.target == MAX and r.deflate and "silent" in r.reason
    r = step(None, actual=700 * MiB, target=700 * MiB)
    assert r.target == MAX and r.deflate


def test_not_allowed_deflates_to_full() -> None:
    r = step(stats(1500), actual=700 * MiB, target=700 * MiB, allowed=False,
             why_not="a migration-out job is running")
    assert r.target == MAX and r.deflate and "migration" in r.reason
    assert step(stats(1500), allowed=False, why_not="off").target == MAX


def test_a_floor_raised_by_the_operator_is_applied() -> None:
    r = step(stats(300), actual=300 * MiB, target=300 * MiB)
    assert r.target == floor_bytes(MAX, S)


def test_no_oscillation_over_a_steady_guest() -> None:
    """A guest using 600 MiB steadily: the balloon goes down and stays there."""
    used, actual, target, t, last_deflate = 600 * MiB, MAX, None, 0.0, -math.inf
    targets = []
    for _ in range(40):
        s_ = GuestStats(actual - used, WM, 0.0, 1.0)
        r = next_target(s_, "", actual, target, MAX, S, t - last_deflate)
        if r.deflate:
            last_deflate = t
        target = actual = r.target  # the guest follows at once
        targets.append(r.target)
        t += S.stats_interval_s
    assert targets[-1] == used + WM + S.reserve
    assert targets == sorted(targets, reverse=True)  # only ever down, never back up


def test_statistics_with_the_guests_balloon_size_say_themselves_when_they_were_taken(
        ) -> None:
    # The guest's own balloon count (its /proc/vmstat) in the statistics: figures taken
    # with the balloon at the target count at once, whenever the host saw it arrive; ones
    # taken while it still moved never inflate, however recent.
    at = 1536 * MiB
    fresh = replace(stats(1500, age=2.0), balloon=MAX - at)
    r = step(fresh, actual=at, target=at, settled_s=None)
    assert r.target == at - S.step and "inflating" in r.reason
    moving = replace(stats(1500, age=0.1), balloon=MAX - at - 200 * MiB)
    r = step(moving, actual=at, target=at, settled_s=10.0)
    assert r.target == at and "taken after" in r.reason
    got, why = parse_stats({"mem_free": 1 << 30, "watermark_high_bytes": WM,
                            "balloon_bytes": 512 * MiB}, 0.5, MAX)
    assert got is not None and got.balloon == 512 * MiB and why == ""


def test_steps_follow_the_guest_drivers_measured_speed() -> None:
    assert step_for(None) == MIN_STEP and step_for(0.0) == MIN_STEP
    assert step_for(float("nan")) == MIN_STEP and step_for(-5.0) == MIN_STEP
    assert step_for(10 * MiB) == MIN_STEP  # a slow driver: the least step
    fast = step_for(300 * MiB)
    assert fast == int(300 * STEP_HORIZON_S) * MiB and fast % MiB == 0
    assert step_for(1e30) == 16 << 30  # whatever rate a guest fakes
    # A fast driver gets the whole surplus in one step, never more than the surplus.
    big = replace(S, step=step_for(400 * MiB))
    surplus = 1500 * MiB - WM - S.reserve
    assert big.step > surplus
    r = next_target(stats(1500), "", MAX, None, MAX, big)
    assert r.target == -(-(MAX - surplus) // MiB) * MiB


def test_a_guest_whose_free_memory_falls_fast_gets_it_back_before_it_runs_out() -> None:
    at = 1024 * MiB
    # 600 MiB free, well above reserve/2; falling at 300 MiB/s it passes under the reserve
    # within LOOKAHEAD_S: deflate now, not when the allocations already stall.
    rate = -300.0 * MiB
    assert 600 * MiB + rate * LOOKAHEAD_S < S.reserve
    r = step(stats(600), actual=at, target=at, free_rate=rate)
    assert r.target == MAX and r.deflate and "falling" in r.reason
    # A slow fall, a rise, or garbage is no reason.
    for calm in (-10.0 * MiB, 50.0 * MiB, float("nan"), float("-inf")):
        assert not step(stats(600), actual=at, target=at, free_rate=calm).deflate


def test_the_demand_rate_discounts_what_the_balloon_itself_took() -> None:
    before = {"mem_free": 1500 * MiB, "balloon_bytes": 0}
    # The balloon inflated by 500 MiB in a second: MemFree fell by as much, no demand.
    assert free_rate(before, 0.0, {"mem_free": 1000 * MiB, "balloon_bytes": 500 * MiB},
                     1.0) == 0.0
    # The workload took 400 MiB in half a second.
    assert free_rate(before, 0.0, {"mem_free": 1100 * MiB, "balloon_bytes": 0}, 0.5) \
        == -800.0 * MiB
    # Without the balloon's size, or too close together, or garbage: no rate at all.
    assert free_rate({"mem_free": 1}, 0.0, {"mem_free": 0}, 1.0) == 0.0
    assert free_rate(before, 0.0, dict(before, mem_free=0), 0.05) == 0.0
    assert free_rate(None, 0.0, before, 1.0) == 0.0
    assert free_rate(before, 0.0, dict(before, mem_free=True), 1.0) == 0.0


def trace(workload_free: Any, until: float, every: float = 0.5, flaps_hold: bool = True
          ) -> list[tuple[float, int, Step]]:
    """Drive the controller as the daemon does (host/daemon.py balloon_tick), one decision
    per statistics message every ``every`` s: ``workload_free(t)`` is what the guest's
    workload leaves free (MiB) at t, of which the balloon holds its share; the balloon
    arrives at once; ``flaps_hold`` False: the controller is told of no reversals, as before
    it had them. (t, balloon size, step) per message."""
    actual, target, last_deflate, flaps = MAX, None, -math.inf, Flaps()
    before: dict[str, int] | None = None
    out = []
    t = 0.0
    while t < until:
        held = MAX - actual
        raw = {"mem_free": max(0, int(workload_free(t) * MiB) - held),
               "watermark_high_bytes": WM, "psi_some_avg10": 0.0, "balloon_bytes": held}
        st_, why = parse_stats(raw, 0.0, MAX)
        rate = free_rate(before, t - every, raw, t) if before is not None else 0.0
        r = next_target(st_, why, actual, target, MAX, S, t - last_deflate,
                        free_rate=rate, reversals=flaps.ages(t) if flaps_hold else ())
        if r.target != (target if target is not None else actual):
            flaps.moved(t, r.deflate)
            if r.deflate:
                last_deflate = t
            target = actual = r.target
        out.append((t, actual, r))
        before = raw
        t += every
    return out


def test_statistics_flapping_every_event_stop_inflating_the_balloon() -> None:
    """Free memory 1500/300 MiB every 0.5 s: each 300 deflates at once (free falling fast),
    each 1500 would inflate again after the cooldown, forever. After FLAP_REVERSALS such
    reversals the controller holds instead, says why, and holds longer every time."""
    def inflates(tr: list[tuple[float, int, Step]]) -> list[float]:
        sizes = [MAX] + [size for _, size, _ in tr]
        return [t for (t, size, _), before in zip(tr, sizes) if size < before]

    def swings(t: float) -> float:
        return 1500 if int(t / 0.5) % 2 == 0 else 300

    # Without the hold: an inflate every 5 s (the cooldown after each deflate), 180 of them.
    assert len(inflates(trace(swings, 900, flaps_hold=False))) == 180
    flapping = trace(swings, 900)
    inflates = inflates(flapping)
    # With it: 31, 61, 121, 241 s apart, then FLAP_BACKOFF_CAP_S (and a second) apart.
    assert len(inflates) <= 8, inflates
    first_hold = next(t for t, _, r in flapping if "flapping" in r.reason)
    assert len([t for t in inflates if t < first_hold]) == FLAP_REVERSALS
    gaps = [b - a for a, b in zip(inflates[FLAP_REVERSALS - 1:], inflates[FLAP_REVERSALS:])]
    assert gaps == sorted(gaps) and gaps[0] >= FLAP_BACKOFF_S, gaps  # the backoff grows
    assert FLAP_BACKOFF_CAP_S <= gaps[-1] <= FLAP_BACKOFF_CAP_S + 1, gaps
    # Status says so throughout the hold, on the swings down (the balloon already at full
    # memory) as on the swings up.
    during = [r for t, _, r in flapping if first_hold <= t < first_hold + FLAP_BACKOFF_S - 1]
    assert len(during) > 50 and all("balloon flapping" in r.reason and "another" in r.reason
                                    and not r.deflate for r in during), during[:2]
    # Flapping or not, the swing down after each inflate deflated at the next message.
    for (_, size, _), (_, _, nxt) in zip(flapping, flapping[1:]):
        if size < MAX:
            assert nxt.deflate and nxt.target == MAX, nxt


def test_a_flapping_guest_still_gets_its_memory_back_at_once_and_inflation_resumes(
        ) -> None:
    at = 1024 * MiB
    ages = (5.0, 40.0)   # two reversals within the window: flapping
    wait, n = flap_hold(ages)
    assert n == FLAP_REVERSALS and wait == FLAP_BACKOFF_S - 5.0
    r = step(stats(1500), actual=at, target=at, reversals=ages)
    assert r.target == at and not r.deflate and "flapping" in r.reason
    # Demand: deflate at once, whatever the hold.
    r = step(stats(100), actual=at, target=at, reversals=ages)
    assert r.target == MAX and r.deflate
    r = step(stats(600), actual=at, target=at, reversals=ages, free_rate=-300.0 * MiB)
    assert r.target == MAX and r.deflate
    # The hold runs out; reversals out of the window are forgotten.
    assert step(stats(1500), actual=at, target=at, reversals=(31.0, 66.0)).target < at
    assert flap_hold((1.0, FLAP_WINDOW_S + 1)) == (0.0, 1)
    assert flap_hold((1.0, float("nan"), -3.0)) == (0.0, 1)
    assert flap_hold(()) == (0.0, 0)
    # A hold under way is fixed at its reversal: older ones ageing out do not shorten it.
    assert flap_hold((10.0, 20.0, 30.0, FLAP_WINDOW_S))[0] == 4 * FLAP_BACKOFF_S - 10.0
    # Each further reversal doubles the hold, up to the cap.
    assert flap_hold((1.0, 2.0, 3.0))[0] == 2 * FLAP_BACKOFF_S - 1.0
    assert flap_hold(tuple(float(i) for i in range(1, 20)))[0] == FLAP_BACKOFF_CAP_S - 1.0
    # Flapping that stopped: after the hold, the balloon goes down and stays there.
    after = trace(lambda t: 1500 if t > 20 or int(t / 0.5) % 2 == 0 else 300, 300)
    sizes = [size for t, size, _ in after if t > 20]
    assert sizes[-1] < MAX and sizes == sorted(sizes, reverse=True), sizes[::20]


def test_flaps_counts_only_a_deflate_right_after_an_inflate() -> None:
    f = Flaps()
    f.moved(0.0, True)      # a deflate with no inflate before it: no reversal
    assert f.ages(1.0) == ()
    f.moved(1.0, False)
    f.moved(2.0, False)     # inflating on: none
    f.moved(3.0, True)      # the reversal
    f.moved(4.0, True)      # deflating again: still one
    assert f.ages(5.0) == (2.0,)
    f.moved(6.0, False)
    f.moved(7.0, True)
    assert f.ages(8.0) == (1.0, 5.0)
    assert f.ages(7.0 + FLAP_WINDOW_S + FLAP_BACKOFF_CAP_S + 1) == ()
    # A deflate long after the inflation it undoes is the balloon doing its job.
    g = Flaps()
    g.moved(10.0, False)
    g.moved(10.0 + FLAP_QUICK_S, True)
    assert g.ages(40.0) == ()


def test_a_workload_that_frees_and_allocates_again_minutes_later_is_not_flapping() -> None:
    """A job every two minutes (1500 MiB free for a minute, then 300): each cycle the
    balloon inflates and deflates once; no hold, every cycle inflates again."""
    cycles = trace(lambda t: 1500 if int(t / 60) % 2 == 0 else 300, 900)
    assert not any("flapping" in r.reason for _, _, r in cycles)
    sizes = [MAX] + [size for _, size, _ in cycles]
    starts = [t for (t, size, _), before in zip(cycles, sizes)
              if size < before and before == MAX]
    assert len(starts) == 8, starts   # one inflation run per free minute, 8 of them in 900 s


def test_parse_stats_takes_a_real_message() -> None:
    raw = {"type": "stats", "mem_total": 2_071_000_000, "mem_free": 1_500_000_000,
           "watermark_low_bytes": 9_000_000, "watermark_high_bytes": 12_000_000,
           "psi_some_avg10": 0.0, "free_by_order": {}, "engine": {"phase": "disabled"}}
    got, why = parse_stats(raw, 2.0, MAX)
    assert got == GuestStats(1_500_000_000, 12_000_000, 0.0, 2.0) and why == ""
    no_psi = dict(raw)
    del no_psi["psi_some_avg10"]
    got, _ = parse_stats(no_psi, 2.0, MAX)
    assert got is not None and got.psi_some_avg10 is None


@pytest.mark.parametrize("bad", [
    None, [], "stats", {}, {"mem_free": "1500000000", "watermark_high_bytes": 1},
    {"mem_free": True, "watermark_high_bytes": 1},
    {"mem_free": -1, "watermark_high_bytes": 1},
    {"mem_free": 1.5e9, "watermark_high_bytes": 1},
    {"mem_free": MAX + 1, "watermark_high_bytes": 1},
    {"mem_free": 10**30, "watermark_high_bytes": 1},
    {"mem_free": 1 << 30, "watermark_high_bytes": None},
    {"mem_free": 1 << 30, "watermark_high_bytes": 1, "psi_some_avg10": float("nan")},
    {"mem_free": 1 << 30, "watermark_high_bytes": 1, "psi_some_avg10": -3},
    {"mem_free": 1 << 30, "watermark_high_bytes": 1, "psi_some_avg10": "high"},
    {"mem_free": 1 << 30, "watermark_high_bytes": 1, "balloon_bytes": MAX + 1},
    {"mem_free": 1 << 30, "watermark_high_bytes": 1, "balloon_bytes": -4096},
    {"mem_free": 1 << 30, "watermark_high_bytes": 1, "balloon_bytes": "0"},
])
def test_garbage_statistics_are_rejected_and_never_inflate(bad: Any) -> None:
    got, why = parse_stats(bad, 1.0, MAX)
    assert got is None and why
    r = next_target(got, why, MAX, None, MAX, S)
    assert r.target == MAX and not r.deflate
    r = next_target(got, why, 800 * MiB, 800 * MiB, MAX, S)
    assert r.target == MAX and r.deflate  # a ballooned guest that talks garbage gets it all


_ints = st.one_of(st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True), st.booleans(),
                  st.none(), st.text(max_size=5))


@given(free=_ints, high=_ints, psi=_ints, age=st.floats(allow_nan=True),
       actual=st.integers(-(1 << 40), 1 << 40),
       target=st.one_of(st.none(), st.integers(-(1 << 40), 1 << 40)),
       since=st.floats(allow_nan=False))
def test_hostile_guest_never_moves_the_balloon_out_of_bounds(
        free: Any, high: Any, psi: Any, age: float, actual: int, target: int | None,
        since: float) -> None:
    """Whatever a guest says, its balloon stays within [floor x maximum, maximum]."""
    raw = {"mem_free": free, "watermark_high_bytes": high, "psi_some_avg10": psi}
    got, why = parse_stats(raw, age, MAX)
    r = next_target(got, why, actual, target, MAX, S, since)
    assert floor_bytes(MAX, S) <= r.target <= MAX
    assert r.target % MiB == 0 or r.target in (MAX, target)
