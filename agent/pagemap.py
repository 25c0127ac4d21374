"""Physical runs: from virtual pages to granule-aligned, physically contiguous ranges.

The pure part turns a page map (virtual page index -> page frame number or None) into the
runs the host can discard: physically contiguous, aligned to the reporting granule (in base
pages: 512 for 2 MiB, 262144 for 1 GiB), and whole. It also coalesces physical extents (for
example held 2 MiB blocks) into larger granules, because the host can only discard a 1 GiB
backing page when the guest hands back all of it.

The I/O part reads ``/proc/<pid>/pagemap`` (see Documentation/admin-guide/mm/pagemap.rst):
one little-endian u64 per virtual base page, decoded by :func:`aerate.agent.procfs.pagemap_pfn`.
Without CAP_SYS_ADMIN the kernel (4.2+) reports present pages with PFN 0; that is detected and
raised as :class:`PagemapPermissionError` instead of being mistaken for "page frame 0".
"""

from __future__ import annotations

import mmap
import os
from array import array
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from aerate.agent.procfs import pagemap_pfn

PAGE_SIZE = mmap.PAGESIZE
_ENTRY_BYTES = 8


@dataclass(frozen=True)
class Run:
    """A physically contiguous, granule-aligned run found in a page map.

    ``index`` is the first virtual page index (as numbered by the caller), ``pfn`` the first
    page frame number; both cover ``nr_pages`` base pages, a multiple of the granule.
    """

    index: int
    pfn: int
    nr_pages: int


@dataclass(frozen=True)
class Extent:
    """A physical range: ``nr_pages`` base pages starting at page frame ``pfn``."""

    pfn: int
    nr_pages: int


def _check_granule(granule: int) -> None:
    if granule < 1:
        raise ValueError(f"granule must be at least one page, got {granule}")


def _align_up(value: int, granule: int) -> int:
    return -(-value // granule) * granule


def contiguous_runs(pfns: Sequence[Optional[int]], granule: int, first_index: int = 0) -> List[Run]:
    """Return the maximal granule-aligned, physically contiguous runs in a page map.

    ``pfns[i]`` is the frame backing virtual page ``first_index + i`` (None: not present).
    A page is eligible when the whole aligned granule around its frame is backed, in order,
    by the neighbouring virtual pages. Runs are in virtual order, disjoint, and cover exactly
    the eligible pages; adjacent eligible granules are merged into one run.
    """
    _check_granule(granule)
    runs: List[Run] = []
    n = len(pfns)
    i = 0
    while i < n:
        start_pfn = pfns[i]
        if start_pfn is None:
            i += 1
            continue
        # Extend the stretch while the next virtual page maps the next frame.
        j = i + 1
        while j < n and pfns[j] == start_pfn + (j - i):
            j += 1
        first = _align_up(start_pfn, granule)
        usable = (start_pfn + (j - i) - first) // granule * granule
        if usable > 0:
            runs.append(Run(first_index + i + (first - start_pfn), first, usable))
        i = j
    return runs


def coalesce(extents: Iterable[Tuple[int, int]], granule: int) -> List[Extent]:
    """Merge physical extents ``(pfn, nr_pages)`` and cut them to whole aligned granules.

    Overlapping or touching extents are joined (virtual order does not matter for the host);
    each joined range is trimmed to its granule-aligned interior. The result is sorted,
    disjoint, and covers exactly the frames whose aligned granule lies wholly inside the
    union of the input. Use it to turn held 2 MiB blocks into 1 GiB runs (granule 262144).
    """
    _check_granule(granule)
    spans = sorted((pfn, pfn + nr) for pfn, nr in extents if nr > 0)
    merged: List[Tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    out: List[Extent] = []
    for start, end in merged:
        first = _align_up(start, granule)
        last = end // granule * granule
        if last > first:
            out.append(Extent(first, last - first))
    return out


class PagemapError(OSError):
    """Reading a page map failed (the message names the file and what to do)."""


class PagemapPermissionError(PagemapError, PermissionError):
    """The kernel hid the page frame numbers: the reader lacks CAP_SYS_ADMIN."""


def read_entries(
    vaddr: int, nr_pages: int, pid: Union[int, str] = "self", stride: int = 1
) -> Sequence[int]:
    """Read raw pagemap entries for ``nr_pages`` base pages from ``vaddr``, every ``stride``th.

    ``vaddr`` must be page aligned. One read covers the range; the stride is applied after it,
    so reading one entry per 2 MiB block (stride 512) costs one 4 KiB read per block.
    """
    if vaddr % PAGE_SIZE:
        raise ValueError(f"pagemap address {vaddr:#x} is not aligned to {PAGE_SIZE} bytes")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    path = f"/proc/{pid}/pagemap"
    want = nr_pages * _ENTRY_BYTES
    offset = vaddr // PAGE_SIZE * _ENTRY_BYTES
    chunks: List[bytes] = []
    got = 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        cls = PagemapPermissionError if isinstance(exc, PermissionError) else PagemapError
        raise cls(
            exc.errno, f"cannot open {path}: {exc.strerror}; the agent needs /proc and root"
        ) from exc
    try:
        while got < want:
            chunk = os.pread(fd, want - got, offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise PagemapError(
            exc.errno, f"reading {path} at {vaddr:#x} (+{nr_pages} pages) failed: {exc.strerror}"
        ) from exc
    finally:
        os.close(fd)
    if got != want:
        raise PagemapError(
            0, f"{path} returned {got} of {want} bytes for {vaddr:#x}; is the range mapped?"
        )
    entries = array("Q")
    entries.frombytes(b"".join(chunks))
    if stride > 1:
        entries = entries[::stride]
    return entries


def read_pagemap(
    vaddr: int, nr_pages: int, pid: Union[int, str] = "self", stride: int = 1
) -> List[Optional[int]]:
    """Return the PFN (or None when not resident) of each page read by :func:`read_entries`.

    Raises PagemapPermissionError when the kernel reports present pages with PFN 0, which it
    does for readers without CAP_SYS_ADMIN: the agent must run as root.
    """
    pfns: List[Optional[int]] = []
    for entry in read_entries(vaddr, nr_pages, pid, stride):
        pfn = pagemap_pfn(entry)
        if pfn == 0:
            raise PagemapPermissionError(
                1,
                f"/proc/{pid}/pagemap hides page frame numbers (present page at PFN 0): "
                "reading PFNs needs CAP_SYS_ADMIN; run aerate-agent as root",
            )
        pfns.append(pfn)
    return pfns
