"""An older real guest (issue 12): Debian 11 (kernel 5.10, Python 3.9, systemd 247) with the
same Debian packages as the Debian 12 image, installed the same way (deploy/image.py
install_agent: ``dpkg -i``). One boot: the agent runs as its systemd service, a free of
512 MiB in the guest comes back to the host, and status and explain name what this kernel
does not offer the agent: no MADV_POPULATE_WRITE (5.14), no cgroup ``memory.reclaim`` for
free first (5.19). Its io_uring pins held pages (Debian's 5.10 has the sparse buffer tables
upstream got in 5.13). systemd 247 has no fd-store preserve (254): it ignores that one key
of the unit, and the agent keeps its held pages in the named file on /dev/hugepages, which
needs none (agent/carrier.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aerate.deploy.scenario import Aerated, aerated, hog_comes_back, wait_for
from aerate.deploy.vm import Guest
from aerate.host.ctl import format_explain, format_status, request

pytestmark = pytest.mark.vm
# The conftest's ``guest`` boots this module's guest from the bullseye_image fixture.
GUEST_SUITE = "bullseye"
GUEST_SHAPE = {"backing": "memfd", "memory_mib": 1024}
MiB = 1 << 20
HOG_MIB = 512
RESERVE_MIB = 64
#: What a 5.10 kernel lacks, whatever the domain: MADV_POPULATE_WRITE came in 5.14, cgroup
#: v2 memory.reclaim (the free-first stage) in 5.19.
LACKS = ("madv_populate_write", "free_first")
#: What the agent needs and 5.10 has, as on Debian 12 (tests/vm/test_guest.py).
HAS = ("hugetlb_2m", "memfd_hugetlb", "pagemap_pfn", "kpageflags", "poison_safe")


@pytest.fixture(scope="module")
def daemon(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Aerated]:
    run: Path = tmp_path_factory.mktemp("aerated-bullseye")
    config = f"[defaults]\nreserve_mib = {RESERVE_MIB}\nhwm = 8\nstats_interval_s = 1\n"
    with aerated(run, config, ("--vm", guest.name)) as d:
        wait_for(lambda: d.pass_over(guest.name), 600, f"the first pass on {guest.name}", 2)
        yield d


def test_it_is_debian_11_with_the_agent_as_its_service(guest: Guest) -> None:
    """The right image (so nothing below silently ran on Debian 12), and the packaged agent
    started by systemd 247 from its port device."""
    assert guest.check("cat /etc/debian_version").startswith("11."), \
        guest.check("cat /etc/debian_version")
    assert guest.check("uname -r").startswith("5.10."), guest.check("uname -r")
    assert guest.check("python3 --version").split()[1].startswith("3.9."), \
        guest.check("python3 --version")
    assert guest.check("systemctl --version").split()[1] == "247", \
        guest.check("systemctl --version")
    assert guest.check("cat /proc/1/comm").strip() == "systemd"
    rc, out, _ = guest.run("systemctl is-active aerate-agent")
    assert (rc, out.strip()) == (0, "active")
    props = dict(line.split("=", 1) for line in guest.check(
        "systemctl show aerate-agent -p Type -p NRestarts -p ExecStart -p FragmentPath"
    ).splitlines() if "=" in line)
    assert props["Type"] == "notify" and props["NRestarts"] == "0", props
    assert "path=/usr/sbin/aerate-agent " in props["ExecStart"], props
    assert props["FragmentPath"] == "/lib/systemd/system/aerate-agent.service", props
    status = guest.check("dpkg-query -W -f='${Package} ${db:Status-Status}\\n' "
                         "aerate-agent python3-aerate")
    assert sorted(status.split("\n")[:2]) == ["aerate-agent installed",
                                               "python3-aerate installed"], status
    # systemd 247 knows every key of the unit but one, FileDescriptorStorePreserve= (254+),
    # and ignores that one with a warning, as 252 does (tests/unit/test_units.py).
    said = guest.check("journalctl -b --no-pager -o cat | "
                       "grep '^/lib/systemd/system/aerate-agent.service:' | sort -u || true")
    assert [line.split(": ", 1)[1] for line in said.splitlines()] == [
        "Unknown key name 'FileDescriptorStorePreserve' in section 'Service', ignoring."], said


def test_freed_memory_comes_back_to_the_host(guest: Guest, daemon: Aerated) -> None:
    g, d = guest, daemon
    vm = d.vm(g.name)
    assert vm["reclaimer"] == "punch", vm["reason"]
    target = 0.75 * (HOG_MIB - RESERVE_MIB) * MiB
    returned, took = hog_comes_back(d, g, HOG_MIB, 5, target)
    print(f"Debian 11: {returned / MiB:.0f} MiB of {HOG_MIB} MiB freed came back to the host "
          f"in {took:.1f} s")
    vm = d.vm(g.name)
    assert vm.get("errors") == 0 and vm.get("discarded_bytes", 0) >= target, vm
    assert vm.get("content_refused_batches") == 0, vm


def test_status_and_explain_show_what_the_kernel_lacks(guest: Guest, daemon: Aerated) -> None:
    caps = daemon.vm(guest.name)["capabilities"]
    print("\n".join(f"{n}: {'yes' if c['available'] else 'no'} ({c['detail']})"
                    for n, c in sorted(caps.items())))
    for name in LACKS:
        assert not caps[name]["available"], (name, caps[name])
    assert "< 5.14" in caps["madv_populate_write"]["detail"], caps["madv_populate_write"]
    for name in HAS:
        assert caps[name]["available"], (name, caps[name])
    text = format_status(request({"cmd": "status"}, str(daemon.run_dir)))
    print(text)
    lacking = [line for line in text.splitlines() if "guest kernel lacks" in line]
    assert lacking and all(name in lacking[0] for name in LACKS), text
    # No fd-store preserve on systemd 247 is no capability the agent reports, and it need
    # not be: held pages wait in the named file on /dev/hugepages, which outlives the agent
    # without the fd store (agent/carrier.py).
    assert daemon.vm(guest.name)["arena"] == "hugetlb"
    start = guest.check("journalctl -u aerate-agent -b -o cat --no-pager | "
                        "grep 'aerate-agent [0-9.]* on' | tail -1")
    assert "arena in /dev/hugepages/aerate-agent-arena (outlives the agent without the fd " \
        "store)" in start, start
    explained = format_explain(request({"cmd": "explain", "vm": guest.name},
                                       str(daemon.run_dir)))
    print(explained)
    assert "madv_populate_write no (MADV_POPULATE_WRITE unknown to this kernel" in explained
    # Debian 11's 5.10 carries the io_uring of later stable kernels (sparse buffer tables,
    # 5.13 upstream): held pages are pinned there as on Debian 12, so the arena tells no
    # weakness and status and explain show none.
    counters = daemon.guest(guest.name, "engine").get("arena_counters") or {}
    print(f"arena counters: {counters}")
    assert counters.get("pin_unavailable") == 0 and counters.get("pin_failed") == 0, counters
    assert daemon.vm(guest.name)["arena_weakness"] is None
    assert "arena weakness" not in text and "arena has a weakness" not in explained
    assert "free_first no (" in explained, explained
