"""Pick the reclaimer for one VM from facts, and say why in words an operator understands.

Pure: the facts (libvirt domain XML, the current job, the proven backing of each RAM
block, what the guest's hello says about page poisoning, the operator's mode, a settings
layer that failed to validate, a pinning fd seen in QEMU) come in; a Decision ("punch" |
"balloon" | "refuse", reason) goes out. Every unclear fact refuses.

Page poisoning and discard (S7): with ``page_poison=1`` the guest kernel fills every page
it frees with 0xaa and checks that pattern when it hands the page out again; a punched
page reads back as zeroes, so the check fails (a "corrupted page" splat, or worse with
``panic_on_warn``). The kernel's own free page reporting is disabled in that case unless
the poison value is 0 (mm/page_reporting.c, virtio_balloon's PAGE_POISON feature), and
aerate follows it. ``init_on_free=1`` zero-fills freed pages and checks nothing at
allocation, and a punched page reads back as zeroes too: discard keeps the guest's view
exactly (zero-filled free page), so it is harmless and stays allowed. The agent decides
which case it is in (agent/procfs.py ``parse_page_poisoning``: every doubt is "unsafe") and
says so as capability ``poison_safe`` in its hello; a hello without that capability, or with
it malformed, refuses punching: never punch on a guess. The balloon reclaimer is not
affected: the guest's balloon driver gives pages up on purpose and re-poisons them when it
takes them back.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from aerate.host.backing import PUNCHABLE, Backing, BackingKind
from aerate.host.qemu_map import GuestMemoryMap

PUNCH = "punch"
BALLOON = "balloon"
REFUSE = "refuse"
#: The guest kernel's own free page reporting serves the VM: aerate discards nothing and
#: moves no balloon (it would only take from the guest what the kernel already returns).
KERNEL = "kernel"
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
    #: vhost-user backends (other processes that map guest RAM; may pin it for DMA)
    vhost_user_devices: tuple[str, ...] = ()


class PoisonFact(NamedTuple):
    """What the guest agent said about page poisoning: ``safe`` None = it did not say."""

    safe: bool | None
    detail: str


#: No hello seen: the default of VmFacts.poison (refuses punching).
NOT_TOLD = PoisonFact(None, "not asked")
#: The capability of the hello that carries the poisoning fact (agent/capabilities.py).
POISON_CAPABILITY = "poison_safe"


def poison_from_hello(hello: Mapping[str, Any] | None) -> PoisonFact:
    """The page poisoning fact from a guest's hello (``None``/``{}``: no hello yet).

    The hello is guest input (S5): anything but ``capabilities.poison_safe.available`` being
    exactly true or false is "not said", which refuses punching. The detail is cut to one
    short printable line, as it reaches logs and ``aeratectl status``.
    """
    if not hello:
        return PoisonFact(None, "no hello from the guest agent yet")
    caps = hello.get("capabilities")
    cap = caps.get(POISON_CAPABILITY) if isinstance(caps, dict) else None
    if not isinstance(cap, dict):
        return PoisonFact(None, f"the guest agent's hello has no {POISON_CAPABILITY} "
                          "capability (agent too old, or its detection failed)")
    raw = cap.get("detail")
    detail = "".join(c if c.isprintable() else "?" for c in raw[:200]) \
        if isinstance(raw, str) else ""
    available = cap.get("available")
    if available is True or available is False:
        return PoisonFact(available, detail)
    return PoisonFact(None, f"the guest agent's hello has a malformed {POISON_CAPABILITY} "
                      f"capability (available={str(available)[:40]!r})")


def kernel_reporting_from_hello(hello: Mapping[str, Any] | None) -> bool:
    """Whether the guest says its kernel's free page reporting is negotiated and running
    (the hello's ``free_page_reporting`` capability, agent/capabilities.py). Guest input:
    only exactly true counts; a guest that lies gets less reclaimed, never a discard."""
    caps = hello.get("capabilities") if hello else None
    cap = caps.get("free_page_reporting") if isinstance(caps, dict) else None
    return isinstance(cap, dict) and cap.get("available") is True


@dataclass(frozen=True)
class VmFacts:
    """Everything `decide` weighs for one VM. None means "not known" and refuses."""

    domain: DomainFacts
    job: JobInfo | None
    backings: Mapping[str, Backing] | None
    poison: PoisonFact = NOT_TOLD  # from the hello: poison_from_hello
    mode: str = "auto"
    balloon_available: bool = False  # the balloon reclaimer exists and is enabled
    #: Why the VM's stored settings are unusable ("" when they are fine): S6 fails closed.
    settings_error: str = ""
    #: A device fd seen in QEMU that pins guest RAM ("" when none was ever seen).
    pinning_fd: str = ""
    #: The host file says this VM's vhost-user backends do not pin guest RAM.
    vhost_user_trusted: bool = False
    #: hugetlb blocks whose pages are reserved or preallocated (see hugetlb_reservations)
    reservations: tuple[str, ...] = ()
    #: QEMU's own migration state (QMP query-migrate "status"); None: unknown, refuses
    qemu_migration: str | None = "none"
    #: why the memory map could not be rebuilt after the hello ("" when it was)
    map_error: str = ""
    #: the guest kernel reports its own free pages (kernel_reporting_from_hello) and the
    #: operator did not set override_kernel_reporting
    kernel_reporting: bool = False


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
    vhost_user = _vhost_user_devices(root)

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
        vhost_user_devices=vhost_user,
    )


def _vhost_user_devices(root: ET.Element) -> tuple[str, ...]:
    """Devices whose backend is another process speaking vhost-user (libvirt's forms).

    Such a backend gets the guest's memory table (the memfd itself) and may map it into its
    own VFIO container for DMA (SPDK, DPDK), which pins every page; nothing in the domain
    XML or in QEMU tells whether it does, so the operator has to say (vhost_user_trusted).
    """
    found: list[str] = []
    for iface in root.findall("devices/interface"):
        if iface.get("type") == "vhostuser":
            found.append(f"network interface type='vhostuser'{_alias(iface)}")
    for disk in root.findall("devices/disk"):
        if disk.get("type") == "vhostuser":
            found.append(f"disk type='vhostuser'{_alias(disk)}")
    for fs in root.findall("devices/filesystem"):
        if fs.find("driver[@type='virtiofs']") is not None:
            found.append(f"virtiofs filesystem (vhost-user-fs){_alias(fs)}")
    for dev in root.findall("devices/*"):
        if dev.tag in ("interface", "disk", "filesystem"):
            continue
        if dev.find("driver[@name='vhostuser']") is not None or dev.get("type") == "vhostuser":
            found.append(f"{dev.tag} with a vhost-user backend{_alias(dev)}")
    return tuple(found)


def _alias(dev: ET.Element) -> str:
    target = dev.find("target")
    name = dev.find("alias")
    label = (name.get("name") if name is not None else None) or \
        (target.get("dir") or target.get("dev") if target is not None else None)
    return f" ({label})" if label else ""


_SHARED_HINT = (
    "to use the punch reclaimer give the domain <memoryBacking><source type='memfd'/>"
    "<access mode='shared'/></memoryBacking>"
)


#: query-migrate states in which no migration, postcopy or background snapshot reads or
#: writes guest RAM. Everything else ("setup", "active", "postcopy-active",
#: "postcopy-paused", "pre-switchover", "device", "wait-unplug", "colo", a state a newer
#: QEMU adds) refuses.
_QEMU_MIGRATION_IDLE = frozenset({"none", "completed", "failed", "cancelled"})


def job_refusal(job: JobInfo) -> Decision | None:
    """The refusal libvirt's job state alone gives, or None.

    Migration, save, restore, snapshot and dump read or write guest RAM wholesale; only a
    disk backup is known to leave it alone. An unnamed job refuses too. The daemon asks
    nothing more of such a VM's QEMU (host/daemon.py ``_fetch``): a domain job holds
    libvirt's state-change lock, so a monitor call would wait up to 30 s in one of
    libvirtd's few request slots for an answer that cannot change this refusal.
    """
    if job.active and job.operation != "backup":
        return Decision(REFUSE, f"a {job.operation} job is running; reclaim resumes after it ends")
    if job.paused_reason in _RAM_PAUSE_REASONS:
        return Decision(
            REFUSE, f"domain is paused for {job.paused_reason}; reclaim resumes after it ends")
    return None


def migration_from_qmp(answer: Any) -> str | None:
    """The ``status`` of a QMP ``query-migrate`` answer; None when it is not one.

    QEMU answers ``{}`` before any migration was ever started (its "none"). An incoming
    migration shows here too on the destination (postcopy pages arrive while the guest
    runs), and a background snapshot (``snapshot-save``, migration capability
    ``background-snapshot``) is a migration to a file: libvirt's job info does not cover
    every one of these, QEMU's own answer does.
    """
    if not isinstance(answer, dict):
        return None
    status = answer.get("status", "none")
    return status if isinstance(status, str) and status.isprintable() else None


def hugetlb_reservations(gmap: GuestMemoryMap | None,
                         backings: Mapping[str, Backing]) -> tuple[str, ...]:
    """hugetlb RAM blocks whose backend holds a reservation that a punch would drop.

    A shared hugetlb mapping (memfd MFD_HUGETLB or hugetlbfs) reserves its huge pages at
    mmap time (QEMU's ``reserve=on``, the default) and ``prealloc=on`` allocates them all;
    that is how an operator makes sure the VM never meets an empty pool. Punching a hole
    removes the pages *and* their reservation (hugetlbfs_punch_hole ->
    hugetlb_unreserve_pages), so the next guest touch needs a free page from the pool
    without one: once the pool runs dry, QEMU dies with SIGBUS. aerate cannot put the
    reservation back without allocating the page again (which undoes the punch), so it
    refuses these blocks instead. A block whose backend did not say (QEMU < 6.1) counts
    as reserved.
    """
    if gmap is None:
        return ()
    out: list[str] = []
    for name, b in sorted(backings.items()):
        if b.page_size <= 4096 and b.kind is not BackingKind.MEMFD_HUGETLB:
            continue
        memdev = gmap.memdevs.get(gmap.block_memdev.get(name, ""))
        if memdev is None:
            out.append(f"RAM block {name} (hugetlb, its memory backend unknown)")
        elif memdev.prealloc:
            out.append(f"RAM block {name} (hugetlb, backend {memdev.id} prealloc=on)")
        elif memdev.reserve is not False:
            out.append(f"RAM block {name} (hugetlb, backend {memdev.id} reserve=on)")
    return tuple(out)


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
    """Choose punch, balloon, kernel or refuse for one VM, with the reason.

    Where aerate would punch or balloon but the guest kernel's own free page reporting
    runs, the kernel serves the VM (KERNEL): the agent stays statistics-only then, and a
    balloon would only take from the guest what the kernel already hands back. Every
    refusal still comes first: it says what also stops the kernel's reporting (QEMU
    inhibits balloon discards for the same pinning devices and migrations).
    """
    d = _reclaimer(facts)
    if facts.kernel_reporting and d.action in (PUNCH, BALLOON):
        return Decision(KERNEL, "the guest kernel's own free page reporting returns this VM's "
                        "free memory (virtio-balloon free-page-reporting, negotiated); aerate "
                        f"watches and would otherwise {d.action} ({d.reason}); set "
                        "override_kernel_reporting=true for aerate to report instead")
    return d


def _reclaimer(facts: VmFacts) -> Decision:
    dom = facts.domain
    if facts.mode not in MODES:
        return Decision(REFUSE, f"unknown mode {facts.mode!r} (expected one of {MODES})")
    if facts.settings_error:
        return Decision(REFUSE, facts.settings_error)
    if facts.mode == "off":
        return Decision(REFUSE, "reclaim is turned off for this VM (mode=off)")
    if dom.pinning_devices:
        return Decision(
            REFUSE,
            f"guest RAM is pinned for device DMA by {', '.join(dom.pinning_devices)}; "
            "discarding it would break the device and leak memory",
        )
    if facts.pinning_fd:
        return Decision(
            REFUSE,
            f"QEMU holds {facts.pinning_fd}, a device that can pin guest RAM for DMA; "
            "refused until the VM restarts without it",
        )
    if dom.vhost_user_devices and not facts.vhost_user_trusted:
        return Decision(
            REFUSE,
            f"guest RAM is shared with vhost-user backends ({', '.join(dom.vhost_user_devices)})"
            " that may pin it for DMA; if none of them does (e.g. virtiofsd, a DPDK without "
            f"VFIO), set vhost_user_trusted = true under [vm.{dom.name}] in the host config "
            "file and run 'aeratectl reload'",
        )
    if dom.launch_security:
        return Decision(
            REFUSE, f"confidential guest ({dom.launch_security}): its RAM is pinned and encrypted"
        )
    if facts.job is None:
        return Decision(REFUSE, "cannot tell whether a migration or save is running")
    by_job = job_refusal(facts.job)
    if by_job is not None:
        return by_job
    if facts.qemu_migration is None:
        return Decision(REFUSE, "cannot tell from QEMU (query-migrate) whether a migration, "
                        "postcopy or background snapshot is running")
    if facts.qemu_migration not in _QEMU_MIGRATION_IDLE:
        return Decision(
            REFUSE,
            f"QEMU reports migration state {facts.qemu_migration[:40]!r} (migration, "
            "postcopy or background snapshot); reclaim resumes after it ends",
        )
    if facts.map_error:
        return Decision(REFUSE, facts.map_error)
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
        if facts.reservations:
            return Decision(
                REFUSE,
                f"guest RAM holds reserved huge pages: {', '.join(facts.reservations)}; "
                "punching would drop the reservation and the VM could die of SIGBUS when "
                "the host pool runs dry; start the memory backend with reserve=off and "
                "without prealloc to let aerate reclaim it",
            )
        # Only punching needs the guest's word on poisoning (see the module docstring).
        if facts.poison.safe is None:
            return Decision(
                REFUSE,
                f"cannot tell whether the guest poisons freed pages: {facts.poison.detail}; "
                "never punching on a guess (run an aerate-agent that reports poison_safe)",
            )
        if not facts.poison.safe:
            return Decision(
                REFUSE,
                f"the guest poisons freed pages ({facts.poison.detail}); a discarded page "
                "would read back as zeroes and fail its poison check; boot the guest without "
                "page_poison to reclaim it",
            )
        return Decision(PUNCH, f"{what}; discarding with fallocate(PUNCH_HOLE) on the backing")
    what = "guest RAM is private anonymous memory (libvirt's default)"
    if facts.mode == "punch":
        return Decision(REFUSE, f"{what}; mode=punch cannot discard it; {_SHARED_HINT}")
    return _balloon_or_refuse(facts, what)


#: Short, fixed categories of refusal reasons, for labels (metrics) and at-a-glance lists:
#: the first needle found in the reason names it. The reasons themselves stay free text in
#: status and ``aeratectl explain``; a label must come from a bounded set (this one).
_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("unknown mode", "settings"),
    ("metadata", "settings"),
    ("mode=off", "mode-off"),
    ("pinned for device DMA", "pinned-device"),
    ("QEMU holds", "pinning-fd"),
    ("vhost-user", "vhost-user"),
    ("confidential guest", "confidential"),
    ("migration", "migration"),
    ("memory map could not be rebuilt", "memory-map"),
    ("job is running", "job"),
    ("domain is paused", "paused"),
    ("backing of guest RAM has not been proven", "backing-unproven"),
    ("cannot prove the backing", "backing-unknown"),
    ("copy-on-write", "backing-private-file"),
    ("reserved huge pages", "hugetlb-reserved"),
    ("whether the guest poisons", "page-poison-unknown"),
    ("poisons freed pages", "page-poison"),
    ("no virtio memballoon", "no-balloon"),
    ("autodeflate", "no-autodeflate"),
    ("<locked/>", "locked"),
    ("mode=punch cannot", "mode-punch-private"),
    ("balloon reclaimer is not available", "no-balloon"),
    ("timed out", "libvirt-timeout"),
    ("cannot ask libvirt", "libvirt"),
    ("libvirt's answer is", "permit-stale"),
    ("libvirtd", "libvirt"),
    ("new hello", "deciding"),
    ("deciding again", "deciding"),
    ("not decided yet", "deciding"),
    ("domain XML", "domain-xml"),
    ("refusal facts", "domain-xml"),
)
REFUSAL_CATEGORIES = tuple(sorted({c for _, c in _CATEGORIES} | {"other"}))


def refusal_category(reason: str) -> str:
    """The bounded category of a refusal reason (``other`` when none matches)."""
    for needle, category in _CATEGORIES:
        if needle in reason:
            return category
    return "other"
