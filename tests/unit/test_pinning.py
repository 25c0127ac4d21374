"""The scan of QEMU's fds for devices that pin guest RAM, on a fake /proc tree.

The tree is real symlinks under tmp_path, laid out as /proc/<pid>/fd/<n> -> target is on a
live system (readlink answers the target path; the targets need not exist).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aerate.host import pinning

pytestmark = pytest.mark.unit
QEMU_FDS = {"0": "/dev/null", "1": "pipe:[1234]", "3": "socket:[99]",
            "8": "/memfd:memory-backend-memfd (deleted)", "12": "/dev/kvm",
            "13": "anon_inode:kvm-vm", "20": "/dev/net/tun", "21": "/dev/vhost-net"}


def fake_proc(tmp_path: Path, pid: int, fds: dict[str, str]) -> str:
    fd_dir = tmp_path / str(pid) / "fd"
    fd_dir.mkdir(parents=True)
    for n, target in fds.items():
        os.symlink(target, fd_dir / n)
    return str(tmp_path)


def test_a_plain_qemu_holds_nothing_that_pins(tmp_path: Path) -> None:
    assert pinning.scan(42, fake_proc(tmp_path, 42, QEMU_FDS)) == ""


@pytest.mark.parametrize("target", ["/dev/vfio/vfio", "/dev/vfio/12", "/dev/iommu",
                                    "/dev/vhost-vdpa-0", "/dev/vfio/devices/vfio0"])
def test_each_pinning_device_is_found(tmp_path: Path, target: str) -> None:
    found = pinning.scan(42, fake_proc(tmp_path, 42, dict(QEMU_FDS, **{"40": target})))
    assert found == f"{target} (fd 40 of pid 42)"


@pytest.mark.parametrize("target", ["/dev/vfiox", "/dev/iommu0", "/dev/vhost-net",
                                    "/tmp/dev/vfio/1", "/dev/vhost-vsock"])
def test_look_alikes_do_not_count(tmp_path: Path, target: str) -> None:
    assert pinning.scan(42, fake_proc(tmp_path, 42, dict(QEMU_FDS, **{"40": target}))) == ""


def test_unreadable_or_missing_process_refuses(tmp_path: Path) -> None:
    assert "cannot be checked" in pinning.scan(7, str(tmp_path))
    assert "unknown QEMU" in pinning.scan(None, str(tmp_path))


def test_extra_patterns_are_for_stand_ins(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 42, dict(QEMU_FDS, **{"50": "/tmp/standin-vfio-1"}))
    assert pinning.scan(42, proc) == ""
    assert "/tmp/standin-vfio-1" in pinning.scan(42, proc, ["/tmp/standin-vfio-*"])
