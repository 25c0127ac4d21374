"""What the Debian packages ship that is generated (deploy/packaging.py): the commented host
config, bash completion, man pages, launchers; and the one version source."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import aerate
from aerate.agent import settings as table
from aerate.deploy import packaging
from aerate.host import config

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    packaging.generate(out)
    return out


def test_one_version_source() -> None:
    """aerate/__init__.py holds the version; pyproject reads it, the agent's hello and the
    programs' --version print it, and debian/changelog must name the same one."""
    first = (ROOT / "debian/changelog").read_text().splitlines()[0]
    m = re.match(r"aerate \(([^)-]+)(-[^)]*)?\) ", first)
    assert m and m.group(1) == aerate.__version__, first
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "aerate.__version__" in pyproject
    hits = [p for p in ROOT.glob("*/*.py") if re.search(r"^VERSION = ['\"]", p.read_text(), re.M)]
    assert hits == []


def test_host_config_comments_every_setting_at_its_default(generated: Path) -> None:
    text = (generated / "aerated.toml").read_text()
    cfg = config.parse(text)  # as shipped: nothing set
    assert cfg.defaults == {} and cfg.per_vm == {}
    for s in table.TABLE:
        assert re.search(r"^#%s = " % s.name, text, re.M), s.name
    # Every line uncommented: the defaults of the table, exactly (the [vm.*] example aside).
    body = text.split("# One VM")[0]
    uncommented = re.sub(r"^#(\w+ = )", r"\1", body, flags=re.M)
    assert config.parse(uncommented).defaults == table.defaults()


def run_completion(script: Path, words: list[str]) -> list[str]:
    """COMPREPLY of the completion function for ``words`` (the last one being completed)."""
    prog = words[0]
    fn = "_" + prog.replace("-", "_")
    cmd = (f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
           f"COMP_CWORD={len(words) - 1}; {fn}; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_knows_subcommands_keys_and_choices(generated: Path) -> None:
    ctl = generated / "completions/aeratectl"
    assert sorted(run_completion(ctl, ["aeratectl", "se"])) == ["set", "settings"]
    assert run_completion(ctl, ["aeratectl", "set", "web01", "hw"]) == ["hwm="]
    # Host-scope keys never come from a VM's metadata: set does not offer them.
    assert run_completion(ctl, ["aeratectl", "set", "web01", "lea"]) == []
    keys = run_completion(ctl, ["aeratectl", "set", "web01", ""])
    assert sorted(k for k in keys if not k.startswith("-")) == sorted(
        f"{s.name}=" for s in table.TABLE if s.scope != "host")
    assert "--vm" in run_completion(generated / "completions/aerated", ["aerated", "--"])


def test_man_pages_list_every_option_and_setting(generated: Path) -> None:
    parsers = packaging.programs()
    for name, (section, _) in packaging.PROGRAMS.items():
        page = (generated / f"{name}.{section}").read_text()
        assert page.startswith(f".TH {name.upper()} {section} ")
        for action in parsers[name]._actions:
            for opt in action.option_strings:
                assert opt.replace("-", "\\-") in page, (name, opt)
        if name != "aerate-agent":
            assert all(f"\\fB{s.name}\\fR" in page for s in table.TABLE), name


def test_launchers_run_the_pyproject_scripts(generated: Path) -> None:
    for name, target in packaging.scripts().items():
        text = (generated / "bin" / name).read_text()
        module, _, func = target.partition(":")
        assert text.startswith("#!/usr/bin/python3\n") and f"from {module} import {func}" in text
        assert (generated / "bin" / name).stat().st_mode & 0o111


def test_the_harness_stays_out_of_the_packages_and_the_wheel() -> None:
    """A production install carries no test harness (the guest recipe has a passwordless
    root console)."""
    installs = " ".join(p.read_text() for p in (ROOT / "debian").glob("*.install"))
    assert "deploy" not in installs and "tests" not in installs
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"^packages = (\[.*\])$", pyproject, re.M)
    assert packages and "deploy" not in packages.group(1)


def test_the_launchers_are_read_without_tomllib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.9 (Debian 11) has no tomllib: importing deploy/packaging.py there broke the
    unit tier's collection. The launchers come through host/config.py's fallback parser."""
    import importlib
    import sys
    import tomllib
    monkeypatch.setitem(sys.modules, "tomllib", None)  # what Python < 3.11 has: no tomllib
    # MOCK: the stdlib module stands in for tomli (same API; tomli is not in the test venv).
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    fresh = importlib.reload(packaging)
    try:
        assert fresh.scripts()["aerated"] == "aerate.host.daemon:main"
    finally:
        monkeypatch.undo()
        importlib.reload(packaging)
