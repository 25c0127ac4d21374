"""Free first (agent/freefirst.py, agent/memreclaim.py): the controller on synthetic traces,
the actuator and the stage on a fake /proc + /sys/fs/cgroup tree with a scripted kernel."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import pytest

from aerate.agent import capabilities, memreclaim
from aerate.agent import settings as table
from aerate.agent.freefirst import (
    COOLDOWN_S,
    DROP_EVERY_S,
    EXHAUSTED_REST_S,
    MAX_DT_S,
    MIN_STEP,
    SHORT_LIMIT,
    Controller,
    Limits,
    Sample,
    Stage,
    State,
    compaction_reason,
)
from aerate.agent.procfs import parse_buddyinfo

pytestmark = pytest.mark.unit
MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096


def limits(**over: Any) -> Limits:
    return Limits.from_settings(table.layered([{"free_first": True, **over}]))


class Guest:
    """A trace generator: a guest whose page cache shrinks by what is reclaimed; PSI and
    refault rate (pages/s) scripted per second."""

    def __init__(self, cache: int = 4 * GiB, overshoot: float = 0.0) -> None:
        self.cache = cache
        #: the kernel reclaims this share more than asked (measured on 6.1: about 6 %)
        self.overshoot = overshoot
        self.refaults = 0
        self.t = 0.0

    def sample(self, psi: Optional[float] = 0.0, refault_pages_s: int = 0,
               dt: float = 1.0) -> Sample:
        self.t += dt
        self.refaults += int(refault_pages_s * dt)
        return Sample(self.t, psi, self.refaults, self.cache + 512 * MiB, self.cache)


def run(c: Controller, g: Guest, lim: Limits, seconds: int, psi: Optional[float] = 0.0,
        refault_pages_s: int = 0) -> List[Tuple[int, State]]:
    """Feed ``seconds`` samples; the kernel reclaims every step in full."""
    out = []
    for _ in range(seconds):
        d = c.decide(g.sample(psi, refault_pages_s), lim)
        if d.reclaim_bytes:
            g.cache -= int(d.reclaim_bytes * (1 + g.overshoot))
            c.outcome(d.reclaim_bytes, True, g.t)
        out.append((d.reclaim_bytes, d.state))
    return out


# ---------------------------------------------------------------- controller on traces


def test_probes_slowly_and_grows_while_quiet_up_to_the_budget() -> None:
    c, g, lim = Controller(), Guest(), limits(free_first_mib_s=32)
    steps = run(c, g, lim, 12)
    assert steps[0] == (0, State.WAITING)           # first sample: no refault rate yet
    taken = [n for n, _ in steps[1:]]
    assert taken[:6] == [1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB, 32 * MiB]
    assert set(taken[6:]) == {32 * MiB}              # capped by the MiB/s budget
    assert all(s is State.PROBING for _, s in steps[1:])
    assert "quiet" in c.reason


def test_backs_off_at_once_on_a_psi_spike_and_probes_again_from_the_start() -> None:
    c, g, lim = Controller(), Guest(), limits(free_first_mib_s=64)
    run(c, g, lim, 8)
    assert c.step > 16 * MiB
    d = c.decide(g.sample(psi=0.5), lim)
    assert d.reclaim_bytes == 0 and d.state is State.BACKED_OFF
    assert "0.50% > ceiling 0.20%" in d.reason and c.step == MIN_STEP
    # Quiet again: a cool-down first, then the smallest step.
    after = run(c, g, lim, int(COOLDOWN_S) + 2)
    assert [n for n, _ in after[:int(COOLDOWN_S)]] == [0] * int(COOLDOWN_S)
    assert {st for _, st in after[:int(COOLDOWN_S)]} == {State.WAITING}
    assert after[-1][1] is State.PROBING
    first = next(n for n, _ in after if n)
    assert first == MIN_STEP


def test_psi_just_under_the_ceiling_still_probes_and_unreadable_psi_stops() -> None:
    c, g, lim = Controller(), Guest(), limits()
    run(c, g, lim, 2, psi=0.19)
    assert c.state is State.PROBING
    d = c.decide(g.sample(psi=None), lim)
    assert d.reclaim_bytes == 0 and d.state is State.BACKED_OFF and "unreadable" in d.reason


def test_never_reclaims_below_the_cache_floor_though_the_kernel_takes_more_than_asked() -> None:
    """Measured in the Debian 12 guest: a step of the whole headroom left 112 MiB of a
    128 MiB floor. Here the kernel takes 25 % more than asked, and the floor holds."""
    c, g = Controller(), Guest(cache=300 * MiB, overshoot=0.25)
    lim = limits(free_first_mib_s=64, free_first_cache_floor_mib=256)
    steps = run(c, g, lim, 30)
    assert 256 * MiB <= g.cache < 256 * MiB + 2 * MIN_STEP, g.cache / MiB
    assert steps[-1] == (0, State.AT_FLOOR) and "at its floor 256 MiB" in c.reason


def test_respects_the_budget_over_time_and_after_a_long_gap() -> None:
    c, g, lim = Controller(), Guest(), limits(free_first_mib_s=8)
    steps = run(c, g, lim, 60)
    assert sum(n for n, _ in steps) <= 8 * MiB * 60
    assert max(n for n, _ in steps) <= 8 * MiB
    d = c.decide(g.sample(dt=300.0), lim)      # the agent slept: no 300 s of budget banked
    assert 0 < d.reclaim_bytes <= 8 * MiB * MAX_DT_S


def test_refaults_slow_it() -> None:
    c, g, lim = Controller(), Guest(), limits(free_first_mib_s=16)
    run(c, g, lim, 6)
    grown = c.step
    # 2 MiB/s of refaults: over 10 % of a 16 MiB/s budget.
    steps = run(c, g, lim, 3, refault_pages_s=2 * MiB // PAGE)
    assert all(s is State.SLOWED for _, s in steps)
    assert c.step == max(MIN_STEP, grown // 8) and "refaults 2.00 MiB/s" in c.reason
    assert [n for n, _ in steps] == sorted((n for n, _ in steps), reverse=True)
    # Refaults under the noise floor do not.
    run(c, g, lim, 2, refault_pages_s=16)
    assert c.state is State.PROBING
    assert c.refaults_since_start() == 3 * 2 * MiB // PAGE + 2 * 16


def test_short_writes_halve_the_step_then_rest() -> None:
    c, g, lim = Controller(), Guest(), limits(free_first_mib_s=64)
    run(c, g, lim, 6)
    step = c.step
    for _ in range(SHORT_LIMIT):
        d = c.decide(g.sample(), lim)
        assert d.reclaim_bytes
        c.outcome(d.reclaim_bytes, False, g.t)
    assert c.step == max(MIN_STEP, step >> SHORT_LIMIT)
    assert c.state is State.EXHAUSTED and "EAGAIN" in c.reason
    rest = run(c, g, lim, int(EXHAUSTED_REST_S) - 1)
    assert {n for n, _ in rest} == {0} and {s for _, s in rest} == {State.EXHAUSTED}
    assert run(c, g, lim, 2)[-1][0] > 0


#: A recorded-style trace, one look a second: PSI some avg10 (%), workingset refaults
#: (pages, cumulative), MemAvailable and file LRU (MiB), and the state the controller must
#: be in after it (floor 256 MiB, budget 16 MiB/s, ceiling 0.2 %).
TRACE = """
  t   psi  refaults avail cache state
  0  0.00      1000  2000  1000 waiting
  1  0.00      1000  2000  1000 probing
  2  0.05      1010  2000   999 probing
  3  0.10      1200  2000   997 probing
  4  0.00      1900  2000   993 slowed
  5  0.00      1900  2000   990 probing
  6  0.60      1900  1990   985 backed_off
  7  0.40      1900  1990   985 backed_off
  8  0.15      1900  1990   985 waiting
 18  0.10      1900  1990   985 probing
 19  0.00      1900  1990   260 probing
 20  0.00      1900  1990   257 at_floor
"""


def test_a_trace_gives_the_exact_sequence_of_states() -> None:
    c, lim = Controller(), limits(free_first_mib_s=16)
    states, steps = [], []
    for line in TRACE.strip().splitlines()[1:]:
        t, psi, refaults, avail, cache, _ = line.split()
        d = c.decide(Sample(float(t), float(psi), int(refaults), int(avail) * MiB,
                            int(cache) * MiB), lim)
        if d.reclaim_bytes:
            c.outcome(d.reclaim_bytes, True, float(t))
        states.append(d.state.value)
        steps.append(d.reclaim_bytes // (256 << 10))
    assert states == [line.split()[-1] for line in TRACE.strip().splitlines()[1:]]
    # In 256 KiB units: 1-2-4 MiB while quiet (190 refaults/s = 0.7 MiB/s is under a tenth
    # of the budget), the grown 8 MiB halved on 700 refaults/s (2.7 MiB/s) and not grown,
    # none under pressure or cooling down, 1 MiB again after it, the grown 2 MiB (half of the
    # 4 MiB above the floor, at most), and none within 2 MiB of the floor.
    assert steps == [0, 4, 8, 16, 16, 16, 0, 0, 0, 4, 8, 0]


def test_compaction_only_when_free_memory_is_plentiful_but_fragmented() -> None:
    def zones(order0_pages: int, order9: int) -> Any:
        counts = [0] * 11
        counts[0], counts[9] = order0_pages, order9
        return parse_buddyinfo("Node 0, zone   Normal " + " ".join(map(str, counts)) + "\n")

    assert "only 0 MiB of it in order-9" in compaction_reason(zones(512 * MiB // PAGE, 0))
    assert compaction_reason(zones(512 * MiB // PAGE, 512)) == ""      # 1 GiB in order 9
    assert compaction_reason(zones(100 * MiB // PAGE, 0)) == ""        # too little free


# ---------------------------------------------------------------- actuator and stage


class FakeKernel:
    """The write side of the guest kernel: records writes, answers as 6.1 or 6.11+ does."""

    def __init__(self, swappiness_key: bool = True, short: int = 0,
                 fail: Optional[int] = None) -> None:
        self.swappiness_key, self.short, self.fail = swappiness_key, short, fail
        self.writes: List[Tuple[str, str]] = []

    def __call__(self, path: str, text: str) -> None:
        self.writes.append((Path(path).name, text))
        if self.fail is not None:
            raise OSError(self.fail, "scripted")
        if path.endswith("memory.reclaim"):
            words = text.split()
            if len(words) > 1 and not self.swappiness_key:
                raise OSError(errno.EINVAL, "Invalid argument")
            if self.short:
                self.short -= 1
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")


def tree(tmp: Path, cgroup: str = "v2", swap_kib: int = 0, cache_kib: int = 4 << 20,
         psi: float = 0.0, buddy: str = "0 0 0 0 0 0 0 0 0 0 400") -> Path:
    """A fake root: /proc files, and /sys/fs/cgroup as cgroup v2, v1 or v2 before 5.19."""
    (tmp / "proc/pressure").mkdir(parents=True, exist_ok=True)
    (tmp / "proc/sys/vm").mkdir(parents=True, exist_ok=True)
    (tmp / "proc/pressure/memory").write_text(
        "some avg10=%.2f avg60=0.00 avg300=0.00 total=1\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n" % psi)
    (tmp / "proc/vmstat").write_text("nr_free_pages 1000\nworkingset_refault_anon 0\n"
                                     "workingset_refault_file 10\n")
    (tmp / "proc/meminfo").write_text(
        "MemTotal: 8388608 kB\nMemFree: 1048576 kB\nMemAvailable: 5242880 kB\n"
        "Active(file): %d kB\nInactive(file): %d kB\nSwapTotal: %d kB\n"
        % (cache_kib // 2, cache_kib // 2, swap_kib))
    (tmp / "proc/buddyinfo").write_text("Node 0, zone   Normal %s\n" % buddy)
    for knob in ("compact_memory", "drop_caches"):
        (tmp / "proc/sys/vm" / knob).write_text("")
    cg = tmp / "sys/fs/cgroup"
    if cgroup == "v1":
        (cg / "memory").mkdir(parents=True)
        (cg / "memory/memory.usage_in_bytes").write_text("0\n")
    else:
        cg.mkdir(parents=True)
        (cg / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        if cgroup == "v2":
            (cg / "memory.reclaim").write_text("")
    return tmp


def stage(root: Path, kernel: Optional[FakeKernel] = None,
          **cfg: Any) -> Tuple[Stage, Dict[str, Any], FakeKernel]:
    values = table.layered([{"free_first": True, **cfg}])
    k = kernel or FakeKernel()
    return Stage(values, str(root), memreclaim.Reclaimer(str(root), k)), values, k


def ticks(s: Stage, n: int, start: float = 100.0) -> None:
    for i in range(n):
        s.tick(start + i)


def reclaim_writes(k: FakeKernel) -> List[str]:
    return [text for name, text in k.writes if name == "memory.reclaim"]


def test_writes_memory_reclaim_with_the_step_and_swappiness_zero(tmp_path: Path) -> None:
    s, _, k = stage(tree(tmp_path))
    ticks(s, 4)
    assert reclaim_writes(k) == ["%d swappiness=0" % (MIN_STEP << i) for i in range(3)]
    st = s.status()
    assert st["state"] == "probing" and st["reclaimed_bytes"] == 7 * MiB
    assert st["swappiness_key"] is True and st["psi_some_avg10"] == 0.0
    assert st["file_cache_bytes"] == 4 * GiB and st["refaults_since_start"] == 0


def test_the_real_writer_writes_the_bytes_into_the_file(tmp_path: Path) -> None:
    root = tree(tmp_path)
    values = table.layered([{"free_first": True}])
    s = Stage(values, str(root))
    ticks(s, 2)
    assert (root / "sys/fs/cgroup/memory.reclaim").read_text() == "%d swappiness=0" % MIN_STEP


def test_einval_on_swappiness_is_retried_without_it_where_no_swap(tmp_path: Path) -> None:
    s, _, k = stage(tree(tmp_path), FakeKernel(swappiness_key=False))
    ticks(s, 3)
    n = MIN_STEP
    assert reclaim_writes(k) == ["%d swappiness=0" % n, "%d" % n, "%d" % (2 * n)]
    assert s.status()["swappiness_key"] is False and s.status()["reclaimed_bytes"] == 3 * n


def test_einval_with_swap_and_anon_not_allowed_refuses(tmp_path: Path) -> None:
    s, values, k = stage(tree(tmp_path, swap_kib=1 << 20), FakeKernel(swappiness_key=False))
    ticks(s, 3)
    assert reclaim_writes(k) == ["%d swappiness=0" % MIN_STEP]     # nothing plain, ever
    st = s.status()
    assert st["state"] == "off" and "free_first_anon=true" in st["reason"]
    assert st["reclaimed_bytes"] == 0
    values["free_first_anon"] = True                              # the operator allows it
    ticks(s, 1, start=200.0)
    assert reclaim_writes(k)[-1] == "%d" % MIN_STEP


def test_anon_allowed_with_swap_leaves_the_balance_to_the_kernel(tmp_path: Path) -> None:
    s, _, k = stage(tree(tmp_path, swap_kib=1 << 20), free_first_anon=True)
    ticks(s, 2)
    assert reclaim_writes(k) == ["%d" % MIN_STEP]


def test_eagain_is_a_short_write_not_an_error(tmp_path: Path) -> None:
    s, _, k = stage(tree(tmp_path), FakeKernel(short=SHORT_LIMIT))
    ticks(s, SHORT_LIMIT + 3)
    st = s.status()
    assert st["short_writes"] == SHORT_LIMIT and st["reclaimed_bytes"] == 0
    assert st["state"] == "exhausted" and "EAGAIN" in st["reason"]
    assert len(reclaim_writes(k)) == SHORT_LIMIT


def test_psi_over_the_ceiling_writes_nothing(tmp_path: Path) -> None:
    s, _, k = stage(tree(tmp_path, psi=0.35))
    ticks(s, 5)
    assert reclaim_writes(k) == [] and s.status()["state"] == "backed_off"
    assert "0.35% > ceiling 0.20%" in s.status()["reason"]


@pytest.mark.parametrize("kind,why", [
    ("v1", "cgroup v1 memory controller"),
    ("v2-old", "Linux < 5.19"),
])
def test_no_memory_reclaim_keeps_the_stage_off_with_the_reason(tmp_path: Path, kind: str,
                                                             why: str) -> None:
    root = tree(tmp_path, cgroup=kind)
    s, _, k = stage(root)
    ticks(s, 5)
    assert k.writes == [] and s.status()["state"] == "off" and why in s.status()["reason"]
    assert s.next_due() == float("inf")
    cap = capabilities.detect_free_first(str(root))
    assert not cap.available and why in cap.detail
    assert capabilities.by_name(capabilities.detect_all(str(root)))["free_first"] == cap


def test_memory_controller_missing_from_v2(tmp_path: Path) -> None:
    root = tree(tmp_path)
    (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpu io pids\n")
    assert "memory controller is not on the cgroup v2" in memreclaim.probe(str(root))


def test_read_only_cgroupfs_turns_the_stage_off_the_rest_carries_on(tmp_path: Path) -> None:
    s, _, k = stage(tree(tmp_path), FakeKernel(fail=errno.EROFS))
    ticks(s, 5)
    st = s.status()
    assert len(k.writes) == 1 and st["state"] == "off"
    assert "errno %d" % errno.EROFS in st["reason"] and "switched on again" in st["reason"]


def test_capability_on_a_v2_tree(tmp_path: Path) -> None:
    cap = capabilities.detect_free_first(str(tree(tmp_path)))
    assert cap.available and "memory.reclaim writable" in cap.detail


def test_setting_off_reads_and_writes_nothing(tmp_path: Path) -> None:
    root = tree(tmp_path)
    values = table.layered([{}])
    k = FakeKernel()
    s = Stage(values, str(root), memreclaim.Reclaimer(str(root), k))
    ticks(s, 10)
    assert k.writes == [] and s._files == {} and s.next_due() == float("inf")
    assert s.status()["state"] == "off" and s.status()["reason"] == "free_first is off"
    values["free_first"] = True
    ticks(s, 2, start=200.0)
    assert len(reclaim_writes(k)) == 1
    values["free_first"] = False                                  # live off again
    ticks(s, 5, start=300.0)
    assert len(reclaim_writes(k)) == 1 and s.status()["state"] == "off"


def test_budget_and_floor_from_the_table_bound_the_stage(tmp_path: Path) -> None:
    def sizes(k: FakeKernel) -> List[int]:
        return [int(w.split()[0]) // MiB for w in reclaim_writes(k)]

    s, _, k = stage(tree(tmp_path / "a"), free_first_mib_s=2)
    ticks(s, 6)
    assert sizes(k) == [1, 2, 2, 2, 2]                            # 2 MiB/s
    # 260 MiB of file cache, floor 256: never more than half the 4 MiB above it per step.
    s, _, k = stage(tree(tmp_path / "b", cache_kib=260 << 10), free_first_cache_floor_mib=256)
    ticks(s, 6)
    assert sizes(k) == [1, 2, 2, 2, 2]
    (tmp_path / "b/proc/meminfo").write_text(
        "MemTotal: 8388608 kB\nMemFree: 1048576 kB\nActive(file): 131072 kB\n"
        "Inactive(file): 131072 kB\n")                           # at the floor now
    ticks(s, 3, start=300.0)
    assert len(sizes(k)) == 5 and s.status()["state"] == "at_floor"


def test_compaction_when_fragmented_at_most_every_interval(tmp_path: Path) -> None:
    frag = "%d 0 0 0 0 0 0 0 0 0 0" % (1 * GiB // PAGE)
    s, _, k = stage(tree(tmp_path, buddy=frag))
    ticks(s, 30)
    assert [t for n, t in k.writes if n == "compact_memory"] == ["1"]
    assert s.status()["compactions"] == 1


def test_drop_caches_only_on_opt_in_and_only_without_memory_reclaim(tmp_path: Path) -> None:
    root = tree(tmp_path, cgroup="v2-old")
    s, values, k = stage(root)
    ticks(s, 3)
    assert k.writes == [] and "Linux < 5.19" in s.status()["reason"]
    values["free_first_drop_caches"] = True
    ticks(s, 30, start=200.0)
    assert [t for n, t in k.writes if n == "drop_caches"] == ["1"]
    assert s.status()["drops"] == 1 and s.status()["mode"] == "drop_caches"
    ticks(s, 2, start=200.0 + DROP_EVERY_S + 1)
    assert s.status()["drops"] == 2
    # Where memory.reclaim exists, the opt-in changes nothing.
    s2, _, k2 = stage(tree(tmp_path / "v2"), free_first_drop_caches=True)
    ticks(s2, 3)
    assert {n for n, _ in k2.writes} == {"memory.reclaim"}


def test_out_of_range_settings_are_refused_by_the_table() -> None:
    for name, bad in (("free_first_mib_s", 0), ("free_first_psi_ceiling", 50.0),
                      ("free_first_cache_floor_mib", -1), ("free_first", "maybe")):
        with pytest.raises(table.SettingError):
            table.coerce(name, bad)
    assert table.defaults()["free_first"] is False


def test_the_agent_sends_the_stage_in_its_statistics(tmp_path: Path) -> None:
    from aerate.agent.service import Agent
    values = table.layered([{}])
    engine = SimpleNamespace(stats_only="", cfg=values, status=lambda: {"phase": "idle"})
    arena = SimpleNamespace(kind="hugetlb", weakness="", refusal=lambda weak: "")
    kernel = SimpleNamespace(stats=lambda: {"mem_free": 1})
    agent = Agent(SimpleNamespace(), engine, arena, "", kernel)  # type: ignore[arg-type]
    ff = agent._stats()["free_first"]
    assert ff["state"] == "off" and ff["reclaimed_bytes"] == 0
