"""Log lines for systemd's journal stream, shared by the agent and the host daemon.

A service's stderr under systemd is a stream into the journal; a line that starts with
``<N>`` is stored with syslog PRIORITY N and without the prefix (SyslogLevelPrefix=, on by
default), so ``journalctl -p warning`` works. Standard library only (the agent's Python 3.8
floor).
"""

from __future__ import annotations

import logging
import os
from typing import IO, Any, Mapping

#: syslog priority per logging level (what systemd's JournalHandler.map_priority gives too).
_PRIORITIES = ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
               (logging.ERROR, 3), (logging.CRITICAL, 2))


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (between levels: the next one up)."""
    for level, pri in _PRIORITIES:
        if levelno <= level:
            return pri
    return 1


class PrefixFormatter(logging.Formatter):
    """``<N>`` before every line (a traceback's too): systemd reads each line apart."""

    def format(self, record: logging.LogRecord) -> str:
        pri = "<%d>" % priority(record.levelno)
        return "\n".join(pri + line for line in super().format(record).split("\n"))


def under_journal(stream: IO[Any], env: Mapping[str, str]) -> bool:
    """Whether ``stream`` is systemd's journal stream: ``$JOURNAL_STREAM`` holds its
    ``device:inode`` (systemd.exec(5); a child with a redirected stderr no longer matches)."""
    want = env.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return want == "%d:%d" % (st.st_dev, st.st_ino)
