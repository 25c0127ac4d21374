"""Prometheus exposition of what aerated knows, on a localhost port (no auth: loopback only).

A custom collector reads the runners' status at scrape time, so there is no second copy
of the counters to keep in step.
"""

from __future__ import annotations

import ipaddress
import platform
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

try:
    from prometheus_client.registry import Collector
except ImportError:  # prometheus_client < 0.12 (Debian 11 has 0.9): collectors are duck-typed
    Collector = object  # type: ignore[misc,assignment]

from aerate import __version__
from aerate.host.pressure import EFFECTIVE, HostMemory

Status = Callable[[], list[dict[str, Any]]]
Connected = Callable[[], bool]
HostSample = Callable[[], HostMemory]

_COUNTERS = (
    ("reported_bytes", "aerate_reported_bytes", "Bytes the guest reported free"),
    ("discarded_bytes", "aerate_discarded_bytes", "Bytes discarded on the host"),
    ("refused_bytes", "aerate_refused_bytes", "Bytes reported but not discarded"),
    ("batches", "aerate_batches", "Report batches handled"),
    ("sessions", "aerate_sessions", "Sessions started with the guest agent"),
    ("errors", "aerate_protocol_errors", "Sessions ended by a guest protocol error"),
)
#: Counters from a status sub-dict (sub-dict, key): refusals by reason, verified reclaim,
#: probes.
_REFUSED_BY = (
    ("lease", "refused_bytes", "aerate_lease_refused_bytes",
     "Bytes refused because the report's lease token was stale or missing"),
    ("budget", "refused_bytes", "aerate_budget_refused_bytes",
     "Bytes refused by the VM's discard budget"),
    # host/verify.py: what the host backing really fell per discard, and what it did not.
    ("reclaim", "verified_bytes", "aerate_discard_verified_bytes",
     "Discarded bytes the backing file's allocation was seen to fall by (host/verify.py)"),
    ("reclaim", "unverified_bytes", "aerate_discard_unverified_bytes",
     "Discarded bytes the backing did not show freed: already holes, re-faulted, or hidden "
     "by the guest's faults during the punch"),
    # agent/protocol.py "Probes", host/probe.py: the guest's beliefs the host found stale.
    ("probes", "answered", "aerate_probes_answered", "Guest probes answered"),
    ("probes", "backed_bytes", "aerate_probe_backed_bytes",
     "Bytes of probed ranges found backed: memory the guest believed discarded"),
)
_BALLOON = (
    ("target_bytes", "aerate_balloon_target_bytes", "Balloon target: guest memory asked for"),
    ("actual_bytes", "aerate_balloon_actual_bytes", "Guest memory the balloon leaves now"),
    ("max_bytes", "aerate_balloon_max_bytes", "The VM's maximum memory"),
    ("floor_bytes", "aerate_balloon_floor_bytes", "Smallest target aerate ever sets"),
    ("held_back_bytes", "aerate_balloon_held_back_bytes",
     "Guest memory the balloon holds back from the guest now (max - actual)"),
)


class AerateCollector(Collector):
    """Turns the daemon's per-VM status into metric families at scrape time.

    Label sets are bounded: ``vm`` and ``uuid`` by the VMs on the host, ``reclaimer`` by
    punch/balloon/kernel/refuse/unmanaged/starting, ``reason`` by host/refusal.py's fixed
    categories (the free-text reason is in ``aeratectl status``/``explain``), ``level`` by
    host/pressure.py's three levels, ``key`` by host/pressure.py's EFFECTIVE (four names;
    a key a status lacks is left out, never invented).
    """

    def __init__(self, status: Status, connected: Connected | None = None,
                 host: HostSample | None = None) -> None:
        self.status = status
        self.connected = connected
        self.host = host

    def collect(self) -> Iterator[Metric]:
        """Yield every family with one sample per VM."""
        vms = self.status()
        build = GaugeMetricFamily("aerate_build_info", "aerated's version (always 1)",
                                  labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        if self.connected is not None:
            yield GaugeMetricFamily("aerate_libvirt_connected",
                                    "1 while aerated is connected to libvirtd",
                                    value=1 if self.connected() else 0)
        if self.host is not None:
            yield from _host_families(self.host())
        for key, name, doc in _COUNTERS:
            fam = CounterMetricFamily(name, doc, labels=["vm"])
            for vm in vms:
                if isinstance(vm.get(key), int):
                    fam.add_metric([vm["vm"]], vm[key])
            yield fam
        for sub, key, name, doc in _REFUSED_BY:
            fam = CounterMetricFamily(name, doc, labels=["vm"])
            for vm in vms:
                part = vm.get(sub)
                if isinstance(part, dict) and isinstance(part.get(key), int):
                    fam.add_metric([vm["vm"]], part[key])
            yield fam
        backing = GaugeMetricFamily("aerate_backing_allocated_bytes",
                                    "Host memory allocated to the VM's RAM now (only where "
                                    "its backing was proven)", labels=["vm"])
        up = GaugeMetricFamily("aerate_session_running", "1 when a session is up",
                               labels=["vm", "reclaimer"])
        held = GaugeMetricFamily("aerate_guest_held_bytes",
                                 "Guest memory isolated in the agent's arena", labels=["vm"])
        aerated = GaugeMetricFamily("aerate_guest_aerated_bytes",
                                    "Agent's estimate of free and discarded guest memory",
                                    labels=["vm"])
        info = GaugeMetricFamily("aerate_vm_info", "Every VM aerated knows (always 1): its "
                                 "reclaimer and the category of why", labels=[
                                     "vm", "uuid", "reclaimer", "reason"])
        refused = GaugeMetricFamily("aerate_refused", "1 while the VM is refused, by reason "
                                    "category", labels=["vm", "reason"])
        by_reason = GaugeMetricFamily("aerate_vms_refused", "VMs refused now, by reason "
                                      "category", labels=["reason"])
        effective = GaugeMetricFamily(
            "aerate_effective_setting", "The VM's settings that host pressure changes, as "
            "it gets them now (key: " + ", ".join(EFFECTIVE) + "; host/pressure.py)",
            labels=["vm", "key"])
        level = GaugeMetricFamily("aerate_host_pressure", "1 at the VM's host memory level "
                                  "(plenty, firmer, firm: host/pressure.py)",
                                  labels=["vm", "level"])
        balloons = [(GaugeMetricFamily(name, doc, labels=["vm"]), key)
                    for key, name, doc in _BALLOON]
        counts: dict[str, int] = {}
        for vm in vms:
            name = vm["vm"]
            reclaimer = str(vm.get("reclaimer", "starting"))
            category = str(vm.get("category", "other"))
            info.add_metric([name, str(vm.get("uuid", "")), reclaimer, category], 1)
            if isinstance(vm.get("backing_allocated_bytes"), int):
                backing.add_metric([name], vm["backing_allocated_bytes"])
            up.add_metric([name, reclaimer], 1 if vm.get("state") == "running" else 0)
            if isinstance(vm.get("host_pressure"), str):
                level.add_metric([name, vm["host_pressure"]], 1)
            eff = vm.get("effective")
            eff = eff if isinstance(eff, dict) else {}
            for key in EFFECTIVE:
                if isinstance(eff.get(key), (int, float)):
                    effective.add_metric([name, key], eff[key])
            if reclaimer == "refuse":
                refused.add_metric([name, category], 1)
                counts[category] = counts.get(category, 0) + 1
            bal = vm.get("balloon")
            if isinstance(bal, dict):
                for gauge, key in balloons:
                    if isinstance(bal.get(key), int):
                        gauge.add_metric([name], bal[key])
            guest = vm.get("guest")
            engine = guest.get("engine") if isinstance(guest, dict) else None
            engine = engine if isinstance(engine, dict) else {}
            if isinstance(engine.get("held_bytes"), int):
                held.add_metric([name], engine["held_bytes"])
            if isinstance(engine.get("aerated_bytes"), int):
                aerated.add_metric([name], engine["aerated_bytes"])
        for category, n in sorted(counts.items()):
            by_reason.add_metric([category], n)
        yield from (backing, up, held, aerated, info, refused, by_reason, level, effective)
        yield from (gauge for gauge, _ in balloons)


def _host_families(m: HostMemory) -> Iterator[Metric]:
    if m.available is not None:
        yield GaugeMetricFamily("aerate_host_mem_available_bytes",
                                "The host's MemAvailable", value=m.available)
    if m.psi_some_avg10 is not None:
        yield GaugeMetricFamily("aerate_host_memory_psi_some_avg10",
                                "The host's memory PSI, some avg10 (%)",
                                value=m.psi_some_avg10)


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


def registry(status: Status, connected: Connected | None = None,
             host: HostSample | None = None) -> CollectorRegistry:
    """A registry holding only aerate's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AerateCollector(status, connected, host))
    return reg
