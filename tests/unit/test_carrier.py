"""Where held pages wait between agents: the mountinfo checks of agent/carrier.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from aerate.agent import carrier
from aerate.agent import settings as s
from aerate.agent.arena import BLOCK_BYTES

pytestmark = pytest.mark.unit
HOST = Path(__file__).resolve().parents[1] / "data/proc/host-6.18/proc/self/mountinfo"

# Written by hand after the lines systemd 252 makes on Debian 12 (dev-hugepages.mount, a
# shared peer group), then as seen from a service with PrivateMounts=yes (a slave of it),
# and a mount the service would make in its own namespace (no peer group), and a 1 GiB one.
GUEST = """\
21 27 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
27 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
23 27 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=1000k,mode=755
36 23 0:31 / /dev/hugepages rw,relatime shared:16 - hugetlbfs hugetlbfs rw,pagesize=2M
90 89 0:31 / /dev/hugepages rw,relatime master:16 - hugetlbfs hugetlbfs rw,pagesize=2M
91 89 0:44 / /run/aerate-agent/huge rw,relatime - hugetlbfs none rw,pagesize=2M
92 27 0:45 / /mnt/huge\\0401g rw,relatime shared:40 - hugetlbfs none rw,pagesize=1024M
"""


def test_parses_a_real_capture_and_finds_the_hugetlbfs_mount() -> None:
    entries = carrier.parse_mountinfo(HOST.read_text())
    assert len(entries) > 10
    e = carrier.mount_of("/tmp/htest/sub", entries)
    assert e is not None and e.fstype == "hugetlbfs" and e.mount_point == "/tmp/htest"
    assert carrier.find_problem("/tmp/htest", entries, BLOCK_BYTES) == ""
    # No systemd on this machine: the mount has no peer group, and the note says so.
    assert "private to this mount namespace" in carrier.propagation_note("/tmp/htest", entries)
    assert "not on a hugetlbfs mount" in carrier.find_problem("/tmp", entries, BLOCK_BYTES)


def test_guest_mounts_the_later_one_wins_and_peer_groups_are_read() -> None:
    entries = carrier.parse_mountinfo(GUEST)
    e = carrier.mount_of("/dev/hugepages", entries)
    assert e is not None and e.propagation == ["master:16"]
    assert carrier.find_problem("/dev/hugepages", entries, BLOCK_BYTES) == ""
    assert carrier.propagation_note("/dev/hugepages", entries) == ""
    assert carrier.propagation_note("/run/aerate-agent/huge", entries)
    assert "devtmpfs mounted on /dev" in carrier.find_problem("/dev/shm", entries, BLOCK_BYTES)
    one_g = carrier.mount_of("/mnt/huge 1g", entries)
    assert one_g is not None and one_g.mount_point == "/mnt/huge 1g"
    assert "1024 MiB pages" in carrier.find_problem("/mnt/huge 1g", entries, BLOCK_BYTES)


def test_malformed_lines_are_skipped() -> None:
    assert carrier.parse_mountinfo("garbage\n1 2 3\n") == []


def test_arena_dir_comes_from_the_environment() -> None:
    assert carrier.arena_dir_from_env({}) == "/dev/hugepages"
    assert carrier.arena_dir_from_env({carrier.ENV_ARENA_DIR: ""}) == ""
    assert "is empty" in carrier.check_dir("", BLOCK_BYTES)


def test_allow_weak_arena_is_a_guest_setting_off_by_default() -> None:
    row = s.BY_NAME["allow_weak_arena"]
    assert row.type is bool and row.default is False and row.scope == "guest"
    assert s.coerce("allow_weak_arena", "on") is True
    assert "allow_weak_arena" in s.guest_view(s.defaults())
