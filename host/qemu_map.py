"""Guest-physical address -> RAM block map, built only from what QEMU itself reports.

Pure: the parsers take monitor output (QMP replies, HMP text) and return values. `gather`
asks the questions through a caller-supplied QMP function, so the same code serves a QMP
unix socket and libvirt's monitor passthrough.

Where the map comes from, and why each source is needed:
- `info mtree -f` (flat view of the "memory" address space): which memory region backs
  each guest-physical range, and at which offset inside it ("@offset"). Read-only pieces
  ("rom": PAM-shadowed BIOS) and devices are not RAM the guest may hand back.
- `info mtree` (the region tree): the machine RAM windows, i.e. the `ram-below-4g` /
  `ram-above-4g` aliases. A memory backend mapped elsewhere (an ivshmem BAR, an NVDIMM)
  is not guest RAM even though it is "ram" in the flat view. The legacy window
  0xa0000-0xfffff is always left out (see LEGACY_HOLE).
- `query-memory-devices`: DIMM / virtio-mem windows (hot-pluggable RAM).
- `query-memdev`: the memory backends (the only RAM aerate may discard).
- `info ramblock`: the RAM block of each backend and its host page size (the granule).
- `qom-get` of the machine type, its `smm` property and, on q35, the MCH's
  `extended-tseg-mbytes`: where SMRAM (TSEG) can appear (see `tseg_window`).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_U64 = 1 << 64

# Memory devices whose backend is RAM the guest kernel manages; everything else that takes
# a memdev (nvdimm, virtio-pmem, sgx-epc, ...) is excluded from the map.
RAM_DEVICE_TYPES = frozenset({"dimm", "virtio-mem"})
RAM_WINDOW_ALIASES = ("ram-below-4g", "ram-above-4g")
# The legacy VGA / option ROM / BIOS window. The guest's chipset registers (PAM, SMRAM)
# switch it between RAM, ROM and device memory at run time, so a map taken at one moment
# could be stale the next; aerate never treats it as guest RAM.
LEGACY_HOLE = (0xA0000, 0x100000)
#: TSEG sizes the q35 MCH offers through ESMRAMC (MiB), besides the extended size.
TSEG_SIZES_MIB = (1, 2, 8)


class MapError(ValueError):
    """QEMU's answers do not prove a usable map; the VM must be refused, not guessed."""


class RangeRejected(ValueError):
    """A guest-physical range failed validation against the map (nothing was touched)."""

    def __init__(self, gpa: int, length: int, reason: str) -> None:
        super().__init__(f"range gpa={gpa:#x} length={length:#x}: {reason}")
        self.gpa = gpa
        self.length = length
        self.reason = reason


@dataclass(frozen=True)
class FlatRange:
    """One line of a flat view: [gpa_start, gpa_start+length) is `name` at `offset`."""

    gpa_start: int
    length: int
    kind: str  # "ram", "rom", "romd", "ramd", "i/o"
    name: str
    offset: int


@dataclass(frozen=True)
class RamBlockInfo:
    """One line of `info ramblock`."""

    name: str
    page_size: int
    ram_addr: int
    used: int
    total: int


@dataclass(frozen=True)
class Memdev:
    """A memory backend object (`query-memdev` + its QOM type)."""

    id: str
    size: int
    share: bool
    prealloc: bool
    policy: str
    qom_type: str | None  # e.g. "memory-backend-memfd"; None when QEMU did not say
    #: hugetlb pages reserved at mmap (QEMU's reserve=on, its default; None: QEMU < 6.1
    #: did not say, which counts as reserved)
    reserve: bool | None = None


@dataclass(frozen=True)
class RamRange:
    """A contiguous piece of guest RAM: guest-physical range -> (RAM block, offset)."""

    gpa_start: int
    length: int
    block_name: str
    block_offset: int

    @property
    def gpa_end(self) -> int:
        """First address after the range."""
        return self.gpa_start + self.length


@dataclass(frozen=True)
class Placement:
    """Where a validated guest range lives: a slice of one RAM block."""

    gpa: int
    length: int
    block_name: str
    block_offset: int
    page_size: int


@dataclass(frozen=True)
class QemuMemoryFacts:
    """Raw monitor answers; kept together so a capture can be replayed in tests."""

    query_memdev: Sequence[Mapping[str, Any]]
    qom_objects: Sequence[Mapping[str, Any]]
    memory_devices: Sequence[Mapping[str, Any]]
    mtree_flat: str
    mtree: str
    ramblock: str
    #: qom-get answers: {"type": machine type, "smm": "on"|"off"|"auto",
    #: "extended-tseg-mbytes": int (q35 only)}; None: not asked, which refuses.
    machine: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class GuestMemoryMap:
    """The proven RAM of one VM: sorted disjoint pieces, their blocks and backends."""

    ranges: tuple[RamRange, ...]
    blocks: Mapping[str, RamBlockInfo]  # by RAM block name
    memdevs: Mapping[str, Memdev]  # by memory backend id
    block_memdev: Mapping[str, str] = field(default_factory=dict)  # block -> backend id
    #: [start, end) windows that may be the guest's RAM (so an honest guest may report
    #: them) but are never discarded: q35's TSEG (see `tseg_window`)
    never_punch: tuple[tuple[int, int], ...] = ()

    @property
    def ram_size(self) -> int:
        """Bytes of guest RAM the map covers."""
        return sum(r.length for r in self.ranges)

    def block_names(self) -> list[str]:
        """RAM blocks that appear in the map, in address order of first appearance."""
        seen: dict[str, None] = {}
        for r in self.ranges:
            seen.setdefault(r.block_name, None)
        return list(seen)


# ---------------------------------------------------------------------------------------
# Parsers

_FLAT_LINE = re.compile(
    r"^\s+(?P<start>[0-9a-f]{16})-(?P<end>[0-9a-f]{16}) \(prio -?\d+, (?P<kind>[a-z/]+)\): "
    r"(?P<name>\S+)(?: @(?P<off>[0-9a-f]{16}))?(?: .*)?$"
)
_AS_LINE = re.compile(r'^ AS "(?P<name>[^"]+)", root: ')
_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def parse_flat_view(text: str, address_space: str = "memory") -> list[FlatRange]:
    """Parse `info mtree -f` and return the flat view that renders `address_space`.

    QEMU prints one "FlatView #n" per distinct view, listing every address space that
    shares it; trailing annotations (" KVM") are ignored.
    """
    views: list[tuple[set[str], list[FlatRange]]] = []
    for line in text.splitlines():
        if line.startswith("FlatView #"):
            views.append((set(), []))
            continue
        if not views:
            continue
        names, ranges = views[-1]
        m = _AS_LINE.match(line)
        if m:
            names.add(m.group("name"))
            continue
        m = _FLAT_LINE.match(line)
        if m:
            start, end = int(m.group("start"), 16), int(m.group("end"), 16)
            off = m.group("off")
            ranges.append(
                FlatRange(start, end - start + 1, m.group("kind"), m.group("name"),
                          int(off, 16) if off else 0)
            )
    matches = [ranges for names, ranges in views if address_space in names]
    if len(matches) != 1:
        raise MapError(
            f"info mtree -f: expected one flat view for address space {address_space!r}, "
            f"found {len(matches)}"
        )
    return matches[0]


_ALIAS_LINE = re.compile(
    r"^\s+(?P<start>[0-9a-f]{16})-(?P<end>[0-9a-f]{16}) \(prio -?\d+, [a-z/]+\): "
    r"alias (?P<alias>\S+) @(?P<target>\S+) (?P<tstart>[0-9a-f]{16})-(?P<tend>[0-9a-f]{16})"
)


def parse_ram_windows(text: str) -> list[tuple[int, int]]:
    """Guest-physical [start, end) windows of machine RAM from `info mtree` (the tree).

    They are the x86 `ram-below-4g` / `ram-above-4g` aliases of the "memory" address
    space; without them the map cannot tell guest RAM from a device's memory backend.
    """
    windows: list[tuple[int, int]] = []
    in_memory_as = False
    for line in text.splitlines():
        if line.startswith("address-space: ") or line.startswith("memory-region: "):
            in_memory_as = line == "address-space: memory"
            continue
        if not in_memory_as:
            continue
        m = _ALIAS_LINE.match(line)
        if m and m.group("alias") in RAM_WINDOW_ALIASES:
            windows.append((int(m.group("start"), 16), int(m.group("end"), 16) + 1))
    if not windows:
        raise MapError(
            "info mtree: no ram-below-4g/ram-above-4g alias in address space 'memory' "
            "(not a pc/q35 machine?); cannot tell guest RAM apart"
        )
    return sorted(windows)


def _without_legacy_hole(windows: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    lo, hi = LEGACY_HOLE
    out: list[tuple[int, int]] = []
    for start, end in windows:
        # Keep what lies below and what lies above the hole (either may be empty).
        out += [(a, b) for a, b in ((start, min(end, lo)), (max(start, hi), end)) if a < b]
    return sorted(out)


def parse_size(text: str) -> int:
    """'2 MiB' -> 2097152 (the page size column of `info ramblock`)."""
    number, _, unit = text.strip().partition(" ")
    if unit not in _SIZE_UNITS:
        raise MapError(f"info ramblock: unknown page size {text!r}")
    return int(number) * _SIZE_UNITS[unit]


_RAMBLOCK_LINE = re.compile(
    r"^\s*(?P<name>\S+)\s+(?P<psize>\d+ [KMGT]?i?B)\s+0x(?P<off>[0-9a-f]+)\s+"
    r"0x(?P<used>[0-9a-f]+)\s+0x(?P<total>[0-9a-f]+)\s*$"
)


def parse_ramblocks(text: str) -> dict[str, RamBlockInfo]:
    """Parse `info ramblock` into {block name: RamBlockInfo}."""
    blocks: dict[str, RamBlockInfo] = {}
    for line in text.splitlines():
        m = _RAMBLOCK_LINE.match(line)
        if not m:
            continue
        name = m.group("name")
        blocks[name] = RamBlockInfo(
            name=name,
            page_size=parse_size(m.group("psize")),
            ram_addr=int(m.group("off"), 16),
            used=int(m.group("used"), 16),
            total=int(m.group("total"), 16),
        )
    if not blocks:
        raise MapError("info ramblock: no RAM blocks in the answer")
    return blocks


def parse_memdevs(
    query_memdev: Iterable[Mapping[str, Any]], qom_objects: Iterable[Mapping[str, Any]] = ()
) -> dict[str, Memdev]:
    """`query-memdev` (+ `qom-list /objects` for each backend's type) -> {id: Memdev}."""
    types: dict[str, str] = {}
    for obj in qom_objects:
        m = re.fullmatch(r"child<(.+)>", str(obj.get("type", "")))
        if m:
            types[str(obj["name"])] = m.group(1)
    out: dict[str, Memdev] = {}
    for md in query_memdev:
        ident = str(md["id"])
        out[ident] = Memdev(
            id=ident,
            size=int(md["size"]),
            share=bool(md.get("share", False)),
            prealloc=bool(md.get("prealloc", False)),
            policy=str(md.get("policy", "default")),
            qom_type=types.get(ident),
            reserve=md["reserve"] if isinstance(md.get("reserve"), bool) else None,
        )
    return out


def _memdev_id(path: str) -> str:
    # query-memory-devices names the backend by QOM path ("/objects/dimm0").
    return path.rsplit("/", 1)[-1]


def device_windows(
    memory_devices: Iterable[Mapping[str, Any]],
) -> tuple[list[tuple[int, int]], set[str]]:
    """RAM windows of DIMM/virtio-mem devices, and backends used by non-RAM devices."""
    windows: list[tuple[int, int]] = []
    excluded: set[str] = set()
    for dev in memory_devices:
        data = dev.get("data", {})
        memdev = data.get("memdev")
        # DIMMs say "addr"/"size"; virtio-mem says "memaddr" and maps its whole
        # "max-size" (unplugged blocks in it are already discarded: punching is a no-op).
        addr = data.get("addr", data.get("memaddr"))
        if dev.get("type") in RAM_DEVICE_TYPES and addr is not None:
            size = int(data.get("max-size", data.get("size", 0)))
            windows.append((int(addr), int(addr) + size))
        elif memdev:
            excluded.add(_memdev_id(str(memdev)))
    return windows, excluded


# ---------------------------------------------------------------------------------------
# Building the map


def block_of_memdev(memdev: str, blocks: Mapping[str, RamBlockInfo]) -> str:
    """The RAM block of a memory backend.

    The block is named after the backend, prefixed with the owning device's path when a
    device registers it ("0000:00:01.0/vmem0" for virtio-mem); never guess between two.
    """
    if memdev in blocks:
        return memdev
    found = [name for name in blocks if name.endswith("/" + memdev)]
    if len(found) != 1:
        raise MapError(
            f"memory backend {memdev!r} is mapped but matches {len(found)} RAM blocks "
            f"({', '.join(found) or 'none'})"
        )
    return found[0]


def tseg_window(machine: Mapping[str, Any] | None,
                ram_windows: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The guest-physical range q35's TSEG may take, whatever the moment's flat view says.

    On q35 with SMM, the firmware (OVMF) asks the MCH to turn the top of RAM below 4 GiB
    into SMRAM (TSEG): 1, 2 or 8 MiB, or ``extended-tseg-mbytes`` MiB. That happens after
    the map is built at domain start, and a later flat view shows it only as a
    "tseg-blackhole" for non-SMM accesses; a punch there would zero SMRAM, which only SMM
    code may change. So the largest TSEG the machine allows is never guest RAM, from the
    first map on. i440fx ("pc") has no TSEG: its SMRAM is the legacy window (LEGACY_HOLE).
    Unknown answers raise MapError: refuse rather than guess.
    """
    if machine is None:
        raise MapError("the machine type and SMM state were not asked; cannot tell where "
                       "SMRAM (TSEG) may be")
    mtype = machine.get("type")
    if not isinstance(mtype, str) or not mtype:
        raise MapError(f"qom-get /machine type: unexpected answer {mtype!r}")
    if "q35" not in mtype:
        return None
    smm = machine.get("smm")
    if smm == "off":
        return None
    if smm not in ("on", "auto"):
        raise MapError(f"qom-get /machine smm: unexpected answer {smm!r}")
    ext = machine.get("extended-tseg-mbytes")
    if isinstance(ext, bool) or not isinstance(ext, int) or ext < 0:
        raise MapError(f"qom-get /machine/q35/mch extended-tseg-mbytes: unexpected answer "
                       f"{ext!r}")
    size = max(max(TSEG_SIZES_MIB), ext) << 20
    below = [end for start, end in ram_windows if start == 0]
    if len(below) != 1:
        raise MapError("q35 with SMM: no single RAM window at 0 (ram-below-4g) to place "
                       "TSEG below")
    end = below[0]
    return (max(0, end - size), end)


def _without(windows: Iterable[tuple[int, int]], hole: tuple[int, int] | None
             ) -> list[tuple[int, int]]:
    if hole is None:
        return sorted(windows)
    lo, hi = hole
    out: list[tuple[int, int]] = []
    for start, end in windows:
        out += [(a, b) for a, b in ((start, min(end, lo)), (max(start, hi), end)) if a < b]
    return sorted(out)


def build_map(facts: QemuMemoryFacts) -> GuestMemoryMap:
    """Build the proven RAM map from QEMU's answers, or raise MapError."""
    flat = parse_flat_view(facts.mtree_flat)
    blocks = parse_ramblocks(facts.ramblock)
    memdevs = parse_memdevs(facts.query_memdev, facts.qom_objects)
    dev_windows, excluded = device_windows(facts.memory_devices)
    ram_windows = parse_ram_windows(facts.mtree)
    tseg = tseg_window(facts.machine, ram_windows)
    windows = _without(_without_legacy_hole(ram_windows + dev_windows), tseg)
    if not memdevs:
        raise MapError("query-memdev: the VM has no memory backend objects")

    pieces: list[RamRange] = []
    for fr in flat:
        # "rom" is RAM the guest cannot write (PAM-shadowed BIOS); only writable RAM of a
        # memory backend is something the guest's allocator owns.
        if fr.kind != "ram" or fr.name not in memdevs or fr.name in excluded:
            continue
        block = block_of_memdev(fr.name, blocks)
        for w_start, w_end in windows:
            start, end = max(fr.gpa_start, w_start), min(fr.gpa_start + fr.length, w_end)
            if start < end:
                pieces.append(
                    RamRange(start, end - start, block, fr.offset + start - fr.gpa_start)
                )
    pieces.sort(key=lambda r: r.gpa_start)
    merged: list[RamRange] = []
    for p in pieces:
        last = merged[-1] if merged else None
        if last is not None and p.gpa_start < last.gpa_end:
            raise MapError(f"flat view pieces overlap at {p.gpa_start:#x}")
        if (
            last is not None
            and last.gpa_end == p.gpa_start
            and last.block_name == p.block_name
            and last.block_offset + last.length == p.block_offset
        ):
            merged[-1] = RamRange(last.gpa_start, last.length + p.length, p.block_name,
                                  last.block_offset)
        else:
            merged.append(p)
    for r in merged:
        used = blocks[r.block_name].used
        if r.block_offset + r.length > used:
            raise MapError(
                f"RAM block {r.block_name!r}: gpa {r.gpa_start:#x} maps past its end "
                f"({r.block_offset + r.length:#x} > {used:#x})"
            )
    if not merged:
        raise MapError("no guest RAM found in the flat view of address space 'memory'")
    used_blocks = {r.block_name for r in merged}
    block_memdev = {block_of_memdev(m, blocks): m for m in memdevs if m not in excluded}
    block_memdev = {b: m for b, m in block_memdev.items() if b in used_blocks}
    return GuestMemoryMap(
        ranges=tuple(merged),
        blocks={n: b for n, b in blocks.items() if n in used_blocks},
        memdevs={m: memdevs[m] for m in block_memdev.values()},
        block_memdev=block_memdev,
        never_punch=(tseg,) if tseg is not None else (),
    )


QmpFunction = Callable[[str, "Mapping[str, Any] | None"], Any]


def gather(qmp: QmpFunction) -> QemuMemoryFacts:
    """Ask QEMU everything `build_map` needs through `qmp(command, arguments)`."""

    def hmp(line: str) -> str:
        out = qmp("human-monitor-command", {"command-line": line})
        if not isinstance(out, str):
            raise MapError(f"HMP {line!r}: expected text, got {type(out).__name__}")
        return out

    def qom(path: str, prop: str) -> Any:
        return qmp("qom-get", {"path": path, "property": prop})

    machine: dict[str, Any] = {"type": qom("/machine", "type"), "smm": qom("/machine", "smm")}
    if "q35" in str(machine["type"]):
        machine["extended-tseg-mbytes"] = qom("/machine/q35/mch", "extended-tseg-mbytes")
    return QemuMemoryFacts(
        machine=machine,
        query_memdev=qmp("query-memdev", None),
        qom_objects=qmp("qom-list", {"path": "/objects"}),
        memory_devices=qmp("query-memory-devices", None),
        mtree_flat=hmp("info mtree -f"),
        mtree=hmp("info mtree"),
        ramblock=hmp("info ramblock"),
    )


# ---------------------------------------------------------------------------------------
# Lookup


def locate(gmap: GuestMemoryMap, gpa: int, length: int, granule: int) -> Placement:
    """Validate [gpa, gpa+length) and map it to one RAM block slice, or raise RangeRejected.

    The range must be non-empty, inside 64-bit space, aligned to `granule` and to the
    block's page size, and lie wholly inside one contiguous RAM piece (never across a
    hole such as the VGA window or the PCI hole, nor across two blocks).
    """
    if length <= 0:
        raise RangeRejected(gpa, length, "empty or negative length")
    if gpa < 0 or gpa >= _U64 or gpa + length > _U64:
        raise RangeRejected(gpa, length, "outside the 64-bit guest-physical space")
    if granule <= 0 or granule & (granule - 1):
        raise RangeRejected(gpa, length, f"granule {granule:#x} is not a power of two")
    if gpa % granule or length % granule:
        raise RangeRejected(gpa, length, f"not aligned to the granule {granule:#x}")
    for lo, hi in gmap.never_punch:
        if gpa < hi and lo < gpa + length:
            raise RangeRejected(gpa, length, f"overlaps q35's TSEG window {lo:#x}-{hi - 1:#x} "
                                "(SMRAM once the firmware locks it): never discarded")
    starts = [r.gpa_start for r in gmap.ranges]
    i = bisect.bisect_right(starts, gpa) - 1
    if i < 0 or gpa >= gmap.ranges[i].gpa_end:
        raise RangeRejected(gpa, length, "not guest RAM")
    piece = gmap.ranges[i]
    if gpa + length > piece.gpa_end:
        raise RangeRejected(
            gpa, length,
            f"crosses the end of RAM piece {piece.gpa_start:#x}-{piece.gpa_end - 1:#x} "
            f"({piece.block_name})",
        )
    page_size = gmap.blocks[piece.block_name].page_size
    offset = piece.block_offset + gpa - piece.gpa_start
    if offset % page_size or length % page_size:
        raise RangeRejected(
            gpa, length,
            f"not aligned to the {page_size:#x}-byte pages of block {piece.block_name}",
        )
    return Placement(gpa, length, piece.block_name, offset, page_size)


def split_at_pieces(gmap: GuestMemoryMap, gpa: int, length: int) -> list[tuple[int, int]]:
    """[gpa, gpa+length) cut where it passes from one RAM piece into one that touches it in
    guest-physical space (two NUMA nodes' memory backends, a node's RAM running into q35's
    TSEG window): an honest guest coalesces adjacent free blocks and cannot know where the
    host's blocks end. Each part is then checked on its own (``locate``, ``may_report``).
    A range that meets anything else (a hole, the end of RAM) comes back whole, for those
    checks to refuse as before."""
    out: list[tuple[int, int]] = []
    starts = [r.gpa_start for r in gmap.ranges]
    pos, end = gpa, gpa + length
    while pos < end:
        i = bisect.bisect_right(starts, pos) - 1
        if i >= 0 and pos < gmap.ranges[i].gpa_end:
            cut = min(end, gmap.ranges[i].gpa_end)
        else:
            window = next((hi for lo, hi in gmap.never_punch if lo <= pos < hi), None)
            if window is None:
                return [(gpa, length)]
            cut = min(end, window)
        out.append((pos, cut - pos))
        pos = cut
    return out or [(gpa, length)]


def contains(gmap: GuestMemoryMap, gpa: int, length: int, granule: int) -> bool:
    """True when `locate` would accept the range."""
    try:
        locate(gmap, gpa, length, granule)
    except RangeRejected:
        return False
    return True


def may_report(gmap: GuestMemoryMap, gpa: int, length: int, granule: int) -> bool:
    """True when an honest guest may report the range: `locate` accepts it, or it lies in
    a `never_punch` window (q35's TSEG is plain RAM to a guest whose firmware never set
    SMM up, e.g. SeaBIOS). Such a report is refused at the discard, not treated as
    hostile; anything else is outside the VM's RAM and ends the session (S5)."""
    if contains(gmap, gpa, length, granule):
        return True
    return length > 0 and any(lo <= gpa and gpa + length <= hi for lo, hi in gmap.never_punch)
