"""The demo's figures and picture (deploy/demo.py, deploy/chart.py), on recorded curves:
the VM half of the demo is what ``./deploy/demo`` runs."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from aerate.deploy import chart
from aerate.deploy.demo import AERATE, KERNEL, NOTHING, Trial, table

pytestmark = pytest.mark.unit
MiB = 1 << 20


def recorded(mode: str, fall_s: float | None) -> Trial:
    """A 1 GiB free at t=100 over a 300 MiB baseline; the backing falls linearly over
    ``fall_s`` seconds (None: it never falls), sampled every 0.5 s for 60 s."""
    t = Trial(mode, 1024, freed_at=100.0, baseline=300 * MiB, peak=1324 * MiB)
    for i in range(-10, 121):
        now = 100.0 + i / 2
        since = max(0.0, now - 100.0)
        gone = 0.0 if fall_s is None else min(1.0, since / fall_s)
        t.samples.append((now, int(t.peak - gone * 1024 * MiB)))
    return t


def test_the_figures_read_each_curve_at_the_same_marks() -> None:
    fast, slow, flat = recorded(AERATE, 2.0), recorded(KERNEL, 8.0), recorded(NOTHING, None)
    assert fast.returned_at(5) == pytest.approx(1024)
    assert slow.returned_at(5) == pytest.approx(640)
    assert flat.returned_at(30) == 0
    assert fast.time_to(0.9) == pytest.approx(2.0, abs=0.5)
    assert slow.time_to(0.5) == pytest.approx(4.0, abs=0.5)
    assert flat.time_to(0.5) is None
    assert fast.returned_at(90) is None   # watched 60 s: no figure past that
    text = table([fast, slow, flat])
    lines = text.splitlines()
    assert AERATE in lines[0] and KERNEL in lines[0] and NOTHING in lines[0]
    row = next(r for r in lines if r.startswith("returned 5 s after"))
    assert "1024 MiB" in row and "640 MiB" in row and row.rstrip().endswith("0 MiB")
    assert next(r for r in lines if r.startswith("time to 50%")).rstrip().endswith("-")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_the_chart_is_a_png_of_the_three_curves(tmp_path: Path) -> None:
    trials = [recorded(AERATE, 2.0), recorded(KERNEL, 8.0), recorded(NOTHING, None)]
    out = chart.write_png(tmp_path / "sub" / "demo.png", {t.mode: t.curve() for t in trials},
                          "A 2048 MiB guest frees 1024 MiB", 1024)
    data = out.read_bytes()
    assert png_size(data) == (900, 500)
    # Three coloured lines on a white page: the picture is far from a blank one.
    blank = chart.write_png(tmp_path / "blank.png", {}, "nothing", 1024).read_bytes()
    assert len(data) > len(blank) * 1.2, (len(data), len(blank))


def test_without_matplotlib_the_chart_says_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(chart.ChartUnavailable, match=r"pip install -e '\.\[demo\]'"):
        chart.write_png(tmp_path / "x.png", {"aerate": [(0.0, 1.0)]}, "t", 1)
    assert not (tmp_path / "x.png").exists()
