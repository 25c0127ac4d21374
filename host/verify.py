"""Verified reclaim: how far the host backing really fell for each discard, beside what
the discard asked for.

``discarded_bytes`` counts what fallocate(PUNCH_HOLE) was asked to free and did not refuse.
That is not memory the host got back: a range the guest reports again after it was already
punched (and not touched since) is a hole already, so punching it frees nothing (issue 15's
churn looks like reclaim in ``discarded_bytes`` and like nothing here). So around each
range's punch (host/punch.py, one call per reported range) the VM's runner reads the
allocated size of the backing file that holds the range, st_blocks * 512, once before and
once after: two fstat-like calls per range on the path the punch itself opens, never a
scan of guest RAM. Per range::

    verified   = min(asked, max(0, before - after))
    unverified = asked - verified

where ``asked`` is what the punch reports as discarded (its return, or ``done`` of a
refusal that stopped part-way; a failed fallocate counts nothing, as in the session's
counters), so ``verified + unverified`` always equals the discarded bytes measured here.

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

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from aerate.host.backing import Backing
from aerate.host.punch import PunchRefused
from aerate.host.qemu_map import GuestMemoryMap, RangeRejected, locate


def allocated(path: str) -> int | None:
    """Bytes the kernel has allocated to the file at ``path`` (st_blocks * 512), or None
    when it cannot be read (QEMU exited: the punch then refuses too)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def fall(before: int | None, after: int | None, asked: int) -> int:
    """The verified part of ``asked`` bytes: how far the allocation fell, within [0, asked];
    0 when either figure is unknown (nothing can be told)."""
    if before is None or after is None:
        return 0
    return min(asked, max(0, before - after))


class ReclaimTally:
    """One VM's verified and unverified discarded bytes (module docstring).

    Written by the VM's discard (the loop thread or its own discard thread, one discard at
    a time), read by status on the loop and by the metrics scrape's thread: the lock keeps
    the pair consistent."""

    def __init__(self) -> None:
        self.verified = 0
        self.unverified = 0
        self.unmeasured = 0   # asked bytes whose backing could not be read before or after
        self._lock = threading.Lock()

    def add(self, asked: int, verified: int, measured: bool = True) -> None:
        """Count one range: ``asked`` bytes discarded, ``verified`` of them seen freed."""
        with self._lock:
            self.verified += verified
            self.unverified += asked - verified
            if not measured:
                self.unmeasured += asked

    def measure(self, backings: Mapping[str, Backing], gmap: GuestMemoryMap, gpa: int,
                length: int, granule: int, discard: Callable[[], int]) -> int:
        """Run ``discard()`` (a punch of guest range [gpa, gpa+length)) between two reads
        of the allocation of the file that backs the range; count the range; return what
        ``discard`` returned. A PunchRefused is counted with its ``done`` bytes and raised
        again; any other error counts nothing (the session counts nothing either)."""
        path = _path_of(backings, gmap, gpa, length, granule)
        before = allocated(path) if path is not None else None
        try:
            done = discard()
        except PunchRefused as exc:
            if exc.done:
                self._count(path, before, exc.done)
            raise
        self._count(path, before, done)
        return done

    def _count(self, path: str | None, before: int | None, asked: int) -> None:
        after = allocated(path) if path is not None else None
        self.add(asked, fall(before, after, asked), before is not None and after is not None)

    def status(self) -> dict[str, Any]:
        """The counters, for status (``reclaim``) and the metrics."""
        with self._lock:
            return {"verified_bytes": self.verified, "unverified_bytes": self.unverified,
                    "unmeasured_bytes": self.unmeasured}


def _path_of(backings: Mapping[str, Backing], gmap: GuestMemoryMap, gpa: int, length: int,
             granule: int) -> str | None:
    """The backing file of the block holding the range (None: punch will refuse it)."""
    try:
        place = locate(gmap, gpa, length, granule)
    except RangeRejected:
        return None
    backing = backings.get(place.block_name)
    return backing.path if backing is not None and backing.punchable else None
