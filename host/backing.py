"""Find and describe the host memory behind each RAM block of a running QEMU.

The chain of evidence, all from the kernel and QEMU itself, never from names alone:
1. QEMU's `gpa2hva` gives the host virtual address of a guest-physical address; minus
   the piece's block offset that is where the block starts in QEMU's address space.
2. /proc/<pid>/smaps gives the mapping (VMA) there: shared or private, the file's device
   and inode, the file offset, the kernel page size, hugetlb or not.
3. /proc/<pid>/fd (or /proc/<pid>/map_files) gives an openable path to that same inode,
   checked by stat (device + inode), never by the link text.
Anything that does not line up ends as kind UNKNOWN with the reason, which means refuse.

Parsers (`parse_smaps`, `parse_gpa2hva`, `parse_mountinfo`, `classify`) are pure; `resolve`
and `allocated_bytes` read /proc.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from aerate.host.qemu_map import GuestMemoryMap, RamRange


class BackingKind(str, enum.Enum):
    """What holds a RAM block's memory on the host."""

    MEMFD_SHARED = "memfd-shared"  # memfd on shmem, mapped shared
    MEMFD_HUGETLB = "memfd-hugetlb"  # memfd with MFD_HUGETLB, mapped shared
    FILE_SHARED = "file-shared"  # a named file (tmpfs, hugetlbfs, ...), mapped shared
    ANON_SHARED = "anon-shared"  # MAP_SHARED|MAP_ANONYMOUS (shmem "/dev/zero (deleted)")
    ANON_PRIVATE = "anon-private"  # plain private anonymous memory (libvirt's default)
    FILE_PRIVATE = "file-private"  # a file mapped private (copy-on-write)
    UNKNOWN = "unknown"  # not proven; refuse


# Kinds where fallocate(PUNCH_HOLE) on the backing file frees exactly the guest's pages.
PUNCHABLE = frozenset(
    {BackingKind.MEMFD_SHARED, BackingKind.MEMFD_HUGETLB, BackingKind.FILE_SHARED,
     BackingKind.ANON_SHARED}
)


class BackingError(RuntimeError):
    """The backing of a block could not be proven from /proc and QEMU's answers."""


@dataclass(frozen=True)
class Vma:
    """One mapping of /proc/<pid>/smaps (or maps, without the detail fields)."""

    start: int
    end: int
    perms: str
    pgoff: int
    dev: int
    ino: int
    path: str
    kernel_page_size: int = 0
    vm_flags: frozenset[str] = field(default_factory=frozenset)
    rss: int = 0
    swap: int = 0

    @property
    def shared(self) -> bool:
        """MAP_SHARED mapping."""
        return self.perms[3:4] == "s"


@dataclass(frozen=True)
class Backing:
    """The proven host backing of one RAM block (or UNKNOWN with the reason)."""

    vm_pid: int
    block_name: str
    kind: BackingKind
    reason: str  # evidence for operators; for UNKNOWN, why the map cannot prove it
    page_size: int = 0
    path: str | None = None  # /proc/<pid>/fd/<n> or /proc/<pid>/map_files/<a>-<b>
    link: str = ""  # what the path points to, for humans ("/memfd:... (deleted)")
    dev: int = 0
    ino: int = 0
    file_offset: int = 0  # file offset of block offset 0
    file_size: int = 0
    fs_type: str = ""
    hva: int = 0  # where the block starts in QEMU's address space
    length: int = 0  # block used length

    @property
    def punchable(self) -> bool:
        """The punch reclaimer can discard this block's pages."""
        return self.kind in PUNCHABLE and self.path is not None


def reads_stay_in_memory(backings: Iterable[Backing], swap_total: int | None) -> bool:
    """Whether reading these backings' pages can never wait on a disk (S8: the daemon's
    loop thread reads small reports' ranges itself, host/daemon.py VmRunner._run_job).

    hugetlbfs pages are never swapped or written back, so a read of a populated one is a
    memory copy and a hole reads as nothing (the content check skips holes). shmem (memfd,
    anonymous shared, tmpfs) pages are written out only to swap: with no swap configured
    (``swap_total`` 0) a read never waits either. Anything else -- a file on a disk
    filesystem, shmem on a host with swap, an unknown swap figure, no backing at all -- may
    wait on I/O for as long as the disk takes, and is read on the VM's own thread instead.

    Under which delays: the swap figure is a sample (control.watch_pressure, every second).
    Swap turned on after it, and pages swapped out before the next one, can make one read
    of at most ``INLINE_DISCARD_BYTES`` wait on the new swap device: bounded, and once.
    """
    held = list(backings)
    return bool(held) and all(
        b.fs_type == "hugetlbfs" or (b.fs_type == "tmpfs" and swap_total == 0) for b in held)


_VMA_HEAD = re.compile(
    r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) (?P<perms>\S{4}) (?P<pgoff>[0-9a-f]+) "
    r"(?P<major>[0-9a-f]+):(?P<minor>[0-9a-f]+) (?P<ino>\d+)\s*(?P<path>.*)$"
)


def parse_smaps(text: str) -> list[Vma]:
    """Parse /proc/<pid>/smaps (or /proc/<pid>/maps) into VMAs."""
    vmas: list[Vma] = []
    cur: dict[str, object] | None = None

    def flush() -> None:
        if cur is not None:
            vmas.append(Vma(**cur))  # type: ignore[arg-type]

    for line in text.splitlines():
        m = _VMA_HEAD.match(line)
        if m:
            flush()
            cur = {
                "start": int(m.group("start"), 16),
                "end": int(m.group("end"), 16),
                "perms": m.group("perms"),
                "pgoff": int(m.group("pgoff"), 16),
                "dev": os.makedev(int(m.group("major"), 16), int(m.group("minor"), 16)),
                "ino": int(m.group("ino")),
                "path": m.group("path"),
            }
            continue
        if cur is None:
            continue
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "KernelPageSize":
            cur["kernel_page_size"] = int(value.split()[0]) * 1024
        elif key == "Rss":
            cur["rss"] = int(value.split()[0]) * 1024
        elif key == "Swap":
            cur["swap"] = int(value.split()[0]) * 1024
        elif key == "VmFlags":
            cur["vm_flags"] = frozenset(value.split())
    flush()
    return vmas


_GPA2HVA = re.compile(r"Host virtual address for 0x([0-9a-f]+) \((\S+)\) is 0x([0-9a-f]+)")


def parse_gpa2hva(text: str) -> tuple[int, str, int]:
    """HMP `gpa2hva` answer -> (gpa, memory region name, hva)."""
    m = _GPA2HVA.search(text)
    if not m:
        raise BackingError(f"gpa2hva: unexpected answer {text.strip()!r}")
    return int(m.group(1), 16), m.group(2), int(m.group(3), 16)


def parse_mountinfo(text: str) -> dict[int, str]:
    """/proc/<pid>/mountinfo -> {st_dev: filesystem type}."""
    out: dict[int, str] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 3:
            continue
        major, _, minor = fields[2].partition(":")
        out[os.makedev(int(major), int(minor))] = right.split()[0]
    return out


def covering_vma(vmas: Sequence[Vma], hva: int, length: int) -> Vma:
    """The mapping that holds [hva, hva+length), merging split VMAs of the same file.

    A block must be one mapping of one file at contiguous offsets, with one set of
    permissions and one page size; anything else is not something we can prove.
    """
    ordered = sorted(vmas, key=lambda v: v.start)
    idx = next((i for i, v in enumerate(ordered) if v.start <= hva < v.end), None)
    if idx is None:
        raise BackingError(f"no mapping at host address {hva:#x}")
    merged = ordered[idx]
    for v in ordered[idx + 1:]:
        if merged.end >= hva + length:
            break
        same = (
            v.start == merged.end
            and v.perms == merged.perms
            and (v.dev, v.ino, v.path) == (merged.dev, merged.ino, merged.path)
            and v.kernel_page_size == merged.kernel_page_size
            and ("ht" in v.vm_flags) == ("ht" in merged.vm_flags)
            and (merged.ino == 0 or v.pgoff == merged.pgoff + merged.end - merged.start)
        )
        if not same:
            break
        merged = Vma(merged.start, v.end, merged.perms, merged.pgoff, merged.dev, merged.ino,
                     merged.path, merged.kernel_page_size, merged.vm_flags,
                     merged.rss + v.rss, merged.swap + v.swap)
    if merged.end < hva + length:
        raise BackingError(
            f"host range {hva:#x}+{length:#x} is not one mapping "
            f"(mapping {merged.start:#x}-{merged.end:#x} ends early)"
        )
    return merged


def classify(vma: Vma) -> BackingKind:
    """Backing kind of a mapping, from its sharing, inode, name and hugetlb flag."""
    if vma.ino == 0 and not vma.path.startswith("/"):
        return BackingKind.ANON_PRIVATE if not vma.shared else BackingKind.UNKNOWN
    if not vma.shared:
        return BackingKind.FILE_PRIVATE
    if vma.path.startswith("/memfd:"):
        return BackingKind.MEMFD_HUGETLB if "ht" in vma.vm_flags else BackingKind.MEMFD_SHARED
    if vma.path == "/dev/zero (deleted)":
        return BackingKind.ANON_SHARED
    if vma.path.startswith("/SYSV"):
        return BackingKind.UNKNOWN  # SysV shm: no file to punch through
    if vma.path.startswith("/"):
        return BackingKind.FILE_SHARED
    return BackingKind.UNKNOWN


def _block_hva(block: str, region: str, pieces: Sequence[RamRange],
               hmp: Callable[[str], str]) -> int:
    """Host address of block offset 0, checked to agree for every piece of the block.

    `region` is the memory region QEMU names in gpa2hva answers (the backend id).
    """
    bases = set()
    for piece in pieces:
        gpa, said, hva = parse_gpa2hva(hmp(f"gpa2hva {piece.gpa_start:#x}"))
        if gpa != piece.gpa_start or said != region:
            raise BackingError(
                f"gpa2hva {piece.gpa_start:#x} answered for {said!r} at {gpa:#x}, "
                f"expected {region!r} (block {block!r})"
            )
        bases.add(hva - piece.block_offset)
    if len(bases) != 1:
        raise BackingError(f"block {block!r}: pieces disagree on where the block starts")
    return bases.pop()


def _find_fd(pid: int, dev: int, ino: int) -> tuple[str, str] | None:
    """An fd of `pid` open on (dev, ino): (/proc path, link text)."""
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        path = f"{fd_dir}/{name}"
        try:
            st = os.stat(path)
            link = os.readlink(path)
        except FileNotFoundError:
            continue  # closed while we looked
        if (st.st_dev, st.st_ino) == (dev, ino):
            return path, link
    return None


def _fs_type(pid: int, vma: Vma, kind: BackingKind) -> str:
    if kind == BackingKind.MEMFD_HUGETLB or "ht" in vma.vm_flags:
        return "hugetlbfs"
    if kind in (BackingKind.MEMFD_SHARED, BackingKind.ANON_SHARED):
        return "tmpfs"  # the kernel's internal shmem mount, absent from mountinfo
    with open(f"/proc/{pid}/mountinfo") as f:
        return parse_mountinfo(f.read()).get(vma.dev, "")


def resolve_block(
    pid: int, gmap: GuestMemoryMap, block: str, hmp: Callable[[str], str], smaps: str
) -> Backing:
    """Prove the backing of one RAM block; raise BackingError when it cannot be proven."""
    info = gmap.blocks[block]
    pieces = [r for r in gmap.ranges if r.block_name == block]
    hva = _block_hva(block, gmap.block_memdev.get(block, block), pieces, hmp)
    vma = covering_vma(parse_smaps(smaps), hva, info.used)
    kind = classify(vma)
    if vma.kernel_page_size != info.page_size:
        raise BackingError(
            f"block {block!r}: QEMU says {info.page_size:#x}-byte pages, the kernel maps "
            f"{vma.kernel_page_size:#x}-byte pages"
        )
    base = Backing(
        vm_pid=pid, block_name=block, kind=kind, reason="", page_size=info.page_size,
        hva=hva, length=info.used, dev=vma.dev, ino=vma.ino,
    )
    if kind in (BackingKind.ANON_PRIVATE, BackingKind.UNKNOWN):
        what = "private anonymous memory" if kind == BackingKind.ANON_PRIVATE else vma.path
        return replace(base, reason=f"{what} at {vma.start:#x}-{vma.end:#x}")
    file_offset = vma.pgoff + hva - vma.start
    found = _find_fd(pid, vma.dev, vma.ino)
    if found is not None:
        path, link = found
    else:
        # No fd (e.g. shared anonymous memory): the mapping itself is openable by root.
        path = f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}"
        link = vma.path
    st = os.stat(path)
    if (st.st_dev, st.st_ino) != (vma.dev, vma.ino):
        raise BackingError(f"{path} is not the mapped file (inode changed)")
    if file_offset % info.page_size:
        raise BackingError(f"block {block!r} starts at unaligned file offset {file_offset:#x}")
    if st.st_size < file_offset + info.used:
        raise BackingError(
            f"{link}: file size {st.st_size:#x} ends before the block "
            f"({file_offset:#x}+{info.used:#x})"
        )
    fs_type = _fs_type(pid, vma, kind)
    sharing = "shared" if vma.shared else "private"
    return replace(
        base,
        reason=f"{link} via {path}, {sharing} mapping, {fs_type}, "
        f"{info.page_size // 1024} KiB pages, file offset {file_offset:#x}",
        path=path, link=link, file_offset=file_offset, file_size=st.st_size, fs_type=fs_type,
    )


def resolve(pid: int, gmap: GuestMemoryMap, hmp: Callable[[str], str]) -> dict[str, Backing]:
    """Backing of every RAM block in `gmap` for QEMU process `pid` (UNKNOWN when unproven).

    `hmp(line)` runs an HMP command in that QEMU (a QMP socket or libvirt passthrough).
    """
    with open(f"/proc/{pid}/smaps") as f:
        smaps = f.read()
    out: dict[str, Backing] = {}
    for block in gmap.block_names():
        try:
            out[block] = resolve_block(pid, gmap, block, hmp, smaps)
        except (BackingError, OSError) as exc:
            out[block] = Backing(vm_pid=pid, block_name=block, kind=BackingKind.UNKNOWN,
                                 reason=f"cannot prove the backing of block {block!r}: {exc}")
    return out


def allocated_bytes(backing: Backing) -> int:
    """Host memory currently allocated to a block's backing, as the kernel counts it.

    For a file (memfd, tmpfs, hugetlbfs) that is st_blocks * 512 of the whole file; for
    private anonymous memory, resident plus swapped bytes of the block's mapping.
    """
    if backing.path is not None:
        return os.stat(backing.path).st_blocks * 512
    if backing.kind == BackingKind.ANON_PRIVATE:
        with open(f"/proc/{backing.vm_pid}/smaps") as f:
            vma = covering_vma(parse_smaps(f.read()), backing.hva, backing.length)
        return vma.rss + vma.swap
    raise BackingError(f"block {backing.block_name!r}: {backing.reason}")
