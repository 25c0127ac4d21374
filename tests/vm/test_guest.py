"""One real guest (TCG here, KVM where it works): the agent under systemd, the channel, the sandbox,
and a minute of the checker workload with no page corrupted.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from aerate.agent.protocol import HostEndpoint
from aerate.deploy.domain import AGENT_PORT
from aerate.deploy.vm import Guest

pytestmark = pytest.mark.vm
GUEST_SHAPE = {"backing": "memfd", "memory_mib": 1024}
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Unit keys that run the agent rather than confine it: left out of the sandbox probe unit.
RUNTIME_KEYS = {"Type", "NotifyAccess", "ExecStart", "WatchdogSec", "Restart", "RestartSec",
                "FileDescriptorStoreMax", "RuntimeDirectoryPreserve"}


def test_agent_is_an_active_systemd_service(guest: Guest) -> None:
    assert guest.check("cat /proc/1/comm").strip() == "systemd"
    rc, out, _ = guest.run("systemctl is-active aerate-agent")
    assert (rc, out.strip()) == (0, "active")
    props = dict(line.split("=", 1) for line in guest.check(
        "systemctl show aerate-agent -p Type -p NRestarts -p MainPID -p BindsTo "
        "-p FileDescriptorStoreMax -p ExecStart -p FragmentPath").splitlines() if "=" in line)
    assert props["Type"] == "notify"
    # It runs from the Debian packages the image build installed with dpkg -i, as an
    # operator would: the program, the unit and the udev rule are the packages' files.
    assert "path=/usr/sbin/aerate-agent " in props["ExecStart"]
    assert props["FragmentPath"] == "/lib/systemd/system/aerate-agent.service"
    owners = guest.check("dpkg -S /usr/sbin/aerate-agent /lib/systemd/system/aerate-agent.service "
                         "/lib/udev/rules.d/99-aerate-agent.rules "
                         "/usr/lib/python3/dist-packages/aerate/agent/service.py")
    assert [line.split(":")[0] for line in owners.splitlines()] == [
        "aerate-agent", "aerate-agent", "aerate-agent", "python3-aerate"], owners
    status = guest.check("dpkg-query -W -f='${Package} ${db:Status-Status}\\n' "
                         "aerate-agent python3-aerate")
    assert sorted(status.split("\n")[:2]) == ["aerate-agent installed",
                                               "python3-aerate installed"], status
    assert props["NRestarts"] == "0", "the agent restarted: it crashed or missed its watchdog"
    assert int(props["MainPID"]) > 1
    # systemctl show quotes and re-escapes the unit name: compare its parts.
    assert "dev-virtio" in props["BindsTo"] and f"{AGENT_PORT}.device" in props["BindsTo"]
    # Its port device is what started it, and the device is there.
    assert guest.check(f"readlink -f /dev/virtio-ports/{AGENT_PORT}").startswith("/dev/vport")
    # Its lines reach the journal at their priorities (the <N> prefix read by journald):
    # the start line is info, so -p warning leaves it out.
    start = json.loads(guest.check(
        "journalctl -u aerate-agent -b -o json --no-pager | grep 'aerate-agent [0-9.]* on' "
        "| tail -1"))
    assert start["PRIORITY"] == "6" and not start["MESSAGE"].startswith("<"), start
    assert "aerate-agent" not in guest.check(
        "journalctl -u aerate-agent -b -p warning -o cat --no-pager | "
        "grep 'aerate-agent [0-9.]* on' || true")


def test_memfd_guest_has_no_kernel_free_page_reporting_unless_asked(guest: Guest) -> None:
    features = guest.check("cat /sys/bus/virtio/drivers/virtio_balloon/virtio*/features")
    assert features.strip()[5] == "0"  # VIRTIO_BALLOON_F_REPORTING: off by default


def test_host_and_agent_exchange_sync_and_hello(guest: Guest) -> None:
    """The host end of org.aerate.agent.0: 0xFF + sync with a fresh nonce, answered in kind."""
    host = HostEndpoint()
    nonce, session = random.getrandbits(63), random.getrandbits(31) + 1
    host.start(nonce=nonce, session=session, granule=2 << 20)
    events: list[tuple[str, object]] = []
    with guest.open_channel(timeout=5.0) as sock:
        sock.sendall(host.take_outbox())
        deadline = time.monotonic() + 60
        while not any(kind == "hello" for kind, _ in events):
            assert time.monotonic() < deadline, f"no hello from the agent in 60 s: {events}"
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            assert data, "the guest end closed the channel"
            events += host.receive(data)
    hello = dict(events)["hello"]
    assert isinstance(hello, dict)
    assert hello["nonce"] == nonce and hello["session"] == session
    assert not [e for e in events if e[0] == "error"], events
    # The agent says what this kernel offers it, each with a line an operator can read: in
    # this guest the preferred arena and the re-validation work, and the kernel's own free
    # page reporting is off (no freePageReporting on the domain's balloon).
    caps = hello["capabilities"]
    assert all(c["detail"] for c in caps.values()), caps
    for name in ("memfd_hugetlb", "madv_populate_write", "pagemap_pfn", "kpageflags", "psi"):
        assert caps[name]["available"], (name, caps[name])
    assert not caps["free_page_reporting"]["available"]


def _probe_unit(service_text: str) -> str:
    """aerate-agent.service's [Service] sandbox around the probe, as a oneshot unit."""
    section, kept = "", []
    for line in service_text.splitlines():
        s = line.strip()
        if s.startswith("["):
            section = s
            continue
        if section != "[Service]" or not s or s.startswith("#"):
            continue
        if s.split("=", 1)[0] not in RUNTIME_KEYS:
            kept.append(s)
    return "\n".join(["[Service]", "Type=oneshot",
                      "ExecStart=/usr/bin/python3 /run/aerate-sandbox-probe.py", *kept, ""])


def test_agent_sandbox_allows_pagemap_kpageflags_and_hugetlb(guest: Guest) -> None:
    """Under the unit's exact hardening: PFNs, kpageflags, surplus hugetlb, mlock; /etc not."""
    unit = _probe_unit((REPO / "systemd/aerate-agent.service").read_text())
    rc, _, err = guest.run("cat > /run/aerate-sandbox-probe.py",
                           stdin=(HERE / "sandbox_probe.py").read_bytes())
    assert rc == 0, err
    rc, _, err = guest.run("cat > /run/systemd/system/aerate-sandbox-probe.service",
                           stdin=unit.encode())
    assert rc == 0, err
    # The agent is stopped meanwhile: a session of the test above may have left it
    # holding the guest's free 2 MiB blocks in its arena (until their lease runs out), and
    # the probe must fault one hugetlb page. Its stop waits out those leases.
    rc, out, err = guest.run(
        "systemctl stop aerate-agent; "
        "systemctl daemon-reload && systemctl start aerate-sandbox-probe.service; rc=$?; "
        "journalctl -b --no-pager -o cat -u aerate-sandbox-probe.service | grep '^{'; "
        "systemctl start aerate-agent; exit $rc", timeout=180)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, f"probe printed nothing (rc {rc}): {out} {err}"
    results = json.loads(lines[-1])
    assert rc == 0, results
    assert isinstance(results["pagemap_pfn"], int)
    assert results["etc_read_only"].startswith("denied")


def test_checker_runs_a_minute_without_corruption(guest: Guest) -> None:
    rc, out, _err = guest.run(
        "aerate-checker --mib 256 --chunk-mib 4 --free-fraction 0.5 --churn 2 --duration 60",
        timeout=300)
    summary = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and summary["corrupted"] == 0, summary
    assert summary["passes"] >= 2 and summary["pages_checked"] > summary["kept_pages"], summary
    assert summary["seconds"] >= 60


def test_checker_catches_a_zeroed_page_in_the_guest(guest: Guest) -> None:
    """The checker is not blind: a page zeroed behind its back (what a wrong discard does)."""
    rc, out, _ = guest.run("aerate-checker --mib 16 --duration 0 --inject-zero-pages 2")
    summary = json.loads(out.strip().splitlines()[-1])
    assert rc == 1 and summary["corrupted"] == 2, summary
    assert all(c["zero_page"] for c in summary["first_corruptions"])
