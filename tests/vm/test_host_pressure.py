"""Host pressure drives reclaim (issue 13, Show): a real hog on this host, a real guest.

aerated samples the host's MemAvailable every second (host/pressure.py). Under
``host_high_mib`` a VM's reclaim firms up: ``reserve_mib`` and ``hwm`` halve, so the agent
reports free memory it kept back before (touched by the guest first, so the host backs
it) and the host gets more of the guest's RAM back,
measured in the same run from the kernel (the RAM memfd's st_blocks) before and during the
hog. Released, the level relaxes (after host/pressure.py RELAX_AFTER_S) and the VM's
settings are its own again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from aerate.deploy.image import GuestImage
from aerate.deploy.scenario import Hog, aerated, ram_allocated, steady_of, wait_for
from aerate.deploy.vm import booted
from aerate.host.ctl import request

pytestmark = pytest.mark.vm
MiB = 1 << 20
RESERVE_MIB = 512
#: The hog, and how far under MemAvailable the threshold sits: the hog crosses it with
#: 1.5 GiB to spare, whatever the host's page cache does meanwhile.
HOG_MIB, BELOW_MIB = 3072, 1536
HOG = r"""
import mmap, sys, time
m = mmap.mmap(-1, int(sys.argv[1]) << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, len(m), 4096):
    m[i] = 1
print("ready", flush=True)
time.sleep(3600)
"""


def test_host_pressure_firms_up_reclaim_and_relaxes_after(guest_image: GuestImage,
                                                          tmp_path: Path) -> None:
    config = f"[defaults]\nreserve_mib = {RESERVE_MIB}\nhwm = 8\nstats_interval_s = 1\n"
    run = tmp_path / "run"
    with booted(guest_image, backing="memfd", memory_mib=2048) as g, \
            aerated(run, config, ("--vm", g.name)) as d:
        wait_for(lambda: d.pass_over(g.name), 600, "the first pass", 2)
        # Memory the guest never touched is not backed on the host, so reporting it frees
        # nothing: first the guest touches nearly all its free memory and frees it, and
        # aerate takes back all but the reserve, which is now backed free memory.
        avail = int(g.check("awk '/MemAvailable/ {print $2}' /proc/meminfo").strip()) >> 10
        touch = Hog(g, avail - 160, hold_s=2)
        touch.start()
        touch.join()
        wait_for(lambda: d.pass_over(g.name), 300, "the pass after the guest's free", 2)
        # The threshold is set now, from the host as it is with the guest's memory backed
        # (a memfd guest's RAM counts against MemAvailable), through the config file and a
        # reload, as an operator would.
        high = (psutil.virtual_memory().available >> 20) - BELOW_MIB
        (run / "aerated.toml").write_text(config + f"host_high_mib = {high}\n")
        assert request({"cmd": "reload"}, str(run)).get("ok"), d.log_text()[-2000:]
        wait_for(lambda: d.vm(g.name)["settings"].get("reserve_mib") == RESERVE_MIB, 30,
                 "the reload")
        assert d.vm(g.name)["host_pressure"] == "plenty"
        assert d.vm(g.name)["settings"]["reserve_mib"] == RESERVE_MIB
        plenty = steady_of(lambda: ram_allocated(g), 6.0, 120.0)
        hog = subprocess.Popen([sys.executable, "-c", HOG, str(HOG_MIB)],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert hog.stdout is not None and hog.stdout.readline().strip() == "ready"
            wait_for(lambda: d.vm(g.name).get("host_pressure") == "firmer", 30,
                     "the host level to firm up under the hog")
            wait_for(lambda: d.vm(g.name)["settings"].get("reserve_mib") == RESERVE_MIB // 2,
                     30, "the VM's reserve to halve")
            # The backed free memory between the two reserves is reported and discarded.
            wait_for(lambda: ram_allocated(g) <= plenty - 192 * MiB, 180,
                     "more of the guest's RAM to come back under host pressure", 2)
            firm = steady_of(lambda: ram_allocated(g), 6.0, 120.0)
        finally:
            hog.kill()
            hog.wait()
        wait_for(lambda: d.vm(g.name).get("host_pressure") == "plenty", 60,
                 "the level to relax once the hog is gone")
        assert d.vm(g.name)["settings"]["reserve_mib"] == RESERVE_MIB
        print(f"host pressure: backing {plenty >> 20} MiB at plenty, {firm >> 20} MiB under "
              f"the {HOG_MIB} MiB hog (threshold {high} MiB of MemAvailable)")
        assert firm <= plenty - 192 * MiB
