"""systemd units: they verify, and their hardening stays at the level they were shipped with.

No systemd runs as PID 1 on the test machine, so the units are checked offline here; the
agent's unit runs for real inside the guest image (tests/vm).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                 reason="systemd-analyze not installed (Debian package systemd)")]
UNITS = Path(__file__).resolve().parents[2] / "systemd"


#: Keys newer than the oldest systemd the units support (Debian 12: 252), set on purpose:
#: older versions ignore them with one warning (see the comment at each key).
NEWER_KEYS = {"aerate-agent.service": ["FileDescriptorStorePreserve"]}


def exec_paths(text: str) -> list[str]:
    """The programs a unit's Exec*= lines run (prefixes like '-' or '@' removed)."""
    return [m.group(1) for m in re.finditer(r"^Exec\w+=[-@:+!]*(\S+)", text, re.M)]


@pytest.mark.parametrize("unit", ["aerated.service", "aerate-agent.service"])
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    """The unit as shipped, except that the programs the packages install (absent from this
    machine: tests/host/test_packages.py checks they are in the packages, with the man
    pages that Documentation= names) are swapped for /bin/true."""
    text = (UNITS / unit).read_text()
    for path in exec_paths(text):
        if not Path(path).exists():
            text = text.replace(path, "/bin/true")
    (tmp_path / unit).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
                       capture_output=True, text=True, timeout=60)
    newer = NEWER_KEYS.get(unit, [])
    left = [line for line in r.stderr.splitlines() if line.strip()
            and not any(re.search(r"Unknown key( name)? '%s' in section \[?'?Service" % k,
                                  line) for k in newer)]
    assert r.returncode == 0 and not left, r.stderr


def test_newer_keys_are_still_in_the_units() -> None:
    # Without this a key dropped from the unit would leave a stale allowance behind.
    for unit, keys in NEWER_KEYS.items():
        text = (UNITS / unit).read_text()
        assert all(re.search(r"^%s=" % k, text, re.M) for k in keys)


@pytest.mark.parametrize("unit, ceiling", [("aerated.service", 3.0),
                                           ("aerate-agent.service", 3.0)])
def test_unit_exposure_stays_low(unit: str, ceiling: float) -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNITS / unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= ceiling


def test_units_are_notify_services_not_forking() -> None:
    for unit in ("aerated.service", "aerate-agent.service"):
        text = (UNITS / unit).read_text()
        assert "Type=notify" in text and "Type=forking" not in text



def test_the_daemon_unit_has_a_watchdog() -> None:
    # The loop's pings are tested in tests/unit/test_isolation.py (notify socket).
    m = re.search(r"^WatchdogSec=(\d+)s$", (UNITS / "aerated.service").read_text(), re.M)
    assert m and 10 <= int(m.group(1)) <= 120, "aerated.service needs WatchdogSec="


def test_the_agent_is_given_time_to_wait_out_its_leases_on_stop() -> None:
    """S2 on stop: systemd must not SIGKILL the agent while a lease still runs (with the
    memfd fallback on systemd < 254 that would free pages a report may still name)."""
    from aerate.agent.cycle import LEASE_MAX_S
    from aerate.agent.service import STOP_LIMIT

    text = (UNITS / "aerate-agent.service").read_text()
    m = re.search(r"^TimeoutStopSec=(\d+)s$", text, re.M)
    assert m, "aerate-agent.service sets no TimeoutStopSec="
    assert int(m.group(1)) > STOP_LIMIT > LEASE_MAX_S


def unit_values(text: str, section: str, key: str) -> list[str]:
    """Every word of every ``key=`` line in ``[section]`` (systemd joins repeated lines)."""
    words: list[str] = []
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(key + "="):
            words += line.partition("=")[2].split()
    return words


def test_the_daemon_unit_orders_after_either_libvirt_daemon_and_pulls_in_neither() -> None:
    """A Wants=libvirtd.service would start the monolithic daemon next to virtqemud on a
    modular host (issue 12); ordering after both is harmless where one is absent."""
    text = (UNITS / "aerated.service").read_text()
    assert {"libvirtd.service", "virtqemud.service"} <= set(unit_values(text, "Unit", "After"))
    for key in ("Wants", "Requires", "Requisite", "BindsTo", "PartOf", "Upholds"):
        pulled = [u for u in unit_values(text, "Unit", key) if "virt" in u]
        assert pulled == [], f"{key}= {pulled}"


def test_reload_is_sighup_which_the_daemon_brackets_with_reloading_and_ready() -> None:
    """Type=notify-reload (systemd >= 253) would send the SIGHUP itself; Debian 12's 252
    does not know it, so ExecReload= sends it and the daemon (host/daemon.py _reload)
    answers RELOADING=1 ... READY=1, which both versions understand."""
    text = (UNITS / "aerated.service").read_text()
    assert unit_values(text, "Service", "Type") == ["notify"]
    assert unit_values(text, "Service", "ExecReload") == ["/bin/kill", "-HUP", "$MAINPID"]
