"""What this guest kernel offers the aeration cycle, one status line per capability.

Each detector returns a :class:`Capability` (name, available, detail) and never raises for a
missing feature: the agent degrades and says why. File-based detectors read under ``root``
(default ``/``; a captured tree works too). The live probes (memfd with MFD_HUGETLB,
MADV_POPULATE_WRITE, pagemap PFNs) exercise the running kernel itself and are skipped, with
a stated reason, when ``root`` is not the live system.

Python 3.8, standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

from aerate.agent import memreclaim, procfs
from aerate.agent.pagemap import read_entries

PSI = "psi"
HUGETLB = "hugetlb_2m"
MEMFD_HUGETLB = "memfd_hugetlb"
MADV_POPULATE_WRITE = "madv_populate_write"
THP = "thp"
PAGEMAP_PFN = "pagemap_pfn"
KPAGEFLAGS = "kpageflags"
FREE_PAGE_REPORTING = "free_page_reporting"
POISON_SAFE = "poison_safe"
FREE_FIRST = "free_first"

#: madvise(2) advice value; Linux >= 5.14. Older kernels answer EINVAL.
MADV_POPULATE_WRITE_ADVICE = 23
# os.MFD_HUGETLB / MFD_HUGE_2MB exist from Python 3.8 on Linux; the values are the kernel's.
_MFD_CLOEXEC = getattr(os, "MFD_CLOEXEC", 0x0001)
_MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 0x0004)
_MFD_HUGE_2MB = getattr(os, "MFD_HUGE_2MB", 21 << 26)


@dataclass(frozen=True)
class Capability:
    """One thing the kernel does or does not offer; ``detail`` is one line for a status page."""

    name: str
    available: bool
    detail: str


def _errmsg(e: OSError) -> str:
    return "%s (errno %s)" % (e.strerror or e, e.errno)


def detect_psi(root: str = "/") -> Capability:
    """Pressure stall information for memory (/proc/pressure/memory, kernel >= 4.20)."""
    snap = procfs.read_snapshot(root, ["psi"])
    if snap.psi_memory is None:
        return Capability(PSI, False, snap.why_missing("psi") or "PSI unavailable")
    p = snap.psi_memory
    full = "full avg10=%.2f" % p.full.avg10 if p.full else "no 'full' line"
    return Capability(PSI, True, "memory pressure: some avg10=%.2f, %s" % (p.some.avg10, full))


def detect_hugetlb(root: str = "/") -> Capability:
    """2 MiB hugetlb pages with a writable surplus limit (nr_overcommit_hugepages)."""
    try:
        pool = procfs.read_hugepage_pool(2048, root)
    except FileNotFoundError:
        return Capability(HUGETLB, False, "no 2 MiB hugetlb pool (kernel without "
                          "CONFIG_HUGETLBFS or no 2 MiB page size)")
    except (OSError, procfs.ProcParseError) as e:
        return Capability(HUGETLB, False, "2 MiB hugetlb pool unreadable: %s" % e)
    knob = os.path.join(root, "sys/kernel/mm/hugepages/hugepages-2048kB/nr_overcommit_hugepages")
    # access() also honours read-only mounts (a container's /sys), which is what matters.
    writable = os.access(knob, os.W_OK)
    state = "%d persistent (%d free), %d surplus, overcommit limit %d" % (
        pool.nr, pool.free, pool.surplus, pool.overcommit)
    if writable:
        return Capability(HUGETLB, True, "2 MiB hugetlb: %s (limit writable)" % state)
    if pool.overcommit > 0:
        return Capability(HUGETLB, True, "2 MiB hugetlb: %s (limit read-only; the agent can "
                          "use at most the current limit)" % state)
    return Capability(HUGETLB, False, "2 MiB hugetlb: %s; nr_overcommit_hugepages is not "
                      "writable (read-only /sys or no privilege)" % state)


def detect_memfd_hugetlb() -> Capability:
    """memfd_create(MFD_HUGETLB | MFD_HUGE_2MB) works (live probe; allocates nothing)."""
    create = getattr(os, "memfd_create", None)
    if create is None:
        return Capability(MEMFD_HUGETLB, False, "os.memfd_create missing (glibc < 2.27?)")
    try:
        fd = create("aerate-probe", _MFD_CLOEXEC | _MFD_HUGETLB | _MFD_HUGE_2MB)
    except OSError as e:
        return Capability(MEMFD_HUGETLB, False, "memfd_create(MFD_HUGETLB) failed: %s"
                          % _errmsg(e))
    os.close(fd)
    return Capability(MEMFD_HUGETLB, True, "memfd_create(MFD_HUGETLB|MFD_HUGE_2MB) works")


def detect_madv_populate_write() -> Capability:
    """madvise(MADV_POPULATE_WRITE) on a one-page private mapping (Linux >= 5.14)."""
    m = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        madvise = getattr(m, "madvise", None)
        if madvise is None:
            return Capability(MADV_POPULATE_WRITE, False, "mmap.madvise unavailable here")
        madvise(MADV_POPULATE_WRITE_ADVICE)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return Capability(MADV_POPULATE_WRITE, False, "MADV_POPULATE_WRITE unknown to "
                              "this kernel (< 5.14): pages are touched one by one instead")
        return Capability(MADV_POPULATE_WRITE, False, "MADV_POPULATE_WRITE failed: %s"
                          % _errmsg(e))
    finally:
        m.close()
    return Capability(MADV_POPULATE_WRITE, True, "MADV_POPULATE_WRITE supported")


def detect_thp(root: str = "/") -> Capability:
    """Transparent hugepages usable with MADV_HUGEPAGE (mode always or madvise)."""
    d = os.path.join(root, "sys/kernel/mm/transparent_hugepage")
    modes: Dict[str, str] = {}
    for name in ("enabled", "defrag", "shmem_enabled"):
        p = os.path.join(d, name)
        try:
            modes[name] = procfs.parse_bracket_choice(procfs.read_text(p), p)
        except (OSError, procfs.ProcParseError):
            modes[name] = "?"
    if modes["enabled"] == "?":
        return Capability(THP, False, "no transparent hugepages (kernel without "
                          "CONFIG_TRANSPARENT_HUGEPAGE)")
    line = "THP enabled=%s, defrag=%s, shmem_enabled=%s" % (
        modes["enabled"], modes["defrag"], modes["shmem_enabled"])
    return Capability(THP, modes["enabled"] in ("always", "madvise"), line)


def _probe_pagemap() -> procfs.PagemapEntry:
    """The pagemap entry of one page of a freshly written buffer of this process."""
    page = mmap.PAGESIZE
    buf = ctypes.create_string_buffer(2 * page)  # zero-filled: every page is written
    addr = (ctypes.addressof(buf) + page - 1) // page * page
    entry = procfs.parse_pagemap_entry(read_entries(addr, 1)[0])
    del buf  # keep the buffer (and its page) alive until after the read
    return entry


def detect_pagemap_pfn() -> Capability:
    """/proc/self/pagemap shows real PFNs (needs CAP_SYS_ADMIN; zero otherwise)."""
    try:
        entry = _probe_pagemap()
    except OSError as e:
        return Capability(PAGEMAP_PFN, False, "/proc/self/pagemap unreadable: %s" % _errmsg(e))
    if not entry.present:
        return Capability(PAGEMAP_PFN, False, "probe page not present in pagemap")
    if entry.pfn == 0:
        return Capability(PAGEMAP_PFN, False, "pagemap hides PFNs: run the agent as root "
                          "(CAP_SYS_ADMIN)")
    return Capability(PAGEMAP_PFN, True, "pagemap shows PFNs")


def detect_kpageflags(root: str = "/") -> Capability:
    """/proc/kpageflags readable (used to re-validate aerated pages)."""
    snap = procfs.read_snapshot(root, ["kpageflags"])
    if snap.kpageflags_readable:
        return Capability(KPAGEFLAGS, True, "/proc/kpageflags readable")
    return Capability(KPAGEFLAGS, False, snap.why_missing("kpageflags") or "unreadable")


def detect_free_page_reporting(root: str = "/") -> Capability:
    """In-kernel free page reporting is active (virtio-balloon negotiated REPORTING).

    ``available`` means the kernel already reports free pages, so aerate defaults to
    stats-only.
    """
    try:
        balloon = procfs.read_balloon_features(root)
    except (OSError, procfs.ProcParseError) as e:
        return Capability(FREE_PAGE_REPORTING, False, "virtio-balloon features unreadable: %s"
                          % e)
    if balloon is None:
        return Capability(FREE_PAGE_REPORTING, False, "no virtio-balloon device: the kernel "
                          "does not report free pages itself")
    if not balloon.free_page_reporting_active:
        return Capability(FREE_PAGE_REPORTING, False, "virtio-balloon %s without REPORTING: "
                          "the kernel does not report free pages itself" % balloon.device)
    order = ""
    p = os.path.join(root, "sys/module/page_reporting/parameters/page_reporting_order")
    with contextlib.suppress(OSError):  # the parameter exists from 5.14 on
        order = ", page_reporting_order=%s" % procfs.read_text(p).strip()
    return Capability(FREE_PAGE_REPORTING, True, "virtio-balloon %s negotiated REPORTING%s: "
                      "the kernel reports free pages itself; aerate defaults to stats-only"
                      % (balloon.device, order))


def detect_poison_safe(root: str = "/") -> Capability:
    """Freed pages are not poisoned with a non-zero value, so the host may discard them."""
    poisoning = procfs.read_page_poisoning(root)
    return Capability(POISON_SAFE, poisoning.discard_safe, poisoning.detail)


def detect_free_first(root: str = "/") -> Capability:
    """cgroup v2 ``memory.reclaim`` on the root cgroup, writable (the free-first stage)."""
    problem = memreclaim.probe(root)
    if problem:
        return Capability(FREE_FIRST, False, "free first cannot reclaim: %s" % problem)
    return Capability(FREE_FIRST, True, "/%s/%s writable: free first can reclaim page cache"
                      % (memreclaim.CGROUP_DIR, memreclaim.RECLAIM_FILE))


def _not_probed(name: str) -> Capability:
    return Capability(name, False, "not probed: %s is a probe of the running kernel and the "
                      "root is not /" % name)


def detect_all(root: str = "/", probe_live: Optional[bool] = None) -> Tuple[Capability, ...]:
    """Every capability, in a fixed order. Live probes run when ``probe_live`` (default:
    ``root == "/"``)."""
    live = (os.path.abspath(root) == "/") if probe_live is None else probe_live
    detectors: Sequence[Tuple[str, Callable[[], Capability]]] = (
        (PSI, lambda: detect_psi(root)),
        (HUGETLB, lambda: detect_hugetlb(root)),
        (MEMFD_HUGETLB, detect_memfd_hugetlb),
        (MADV_POPULATE_WRITE, detect_madv_populate_write),
        (THP, lambda: detect_thp(root)),
        (PAGEMAP_PFN, detect_pagemap_pfn),
        (KPAGEFLAGS, lambda: detect_kpageflags(root)),
        (FREE_PAGE_REPORTING, lambda: detect_free_page_reporting(root)),
        (POISON_SAFE, lambda: detect_poison_safe(root)),
        (FREE_FIRST, lambda: detect_free_first(root)),
    )
    live_only = (MEMFD_HUGETLB, MADV_POPULATE_WRITE, PAGEMAP_PFN)
    return tuple(_not_probed(name) if name in live_only and not live else fn()
                 for name, fn in detectors)


def by_name(caps: Sequence[Capability]) -> Dict[str, Capability]:
    """Capabilities keyed by name."""
    return {c.name: c for c in caps}
