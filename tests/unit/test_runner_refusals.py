"""Refusal facts driven through the daemon's own path: ``VmRunner.permit`` feeding a real
``VmSession`` that talks to a real ``GuestEndpoint``, and ``Daemon.handle`` for settings.

Not driven through ``decide()`` alone: each test would stay green if the fact were never
wired from its source (hello, stored metadata, domain XML, QEMU's fds) into the decision.

MOCK: :class:`FakeLibvirt` stands in for libvirtd (the unit tier runs without it): it
answers the domain XML (a real libvirtd 9.0 capture, tests/data/qemu/libvirt), the job
state, the metadata (and records writes), QMP query-migrate, and the monitor questions
of the memory map from a real QEMU 7.2 capture (tests/data/qemu/q35-1g-memfd). The
discard is a recording function, not a punch (real punching is tested in tests/host/).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from aerate.agent.protocol import GuestEndpoint, HostState
from aerate.host import config as config_mod
from aerate.host import pinning
from aerate.host.backing import Backing, BackingKind
from aerate.host.ctl import format_status
from aerate.host.daemon import Daemon, VmRunner, giant_granule_note
from aerate.host.libvirt_conn import DomainError, channel_alias
from aerate.host.punch import Check
from aerate.host.qemu_map import GuestMemoryMap, build_map, gather
from aerate.host.refusal import Decision, JobInfo
from aerate.host.session import VmSession
from aerate.host.vm_worker import CALL_TIMEOUT, new_pool

pytestmark = pytest.mark.unit
MiB2 = 2 << 20
MAP_DATA = Path(__file__).resolve().parent.parent / "data" / "qemu"
XML = (MAP_DATA / "libvirt" / "memfd-shared.live.xml").read_text()
VHOST_USER_NIC = ("<interface type='vhostuser'><source type='unix' path='/run/vhu0.sock' "
                  "mode='client'/><model type='virtio'/><alias name='net1'/></interface>")
SAFE_CAPS = {"poison_safe": {"available": True, "detail": "no page poisoning"}}
POISONED_CAPS = {"poison_safe": {"available": False,
                                 "detail": "page_poison=1: freed pages are filled with 0xaa"}}


class FakeLibvirt:
    """MOCK of the daemon's libvirt connection (see the module docstring)."""

    def __init__(self, xml: str = XML, metadata: str | None = None,
                 migrate: Any = None) -> None:
        self.xml = xml
        self.stored = metadata
        self.connected = True
        self.migrate: Any = {} if migrate is None else migrate
        self.map_case: str | None = "q35-1g-memfd"
        #: replaces query-memdev's "reserve" (None: drop it, as QEMU < 6.1); "" keeps it
        self.reserve: bool | str | None = ""

    def qmp(self, name: str, command: str, arguments: Any = None) -> Any:
        """QMP through libvirt: query-migrate, and the map's questions from a capture."""
        if command == "query-migrate":
            return self.migrate
        if self.map_case is None:
            raise DomainError(f"VM {name}: QMP {command}: the monitor is not available")
        d = MAP_DATA / self.map_case
        if command == "qom-get":
            key = arguments["property"]
            return json.loads((d / "smm.json").read_text())[key]
        if command == "human-monitor-command":
            line = arguments["command-line"]
            files = {"info mtree -f": "mtree-f.txt", "info mtree": "mtree.txt",
                     "info ramblock": "ramblock.txt"}
            return (d / files[line]).read_text()
        files = {"query-memdev": "query-memdev.json", "qom-list": "qom-objects.json",
                 "query-memory-devices": "query-memory-devices.json"}
        out = json.loads((d / files[command]).read_text())
        if command == "query-memdev" and self.reserve != "":
            for md in out:
                md.pop("reserve", None)
                if self.reserve is not None:
                    md["reserve"] = self.reserve
        return out

    def qmp_function(self, name: str) -> Any:
        """qmp bound to the VM, as gather() wants it."""
        return lambda command, arguments: self.qmp(name, command, arguments)

    def guest_map(self, name: str) -> GuestMemoryMap:
        """The map from the capture's monitor answers, as LibvirtConnection builds it."""
        return build_map(gather(self.qmp_function(name)))

    def qemu_pid(self, name: str) -> int:
        """Not known (a test sets the runner's qemu_pid when it needs one)."""
        raise DomainError(f"VM {name}: no QEMU pid in the fake libvirt")

    def domain_xml(self, name: str, inactive: bool = False) -> str:
        """The captured live XML."""
        return self.xml

    def job_info(self, name: str) -> JobInfo:
        """No job: the VM just runs."""
        return JobInfo(active=False, operation="none")

    def metadata(self, name: str, namespace: str) -> str | None:
        """What is stored in aerate's namespace."""
        assert namespace == config_mod.METADATA_NS
        return self.stored

    def set_metadata(self, name: str, xml: str, key: str, namespace: str) -> None:
        """Store, as libvirt would."""
        self.stored = xml


def daemon(conn: FakeLibvirt, config: str = "") -> Daemon:
    """A Daemon without its loop, socket or libvirt thread: only what handle() and the
    runner's decision use (the worker's pool included)."""
    d = object.__new__(Daemon)
    d.conn = conn  # type: ignore[assignment]
    d.config = config_mod.parse(config, "/etc/aerate/aerated.toml")
    d.config_path = "/nonexistent/aerated.toml"
    d.runners = {}
    d.pool = new_pool()
    d.call_timeout, d.map_timeout = CALL_TIMEOUT, 15.0
    d.permit_refresh, d.permit_max_age = 1.0, 60.0
    return d


def decide(r: VmRunner) -> Decision:
    """One background refresh of the runner's permit, run here and now (what the daemon's
    refresh thread does every second), then the permit as the session would see it."""
    hello, gen = r._hello_now()
    got = r._fetch(not r.xml, False, r._map_gen != gen)
    now = time.monotonic()
    decision = r._decide(got.xml or r.xml, got, r.backings, got.gmap or r.gmap,
                         r.effective_settings(), hello)
    try:   # as VmRunner._refresh_done does
        r._learn(now, got.xml, got.backing, False)
        r._learn_map(got, gen)
    except DomainError as e:
        decision = Decision("refuse", f"cannot read the domain XML: {e}")
    r._apply_decision(decision, now, hello_gen=gen)
    return r.permit()


def ask(d: Daemon, req: dict[str, Any]) -> dict[str, Any]:
    """One control request, as aeratectl sends it."""
    return asyncio.run(d.handle(req))


def runner(conn: FakeLibvirt, config: str = "") -> tuple[VmRunner, list[tuple[int, int]]]:
    """A runner for VM vm1 with shared memfd RAM (as prepare() would leave it) and a
    session whose discard records what would be punched."""
    d = daemon(conn, config)
    r = VmRunner(d, "vm1")
    d.runners["vm1"] = r
    r.backings = {"pc.ram": Backing(vm_pid=1, block_name="pc.ram",
                                    kind=BackingKind.MEMFD_SHARED, reason="test",
                                    page_size=4096, path="/proc/1/fd/8")}
    asyncio.run(r.load_metadata())
    calls: list[tuple[int, int]] = []

    def discard(gpa: int, length: int, checks: Sequence[Check]) -> int:
        calls.append((gpa, length))
        return length

    # The session asks for a fresh decision at every batch, as if the background refresh
    # had just run: the facts under test reach decide() through the runner either way.
    r.session = VmSession("vm1", MiB2, lambda gpa, n: gpa + n <= 1 << 30, discard,
                          lambda: decide(r), r.guest_settings())
    return r, calls


def one_batch(r: VmRunner, hello: dict[str, Any]) -> GuestEndpoint:
    """Connect the runner's session to a guest saying ``hello`` and send one report."""
    s = r.session
    assert s is not None
    g = GuestEndpoint(hello)
    s.connected()
    g.receive(s.take_outbox())
    s.receive(g.take_outbox())
    assert s.state is HostState.RUNNING
    g.report([(64 * MiB2, MiB2)])
    s.receive(g.take_outbox())
    return g


def test_a_guest_that_poisons_free_pages_is_refused_through_the_session() -> None:
    r, calls = runner(FakeLibvirt())
    assert decide(r).action == "refuse"  # before any hello: never punch on a guess
    one_batch(r, {"agent": "t", "capabilities": POISONED_CAPS})
    assert calls == []
    st = r.status()
    assert st["reclaimer"] == "refuse" and "poisons freed pages" in st["reason"]
    assert "page_poison=1" in st["reason"] and st["refused_bytes"] == MiB2
    assert "poisons freed pages" in format_status({"vms": [st]})


@pytest.mark.parametrize("hello", [{"agent": "old"}, {"agent": "t", "capabilities": {
    "poison_safe": {"available": "yes"}}}, {"agent": "t", "capabilities": []}])
def test_a_hello_without_a_well_formed_poisoning_fact_is_refused(hello: dict[str, Any]
                                                                  ) -> None:
    r, calls = runner(FakeLibvirt())
    one_batch(r, hello)
    assert calls == [] and "cannot tell whether the guest poisons" in r.status()["reason"]


def test_a_safe_guest_is_punched_and_a_new_session_forgets_the_old_hello() -> None:
    r, calls = runner(FakeLibvirt())
    decide(r)  # cached before the hello: the hello must re-decide at once
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    assert calls == [(64 * MiB2, MiB2)] and r.status()["reclaimer"] == "punch"
    # The guest rebooted with page_poison=1: its new hello counts from the first batch on.
    one_batch(r, {"agent": "t", "capabilities": POISONED_CAPS})
    assert calls == [(64 * MiB2, MiB2)] and "poisons freed pages" in r.status()["reason"]


def test_a_guest_whose_kernel_reports_its_free_pages_is_left_to_the_kernel() -> None:
    # The hello says the guest kernel negotiated free page reporting: the agent stays
    # statistics-only and aerate neither punches nor balloons; the override gives it back.
    fpr = dict(SAFE_CAPS, free_page_reporting={"available": True, "detail": "negotiated"})
    r, calls = runner(FakeLibvirt())
    # The hello alone (no batch ever flows on such a VM) already shows the kernel's path.
    s = r.session
    assert s is not None
    g = GuestEndpoint({"agent": "t", "capabilities": fpr})
    s.connected()
    g.receive(s.take_outbox())
    s.receive(g.take_outbox())
    assert decide(r).action == "kernel" and r.status()["reclaimer"] == "kernel"
    r, calls = runner(FakeLibvirt())
    one_batch(r, {"agent": "t", "capabilities": fpr})
    st = r.status()
    assert calls == [] and st["reclaimer"] == "kernel", st
    assert "free page reporting" in st["reason"] and "override_kernel_reporting" in st["reason"]
    for told in ({"available": "yes"}, {"available": False}, "on"):
        r, calls = runner(FakeLibvirt())
        one_batch(r, {"agent": "t", "capabilities": dict(SAFE_CAPS,
                                                          free_page_reporting=told)})
        assert calls == [(64 * MiB2, MiB2)] and r.status()["reclaimer"] == "punch"
    r, calls = runner(FakeLibvirt(), "[defaults]\noverride_kernel_reporting = true\n")
    one_batch(r, {"agent": "t", "capabilities": fpr})
    assert calls == [(64 * MiB2, MiB2)] and r.status()["reclaimer"] == "punch"


def test_the_guest_closing_its_port_ends_the_session_for_discards() -> None:
    # QEMU's VSERPORT_CHANGE (libvirt's thread): the VM's own port closed means its agent
    # stopped or died, or the guest goes down: from that moment nothing of the session is
    # discarded, even a report already buffered; other ports and opens change nothing.
    r, calls = runner(FakeLibvirt())
    r.channel_alias = channel_alias(XML)
    assert r.channel_alias == "channel0"
    r.daemon.loop = asyncio.new_event_loop()
    try:
        g = one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
        assert calls == [(64 * MiB2, MiB2)]
        s = r.session
        assert s is not None
        r.daemon._on_port("vm1", "channel1", False)   # another port
        r.daemon._on_port("vm1", "channel0", True)    # opened, not closed
        assert s.revocation(s.endpoint.session) == ""
        r.daemon._on_port("vm1", "channel0", False)
        assert "closed its aerate port" in s.revocation(s.endpoint.session)
        g.report([(80 * MiB2, MiB2)])
        s.receive(g.take_outbox())
        assert calls == [(64 * MiB2, MiB2)]
        assert "closed its aerate port" in r.status()["reason"] or \
            "closed its aerate port" in json.dumps(r.status())
    finally:
        r.daemon.loop.close()


def test_a_close_seen_after_the_next_agents_session_began_does_not_void_it() -> None:
    # SIGKILL of the agent: QEMU's close event and the next agent's need-sync race to the
    # loop. The close revokes the session of its moment at once; the restart it queues is
    # for that session only: if the need-sync already began a newer one, that one stays
    # (a second sync would void the new agent's session and everything it just returned).
    r, _ = runner(FakeLibvirt())
    r.channel_alias = channel_alias(XML)
    r.daemon.loop = asyncio.new_event_loop()
    try:
        one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
        s = r.session
        assert s is not None
        old = s.endpoint.session
        r.daemon._on_port("vm1", "channel0", False)     # revokes `old`, posts the restart
        r.daemon.loop.run_until_complete(asyncio.sleep(0))
        assert "closed its aerate port" in s.revocation(old)
        assert r._restart and r._restart_ending == old
        assert r._take_restart(old + 1) is False         # a newer session is current
        assert not r._restart
        r.daemon._on_port("vm1", "channel0", False)
        r.daemon.loop.run_until_complete(asyncio.sleep(0))
        assert r._take_restart(old) is True              # still the revoked one: restart
        r.restart_session("libvirt is back")             # no session named: always
        assert r._take_restart(old + 7) is True
    finally:
        r.daemon.loop.close()


def test_a_hostile_hello_cannot_break_status() -> None:
    r, _ = runner(FakeLibvirt())
    deep: Any = "x"
    for _ in range(900):
        deep = [deep]
    one_batch(r, {"agent": {"nested": deep}, "arena": "\x1b]0;pwned\x07" * 100,
                  "capabilities": SAFE_CAPS, "junk": deep})
    st = r.status()
    assert st["agent"] is None and st["arena"].isprintable() and len(st["arena"]) <= 64
    json.dumps(st)
    format_status({"vms": [st]})


def test_vhost_user_device_refuses_unless_the_host_file_trusts_it() -> None:
    xml = XML.replace("</devices>", VHOST_USER_NIC + "</devices>")
    r, calls = runner(FakeLibvirt(xml))
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    st = r.status()
    assert calls == [] and "vhost-user" in st["reason"] and "vhostuser" in st["reason"]
    assert "vhost_user_trusted = true under [vm.aerate-capture-live]" in st["reason"]
    r, calls = runner(FakeLibvirt(xml), "[vm.vm1]\nvhost_user_trusted = true\n")
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    assert calls == [(64 * MiB2, MiB2)]


def test_vhost_user_trust_is_never_read_from_domain_metadata() -> None:
    xml = XML.replace("</devices>", VHOST_USER_NIC + "</devices>")
    stored = "<settings><setting name='vhost_user_trusted'>true</setting></settings>"
    r, calls = runner(FakeLibvirt(xml, stored))
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    assert calls == []
    assert "host-scope setting" in r.status()["reason"]
    answer = ask(r.daemon, {"cmd": "set", "vm": "vm1",
                              "settings": {"vhost_user_trusted": True}})
    assert not answer["ok"] and "host config file" in answer["error"]


BAD_LAYER = ("<settings><setting name='mode'>off</setting><setting name='hwm'>8</setting>"
             "<setting name='hwmm'>3</setting></settings>")


def test_an_invalid_stored_layer_refuses_the_vm_and_is_kept() -> None:
    conn = FakeLibvirt(metadata=BAD_LAYER)
    r, calls = runner(conn)
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    st = r.status()
    # Refused with the VM, the key and the fix, not punched with the layer dropped.
    assert calls == [] and st["reclaimer"] == "refuse"
    assert "VM vm1 metadata: unknown setting 'hwmm'" in st["reason"]
    assert "virsh metadata vm1 urn:x-aerate:settings:1 --key aerate --edit" in st["reason"]
    # The next set keeps every stored entry (mode=off included) and the VM stays refused.
    answer = ask(r.daemon, {"cmd": "set", "vm": "vm1", "settings": {"hwm": 16}})
    assert not answer["ok"] and "still invalid" in answer["error"]
    kept = config_mod.metadata_entries(conn.stored, "vm1")
    assert kept == {"mode": "off", "hwm": "16", "hwmm": "3"}
    assert decide(r).action == "refuse"
    # Fixed outside (virsh metadata --edit), then reload: valid again, mode=off applies.
    conn.stored = "<settings><setting name='mode'>off</setting></settings>"
    assert ask(r.daemon, {"cmd": "reload"})["ok"]
    assert r.settings_error == "" and "mode=off" in decide(r).reason


@pytest.mark.parametrize(("stored", "words"), [
    ("<settings><setting name='hwm'>lots</setting></settings>", "hwm='lots' is not a valid"),
    ("<settings><setting name='capacity'>0</setting></settings>", "capacity=0 is outside"),
    ("<settings", "not XML"),
])
def test_bad_values_refuse_with_vm_key_value_and_fix(stored: str, words: str) -> None:
    r, _ = runner(FakeLibvirt(metadata=stored))
    reason = decide(r).reason
    assert "vm1" in reason and words in reason and "aeratectl set vm1" in reason


def test_no_message_names_a_command_that_does_not_exist() -> None:
    import re

    from aerate.host.ctl import _parser
    sub = next(a for a in _parser()._actions if a.dest == "cmd")
    commands = set(sub.choices)  # type: ignore[arg-type]
    root = Path(__file__).resolve().parents[2]
    named = set()
    for path in [*root.glob("host/*.py"), *root.glob("agent/*.py"), root / "README.md"]:
        # Quoted as a command to run: 'aeratectl set ...' in messages, `aeratectl ...`.
        for word in re.findall(r"['`]aeratectl ([a-z]+)\b", path.read_text()):
            named.add(word)
            assert word in commands, (path, word)
    assert {"reset", "set", "get", "explain", "status"} <= named


def test_a_pinning_fd_opened_by_qemu_refuses_and_stays_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand-in: this test process plays QEMU, a tmp file plays /dev/vfio/N.
    standin = tmp_path / "standin-vfio-42"
    monkeypatch.setattr(pinning, "EXTRA_PATTERNS", [str(tmp_path / "standin-vfio-*")])
    r, _ = runner(FakeLibvirt())
    r.qemu_pid = os.getpid()
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    assert r.pinning_check() == "" and decide(r).action == "punch"
    with open(standin, "w"):
        found = r.pinning_check()
        assert str(standin) in found
    # Closed again: the VM stays refused (the pages may have been pinned meanwhile).
    assert r.pinning_check() and "QEMU holds" in decide(r).reason
    assert decide(r).action == "refuse"


def test_unknown_qemu_pid_refuses() -> None:
    r, _ = runner(FakeLibvirt())
    assert "unknown QEMU" in r.pinning_check()


def test_one_gib_backing_says_why_nothing_is_reported() -> None:
    values = {"capacity": 32}
    assert giant_granule_note(2 << 20, values) == ""
    note = giant_granule_note(1 << 30, values)
    assert "512 adjacent" in note and "capacity/4 = 8" in note and "2 MiB pages" in note
    assert "capacity/4 = 256" in giant_granule_note(1 << 30, {"capacity": 1024})


class MigratingLibvirt(FakeLibvirt):
    """MOCK (as FakeLibvirt) of a domain with an outgoing migration job."""

    def job_info(self, name: str) -> JobInfo:
        """A migration is running."""
        return JobInfo(active=True, operation="migration-out")


def test_a_running_migration_is_refused_through_the_session() -> None:
    r, calls = runner(MigratingLibvirt())
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    assert calls == [] and "migration-out job is running" in r.status()["reason"]


def test_unproven_backing_is_refused_through_the_session() -> None:
    r, calls = runner(FakeLibvirt())
    r.backings = {}  # prepare() could not prove it (yet)
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    assert calls == [] and "not been proven" in r.status()["reason"]


@pytest.mark.parametrize(("reserve", "refused"), [(True, True), (None, True), (False, False)])
def test_reserved_hugetlb_backing_is_refused_through_the_session(
        reserve: bool | None, refused: bool) -> None:
    conn = FakeLibvirt()
    conn.map_case, conn.reserve = "q35-1g-memfd-hugetlb2m", reserve  # QEMU 7.2: true
    r, calls = runner(conn)
    r.backings = {"pc.ram": Backing(vm_pid=1, block_name="pc.ram",
                                    kind=BackingKind.MEMFD_HUGETLB, reason="test",
                                    page_size=2 << 20, path="/proc/1/fd/8")}
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    reason = r.status()["reason"]
    if refused:
        assert calls == [] and "reserve=on" in reason and "SIGBUS" in reason, reason
    else:
        assert calls == [(64 * MiB2, MiB2)], reason


@pytest.mark.parametrize(("answer", "words"), [
    ({"status": "postcopy-active"}, "migration state 'postcopy-active'"),
    ({"status": "active"}, "migration state 'active'"),
    ({"status": "setup"}, "migration state 'setup'"),
    ({"status": "something-new"}, "migration state 'something-new'"),
    ("garbage", "cannot tell from QEMU (query-migrate)"),
    ({"status": 3}, "cannot tell from QEMU (query-migrate)"),
])
def test_qemu_migration_state_refuses_through_the_session(answer: Any, words: str) -> None:
    r, calls = runner(FakeLibvirt(migrate=answer))
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    assert calls == [] and words in r.status()["reason"], r.status()["reason"]


@pytest.mark.parametrize("answer", [{}, {"status": "completed"}, {"status": "cancelled"}])
def test_finished_or_no_migration_punches(answer: Any) -> None:
    r, calls = runner(FakeLibvirt(migrate=answer))
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    assert calls == [(64 * MiB2, MiB2)]


def test_the_map_is_rebuilt_after_the_hello() -> None:
    r, calls = runner(FakeLibvirt())
    assert r.gmap is None
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    assert r.gmap is not None and r.gmap.never_punch == ((1008 << 20, 1 << 30),)
    assert calls == [(64 * MiB2, MiB2)]


def test_a_map_that_cannot_be_rebuilt_after_the_hello_refuses() -> None:
    conn = FakeLibvirt()
    conn.map_case = None
    r, calls = runner(conn)
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    assert calls == [] and "could not be rebuilt after the hello" in r.status()["reason"]


def test_a_one_gib_backed_vm_says_why_in_status() -> None:
    r, _ = runner(FakeLibvirt())
    r.idle_note = giant_granule_note(1 << 30, r.effective_settings())
    table = format_status({"vms": [r.status()]})
    assert "vm1: guest RAM is backed by 1 GiB host pages" in table


@pytest.mark.parametrize("xml", ["<domain><name>vm1", "<notadomain/>"])
def test_an_unreadable_domain_xml_refuses(xml: str) -> None:
    r, calls = runner(FakeLibvirt(xml))
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    reason = r.status()["reason"]
    assert calls == [] and ("cannot weigh the refusal facts of vm1" in reason
                            or "domain XML libvirt gave cannot be parsed" in reason), reason


def test_the_journal_names_each_change_of_reclaimer_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="aerated")
    r, _ = runner(FakeLibvirt())
    decide(r)
    one_batch(r, {"agent": "t", "capabilities": SAFE_CAPS})
    decide(r)  # same decision again: no new line
    lines = [m for m in caplog.messages if m.startswith("vm1: reclaimer")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("vm1: reclaimer refuse: cannot tell whether the guest poisons")
    assert lines[1].startswith("vm1: reclaimer punch: guest RAM is memfd-shared")


def test_the_daemon_raises_its_open_file_limit_for_a_thousand_vms() -> None:
    """systemd's soft limit of 1,024 descriptors would stop a daemon at about 500 VMs
    (two held per VM); main() calls raise_fd_limit, which lifts it to the hard limit (run
    in a child, whose limits the test may lower)."""
    code = ("import resource\n"
            "from aerate.host.daemon import raise_fd_limit\n"
            "s, h = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, h))\n"
            "before, after = raise_fd_limit()\n"
            "print(before, after, resource.getrlimit(resource.RLIMIT_NOFILE)[0], h)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(Path(__file__).resolve().parents[2])).stdout
    before, after, now, hard = (int(x) for x in out.split())
    assert before == 1024 and after == now and now >= min(hard, 4 * 1024)
