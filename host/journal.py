"""Where aerated's log lines go: the journal with fields, or stderr with priorities.

Under systemd (stderr is the journal stream: ``$JOURNAL_STREAM`` names stderr's
``device:inode``, systemd's documented test) each record goes through systemd-python's
``JournalHandler`` with its PRIORITY, the logger's fields and, for a record about one VM,
``VM=`` (the domain name) and ``VM_UUID=``, so ``journalctl VM=web01`` shows one VM and
``journalctl -u aerated -p warning`` what needs a look. Discard, refusal and session
events carry a fixed ``MESSAGE_ID`` (``EVENTS``), for ``journalctl MESSAGE_ID=...``.

Without systemd-python (it is optional) and whenever stderr is not a tty, each line starts
with its syslog priority, ``<3>`` to ``<7>``: what systemd's stream reader parses
(SyslogLevelPrefix=, on by default), so priorities survive without the library. On a tty
the lines are plain text.

The VM travels in the record (``extra=``, ``VmLog``), never parsed out of the message.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import IO, Any

from aerate.agent.logprefix import PrefixFormatter, under_journal

#: MESSAGE_ID per event kind: fixed 128-bit ids (never change one; add a new kind instead).
#: ``journalctl MESSAGE_ID=<id>`` lists every event of that kind, of every VM.
EVENTS: dict[str, str] = {
    # A VM's session began (served, new session, the agent's hello) or ended.
    "session": "b20c431747cd43d5b071d2d024833b9e",
    # A report, or a whole VM, was refused: nothing (more) of it is discarded.
    "refusal": "3d7043aa1f4145428d1ebe038b925e5e",
    # A discard under way was cut short, failed or overran its lease window.
    "discard": "f18584f4a5194a018a230930220fcbe9",
    # The host config file was (re)loaded or refused.
    "config": "f0ec4afd1c774ce7b9ddb30f2e8cd43f",
}

_FIELD = re.compile(r"[A-Z0-9][A-Z0-9_]*\Z")


def event(kind: str, **fields: str) -> dict[str, str]:
    """``extra=`` for a record of event ``kind`` (a key of EVENTS), with more fields."""
    return {"MESSAGE_ID": EVENTS[kind], **fields}


class VmLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger for one VM: every record gets ``VM=`` and, once known, ``VM_UUID=``
    (``uuid`` is asked at each record: a runner learns it with the domain XML)."""

    def __init__(self, logger: logging.Logger, vm: str,
                 uuid: Callable[[], str] = lambda: "") -> None:
        super().__init__(logger, {})
        self.vm = vm
        self._uuid = uuid

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]
                ) -> tuple[Any, MutableMapping[str, Any]]:
        fields: dict[str, Any] = {"VM": self.vm}
        uuid = self._uuid()
        if uuid:
            fields["VM_UUID"] = uuid
        fields.update(kwargs.get("extra") or {})
        kwargs["extra"] = fields
        return msg, kwargs

    def event(self, level: int, kind: str, msg: str, *args: Any) -> None:
        """Log ``msg`` at ``level`` as an event of ``kind`` (its MESSAGE_ID)."""
        # stacklevel: CODE_FUNC= and CODE_LINE= name the caller, not this method.
        self.log(level, msg, *args, extra=event(kind), stacklevel=2)


def emit_notes(vlog: VmLog, notes: Iterable[tuple[str, str, str]]) -> None:
    """Log a session's notes (level, message, event kind or "") through ``vlog``."""
    for level, msg, kind in notes:
        vlog.log(logging.getLevelName(level.upper()), "%s", msg,
                 extra=event(kind) if kind else {}, stacklevel=2)


def journal_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The record's journal fields: the upper-case ones (JournalHandler passes the whole
    record's ``__dict__``; journald would drop ``msg``, ``args``... as invalid names)."""
    return {k: v for k, v in fields.items() if _FIELD.match(k)}


def _journal_module() -> Any:
    try:
        return importlib.import_module("systemd.journal")
    except ImportError:
        return None


def handler(stream: IO[str] | None = None, env: Mapping[str, str] | None = None,
            journal: Any = ...) -> tuple[logging.Handler, str]:
    """The handler for this process and a note to log once ("" when none): the journal's
    under systemd with systemd-python, else ``<N>`` prefixes unless ``stream`` is a tty."""
    stream = sys.stderr if stream is None else stream
    env = os.environ if env is None else env
    if under_journal(stream, env):
        mod = _journal_module() if journal is ... else journal
        if mod is not None:
            send = mod.send

            # Positional-only: the record's __dict__ that JournalHandler passes as
            # keywords has a "message" of its own.
            def sender(text: str, /, **fields: Any) -> None:
                send(text, **journal_fields(fields))

            h: logging.Handler = mod.JournalHandler(sender_function=sender,
                                                    SYSLOG_IDENTIFIER="aerated")
            h.setFormatter(logging.Formatter("%(message)s"))
            return h, ""
        note = ("systemd-python (python3-systemd) is not installed: logging to stderr "
                "with <N> priority prefixes, without the journal fields VM=, VM_UUID=, "
                "MESSAGE_ID=")
    else:
        note = ""
    out = logging.StreamHandler(stream)
    if stream.isatty():
        out.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        out.setFormatter(PrefixFormatter("%(name)s: %(message)s"))
    return out, note


def setup(level: str, stream: IO[str] | None = None,
          env: Mapping[str, str] | None = None) -> logging.Handler:
    """Configure the root logger for aerated (main() calls it first)."""
    h, note = handler(stream, env)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(h)
    root.setLevel(level.upper())
    if note:
        logging.getLogger("aerated").warning("%s", note)
    return h
