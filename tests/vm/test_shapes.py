"""The other domain shapes boot for real and are what they claim: hugetlbfs-backed RAM on
reserved host hugepages (given back afterwards), and private RAM with the kernel's own free
page reporting negotiated. And what a killed test session leaves behind is cleaned up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest

from aerate.deploy.domain import DomainSpec, domain_xml
from aerate.deploy.image import GuestImage
from aerate.deploy.vm import HUGEPAGES_2M, Guest, booted, connect, reap_stale, run_dir

pytestmark = pytest.mark.vm
BALLOON_F_REPORTING = 5  # VIRTIO_BALLOON_F_REPORTING


def qemu_cmdline(g: Guest) -> str:
    pid = Path(f"/run/libvirt/qemu/{g.name}.pid").read_text().strip()
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def balloon_features(g: Guest) -> str:
    return g.check("cat /sys/bus/virtio/drivers/virtio_balloon/virtio*/features").strip()


def pool() -> tuple[int, int]:
    return (int((HUGEPAGES_2M / "nr_hugepages").read_text()),
            int((HUGEPAGES_2M / "free_hugepages").read_text()))


def test_hugetlbfs_guest_runs_on_reserved_host_hugepages(
        guest_image: GuestImage, note_boot: Callable[[Guest], None]) -> None:
    nr_before, _ = pool()
    with booted(guest_image, backing="hugetlbfs", memory_mib=512) as g:
        note_boot(g)
        nr, free = pool()
        assert nr - nr_before == 256, "the harness did not reserve the guest's 2 MiB pages"
        assert free < nr, "no hugepage in use: the guest is not on hugetlb memory"
        cmd = qemu_cmdline(g)
        assert "memory-backend-memfd" in cmd and '"hugetlb":true' in cmd, cmd
        assert g.check("systemctl is-active aerate-agent").strip() == "active"
    assert pool()[0] == nr_before, "the reserved hugepages were not given back"


def test_private_guest_negotiates_kernel_free_page_reporting(
        guest_image: GuestImage, note_boot: Callable[[Guest], None]) -> None:
    with booted(guest_image, backing="private", memory_mib=768,
                free_page_reporting=True) as g:
        note_boot(g)
        assert "memory-backend-memfd" not in qemu_cmdline(g)
        assert balloon_features(g)[BALLOON_F_REPORTING] == "1"
        assert g.check("systemctl is-active aerate-agent").strip() == "active"


def test_harness_reaps_what_a_killed_session_left(guest_image: GuestImage,
                                                   tmp_path: Path) -> None:
    """A harness killed by SIGKILL leaves a domain and its work dir; the next boot reaps them."""
    name = f"aerate-test-orphan{os.getpid()}"
    work = run_dir() / name
    work.mkdir(parents=True)
    (work / "owner").write_text("999999999 1\n")  # no such process
    disk = work / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(guest_image.root),
                    "-F", "raw", str(disk)], check=True)
    spec = DomainSpec(name=name, kernel=guest_image.kernel, initrd=guest_image.initrd,
                      disk=disk, agent_socket=work / "aerate.sock",
                      serial_log=tmp_path / "serial.log")
    conn = connect()
    try:
        conn.createXML(domain_xml(spec), libvirt.VIR_DOMAIN_START_PAUSED)
        assert name in reap_stale(conn)
        assert name not in [d.name() for d in conn.listAllDomains()]
        assert not work.exists()
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name).destroy()
        shutil.rmtree(work, ignore_errors=True)
        conn.close()
