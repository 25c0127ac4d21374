"""aerated's log output (host/journal.py): which handler, the ``<N>`` prefixes systemd
parses, and the fields (VM=, VM_UUID=, MESSAGE_ID=) records about a VM carry.

The journal's own wire format, sent by the real systemd-python library, is checked in
tests/host/test_journal_native.py (it needs a socket at /run/systemd/journal/socket).
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from aerate.host import journal

pytestmark = pytest.mark.unit


def emit(handler: logging.Handler, level: int, msg: str, name: str = "aerated") -> None:
    logger = logging.Logger(name)
    logger.addHandler(handler)
    logger.log(level, "%s", msg)


def test_not_a_tty_every_line_starts_with_its_syslog_priority() -> None:
    out = io.StringIO()
    h, note = journal.handler(out, env={})
    assert note == ""
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                  logging.CRITICAL):
        emit(h, level, f"web01: {logging.getLevelName(level)}")
    emit(h, logging.ERROR, "two\nlines")
    assert out.getvalue().splitlines() == [
        "<7>aerated: web01: DEBUG", "<6>aerated: web01: INFO", "<4>aerated: web01: WARNING",
        "<3>aerated: web01: ERROR", "<2>aerated: web01: CRITICAL",
        # systemd reads a stream line by line: the second line needs its own prefix.
        "<3>aerated: two", "<3>lines"]


def test_on_a_tty_the_lines_are_plain(tmp_path: Path) -> None:
    master, slave = os.openpty()
    with open(slave, "w", encoding="utf-8", closefd=True) as tty:
        h, _ = journal.handler(tty, env={})
        emit(h, logging.WARNING, "web01: refused")
        tty.flush()
        got = os.read(master, 4096).decode()
    os.close(master)
    assert got.strip() == "WARNING aerated: web01: refused"


def test_the_journal_stream_is_told_by_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal.under_journal(a, env)
        # A child whose stderr was redirected inherits the variable, not the stream.
        assert not journal.under_journal(b, env)
        assert not journal.under_journal(a, {})
        assert not journal.under_journal(io.StringIO(), env)


class FakeJournal:
    """MOCK of systemd.journal's two names the handler uses, for choosing the handler
    (what the real library sends is tests/host/test_journal_native.py's subject)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        # The real handler class (python3-systemd may be missing where the unit tier runs).
        self.JournalHandler = pytest.importorskip("systemd.journal").JournalHandler

    def send(self, message: str, **fields: Any) -> None:
        self.sent.append({"MESSAGE": message, **fields})


def test_under_systemd_records_go_to_the_journal_with_upper_case_fields_only(
        tmp_path: Path) -> None:
    fake = FakeJournal()
    with open(tmp_path / "err", "w") as err:
        st = os.fstat(err.fileno())
        h, note = journal.handler(err, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fake)
        assert note == "" and type(h).__name__ == "JournalHandler"
        logger = logging.Logger("aerated")
        logger.addHandler(h)
        journal.VmLog(logger, "web01", lambda: "79239ed1-72ae-4aa6-940e-0e1f213027d0"
                      ).event(logging.WARNING, "refusal", "%s: batch 3 refused", "web01")
    (sent,) = fake.sent
    assert sent["MESSAGE"] == "web01: batch 3 refused" and sent["PRIORITY"] == "4"
    assert sent["VM"] == "web01" and sent["VM_UUID"] == "79239ed1-72ae-4aa6-940e-0e1f213027d0"
    assert sent["MESSAGE_ID"] == journal.EVENTS["refusal"]
    assert sent["SYSLOG_IDENTIFIER"] == "aerated"
    assert all(re.fullmatch(r"[A-Z0-9][A-Z0-9_]*", k) for k in sent)


def test_without_systemd_python_it_falls_back_to_prefixes_and_says_so_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A host without python3-systemd: the import fails.
    monkeypatch.setattr(journal, "_journal_module", lambda: None)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    with open(tmp_path / "err", "w+") as err:
        st = os.fstat(err.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        h = journal.setup("info", err, env)
        assert isinstance(h.formatter, journal.PrefixFormatter)
        logging.getLogger("aerated").warning("web01: refused")
        logging.getLogger("aerated").info("web01: serving")
        h.flush()
        err.seek(0)
        lines = err.read().splitlines()
    assert lines[0].startswith("<4>aerated: systemd-python (python3-systemd) is not "
                               "installed: logging to stderr with <N> priority prefixes")
    assert lines[1:] == ["<4>aerated: web01: refused", "<6>aerated: web01: serving"]


def test_vm_records_carry_vm_and_uuid_once_known_and_extra_fields_merge() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.Logger("aerated")
    logger.addHandler(Keep())
    uuid = [""]
    vlog = journal.VmLog(logger, "web01", lambda: uuid[0])
    vlog.info("before the XML")
    uuid[0] = "u-1"
    vlog.info("after", extra=journal.event("session"))
    journal.emit_notes(vlog, [("warning", "web01: refused", "refusal"), ("info", "up", "")])
    assert [r.__dict__["VM"] for r in records] == ["web01"] * 4
    assert not hasattr(records[0], "VM_UUID") and records[1].__dict__["VM_UUID"] == "u-1"
    assert records[1].__dict__["MESSAGE_ID"] == journal.EVENTS["session"]
    assert records[2].levelno == logging.WARNING
    assert records[2].__dict__["MESSAGE_ID"] == journal.EVENTS["refusal"]
    assert not hasattr(records[3], "MESSAGE_ID")


def test_message_ids_are_distinct_128_bit_ids() -> None:
    ids = list(journal.EVENTS.values())
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert {"session", "refusal", "discard"} <= set(journal.EVENTS)
