"""The arena: free memory pulled out of the guest kernel and held while the host reclaims it.

Two implementations behind one small interface (:class:`Arena`):

:class:`HugetlbArena` (preferred) is a hugetlb memfd of 2 MiB pages taken as surplus pages
(see :mod:`aerate.agent.hugetlb`). Each block is one hugetlb page, which the kernel allocates
as exactly one order-9 buddy block, so a fill takes order-9 blocks out of the buddy allocator
and a release (``fallocate(PUNCH_HOLE)``) frees them straight back. The pages live in a
hugetlbfs file, not in the agent: a *named* file on the host's hugetlbfs mount
(:mod:`aerate.agent.carrier`, preferred: it needs no service manager) or a memfd kept in
systemd's fd store (fallback); either way they survive an agent crash. A named file is
unlinked only when it holds no page (:meth:`Arena.close`).

Pins (S3): held hugetlb blocks carry a ``FOLL_LONGTERM`` pin through io_uring buffer
registration (:mod:`aerate.agent.pin`) from the moment :meth:`HugetlbArena.fill` adopts
them until their release; their frames are read after the pin, because taking the pin may
migrate a page out of ZONE_MOVABLE/CMA first. Measured on Linux 6.18: offlining a memory
block migrated every unpinned held page in it to new frames and freed the old ones; with
the pins the offline could not finish and no frame changed (tests/host/test_holding.py).
The pins live in the agent process, so between a dead agent and its successor held pages
are unpinned; the successor pins what it recovers before reading its frames.

What can still move a held hugetlb page (its PFN changes; :meth:`Arena.verify` notices):
normal compaction -- kcompactd, direct compaction, proactive compaction and writes to
/proc/sys/vm/compact_memory -- skips hugetlb pages, as do NUMA balancing, reclaim, swap and
khugepaged. Only these migrate them: ``alloc_contig_range()`` users (CMA allocations,
runtime allocation of gigantic 1 GiB pages, virtio-mem unplug), memory offlining (memory
hot-remove, ``echo offline > /sys/devices/system/memory/memoryN/state``), soft offlining
(``/sys/devices/system/memory/soft_offline_page``, ``MADV_SOFT_OFFLINE``, corrected-error
handling) and ``move_pages``/``migrate_pages``/``mbind(MPOL_MF_MOVE)`` by a process that
maps the memfd. All are rare and root-driven. The pin stops them where io_uring works; the
engine re-reads frames with :meth:`Arena.verify` right before each report either way, and
a moved block is an incident (logged at warning, counted in :attr:`Arena.counters`).

:class:`ThpArena` (fallback) is a mapping with ``MADV_HUGEPAGE`` and ``mlock``; only slots
that came back as one aligned, contiguous 2 MiB run are kept. It is weaker and says so in
``weakness``: mlock does not stop compaction from migrating the pages
(``vm.compact_unevictable_allowed``), and unless shmem THP is enabled its backing is
anonymous memory that dies with the agent (no recovery after a crash). It cannot keep
S2/S3, so it does not report unless the operator opts in (``allow_weak_arena``;
:attr:`Arena.reporting_refusal`).

Recovery (an arena rebuilt from a previous agent's file or fd) holds every block it finds,
whatever shape it is in, and hands them all to the caller as orphans: the arena cannot
know which of them were reported, so it never releases any of them by itself.
"""

from __future__ import annotations

import abc
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from aerate.agent.hugetlb import HUGE_2M_KB, BudgetError, SurplusBudget, read_pool
from aerate.agent.pagemap import PAGE_SIZE, contiguous_runs, read_pagemap
from aerate.agent.pin import Pinner

log = logging.getLogger("aerate-agent.arena")

BLOCK_BYTES = HUGE_2M_KB * 1024
BLOCK_PAGES = BLOCK_BYTES // PAGE_SIZE
ARENA_NAME = "aerate-arena"

_PROT_RW = 0x1 | 0x2
_MAP_SHARED = 0x01
_MAP_PRIVATE = 0x02
_MAP_FIXED = 0x10
_MAP_ANONYMOUS = 0x20
_MAP_NORESERVE = 0x4000
_MADV_DONTNEED = 4
_MADV_DONTFORK = 10
_MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_MFD_CLOEXEC = 0x0001
_MFD_HUGETLB = 0x0004
_MFD_HUGE_2MB = 21 << 26
_SEEK_DATA = 3
_SEEK_HOLE = 4
_SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
_SHMEM_THP_2M = "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled"
_COMPACT_UNEVICTABLE = "/proc/sys/vm/compact_unevictable_allowed"


class ArenaError(RuntimeError):
    """An arena operation failed; the message says which and what to do."""


class ArenaUnavailable(ArenaError):
    """This kind of arena cannot work on this kernel or configuration (reason in message)."""


class _Libc:
    """The few libc calls the standard library does not offer, with errno kept."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        vp, sz, ci, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int64
        self.mmap = lib.mmap
        self.mmap.argtypes = [vp, sz, ci, ci, ci, i64]
        self.mmap.restype = vp
        self.munmap = lib.munmap
        self.munmap.argtypes = [vp, sz]
        self.madvise = lib.madvise
        self.madvise.argtypes = [vp, sz, ci]
        self.mlock = lib.mlock
        self.mlock.argtypes = [vp, sz]
        self.munlock = lib.munlock
        self.munlock.argtypes = [vp, sz]
        self.fallocate = lib.fallocate
        self.fallocate.argtypes = [ci, ci, i64, i64]


_libc = _Libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def _errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _mmap(addr: int, length: int, flags: int, fd: int = -1) -> int:
    got = _libc.mmap(addr or None, length, _PROT_RW, flags, fd, 0)
    if got is None or got == _MAP_FAILED:
        raise _errno_error(f"mmap of {length} bytes")
    return int(got)


def _reserve_aligned(length: int) -> Tuple[int, int]:
    """Reserve address space; return (raw base, BLOCK_BYTES-aligned start) of ``length``."""
    raw = _mmap(0, length + BLOCK_BYTES, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE)
    return raw, -(-raw // BLOCK_BYTES) * BLOCK_BYTES


def _madvise(addr: int, length: int, advice: int) -> int:
    """madvise(); return 0 or the errno (callers decide which errors are fatal)."""
    if _libc.madvise(addr, length, advice) == 0:
        return 0
    return ctypes.get_errno()


def _punch(fd: int, offset: int, length: int) -> None:
    while _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        if ctypes.get_errno() != errno.EINTR:
            raise _errno_error(f"punching {length} bytes at offset {offset} of fd {fd}")


def _allocate(fd: int, offset: int, length: int) -> int:
    """fallocate(mode 0); return 0 or errno, retrying EINTR."""
    while _libc.fallocate(fd, 0, offset, length):
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return err
    return 0


def _touch_read(addr: int, length: int, step: int) -> None:
    """Read one byte per ``step`` so the range gets mapped (no allocation for file pages)."""
    for off in range(0, length, step):
        ctypes.string_at(addr + off, 1)


def _spans(offsets: Iterable[int]) -> List[Tuple[int, int]]:
    """Group block offsets into (offset, length) spans of consecutive blocks."""
    spans: List[Tuple[int, int]] = []
    for off in sorted(offsets):
        if spans and spans[-1][0] + spans[-1][1] == off:
            spans[-1] = (spans[-1][0], spans[-1][1] + BLOCK_BYTES)
        else:
            spans.append((off, BLOCK_BYTES))
    return spans


@dataclass(frozen=True)
class Block:
    """One held block: ``nr_pages`` base pages from frame ``pfn`` at arena byte ``offset``."""

    pfn: int
    nr_pages: int
    offset: int

    @property
    def phys_addr(self) -> int:
        """Guest-physical address of the first byte."""
        return self.pfn * PAGE_SIZE

    @property
    def nbytes(self) -> int:
        """Length in bytes."""
        return self.nr_pages * PAGE_SIZE


class Arena(abc.ABC):
    """Held free memory, in blocks of ``granule_bytes``, at most ``capacity`` of them.

    ``kind`` names the implementation; ``weakness`` is None when held blocks keep their
    frames and survive an agent crash (with the fd in the fd store), else a sentence saying
    what does not hold, for status lines.
    """

    kind = "abstract"
    granule_bytes = BLOCK_BYTES
    weakness: Optional[str] = None
    #: The operator's ``allow_weak_arena`` setting; the engine keeps it current.
    allow_weak_arena = False

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"arena capacity must be at least one block, got {capacity}")
        self.capacity = capacity
        self._held: Dict[int, Block] = {}
        self._base = 0
        self._raw_base = 0
        self._map_len = 0
        self._fd: Optional[int] = None
        #: The named hugetlbfs file that carries the pages, or None (memfd / anonymous).
        self.path: Optional[str] = None
        self._pinner: Optional[Pinner] = None
        self._incidents = {"pin_failed": 0, "moved": 0, "verified": 0}

    @property
    def carrier(self) -> str:
        """What keeps held pages when the agent dies: "file", "memfd" (needs the fd store)
        or "none" (anonymous memory)."""
        if self.path is not None:
            return "file"
        return "memfd" if self._fd is not None else "none"

    @property
    def counters(self) -> Dict[str, int]:
        """Pin and re-check figures for status: ``pinned`` (blocks pinned now),
        ``pin_unavailable`` (1 when this arena cannot pin at all), ``pin_failed`` (pins
        the kernel refused), ``verified`` (blocks re-checked), ``moved`` (blocks found on
        another frame than recorded: each one an incident)."""
        pinner = self._pinner
        out = dict(self._incidents)
        out["pinned"] = pinner.pinned_count() if pinner is not None else 0
        out["pin_unavailable"] = int(pinner is None or bool(pinner.unavailable))
        return out

    def refusal(self, allow_weak: bool) -> str:
        """Why this arena must not report ("" = it may), given ``allow_weak_arena``."""
        return ""

    def unpin(self, blocks: Iterable[Block]) -> None:
        """Drop the pins of held blocks; they stay held (re-check them with ``verify``
        before a report). The engine has no use for it; tests compare pinned and unpinned
        blocks under the same migration trigger with it."""
        chosen = self._checked(blocks)
        if self._pinner is not None:
            for block in chosen:
                self._pinner.unpin(block.offset // BLOCK_BYTES)

    @property
    def reporting_refusal(self) -> str:
        """Why reports from this arena are refused ("" = they are not), with the current
        :attr:`allow_weak_arena`. Non-empty for arenas that cannot keep S2/S3."""
        return self.refusal(self.allow_weak_arena)

    def held(self) -> List[Block]:
        """The blocks held now, in arena order."""
        return [self._held[off] for off in sorted(self._held)]

    def _free_slots(self, n: int) -> List[int]:
        # Lowest offsets first keeps the memfd dense, which makes recovery cheap.
        out: List[int] = []
        for slot in range(self.capacity):
            if len(out) >= n:
                break
            if slot * BLOCK_BYTES not in self._held:
                out.append(slot * BLOCK_BYTES)
        return out

    def _checked(self, blocks: Iterable[Block]) -> List[Block]:
        chosen = list({b.offset: b for b in blocks}.values())  # one entry per slot
        for block in chosen:
            if block.offset not in self._held:
                raise ArenaError(
                    f"{self.kind} arena does not hold a block at offset {block.offset}; "
                    "refusing to touch it"
                )
        return chosen

    def _hold(self, off: int, pfn: int) -> Block:
        """Record the slot at ``off`` as a held block starting at frame ``pfn``."""
        block = Block(pfn, BLOCK_PAGES, off)
        self._held[off] = block
        return block

    def _forget(self, chosen: Iterable[Block]) -> None:
        """Discard checked held blocks, a span of adjacent slots at a time, and stop holding
        them. On failure the span that failed and those after it stay held."""
        try:
            for off, length in _spans(b.offset for b in chosen):
                slots = range(off // BLOCK_BYTES, (off + length) // BLOCK_BYTES)
                if self._pinner is not None:
                    # Unpin first: a pinned page that is punched stays allocated until the
                    # pin goes (a late release, never an early one).
                    for slot in slots:
                        self._pinner.unpin(slot)
                try:
                    self._discard(off, length)
                except OSError:
                    # Still held, so pinned again (best effort: a refused pin is counted).
                    self._pin([slot * BLOCK_BYTES for slot in slots])
                    raise
                for o in range(off, off + length, BLOCK_BYTES):
                    del self._held[o]
        except OSError as exc:
            raise ArenaError(f"releasing {self.kind} arena blocks failed: {exc}") from exc

    def _pin(self, offsets: Sequence[int]) -> None:
        """Pin each block (before its frame is read: pinning may migrate it first)."""
        if self._pinner is None or self._pinner.unavailable:
            return
        for off in offsets:
            try:
                self._pinner.pin(off // BLOCK_BYTES)
            except OSError as exc:
                self._incidents["pin_failed"] += 1
                log.warning("cannot pin the held block at arena offset %d: %s; it is "
                            "re-checked before each report only", off, exc)

    @abc.abstractmethod
    def _discard(self, off: int, length: int) -> None:
        """Hand the pages of ``length`` bytes of slots at ``off`` back to the kernel."""

    @abc.abstractmethod
    def fill(self, n: int) -> List[Block]:
        """Take up to ``n`` more blocks; return the new ones (fewer when memory runs short)."""

    @abc.abstractmethod
    def release(self, blocks: Iterable[Block]) -> None:
        """Give held blocks back to the kernel. Only after S2 allows it."""

    @abc.abstractmethod
    def verify(self, blocks: Iterable[Block]) -> List[Block]:
        """Return those of the given held blocks whose frames changed; ``held()`` then shows
        the frames as they are now. Call it before reporting blocks that were held a while."""

    def fileno(self) -> Optional[int]:
        """The file that carries the held pages across a restart, or None (anonymous
        backing: nothing survives the agent)."""
        return self._fd

    def close(self) -> None:
        """Unpin, unmap and close. Held pages of a named file stay in it (the file is
        removed only when it holds no page at all); a memfd's pages are freed unless its fd
        lives on (fd store)."""
        if self._pinner is not None:
            self._pinner.close()
            self._pinner = None
        if self._map_len:
            _libc.munmap(self._raw_base, self._map_len)
            self._map_len = 0
        if self._fd is not None:
            if self.path is not None:
                self._unlink_if_empty()
            os.close(self._fd)
            self._fd = None
        self._held.clear()

    def _unlink_if_empty(self) -> None:
        # st_blocks is what the file holds, whatever the bookkeeping says: a file with any
        # page left is kept for the next agent (S3), an empty one has nothing to carry.
        assert self._fd is not None and self.path is not None
        try:
            if os.fstat(self._fd).st_blocks == 0:
                os.unlink(self.path)
        except OSError as exc:
            log.warning("cannot remove the empty arena file %s: %s", self.path, exc)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def recover(fd: int, budget: Optional[SurplusBudget] = None) -> Arena:
        """Rebuild an arena from a memfd a previous agent left (the new arena owns ``fd``).

        A hugetlb memfd needs the ``budget`` so later releases restore the knob. Every
        block found is held; the caller gets them from ``held()`` and must treat them all
        as possibly reported (orphans).
        """
        st = os.fstat(fd)
        if st.st_blksize == BLOCK_BYTES:
            if budget is None:
                raise ValueError("recovering a hugetlb arena needs its SurplusBudget")
            return HugetlbArena._recover(fd, budget)
        return ThpArena._recover(fd)


def _lock(fd: int, path: str) -> None:
    # One agent per arena file, whatever its run directory: a second one would punch the
    # first one's held (maybe reported) pages during its recovery probe.
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        raise ArenaError(
            f"{path} is locked by another process ({exc}): only one aerate-agent may use an "
            "arena file; stop the other agent"
        ) from exc


class HugetlbArena(Arena):
    """Surplus 2 MiB hugetlb pages in a memfd; see the module docstring."""

    kind = "hugetlb"

    def __init__(self, capacity: int, budget: SurplusBudget, *, path: Optional[str] = None,
                 pin: bool = True, _fd: Optional[int] = None) -> None:
        """A new arena of ``capacity`` slots: in the named hugetlbfs file ``path`` (created;
        it must not exist) or, with ``path`` None, in a memfd. ``pin=False`` leaves held
        blocks unpinned (tests compare the two)."""
        super().__init__(capacity)
        self._budget = budget
        size = capacity * BLOCK_BYTES
        if _fd is None and path is not None:
            fd = self._create_named(path, size)
        elif _fd is None:
            try:
                fd = os.memfd_create(ARENA_NAME, _MFD_HUGETLB | _MFD_HUGE_2MB | _MFD_CLOEXEC)
            except OSError as exc:
                raise ArenaUnavailable(
                    f"memfd_create(MFD_HUGETLB|MFD_HUGE_2MB) failed: {exc}; the kernel needs "
                    "hugetlbfs with 2 MiB pages (Linux 4.14+)"
                ) from exc
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                raise
        else:
            fd = _fd
        self._fd = fd
        self.path = path
        try:
            # NORESERVE: pages are allocated by fallocate, never reserved through the mapping.
            self._raw_base, self._base = _reserve_aligned(size)
            self._map_len = size + BLOCK_BYTES
            _mmap(self._base, size, _MAP_SHARED | _MAP_FIXED | _MAP_NORESERVE, fd)
            # Children the agent spawns need none of it (and fork would copy its page tables).
            _madvise(self._base, size, _MADV_DONTFORK)
        except OSError as exc:
            if _fd is not None:
                self._fd = None  # a recovering caller keeps its fd
            self.close()
            raise ArenaError(f"cannot map the hugetlb arena ({size} bytes): {exc}") from exc
        self._pinner = Pinner(self._base, BLOCK_BYTES, capacity) if pin else None
        if self._pinner is None:
            self.weakness = "held pages are not pinned (pinning turned off)"
        elif self._pinner.unavailable:
            self.weakness = (
                f"{self._pinner.unavailable}: memory offlining, CMA or migrate_pages may move "
                "a held page; frames are re-checked before each report only"
            )

    @staticmethod
    def _create_named(path: str, size: int) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ArenaUnavailable(f"cannot create the arena file {path}: {exc}") from exc
        try:
            _lock(fd, path)
            if os.fstat(fd).st_blksize != BLOCK_BYTES:
                raise ArenaUnavailable(f"{path} is not on a hugetlbfs mount of 2 MiB pages")
            os.ftruncate(fd, size)
        except (OSError, ArenaError):
            os.unlink(path)  # just created, holds nothing
            os.close(fd)
            raise
        return fd

    @classmethod
    def open_named(cls, path: str, budget: SurplusBudget) -> HugetlbArena:
        """Recover the arena a previous agent left in the named file ``path``."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ArenaError(f"cannot open the arena file {path}: {exc}") from exc
        try:
            _lock(fd, path)
            if os.fstat(fd).st_blksize != BLOCK_BYTES:
                raise ArenaError(f"{path} is not a file of 2 MiB hugetlbfs pages; move it away")
            return cls._recover(fd, budget, path)
        except BaseException:
            os.close(fd)
            raise

    def _discard(self, off: int, length: int) -> None:
        # Punching frees the surplus pages straight back to the buddy allocator.
        assert self._fd is not None
        _punch(self._fd, off, length)

    def _pfns(self, offsets: Sequence[int]) -> Dict[int, Optional[int]]:
        """Map each block offset to the frame of its first page, reading one entry per block."""
        out: Dict[int, Optional[int]] = {}
        for start, length in _spans(offsets):
            heads = read_pagemap(self._base + start, length // PAGE_SIZE, stride=BLOCK_PAGES)
            for i, pfn in enumerate(heads):
                out[start + i * BLOCK_BYTES] = pfn
        return out

    def _map_blocks(self, offsets: Sequence[int]) -> Dict[int, Optional[int]]:
        # A read fault on an existing hugetlb page only maps it; offsets here always hold one.
        for off in offsets:
            _touch_read(self._base + off, 1, 1)
        return self._pfns(offsets)

    def _check_pool(self) -> None:
        pool = read_pool(HUGE_2M_KB)
        if pool.free_unreserved:
            raise ArenaError(
                f"the persistent 2 MiB hugepage pool has {pool.free_unreserved} free pages; "
                "a hugetlb fill would take those before surplus pages and starve their users. "
                "Shrink nr_hugepages to what is used or let the agent use the THP arena"
            )

    def fill(self, n: int) -> List[Block]:
        """Allocate up to ``n`` surplus hugepages with fallocate; stop at the first ENOSPC."""
        if self._fd is None:
            raise ArenaError("hugetlb arena is closed")
        slots = self._free_slots(n)
        if not slots:
            return []
        self._check_pool()
        self._budget.set(len(self._held) + len(slots))
        got: List[int] = []
        try:
            for off in slots:
                err = _allocate(self._fd, off, BLOCK_BYTES)
                if err in (errno.ENOSPC, errno.ENOMEM):
                    break  # no free order-9 block (or budget): a short fill, not an error
                if err:
                    raise ArenaError(
                        f"fallocate of a 2 MiB hugetlb page at arena offset {off} failed: "
                        f"{os.strerror(err)}"
                    )
                got.append(off)
            new = self._adopt(got)
        finally:
            self._budget.set(len(self._held))
        return new

    def _adopt(self, offsets: Sequence[int], fresh: bool = True) -> List[Block]:
        """Map, pin and read the frames of pages at ``offsets``, and hold them.

        ``fresh`` pages were just allocated by a fill and were never reported, so on a
        failure they are punched back. Recovered pages (``fresh=False``) may have been
        reported by the previous agent: they are held whatever pagemap says and never
        punched here (the caller releases them as orphans when S2 allows).
        """
        new: List[Block] = []
        if not offsets:
            return new
        try:
            self._map_blocks(offsets)
            self._pin(offsets)
            pfns = self._pfns(offsets)
        except Exception:
            if fresh and self._fd is not None:
                self._unfill(offsets)
            raise
        bad = [off for off in offsets if pfns[off] is None or (pfns[off] or 0) % BLOCK_PAGES]
        if bad and fresh:
            self._unfill(offsets)
            raise ArenaError(
                f"hugetlb page at arena offset {bad[0]} shows frame {pfns[bad[0]]} in pagemap, "
                "not an aligned 2 MiB page; the arena cannot trust its PFNs on this kernel"
            )
        for off in offsets:
            pfn = pfns[off]
            if off in bad:
                log.warning("recovered arena block at offset %d shows frame %s in pagemap; "
                            "held as an orphan all the same", off, pfn)
            new.append(self._hold(off, pfn or 0))
        return new

    def _unfill(self, offsets: Sequence[int]) -> None:
        """Give back pages a fill allocated but could not adopt (never reported)."""
        assert self._fd is not None
        for off in offsets:
            if self._pinner is not None:
                self._pinner.unpin(off // BLOCK_BYTES)
        for off, length in _spans(offsets):
            _punch(self._fd, off, length)

    def release(self, blocks: Iterable[Block]) -> None:
        """Punch the blocks out of the memfd: the surplus pages go back to the buddy allocator."""
        chosen = self._checked(blocks)
        if self._fd is None:
            raise ArenaError("hugetlb arena is closed")
        try:
            self._forget(chosen)
        finally:
            self._budget.set(len(self._held))

    def verify(self, blocks: Iterable[Block]) -> List[Block]:
        """Re-read pagemap for the given held blocks; return those whose frame changed.

        The returned blocks are the ones passed in (what was reported); ``held()`` shows
        their new frames afterwards.
        """
        chosen = self._checked(blocks)
        offsets = [b.offset for b in chosen]
        pfns = self._pfns(offsets)
        unmapped = [off for off in offsets if pfns[off] is None]
        if unmapped:
            pfns.update(self._map_blocks(unmapped))
        self._incidents["verified"] += len(chosen)
        changed: List[Block] = []
        for block in chosen:
            pfn = pfns[block.offset]
            if pfn != block.pfn:
                if pfn is None:
                    raise ArenaError(f"held hugetlb block at offset {block.offset} vanished")
                self._held[block.offset] = Block(pfn, block.nr_pages, block.offset)
                changed.append(block)
                self._incidents["moved"] += 1
                pinned = self._pinner is not None and self._pinner.is_pinned(
                    block.offset // BLOCK_BYTES)
                log.warning("held hugetlb block at arena offset %d moved from frame %d to %d "
                            "(%s): a report naming the old frame is unsafe",
                            block.offset, block.pfn, pfn, "pinned" if pinned else "not pinned")
        return changed

    @classmethod
    def _recover(cls, fd: int, budget: SurplusBudget, path: Optional[str] = None
                 ) -> HugetlbArena:
        st = os.fstat(fd)
        capacity = st.st_size // BLOCK_BYTES
        if capacity < 1 or st.st_size % BLOCK_BYTES:
            raise ArenaError(
                f"{path or 'fd %d' % fd} is a hugetlb file of {st.st_size} bytes, not an "
                "aerate arena; if no agent runs, remove it"
            )
        arena = cls(capacity, budget, path=path, _fd=fd)
        try:
            arena._adopt(arena._probe_present(st.st_blocks * 512 // BLOCK_BYTES), fresh=False)
        except BaseException:
            arena._fd = None  # the caller still owns fd on failure
            arena.close()
            raise
        budget.set(len(arena._held))
        return arena

    def _probe_present(self, count: int) -> List[int]:
        """Find which slots hold a page, given ``count`` (from st_blocks) pages in the file.

        hugetlbfs has no SEEK_DATA, mapping a hole would allocate it, and a hole reads as
        zeros. fallocate on an existing page is a no-op, so probe each slot with it and watch
        st_blocks: unchanged means a page was there; grown means it was a hole, whose fresh
        page is punched straight back; ENOSPC means a hole too. Slots are filled lowest
        first, so the probe usually stops after ``count`` slots.
        """
        assert self._fd is not None
        present: List[int] = []
        for slot in range(self.capacity):
            if len(present) >= count:
                break
            off = slot * BLOCK_BYTES
            before = os.fstat(self._fd).st_blocks
            err = _allocate(self._fd, off, BLOCK_BYTES)
            if err in (errno.ENOSPC, errno.ENOMEM):
                continue
            if err:
                raise ArenaError(f"probing arena offset {off} failed: {os.strerror(err)}")
            if os.fstat(self._fd).st_blocks > before:
                _punch(self._fd, off, BLOCK_BYTES)
            else:
                present.append(off)
        return present


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _selected(setting: Optional[str]) -> Optional[str]:
    """The bracketed choice of a sysfs multiple-choice file ("always [madvise] never")."""
    if setting is None or "[" not in setting:
        return setting
    return setting.split("[", 1)[1].split("]", 1)[0]


def shmem_thp_advisable() -> bool:
    """Whether MADV_HUGEPAGE gets 2 MiB THPs for a shmem memfd on this kernel."""
    per_size = _selected(_read_text(_SHMEM_THP_2M))
    if per_size not in (None, "inherit"):
        return per_size in ("always", "within_size", "advise")
    return _selected(_read_text(_SHMEM_THP)) in ("always", "within_size", "advise", "force")


class ThpArena(Arena):
    """THP-backed fallback: MADV_HUGEPAGE + mlock, keeping only aligned contiguous slots.

    ``backing`` is "memfd" (shmem: the fd store can carry it), "anon", or "auto" (memfd when
    shmem THP can be advised, else anon).
    """

    kind = "thp"

    def __init__(self, capacity: int, backing: str = "auto", *, _fd: Optional[int] = None) -> None:
        super().__init__(capacity)
        if backing == "auto":
            backing = "memfd" if _fd is not None or shmem_thp_advisable() else "anon"
        if backing not in ("memfd", "anon"):
            raise ValueError(f"THP arena backing must be auto, memfd or anon, not {backing!r}")
        self.backing = backing
        size = capacity * BLOCK_BYTES
        if backing == "memfd":
            if _fd is not None:
                self._fd = _fd
            else:
                self._fd = os.memfd_create(ARENA_NAME, _MFD_CLOEXEC)
                try:
                    os.ftruncate(self._fd, size)
                except OSError:
                    os.close(self._fd)
                    raise
        try:
            self._raw_base, self._base = _reserve_aligned(size)
            self._map_len = size + BLOCK_BYTES
            if self._fd is not None:
                _mmap(self._base, size, _MAP_SHARED | _MAP_FIXED, self._fd)
            err = _madvise(self._base, size, _MADV_HUGEPAGE)
            if err:
                raise OSError(err, f"madvise(MADV_HUGEPAGE): {os.strerror(err)}")
            # Without this a fork would make the held anonymous pages copy-on-write.
            _madvise(self._base, size, _MADV_DONTFORK)
        except OSError as exc:
            if _fd is not None:
                self._fd = None  # a recovering caller keeps its fd
            self.close()
            raise ArenaUnavailable(f"cannot set up a THP arena: {exc}") from exc
        unevictable = _read_text(_COMPACT_UNEVICTABLE)
        self.weakness = (
            "THP arena: pages are mlocked, not pinned; compaction "
            f"(vm.compact_unevictable_allowed={unevictable}), NUMA balancing and memory "
            "offlining may migrate them, so verify() before each report"
        )
        if self._fd is None:
            self.weakness += (
                "; anonymous backing dies with the agent, so held pages do not survive a "
                "crash (S3): enable shmem THP (transparent_hugepage/shmem_enabled=advise) "
                "for a memfd the fd store can carry"
            )

    def refusal(self, allow_weak: bool) -> str:
        """Non-empty unless ``allow_weak``: a THP arena cannot keep S2/S3."""
        if allow_weak:
            return ""
        return ("THP fallback arena: held pages are mlocked, not pinned, so they can be "
                "migrated, split or swapped, and " +
                ("anonymous backing dies with the agent" if self._fd is None else
                 "a memfd loses its mlock when the agent dies") +
                ": reports could name pages the guest uses again (S2/S3); statistics only "
                "unless allow_weak_arena=true")

    def _discard(self, off: int, length: int) -> None:
        addr = self._base + off
        _libc.munlock(addr, length)
        if self._fd is not None:
            _punch(self._fd, off, length)
        else:
            err = _madvise(addr, length, _MADV_DONTNEED)
            if err:
                raise OSError(err, f"madvise(MADV_DONTNEED) at {addr:#x}: {os.strerror(err)}")

    def _whole_run(self, off: int) -> Optional[int]:
        """The first frame if the slot is one aligned contiguous 2 MiB run, else None."""
        pfns = read_pagemap(self._base + off, BLOCK_PAGES)
        runs = contiguous_runs(pfns, BLOCK_PAGES)
        if len(runs) == 1 and runs[0].nr_pages == BLOCK_PAGES:
            return runs[0].pfn
        return None

    def fill(self, n: int) -> List[Block]:
        """mlock (which faults in, with THP) up to ``n`` slots; keep the aligned contiguous ones."""
        new: List[Block] = []
        for off in self._free_slots(n):
            addr = self._base + off
            if _libc.mlock(addr, BLOCK_BYTES):
                err = ctypes.get_errno()
                self._discard(off, BLOCK_BYTES)
                if err in (errno.ENOMEM, errno.EAGAIN):
                    break
                raise ArenaError(f"mlock of THP arena slot at {addr:#x}: {os.strerror(err)}")
            pfn = self._whole_run(off)
            if pfn is None:
                # Not a THP (fragmented memory): useless for 2 MiB reporting, give it back.
                self._discard(off, BLOCK_BYTES)
                continue
            new.append(self._hold(off, pfn))
        return new

    def release(self, blocks: Iterable[Block]) -> None:
        """munlock and discard the blocks (punch the memfd, or MADV_DONTNEED)."""
        self._forget(self._checked(blocks))

    def verify(self, blocks: Iterable[Block]) -> List[Block]:
        """Return the given blocks whose slot moved or split; ``held()`` shows moved slots'
        new frames, while a split slot keeps its old record and should be released."""
        changed: List[Block] = []
        for block in self._checked(blocks):
            pfn = self._whole_run(block.offset)
            if pfn != block.pfn:
                if pfn is not None:
                    self._held[block.offset] = Block(pfn, block.nr_pages, block.offset)
                changed.append(block)
        return changed

    @classmethod
    def _recover(cls, fd: int) -> ThpArena:
        st = os.fstat(fd)
        capacity = st.st_size // BLOCK_BYTES
        if capacity < 1 or st.st_size % BLOCK_BYTES:
            raise ArenaError(f"fd {fd} is a file of {st.st_size} bytes, not an aerate arena")
        arena = cls(capacity, "memfd", _fd=fd)
        try:
            for off in arena._data_slots(st.st_size):
                pfn = None
                if _libc.mlock(arena._base + off, BLOCK_BYTES) == 0:
                    pfn = arena._whole_run(off)
                if pfn is None:
                    # Not one aligned run *now*: it may have been one when it was reported
                    # and been split or moved since, so it is held like any other orphan.
                    heads = read_pagemap(arena._base + off, 1)
                    pfn = heads[0] if heads and heads[0] is not None else 0
                    log.warning("recovered THP arena slot at offset %d is no longer one "
                                "aligned 2 MiB run; held as an orphan all the same", off)
                arena._hold(off, pfn)
        except BaseException:
            arena._fd = None  # the caller still owns fd on failure
            arena.close()
            raise
        return arena

    def _data_slots(self, size: int) -> List[int]:
        """Slots of a shmem memfd that hold any data (shmem supports SEEK_DATA/SEEK_HOLE)."""
        assert self._fd is not None
        slots: List[int] = []
        pos = 0
        while pos < size:
            try:
                start = os.lseek(self._fd, pos, _SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(self._fd, start, _SEEK_HOLE)
            first = start // BLOCK_BYTES * BLOCK_BYTES
            for off in range(first, end, BLOCK_BYTES):
                if not slots or slots[-1] != off:
                    slots.append(off)
            pos = end
        return slots


def create_arena(capacity: int, budget: Optional[SurplusBudget],
                 path: Optional[str] = None) -> Arena:
    """The preferred arena this kernel allows: hugetlb, else THP (its weakness says why).

    With ``path`` the hugetlb arena is that named hugetlbfs file (see
    :mod:`aerate.agent.carrier`); if the file cannot be made there, a memfd (which needs the
    fd store to outlive the agent) is used instead and the weakness says why.

    A persistent 2 MiB pool with free pages rules hugetlb out too: every fill would refuse
    rather than take the operator's pages (see HugetlbArena.fill).
    """
    if budget is not None:
        try:
            pool = read_pool(HUGE_2M_KB)
            if pool.free_unreserved:
                raise ArenaUnavailable(
                    f"the persistent 2 MiB pool has {pool.free_unreserved} free pages"
                )
            if path is not None:
                try:
                    return HugetlbArena(capacity, budget, path=path)
                except ArenaUnavailable as exc:
                    arena = HugetlbArena(capacity, budget)
                    arena.weakness = "; ".join(
                        w for w in (f"no named arena file ({exc}): held pages outlive the "
                                    "agent only through the fd store", arena.weakness) if w)
                    return arena
            return HugetlbArena(capacity, budget)
        except (ArenaError, BudgetError, OSError) as exc:
            reason = f"hugetlb arena unavailable ({exc})"
    else:
        reason = "no surplus budget (hugetlb arena not requested)"
    thp = ThpArena(capacity)
    thp.weakness = f"{reason}; {thp.weakness}"
    return thp
