"""The surplus hugepage budget: raise ``nr_overcommit_hugepages`` by what the arena holds.

The hugetlb arena takes its 2 MiB pages as *surplus* pages, which the kernel allocates from
the buddy allocator on demand (up to ``nr_overcommit_hugepages``) and frees straight back to
it. The persistent pool (``nr_hugepages``) belongs to the operator and is never written.

The budget follows the arena: before a fill it is set to ``held + n`` blocks above the
operator's value, after a fill or release to ``held``; with nothing held the knob is back at
the operator's value. So a SIGKILLed agent leaves the knob raised by exactly the pages its
arena still holds (which survive in the fd store), and nothing else.

The operator's value is recorded durably before the first raise, in
``<run_dir>/hugetlb-<size>kB.json`` (atomic replace). A restarted agent reads it back: if
the knob still shows what the agent last wrote, the recorded value is the operator's;
if the knob shows something else, someone (the operator) wrote it since, and that value is
taken as the operator's new word. The state file exists only while the knob is raised.

An operator who raises ``nr_hugepages`` while the arena holds surplus pages gets those
pages converted to persistent ones (the kernel takes surplus pages first); the arena's later
release then leaves them free in the operator's pool, which is what the operator asked for,
and further hugetlb fills refuse while that pool has free pages (see HugetlbArena.fill).

One budget per run directory: an exclusive ``flock`` on ``<run_dir>/hugetlb.lock`` (held
until :meth:`SurplusBudget.close` or process death) keeps a second agent from recording the
first one's raised value as "original".
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional

DEFAULT_RUN_DIR = "/run/aerate-agent"
HUGE_2M_KB = 2048
_SYSFS_HUGEPAGES = "/sys/kernel/mm/hugepages"
_STATE_VERSION = 1


class BudgetError(RuntimeError):
    """The surplus budget could not be read, recorded or applied."""


def hstate_dir(page_kb: int = HUGE_2M_KB) -> str:
    """Return the sysfs directory of one hugepage size (e.g. hugepages-2048kB)."""
    return f"{_SYSFS_HUGEPAGES}/hugepages-{page_kb}kB"


@dataclass(frozen=True)
class PoolState:
    """One hugepage size's counters from sysfs (all in pages of that size)."""

    nr_hugepages: int
    free: int
    resv: int
    surplus: int
    nr_overcommit: int

    @property
    def free_unreserved(self) -> int:
        """Free pages nobody reserved: a hugetlb fault or fallocate would take these first."""
        return max(0, self.free - self.resv)


def read_pool(page_kb: int = HUGE_2M_KB) -> PoolState:
    """Read the pool counters of one hugepage size; BudgetError if the size does not exist."""
    base = hstate_dir(page_kb)
    values: Dict[str, int] = {}
    for name in (
        "nr_hugepages",
        "free_hugepages",
        "resv_hugepages",
        "surplus_hugepages",
        "nr_overcommit_hugepages",
    ):
        path = f"{base}/{name}"
        try:
            with open(path) as f:
                values[name] = int(f.read())
        except (OSError, ValueError) as exc:
            raise BudgetError(
                f"cannot read {path}: {exc}; the kernel lacks {page_kb} kB hugepages "
                "(CONFIG_HUGETLBFS) or sysfs is not mounted"
            ) from exc
    return PoolState(
        values["nr_hugepages"],
        values["free_hugepages"],
        values["resv_hugepages"],
        values["surplus_hugepages"],
        values["nr_overcommit_hugepages"],
    )


class SurplusBudget:
    """Owns ``nr_overcommit_hugepages`` of one hugepage size while the agent needs surplus.

    ``knob`` overrides the sysfs file (the default is
    /sys/kernel/mm/hugepages/hugepages-<page_kb>kB/nr_overcommit_hugepages, which for the
    default size is the same counter as /proc/sys/vm/nr_overcommit_hugepages).
    """

    def __init__(
        self,
        run_dir: str = DEFAULT_RUN_DIR,
        page_kb: int = HUGE_2M_KB,
        knob: Optional[str] = None,
    ) -> None:
        self.page_kb = page_kb
        self.knob = knob or f"{hstate_dir(page_kb)}/nr_overcommit_hugepages"
        self.state_path = os.path.join(run_dir, f"hugetlb-{page_kb}kB.json")
        try:
            os.makedirs(run_dir, mode=0o700, exist_ok=True)
            self._lock_fd: Optional[int] = os.open(
                os.path.join(run_dir, "hugetlb.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise BudgetError(f"cannot use run directory {run_dir}: {exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise BudgetError(
                f"another process holds {run_dir}/hugetlb.lock: only one aerate-agent may own "
                "the surplus hugepage budget; stop the other agent or use another run directory"
            ) from exc
        self._raised = 0
        #: What recovery concluded about a previous run, for status lines; None if clean.
        self.note: Optional[str] = None
        current = self._read_knob()
        state = self._load_state()
        if state is None:
            self._original = current
            self._written: Optional[int] = None
        elif current == state["written"]:
            # A previous agent raised the knob and died: its record holds the operator's value.
            self._original = state["original"]
            self._written = current
            self._raised = current - self._original
            self.note = (
                f"{self.knob} raised by {self._raised} by a previous agent; operator value "
                f"{self._original} recovered from {self.state_path}"
            )
        else:
            # The knob moved since the record was written: the last writer was not us.
            self._original = current
            self._written = None
            self._drop_state()
            self.note = (
                f"{self.knob} is {current}, not the {state['written']} a previous agent wrote; "
                "keeping it as the operator's value"
            )

    @property
    def original(self) -> int:
        """The operator's value of the knob, restored when nothing is held."""
        return self._original

    @property
    def raised_by(self) -> int:
        """How many pages above the operator's value the knob currently is (by our writes)."""
        return self._raised

    def set(self, pages: int) -> None:
        """Make the knob the operator's value plus ``pages`` (0 restores the operator's value).

        The record is written before a raise and removed after the restore, so a crash at any
        point leaves either no record and the operator's value, or a record that matches.
        """
        if pages < 0:
            raise ValueError(f"surplus budget cannot be negative ({pages})")
        current = self._read_knob()
        if self._written is None:
            # Not raised: whatever the knob says now is the operator's value.
            self._original = current
        elif current != self._written:
            # The operator wrote the knob while we held it; their word is the new original.
            self._original = current
            self.note = f"{self.knob} changed to {current} by someone else; adopted as original"
        target = self._original + pages
        if pages > 0:
            self._save_state(target)
            self._write_knob(target)
            self._written = target
        else:
            if current != self._original:
                self._write_knob(self._original)
            self._drop_state()
            self._written = None
        self._raised = pages

    def restore(self) -> None:
        """Put back the operator's value (same as ``set(0)``)."""
        self.set(0)

    def close(self) -> None:
        """Release the run-directory lock; the knob and its record stay as they are."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _read_knob(self) -> int:
        try:
            with open(self.knob) as f:
                return int(f.read())
        except (OSError, ValueError) as exc:
            raise BudgetError(f"cannot read {self.knob}: {exc}") from exc

    def _write_knob(self, value: int) -> None:
        try:
            with open(self.knob, "w") as f:
                f.write(f"{value}\n")
        except OSError as exc:
            raise BudgetError(
                f"cannot write {value} to {self.knob}: {exc}; the agent must run as root"
            ) from exc

    def _load_state(self) -> Optional[Dict[str, int]]:
        try:
            with open(self.state_path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise BudgetError(
                f"cannot read the budget record {self.state_path}: {exc}; if "
                f"{self.knob} holds the operator's value, delete the file"
            ) from exc
        try:
            state = {"original": int(raw["original"]), "written": int(raw["written"])}
        except (KeyError, TypeError, ValueError) as exc:
            raise BudgetError(
                f"budget record {self.state_path} is malformed ({exc}); if {self.knob} holds "
                "the operator's value, delete the file"
            ) from exc
        return state

    def _save_state(self, written: int) -> None:
        tmp = self.state_path + ".tmp"
        data = json.dumps(
            {
                "version": _STATE_VERSION,
                "knob": self.knob,
                "original": self._original,
                "written": written,
            }
        )
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.state_path)
        except OSError as exc:
            raise BudgetError(f"cannot record the budget in {self.state_path}: {exc}") from exc

    def _drop_state(self) -> None:
        try:
            os.unlink(self.state_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BudgetError(f"cannot remove the budget record {self.state_path}: {exc}") from exc
