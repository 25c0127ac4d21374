"""Runs inside the guest, as a service with aerate-agent's sandbox: can the agent do its job?

Prints one JSON object: each check's result, or "FAIL: ..." with the reason. Exits 1 when a
check the agent needs fails. Standard library only; copied into the guest by tests/vm.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import sys
from typing import Any, Callable, Dict

PAGE = 4096
HUGE = 2 << 20
MFD_HUGETLB = 0x0004
# The agent may use either knob: the sysctl, or the per-size sysfs file.
OVERCOMMIT_KNOBS = ("/proc/sys/vm/nr_overcommit_hugepages",
                    "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_overcommit_hugepages")


def pagemap_pfn() -> int:
    """PFN of a touched page of ours; 0 comes back without CAP_SYS_ADMIN."""
    m = mmap.mmap(-1, PAGE)
    m[0:1] = b"x"
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        entry = struct.unpack("<Q", f.read(8))[0]
    pfn = entry & ((1 << 55) - 1)
    if not (entry >> 63) & 1 or pfn == 0:
        raise RuntimeError("pagemap entry %#x has no PFN (CAP_SYS_ADMIN missing?)" % entry)
    return int(pfn)


def kpageflags(pfn: int) -> str:
    """The kernel's flags of that PFN."""
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        return hex(struct.unpack("<Q", os.pread(fd, 8, pfn * 8))[0])
    finally:
        os.close(fd)


def hugetlb_surplus(knob: str) -> str:
    """Raise nr_overcommit_hugepages by one via ``knob``, fault a hugetlb memfd page, undo."""
    with open(knob) as f:
        before = int(f.read())
    with open(knob, "w") as f:
        f.write(str(before + 1))
    try:
        with open(knob) as f:
            now = int(f.read())
        if now != before + 1:
            raise RuntimeError("wrote %d to %s, reads back %d" % (before + 1, knob, now))
        fd = os.memfd_create("aerate-probe", MFD_HUGETLB)
        try:
            os.ftruncate(fd, HUGE)
            m = mmap.mmap(fd, HUGE)
            m[0:4] = b"aera"
            m.close()
        finally:
            os.close(fd)
    finally:
        with open(knob, "w") as f:
            f.write(str(before))
    return "ok (overcommit %d -> %d -> %d)" % (before, before + 1, before)


def mlock_page() -> str:
    """mlock one page (the THP fallback arena locks its memory)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(PAGE)
    if libc.mlock(buf, ctypes.c_size_t(PAGE)) != 0:
        raise OSError(ctypes.get_errno(), "mlock")
    libc.munlock(buf, ctypes.c_size_t(PAGE))
    return "ok"


def etc_is_read_only() -> str:
    """The sandbox is really in place: /etc cannot be written (ProtectSystem=strict)."""
    try:
        with open("/etc/aerate-sandbox-probe", "w"):
            pass
    except OSError as exc:
        return "denied (%s)" % exc.strerror
    os.unlink("/etc/aerate-sandbox-probe")
    raise RuntimeError("wrote to /etc: the sandbox is not applied")


def main() -> int:
    """Run every check, print the JSON result, exit 1 on any failure."""
    results: Dict[str, Any] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        try:
            results[name] = fn()
        except Exception as exc:
            results[name] = "FAIL: %s: %s" % (type(exc).__name__, exc)
        return results[name]

    pfn = step("pagemap_pfn", pagemap_pfn)
    if isinstance(pfn, int):
        step("kpageflags", lambda: kpageflags(pfn))
    else:
        results["kpageflags"] = "FAIL: no PFN to look up"
    step("hugetlb_surplus_sysctl", lambda: hugetlb_surplus(OVERCOMMIT_KNOBS[0]))
    step("hugetlb_surplus_sysfs", lambda: hugetlb_surplus(OVERCOMMIT_KNOBS[1]))
    step("mlock", mlock_page)
    step("etc_read_only", etc_is_read_only)
    print(json.dumps(results), flush=True)
    return 1 if any(str(v).startswith("FAIL") for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
