"""Issue 15 end to end: the real agent loop (agent/service.py Agent.step, its engine and
GuestEndpoint) against the real host session (host/session.py VmSession) whose discard is
host/punch.py's punch and whose probe answer is host/probe.py's lseek, on one memfd that
stands for the guest's RAM. Both ends run on one simulated clock; the guest kernel is the
scripted buddy model of test_cycle.py, its arena writes zeroes where it takes a block (the
guest kernel clears a page it hands to the arena).

The churn of the issue: aerated blocks are allocated, written and freed again between two
looks, so the engine believes them aerated while the memfd backs them. The probe finds
them, the next pass reports them, the host discards them: nothing stays backed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Dict, List, Optional, Tuple

import pytest
from daemon_sim import GRANULE, SimVm
from test_cycle import BLOCK_PAGES, ScriptedArena, ScriptedKernel

from aerate.agent import protocol as p
from aerate.agent.cycle import PROBE_EVERY, Block, Engine
from aerate.agent.service import Agent
from aerate.host.probe import backed, backed_ranges
from aerate.host.punch import Check, punch
from aerate.host.refusal import Decision
from aerate.host.session import VmSession

pytestmark = pytest.mark.unit
PAGE = 4096


class Kernel(ScriptedKernel):
    def stats(self) -> Dict[str, Any]:
        return {}


class ZeroingArena(ScriptedArena):
    kind = "scripted"
    weakness: Optional[str] = None

    def __init__(self, kernel: ScriptedKernel, fd: int) -> None:
        super().__init__(kernel)
        self.fd = fd

    def refusal(self, allow_weak: bool) -> str:
        return ""

    def fill(self, n: int) -> List[Block]:
        out = super().fill(n)
        for b in out:   # the guest kernel clears what it hands over: backed, zeroes
            os.pwrite(self.fd, bytes(b.nbytes), b.phys_addr)
        return out


class Port:
    def __init__(self) -> None:
        self.out = bytearray()

    def check_host(self) -> bool:
        return True

    def queue(self, data: bytes) -> None:
        self.out += data

    def flush(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def is_backed(v: SimVm, gpa: int) -> bool:
    return backed(v.gmap, {"pc.ram": v.backing}, gpa, GRANULE, GRANULE)


def setup(v: SimVm, blocks: int, guest_protos: Tuple[int, int] = (p.PROTO_MIN, p.PROTO),
          spacing: int = 2) -> Tuple[Agent, VmSession, Port, Clock, Kernel]:
    clock = Clock()
    kernel = Kernel(0)
    kernel.free_list = [BLOCK_PAGES * (10 + spacing * i) for i in range(blocks)]
    for pfn in kernel.free_list:   # free guest memory the host backs (written once)
        os.pwrite(v.fd, b"\0" * PAGE, pfn * PAGE)
    arena = ZeroingArena(kernel, v.fd)
    engine = Engine(kernel, arena, {"reserve_mib": 0, "hwm": 4, "capacity": 8})
    port = Port()
    agent = Agent(port, engine, arena, "test", kernel)  # type: ignore[arg-type]
    agent.endpoint.protos = guest_protos
    agent.endpoint.clock = clock

    def discard(gpa: int, length: int, checks: Sequence[Check]) -> int:
        return punch(v.name, v.gmap, {"pc.ram": v.backing}, gpa, length, GRANULE,
                     lambda: Decision("punch", "test"), checks)

    session = VmSession("vm", GRANULE, lambda g, n: g + n <= v.backing.length, discard,
                        lambda: Decision("punch", "test"), clock=clock,
                        backed=lambda rs: backed_ranges(v.gmap, {"pc.ram": v.backing}, rs,
                                                        GRANULE, 0))
    session.connected()
    return agent, session, port, clock, kernel


def drive(agent: Agent, session: VmSession, port: Port, clock: Clock, seconds: float) -> None:
    """Run both ends for ``seconds`` of the shared clock (what Agent.run and the daemon's
    serve loop do with the bytes and the timers)."""
    end = clock.t + seconds
    while clock.t < end:
        to_guest = session.take_outbox()
        if to_guest:   # Agent._read_port, on the simulated clock
            agent._on_events(agent.endpoint.receive(to_guest, clock.t))
        wait = agent.step(clock.t)
        if port.out:
            session.receive(bytes(port.out))
            port.out.clear()
        due = session.endpoint.keepalive_due()
        if due is not None and due <= 0:
            session.endpoint.keepalive()
        clock.t += min(max(wait, 0.01), 0.25)


def test_a_churned_block_is_found_by_a_probe_and_discarded_again(vm: SimVm) -> None:
    agent, session, port, clock, kernel = setup(vm, 16)
    drive(agent, session, port, clock, 10)
    engine = agent.engine
    assert engine.aerated_bytes() == 16 * GRANULE
    assert not any(is_backed(vm, pfn * PAGE) for pfn in kernel.free_list)
    # Churn: 6 aerated blocks allocated, written and freed between two looks.
    churned = [kernel.free_list.pop() for _ in range(6)]
    for pfn in churned:
        os.pwrite(vm.fd, b"guest data", pfn * PAGE + 5 * PAGE)
    kernel.free_list.extend(churned)
    assert sum(is_backed(vm, pfn * PAGE) for pfn in kernel.free_list) == 6
    drive(agent, session, port, clock, 3 * PROBE_EVERY)
    st = session.status()
    assert engine.counters["probe_stale_blocks"] == 6
    assert st["probes"]["backed_bytes"] == 6 * GRANULE and st["probes"]["unknown"] == 0
    assert not any(is_backed(vm, pfn * PAGE) for pfn in kernel.free_list)
    assert engine.aerated_bytes() == 16 * GRANULE and engine.held_bytes() == 0
    assert "6 stale found by probes" in agent._status_line()
    sent = agent._stats()["engine"]["counters"]
    assert sent["probe_stale_blocks"] == 6 and sent["probes_sent"] >= 1


def test_an_older_agent_never_probes(vm: SimVm) -> None:
    agent, session, port, clock, kernel = setup(vm, 8, guest_protos=(2, 2))
    drive(agent, session, port, clock, 10)
    churned = [kernel.free_list.pop() for _ in range(4)]
    for pfn in churned:
        os.pwrite(vm.fd, b"guest data", pfn * PAGE)
    kernel.free_list.extend(churned)
    drive(agent, session, port, clock, 3 * PROBE_EVERY)
    assert session.endpoint.proto == 2 and session.status()["probes"]["answered"] == 0
    assert agent.engine.counters["probes_sent"] == 0
    assert sum(is_backed(vm, pfn * PAGE) for pfn in kernel.free_list) == 4  # issue 15 stays


def test_one_written_page_among_adjacent_aerated_blocks_turns_only_its_block_raw(
        vm: SimVm) -> None:
    """Review finding: the probe went out coalesced (one range for a run of adjacent
    blocks), so one backed page turned the whole run raw. Through the wire, only the
    block holding it is found stale and reported again."""
    agent, session, port, clock, kernel = setup(vm, 8, spacing=1)
    drive(agent, session, port, clock, 10)
    engine = agent.engine
    assert engine.aerated_bytes() == 8 * GRANULE
    pfn = kernel.free_list[3]
    os.pwrite(vm.fd, b"guest data", pfn * PAGE + 7 * PAGE)
    drive(agent, session, port, clock, 3 * PROBE_EVERY)
    assert engine.counters["probe_stale_blocks"] == 1, engine.counters
    assert session.status()["probes"]["backed_bytes"] == GRANULE
    # The other seven keep their belief (one raw unit is under hwm 4: no pass for it).
    assert engine.aerated_bytes() == 7 * GRANULE and pfn not in engine.aerated
