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

import tomllib
import xml.etree.ElementTree as ET
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
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
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


def metadata_from_xml(xml: str | None, vm: str) -> dict[str, Any]:
    """Parse (and validate) a VM's stored settings; None or empty means none."""
    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ConfigError(f"VM {vm}: aerate metadata is not XML ({e}); "
                          "fix it with 'virsh metadata' or 'aeratectl reset'") from e
    out: dict[str, Any] = {}
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] != "setting":
            continue
        name = el.get("name", "")
        try:
            out[name] = table.coerce(name, el.text or "", origin=f"VM {vm} metadata")
        except table.SettingError as e:
            raise ConfigError(str(e)) from e
    return out
