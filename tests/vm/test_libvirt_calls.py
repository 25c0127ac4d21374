"""S8 in libvirt's client: a VM whose QEMU stopped answering its monitor never delays
another VM's libvirt calls (host/libvirt_conn.py, "Calls").

Real libvirtd, two real QEMUs (64 MiB, no disk, no guest: only their monitors matter) and
the daemon's own LibvirtConnection. A's QEMU is SIGSTOPped and a query-migrate for it is
left hanging on one thread, as the daemon's refresh would; meanwhile other threads ask for
B's job state and query-migrate, as B's refreshes do. On one shared connection each of B's
calls waited for the client's next keepalive tick (5 s, again and again: measured before
the call connections), which times B's refresh out and refuses B.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import libvirt
import pytest

from aerate.host.libvirt_conn import PID_DIR, DomainError, LibvirtConnection

pytestmark = [pytest.mark.vm, pytest.mark.fault]
XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator><video><model type='none'/></video>
<memballoon model='none'/></devices></domain>"""
WATCH_S = 12.0  # more than two keepalive periods of the event connection (5 s)


def pid_of(name: str) -> int:
    with open(os.path.join(PID_DIR, f"{name}.pid")) as f:
        return int(f.read().strip())


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:8]
    names = (f"aerate-test-calls-{tag}-a", f"aerate-test-calls-{tag}-b")
    c = libvirt.open("qemu:///system")
    doms = []
    try:
        for n in names:
            doms.append(c.createXML(XML.format(name=n), 0))
        yield names
    finally:
        for d in doms:
            with contextlib.suppress(OSError, ValueError, libvirt.libvirtError):
                os.kill(pid_of(d.name()), signal.SIGCONT)
            with contextlib.suppress(libvirt.libvirtError):
                d.destroy()
        c.close()


def test_a_stuck_monitor_call_delays_no_other_vms_calls(pair: tuple[str, str]) -> None:
    a, b = pair
    conn = LibvirtConnection()
    conn.start()
    try:
        assert conn.wait_connected(15), "no connection to qemu:///system"
        assert conn.qmp(b, "query-migrate", None) is not None
        os.kill(pid_of(a), signal.SIGSTOP)
        ended = threading.Event()

        def stuck() -> None:
            with contextlib.suppress(DomainError):
                conn.qmp(a, "query-migrate", None)   # never answered while A is stopped
            ended.set()

        threading.Thread(target=stuck, name="stuck-call", daemon=True).start()
        time.sleep(0.5)
        assert not ended.is_set(), "A's call should hang while its QEMU is stopped"

        def refresh_b() -> float:
            t0 = time.monotonic()
            conn.job_info(b)
            conn.qmp(b, "query-migrate", None)
            return time.monotonic() - t0

        took = []
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            end = time.monotonic() + WATCH_S
            while time.monotonic() < end:
                took.append(pool.submit(refresh_b).result(timeout=30))
                time.sleep(0.2)
        print(f"B's refresh beside A's stuck call: {len(took)} of them, worst "
              f"{max(took) * 1e3:.0f} ms, median {sorted(took)[len(took) // 2] * 1e3:.0f} ms")
        assert not ended.is_set()
        assert max(took) < 1.0, took   # one shared connection: 5 s, every few calls
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(pid_of(a), signal.SIGCONT)
        conn.stop()
