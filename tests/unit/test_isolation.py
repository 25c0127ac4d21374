"""S8: one VM's stuck libvirt never delays another VM's acks; a timeout refuses that VM.

The real daemon code paths (Daemon, VmRunner, VmWorker, VmSession, HostEndpoint, the permit
cache, the memory map checks and host/punch.py on a memfd) with a MOCK of libvirtd only
(daemon_sim.FakeLibvirt: libvirtd cannot be made slow for one VM on demand here). Guests are
the real GuestEndpoint over unix sockets the daemon connects to, as to QEMU's chardev.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_sim import (
    FakeLibvirt,
    SimGuest,
    make_private,
    report_and_wait,
    stop_daemon,
    until,
)
from daemon_sim import run_simulated as run

from aerate.host import journal
from aerate.host.refusal import JobInfo

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_a_vm_whose_domain_xml_sleeps_10s_does_not_delay_another_vms_ack(
        tmp_path: Path) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        conn.slow[("A", "domain_xml")] = 10.0
        daemon.start_runner("B")
        await until(lambda: guests["B"].sessions > 0, 5, "B's session")
        # Timed from before A starts: were A's 10 s call on the loop, it would be in here.
        t0 = time.monotonic()
        daemon.start_runner("A")
        await asyncio.sleep(0.05)  # A is now inside its 10 s domain_xml
        await report_and_wait(daemon, guests["B"], 5)
        took = time.monotonic() - t0
        assert took < 0.5, f"B's report took {took:.3f} s to be acked"
        _, discarded, refused, _ = guests["B"].acks[-1]
        assert discarded == 4 * (2 << 20) and refused == 0, guests["B"].acks
        assert daemon.runners["A"].state.value == "preparing"
        # The loop stays responsive while A's call sleeps: status answers at once.
        t0 = time.monotonic()
        status = await daemon.handle({"cmd": "status"})
        assert time.monotonic() - t0 < 0.1 and len(status["vms"]) == 2

    run(tmp_path, body)


def test_a_balloon_vm_whose_balloon_info_sleeps_10s_does_not_delay_another_vms_ack(
        tmp_path: Path) -> None:
    """The balloon controller's libvirt calls go through the VM's own worker: P's balloon
    query hanging (libvirtd waiting on a stuck QEMU monitor) stalls P's controller only."""
    from aerate.host import daemon as daemon_mod

    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        make_private(conn, guests, "P")
        conn.slow[("P", "balloon_info")] = 10.0
        daemon.start_runner("A")
        await until(lambda: guests["A"].sessions > 0, 5, "A's session")
        daemon.start_runner("P")
        runner = daemon.runners["P"]
        await until(lambda: runner.cache.last().action == "balloon", 5, "P's balloon decision")
        await until(lambda: conn.calls.get("balloon_info", 0) > 0, 5, "P's balloon_info")
        await asyncio.sleep(0.05)  # P's controller is now inside its 10 s call
        took = await report_and_wait(daemon, guests["A"], 5)
        assert took < 0.5, f"A's report took {took:.3f} s to be acked"
        _, discarded, refused, _ = guests["A"].acks[-1]
        assert discarded == 4 * (2 << 20) and refused == 0, guests["A"].acks
        assert conn.balloon_sets == []  # P's tick has not come back
        # status waits for each VM's fresh backing figure, in its worker, at most
        # STATUS_READ_TIMEOUT: P's stays its older snapshot (it waited for the whole
        # balloon query, CALL_TIMEOUT, before that wait counted against its own).
        t0 = time.monotonic()
        status = await daemon.handle({"cmd": "status"})
        took = time.monotonic() - t0
        assert took < daemon_mod.STATUS_READ_TIMEOUT + 0.5 and len(status["vms"]) == 2, took
        assert daemon.runners["P"].worker.hung == ""  # the read gave up; nothing new hangs

    run(tmp_path, body, names=("A", "P"))


def test_a_busy_guest_gets_keepalive_tokens_and_an_idle_one_none(tmp_path: Path) -> None:
    """The daemon's keepalive timer (host/daemon.py _keepalive): after a report the guest
    keeps getting fresh lease tokens (every KEEPALIVE_SHARE of the lease) without sending
    anything, so its next reports need no need-token; a guest that never reported gets no
    keepalive at all."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        for n in ("A", "B"):
            daemon.start_runner(n)
            await until(lambda n=n: guests[n].sessions > 0, 5, f"{n}'s session")
        await report_and_wait(daemon, guests["A"], 5)
        a, b = guests["A"].ep, guests["B"].ep
        assert a is not None and b is not None and a.token and b.token
        after_ack, idle = a.token.token, b.token.token
        await asyncio.sleep(1.6)   # lease 2 s: a keepalive every 0.5 s
        assert a.token.token >= after_ack + 2 and a.token_fresh()
        assert b.token.token == idle

    run(tmp_path, body)


async def _set(event: asyncio.Event) -> None:
    event.set()


def test_a_slow_large_discard_of_one_vm_does_not_delay_another_vms_ack(
        tmp_path: Path) -> None:
    """S8: small batches are discarded on the loop thread (host/daemon.py _run_job), but a
    batch over INLINE_DISCARD_BYTES runs on its VM's own thread: here A's punch of a 16 MiB
    batch takes 2 s (a fallocate freeing gigabytes), and B's report is acked meanwhile."""
    from aerate.host import daemon as daemon_mod

    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        real = daemon.punch
        slow = asyncio.Event()

        def punch(vm: str, *args: Any, **kw: Any) -> int:
            done = int(real(vm, *args, **kw))
            if vm == "A" and not slow.is_set():
                # The fallocate of the first range is slow; the lease window closes
                # meanwhile, so the rest of A's batch is refused (cut short): realistic.
                asyncio.run_coroutine_threadsafe(_set(slow), loop)
                time.sleep(2.0)
            return done

        loop = asyncio.get_running_loop()
        daemon.punch = punch
        guests["A"].blocks = 8   # 16 MiB: over the inline bound
        assert 8 * (2 << 20) > daemon_mod.INLINE_DISCARD_BYTES >= 4 * (2 << 20)
        for n in ("A", "B"):
            daemon.start_runner(n)
            await until(lambda n=n: guests[n].sessions > 0, 5, f"{n}'s session")
        a = asyncio.get_running_loop().create_task(report_and_wait(daemon, guests["A"], 10))
        await asyncio.wait_for(slow.wait(), 5)
        took = await report_and_wait(daemon, guests["B"], 5)
        assert took < 0.5, f"B's report took {took:.3f} s to be acked"
        assert not a.done()
        assert await a > 1.5
        assert guests["A"].acks[-1][1] >= 2 << 20   # what was punched before the stall

    run(tmp_path, body)


@pytest.mark.parametrize("swap_total, inline", [(0, True), (1 << 30, False), (None, False)])
def test_a_small_discard_runs_on_the_loop_only_where_its_reads_cannot_wait_on_a_disk(
        tmp_path: Path, swap_total: int | None, inline: bool) -> None:
    """S8: the content check reads every reported granule before its punch. On memfd RAM
    of a host with swap a read may wait on the swap device, so even a small batch is
    discarded on the VM's own thread then (host/backing.py reads_stay_in_memory); with no
    swap it stays on the loop (the cheaper path at a thousand guests). An unknown swap
    figure (no sample yet) counts as swap."""
    from aerate.host import pressure

    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        daemon.host_memory = pressure.HostMemory(8 << 30, 16 << 30, None, swap_total)
        real = daemon.punch
        threads: list[str] = []

        def punch(vm: str, *args: Any, **kw: Any) -> int:
            threads.append(threading.current_thread().name)
            return int(real(vm, *args, **kw))

        daemon.punch = punch
        daemon.start_runner("A")
        await report_and_wait(daemon, guests["A"], 5)   # 4 x 2 MiB: within the inline bound
        assert threads and all(t == threading.main_thread().name for t in threads) is inline, \
            threads
        if not inline:
            assert all(t.startswith("discard:A") for t in threads), threads
        assert guests["A"].acks[-1][1] == 4 * (2 << 20)

    run(tmp_path, body, names=("A",))


def test_reads_stay_in_memory_only_for_hugetlbfs_or_shmem_without_swap() -> None:
    from aerate.host.backing import Backing, BackingKind, reads_stay_in_memory

    def b(fs: str) -> Backing:
        return Backing(vm_pid=1, block_name="pc.ram", kind=BackingKind.FILE_SHARED,
                       reason="test", fs_type=fs)

    assert reads_stay_in_memory([b("hugetlbfs")], 1 << 30)
    assert reads_stay_in_memory([b("hugetlbfs"), b("tmpfs")], 0)
    assert not reads_stay_in_memory([b("hugetlbfs"), b("tmpfs")], 1 << 30)
    assert not reads_stay_in_memory([b("tmpfs")], None)   # no swap sample yet
    assert not reads_stay_in_memory([b("ext4")], 0)        # a disk file: page cache misses
    assert not reads_stay_in_memory([b("")], 0)            # not proven
    assert not reads_stay_in_memory([], 0)


def test_a_timed_out_libvirt_call_refuses_that_vm_with_the_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        conn.slow[("A", "domain_xml")] = 10.0
        daemon.start_runner("A")
        runner = daemon.runners["A"]
        await until(lambda: runner.state.value == "retrying", 5, "A's call to time out")
        assert runner.reason == "libvirt call domain_xml timed out after 0.5 s"
        status = await daemon.handle({"cmd": "status"})
        (a,) = status["vms"]
        assert a["reason"] == runner.reason and a["libvirt_calls"]["hung"] == "domain_xml"

    with caplog.at_level(logging.INFO):
        run(tmp_path, body, names=("A",), call_timeout=0.5)
    # The journal's fields (host/journal.py): `journalctl VM=A` finds the session's start
    # and the refusal, each with its event's MESSAGE_ID.
    fields = {(r.getMessage(), r.__dict__.get("VM"), r.__dict__.get("MESSAGE_ID"), r.levelno)
              for r in caplog.records}
    assert ("A: serving", "A", journal.EVENTS["session"], logging.INFO) in fields
    assert ("VM A: libvirt call domain_xml timed out after 0.5 s; refusing it until libvirt "
            "answers", "A", journal.EVENTS["refusal"], logging.WARNING) in fields


@pytest.mark.parametrize("first", ["refresh", "explain"])
def test_a_hung_vm_holds_one_libvirt_call_however_often_it_is_asked(tmp_path: Path,
                                                                    first: str) -> None:
    """libvirtd serves a few calls of one connection at once (host/daemon.py "libvirt's
    request limit"; three stopped QEMUs with two calls each stalled a healthy VM's call 29 s
    on this host's libvirtd): a VM whose calls hang must hold one, whatever asks for it
    (the background refresh every 50 ms, explain, the next tick), and be refused with why."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        for name in ("A", "B"):
            daemon.start_runner(name)
            runner = daemon.runners[name]
            await until(lambda r=runner: r.state.value == "running", 5, name)
        conn.slow[("A", "*")] = 30.0
        if first == "refresh":   # the refresh (every 50 ms) is the first call to hang
            await until(lambda: conn.inflight.get("A", 0) == 1, 2, "A's refresh to hang")
            # status reads A's backing from QEMU's /proc, not from libvirt: it need not
            # wait for A's hung refresh (its worker has no call of its own in libvirt).
            t0 = time.monotonic()
            await daemon.handle({"cmd": "status"})
            assert time.monotonic() - t0 < 0.5
        asks = [asyncio.create_task(daemon.handle({"cmd": "explain", "vm": "A"}))
                for _ in range(3)]
        for _ in range(12):
            await asyncio.sleep(0.1)
            asks.append(asyncio.create_task(daemon.handle({"cmd": "explain", "vm": "A"})))
        await asyncio.gather(*asks)
        assert conn.most_inflight["A"] == 1, conn.most_inflight
        a = daemon.runners["A"].permit()
        assert a.action == "refuse" and ("hung" in a.reason or "timed out" in a.reason), a
        assert daemon.runners["B"].permit().action == "punch"  # B's facts stay fresh

    run(tmp_path, body, call_timeout=0.3, permit_refresh=0.05, permit_max_age=1.0)


def test_a_vm_under_a_domain_job_gets_no_monitor_call(tmp_path: Path) -> None:
    """A domain job (snapshot, save, migration) refuses the VM whatever QEMU says, and it
    holds libvirt's state-change lock, so a QMP call would wait up to 30 s in one of
    libvirtd's few request slots (host/refusal.py job_refusal): while the job runs the
    refreshes ask libvirt's job state only; after it, QEMU is asked again and the VM is
    served."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        daemon.start_runner("A")
        runner = daemon.runners["A"]
        await until(lambda: runner.permit().action == "punch", 5, "A served")
        conn.job["A"] = JobInfo(active=True, operation="snapshot")
        await until(lambda: "snapshot job" in runner.permit().reason, 2, "the job refusal")
        qmp, jobs = conn.calls.get("qmp", 0), conn.calls["job_info"]
        await asyncio.sleep(0.5)    # about ten refreshes
        assert conn.calls["job_info"] - jobs >= 5 and conn.calls.get("qmp", 0) == qmp
        assert runner.permit().action == "refuse"
        del conn.job["A"]
        await until(lambda: runner.permit().action == "punch", 2, "A served after the job")
        assert conn.calls["qmp"] > qmp

    run(tmp_path, body, names=("A",), permit_refresh=0.05)


def test_a_hung_job_query_refuses_the_next_batch_and_status_says_why(tmp_path: Path) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        daemon.start_runner("A")
        await until(lambda: guests["A"].sessions > 0, 5, "A's session")
        await report_and_wait(daemon, guests["A"], 2)
        assert guests["A"].acks[-1][1] > 0  # punched while libvirt answers
        conn.slow[("A", "job_info")] = 30.0
        runner = daemon.runners["A"]
        await until(lambda: runner.permit().action == "refuse", 5, "the permit to refuse")
        await report_and_wait(daemon, guests["A"], 2)
        _, discarded, refused, _ = guests["A"].acks[-1]
        assert discarded == 0 and refused > 0
        # (The batch itself may also be refused by its lease on a loaded machine; what
        # matters is that nothing was discarded and the permit says why.)
        assert "timed out" in runner.permit().reason, runner.permit()
        status = await daemon.handle({"cmd": "status"})
        assert "timed out" in status["vms"][0]["permit"]["reason"]

    run(tmp_path, body, names=("A",), call_timeout=0.3, permit_refresh=0.1,
        permit_max_age=1.0)


def test_a_permit_expires_when_the_refresh_is_late_even_without_a_timeout(
        tmp_path: Path) -> None:
    """Refresh calls that hang longer than the PUNCH may live (timeout > max age): the
    permit turns to REFUSE at max age, not at the timeout."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        daemon.start_runner("A")
        await until(lambda: guests["A"].sessions > 0, 5, "A's session")
        runner = daemon.runners["A"]
        # A loaded machine can let one 0.5 s permit lapse between refreshes: wait for one.
        await until(lambda: runner.permit().action == "punch", 5, "a PUNCH permit")
        conn.slow[("A", "job_info")] = 30.0
        t0 = time.monotonic()
        await until(lambda: runner.permit().action == "refuse", 5, "the permit to expire")
        assert time.monotonic() - t0 < 1.5
        assert "old" in runner.permit().reason

    run(tmp_path, body, names=("A",), call_timeout=20.0, permit_refresh=0.1,
        permit_max_age=0.5)


def test_a_batch_beyond_the_discard_budget_is_refused_counted_and_shown(
        tmp_path: Path) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        daemon.config.defaults.update({"discard_batch_mib": 4})
        daemon.start_runner("A")
        await until(lambda: guests["A"].sessions > 0, 5, "A's session")
        await report_and_wait(daemon, guests["A"], 2)  # 4 ranges of 2 MiB: 8 MiB
        _, discarded, refused, _ = guests["A"].acks[-1]
        assert (discarded, refused) == (4 << 20, 4 << 20)
        status = (await daemon.handle({"cmd": "status"}))["vms"][0]
        assert status["budget"]["bites"] == 1
        assert "discard_batch_mib" in status["budget"]["reason"]
        assert status["refused_bytes"] == 4 << 20

    run(tmp_path, body, names=("A",))


def test_a_reported_page_that_is_not_zero_is_not_discarded_and_status_says_why(
        tmp_path: Path) -> None:
    """The content check through the whole daemon, on the VM's real memfd: a reported
    block holding data (the guest had it back when the report was read) stays, with the
    blocks behind it in the batch; the ones before it go; status and explain count it."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        daemon.start_runner("A")
        await until(lambda: guests["A"].sessions > 0, 5, "A's session")
        fd = conn.vms["A"].fd
        g = 2 << 20
        for off in range(0, 8 * g, 4096):
            os.pwrite(fd, b"\0", off)    # backed zeroes, as a page the agent took
        os.pwrite(fd, b"data", 2 * g + 4096)  # the 2nd range of the next report
        await report_and_wait(daemon, guests["A"], 5)   # ranges 0, 2, 4, 6 (x 2 MiB)
        _, discarded, refused, _ = guests["A"].acks[-1]
        assert (discarded, refused) == (g, 3 * g)
        assert os.pread(fd, 4, 2 * g + 4096) == b"data"
        assert os.lseek(fd, 4 * g, os.SEEK_DATA) == 4 * g   # behind it: not discarded
        status = (await daemon.handle({"cmd": "status"}))["vms"][0]
        assert status["content_refused_batches"] == 1
        assert f"gpa {2 * g:#x} does not read as zeroes" in status["last_refusal"]

    run(tmp_path, body, names=("A",))


def test_an_input_flood_ends_the_session_within_the_budget(tmp_path: Path) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        daemon.config.defaults.update({"input_kib_s": 64})  # burst: 256 KiB
        daemon.start_runner("A")
        await until(lambda: guests["A"].sessions > 0, 5, "A's session")
        runner = daemon.runners["A"]
        await until(lambda: runner.state.value == "running", 5, "A running")
        assert guests["A"].writer is not None
        guests["A"].writer.write(b"\xff" * (10 << 20))
        await until(lambda: runner.state.value == "retrying", 10, "the flood to be cut off")
        assert "input flood" in runner.reason and runner.input_budget.floods == 1
        status = (await daemon.handle({"cmd": "status"}))["vms"][0]
        assert "input flood" in status["last_error"] and status["input_floods"] == 1

    run(tmp_path, body, names=("A",))


def test_a_squeezed_balloon_left_by_a_dead_daemon_is_restored_at_start(
        tmp_path: Path) -> None:
    """The first daemon dies without releasing anything (as under SIGKILL: its release
    path is disabled); the second one, whatever it decides for the VM now (here: the
    domain lost its aerate channel), puts the balloon back to the saved size."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        make_private(conn, guests, "P")
        daemon.start_runner("P")
        runner = daemon.runners["P"]
        await until(lambda: guests["P"].ep is not None and runner.state.value == "running",
                    5, "P running")
        assert guests["P"].ep is not None and guests["P"].writer is not None
        guests["P"].send_stats(guests["P"].ep, guests["P"].writer)
        await until(lambda: conn.balloon["P"][0] < 4096 << 20, 5, "the first inflate")
        rec = daemon.balloons.load("P")
        assert rec is not None and rec.target_bytes == 4096 << 20
        squeezed = conn.balloon["P"][0]

        async def no_release(why: str) -> None:
            return None

        runner.balloon_release = no_release  # the SIGKILL stand-in: nothing runs at death
        daemon.stop_runner("P", "killed")
        await asyncio.gather(runner.task, return_exceptions=True)
        assert conn.balloon["P"][0] == squeezed and daemon.balloons.load("P") is not None

        conn.no_channel.add("P")
        from daemon_sim import new_daemon as again
        second = again(conn, daemon.run_dir)
        second.start_runner("P")
        await until(lambda: conn.balloon["P"][0] == 4096 << 20, 5, "the restore")
        await until(lambda: second.balloons.load("P") is None, 5, "the record's removal")
        await until(lambda: second.runners["P"].state.value == "no-channel", 5, "no-channel")
        await stop_daemon(second, conn)

    run(tmp_path, body, names=("P",))


def test_a_record_of_a_vm_this_daemon_does_not_serve_is_restored_too(tmp_path: Path) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        make_private(conn, guests, "P")
        conn.balloon["P"] = (3000 << 20, 4096 << 20)
        daemon.balloons.save("P", 4096 << 20, 4096 << 20)
        daemon.balloons.save("gone", 1 << 30, 1 << 30)  # a VM that no longer runs
        daemon.only = ("other-*",)
        await daemon.resync()
        await until(lambda: conn.balloon["P"][0] == 4096 << 20, 5, "the restore")
        await until(lambda: daemon.balloons.all()[0] == [], 5, "both records removed")
        assert "P" not in daemon.runners

    run(tmp_path, body, names=("P",))


def test_no_inflate_without_autodeflate(tmp_path: Path) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        make_private(conn, guests, "P")
        conn.no_autodeflate.add("P")
        daemon.start_runner("P")
        runner = daemon.runners["P"]
        await until(lambda: guests["P"].ep is not None and runner.state.value == "running",
                    5, "P running")
        assert guests["P"].ep is not None and guests["P"].writer is not None
        guests["P"].send_stats(guests["P"].ep, guests["P"].writer)
        await until(lambda: "autodeflate" in runner.balloon_reason, 5, "the refusal")
        assert conn.balloon_sets == [] and daemon.balloons.load("P") is None

    run(tmp_path, body, names=("P",))


def test_watchdog_pings_and_status_lines_come_from_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    addr = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    got: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except BlockingIOError:
                return got

    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        pinger = asyncio.get_running_loop().create_task(daemon._systemd_loop(0.2))
        try:
            await until(lambda: "WATCHDOG=1" in drain(), 2, "a watchdog ping")
            assert any(m.startswith("STATUS=0 VMs") for m in got), got
            daemon.start_runner("A")
            await until(lambda: daemon.runners["A"].state.value == "running", 5, "A running")
            await report_and_wait(daemon, guests["A"], 2)
            await until(lambda: any("1 running" in m and "8 MiB discarded" in m
                                    and "libvirt up" in m for m in drain()), 3,
                        "a STATUS= line with the running VM and the bytes discarded")
            t0 = time.monotonic()
            before = sum(m == "WATCHDOG=1" for m in drain())
            await until(lambda: sum(m == "WATCHDOG=1" for m in drain()) >= before + 5, 2,
                        "five more pings")
            assert time.monotonic() - t0 < 1.0  # every WatchdogSec/2 = 0.1 s
        finally:
            pinger.cancel()
            sock.close()

    run(tmp_path, body, names=("A",))


def test_status_reads_a_fresh_backing_figure_off_the_loop(tmp_path: Path) -> None:
    """status answers with the backing as it is now (read in the VM's worker), not with the
    last periodic snapshot: memory the guest just touched shows at once."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest]) -> None:
        daemon.start_runner("A")
        runner = daemon.runners["A"]
        await until(lambda: runner.state.value == "running", 5, "A running")
        before = (await daemon.handle({"cmd": "status"}))["vms"][0]["backing_allocated_bytes"]
        os.pwrite(conn.vms["A"].fd, b"x" * (8 << 20), 0)  # the guest touches 8 MiB
        after = (await daemon.handle({"cmd": "status"}))["vms"][0]
        assert after["backing_allocated_bytes"] - before == 8 << 20, after
        assert after["backing_allocated_age_s"] < 0.5

    run(tmp_path, body, names=("A",))
