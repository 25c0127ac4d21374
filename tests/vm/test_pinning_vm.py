"""Issue 9: devices that pin (or may pin) guest RAM without a <hostdev>.

A real guest (the project's image) on real libvirt + QEMU (TCG) with shared memfd RAM and
a virtiofs filesystem served by a real vhost-user backend (QEMU 7.2's
/usr/lib/qemu/virtiofsd, started by libvirt): the backend gets the guest's memfd and maps
it. The real daemon logic (host/daemon.py, in this process) serves it:

1. by default the VM is refused with the vhost-user reason, and its memfd never shrinks;
2. with ``vhost_user_trusted = true`` for the VM in the host file it punches (control);
   then QEMU is made to open a *stand-in* for a pinning device mid-session: a plain file
   whose path matches a test-only extra pattern (host/pinning.py ``EXTRA_PATTERNS``),
   opened by QEMU through the monitor (``drive_add``). A stand-in because this kernel has
   no VFIO, iommufd or vDPA (no /dev/vfio). The VM must be refused from the next batch on,
   and stay refused after QEMU closed the file again.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import libvirt_qemu
import pytest
from test_hostdev import CONFIG, MiB, ram_allocated, with_daemon

from aerate.deploy.scenario import DaemonView, Hog, wait_for
from aerate.deploy.vm import Guest
from aerate.host import pinning

pytestmark = pytest.mark.vm
SHARE = Path("/var/lib/aerate-test-virtiofs")
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
VIRTIOFS_XML = (
    "<filesystem type='mount' accessmode='passthrough'>"
    "<driver type='virtiofs' queue='1024'/>"
    f"<binary path='{VIRTIOFSD}'/>"
    f"<source dir='{SHARE}'/><target dir='aerate_share'/></filesystem>"
)
SHARE.mkdir(parents=True, exist_ok=True)
GUEST_SHAPE = {"backing": "memfd", "memory_mib": 2048, "extra_devices": (VIRTIOFS_XML,)}
HOG_MIB = 1024
#: One batch can discard at most capacity (default 32) x 2 MiB.
ONE_BATCH = 32 * 2 * MiB
STANDIN_DIR = Path("/tmp/aerate-standin")


def hmp(g: Guest, line: str) -> str:
    """An HMP command in the guest's QEMU, through libvirt."""
    out: str = libvirt_qemu.qemuMonitorCommand(g.dom, line,
                                               libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    return out


def hog_freed(g: Guest) -> int:
    hog = Hog(g, HOG_MIB, hold_s=1)
    hog.start()
    hog.join()
    return ram_allocated(g)


def test_virtiofs_guest_is_refused_then_a_pinning_fd_refuses_it_again(
        guest: Guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g, name = guest, guest.name
    # The vhost-user backend is real and serves the guest.
    (SHARE / "hello").write_text("from the host\n")
    g.check("mkdir -p /mnt/share && mount -t virtiofs aerate_share /mnt/share")
    assert g.check("cat /mnt/share/hello").strip() == "from the host"
    peak = hog_freed(g)
    assert peak >= HOG_MIB * MiB

    # 1. Not trusted (the default): refused with the reason, nothing punched.
    samples: list[int] = []

    def refused(d: DaemonView) -> dict[str, Any]:
        def two() -> dict[str, Any]:
            samples.append(ram_allocated(g))
            vm = d.vm(name)
            return vm if int(vm.get("batches", 0)) >= 2 else {}
        vm = wait_for(two, 300, f"two batches from {name}", interval=0.5)
        return {"vm": vm, "log": d.log_text()}

    seen = with_daemon(tmp_path / "a", name, hostdev=False, body=refused)
    vm = seen["vm"]
    print(f"{name}: untrusted: {vm['reason']}")
    assert vm["reclaimer"] == "refuse" and "vhost-user" in vm["reason"], vm
    assert "virtiofs filesystem (vhost-user-fs)" in vm["reason"], vm
    assert "vhost_user_trusted" in seen["log"]
    assert vm["discarded_bytes"] == 0 and vm["refused_bytes"] == vm["reported_bytes"] > 0
    assert min(samples) >= peak, (peak, samples)

    # 2. Trusted: punches; then a stand-in pinning fd opened by QEMU mid-session.
    STANDIN_DIR.mkdir(mode=0o755, exist_ok=True)
    standin = STANDIN_DIR / "vfio-standin-0"
    standin.write_bytes(b"\0" * 4096)
    standin.chmod(0o644)
    monkeypatch.setattr(pinning, "EXTRA_PATTERNS", [str(STANDIN_DIR / "vfio-standin-*")])
    config = CONFIG + f'[vm."{name}"]\nvhost_user_trusted = true\n'

    def trusted(d: DaemonView) -> dict[str, Any]:
        start = ram_allocated(g)
        wait_for(lambda: d.vm(name).get("discarded_bytes", 0) > 0, 300,
                 f"a first discard of {name}", interval=0.5)
        before = d.vm(name)
        out = hmp(g, f"drive_add 0 if=none,id=standin0,file={standin},format=raw,"
                  "readonly=on")
        opened = d.vm(name)
        b0 = int(opened["batches"])
        after = wait_for(lambda: (v := d.vm(name)) and int(v["batches"]) >= b0 + 2 and v,
                         300, f"two batches of {name} after the stand-in", interval=0.5)
        mem_after = ram_allocated(g)
        with contextlib.suppress(Exception):
            hmp(g, "drive_del standin0")  # closed again: the VM must stay refused
        later = wait_for(lambda: (v := d.vm(name)) and int(v["batches"]) >= b0 + 3 and v,
                         300, f"one more batch of {name}", interval=0.5)
        return {"start": start, "before": before, "opened": opened, "after": after,
                "later": later, "mem_after": mem_after, "hmp": out,
                "end_mem": ram_allocated(g), "log": d.log_text()}

    seen = with_daemon(tmp_path / "b", name, hostdev=False, body=trusted, config=config)
    opened, after, later = seen["opened"], seen["after"], seen["later"]
    print(json.dumps({k: seen[k] for k in ("start", "mem_after", "end_mem", "hmp")}))
    print(f"{name}: discarded {seen['before']['discarded_bytes'] >> 20} MiB before the "
          f"stand-in, {opened['discarded_bytes'] >> 20} MiB when it opened, "
          f"{after['discarded_bytes'] >> 20} MiB two batches later; reason: {after['reason']}")
    assert seen["before"]["reclaimer"] == "punch", seen["before"]
    assert "QEMU holds" in after["reason"] and str(standin) in after["reason"], after
    # Within one batch: at most the batch in flight when QEMU opened it was discarded.
    assert after["discarded_bytes"] - opened["discarded_bytes"] <= ONE_BATCH, (opened, after)
    assert later["discarded_bytes"] == after["discarded_bytes"], (after, later)
    assert "QEMU holds" in later["reason"], later
    assert "which can pin guest RAM for DMA" in seen["log"], seen["log"][-3000:]
    assert seen["end_mem"] >= seen["mem_after"], seen
