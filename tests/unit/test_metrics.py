"""Prometheus exposition: the numbers of the status page, and loopback-only binding."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from aerate.host.metrics import parse_listen, registry

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
    assert 'aerate_session_running{reclaimer="-",vm="db"} 0.0' in text
    assert 'aerate_guest_aerated_bytes{vm="web01"} 6.291456e+06' in text
    assert "aerate_refused{" not in text


def test_a_refused_vm_shows_its_reason() -> None:
    status = [{"vm": "web01", "state": "running", "reclaimer": "refuse",
               "reason": "the guest poisons freed pages (page_poison=1)"}]
    text = generate_latest(registry(lambda: status)).decode()
    assert ('aerate_refused{reason="the guest poisons freed pages (page_poison=1)",'
            'vm="web01"} 1.0') in text


@pytest.mark.parametrize("text", ["0.0.0.0:9848", "10.1.2.3:80", "9848"])
def test_only_loopback(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


def test_loopback_forms() -> None:
    assert parse_listen("127.0.0.1:9848") == ("127.0.0.1", 9848)
    assert parse_listen("[::1]:9848") == ("::1", 9848)
