"""Where operator settings live (S6): the host config file and per-VM libvirt metadata.

Host file (TOML, default /etc/aerate/aerated.toml)::

    [defaults]          # every VM
    hwm = 16
    [vm.web01]          # one VM, below its metadata (aeratectl set)
    reserve_mib = 512

Per-VM settings persist in the domain's ``<metadata>`` under aerate's own namespace, so
they travel with the domain (migration, backup of its XML) and survive daemon restarts::

    <aerate:settings xmlns:aerate="urn:x-aerate:settings:1">
      <setting name="hwm">16</setting>
    </aerate:settings>

A file that fails to parse or validate is refused as a whole with the file, line, key,
reason and the values the key allows (``path:line: [section] key=value ...; allowed: ...``);
the daemon keeps running on the settings it had (a new policy that fails to load leaves the
old one running). ``aerated --check-config`` runs the same validation offline.
"""

from __future__ import annotations

import importlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aerate.agent import settings as table

DEFAULT_PATH = "/etc/aerate/aerated.toml"
#: Where aerated keeps its lock and control socket (aeratectl looks there too).
RUN_DIR = "/run/aerate"
METADATA_NS = "urn:x-aerate:settings:1"
METADATA_KEY = "aerate"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file, key and fix."""


TomlParser = tuple[Callable[[str], dict[str, Any]], type[Exception]]


def toml_parser() -> TomlParser:
    """The TOML parser's ``loads`` and its error: the standard library's tomllib (Python >=
    3.11), else tomli (its origin, same API), else toml (python3-toml, the one Debian 11
    packages: TOML 0.5, enough for this file), else a ConfigError saying what to install.
    Looked up when a file is parsed, so the rest of the daemon imports on Python >= 3.9."""
    for name, error in (("tomllib", "TOMLDecodeError"), ("tomli", "TOMLDecodeError"),
                        ("toml", "TomlDecodeError")):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        loads: Callable[[str], dict[str, Any]] = module.loads
        exc: type[Exception] = getattr(module, error)
        return loads, exc
    raise ConfigError(
        "reading the host config file needs a TOML parser: Python >= 3.11 has tomllib; on "
        "older Pythons install tomli (Debian 12: apt install python3-tomli; Debian 11: "
        "apt install python3-toml)")


@dataclass
class HostConfig:
    """Validated host settings: defaults for all VMs and per-VM overrides."""

    defaults: dict[str, Any] = field(default_factory=dict)
    per_vm: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: str = ""

    def layers_for(self, vm: str) -> list[dict[str, Any]]:
        """The host file's layers for ``vm``: defaults, then its [vm.NAME] section."""
        return [self.defaults, self.per_vm.get(vm, {})]

    def summary(self) -> str:
        """One line: what the file sets (for --check-config and the reload's log line)."""
        vms = ", ".join(f"{name} ({len(v)})" for name, v in sorted(self.per_vm.items()))
        return (f"{len(self.defaults)} setting(s) in [defaults], "
                f"{len(self.per_vm)} [vm.NAME] section(s){': ' + vms if vms else ''}")


def allowed(row: table.Setting) -> str:
    """The values a setting accepts, in words, from its row of the settings table."""
    if row.choices:
        return "one of " + ", ".join(row.choices)
    if row.type is bool:
        return "true or false"
    kind = {int: "an integer", float: "a number"}.get(row.type, f"a {row.type.__name__}")
    if row.lo is not None and row.hi is not None:
        lo, hi = (row.lo, row.hi) if row.type is float else (int(row.lo), int(row.hi))
        return f"{kind} from {lo} to {hi}"
    return kind


_HEADER = re.compile(r"\s*\[([^\[\]]+)\]\s*(#.*)?$")
_PART = re.compile(r"\s*(?:\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_-]+))\s*(?:\.|$)")


def _table_name(header: str) -> tuple[str, ...]:
    """``vm."web 01"`` -> ("vm", "web 01"); () when the header is not plain dotted keys."""
    parts, pos = [], 0
    while pos < len(header):
        m = _PART.match(header, pos)
        if m is None or m.end() == pos:
            return ()
        parts.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return tuple(parts)


def line_of(text: str, section: tuple[str, ...], key: str) -> int | None:
    """The line (from 1) where ``key`` is set in table ``section``, else that table's
    header line, else None: for the file:line of an error."""
    current: tuple[str, ...] = ()
    header = None
    key_re = re.compile(r"\s*(?:%s|\"%s\"|'%s')\s*=" % ((re.escape(key),) * 3))
    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            current = _table_name(m.group(1))
            if current == section and header is None:
                header = n
        elif current == section and key_re.match(line):
            return n
    return header


def _validate(values: dict[str, Any], text: str, path: str,
              section: tuple[str, ...]) -> dict[str, Any]:
    """One table of the file, key by key, so the error names the key's line and the
    values it allows."""
    label = "[" + ".".join(section) + "]"
    out = {}
    for key, value in values.items():
        line = line_of(text, section, key)
        where = f"{path}:{line}: {label}" if line else f"{path}: {label}"
        try:
            out[key] = table.coerce(key, value, origin=where, typed=True)
        except table.SettingError as e:
            row = table.BY_NAME.get(key)
            # A choice's error lists the choices already; an unknown key's, the known keys.
            hint = f"; allowed: {allowed(row)}" if row and not row.choices else ""
            raise ConfigError(f"{e}{hint}") from e
    return out


def parse(text: str, path: str = DEFAULT_PATH) -> HostConfig:
    """Parse and validate the host config file's text."""
    loads, error = toml_parser()
    try:
        doc = loads(text)
    except error as e:
        # tomllib and tomli say "(at line N, column M)"; python3-toml has .lineno.
        line = getattr(e, "lineno", None) or next(
            iter(re.findall(r"line (\d+)", str(e))), None)
        raise ConfigError(f"{path}:{line}: not valid TOML: {e}" if line
                          else f"{path}: not valid TOML: {e}") from e
    unknown = set(doc) - {"defaults", "vm"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; "
                          "expected [defaults] and [vm.NAME]")
    cfg = HostConfig(path=path)
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: [defaults] must be a table")
    cfg.defaults = _validate(defaults, text, path, ("defaults",))
    vms = doc.get("vm", {})
    if not isinstance(vms, dict):
        raise ConfigError(f"{path}: 'vm' must hold tables like [vm.NAME]")
    for name, values in vms.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [vm.{name}] must be a table")
        cfg.per_vm[name] = _validate(values, text, path, ("vm", name))
    return cfg


def load(path: str = DEFAULT_PATH, missing_ok: bool = True) -> HostConfig:
    """Read the host config file; a missing file means built-in defaults (an error when
    not ``missing_ok``: --check-config of a file that is not there)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        if not missing_ok:
            raise ConfigError(f"{path}: no such file (aerated would run on the built-in "
                              "defaults)") from e
        return HostConfig(path=path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    return parse(text, path)


def metadata_to_xml(values: dict[str, Any]) -> str:
    """Per-VM settings as the metadata element stored in the domain XML."""
    root = ET.Element("settings")
    for name in sorted(values):
        el = ET.SubElement(root, "setting", name=name)
        v = values[name]
        el.text = str(v).lower() if isinstance(v, bool) else str(v)
    return ET.tostring(root, encoding="unicode")


def _fix_hint(vm: str) -> str:
    return (f"fix it with 'aeratectl set {vm} KEY=VALUE' (a valid value replaces it), remove "
            f"it with 'aeratectl reset {vm} KEY' or edit it with 'virsh metadata {vm} "
            f"{METADATA_NS} --key {METADATA_KEY} --edit'; until then aerate refuses to "
            "discard this VM's memory")


def metadata_entries(xml: str | None, vm: str) -> dict[str, str]:
    """The stored settings as text, unvalidated (name -> text), so that an update can keep
    every stored entry, a bad one included, instead of rebuilding the layer from nothing."""
    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ConfigError(f"VM {vm}: aerate metadata is not XML ({e}); {_fix_hint(vm)}") from e
    return {el.get("name", ""): el.text or "" for el in root.iter()
            if el.tag.rsplit("}", 1)[-1] == "setting"}


def metadata_from_xml(xml: str | None, vm: str) -> dict[str, Any]:
    """Parse (and validate) a VM's stored settings; None or empty means none.

    S6 fails closed: any bad entry (not XML, unknown key, bad value, a host-scope key) makes
    the whole layer unusable with a ConfigError naming the VM, key, value and the fix; the
    caller refuses the VM rather than dropping the layer (which could drop mode=off).
    Host-scope keys are the daemon's trusted ones (vhost_user_trusted, ...): they come only
    from the host file, as the metadata travels with the domain's XML to wherever it runs.
    """
    out: dict[str, Any] = {}
    for name, text in metadata_entries(xml, vm).items():
        row = table.BY_NAME.get(name)
        if row is not None and row.scope == "host":
            raise ConfigError(
                f"VM {vm} metadata: {name}={text!r} is a host-scope setting, read only from "
                f"the host config file ([vm.{vm}] in {DEFAULT_PATH}), never from the domain's "
                f"metadata, which travels with its XML; remove it with 'aeratectl reset {vm} "
                f"{name}'; until then aerate refuses to discard this VM's memory")
        try:
            out[name] = table.coerce(name, text, origin=f"VM {vm} metadata")
        except table.SettingError as e:
            raise ConfigError(f"{e}; {_fix_hint(vm)}") from e
    return out
