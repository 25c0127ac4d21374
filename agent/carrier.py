"""Where held pages live while no agent runs: a named file on a hugetlbfs mount.

The hugetlb arena's pages belong to a hugetlbfs inode, not to the agent. An anonymous
memfd's inode lives only while some fd or mapping refers to it, so across an agent's death
it needs systemd's fd store, and that store is flushed whenever the unit stops (start-limit
hit, port device removed, ``systemctl stop`` after a SIGKILL or a stop timeout) on systemd
< 254, and on 254+ unless ``FileDescriptorStorePreserve=yes``. A *named* file on a hugetlbfs
mount needs nobody: its pages stay until the file is unlinked, truncated or punched, or
the filesystem is unmounted (reboot). So the arena is the file ``<dir>/aerate-agent-arena``
and the fd store is only the fallback where no usable mount exists.

Which mount. A file is only as durable as its filesystem instance (superblock). The agent
runs with ``PrivateMounts=yes`` and ``ProtectSystem=strict``: systemd gives it a private
copy of the host's mount tree, made a *slave* of it (mounts the host makes later propagate
in, mounts made inside never propagate out). A mount the agent made itself inside that
namespace would die with the namespace when the agent's last process exits, and the held
pages with it (the failure this module exists to avoid). The copy of a host mount, on the
other hand, is the same superblock as the host's (``/dev/hugepages``, mounted by PID 1
through ``dev-hugepages.mount`` on Debian and most systemd distributions), and the host's
mount namespace keeps that superblock alive after the agent's namespace is gone. So the
default is ``/dev/hugepages``; :func:`find_problem` refuses anything that is not a
hugetlbfs mount of 2 MiB pages, and :func:`propagation_note` says when a mount shows no
peer group (``shared:``/``master:`` in mountinfo), the sign of a mount private to some
namespace: fine where the agent runs in the init namespace (tests, no systemd), a risk
where it was mounted inside the agent's own namespace.

The sandbox: ``ProtectSystem=strict`` leaves ``/dev`` writable (it is one of the API
trees systemd exempts) and the unit also lists ``-/dev/hugepages`` in ``ReadWritePaths=``;
``DevicePolicy=closed`` filters device *nodes* through the device cgroup and does not apply
to regular files on hugetlbfs; ``PrivateDevices=`` is not set (it would replace /dev with a
private tmpfs, hiding the mount). tests/vm checks the file appears in the booted guest.
"""

from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional

DEFAULT_ARENA_DIR = "/dev/hugepages"
ARENA_FILE = "aerate-agent-arena"
#: Overrides DEFAULT_ARENA_DIR ("" = use no named file: memfd + fd store only).
ENV_ARENA_DIR = "AERATE_ARENA_DIR"
_MOUNTINFO = "/proc/self/mountinfo"


class MountEntry(NamedTuple):
    """One line of /proc/<pid>/mountinfo, the fields the carrier needs."""

    mount_point: str
    fstype: str
    #: optional fields: "shared:N", "master:N", "propagate_from:N", "unbindable"
    propagation: List[str]
    super_options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 1 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> List[MountEntry]:
    """Parse mountinfo text; lines that do not have the documented shape are skipped."""
    out: List[MountEntry] = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 4 or len(fields) < 6:
            continue
        out.append(MountEntry(_unescape(fields[4]), fields[sep + 1], fields[6:sep],
                              fields[sep + 3]))
    return out


def mount_of(path: str, entries: List[MountEntry]) -> Optional[MountEntry]:
    """The mount that ``path`` (absolute, symlinks resolved) lies on: the last, longest match
    (a later mount on the same point hides the earlier one)."""
    best: Optional[MountEntry] = None
    for e in entries:
        mp = e.mount_point.rstrip("/") or "/"
        inside = path == mp or path.startswith(mp + "/") or mp == "/"
        if inside and (best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")):
            best = e
    return best


def _pagesize_option(super_options: str) -> Optional[int]:
    """Bytes from a hugetlbfs ``pagesize=`` super option (2M, 2048k, 1G), None if absent."""
    for opt in super_options.split(","):
        if opt.startswith("pagesize="):
            value = opt[len("pagesize="):].upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(value[-1:], 1)
            digits = value[:-1] if value[-1:] in "KMG" else value
            try:
                return int(digits) * scale
            except ValueError:
                return None
    return None


def find_problem(directory: str, entries: List[MountEntry], page_bytes: int) -> str:
    """Why ``directory`` cannot carry the arena ("" if it can), from mountinfo alone."""
    entry = mount_of(directory, entries)
    if entry is None or entry.fstype != "hugetlbfs":
        what = "no mount" if entry is None else f"{entry.fstype} mounted on {entry.mount_point}"
        return (f"{directory} is not on a hugetlbfs mount ({what}); mount one there in the "
                "init mount namespace (dev-hugepages.mount does for /dev/hugepages)")
    size = _pagesize_option(entry.super_options)
    if size is not None and size != page_bytes:
        return (f"hugetlbfs on {entry.mount_point} has {size >> 20} MiB pages, the arena "
                f"needs {page_bytes >> 20} MiB ones (mount option pagesize=)")
    return ""


def propagation_note(directory: str, entries: List[MountEntry]) -> str:
    """A warning when the mount has no peer group (possibly namespace-local), else ""."""
    entry = mount_of(directory, entries)
    if entry is None:
        return ""
    if any(p.startswith(("shared:", "master:")) for p in entry.propagation):
        return ""
    return (f"the hugetlbfs mount on {entry.mount_point} is private to this mount namespace; "
            "if it was mounted inside the agent's own namespace, held pages die with it")


def read_mountinfo() -> List[MountEntry]:
    """This process's mount table."""
    with open(_MOUNTINFO) as f:
        return parse_mountinfo(f.read())


def arena_dir_from_env(env: Optional[Dict[str, str]] = None) -> str:
    """The directory for the named arena file: $AERATE_ARENA_DIR or /dev/hugepages."""
    return (os.environ if env is None else env).get(ENV_ARENA_DIR, DEFAULT_ARENA_DIR)


def check_dir(directory: str, page_bytes: int) -> str:
    """Why ``directory`` cannot carry a named arena file here ("" = it can)."""
    if not directory:
        return f"no arena directory (${ENV_ARENA_DIR} is empty)"
    real = os.path.realpath(directory)
    if not os.path.isdir(real):
        return f"{directory} does not exist"
    try:
        problem = find_problem(real, read_mountinfo(), page_bytes)
    except OSError as exc:
        return f"cannot read {_MOUNTINFO}: {exc}"
    if problem:
        return problem
    try:
        size = os.statvfs(real).f_bsize
    except OSError as exc:
        return f"statvfs({directory}) failed: {exc}"
    if size != page_bytes:
        return (f"hugetlbfs on {directory} has {size >> 20} MiB pages, the arena needs "
                f"{page_bytes >> 20} MiB ones")
    if not os.access(real, os.W_OK):
        return (f"{directory} is not writable by the agent (ProtectSystem=/ReadWritePaths= of "
                "its unit, or permissions)")
    return ""
