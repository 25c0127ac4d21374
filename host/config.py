"""Where operator settings live (S6): the host config file and per-VM libvirt metadata.

Host file (TOML, default /etc/aerate/aerated.toml)::

    [defaults]          # every VM
    hwm = 16
    [vm.web01]          # one VM, below its metadata and live settings
    reserve_mib = 512

Per-VM settings persist in the domain's ``<metadata>`` under aerate's own namespace, so
they travel with the domain (migration, backup of its XML) and survive daemon restarts::

    <aerate:settings xmlns:aerate="urn:x-aerate:settings:1">
      <setting name="hwm">16</setting>
    </aerate:settings>

A file that fails to parse or validate is refused as a whole with the file, key and
reason; the daemon keeps running on the settings it had (a new policy that fails to load
leaves the old one running).
"""

from __future__ import annotations

import importlib
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


def parse(text: str, path: str = DEFAULT_PATH) -> HostConfig:
    """Parse and validate the host config file's text."""
    loads, error = toml_parser()
    try:
        doc = loads(text)
    except error as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    unknown = set(doc) - {"defaults", "vm"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; "
                          "expected [defaults] and [vm.NAME]")
    cfg = HostConfig(path=path)
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: [defaults] must be a table")
    try:
        cfg.defaults = table.validate(defaults, origin=f"{path} [defaults]")
        vms = doc.get("vm", {})
        if not isinstance(vms, dict):
            raise ConfigError(f"{path}: 'vm' must hold tables like [vm.NAME]")
        for name, values in vms.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: [vm.{name}] must be a table")
            cfg.per_vm[name] = table.validate(values, origin=f"{path} [vm.{name}]")
    except table.SettingError as e:
        raise ConfigError(str(e)) from e
    return cfg


def load(path: str = DEFAULT_PATH) -> HostConfig:
    """Read the host config file; a missing file means built-in defaults."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
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
