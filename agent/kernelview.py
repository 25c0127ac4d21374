"""The cycle's view of the running guest kernel, read from /proc (agent/procfs.py).

A thin adapter: the engine asks, this reads and parses. Watermarks change rarely and
/proc/zoneinfo is long, so they are re-read at most every ``WATERMARK_TTL`` seconds; the
free counts come from /proc/buddyinfo on every tick.
"""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

from . import procfs

WATERMARK_TTL = 30.0
# Frames sampled inside each aerated block when re-validating it (offsets in 4 KiB pages).
_SAMPLES = (0, 1, 255, 511)


class ProcKernel:
    """KernelView on the live kernel (or a captured tree under ``root``, for tests)."""

    def __init__(self, root: str = "/", kpageflags: str = procfs.KPAGEFLAGS_PATH) -> None:
        self.root = root
        self.kpageflags = kpageflags
        self._wm: Optional[Tuple[float, procfs.Watermarks]] = None
        self._buddy: Optional[Tuple[float, Tuple[procfs.BuddyZone, ...]]] = None
        self.psi_missing: Optional[str] = None

    def _buddyinfo(self) -> Tuple[procfs.BuddyZone, ...]:
        # One read per tick is enough: the engine asks several questions in a row.
        now = time.monotonic()
        if self._buddy is None or now - self._buddy[0] > 0.05:
            self._buddy = (now, procfs.read_buddyinfo(self.root))
        return self._buddy[1]

    def _watermarks(self) -> procfs.Watermarks:
        now = time.monotonic()
        if self._wm is None or now - self._wm[0] > WATERMARK_TTL:
            self._wm = (now, procfs.total_watermarks(procfs.read_zoneinfo(self.root).zones))
        return self._wm[1]

    def free_units(self, min_order: int) -> int:
        """Free memory in blocks of order >= min_order, in 2**min_order-page units."""
        return procfs.summarize_free(self._buddyinfo(), min_order).blocks

    def reserve_pages(self) -> int:
        """The zone high watermarks: kswapd works to keep this much free."""
        return self._watermarks().high

    def low_pages(self) -> int:
        """The zone low watermarks: below them kswapd is already reclaiming."""
        return self._watermarks().low

    def free_pages(self) -> int:
        """Free pages in the zones the cycle uses (DMA left out)."""
        return procfs.summarize_free(self._buddyinfo(), 0).free_pages

    def psi_some_avg10(self) -> Optional[float]:
        """Memory PSI 'some' avg10, or None without PSI (the reason kept in psi_missing)."""
        try:
            return procfs.read_pressure_memory(self.root).some.avg10
        except OSError as e:
            self.psi_missing = str(e)
            return None

    def still_free(self, pfns: List[int]) -> List[bool]:
        """Is each 2 MiB block starting at pfn still free in the buddy allocator?

        Since Linux 4.6 every page of a free buddy block carries the buddy flag (not only
        the head), so a block counts as free when each sampled frame is a buddy page. An
        unreadable flag counts as not free: the safe side (a reclaim missed, nothing
        discarded twice).
        """
        wanted = [p + s for p in pfns for s in _SAMPLES]
        try:
            flags = procfs.read_kpageflags_for(wanted, self.kpageflags)
        except OSError:
            return [False] * len(pfns)
        return [all(procfs.is_buddy(flags.get(p + s, 0)) for s in _SAMPLES) for p in pfns]
