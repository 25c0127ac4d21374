"""The one place in aerate that discards guest memory.

`punch` re-checks every input of safety invariant S1 it can see just before it acts:
the reclaimer decision taken now, the range inside the VM's RAM per QEMU's map and
aligned to the backing page size, the backing still the same file (device + inode).
Only then does it call fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) on the
backing file at the mapped offset, the operation QEMU itself uses to discard shared RAM.
Whether the range belongs to an un-acked report of the current session is the session's
check, done before calling here.

Slices and checks. A range is punched in slices of at most ``SLICE_BYTES``, and the
caller's ``checks`` (host/session.py: the report's lease window is still open, the session
was not revoked by a guest reset; host/pinning.py-style scans) run right before each slice:
one that answers a reason stops the discard there. They run again right after each slice
(a check's ``after``, where it has one: the lease's asks whether the guest may already have
taken the pages back, a whole lease after the token, not whether the window closed): a
reason then means the slice's fallocate ended too late (the daemon was stalled in the
middle of it), which is reported as an *overrun* so it is logged and counted.
A slice bounds how long the discard runs between two full rounds of checks; the cheap ones
(the lease window, the session's revocation: a clock and an attribute read) are asked
again right before each granule's fallocate, after the content check's read of that
granule, so a fallocate starts within a clock read of its lease check, which is what the
lease argument in agent/protocol.py needs.

Only zeroes are discarded (content check). Every page an honest agent reports is zero in
the backing: it took the page with a hugetlb (or THP) fault or fallocate, which the guest
kernel clears before handing it over, and the agent never writes to it (agent/arena.py).
A discarded page reads back as zeroes. So a range that reads as all zeroes right before
its fallocate is discarded without changing a byte the guest can see, whoever owns it by
then; a range holding anything else is not the agent's untouched page any more, and is
not discarded: ``punch`` reads each granule (in chunks of at most ``CHECK_BYTES``) right
before punching that granule and refuses with ``content`` set at the first non-zero byte,
after discarding the granules before it. What this guards against is everything the other
checks learn late or not at all: a guest reset (or kexec, a watchdog, ``virsh reset``)
seen only when libvirt's event comes in, on a thread that races the one reading the
stale report; a page the guest kernel migrated while it was reported; an agent that lost
its pages. It does not depend on any of those being told in time. What remains: a write
by a new owner between a granule's read and its fallocate's entry (the read of one
granule, about 0.7 ms for 2 MiB here; a whole 1 GiB granule reads for about 0.3 s) is
lost, the page then reading as zeroes; memory that is zero and owned, such as a page the
new owner zeroed and has not written since, is discarded and reads as the zeroes it held
(nothing is lost), except a page a direct I/O is being read into at that moment (QEMU's
``cache=none`` with native or io_uring AIO pins it; userspace cannot see such a pin): the
I/O lands in the page the punch took out of the file and the guest reads zeroes. All of
these need the race the check stands behind (a reset or a moved page that the events did
not stop in time), so a content refusal is logged as an incident. Guests whose memory
the host cannot read as it is (encrypted memory: SEV, TDX) never pass this check: every
report is refused with the reason, the safe side. The cost is one read of the discarded
memory (about 0.3 s of daemon CPU a GiB on this machine, beside 0.2 s for the punch).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Mapping, Sequence

from aerate.host.backing import Backing
from aerate.host.qemu_map import GuestMemoryMap, RangeRejected, locate
from aerate.host.refusal import Decision

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


_libc = ctypes.CDLL(None, use_errno=True)
# os.posix_fallocate only allocates; punching needs the Linux fallocate(2) with flags.
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
#: Most bytes one fallocate call punches; the checks run between slices.
SLICE_BYTES = 64 << 20
#: A check: "" when the discard may go on, else the reason it must stop.
Check = Callable[[], str]
#: Told (bytes discarded, the backing's allocation before, after): host/verify.py.
Verify = Callable[[int, int, int], None]
#: Most bytes the content check reads at once (one reusable buffer per thread).
CHECK_BYTES = 2 << 20
_ZERO = bytes(CHECK_BYTES)
_buffers = threading.local()


class PunchRefused(RuntimeError):
    """A check failed; ``done`` bytes at the start of the range were discarded before it
    (0: nothing was touched). ``overrun``: the check failed right *after* a slice, so that
    slice ran past the lease window."""

    def __init__(self, vm: str, gpa: int, length: int, reason: str, done: int = 0,
                 overrun: bool = False, content: bool = False) -> None:
        what = f"stopped after {done:#x} bytes" if done else "not discarding"
        super().__init__(f"VM {vm}: {what} of gpa {gpa:#x}+{length:#x}: {reason}")
        self.vm = vm
        self.gpa = gpa
        self.length = length
        self.reason = reason
        self.done = done
        self.overrun = overrun
        #: the range was not all zeroes: not the agent's untouched page (module docstring)
        self.content = content


def _first_problem(checks: Sequence[Check]) -> str:
    for check in checks:
        why = check()
        if why:
            return why
    return ""


class PunchFailed(RuntimeError):
    """The kernel refused the discard (the range may be partly discarded)."""

    def __init__(self, vm: str, gpa: int, length: int, detail: str, err: int) -> None:
        super().__init__(f"VM {vm}: discarding gpa {gpa:#x}+{length:#x} failed: {detail}")
        self.vm = vm
        self.gpa = gpa
        self.length = length
        self.errno = err


def first_nonzero(fd: int, offset: int, length: int) -> int:
    """Offset (from ``offset``) of the first ``CHECK_BYTES`` chunk of ``fd`` in
    [offset, offset+length) that is not all zeroes, or -1 when every byte is zero.
    Holes read as zeroes without being backed (pread, never a mapping: a read fault on a
    shmem hole would allocate the page). A short read counts as not zero."""
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(CHECK_BYTES)
    view = memoryview(buf)
    pos = 0
    while pos < length:
        n = min(CHECK_BYTES, length - pos)
        got = os.preadv(fd, [view[:n]], offset + pos)
        same = buf == _ZERO if n == CHECK_BYTES else bytes(view[:n]) == _ZERO[:n]
        if got != n or not same:
            return pos
        pos += n
    return -1


def _forget_buffer() -> None:
    """Zero this thread's read buffer: guest data it read for a refused range does not
    linger in the daemon (a core dump, say)."""
    buf = getattr(_buffers, "buf", None)
    if buf is not None:
        buf[:] = _ZERO


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
    checks: Sequence[Check] = (),
    slice_bytes: int = SLICE_BYTES,
    verify: Verify | None = None,
) -> int:
    """Discard guest range [gpa, gpa+length) of `vm` from its backing; return bytes punched.

    `gmap`/`backings` are this VM's map and resolved backings; `granule` is the reporting
    granule told to the guest; `permit()` is asked now and must answer action "punch";
    every check runs right before and right after each slice (module docstring): a reason
    before refuses (PunchRefused with it, ``done`` bytes discarded before), a reason after
    is an incident (PunchRefused with ``overrun``; a check that must refuse the VM from then
    on latches itself, e.g. host/pinning.py). Raises PunchRefused or PunchFailed.

    ``verify(done, before, after)``, when given, is told the bytes discarded and the
    allocation of the file punched (st_blocks * 512 of this fd) before the first slice and
    after the last one, whenever bytes were discarded and no fallocate failed (as the
    session counts them); host/verify.py. It costs one fstat; it decides nothing.
    """
    # The checks run right before each slice below (not also here: the first of them
    # would run twice in a row, and the pinning scan reads every fd of QEMU).
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
    done = before = 0
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
        step = max(granule, slice_bytes // granule * granule)
        afters = [getattr(check, "after", check) for check in checks]
        cheap = [check for check in checks if getattr(check, "cheap", False)]
        before = st.st_blocks * 512
        while done < length:
            n = min(step, length - done)
            why = _first_problem(checks)   # right before the syscall, every slice
            if why:
                raise PunchRefused(vm, gpa, length, why, done)
            end = done + n
            while done < end:
                # Granule by granule: read it, then punch it (module docstring).
                g = min(granule, end - done)
                try:
                    bad = first_nonzero(fd, offset + done, g)
                except OSError as exc:   # EIO on a poisoned page, a backing gone
                    raise PunchRefused(vm, gpa, length, f"cannot read {backing.link} at "
                                       f"offset {offset + done:#x}: {exc.strerror}",
                                       done) from exc
                if bad >= 0:
                    _forget_buffer()
                    raise PunchRefused(
                        vm, gpa, length,
                        f"gpa {gpa + done + bad:#x} does not read as zeroes: not the page "
                        "the guest reported any more (it was reset, moved or reused the "
                        "page since), or memory the host cannot read as it is (encrypted); "
                        "never discarded", done, content=True)
                # The read took time: the cheap checks (the lease window, the session's
                # revocation) are asked again right before this granule's fallocate.
                why = _first_problem(cheap)
                if why:
                    raise PunchRefused(vm, gpa, length, why, done)
                try:
                    fallocate_punch(fd, offset + done, g)
                except OSError as exc:
                    hint = (
                        "the backing filesystem cannot punch holes; use memfd or "
                        "tmpfs/hugetlbfs" if exc.errno == errno.EOPNOTSUPP
                        else "check the kernel log and the backing file"
                    )
                    raise PunchFailed(
                        vm, gpa, length,
                        f"fallocate(PUNCH_HOLE) on {backing.link} at offset "
                        f"{offset + done:#x}: {exc.strerror}; {hint}",
                        exc.errno or 0,
                    ) from exc
                done += g
            why = _first_problem(afters)
            if why:
                raise PunchRefused(vm, gpa, length, why, done, overrun=True)
    except PunchFailed:
        done = 0   # the session counts nothing of a failed discard
        raise
    finally:
        if verify is not None and done:
            verify(done, before, os.fstat(fd).st_blocks * 512)
        os.close(fd)
    return length
