"""The balloon controller: the next virtio-balloon target of one VM with private RAM.

Pure: the guest's last statistics (hostile input, validated here), the balloon's actual
size, the VM's maximum memory and the settings come in; a target and the reason go out.
The daemon reads and sets the balloon through libvirt and calls :func:`next_target` on
every statistics message and on a timer.

Policy (DESIGN "Reclaim on the host", balloon):
- inflate (shrink the guest) only by free memory beyond the zone high watermarks +
  ``reserve``, at most ``step`` per decision, only once the last target was reached, on
  statistics taken after that (the guest's own balloon count in them says so; without
  it, statistics received after the host saw the balloon arrive), and not soon after a
  deflate, nor while the balloon flaps (see Flapping); never below the floor (the
  largest of ``floor`` x maximum, the domain's ``<memtune><min_guarantee>`` and the guest's
  used memory + watermarks + reserve);
- deflate to full memory at once when free memory falls under ``reserve``/2, or falls so
  fast (between the last two statistics) that it would pass under ``reserve`` within
  ``LOOKAHEAD_S``, when PSI exceeds
  ``psi_threshold``, the statistics are missing, malformed or older than 3 intervals,
  or reclaim is not allowed now;
- between those (free in [reserve/2, reserve + hysteresis]) hold: no oscillation.
Whatever the guest says, the target stays within [max(floor x maximum, min_guarantee),
maximum].

Pace. The guest agent sends statistics when its free memory moves (agent/service.py
StatsTrigger), so each step starts as soon as the guest's balloon driver finished the last
one, and a guest that allocates again is deflated within one such message. Steps are sized
by :func:`step_for` from how fast this guest's driver inflated last time: what it moves in
``STEP_HORIZON_S``, at least ``MIN_STEP``. A large step is no bet on the future: it never
takes more than the surplus the latest statistics show, and while the balloon moves the
pressure checks still come first, so a guest that needs its memory back gets it at once.

Flapping. Each rule above holds for one message, so statistics that swing every event
(free memory 1500 MiB, then 300, then 1500 again: a hostile agent, or a workload that
allocates and frees in a loop) would inflate, deflate at once, wait out the cooldown and
inflate again, forever: every cycle costs the guest a stall and the host nothing it keeps.
:class:`Flaps` remembers when the balloon reversed (a deflate right after an inflate,
within ``FLAP_QUICK_S`` of it: a guest that gave memory back and wanted it again a minute
later used the balloon as it is meant to be used, however often it does so);
``FLAP_REVERSALS`` of them within ``FLAP_WINDOW_S`` mean flapping, and the controller then
holds instead of inflating after the newest for a backoff that doubles with every further
reversal in the window (``FLAP_BACKOFF_S`` up to ``FLAP_BACKOFF_CAP_S``), saying so in its
reason (also in those of the swings down that find the balloon at full memory already). Only
inflation waits: the deflate rules come before it, so a flapping guest that needs its
memory gets it back at once, and a deflate is the only move that counts as a reversal, so
no statistics can make the hold shorter. Once the swings stop, no reversal is added and
the hold runs out: inflation resumes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20
STALE_INTERVALS = 3.0
#: A guest whose free memory falls at a rate that would take it under the reserve within
#: this many seconds gets its memory back now, before its allocations stall on the balloon.
LOOKAHEAD_S = 2.0
#: The longest pause before inflating again after a deflate, whatever the statistics
#: interval: the guest's statistics follow its free memory (agent/service.py StatsTrigger)
#: and a renewed demand deflates at once, so a longer pause only delays taking back a burst
#: that already ended (bench_reclaim --smoke: a 256 MiB burst waited 15 s for it).
COOLDOWN_CAP_S = 4.0
#: The first inflation step, and the least of any later one.
MIN_STEP = 256 * MiB
#: Later steps: what the guest's balloon driver moved in this many seconds last time.
STEP_HORIZON_S = 4.0
#: The largest step whatever the measured rate (a bound on a rate a hostile guest could
#: fake by inflating fast once).
MAX_STEP = 16 << 30
#: Reversals (a deflate right after an inflate) within FLAP_WINDOW_S that mean flapping.
#: One is a guest that allocated again after giving memory back, which is what the balloon
#: is for; the second within the window is a pattern.
FLAP_REVERSALS = 2
#: A deflate counts as a reversal only this soon after the inflation it undoes. Statistics
#: that swing every event undo each inflation within seconds; a workload that frees memory
#: and allocates it again later (a job every few minutes) is what the balloon is for, and
#: holding its inflation would only leave that memory with the guest. (A burst within
#: seconds of an inflation still counts: two of those in the window are a pattern; the
#: hold delays only the next inflation, never a deflate.)
FLAP_QUICK_S = 20.0
#: Long enough to hold the reversals that doubled the hold up to its cap, so a guest that
#: keeps flapping stays at the cap instead of dropping back as old reversals age out.
FLAP_WINDOW_S = 1800.0
#: The hold after a reversal once flapping; doubled per further reversal in the window
#: before it, at most the cap.
FLAP_BACKOFF_S = 30.0
FLAP_BACKOFF_CAP_S = 300.0


class Flaps:
    """When the balloon reversed (a deflate right after an inflate): the controller's only
    memory of the past, kept by the daemon per VM. Pure bookkeeping: times come in."""

    def __init__(self) -> None:
        self._inflated_at: float | None = None  # the last move was an inflation, then
        self._reversals: list[float] = []

    def moved(self, now: float, deflate: bool) -> None:
        """The daemon set a new target at ``now`` (``deflate``: it gives memory back)."""
        if deflate and self._inflated_at is not None and now - self._inflated_at < FLAP_QUICK_S:
            self._reversals = [t for t in self._reversals if now - t < _FLAP_MEMORY_S]
            self._reversals.append(now)
        self._inflated_at = None if deflate else now

    def ages(self, now: float) -> tuple[float, ...]:
        """Seconds since each reversal that can still matter, newest first."""
        return tuple(sorted(now - t for t in self._reversals if 0 <= now - t < _FLAP_MEMORY_S))


#: A reversal older than this neither holds nor counts towards a hold that still runs.
_FLAP_MEMORY_S = FLAP_WINDOW_S + FLAP_BACKOFF_CAP_S


def flap_hold(ages: Sequence[float]) -> tuple[float, int]:
    """(seconds inflation still waits, reversals counted) for reversals ``ages`` seconds
    ago: the hold follows the newest one, as long as FLAP_REVERSALS or more (it included)
    lie within FLAP_WINDOW_S before it; 0.0 otherwise. Fixed at that reversal, so old ones
    ageing out never shorten a hold under way."""
    recent = [a for a in ages if math.isfinite(a) and a >= 0]
    if not recent:
        return 0.0, 0
    newest = min(recent)
    counted = sum(1 for a in recent if a - newest < FLAP_WINDOW_S)
    if counted < FLAP_REVERSALS:
        return 0.0, counted
    backoff = min(FLAP_BACKOFF_CAP_S, FLAP_BACKOFF_S * 2.0 ** (counted - FLAP_REVERSALS))
    return max(0.0, backoff - newest), counted


def step_for(rate: float | None) -> int:
    """The inflation step for a guest whose balloon driver last inflated at ``rate``
    bytes/s (None: not measured yet), whole MiB."""
    if rate is None or not math.isfinite(rate) or rate <= 0:
        return MIN_STEP
    return int(min(MAX_STEP, max(MIN_STEP, rate * STEP_HORIZON_S))) // MiB * MiB


def free_rate(before: object, at: float, after: object, now: float) -> float:
    """Bytes/s the guest's workload moved its free memory between two statistics messages
    received at ``at`` and ``now``: MemFree plus what the balloon holds, so the balloon's
    own inflation (which lowers MemFree by what it takes) counts as no demand. 0.0 when
    either message lacks those figures or the two are too close together."""
    if not isinstance(before, dict) or not isinstance(after, dict) or now - at < 0.1:
        return 0.0
    pair = []
    for m in (before, after):
        free, held = m.get("mem_free"), m.get("balloon_bytes")
        if type(free) is not int or type(held) is not int:
            return 0.0
        pair.append(free + held)
    return (pair[1] - pair[0]) / (now - at)


@dataclass(frozen=True)
class BalloonSettings:
    """The controller's knobs, in bytes and seconds."""

    reserve: int
    psi_threshold: float
    floor_fraction: float
    stats_interval_s: float
    step: int = 256 * MiB  # most memory one decision takes from the guest
    hysteresis: int = 64 * MiB  # surplus below this is left alone
    settle: int = 16 * MiB  # actual within this of the target: the balloon arrived
    cooldown_intervals: float = 3.0  # no inflation this many stats intervals after a deflate
    min_guarantee: int = 0  # the domain's <memtune><min_guarantee>: a floor in bytes

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], min_guarantee: int = 0
                      ) -> BalloonSettings:
        """From the effective settings (agent/settings.py TABLE names) and the domain's
        <memtune><min_guarantee> in bytes."""
        return cls(reserve=int(values["reserve_mib"]) * MiB,
                   psi_threshold=float(values["psi_threshold"]),
                   floor_fraction=float(values["floor"]),
                   stats_interval_s=float(values["stats_interval_s"]),
                   min_guarantee=max(0, int(min_guarantee)))


@dataclass(frozen=True)
class GuestStats:
    """The validated figures the controller uses from one guest statistics message."""

    mem_free: int
    watermark_high: int
    psi_some_avg10: float | None  # None: the guest kernel has no PSI
    age_s: float
    balloon: int | None = None  # bytes the guest's balloon held when taken (None: unknown)


@dataclass(frozen=True)
class Step:
    """The controller's answer: the balloon target (bytes of guest memory) and why."""

    target: int
    reason: str
    deflate: bool = False  # the target gives memory back to the guest


def _byte_count(raw: Mapping[str, Any], key: str, limit: int) -> int | None:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > limit:
        return None
    return v


def parse_stats(raw: Any, age_s: float, maximum: int) -> tuple[GuestStats | None, str]:
    """Validate a guest statistics message (untrusted); (None, why) when unusable.

    Byte counts must be integers in [0, maximum]: a guest cannot have more free memory
    than the VM's maximum, so a larger figure is a lie, not a reason to inflate.
    """
    if not isinstance(raw, Mapping):
        return None, "no statistics from the guest agent yet"
    if not isinstance(age_s, (int, float)) or math.isnan(age_s):
        return None, "statistics of unknown age"
    free = _byte_count(raw, "mem_free", maximum)
    high = _byte_count(raw, "watermark_high_bytes", maximum)
    bad = [k for k, v in (("mem_free", free), ("watermark_high_bytes", high)) if v is None]
    if bad:
        return None, f"guest statistics lack a valid {', '.join(bad)}"
    psi_raw = raw.get("psi_some_avg10")
    psi: float | None = None
    if psi_raw is not None:
        if isinstance(psi_raw, bool) or not isinstance(psi_raw, (int, float)) \
                or not 0.0 <= float(psi_raw) <= 100.0:
            return None, "guest statistics carry an invalid psi_some_avg10"
        psi = float(psi_raw)
    balloon: int | None = None
    if "balloon_bytes" in raw:
        balloon = _byte_count(raw, "balloon_bytes", maximum)
        if balloon is None:
            return None, "guest statistics carry an invalid balloon_bytes"
    assert free is not None and high is not None
    return GuestStats(free, high, psi, float(age_s), balloon), ""


def floor_bytes(maximum: int, s: BalloonSettings) -> int:
    """The smallest target whatever the guest says: max(floor x maximum, the domain's
    min_guarantee), rounded up to MiB, never above maximum."""
    fraction = min(1.0, max(0.0, s.floor_fraction))
    low = max(math.ceil(fraction * maximum), s.min_guarantee)
    return min(maximum, -(-low // MiB) * MiB)


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def next_target(stats: GuestStats | None, stats_why: str, actual: int, target: int | None,
                maximum: int, s: BalloonSettings, since_deflate_s: float = math.inf,
                allowed: bool = True, why_not: str = "",
                settled_s: float | None = math.inf, free_rate: float = 0.0,
                reversals: Sequence[float] = ()) -> Step:
    """The balloon target for this moment (see the module docstring for the policy).

    ``actual``: the balloon's size now (guest memory, bytes); ``target``: the last target
    the daemon asked for (None: never set); ``since_deflate_s``: seconds since the daemon
    last deflated; ``allowed``: reclaim is permitted for the VM now (else ``why_not``);
    ``settled_s``: seconds since the balloon was first seen at its last target (None: not
    seen there yet); ``free_rate``: how fast the guest's free memory moved between its last
    two statistics (bytes/s, negative when falling; only ever a reason to deflate, so a
    guest that lies about it gets its own memory back, nothing more); ``reversals``: seconds
    since each recent deflate right after an inflate (:meth:`Flaps.ages`), which hold
    inflation while the balloon flaps (:func:`flap_hold`). Inflation only
    trusts statistics taken with the balloon at that
    target: older ones still count the pages the balloon took since as free. Statistics
    that carry the guest's balloon size say so themselves; others count when received
    after the host saw the balloon arrive.
    """
    maximum = max(0, maximum)
    low = floor_bytes(maximum, s)
    actual = min(max(actual, 0), maximum)
    current = min(max(target if target is not None else actual, low), maximum)
    ballooned = current < maximum or actual < maximum
    wait, flaps = flap_hold(reversals)
    flapping = (f"balloon flapping: deflated right after inflating {flaps} times in "
                f"{FLAP_WINDOW_S / 60:.0f} min (the guest's free memory swings); not "
                f"inflating for another {wait:.0f} s") if wait > 0 else ""

    def full(why: str) -> Step:
        if not ballooned:
            # Status keeps saying why the next plentiful message will not inflate either.
            return Step(maximum, f"{why}; balloon at full memory"
                                 + (f"; {flapping}" if flapping else ""))
        return Step(maximum, f"{why}; deflating to full memory ({_mib(maximum)})", True)

    def hold(why: str) -> Step:
        return Step(current, why)

    if not allowed:
        return full(f"reclaim not allowed now: {why_not}")
    stale_after = STALE_INTERVALS * s.stats_interval_s
    if stats is None:
        return full(stats_why or "no guest statistics")
    if stats.age_s > stale_after:
        return full(f"guest statistics are {stats.age_s:.0f} s old (more than "
                    f"{STALE_INTERVALS:.0f} intervals of {s.stats_interval_s:.0f} s): "
                    "guest agent silent")
    if stats.mem_free < s.reserve // 2:
        return full(f"guest short of memory: {_mib(stats.mem_free)} free < reserve/2 "
                    f"({_mib(s.reserve // 2)})")
    if math.isfinite(free_rate) and free_rate < 0 \
            and stats.mem_free + free_rate * LOOKAHEAD_S < s.reserve:
        return full(f"guest free memory falling at {_mib(int(-free_rate))}/s: under the "
                    f"reserve ({_mib(s.reserve)}) within {LOOKAHEAD_S:.0f} s")
    if stats.psi_some_avg10 is not None and stats.psi_some_avg10 > s.psi_threshold:
        return full(f"guest under memory pressure: PSI some avg10 {stats.psi_some_avg10:.1f}"
                    f" > {s.psi_threshold:.1f}")
    if abs(actual - current) > s.settle:
        return hold(f"balloon moving: actual {_mib(actual)}, target {_mib(current)}")
    if flapping:
        return hold(flapping)
    if stats.balloon is not None:
        fresh = abs(maximum - stats.balloon - current) <= s.settle
    else:
        fresh = settled_s is not None and stats.age_s < settled_s
    if not fresh:
        return hold("waiting for guest statistics taken after the balloon reached "
                    f"{_mib(current)}")
    if since_deflate_s < min(s.cooldown_intervals * s.stats_interval_s, COOLDOWN_CAP_S):
        return hold(f"deflated {since_deflate_s:.0f} s ago; waiting before inflating again")
    if stats.psi_some_avg10 is not None and stats.psi_some_avg10 > s.psi_threshold / 2:
        return hold(f"PSI some avg10 {stats.psi_some_avg10:.1f} above half the threshold")
    free = min(stats.mem_free, actual)
    surplus = free - stats.watermark_high - s.reserve
    if surplus < s.hysteresis:
        return hold(f"{_mib(free)} free is within the high watermarks "
                    f"({_mib(stats.watermark_high)}) + reserve ({_mib(s.reserve)}) + "
                    f"{_mib(s.hysteresis)}")
    used_floor = actual - free + stats.watermark_high + s.reserve
    floor = min(maximum, max(low, used_floor))
    new = max(floor, actual - min(s.step, surplus))
    new = min(maximum, -(-new // MiB) * MiB)  # whole MiB, rounded towards the guest
    if new >= current - MiB:
        return hold(f"at the floor ({_mib(floor)})")
    return Step(new, f"{_mib(surplus)} free beyond the high watermarks + reserve: "
                     f"inflating by {_mib(current - new)} to {_mib(new)}")
