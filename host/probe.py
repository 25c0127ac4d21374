"""Whether a guest range is backed on the host: the answer to a guest's probe.

Issue 15 (agent/protocol.py "Probes"): a guest's belief that a block it got back after an
ack is still discarded on the host goes stale when the guest allocates, writes and frees
the block between two of its looks; only the host can see that. For a shared file backing
(memfd, tmpfs) the kernel says it directly: ``lseek(fd, off, SEEK_DATA)`` returns the first
offset at or after ``off`` that holds a page, or ENXIO when none does, so a range is backed
when that offset lies inside it.

What this never does: discard, write, map or read guest memory. The fd is opened read-only
and only ``fstat`` and ``lseek`` run on it, so a wrong answer (a stale map, a race with the
guest writing) changes only what the guest believes: a reclaim missed or done twice
(agent/protocol.py "Probes"), never a discard of memory the guest uses (S1).

Where it answers (anything else raises ``ProbeUnknown`` with the reason, which the session
tells the guest as ``unknown``; ``retry`` says whether asking again later may help):
- the block is a proven shared file (``Backing.punchable``): private RAM (libvirt's
  default, every ballooned VM) has no file whose holes mean anything;
- the filesystem tells holes from data: shmem does (its page-cache index), hugetlbfs does
  not (fs/hugetlbfs/inode.c uses ``default_llseek``, which calls every offset below the
  file size data, whatever is allocated: measured on a fresh 2 MiB MFD_HUGETLB memfd,
  SEEK_DATA answers 0 with st_blocks 0), so a hugetlbfs answer would call every range
  backed; a file on a disk filesystem may read extent metadata from the disk;
- ``reads_stay_in_memory`` (host/backing.py): shmem on a host without swap. The walk of
  the index itself never swaps a page in (mm/filemap.c ``folio_seek_hole_data`` counts a
  swap entry as data), but ``shmem_file_llseek`` takes the inode lock, which a punch of
  the same file holds (``shmem_fallocate``: QEMU's own discards for its balloon, free page
  reporting or virtio-mem, which the guest drives), and that punch may wait on a page being
  swapped in, on a disk. Without swap nothing under the lock waits on a disk.

Cost, and why on the loop thread (S8): each backing file is opened once per probe (one
``open`` of the /proc fd link, one ``fstat``, one ``close``, about 10 us), and the ranges,
sorted, are answered by one sweep of ``lseek(SEEK_DATA)`` calls (about 1 us each on
shmem) that skips every range lying before the data offset the last call found. A probe
names at most ``PROBE_MAX_RANGES`` ranges (agent/protocol.py) and the session answers at
most ``PROBE_PER_S`` a second per VM (host/session.py), checked before any of this work:
at most about 0.2 ms of loop time a second per VM, and an honest agent probes once every
``PROBE_EVERY`` (5 s), so a thousand VMs cost the loop about 3 % of a core at worst.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence

from aerate.host.backing import Backing, reads_stay_in_memory
from aerate.host.qemu_map import GuestMemoryMap, RangeRejected, locate


class ProbeUnknown(RuntimeError):
    """The host cannot tell whether a range is backed; ``reason`` says why, ``retry``
    whether it may tell later (a map being rebuilt, a failed open) rather than never on
    this VM (private RAM, hugetlbfs, a disk file, swap)."""

    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


Range = tuple[int, int]


def _where(gmap: GuestMemoryMap, backings: Mapping[str, Backing], gpa: int, length: int,
           granule: int, swap_total: int | None) -> tuple[Backing, int]:
    """The backing and file offset of a probed range, or ProbeUnknown (module docstring)."""
    try:
        place = locate(gmap, gpa, length, granule)
    except RangeRejected as exc:
        raise ProbeUnknown(exc.reason, retry=True) from exc
    backing = backings.get(place.block_name)
    if backing is None or not backing.punchable or backing.path is None:
        why = backing.reason if backing is not None else "no resolved backing"
        raise ProbeUnknown(f"block {place.block_name!r} is not a shared file: {why}")
    if backing.fs_type == "hugetlbfs":
        raise ProbeUnknown(f"block {place.block_name!r} is on hugetlbfs, whose lseek "
                           "(SEEK_DATA) calls every offset data")
    if backing.fs_type != "tmpfs":
        fs = backing.fs_type or "an unknown filesystem"
        raise ProbeUnknown(f"block {place.block_name!r} is on {fs}, not shmem: its lseek "
                           "may wait on a disk")
    if not reads_stay_in_memory([backing], swap_total):
        raise ProbeUnknown(f"block {place.block_name!r}: this host has swap (or its swap "
                           "is not known yet), and an lseek of shmem may then wait behind "
                           "a punch waiting on a swap-in", retry=swap_total is None)
    if place.block_offset + length > backing.length:
        raise ProbeUnknown(f"past the end of block {place.block_name!r}", retry=True)
    return backing, backing.file_offset + place.block_offset


def backed_ranges(gmap: GuestMemoryMap, backings: Mapping[str, Backing],
                  ranges: Sequence[Range], granule: int, swap_total: int | None
                  ) -> list[bool]:
    """For each guest range: True when it has at least one page allocated in its backing
    file, False when it is all holes; raises ProbeUnknown where the host cannot tell
    (module docstring). Every range is located and checked before any file is opened."""
    where = [_where(gmap, backings, gpa, n, granule, swap_total) for gpa, n in ranges]
    out = [False] * len(ranges)
    fds: dict[str, int] = {}
    try:
        # One sweep per file in offset order: ``data`` is where the file's next data
        # begins at or after the last offset asked (inf: none), so a range ending before
        # it is a hole and one containing it is backed, without another lseek.
        order = sorted(range(len(ranges)), key=lambda i: (where[i][0].path or "", where[i][1]))
        data: float = -1
        current = ""
        for i in order:
            backing, offset = where[i]
            length = ranges[i][1]
            path = backing.path or ""
            if path != current:
                current, data = path, -1
                fds[path] = _open(backing)
            if data < offset:
                data = _seek_data(fds[path], offset, backing)
            out[i] = data < offset + length
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def backed(gmap: GuestMemoryMap, backings: Mapping[str, Backing], gpa: int, length: int,
           granule: int, swap_total: int | None = 0) -> bool:
    """``backed_ranges`` of one range."""
    return backed_ranges(gmap, backings, [(gpa, length)], granule, swap_total)[0]


def _open(backing: Backing) -> int:
    assert backing.path is not None
    try:
        fd = os.open(backing.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProbeUnknown(f"cannot open the backing {backing.path}: {exc.strerror}",
                           retry=True) from exc
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (backing.dev, backing.ino):
            raise ProbeUnknown(f"{backing.path} is no longer {backing.link}; rebuild the map",
                               retry=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _seek_data(fd: int, offset: int, backing: Backing) -> float:
    """The first offset at or after ``offset`` that holds data; inf when none does."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return float("inf")   # no data at or after offset: all holes to the end
        raise ProbeUnknown(f"lseek(SEEK_DATA) on {backing.link}: {exc.strerror}",
                           retry=True) from exc
