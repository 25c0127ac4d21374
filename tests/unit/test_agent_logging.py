"""The agent's log lines in the guest's journal (agent/service.py log_formatter)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from aerate.agent import service

pytestmark = pytest.mark.unit


def test_agent_log_lines_carry_their_priority_only_on_the_journal_stream(
        tmp_path: Path) -> None:
    """Under systemd the agent's stderr is the journal stream: each line starts with its
    syslog priority (journald stores it as PRIORITY); anywhere else the level is a word."""
    with open(tmp_path / "err", "w") as stream:
        st = os.fstat(stream.fileno())
        record = logging.LogRecord("aerate.agent", logging.WARNING, __file__, 1,
                                   "two\nlines", None, None)
        journal = service.log_formatter(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert journal.format(record) == "<4>two\n<4>lines"
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        assert journal.format(record) == "<7>two\n<7>lines"
        elsewhere = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}
        assert service.log_formatter(stream, elsewhere).format(record) == "DEBUG two\nlines"
        assert service.log_formatter(stream, {}).format(record) == "DEBUG two\nlines"
