"""The one table of aerate's tunables, and the code that validates and layers them.

Every setting is declared once here; the agent applies the guest-scoped ones, the daemon
reads them from its config file and per-VM libvirt metadata, and ``aeratectl`` builds its
``set`` keys and help from the same rows. Layers, later wins: built-in defaults < host
config < per-VM metadata < live set (DESIGN.md, "Live tunables").

Lives on the guest side (Python 3.8, standard library only) because the agent validates
what the host sends it with the same rules.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple


class Setting(NamedTuple):
    """One tunable: its type, default, bounds, who applies it, and what it means."""

    name: str
    type: type
    default: Any
    lo: Optional[float] = None
    hi: Optional[float] = None
    choices: Tuple[str, ...] = ()
    # "guest": sent to the agent; "vm": the daemon's own, per VM (host file or the VM's
    # metadata, aeratectl set); "host": the daemon's own and trusted, so only from the host
    # config file, never from the domain's metadata, which travels with its XML.
    scope: str = "guest"
    help: str = ""


TABLE: Tuple[Setting, ...] = (
    Setting("enabled", bool, True, scope="guest",
            help="report free memory at all; off keeps the agent to stats only"),
    Setting("override_kernel_reporting", bool, False, scope="guest",
            help="aerate even where the guest kernel's own free page reporting is active"),
    Setting("kernel_reporting_order", int, -1, -1, 10, scope="guest",
            help="where the guest kernel reports its own free pages: the smallest buddy "
                 "order it reports (page_reporting_order, Linux >= 5.14; 9 = 2 MiB); -1 "
                 "keeps the kernel's own"),
    Setting("allow_weak_arena", bool, False, scope="guest",
            help="report from the THP fallback arena too, whose held pages can move or die "
                 "with the agent (S2/S3 do not hold there)"),
    Setting("mode", str, "auto", choices=("auto", "punch", "balloon", "off"), scope="vm",
            help="reclaimer: auto picks punch for shared backing, balloon for private RAM"),
    Setting("min_order", int, 9, 9, 18, scope="guest",
            help="smallest free block (buddy order) worth reporting; 9 = 2 MiB"),
    Setting("hwm", int, 32, 1, 1 << 20, scope="guest",
            help="report once this many raw free blocks of >= min_order are waiting"),
    Setting("capacity", int, 32, 1, 1024, scope="guest",
            help="most blocks isolated and reported in one batch"),
    Setting("delay_ms", int, 100, 0, 60_000, scope="guest",
            help="pause between batches while work remains"),
    Setting("idle_poll_ms", int, 1000, 50, 600_000, scope="guest",
            help="how often an idle agent looks at /proc/buddyinfo"),
    Setting("reserve_mib", int, 256, 0, 1 << 22, scope="guest",
            help="free memory the agent never isolates, on top of the zone high watermarks"),
    Setting("max_rate_mib_s", int, 0, 0, 1 << 22, scope="guest",
            help="cap on reported MiB per second (0 = no cap)"),
    Setting("psi_threshold", float, 10.0, 0.0, 100.0, scope="guest",
            help="back off when memory PSI 'some' avg10 (%%) exceeds this"),
    Setting("stats_interval_s", int, 5, 1, 3600, scope="guest",
            help="how often the agent sends its statistics"),
    Setting("free_first", bool, False, scope="guest",
            help="free first: reclaim the guest's cold page cache (cgroup v2 memory.reclaim, "
                 "Linux >= 5.19) so it can be reported, within the free_first_* bounds; "
                 "compacts when free memory is fragmented"),
    Setting("free_first_mib_s", int, 16, 1, 1 << 16, scope="guest",
            help="free first: most MiB per second it asks the guest kernel to reclaim"),
    Setting("free_first_psi_ceiling", float, 0.2, 0.01, 10.0, scope="guest",
            help="free first: stop at once when memory PSI 'some' avg10 (%%) exceeds this"),
    Setting("free_first_cache_floor_mib", int, 256, 0, 1 << 22, scope="guest",
            help="free first: never reclaim the guest's file page cache below this"),
    Setting("free_first_anon", bool, False, scope="guest",
            help="free first: let reclaim swap anonymous memory out too (where the guest "
                 "has swap or zswap); off, only page cache goes"),
    Setting("free_first_drop_caches", bool, False, scope="guest",
            help="free first without memory.reclaim: drop all clean page cache at most every "
                 "10 min instead (ignores the cache floor)"),
    Setting("floor", float, 0.5, 0.05, 1.0, scope="vm",
            help="balloon: never shrink the guest below this fraction of its memory"),
    Setting("host_low_mib", int, 0, 0, 1 << 30, scope="host",
            help="host MemAvailable below which reclaim works harder (0 = ignore)"),
    Setting("host_high_mib", int, 0, 0, 1 << 30, scope="host",
            help="host MemAvailable above which reclaim may relax (0 = ignore)"),
    Setting("host_psi_some", float, 10.0, 0.0, 100.0, scope="host",
            help="host memory PSI 'some' avg10 (%%) above which host pressure goes one level "
                 "firmer (0 = ignore; only where host_low_mib or host_high_mib is set)"),
    Setting("lease_s", float, 2.0, 0.5, 60.0, scope="host",
            help="lease on reports: the host starts no discard later than half of this "
                 "after sending the token a report carries; a guest returns un-acked pages "
                 "only this long after receiving it (keepalives every quarter of it)"),
    Setting("discard_batch_mib", int, 2048, 2, 1 << 30, scope="host",
            help="most MiB the host discards for one report batch; the rest is refused "
                 "(the default fits the largest honest batch: capacity 1024 x 2 MiB)"),
    Setting("discard_rate_mib_s", int, 4096, 0, 1 << 30, scope="host",
            help="most MiB/s the host discards for one VM, bursts of 2 s (0 = no cap)"),
    Setting("input_kib_s", int, 1024, 64, 1 << 20, scope="host",
            help="most KiB/s read from a VM's channel (bursts of 4 s); a flood beyond it "
                 "ends the session"),
    Setting("vhost_user_trusted", bool, False, scope="host",
            help="this VM's vhost-user backends never pin guest RAM for DMA (virtiofsd, a "
                 "DPDK without VFIO): punch it anyway; host config file only"),
)

SCOPES = ("guest", "vm", "host")

BY_NAME: Dict[str, Setting] = {s.name: s for s in TABLE}


class SettingError(ValueError):
    """A setting's name or value is not acceptable; the message says which and why."""


def _check_bounds(s: Setting, v: Any, origin: str) -> Any:
    if s.choices and v not in s.choices:
        raise SettingError("%s: %s=%r is not one of %s" % (origin, s.name, v,
                                                           ", ".join(s.choices)))
    if (s.lo is not None and v < s.lo) or (s.hi is not None and v > s.hi):
        raise SettingError("%s: %s=%r is outside [%s, %s]" % (origin, s.name, v, s.lo, s.hi))
    return v


def coerce(name: str, value: Any, origin: str = "setting", typed: bool = False) -> Any:
    """Validate ``value`` for setting ``name`` (a typed value or its text form).

    ``origin`` names where the value came from (a file and key, a VM, the command line) so
    the error tells the operator what to fix. ``typed``: the source has types of its own
    (a TOML file), so a string is taken only for a string setting: ``hwm = "16"`` is a
    mistake to point out (it may be a quoted value meant for another key), not a number.
    """
    s = BY_NAME.get(name)
    if s is None:
        raise SettingError("%s: unknown setting %r (known: %s)"
                           % (origin, name, ", ".join(sorted(BY_NAME))))
    if typed and isinstance(value, str) and s.type is not str:
        raise SettingError("%s: %s=%r is a string; write it without quotes"
                           % (origin, name, value))
    if isinstance(value, str) and s.type is not str:
        text = value.strip().lower()
        try:
            if s.type is bool:
                if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(text)
                value = text in ("1", "true", "yes", "on")
            else:
                value = s.type(text)
        except ValueError:
            raise SettingError("%s: %s=%r is not a valid %s"
                               % (origin, name, value, s.type.__name__)) from None
    if s.type is bool:
        if not isinstance(value, bool):
            raise SettingError("%s: %s=%r must be true or false" % (origin, name, value))
    elif s.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError("%s: %s=%r must be a number" % (origin, name, value))
        value = float(value)
    elif s.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError("%s: %s=%r must be an integer" % (origin, name, value))
    elif not isinstance(value, s.type):
        raise SettingError("%s: %s=%r must be a %s" % (origin, name, value, s.type.__name__))
    return _check_bounds(s, value, origin)


def validate(values: Mapping[str, Any], origin: str = "settings") -> Dict[str, Any]:
    """Validate a whole mapping; the first bad entry raises SettingError."""
    return {k: coerce(k, v, origin) for k, v in values.items()}


def defaults() -> Dict[str, Any]:
    """The built-in value of every setting."""
    return {s.name: s.default for s in TABLE}


def layered(layers: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    """Defaults overlaid by each (already validated) layer in order; later layers win."""
    out = defaults()
    for layer in layers:
        out.update(layer)
    return out


def guest_view(values: Mapping[str, Any]) -> Dict[str, Any]:
    """Only the settings the agent applies (scope ``guest``)."""
    return {k: v for k, v in values.items() if BY_NAME[k].scope == "guest"}


def parse_assignments(items: Iterable[str], origin: str = "command line") -> Dict[str, Any]:
    """Parse ``key=value`` words (``aeratectl set VM hwm=16 delay_ms=50``)."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise SettingError("%s: %r is not key=value" % (origin, item))
        out[key.strip()] = coerce(key.strip(), val, origin)
    return out


def describe() -> List[Tuple[str, str, str, str]]:
    """Rows (name, type, default, help with bounds) for help text and docs."""
    rows = []
    for s in TABLE:
        bounds = ""
        if s.choices:
            bounds = " (%s)" % "|".join(s.choices)
        elif s.lo is not None:
            bounds = " [%s..%s]" % (s.lo if s.type is float else int(s.lo),
                                    s.hi if s.type is float else int(s.hi or 0))
        rows.append((s.name, s.type.__name__, str(s.default).lower()
                     if s.type is bool else str(s.default), "%s: %s%s" % (s.scope, s.help,
                                                                             bounds)))
    return rows
