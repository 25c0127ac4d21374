"""Host tier: real QEMU (TCG, no guest OS), real /proc, real fallocate.

Guest RAM is written from the host side through the backing file QEMU holds, and read
back both through that file and through QEMU's own view of guest-physical memory (HMP
`xp`), so the GPA -> file offset mapping is checked against QEMU, not against itself.
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aerate.deploy.qemu import QEMU_BINARY, BareQemu
from aerate.host import backing as bk
from aerate.host import qemu_map as qm
from aerate.host.punch import PunchRefused, punch
from aerate.host.refusal import Decision, DomainFacts, JobInfo, PoisonFact, VmFacts, decide
from aerate.host.verify import ReclaimTally

pytestmark = [pytest.mark.host, pytest.mark.timeout(120)]

MIB = 1 << 20
GIB = 1 << 30
HUGE = 2 * MIB  # every test write is aligned to this (the largest page size used)
QEMU = shutil.which(QEMU_BINARY)


def _require_root_and_qemu() -> None:
    if os.geteuid() != 0:
        pytest.skip("host tier needs root (opens /proc/<pid>/fd of QEMU, hugepage pools)")
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")


#: These QEMUs run no guest kernel (or a stopped one): nothing poisons freed pages.
NO_GUEST = PoisonFact(True, "bare QEMU without a guest kernel")
#: q35 with SMM (QEMU's default): the largest TSEG is never in the map (host/qemu_map.py).
TSEG = 16 * MIB


@dataclass
class Vm:
    name: str
    qemu: BareQemu
    gmap: qm.GuestMemoryMap
    backings: dict[str, bk.Backing]

    def backing(self) -> bk.Backing:
        (only,) = self.backings.values()
        return only

    def file_offset(self, gpa: int) -> int:
        (piece,) = [r for r in self.gmap.ranges if r.gpa_start <= gpa < r.gpa_end]
        b = self.backings[piece.block_name]
        return b.file_offset + piece.block_offset + gpa - piece.gpa_start

    def write(self, gpa: int, data: bytes) -> None:
        # Through a shared mapping, as the guest writes: hugetlbfs has no write(2).
        off = self.file_offset(gpa)
        start = off & ~(HUGE - 1)
        end = (off + len(data) + HUGE - 1) & ~(HUGE - 1)
        fd = os.open(self.backing().path or "", os.O_RDWR)
        try:
            with mmap.mmap(fd, end - start, mmap.MAP_SHARED, offset=start) as m:
                m[off - start:off - start + len(data)] = data
        finally:
            os.close(fd)

    def read(self, gpa: int, length: int) -> bytes:
        fd = os.open(self.backing().path or "", os.O_RDONLY)
        try:
            return os.pread(fd, length, self.file_offset(gpa))
        finally:
            os.close(fd)

    def qemu_sees(self, gpa: int) -> int:
        """First 8 bytes at `gpa` as QEMU's guest-physical view reads them."""
        out = self.qemu.qmp.hmp(f"xp /1gx {gpa:#x}")
        return int(out.split(":")[1].split()[0], 16)

    def allocated(self) -> int:
        return bk.allocated_bytes(self.backing())

    def permit(self) -> Decision:
        dom = DomainFacts(self.name, (), "memfd", "shared", False, False, "", False, "")
        return decide(VmFacts(dom, JobInfo(False, "none"), self.backings, poison=NO_GUEST))


@pytest.fixture
def scratch() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="aerate-test-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def start_vm(name: str, scratch: str, memory: list[str], machine: str = "q35",
             size: str = "512M") -> Vm:
    _require_root_and_qemu()
    qemu = BareQemu(["-machine", f"{machine},memory-backend=pc.ram", "-m", size, *memory],
                    f"{scratch}/qmp.sock")
    try:
        gmap = qm.build_map(qm.gather(qemu.qmp))
        backings = bk.resolve(qemu.pid, gmap, qemu.qmp.hmp)
    except BaseException:
        qemu.kill()
        raise
    return Vm(name, qemu, gmap, backings)


def stop_vm(vm: Vm) -> None:
    vm.qemu.kill()


class HugepagePool:
    """Grow a hugepage pool for a test and shrink it back by as much afterwards.

    Relative, not a saved absolute value: another test on this machine may resize the
    pool meanwhile, and its pages are not ours to take back.
    """

    def __init__(self, size_kib: int, pages: int) -> None:
        self.path = Path(f"/sys/kernel/mm/hugepages/hugepages-{size_kib}kB/nr_hugepages")
        before = int(self.path.read_text())
        self.path.write_text(str(before + pages))
        self.added = int(self.path.read_text()) - before
        if self.added < pages:
            self.restore()
            pytest.skip(f"could reserve only {self.added} of {pages} {size_kib} KiB pages")

    def restore(self) -> None:
        now = int(self.path.read_text())
        self.path.write_text(str(max(0, now - self.added)))
        self.added = 0


@pytest.fixture
def hugepages_2m() -> Iterator[None]:
    _require_root_and_qemu()
    pool = HugepagePool(2048, 256 + 8)
    try:
        yield
    finally:
        pool.restore()


@pytest.fixture
def hugetlbfs(scratch: str, hugepages_2m: None) -> Iterator[str]:
    mnt = f"{scratch}/hugetlbfs"
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


SHARED_CASES = {
    "memfd": (["-object", "memory-backend-memfd,id=pc.ram,size=512M,share=on"],
              bk.BackingKind.MEMFD_SHARED, 4096, "tmpfs"),
    "memfd-hugetlb": (["-object",
                       "memory-backend-memfd,id=pc.ram,size=512M,share=on,hugetlb=on,"
                       "hugetlbsize=2M"],
                      bk.BackingKind.MEMFD_HUGETLB, 2 * MIB, "hugetlbfs"),
    "file-shm": (["-object", "memory-backend-file,id=pc.ram,size=512M,share=on,"
                  "mem-path={scratch}/guest-ram"],
                 bk.BackingKind.FILE_SHARED, 4096, "ext4"),
    "file-hugetlbfs": (["-object", "memory-backend-file,id=pc.ram,size=512M,share=on,"
                        "mem-path={hugetlbfs}/guest-ram"],
                       bk.BackingKind.FILE_SHARED, 2 * MIB, "hugetlbfs"),
    "ram-shared": (["-object", "memory-backend-ram,id=pc.ram,size=512M,share=on"],
                   bk.BackingKind.ANON_SHARED, 4096, "tmpfs"),
}


@pytest.fixture(params=sorted(SHARED_CASES))
def shared_vm(request: pytest.FixtureRequest, scratch: str) -> Iterator[Vm]:
    case = request.param
    args, _, _, _ = SHARED_CASES[case]
    fmt = {"scratch": scratch}
    if case == "file-shm":
        # A tmpfs file: the case the daemon meets with libvirt's file backend on /dev/shm.
        shm = tempfile.mkdtemp(prefix="aerate-test-", dir="/dev/shm")
        request.addfinalizer(lambda: shutil.rmtree(shm, ignore_errors=True))
        fmt["scratch"] = shm
    if "hugetlb" in case:
        fmt["hugetlbfs"] = request.getfixturevalue("hugetlbfs") if "file" in case else ""
        request.getfixturevalue("hugepages_2m")
    vm = start_vm(f"test-{case}", scratch, [a.format(**fmt) for a in args])
    try:
        yield vm
    finally:
        stop_vm(vm)


def pattern(tag: int, length: int) -> bytes:
    return bytes([tag]) * length


def test_backing_is_proven_from_the_kernel(shared_vm: Vm) -> None:
    case = shared_vm.name.removeprefix("test-")
    _, kind, page_size, fs_type = SHARED_CASES[case]
    b = shared_vm.backing()
    assert b.kind == kind, b.reason
    assert b.page_size == page_size
    assert b.punchable
    if case == "file-shm":
        fs_type = "tmpfs"
    assert b.fs_type == fs_type
    assert b.file_size == 512 * MIB
    # minus the legacy 0xa0000-0xfffff and q35's TSEG at the top
    assert shared_vm.gmap.ram_size == 512 * MIB - 0x60000 - TSEG
    assert shared_vm.permit().action == "punch"


def test_punch_frees_exactly_the_range_and_keeps_neighbours(shared_vm: Vm) -> None:
    g = 2 * MIB
    base = 64 * MIB
    for i in range(4):
        shared_vm.write(base + i * g, pattern(0xA0 + i, g))
    before = shared_vm.allocated()
    assert before >= 4 * g
    for i in range(4):
        assert shared_vm.qemu_sees(base + i * g) == int.from_bytes(bytes([0xA0 + i]) * 8, "little")
    # Only zeroes are discarded (host/punch.py): the two middle granules become what an
    # agent's reported pages are, zeroes still backed; a granule with data is refused.
    shared_vm.write(base + g, bytes(2 * g))
    assert shared_vm.allocated() == before
    with pytest.raises(PunchRefused, match="does not read as zeroes") as refused:
        punch(shared_vm.name, shared_vm.gmap, shared_vm.backings, base + g, 3 * g, g,
              shared_vm.permit)
    assert refused.value.content and refused.value.done == 2 * g
    assert before - shared_vm.allocated() == 2 * g
    shared_vm.write(base + g, bytes(2 * g))     # backed again, for the exact punch below
    assert shared_vm.allocated() == before

    punched = punch(shared_vm.name, shared_vm.gmap, shared_vm.backings, base + g, 2 * g, g,
                    shared_vm.permit)

    assert punched == 2 * g
    assert before - shared_vm.allocated() == 2 * g
    assert shared_vm.read(base, g) == pattern(0xA0, g)
    assert shared_vm.read(base + 3 * g, g) == pattern(0xA3, g)
    assert shared_vm.read(base + g, 2 * g) == bytes(2 * g)
    # QEMU's own view of guest-physical memory agrees with the file.
    assert shared_vm.qemu_sees(base) == int.from_bytes(b"\xa0" * 8, "little")
    assert shared_vm.qemu_sees(base + g) == 0
    assert shared_vm.qemu_sees(base + 2 * g + g - 8) == 0
    assert shared_vm.qemu_sees(base + 3 * g) == int.from_bytes(b"\xa3" * 8, "little")


def test_verified_reclaim_is_the_backings_real_fall(shared_vm: Vm) -> None:
    """host/verify.py on every shared backing kind, through QEMU's own fd of it (or its
    map_files entry): verified moves by exactly the kernel's fall of the file's allocation
    (hugetlbfs counts whole huge pages too); the same range punched again is all holes,
    so it is discarded but not verified."""
    g = 2 * MIB
    base = 96 * MIB
    for i in range(2):
        shared_vm.write(base + i * g, pattern(0, g))  # backed zeroes, as the agent's pages
    shared_vm.write(base + 2 * g, pattern(0xB2, g))   # a neighbour, never punched
    tally = ReclaimTally()

    def again() -> int:
        return punch(shared_vm.name, shared_vm.gmap, shared_vm.backings, base, 2 * g, g,
                     shared_vm.permit, verify=tally.range_done)

    before = shared_vm.allocated()
    assert again() == 2 * g
    assert tally.verified == before - shared_vm.allocated() == 2 * g
    assert again() == 2 * g
    assert tally.status() == {"verified_bytes": 2 * g, "unverified_bytes": 2 * g}
    assert shared_vm.read(base + 2 * g, g) == pattern(0xB2, g)


@pytest.mark.parametrize(
    ("gpa", "length", "granule", "why"),
    [
        (1 * GIB, 2 * MIB, 2 * MIB, "not guest RAM"),
        (494 * MIB, 4 * MIB, 2 * MIB, "TSEG"),
        (510 * MIB, 2 * MIB, 2 * MIB, "TSEG"),
        (0, 2 * MIB, 2 * MIB, "crosses the end"),  # 0..2M straddles the ROM/BIOS hole
        (0xC0000, 0x1000, 0x1000, "not guest RAM"),  # inside the hole
        (64 * MIB + 4096, 2 * MIB, 2 * MIB, "not aligned"),
        (64 * MIB, 0, 2 * MIB, "empty"),
        ((1 << 64) - 2 * MIB, 4 * MIB, 2 * MIB, "64-bit"),
    ],
)
def test_bad_ranges_are_refused_without_touching_memory(
    shared_vm: Vm, gpa: int, length: int, granule: int, why: str
) -> None:
    g = 2 * MIB
    for off in (0x100000, 64 * MIB, 492 * MIB, 494 * MIB):
        shared_vm.write(off, pattern(0x5A, g))
    before = shared_vm.allocated()
    with pytest.raises(PunchRefused, match=why):
        punch(shared_vm.name, shared_vm.gmap, shared_vm.backings, gpa, length, granule,
              shared_vm.permit)
    assert shared_vm.allocated() == before
    for off in (0x100000, 64 * MIB, 492 * MIB, 494 * MIB):
        assert shared_vm.read(off, g) == pattern(0x5A, g)


def test_granule_smaller_than_backing_page_is_refused(scratch: str, hugepages_2m: None) -> None:
    args, _, _, _ = SHARED_CASES["memfd-hugetlb"]
    vm = start_vm("test-hugetlb-granule", scratch, args)
    try:
        vm.write(64 * MIB, pattern(0x11, 2 * MIB))
        before = vm.allocated()
        assert before == 2 * MIB  # hugetlbfs counts whole huge pages in st_blocks
        with pytest.raises(PunchRefused, match="not aligned to the 0x200000-byte pages"):
            punch(vm.name, vm.gmap, vm.backings, 64 * MIB, 4096, 4096, vm.permit)
        assert vm.allocated() == before
        assert vm.read(64 * MIB, 2 * MIB) == pattern(0x11, 2 * MIB)
    finally:
        stop_vm(vm)


def test_refused_decision_blocks_the_punch(scratch: str) -> None:
    args, _, _, _ = SHARED_CASES["memfd"]
    vm = start_vm("test-refused", scratch, args)
    try:
        vm.write(64 * MIB, pattern(0x22, 2 * MIB))
        before = vm.allocated()

        def migrating() -> Decision:
            dom = DomainFacts(vm.name, (), "memfd", "shared", False, False, "", False, "")
            return decide(VmFacts(dom, JobInfo(True, "migration-out"), vm.backings,
                                  poison=NO_GUEST))

        with pytest.raises(PunchRefused, match="migration-out job is running"):
            punch(vm.name, vm.gmap, vm.backings, 64 * MIB, 2 * MIB, 2 * MIB, migrating)
        assert vm.allocated() == before
        assert vm.read(64 * MIB, 2 * MIB) == pattern(0x22, 2 * MIB)
    finally:
        stop_vm(vm)


def test_private_ram_cannot_be_punched(scratch: str) -> None:
    vm = start_vm("test-private", scratch,
                  ["-object", "memory-backend-ram,id=pc.ram,size=512M"])
    try:
        b = vm.backing()
        assert b.kind == bk.BackingKind.ANON_PRIVATE
        assert not b.punchable
        decision = vm.permit()
        assert decision.action == "refuse"
        assert "private anonymous memory" in decision.reason
        with pytest.raises(PunchRefused, match="reclaimer is refuse"):
            punch(vm.name, vm.gmap, vm.backings, 64 * MIB, 2 * MIB, 2 * MIB, vm.permit)
        # Even a caller that skips the decision cannot punch private RAM.
        with pytest.raises(PunchRefused, match="not punchable"):
            punch(vm.name, vm.gmap, vm.backings, 64 * MIB, 2 * MIB, 2 * MIB,
                  lambda: Decision("punch", "forced by the test"))
        assert bk.allocated_bytes(b) < 64 * MIB  # stopped guest: hardly anything resident
    finally:
        stop_vm(vm)


def test_private_file_mapping_is_refused(scratch: str) -> None:
    shm = tempfile.mkdtemp(prefix="aerate-test-", dir="/dev/shm")
    try:
        vm = start_vm("test-file-private", scratch,
                      ["-object", f"memory-backend-file,id=pc.ram,size=512M,share=off,"
                                  f"mem-path={shm}/guest-ram"])
        try:
            assert vm.backing().kind == bk.BackingKind.FILE_PRIVATE
            assert vm.permit().action == "refuse"
            assert "copy-on-write" in vm.permit().reason
        finally:
            stop_vm(vm)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_ram_above_4g_maps_to_block_offset_below_4g(scratch: str) -> None:
    # q35 with 3 GiB: 2 GiB below the PCI hole, 1 GiB at 4 GiB = block offset 2 GiB.
    vm = start_vm("test-above-4g", scratch,
                  ["-object", "memory-backend-memfd,id=pc.ram,size=3G,share=on"], size="3G")
    try:
        hi = 4 * GIB + 128 * MIB
        assert vm.file_offset(hi) == 2 * GIB + 128 * MIB
        fd = os.open(vm.backing().path or "", os.O_RDWR)
        try:
            # Written at the file offset computed by hand, seen by QEMU at the GPA.
            os.pwrite(fd, pattern(0x77, 2 * MIB), 2 * GIB + 128 * MIB)
            os.pwrite(fd, pattern(0x78, 2 * MIB), 2 * GIB + 130 * MIB)
        finally:
            os.close(fd)
        assert vm.qemu_sees(hi) == int.from_bytes(b"\x77" * 8, "little")
        fd = os.open(vm.backing().path or "", os.O_RDWR)
        try:    # zeroes, still backed: what a reported page holds (only they are punched)
            os.pwrite(fd, bytes(2 * MIB), 2 * GIB + 128 * MIB)
        finally:
            os.close(fd)
        before = vm.allocated()
        punch(vm.name, vm.gmap, vm.backings, hi, 2 * MIB, 2 * MIB, vm.permit)
        assert before - vm.allocated() == 2 * MIB
        assert vm.qemu_sees(hi) == 0
        assert vm.qemu_sees(hi + 2 * MIB) == int.from_bytes(b"\x78" * 8, "little")
        # The last 2 MiB below the PCI hole and the first above it are separate pieces.
        with pytest.raises(PunchRefused, match="not guest RAM"):
            punch(vm.name, vm.gmap, vm.backings, 2 * GIB, 2 * MIB, 2 * MIB, vm.permit)
    finally:
        stop_vm(vm)


def test_stale_backing_after_qemu_exit_is_refused(scratch: str) -> None:
    args, _, _, _ = SHARED_CASES["memfd"]
    vm = start_vm("test-stale", scratch, args)
    stop_vm(vm)
    with pytest.raises(PunchRefused, match="cannot open the backing"):
        punch(vm.name, vm.gmap, vm.backings, 64 * MIB, 2 * MIB, 2 * MIB,
              lambda: Decision("punch", "map taken before QEMU exited"))


# --- through libvirt ------------------------------------------------------------------

LIBVIRT_DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <channel type='unix'>
      <target type='virtio' name='org.aerate.agent.0'/>
    </channel>
    <memballoon model='virtio'/>
  </devices>
</domain>
"""


def _pidfile_alive(path: str) -> bool:
    try:
        pid = int(Path(path).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    """libvirtd and virtlogd running (no systemd here: start them if nobody did)."""
    _require_root_and_qemu()
    if shutil.which("libvirtd") is None:
        pytest.skip("libvirt-daemon-system is not installed")
    if not _pidfile_alive("/run/virtlogd.pid"):
        subprocess.run(["virtlogd", "-d"], check=True)
    if not _pidfile_alive("/run/libvirtd.pid"):
        subprocess.run(["libvirtd", "-d"], check=True)
    yield


@pytest.fixture
def lv(libvirtd: None) -> Iterator[Any]:
    from aerate.host.libvirt_conn import LibvirtConnection

    events: list[Any] = []
    conn = LibvirtConnection(on_lifecycle=events.append, backoff_initial=0.2, backoff_max=2.0)
    conn.events = events  # type: ignore[attr-defined]
    conn.start()
    assert conn.wait_connected(30), "no connection to qemu:///system"
    try:
        yield conn
    finally:
        conn.stop()


def _wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def lv_domain(lv: Any) -> Iterator[str]:
    """A persistent TCG domain with memfd shared RAM and the agent channel, running."""
    name = f"aerate-test-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    dom = lv.connection().defineXML(LIBVIRT_DOMAIN.format(name=name))
    try:
        dom.create()  # no disk, no OS: SeaBIOS finds nothing to boot, QEMU keeps running
        yield name
    finally:
        # Look it up again: a test may have restarted libvirtd under the old handle.
        assert lv.wait_connected(60), f"cannot clean up domain {name}: libvirtd is down"
        dom = lv.connection().lookupByName(name)
        try:
            if dom.isActive():
                dom.destroy()
        finally:
            dom.undefine()


def test_libvirt_domain_is_mapped_and_punched(lv: Any, lv_domain: str) -> None:
    from aerate.host.libvirt_conn import AGENT_CHANNEL

    name = lv_domain
    assert name in {d.name for d in lv.running_domains()}
    assert _wait_for(lambda: any(e.name == name and e.event == "started" for e in lv.events))
    pid = lv.qemu_pid(name)
    assert Path(f"/proc/{pid}/exe").resolve().name.startswith("qemu-system")
    sock = lv.channel_socket_path(name)
    assert sock is not None and sock.endswith("/" + AGENT_CHANNEL)
    assert os.path.exists(sock)  # libvirt made QEMU listen there for the daemon
    assert lv.job_info(name) == JobInfo(False, "none", "")

    gmap = qm.build_map(qm.gather(lv.qmp_function(name)))
    assert sum(r.length for r in gmap.ranges if r.gpa_start >= MIB) == 255 * MIB - TSEG
    backings = bk.resolve(pid, gmap, lv.hmp_function(name))
    (b,) = backings.values()
    assert b.kind == bk.BackingKind.MEMFD_SHARED, b.reason

    xml = lv.domain_xml(name)
    from aerate.host.refusal import domain_facts

    def permit() -> Decision:
        return decide(VmFacts(domain_facts(lv.domain_xml(name)), lv.job_info(name), backings,
                              poison=NO_GUEST))

    assert permit().action == "punch", permit().reason
    assert "memfd" in xml

    vm = Vm(name, None, gmap, backings)  # type: ignore[arg-type]
    g = 2 * MIB
    # Paused (by the user, which does not refuse): the firmware's own writes would blur
    # the allocation count.
    lv.connection().lookupByName(name).suspend()
    assert lv.job_info(name).paused_reason == "user"
    for i in range(3):
        vm.write(128 * MIB + i * g, pattern(0x61 + i, g))
    before = bk.allocated_bytes(b)

    def xp(gpa: int) -> int:
        return int(lv.hmp(name, f"xp /1gx {gpa:#x}").split(":")[1].split()[0], 16)

    assert xp(128 * MIB + g) == int.from_bytes(b"\x62" * 8, "little")
    vm.write(128 * MIB + g, bytes(g))   # zeroes, still backed: only they are punched
    assert bk.allocated_bytes(b) == before
    assert punch(name, gmap, backings, 128 * MIB + g, g, g, permit) == g
    assert before - bk.allocated_bytes(b) == g
    assert xp(128 * MIB + g) == 0
    assert xp(128 * MIB) == int.from_bytes(b"\x61" * 8, "little")
    assert xp(128 * MIB + 2 * g) == int.from_bytes(b"\x63" * 8, "little")
    lv.connection().lookupByName(name).resume()


def test_metadata_round_trip_survives_in_the_definition(lv: Any, lv_domain: str) -> None:
    ns = "urn:x-aerate:test:1"
    assert lv.metadata(lv_domain, ns) is None
    lv.set_metadata(lv_domain, "<settings><setting name='hwm'>16</setting></settings>",
                    "aerate", ns)
    live = lv.metadata(lv_domain, ns)
    assert live is not None and "hwm" in live and "16" in live
    assert ns in lv.domain_xml(lv_domain, inactive=True)  # persisted (S6)


def test_lookup_by_name_uuid_id_and_metadata_live_or_config(lv: Any, lv_domain: str) -> None:
    """aeratectl names domains as virsh does, and --live/--config reach the right copy."""
    ns = "urn:x-aerate:test:2"
    dom = lv.connection().lookupByName(lv_domain)
    by_name = lv.lookup(lv_domain)
    assert by_name is not None and by_name.uuid == dom.UUIDString() and by_name.id > 0
    assert lv.lookup(by_name.uuid) == by_name and lv.lookup(str(by_name.id)) == by_name
    assert lv.lookup("no-such-aerate-domain") is None
    lv.set_metadata(lv_domain, "<settings><setting name='hwm'>8</setting></settings>",
                    "aerate", ns, config=True)
    assert lv.metadata(lv_domain, ns) is None  # the running domain did not get it
    assert "8" in (lv.metadata(lv_domain, ns, config=True) or "")
    lv.set_metadata(lv_domain, "<settings><setting name='hwm'>9</setting></settings>",
                    "aerate", ns, live=True)
    assert "9" in (lv.metadata(lv_domain, ns) or "")
    assert "8" in (lv.metadata(lv_domain, ns, config=True) or "")
    lv.set_metadata(lv_domain, None, "aerate", ns)  # both copies removed
    assert lv.metadata(lv_domain, ns) is None and lv.metadata(lv_domain, ns, config=True) is None
    dom.destroy()
    stopped = lv.lookup(lv_domain)
    assert stopped is not None and stopped.id == -1
    lv.set_metadata(lv_domain, "<settings/>", "aerate", ns, config=True)
    assert lv.metadata(lv_domain, ns) is not None  # a stopped domain's current = config


def test_reconnects_after_libvirtd_restart(lv: Any, lv_domain: str) -> None:
    connects = lv.connects
    old = int(Path("/run/libvirtd.pid").read_text().strip())
    os.kill(old, 15)
    assert _wait_for(lambda: not lv.connected, 30), "close callback never fired"
    assert _wait_for(lambda: not _pidfile_alive("/run/libvirtd.pid"), 30)
    subprocess.run(["libvirtd", "-d"], check=True)
    assert lv.wait_connected(60), "no reconnect after libvirtd came back"
    assert lv.connects == connects + 1
    # The running domain survived and is visible again; events flow on the new connection.
    assert lv_domain in {d.name for d in lv.running_domains()}
    lv.events.clear()
    lv.connection().lookupByName(lv_domain).suspend()
    assert _wait_for(lambda: any(e.name == lv_domain and e.event == "suspended"
                                 for e in lv.events))
    lv.connection().lookupByName(lv_domain).resume()
    pid = lv.qemu_pid(lv_domain)
    gmap = qm.build_map(qm.gather(lv.qmp_function(lv_domain)))
    assert bk.resolve(pid, gmap, lv.hmp_function(lv_domain))


def test_device_owned_ram_block_is_resolved(scratch: str) -> None:
    # virtio-mem registers its block as "<pci path>/vmem0"; QEMU's gpa2hva says "vmem0".
    _require_root_and_qemu()
    args = ["-machine", "q35,memory-backend=pc.ram", "-m", "512M,maxmem=2G",
            "-object", "memory-backend-memfd,id=pc.ram,size=512M,share=on",
            "-object", "memory-backend-memfd,id=vmem0,size=1G,share=on",
            "-device", "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0"]
    with BareQemu(args, f"{scratch}/qmp.sock") as qemu:
        gmap = qm.build_map(qm.gather(qemu.qmp))
        backings = bk.resolve(qemu.pid, gmap, qemu.qmp.hmp)
        (block,) = [b for b in backings if b.endswith("/vmem0")]
        assert backings[block].kind == bk.BackingKind.MEMFD_SHARED, backings[block].reason
        assert backings[block].file_size == GIB
        assert backings["pc.ram"].ino != backings[block].ino
        place = qm.locate(gmap, 4 * GIB, 2 * MIB, 2 * MIB)
        assert (place.block_name, place.block_offset) == (block, 0)
