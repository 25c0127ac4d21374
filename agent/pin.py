"""Long-term pins on held arena blocks, through io_uring fixed-buffer registration.

Why: a held hugetlb page is not immovable. ``alloc_contig_range()`` (CMA, runtime gigantic
pages on kernels that migrate smaller hugetlb pages for them), memory offlining and
``migrate_pages`` move an in-use hugetlb page to a new frame and free the old one, which
the buddy allocator hands to someone else while a report naming the old frame may still be
on its way to the host (S3). The migration code gives up on a folio that carries more
references than its mappings explain, and a ``FOLL_LONGTERM`` pin is exactly such a
reference, held until it is dropped. Registering a buffer with io_uring
(``IORING_REGISTER_BUFFERS``) is the one unprivileged, stable userspace API that takes a
``FOLL_LONGTERM`` pin and keeps it until the buffer is unregistered or the ring is closed.

What holds, and under which conditions:

- A pin is taken per block (one registered buffer per arena slot, in a sparse table
  updated with ``IORING_REGISTER_BUFFERS_UPDATE``), so blocks are pinned and unpinned one
  by one. ``FOLL_LONGTERM`` first migrates a page out of ZONE_MOVABLE or a CMA pageblock
  and then pins it, so the caller must read the frame numbers *after* :meth:`Pinner.pin`
  (the arena does).
- The pin lives in the ring, i.e. in this process: it ends when the agent dies. Between a
  crashed agent and the next one, held pages are held (named file or fd store) but not
  pinned; the next agent pins what it recovers before it reads its frames.
- Unpinning can lag behind :meth:`Pinner.unpin` on older kernels (6.1 drops the old
  buffer table node from a work item): the page is then freed a moment after the punch.
  That delays a release, it never advances one.
- Where io_uring is missing (Linux < 5.13 lacks sparse tables and updates, unless its
  stable kernel carries a later io_uring: Debian 11's 5.10 pins), disabled
  (``kernel.io_uring_disabled``), filtered by seccomp, or refuses the mapping, the pinner
  says so in :attr:`Pinner.unavailable` and pins nothing; the arena then relies on
  re-reading frames right before each report (:meth:`Arena.verify`), which catches a move
  that already happened but not one racing the report.

Measured on this project's dev kernel (Linux 6.18, x86-64, one node), 2 MiB held pages:

- ``echo offline > /sys/devices/system/memory/memoryN/state`` on a 128 MiB block holding
  64 unpinned held pages migrated all 64 to new frames (and freed the old ones); with the
  pins the offline kept retrying until interrupted (8 s), the block stayed online and no
  frame changed (tests/host/test_holding.py repeats this, pinned then unpinned).
- runtime 1 GiB pages (``hugepages-1048576kB/nr_hugepages``) with 8000 unpinned held pages:
  two 1 GiB pages came from ranges without hugetlb pages, further ones failed at once, and
  no held page moved. That kernel does not migrate in-use 2 MiB hugetlb pages to build a
  gigantic page; CMA (``cma_alloc``) and offlining do.
- cost: pinning adds about 20 us per block to a fill (1024 blocks: 204 -> 224 ms) and
  3 ms per 1024 blocks to a release; re-reading 1024 frames takes about 3 ms.

Limits: the kernel caps a table at ``IORING_MAX_REG_BUFFERS`` (16384) entries, so an arena
with more slots gets more rings; a buffer may be at most 1 GiB (one block is 2 MiB).
Pinned pages count against RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK (the unit
grants it and sets LimitMEMLOCK=infinity).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from typing import Dict, List, Optional, Tuple

SYS_IO_URING_SETUP = 425
SYS_IO_URING_REGISTER = 427
IORING_REGISTER_BUFFERS = 0
IORING_UNREGISTER_BUFFERS = 1
IORING_REGISTER_BUFFERS_UPDATE = 16
#: include/uapi/linux/io_uring.h sizes: struct io_uring_params, io_uring_rsrc_update2
_PARAMS_SIZE = 120
MAX_TABLE = 1 << 14
_IO_URING_DISABLED = "/proc/sys/kernel/io_uring_disabled"


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _RsrcUpdate2(ctypes.Structure):
    _fields_ = [
        ("offset", ctypes.c_uint32),
        ("resv", ctypes.c_uint32),
        ("data", ctypes.c_uint64),
        ("tags", ctypes.c_uint64),
        ("nr", ctypes.c_uint32),
        ("resv2", ctypes.c_uint32),
    ]


log = logging.getLogger("aerate-agent.pin")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _uring_setup() -> int:
    params = ctypes.create_string_buffer(_PARAMS_SIZE)
    fd = _syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_uint(1), params)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
    return int(fd)


def _uring_register(fd: int, opcode: int, arg: object, nr: int) -> int:
    while True:
        ret = _syscall(
            ctypes.c_long(SYS_IO_URING_REGISTER),
            ctypes.c_int(fd),
            ctypes.c_uint(opcode),
            arg,
            ctypes.c_uint(nr),
        )
        if ret >= 0:
            return int(ret)
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"io_uring_register(opcode {opcode}): {os.strerror(err)}")


def _disabled_reason() -> Optional[str]:
    try:
        with open(_IO_URING_DISABLED) as f:
            value = f.read().strip()
    except OSError:
        return None  # kernels before 6.6 have no such switch
    if value == "2":
        return f"io_uring is disabled ({_IO_URING_DISABLED}=2)"
    return None


class Pinner:
    """Long-term pins on ``slots`` fixed-size blocks of one mapping, by slot index.

    ``base`` is the mapping's address and ``block_bytes`` the size of a slot. Construction
    never raises for a kernel that cannot pin: :attr:`unavailable` then says why, and
    :meth:`pin` returns False.
    """

    def __init__(self, base: int, block_bytes: int, slots: int) -> None:
        self.base = base
        self.block_bytes = block_bytes
        self.slots = slots
        self._rings: List[int] = []
        self._pinned: Dict[int, bool] = {}
        #: "" while pins work, else why they do not (a stated weakness, for status lines)
        self.unavailable = ""
        reason = _disabled_reason()
        if reason:
            self.unavailable = reason
            return
        try:
            for first in range(0, slots, MAX_TABLE):
                n = min(MAX_TABLE, slots - first)
                ring = _uring_setup()
                self._rings.append(ring)
                empty = (_Iovec * n)()  # NULL entries: a sparse table (Linux 5.13+)
                _uring_register(ring, IORING_REGISTER_BUFFERS, empty, n)
        except OSError as exc:
            self.close()
            self.unavailable = self._explain(exc)

    @staticmethod
    def _explain(exc: OSError) -> str:
        if exc.errno == errno.ENOSYS:
            return f"no io_uring in this kernel ({exc}); held pages are not pinned"
        if exc.errno == errno.EPERM:
            return (f"io_uring refused ({exc}): seccomp filter (SystemCallFilter=) or "
                    "kernel.io_uring_disabled; held pages are not pinned")
        if exc.errno == errno.EINVAL:
            return (f"io_uring has no sparse buffer tables here ({exc}; Linux 5.13+); "
                    "held pages are not pinned")
        return f"io_uring buffer registration failed ({exc}); held pages are not pinned"

    def _where(self, slot: int) -> Tuple[int, int]:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside the pinner's {self.slots} slots")
        return self._rings[slot // MAX_TABLE], slot % MAX_TABLE

    def _update(self, slot: int, addr: int, length: int) -> None:
        ring, index = self._where(slot)
        iov = _Iovec(addr, length)
        up = _RsrcUpdate2(index, 0, ctypes.addressof(iov), 0, 1, 0)
        _uring_register(ring, IORING_REGISTER_BUFFERS_UPDATE, ctypes.byref(up),
                        ctypes.sizeof(up))

    def pin(self, slot: int) -> bool:
        """Pin the block of ``slot`` (FOLL_LONGTERM); False when pins are unavailable.

        Read the block's frames after this call: the pin may have migrated the page first.
        OSError when the kernel refuses this one pin (the caller counts and carries on).
        """
        if self.unavailable:
            return False
        if self._pinned.get(slot):
            return True
        self._update(slot, self.base + slot * self.block_bytes, self.block_bytes)
        self._pinned[slot] = True
        return True

    def unpin(self, slot: int) -> None:
        """Drop the pin of ``slot`` (no-op when it has none)."""
        if not self._pinned.pop(slot, False):
            return
        self._update(slot, 0, 0)

    def is_pinned(self, slot: int) -> bool:
        """Whether ``slot`` carries a pin now."""
        return bool(self._pinned.get(slot))

    def pinned_count(self) -> int:
        """How many slots are pinned now."""
        return len(self._pinned)

    def close(self) -> None:
        """Drop every pin, now. Closing a ring alone would drop them later, from the
        ring's exit work item, so a page the caller punches meanwhile would stay allocated
        (and counted as surplus) for a moment; unregistering first is synchronous."""
        for ring in self._rings:
            if self._pinned:
                try:
                    _uring_register(ring, IORING_UNREGISTER_BUFFERS, None, 0)
                except OSError as exc:
                    # The close below drops them all the same, only a moment later.
                    log.debug("io_uring buffer unregistration failed (%s); closing the ring",
                              exc)
            os.close(ring)
        self._rings = []
        self._pinned.clear()
