"""Pure pieces of S5/S8: discard and input budgets, the permit cache, the balloon record,
the domain XML's balloon limits, and the daemon's systemd status line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aerate.agent import settings as table
from aerate.host import balloon as balloon_mod
from aerate.host.balloon_store import BalloonStore, StoreError
from aerate.host.budget import DiscardBudget, InputBudget
from aerate.host.daemon import watchdog_seconds
from aerate.host.libvirt_conn import DomainError, balloon_limits
from aerate.host.permit import PermitCache
from aerate.host.refusal import Decision

pytestmark = pytest.mark.unit
MiB = 1 << 20


# -- discard budget


def test_default_budget_never_bites_the_largest_honest_batch() -> None:
    v = table.defaults()
    b = DiscardBudget(v["discard_batch_mib"], v["discard_rate_mib_s"])
    capacity = table.BY_NAME["capacity"].hi
    assert capacity is not None
    # The largest batch the agent can send: capacity blocks of 2 MiB, one range each.
    for i in range(int(capacity)):
        assert b.check(1, 2 * MiB, now=0.0) == "", i
    assert b.refused == 0


def test_batch_budget_refuses_beyond_it_and_resets_per_batch() -> None:
    b = DiscardBudget(batch_mib=8, rate_mib_s=0)
    assert b.check(1, 6 * MiB, 0.0) == ""
    why = b.check(1, 4 * MiB, 0.0)
    assert "batch over 8 MiB" in why and "discard_batch_mib" in why
    assert b.refused == 4 * MiB and b.bites == 1
    assert b.check(2, 8 * MiB, 0.0) == ""  # a new batch starts from zero


def test_rate_budget_refills_with_time_and_refusal_spends_nothing() -> None:
    b = DiscardBudget(batch_mib=1 << 20, rate_mib_s=100)  # burst: 2 s = 200 MiB
    assert b.check(1, 200 * MiB, 0.0) == ""
    why = b.check(2, 2 * MiB, 0.0)
    assert "100 MiB/s" in why and "discard_rate_mib_s" in why
    assert b.check(3, 50 * MiB, 0.5) == ""  # 0.5 s earned 50 MiB
    assert b.check(4, 2 * MiB, 0.5) != ""
    assert b.status()["refused_bytes"] == 4 * MiB


def test_input_budget_ends_a_flood_within_its_burst() -> None:
    ib = InputBudget(rate_kib_s=1024, burst_kib=4096)
    sent = 0
    while not ib.take(4096, now=0.0):
        sent += 4096
        assert sent <= 4096 * 1024, "the flood was never cut off"
    assert sent == 4096 * 1024
    assert "input flood" in ib.take(1, 0.0) and ib.floods == 2
    assert ib.take(1024 * 1024, now=1.0) == ""  # one second later: one second of rate


def test_the_budget_rows_follow_the_table_conventions() -> None:
    for name in ("discard_batch_mib", "discard_rate_mib_s", "input_kib_s"):
        row = table.BY_NAME[name]
        assert row.scope == "host" and row.help
        assert name not in table.guest_view(table.defaults())


# -- permit cache


def test_a_punch_expires_after_max_age_and_says_why() -> None:
    c = PermitCache(max_age=2.0)
    assert c.get(0.0).action == "refuse"
    c.set(Decision("punch", "shared memfd"), issued_at=10.0)
    assert c.get(11.9).action == "punch"
    late = c.get(12.1)
    assert late.action == "refuse" and "old" in late.reason
    assert c.last().action == "punch"  # for guest settings: no flip-flop on expiry


def test_a_refused_decision_does_not_expire_into_anything_else() -> None:
    c = PermitCache(max_age=1.0)
    c.set(Decision("refuse", "migration-out"), issued_at=0.0)
    assert c.get(100.0) == Decision("refuse", "migration-out")


def test_an_answer_issued_before_an_invalidation_is_dropped() -> None:
    c = PermitCache(max_age=5.0)
    c.set(Decision("punch", "ok"), issued_at=1.0)
    c.invalidate("domain suspended", now=2.0)
    assert not c.set(Decision("punch", "ok"), issued_at=1.5)  # asked before the event
    assert c.get(2.5) == Decision("refuse", "domain suspended") and c.dropped == 1
    assert c.set(Decision("punch", "ok"), issued_at=2.1)
    assert c.get(2.5).action == "punch"


def test_an_older_answer_never_overwrites_a_newer_one() -> None:
    c = PermitCache(max_age=5.0)
    c.set(Decision("refuse", "job snapshot"), issued_at=3.0)
    assert not c.set(Decision("punch", "ok"), issued_at=2.0)
    assert c.get(3.5).action == "refuse"


# -- balloon record (tuned's save-before-set)


def test_balloon_record_round_trip_and_removal(tmp_path: Path) -> None:
    store = BalloonStore(str(tmp_path))
    assert store.load("web/01") is None
    store.save("web/01", 2048 * MiB, 4096 * MiB)
    rec = store.load("web/01")
    assert rec is not None and (rec.target_bytes, rec.max_bytes) == (2048 * MiB, 4096 * MiB)
    assert os.path.dirname(store.path("web/01")) == store.dir  # '/' cannot escape
    assert [r.vm for r in store.all()[0]] == ["web/01"]
    assert not [n for n in os.listdir(store.dir) if ".tmp." in n]  # no temp file left
    store.remove("web/01")
    store.remove("web/01")
    assert store.load("web/01") is None


def test_a_torn_record_is_reported_with_its_path_and_the_fix(tmp_path: Path) -> None:
    store = BalloonStore(str(tmp_path))
    os.makedirs(store.dir)
    Path(store.path("db")).write_text('{"vm": "db", "target_bytes"')
    Path(store.path("ok")).write_text(json.dumps(
        {"vm": "ok", "target_bytes": 1, "max_bytes": 2, "saved_at": 0}))
    with pytest.raises(StoreError, match="virsh setmem"):
        store.load("db")
    records, errors = store.all()
    assert [r.vm for r in records] == ["ok"] and store.path("db") in errors[0]


# -- balloon limits from the domain XML


def test_balloon_limits_autodeflate_and_min_guarantee() -> None:
    xml = ("<domain><name>v</name><memtune><min_guarantee unit='MiB'>1536</min_guarantee>"
           "</memtune><devices><memballoon model='virtio' autodeflate='on'/></devices>"
           "</domain>")
    lim = balloon_limits(xml)
    assert lim.present and lim.autodeflate and lim.min_guarantee == 1536 * MiB
    bare = balloon_limits("<domain><name>v</name><devices><memballoon model='virtio'/>"
                          "</devices></domain>")
    assert not bare.autodeflate and bare.min_guarantee == 0
    kib = balloon_limits("<domain><memtune><min_guarantee>1024</min_guarantee></memtune>"
                         "</domain>")
    assert kib.min_guarantee == 1 << 20  # libvirt's default unit is KiB
    with pytest.raises(DomainError, match="min_guarantee"):
        balloon_limits("<domain><name>v</name><memtune><min_guarantee unit='parsec'>1"
                       "</min_guarantee></memtune></domain>")


def test_min_guarantee_raises_the_balloon_floor() -> None:
    values = table.defaults()  # floor 0.5
    s = balloon_mod.BalloonSettings.from_settings(values, min_guarantee=3072 * MiB)
    assert balloon_mod.floor_bytes(4096 * MiB, s) == 3072 * MiB
    s2 = balloon_mod.BalloonSettings.from_settings(values, min_guarantee=1024 * MiB)
    assert balloon_mod.floor_bytes(4096 * MiB, s2) == 2048 * MiB
    stats = balloon_mod.GuestStats(mem_free=3900 * MiB, watermark_high=8 * MiB,
                                   psi_some_avg10=0.0, age_s=0.0)
    step = balloon_mod.next_target(stats, "", 4096 * MiB, None, 4096 * MiB, s,
                                   settled_s=10.0)
    assert step.target >= 3072 * MiB


# -- systemd


def test_watchdog_period_comes_from_systemd_and_only_for_this_pid() -> None:
    me = str(os.getpid())
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_seconds({}) is None and watchdog_seconds({"WATCHDOG_USEC": "x"}) is None


def test_aeratectl_status_shows_a_biting_budget_and_a_hung_call() -> None:
    from aerate.host.ctl import format_status
    vm = {"vm": "web01", "state": "running", "reason": "",
          "budget": {"bites": 3, "reason": "discard budget: batch over 8 MiB "
                     "(setting discard_batch_mib)", "refused_bytes": 12 << 20},
          "libvirt_calls": {"hung": "job_info", "timeouts": 1}}
    text = format_status({"vms": [vm]})
    assert "web01: discard budget: batch over 8 MiB" in text and "12 MiB refused" in text
    assert "libvirt call job_info hung" in text
    quiet = format_status({"vms": [dict(vm, budget={"bites": 0}, libvirt_calls={})]})
    assert "budget" not in quiet and "hung" not in quiet


def test_aeratectl_status_has_a_verified_column_from_the_reclaim_tally() -> None:
    """The human table's VERIFIED column is status' reclaim.verified_bytes (host/verify.py):
    the part of DISCARD the backing's own allocation count confirmed; "-" where nothing
    measures it (a balloon VM has no tally)."""
    from aerate.host.ctl import format_status
    punched = {"vm": "web01", "state": "running", "reclaimer": "punch",
               "reported_bytes": 64 << 20, "discarded_bytes": 60 << 20,
               "reclaim": {"verified_bytes": 58 << 20, "unverified_bytes": 2 << 20}}
    ballooned = {"vm": "db01", "state": "running", "reclaimer": "balloon"}
    head, web, db = format_status({"vms": [punched, ballooned]}).splitlines()[:3]
    col = head.index("VERIFIED")
    at = slice(col, col + len("VERIFIED"))
    assert web[at].strip() == "58" and db[at].strip() == "-", (head, web, db)
    assert web[head.index("DISCARD") - 2:head.index("DISCARD") + 7].split() == ["60"]
