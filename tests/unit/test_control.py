"""aeratectl against the real daemon: its control socket, host/control.py, the runners.

The real Daemon, VmRunner, VmSession and control socket, with a MOCK of libvirtd only
(daemon_sim.FakeLibvirt: no libvirt daemon runs in the unit tier; it stores metadata live
and in the saved definition as libvirt does). aeratectl's ``main`` runs in a thread, as
the command would, and its answers are checked against host/ctl_schema.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_sim import FakeLibvirt, SimGuest, simulated, until, uuid_of
from prometheus_client import generate_latest

from aerate.host import config as config_mod
from aerate.host import control, ctl, journal, metrics, pressure
from aerate.host.refusal import JobInfo

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "host" /
                     "ctl_schema.json").read_text())
MiB = 1 << 20


# -- a small JSON-schema validator (jsonschema is not in the venv): the keywords the
# schema uses, and a test below that fails when the schema uses one it does not know.

KNOWN = {"$schema", "$id", "title", "description", "definitions", "type", "properties",
         "required", "items", "additionalProperties", "enum", "const", "$ref"}
TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None}


def check(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    """Raise AssertionError naming the first place ``value`` breaks ``schema``."""
    if "$ref" in schema:
        schema = SCHEMA["definitions"][schema["$ref"].rsplit("/", 1)[-1]]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(TYPES[t](value) for t in types), f"{where}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "const" in schema:
        assert value == schema["const"], f"{where}: {value!r} != {schema['const']!r}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: {key!r} missing"
        props = schema.get("properties", {})
        for key, v in value.items():
            if key in props:
                check(v, props[key], f"{where}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                check(v, schema["additionalProperties"], f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            check(v, schema["items"], f"{where}[{i}]")


def conforms(answer: Any, kind: str) -> Any:
    check(answer, SCHEMA["definitions"][kind])
    return answer


def test_the_validator_knows_every_keyword_the_schema_uses() -> None:
    def walk(node: Any) -> set[str]:
        if isinstance(node, list):
            return set().union(*(walk(n) for n in node)) if node else set()
        if not isinstance(node, dict):
            return set()
        keys = set(node) if "type" in node or "$ref" in node or "enum" in node or \
            "const" in node else set()
        for k, v in node.items():
            if k in ("properties", "definitions"):
                keys |= set().union(*(walk(x) for x in v.values())) if v else set()
            elif k in ("items", "additionalProperties"):
                keys |= walk(v)
        return keys
    assert walk(SCHEMA) | set(SCHEMA) <= KNOWN
    with pytest.raises(AssertionError, match="missing"):
        conforms({"ok": True}, "status")
    with pytest.raises(AssertionError, match="not in"):
        conforms({"ok": True, "libvirt": True, "config": "", "host": {
            "mem_available_bytes": None, "mem_total_bytes": None, "psi_some_avg10": None},
            "vms": [{"vm": "x", "uuid": "", "state": "s", "reclaimer": "maybe",
                     "category": "", "reason": ""}]}, "status")


# -- the harness

Body = Callable[[Any, FakeLibvirt, dict[str, SimGuest], Callable[..., Awaitable[Any]]],
                Awaitable[None]]


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: Body,
        names: tuple[str, ...] = ("A",), config: str = "") -> None:
    async def main() -> None:
        (tmp_path / "none.toml").write_text(config)
        async with simulated(str(tmp_path), names) as (daemon, conn, guests):
            server = await asyncio.start_unix_server(daemon.control,
                                                     path=str(tmp_path / "aerated.sock"))
            loop = asyncio.get_running_loop()

            async def aeratectl(*argv: str) -> tuple[int, str, str]:
                capsys.readouterr()
                rc = await loop.run_in_executor(None, ctl.main,
                                                ["--run-dir", str(tmp_path), *argv])
                out, err = capsys.readouterr()
                return rc, out, err

            try:
                await body(daemon, conn, guests, aeratectl)
            finally:
                server.close()

    asyncio.run(main())


async def delivered(guest: SimGuest, cond: Callable[[dict[str, Any]], bool], what: str
                    ) -> None:
    """Wait until the idle guest (it sends nothing meanwhile) got settings that satisfy
    ``cond``: the daemon writes them at once, not at the guest's next message."""
    await until(lambda: any(cond(c) for c in guest.configs), 2, what)


async def running(daemon: Any, *names: str) -> None:
    for n in names:
        daemon.start_runner(n)
    for n in names:
        await until(lambda n=n: daemon.runners[n].state.value == "running", 5, f"{n} running")


# -- status: every VM, with the truth

def test_status_shows_every_vm_and_no_false_figure(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A punch VM with its figures, a VM without the channel as unmanaged with the reason
    and no backing figure (status or metrics), a balloon VM with target/actual/floor and
    what the balloon holds back."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest],
                   aeratectl: Callable[..., Awaitable[Any]]) -> None:
        conn.no_channel.add("N")
        conn.private.add("P")
        conn.balloon["P"] = (4096 * MiB, 4096 * MiB)
        guests["P"].mem_free = 3072 * MiB
        await running(daemon, "A", "P")
        daemon.start_runner("N")
        await until(lambda: daemon.runners["N"].state.value == "no-channel", 5, "N idle")
        g = guests["P"]
        assert g.ep is not None and g.writer is not None
        g.send_stats(g.ep, g.writer)
        await until(lambda: daemon.runners["P"].balloon_actual < 4096 * MiB, 5,
                    "P's first inflate, read back")
        rc, out, _ = await aeratectl("status", "--json")
        answer = conforms(json.loads(out), "status")
        assert rc == 0
        vms = {v["vm"]: v for v in answer["vms"]}
        assert vms["A"]["reclaimer"] == "punch" and "backing_allocated_bytes" in vms["A"]
        assert vms["A"]["uuid"] == uuid_of("A")
        n = vms["N"]
        assert n["reclaimer"] == "unmanaged" and n["category"] == "no-channel"
        assert "org.aerate.agent.0" in n["reason"]
        assert not any(k.startswith("backing_allocated") for k in n), n
        bal = vms["P"]["balloon"]
        assert vms["P"]["reclaimer"] == "balloon"
        assert bal["max_bytes"] == 4096 * MiB and bal["floor_bytes"] == 2048 * MiB
        assert bal["held_back_bytes"] == 4096 * MiB - bal["actual_bytes"] > 0
        rc, out, _ = await aeratectl("status")
        assert rc == 0 and "holding back" in out and "P: balloon target" in out
        row = next(line for line in out.splitlines() if line.startswith("N "))
        assert "unmanaged" in row and "org.aerate.agent.0" in row
        rc, out, _ = await aeratectl("watch", "--json", "--count", "2", "--interval", "0")
        assert rc == 0 and len([conforms(json.loads(line), "status")
                                for line in out.splitlines()]) == 2
        text = generate_latest(metrics.registry(lambda: control.views(daemon),
                                                lambda: True)).decode()
        assert 'aerate_backing_allocated_bytes{vm="N"}' not in text
        assert 'aerate_effective_setting{key="hwm",vm="N"}' not in text  # no agent: no figure
        assert 'aerate_effective_setting{key="hwm",vm="A"}' in text
        assert 'aerate_backing_allocated_bytes{vm="A"}' in text
        assert (f'aerate_vm_info{{reason="no-channel",reclaimer="unmanaged",'
                f'uuid="{uuid_of("N")}",vm="N"}} 1.0') in text
        assert 'aerate_balloon_held_back_bytes{vm="P"}' in text
        # One VM, by UUID and by id (virsh's ways of naming a domain).
        for ident in (uuid_of("P"), str(list(conn.vms).index("P"))):
            rc, out, _ = await aeratectl("status", ident, "--json")
            assert rc == 0 and [v["vm"] for v in json.loads(out)["vms"]] == ["P"], ident

    run(tmp_path, capsys, body, names=("A", "N", "P"))


# -- get / set / reset

def test_a_transient_domains_settings_come_from_its_metadata_not_live(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A domain started without a definition (virsh create, the vm tier's guests) keeps its
    metadata for as long as it exists: get says "metadata", not "live" (lost at the next
    stop), after a restart of aerated as before it (tests/vm/test_ctl_live.py)."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest],
                   aeratectl: Callable[..., Awaitable[Any]]) -> None:
        conn.transient.add("A")
        await running(daemon, "A")
        rc, out, err = await aeratectl("set", "A", "hwm=6")
        assert rc == 0, err
        assert ("A", "live") in conn.stored and ("A", "config") not in conn.stored
        rc, out, _ = await aeratectl("get", "A", "hwm", "--json")
        got = conforms(json.loads(out), "get")["settings"]["hwm"]
        assert (got["value"], got["source"]) == (6, "metadata"), got
        assert "transient" in got["detail"], got

    run(tmp_path, capsys, body)


def test_set_get_reset_on_a_running_vm(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest],
                   aeratectl: Callable[..., Awaitable[Any]]) -> None:
        await running(daemon, "A")
        rc, out, _ = await aeratectl("get", "A", "hwm", "--json")
        got = conforms(json.loads(out), "get")
        assert rc == 0 and got["settings"]["hwm"]["source"] == "built-in"
        rc, out, _ = await aeratectl("get", "A", "capacity", "--json")
        assert json.loads(out)["settings"]["capacity"]["source"] == "host file"
        rc, out, err = await aeratectl("set", "A", "hwm=8", "capacity=4")
        assert rc == 0, err
        assert "applied now" in out
        # The agent got the new values at once, and they are stored live and saved.
        await delivered(guests["A"], lambda c: c.get("hwm") == 8 and c.get("capacity") == 4,
                        "the config message")
        saved = config_mod.metadata_entries(conn.stored[("A", "config")], "A")
        assert saved == {"hwm": "8", "capacity": "4"}
        rc, out, _ = await aeratectl("get", "A", "--json")
        got = conforms(json.loads(out), "get")["settings"]
        assert (got["hwm"]["value"], got["hwm"]["source"]) == (8, "metadata")
        assert "saved in its definition" in got["hwm"]["detail"]
        rc, out, _ = await aeratectl("get", "A")
        assert rc == 0 and any(line.split()[:3] == ["hwm", "8", "metadata"]
                               for line in out.splitlines())
        # reset brings back the layer below: [vm.A] for capacity, built-in for hwm.
        rc, out, _ = await aeratectl("reset", "A", "hwm", "capacity")
        assert rc == 0 and "removed capacity, hwm" in out
        rc, out, _ = await aeratectl("get", "A", "--json")
        got = json.loads(out)["settings"]
        assert (got["hwm"]["value"], got["hwm"]["source"]) == (32, "built-in")
        assert (got["capacity"]["value"], got["capacity"]["source"]) == (16, "host file")
        await delivered(guests["A"], lambda c: c.get("hwm") == 32, "hwm back")
        assert ("A", "config") not in conn.stored and ("A", "live") not in conn.stored
        # --config on a running VM: saved for the next start, not applied now.
        rc, out, _ = await aeratectl("set", "A", "delay_ms=7", "--config")
        assert rc == 0 and "next start" in out
        assert daemon.runners["A"].effective_settings()["delay_ms"] == 100
        got = json.loads((await aeratectl("get", "A", "delay_ms", "--json"))[1])["settings"]
        assert got["delay_ms"]["next_start"] == 7 and got["delay_ms"]["value"] == 100
        # --live: the running domain only (lost when it stops).
        rc, out, _ = await aeratectl("set", "A", "delay_ms=9", "--live")
        assert rc == 0 and daemon.runners["A"].effective_settings()["delay_ms"] == 9
        got = json.loads((await aeratectl("get", "A", "delay_ms", "--json"))[1])["settings"]
        assert got["delay_ms"]["next_start"] == 7
        assert (got["delay_ms"]["value"], got["delay_ms"]["source"]) == (9, "live")
        assert "lost when the VM stops" in got["delay_ms"]["detail"]
        # A --live value the definition also holds is the saved metadata again.
        rc, _, err = await aeratectl("set", "A", "delay_ms=9", "--config")
        assert rc == 0, err
        got = json.loads((await aeratectl("get", "A", "delay_ms", "--json"))[1])["settings"]
        assert (got["delay_ms"]["source"], "next_start" in got["delay_ms"]) == \
            ("metadata", False)

    run(tmp_path, capsys, body, config="[vm.A]\ncapacity = 16\n")


def test_reload_sends_what_the_host_file_changed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest],
                   aeratectl: Callable[..., Awaitable[Any]]) -> None:
        await running(daemon, "A")
        (tmp_path / "none.toml").write_text("[vm.A]\nhwm = 5\n")
        rc, out, _ = await aeratectl("reload")
        assert rc == 0 and "reloaded" in out
        await delivered(guests["A"], lambda c: c.get("hwm") == 5, "hwm from the host file")
        (tmp_path / "none.toml").write_text("[vm.A]\nhwm = lots\n")
        rc, _, err = await aeratectl("reload")
        assert rc == 1 and "the old configuration stays in force" in err
        assert daemon.runners["A"].effective_settings()["hwm"] == 5

    run(tmp_path, capsys, body)


def test_sighup_reload_of_a_bad_file_keeps_the_settings_and_tells_systemd(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Bad input from issue 12: ``systemctl reload`` (SIGHUP, Daemon._reload) of a file
    with an error keeps the running settings, logs the file:line, key and allowed values
    at err, and brackets the reload with RELOADING=1 (MONOTONIC_USEC=) ... READY=1 on a
    real NOTIFY_SOCKET, in that order."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))

    def received() -> list[str]:
        out = []
        with contextlib.suppress(BlockingIOError):
            while True:
                out.append(sock.recv(4096).decode())
        return out

    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest],
                   aeratectl: Callable[..., Awaitable[Any]]) -> None:
        await running(daemon, "A")
        assert daemon.runners["A"].effective_settings()["hwm"] == 5
        received()
        (tmp_path / "none.toml").write_text("[defaults]\ndelay_ms = 7\n[vm.A]\nhwm = 0\n")
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        with caplog.at_level(logging.INFO):
            await daemon._reload()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert daemon.runners["A"].effective_settings()["hwm"] == 5
        assert daemon.runners["A"].effective_settings()["delay_ms"] != 7
        msgs = [m for m in received() if not m.startswith(("WATCHDOG=", "STATUS="))]
        assert [m.splitlines()[0] for m in msgs] == ["RELOADING=1", "READY=1"]
        usec = int(msgs[0].splitlines()[1].removeprefix("MONOTONIC_USEC="))
        assert before <= usec <= after
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in caplog.records]
        text = errors[0].getMessage()
        assert f"{tmp_path / 'none.toml'}:4: [vm.A]: hwm=0 is outside" in text
        assert "allowed: an integer from 1 to" in text and "old configuration stays" in text
        assert errors[0].__dict__["MESSAGE_ID"] == journal.EVENTS["config"]
        # A good file after it: in force, the same two messages, and no error.
        (tmp_path / "none.toml").write_text("[vm.A]\nhwm = 6\n")
        await daemon._reload()
        await delivered(guests["A"], lambda c: c.get("hwm") == 6, "hwm after the reload")
        assert [m.splitlines()[0] for m in received()
                if not m.startswith(("WATCHDOG=", "STATUS="))] == ["RELOADING=1", "READY=1"]

    try:
        run(tmp_path, capsys, body, config="[vm.A]\nhwm = 5\n")
    finally:
        sock.close()


def test_a_stopped_vm_is_configured_in_its_definition(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest],
                   aeratectl: Callable[..., Awaitable[Any]]) -> None:
        vm = conn.vms.pop("S")
        conn.defined.add("S")
        rc, out, err = await aeratectl("set", "S", "hwm=12")
        assert rc == 0, err
        assert "next start" in out
        assert ("S", "config") in conn.stored and ("S", "live") not in conn.stored
        rc, _, err = await aeratectl("set", "S", "hwm=3", "--live")
        assert rc == 1 and "not running" in err and "--config" in err
        got = json.loads((await aeratectl("get", uuid_of("S"), "hwm", "--json"))[1])
        assert conforms(got, "get")["running"] is False
        assert (got["settings"]["hwm"]["value"], got["settings"]["hwm"]["source"]) == \
            (12, "metadata")
        rc, out, _ = await aeratectl("status", "S", "--json")
        st = conforms(json.loads(out), "status")["vms"][0]
        assert rc == 0 and (st["state"], st["reclaimer"]) == ("shut-off", "unmanaged")
        # It starts (libvirt copies the definition's metadata to the live domain): the
        # daemon serves it with the stored value.
        conn.defined.discard("S")
        conn.add(vm)
        conn.stored[("S", "live")] = conn.stored[("S", "config")]
        await running(daemon, "S")
        assert daemon.runners["S"].effective_settings()["hwm"] == 12
        assert guests["S"].configs[0]["hwm"] == 12  # in the sync's settings

    run(tmp_path, capsys, body, names=("S",))


def test_bad_input_says_what_to_do_with_the_documented_exit_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest],
                   aeratectl: Callable[..., Awaitable[Any]]) -> None:
        await running(daemon, "A")
        before = dict(conn.stored)
        cases = [
            (("set", "nosuch", "hwm=8"), 4, "no VM 'nosuch'"),
            (("explain", "nosuch"), 4, "virsh list --all"),
            (("get", "nosuch"), 4, "no VM"),
            (("set", "A", "hwmm=8"), 2, "unknown setting 'hwmm'"),
            (("set", "A", "hwm=0"), 2, "outside [1, 1048576]"),
            (("set", "A", "hwm"), 2, "not key=value"),
            (("get", "A", "hwmm"), 2, "unknown setting"),
            (("reset", "A", "hwmm"), 2, "none stored by that name"),
            (("set", "A", "lease_s=5"), 1, "host config file"),
            (("reset", "A", "vhost_user_trusted"), 1, "host config file"),
            (("frobnicate",), 2, "invalid choice"),
        ]
        for argv, code, words in cases:
            rc, _out, err = await aeratectl(*argv)
            assert rc == code, (argv, rc, err)
            # One line that says what to do (argparse prints its usage above its line).
            lines = err.strip().splitlines()
            assert words in lines[-1] and (len(lines) == 1 or argv == ("frobnicate",)), \
                (argv, err)
        assert conn.stored == before  # nothing changed
        rc, _, err = await loop_free_ctl(tmp_path / "nowhere")
        assert rc == 3 and "is aerated running?" in err

    async def loop_free_ctl(run_dir: Path) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = await asyncio.get_running_loop().run_in_executor(
            None, ctl.main, ["--run-dir", str(run_dir), "status"])
        out, err = capsys.readouterr()
        return rc, out, err

    run(tmp_path, capsys, body)


def test_reset_repairs_a_stored_layer_that_refused_the_vm(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The fail-closed refusal's hint names 'aeratectl reset VM KEY': it works."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest],
                   aeratectl: Callable[..., Awaitable[Any]]) -> None:
        bad = "<settings><setting name='hwmm'>3</setting><setting name='hwm'>9</setting>" \
              "</settings>"
        conn.stored[("A", "live")] = conn.stored[("A", "config")] = bad
        await running(daemon, "A")
        r = daemon.runners["A"]
        assert "aeratectl reset A KEY" in r.settings_error
        await until(lambda: r.permit().action == "refuse", 5, "the refusal")
        rc, _out, err = await aeratectl("reset", "A", "hwmm")
        assert rc == 0, err
        assert r.settings_error == "" and r.effective_settings()["hwm"] == 9
        await until(lambda: r.permit().action == "punch", 5, "punch again")

    run(tmp_path, capsys, body)


# -- explain

def test_explain_says_why_in_sentences_with_every_fact(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest],
                   aeratectl: Callable[..., Awaitable[Any]]) -> None:
        conn.no_channel.add("N")
        conn.private.add("P")
        await running(daemon, "A")
        daemon.start_runner("N")
        await until(lambda: daemon.runners["N"].state.value == "no-channel", 5, "N idle")
        rc, out, _ = await aeratectl("explain", "A", "--json")
        ex = conforms(json.loads(out), "explain")
        assert rc == 0 and ex["reclaiming"] and ex["reclaimer"] == "punch"
        facts = {f["fact"]: f for f in ex["facts"]}
        assert {"mode", "settings", "pinning_devices", "pinning_fd", "vhost_user",
                "launch_security", "job", "qemu_migration", "memory_map", "backing",
                "reservations", "poison", "memballoon", "memory", "balloon_available",
                "kernel_reporting"} <= set(facts)
        assert all(f["ok"] for f in facts.values()), facts
        assert "source memfd, access shared; punching can free it" in facts["memory"]["text"]
        assert "balloon reclaimer is available" in facts["balloon_available"]["text"]
        assert "does not report its own free pages" in facts["kernel_reporting"]["text"]
        text = " ".join(ex["sentences"])
        for words in ("reclaiming with punch", "Leases of", "Discard budget",
                      "Guest capabilities: poison_safe yes", "Host pressure is not used",
                      "Last errors: none", "tainted: custom-monitor",
                      "No libvirt API gives what it asks"):
            assert words in text, (words, text)
        # A fact against reclaim is named, with the verdict.
        conn.job["A"] = JobInfo(active=True, operation="migration-out")
        rc, out, _ = await aeratectl("explain", "A")
        assert rc == 0 and "NO  job: libvirt job: migration-out" in out
        assert "Weighed afresh, the facts give: refuse" in out
        rc, out, _ = await aeratectl("explain", "N", "--json")
        ex = conforms(json.loads(out), "explain")
        assert (ex["reclaimer"], ex["category"], ex["reclaiming"]) == \
            ("unmanaged", "no-channel", False)
        # Private RAM: only the balloon returns it, and mode=punch is a fact against it.
        await running(daemon, "P")
        ex = conforms(json.loads((await aeratectl("explain", "P", "--json"))[1]), "explain")
        memory = {f["fact"]: f for f in ex["facts"]}["memory"]
        assert memory["ok"] and "access private" in memory["text"], memory
        assert "only the balloon can return it" in memory["text"]
        rc, _, err = await aeratectl("set", "P", "mode=punch")
        assert rc == 0, err
        ex = json.loads((await aeratectl("explain", "P", "--json"))[1])
        assert not {f["fact"]: f for f in ex["facts"]}["memory"]["ok"], ex["facts"]

    run(tmp_path, capsys, body, names=("A", "N", "P"))


def test_a_vm_the_guest_kernel_reclaims_is_shown_as_kernel(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest],
                   aeratectl: Callable[..., Awaitable[Any]]) -> None:
        guests["K"].capabilities["free_page_reporting"] = {"available": True,
                                                           "detail": "negotiated"}
        daemon.start_runner("K")
        await until(lambda: daemon.runners["K"].permit().action == "kernel", 5, "kernel")
        st = conforms(json.loads((await aeratectl("status", "K", "--json"))[1]), "status")
        assert (st["vms"][0]["reclaimer"], st["vms"][0]["category"]) == ("kernel", "none")
        ex = conforms(json.loads((await aeratectl("explain", "K", "--json"))[1]), "explain")
        assert ex["reclaiming"] and "The guest kernel reclaims it" in ex["sentences"][1]
        fact = {f["fact"]: f for f in ex["facts"]}["kernel_reporting"]
        assert fact["ok"] and "the guest kernel reports its own free pages" in fact["text"]

    run(tmp_path, capsys, body, names=("K",))


def test_settings_json_follows_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["settings", "--json"]) == 0
    rows = conforms(json.loads(capsys.readouterr().out), "settings")
    assert {r["name"] for r in rows} >= {"hwm", "host_low_mib", "lease_s"}


# -- host pressure

def test_pressure_levels_and_what_they_change() -> None:
    values = {"host_low_mib": 1024, "host_high_mib": 4096, "host_psi_some": 10.0, "hwm": 32,
              "reserve_mib": 256}
    at = {a: pressure.HostMemory(a * MiB, 16384 * MiB) for a in (8000, 4096, 2000, 1023)}
    assert [pressure.level(at[a], values) for a in (8000, 4096, 2000, 1023)] == \
        ["plenty", "plenty", "firmer", "firm"]
    assert pressure.level(pressure.UNKNOWN, values) == "plenty"  # no sample: no pressure
    assert pressure.level(at[1023], dict(values, host_low_mib=0, host_high_mib=0)) == \
        "plenty"
    assert pressure.adjust(dict(values), "firmer")["hwm"] == 16
    firm = pressure.adjust(dict(values), "firm")
    assert (firm["hwm"], firm["reserve_mib"]) == (8, 64)
    assert pressure.adjust(dict(values, hwm=1), "firm")["hwm"] == 1  # the table's bound
    from aerate.host.balloon import BalloonSettings
    s_values = {"psi_threshold": 10.0, "floor": 0.5, "stats_interval_s": 5}
    s = BalloonSettings.from_settings(dict(s_values, reserve_mib=256))
    firm_b = pressure.balloon(s, "firm")
    assert firm_b.step == 4 * s.step and firm_b.floor_fraction == s.floor_fraction
    assert pressure.balloon(s, "plenty") == s
    # The numbers explain and the metrics show, from adjust and balloon themselves.
    assert pressure.effective(dict(values, **s_values), "firmer") == {
        "hwm": 16, "reserve_mib": 128, "balloon_step_factor": 2.0,
        "balloon_cooldown_intervals": 1.5}
    assert pressure.effective(dict(values, **s_values), "plenty") == {
        "hwm": 32, "reserve_mib": 256, "balloon_step_factor": 1.0,
        "balloon_cooldown_intervals": 3.0}
    said = pressure.describe(at[2000], dict(values, **s_values))
    assert said.endswith("level firmer, so firmer: hwm 16 (configured 32), reserve_mib 128 "
                         "(configured 256), balloon steps x2, cool-down after a deflate 1.5 "
                         "stats intervals"), said
    # Acting on firm while the sample already says plenty: held, with the numbers acted on.
    said = pressure.describe(at[8000], dict(values, **s_values), "firm")
    assert "level firm, held until the host has stayed at plenty" in said, said
    assert "hwm 8 (configured 32)" in said


def test_memory_psi_raises_the_level_one_step() -> None:
    values = {"host_low_mib": 1024, "host_high_mib": 4096, "host_psi_some": 10.0}

    def at(avail_mib: int, psi: float | None) -> str:
        return pressure.level(pressure.HostMemory(avail_mib * MiB, 16384 * MiB, psi), values)
    assert [at(8000, 12.0), at(2000, 12.0), at(500, 12.0)] == ["firmer", "firm", "firm"]
    assert [at(8000, 10.0), at(2000, 9.9), at(8000, None)] == ["plenty", "firmer", "plenty"]
    assert pressure.level(pressure.HostMemory(8000 * MiB, None, 50.0),
                          dict(values, host_psi_some=0.0)) == "plenty"  # 0: ignored
    # Host pressure not used for the VM (both thresholds 0): PSI does not start it.
    assert pressure.level(pressure.HostMemory(8000 * MiB, None, 50.0),
                          dict(values, host_low_mib=0, host_high_mib=0)) == "plenty"
    # Through settle: firmer at once on PSI, held while PSI decays, relaxed after a while.
    lvl, since = pressure.settle("plenty", at(8000, 30.0), None, 0.0)
    assert lvl == "firmer"
    lvl, since = pressure.settle(lvl, at(8000, 5.0), since, 1.0)
    assert lvl == "firmer"
    lvl, since = pressure.settle(lvl, at(8000, 4.0), since, 1.0 + pressure.RELAX_AFTER_S)
    assert lvl == "plenty"
    said = pressure.describe(pressure.HostMemory(8000 * MiB, None, 12.5),
                             dict(values, hwm=32, reserve_mib=256, psi_threshold=10.0,
                                  floor=0.5, stats_interval_s=5))
    assert "memory PSI some avg10 12.5 % (host_psi_some 10; above it: one level firmer): " \
        "level firmer" in said, said


PROC = Path(__file__).resolve().parents[1] / "data" / "proc"


@pytest.mark.parametrize("capture", sorted(p.parents[2].name for p in
                                           PROC.glob("*/proc/pressure/memory")))
def test_psi_is_read_from_captured_proc_files(capture: str) -> None:
    assert pressure._psi(str(PROC / capture / "proc" / "pressure" / "memory")) == 0.0


def test_psi_parsing() -> None:
    assert pressure.parse_psi("some avg10=12.50 avg60=3.10 avg300=0.70 total=123\n"
                              "full avg10=9.00 avg60=1.00 avg300=0.20 total=99\n") == 12.5
    assert pressure.parse_psi("full avg10=9.00 avg60=1.00 avg300=0.20 total=99\n") is None
    assert pressure.parse_psi("\nsome avg60=1.00\n") is None
    assert pressure.parse_psi("some avg10=x avg60=1.00\n") is None
    assert pressure.parse_psi("some avg10=nan\n") is None
    assert pressure.parse_psi("") is None
    assert pressure._psi("/nonexistent/pressure/memory") is None


def test_pressure_firms_at_once_and_relaxes_only_after_a_while() -> None:
    """MemAvailable hovering at a threshold must not flip every VM's settings each second."""
    lvl, since = pressure.settle("plenty", "firm", None, 100.0)
    assert (lvl, since) == ("firm", None)
    lvl, since = pressure.settle("firm", "plenty", None, 101.0)
    assert (lvl, since) == ("firm", 101.0)
    lvl, since = pressure.settle(lvl, "firmer", since, 101.0 + pressure.RELAX_AFTER_S / 2)
    assert lvl == "firm"
    lvl, since = pressure.settle(lvl, "plenty", since, 101.0 + pressure.RELAX_AFTER_S)
    assert (lvl, since) == ("plenty", None)


def test_host_pressure_firms_a_running_vms_agent_and_relaxes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Below host_low_mib the agent gets a quarter of hwm and reserve_mib at once; with
    memory back above host_high_mib it gets its own values again; get and status say so."""
    async def body(daemon: Any, conn: FakeLibvirt, guests: dict[str, SimGuest],
                   aeratectl: Callable[..., Awaitable[Any]]) -> None:
        host = {"avail": 8192 * MiB}
        monkeypatch.setattr(pressure, "RELAX_AFTER_S", 0.3)
        monkeypatch.setattr(pressure, "sample",
                            lambda: pressure.HostMemory(host["avail"], 16384 * MiB))
        watcher = asyncio.get_running_loop().create_task(
            control.watch_pressure(daemon, 0.05))
        try:
            await running(daemon, "A")
            host["avail"] = 512 * MiB
            await delivered(guests["A"], lambda c: c.get("hwm") == 8 and
                            c.get("reserve_mib") == 64, "firm settings")
            got = json.loads((await aeratectl("get", "A", "hwm", "--json"))[1])
            assert got["host_pressure"] == "firm"
            assert (got["settings"]["hwm"]["source"], got["settings"]["hwm"]["configured"]) \
                == ("host pressure", 32)
            assert "host_psi_some" in got["settings"]["hwm"]["detail"]
            _rc, out, _ = await aeratectl("status")
            assert "host memory level firm: settings firmed up to hwm 8, reserve_mib 64" in out
            # The effective numbers, in explain's sentence, its JSON and status's JSON.
            firm = {"hwm": 8, "reserve_mib": 64, "balloon_step_factor": 4.0,
                    "balloon_cooldown_intervals": 1.5}
            ex = conforms(json.loads((await aeratectl("explain", "A", "--json"))[1]),
                          "explain")
            assert (ex["host_pressure"], ex["effective"]) == ("firm", firm)
            assert "level firm, so firm: hwm 8 (configured 32), reserve_mib 64 (configured " \
                "256), balloon steps x4" in " ".join(ex["sentences"]), ex["sentences"]
            st = conforms(json.loads((await aeratectl("status", "A", "--json"))[1]), "status")
            assert st["vms"][0]["effective"] == firm
            host["avail"] = 8192 * MiB
            n = len(guests["A"].configs)
            await delivered(guests["A"], lambda c: c.get("hwm") == 32 and
                            guests["A"].configs.index(c) >= n, "relaxed settings")
        finally:
            watcher.cancel()

    run(tmp_path, capsys, body, config="[defaults]\nhost_low_mib = 1024\n"
                                        "host_high_mib = 4096\n")


def test_bash_completion_comes_from_the_parser_and_the_table(tmp_path: Path) -> None:
    import subprocess

    from aerate.agent import settings as table
    script = ctl.bash_completion()
    for row in table.TABLE:
        assert (f"{row.name}=" in script) == (row.scope != "host"), row.name
    for cmd in ("status", "get", "set", "reset", "explain", "settings", "completion"):
        assert cmd in script.split("compgen -W \"", 1)[1].split('"', 1)[0]
    (tmp_path / "c.sh").write_text(script)
    r = subprocess.run(["bash", "-c", f". {tmp_path / 'c.sh'}; COMP_WORDS=(aeratectl set vm "
                        "hw); COMP_CWORD=3; _aeratectl; echo ${COMPREPLY[@]}"],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.split() == ["hwm="], r
