"""GPA -> RAM block map and backing parsers, on real QEMU 7.2 monitor and /proc captures.

Captures live in tests/data/qemu/<case>/ and are re-made by tests/data/qemu/capture.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aerate.host import backing as bk
from aerate.host import qemu_map as qm

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parent.parent / "data" / "qemu"
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
CASES = sorted(p.name for p in DATA.iterdir() if (p / "mtree-f.txt").exists())
#: q35 with SMM (QEMU 7.2's default, smm=auto): the largest TSEG, extended-tseg-mbytes=16.
TSEG = 16 * MIB
PROC_CASES = sorted(c for c in CASES if (DATA / c / "smaps-large.txt").exists())


def facts(case: str) -> qm.QemuMemoryFacts:
    d = DATA / case
    return qm.QemuMemoryFacts(
        query_memdev=json.loads((d / "query-memdev.json").read_text()),
        qom_objects=json.loads((d / "qom-objects.json").read_text()),
        memory_devices=json.loads((d / "query-memory-devices.json").read_text()),
        mtree_flat=(d / "mtree-f.txt").read_text(),
        mtree=(d / "mtree.txt").read_text(),
        ramblock=(d / "ramblock.txt").read_text(),
        machine=json.loads((d / "smm.json").read_text()),
    )


def gmap(case: str) -> qm.GuestMemoryMap:
    return qm.build_map(facts(case))


def machine_ram(case: str) -> int:
    """Boot RAM plus every RAM device window (a virtio-mem device maps its max-size)."""
    summary = json.loads((DATA / case / "query-memory-size-summary.json").read_text())
    devices = json.loads((DATA / case / "query-memory-devices.json").read_text())
    return int(summary["base-memory"]) + sum(
        int(d["data"].get("max-size", d["data"]["size"])) for d in devices)


def test_captures_cover_the_layouts_we_need() -> None:
    # pc and q35, below/above 4 GiB, hugetlb 2M/1G, file, private, NUMA, DIMM, libvirt.
    assert len(CASES) >= 16
    assert {"pc-5g-memfd", "q35-5g-memfd", "q35-2g-memfd-hugetlb1g", "q35-3g-numa-memfd",
            "q35-1g-dimm-memfd", "libvirt-q35-256m-memfd-running"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_ranges_are_sorted_disjoint_and_inside_their_blocks(case: str) -> None:
    m = gmap(case)
    for a, b in zip(m.ranges, m.ranges[1:]):
        assert a.gpa_end <= b.gpa_start
    for r in m.ranges:
        assert r.length > 0
        assert r.block_offset + r.length <= m.blocks[r.block_name].used
    # No two pieces claim the same bytes of a block.
    spans = sorted((r.block_name, r.block_offset, r.block_offset + r.length) for r in m.ranges)
    for (n1, _, e1), (n2, s2, _) in zip(spans, spans[1:]):
        assert n1 != n2 or e1 <= s2


@pytest.mark.parametrize("case", CASES)
def test_ram_sums_to_machine_ram_minus_the_legacy_window(case: str) -> None:
    m = gmap(case)
    # 0xa0000-0xfffff (VGA, option ROMs, BIOS; remapped by the guest's chipset at run
    # time) is never counted, nor q35's TSEG; everything else QEMU calls machine RAM is.
    tseg = TSEG if "q35" in case else 0
    assert m.ram_size == machine_ram(case) - 0x60000 - tseg
    assert m.ranges[0] == qm.RamRange(0, 0xA0000, m.ranges[0].block_name, 0)
    assert m.ranges[1].gpa_start == MIB and m.ranges[1].block_offset == MIB
    assert not any(r.gpa_start < MIB <= r.gpa_end and r.gpa_start != 0 for r in m.ranges)


@pytest.mark.parametrize(
    ("case", "below_4g", "block"),
    [
        ("pc-5g-memfd", 3 * GIB, "pc.ram"),
        ("pc-5g-memfd-hugetlb2m", 3 * GIB, "pc.ram"),
        ("q35-5g-memfd", 2 * GIB, "pc.ram"),
    ],
)
def test_ram_above_4g_continues_the_block_at_below_4g(case: str, below_4g: int,
                                                      block: str) -> None:
    m = gmap(case)
    (hi,) = [r for r in m.ranges if r.gpa_start >= 4 * GIB]
    assert hi.gpa_start == 4 * GIB
    assert hi.block_name == block
    assert hi.block_offset == below_4g
    assert hi.length == 5 * GIB - below_4g
    below = [r for r in m.ranges if r.gpa_start < 4 * GIB]
    top = below_4g - (TSEG if "q35" in case else 0)
    assert below[-1].gpa_end == top
    # The PCI hole between them is not RAM, nor q35's TSEG below it.
    assert not qm.contains(m, below_4g, 2 * MIB, 2 * MIB)
    assert not qm.contains(m, top - 2 * MIB, 4 * MIB, 2 * MIB)
    assert not qm.contains(m, top, 2 * MIB, 2 * MIB)
    p = qm.locate(m, 4 * GIB, 2 * MIB, 2 * MIB)
    assert (p.block_name, p.block_offset) == (block, below_4g)
    p = qm.locate(m, top - 2 * MIB, 2 * MIB, 2 * MIB)
    assert (p.block_name, p.block_offset) == (block, top - 2 * MIB)


def test_numa_node_straddling_low_memory_end_is_split() -> None:
    m = gmap("q35-3g-numa-memfd")
    pieces = [(hex(r.gpa_start), hex(r.length), r.block_name, hex(r.block_offset))
              for r in m.ranges if r.gpa_start >= MIB]
    assert pieces == [
        ("0x100000", "0x3ff00000", "ram-node0", "0x100000"),
        ("0x40000000", "0x3f000000", "ram-node1", "0x0"),  # TSEG: the top 16 MiB
        ("0x100000000", "0x40000000", "ram-node1", "0x40000000"),
    ]
    # Adjacent in GPA but two blocks: a range across the node boundary is refused.
    with pytest.raises(qm.RangeRejected, match="crosses the end"):
        qm.locate(m, GIB - 2 * MIB, 4 * MIB, 2 * MIB)


def test_dimm_ram_is_mapped_from_its_device_window() -> None:
    m = gmap("q35-1g-dimm-memfd")
    p = qm.locate(m, 4 * GIB + 2 * MIB, 2 * MIB, 2 * MIB)
    assert (p.block_name, p.block_offset) == ("dimm0", 2 * MIB)
    assert not qm.contains(m, 4 * GIB + 512 * MIB, 2 * MIB, 2 * MIB)


def test_virtio_mem_is_mapped_over_its_whole_region() -> None:
    m = gmap("q35-1g-virtio-mem-memfd")
    p = qm.locate(m, 4 * GIB + 1022 * MIB, 2 * MIB, 2 * MIB)
    # The device registers the block under its PCI path.
    assert (p.block_name, p.block_offset) == ("0000:00:01.0/vmem0", 1022 * MIB)
    assert m.block_memdev["0000:00:01.0/vmem0"] == "vmem0"
    assert set(m.memdevs) == {"pc.ram", "vmem0"}
    assert not qm.contains(m, 5 * GIB, 2 * MIB, 2 * MIB)


@pytest.mark.parametrize(
    ("case", "page_size"),
    [("q35-1g-memfd", 4 * KIB), ("q35-1g-memfd-hugetlb2m", 2 * MIB),
     ("q35-2g-memfd-hugetlb1g", GIB), ("q35-1g-file-hugetlbfs", 2 * MIB)],
)
def test_page_size_comes_from_info_ramblock(case: str, page_size: int) -> None:
    m = gmap(case)
    assert m.blocks["pc.ram"].page_size == page_size


def test_backend_types_come_from_qom() -> None:
    assert gmap("q35-1g-memfd").memdevs["pc.ram"].qom_type == "memory-backend-memfd"
    assert gmap("pc-1g-file-shm").memdevs["pc.ram"].qom_type == "memory-backend-file"
    # Plain -m: QEMU's own default backend, private.
    default = gmap("pc-1g-ram-default").memdevs["pc.ram"]
    assert (default.qom_type, default.share) == ("memory-backend-ram", False)


def test_one_gib_pages_refuse_smaller_ranges() -> None:
    m = gmap("q35-2g-memfd-hugetlb1g")
    # The second GiB holds q35's TSEG at its top: never a whole page either.
    with pytest.raises(qm.RangeRejected, match="TSEG"):
        qm.locate(m, GIB, GIB, 2 * MIB)
    with pytest.raises(qm.RangeRejected, match="0x40000000-byte pages"):
        qm.locate(m, GIB, 2 * MIB, 2 * MIB)
    # Without SMM the same page is whole guest RAM.
    f = facts("q35-2g-memfd-hugetlb1g")
    no_smm = qm.build_map(dataclasses.replace(f, machine=dict(f.machine or {}, smm="off")))
    p = qm.locate(no_smm, GIB, GIB, 2 * MIB)
    assert (p.block_offset, p.page_size) == (GIB, GIB)
    # The first GiB holds the legacy hole: never a whole page.
    with pytest.raises(qm.RangeRejected, match="crosses the end"):
        qm.locate(m, 0, GIB, GIB)


def test_vga_window_is_a_hole() -> None:
    m = gmap("pc-1g-memfd-vga")
    assert qm.parse_flat_view(facts("pc-1g-memfd-vga").mtree_flat)[1].name == "vga-lowmem"
    with pytest.raises(qm.RangeRejected, match="not guest RAM"):
        qm.locate(m, 0xA0000, 0x1000, 0x1000)
    with pytest.raises(qm.RangeRejected, match="crosses the end"):
        qm.locate(m, 0x9F000, 0x2000, 0x1000)
    # VGA memory is a RAM block too, but no memory backend: never in the map.
    assert "0000:00:02.0/vga.vram" not in m.blocks


def test_pam_shadowed_bios_is_never_ram() -> None:
    # After the firmware ran, parts of 0xc0000-0xfffff are pc.ram mapped read-only ("rom",
    # the shadowed BIOS) and parts writable; the guest's PAM registers change that at
    # run time, so the whole legacy window stays out of the map.
    m = gmap("q35-1g-memfd-running")
    flat = qm.parse_flat_view(facts("q35-1g-memfd-running").mtree_flat)
    assert any(f.kind == "rom" and f.name == "pc.ram" for f in flat)
    assert any(f.kind == "ram" and f.gpa_start == 0xE8000 for f in flat)
    for gpa in (0xA0000, 0xC3000, 0xE8000, 0xF0000):
        assert not qm.contains(m, gpa, 0x1000, 0x1000)
    assert qm.contains(m, 0x9F000, 0x1000, 0x1000)
    assert qm.contains(m, MIB, 0x1000, 0x1000)


@pytest.mark.parametrize(
    ("gpa", "length", "granule", "why"),
    [
        (64 * MIB, 0, 2 * MIB, "empty"),
        (64 * MIB, -2 * MIB, 2 * MIB, "empty"),
        (-2 * MIB, 2 * MIB, 2 * MIB, "64-bit"),
        ((1 << 64) - 2 * MIB, 4 * MIB, 2 * MIB, "64-bit"),
        (1 << 64, 2 * MIB, 2 * MIB, "64-bit"),
        (64 * MIB + 4096, 2 * MIB, 2 * MIB, "not aligned to the granule"),
        (64 * MIB, 2 * MIB + 4096, 2 * MIB, "not aligned to the granule"),
        (64 * MIB, 3 * MIB, 3 * MIB, "not a power of two"),
        (64 * MIB, 2 * MIB, 0, "not a power of two"),
        (GIB, 2 * MIB, 2 * MIB, "not guest RAM"),
        (GIB - TSEG - 2 * MIB, 4 * MIB, 2 * MIB, "TSEG"),
        (GIB - 2 * MIB, 2 * MIB, 2 * MIB, "TSEG window 0x3f000000-0x3fffffff"),
        (0, 2 * MIB, 2 * MIB, "crosses the end"),
        (0xFEE00000, 4096, 4096, "not guest RAM"),
    ],
)
def test_locate_rejects(gpa: int, length: int, granule: int, why: str) -> None:
    with pytest.raises(qm.RangeRejected, match=why) as err:
        qm.locate(gmap("q35-1g-memfd"), gpa, length, granule)
    assert (err.value.gpa, err.value.length) == (gpa, length)


def test_libvirt_started_guest_maps_like_plain_qemu() -> None:
    m = gmap("libvirt-q35-256m-memfd-running")
    p = qm.locate(m, 128 * MIB, 2 * MIB, 2 * MIB)
    assert (p.block_name, p.block_offset, p.page_size) == ("pc.ram", 128 * MIB, 4 * KIB)
    assert qm.contains(m, 256 * MIB - TSEG - 2 * MIB, 2 * MIB, 2 * MIB)
    assert not qm.contains(m, 254 * MIB, 2 * MIB, 2 * MIB)  # TSEG
    assert not qm.contains(m, 256 * MIB, 2 * MIB, 2 * MIB)


_MAPS = {c: gmap(c) for c in ("q35-5g-memfd", "q35-3g-numa-memfd", "q35-1g-memfd-running")}


@settings(max_examples=400, deadline=None)
@given(
    case=st.sampled_from(sorted(_MAPS)),
    gpa=st.one_of(st.integers(0, 8 * GIB), st.integers(-(1 << 65), 1 << 65)),
    length=st.one_of(st.integers(0, 64 * MIB), st.integers(-(1 << 65), 1 << 65)),
    granule_log=st.integers(0, 31),
)
def test_locate_accepts_only_ranges_wholly_inside_one_piece(
    case: str, gpa: int, length: int, granule_log: int
) -> None:
    m = _MAPS[case]
    granule = 1 << granule_log
    try:
        p = qm.locate(m, gpa, length, granule)
    except qm.RangeRejected:
        # Rejected: then no single piece holds it aligned, or it is malformed.
        ok = (length > 0 and gpa >= 0 and gpa % granule == 0 and length % granule == 0
              and length % 4096 == 0 and gpa % 4096 == 0
              and any(r.gpa_start <= gpa and gpa + length <= r.gpa_end for r in m.ranges))
        assert not ok
        return
    (piece,) = [r for r in m.ranges if r.gpa_start <= gpa < r.gpa_end]
    assert gpa + length <= piece.gpa_end
    assert p.block_name == piece.block_name
    assert p.block_offset == piece.block_offset + gpa - piece.gpa_start
    assert gpa % granule == 0 and length % granule == 0 and p.block_offset % p.page_size == 0


def test_kvm_annotation_is_ignored() -> None:
    f = facts("pc-5g-memfd")
    annotated = "\n".join(
        line + " KVM" if "(prio" in line else line for line in f.mtree_flat.splitlines()
    )
    assert qm.parse_flat_view(annotated) == qm.parse_flat_view(f.mtree_flat)


def test_missing_pieces_of_evidence_raise_map_error() -> None:
    f = facts("q35-1g-memfd")
    with pytest.raises(qm.MapError, match="flat view"):
        qm.parse_flat_view(f.mtree_flat, address_space="no-such-space")
    # A machine without the x86 RAM window aliases (e.g. microvm) cannot be proven.
    no_alias = f.mtree.replace("alias ram-below-4g", "alias something-else")
    with pytest.raises(qm.MapError, match="ram-below-4g"):
        qm.build_map(qm.QemuMemoryFacts(f.query_memdev, f.qom_objects, f.memory_devices,
                                        f.mtree_flat, no_alias, f.ramblock, f.machine))
    with pytest.raises(qm.MapError, match="no RAM blocks"):
        qm.parse_ramblocks("")
    with pytest.raises(qm.MapError, match="no memory backend"):
        qm.build_map(qm.QemuMemoryFacts([], f.qom_objects, f.memory_devices, f.mtree_flat,
                                        f.mtree, f.ramblock, f.machine))


def test_memdev_of_a_non_ram_device_is_excluded() -> None:
    # Same capture, but pretend dimm0 were an NVDIMM: its backend is not guest RAM.
    f = facts("q35-1g-dimm-memfd")
    devices = [dict(d, type="nvdimm") for d in f.memory_devices]
    m = qm.build_map(qm.QemuMemoryFacts(f.query_memdev, f.qom_objects, devices, f.mtree_flat,
                                        f.mtree, f.ramblock, f.machine))
    assert "dimm0" not in m.blocks
    assert not qm.contains(m, 4 * GIB, 2 * MIB, 2 * MIB)


def test_gather_asks_qemu_the_right_questions() -> None:
    f = facts("q35-1g-memfd")
    answers = {
        ("query-memdev", None): f.query_memdev,
        ("qom-list", "/objects"): f.qom_objects,
        ("query-memory-devices", None): f.memory_devices,
        ("human-monitor-command", "info mtree -f"): f.mtree_flat,
        ("human-monitor-command", "info mtree"): f.mtree,
        ("human-monitor-command", "info ramblock"): f.ramblock,
    }
    assert f.machine is not None
    for prop, value in f.machine.items():
        path = "/machine/q35/mch" if prop == "extended-tseg-mbytes" else "/machine"
        answers[("qom-get", f"{path}:{prop}")] = value

    def qmp(cmd: str, args: object) -> object:
        key = None
        if isinstance(args, dict):
            key = args.get("command-line", args.get("path"))
            if "property" in args:
                key = f"{key}:{args['property']}"
        return answers[(cmd, key)]

    assert qm.gather(qmp) == f


# --- backing parsers on the same captures -------------------------------------------


def block_vma(case: str) -> bk.Vma:
    m = gmap(case)
    block = m.block_names()[0]
    piece = next(r for r in m.ranges if r.block_name == block)
    hvas = (DATA / case / "gpa2hva.txt").read_text()
    answers = [bk.parse_gpa2hva(chunk) for chunk in hvas.split("gpa2hva ")[1:]
               if "Host virtual address" in chunk]
    _, region, hva = next(a for a in answers if a[0] == piece.gpa_start)
    assert region == m.block_memdev[block]
    vmas = bk.parse_smaps((DATA / case / "smaps-large.txt").read_text())
    return bk.covering_vma(vmas, hva - piece.block_offset, m.blocks[block].used)


@pytest.mark.parametrize(
    ("case", "kind", "page_size"),
    [
        ("q35-1g-memfd", bk.BackingKind.MEMFD_SHARED, 4 * KIB),
        ("q35-1g-memfd-hugetlb2m", bk.BackingKind.MEMFD_HUGETLB, 2 * MIB),
        ("q35-2g-memfd-hugetlb1g", bk.BackingKind.MEMFD_HUGETLB, GIB),
        ("pc-1g-file-shm", bk.BackingKind.FILE_SHARED, 4 * KIB),
        ("q35-1g-file-hugetlbfs", bk.BackingKind.FILE_SHARED, 2 * MIB),
        ("q35-1g-file-private", bk.BackingKind.FILE_PRIVATE, 4 * KIB),
        ("pc-1g-ram-default", bk.BackingKind.ANON_PRIVATE, 4 * KIB),
        ("pc-1g-ram-shared", bk.BackingKind.ANON_SHARED, 4 * KIB),
    ],
)
def test_backing_kind_from_the_kernels_mapping(case: str, kind: bk.BackingKind,
                                               page_size: int) -> None:
    vma = block_vma(case)
    assert bk.classify(vma) == kind
    assert vma.kernel_page_size == page_size
    assert gmap(case).blocks["pc.ram"].page_size == page_size


def test_numa_blocks_are_told_apart_by_address_not_by_name() -> None:
    # Both memfds are called "memory-backend-memfd"; gpa2hva tells which mapping is which.
    m = gmap("q35-3g-numa-memfd")
    vmas = bk.parse_smaps((DATA / "q35-3g-numa-memfd" / "smaps-large.txt").read_text())
    text = (DATA / "q35-3g-numa-memfd" / "gpa2hva.txt").read_text()
    found: dict[str, set[int]] = {}
    for chunk in text.split("gpa2hva ")[1:]:
        gpa, region, hva = bk.parse_gpa2hva(chunk)
        piece = next(r for r in m.ranges if r.gpa_start <= gpa < r.gpa_end)
        base = hva - (piece.block_offset + gpa - piece.gpa_start)
        vma = bk.covering_vma(vmas, base, m.blocks[region].used)
        found.setdefault(region, set()).add(vma.ino)
    assert set(found) == {"ram-node0", "ram-node1"}
    assert all(len(v) == 1 for v in found.values())
    assert found["ram-node0"] != found["ram-node1"]


def test_covering_vma_refuses_a_range_past_the_mapping() -> None:
    vma = block_vma("q35-1g-memfd")
    vmas = bk.parse_smaps((DATA / "q35-1g-memfd" / "smaps-large.txt").read_text())
    with pytest.raises(bk.BackingError, match="not one mapping"):
        bk.covering_vma(vmas, vma.start, vma.end - vma.start + 4096)
    with pytest.raises(bk.BackingError, match="no mapping"):
        bk.covering_vma(vmas, 0x1000, 4096)


def test_mountinfo_maps_devices_to_filesystem_types() -> None:
    text = (
        "25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684084k\n"
        "40 25 0:39 / /dev/hugepages rw,relatime - hugetlbfs hugetlbfs rw,pagesize=2M\n"
    )
    types = bk.parse_mountinfo(text)
    assert types[os.makedev(0, 23)] == "tmpfs"
    assert types[os.makedev(0, 39)] == "hugetlbfs"


def test_gpa2hva_errors_are_not_guessed() -> None:
    with pytest.raises(bk.BackingError, match="unexpected answer"):
        bk.parse_gpa2hva("No memory is mapped at address 0x100000000")


@pytest.mark.parametrize(("machine", "words"), [
    (None, "not asked"),
    ({"type": ""}, "unexpected answer"),
    ({"type": "pc-q35-7.2-machine", "smm": "maybe"}, "smm: unexpected"),
    ({"type": "pc-q35-7.2-machine", "smm": "on"}, "extended-tseg-mbytes"),
    ({"type": "pc-q35-7.2-machine", "smm": "on", "extended-tseg-mbytes": "16"},
     "extended-tseg-mbytes"),
])
def test_unknown_smm_facts_refuse_the_map(machine: dict[str, object] | None,
                                          words: str) -> None:
    f = facts("q35-1g-memfd")
    with pytest.raises(qm.MapError, match=words):
        qm.build_map(dataclasses.replace(f, machine=machine))


def test_tseg_is_excluded_before_the_firmware_sets_it_up() -> None:
    """The stopped capture (no firmware ran: no tseg-blackhole in the flat view) still
    leaves out the largest TSEG the MCH allows: max(8 MiB, extended-tseg-mbytes)."""
    f = facts("q35-1g-memfd")
    assert "tseg" not in f.mtree_flat
    m = qm.build_map(f)
    assert not qm.contains(m, GIB - TSEG, 2 * MIB, 2 * MIB)
    assert qm.contains(m, GIB - TSEG - 2 * MIB, 2 * MIB, 2 * MIB)
    # A guest may report it (SeaBIOS never made it SMRAM): refused, not hostile.
    assert qm.may_report(m, GIB - TSEG, TSEG, 2 * MIB)
    assert not qm.may_report(m, GIB, 2 * MIB, 2 * MIB)
    assert not qm.may_report(m, GIB - 2 * MIB, 4 * MIB, 2 * MIB)
    big = qm.build_map(dataclasses.replace(f, machine=dict(f.machine or {},
                                                           **{"extended-tseg-mbytes": 48})))
    assert not qm.contains(big, GIB - 48 * MIB, 2 * MIB, 2 * MIB)
    assert qm.contains(big, GIB - 50 * MIB, 2 * MIB, 2 * MIB)
    small = qm.build_map(dataclasses.replace(f, machine=dict(f.machine or {},
                                                             **{"extended-tseg-mbytes": 0})))
    assert not qm.contains(small, GIB - 8 * MIB, 2 * MIB, 2 * MIB)
    assert qm.contains(small, GIB - 10 * MIB, 2 * MIB, 2 * MIB)
    # pc (i440fx) has no TSEG: its SMRAM is the legacy window, left out anyway.
    pc = gmap("pc-1g-ram-shared")
    assert qm.contains(pc, GIB - 2 * MIB, 2 * MIB, 2 * MIB)


def test_a_range_across_two_touching_blocks_is_split_there_and_anything_else_kept_whole(
        ) -> None:
    """Review finding: an honest guest coalesces adjacent free blocks, so on a NUMA guest a
    report may span node 0's end and node 1's start; locate refuses such a range and the
    session ended as if the guest were hostile. The session serves it as its parts."""
    m = gmap("q35-3g-numa-memfd")
    assert qm.split_at_pieces(m, GIB - 2 * MIB, 4 * MIB) == [(GIB - 2 * MIB, 2 * MIB),
                                                             (GIB, 2 * MIB)]
    for gpa, n in qm.split_at_pieces(m, GIB - 2 * MIB, 4 * MIB):
        qm.locate(m, gpa, n, 2 * MIB)
    # Node 1 running into TSEG (never discarded, but plain RAM to a SeaBIOS guest): split,
    # and the TSEG part is one an honest guest may report (refused at the discard).
    end1 = 0x7F000000
    parts = qm.split_at_pieces(m, end1 - 2 * MIB, 4 * MIB)
    assert parts == [(end1 - 2 * MIB, 2 * MIB), (end1, 2 * MIB)]
    assert all(qm.may_report(m, gpa, n, 2 * MIB) for gpa, n in parts)
    # Across the PCI hole or past the end of RAM: whole, and still refused.
    assert qm.split_at_pieces(m, 2 * GIB - 2 * MIB, 4 * MIB) == [(2 * GIB - 2 * MIB, 4 * MIB)]
    assert not qm.may_report(m, 2 * GIB - 2 * MIB, 4 * MIB, 2 * MIB)
    assert qm.split_at_pieces(m, 5 * GIB, 2 * MIB) == [(5 * GIB, 2 * MIB)]
