"""Issue 9: a guest that poisons freed pages is refused, and its memory is never punched.

A real guest (the project's image, systemd, aerate-agent) booted with ``page_poison=1
init_on_free=1`` on real libvirt + QEMU (TCG), with shared memfd RAM that aerated would
otherwise punch. The Debian 12 kernel has CONFIG_PAGE_POISONING=y, so it fills every page
it frees with 0xaa (page poisoning takes precedence over init_on_free) and checks the
pattern when it hands the page out again: a punched page would read back as zeroes. The
agent detects this (agent/procfs.py) and says ``poison_safe: false`` in its hello; the
real daemon logic (host/daemon.py, in this process, against the real libvirtd: nothing
mocked) must refuse every batch with that reason, and the memfd must never shrink.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_hostdev import MiB, ram_allocated, with_daemon

from aerate.deploy.scenario import DaemonView, Hog, wait_for
from aerate.deploy.vm import Guest

pytestmark = pytest.mark.vm
GUEST_SHAPE = {"backing": "memfd", "memory_mib": 2048,
               "extra_cmdline": "page_poison=1 init_on_free=1"}
HOG_MIB = 1024


def test_poisoning_guest_is_refused_and_never_punched(guest: Guest, tmp_path: Path) -> None:
    g, name = guest, guest.name
    cmdline = g.check("cat /proc/cmdline")
    assert "page_poison=1" in cmdline, cmdline
    hog = Hog(g, HOG_MIB, hold_s=1)
    hog.start()
    hog.join()
    peak = ram_allocated(g)
    assert peak >= HOG_MIB * MiB, f"memfd holds only {peak >> 20} MiB after the hog"
    samples: list[int] = []
    batches: list[float] = []

    def watch(d: DaemonView) -> dict[str, Any]:
        last = 0

        def two_batches() -> dict[str, Any]:
            nonlocal last
            samples.append(ram_allocated(g))
            vm = d.vm(name)
            n = int(vm.get("batches", 0))
            if n > last:
                batches.extend([time.monotonic()] * (n - last))
                last = n
            return vm if n >= 2 else {}

        vm = wait_for(two_batches, 300, f"two batches from {name}", interval=0.5)
        ctl = subprocess.run([sys.executable, "-m", "aerate.host.ctl", "--run-dir",
                              str(d.run_dir), "status"],
                             capture_output=True, text=True, timeout=30, check=True)
        return {"vm": vm, "ctl": ctl.stdout, "log": d.log_text()}

    seen = with_daemon(tmp_path / "aerated", name, hostdev=False, body=watch)
    vm, log = seen["vm"], seen["log"]
    print(f"{name}: refused {vm['refused_bytes'] >> 20} MiB in {vm['batches']} batches, "
          f"gaps {[round(b - a, 1) for a, b in itertools.pairwise(batches)]} s; memfd "
          f"{peak >> 20} MiB before, min {min(samples) >> 20} MiB during; reason: "
          f"{vm['reason']}")
    print(json.dumps(vm.get("capabilities", {}).get("poison_safe")))
    # The guest said so, the host refused for that reason, and the operator sees it.
    cap = vm["capabilities"]["poison_safe"]
    assert cap["available"] is False and "page_poison=1" in cap["detail"], cap
    assert vm["reclaimer"] == "refuse" and "poisons freed pages" in vm["reason"], vm
    assert "poisons freed pages" in seen["ctl"], seen["ctl"]
    assert "poisons freed pages" in log, log[-3000:]
    # Nothing discarded, every reported byte refused, and the host kept every byte.
    assert vm["discarded_bytes"] == 0 and vm["refused_bytes"] == vm["reported_bytes"] > 0, vm
    assert min(samples) >= peak, (peak, samples)
