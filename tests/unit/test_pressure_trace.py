"""Host pressure policy (host/pressure.py ``level`` and ``settle``) on a recorded trace.

tests/data/pressure/hog-6g.csv is a real recording on this project's dev machine (24 GiB,
no swap): a process allocated and touched 6 GiB in 512 MiB steps, held it 10 s and freed
it, while MemAvailable and the memory PSI were sampled every 0.5 s. Recorded with

    python3 tests/data/pressure/record.py --out tests/data/pressure/hog-6g.csv

(no VM, no privileges; the script's docstring says what it does). The memory PSI stayed 0
throughout on that kernel (no swap, no thrashing), so the trace exercises MemAvailable;
PSI's step is tested on its own in test_control.py. Thresholds are chosen relative to the
recorded figures, so a re-recording on another machine keeps the tests' meaning.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import List, NamedTuple

import pytest

from aerate.host import pressure

pytestmark = pytest.mark.unit
MiB = 1 << 20
TRACE = Path(__file__).resolve().parents[1] / "data" / "pressure" / "hog-6g.csv"


class Sample(NamedTuple):
    t: float
    available_mib: int
    psi: float | None
    hog_mib: int


def trace() -> List[Sample]:
    with TRACE.open(encoding="ascii") as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return [Sample(float(r["t_s"]), int(r["mem_available_mib"]),
                       float(r["psi_some_avg10"]) if r["psi_some_avg10"] else None,
                       int(r["hog_mib"])) for r in rows]


def values(low: int, high: int, psi: float = 10.0) -> dict[str, object]:
    return {"host_low_mib": low, "host_high_mib": high, "host_psi_some": psi}


def drive(samples: List[Sample], v: dict[str, object]) -> tuple[List[str], List[str]]:
    """(measured level, level acted on) per sample, as control.watch_pressure runs them."""
    measured, acted = [], []
    lvl, since = pressure.PLENTY, None
    for s in samples:
        m = pressure.level(pressure.HostMemory(s.available_mib * MiB, None, s.psi), v)
        lvl, since = pressure.settle(lvl, m, since, s.t)
        measured.append(m)
        acted.append(lvl)
    return measured, acted


def changes(levels: List[str]) -> int:
    return sum(a != b for a, b in zip(levels, levels[1:]))


def runs(levels: List[str]) -> List[str]:
    return [x for i, x in enumerate(levels) if i == 0 or levels[i - 1] != x]


def test_the_trace_is_what_its_docstring_says() -> None:
    s = trace()
    assert len(s) > 60 and s[-1].t - s[0].t > 40
    assert max(x.hog_mib for x in s) == 6144 and s[0].hog_mib == s[-1].hog_mib == 0
    assert min(x.available_mib for x in s) >= 4096  # the recorder's floor held
    baseline = s[0].available_mib
    # The hog's GiBs really left MemAvailable (within 10 %).
    assert 0.9 * 6144 < baseline - min(x.available_mib for x in s) < 1.1 * 6144


def test_a_host_hog_firms_up_then_relaxes_without_flapping() -> None:
    s = trace()
    baseline = s[0].available_mib
    high, low = baseline - 2048, baseline - 4608  # crossed at ~2 GiB and ~4.5 GiB of hog
    measured, acted = drive(s, values(low, high))
    assert runs(acted) == ["plenty", "firmer", "firm", "plenty"], runs(acted)
    # Firmer at once: the first sample below high_mib is acted on.
    first_below = next(i for i, x in enumerate(s) if x.available_mib < high)
    assert acted[first_below] == "firmer" and acted[first_below - 1] == "plenty"
    assert s[first_below].hog_mib >= 1536
    first_firm = acted.index("firm")
    assert s[first_firm].available_mib < low and acted[first_firm - 1] == "firmer"
    # Relaxed only after RELAX_AFTER_S below firm (the hog freeing: firmer, then plenty),
    # within one sample of it, and straight to plenty.
    freed = next(i for i in range(first_firm, len(s)) if measured[i] != "firm")
    relaxed = acted.index("plenty", first_firm)
    waited = s[relaxed].t - s[freed].t
    assert pressure.RELAX_AFTER_S <= waited <= pressure.RELAX_AFTER_S + 1.0, waited
    assert all(a == "firm" for a in acted[first_firm:relaxed])


def test_memavailable_noise_at_a_threshold_does_not_flip_the_settings() -> None:
    """low_mib at the median of the hold's plateau: the measured level flips with the
    recorded noise, the level acted on does not."""
    s = trace()
    plateau = sorted(x.available_mib for x in s if x.hog_mib == 6144)
    low = plateau[len(plateau) // 2]
    measured, acted = drive(s, values(low, s[0].available_mib - 2048))
    held = [i for i, x in enumerate(s) if x.hog_mib == 6144]
    assert changes([measured[i] for i in held]) >= 2, [s[i].available_mib for i in held]
    assert changes(acted) == 3 and runs(acted) == ["plenty", "firmer", "firm", "plenty"]


def test_without_thresholds_the_trace_changes_nothing() -> None:
    s = trace()
    for v in (values(0, 0), values(0, 0, psi=0.0)):
        measured, acted = drive(s, v)
        assert set(measured) == set(acted) == {"plenty"}
    # The recorded PSI (0 on that kernel) raises nothing at the default host_psi_some.
    baseline = s[0].available_mib
    with_psi = drive(s, values(baseline - 4608, baseline - 2048))
    without = drive(s, values(baseline - 4608, baseline - 2048, psi=0.0))
    assert with_psi == without
