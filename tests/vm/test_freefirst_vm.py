"""Free first on a real guest (issue 14): cold page cache becomes host memory.

A Debian 12 guest (Linux 6.1, cgroup v2, no swap) writes and reads a 1 GiB file once, so
that about 1 GiB of its RAM is page cache nobody uses. Free page reporting cannot return
it (it is not free): with the stage off, the host keeps backing it. Switched on live with
``aeratectl set VM free_first=true``, the agent's stage reclaims it through the root
cgroup's ``memory.reclaim`` (agent/freefirst.py) and the ordinary cycle reports what became
free: the host's backing of the guest, read from the kernel (the RAM memfd's st_blocks),
must fall by at least 512 MiB, the guest's cache must stay above the floor, and
aerate-checker must find no corrupted page.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aerate.deploy.image import GuestImage, cache_dir
from aerate.deploy.scenario import (
    Aerated,
    ScenarioError,
    aerated,
    checker_result,
    guest_meminfo,
    ram_allocated,
    scratch_disk,
    start_checker,
    steady_of,
    wait_for,
)
from aerate.deploy.vm import Guest, booted

pytestmark = pytest.mark.vm
MiB = 1 << 20
FLOOR_MIB = 128
CONFIG = "[defaults]\nreserve_mib = 128\nhwm = 8\nstats_interval_s = 1\n"



@pytest.fixture
def served(guest_image: GuestImage, tmp_path: Path) -> Iterator[tuple[Guest, Aerated, Path]]:
    run = tmp_path / "run"
    # The image's root has about 1 GiB free: the cold files go on a scratch disk, a sparse
    # file beside the image cache (on a disk: /tmp may be RAM).
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aerate-test-cold-", dir=cache_dir()) as tmp:
        disk = scratch_disk(Path(tmp) / "cold.raw", 1536, "aerate-cold")
        with booted(guest_image, backing="memfd", memory_mib=2048,
                    extra_devices=(disk,)) as g, aerated(run, CONFIG, ("--vm", g.name)) as d:
            g.check("mkdir -p /mnt/cold && (mount -L aerate-cold /mnt/cold || "
                    "mount /dev/vdb /mnt/cold)")
            wait_for(lambda: d.pass_over(g.name), 600, "the first pass", 2)
            yield g, d, run


def test_free_first_turns_cold_page_cache_into_host_memory(
        served: tuple[Guest, Aerated, Path]) -> None:
    g, d, run = served
    # 1 GiB of cold page cache: written (and synced) once, read once, never again.
    g.check("dd if=/dev/urandom of=/mnt/cold/f bs=1M count=1024 conv=fsync status=none && "
            "cat /mnt/cold/f > /dev/null", 900)
    cached = guest_meminfo(g)["Cached"]
    assert cached >= 900 * MiB, f"the guest caches only {cached >> 20} MiB"
    start_checker(g, mib=128, duration=240)
    wait_for(lambda: d.pass_over(g.name), 300, "the agent to go idle", 2)
    off = steady_of(lambda: ram_allocated(g), 6.0, 120.0)
    assert d.guest(g.name, "free_first").get("state") == "off", d.guest(g.name, "free_first")
    # Free page reporting alone: the cache is not free, so the host keeps backing it.
    time.sleep(15)
    still = ram_allocated(g)
    assert still >= off - 64 * MiB, (off >> 20, still >> 20)
    p = subprocess.run([sys.executable, "-m", "aerate.host.ctl", "--run-dir", str(run), "set",
                        g.name, "free_first=true", "free_first_mib_s=128",
                        f"free_first_cache_floor_mib={FLOOR_MIB}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.stdout, p.stderr)
    t0 = time.monotonic()
    try:
        wait_for(lambda: ram_allocated(g) <= off - 512 * MiB, 240,
                 "the host backing to fall by 512 MiB once free first is on", 2)
    except ScenarioError as e:
        journal = g.check("journalctl -u aerate-agent -b --no-pager -o cat | tail -30")
        raise AssertionError(f"{e}: host backing {off >> 20} -> {ram_allocated(g) >> 20} "
                             f"MiB; stage {d.guest(g.name, 'free_first')}; agent journal:\n"
                             f"{journal}") from e
    took = time.monotonic() - t0
    after = guest_meminfo(g)
    st = d.guest(g.name, "free_first")
    print(f"free first: host backing {off >> 20} -> {ram_allocated(g) >> 20} MiB in "
          f"{took:.0f} s; guest cache {cached >> 20} -> {after['Cached'] >> 20} MiB; "
          f"stage {st}")
    assert st.get("reclaimed_bytes", 0) >= 512 * MiB, st
    # The floor counts file LRU pages; Cached also holds shmem and the like, so it is at
    # least what the floor keeps.
    assert after["Cached"] >= FLOOR_MIB * MiB, after["Cached"] >> 20
    result = checker_result(g)
    assert result["corrupted"] == 0 and result["pages_checked"] > 0, result
