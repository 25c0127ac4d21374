"""Held pages outlive the agent process and stay where they were reported (S3), on this
machine's real kernel.

- A batch reported and never acked stays held after the agent is SIGKILLed *and* the
  service manager flushes its fd store (what systemd does when the unit stops): the arena
  is a named file on a hugetlbfs mount, so nothing depends on the fd store. A new agent
  process recovers the pages as orphans from the file and frees them only after a new
  session. The memfd fallback loses them under the same treatment (the control run).
- Pinned blocks keep their frames through memory offlining, the migration trigger this
  kernel really applies to in-use hugetlb pages (a runtime 1 GiB hugepage allocation does
  not touch them on 6.18: see the measurements in agent/pin.py); the same blocks unpinned
  are migrated by the same offline.
- The THP arena refuses to report unless allow_weak_arena.

Root, 2 MiB hugetlb pages and a mountable hugetlbfs are required. The hugetlbfs mount is
the test's own, in this (the init) mount namespace.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from supervisor import FdStoreStandIn
from test_agent import Host, agent_argv, knob, raw_mib, reserve_for, stop, surplus

from aerate.agent import arena as ar
from aerate.agent import carrier
from aerate.agent.hugetlb import SurplusBudget, read_pool

pytestmark = pytest.mark.host
KPF_COMPOUND_HEAD, KPF_HUGE = 15, 17
MEMORY = Path("/sys/devices/system/memory")

if os.geteuid() != 0 or not Path("/sys/kernel/mm/hugepages/hugepages-2048kB").exists():
    pytest.skip("needs root and 2 MiB hugetlb pages", allow_module_level=True)


def is_hugetlb_head(pfn: int) -> bool:
    with open("/proc/kpageflags", "rb") as f:
        f.seek(pfn * 8)
        flags = int.from_bytes(f.read(8), "little")
    return bool(flags >> KPF_COMPOUND_HEAD & 1 and flags >> KPF_HUGE & 1)


@pytest.fixture()
def hugetlbfs(tmp_path: Path) -> Iterator[Path]:
    """A hugetlbfs mount of 2 MiB pages (this test's stand-in for /dev/hugepages)."""
    mnt = tmp_path / "hugepages"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount hugetlbfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture()
def quiet_pool() -> None:
    pool = read_pool()
    if pool.free_unreserved:
        pytest.skip(f"{pool.free_unreserved} free persistent 2 MiB pages belong to another "
                    "user of this machine; the hugetlb arena refuses to fill then")


@pytest.fixture()
def agent_env(tmp_path: Path) -> Iterator[Dict[str, Any]]:
    before = knob()
    store = FdStoreStandIn(str(tmp_path / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=store.path, PYTHONUNBUFFERED="1")
    yield {"env": env, "store": store, "run": tmp_path / "run", "knob": before}
    store.close()
    if knob() != before:
        Path("/proc/sys/vm/nr_overcommit_hugepages").write_text(str(before))


def reported_pfns(host: Host) -> List[int]:
    return [gpa // 4096 + i * 512 for r in host.reports for gpa, n in r.ranges
            for i in range(n // (2 << 20))]


@pytest.mark.usefixtures("quiet_pool")
@pytest.mark.parametrize("carrier_kind", ["file", "memfd"])
def test_unacked_batch_survives_sigkill_and_fd_store_flush(
    hugetlbfs: Path, agent_env: Dict[str, Any], carrier_kind: str
) -> None:
    """S3 without the fd store: SIGKILL + stop-flush keeps the named file's pages held, a
    new agent recovers them as orphans and frees them only after a new session. The memfd
    control run shows the flush is real: there the pages go."""
    if raw_mib() < 512:
        pytest.skip("less than 512 MiB free in order>=9 blocks on this machine")
    env = dict(agent_env["env"],
               AERATE_ARENA_DIR=str(hugetlbfs) if carrier_kind == "file" else "")
    store: FdStoreStandIn = agent_env["store"]
    path = hugetlbfs / carrier.ARENA_FILE
    base_surplus = surplus()
    host = Host()
    argv = agent_argv(host.path, agent_env["run"], "hwm=1", "capacity=8",
                      f"reserve_mib={reserve_for(64)}")
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    proc2: Optional[subprocess.Popen[str]] = None
    try:
        host.sync()
        host.pump(30, ack=False, until=lambda: bool(host.reports))
        assert host.reports, "the agent reported nothing"
        pfns = reported_pfns(host)
        held = surplus() - base_surplus
        assert held >= len(pfns) >= 1
        assert all(is_hugetlb_head(p) for p in pfns)
        proc.kill()
        proc.wait()
        store.drain()
        if carrier_kind == "file":
            assert path.exists()
            assert "FDSTORE=1" not in "".join(store.messages), "a named file needs no fd store"
        else:
            assert store.stored, "the memfd fallback must use the fd store"
        store.flush()   # the unit stops: systemd closes every stored fd
        time.sleep(0.5)
        if carrier_kind == "memfd":
            # The documented weakness of the fallback on systemd < 254 (or without
            # FileDescriptorStorePreserve=yes): the held pages are gone.
            assert surplus() - base_surplus == 0
            return
        assert surplus() - base_surplus == held, "held pages died with the fd store flush"
        assert all(is_hugetlb_head(p) for p in pfns), "a reported frame is no hugepage now"
        assert knob() == agent_env["knob"] + held, "the surplus budget lost the held pages"

        # A new agent, started afresh (no fds handed over): it recovers from the file.
        proc2 = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
        host.pump(20, ack=False, until=lambda: host.need_sync > 0)
        assert host.need_sync > 0, "a recovered agent must ask for a session"
        time.sleep(0.5)
        assert surplus() - base_surplus == held, "recovery allocated or freed pages"
        assert all(is_hugetlb_head(p) for p in pfns)
        host.sync(settings={"enabled": False})   # a new session: orphans may go now
        host.pump(30, until=lambda: surplus() == base_surplus)
        assert surplus() == base_surplus
        assert not any(is_hugetlb_head(p) for p in pfns)
        stop(proc2)
        assert proc2.returncode == 0
        assert proc2.stderr is not None
        log = proc2.stderr.read()
        assert f"recovered arena from {path}: {held} blocks held from before" in log, log
        assert not path.exists(), "an empty arena file must be removed at exit"
        assert knob() == agent_env["knob"]
    finally:
        for p in (proc, proc2):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        host.close()


def test_new_arena_file_is_locked_and_removed_only_when_empty(
    hugetlbfs: Path, tmp_path: Path, quiet_pool: None
) -> None:
    budget = SurplusBudget(str(tmp_path / "run"))
    path = str(hugetlbfs / carrier.ARENA_FILE)
    try:
        assert carrier.check_dir(str(hugetlbfs), ar.BLOCK_BYTES) == ""
        assert "not on a hugetlbfs mount" in carrier.check_dir(str(tmp_path), ar.BLOCK_BYTES)
        arena = ar.HugetlbArena(4, budget, path=path)
        assert arena.carrier == "file"
        with pytest.raises(ar.ArenaError, match="locked by another process"):
            ar.HugetlbArena.open_named(path, budget)
        blocks = arena.fill(2)
        assert len(blocks) == 2
        arena.close()   # pages held: the file stays, with them
        assert os.path.exists(path) and surplus() >= 2
        again = ar.HugetlbArena.open_named(path, budget)
        assert {(b.offset, b.pfn) for b in again.held()} == {(b.offset, b.pfn) for b in blocks}
        again.release(again.held())
        again.close()
        assert not os.path.exists(path)
    finally:
        budget.restore()
        budget.close()


# --- pins against migration -------------------------------------------------------------


def try_offline(block: int, seconds: float) -> bool:
    """Try to offline memory block ``block`` for at most ``seconds``; True if it went."""
    state = MEMORY / f"memory{block}" / "state"
    subprocess.run(["timeout", "-s", "INT", str(seconds), "sh", "-c", f"echo offline > {state}"],
                   capture_output=True)
    return state.read_text().strip() == "offline"


def online(block: int) -> None:
    (MEMORY / f"memory{block}" / "state").write_text("online")


@pytest.mark.usefixtures("quiet_pool")
def test_pinned_blocks_keep_their_frames_through_memory_offlining(tmp_path: Path) -> None:
    """The pin blocks the migration that offlining a memory block performs; unpinning the
    same blocks lets the same offline move them (so the trigger is real)."""
    if not (MEMORY / "block_size_bytes").exists():
        pytest.skip("no memory hotplug in this kernel (/sys/devices/system/memory)")
    pages_per_block = int((MEMORY / "block_size_bytes").read_text(), 16) // 4096
    budget = SurplusBudget(str(tmp_path / "run"))
    arena = ar.HugetlbArena(256, budget)
    try:
        assert arena.counters["pin_unavailable"] == 0, arena.weakness
        blocks = arena.fill(256)
        assert arena.counters["pinned"] == len(blocks) >= 64
        by_mem: Dict[int, List[ar.Block]] = {}
        for b in blocks:
            by_mem.setdefault(b.pfn // pages_per_block, []).append(b)
        tried = []
        unpinned = 0   # blocks of memory blocks tried before (they stay unpinned)
        for mem, inside in sorted(by_mem.items(), key=lambda kv: -len(kv[1]))[:3]:
            went = try_offline(mem, 4)
            if went:
                online(mem)
            assert not went, f"memory{mem} went offline under {len(inside)} pinned pages"
            assert arena.verify(inside) == [], "a pinned block moved"
            arena.unpin(inside)
            unpinned += len(inside)
            assert arena.counters["pinned"] == len(blocks) - unpinned
            if try_offline(mem, 10):
                online(mem)
                moved = arena.verify(inside)
                assert moved, "offline succeeded but no unpinned block moved"
                assert arena.counters["moved"] == len(moved)
                for b in moved:
                    assert is_hugetlb_head(arena._held[b.offset].pfn)
                return
            tried.append(mem)
        pytest.skip(f"memory blocks {tried} cannot be offlined even unpinned (other "
                    "unmovable pages in them): no migration trigger on this machine")
    finally:
        arena.release(arena.held())
        arena.close()
        budget.close()


def test_pins_are_dropped_on_release(tmp_path: Path, quiet_pool: None) -> None:
    budget = SurplusBudget(str(tmp_path / "run"))
    base = surplus()
    with ar.HugetlbArena(8, budget) as arena:
        blocks = arena.fill(8)
        assert arena.counters["pinned"] == len(blocks) == 8
        arena.release(blocks[:4])
        assert arena.counters["pinned"] == 4
        # A pinned page that is punched would stay allocated: the release frees them now
        # (Linux 6.1 may drop the old buffer table a moment later; 6.18 does it at once).
        deadline = time.monotonic() + 3
        while surplus() != base + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert surplus() == base + 4
        arena.release(arena.held())
    budget.close()
    assert surplus() == base


# --- weak arenas do not report ----------------------------------------------------------


def test_thp_arena_refuses_to_report_unless_allowed() -> None:
    with ar.ThpArena(4, backing="anon") as arena:
        assert "allow_weak_arena" in arena.reporting_refusal
        assert "S2/S3" in arena.reporting_refusal
        arena.allow_weak_arena = True
        assert arena.reporting_refusal == ""
        assert arena.refusal(False) and not arena.refusal(True)
        assert arena.counters["pin_unavailable"] == 1


def test_agent_hello_carries_the_arena_refusal(tmp_path: Path) -> None:
    """An agent without a surplus budget falls back to THP and says in the hello why it
    must not report; allow_weak_arena clears it."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    for extra, refused in (((), True), (("allow_weak_arena=on",), False)):
        host = Host()
        argv = agent_argv(host.path, blocker / "run", *extra)
        proc = subprocess.Popen(argv, env=dict(os.environ, AERATE_ARENA_DIR=""),
                                stderr=subprocess.PIPE, text=True)
        hellos: List[Dict[str, Any]] = []
        try:
            host.sync()
            deadline = time.monotonic() + 30
            while not hellos and time.monotonic() < deadline:
                r, _, _ = select.select([host.master], [], [], 0.5)
                if r:
                    for kind, payload in host.ep.receive(os.read(host.master, 1 << 16)):
                        if kind == "hello":
                            hellos.append(payload)
        finally:
            stop(proc)
            host.close()
        assert hellos, proc.stderr.read() if proc.stderr else ""
        assert hellos[0]["arena"] == "thp"
        assert bool(hellos[0]["arena_refusal"]) is refused, hellos[0]
