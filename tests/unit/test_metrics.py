"""Prometheus exposition: the numbers of the status page, and loopback-only binding."""

from __future__ import annotations

import re

import pytest
from prometheus_client import generate_latest

import aerate
from aerate.host.metrics import parse_listen, registry
from aerate.host.pressure import HostMemory

pytestmark = pytest.mark.unit


def test_exposition_carries_per_vm_figures() -> None:
    status = [{"vm": "web01", "state": "running", "reclaimer": "punch",
               "reported_bytes": 3 << 20, "discarded_bytes": 2 << 20, "refused_bytes": 1 << 20,
               "batches": 2, "sessions": 1, "errors": 0, "backing_allocated_bytes": 7 << 20,
               "guest": {"engine": {"held_bytes": 4 << 20, "aerated_bytes": 6 << 20}}},
              {"vm": "db", "state": "no-channel"}]
    text = generate_latest(registry(lambda: status)).decode()
    assert 'aerate_discarded_bytes_total{vm="web01"} 2.097152e+06' in text
    assert 'aerate_backing_allocated_bytes{vm="web01"} 7.340032e+06' in text
    assert 'aerate_session_running{reclaimer="punch",vm="web01"} 1.0' in text
    assert 'aerate_session_running{reclaimer="starting",vm="db"} 0.0' in text
    assert 'aerate_guest_aerated_bytes{vm="web01"} 6.291456e+06' in text
    assert "aerate_refused{" not in text


def test_a_refused_vm_shows_its_reason_category_not_free_text() -> None:
    status = [{"vm": "web01", "uuid": "u1", "state": "running", "reclaimer": "refuse",
               "category": "page-poison",
               "reason": "the guest poisons freed pages (page_poison=1)"}]
    text = generate_latest(registry(lambda: status)).decode()
    assert 'aerate_refused{reason="page-poison",vm="web01"} 1.0' in text
    assert 'aerate_vms_refused{reason="page-poison"} 1.0' in text
    assert ('aerate_vm_info{reason="page-poison",reclaimer="refuse",uuid="u1",vm="web01"} '
            "1.0") in text
    assert "page_poison=1" not in text  # free text never becomes a label


def test_balloon_gauges_build_info_libvirt_and_host() -> None:
    status = [{"vm": "b", "state": "running", "reclaimer": "balloon", "category": "none",
               "host_pressure": "firmer",
               "effective": {"hwm": 16, "reserve_mib": 128, "balloon_step_factor": 2.0,
                             "balloon_cooldown_intervals": 1.5, "not_a_key": 7},
               "balloon": {"target_bytes": 3 << 30, "actual_bytes": 3 << 30,
                           "max_bytes": 4 << 30, "floor_bytes": 2 << 30,
                           "held_back_bytes": 1 << 30}}]
    text = generate_latest(registry(lambda: status, lambda: False,
                                    lambda: HostMemory(5 << 30, 8 << 30, 1.5))).decode()
    assert 'aerate_balloon_held_back_bytes{vm="b"} 1.073741824e+09' in text
    assert 'aerate_balloon_floor_bytes{vm="b"} 2.147483648e+09' in text
    assert 'aerate_balloon_target_bytes{vm="b"}' in text
    assert "aerate_libvirt_connected 0.0" in text
    assert "aerate_host_mem_available_bytes 5.36870912e+09" in text
    assert 'aerate_host_pressure{level="firmer",vm="b"} 1.0' in text
    assert 'aerate_effective_setting{key="hwm",vm="b"} 16.0' in text
    assert 'aerate_effective_setting{key="reserve_mib",vm="b"} 128.0' in text
    assert 'aerate_effective_setting{key="balloon_step_factor",vm="b"} 2.0' in text
    assert 'aerate_effective_setting{key="balloon_cooldown_intervals",vm="b"} 1.5' in text
    assert "not_a_key" not in text  # the key label comes from pressure.EFFECTIVE only
    # the project's one version source (aerate/__init__.py), never "unknown"
    assert re.search(r'aerate_build_info\{python="[0-9.]+",version="%s"\} 1.0'
                     % re.escape(aerate.__version__), text)


@pytest.mark.parametrize("text", ["0.0.0.0:9848", "10.1.2.3:80", "9848"])
def test_only_loopback(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


def test_loopback_forms() -> None:
    assert parse_listen("127.0.0.1:9848") == ("127.0.0.1", 9848)
    assert parse_listen("[::1]:9848") == ("::1", 9848)
