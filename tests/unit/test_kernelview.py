"""The engine's view of the kernel, on captured trees (no live /proc needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aerate.agent import procfs
from aerate.agent.kernelview import KernelFile, ProcKernel

pytestmark = pytest.mark.unit
DATA = Path(__file__).resolve().parents[1] / "data" / "proc"
KERNELS = ["host-6.18", "debian12-6.1", "linux-4.18"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_free_units_and_watermarks_agree_with_the_files(kernel: str) -> None:
    root = str(DATA / kernel)
    with ProcKernel(root=root) as k:
        check_free_units_and_watermarks(k, root)


def check_free_units_and_watermarks(k: ProcKernel, root: str) -> None:
    buddy = procfs.read_buddyinfo(root)
    # Every order >= 9 block counted in 2 MiB units, DMA left out.
    expect = sum(n << (order - 9) for z in buddy if z.zone != "DMA"
                 for order, n in enumerate(z.free) if order >= 9)
    assert k.free_units(9) == expect > 0
    zones = [z for z in procfs.read_zoneinfo(root).zones if z.populated and z.zone != "DMA"]
    assert k.reserve_pages() == sum(z.high for z in zones)
    assert k.low_pages() == sum(z.low for z in zones) < k.reserve_pages()
    assert k.free_pages() >= k.free_units(9) * 512


def test_no_psi_is_none_with_a_reason() -> None:
    with ProcKernel(root=str(DATA / "linux-4.18")) as k:
        assert k.psi_some_avg10() is None and k.psi_missing


def test_still_free_on_real_kpageflags(tmp_path: Path) -> None:
    """Real flags of 8192 frames at 5 GiB, laid out at their offsets in a sparse file."""
    first = 1310720
    sample = (DATA / "host-6.18" / "kpageflags-pfn1310720-8192.bin").read_bytes()
    f = tmp_path / "kpageflags"
    with open(f, "wb") as out:
        out.seek(first * 8)
        out.write(sample)
    words = procfs.parse_kpageflags(sample)
    k = ProcKernel(root=str(DATA / "host-6.18"), kpageflags=str(f))
    heads = [first + i for i in range(0, 8192, 512)]
    got = k.still_free(heads)
    for head, free in zip(heads, got):
        block = words[head - first:head - first + 512]
        if all(procfs.is_buddy(w) for w in block):
            assert free, hex(head)
        if not any(procfs.is_buddy(w) for w in block):
            assert not free, hex(head)
    # Frames beyond the file read as "no page": never free.
    assert k.still_free([first + 8192 * 4]) == [False]


def test_kernel_file_rereads_from_the_start_and_reopens_after_a_failure(tmp_path: Path) -> None:
    f = tmp_path / "buddyinfo"
    f.write_text("first\n")
    kf = KernelFile(str(f))
    assert kf.read() == "first\n"
    f.write_text("second, longer\n")            # same inode, new text: one pread from 0
    assert kf.read() == "second, longer\n"
    big = "x" * (200 * 1024)                    # longer than one pread chunk
    f.write_text(big)
    assert kf.read() == big
    f.unlink()
    assert kf.read() == big                     # the open file outlives its name...
    kf.close()
    with pytest.raises(FileNotFoundError):     # ...a closed one is opened by name again
        kf.read()
    f.write_text("back\n")
    assert kf.read() == "back\n"


@pytest.mark.parametrize("kernel", KERNELS)
def test_stats_carry_what_the_files_say_and_why_parts_are_missing(kernel: str) -> None:
    root = str(DATA / kernel)
    with ProcKernel(root=root) as k:
        st = k.stats()
    buddy = procfs.read_buddyinfo(root)
    assert st["free_by_order"] == {f"{z.node}/{z.zone}": list(z.free) for z in buddy}
    assert st["mem_total"] == procfs.read_meminfo(root).total
    if kernel == "linux-4.18":                 # no PSI before 4.20: said, not crashed
        assert "psi_some_avg10" not in st
        assert any("pressure/memory" in m for m in st["missing"])
    else:
        assert st["psi_some_avg10"] == procfs.read_pressure_memory(root).some.avg10
        assert st["missing"] == []
