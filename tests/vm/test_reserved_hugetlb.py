"""Issue 9: a VM on reserved hugetlb memory is refused, so it keeps its reservation.

A real guest (the project's image) whose RAM is a hugetlb memfd (libvirt <hugepages/> +
memfd + shared, the harness's "hugetlbfs" shape) on real libvirt + QEMU (TCG); QEMU maps
it with reserve=on (its default), so the kernel holds a reservation for every page not yet
faulted. A punch would drop pages and reservations alike (hugetlb_unreserve_pages), and a
later guest touch could find the pool empty: SIGBUS. The real daemon logic (in this
process, nothing mocked) must refuse with that reason; the host pool's free and reserved
counts (read from the kernel) and the memfd's allocation must not move.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_hostdev import MiB, ram_allocated, with_daemon

from aerate.deploy.image import GuestImage
from aerate.deploy.scenario import DaemonView, Hog, wait_for
from aerate.deploy.vm import Guest, booted

pytestmark = pytest.mark.vm
POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
HOG_MIB = 384


def pool() -> dict[str, int]:
    return {k: int((POOL / f"{k}_hugepages").read_text()) for k in ("nr", "free", "resv")}


def test_reserved_hugetlb_guest_is_refused_and_keeps_its_pages(
        guest_image: GuestImage, note_boot: Callable[[Guest], None], tmp_path: Path) -> None:
    with booted(guest_image, backing="hugetlbfs", memory_mib=1024) as g:
        note_boot(g)
        hog = Hog(g, HOG_MIB, hold_s=1)
        hog.start()
        hog.join()
        before, mem_before = pool(), ram_allocated(g)
        samples: list[tuple[dict[str, int], int]] = []

        def watch(d: DaemonView) -> dict[str, Any]:
            def two() -> dict[str, Any]:
                samples.append((pool(), ram_allocated(g)))
                vm = d.vm(g.name)
                return vm if int(vm.get("batches", 0)) >= 2 else {}
            return wait_for(two, 300, f"two batches from {g.name}", interval=0.5)

        vm = with_daemon(tmp_path / "aerated", g.name, hostdev=False, body=watch)
        after = pool()
        print(f"{g.name}: pool before {before}, after {after}; memfd {mem_before >> 20} MiB "
              f"-> {ram_allocated(g) >> 20} MiB; reason: {vm['reason']}")
        assert vm["reclaimer"] == "refuse" and "reserved huge pages" in vm["reason"], vm
        assert "SIGBUS" in vm["reason"], vm
        assert vm["discarded_bytes"] == 0 and vm["refused_bytes"] == vm["reported_bytes"] > 0
        # Nothing punched: the memfd keeps its pages, and the pool's unreserved free pages
        # (free - resv: a guest fault takes one of each, a punch frees one) never grow.
        spare = before["free"] - before["resv"]
        assert all(p["free"] - p["resv"] <= spare and m >= mem_before for p, m in samples), \
            (before, mem_before, samples[-3:])
        assert after["free"] - after["resv"] <= spare, (before, after)
        assert mem_before >= HOG_MIB * MiB
