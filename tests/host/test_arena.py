"""The arena on this machine's real kernel: buddy blocks, PFNs, S3 through SIGKILL + compaction.

Root and 2 MiB hugetlb support are required. Every test leaves nr_overcommit_hugepages as it
found it (fixture), and nr_hugepages (the persistent pool) is checked to be untouched.

How the buddy allocator is measured: /proc/buddyinfo alone is not enough on Linux >= 5.13,
where freed order-9 pages (THP size) are cached on per-CPU lists and allocations are served
from there first; those pages are invisible in buddyinfo (a 64-block fill moved buddyinfo by
anything from 6 to 64 blocks here). The per-CPU list sizes are in /proc/zoneinfo ("count",
in pages), so the tests count order>=9 buddy blocks plus per-CPU pages / 512, and subtract
pages a zone gained meanwhile ("managed": this kernel initialises memory lazily, which adds
free blocks). What remains is kernel noise -- other allocations of this machine, low-order
per-CPU traffic -- bounded by tolerance() (measured on a quiet machine: under 1 block for
64, under 3 for 1024). A busy machine can exceed it; see the fill test's retries.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
from supervisor import NotifyStandIn, spawn_with_listen_fds

from aerate.agent import arena as ar
from aerate.agent import fdstore
from aerate.agent.hugetlb import SurplusBudget, hstate_dir, read_pool
from aerate.agent.pagemap import PagemapPermissionError, coalesce

pytestmark = pytest.mark.host

HSTATE = hstate_dir(2048)
KNOB = f"{HSTATE}/nr_overcommit_hugepages"
POOL = f"{HSTATE}/nr_hugepages"
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_HUGE, KPF_THP = 15, 16, 17, 22

if os.geteuid() != 0 or not os.path.exists(KNOB):
    pytest.skip("needs root and 2 MiB hugetlb pages", allow_module_level=True)


ATTEMPTS = 3


def tolerance(n: int) -> float:
    """Allowed kernel noise, in order-9 blocks, for a fill or release of n blocks."""
    return 2 + n / 64


# --- tiny /proc readers (agent/procfs.py is another helper's) ---------------------------


def read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def write_int(path: str, value: int) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name == key:
                return int(rest.split()[0])
    raise KeyError(key)


def own_anon_huge_kb() -> int:
    """AnonHugePages of this process alone (QEMU guests on this machine move the global one)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    raise KeyError("AnonHugePages")


def vmstat(key: str) -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            name, value = line.split()
            if name == key:
                return int(value)
    raise KeyError(key)


@dataclass(frozen=True)
class Free:
    """Free memory in order-9 units as the buddy allocator sees it."""

    buddy_blocks: int  # sum over zones of free blocks of order >= 9, in order-9 blocks
    pcp_pages: int  # pages on per-CPU lists (all orders)
    managed_pages: int

    def taken_since(self, before: Free) -> float:
        """Order-9 blocks that left the allocator between ``before`` and now."""
        return -(
            (self.buddy_blocks - before.buddy_blocks)
            + (self.pcp_pages - before.pcp_pages) / 512
            - (self.managed_pages - before.managed_pages) / 512
        )


def free_now() -> Free:
    blocks = 0
    with open("/proc/buddyinfo") as f:
        for line in f:
            counts = [int(x) for x in line.split()[4:]]
            blocks += sum(c << (order - 9) for order, c in enumerate(counts) if order >= 9)
    with open("/proc/zoneinfo") as f:
        zoneinfo = f.read()
    pcp = sum(int(x) for x in re.findall(r"^\s+count:\s+(\d+)", zoneinfo, re.M))
    managed = sum(int(x) for x in re.findall(r"^\s+managed\s+(\d+)", zoneinfo, re.M))
    return Free(blocks, pcp, managed)


def kpageflags(pfn: int, count: int = 1) -> List[int]:
    with open("/proc/kpageflags", "rb") as f:
        f.seek(pfn * 8)
        data = f.read(count * 8)
    return [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8)]


def assert_hugetlb_page_at(pfn: int, what: str = "hugetlb") -> None:
    """The kernel's own view: [pfn, pfn+512) is one compound page (head + 511 tails)."""
    flags = kpageflags(pfn, 512)
    kind = KPF_HUGE if what == "hugetlb" else KPF_THP
    assert flags[0] >> KPF_COMPOUND_HEAD & 1, f"pfn {pfn} is not a compound head"
    assert flags[0] >> kind & 1, f"pfn {pfn} is not a {what} page"
    assert all(f >> KPF_COMPOUND_TAIL & 1 for f in flags[1:]), f"{pfn}+1..511 are not its tails"


def persistent_pages() -> int:
    # nr_hugepages counts surplus pages too; the operator's pool is what is left. (A dead
    # agent's pins are dropped from the kernel's io_uring exit work, so its surplus pages
    # may linger a moment after the process is gone.)
    return read_int(POOL) - read_int(f"{HSTATE}/surplus_hugepages")


@pytest.fixture(autouse=True)
def kernel_knobs() -> Iterator[int]:
    """Restore nr_overcommit_hugepages whatever happens; check the pool was not touched."""
    overcommit, pool = read_int(KNOB), persistent_pages()
    try:
        yield overcommit
    finally:
        if read_int(KNOB) != overcommit:
            write_int(KNOB, overcommit)
    assert persistent_pages() == pool, "the persistent pool (nr_hugepages) changed"


@pytest.fixture()
def operator_value(kernel_knobs: int) -> int:
    """An operator setting of nr_overcommit_hugepages that is not 0, to see it restored."""
    value = kernel_knobs + 5
    write_int(KNOB, value)
    return value


@pytest.fixture()
def run_dir(tmp_path: Path) -> str:
    return str(tmp_path / "run")


@pytest.fixture()
def quiet_pool() -> None:
    """Skip when someone else keeps free persistent 2 MiB pages on this machine.

    The hugetlb arena then refuses to fill, by design (it would take their pages; see
    test_a_free_persistent_pool_is_left_alone), so these tests cannot measure anything.
    """
    pool = read_pool()
    if pool.free_unreserved:
        pytest.skip(
            f"{pool.free_unreserved} free persistent 2 MiB pages belong to another user of "
            "this machine (nr_hugepages); hugetlb arena tests need them gone"
        )


@pytest.fixture()
def budget(run_dir: str, quiet_pool: None) -> Iterator[SurplusBudget]:
    b = SurplusBudget(run_dir)
    yield b
    b.close()


# --- fill and release -------------------------------------------------------------------


def test_fill_takes_order9_blocks_and_release_returns_them(
    budget: SurplusBudget, operator_value: int
) -> None:
    # HugePages_Surp and the knob are exact on every attempt. The buddy count is checked on
    # the best of ATTEMPTS fill/release rounds: another workload allocating at the same
    # moment moves it by tens of blocks (seen with a 200 MiB allocate/free loop running).
    n = 64
    misses: List[str] = []
    with ar.HugetlbArena(n, budget) as arena:
        assert arena.kind == "hugetlb" and arena.weakness is None
        assert arena.granule_bytes == 2 << 20
        for _ in range(ATTEMPTS):
            surplus, before = meminfo("HugePages_Surp"), free_now()
            blocks = arena.fill(n)
            after = free_now()
            assert len(blocks) == n, "this machine has gigabytes free: a short fill is a bug"
            assert meminfo("HugePages_Surp") == surplus + n
            assert read_int(KNOB) == operator_value + n
            assert arena.held() == blocks

            arena.release(blocks)
            back = free_now()
            assert arena.held() == []
            assert meminfo("HugePages_Surp") == surplus
            assert read_int(KNOB) == operator_value

            taken, returned = after.taken_since(before), -back.taken_since(after)
            if abs(taken - n) <= tolerance(n) and abs(returned - n) <= tolerance(n):
                return
            alone = before.buddy_blocks - after.buddy_blocks
            misses.append(
                f"fill took {taken:.1f} (buddyinfo alone {alone}), returned {returned:.1f}"
            )
    pytest.fail(f"order-9 blocks did not move by {n}±{tolerance(n)}: " + "; ".join(misses))


def test_blocks_are_aligned_contiguous_distinct_hugepages(budget: SurplusBudget) -> None:
    n = 32
    with ar.HugetlbArena(n, budget) as arena:
        blocks = arena.fill(n)
        try:
            assert len(blocks) == n
            assert sorted(b.offset for b in blocks) == [i * (2 << 20) for i in range(n)]
            for b in blocks:
                assert b.nr_pages == 512 and b.pfn % 512 == 0
                assert_hugetlb_page_at(b.pfn)
            # Distinct, non-overlapping frames: coalescing loses no page.
            runs = coalesce(((b.pfn, b.nr_pages) for b in blocks), 512)
            assert sum(r.nr_pages for r in runs) == n * 512
            assert arena.verify(blocks) == []
        finally:
            arena.release(arena.held())


def test_verify_flags_a_block_whose_recorded_frame_is_stale(budget: SurplusBudget) -> None:
    # A real hugetlb migration needs memory offlining or soft-offline, which this machine
    # refuses (EIO), so the stale record is made by hand; verify must read the truth back.
    with ar.HugetlbArena(1, budget) as arena:
        (block,) = arena.fill(1)
        try:
            stale = ar.Block(block.pfn + 512, 512, block.offset)
            assert arena.verify([stale]) == [stale]
            assert arena.held() == [block]
        finally:
            arena.release(arena.held())


def test_short_fill_when_the_kernel_refuses_more_surplus(budget: SurplusBudget) -> None:
    # The kernel refuses surplus pages beyond the knob; a fill stops there without error.
    # _CappedBudget is a test double for the budget: it writes the real knob, but never more
    # than 2 pages above the surplus pages in use when it was made.
    with ar.HugetlbArena(4, budget) as arena:
        arena._budget = _CappedBudget(2)  # type: ignore[attr-defined]
        try:
            assert len(arena.fill(4)) == 2
        finally:
            arena.release(arena.held())


class _CappedBudget(SurplusBudget):
    """Test double: the knob tracks ``pages`` but at most ``cap`` above today's surplus."""

    def __init__(self, cap: int) -> None:
        self._limit = read_int(f"{HSTATE}/surplus_hugepages") + cap
        self._cap = cap

    def set(self, pages: int) -> None:
        write_int(KNOB, self._limit - self._cap + min(pages, self._cap))


def test_release_refuses_blocks_it_does_not_hold(budget: SurplusBudget) -> None:
    with ar.HugetlbArena(2, budget) as arena, pytest.raises(ar.ArenaError, match="does not hold"):
        arena.release([ar.Block(512, 512, 0)])


def test_a_free_persistent_pool_is_left_alone(budget: SurplusBudget) -> None:
    pool, free = read_int(POOL), meminfo("HugePages_Free")
    write_int(POOL, pool + 2)  # the test plays the operator here, and undoes it below
    try:
        if meminfo("HugePages_Free") != free + 2:
            pytest.skip("the kernel could not grow the persistent pool by 2 free pages")
        with ar.HugetlbArena(2, budget) as arena, pytest.raises(ar.ArenaError, match="pool"):
            arena.fill(2)
        assert meminfo("HugePages_Free") == free + 2, "the arena took pool pages"
    finally:
        write_int(POOL, pool)


def test_pagemap_without_cap_sys_admin_raises_a_clear_error() -> None:
    child = """
import mmap, ctypes, os, sys
from aerate.agent.pagemap import read_pagemap, PagemapPermissionError
m = mmap.mmap(-1, 4096)
m[0] = 1
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
os.setgid(65534); os.setuid(65534)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: setuid made /proc/self root's
try:
    read_pagemap(addr, 1)
except PagemapPermissionError as exc:
    print("refused:", exc)
else:
    print("read PFNs without CAP_SYS_ADMIN")
"""
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.startswith("refused:") and "CAP_SYS_ADMIN" in out, out
    assert issubclass(PagemapPermissionError, PermissionError)


# --- S3: SIGKILL the holder, compact, recover, release ----------------------------------

HOLDER = """
import json, signal, sys
from aerate.agent import fdstore
from aerate.agent.arena import HugetlbArena
from aerate.agent.hugetlb import SurplusBudget
budget = SurplusBudget(sys.argv[1])
arena = HugetlbArena(int(sys.argv[2]) + 8, budget)
blocks = arena.fill(int(sys.argv[2]))
assert fdstore.store([arena.fileno()], fdstore.ARENA_FDNAME, backend="raw")
print(json.dumps([[b.offset, b.pfn] for b in blocks]), flush=True)
signal.pause()
"""

RECOVERER = """
import json, sys
from aerate.agent import fdstore
from aerate.agent.arena import Arena
from aerate.agent.hugetlb import SurplusBudget
(fd,) = fdstore.take()[fdstore.ARENA_FDNAME]
budget = SurplusBudget(sys.argv[1])
arena = Arena.recover(fd, budget)
held = arena.held()
print(json.dumps({"kind": arena.kind, "held": [[b.offset, b.pfn] for b in held],
                  "original": budget.original, "note": budget.note}), flush=True)
assert sys.stdin.readline().strip() == "release"
arena.release(held)
arena.close()
budget.close()
print("released", flush=True)
"""


def _stop(proc: Optional[subprocess.Popen[str]]) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.usefixtures("quiet_pool")
def test_held_pages_survive_sigkill_and_compaction_and_are_recovered(
    tmp_path: Path, run_dir: str, operator_value: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 48
    standin = NotifyStandIn(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", standin.path)
    surplus = meminfo("HugePages_Surp")
    holder: Optional[subprocess.Popen[str]] = None
    recoverer: Optional[subprocess.Popen[str]] = None
    stored: List[int] = []
    try:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, run_dir, str(n)], stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None
        filled: Dict[int, int] = dict(json.loads(holder.stdout.readline()))
        msg, stored = standin.receive()
        assert msg == "FDSTORE=1\nFDNAME=aerate-arena" and len(stored) == 1
        assert len(filled) == n and meminfo("HugePages_Surp") == surplus + n

        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
        # Only the stand-in's copy of the fd keeps the pages now.
        assert meminfo("HugePages_Surp") == surplus + n, "pages were freed with the holder"
        assert read_int(KNOB) == operator_value + n

        scanned = vmstat("compact_migrate_scanned")
        write_int("/proc/sys/vm/compact_memory", 1)
        assert vmstat("compact_migrate_scanned") > scanned, "compaction did not run"
        assert meminfo("HugePages_Surp") == surplus + n
        for pfn in filled.values():
            assert_hugetlb_page_at(pfn)

        recoverer = spawn_with_listen_fds(
            [sys.executable, "-c", RECOVERER, run_dir],
            stored,
            [fdstore.ARENA_FDNAME],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert recoverer.stdout is not None and recoverer.stdin is not None
        got = json.loads(recoverer.stdout.readline())
        assert got["kind"] == "hugetlb"
        assert dict(got["held"]) == filled, "recovered blocks differ in offset or frame"
        assert got["original"] == operator_value and got["note"]
        assert meminfo("HugePages_Surp") == surplus + n, "recovery allocated or freed pages"

        recoverer.stdin.write("release\n")
        recoverer.stdin.flush()
        assert recoverer.stdout.readline().strip() == "released"
        recoverer.stdin.close()
        assert recoverer.wait(timeout=30) == 0
        assert meminfo("HugePages_Surp") == surplus
        assert read_int(KNOB) == operator_value
        assert not os.path.exists(os.path.join(run_dir, "hugetlb-2048kB.json"))
    finally:
        _stop(holder)
        _stop(recoverer)
        for fd in stored:
            os.close(fd)
        standin.close()


def test_recovery_probe_skips_holes(budget: SurplusBudget) -> None:
    arena = ar.HugetlbArena(8, budget)
    blocks = arena.fill(6)
    arena.release([blocks[1], blocks[4]])
    keep = {b.offset: b.pfn for b in arena.held()}
    fd = os.dup(arena.fileno() or -1)
    arena.close()  # fd keeps the pages, like the fd store
    surplus = meminfo("HugePages_Surp")
    recovered = ar.Arena.recover(fd, budget)
    try:
        assert {b.offset: b.pfn for b in recovered.held()} == keep
        assert meminfo("HugePages_Surp") == surplus
    finally:
        recovered.release(recovered.held())
        recovered.close()


@pytest.mark.usefixtures("quiet_pool")
def test_budget_restores_the_operator_value_after_a_sigkilled_agent(
    run_dir: str, operator_value: int
) -> None:
    # No fd store this time: the pages die with the agent, the raised knob does not.
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER.replace("assert fdstore.store", "# "), run_dir, "4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert len(json.loads(child.stdout.readline())) == 4
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        _stop(child)
    assert read_int(KNOB) == operator_value + 4
    budget = SurplusBudget(run_dir)
    try:
        assert budget.original == operator_value and budget.raised_by == 4
        budget.restore()
        assert read_int(KNOB) == operator_value
    finally:
        budget.close()


def test_budget_keeps_an_operator_write_made_while_the_agent_was_down(
    run_dir: str, operator_value: int
) -> None:
    first = SurplusBudget(run_dir)
    first.set(3)
    first.close()  # as if killed: record left, knob raised
    write_int(KNOB, operator_value + 11)  # the operator changes it meanwhile
    second = SurplusBudget(run_dir)
    try:
        assert second.original == operator_value + 11 and second.note
        second.set(2)
        assert read_int(KNOB) == operator_value + 13
        second.restore()
        assert read_int(KNOB) == operator_value + 11
    finally:
        second.close()


def test_one_budget_per_run_dir(budget: SurplusBudget, run_dir: str) -> None:
    from aerate.agent.hugetlb import BudgetError

    with pytest.raises(BudgetError, match="only one aerate-agent"):
        SurplusBudget(run_dir)


# --- THP fallback -----------------------------------------------------------------------


def test_thp_arena_fills_aligned_thps_and_releases_them() -> None:
    n = 16
    with ar.ThpArena(n, backing="anon") as arena:
        assert arena.kind == "thp" and arena.fileno() is None
        assert arena.weakness is not None and "compaction" in arena.weakness
        assert "S3" in arena.weakness
        anon = own_anon_huge_kb()
        blocks = arena.fill(n)
        assert len(blocks) >= n // 2, "THP 'madvise' mode with gigabytes free gave few THPs"
        assert own_anon_huge_kb() - anon == len(blocks) * 2048
        for b in blocks:
            assert b.pfn % 512 == 0 and b.nr_pages == 512
            assert_hugetlb_page_at(b.pfn, "thp")
        assert arena.verify(blocks) == []
        arena.release(blocks)
        assert arena.held() == []
        assert own_anon_huge_kb() == anon


SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


@pytest.fixture()
def shmem_thp_advise() -> Iterator[None]:
    """Let MADV_HUGEPAGE give shmem THPs for this test (the machine default is 'never')."""
    with open(SHMEM_THP) as f:
        before = f.read().split("[", 1)[1].split("]", 1)[0]
    with open(SHMEM_THP, "w") as f:
        f.write("advise")
    try:
        yield
    finally:
        with open(SHMEM_THP, "w") as f:
            f.write(before)


@pytest.mark.usefixtures("shmem_thp_advise")
def test_thp_memfd_arena_is_recovered_from_its_fd() -> None:
    arena = ar.ThpArena(8)
    assert arena.backing == "memfd" and arena.fileno() is not None
    assert arena.weakness is not None and "S3" not in arena.weakness
    blocks = arena.fill(7)
    assert len(blocks) >= 4
    fd = os.dup(arena.fileno() or -1)
    arena.close()  # the memfd (like the fd store's copy) keeps the pages
    for b in blocks:
        assert_hugetlb_page_at(b.pfn, "thp")
    # A slot that holds data but is not one aligned 2 MiB run, as a reported slot whose THP
    # was split (or partly swapped) while no agent ran would be: recovery cannot tell it was
    # never reported, so it must hold it as an orphan too, not hand it back.
    odd = min(set(range(0, 8 * ar.BLOCK_BYTES, ar.BLOCK_BYTES)) - {b.offset for b in blocks})
    os.pwrite(fd, b"x" * 4096, odd + (1 << 20))   # one small shmem page in a free slot
    recovered = ar.Arena.recover(fd)
    try:
        assert recovered.kind == "thp"
        odd_blocks = [b for b in recovered.held() if b.offset == odd]
        assert odd_blocks, "a slot that is not one run was handed back"
        odd_block = odd_blocks[0]
        assert [b for b in recovered.held() if b.offset != odd] == blocks
        assert recovered.verify([odd_block]) == [odd_block], "it is not one run"
        recovered.release(recovered.held())
        assert os.fstat(fd).st_blocks == 0, "released THP blocks still in the memfd"
    finally:
        recovered.close()


def test_create_arena_prefers_hugetlb_and_falls_back_with_a_reason(
    budget: SurplusBudget,
) -> None:
    with ar.create_arena(4, budget) as arena:
        assert arena.kind == "hugetlb" and arena.weakness is None
    with ar.create_arena(4, None) as arena:
        assert arena.kind == "thp" and arena.weakness and "no surplus budget" in arena.weakness
    pool = read_int(POOL)
    write_int(POOL, pool + 1)  # an operator's free persistent page
    try:
        if read_pool().free_unreserved != 1:
            pytest.skip("the kernel could not grow the persistent pool by one free page")
        with ar.create_arena(4, budget) as arena:
            assert arena.kind == "thp" and arena.weakness and "1 free pages" in arena.weakness
    finally:
        write_int(POOL, pool)
