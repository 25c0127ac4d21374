"""Records, during the unit run, which refusal facts and settings rows tested code really
used (the virt-manager ``test_checkprops`` idea, STYLE.md); ``test_zz_checkprops.py``, the
last unit module, fails when one was declared but never exercised.

- VmFacts: every field must reach ``decide()`` *from the daemon* (host/daemon.py's own
  ``decide`` name is wrapped) with at least two different values across the run: a fact
  that the daemon always passes the same way (the page-poisoning fact before issue 9) is
  not wired, whatever ``decide()``'s own tests say.
- DomainFacts: every field must take two different values across the DomainFacts built
  in the run (``domain_facts()`` on the captured XML and the tests' variants).
- Settings rows: every row must be read by name (``values["hwm"]`` or ``.get``) from a
  layered settings dict by some code path (agent engine, daemon, balloon).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from daemon_sim import SimVm, open_vm

from aerate.agent import settings as table
from aerate.host import daemon as daemon_mod
from aerate.host import refusal

#: field name -> distinct repr()s of the values seen
VM_FACTS: dict[str, set[str]] = defaultdict(set)
DOMAIN_FACTS: dict[str, set[str]] = defaultdict(set)
SETTINGS_READ: set[str] = set()


class _RecordingSettings(dict[str, Any]):
    """A layered settings dict that notes which rows code reads by name."""

    def __getitem__(self, key: str) -> Any:
        SETTINGS_READ.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        SETTINGS_READ.add(key)
        return super().get(key, default)


def _fields(obj: Any, into: dict[str, set[str]]) -> None:
    for f in dataclasses.fields(obj):
        into[f.name].add(repr(getattr(obj, f.name)))


@pytest.fixture(scope="session", autouse=True)
def _checkprops_recorders() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    defaults = table.defaults
    decide = daemon_mod.decide
    domain_init = refusal.DomainFacts.__init__

    def recording_defaults() -> dict[str, Any]:
        # layered() starts from defaults(): both hand out recording dicts.
        return _RecordingSettings(defaults())

    def recording_decide(facts: refusal.VmFacts) -> refusal.Decision:
        _fields(facts, VM_FACTS)
        return decide(facts)

    def recording_init(self: refusal.DomainFacts, *args: Any, **kwargs: Any) -> None:
        domain_init(self, *args, **kwargs)
        _fields(self, DOMAIN_FACTS)

    patches: list[tuple[Any, str, Callable[..., Any]]] = [
        (table, "defaults", recording_defaults),
        (daemon_mod, "decide", recording_decide),
        (refusal.DomainFacts, "__init__", recording_init),
    ]
    for obj, name, fn in patches:
        mp.setattr(obj, name, fn)
    yield
    mp.undo()


@pytest.fixture
def vm(tmp_path: Any) -> Iterator[SimVm]:
    """A simulated VM's RAM memfd described as the daemon's map would (daemon_sim.py),
    closed after the test (host/punch.py's and host/probe.py's tests)."""
    with open_vm("unit", str(tmp_path)) as v:
        yield v
