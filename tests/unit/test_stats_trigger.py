"""Event-driven statistics (agent/service.py StatsTrigger): what paces the balloon.

The host's balloon controller (host/balloon.py) takes its next step only on statistics
taken after the last one arrived, so the agent must speak when free memory moved and when
it stopped moving; and a guest whose memory flaps must not turn that into a flood.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aerate.agent.service import STATS_GAP_S, STATS_MOVE_BYTES, STATS_SETTLE_BYTES, StatsTrigger

pytestmark = pytest.mark.unit
MiB = 1 << 20


def test_nothing_before_the_first_statistics_went_out() -> None:
    t = StatsTrigger()
    assert t.due(100 * MiB, 10.0) == ""
    t.sent(100 * MiB, 10.0)
    assert t.due(100 * MiB + STATS_MOVE_BYTES, 10.0 + STATS_GAP_S) != ""


def test_a_move_is_told_at_once_and_an_arrival_one_probe_later() -> None:
    t = StatsTrigger()
    t.sent(1500 * MiB, 0.0)
    # The balloon inflates: free memory falls past the move threshold.
    assert "moved" in t.due(1500 * MiB - STATS_MOVE_BYTES, 1.0)
    t.sent(1500 * MiB - STATS_MOVE_BYTES, 1.0)
    # It goes on falling a little, then holds still: the arrival is told once.
    assert t.due(1400 * MiB, 1.5) == ""          # still moving, below the move threshold
    assert "settled" in t.due(1400 * MiB + 1, 2.0)
    t.sent(1400 * MiB, 2.0)
    assert t.due(1400 * MiB, 2.5) == "" and t.due(1400 * MiB, 10.0) == ""


def test_jitter_below_the_settle_threshold_sends_nothing() -> None:
    t = StatsTrigger()
    t.sent(1000 * MiB, 0.0)
    for i in range(1, 100):
        assert t.due(1000 * MiB + (i % 2) * (STATS_SETTLE_BYTES - 1), float(i)) == ""


@given(st.lists(st.integers(0, 4096), min_size=1, max_size=400))
def test_a_flapping_guest_sends_at_most_one_message_per_gap(free_mib: list[int]) -> None:
    t = StatsTrigger()
    t.sent(0, 0.0)
    sent = []
    for i, f in enumerate(free_mib):
        now = 0.1 * (i + 1)
        if t.due(f * MiB, now):
            t.sent(f * MiB, now)
            sent.append(now)
    assert all(b - a >= STATS_GAP_S for a, b in zip(sent, sent[1:]))
    assert len(sent) <= 0.1 * len(free_mib) / STATS_GAP_S + 1

