"""The balloon size each VM had before aerate first squeezed it, kept across daemon deaths.

The tuned model (/work/shared/STYLE.md): before the daemon's first inflate of a VM's balloon,
the balloon's size then (the operator's, or the VM's full memory) is saved here as one small
JSON file per VM under ``<run_dir>/balloon/``; on start-up the daemon puts every VM it finds
here back to that size, whatever it decides for the VM now (refused, mode=off, no channel,
not served by this daemon), and removes the record once the balloon is back. A daemon killed
with SIGKILL while a balloon is squeezed therefore gives the memory back when it restarts,
even though nothing ran at its death.

Writes are atomic (temporary file, fsync, rename, fsync of the directory): after a crash a
record is either the old one, the new one, or absent, never a torn file. An unreadable
record is reported with its path and left in place for the operator.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.parse
from dataclasses import dataclass

SUBDIR = "balloon"


class StoreError(RuntimeError):
    """A record cannot be read or written; the message names the file and the fix."""


@dataclass(frozen=True)
class Saved:
    """What the balloon looked like before aerate touched it."""

    vm: str
    target_bytes: int  # the balloon size to restore (guest memory, bytes)
    max_bytes: int
    saved_at: float  # wall-clock time, for the operator


def _file_name(vm: str) -> str:
    # Domain names may hold '/': quoted, the file always stays inside the directory.
    return urllib.parse.quote(vm, safe="") + ".json"


class BalloonStore:
    """One directory of per-VM records (see the module docstring)."""

    def __init__(self, run_dir: str) -> None:
        self.dir = os.path.join(run_dir, SUBDIR)

    def path(self, vm: str) -> str:
        """Where the record of ``vm`` lives."""
        return os.path.join(self.dir, _file_name(vm))

    def save(self, vm: str, target_bytes: int, max_bytes: int) -> Saved:
        """Record ``vm``'s pre-aerate balloon size, atomically; raises StoreError."""
        rec = Saved(vm, int(target_bytes), int(max_bytes), time.time())
        path = self.path(vm)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, json.dumps(rec.__dict__, sort_keys=True).encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StoreError(f"VM {vm}: cannot save the balloon size before inflating it "
                             f"({path}: {e.strerror}); not inflating. Check that "
                             f"{self.dir} is writable") from e
        return rec

    def load(self, vm: str) -> Saved | None:
        """The record of ``vm``, or None; raises StoreError when it is unreadable."""
        return self._read(self.path(vm))

    def _read(self, path: str) -> Saved | None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable balloon record ({e}); restore the VM's "
                             "memory with 'virsh setmem' and delete the file") from e
        try:
            return Saved(str(raw["vm"]), int(raw["target_bytes"]), int(raw["max_bytes"]),
                         float(raw["saved_at"]))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{path}: malformed balloon record (missing or bad {e}); "
                             "restore the VM's memory with 'virsh setmem' and delete "
                             "the file") from e

    def all(self) -> tuple[list[Saved], list[str]]:
        """Every readable record, and the errors of the unreadable ones."""
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return [], []
        except OSError as e:
            return [], [f"{self.dir}: cannot list balloon records: {e.strerror}"]
        out: list[Saved] = []
        errors: list[str] = []
        for n in names:
            if not n.endswith(".json"):
                continue
            try:
                rec = self._read(os.path.join(self.dir, n))
            except StoreError as e:
                errors.append(str(e))
                continue
            if rec is not None:
                out.append(rec)
        return out, errors

    def remove(self, vm: str) -> None:
        """Forget ``vm``'s record (its balloon is back); missing is fine."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(vm))
