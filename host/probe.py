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
tells the guest as ``unknown``):
- the block is a proven shared file (``Backing.punchable``): private RAM (libvirt's
  default, every ballooned VM) has no file whose holes mean anything;
- the filesystem tells holes from data: shmem does (its page-cache index), hugetlbfs does
  not (it uses the kernel's default_llseek, which calls every offset below the file size
  data, whatever is allocated: measured on a fresh 2 MiB MFD_HUGETLB memfd, SEEK_DATA
  answers 0 with st_blocks 0), so a hugetlbfs answer would call every range backed;
- the file is shmem (memfd, tmpfs, anonymous shared): its lseek walks only the file's
  page-cache index (mm/filemap.c ``mapping_seek_hole_data``; a swapped-out page is a value
  entry there and counts as data without a swap-in), so it never waits on a disk, with or
  without swap on the host. Other filesystems (a file on a disk) may read extent metadata
  from the disk and are answered unknown. Unlike a report's content check (host/backing.py
  ``reads_stay_in_memory``), nothing here reads a page, so host swap does not matter.

Cost, and why on the loop thread (S8): per range one ``open`` of the /proc fd link, one
``fstat``, one ``lseek`` on an in-memory filesystem and one ``close``: a few microseconds,
never a wait on a disk (the conditions above). A probe names at most ``MAX_RANGES``
ranges and the session answers at most ``PROBE_PER_S`` probes a second per VM (burst
``PROBE_BURST``; host/session.py), so one VM costs the loop at most a few milliseconds a
second, less than the inline discards its reports may already cost (host/daemon.py
``INLINE_DISCARD_BYTES``); a thread hop would cost about what the work does.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping

from aerate.host.backing import Backing
from aerate.host.qemu_map import GuestMemoryMap, RangeRejected, locate


class ProbeUnknown(RuntimeError):
    """The host cannot tell whether a range is backed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def backed(gmap: GuestMemoryMap, backings: Mapping[str, Backing], gpa: int, length: int,
           granule: int) -> bool:
    """True when guest range [gpa, gpa+length) has at least one page allocated in its
    backing file, False when it is all holes; raises ProbeUnknown where the host cannot
    tell (module docstring)."""
    try:
        place = locate(gmap, gpa, length, granule)
    except RangeRejected as exc:
        raise ProbeUnknown(exc.reason) from exc
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
    if place.block_offset + length > backing.length:
        raise ProbeUnknown(f"past the end of block {place.block_name!r}")
    offset = backing.file_offset + place.block_offset
    try:
        fd = os.open(backing.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProbeUnknown(f"cannot open the backing {backing.path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (backing.dev, backing.ino):
            raise ProbeUnknown(f"{backing.path} is no longer {backing.link}; rebuild the map")
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return False   # no data at or after offset: all holes to the end
            raise ProbeUnknown(f"lseek(SEEK_DATA) on {backing.link}: {exc.strerror}") from exc
        return data < offset + length
    finally:
        os.close(fd)
