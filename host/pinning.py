"""Does the VM's QEMU hold a device that can pin guest RAM? (S7, from ``/proc/<pid>/fd``)

A VFIO device, an iommufd or a vhost-vdpa device maps guest RAM into an IOMMU and pins
every mapped page: a hole punched under it does not free the page (it stays pinned) and
the device keeps DMA-ing into memory the guest believes is the same as before, while the
guest's next touch faults in a fresh zero page: the device and the guest no longer share
memory. QEMU refuses its own discards then (``ram_block_discard_disable``). Hot-plug opens
the device in QEMU seconds before the live domain XML shows it, so the XML is not enough:
this scan reads what QEMU has open, right before and right after each fallocate (punch()'s
``checks``).

Cost: one listdir and one readlink per open fd of QEMU (typically 50-200), a few hundred
microseconds per check. Races: a device opened between the check before a fallocate and
the fallocate itself is caught by the check right after it, and the VM is refused from
then on; VFIO pins at DMA-map time, which comes after the open, so the window in which a
page could be punched and pinned at once is the fallocate itself.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence

#: Device paths whose fd in QEMU means guest RAM may be pinned for DMA.
PATTERNS: tuple[str, ...] = ("/dev/vfio/*", "/dev/iommu", "/dev/vhost-vdpa-*")
#: Extra patterns, for tests only (a stand-in device path): empty in production.
EXTRA_PATTERNS: list[str] = []


def _matcher(patterns: tuple[str, ...]) -> re.Pattern[str]:
    # One compiled alternation instead of an fnmatch call per pattern per fd: the scan runs
    # twice per slice, for every fd of QEMU. Keyed by the pattern tuple, so a change of
    # EXTRA_PATTERNS (tests) is seen at once.
    compiled = _COMPILED.get(patterns)
    if compiled is None:
        compiled = re.compile("|".join(fnmatch.translate(p) for p in patterns))
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        _COMPILED[patterns] = compiled
    return compiled


_COMPILED: dict[tuple[str, ...], re.Pattern[str]] = {}


def matches(target: str, patterns: Sequence[str] = ()) -> bool:
    """Whether an fd's link target is a pinning device."""
    return _matcher((*PATTERNS, *EXTRA_PATTERNS, *patterns)).match(target) is not None


def scan(pid: int | None, proc: str = "/proc", patterns: Sequence[str] = ()) -> str:
    """"" when process ``pid`` holds no pinning device fd, else what refuses, in words.

    Fails closed: an unknown pid or an fd directory that cannot be listed is a refusal
    (the process may be gone, or we may lack the right to look). A single fd closed while
    we look is skipped: a closed device fd no longer pins anything.
    """
    if pid is None:
        return "an fd of unknown QEMU (no pid known for the VM)"
    fd_dir = os.path.join(proc, str(pid), "fd")
    pinning = _matcher((*PATTERNS, *EXTRA_PATTERNS, *patterns))
    try:
        # The directory is opened once per scan and each link read relative to it: no
        # path walk through /proc/<pid>/fd per fd.
        dir_fd = os.open(fd_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        return f"an fd that cannot be checked ({fd_dir}: {e.strerror or e})"
    try:
        try:
            names = os.listdir(dir_fd)
        except OSError as e:
            return f"an fd that cannot be checked ({fd_dir}: {e.strerror or e})"
        for name in sorted(names, key=lambda n: (len(n), n)):
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            except OSError as e:
                return f"an fd that cannot be checked ({fd_dir}/{name}: {e.strerror or e})"
            if pinning.match(target) is not None:
                return f"{target} (fd {name} of pid {pid})"
        return ""
    finally:
        os.close(dir_fd)
