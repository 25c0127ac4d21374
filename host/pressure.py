"""Host memory pressure: the host's MemAvailable against ``host_low_mib``/``host_high_mib``
and its memory PSI against ``host_psi_some``, and what that level does to each VM's reclaim.

Levels (from the VM's own layered settings, so ``[vm.NAME]`` may set its own thresholds):

- ``plenty``: MemAvailable at or above ``host_high_mib`` (or both thresholds 0, the
  default): the VM's settings as they are (gentle; reclaim backs off to them);
- ``firmer``: below ``host_high_mib``: the agent reports sooner (``hwm`` halved) and keeps
  less back (``reserve_mib`` halved); the balloon steps twice as far;
- ``firm``: below ``host_low_mib``: ``hwm`` and ``reserve_mib`` a quarter, balloon steps
  four times as far, half the cool-down after a deflate.

Memory PSI (``/proc/pressure/memory``, ``some avg10``: the share of the last 10 s some task
waited for memory) above ``host_psi_some`` raises the MemAvailable level one step (plenty
-> firmer, firmer -> firm): the host is short although MemAvailable looks fine (reclaim
and refaults already under way). Only where ``host_low_mib`` or ``host_high_mib`` is set
(both 0: host pressure is not used); no PSI (an old kernel, psi=0) raises nothing.

A level firms up at once and relaxes after ``RELAX_AFTER_S`` at the lower pressure
(``settle``). Every firmer value stays within the table's bounds, and nothing here touches
a floor: the balloon's ``floor`` and ``<memtune><min_guarantee>``, the guest's zone
watermarks and its own pressure checks (PSI, free < reserve/2 deflates at once) hold at
every level. A sample that cannot be taken counts as ``plenty``: pressure only ever asks
for more reclaim, so the safe default is none of it.

Pure policy (``level``, ``settle``, ``adjust``, ``balloon``, ``effective``: the numbers a
level gives); the one reader is :func:`sample`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

from aerate.agent import settings as table
from aerate.host.balloon import BalloonSettings

MiB = 1 << 20
PLENTY, FIRMER, FIRM = "plenty", "firmer", "firm"
LEVELS = (PLENTY, FIRMER, FIRM)
#: Divisor of hwm and reserve_mib, multiplier of the balloon step, per level.
_FACTOR = {PLENTY: 1, FIRMER: 2, FIRM: 4}
#: The settings a level changes.
ADJUSTED = ("hwm", "reserve_mib")
PSI_PATH = "/proc/pressure/memory"


class HostMemory(NamedTuple):
    """One sample of the host's memory (bytes; PSI ``some avg10`` in %, None: no PSI)."""

    available: int | None
    total: int | None
    psi_some_avg10: float | None = None
    #: bytes of swap the host has configured (0: none; None: unknown). With none, shmem
    #: pages (memfd RAM) are never written out, so reading them never waits on a disk
    #: (host/backing.py reads_stay_in_memory).
    swap_total: int | None = None


UNKNOWN = HostMemory(None, None, None)


def psi_raises(sample: HostMemory, values: Mapping[str, Any]) -> bool:
    """Whether the host's memory PSI is above the VM's ``host_psi_some`` (0: ignored)."""
    limit = float(values["host_psi_some"])
    return bool(limit) and sample.psi_some_avg10 is not None and sample.psi_some_avg10 > limit


def level(sample: HostMemory, values: Mapping[str, Any]) -> str:
    """The pressure level for one VM's settings (``host_low_mib``, ``host_high_mib``,
    ``host_psi_some``)."""
    low, high = int(values["host_low_mib"]), int(values["host_high_mib"])
    avail = sample.available
    if avail is None or (not low and not high):
        return PLENTY
    lvl = PLENTY
    if low and avail < low * MiB:
        lvl = FIRM
    elif high and avail < high * MiB:
        lvl = FIRMER
    if psi_raises(sample, values):
        lvl = LEVELS[min(LEVELS.index(lvl) + 1, len(LEVELS) - 1)]
    return lvl


#: A level relaxes (firm -> firmer -> plenty) only after the host stayed at the lower
#: pressure this long; it firms up at once. MemAvailable hovering at a threshold does
#: not flip every VM's settings every second.
RELAX_AFTER_S = 10.0


def settle(current: str, measured: str, relax_since: float | None, now: float
           ) -> tuple[str, float | None]:
    """The level to act on and since when a relaxation has been seen (pure)."""
    if _FACTOR[measured] >= _FACTOR[current]:
        return measured, None           # firmer (or the same): at once
    since = now if relax_since is None else relax_since
    if now - since >= RELAX_AFTER_S:
        return measured, None
    return current, since


def adjust(values: dict[str, Any], lvl: str) -> dict[str, Any]:
    """``values``, changed in place to the level's firmer guest settings (within the
    table's bounds), and returned."""
    k = _FACTOR[lvl]
    for name in ADJUSTED if k != 1 else ():
        row = table.BY_NAME[name]
        values[name] = max(int(row.lo or 0), int(values[name]) // k)
    return values


def balloon(settings: BalloonSettings, lvl: str) -> BalloonSettings:
    """The balloon controller's knobs at this level: larger steps, a shorter cool-down.
    Floors (``floor_fraction``, ``min_guarantee``) are left as they are."""
    k = _FACTOR[lvl]
    if k == 1:
        return settings
    return dataclasses.replace(settings, step=settings.step * k,
                               cooldown_intervals=settings.cooldown_intervals / min(k, 2))


#: The numbers a level changes, as the VM gets them (explain, status's ``effective``, the
#: ``aerate_effective_setting`` gauge): hwm and reserve_mib as sent to the agent, the
#: balloon's step multiplier and its cool-down after a deflate (in stats intervals). A
#: fixed set: the gauge's ``key`` label stays bounded.
EFFECTIVE = ("hwm", "reserve_mib", "balloon_step_factor", "balloon_cooldown_intervals")


def effective(values: Mapping[str, Any], lvl: str) -> dict[str, float]:
    """The EFFECTIVE numbers at level ``lvl`` for the VM's configured ``values`` (its
    layered settings before pressure), computed by ``adjust`` and ``balloon`` themselves."""
    got = adjust(dict(values), lvl)
    base = BalloonSettings.from_settings(values)
    firmed = balloon(base, lvl)
    return {"hwm": int(got["hwm"]), "reserve_mib": int(got["reserve_mib"]),
            "balloon_step_factor": firmed.step / base.step,
            "balloon_cooldown_intervals": firmed.cooldown_intervals}


def _numbers(values: Mapping[str, Any], lvl: str) -> str:
    now = effective(values, lvl)
    if lvl == PLENTY:
        return f"hwm {now['hwm']}, reserve_mib {now['reserve_mib']}"
    return (f"hwm {now['hwm']} (configured {values['hwm']}), reserve_mib "
            f"{now['reserve_mib']} (configured {values['reserve_mib']}), balloon steps "
            f"x{now['balloon_step_factor']:g}, cool-down after a deflate "
            f"{now['balloon_cooldown_intervals']:g} stats intervals")


def describe(sample: HostMemory, values: Mapping[str, Any], acting: str | None = None
             ) -> str:
    """One sentence for ``aeratectl explain``, with the effective numbers: ``values`` are
    the VM's configured settings (before pressure), ``acting`` the level acted on (the
    settled one; default: the sample's)."""
    low, high = int(values["host_low_mib"]), int(values["host_high_mib"])
    lvl = acting or level(sample, values)
    if not low and not high:
        return ("host pressure is not used for this VM (host_low_mib and host_high_mib are "
                f"0): its settings apply as they are ({_numbers(values, lvl)})")
    if sample.available is None:
        return ("the host's MemAvailable could not be read: level "
                f"{lvl} ({_numbers(values, lvl)})")
    measured = level(sample, values)
    held = (f", held until the host has stayed at {measured} for {RELAX_AFTER_S:g} s"
            if measured != lvl else "")
    avail = sample.available // MiB
    psi = "" if sample.psi_some_avg10 is None else \
        f", memory PSI some avg10 {sample.psi_some_avg10:g} % (host_psi_some " \
        f"{float(values['host_psi_some']):g}" + \
        ("; above it: one level firmer)" if psi_raises(sample, values) else ")")
    what = {PLENTY: "its settings apply as they are", FIRMER: "firmer", FIRM: "firm"}
    return (f"host MemAvailable is {avail} MiB (host_low_mib {low}, host_high_mib {high})"
            f"{psi}: level {lvl}{held}, so {what[lvl]}: {_numbers(values, lvl)}")


def parse_psi(text: str) -> float | None:
    """``some avg10`` (%) from a PSI file's text (None: no such line or value)."""
    for line in text.splitlines():
        kind, *fields = line.split() or [""]
        if kind != "some":
            continue
        for field in fields:
            key, _, val = field.partition("=")
            if key == "avg10":
                try:
                    got = float(val)
                except ValueError:
                    return None
                return got if 0.0 <= got <= 100.0 else None
    return None


def _psi(path: str = PSI_PATH) -> float | None:
    try:
        with open(path, encoding="ascii") as f:
            return parse_psi(f.read())
    except (OSError, UnicodeDecodeError):
        return None


def sample() -> HostMemory:
    """The host's memory now (psutil reads /proc/meminfo; PSI from /proc/pressure)."""
    try:
        import psutil
        vm = psutil.virtual_memory()
        swap = psutil.swap_memory()
    except (ImportError, OSError, RuntimeError):
        return UNKNOWN
    return HostMemory(int(vm.available), int(vm.total), _psi(), int(swap.total))
