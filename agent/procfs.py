"""Kernel memory state for the aeration cycle: pure parsers and thin readers.

Every ``parse_*`` function takes the text (or bytes) of one kernel file and returns frozen
values; it does no I/O, so it is tested on files captured from real kernels
(``tests/data/proc/<kernel>/``). The ``read_*`` functions are thin: they read one file under
a root directory (default ``/``; a captured tree works the same) and hand it to the parser.
``read_snapshot`` reads everything the cycle needs and turns a missing or unreadable file
(no PSI, no pagetypeinfo, no kpageflags permission) into a stated :class:`Missing` with the
reason, never a crash and never a silent ``None``.

Units: buddyinfo, pagetypeinfo and zoneinfo count pages (of the kernel's page size);
meminfo values are bytes, except the ``HugePages_*`` counts; PSI totals are microseconds.

Python 3.8, standard library only.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import os
import re
import shlex
import struct
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import (
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Tuple,
    TypeVar,
)

# --------------------------------------------------------------------------- errors


class ProcParseError(ValueError):
    """A kernel file did not have the layout this parser knows.

    The message names the file, the line number and the line, so a report from a guest
    running an unexpected kernel says exactly what to look at.
    """

    def __init__(self, source: str, lineno: int, line: str, why: str) -> None:
        self.source = source
        self.lineno = lineno
        self.line = line
        where = "%s line %d" % (source, lineno) if lineno else source
        shown = line if len(line) <= 120 else line[:117] + "..."
        super().__init__("%s: %s: %r" % (where, why, shown) if line else "%s: %s" % (where, why))


def _int(source: str, lineno: int, line: str, token: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise ProcParseError(source, lineno, line, "expected an integer, got %r" % token) from None


# --------------------------------------------------------------------------- buddyinfo

_BUDDY_RE = re.compile(r"^Node\s+(\d+),\s+zone\s+(\S+)((?:\s+\d+)+)\s*$")


@dataclass(frozen=True)
class BuddyZone:
    """One line of /proc/buddyinfo: free blocks per order for one zone of one node.

    ``free[k]`` is the number of free blocks of ``2**k`` contiguous pages. Only populated
    zones appear in buddyinfo.
    """

    node: int
    zone: str
    free: Tuple[int, ...]

    @property
    def free_pages(self) -> int:
        """Free pages in the buddy allocator of this zone, all orders."""
        return sum(n << k for k, n in enumerate(self.free))

    def blocks_at_least(self, min_order: int) -> int:
        """Free blocks of ``2**min_order`` pages found inside free blocks of order >= min_order."""
        if min_order < 0:
            raise ValueError("min_order must be >= 0, got %d" % min_order)
        return sum(n << (k - min_order) for k, n in enumerate(self.free) if k >= min_order)


def parse_buddyinfo(text: str, source: str = "/proc/buddyinfo") -> Tuple[BuddyZone, ...]:
    """Parse /proc/buddyinfo into one :class:`BuddyZone` per line, in file order."""
    zones: List[BuddyZone] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _BUDDY_RE.match(line)
        if m is None:
            raise ProcParseError(
                source, lineno, line, "expected 'Node N, zone NAME' and one count per order"
            )
        counts = tuple(int(t) for t in m.group(3).split())
        if zones and len(counts) != len(zones[0].free):
            raise ProcParseError(
                source, lineno, line,
                "%d orders here but %d on the first line" % (len(counts), len(zones[0].free)),
            )
        zones.append(BuddyZone(int(m.group(1)), m.group(2), counts))
    if not zones:
        raise ProcParseError(source, 0, "", "no zones found (empty file?)")
    return tuple(zones)


# --------------------------------------------------------------------------- pagetypeinfo

# Since 5.6 the kernel stops counting a free list at 100000 and prints ">100000".
_PT_FREE_RE = re.compile(r"^Node\s+(\d+),\s+zone\s+(\S+),\s+type\s+(\S+)((?:\s+>?\d+)+)\s*$")
_PT_ZONE_RE = re.compile(r"^Node\s+(\d+),\s+zone\s+(\S+)((?:\s+\d+)+)\s*$")
_PT_FREE_HDR = "Free pages count per migrate type at order"
_PT_BLOCKS_HDR = "Number of blocks type"
_PT_MIXED_HDR = "Number of mixed blocks"


@dataclass(frozen=True)
class PageTypeFree:
    """Free blocks per order of one migrate type in one zone (a 'type' line of pagetypeinfo).

    Kernels >= 5.6 stop counting a list at 100000 blocks and print ">100000"; such orders are
    in ``capped`` and their ``free`` value is a lower bound.
    """

    node: int
    zone: str
    migratetype: str
    free: Tuple[int, ...]
    capped: FrozenSet[int] = frozenset()


@dataclass(frozen=True)
class PageTypeBlocks:
    """Pageblocks per migrate type in one zone (the 'Number of blocks type' table)."""

    node: int
    zone: str
    counts: Mapping[str, int] = field(hash=False)


@dataclass(frozen=True)
class PageTypeInfo:
    """/proc/pagetypeinfo: pageblock size, free lists per migrate type, pageblock counts.

    ``mixed`` holds the 'Number of mixed blocks' table, which only kernels with page_owner
    enabled print; it is empty otherwise.
    """

    pageblock_order: int
    pages_per_block: int
    free: Tuple[PageTypeFree, ...]
    blocks: Tuple[PageTypeBlocks, ...]
    mixed: Tuple[PageTypeBlocks, ...]

    @property
    def migratetypes(self) -> Tuple[str, ...]:
        """Migrate type names in the kernel's order (they differ between kernels and configs)."""
        seen: Dict[str, None] = {}
        for f in self.free:
            seen.setdefault(f.migratetype, None)
        return tuple(seen)

    def free_of(self, node: int, zone: str, migratetype: str) -> Optional[Tuple[int, ...]]:
        """Free blocks per order of one migrate type in one zone, or None if not listed."""
        for f in self.free:
            if (f.node, f.zone, f.migratetype) == (node, zone, migratetype):
                return f.free
        return None


def parse_pagetypeinfo(text: str, source: str = "/proc/pagetypeinfo") -> PageTypeInfo:
    """Parse /proc/pagetypeinfo. Multi-node files repeat the whole layout once per node."""
    block_order: Optional[int] = None
    per_block: Optional[int] = None
    n_orders: Optional[int] = None
    free: List[PageTypeFree] = []
    tables: Dict[str, List[PageTypeBlocks]] = {"blocks": [], "mixed": []}
    table: Optional[str] = None
    columns: Tuple[str, ...] = ()
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("Page block order:"):
            value = _int(source, lineno, line, s.split(":", 1)[1].strip())
            if block_order is not None and value != block_order:
                raise ProcParseError(source, lineno, line, "page block order changed")
            block_order, table = value, None
        elif s.startswith("Pages per block:"):
            per_block, table = _int(source, lineno, line, s.split(":", 1)[1].strip()), None
        elif s.startswith(_PT_FREE_HDR):
            orders = s[len(_PT_FREE_HDR):].split()
            if orders != [str(k) for k in range(len(orders))] or not orders:
                raise ProcParseError(source, lineno, line, "expected orders 0, 1, 2, ...")
            n_orders, table = len(orders), None
        elif s.startswith(_PT_BLOCKS_HDR) or s.startswith(_PT_MIXED_HDR):
            is_blocks = s.startswith(_PT_BLOCKS_HDR)
            hdr = _PT_BLOCKS_HDR if is_blocks else _PT_MIXED_HDR
            table, columns = ("blocks" if is_blocks else "mixed"), tuple(s[len(hdr):].split())
            if not columns:
                raise ProcParseError(source, lineno, line, "table header names no migrate type")
        elif s.startswith("Node"):
            m = _PT_FREE_RE.match(s)
            if m is not None:
                tokens = m.group(4).split()
                if n_orders is None or len(tokens) != n_orders:
                    raise ProcParseError(
                        source, lineno, line, "free-list line without a matching order header"
                    )
                free.append(PageTypeFree(
                    int(m.group(1)), m.group(2), m.group(3),
                    tuple(int(t.lstrip(">")) for t in tokens),
                    frozenset(k for k, t in enumerate(tokens) if t.startswith(">")),
                ))
                continue
            m = _PT_ZONE_RE.match(s)
            if m is None or table is None:
                raise ProcParseError(source, lineno, line, "unexpected zone line")
            counts = tuple(int(t) for t in m.group(3).split())
            if len(counts) != len(columns):
                raise ProcParseError(
                    source, lineno, line, "%d counts for %d migrate types" % (
                        len(counts), len(columns))
                )
            tables[table].append(PageTypeBlocks(
                int(m.group(1)), m.group(2), MappingProxyType(dict(zip(columns, counts)))
            ))
        else:
            raise ProcParseError(source, lineno, line, "unrecognised line")
    if block_order is None or per_block is None:
        raise ProcParseError(source, 0, "", "no 'Page block order'/'Pages per block' header")
    if per_block != 1 << block_order:
        raise ProcParseError(
            source, 0, "", "pages per block %d is not 2**%d" % (per_block, block_order)
        )
    return PageTypeInfo(block_order, per_block, tuple(free), tuple(tables["blocks"]),
                        tuple(tables["mixed"]))


# --------------------------------------------------------------------------- zoneinfo

_ZONE_HDR_RE = re.compile(r"^Node\s+(\d+),\s+zone\s+(\S+)\s*$")
_KV_RE = re.compile(r"^([A-Za-z_][\w()]*(?:\s[A-Za-z_][\w]*)*)\s*:?\s+(-?\d+)$")
_PROTECTION_RE = re.compile(r"^protection:\s*\(([-\d,\s]*)\)$")
#: Watermark block fields, printed right after "pages free" (boost/promo/cma on newer kernels,
#: scanned on very old ones).
_ZONE_FIELDS = frozenset(
    ["min", "low", "high", "spanned", "present", "managed", "boost", "promo", "cma", "scanned"]
)
_REQUIRED_ZONE_FIELDS = ("free", "min", "low", "high", "spanned", "present", "managed")


@dataclass(frozen=True)
class ZoneInfo:
    """One 'Node N, zone X' section of /proc/zoneinfo (all counts in pages).

    ``free`` is the zone's free-page counter; ``min``/``low``/``high`` are its watermarks;
    ``protection`` is the lowmem reserve array (pages kept back from allocations that could
    have used a higher zone). ``fields`` holds every value of the watermark block (including
    ``boost``, ``promo``, ``cma`` where the kernel prints them), ``stats`` the zone counters
    (``nr_free_pages`` ...). Empty zones (present == 0) have no stats and no ``start_pfn``.
    ``stat_threshold`` is the largest per-cpu 'vm stats threshold' and ``cpus`` the number
    of per-cpu pagesets: together they bound how far the zone counters may lag the buddy
    lists.
    """

    node: int
    zone: str
    free: int
    min: int
    low: int
    high: int
    spanned: int
    present: int
    managed: int
    protection: Tuple[int, ...]
    fields: Mapping[str, int] = field(hash=False)
    stats: Mapping[str, int] = field(hash=False)
    start_pfn: Optional[int] = None
    stat_threshold: Optional[int] = None
    cpus: int = 0

    @property
    def populated(self) -> bool:
        """True when the zone has pages at all (the kernel's populated_zone())."""
        return self.present > 0


@dataclass(frozen=True)
class ZoneInfoFile:
    """All of /proc/zoneinfo: zones in file order, and the per-node stats blocks."""

    zones: Tuple[ZoneInfo, ...]
    node_stats: Mapping[int, Mapping[str, int]] = field(hash=False)

    def zone(self, node: int, name: str) -> Optional[ZoneInfo]:
        """The zone ``name`` of ``node``, or None."""
        for z in self.zones:
            if z.node == node and z.zone == name:
                return z
        return None


class _ZoneBuilder:
    """Collects one zone section while parsing; becomes a :class:`ZoneInfo`."""

    def __init__(self, node: int, zone: str, lineno: int, line: str) -> None:
        self.node, self.zone, self.lineno, self.line = node, zone, lineno, line
        self.fields: Dict[str, int] = {}
        self.stats: Dict[str, int] = {}
        self.protection: Optional[Tuple[int, ...]] = None
        self.start_pfn: Optional[int] = None
        self.stat_threshold: Optional[int] = None
        self.cpus = 0

    def build(self, source: str) -> ZoneInfo:
        lacking = [k for k in _REQUIRED_ZONE_FIELDS if k not in self.fields]
        if self.protection is None:
            lacking.append("protection")
        if lacking:
            raise ProcParseError(source, self.lineno, self.line,
                                 "zone section lacks %s" % ", ".join(lacking))
        f = self.fields
        return ZoneInfo(
            node=self.node, zone=self.zone, free=f["free"], min=f["min"], low=f["low"],
            high=f["high"], spanned=f["spanned"], present=f["present"], managed=f["managed"],
            protection=self.protection or (), fields=MappingProxyType(self.fields),
            stats=MappingProxyType(self.stats), start_pfn=self.start_pfn,
            stat_threshold=self.stat_threshold, cpus=self.cpus,
        )


_ZONE_TAIL = ("node_unreclaimable", "start_pfn", "node_inactive_ratio")


def parse_zoneinfo(text: str, source: str = "/proc/zoneinfo") -> ZoneInfoFile:
    """Parse /proc/zoneinfo: every zone, populated or not, and the per-node stats.

    A section runs: optional "per-node stats" (first populated zone of a node only), the
    watermark block ("pages free", min, low, high, ..., "protection: (...)"), the zone
    counters, "pagesets" with per-cpu lines, and node_unreclaimable/start_pfn. Empty zones
    stop after the protection array.
    """
    zones: List[ZoneInfo] = []
    node_stats: Dict[int, Mapping[str, int]] = {}
    cur: Optional[_ZoneBuilder] = None
    nstats: Dict[str, int] = {}
    # Where we are in the section: "node" (per-node stats), "zone" (watermarks and zone
    # counters), "pagesets" (per-cpu lists), "tail" (node_unreclaimable, start_pfn).
    part = ""
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        m = _ZONE_HDR_RE.match(s)
        if m is not None:
            if cur is not None:
                zones.append(cur.build(source))
            cur, part = _ZoneBuilder(int(m.group(1)), m.group(2), lineno, line), "zone"
            continue
        if cur is None:
            raise ProcParseError(source, lineno, line, "text before the first 'Node N, zone X'")
        if s == "per-node stats":
            part, nstats = "node", {}
            node_stats[cur.node] = MappingProxyType(nstats)
            continue
        if s == "pagesets":
            part = "pagesets"
            continue
        if s.isdigit() and part in ("node", "zone"):
            # 4.17-4.19 print a hidden vmstat item (nr_indirectly_reclaimable) with an empty
            # name: a line holding only a number. It carries nothing we use.
            continue
        if s.startswith("protection:"):
            pm = _PROTECTION_RE.match(s)
            if pm is None:
                raise ProcParseError(source, lineno, line, "malformed protection array")
            cur.protection = tuple(
                _int(source, lineno, line, t.strip()) for t in pm.group(1).split(",") if t.strip()
            )
            part = "zone"
            continue
        kv = _KV_RE.match(s)
        if kv is None:
            raise ProcParseError(source, lineno, line, "expected 'name value'")
        key, value = kv.group(1), int(kv.group(2))
        if key == "pages free":
            cur.fields["free"], part = value, "zone"
        elif part == "node":
            nstats[key] = value
        elif key in _ZONE_TAIL:
            part = "tail"
            if key == "start_pfn":
                cur.start_pfn = value
        elif part == "pagesets":
            if key == "cpu":
                cur.cpus += 1
            elif key == "vm stats threshold":
                cur.stat_threshold = max(value, cur.stat_threshold or 0)
        elif part == "tail":
            raise ProcParseError(source, lineno, line, "unexpected line after start_pfn")
        elif key in _ZONE_FIELDS and cur.protection is None:
            cur.fields[key] = value
        else:
            cur.stats[key] = value
    if cur is not None:
        zones.append(cur.build(source))
    if not zones:
        raise ProcParseError(source, 0, "", "no zones found (empty file?)")
    return ZoneInfoFile(tuple(zones), MappingProxyType(node_stats))


# --------------------------------------------------------------------------- meminfo

_MEMINFO_RE = re.compile(r"^([^:\s]+):\s+(\d+)(?:\s+(kB))?\s*$")


@dataclass(frozen=True)
class MemInfo:
    """/proc/meminfo. Values are bytes for the 'kB' fields and plain counts otherwise
    (``HugePages_Total``, ``HugePages_Free``, ``HugePages_Rsvd``, ``HugePages_Surp``)."""

    values: Mapping[str, int] = field(hash=False)

    def __getitem__(self, key: str) -> int:
        return self.values[key]

    def get(self, key: str, default: Optional[int] = None) -> Optional[int]:
        """The value of ``key``, or ``default`` when this kernel does not print it."""
        return self.values.get(key, default)

    @property
    def total(self) -> int:
        """MemTotal in bytes."""
        return self.values["MemTotal"]

    @property
    def free(self) -> int:
        """MemFree in bytes."""
        return self.values["MemFree"]

    @property
    def available(self) -> Optional[int]:
        """MemAvailable in bytes (kernel >= 3.14), else None."""
        return self.values.get("MemAvailable")


def parse_meminfo(text: str, source: str = "/proc/meminfo") -> MemInfo:
    """Parse /proc/meminfo; 'kB' values become bytes."""
    values: Dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MEMINFO_RE.match(line)
        if m is None:
            raise ProcParseError(source, lineno, line, "expected 'Name: value [kB]'")
        values[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    for key in ("MemTotal", "MemFree"):
        if key not in values:
            raise ProcParseError(source, 0, "", "no %s line" % key)
    return MemInfo(MappingProxyType(values))


# --------------------------------------------------------------------------- vmstat


def parse_vmstat(text: str, source: str = "/proc/vmstat") -> Dict[str, int]:
    """Parse /proc/vmstat into a dict of counter name to value."""
    out: Dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ProcParseError(source, lineno, line, "expected 'name value'")
        out[parts[0]] = _int(source, lineno, line, parts[1])
    return out


# --------------------------------------------------------------------------- PSI


@dataclass(frozen=True)
class PsiLine:
    """One line of a PSI file: stall percentages over 10 s / 60 s / 300 s, total in µs."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True)
class Pressure:
    """/proc/pressure/memory. ``full`` is None where the kernel prints no 'full' line."""

    some: PsiLine
    full: Optional[PsiLine]


def parse_pressure(text: str, source: str = "/proc/pressure/memory") -> Pressure:
    """Parse a PSI file (some/full lines of avg10, avg60, avg300, total)."""
    lines: Dict[str, PsiLine] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        kind, _, rest = line.strip().partition(" ")
        if kind not in ("some", "full"):
            raise ProcParseError(source, lineno, line, "expected a 'some' or 'full' line")
        kv: Dict[str, str] = {}
        for item in rest.split():
            k, sep, v = item.partition("=")
            if not sep:
                raise ProcParseError(source, lineno, line, "expected key=value, got %r" % item)
            kv[k] = v
        try:
            lines[kind] = PsiLine(float(kv["avg10"]), float(kv["avg60"]), float(kv["avg300"]),
                                  int(kv["total"]))
        except (KeyError, ValueError) as e:
            raise ProcParseError(source, lineno, line, "bad or missing field (%s)" % e) from None
    if "some" not in lines:
        raise ProcParseError(source, 0, "", "no 'some' line")
    return Pressure(lines["some"], lines.get("full"))


# --------------------------------------------------------------------------- kpageflags

# Bit numbers from include/uapi/linux/kernel-page-flags.h (stable ABI) ...
KPF_LOCKED = 0
KPF_ERROR = 1
KPF_REFERENCED = 2
KPF_UPTODATE = 3
KPF_DIRTY = 4
KPF_LRU = 5
KPF_ACTIVE = 6
KPF_SLAB = 7
KPF_WRITEBACK = 8
KPF_RECLAIM = 9
KPF_BUDDY = 10
KPF_MMAP = 11
KPF_ANON = 12
KPF_SWAPCACHE = 13
KPF_SWAPBACKED = 14
KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16
KPF_HUGE = 17
KPF_UNEVICTABLE = 18
KPF_HWPOISON = 19
KPF_NOPAGE = 20
KPF_KSM = 21
KPF_THP = 22
KPF_OFFLINE = 23
KPF_ZERO_PAGE = 24
KPF_IDLE = 25
KPF_PGTABLE = 26
# ... and from include/linux/kernel-page-flags.h (kernel hacking bits, may change).
KPF_RESERVED = 32
KPF_MLOCKED = 33
KPF_OWNER_2 = 34  # KPF_MAPPEDTODISK in older kernels
KPF_PRIVATE = 35
KPF_PRIVATE_2 = 36
KPF_OWNER_PRIVATE = 37
KPF_ARCH = 38
KPF_UNCACHED = 39
KPF_SOFTDIRTY = 40
KPF_ARCH_2 = 41
KPF_ARCH_3 = 42

KPF_NAMES: Mapping[int, str] = MappingProxyType({
    v: k[4:].lower() for k, v in globals().items() if k.startswith("KPF_") and isinstance(v, int)
})
KPAGEFLAGS_PATH = "/proc/kpageflags"
_KPF_WORD = 8
# Pages past the end of memory: the kernel returns a short read there; we report them the way
# it reports holes inside memory, as "no page", which no caller mistakes for free memory.
_NOPAGE_WORD = 1 << KPF_NOPAGE
_KPF_CHUNK = 1 << 17  # words per pread: 1 MiB of flags, bounded memory


def parse_kpageflags(data: bytes, source: str = KPAGEFLAGS_PATH) -> List[int]:
    """Split raw /proc/kpageflags bytes into one 64-bit flags word per page (little-endian)."""
    if len(data) % _KPF_WORD:
        raise ProcParseError(source, 0, "", "%d bytes is not a whole number of 8-byte words"
                             % len(data))
    return list(struct.unpack("<%dQ" % (len(data) // _KPF_WORD), data))


def is_buddy(flags: int) -> bool:
    """True if the kernel counts this page as free in the buddy allocator.

    Since Linux 4.6 every page of a free block carries the buddy bit, not just the first
    (commit 832fc1de01ae), so the bit can be checked page by page on every kernel aerate
    supports. A free page parked on a per-cpu list is not buddy; callers must read "not
    buddy" as "not known to be free" - the safe side.
    """
    return bool(flags >> KPF_BUDDY & 1) and not flags >> KPF_NOPAGE & 1


def flag_names(flags: int) -> Tuple[str, ...]:
    """Names of the set bits (``buddy``, ``huge``...; unknown bits as ``bitN``)."""
    return tuple(KPF_NAMES.get(b, "bit%d" % b) for b in range(64) if flags >> b & 1)


def _kpageflags_at(fd: int, pfn: int, count: int, path: str) -> List[int]:
    """``count`` flag words from pfn on an open /proc/kpageflags; NOPAGE past the end."""
    out: List[int] = []
    while len(out) < count:
        want = min(count - len(out), _KPF_CHUNK)
        data = os.pread(fd, want * _KPF_WORD, (pfn + len(out)) * _KPF_WORD)
        if not data:
            break
        out.extend(parse_kpageflags(data[: len(data) - len(data) % _KPF_WORD], path))
    out.extend([_NOPAGE_WORD] * (count - len(out)))
    return out


def read_kpageflags(pfn: int, count: int = 1, path: str = KPAGEFLAGS_PATH) -> List[int]:
    """Flags of ``count`` pages starting at ``pfn``, one word per page.

    Needs root (CAP_SYS_ADMIN); raises PermissionError otherwise. PFNs past the end of
    memory come back as KPF_NOPAGE, like holes inside memory.
    """
    if pfn < 0 or count < 0:
        raise ValueError("pfn and count must be >= 0, got pfn=%d count=%d" % (pfn, count))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _kpageflags_at(fd, pfn, count, path)
    finally:
        os.close(fd)


def read_kpageflags_for(pfns: Iterable[int], path: str = KPAGEFLAGS_PATH) -> Dict[int, int]:
    """Flags for each PFN in ``pfns`` (any order, duplicates fine): the file is opened
    once, with one pread per run of consecutive PFNs."""
    result: Dict[int, int] = {}
    ordered = sorted(set(pfns))
    if ordered and ordered[0] < 0:
        raise ValueError("pfn must be >= 0, got %d" % ordered[0])
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        i = 0
        while i < len(ordered):
            j = i
            while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
                j += 1
            words = _kpageflags_at(fd, ordered[i], j - i + 1, path)
            result.update(zip(ordered[i:j + 1], words))
            i = j + 1
    finally:
        os.close(fd)
    return result


# --------------------------------------------------------------------------- pagemap

PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63


@dataclass(frozen=True)
class PagemapEntry:
    """One /proc/PID/pagemap word. ``pfn`` is 0 when the page is absent, swapped, or the
    reader lacks CAP_SYS_ADMIN (the kernel hides PFNs then)."""

    present: bool
    swapped: bool
    file_or_shared: bool
    exclusive: bool
    pfn: int


def pagemap_pfn(word: int) -> Optional[int]:
    """The page frame number in one 64-bit pagemap word, or None when the page is not
    resident (absent, or swapped out: then the low bits are a swap entry, not a frame).

    0 for a present page means the kernel hid the frame (reader lacks CAP_SYS_ADMIN). Kept
    a plain function, not a :class:`PagemapEntry`, because arenas decode 512 words a block.
    """
    if not word & PM_PRESENT or word & PM_SWAP:
        return None
    return word & PM_PFN_MASK


def parse_pagemap_entry(word: int) -> PagemapEntry:
    """Decode one 64-bit pagemap word (Documentation/admin-guide/mm/pagemap.rst)."""
    return PagemapEntry(bool(word & PM_PRESENT), bool(word & PM_SWAP), bool(word & PM_FILE),
                        bool(word & PM_MMAP_EXCLUSIVE), pagemap_pfn(word) or 0)


# --------------------------------------------------------------------------- virtio-balloon

#: VIRTIO_BALLOON_F_* (include/uapi/linux/virtio_balloon.h) and the transport bits a balloon
#: device negotiates (include/uapi/linux/virtio_config.h, virtio_ring.h).
VIRTIO_BALLOON_FEATURES: Mapping[int, str] = MappingProxyType({
    0: "MUST_TELL_HOST",
    1: "STATS_VQ",
    2: "DEFLATE_ON_OOM",
    3: "FREE_PAGE_HINT",
    4: "PAGE_POISON",
    5: "REPORTING",
    28: "RING_INDIRECT_DESC",
    29: "RING_EVENT_IDX",
    32: "VERSION_1",
    33: "ACCESS_PLATFORM",
    34: "RING_PACKED",
    35: "IN_ORDER",
    36: "ORDER_PLATFORM",
    37: "SR_IOV",
    38: "NOTIFICATION_DATA",
    39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET",
})
BALLOON_DRIVER_DIR = "sys/bus/virtio/drivers/virtio_balloon"


@dataclass(frozen=True)
class BalloonFeatures:
    """Features a virtio-balloon device negotiated with this guest's driver."""

    device: str
    bits: FrozenSet[int]
    features: FrozenSet[str]

    @property
    def free_page_reporting_active(self) -> bool:
        """True when the kernel itself reports free pages (VIRTIO_BALLOON_F_REPORTING)."""
        return "REPORTING" in self.features

    @property
    def unknown_bits(self) -> Tuple[int, ...]:
        """Negotiated bits this module has no name for (vendor or newer features)."""
        return tuple(sorted(b for b in self.bits if b not in VIRTIO_BALLOON_FEATURES))


def parse_virtio_features(text: str, source: str = "features") -> FrozenSet[int]:
    """Bits set in a sysfs virtio ``features`` file: '0'/'1' characters, bit i at index i."""
    s = text.strip()
    if not s or set(s) - {"0", "1"}:
        raise ProcParseError(source, 1, text.strip(), "expected a string of '0'/'1' characters")
    return frozenset(i for i, c in enumerate(s) if c == "1")


def balloon_features(device: str, bits: FrozenSet[int]) -> BalloonFeatures:
    """Name the negotiated bits of a balloon device (unknown bits appear as ``bitN``)."""
    names = frozenset(VIRTIO_BALLOON_FEATURES.get(b, "bit%d" % b) for b in bits)
    return BalloonFeatures(device, bits, names)


# --------------------------------------------------------------------------- page poisoning

_TRUE = ("1", "y", "Y", "on", "On", "ON", "true", "True")
_FALSE = ("0", "n", "N", "off", "Off", "OFF", "false", "False")
PAGE_POISON_BYTE = 0xAA  # include/linux/poison.h


@dataclass(frozen=True)
class PagePoisoning:
    """What the guest kernel writes into pages it frees.

    ``state`` is ``off`` (nothing), ``zero`` (zero-filled: init_on_free or
    PAGE_POISONING_ZERO), ``nonzero`` (poisoned with ``fill``), or ``unknown``. A host must
    not discard free pages when they are poisoned with a non-zero value (the guest would find
    zeroes where it checks for poison), nor when the state is unknown.
    """

    state: str
    fill: Optional[int]
    detail: str

    @property
    def discard_safe(self) -> bool:
        """True when discarding free pages cannot break the guest's poison checks."""
        return self.state in ("off", "zero")


def parse_cmdline(text: str) -> Dict[str, str]:
    """Kernel parameters from /proc/cmdline (last one wins; '--' ends them; flags map to '';
    double quotes group a value with spaces, as the kernel's parser does)."""
    try:
        tokens = shlex.split(text)
    except ValueError:  # unbalanced quote: fall back to plain words
        tokens = text.split()
    params: Dict[str, str] = {}
    for token in tokens:
        if token == "--":
            break
        key, _, value = token.partition("=")
        params[key] = value
    return params


def parse_kconfig(text: str) -> Dict[str, str]:
    """CONFIG_X=value lines of a kernel config (``# CONFIG_X is not set`` lines are skipped)."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.startswith("CONFIG_"):
            out[key] = value.strip('"')
    return out


def parse_page_poisoning(cmdline: Optional[str], kconfig: Optional[Mapping[str, str]]
                         ) -> PagePoisoning:
    """Decide how freed pages are filled, from /proc/cmdline and (if known) the kernel config.

    Every doubt resolves to the side that makes the host refuse discards: ``page_poison=1``
    counts as on even though 4.x kernels only accepted ``on``; an unreadable command line
    gives ``unknown``.
    """
    if cmdline is None:
        return PagePoisoning("unknown", None,
                             "kernel command line unreadable; page poisoning unknown")
    params = parse_cmdline(cmdline)
    cfg = kconfig or {}
    cfg_note = "" if kconfig is not None else " (kernel config not found)"
    poison = params.get("page_poison")
    if poison is not None and poison not in _FALSE:
        if kconfig is not None and cfg.get("CONFIG_PAGE_POISONING") != "y":
            pass  # the parameter is ignored by a kernel built without page poisoning
        elif cfg.get("CONFIG_PAGE_POISONING_ZERO") == "y":
            return PagePoisoning("zero", 0, "page_poison=%s with PAGE_POISONING_ZERO: freed "
                                 "pages are zero-filled" % poison)
        else:
            return PagePoisoning("nonzero", PAGE_POISON_BYTE,
                                 "page_poison=%s: freed pages are filled with 0x%02x%s"
                                 % (poison, PAGE_POISON_BYTE, cfg_note))
    iof = params.get("init_on_free")
    if iof is None:
        on = cfg.get("CONFIG_INIT_ON_FREE_DEFAULT_ON") == "y"
        how = "CONFIG_INIT_ON_FREE_DEFAULT_ON"
    else:
        on, how = iof in _TRUE, "init_on_free=%s" % iof
    if on:
        return PagePoisoning("zero", 0, "%s: freed pages are zero-filled" % how)
    if cfg.get("CONFIG_PAGE_POISONING") == "y":
        return PagePoisoning("off", None, "page poisoning built in but not enabled "
                             "(no page_poison=1 on the command line)")
    return PagePoisoning("off", None, "no page poisoning%s" % cfg_note)


# --------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class ZoneFree:
    """Free memory of one zone as the cycle sees it (pages)."""

    node: int
    zone: str
    free_pages: int
    blocks: int


@dataclass(frozen=True)
class FreeSummary:
    """Free blocks of at least ``2**min_order`` pages, per zone and in total.

    ``blocks`` counts units of ``2**min_order`` pages found inside free buddy blocks of
    order >= min_order (an order-10 block counts as two order-9 blocks). ``free_pages``
    counts all free pages of the included zones, any order.
    """

    min_order: int
    zones: Tuple[ZoneFree, ...]
    excluded: Tuple[str, ...]

    @property
    def blocks(self) -> int:
        """Total blocks of ``2**min_order`` pages over the included zones."""
        return sum(z.blocks for z in self.zones)

    @property
    def free_pages(self) -> int:
        """Total free pages (any order) over the included zones."""
        return sum(z.free_pages for z in self.zones)

    @property
    def block_pages(self) -> int:
        """Pages per block: ``2**min_order``."""
        return 1 << self.min_order

    def blocks_beyond(self, reserve_pages: int) -> int:
        """Blocks that can be taken while at least ``reserve_pages`` pages stay free.

        Low-order free pages count towards the reserve too: taking a block lowers the free
        total by one block, whatever order the remaining memory is in.
        """
        spare = self.free_pages - max(0, reserve_pages)
        return max(0, min(self.blocks, spare >> self.min_order))


def summarize_free(buddy: Iterable[BuddyZone], min_order: int,
                   exclude_zones: Iterable[str] = ("DMA",)) -> FreeSummary:
    """Summarise buddyinfo for the cycle: blocks of >= ``min_order`` per zone and in total.

    DMA is excluded by default: hugetlb and user allocations never come from it.
    """
    if min_order < 0:
        raise ValueError("min_order must be >= 0, got %d" % min_order)
    excluded = tuple(exclude_zones)
    zones = tuple(ZoneFree(b.node, b.zone, b.free_pages, b.blocks_at_least(min_order))
                  for b in buddy if b.zone not in excluded)
    return FreeSummary(min_order, zones, excluded)


@dataclass(frozen=True)
class Watermarks:
    """Sum of zone watermarks (pages)."""

    min: int
    low: int
    high: int


def total_watermarks(zones: Iterable[ZoneInfo], exclude_zones: Iterable[str] = ("DMA",)
                     ) -> Watermarks:
    """Sum min/low/high over populated zones, leaving out ``exclude_zones`` (DMA default)."""
    excluded = tuple(exclude_zones)
    use = [z for z in zones if z.populated and z.zone not in excluded]
    return Watermarks(sum(z.min for z in use), sum(z.low for z in use), sum(z.high for z in use))


# --------------------------------------------------------------------------- readers


def _path(root: str, rel: str) -> str:
    return os.path.join(root, rel.lstrip("/"))


def read_text(path: str) -> str:
    """The whole text of a kernel file (ASCII; undecodable bytes are replaced)."""
    with open(path, "rb") as f:
        return f.read().decode("ascii", "replace")


def read_buddyinfo(root: str = "/") -> Tuple[BuddyZone, ...]:
    """Parse ``<root>/proc/buddyinfo``."""
    p = _path(root, "proc/buddyinfo")
    return parse_buddyinfo(read_text(p), p)


def read_pagetypeinfo(root: str = "/") -> PageTypeInfo:
    """Parse ``<root>/proc/pagetypeinfo`` (root-only since 5.6; walks the free lists under
    the zone lock, so do not poll it)."""
    p = _path(root, "proc/pagetypeinfo")
    return parse_pagetypeinfo(read_text(p), p)


def read_zoneinfo(root: str = "/") -> ZoneInfoFile:
    """Parse ``<root>/proc/zoneinfo``."""
    p = _path(root, "proc/zoneinfo")
    return parse_zoneinfo(read_text(p), p)


def read_meminfo(root: str = "/") -> MemInfo:
    """Parse ``<root>/proc/meminfo``."""
    p = _path(root, "proc/meminfo")
    return parse_meminfo(read_text(p), p)


def read_vmstat(root: str = "/") -> Dict[str, int]:
    """Parse ``<root>/proc/vmstat``."""
    p = _path(root, "proc/vmstat")
    return parse_vmstat(read_text(p), p)


def read_pressure_memory(root: str = "/") -> Pressure:
    """Parse ``<root>/proc/pressure/memory`` (kernel >= 4.20 with PSI enabled)."""
    p = _path(root, "proc/pressure/memory")
    return parse_pressure(read_text(p), p)


def read_balloon_features(root: str = "/") -> Optional[BalloonFeatures]:
    """Negotiated features of the first virtio-balloon device bound to its driver, or None
    when no balloon device is bound (no device, or the driver is not loaded)."""
    d = _path(root, BALLOON_DRIVER_DIR)
    try:
        devices = sorted(e for e in os.listdir(d) if e.startswith("virtio"))
    except FileNotFoundError:
        return None
    for dev in devices:
        p = os.path.join(d, dev, "features")
        if os.path.exists(p):
            return balloon_features(dev, parse_virtio_features(read_text(p), p))
    return None


def read_kconfig(root: str = "/") -> Optional[Dict[str, str]]:
    """The running kernel's build config from /boot/config-<release> or /proc/config.gz,
    or None when neither exists."""
    try:
        release = read_text(_path(root, "proc/sys/kernel/osrelease")).strip()
    except OSError:
        release = os.uname().release if root == "/" else ""
    if release:
        try:
            return parse_kconfig(read_text(_path(root, "boot/config-" + release)))
        except OSError:
            pass
    try:
        with gzip.open(_path(root, "proc/config.gz"), "rt", encoding="ascii",
                       errors="replace") as f:
            return parse_kconfig(f.read())
    except OSError:
        return None


def read_page_poisoning(root: str = "/") -> PagePoisoning:
    """How this guest fills freed pages (see :func:`parse_page_poisoning`)."""
    try:
        cmdline: Optional[str] = read_text(_path(root, "proc/cmdline"))
    except OSError:
        cmdline = None
    return parse_page_poisoning(cmdline, read_kconfig(root))


@dataclass(frozen=True)
class HugePagePool:
    """One hugetlb pool from /sys/kernel/mm/hugepages/hugepages-<size>kB (counts of pages)."""

    size_kb: int
    nr: int
    free: int
    resv: int
    surplus: int
    overcommit: int


def read_hugepage_pool(size_kb: int = 2048, root: str = "/") -> HugePagePool:
    """Read the hugetlb pool of ``size_kb`` pages; FileNotFoundError if there is none."""
    d = _path(root, "sys/kernel/mm/hugepages/hugepages-%dkB" % size_kb)

    def get(name: str) -> int:
        p = os.path.join(d, name)
        text = read_text(p).strip()
        try:
            return int(text)
        except ValueError:
            raise ProcParseError(p, 1, text, "expected an integer") from None

    return HugePagePool(size_kb, get("nr_hugepages"), get("free_hugepages"),
                        get("resv_hugepages"), get("surplus_hugepages"),
                        get("nr_overcommit_hugepages"))


def parse_bracket_choice(text: str, source: str = "sysfs") -> str:
    """The selected word of a sysfs choice file such as 'always [madvise] never'."""
    m = re.search(r"\[([^\]]+)\]", text)
    if m is None:
        raise ProcParseError(source, 1, text.strip(), "no [selected] choice")
    return m.group(1)


# --------------------------------------------------------------------------- snapshot

PARTS = ("buddyinfo", "zoneinfo", "meminfo", "vmstat", "psi", "pagetypeinfo", "kpageflags",
         "balloon", "poisoning")
#: What a poll loop reads by default: cheap, and changing from one cycle to the next.
DEFAULT_PARTS: FrozenSet[str] = frozenset(("buddyinfo", "zoneinfo", "meminfo", "vmstat", "psi"))
#: Facts that do not change while the guest runs; read them once at start.
STATIC_PARTS: FrozenSet[str] = frozenset(("kpageflags", "balloon", "poisoning"))
# pagetypeinfo is in neither: reading it walks every free list under the zone lock, too
# costly to poll; ask for it explicitly (stats, diagnostics).


@dataclass(frozen=True)
class Missing:
    """A part of kernel state that could not be read, and why (one line for a status page)."""

    part: str
    path: str
    reason: str


@dataclass(frozen=True)
class Snapshot:
    """Kernel memory state read at one moment. A part that was requested but could not be
    read is None and listed in ``missing`` with its reason; parts not requested are None and
    not listed."""

    root: str
    buddyinfo: Optional[Tuple[BuddyZone, ...]] = None
    zoneinfo: Optional[ZoneInfoFile] = None
    meminfo: Optional[MemInfo] = None
    vmstat: Optional[Mapping[str, int]] = field(default=None, hash=False)
    psi_memory: Optional[Pressure] = None
    pagetypeinfo: Optional[PageTypeInfo] = None
    kpageflags_readable: Optional[bool] = None
    balloon: Optional[BalloonFeatures] = None
    poisoning: Optional[PagePoisoning] = None
    missing: Tuple[Missing, ...] = ()

    def why_missing(self, part: str) -> Optional[str]:
        """The reason ``part`` is missing, or None if it was read (or not requested)."""
        for m in self.missing:
            if m.part == part:
                return m.reason
        return None


# Why a file can be absent, per part: what it means for the operator.
_ABSENT_HINTS = {
    "psi": "kernel older than 4.20 or built without CONFIG_PSI",
    "pagetypeinfo": "kernel built without /proc/pagetypeinfo",
    "kpageflags": "kernel built without CONFIG_PROC_PAGE_MONITOR",
    "buddyinfo": "kernel without /proc/buddyinfo",
    "zoneinfo": "kernel without /proc/zoneinfo",
    "meminfo": "no /proc/meminfo: is /proc mounted?",
    "vmstat": "kernel without /proc/vmstat",
}
_DENIED_HINTS = {
    "pagetypeinfo": "readable by root only (kernel >= 5.6); run the agent as root",
    "kpageflags": "needs root (CAP_SYS_ADMIN); run the agent as root",
}

T = TypeVar("T")


def _explain(part: str, path: str, exc: Exception) -> Missing:
    if isinstance(exc, FileNotFoundError):
        reason = "%s not present: %s" % (path, _ABSENT_HINTS.get(part, "not provided by kernel"))
    elif isinstance(exc, PermissionError):
        reason = "%s: permission denied: %s" % (
            path, _DENIED_HINTS.get(part, "run the agent as root"))
    elif isinstance(exc, OSError) and exc.errno == errno.EOPNOTSUPP and part == "psi":
        reason = "%s: PSI is built in but disabled; boot with psi=1" % path
    elif isinstance(exc, ProcParseError):
        reason = "could not parse %s" % exc
    else:
        reason = "%s: %s" % (path, exc)
    return Missing(part, path, reason)


def read_snapshot(root: str = "/", parts: Iterable[str] = DEFAULT_PARTS) -> Snapshot:
    """Read the requested parts of kernel memory state under ``root``.

    Parts (``PARTS``): ``buddyinfo``, ``zoneinfo``, ``meminfo``, ``vmstat``, ``psi``,
    ``pagetypeinfo``, ``kpageflags`` (a one-page read probing access), ``balloon``,
    ``poisoning``. The default is ``DEFAULT_PARTS``, the cheap set a poll loop needs; read
    ``STATIC_PARTS`` once at start. Missing or unreadable files and unparseable contents
    become :class:`Missing` entries.
    """
    want = frozenset(parts)
    unknown = want - set(PARTS)
    if unknown:
        raise ValueError("unknown snapshot parts %s; known: %s"
                         % (", ".join(sorted(unknown)), ", ".join(PARTS)))
    missing: List[Missing] = []

    def attempt(part: str, rel: str, fn: Callable[[], T]) -> Optional[T]:
        if part not in want:
            return None
        try:
            return fn()
        except (OSError, ProcParseError) as e:
            missing.append(_explain(part, _path(root, rel), e))
            return None

    def probe_kpageflags() -> bool:
        read_kpageflags(0, 1, _path(root, "proc/kpageflags"))
        return True

    def balloon() -> Optional[BalloonFeatures]:
        found = read_balloon_features(root)
        if found is None:
            missing.append(Missing("balloon", _path(root, BALLOON_DRIVER_DIR),
                                   "no virtio-balloon device bound to the virtio_balloon driver"))
        return found

    snap = Snapshot(
        root=root,
        buddyinfo=attempt("buddyinfo", "proc/buddyinfo", lambda: read_buddyinfo(root)),
        zoneinfo=attempt("zoneinfo", "proc/zoneinfo", lambda: read_zoneinfo(root)),
        meminfo=attempt("meminfo", "proc/meminfo", lambda: read_meminfo(root)),
        vmstat=attempt("vmstat", "proc/vmstat", lambda: MappingProxyType(read_vmstat(root))),
        psi_memory=attempt("psi", "proc/pressure/memory", lambda: read_pressure_memory(root)),
        pagetypeinfo=attempt("pagetypeinfo", "proc/pagetypeinfo",
                             lambda: read_pagetypeinfo(root)),
        kpageflags_readable=attempt("kpageflags", "proc/kpageflags", probe_kpageflags),
        balloon=attempt("balloon", BALLOON_DRIVER_DIR, balloon),
        poisoning=attempt("poisoning", "proc/cmdline", lambda: read_page_poisoning(root)),
        missing=(),
    )
    if "kpageflags" in want and snap.kpageflags_readable is None:
        snap = dataclasses.replace(snap, kpageflags_readable=False)
    return dataclasses.replace(snap, missing=tuple(missing))
