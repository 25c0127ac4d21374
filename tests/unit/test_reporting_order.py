"""Tuning the guest kernel's own free page reporting (agent/reporting_order.py), on a
stand-in /sys tree (the parameter file of a real kernel is what the vm tier's kernel-FPR
guests have; writing it here would change this host's kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aerate.agent import settings as table
from aerate.agent.reporting_order import PARAM, SAVED, ReportingOrder

pytestmark = pytest.mark.unit


def tree(tmp_path: Path, value: int = 9) -> tuple[Path, Path, Path]:
    param = tmp_path / "root" / PARAM
    param.parent.mkdir(parents=True)
    param.write_text(f"{value}\n")
    run = tmp_path / "run"
    return tmp_path / "root", param, run


def test_the_setting_is_a_guest_row_that_leaves_the_kernel_alone_by_default() -> None:
    row = table.BY_NAME["kernel_reporting_order"]
    assert row.scope == "guest" and table.defaults()["kernel_reporting_order"] == -1
    with pytest.raises(table.SettingError):
        table.coerce("kernel_reporting_order", 11)


def test_a_tuned_order_is_written_and_the_kernels_own_comes_back(tmp_path: Path) -> None:
    root, param, run = tree(tmp_path)
    o = ReportingOrder(str(root), str(run))
    assert "set to 5" in o.apply(5) and param.read_text() == "5\n"
    assert (run / SAVED).read_text() == "9\n"
    o.apply(3)   # a second change keeps the kernel's value, not ours, as the original
    assert param.read_text() == "3\n" and o.original() == 9
    o.apply(-1)
    assert param.read_text() == "9\n" and not (run / SAVED).exists()


def test_a_restarted_agent_keeps_the_saved_original(tmp_path: Path) -> None:
    root, param, run = tree(tmp_path)
    ReportingOrder(str(root), str(run)).apply(4)   # then the agent died: no restore
    again = ReportingOrder(str(root), str(run))
    again.apply(6)
    assert again.original() == 9
    again.restore()
    assert param.read_text() == "9\n"


def test_a_kernel_without_the_parameter_is_told_not_failed(tmp_path: Path) -> None:
    o = ReportingOrder(str(tmp_path / "old-kernel"), str(tmp_path / "run"))
    assert "Linux >= 5.14" in o.apply(5)
    assert o.apply(-1) == ""
    assert not (tmp_path / "run").exists()
