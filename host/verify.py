"""Verified reclaim: how far the host backing really fell for each discard, beside what
the discard asked for.

``discarded_bytes`` counts what fallocate(PUNCH_HOLE) was asked to free and did not refuse.
That is not memory the host got back: a range the guest reports again after it was already
punched (and not touched since) is a hole already, so punching it frees nothing (issue 15's
churn looks like reclaim in ``discarded_bytes`` and like nothing here). So each range's
punch (host/punch.py, one call per reported range) reads the allocated size of the file it
punches, st_blocks * 512 of the fd it holds, before its first slice (the fstat that checks
the inode, already there) and after its last: one more fstat and a counter per range
(about 3 us here, beside about 25 us for the bare punch of a 2 MiB range), never a scan of
guest RAM. Per range::

    verified   = min(asked, max(0, before - after))
    unverified = asked - verified

where ``asked`` is what the punch discarded (the whole range, or ``done`` of a refusal
that stopped part-way; a failed fallocate counts nothing, as in the session's counters), so
``verified + unverified`` equals the VM's ``discarded_bytes`` of punched ranges.

What "verified" means, and where it cannot be told:

- It is the fall of the *whole file's* allocation while the range was punched. The kernel
  counts st_blocks for shmem (memfd, tmpfs) and hugetlbfs alike, so the figure is the
  kernel's, not ours. It is clamped to the range's size, so it never claims more than was
  asked.
- Other writers to the same file in those milliseconds move it too: the guest's vCPUs
  faulting in pages elsewhere in its RAM make the fall look smaller (a busy guest shows
  less verified than it got back), and a concurrent discard by QEMU itself (its own
  virtio-balloon or free-page-reporting discard of shared RAM) could make it look larger,
  up to the clamp. aerate's own discards never overlap: one discard at a time per VM (S4,
  S8), one daemon per VM (the VM lock). So per range it is an estimate; summed over many
  ranges the noise of concurrent faults pulls it down, never up past ``asked``.
- Unverified bytes are not unsafe and not lost: they are ranges that were already holes
  (the guest reported memory it had not touched since the last punch), ranges the guest
  re-faulted during the punch, or falls hidden by concurrent faults elsewhere.
- Private RAM (the balloon reclaimer) has no file to stat and no per-discard figure: the
  guest's balloon driver frees the pages and QEMU discards them. What the host really got
  back there is the balloon's *actual* against its *target* (``aerate_balloon_*``) and the
  mapping's resident + swapped bytes (``backing_allocated_bytes``).
- The kernel reclaimer (the guest kernel's own free page reporting, served by QEMU) goes
  past aerated entirely: only the backing figure shows it.
"""

from __future__ import annotations

import threading
from typing import Any


def fall(before: int, after: int, asked: int) -> int:
    """The verified part of ``asked`` bytes: how far the allocation fell, within [0, asked]."""
    return min(asked, max(0, before - after))


class ReclaimTally:
    """One VM's verified and unverified discarded bytes (module docstring).

    Written by the VM's discard (the loop thread or its own discard thread, one discard at
    a time), read by status on the loop and by the metrics scrape's thread: the lock keeps
    the pair consistent."""

    def __init__(self) -> None:
        self.verified = 0
        self.unverified = 0
        self._lock = threading.Lock()

    def range_done(self, asked: int, before: int, after: int) -> None:
        """host/punch.py's ``verify``: ``asked`` bytes of one range discarded, the punched
        file's allocation ``before`` the first slice and ``after`` the last."""
        verified = fall(before, after, asked)
        with self._lock:
            self.verified += verified
            self.unverified += asked - verified

    def status(self) -> dict[str, Any]:
        """The counters, for status (``reclaim``) and the metrics."""
        with self._lock:
            return {"verified_bytes": self.verified, "unverified_bytes": self.unverified}

