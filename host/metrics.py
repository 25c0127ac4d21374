"""Prometheus exposition of what aerated knows, on a localhost port (no auth: loopback only).

A custom collector reads the runners' status at scrape time, so there is no second copy
of the counters to keep in step.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

try:
    from prometheus_client.registry import Collector
except ImportError:  # prometheus_client < 0.12 (Debian 11 has 0.9): collectors are duck-typed
    Collector = object  # type: ignore[misc,assignment]

Status = Callable[[], list[dict[str, Any]]]

_COUNTERS = (
    ("reported_bytes", "aerate_reported_bytes", "Bytes the guest reported free"),
    ("discarded_bytes", "aerate_discarded_bytes", "Bytes discarded on the host"),
    ("refused_bytes", "aerate_refused_bytes", "Bytes reported but not discarded"),
    ("batches", "aerate_batches", "Report batches handled"),
    ("sessions", "aerate_sessions", "Sessions started with the guest agent"),
    ("errors", "aerate_protocol_errors", "Sessions ended by a guest protocol error"),
)


class AerateCollector(Collector):
    """Turns the daemon's per-VM status into metric families at scrape time."""

    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        """Yield every family with one sample per VM."""
        vms = self.status()
        for key, name, doc in _COUNTERS:
            fam = CounterMetricFamily(name, doc, labels=["vm"])
            for vm in vms:
                if isinstance(vm.get(key), int):
                    fam.add_metric([vm["vm"]], vm[key])
            yield fam
        backing = GaugeMetricFamily("aerate_backing_allocated_bytes",
                                    "Host memory allocated to the VM's RAM now", labels=["vm"])
        up = GaugeMetricFamily("aerate_session_running", "1 when a session is up",
                               labels=["vm", "reclaimer"])
        held = GaugeMetricFamily("aerate_guest_held_bytes",
                                 "Guest memory isolated in the agent's arena", labels=["vm"])
        aerated = GaugeMetricFamily("aerate_guest_aerated_bytes",
                                    "Agent's estimate of free and discarded guest memory",
                                    labels=["vm"])
        # The reason as a label (an "info" gauge, always 1): a refusal is visible in the
        # metrics with its words, not only as refused bytes. Cut to keep series sane.
        refused = GaugeMetricFamily("aerate_refused", "1 while the VM is refused, with why",
                                    labels=["vm", "reason"])
        for vm in vms:
            name = vm["vm"]
            if isinstance(vm.get("backing_allocated_bytes"), int):
                backing.add_metric([name], vm["backing_allocated_bytes"])
            up.add_metric([name, str(vm.get("reclaimer", "-"))],
                          1 if vm.get("state") == "running" else 0)
            if vm.get("reclaimer") == "refuse":
                refused.add_metric([name, str(vm.get("reason", ""))[:200]], 1)
            guest = vm.get("guest")
            engine = guest.get("engine") if isinstance(guest, dict) else None
            engine = engine if isinstance(engine, dict) else {}
            if isinstance(engine.get("held_bytes"), int):
                held.add_metric([name], engine["held_bytes"])
            if isinstance(engine.get("aerated_bytes"), int):
                aerated.add_metric([name], engine["aerated_bytes"])
        yield from (backing, up, held, aerated, refused)


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` for the metrics endpoint; only loopback addresses are accepted."""
    addr, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"--metrics {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9848")
    addr = addr.strip("[]")
    if not ipaddress.ip_address(addr).is_loopback:
        raise ValueError(f"--metrics {text!r}: the endpoint has no authentication; bind it to "
                         "a loopback address and put a proxy in front for remote scraping")
    return addr, int(port)


def registry(status: Status) -> CollectorRegistry:
    """A registry holding only aerate's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AerateCollector(status))
    return reg
