"""aerated's control plane: the requests ``aeratectl`` sends over the control socket.

One request, one answer, both JSON (host/ctl_schema.json documents every answer). Every
answer has ``ok``; a failed one has ``error`` (one line: what failed and what to do) and
``code``, which aeratectl turns into its exit code:

========== ==================================================== ===========
code       meaning                                              exit code
========== ==================================================== ===========
refused    the daemon or libvirt refused or failed it           1
usage      the request itself is wrong (unknown key, bad value) 2
no-such-vm no domain by that name, UUID or id                   4
========== ==================================================== ===========

(3, daemon unreachable, is aeratectl's own.) Nothing here blocks the loop: libvirt is
asked only through a VM's worker or the host worker (host/vm_worker.py, ordered and
timed), status and metrics read the runners' snapshots (S8).

Where a setting comes from (``get``), lowest first, as ``VmRunner.effective_settings``
layers them: ``built-in`` < ``host file`` ([defaults], then [vm.NAME]) < the domain's
metadata (written by ``aeratectl set``): ``metadata`` where the saved definition holds the
same value, ``live`` where only the running domain does (``set --live``: gone when the VM
stops); host pressure (host/pressure.py) may then firm up a guest value, shown as ``host
pressure``.
Host-scope keys never come from the metadata (S6): ``set``/``reset`` refuse them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from aerate.agent import settings as table
from aerate.host import config as config_mod
from aerate.host import journal, pressure
from aerate.host.balloon import BalloonSettings, floor_bytes
from aerate.host.libvirt_conn import DomainError, LibvirtUnavailable
from aerate.host.refusal import (
    BALLOON,
    KERNEL,
    PUNCH,
    REFUSE,
    VmFacts,
    decide,
    refusal_category,
)
from aerate.host.vm_worker import CallTimeout

log = logging.getLogger("aerated")

if TYPE_CHECKING:
    from aerate.host.daemon import Daemon, VmRunner

#: The commands the daemon answers (aeratectl's subcommands that ask the daemon).
COMMANDS = ("status", "get", "set", "reset", "explain", "reload")
#: Error codes of a failed answer, and aeratectl's exit code for each.
EXIT_CODES = {"refused": 1, "usage": 2, "no-such-vm": 4}
#: What a VM's reclaimer may be: the decisions, then "starting" (not decided yet) and
#: "unmanaged" (aerate does nothing for it: UNMANAGED says why).
RECLAIMERS = (PUNCH, BALLOON, KERNEL, REFUSE)
#: Runner states in which aerate does nothing for the VM, with their category.
UNMANAGED = {"no-channel": "no-channel", "busy": "busy", "stopped": "stopped"}
#: How long status waits for the list of running domains (VMs that --vm leaves out).
LIST_TIMEOUT = 1.0
#: libvirt's monitor passthrough, which aerated uses, marks the domain in libvirt's log.
#: Neither use has a libvirt API (README "custom-monitor"): the memory map needs QEMU's
#: RAM blocks and flat view; query-migrate sees migrations and background snapshots
#: started on QEMU's monitor outside libvirt, which libvirt's job stats and events do not
#: (libvirt drops QEMU's MIGRATION event when it runs no migration job itself).
TAINT_NOTE = ("aerated asks QEMU through libvirt's monitor passthrough, so libvirt marks this "
              "domain 'tainted: custom-monitor' (logged once per domain start); the taint is "
              "only a note in libvirt's log and changes nothing in the VM. No libvirt API "
              "gives what it asks: the memory map after each hello (QMP query-memdev and "
              "qom-list, HMP info mtree, info ramblock, gpa2hva: where each RAM block lives "
              "in QEMU), and query-migrate every second while no libvirt job runs "
              "(libvirt's job stats and migration events, which aerated also reads, cover "
              "only the jobs libvirt runs itself, "
              "not a migration or background snapshot started on QEMU's monitor outside it)")


class Failed(Exception):
    """A request that cannot be served: the answer's error and code."""

    def __init__(self, error: str, code: str = "refused") -> None:
        super().__init__(error)
        self.code = code


class Target(NamedTuple):
    """The domain a request names."""

    name: str
    uuid: str
    id: int            # -1: not running
    runner: VmRunner | None


def _failed(e: Failed) -> dict[str, Any]:
    return {"ok": False, "error": str(e), "code": e.code}


async def handle(d: Daemon, req: Mapping[str, Any]) -> dict[str, Any]:
    """Serve one control request; never raises for a bad request."""
    cmd = req.get("cmd")
    try:
        if cmd == "status":
            return await status(d, req.get("vm"))
        if cmd == "get":
            return await get(d, _vm(req), req.get("key"))
        if cmd == "set":
            return await set_(d, _vm(req), req.get("settings"), bool(req.get("live")),
                              bool(req.get("config")))
        if cmd == "reset":
            return await reset(d, _vm(req), req.get("keys") or [], bool(req.get("live")),
                               bool(req.get("config")))
        if cmd == "explain":
            return await explain(d, _vm(req))
        if cmd == "reload":
            return await reload(d)
    except Failed as e:
        return _failed(e)
    except table.SettingError as e:
        return _failed(Failed(str(e), "usage"))
    return _failed(Failed(f"unknown command {cmd!r} ({', '.join(COMMANDS)})", "usage"))


def _vm(req: Mapping[str, Any]) -> str:
    vm = req.get("vm")
    if not isinstance(vm, str) or not vm:
        raise Failed("the request names no VM", "usage")
    return vm


# -- finding the domain

_UUIDS: dict[str, tuple[str, str]] = {}  # runner name -> (its xml, the uuid in it)


def runner_uuid(r: VmRunner) -> str:
    """The domain UUID from the runner's live XML ("" before it read one); parsed once per
    XML text."""
    cached = _UUIDS.get(r.name)
    if cached is not None and cached[0] == r.xml:
        return cached[1]
    uuid = ""
    if r.xml:
        with contextlib.suppress(ET.ParseError):
            uuid = ET.fromstring(r.xml).findtext("uuid", "") or ""
    _UUIDS[r.name] = (r.xml, uuid)
    return uuid


async def resolve(d: Daemon, ident: str) -> Target:
    """The domain named by ``ident``: a served VM's name or UUID, else libvirt's lookup by
    name, UUID or id (virsh's order); Failed(no-such-vm) when there is none."""
    r = d.runners.get(ident)
    if r is None:
        r = next((x for x in d.runners.values() if runner_uuid(x) == ident.lower()), None)
    if r is not None:
        return Target(r.name, runner_uuid(r), -2, r)
    try:
        ref = await d.host_worker.call("lookup", d.conn.lookup, ident)
    except (LibvirtUnavailable, CallTimeout) as e:
        raise Failed(f"cannot look up VM {ident!r}: {e}; is libvirtd running?") from e
    if ref is None:
        raise Failed(f"no VM {ident!r}: no domain has that name, UUID or id "
                     "(virsh list --all shows them)", "no-such-vm")
    return Target(ref.name, ref.uuid, ref.id, d.runners.get(ref.name))


def _worker(d: Daemon, t: Target) -> Any:
    return t.runner.worker if t.runner is not None else d.host_worker


# -- status

def _balloon_view(r: VmRunner, values: Mapping[str, Any]) -> dict[str, Any] | None:
    if not r.balloon_max:
        return None
    floor = floor_bytes(r.balloon_max, BalloonSettings.from_settings(
        values, r.limits.min_guarantee))
    target = r.balloon_target if r.balloon_target is not None else r.balloon_actual
    return {"target_bytes": target, "actual_bytes": r.balloon_actual,
            "max_bytes": r.balloon_max, "floor_bytes": floor,
            "held_back_bytes": max(0, r.balloon_max - r.balloon_actual)}


def vm_view(d: Daemon, r: VmRunner) -> dict[str, Any]:
    """One VM's status: the runner's snapshot, with its UUID, the reason's bounded
    category, the balloon's figures, and no backing figure where none was proven."""
    out = r.status()
    out["uuid"] = runner_uuid(r)
    if not r.backings:
        # No RAM block was proven (no channel, not prepared yet): a 0 would be false.
        out.pop("backing_allocated_bytes", None)
        out.pop("backing_allocated_age_s", None)
        out.pop("backing_allocated_at_start", None)
        out.pop("reclaim", None)  # nothing can be discarded, nothing verified
    state = r.state.value
    if state in UNMANAGED:
        out["reclaimer"], out["category"] = "unmanaged", UNMANAGED[state]
        out["reason"] = r.reason or out.get("reason", "")
    else:
        # What the next batch would meet (the permit, with its latched pinning fd and
        # new-hello checks), not what the session's last batch met: an idle guest's
        # session may not have reported since it was decided.
        now = r.permit()
        action = now.action if math.isfinite(r.cache.issued_at) else "starting"
        out["reclaimer"] = action if action in RECLAIMERS else "starting"
        if out["reclaimer"] in (PUNCH, REFUSE, KERNEL):
            out["reason"] = now.reason
        out["category"] = refusal_category(str(out.get("reason", ""))) \
            if out["reclaimer"] == REFUSE else "none"
    values = out.get("settings") or r.effective_settings()
    bal = _balloon_view(r, values)
    if bal is not None:
        out["balloon"] = dict(out.get("balloon") or {}, **bal)
    out["host_pressure"] = r.pressure_level
    if out["reclaimer"] != "unmanaged":  # no agent, nothing applied: no figure
        out["effective"] = pressure.effective(r.configured_settings(), r.pressure_level)
    return out


def views(d: Daemon) -> list[dict[str, Any]]:
    """Every served VM's status from snapshots (the metrics scrape's thread may call it)."""
    return [vm_view(d, r) for r in sorted(list(d.runners.values()), key=lambda r: r.name)]


def _host(d: Daemon) -> dict[str, Any]:
    m = d.host_memory
    return {"mem_available_bytes": m.available, "mem_total_bytes": m.total,
            "psi_some_avg10": m.psi_some_avg10}


async def status(d: Daemon, ident: Any = None) -> dict[str, Any]:
    """Every VM (or one): served ones from their runners, running ones that ``--vm``
    leaves out and a named VM that is not running as ``unmanaged``, with the reason."""
    runners = sorted(d.runners.values(), key=lambda r: r.name)
    extra: list[dict[str, Any]] = []
    if ident is not None:
        t = await resolve(d, str(ident))
        runners = [t.runner] if t.runner is not None else []
        if t.runner is None:
            extra.append(_unserved(d, t.name, t.uuid, t.id >= 0))
    elif d.only:
        with contextlib.suppress(LibvirtUnavailable, CallTimeout):
            refs = await d.host_worker.call("running_domains", d.conn.running_domains,
                                            timeout=LIST_TIMEOUT)
            extra = [_unserved(d, ref.name, ref.uuid, True) for ref in refs
                     if ref.name not in d.runners]
    # Fresh backing figures, each read in its VM's worker: a hung VM delays this answer by
    # at most the read timeout and keeps its older snapshot.
    from aerate.host.daemon import STATUS_READ_TIMEOUT
    await asyncio.gather(*(r.refresh_backing(STATUS_READ_TIMEOUT) for r in runners))
    vms = sorted([vm_view(d, r) for r in runners] + extra, key=lambda v: v["vm"])
    return {"ok": True, "libvirt": d.conn.connected, "vms": vms, "config": d.config.path,
            "host": _host(d)}


def _unserved(d: Daemon, name: str, uuid: str, running: bool) -> dict[str, Any]:
    if running:
        why = (f"aerated serves only VMs matching --vm {' '.join(d.only)}"
               if d.only and not d.serves(name) else "aerated has not started serving it yet")
        return {"vm": name, "uuid": uuid, "state": "not-served", "reclaimer": "unmanaged",
                "category": "not-served", "reason": why}
    return {"vm": name, "uuid": uuid, "state": "shut-off", "reclaimer": "unmanaged",
            "category": "stopped", "reason": "the domain is not running"}


# -- get

async def _stored(d: Daemon, t: Target, config: bool) -> dict[str, str]:
    """The VM's stored entries as text (the saved definition with ``config``)."""
    read = functools.partial(d.conn.metadata, config=True) if config else d.conn.metadata
    try:
        xml = await _worker(d, t).call("metadata", read, t.name, config_mod.METADATA_NS)
    except (LibvirtUnavailable, DomainError, CallTimeout) as e:
        raise Failed(f"VM {t.name}: cannot read the stored settings: {e}") from e
    try:
        return config_mod.metadata_entries(xml, t.name)
    except config_mod.ConfigError as e:
        raise Failed(str(e)) from e


def _layers(d: Daemon, name: str, metadata: Mapping[str, Any]
            ) -> list[tuple[str, str, Mapping[str, Any]]]:
    cfg = d.config
    path = cfg.path or config_mod.DEFAULT_PATH
    return [("built-in", "agent/settings.py", table.defaults()),
            ("host file", f"{path} [defaults]", cfg.defaults),
            ("host file", f"{path} [vm.{name}]", cfg.per_vm.get(name, {})),
            ("metadata", "the domain's metadata", metadata)]


async def get(d: Daemon, ident: str, key: Any = None) -> dict[str, Any]:
    """Each setting's effective value and the layer it comes from."""
    if key is not None and key not in table.BY_NAME:
        raise Failed(f"unknown setting {key!r} (aeratectl settings lists them)", "usage")
    t = await resolve(d, ident)
    error = ""
    transient = False
    try:
        saved = await _stored(d, t, config=True)  # the saved definition's entries
    except Failed:
        if t.id == -1:
            raise
        # A transient domain has no definition: its metadata is all there is, kept for as
        # long as the domain exists; "live" (lost at the next stop) would tell nothing.
        saved, transient = {}, True
    if t.runner is not None:
        r = t.runner
        metadata, error = dict(r.metadata), r.settings_error
        effective = r.effective_settings()
    else:
        try:
            metadata = config_mod.metadata_from_xml(
                config_mod.metadata_to_xml(saved) if saved else None, t.name)
        except config_mod.ConfigError as e:
            metadata, error = {}, str(e)
        effective = table.layered([*d.config.layers_for(t.name), metadata])
    layers = _layers(d, t.name, metadata)
    lvl = t.runner.pressure_level if t.runner is not None else \
        pressure.level(d.host_memory, effective)
    out: dict[str, Any] = {}
    for row in table.TABLE:
        if key is not None and row.name != key:
            continue
        source, detail, value = "built-in", "agent/settings.py", row.default
        for src, det, layer in layers:
            if row.name in layer:
                source, detail, value = src, det, layer[row.name]
        nxt: Any = None
        if row.name in saved and t.runner is not None and t.id != -1:
            with contextlib.suppress(table.SettingError):
                nxt = table.coerce(row.name, saved[row.name], "saved definition")
        if source == "metadata" and transient:
            detail = "the domain's metadata (a transient domain: no saved definition)"
        elif source == "metadata":
            detail = "the domain's metadata, saved in its definition"
            if t.runner is not None and t.id != -1 and nxt != value:
                source, detail = "live", ("the running domain's metadata only (set --live: "
                                          "lost when the VM stops)")
        entry: dict[str, Any] = {"value": effective[row.name], "source": source,
                                 "detail": detail, "scope": row.scope}
        if effective[row.name] != value:
            entry.update(source="host pressure", configured=value,
                         detail=f"host memory level {lvl} (host_low_mib, host_high_mib, "
                                f"host_psi_some); configured {value} from {source}")
        if nxt is not None and nxt != metadata.get(row.name):
            entry["next_start"] = nxt
        out[row.name] = entry
    return {"ok": True, "vm": t.name, "uuid": t.uuid, "running": t.id != -1,
            "settings": out, "settings_error": error, "host_pressure": lvl}


# -- set and reset

def _host_keys(keys: list[str], vm: str, path: str) -> None:
    host = sorted(k for k in keys if table.BY_NAME[k].scope == "host")
    if host:
        raise Failed(f"VM {vm}: {', '.join(host)} can only be set in the host config file "
                     f"([vm.{vm}] in {path}, then 'aeratectl reload'): the VM's metadata "
                     "travels with its XML and is not trusted for it")


def _where(t: Target, live: bool, config: bool) -> tuple[bool | None, bool | None, bool]:
    """(live, config) flags for libvirt (None, None: virsh's current), and whether the
    change reaches the running VM now."""
    if t.id == -1:
        if live:
            raise Failed(f"VM {t.name} is not running: --live needs a running domain; use "
                         "--config (or no flag) to change its saved definition")
        return None, True, False
    if not live and not config:
        return None, None, True
    return live or None, config or None, live


async def _write(d: Daemon, t: Target, entries: Mapping[str, str], live: bool | None,
                 config: bool | None) -> None:
    xml = config_mod.metadata_to_xml(dict(entries)) if entries else None
    write: Any = d.conn.set_metadata
    if live is not None or config is not None:
        write = functools.partial(write, live=live, config=config)
    try:
        await _worker(d, t).call("set_metadata", write, t.name, xml,
                                 config_mod.METADATA_KEY, config_mod.METADATA_NS)
    except (LibvirtUnavailable, DomainError, CallTimeout) as e:
        raise Failed(f"VM {t.name}: not saved, so not applied: {e}") from e


def reapply(r: VmRunner, before: Mapping[str, Any]) -> None:
    """The VM's effective settings changed (stored layer, host file, host pressure): the
    budgets and lease now, a new decision (mode may have changed), and the changed guest
    settings to the agent at once."""
    r.settings_changed()
    after = r.guest_settings()
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    if r.session is not None and changed:
        r.session.configure(changed)
        # The serve loop writes when the guest next speaks (an idle agent: its next stats);
        # write now, on the loop thread like the serve loop: the outbox holds only whole
        # messages the session made ready (acks, keepalives, this config).
        w = r.writer
        if w is not None and not w.is_closing():
            out = r.session.take_outbox()
            if out:
                w.write(out)


async def _apply(t: Target, now: bool) -> tuple[bool, str]:
    r = t.runner
    if r is None or not now:
        return False, ""
    before = r.guest_settings()
    await r.load_metadata()
    if r.settings_error:
        return False, r.settings_error
    reapply(r, before)
    return True, ""


async def set_(d: Daemon, ident: str, settings: Any, live: bool,
               config: bool) -> dict[str, Any]:
    """Store settings in the VM's metadata (merged into what is stored) and apply them."""
    if not isinstance(settings, dict) or not settings:
        raise Failed("set needs KEY=VALUE pairs", "usage")
    t = await resolve(d, ident)
    values = table.validate(settings, origin=f"aeratectl set {t.name}")
    _host_keys(list(values), t.name, d.config.path or config_mod.DEFAULT_PATH)
    lv, cf, now = _where(t, live, config)
    # S6: merge into what is stored now, bad entries included, so nothing the operator
    # stored is lost; the result is validated as a whole when the daemon reads it.
    try:
        stored = await _stored(d, t, config=bool(cf) and not lv)
    except Failed:
        stored = {}  # not XML at all: nothing in it can be kept entry by entry
    text = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}
    await _write(d, t, dict(stored, **text), lv, cf)
    applied, error = await _apply(t, now)
    if error:
        raise Failed(f"saved, but the stored settings are still invalid, so the VM stays "
                     f"refused: {error}")
    return _changed(d, t, applied, sorted(values))


def _changed(d: Daemon, t: Target, applied: bool, keys: list[str]) -> dict[str, Any]:
    effective = t.runner.effective_settings() if t.runner is not None else \
        table.layered(d.config.layers_for(t.name))
    if applied:
        note = "applied now"
    elif t.runner is None and t.id != -1:
        note = "stored; aerated does not serve this VM, so nothing applies now"
    else:
        note = "saved in the domain's definition: applies at its next start"
    return {"ok": True, "vm": t.name, "keys": keys, "applied": applied, "note": note,
            "settings": effective if applied else {k: effective[k] for k in keys}}


async def reset(d: Daemon, ident: str, keys: Any, live: bool,
                config: bool) -> dict[str, Any]:
    """Remove settings (all of aerate's when no key is named) from the VM's metadata: the
    layer below counts again."""
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise Failed("reset takes setting names", "usage")
    t = await resolve(d, ident)
    lv, cf, now = _where(t, live, config)
    try:
        stored = await _stored(d, t, config=bool(cf) and not lv)
    except Failed:
        if keys:
            raise
        stored = {}  # reset of everything: an unreadable layer goes as a whole
    # A stored entry that makes the layer invalid (an unknown or host-scope key) can be
    # removed by its name: that is how the layer is repaired (S6 refuses the VM till then).
    unknown = [k for k in keys if k not in table.BY_NAME and k not in stored]
    if unknown:
        raise Failed(f"unknown setting {unknown[0]!r}, and none stored by that name "
                     "(aeratectl settings lists them)", "usage")
    _host_keys([k for k in keys if k not in stored], t.name,
               d.config.path or config_mod.DEFAULT_PATH)
    kept = {k: v for k, v in stored.items() if keys and k not in keys}
    await _write(d, t, kept, lv, cf)
    applied, error = await _apply(t, now)
    if error:
        raise Failed(f"removed, but the stored settings are still invalid, so the VM stays "
                     f"refused: {error}")
    out = _changed(d, t, applied, sorted(keys or stored))
    out["removed"] = sorted(k for k in stored if k not in kept)
    return out


# -- reload

async def reload(d: Daemon) -> dict[str, Any]:
    """Re-read the host file; a file that does not load leaves the old one in force (and
    is logged at err, with the config event's MESSAGE_ID, whoever asked: aeratectl reload
    or systemctl reload)."""
    try:
        config = config_mod.load(d.config_path)
    except config_mod.ConfigError as e:
        why = f"{e}; the old configuration stays in force"
        log.error("reload refused: %s", why, extra=journal.event("config"))
        raise Failed(why) from e
    log.info("reload: %s", config.summary(), extra=journal.event("config"))
    before = {name: r.guest_settings() for name, r in d.runners.items()}
    d.config = config
    for name, r in list(d.runners.items()):
        with contextlib.suppress(LibvirtUnavailable, DomainError, CallTimeout):
            await r.load_metadata()  # a layer fixed with virsh metadata counts again
        reapply(r, before.get(name, {}))
    return {"ok": True, "config": d.config.path}


# -- host pressure

async def watch_pressure(d: Daemon, period: float = 1.0) -> None:
    """Sample the host's memory every ``period`` s (a /proc/meminfo read: no libvirt, no
    QEMU) and re-apply a VM's settings when its pressure level changes (firmer at once,
    relaxed after pressure.RELAX_AFTER_S)."""
    acting: dict[str, tuple[str, float | None]] = {}  # VM -> (level acted on, relax seen)
    while True:
        sample = pressure.sample()
        now = time.monotonic()
        for r in list(d.runners.values()):
            values = r.configured_settings()
            old, since = acting.get(r.name, (pressure.PLENTY, None))
            lvl, since = pressure.settle(old, pressure.level(sample, values), since, now)
            acting[r.name] = (lvl, since)
            r.pressure_level = lvl
            if lvl != old:
                # effective_settings reads the level from the runner: what the guest had
                before = table.guest_view(pressure.adjust(dict(values), old))
                reapply(r, before)
        for name in set(acting) - set(d.runners):
            del acting[name]
        d.host_memory = sample
        await asyncio.sleep(period)


# -- explain

def _fact(out: list[dict[str, Any]], name: str, ok: bool, text: str) -> None:
    out.append({"fact": name, "ok": ok, "text": text})


def fact_sentences(f: VmFacts) -> list[dict[str, Any]]:
    """Every refusal fact decide() weighs, each as a sentence and whether it allows
    reclaim (host/refusal.py ``decide`` is the judge; this says what it looked at)."""
    out: list[dict[str, Any]] = []
    dom = f.domain
    _fact(out, "mode", f.mode != "off", f"mode is {f.mode}")
    _fact(out, "settings", not f.settings_error,
          f"stored settings: {f.settings_error}" if f.settings_error
          else "the stored settings are valid")
    _fact(out, "pinning_devices", not dom.pinning_devices,
          f"devices that pin guest RAM: {', '.join(dom.pinning_devices)}"
          if dom.pinning_devices else "no device in the domain XML pins guest RAM")
    _fact(out, "pinning_fd", not f.pinning_fd,
          f"QEMU held {f.pinning_fd}" if f.pinning_fd
          else "QEMU holds no VFIO/iommufd/vhost-vdpa fd")
    trusted = " (trusted in the host file)" if f.vhost_user_trusted else ""
    _fact(out, "vhost_user", not dom.vhost_user_devices or f.vhost_user_trusted,
          f"vhost-user backends: {', '.join(dom.vhost_user_devices)}{trusted}"
          if dom.vhost_user_devices else "no vhost-user backend maps guest RAM")
    _fact(out, "launch_security", not dom.launch_security,
          f"confidential guest ({dom.launch_security})" if dom.launch_security
          else "not a confidential guest")
    job = f.job
    _fact(out, "job", job is not None and (not job.active or job.operation == "backup")
          and job.paused_reason in ("", "user", "unknown", "ioerror", "watchdog", "crashed",
                                    "starting-up", "shutting-down", "api-error"),
          "libvirt's job state is unknown" if job is None else
          f"libvirt job: {job.operation}" + (f", paused ({job.paused_reason})"
                                             if job.paused_reason else ""))
    _fact(out, "qemu_migration", f.qemu_migration in ("none", "completed", "failed",
                                                       "cancelled"),
          f"QEMU's migration state: {f.qemu_migration or 'unknown'}")
    _fact(out, "memory_map", not f.map_error, f.map_error or "the memory map is current")
    kinds = sorted({f"{b.block_name}: {b.kind.value}" for b in (f.backings or {}).values()})
    _fact(out, "backing", bool(f.backings),
          f"RAM backing: {'; '.join(kinds)}" if kinds else "the RAM backing is not proven")
    _fact(out, "reservations", not f.reservations,
          f"reserved huge pages: {', '.join(f.reservations)}" if f.reservations
          else "no hugetlb reservation a punch would drop")
    told = {True: "safe", False: "unsafe", None: "not told"}[f.poison.safe]
    _fact(out, "poison", f.poison.safe is True,
          f"page poisoning: {told} ({f.poison.detail})")
    _fact(out, "memballoon", dom.memballoon == "virtio" and not dom.locked,
          f"balloon: {dom.memballoon or 'none'}" + (", RAM locked" if dom.locked else ""))
    # What chooses between punch and balloon: shared memfd/file RAM can be punched; private
    # RAM (libvirt's default) only the balloon can return, so mode=punch refuses it.
    shared = dom.memory_access == "shared" and dom.memory_source in ("memfd", "file")
    _fact(out, "memory", shared or f.mode != "punch",
          f"guest RAM (domain XML): source {dom.memory_source}, access {dom.memory_access}"
          + (", huge pages" if dom.hugepages else "")
          + ("; punching can free it" if shared else
             "; private, so only the balloon can return it"))
    _fact(out, "balloon_available", f.balloon_available or shared,
          "the balloon reclaimer is available" if f.balloon_available else
          "the balloon reclaimer is not available"
          + ("; not needed: the RAM can be punched" if shared else ""))
    # Not against reclaim: it says who reclaims (decide() gives KERNEL instead of
    # punch/balloon when it is on).
    _fact(out, "kernel_reporting", True,
          "the guest kernel reports its own free pages (virtio-balloon free-page-reporting "
          "negotiated): it reclaims and aerate watches; override_kernel_reporting=true "
          "hands it to aerate" if f.kernel_reporting else
          "the guest kernel does not report its own free pages (or "
          "override_kernel_reporting=true): aerate's reclaimer serves")
    return out


async def explain(d: Daemon, ident: str) -> dict[str, Any]:
    """Why the VM is, or is not, reclaiming now, in sentences, with every fact."""
    t = await resolve(d, ident)
    r = t.runner
    if r is None:
        v = _unserved(d, t.name, t.uuid, t.id >= 0)
        return {"ok": True, "vm": t.name, "uuid": t.uuid, "reclaiming": False,
                "reclaimer": "unmanaged", "category": v["category"], "facts": [],
                "sentences": [f"{t.name} is not reclaimed: {v['reason']}."]}
    view = vm_view(d, r)
    values = r.effective_settings()
    says: list[str] = []
    reclaimer = view["reclaimer"]
    reclaiming = reclaimer in (PUNCH, BALLOON, KERNEL)
    says.append(f"{r.name} ({view['uuid'] or 'uuid unknown'}): aerated's runner is "
                f"{r.state.value}.")
    if reclaimer == "unmanaged":
        says.append(f"It is not reclaimed: {view['reason']}.")
    elif reclaimer == KERNEL:
        says.append(f"The guest kernel reclaims it: {view['reason']}.")
    elif reclaiming:
        says.append(f"It is reclaiming with {reclaimer}: {view['reason']}.")
    else:
        says.append(f"It is not reclaiming now ({view['category']}): {view['reason']}.")
    facts: list[dict[str, Any]] = []
    if reclaimer != "unmanaged" and r.xml:
        try:
            got = await r.worker.call("explain", r._fetch, True, False, False)
            hello = r.session.hello if r.session is not None else None
            f = r.facts(got.xml or r.xml, got, r.backings, r.gmap, values, hello)
            facts = fact_sentences(f)
            now = decide(f)
            says.append("Weighed afresh, the facts give: "
                        f"{now.action} ({now.reason}).")
        except (LibvirtUnavailable, DomainError, CallTimeout, ValueError, ET.ParseError) as e:
            says.append(f"The facts could not be read afresh: {e}.")
        bad = [x["text"] for x in facts if not x["ok"]]
        if facts:
            says.append("Facts against reclaim: " + ("; ".join(bad) if bad else "none") + ".")
    s = view
    if r.session is not None:
        lease = s.get("lease") or {}
        says.append(f"Leases of {lease.get('lease_s')} s: {lease.get('refused_batches', 0)} "
                    f"batches refused as stale, {lease.get('refused_at_start', 0)} refused "
                    f"at their first slice, {lease.get('cut_short', 0)} discards cut "
                    f"short, {lease.get('overruns', 0)} overruns.")
        if s.get("content_refused_batches"):
            says.append(f"{s['content_refused_batches']} discards stopped at a reported page "
                        "that did not read as zeroes (the guest had it back: a reset or a "
                        "moved page raced the report); nothing of it was discarded.")
        caps = s.get("capabilities") or {}
        if caps:
            says.append("Guest capabilities: " + "; ".join(
                f"{n} {'yes' if c['available'] else 'no'}"
                + (f" ({c['detail']})" if c.get("detail") else "")
                for n, c in sorted(caps.items())) + ".")
        else:
            says.append("The guest agent has told no capabilities (no hello yet).")
        if s.get("arena_weakness"):
            says.append(f"The guest's {s.get('arena') or '?'} arena has a weakness: "
                        f"{s['arena_weakness']}.")
    budget = s.get("budget") or {}
    says.append(f"Discard budget: {int(budget.get('batch_bytes', 0)) >> 20} MiB a batch, "
                f"{int(budget.get('rate_bytes_s', 0)) >> 20} MiB/s; "
                f"{budget.get('bites', 0)} batches cut"
                + (f" (last: {budget.get('reason')})" if budget.get("reason") else "") + ".")
    got_back = s.get("reclaim")
    if isinstance(got_back, dict) and s.get("discarded_bytes"):
        says.append(f"Of {int(s['discarded_bytes']) >> 20} MiB discarded, the backing fell "
                    f"{int(got_back['verified_bytes']) >> 20} MiB (verified); "
                    f"{int(got_back['unverified_bytes']) >> 20} MiB it did not show (ranges "
                    "already holes, re-faulted, or hidden by the guest's faults meanwhile: "
                    "host/verify.py).")
    bal = s.get("balloon")
    if isinstance(bal, dict) and bal.get("max_bytes"):
        says.append(f"Balloon: target {bal['target_bytes'] >> 20} MiB, actual "
                    f"{bal['actual_bytes'] >> 20} MiB, floor {bal['floor_bytes'] >> 20} MiB "
                    f"of {bal['max_bytes'] >> 20} MiB; it holds back "
                    f"{bal['held_back_bytes'] >> 20} MiB"
                    + (f" ({bal['reason']})" if bal.get("reason") else "") + ".")
    host = pressure.describe(d.host_memory, r.configured_settings(), r.pressure_level)
    says.append(host[:1].upper() + host[1:] + ".")
    errors = [e for e in (s.get("last_error"), s.get("last_refusal"), r.settings_error,
                          r.map_error, r._balloon_error,
                          (s.get("libvirt_calls") or {}).get("last_timeout")) if e]
    says.append("Last errors: " + ("; ".join(str(e) for e in errors) if errors
                                   else "none") + ".")
    if s.get("idle_note"):
        says.append(f"{s['idle_note']}.")
    says.append(f"{TAINT_NOTE}.")
    age = r.cache.issued_at
    return {"ok": True, "vm": r.name, "uuid": view["uuid"], "reclaiming": reclaiming,
            "reclaimer": reclaimer, "category": view["category"], "reason": view["reason"],
            "facts": facts, "sentences": says, "host_pressure": r.pressure_level,
            **({"effective": view["effective"]} if "effective" in view else {}),
            "permit_age_s": round(time.monotonic() - age, 3) if math.isfinite(age) else None}
