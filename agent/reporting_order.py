"""The guest kernel's own free page reporting, tuned live (setting ``kernel_reporting_order``).

Where the guest kernel reports free pages itself (virtio-balloon free-page-reporting
negotiated), the agent stays statistics-only and the host leaves the VM to the kernel
(host/refusal.py KERNEL). What the kernel lacks is a knob an operator can turn: it reports
only free blocks of order >= ``page_reporting_order`` (a module parameter, Linux >= 5.14,
default pageblock_order: 2 MiB on x86), so a guest whose free memory sits in smaller blocks
keeps it from the host. The setting writes that parameter, live; -1 gives the kernel its own
value back.

The kernel's value is saved, before the first write, under the agent's run directory (a
restarted agent finds the saved value and keeps it as the original, so a crash never makes
a tuned value look like the kernel's), and written back when the agent stops or the
setting returns to -1. Writing the parameter cannot hand the host any page the kernel did
not report as free: the order only chooses which free blocks the kernel's own reporting
takes, and every safety rule of that path (QEMU's discard, the kernel's isolation of
reported pages) is the kernel's.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from . import procfs

log = logging.getLogger("aerate-agent")
PARAM = "sys/module/page_reporting/parameters/page_reporting_order"
SAVED = "page_reporting_order.orig"
#: The setting's "leave the kernel's value" value.
KERNEL_DEFAULT = -1


class ReportingOrder:
    """Owns the guest's ``page_reporting_order`` while the setting asks for another."""

    def __init__(self, root: str = "/", run_dir: str = "/run/aerate-agent") -> None:
        self.path = os.path.join(root, PARAM)
        self.saved = os.path.join(run_dir, SAVED)
        self.note = ""  # what the last apply did, for status and the journal

    def _read(self, path: str) -> int:
        return int(procfs.read_text(path).strip())

    def _write(self, value: int) -> None:
        with open(self.path, "w") as f:
            f.write("%d\n" % value)

    def original(self) -> Optional[int]:
        """The kernel's own value, as saved before aerate first changed it (None: never)."""
        try:
            return self._read(self.saved)
        except (OSError, ValueError):
            return None

    def apply(self, order: int) -> str:
        """Make the kernel report blocks of order >= ``order`` (-1: its own value). Returns
        what happened, in words; never raises for a kernel that lacks the parameter."""
        if not os.path.exists(self.path):
            self.note = ("" if order == KERNEL_DEFAULT else
                         "kernel_reporting_order=%d not applied: this kernel has no %s "
                         "(Linux >= 5.14)" % (order, "/" + PARAM))
            return self.note
        try:
            if order == KERNEL_DEFAULT:
                self.restore()
                return self.note
            if self.original() is None:
                own = self._read(self.path)
                os.makedirs(os.path.dirname(self.saved), exist_ok=True)
                tmp = self.saved + ".tmp"
                with open(tmp, "w") as f:
                    f.write("%d\n" % own)
                os.replace(tmp, self.saved)
            self._write(order)
            self.note = "page_reporting_order set to %d (the kernel's own: %s)" % (
                order, self.original())
        except (OSError, ValueError) as e:
            self.note = "kernel_reporting_order=%d not applied: %s" % (order, e)
        return self.note

    def restore(self) -> None:
        """Give the kernel its own value back (if aerate ever changed it)."""
        own = self.original()
        if own is None:
            self.note = ""
            return
        try:
            self._write(own)
            os.unlink(self.saved)
            self.note = "page_reporting_order back at the kernel's %d" % own
        except OSError as e:
            self.note = "could not give page_reporting_order back (%d): %s" % (own, e)
            log.warning("%s", self.note)
