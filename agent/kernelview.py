"""The cycle's view of the running guest kernel, read from /proc (agent/procfs.py).

A thin adapter: the engine asks, this reads and parses. It is read on every idle tick, so
it is built to be cheap there (issue 2: an idle agent must cost < 0.2 % of a core):

- The /proc files it polls stay open and are re-read with ``pread`` from offset 0 (the
  text, then the empty read that proves the end): a seq_file regenerates its text when read
  from the start, so two syscalls replace the nine of a Python ``open().read()`` (open, two
  fstat, ioctl, two lseek, two read, close).
  Under TCG, where each syscall costs tens of microseconds, this is most of the idle cost.
- /proc/buddyinfo is read at most once per tick (the engine asks several questions in a
  row); watermarks change rarely and /proc/zoneinfo is long, so they are re-read at most
  every ``WATERMARK_TTL`` seconds.
- The statistics message reuses the same open files (``stats``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from . import procfs

WATERMARK_TTL = 30.0
PAGE = 4096
# Frames sampled inside each aerated block when re-validating it (offsets in 4 KiB pages).
# The buddy allocator serves every allocation from the low end of the free block it splits
# (expand() puts the upper halves back on the free lists), so the first allocation out of an
# aerated block takes frame 0; frame 511 catches a block whose low end was freed again while
# its top stays in use. Frame 511 of one block and frames 0-1 of the next are adjacent, so a
# run of adjacent blocks costs about one pread per block. A block found free here while some
# other frame is in use only stays counted as aerated: the safe side.
_SAMPLES = (0, 1, 511)
_CHUNK = 1 << 16
T = TypeVar("T")


class KernelFile:
    """A /proc text file kept open and re-read from offset 0 on each ``read``.

    A failed read closes the file, so the next read opens it again (a file that appears
    later, e.g. PSI enabled at runtime, is picked up; one that vanished raises OSError).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None

    def read(self) -> str:
        """The whole text now (ASCII; undecodable bytes replaced, as procfs.read_text)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            parts: List[bytes] = []
            offset = 0
            while True:
                data = os.pread(self._fd, _CHUNK, offset)
                if not data:
                    break
                parts.append(data)
                offset += len(data)
        except OSError:
            self.close()
            raise
        return b"".join(parts).decode("ascii", "replace")

    def close(self) -> None:
        """Close the file (the next read reopens it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ProcKernel:
    """KernelView on the live kernel (or a captured tree under ``root``, for tests)."""

    def __init__(self, root: str = "/", kpageflags: str = procfs.KPAGEFLAGS_PATH) -> None:
        self.root = root
        self.kpageflags = kpageflags
        self._files = {rel: KernelFile(os.path.join(root, rel)) for rel in
                       ("proc/buddyinfo", "proc/zoneinfo", "proc/meminfo",
                        "proc/pressure/memory", "proc/vmstat")}
        self._wm: Optional[Tuple[float, procfs.Watermarks]] = None
        self._buddy: Optional[Tuple[float, Tuple[procfs.BuddyZone, ...]]] = None
        self.psi_missing: Optional[str] = None

    def _parse(self, rel: str, parser: Callable[[str, str], T]) -> T:
        f = self._files[rel]
        return parser(f.read(), f.path)

    def close(self) -> None:
        """Close the /proc files kept open."""
        for f in self._files.values():
            f.close()

    def __enter__(self) -> ProcKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _buddyinfo(self) -> Tuple[procfs.BuddyZone, ...]:
        # One read per tick is enough: the engine asks several questions in a row.
        now = time.monotonic()
        if self._buddy is None or now - self._buddy[0] > 0.05:
            self._buddy = (now, self._parse("proc/buddyinfo", procfs.parse_buddyinfo))
        return self._buddy[1]

    def _watermarks(self) -> procfs.Watermarks:
        now = time.monotonic()
        if self._wm is None or now - self._wm[0] > WATERMARK_TTL:
            zones = self._parse("proc/zoneinfo", procfs.parse_zoneinfo).zones
            self._wm = (now, procfs.total_watermarks(zones))
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

    def mem_free(self) -> int:
        """MemFree in bytes (/proc/meminfo: one read of a file kept open)."""
        return self._parse("proc/meminfo", procfs.parse_meminfo).free

    def _pressure(self) -> procfs.Pressure:
        return self._parse("proc/pressure/memory", procfs.parse_pressure)

    def psi_some_avg10(self) -> Optional[float]:
        """Memory PSI 'some' avg10, or None without PSI (the reason kept in psi_missing)."""
        try:
            return self._pressure().some.avg10
        except (OSError, procfs.ProcParseError) as e:
            self.psi_missing = str(e)
            return None

    def stats(self) -> Dict[str, Any]:
        """Kernel figures for the statistics message: free blocks by order and zone, the
        zone watermarks, MemTotal/MemFree, PSI, and why any is missing (never raises)."""
        out: Dict[str, Any] = {}
        missing: List[str] = []

        def attempt(rel: str, fn: Callable[[], None]) -> None:
            try:
                fn()
            except (OSError, procfs.ProcParseError) as e:
                path = self._files[rel].path
                missing.append(str(e) if path in str(e) else "%s: %s" % (path, e))

        def buddy() -> None:
            self._buddy = None          # the statistics want this moment's counts
            out["free_by_order"] = {"%d/%s" % (z.node, z.zone): list(z.free)
                                    for z in self._buddyinfo()}

        def mem() -> None:
            info = self._parse("proc/meminfo", procfs.parse_meminfo)
            out["mem_total"], out["mem_free"] = info.total, info.free

        def psi() -> None:
            out["psi_some_avg10"] = self._pressure().some.avg10

        def watermarks() -> None:
            out["watermark_low_bytes"] = self.low_pages() * PAGE
            out["watermark_high_bytes"] = self.reserve_pages() * PAGE

        def balloon() -> None:
            # Pages the guest's balloon driver holds now (mm/balloon_compaction.c counts
            # every page it enqueues and dequeues): the host learns from it whether these
            # figures were taken after its balloon reached the target (host/balloon.py).
            vm = self._parse("proc/vmstat", procfs.parse_vmstat)
            if "balloon_inflate" in vm and "balloon_deflate" in vm:
                out["balloon_bytes"] = max(0, vm["balloon_inflate"] - vm["balloon_deflate"]
                                           ) * PAGE

        attempt("proc/buddyinfo", buddy)
        attempt("proc/zoneinfo", watermarks)
        attempt("proc/meminfo", mem)
        attempt("proc/pressure/memory", psi)
        attempt("proc/vmstat", balloon)
        out["missing"] = missing
        return out

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
