"""Static checks run as tests: ruff, mypy (strict), and Python 3.8 for the guest agent."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    r = run(str(BIN / "ruff"), "check", "--output-format", "concise", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict() -> None:
    r = run(str(BIN / "mypy"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_agent_runs_on_python_3_8() -> None:
    """Old guests are the main audience: nothing in agent/ may need more than Python 3.8."""
    r = run(str(BIN / "vermin"), "-t=3.8-", "--no-tips", "--violations", "--eval-annotations",
            "--no-parse-comments", "agent/")
    assert r.returncode == 0, r.stdout + r.stderr


def test_host_runs_on_python_3_9() -> None:
    """Debian 11, Ubuntu 22.04 and RHEL 9 hosts have Python 3.9/3.10: nothing in host/ may
    need more (tomllib only through host/config.py's fallback). tests/host/test_packages.py
    runs the packaged host programs under Debian 11's 3.9."""
    r = run(str(BIN / "vermin"), "-t=3.9-", "--no-tips", "--violations", "--no-parse-comments",
            "host/")
    assert r.returncode == 0, r.stdout + r.stderr


def test_asyncio_timeouts_are_caught_by_their_own_name() -> None:
    """On Python 3.8-3.10 asyncio.wait_for raises asyncio.TimeoutError, which is not the
    builtin TimeoutError (they are one from 3.11): ``except TimeoutError`` after it lets a
    libvirt call's timeout escape VmWorker as a crash instead of CallTimeout on Debian 11.
    ruff's UP041 (target 3.11) rewrites the name, hence the noqa beside each."""
    bare = re.compile(r"except\s*\(?[^:\n]*(?<![.\w])TimeoutError")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for d in ("host", "agent")
                 for p in sorted((ROOT / d).glob("*.py"))
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if bare.search(line)]
    assert offenders == []


def test_agent_imports_nothing_from_the_host_side() -> None:
    """The guest installs and runs without libvirt or any host code."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "agent").glob("*.py")
                 if any(w in p.read_text() for w in ("aerate.host", "import libvirt",
                                                     "psutil", "prometheus_client"))]
    assert offenders == []
