"""Pick the reclaimer for one VM from facts, and say why in words an operator understands.

Pure: the facts (libvirt domain XML, the current job, the proven backing of each RAM
block, what the guest reported about page poisoning, the operator's mode) come in; a
Decision ("punch" | "balloon" | "refuse", reason) goes out. Every unclear fact refuses.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from aerate.host.backing import PUNCHABLE, Backing, BackingKind

PUNCH = "punch"
BALLOON = "balloon"
REFUSE = "refuse"
MODES = ("auto", "punch", "balloon", "off")

# Host devices that do not DMA into guest RAM (emulated USB, SCSI generic, vhost-scsi):
# they do not pin memory, so discarding stays safe. Any other hostdev type refuses.
_UNPINNED_HOSTDEV_TYPES = frozenset({"usb", "scsi", "scsi_host"})

# Paused reasons that mean the same thing when no job is reported any more.
_RAM_PAUSE_REASONS = frozenset(
    {"migration", "postcopy", "postcopy-failed", "save", "snapshot", "dump", "from-snapshot"}
)


class Decision(NamedTuple):
    """The reclaimer for a VM and the reason, e.g. ("refuse", "guest RAM is pinned ...")."""

    action: str
    reason: str


@dataclass(frozen=True)
class JobInfo:
    """What libvirt says the domain is doing besides running.

    operation: "none" when idle, else a libvirt job operation name ("migration-out",
    "save", "snapshot", "dump", "backup", "unknown", ...); paused_reason: the reason of a
    paused domain ("migration", "postcopy", "user", ...) or "" when running.
    """

    active: bool
    operation: str
    paused_reason: str = ""


@dataclass(frozen=True)
class DomainFacts:
    """What the domain XML says about memory and devices."""

    name: str
    pinning_devices: tuple[str, ...]  # devices that pin guest RAM for DMA
    memory_source: str  # "anonymous" (libvirt's default), "memfd", "file"
    memory_access: str  # "private" (default), "shared", or "mixed" (per NUMA cell)
    hugepages: bool
    locked: bool
    memballoon: str  # "virtio", "none", or "" when absent
    free_page_reporting: bool
    launch_security: str  # "" or e.g. "sev"


@dataclass(frozen=True)
class VmFacts:
    """Everything `decide` weighs for one VM. None means "not known" and refuses."""

    domain: DomainFacts
    job: JobInfo | None
    backings: Mapping[str, Backing] | None
    page_poison: int | None = None  # value the guest fills freed pages with, if reported
    mode: str = "auto"
    balloon_available: bool = False  # the balloon reclaimer exists and is enabled


def _describe_hostdev(dev: ET.Element) -> str:
    kind = dev.get("type", "?")
    addr = dev.find("source/address")
    if addr is not None and kind == "pci":
        parts = [addr.get(k, "0x0") for k in ("domain", "bus", "slot", "function")]
        try:
            dom, bus, slot, fn = (int(p, 16) for p in parts)
            return f"PCI hostdev {dom:04x}:{bus:02x}:{slot:02x}.{fn:x}"
        except ValueError:
            return "PCI hostdev"
    if kind == "mdev":
        uuid = dev.find("source/address")
        return f"mediated device {uuid.get('uuid', '') if uuid is not None else ''}".strip()
    return f"{kind} hostdev"


def domain_facts(xml: str) -> DomainFacts:
    """Parse a libvirt domain XML (live or inactive) into DomainFacts."""
    root = ET.fromstring(xml)
    if root.tag != "domain":
        raise ValueError(f"not a libvirt domain XML (root element <{root.tag}>)")
    pinning: list[str] = []
    for dev in root.findall("devices/hostdev"):
        if dev.get("type") not in _UNPINNED_HOSTDEV_TYPES:
            pinning.append(_describe_hostdev(dev))
    for iface in root.findall("devices/interface"):
        if iface.get("type") == "hostdev":
            pinning.append("network interface type='hostdev' (VFIO)")
        elif iface.get("type") == "vdpa":
            pinning.append("network interface type='vdpa'")
    for disk in root.findall("devices/disk"):
        if disk.get("type") == "vhostvdpa":
            pinning.append("disk type='vhostvdpa'")

    mb = root.find("memoryBacking")
    source = access = ""
    hugepages = locked = False
    if mb is not None:
        src = mb.find("source")
        acc = mb.find("access")
        source = src.get("type", "") if src is not None else ""
        access = acc.get("mode", "") if acc is not None else ""
        hugepages = mb.find("hugepages") is not None
        locked = mb.find("locked") is not None
    cells = {c.get("memAccess", "") for c in root.findall("cpu/numa/cell")}
    if cells:
        # A cell without memAccess inherits the domain-wide mode.
        per_cell = {c or access or "private" for c in cells}
        access = per_cell.pop() if len(per_cell) == 1 else "mixed"
    balloon = root.find("devices/memballoon")
    ls = root.find("launchSecurity")
    return DomainFacts(
        name=root.findtext("name", default=""),
        pinning_devices=tuple(pinning),
        memory_source=source or ("file" if hugepages else "anonymous"),
        memory_access=access or "private",
        hugepages=hugepages,
        locked=locked,
        memballoon=balloon.get("model", "") if balloon is not None else "",
        free_page_reporting=balloon is not None and balloon.get("freePageReporting") == "on",
        launch_security=ls.get("type", "unknown") if ls is not None else "",
    )


_SHARED_HINT = (
    "to use the punch reclaimer give the domain <memoryBacking><source type='memfd'/>"
    "<access mode='shared'/></memoryBacking>"
)


def _balloon_or_refuse(facts: VmFacts, why: str) -> Decision:
    dom = facts.domain
    if not facts.balloon_available:
        return Decision(
            REFUSE,
            f"{why}; only the balloon could return it and the balloon reclaimer is not "
            f"available; {_SHARED_HINT}",
        )
    if dom.memballoon != "virtio":
        return Decision(REFUSE, f"{why}; the domain has no virtio memballoon; {_SHARED_HINT}")
    if dom.locked:
        return Decision(REFUSE, f"{why}; <memoryBacking><locked/> RAM cannot be ballooned")
    return Decision(BALLOON, f"{why}; reclaiming through the virtio balloon")


def decide(facts: VmFacts) -> Decision:
    """Choose punch, balloon or refuse for one VM, with the reason."""
    dom = facts.domain
    if facts.mode not in MODES:
        return Decision(REFUSE, f"unknown mode {facts.mode!r} (expected one of {MODES})")
    if facts.mode == "off":
        return Decision(REFUSE, "reclaim is turned off for this VM (mode=off)")
    if dom.pinning_devices:
        return Decision(
            REFUSE,
            f"guest RAM is pinned for device DMA by {', '.join(dom.pinning_devices)}; "
            "discarding it would break the device and leak memory",
        )
    if dom.launch_security:
        return Decision(
            REFUSE, f"confidential guest ({dom.launch_security}): its RAM is pinned and encrypted"
        )
    if facts.job is None:
        return Decision(REFUSE, "cannot tell whether a migration or save is running")
    # Migration, save, restore, snapshot and dump read or write guest RAM wholesale; only
    # a disk backup is known to leave it alone. An unnamed job refuses too.
    if facts.job.active and facts.job.operation != "backup":
        return Decision(
            REFUSE, f"a {facts.job.operation} job is running; reclaim resumes after it ends"
        )
    if facts.job.paused_reason in _RAM_PAUSE_REASONS:
        return Decision(
            REFUSE,
            f"domain is paused for {facts.job.paused_reason}; reclaim resumes after it ends",
        )
    if facts.page_poison:
        return Decision(
            REFUSE,
            f"the guest poisons free pages with {facts.page_poison:#x}; a discarded page "
            "would read back as zeroes and fail its poison check",
        )
    if not facts.backings:
        return Decision(REFUSE, "the backing of guest RAM has not been proven yet")
    for b in facts.backings.values():
        if b.kind == BackingKind.UNKNOWN:
            return Decision(REFUSE, b.reason)
        if b.kind == BackingKind.FILE_PRIVATE:
            return Decision(
                REFUSE,
                f"RAM block {b.block_name} is a private (copy-on-write) file mapping "
                f"({b.link or 'file'}); punching the file would not free the guest's copies "
                "and would change pages it has not written",
            )
    kinds = sorted({b.kind.value for b in facts.backings.values()})
    if all(b.kind in PUNCHABLE and b.punchable for b in facts.backings.values()):
        what = f"guest RAM is {', '.join(kinds)}"
        if facts.mode == "balloon":
            return _balloon_or_refuse(facts, f"{what} but mode=balloon")
        return Decision(PUNCH, f"{what}; discarding with fallocate(PUNCH_HOLE) on the backing")
    what = "guest RAM is private anonymous memory (libvirt's default)"
    if facts.mode == "punch":
        return Decision(REFUSE, f"{what}; mode=punch cannot discard it; {_SHARED_HINT}")
    return _balloon_or_refuse(facts, what)
