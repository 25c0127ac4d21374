"""The reclaimer decision ``VmRunner.permit()`` answers, kept fresh off the loop (S1, S8).

``permit()`` is asked before every batch and again by punch before each discard; it must
never block on libvirt. So the decision is computed by a background refresh (the VM's
worker asks libvirt for the job state and, less often, the domain XML) and by libvirt's
lifecycle events, and ``permit()`` only reads this cache. Pure: time is passed in.

Staleness, and why it is safe:
- A decision is stamped with the time its libvirt request was *issued*, not answered:
  libvirt's answer describes the domain at some moment after that, so the stamp is never
  younger than the facts.
- A PUNCH (or BALLOON) decision is only good for ``max_age`` seconds after that stamp.
  Older, :meth:`PermitCache.get` answers REFUSE with the age and the last refresh error.
  A refresh that is late, failing or hung therefore turns the VM to REFUSE within
  ``max_age``; it never keeps an old PUNCH forever.
- An event (suspended, a job seen, a timeout) calls :meth:`invalidate`: REFUSE at once,
  and any answer to a request issued *before* the invalidation is dropped when it lands
  (it may predate the event), so only a request issued after the event can permit again.
- The remaining window: a migration, snapshot or save that libvirt reports by no event is
  seen by the next refresh; a permit can therefore describe libvirt's state up to
  ``max_age`` seconds old (the daemon uses 2 s; the old synchronous cache was 0.25 s plus
  the call's own duration, unbounded while libvirt stalled). During that window a punch
  hits only pages the guest holds in its arena and does not use (S2): a migration's copy
  of such a page is garbage either way. What must never be punched under a job is refused
  by QEMU's own state too (a paused domain's lifecycle event invalidates at once), and
  postcopy starts only after a precopy phase that the 1 s refresh sees long before.
"""

from __future__ import annotations

import math

from aerate.host.refusal import REFUSE, Decision

#: Actions that let memory be taken from the guest: they expire.
_TAKING = ("punch", "balloon")


class PermitCache:
    """The last decision for one VM, its issue time, and the invalidation fence."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.decision = Decision(REFUSE, "not decided yet")
        self.issued_at = -math.inf
        self.fence = -math.inf  # answers to requests issued before this are dropped
        self.error = ""  # why the last refresh failed ('' when it succeeded)
        self.dropped = 0  # answers that arrived after an invalidation and were dropped

    def get(self, now: float) -> Decision:
        """The decision to act on now: an expired PUNCH/BALLOON is REFUSE, with why."""
        d = self.decision
        if d.action in _TAKING and now - self.issued_at > self.max_age:
            age = now - self.issued_at
            why = f"; last refresh: {self.error}" if self.error else ""
            return Decision(REFUSE, f"libvirt's answer is {age:.1f} s old (older than "
                                    f"{self.max_age:g} s): not discarding on stale facts{why}")
        return d

    def last(self) -> Decision:
        """The last decision libvirt's facts gave, expired or not (for guest settings and
        status: an expiry must not flip the guest's stats-only mode back and forth)."""
        return self.decision

    def set(self, decision: Decision, issued_at: float, error: str = "") -> bool:
        """Store the decision of a refresh whose request was issued at ``issued_at``.

        False (dropped) when the request predates the newest invalidation or the decision
        already held: an answer must not overwrite facts newer than its own.
        """
        if issued_at < self.fence or issued_at < self.issued_at:
            self.dropped += 1
            return False
        self.decision, self.issued_at, self.error = decision, issued_at, error
        return True

    def invalidate(self, reason: str, now: float) -> None:
        """Refuse from now until a refresh issued after ``now`` answers."""
        self.decision = Decision(REFUSE, reason)
        self.issued_at = now
        self.fence = now
