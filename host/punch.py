"""The one place in aerate that discards guest memory.

`punch` re-checks every input of safety invariant S1 it can see just before it acts:
the reclaimer decision taken now, the range inside the VM's RAM per QEMU's map and
aligned to the backing page size, the backing still the same file (device + inode).
Only then does it call fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) on the
backing file at the mapped offset, the operation QEMU itself uses to discard shared RAM.
Whether the range belongs to an un-acked report of the current session is the session's
check, done before calling here.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Callable, Mapping, Sequence

from aerate.host.backing import Backing
from aerate.host.qemu_map import GuestMemoryMap, RangeRejected, locate
from aerate.host.refusal import Decision

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

log = logging.getLogger("aerated")

_libc = ctypes.CDLL(None, use_errno=True)
# os.posix_fallocate only allocates; punching needs the Linux fallocate(2) with flags.
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class PunchRefused(RuntimeError):
    """A check failed before any memory was touched."""

    def __init__(self, vm: str, gpa: int, length: int, reason: str) -> None:
        super().__init__(f"VM {vm}: not discarding gpa {gpa:#x}+{length:#x}: {reason}")
        self.vm = vm
        self.gpa = gpa
        self.length = length
        self.reason = reason


class PunchFailed(RuntimeError):
    """The kernel refused the discard (the range may be partly discarded)."""

    def __init__(self, vm: str, gpa: int, length: int, detail: str, err: int) -> None:
        super().__init__(f"VM {vm}: discarding gpa {gpa:#x}+{length:#x} failed: {detail}")
        self.vm = vm
        self.gpa = gpa
        self.length = length
        self.errno = err


def fallocate_punch(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE) on `fd`; raises OSError with the kernel's errno."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch(
    vm: str,
    gmap: GuestMemoryMap,
    backings: Mapping[str, Backing],
    gpa: int,
    length: int,
    granule: int,
    permit: Callable[[], Decision],
    checks: Sequence[Callable[[], str]] = (),
) -> int:
    """Discard guest range [gpa, gpa+length) of `vm` from its backing; return bytes punched.

    `gmap`/`backings` are this VM's map and resolved backings; `granule` is the reporting
    granule told to the guest; `permit()` is asked now and must answer action "punch".
    Raises PunchRefused (nothing touched) or PunchFailed (fallocate failed).

    `checks` run right before the fallocate (a non-empty answer refuses: PunchRefused with
    it, nothing touched) and once right after it (a non-empty answer is an incident: logged
    at error; the check itself must make the VM refused from then on, e.g. by latching).
    """
    decision = permit()
    if decision.action != "punch":
        raise PunchRefused(vm, gpa, length, f"reclaimer is {decision.action}: {decision.reason}")
    try:
        place = locate(gmap, gpa, length, granule)
    except RangeRejected as exc:
        raise PunchRefused(vm, gpa, length, exc.reason) from exc
    backing = backings.get(place.block_name)
    if backing is None or not backing.punchable or backing.path is None:
        why = backing.reason if backing is not None else "no resolved backing"
        raise PunchRefused(vm, gpa, length, f"block {place.block_name!r} is not punchable: {why}")
    if backing.page_size != place.page_size:
        raise PunchRefused(
            vm, gpa, length,
            f"block {place.block_name!r}: map says {place.page_size:#x}-byte pages, backing "
            f"{backing.page_size:#x}; rebuild the map",
        )
    if place.block_offset + length > backing.length:
        raise PunchRefused(vm, gpa, length, f"past the end of block {place.block_name!r}")
    offset = backing.file_offset + place.block_offset
    try:
        fd = os.open(backing.path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        # QEMU exited or closed the backing: the map is stale, nothing to discard.
        raise PunchRefused(
            vm, gpa, length, f"cannot open the backing {backing.path}: {exc.strerror}"
        ) from exc
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (backing.dev, backing.ino):
            raise PunchRefused(
                vm, gpa, length,
                f"{backing.path} is no longer {backing.link} (QEMU restarted?); rebuild the map",
            )
        if offset + length > st.st_size:
            raise PunchRefused(
                vm, gpa, length, f"{backing.link} shrank below offset {offset + length:#x}"
            )
        for check in checks:
            why = check()
            if why:
                raise PunchRefused(vm, gpa, length, why)
        try:
            fallocate_punch(fd, offset, length)
        except OSError as exc:
            hint = (
                "the backing filesystem cannot punch holes; use memfd or tmpfs/hugetlbfs"
                if exc.errno == errno.EOPNOTSUPP
                else "check the kernel log and the backing file"
            )
            raise PunchFailed(
                vm, gpa, length,
                f"fallocate(PUNCH_HOLE) on {backing.link} at offset {offset:#x}: "
                f"{exc.strerror}; {hint}",
                exc.errno or 0,
            ) from exc
    finally:
        os.close(fd)
    for check in checks:
        why = check()
        if why:
            log.error("VM %s: after discarding gpa %#x+%#x: %s; the VM is refused from now on",
                      vm, gpa, length, why)
    return length
