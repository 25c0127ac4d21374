"""Capability detection on captured kernel trees and on this machine's kernel."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from aerate.agent import capabilities as c
from aerate.agent import procfs

DATA = Path(__file__).resolve().parent.parent / "data" / "proc"
ORDER = (c.PSI, c.HUGETLB, c.MEMFD_HUGETLB, c.MADV_POPULATE_WRITE, c.THP, c.PAGEMAP_PFN,
         c.KPAGEFLAGS, c.FREE_PAGE_REPORTING, c.POISON_SAFE, c.FREE_FIRST)
LIVE_ONLY = (c.MEMFD_HUGETLB, c.MADV_POPULATE_WRITE, c.PAGEMAP_PFN)


def caps(kernel: str) -> dict[str, c.Capability]:
    return c.by_name(c.detect_all(str(DATA / kernel)))


@pytest.mark.unit
@pytest.mark.parametrize("kernel", ["host-6.18", "debian12-6.1", "debian12-6.1-numa",
                                    "linux-4.18"])
def test_captured_roots_report_every_capability_with_a_line(kernel: str) -> None:
    found = c.detect_all(str(DATA / kernel))
    assert tuple(x.name for x in found) == ORDER
    for x in found:
        assert x.detail and "\n" not in x.detail
        if x.name in LIVE_ONLY:
            assert not x.available and x.detail.startswith("not probed")


@pytest.mark.unit
def test_linux_418_degrades_with_reasons() -> None:
    got = caps("linux-4.18")
    assert not got[c.PSI].available and "4.20" in got[c.PSI].detail
    assert not got[c.FREE_PAGE_REPORTING].available
    assert "without REPORTING" in got[c.FREE_PAGE_REPORTING].detail
    assert got[c.THP].available and "enabled=always" in got[c.THP].detail
    assert got[c.HUGETLB].available
    # No command line in the reconstruction: poisoning unknown, so discards must be refused.
    assert not got[c.POISON_SAFE].available and "unknown" in got[c.POISON_SAFE].detail


@pytest.mark.unit
def test_debian_61_reports_in_kernel_free_page_reporting() -> None:
    got = caps("debian12-6.1")
    assert got[c.PSI].available
    fpr = got[c.FREE_PAGE_REPORTING]
    assert fpr.available and "page_reporting_order=9" in fpr.detail and "stats-only" in fpr.detail
    assert got[c.POISON_SAFE].available and "not enabled" in got[c.POISON_SAFE].detail
    assert not got[c.KPAGEFLAGS].available and "not present" in got[c.KPAGEFLAGS].detail


@pytest.mark.unit
def test_missing_or_disabled_features(tmp_path: Path) -> None:
    thp = tmp_path / "sys/kernel/mm/transparent_hugepage"
    thp.mkdir(parents=True)
    (thp / "enabled").write_text("always madvise [never]\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text("root=/dev/vda1 page_poison=1\n")
    got = c.by_name(c.detect_all(str(tmp_path)))
    assert not got[c.THP].available and "enabled=never" in got[c.THP].detail
    assert not got[c.HUGETLB].available and "no 2 MiB hugetlb pool" in got[c.HUGETLB].detail
    assert not got[c.FREE_PAGE_REPORTING].available
    assert "no virtio-balloon" in got[c.FREE_PAGE_REPORTING].detail
    assert not got[c.POISON_SAFE].available and "0xaa" in got[c.POISON_SAFE].detail
    (thp / "enabled").unlink()
    assert "CONFIG_TRANSPARENT_HUGEPAGE" in c.detect_thp(str(tmp_path)).detail


@pytest.mark.unit
def test_hugetlb_pool_values_are_reported(tmp_path: Path) -> None:
    src = DATA / "debian12-6.1" / "sys/kernel/mm/hugepages"
    dst = tmp_path / "sys/kernel/mm/hugepages"
    shutil.copytree(src, dst)
    pool = dst / "hugepages-2048kB"
    (pool / "nr_hugepages").write_text("16\n")
    (pool / "free_hugepages").write_text("3\n")
    (pool / "nr_overcommit_hugepages").write_text("40\n")
    assert procfs.read_hugepage_pool(2048, str(tmp_path)) == procfs.HugePagePool(
        2048, 16, 3, 0, 0, 40)
    cap = c.detect_hugetlb(str(tmp_path))
    assert cap.available and "16 persistent (3 free)" in cap.detail and "limit 40" in cap.detail
    (pool / "surplus_hugepages").write_text("many\n")
    bad = c.detect_hugetlb(str(tmp_path))
    assert not bad.available and "surplus_hugepages" in bad.detail


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


@pytest.mark.host
def test_live_capabilities_match_this_kernel() -> None:
    got = c.by_name(c.detect_all())
    assert tuple(got) == ORDER
    for x in got.values():
        assert not x.detail.startswith("not probed"), x
    # MADV_POPULATE_WRITE exists exactly from 5.14 on.
    assert got[c.MADV_POPULATE_WRITE].available is _kernel_at_least(5, 14), got
    psi_file = Path("/proc/pressure/memory")
    assert got[c.PSI].available is (psi_file.exists() and _readable(psi_file))
    if os.geteuid() == 0:
        assert got[c.PAGEMAP_PFN].available, got[c.PAGEMAP_PFN]
        assert got[c.KPAGEFLAGS].available, got[c.KPAGEFLAGS]
    balloon = procfs.read_balloon_features()
    reporting = balloon is not None and balloon.free_page_reporting_active
    assert got[c.FREE_PAGE_REPORTING].available is reporting
    hugetlbfs = "hugetlbfs" in Path("/proc/filesystems").read_text()
    if not hugetlbfs:
        assert not got[c.MEMFD_HUGETLB].available


def _readable(path: Path) -> bool:
    try:
        path.read_text()
    except OSError:
        return False
    return True
