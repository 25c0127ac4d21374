"""The free-first stage's hands: cgroup v2 ``memory.reclaim``, compaction, drop_caches.

A thin adapter under an injected filesystem root (``/`` in the agent, a fake tree in the
tests); the policy that decides how much and when is agent/freefirst.py. Writes go through
an injectable ``writer`` so the tests can answer as the kernel does (EINVAL, EAGAIN).

What the kernel offers (read in Linux's Documentation/admin-guide/cgroup-v2.rst and
mm/memcontrol.c ``memory_reclaim``):

- ``memory.reclaim`` exists from Linux 5.19 (commit 94968384dde1) on *every* cgroup of the
  v2 hierarchy, the root included (its cftype carries no CFTYPE_NOT_ON_ROOT; only an early
  posting of the patch did). Writing ``<bytes>`` to the root's file reclaims from the whole
  hierarchy, so one write covers every process of the guest. The write is synchronous and
  answers EAGAIN when the kernel reclaimed less than asked (EINTR on a signal).
- In 6.1 (Debian 12) the handler parses the whole buffer as one size
  (``page_counter_memparse``): any extra key, such as ``swappiness=0``, is EINVAL. The
  ``swappiness=`` key came with Dan Schatzberg's "mm: add swappiness= arg to
  memory.reclaim" (mainline 6.11); with it, ``swappiness=0`` makes that reclaim take file
  pages only (get_scan_count's SCAN_FILE for cgroup reclaim).
- So on 6.1 a plain ``<bytes>`` may swap anonymous memory out whenever swap (a disk,
  zram, or zswap's backing device) is on. Without swap the kernel cannot reclaim anon
  pages at all, so only page cache goes. :meth:`Reclaimer.reclaim` therefore asks with
  ``swappiness=0`` first, and on EINVAL retries without it only where that cannot touch
  anon memory (no swap) or the operator allowed anon (``free_first_anon``); otherwise it
  refuses (:class:`Refused`), and the stage stays off with that reason.

Python 3.8, standard library only.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Optional

#: Paths under the root.
CGROUP_DIR = "sys/fs/cgroup"
RECLAIM_FILE = "memory.reclaim"
COMPACT_PATH = "proc/sys/vm/compact_memory"
DROP_CACHES_PATH = "proc/sys/vm/drop_caches"
#: Errors that mean "the kernel did not reclaim all of it", not "the stage cannot work".
SHORT_ERRNOS = (errno.EAGAIN, errno.EINTR)

Writer = Callable[[str, str], None]


class Refused(Exception):
    """The kernel offers no way to reclaim without breaking a rule (the message says which
    and what to change); nothing was written."""


def write_file(path: str, text: str) -> None:
    """Write ``text`` to a kernel file in one write(2); the kernel's errno raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def probe(root: str = "/") -> str:
    """Why ``memory.reclaim`` cannot be used under ``root``, or "" when it can."""
    cg = os.path.join(root, CGROUP_DIR)
    controllers = _read(os.path.join(cg, "cgroup.controllers"))
    if controllers is None:
        if os.path.isdir(os.path.join(cg, "memory")):
            return ("cgroup v1 memory controller at /%s/memory: memory.reclaim exists only "
                    "on cgroup v2 (boot with systemd.unified_cgroup_hierarchy=1)" % CGROUP_DIR)
        return "no cgroup v2 hierarchy at /%s" % CGROUP_DIR
    if "memory" not in controllers.split():
        return ("the memory controller is not on the cgroup v2 hierarchy (cgroup.controllers: "
                "%s; cgroup_disable=memory?)" % (controllers.strip() or "empty"))
    path = os.path.join(cg, RECLAIM_FILE)
    if not os.path.exists(path):
        return "no /%s/%s on the root cgroup (Linux < 5.19)" % (CGROUP_DIR, RECLAIM_FILE)
    # access() honours read-only mounts (a container's cgroupfs), which is what matters.
    if not os.access(path, os.W_OK):
        return "/%s/%s is not writable (read-only cgroupfs or no privilege)" % (
            CGROUP_DIR, RECLAIM_FILE)
    return ""


class Reclaimer:
    """Reclaim, compact and drop caches in the guest kernel under ``root``."""

    def __init__(self, root: str = "/", writer: Writer = write_file) -> None:
        self.root = root
        self.writer = writer
        self.reclaim_path = os.path.join(root, CGROUP_DIR, RECLAIM_FILE)
        #: Does this kernel's memory.reclaim take ``swappiness=``? None until a write tells.
        self.swappiness_key: Optional[bool] = None

    def _plain_is_safe(self, allow_anon: bool, swap: bool) -> str:
        """Why a write without ``swappiness=0`` would break the anon rule, or ""."""
        if allow_anon or not swap:
            return ""
        return ("this kernel's memory.reclaim takes no swappiness= (Linux < 6.11) and swap "
                "is on, so a reclaim could swap anonymous memory out: set "
                "free_first_anon=true to allow that, or turn swap off")

    def reclaim(self, nbytes: int, allow_anon: bool, swap: bool) -> bool:
        """Ask the kernel to reclaim ``nbytes``; True when it did all of it.

        Page cache only unless ``allow_anon`` (and the guest has ``swap``). False: the
        kernel reclaimed less (EAGAIN) or was interrupted (EINTR): nothing cold enough was
        left, try again later. Raises :class:`Refused` when only a write that could swap
        anon memory out is left and that is not allowed, OSError for anything else (no
        permission, read-only, the file gone).
        """
        if nbytes <= 0:
            return True
        try:
            if allow_anon and swap:
                # The kernel's own balance of file and anon (vm.swappiness).
                self.writer(self.reclaim_path, "%d" % nbytes)
                return True
            if self.swappiness_key is not False:
                try:
                    self.writer(self.reclaim_path, "%d swappiness=0" % nbytes)
                    self.swappiness_key = True
                    return True
                except OSError as e:
                    if e.errno != errno.EINVAL or self.swappiness_key:
                        raise
                    self.swappiness_key = False
            why = self._plain_is_safe(allow_anon, swap)
            if why:
                raise Refused(why)
            self.writer(self.reclaim_path, "%d" % nbytes)
            return True
        except OSError as e:
            if e.errno in SHORT_ERRNOS:
                return False
            raise

    def compact(self) -> None:
        """Compact every zone (/proc/sys/vm/compact_memory; synchronous, CONFIG_COMPACTION)."""
        self.writer(os.path.join(self.root, COMPACT_PATH), "1")

    def drop_caches(self) -> None:
        """Drop the clean, unmapped page cache (/proc/sys/vm/drop_caches = 1; not slab)."""
        self.writer(os.path.join(self.root, DROP_CACHES_PATH), "1")
