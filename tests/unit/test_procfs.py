"""Kernel state parsers on files captured from real kernels, edge cases, and the live /proc.

Captured trees live in tests/data/proc/<kernel>/ laid out like a root filesystem, so the
same readers run on them as on /. See the README in each directory for where the data came
from (host-6.18 and the debian12-6.1* trees are real captures; linux-4.18 is reconstructed).
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, NamedTuple, Tuple

import pytest

from aerate.agent import procfs as p

DATA = Path(__file__).resolve().parent.parent / "data" / "proc"
KERNELS = sorted(d.name for d in DATA.iterdir() if (d / "proc" / "buddyinfo").is_file())
PAGE = 4096  # every captured kernel is x86_64 with 4 KiB pages
MiB = 1024 * 1024

class Facts(NamedTuple):
    """What each capture is known to contain; the tests check the parsers recover it."""

    nodes: FrozenSet[int]
    populated: FrozenSet[Tuple[int, str]]
    migratetypes: Tuple[str, ...]
    psi: bool
    reporting: bool
    # False where meminfo counts memory the buddy allocator has not been given yet.
    meminfo_matches_zones: bool
    zones_per_node: Tuple[str, ...] = ("DMA", "DMA32", "Normal", "Movable", "Device")


MIGRATETYPES_6 = ("Unmovable", "Movable", "Reclaimable", "HighAtomic", "Isolate")
FACTS: Dict[str, Facts] = {
    # This Firecracker kernel initialises memory lazily (deferred_init=lazy): meminfo
    # counts ~19 GiB that zoneinfo and buddyinfo do not show yet.
    "host-6.18": Facts(frozenset({0}), frozenset({(0, "DMA"), (0, "DMA32"), (0, "Normal")}),
                       MIGRATETYPES_6, psi=True, reporting=True, meminfo_matches_zones=False),
    "debian12-6.1": Facts(frozenset({0}), frozenset({(0, "DMA"), (0, "DMA32")}),
                          MIGRATETYPES_6, psi=True, reporting=True, meminfo_matches_zones=True),
    "debian12-6.1-numa": Facts(frozenset({0, 1}),
                               frozenset({(0, "DMA"), (0, "DMA32"), (1, "Normal")}),
                               MIGRATETYPES_6, psi=True, reporting=True,
                               meminfo_matches_zones=True),
    "linux-4.18": Facts(frozenset({0, 1}),
                        frozenset({(0, "DMA"), (0, "DMA32"), (0, "Normal"), (1, "Normal")}),
                        ("Unmovable", "Movable", "Reclaimable", "HighAtomic", "CMA", "Isolate"),
                        psi=False, reporting=False, meminfo_matches_zones=True),
}


def root(kernel: str) -> str:
    return str(DATA / kernel)


def snap(kernel: str) -> p.Snapshot:
    return p.read_snapshot(root(kernel), p.PARTS)


def drift(z: p.ZoneInfo) -> int:
    """How far a zone's free counter may lag the buddy lists: per-cpu vmstat deltas."""
    return (z.stat_threshold or 0) * max(z.cpus, 1)


def test_every_kernel_directory_has_facts() -> None:
    assert set(KERNELS) == set(FACTS), "add FACTS for new captures in tests/data/proc"
    assert {"host-6.18", "debian12-6.1", "linux-4.18"} <= set(KERNELS)


# --------------------------------------------------------------------------- captured data


@pytest.mark.unit
@pytest.mark.parametrize("kernel", KERNELS)
def test_buddyinfo_counts_and_zones(kernel: str) -> None:
    buddy = p.read_buddyinfo(root(kernel))
    facts = FACTS[kernel]
    assert {(b.node, b.zone) for b in buddy} == facts.populated
    for b in buddy:
        assert len(b.free) == 11  # MAX_ORDER / NR_PAGE_ORDERS on x86_64 for all of these
        assert all(n >= 0 for n in b.free)
        assert b.free_pages == sum(n * 2**k for k, n in enumerate(b.free))
    # Every idle guest here has most of its memory free in order-10 blocks.
    assert sum(b.free[10] for b in buddy) * 4 * MiB > sum(b.free_pages for b in buddy) * PAGE / 2


@pytest.mark.unit
@pytest.mark.parametrize("kernel", KERNELS)
def test_buddyinfo_agrees_with_zoneinfo_free_pages(kernel: str) -> None:
    s = snap(kernel)
    assert s.buddyinfo is not None and s.zoneinfo is not None
    for b in s.buddyinfo:
        z = s.zoneinfo.zone(b.node, b.zone)
        assert z is not None, (b.node, b.zone)
        # Both files were read within moments on an idle guest: the only gap allowed is the
        # per-cpu counter drift the kernel itself tolerates.
        assert abs(b.free_pages * PAGE - z.free * PAGE) <= drift(z) * PAGE, (b, z.free)
        assert z.stats["nr_free_pages"] == z.free


@pytest.mark.unit
@pytest.mark.parametrize("kernel", KERNELS)
def test_zoneinfo_layout(kernel: str) -> None:
    zi = p.read_zoneinfo(root(kernel))
    facts = FACTS[kernel]
    nodes = {z.node for z in zi.zones}
    assert nodes == facts.nodes
    assert set(zi.node_stats) == nodes
    for node in nodes:
        names = tuple(z.zone for z in zi.zones if z.node == node)
        assert names == facts.zones_per_node
        populated = [z for z in zi.zones if z.node == node and z.populated]
        assert [z.start_pfn for z in populated] == sorted(z.start_pfn or 0 for z in populated)
        assert "nr_inactive_anon" in zi.node_stats[node]
        assert "" not in zi.node_stats[node]
    assert {(z.node, z.zone) for z in zi.zones if z.populated} == facts.populated
    for z in zi.zones:
        assert len(z.protection) == len(facts.zones_per_node)  # one per zone type
        own = facts.zones_per_node.index(z.zone)
        assert z.protection[own] == 0 and all(x >= 0 for x in z.protection)
        if z.populated:
            assert 0 < z.min <= z.low <= z.high
            assert z.free <= z.managed <= z.present <= z.spanned
            assert z.start_pfn is not None and z.cpus >= 1 and z.stat_threshold
        else:
            # Empty zones: nothing after the protection array.
            assert z.free == z.managed == z.present == 0
            assert z.start_pfn is None and not z.stats and z.cpus == 0


@pytest.mark.unit
@pytest.mark.parametrize("kernel", KERNELS)
def test_pagetypeinfo_agrees_with_buddyinfo(kernel: str) -> None:
    s = snap(kernel)
    pt, buddy, zi = s.pagetypeinfo, s.buddyinfo, s.zoneinfo
    assert pt is not None and buddy is not None and zi is not None
    assert (pt.pageblock_order, pt.pages_per_block) == (9, 512)
    assert pt.migratetypes == FACTS[kernel].migratetypes
    for b in buddy:
        per_type = [f for f in pt.free if (f.node, f.zone) == (b.node, b.zone)]
        assert [f.migratetype for f in per_type] == list(pt.migratetypes)
        assert not any(f.capped for f in per_type)
        summed = tuple(sum(f.free[k] for f in per_type) for k in range(len(b.free)))
        assert summed == b.free, (b.node, b.zone)
    # Pageblocks cover at least the managed pages and at most the zone span.
    assert {(x.node, x.zone) for x in pt.blocks} == {(b.node, b.zone) for b in buddy}
    for blk in pt.blocks:
        z = zi.zone(blk.node, blk.zone)
        assert z is not None
        covered = sum(blk.counts.values()) * pt.pages_per_block
        assert z.managed <= covered <= z.spanned + pt.pages_per_block
        assert tuple(blk.counts) == pt.migratetypes
    assert pt.mixed == ()


@pytest.mark.unit
@pytest.mark.parametrize("kernel", KERNELS)
def test_meminfo_units_and_agreement(kernel: str) -> None:
    s = snap(kernel)
    mi, zi, vm = s.meminfo, s.zoneinfo, s.vmstat
    assert mi is not None and zi is not None and vm is not None
    text = (Path(root(kernel)) / "proc" / "meminfo").read_text()
    kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in text.splitlines()}
    assert mi.total == kb["MemTotal"] * 1024  # kB lines become bytes
    assert mi["HugePages_Total"] == kb["HugePages_Total"]  # counts stay counts
    assert mi["Hugepagesize"] == 2 * MiB
    assert mi.available is not None and 0 < mi.available <= mi.total
    managed = sum(z.managed for z in zi.zones) * PAGE
    zone_free = sum(z.free for z in zi.zones) * PAGE
    assert vm["nr_free_pages"] * PAGE == zone_free
    if FACTS[kernel].meminfo_matches_zones:
        assert mi.total == managed  # MemTotal is totalram_pages, the sum of managed pages
        assert abs(mi.free - zone_free) <= sum(drift(z) for z in zi.zones) * PAGE
    else:
        assert mi.total > managed and mi.free > zone_free


@pytest.mark.unit
@pytest.mark.parametrize("kernel", KERNELS)
def test_snapshot_states_what_is_missing(kernel: str) -> None:
    s = snap(kernel)
    missing = {m.part for m in s.missing}
    # Captures carry no kpageflags (it is the size of RAM); the rest is there or explained.
    assert "kpageflags" in missing and s.kpageflags_readable is False
    if FACTS[kernel].psi:
        assert s.psi_memory is not None and s.psi_memory.full is not None
        assert s.psi_memory.some.avg10 >= 0 and s.psi_memory.some.total_us >= 0
    else:
        assert s.psi_memory is None
        reason = s.why_missing("psi") or ""
        assert "4.20" in reason and "pressure/memory" in reason
    assert s.balloon is not None
    assert s.balloon.free_page_reporting_active is FACTS[kernel].reporting
    assert "STATS_VQ" in s.balloon.features and "VERSION_1" in s.balloon.features
    for m in s.missing:
        assert m.reason and m.path.startswith(root(kernel))


@pytest.mark.unit
@pytest.mark.parametrize("kernel", KERNELS)
def test_free_summary_on_captures(kernel: str) -> None:
    s = snap(kernel)
    assert s.buddyinfo is not None and s.zoneinfo is not None
    fs = p.summarize_free(s.buddyinfo, 9)
    assert "DMA" not in {z.zone for z in fs.zones} and fs.excluded == ("DMA",)
    expect = sum(b.free[9] + 2 * b.free[10] for b in s.buddyinfo if b.zone != "DMA")
    assert fs.blocks == expect and fs.block_pages == 512
    wm = p.total_watermarks(s.zoneinfo.zones)
    populated = [z for z in s.zoneinfo.zones if z.populated and z.zone != "DMA"]
    assert wm == p.Watermarks(sum(z.min for z in populated), sum(z.low for z in populated),
                              sum(z.high for z in populated))
    # With the high watermark as the reserve, the blocks left are those whose taking keeps
    # free memory at or above it.
    n = fs.blocks_beyond(wm.high)
    assert 0 < n <= fs.blocks
    assert fs.free_pages - n * 512 >= wm.high
    assert n == fs.blocks or fs.free_pages - (n + 1) * 512 < wm.high
    everything = p.summarize_free(s.buddyinfo, 0, exclude_zones=())
    assert everything.blocks == everything.free_pages == sum(b.free_pages for b in s.buddyinfo)


@pytest.mark.unit
def test_linux_418_hidden_vmstat_line_and_empty_zones_before_node_stats() -> None:
    text = (DATA / "linux-4.18" / "proc" / "zoneinfo").read_text()
    # 4.17-4.19 print nr_indirectly_reclaimable with an empty name: a bare number line.
    assert any(ln.strip().isdigit() for ln in text.splitlines())
    zi = p.parse_zoneinfo(text)
    node1 = [z for z in zi.zones if z.node == 1]
    assert [z.zone for z in node1 if not z.populated] == ["DMA", "DMA32", "Movable", "Device"]
    # 4.18 computes lowmem reserves even for empty lower zones.
    dma1 = zi.zone(1, "DMA")
    normal1 = zi.zone(1, "Normal")
    assert dma1 is not None and normal1 is not None
    assert dma1.protection[2] == normal1.managed // 256
    assert zi.node_stats[1]["nr_written"] > 0


@pytest.mark.unit
def test_host_618_watermark_block_has_boost_promo_cma() -> None:
    z = p.read_zoneinfo(root("host-6.18")).zone(0, "Normal")
    assert z is not None
    assert {"boost", "promo", "cma"} <= set(z.fields)
    assert z.fields["promo"] >= z.high  # promo watermark sits above high (6.x NUMA tiering)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.unit
@pytest.mark.parametrize(
    ("parse", "text", "lineno"),
    [
        (p.parse_buddyinfo, "Node 0, zone DMA 1 2 3\nNode 0, zone DMA32 1 x 3\n", 2),
        (p.parse_buddyinfo, "Node 0, zone DMA 1 2 3\nNode 0, zone DMA32 1 2\n", 2),
        (p.parse_zoneinfo, "Node 0, zone DMA\n  pages free 3\n  what is this?\n", 3),
        (p.parse_zoneinfo, "  pages free 3\n", 1),
        (p.parse_meminfo, "MemTotal: 10 kB\nMemFree: 1 kB\nbogus line\n", 3),
        (p.parse_meminfo, "MemTotal: 10 MB\n", 1),
        (p.parse_vmstat, "nr_free_pages 10\nnr_foo ten\n", 2),
        (p.parse_pressure, "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nmost avg10=1\n", 2),
        (p.parse_pressure, "some avg10=0.00 avg60=0.00 total=0\n", 1),
        (p.parse_pagetypeinfo, "Page block order: 9\nPages per block:  512\nhello\n", 3),
    ],
)
def test_garbage_line_names_file_and_line(parse: Callable[[str], object], text: str,
                                          lineno: int) -> None:
    with pytest.raises(ValueError, match=r"/proc/\S+ line %d: " % lineno) as info:
        parse(text)
    assert isinstance(info.value, p.ProcParseError)
    assert info.value.lineno == lineno and info.value.source.startswith("/proc/")


@pytest.mark.unit
def test_empty_and_headerless_files_are_errors() -> None:
    for parse in (p.parse_buddyinfo, p.parse_zoneinfo, p.parse_pagetypeinfo, p.parse_pressure):
        with pytest.raises(p.ProcParseError):
            parse("")
    with pytest.raises(p.ProcParseError, match=r"lacks .*managed"):
        p.parse_zoneinfo("Node 0, zone DMA\n  pages free 1\n  min 1\n  low 1\n  high 1\n"
                         "  spanned 1\n  present 1\n  protection: (0, 0)\n")


@pytest.mark.unit
def test_psi_without_full_line() -> None:
    pr = p.parse_pressure("some avg10=1.50 avg60=0.25 avg300=0.00 total=123456\n")
    assert pr.full is None
    assert pr.some == p.PsiLine(1.5, 0.25, 0.0, 123456)


@pytest.mark.unit
def test_pagetypeinfo_capped_counts_and_mixed_table() -> None:
    text = (
        "Page block order: 9\nPages per block:  512\n\n"
        "Free pages count per migrate type at order       0      1      2 \n"
        "Node    0, zone   Normal, type    Unmovable >100000     12      0 \n"
        "Node    0, zone   Normal, type      Movable      5      0 >100000 \n\n"
        "Number of blocks type     Unmovable      Movable \n"
        "Node 0, zone   Normal           10           20 \n\n"
        "Number of mixed blocks    Unmovable      Movable \n"
        "Node 0, zone   Normal            1            0 \n"
    )
    pt = p.parse_pagetypeinfo(text)
    unmov = pt.free[0]
    assert unmov.free == (100000, 12, 0) and unmov.capped == frozenset({0})
    assert pt.free_of(0, "Normal", "Movable") == (5, 0, 100000)
    assert pt.free_of(0, "Normal", "CMA") is None
    assert dict(pt.blocks[0].counts) == {"Unmovable": 10, "Movable": 20}
    assert dict(pt.mixed[0].counts) == {"Unmovable": 1, "Movable": 0}


@pytest.mark.unit
def test_blocks_at_least_and_reserve_arithmetic() -> None:
    b = p.BuddyZone(0, "Normal", (7, 0, 0, 0, 0, 0, 0, 0, 0, 3, 2))
    assert b.blocks_at_least(9) == 3 + 2 * 2
    assert b.blocks_at_least(10) == 2
    assert b.blocks_at_least(11) == 0
    with pytest.raises(ValueError):
        b.blocks_at_least(-1)
    fs = p.summarize_free([b, p.BuddyZone(0, "DMA", (0,) * 10 + (5,))], 9)
    assert fs.blocks == 7 and fs.free_pages == 7 + 7 * 512
    assert fs.blocks_beyond(0) == 7
    assert fs.blocks_beyond(7) == 7  # the 7 order-0 pages cover the reserve
    assert fs.blocks_beyond(8) == 6
    assert fs.blocks_beyond(10**9) == 0


@pytest.mark.unit
def test_virtio_features_parse() -> None:
    bits = p.parse_virtio_features("0100010000000000000000000000010010000000100000000000000\n")
    bf = p.balloon_features("virtio3", bits)
    assert bf.features == {"STATS_VQ", "REPORTING", "RING_EVENT_IDX", "VERSION_1", "RING_RESET"}
    assert bf.free_page_reporting_active and bf.unknown_bits == ()
    odd = p.balloon_features("virtio0", p.parse_virtio_features("01100101"))
    assert odd.unknown_bits == (7,) and "bit7" in odd.features
    for bad in ("", "01x1", "0 1"):
        with pytest.raises(p.ProcParseError):
            p.parse_virtio_features(bad)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cmdline", "config", "state", "fill"),
    [
        ("root=/dev/vda1 quiet", {"CONFIG_PAGE_POISONING": "y"}, "off", None),
        ("root=/dev/vda1 page_poison=1", {"CONFIG_PAGE_POISONING": "y"}, "nonzero", 0xAA),
        ("page_poison=on", None, "nonzero", 0xAA),  # config unknown: assume it works
        ("page_poison=1", {}, "off", None),  # kernel built without poisoning ignores it
        ("page_poison=on", {"CONFIG_PAGE_POISONING": "y", "CONFIG_PAGE_POISONING_ZERO": "y"},
         "zero", 0),
        ("page_poison=0", {"CONFIG_PAGE_POISONING": "y"}, "off", None),
        ("init_on_free=1", {}, "zero", 0),
        ("quiet", {"CONFIG_INIT_ON_FREE_DEFAULT_ON": "y"}, "zero", 0),
        ("init_on_free=0", {"CONFIG_INIT_ON_FREE_DEFAULT_ON": "y"}, "off", None),
        ("init_on_free=1 page_poison=1", {"CONFIG_PAGE_POISONING": "y"}, "nonzero", 0xAA),
        ("rdinit=/x -- page_poison=1", {"CONFIG_PAGE_POISONING": "y"}, "off", None),
        (None, {}, "unknown", None),
    ],
)
def test_page_poisoning(cmdline: str, config: Dict[str, str], state: str, fill: int) -> None:
    pp = p.parse_page_poisoning(cmdline, config)
    assert (pp.state, pp.fill) == (state, fill)
    assert pp.discard_safe is (state in ("off", "zero"))
    assert pp.detail


@pytest.mark.unit
def test_page_poisoning_with_debian_kernel_config() -> None:
    cfg = p.read_kconfig(root("debian12-6.1"))
    assert cfg is not None and cfg["CONFIG_PAGE_POISONING"] == "y"
    assert "CONFIG_INIT_ON_FREE_DEFAULT_ON" not in cfg  # "# ... is not set"
    assert p.read_page_poisoning(root("debian12-6.1")).state == "off"
    assert p.parse_page_poisoning("page_poison=1", cfg).state == "nonzero"


@pytest.mark.unit
def test_kpageflags_sample_decodes_and_buddy_pages_are_free() -> None:
    sample = DATA / "host-6.18" / "kpageflags-pfn1310720-8192.bin"
    words = p.parse_kpageflags(sample.read_bytes())
    assert len(words) == 8192
    buddy = [w for w in words if p.is_buddy(w)]
    assert 0 < len(buddy) < len(words)
    in_use = (1 << p.KPF_LRU | 1 << p.KPF_SLAB | 1 << p.KPF_MMAP | 1 << p.KPF_ANON
              | 1 << p.KPF_COMPOUND_HEAD | 1 << p.KPF_COMPOUND_TAIL | 1 << p.KPF_THP
              | 1 << p.KPF_PGTABLE)
    assert all(not w & in_use for w in buddy)
    assert p.flag_names(1 << p.KPF_BUDDY | 1 << p.KPF_THP | 1 << 50) == ("buddy", "thp", "bit50")
    assert not p.is_buddy(1 << p.KPF_BUDDY | 1 << p.KPF_NOPAGE)
    with pytest.raises(p.ProcParseError, match="8-byte"):
        p.parse_kpageflags(b"\0" * 12)


@pytest.mark.unit
def test_read_kpageflags_offsets_runs_and_end_of_memory() -> None:
    path = str(DATA / "host-6.18" / "kpageflags-pfn1310720-8192.bin")
    words = p.parse_kpageflags(Path(path).read_bytes())
    assert p.read_kpageflags(100, 3, path) == words[100:103]
    # Past the end of the file, as past the end of memory: "no page", never "free".
    tail = p.read_kpageflags(8190, 4, path)
    assert tail[:2] == words[8190:] and tail[2:] == [1 << p.KPF_NOPAGE] * 2
    pfns = [5, 4, 6, 4000, 8191, 9000]
    got = p.read_kpageflags_for(pfns, path)
    assert got == {5: words[5], 4: words[4], 6: words[6], 4000: words[4000],
                   8191: words[8191], 9000: 1 << p.KPF_NOPAGE}
    with pytest.raises(ValueError):
        p.read_kpageflags(-1, 1, path)


@pytest.mark.unit
def test_pagemap_entry_decoding() -> None:
    e = p.parse_pagemap_entry(p.PM_PRESENT | p.PM_MMAP_EXCLUSIVE | 0x12345)
    assert e == p.PagemapEntry(True, False, False, True, 0x12345)
    swapped = p.parse_pagemap_entry(p.PM_SWAP | 0x777)  # swap type/offset, not a PFN
    assert swapped.swapped and swapped.pfn == 0
    assert p.parse_pagemap_entry(0) == p.PagemapEntry(False, False, False, False, 0)


@pytest.mark.unit
def test_pagemap_pfn_is_none_unless_resident() -> None:
    assert p.pagemap_pfn(p.PM_PRESENT | 0x12345) == 0x12345
    assert p.pagemap_pfn(0x12345) is None  # not present
    assert p.pagemap_pfn(p.PM_PRESENT | p.PM_SWAP | 7) is None
    # Flag bits 55-61 (soft-dirty, exclusive, file...) are not part of the frame.
    assert p.pagemap_pfn(p.PM_PRESENT | p.PM_FILE | p.PM_SOFT_DIRTY | 9) == 9
    # A present page at frame 0 is how the kernel hides PFNs: 0, not "not resident".
    assert p.pagemap_pfn(p.PM_PRESENT) == 0


@pytest.mark.unit
def test_cmdline_and_bracket_choice() -> None:
    params = p.parse_cmdline('a=1 quiet b="x y" a=2 -- init=/bin/sh c=3\n')
    assert params == {"a": "2", "quiet": "", "b": "x y"}
    assert p.parse_cmdline('broken="quote page_poison=1') == {"broken": '"quote',
                                                               "page_poison": "1"}
    assert p.parse_bracket_choice("always [madvise] never\n") == "madvise"
    with pytest.raises(p.ProcParseError):
        p.parse_bracket_choice("always madvise never")


@pytest.mark.unit
def test_snapshot_turns_unreadable_and_garbled_files_into_reasons(tmp_path: Path) -> None:
    (tmp_path / "proc" / "pressure").mkdir(parents=True)
    (tmp_path / "proc" / "pressure" / "memory").mkdir()  # a directory: read fails
    (tmp_path / "proc" / "buddyinfo").write_text("Node 0, zone DMA 1 2\nrubbish\n")
    (tmp_path / "proc" / "cmdline").write_text("quiet\n")
    s = p.read_snapshot(str(tmp_path), p.PARTS)
    assert s.buddyinfo is None and s.psi_memory is None and s.zoneinfo is None
    reasons = {m.part: m.reason for m in s.missing}
    assert "line 2" in reasons["buddyinfo"] and "buddyinfo" in reasons["buddyinfo"]
    assert "directory" in reasons["psi"].lower()
    assert "not present" in reasons["zoneinfo"]
    assert "no virtio-balloon" in reasons["balloon"]
    assert s.poisoning is not None and s.poisoning.state == "off"
    assert set(reasons) == set(p.PARTS) - {"poisoning"}
    # Parts not asked for are neither read nor reported missing.
    only = p.read_snapshot(str(tmp_path), ["poisoning"])
    assert only.missing == () and only.buddyinfo is None and only.poisoning is not None
    # The default is the poll set: nothing static is read, so nothing static is missing.
    polled = p.read_snapshot(str(tmp_path))
    assert {m.part for m in polled.missing} == set(p.DEFAULT_PARTS)
    assert polled.poisoning is None and polled.kpageflags_readable is None
    assert p.DEFAULT_PARTS | p.STATIC_PARTS | {"pagetypeinfo"} == set(p.PARTS)
    with pytest.raises(ValueError, match="unknown snapshot parts"):
        p.read_snapshot(str(tmp_path), ["buddyinfo", "slabinfo"])


@pytest.mark.unit
def test_psi_disabled_at_boot_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    """MOCK: a kernel built with CONFIG_PSI_DEFAULT_DISABLED and booted without psi=1 answers
    EOPNOTSUPP on read; no such kernel runs here, so the read is replaced."""

    def disabled(path: str) -> str:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)

    monkeypatch.setattr(p, "read_text", disabled)
    s = p.read_snapshot(root("host-6.18"), ["psi"])
    assert s.psi_memory is None
    assert "boot with psi=1" in (s.why_missing("psi") or "")


# --------------------------------------------------------------------------- live /proc


def _sandwich() -> Tuple[List[p.BuddyZone], p.ZoneInfoFile, List[p.BuddyZone]]:
    before = list(p.read_buddyinfo())
    zi = p.read_zoneinfo()
    after = list(p.read_buddyinfo())
    return before, zi, after


@pytest.mark.host
def test_live_proc_parses_and_buddyinfo_brackets_zoneinfo() -> None:
    s = p.read_snapshot("/", p.PARTS)
    for part in ("buddyinfo", "zoneinfo", "meminfo", "vmstat"):
        assert s.why_missing(part) is None, s.missing
    assert s.meminfo is not None and s.meminfo.total > 0
    assert os.sysconf("SC_PAGE_SIZE") == PAGE
    # Other work may allocate between the reads: read buddyinfo before and after zoneinfo
    # and require the zone counter inside that window, widened by the per-cpu drift.
    for _attempt in range(5):
        before, zi, after = _sandwich()
        ok = True
        for b0, b1 in zip(before, after):
            z = zi.zone(b0.node, b0.zone)
            assert z is not None and (b1.node, b1.zone) == (b0.node, b0.zone)
            lo = min(b0.free_pages, b1.free_pages) - drift(z)
            hi = max(b0.free_pages, b1.free_pages) + drift(z)
            ok = ok and lo <= z.free <= hi
        if ok:
            break
    assert ok, "zoneinfo free pages outside the buddyinfo window five times in a row"
    populated = {(z.node, z.zone) for z in zi.zones if z.populated}
    assert {(b.node, b.zone) for b in before} == populated


@pytest.mark.host
def test_live_kpageflags_marks_our_own_pages_in_use() -> None:
    if os.geteuid() != 0:
        pytest.skip("kpageflags and pagemap PFNs need root")
    n = 64
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for i in range(n):
            m[i * PAGE] = 1  # fault every page in
        import ctypes

        buf = (ctypes.c_char * (n * PAGE)).from_buffer(m)
        addr = ctypes.addressof(buf)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            raw = os.pread(fd, 8 * n, addr // PAGE * 8)
        finally:
            os.close(fd)
        del buf
        entries = [p.parse_pagemap_entry(int.from_bytes(raw[i:i + 8], "little"))
                   for i in range(0, len(raw), 8)]
        assert all(e.present and e.pfn for e in entries)
        flags = p.read_kpageflags_for(e.pfn for e in entries)
        for e in entries:
            f = flags[e.pfn]
            assert not p.is_buddy(f), p.flag_names(f)
            assert f & (1 << p.KPF_ANON) and not f & (1 << p.KPF_NOPAGE), p.flag_names(f)
    finally:
        m.close()
