"""Write the reconstructed linux-4.18 /proc and /sys files in this directory.

Not captured from a running 4.18 kernel: the layout follows the printing code of that era
(mm/vmstat.c frag_show_print, pagetypeinfo_show*, zoneinfo_show_print and vmstat_text as in
v4.18/v4.19; fs/proc/meminfo.c and mm/hugetlb.c hugetlb_report_meminfo; the
Documentation/filesystems/proc.txt examples), and the numbers are chosen for a 2-node,
2-vCPU, 8 GiB x86_64 guest with CONFIG_NUMA, CONFIG_CMA (no CMA area), CONFIG_ZONE_DEVICE,
CONFIG_ZSMALLOC and THP enabled. Watermarks, lowmem reserves, pcp batch sizes and stat
thresholds are computed with the 4.18 formulas, and all files agree with each other (one
consistent moment), which real captures only do approximately. See README.md.

Run: python3 reconstruct.py   (rewrites proc/ and sys/ below this directory)
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ORDERS = 11  # MAX_ORDER in 4.18
ZONE_NAMES = ["DMA", "DMA32", "Normal", "Movable", "Device"]  # MAX_NR_ZONES with ZONE_DEVICE
MIGRATETYPES = ["Unmovable", "Movable", "Reclaimable", "HighAtomic", "CMA", "Isolate"]
RATIO = {"DMA": 256, "DMA32": 256, "Normal": 32, "Movable": 0, "Device": 0}
CPUS = 2
PAGEBLOCK_ORDER = 9

# (node, zone) -> start_pfn, spanned, present, managed. Node 0: 3 GiB below the PCI hole,
# 1 GiB above 4 GiB; node 1: 4 GiB. Zones absent here are empty (present 0).
LAYOUT: Dict[Tuple[int, str], Tuple[int, int, int, int]] = {
    (0, "DMA"): (1, 4095, 3998, 3977),
    (0, "DMA32"): (4096, 1044480, 782302, 761990),
    (0, "Normal"): (1048576, 262144, 262144, 245522),
    (1, "Normal"): (1310720, 1048576, 1048576, 1031678),
}

# Free blocks per order and migrate type (types not listed are all zero).
FREE: Dict[Tuple[int, str], Dict[str, List[int]]] = {
    (0, "DMA"): {
        "Unmovable": [1, 1, 0, 0, 2, 1, 1, 0, 1, 0, 0],
        "Movable": [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 3],
    },
    (0, "DMA32"): {
        "Unmovable": [12, 8, 5, 3, 2, 1, 1, 0, 0, 0, 0],
        "Movable": [45, 31, 22, 14, 9, 7, 4, 3, 2, 3, 690],
        "Reclaimable": [3, 2, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    },
    (0, "Normal"): {
        "Unmovable": [310, 122, 64, 35, 12, 4, 1, 0, 0, 0, 0],
        "Movable": [1021, 644, 420, 268, 140, 71, 38, 22, 15, 9, 98],
        "Reclaimable": [188, 96, 41, 17, 6, 2, 0, 0, 0, 0, 0],
    },
    (1, "Normal"): {
        "Unmovable": [95, 44, 20, 8, 3, 1, 1, 0, 0, 0, 0],
        "Movable": [402, 287, 160, 91, 52, 27, 15, 9, 6, 12, 915],
        "Reclaimable": [61, 33, 14, 5, 2, 0, 0, 0, 0, 0, 0],
    },
}

BLOCKS: Dict[Tuple[int, str], Dict[str, int]] = {
    (0, "DMA"): {"Unmovable": 1, "Movable": 7},
    (0, "DMA32"): {"Unmovable": 6, "Movable": 1518, "Reclaimable": 4},
    (0, "Normal"): {"Unmovable": 78, "Movable": 398, "Reclaimable": 36},
    (1, "Normal"): {"Unmovable": 10, "Movable": 2032, "Reclaimable": 6},
}

# Per-zone LRU and other zone counters (pages; nr_kernel_stack in kB as the kernel keeps it).
ZONE_COUNTERS: Dict[Tuple[int, str], Dict[str, int]] = {
    (0, "DMA"): {},
    (0, "DMA32"): {
        "nr_zone_inactive_anon": 820, "nr_zone_active_anon": 2410,
        "nr_zone_inactive_file": 14230, "nr_zone_active_file": 9822,
        "nr_page_table_pages": 96, "nr_kernel_stack": 320,
    },
    (0, "Normal"): {
        "nr_zone_inactive_anon": 6120, "nr_zone_active_anon": 18450,
        "nr_zone_inactive_file": 35210, "nr_zone_active_file": 28760,
        "nr_zone_write_pending": 30, "nr_page_table_pages": 1210, "nr_kernel_stack": 2880,
    },
    (1, "Normal"): {
        "nr_zone_inactive_anon": 3310, "nr_zone_active_anon": 9410,
        "nr_zone_inactive_file": 11940, "nr_zone_active_file": 12030,
        "nr_page_table_pages": 402, "nr_kernel_stack": 1024,
    },
}
NUMA: Dict[Tuple[int, str], Tuple[int, int, int, int, int, int]] = {
    # numa_hit, numa_miss, numa_foreign, numa_interleave, numa_local, numa_other
    (0, "DMA"): (1, 0, 0, 0, 1, 0),
    (0, "DMA32"): (412883, 0, 0, 0, 412883, 0),
    (0, "Normal"): (3302411, 0, 1183, 11042, 3291369, 11042),
    (1, "Normal"): (2810377, 1183, 0, 10978, 2799399, 10978),
}
PCP_COUNT: Dict[Tuple[int, str], Tuple[int, int]] = {
    (0, "DMA"): (0, 0), (0, "DMA32"): (31, 12), (0, "Normal"): (140, 96), (1, "Normal"): (58, 173),
}

ZONE_ITEMS = ["nr_free_pages", "nr_zone_inactive_anon", "nr_zone_active_anon",
              "nr_zone_inactive_file", "nr_zone_active_file", "nr_zone_unevictable",
              "nr_zone_write_pending", "nr_mlock", "nr_page_table_pages", "nr_kernel_stack",
              "nr_bounce", "nr_zspages", "nr_free_cma"]
NUMA_ITEMS = ["numa_hit", "numa_miss", "numa_foreign", "numa_interleave", "numa_local",
              "numa_other"]
NODE_ITEMS = ["nr_inactive_anon", "nr_active_anon", "nr_inactive_file", "nr_active_file",
              "nr_unevictable", "nr_slab_reclaimable", "nr_slab_unreclaimable",
              "nr_isolated_anon", "nr_isolated_file", "workingset_refault",
              "workingset_activate", "workingset_nodereclaim", "nr_anon_pages", "nr_mapped",
              "nr_file_pages", "nr_dirty", "nr_writeback", "nr_writeback_temp", "nr_shmem",
              "nr_shmem_hugepages", "nr_shmem_pmdmapped", "nr_anon_transparent_hugepages",
              "nr_unstable", "nr_vmscan_write", "nr_vmscan_immediate_reclaim", "nr_dirtied",
              "nr_written", ""]  # "" = nr_indirectly_reclaimable, hidden since 4.17
NODE_OTHER: Dict[int, Dict[str, int]] = {
    0: {"nr_slab_reclaimable": 9120, "nr_slab_unreclaimable": 7410, "nr_shmem": 1650,
        "nr_mapped": 12044, "nr_dirty": 30, "workingset_refault": 0,
        "workingset_activate": 0, "nr_anon_transparent_hugepages": 16, "nr_dirtied": 48120,
        "nr_written": 44710, "buffers": 2104},
    1: {"nr_slab_reclaimable": 2140, "nr_slab_unreclaimable": 3180, "nr_shmem": 560,
        "nr_mapped": 3017, "nr_dirty": 0, "workingset_refault": 0,
        "workingset_activate": 0, "nr_anon_transparent_hugepages": 8, "nr_dirtied": 9811,
        "nr_written": 9507, "buffers": 0},
}


def zones_of(node: int) -> List[Tuple[int, str]]:
    return [(node, z) for z in ZONE_NAMES]


def managed(key: Tuple[int, str]) -> int:
    return LAYOUT.get(key, (0, 0, 0, 0))[3]


def free_of(key: Tuple[int, str]) -> List[int]:
    per_type = FREE.get(key, {})
    return [sum(per_type.get(t, [0] * ORDERS)[k] for t in MIGRATETYPES) for k in range(ORDERS)]


def free_pages(key: Tuple[int, str]) -> int:
    return sum(n << k for k, n in enumerate(free_of(key)))


def watermarks() -> Dict[Tuple[int, str], Tuple[int, int, int]]:
    """__setup_per_zone_wmarks with min_free_kbytes raised by khugepaged (4.18)."""
    populated = [k for k in LAYOUT]
    lowmem = sum(managed(k) for k in populated)
    recommended = (1 << PAGEBLOCK_ORDER) * len(populated) * 2
    recommended += (1 << PAGEBLOCK_ORDER) * len(populated) * 3 * 3
    recommended = min(recommended, lowmem // 20)
    min_free_kbytes = max(math.isqrt(lowmem * 4 * 16), recommended * 4)
    pages_min = min_free_kbytes // 4
    out = {}
    for node in (0, 1):
        for key in zones_of(node):
            tmp = pages_min * managed(key) // lowmem
            step = max(tmp >> 2, managed(key) * 10 // 10000)
            out[key] = (tmp, tmp + step, tmp + 2 * step)
    return out


def protection(key: Tuple[int, str]) -> List[int]:
    """setup_per_zone_lowmem_reserve: reserve of zone j against allocations for zone idx."""
    node, name = key
    j = ZONE_NAMES.index(name)
    res = []
    for idx in range(len(ZONE_NAMES)):
        if idx <= j:
            res.append(0)
            continue
        above = sum(managed((node, ZONE_NAMES[k])) for k in range(j + 1, idx + 1))
        res.append(above // RATIO[name] if RATIO[name] >= 1 else 0)
    return res


def batch_of(managed_pages: int) -> Tuple[int, int]:
    """zone_batchsize + pageset_set_batch: (high, batch)."""
    batch = managed_pages // 1024
    batch = min(batch, 512 * 1024 // 4096)
    batch //= 4
    batch = max(batch, 1)
    batch = (1 << (batch + batch // 2).bit_length() - 1) - 1
    return 6 * batch, max(1, batch)


def threshold_of(managed_pages: int) -> int:
    mem = managed_pages >> (27 - 12)
    return min(125, 2 * CPUS.bit_length() * (1 + mem.bit_length()))


def zone_stats(key: Tuple[int, str]) -> Dict[str, int]:
    stats = {k: 0 for k in ZONE_ITEMS}
    stats.update(ZONE_COUNTERS.get(key, {}))
    stats["nr_free_pages"] = free_pages(key)
    return stats


def node_stats(node: int) -> Dict[str, int]:
    zs = [zone_stats(k) for k in zones_of(node) if k in LAYOUT]
    lru = {n: sum(z["nr_zone_" + n] for z in zs)
           for n in ("inactive_anon", "active_anon", "inactive_file", "active_file")}
    other = NODE_OTHER[node]
    out = {k: 0 for k in NODE_ITEMS}
    out.update({"nr_" + n: v for n, v in lru.items()})
    for k in ("nr_slab_reclaimable", "nr_slab_unreclaimable", "nr_shmem", "nr_mapped",
              "nr_dirty", "nr_anon_transparent_hugepages", "nr_dirtied", "nr_written"):
        out[k] = other[k]
    out["nr_anon_pages"] = lru["inactive_anon"] + lru["active_anon"] - other["nr_shmem"]
    out["nr_file_pages"] = lru["inactive_file"] + lru["active_file"] + other["nr_shmem"]
    return out


def write(rel: str, text: str) -> None:
    path = os.path.join(HERE, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def buddyinfo() -> str:
    out = []
    for key in LAYOUT:
        out.append("Node %d, zone %8s " % key + "".join("%6d " % n for n in free_of(key)) + "\n")
    return "".join(out)


def pagetypeinfo() -> str:
    out = []
    for node in (0, 1):
        keys = [k for k in LAYOUT if k[0] == node]
        out.append("Page block order: %d\n" % PAGEBLOCK_ORDER)
        out.append("Pages per block:  %d\n" % (1 << PAGEBLOCK_ORDER))
        out.append("\n")
        out.append("%-43s " % "Free pages count per migrate type at order"
                   + "".join("%6d " % k for k in range(ORDERS)) + "\n")
        for key in keys:
            for t in MIGRATETYPES:
                counts = FREE[key].get(t, [0] * ORDERS)
                out.append("Node %4d, zone %8s, type %12s " % (key[0], key[1], t)
                           + "".join("%6d " % n for n in counts) + "\n")
        out.append("\n%-23s" % "Number of blocks type "
                   + "".join("%12s " % t for t in MIGRATETYPES) + "\n")
        for key in keys:
            out.append("Node %d, zone %8s " % key
                       + "".join("%12d " % BLOCKS[key].get(t, 0) for t in MIGRATETYPES) + "\n")
    return "".join(out)


def zoneinfo(wm: Dict[Tuple[int, str], Tuple[int, int, int]]) -> str:
    out = []
    for node in (0, 1):
        first = True
        for key in zones_of(node):
            start, spanned, present, man = LAYOUT.get(key, (0, 0, 0, 0))
            out.append("Node %d, zone %8s" % key)
            if present and first:
                first = False
                out.append("\n  per-node stats")
                for name, value in node_stats(node).items():
                    out.append("\n      %-12s %d" % (name, value))
            mn, lo, hi = wm[key]
            out.append("\n  pages free     %d\n        min      %d\n        low      %d"
                       "\n        high     %d\n        spanned  %d\n        present  %d"
                       "\n        managed  %d" % (free_pages(key), mn, lo, hi, spanned,
                                                   present, man))
            out.append("\n        protection: (%s)" % ", ".join(str(p) for p in protection(key)))
            if not present:
                out.append("\n")
                continue
            for name, value in zone_stats(key).items():
                out.append("\n      %-12s %d" % (name, value))
            for name, value in zip(NUMA_ITEMS, NUMA[key]):
                out.append("\n      %-12s %d" % (name, value))
            out.append("\n  pagesets")
            high, batch = batch_of(man)
            for cpu in range(CPUS):
                out.append("\n    cpu: %d\n              count: %d\n              high:  %d"
                           "\n              batch: %d" % (cpu, PCP_COUNT[key][cpu], high, batch))
                out.append("\n  vm stats threshold: %d" % threshold_of(man))
            out.append("\n  node_unreclaimable:  0\n  start_pfn:           %d\n" % start)
    return "".join(out)


def totals() -> Dict[str, int]:
    t: Dict[str, int] = {}
    for node in (0, 1):
        for k, v in node_stats(node).items():
            if k:
                t[k] = t.get(k, 0) + v
    for key in LAYOUT:
        for k, v in zone_stats(key).items():
            t[k] = t.get(k, 0) + v
        for k, v in zip(NUMA_ITEMS, NUMA[key]):
            t[k] = t.get(k, 0) + v
    return t


def meminfo(wm: Dict[Tuple[int, str], Tuple[int, int, int]]) -> str:
    t = totals()
    total = sum(managed(k) for k in LAYOUT)
    free = t["nr_free_pages"]
    buffers = sum(NODE_OTHER[n]["buffers"] for n in (0, 1))
    cached = t["nr_file_pages"] - buffers
    wmark_low = sum(w[1] for w in wm.values())
    reserve = sum(max(protection(k)) + wm[k][2] for k in LAYOUT)
    pagecache = t["nr_active_file"] + t["nr_inactive_file"]
    available = free - reserve + pagecache - min(pagecache // 2, wmark_low)
    available += t["nr_slab_reclaimable"] - min(t["nr_slab_reclaimable"] // 2, wmark_low)
    swap = 2097148
    kb = 4
    rows = [
        ("MemTotal", total * kb), ("MemFree", free * kb), ("MemAvailable", available * kb),
        ("Buffers", buffers * kb), ("Cached", cached * kb), ("SwapCached", 0),
        ("Active", (t["nr_active_anon"] + t["nr_active_file"]) * kb),
        ("Inactive", (t["nr_inactive_anon"] + t["nr_inactive_file"]) * kb),
        ("Active(anon)", t["nr_active_anon"] * kb), ("Inactive(anon)", t["nr_inactive_anon"] * kb),
        ("Active(file)", t["nr_active_file"] * kb), ("Inactive(file)", t["nr_inactive_file"] * kb),
        ("Unevictable", 0), ("Mlocked", 0), ("SwapTotal", swap), ("SwapFree", swap),
        ("Dirty", t["nr_dirty"] * kb), ("Writeback", 0), ("AnonPages", t["nr_anon_pages"] * kb),
        ("Mapped", t["nr_mapped"] * kb), ("Shmem", t["nr_shmem"] * kb),
        ("Slab", (t["nr_slab_reclaimable"] + t["nr_slab_unreclaimable"]) * kb),
        ("SReclaimable", t["nr_slab_reclaimable"] * kb),
        ("SUnreclaim", t["nr_slab_unreclaimable"] * kb),
        ("KernelStack", t["nr_kernel_stack"]), ("PageTables", t["nr_page_table_pages"] * kb),
        ("NFS_Unstable", 0), ("Bounce", 0), ("WritebackTmp", 0),
        ("CommitLimit", total * kb // 2 + swap), ("Committed_AS", 1620544),
        ("VmallocTotal", 34359738367), ("VmallocUsed", 0), ("VmallocChunk", 0),
        ("Percpu", 2432),
    ]
    out = ["%-16s%8d kB\n" % (k + ":", v) for k, v in rows]
    out.append("HardwareCorrupted: %5d kB\n" % 0)
    thp = t["nr_anon_transparent_hugepages"] * 512 * kb
    for k, v in (("AnonHugePages", thp), ("ShmemHugePages", 0), ("ShmemPmdMapped", 0),
                 ("CmaTotal", 0), ("CmaFree", 0)):
        out.append("%-16s%8d kB\n" % (k + ":", v))
    out.append("HugePages_Total:   %5d\nHugePages_Free:    %5d\nHugePages_Rsvd:    %5d\n"
               "HugePages_Surp:    %5d\nHugepagesize:   %8d kB\n" % (0, 0, 0, 0, 2048))
    out.append("Hugetlb:        %8d kB\n" % 0)
    for k, v in (("DirectMap4k", 118644), ("DirectMap2M", 4073472), ("DirectMap1G", 4194304)):
        out.append("%-16s%8d kB\n" % (k + ":", v))
    return "".join(out)


def vmstat() -> str:
    t = totals()
    dirtyable = t["nr_free_pages"] + t["nr_active_file"] + t["nr_inactive_file"]
    values: List[Tuple[str, int]] = [(k, t[k]) for k in ZONE_ITEMS + NUMA_ITEMS]
    values += [(k, t[k]) for k in NODE_ITEMS if k]  # the hidden item is skipped
    values += [("nr_dirty_threshold", dirtyable * 20 // 100),
               ("nr_dirty_background_threshold", dirtyable * 10 // 100)]
    zones = ["dma", "dma32", "normal", "movable"]
    events: List[Tuple[str, int]] = [("pgpgin", 1183244), ("pgpgout", 219412), ("pswpin", 0),
                                     ("pswpout", 0)]
    events += [("pgalloc_" + z, v) for z, v in zip(zones, (1, 418112, 5938120, 0))]
    events += [("allocstall_" + z, 0) for z in zones]
    events += [("pgskip_" + z, 0) for z in zones]
    events += [("pgfree", 8148001), ("pgactivate", 91204), ("pgdeactivate", 0),
               ("pglazyfree", 0), ("pgfault", 6811034), ("pgmajfault", 2617),
               ("pglazyfreed", 0), ("pgrefill", 0), ("pgsteal_kswapd", 0),
               ("pgsteal_direct", 0), ("pgscan_kswapd", 0), ("pgscan_direct", 0),
               ("pgscan_direct_throttle", 0), ("zone_reclaim_failed", 0),
               ("pginodesteal", 0), ("slabs_scanned", 0), ("kswapd_inodesteal", 0),
               ("kswapd_low_wmark_hit_quickly", 0), ("kswapd_high_wmark_hit_quickly", 0),
               ("pageoutrun", 0), ("pgrotated", 0), ("drop_pagecache", 0), ("drop_slab", 0),
               ("oom_kill", 0), ("numa_pte_updates", 0), ("numa_huge_pte_updates", 0),
               ("numa_hint_faults", 0), ("numa_hint_faults_local", 0),
               ("numa_pages_migrated", 0), ("pgmigrate_success", 212),
               ("pgmigrate_fail", 0), ("compact_migrate_scanned", 1480),
               ("compact_free_scanned", 20211), ("compact_isolated", 431),
               ("compact_stall", 0), ("compact_fail", 0), ("compact_success", 0),
               ("compact_daemon_wake", 3), ("compact_daemon_migrate_scanned", 1480),
               ("compact_daemon_free_scanned", 20211), ("htlb_buddy_alloc_success", 0),
               ("htlb_buddy_alloc_fail", 0), ("unevictable_pgs_culled", 0),
               ("unevictable_pgs_scanned", 0), ("unevictable_pgs_rescued", 0),
               ("unevictable_pgs_mlocked", 0), ("unevictable_pgs_munlocked", 0),
               ("unevictable_pgs_cleared", 0), ("unevictable_pgs_stranded", 0),
               ("thp_fault_alloc", 61), ("thp_fault_fallback", 0), ("thp_collapse_alloc", 4),
               ("thp_collapse_alloc_failed", 0), ("thp_file_alloc", 0),
               ("thp_file_mapped", 0), ("thp_split_page", 0), ("thp_split_page_failed", 0),
               ("thp_deferred_split_page", 37), ("thp_split_pmd", 37), ("thp_split_pud", 0),
               ("thp_zero_page_alloc", 1), ("thp_zero_page_alloc_failed", 0),
               ("thp_swpout", 0), ("thp_swpout_fallback", 0), ("balloon_inflate", 0),
               ("balloon_deflate", 0), ("balloon_migrate", 0), ("swap_ra", 0),
               ("swap_ra_hit", 0)]
    return "".join("%s %d\n" % kv for kv in values + events)


def main() -> None:
    for key in LAYOUT:
        assert free_pages(key) <= managed(key), key
    wm = watermarks()
    write("proc/buddyinfo", buddyinfo())
    write("proc/pagetypeinfo", pagetypeinfo())
    write("proc/zoneinfo", zoneinfo(wm))
    write("proc/meminfo", meminfo(wm))
    write("proc/vmstat", vmstat())
    write("proc/sys/kernel/osrelease", "4.18.0\n")
    # 4.18 keeps 64 feature bits; QEMU's balloon with a stats queue: STATS_VQ, INDIRECT_DESC,
    # EVENT_IDX, VERSION_1. No REPORTING (5.7+).
    bits = {1, 28, 29, 32}
    write("sys/bus/virtio/drivers/virtio_balloon/virtio0/features",
          "".join("1" if i in bits else "0" for i in range(64)) + "\n")
    write("sys/bus/virtio/drivers/virtio_balloon/virtio0/device", "0x0005\n")
    write("sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never\n")
    write("sys/kernel/mm/transparent_hugepage/defrag",
          "always defer defer+madvise [madvise] never\n")
    write("sys/kernel/mm/transparent_hugepage/shmem_enabled",
          "always within_size advise [never] deny force\n")
    for f in ("nr_hugepages", "free_hugepages", "resv_hugepages", "surplus_hugepages",
              "nr_overcommit_hugepages", "nr_hugepages_mempolicy"):
        write("sys/kernel/mm/hugepages/hugepages-2048kB/" + f, "0\n")


if __name__ == "__main__":
    main()
