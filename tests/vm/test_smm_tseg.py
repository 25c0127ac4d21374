"""Issue 9: q35 + OVMF with SMM, and root in the guest reports the TSEG SMRAM as free.

A real guest booted by Debian's OVMF built with SMM_REQUIRE (deploy/domain.py
``firmware="ovmf-smm"``: ``<smm state='on'/>``, secure pflash, direct kernel boot) on real
libvirt + QEMU (TCG), with shared memfd RAM that a real ``aerated`` punches. OVMF asks the
MCH for TSEG at the top of RAM below 4 GiB and puts its SMM code and data there after QEMU
started, i.e. after the daemon built its first map. Root in the guest stops the agent and
speaks the protocol itself (the hostile program of test_hostile.py, which lies in its hello
so the reclaimer is decided punch), reports one page it owns (the control, which must be
discarded) and then the whole TSEG, read from the guest's own MCH registers.

The daemon keeps TSEG out twice: the largest TSEG the machine allows is never in its map,
from the first one on (host/qemu_map.py ``tseg_window``), and the map rebuilt after every
hello no longer shows TSEG as RAM once the firmware locked it (a ``tseg-blackhole``). The
daemon here runs before the domain starts, so its first map is built while OVMF still runs.

What must hold: not one page of TSEG that held data before the report is a hole in the
memfd after it (lseek SEEK_DATA/SEEK_HOLE at the guest-physical offset, read without
aerated's map), the ack says every TSEG byte refused and none discarded, and the daemon's
log and counters say so with the reason.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_hostile import run_hostile

from aerate.deploy.image import GuestImage
from aerate.deploy.scenario import (
    Aerated,
    MiB,
    aerated,
    allocated_in,
    data_extents,
    wait_for,
)
from aerate.deploy.vm import Guest, booted

pytestmark = pytest.mark.vm
MEMORY_MIB = 1024
#: q35 MCH registers (QEMU include/hw/pci-host/q35.h): ESMRAMC (T_EN bit 0, TSEG_SZ bits
#: 2:1: 1, 2, 8 MiB or the extended size) and the extended TSEG size in MiB.
ESMRAMC, EXT_TSEG_MBYTES = 0x9E, 0x50


@pytest.fixture(scope="module")
def smm_guest(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Aerated, Guest]]:
    run = tmp_path_factory.mktemp("aerated-smm")
    # The daemon runs first and serves the domain from its start, as on a host: its first
    # map is built while OVMF has not set up TSEG yet (the hole issue 9 names).
    prefix = f"aerate-smm{uuid.uuid4().hex[:6]}"
    with aerated(run, "[defaults]\nhwm = 8\nstats_interval_s = 1\n",
                 ("--vm", f"{prefix}-*")) as d, \
            booted(guest_image, name_prefix=prefix, backing="memfd", memory_mib=MEMORY_MIB,
                   firmware="ovmf-smm") as g:
        print(f"{g.name}: OVMF+SMM boot-to-ready {g.timings['boot_to_ready']:.1f} s")
        wait_for(lambda: (v := d.vm(g.name)).get("state") == "running"
                 and v.get("reclaimer") == "punch", 300, f"a punching session with {g.name}")
        yield d, g


def guest_tseg(g: Guest) -> tuple[int, int]:
    """TSEG as the guest's MCH (PCI 00:00.0) says it, enabled by the firmware: (start, size).

    It ends at the top of RAM below 4 GiB, which is all of the guest's RAM here."""
    cfg = bytes.fromhex(g.check(
        "python3 -c \"import sys; sys.stdout.write(open('/sys/bus/pci/devices/0000:00:00.0/"
        "config', 'rb').read(256).hex())\"").strip())
    esmramc = cfg[ESMRAMC]
    assert esmramc & 1, f"the firmware did not enable TSEG (ESMRAMC {esmramc:#x})"
    sz = (esmramc >> 1) & 3
    mib = (1, 2, 8)[sz] if sz < 3 else struct.unpack_from("<H", cfg, EXT_TSEG_MBYTES)[0]
    end = MEMORY_MIB * MiB
    return end - mib * MiB, mib * MiB


def test_tseg_reported_by_a_hostile_root_is_never_punched(
        smm_guest: tuple[Aerated, Guest], tmp_path: Path) -> None:
    d, g = smm_guest
    start, size = guest_tseg(g)
    iomem = g.check("cat /proc/iomem")
    print(f"TSEG {start:#x}+{size:#x} ({size >> 20} MiB); iomem:\n{iomem}")
    # The real agent first: once stopped it has nothing in flight, so the counters below
    # move only with the hostile program's reports.
    g.check("systemctl stop aerate-agent")
    before = data_extents(g, start, size)
    # OVMF keeps its SMM code and data there: nothing to prove if it held nothing.
    assert sum(b - a for a, b in before) > 0, "TSEG holds no data in the memfd"
    counters = d.vm(g.name)

    def measure(seen: dict[str, Any]) -> tuple[list[tuple[int, int]], int]:
        return (data_extents(g, start, size),
                allocated_in(g, seen["own"][0], 2 * MiB))

    seen, (after, control_left), _ = run_hostile(
        g, ["control", "tseg"], measure, env=[f"AERATE_TSEG={start:#x}:{size:#x}"])
    acks, vm, log = seen["acks"], d.vm(g.name), d.log_text()
    print(f"acks {acks}; TSEG data before {before}, after {after}; counters "
          f"discarded {counters['discarded_bytes']} -> {vm['discarded_bytes']}, refused "
          f"{counters['refused_bytes']} -> {vm['refused_bytes']}")
    # The control: a report of the hostile root's own page is served and the memfd shows it.
    assert acks["control"] and acks["control"]["discarded"] == 2 * MiB, acks
    assert control_left == 0, f"the control page still holds {control_left} bytes"
    # TSEG: every byte that held data before still does (SMM may have written more since).
    holes = [(a, b) for a, b in before
             if not any(x <= a and b <= y for x, y in after)]
    assert not holes, f"TSEG data punched out of the memfd: {holes} (after: {after})"
    tseg = acks["tseg"]
    assert tseg and tseg["discarded"] == 0 and tseg["refused"] == size, tseg
    assert "TSEG" in tseg.get("reason", ""), tseg
    assert "TSEG" in log, log[-3000:]
    # Counted: the control's 2 MiB discarded, the whole TSEG refused.
    assert vm["discarded_bytes"] - counters["discarded_bytes"] == 2 * MiB, (counters, vm)
    assert vm["refused_bytes"] - counters["refused_bytes"] >= size, (counters, vm)
    assert d.proc.poll() is None, "aerated died"
