"""Fixtures of the vm tier: the guest image (per session) and booted guests (per module).

A test module picks its guest's shape with a module-level ``GUEST_SHAPE`` dict (keyword
arguments of :func:`aerate.deploy.vm.booted`), or by parametrizing ``guest`` indirectly, and
its Debian suite with ``GUEST_SUITE`` (default the Debian 12 image; "bullseye" for Debian 11).
On a failed test the guest's serial console and ``journalctl -b`` go into the report; the
boot-to-ready time of every guest is printed and summarised at the end of the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from aerate.deploy.image import SUITE, GuestImage, ImageError, ensure_image
from aerate.deploy.vm import Guest, HarnessError, booted

_summary: list[str] = []


def _say(config: pytest.Config, line: str) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(line)
    _summary.append(line)


def _image(config: pytest.Config, suite: str) -> GuestImage:
    if os.geteuid() != 0:
        pytest.fail("the vm tier needs root: it builds images, uses qemu:///system and "
                    "reserves host hugepages", pytrace=False)
    try:
        image = ensure_image(suite=suite)
    except ImageError as exc:
        pytest.fail(f"guest image ({suite}): {exc}", pytrace=False)
    _say(config, f"aerate guest image {image.suite} {image.key}: "
                 f"{image.build_seconds:.1f} s to build or reuse")
    return image


@pytest.fixture(scope="session")
def guest_image(request: pytest.FixtureRequest) -> GuestImage:
    """The guest image of this working tree (Debian 12), built or taken from the cache."""
    return _image(request.config, SUITE)


@pytest.fixture(scope="session")
def bullseye_image(request: pytest.FixtureRequest) -> GuestImage:
    """The older real guest: Debian 11 (kernel 5.10, Python 3.9, systemd 247) with the same
    packages installed, built or taken from the cache (its own base, cached like the first)."""
    return _image(request.config, "bullseye")


def _boot_line(g: Guest) -> str:
    return (f"aerate guest {g.name} ({g.spec.domain_type}, {g.spec.backing}): "
            f"boot-to-ready {g.timings['boot_to_ready']:.1f} s "
            f"(guest agent at {g.timings['boot_to_agent']:.1f} s)")


@pytest.fixture
def note_boot(request: pytest.FixtureRequest) -> Callable[[Guest], None]:
    """For tests that boot their own guest: print and summarise its boot-to-ready time."""
    return lambda g: _say(request.config, _boot_line(g))


@pytest.fixture(scope="module")
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    """A booted guest with aerate-agent active, shared by the tests of one module; from
    the Debian 12 image unless the module sets ``GUEST_SUITE`` (e.g. "bullseye")."""
    shape: dict[str, Any] = dict(getattr(request.module, "GUEST_SHAPE", {}))
    shape.update(getattr(request, "param", {}) or {})
    suite = getattr(request.module, "GUEST_SUITE", SUITE)
    image: GuestImage = request.getfixturevalue(
        "guest_image" if suite == SUITE else f"{suite}_image")
    try:
        with booted(image, **shape) as g:
            _say(request.config, _boot_line(g))
            yield g
    except HarnessError as exc:
        pytest.fail(f"guest boot: {exc}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Attach the serial console and the guest journal to a failed test's report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    for value in funcargs.values():
        if isinstance(value, Guest):
            for title, text in value.diagnostics().items():
                report.sections.append((f"{value.name} {title}", text[-60000:]))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Repeat image and boot timings at the end, where they are easy to find."""
    if _summary:
        terminalreporter.section("aerate vm timings")
        for line in _summary:
            terminalreporter.write_line(line)
