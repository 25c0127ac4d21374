"""Reclaimer choice per VM, on domain XML written back by a real libvirtd 9.0.

The XML lives in tests/data/qemu/libvirt/ (re-made by `capture.py libvirt`); backings
are the values aerate.host.backing produces for each kind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aerate.host.backing import Backing, BackingKind
from aerate.host.libvirt_conn import channel_path, job_from_stats
from aerate.host.refusal import (
    BALLOON,
    PUNCH,
    REFUSE,
    Decision,
    DomainFacts,
    JobInfo,
    PoisonFact,
    VmFacts,
    decide,
    domain_facts,
    poison_from_hello,
)

pytestmark = pytest.mark.unit

XML = Path(__file__).resolve().parent.parent / "data" / "qemu" / "libvirt"
IDLE = JobInfo(active=False, operation="none")
#: What agent/capabilities.py tells for a guest that does not poison freed pages.
SAFE = PoisonFact(True, "no page poisoning and no init_on_free: freed pages keep old data")


def dom(case: str) -> DomainFacts:
    return domain_facts((XML / f"{case}.xml").read_text())


def backing(kind: BackingKind, block: str = "pc.ram") -> Backing:
    if kind in (BackingKind.ANON_PRIVATE, BackingKind.UNKNOWN):
        reason = ("private anonymous memory at 0x7f0000000000-0x7f0010000000"
                  if kind == BackingKind.ANON_PRIVATE
                  else f"cannot prove the backing of block {block!r}: no mapping at 0x0")
        return Backing(vm_pid=1, block_name=block, kind=kind, reason=reason, page_size=4096)
    return Backing(vm_pid=1, block_name=block, kind=kind, reason="test", page_size=4096,
                   path="/proc/1/fd/8", link="/memfd:memory-backend-memfd (deleted)")


def facts(case: str, kind: BackingKind = BackingKind.MEMFD_SHARED, **kw: object) -> VmFacts:
    base: dict[str, object] = {
        "domain": dom(case), "job": IDLE, "backings": {"pc.ram": backing(kind)},
        "poison": SAFE,
    }
    base.update(kw)
    return VmFacts(**base)  # type: ignore[arg-type]


def test_facts_from_libvirt_xml() -> None:
    shared = dom("memfd-shared.inactive")
    assert (shared.memory_source, shared.memory_access, shared.memballoon) == (
        "memfd", "shared", "virtio")
    assert shared.pinning_devices == ()
    private = dom("private.inactive")
    assert (private.memory_source, private.memory_access) == ("anonymous", "private")
    huge = dom("hugepages.inactive")
    assert huge.hugepages and huge.memory_source == "file" and huge.memory_access == "private"
    hm = dom("hugepages-memfd-shared.inactive")
    assert hm.hugepages and (hm.memory_source, hm.memory_access) == ("memfd", "shared")
    locked = dom("memfd-shared-locked.inactive")
    assert locked.locked and locked.memballoon == "none"
    assert dom("numa-mixed-access.inactive").memory_access == "mixed"
    assert dom("memfd-shared.live.xml".removesuffix(".xml")).name == "aerate-capture-live"


@pytest.mark.parametrize(
    ("case", "device"),
    [
        ("memfd-shared-hostdev-pci.inactive", "PCI hostdev 0000:03:00.1"),
        ("memfd-shared-interface-hostdev.inactive", "network interface type='hostdev'"),
        ("memfd-shared-hostdev-mdev.inactive", "mediated device c2177883"),
    ],
)
def test_devices_that_pin_guest_ram_refuse(case: str, device: str) -> None:
    assert any(device in d for d in dom(case).pinning_devices)
    d = decide(facts(case))
    assert d.action == REFUSE
    assert device in d.reason and "pinned" in d.reason
    # Not even the balloon: VFIO pins every page the guest could give back.
    assert decide(facts(case, mode="balloon", balloon_available=True)).action == REFUSE


def test_usb_hostdev_does_not_pin_memory() -> None:
    assert dom("memfd-shared-hostdev-usb.inactive").pinning_devices == ()
    assert decide(facts("memfd-shared-hostdev-usb.inactive")).action == PUNCH


@pytest.mark.parametrize(
    "kind", [BackingKind.MEMFD_SHARED, BackingKind.MEMFD_HUGETLB, BackingKind.FILE_SHARED,
             BackingKind.ANON_SHARED],
)
def test_shared_backings_punch(kind: BackingKind) -> None:
    d = decide(facts("memfd-shared.live", kind))
    assert d == Decision(PUNCH, d.reason)
    assert kind.value in d.reason and "PUNCH_HOLE" in d.reason


def test_decision_unpacks_as_action_and_reason() -> None:
    action, reason = decide(facts("memfd-shared.live"))
    assert action == "punch" and reason


def test_private_ram_refuses_until_the_balloon_exists_then_balloons() -> None:
    d = decide(facts("private.inactive", BackingKind.ANON_PRIVATE))
    assert d.action == REFUSE
    assert "private anonymous memory" in d.reason
    assert "<source type='memfd'/>" in d.reason  # tells the operator how to fix it
    d = decide(facts("private.inactive", BackingKind.ANON_PRIVATE, balloon_available=True))
    assert d.action == BALLOON


def test_private_ram_without_balloon_device_or_locked_refuses() -> None:
    # The locked capture has memballoon model='none'.
    d = decide(facts("memfd-shared-locked.inactive", BackingKind.ANON_PRIVATE,
                     balloon_available=True))
    assert d.action == REFUSE and "no virtio memballoon" in d.reason
    locked_with_balloon = DomainFacts("x", (), "anonymous", "private", False, True, "virtio",
                                      False, "")
    d = decide(VmFacts(locked_with_balloon, IDLE, {"pc.ram": backing(BackingKind.ANON_PRIVATE)},
                       balloon_available=True))
    assert d.action == REFUSE and "locked" in d.reason


def test_private_file_mapping_refuses() -> None:
    # libvirt's <hugepages/> without <access mode='shared'/> maps hugetlbfs privately.
    d = decide(facts("hugepages.inactive", BackingKind.FILE_PRIVATE))
    assert d.action == REFUSE and "copy-on-write" in d.reason


@pytest.mark.parametrize(
    ("job", "words"),
    [
        (JobInfo(True, "migration-out"), "migration-out job"),
        (JobInfo(True, "migration-in"), "migration-in job"),
        (JobInfo(True, "save"), "save job"),
        (JobInfo(True, "snapshot"), "snapshot job"),
        (JobInfo(True, "dump"), "dump job"),
        (JobInfo(True, "unknown"), "unknown job"),
        (JobInfo(False, "none", "postcopy"), "paused for postcopy"),
        (JobInfo(False, "none", "migration"), "paused for migration"),
    ],
)
def test_jobs_touching_guest_ram_refuse(job: JobInfo, words: str) -> None:
    d = decide(facts("memfd-shared.live", job=job))
    assert d.action == REFUSE and words in d.reason


def test_disk_backup_and_user_pause_do_not_refuse() -> None:
    assert decide(facts("memfd-shared.live", job=JobInfo(True, "backup"))).action == PUNCH
    assert decide(facts("memfd-shared.live", job=JobInfo(False, "none", "user"))).action == PUNCH


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"job": None}, "cannot tell whether a migration"),
        ({"backings": None}, "not been proven"),
        ({"backings": {}}, "not been proven"),
        ({"mode": "off"}, "mode=off"),
        ({"mode": "fast"}, "unknown mode"),
        ({"poison": PoisonFact(False, "page_poison=1: freed pages are filled with 0xaa")},
         "poisons freed pages (page_poison=1: freed pages are filled with 0xaa)"),
        ({"poison": PoisonFact(None, "no hello from the guest agent yet")},
         "cannot tell whether the guest poisons freed pages: no hello"),
        ({"settings_error": "VM x metadata: unknown setting 'hwmm'"}, "unknown setting 'hwmm'"),
        ({"pinning_fd": "/dev/vfio/12 (fd 40 of pid 7)"}, "QEMU holds /dev/vfio/12"),
    ],
)
def test_missing_or_blocking_facts_refuse(kw: dict[str, object], words: str) -> None:
    d = decide(facts("memfd-shared.live", BackingKind.MEMFD_SHARED, **kw))
    assert d.action == REFUSE and words in d.reason


def test_zero_filling_on_free_is_harmless() -> None:
    zero = PoisonFact(True, "init_on_free=1: freed pages are zero-filled")
    assert decide(facts("memfd-shared.live", poison=zero)).action == PUNCH


def test_poisoning_does_not_stop_the_balloon() -> None:
    # The balloon driver gives pages up on purpose and re-poisons them when it takes them
    # back; only an outside discard of a page the guest still counts as free breaks it.
    poisoned = PoisonFact(False, "page_poison=1")
    d = decide(facts("private.inactive", BackingKind.ANON_PRIVATE, poison=poisoned,
                     balloon_available=True))
    assert d.action == BALLOON


def _hello(cap: object) -> dict[str, object]:
    return {"agent": "0.1", "capabilities": {"poison_safe": cap}}


@pytest.mark.parametrize(
    ("hello", "safe", "words"),
    [
        (None, None, "no hello"),
        ({}, None, "no hello"),
        ({"agent": "0.0"}, None, "no poison_safe capability"),
        ({"agent": "0.1", "capabilities": "all"}, None, "no poison_safe capability"),
        (_hello("yes"), None, "no poison_safe capability"),
        (_hello({"available": "true"}), None, "malformed poison_safe"),
        (_hello({"available": 1}), None, "malformed poison_safe"),
        (_hello({}), None, "malformed poison_safe"),
        (_hello({"available": False, "detail": "page_poison=1\x1b[2J"}), False,
         "page_poison=1?[2J"),
        (_hello({"available": True, "detail": ["x"]}), True, ""),
    ],
)
def test_poisoning_fact_from_a_hello(hello: dict[str, object] | None, safe: bool | None,
                                     words: str) -> None:
    fact = poison_from_hello(hello)
    assert fact.safe is safe and words in fact.detail and fact.detail.isprintable()
    expect = PUNCH if safe else REFUSE
    assert decide(facts("memfd-shared.live", poison=fact)).action == expect


def test_one_unproven_block_refuses_the_vm() -> None:
    backings = {"ram-node0": backing(BackingKind.MEMFD_SHARED, "ram-node0"),
                "ram-node1": backing(BackingKind.UNKNOWN, "ram-node1")}
    d = decide(facts("numa-mixed-access.inactive", backings=backings))
    assert d.action == REFUSE and "ram-node1" in d.reason


def test_mixed_shared_and_private_blocks_cannot_punch() -> None:
    backings = {"ram-node0": backing(BackingKind.MEMFD_SHARED, "ram-node0"),
                "ram-node1": backing(BackingKind.ANON_PRIVATE, "ram-node1")}
    assert decide(facts("numa-mixed-access.inactive", backings=backings)).action == REFUSE
    d = decide(facts("numa-mixed-access.inactive", backings=backings, balloon_available=True))
    assert d.action == BALLOON


def test_operator_modes() -> None:
    d = decide(facts("private.inactive", BackingKind.ANON_PRIVATE, mode="punch"))
    assert d.action == REFUSE and "mode=punch" in d.reason
    d = decide(facts("memfd-shared.live", mode="balloon", balloon_available=True))
    assert d.action == BALLOON and "mode=balloon" in d.reason
    d = decide(facts("memfd-shared.live", mode="balloon"))
    assert d.action == REFUSE
    assert decide(facts("memfd-shared.live", mode="punch")).action == PUNCH


def test_channel_socket_path_from_live_xml() -> None:
    live = (XML / "memfd-shared.live.xml").read_text()
    path = channel_path(live)
    assert path is not None
    assert path.startswith("/var/lib/libvirt/qemu/channel/target/")
    assert path.endswith("/org.aerate.agent.0")
    # The inactive definition has no socket yet; other channel names are not ours.
    assert channel_path((XML / "memfd-shared.inactive.xml").read_text()) is None
    assert channel_path(live, "org.qemu.guest_agent.0") is None


def test_job_info_from_libvirt_answers() -> None:
    running = (1, 1)
    assert job_from_stats({"type": 0}, running) == JobInfo(False, "none", "")
    assert job_from_stats({"type": 2, "operation": 5}, running) == JobInfo(
        True, "migration-out", "")
    assert job_from_stats({"type": 1, "operation": 2}, running).operation == "save"
    # Finished jobs are not active.
    assert not job_from_stats({"type": 3, "operation": 5}, running).active
    paused_postcopy = (3, 12)
    assert job_from_stats({"type": 0}, paused_postcopy).paused_reason == "postcopy"


_VHOST_USER = {
    "nic": ("<interface type='vhostuser'><source type='unix' path='/run/v.sock' "
            "mode='client'/><model type='virtio'/><alias name='net1'/></interface>",
            "network interface type='vhostuser' (net1)"),
    "disk": ("<disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>"
             "<source type='unix' path='/run/spdk.sock'/><target dev='vdb' bus='virtio'/>"
             "</disk>", "disk type='vhostuser' (vdb)"),
    "virtiofs": ("<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/>"
                 "<source dir='/srv'/><target dir='share'/></filesystem>",
                 "virtiofs filesystem (vhost-user-fs) (share)"),
    "gpu": ("<video><model type='virtio'/><driver name='vhostuser'/></video>",
            "video with a vhost-user backend"),
}


@pytest.mark.parametrize("case", sorted(_VHOST_USER))
def test_vhost_user_backends_refuse_unless_trusted(case: str) -> None:
    xml, words = _VHOST_USER[case]
    live = (XML / "memfd-shared.live.xml").read_text().replace("</devices>", xml + "</devices>")
    d = domain_facts(live)
    assert d.vhost_user_devices == (words,) and d.pinning_devices == ()
    dec = decide(VmFacts(d, IDLE, {"pc.ram": backing(BackingKind.MEMFD_SHARED)}, poison=SAFE))
    assert dec.action == REFUSE and words in dec.reason and "vhost_user_trusted" in dec.reason
    dec = decide(VmFacts(d, IDLE, {"pc.ram": backing(BackingKind.MEMFD_SHARED)}, poison=SAFE,
                         vhost_user_trusted=True))
    assert dec.action == PUNCH


def test_plain_domains_have_no_vhost_user_devices() -> None:
    for path in XML.glob("*.xml"):
        assert domain_facts(path.read_text()).vhost_user_devices == (), path.name


def test_confidential_guests_and_kernel_reporting_are_read_from_the_xml() -> None:
    live = (XML / "memfd-shared.live.xml").read_text()
    sev = domain_facts(live.replace("</domain>", "<launchSecurity type='sev'><cbitpos>47"
                                    "</cbitpos></launchSecurity></domain>"))
    assert sev.launch_security == "sev"
    d = decide(VmFacts(sev, IDLE, {"pc.ram": backing(BackingKind.MEMFD_SHARED)}, poison=SAFE))
    assert d.action == REFUSE and "confidential guest (sev)" in d.reason
    fpr = domain_facts(live.replace("<memballoon model='virtio'",
                                    "<memballoon model='virtio' freePageReporting='on'"))
    assert fpr.free_page_reporting and not domain_facts(live).free_page_reporting


def _refusals() -> list[tuple[str, str]]:
    """(expected category, reason) for every refusal decide() gives, and the daemon's."""
    live = "memfd-shared.live"
    vhost = (XML / f"{live}.xml").read_text().replace(
        "</devices>", "<interface type='vhostuser'><source type='unix' path='/x' "
        "mode='client'/><model type='virtio'/></interface></devices>")
    cases: list[tuple[str, VmFacts]] = [
        ("settings", facts(live, mode="fast")),
        ("settings", facts(live, settings_error="VM x metadata: unknown setting 'hwmm'")),
        ("mode-off", facts(live, mode="off")),
        ("pinned-device", facts("memfd-shared-hostdev-pci.inactive")),
        ("pinning-fd", facts(live, pinning_fd="/dev/vfio/12 (fd 40 of pid 7)")),
        ("vhost-user", VmFacts(domain_facts(vhost), IDLE,
                               {"pc.ram": backing(BackingKind.MEMFD_SHARED)}, poison=SAFE)),
        ("migration", facts(live, job=None)),
        ("migration", facts(live, qemu_migration=None)),
        ("migration", facts(live, qemu_migration="active")),
        ("memory-map", facts(live, map_error="the memory map could not be rebuilt after "
                                             "the hello: x")),
        ("job", facts(live, job=JobInfo(True, "save"))),
        ("paused", facts(live, job=JobInfo(False, "none", "snapshot"))),
        ("backing-unproven", facts(live, backings={})),
        ("backing-unknown", facts(live, BackingKind.UNKNOWN)),
        ("backing-private-file", facts(live, BackingKind.FILE_PRIVATE)),
        ("hugetlb-reserved", facts(live, reservations=("RAM block pc.ram (hugetlb)",))),
        ("page-poison", facts(live, poison=PoisonFact(False, "page_poison=1"))),
        ("page-poison-unknown", facts(live, poison=PoisonFact(None, "no hello"))),
        ("no-balloon", facts("private.inactive", BackingKind.ANON_PRIVATE)),
        ("mode-punch-private", facts("private.inactive", BackingKind.ANON_PRIVATE,
                                     mode="punch", balloon_available=True)),
        ("locked", VmFacts(DomainFacts("x", (), "anonymous", "private", False, True,
                                       "virtio", False, ""), IDLE,
                           {"pc.ram": backing(BackingKind.ANON_PRIVATE)},
                           balloon_available=True)),
    ]
    out = []
    for category, f in cases:
        d = decide(f)
        assert d.action == REFUSE, (category, d)
        out.append((category, d.reason))
    return [
        *out,
        ("confidential", "confidential guest (sev): its RAM is pinned and encrypted"),
        ("libvirt-timeout", "cannot ask libvirt whether discard is safe now: libvirt call "
                            "job_info timed out after 5 s"),
        ("libvirt", "cannot ask libvirt whether discard is safe now: not connected"),
        ("permit-stale", "libvirt's answer is 3.1 s old (older than 2.5 s)"),
        ("deciding", "a new hello from the guest: deciding again with it"),
        ("deciding", "not decided yet"),
        ("domain-xml", "cannot read the domain XML: x"),
    ]


def test_every_refusal_has_a_bounded_category() -> None:
    """Metrics label refusals by category (a fixed set), never by their free text."""
    from aerate.host.refusal import REFUSAL_CATEGORIES, refusal_category
    for category, reason in _refusals():
        assert refusal_category(reason) == category, (category, reason)
    assert refusal_category("something new") == "other"
    assert {c for c, _ in _refusals()} | {"other"} <= set(REFUSAL_CATEGORIES)
    assert all(len(c) <= 24 and c.replace("-", "").isalpha() for c in REFUSAL_CATEGORIES)
