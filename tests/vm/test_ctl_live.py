"""The operator's knobs on a live VM (issue 13, Show), through the real ``aeratectl`` program.

A real guest under libvirt with its agent, aerated from this checkout, and ``aeratectl`` run
as an operator runs it (``python -m aerate.host.ctl``, the module the installed program
launches): ``set`` on the running VM changes the agent's batch size within one cycle,
visible in the statistics it sends; the value survives a restart of aerated (it lives in the
domain's metadata); ``get`` says where each value came from; ``reset`` brings back the
layer below (the host file); ``set --config`` on a stopped domain writes its inactive
definition, and the domain starts with those settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import libvirt
import pytest

from aerate.deploy.image import GuestImage
from aerate.deploy.scenario import Aerated, Hog, aerated, wait_for
from aerate.deploy.vm import Guest, booted

pytestmark = pytest.mark.vm
MiB = 1 << 20
#: The host file's layer: ``reset`` must bring its hwm back.
CONFIG = "[defaults]\nreserve_mib = 128\nhwm = 8\nstats_interval_s = 1\n"


def ctl(run: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aerate.host.ctl", "--run-dir", str(run),
                           *args], capture_output=True, text=True, timeout=60)


def got(run: Path, vm: str) -> dict[str, Any]:
    """``aeratectl get VM --json``: key -> {value, source, detail}."""
    p = ctl(run, "get", vm, "--json")
    assert p.returncode == 0, (p.stdout, p.stderr)
    return dict(json.loads(p.stdout)["settings"])



def test_set_changes_the_batch_size_at_once_survives_a_restart_and_reset_restores_the_host_file(
        guest_image: GuestImage, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with booted(guest_image, backing="memfd", memory_mib=1536) as g:
        with aerated(run, CONFIG, ("--vm", g.name)) as d:
            wait_for(lambda: d.pass_over(g.name), 600, "the first pass", 2)
            assert got(run, g.name)["hwm"]["source"] == "host file"
            p = ctl(run, "set", g.name, "hwm=6", "capacity=4")
            assert p.returncode == 0, (p.stdout, p.stderr)
            # Within one cycle: the agent's next statistics already carry the new capacity.
            wait_for(lambda: d.guest(g.name, "engine").get("capacity_now") == 4, 30,
                     "the agent's statistics to show capacity 4")
            before = d.vm(g.name)
            batch_sizes(g, d, before)
            settings = got(run, g.name)
            assert settings["hwm"]["value"] == 6 and settings["capacity"]["value"] == 4, settings
            assert settings["hwm"]["source"] in ("live", "metadata"), settings
        # A new aerated on the same run directory: the values come from the domain's metadata.
        with aerated(run, CONFIG, ("--vm", g.name)) as d:
            wait_for(lambda: d.vm(g.name).get("state") == "running", 300, "the new session")
            settings = got(run, g.name)
            assert (settings["hwm"]["value"], settings["hwm"]["source"]) == (6, "metadata"), \
                settings
            wait_for(lambda: d.guest(g.name, "engine").get("capacity_now") == 4, 60,
                     "the agent to keep capacity 4 in the new session")
            p = ctl(run, "reset", g.name, "hwm")
            assert p.returncode == 0, (p.stdout, p.stderr)
            settings = got(run, g.name)
            assert (settings["hwm"]["value"], settings["hwm"]["source"]) == (8, "host file"), \
                settings
            assert settings["capacity"]["value"] == 4, settings   # only hwm was reset
            wait_for(lambda: "'hwm': 8" in g.check(
                "journalctl -u aerate-agent --no-pager -o cat | grep 'settings applied' "
                "| tail -1"), 60, "the agent to apply hwm 8 again")
            # Bad input: an unknown key and a value out of range change nothing.
            for bad in ("hwmm=3", "hwm=-1"):
                p = ctl(run, "set", g.name, bad)
                assert p.returncode != 0 and p.stderr.strip(), (bad, p.stdout, p.stderr)
            assert got(run, g.name)["hwm"]["value"] == 8


def batch_sizes(g: Guest, d: Aerated, before: dict[str, Any]) -> None:
    """Free 256 MiB in the guest: every batch reported from now holds at most 4 blocks."""
    hog = Hog(g, 256, hold_s=2)
    hog.start()
    hog.join()
    wait_for(lambda: d.vm(g.name).get("batches", 0) >= before["batches"] + 8
             and d.pass_over(g.name), 300, "the agent to report the freed memory", 2)
    after = d.vm(g.name)
    batches = after["batches"] - before["batches"]
    reported = after["reported_bytes"] - before["reported_bytes"]
    print(f"after set capacity=4: {batches} batches, {reported / MiB:.0f} MiB reported")
    assert reported <= batches * 4 * 2 * MiB, (batches, reported)


def test_a_stopped_domain_configured_with_config_starts_with_those_settings(
        guest_image: GuestImage, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with booted(guest_image, backing="memfd", memory_mib=1024, persistent=True) as g, \
            aerated(run, CONFIG, ("--vm", g.name)) as d:
        wait_for(lambda: d.pass_over(g.name), 600, "the first pass", 2)
        g.destroy()
        wait_for(lambda: d.vm(g.name).get("state") != "running", 60,
                 "aerated to see the domain stop")
        p = ctl(run, "set", g.name, "capacity=6", "--config")
        assert p.returncode == 0, (p.stdout, p.stderr)
        assert "next start" in p.stdout or "saved" in p.stdout, p.stdout
        assert "capacity" in g.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        g.start_again()
        wait_for(lambda: d.vm(g.name).get("state") == "running", 300,
                 "a session with the restarted domain")
        assert d.vm(g.name)["settings"].get("capacity") == 6, d.vm(g.name)["settings"]
        wait_for(lambda: "'capacity': 6" in g.check(
            "journalctl -u aerate-agent -b --no-pager -o cat | grep 'settings applied' "
            "| tail -1"), 120, "the agent to apply capacity 6 at its start")
