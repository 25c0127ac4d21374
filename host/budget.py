"""Host-side budgets one guest is held to (S5): discard bytes and input bytes.

Pure (time is passed in), so the limits are tested without a daemon:

- :class:`DiscardBudget`: at most ``batch`` bytes discarded per report batch and a token
  bucket of ``rate`` bytes/s (burst: ``BURST_S`` seconds of rate). The daemon's discard
  wrapper asks it before every punch; beyond it the rest of the batch is refused with the
  reason (acked as refused: the guest gets its pages back, nothing is lost), counted and
  shown in status. A guest that reports all its RAM in every batch thus costs the host at
  most ``rate`` bytes of fallocate per second.
- :class:`InputBudget`: a token bucket of bytes read from the guest's channel. Input
  handling costs CPU per byte on the loop thread; a guest that sends more than an honest
  agent ever does (a flood of 0xFF bytes, of need-sync lines, of stats) ends its session
  when the bucket runs dry, so one VM costs the loop at most ``burst`` bytes of parsing per
  connection plus ``rate`` bytes per second, and the reconnect backoff (1 s doubling to
  30 s) spreads the bursts out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1 << 20
KiB = 1 << 10
#: Seconds of rate the discard bucket holds when full: a guest's first pass after idling
#: may discard this long a burst at once.
BURST_S = 2.0


@dataclass
class Bucket:
    """A token bucket over bytes; ``rate`` 0 means unlimited."""

    rate: float
    burst: float
    tokens: float = 0.0
    t: float = 0.0
    _started: bool = field(default=False, repr=False)

    def refill(self, now: float) -> None:
        """Add what the time since the last look earned, up to ``burst``."""
        if not self._started:
            self.tokens, self.t, self._started = self.burst, now, True
            return
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.t) * self.rate)
        self.t = now

    def take(self, n: float, now: float) -> bool:
        """Spend ``n`` tokens if there are enough (always True when unlimited)."""
        if self.rate <= 0:
            return True
        self.refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class DiscardBudget:
    """Per-batch and per-second discard limits of one VM (see the module docstring)."""

    def __init__(self, batch_mib: int, rate_mib_s: int) -> None:
        self.batch = batch_mib * MiB
        self.bucket = Bucket(rate=rate_mib_s * MiB, burst=rate_mib_s * MiB * BURST_S)
        self._batch_id: object = None
        self._batch_used = 0
        self.refused = 0  # bytes refused by this budget
        self.bites = 0  # batches in which it refused something
        self.reason = ""  # why it last refused ('' when it never bit)

    def configure(self, batch_mib: int, rate_mib_s: int) -> None:
        """New limits (live settings); the bucket keeps its fill, capped to the new burst."""
        self.batch = batch_mib * MiB
        self.bucket.rate = rate_mib_s * MiB
        self.bucket.burst = rate_mib_s * MiB * BURST_S
        self.bucket.tokens = min(self.bucket.tokens, self.bucket.burst)

    def check(self, batch: object, length: int, now: float) -> str:
        """Spend ``length`` bytes of budget for ``batch``; '' when allowed, else why not.

        Nothing is spent on a refusal: the refused part of a batch does not eat the budget
        of the next one.
        """
        if batch != self._batch_id:
            self._batch_id, self._batch_used = batch, 0
        if self._batch_used + length > self.batch:
            why = (f"discard budget: batch over {self.batch // MiB} MiB "
                   f"(setting discard_batch_mib)")
        elif not self.bucket.take(length, now):
            why = (f"discard budget: more than {self.bucket.rate / MiB:g} MiB/s "
                   f"(setting discard_rate_mib_s)")
        else:
            self._batch_used += length
            return ""
        self.refused += length
        self.bites += 1
        self.reason = why
        return why

    def status(self) -> dict[str, object]:
        """For aeratectl status: the limits, and what they refused."""
        return {"batch_bytes": self.batch, "rate_bytes_s": self.bucket.rate,
                "refused_bytes": self.refused, "bites": self.bites, "reason": self.reason}


#: Loop CPU one VM's input handling may use: a share of one core, and a burst in seconds.
#: An honest agent's messages cost tens of microseconds each, a few per second; the time
#: its discards take is not counted here (the discard budget bounds that).
LOOP_SHARE = 0.05
LOOP_BURST_S = 0.25


class InputBudget:
    """Bytes and loop CPU a VM's channel may cost before its session is ended.

    Two buckets, both charged after each read: bytes (``rate_kib_s``, ``burst_kib``) and
    loop-thread CPU seconds spent parsing (``LOOP_SHARE`` of a core, ``LOOP_BURST_S``).
    The CPU bucket is the bound that holds whatever the input's shape (a run of 0xFF
    markers costs more per byte than a long line): a flood costs the loop at most
    ``LOOP_BURST_S`` + ``LOOP_SHARE`` x its duration, plus one read's worth, then the
    session ends and the reconnect backoff (1 s doubling to 30 s) spaces out the next.
    """

    def __init__(self, rate_kib_s: int, burst_kib: int, loop_share: float = LOOP_SHARE,
                 loop_burst_s: float = LOOP_BURST_S) -> None:
        self.bucket = Bucket(rate=rate_kib_s * KiB, burst=burst_kib * KiB)
        self.cpu = Bucket(rate=loop_share, burst=loop_burst_s)
        self.floods = 0
        self.cpu_used = 0.0  # loop CPU seconds charged so far

    def take(self, n: int, now: float, cpu_s: float = 0.0) -> str:
        """Charge ``n`` bytes and ``cpu_s`` loop seconds: '' while within budget, else
        the reason to end the session."""
        self.cpu_used += cpu_s
        if not self.bucket.take(n, now):
            self.floods += 1
            return (f"input flood: more than {self.bucket.rate / KiB:g} KiB/s from the "
                    f"guest (burst {self.bucket.burst / KiB:g} KiB; setting input_kib_s)")
        if not self.cpu.take(cpu_s, now) and self.cpu.rate > 0:
            self.floods += 1
            return (f"input flood: parsing the guest's input took more than "
                    f"{100 * self.cpu.rate:g} % of a core (burst {self.cpu.burst:g} s)")
        return ""
