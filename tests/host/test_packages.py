"""The Debian packages, built here with Debian's tooling and run from what they install.

Not installed into this machine's / (that would replace /usr/sbin/aerated etc. for everyone
using it): each package is unpacked with ``dpkg-deb -x`` into a temporary root and its
programs run from there with the system's python3 and the Debian packages the control file
names (python3-libvirt, python3-prometheus-client), against this machine's libvirtd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aerate import __version__
from aerate.agent import settings as table
from aerate.deploy import image, packaging

pytestmark = [pytest.mark.host,
              pytest.mark.skipif(shutil.which("dh") is None or shutil.which("lintian") is None,
                                 reason="debhelper/lintian missing: run deploy/setup-host")]
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return packaging.build_packages(packaging.REPO, tmp_path_factory.mktemp("debs"))


@pytest.fixture(scope="module")
def root(debs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """python3-aerate, aerate-agent and aerated unpacked into one root."""
    where = tmp_path_factory.mktemp("root")
    for deb in debs.values():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(where)], check=True)
    return where


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def contents(deb: Path) -> list[str]:
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[5].lstrip(".") for line in out.splitlines()
            if not line.split()[5].endswith("/")]


def test_lintian_reports_no_errors_nor_warnings(debs: dict[str, Path]) -> None:
    changes = next(debs["aerated"].parent.glob("*.changes"), None)
    targets = [str(changes)] if changes else [str(d) for d in debs.values()]
    r = subprocess.run(["lintian", "--fail-on", "error,warning", *targets],
                       capture_output=True, text=True, timeout=600)
    tags = [line for line in r.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert r.returncode == 0 and tags == [], r.stdout + r.stderr


def test_each_package_holds_what_an_operator_needs(debs: dict[str, Path]) -> None:
    agent, host, lib = (contents(debs[p]) for p in ("aerate-agent", "aerated", "python3-aerate"))
    for path in ("/usr/sbin/aerate-agent", "/lib/systemd/system/aerate-agent.service",
                 "/lib/udev/rules.d/99-aerate-agent.rules",
                 "/usr/share/man/man8/aerate-agent.8.gz"):
        assert path in agent
    for path in ("/usr/sbin/aerated", "/usr/bin/aeratectl", "/lib/systemd/system/aerated.service",
                 "/etc/aerate/aerated.toml", "/usr/share/man/man8/aerated.8.gz",
                 "/usr/share/man/man1/aeratectl.1.gz",
                 "/usr/share/bash-completion/completions/aeratectl"):
        assert path in host
    assert not any("/deploy/" in p or "/tests/" in p for p in agent + host + lib)
    assert not any("/aerate/host/" in p for p in agent + lib)
    # The guest needs python3 and the agent's own modules, nothing else.
    assert re.fullmatch(r"python3-aerate \(= [^)]+\), python3:any(?: \([^)]*\))?",
                        field(debs["aerate-agent"], "Depends"))
    assert re.fullmatch(r"python3:any(?: \([^)]*\))?", field(debs["python3-aerate"], "Depends"))
    conffiles = subprocess.run(["dpkg-deb", "-I", str(debs["aerated"]), "conffiles"],
                               capture_output=True, text=True, check=True).stdout.split()
    assert conffiles == ["/etc/aerate/aerated.toml"]
    assert {field(d, "Version") for d in debs.values()} == {__version__}


def test_units_run_what_the_packages_install(root: Path) -> None:
    for unit in ("aerated.service", "aerate-agent.service"):
        text = (root / "lib/systemd/system" / unit).read_text()
        for path in re.findall(r"^ExecStart=(\S+)", text, re.M):
            assert (root / path.lstrip("/")).is_file() and os.access(root / path.lstrip("/"),
                                                                     os.X_OK), path
        for name, section in re.findall(r"man:([\w-]+)\((\d)\)", text):
            assert (root / f"usr/share/man/man{section}/{name}.{section}.gz").is_file()


def run(root: Path, program: str, *args: str, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    path = next(p for p in (root / "usr/sbin" / program, root / "usr/bin" / program)
                if p.is_file())
    return subprocess.run([SYSTEM_PYTHON, str(path), *args], env=packaged_env(root), cwd=root,
                          capture_output=True, text=True, timeout=timeout)


def packaged_env(root: Path) -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
            "PYTHONPATH": str(root / "usr/lib/python3/dist-packages")}


def test_installed_programs_answer(root: Path) -> None:
    assert run(root, "aeratectl", "--version").stdout.strip() == f"aeratectl {__version__}"
    assert run(root, "aerate-agent", "--version").stdout.strip() == f"aerate-agent {__version__}"
    assert run(root, "aerated", "--version").stdout.strip() == f"aerated {__version__}"
    r = run(root, "aerated", "--help")
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr
    r = run(root, "aeratectl", "settings")
    assert r.returncode == 0 and all(s.name in r.stdout for s in table.TABLE)
    # The module that was run is the unpacked one, not the checkout's.
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import aerate.host.daemon as d; print(d.__file__)"],
                       env=packaged_env(root), cwd=root, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.startswith(str(root)), r.stdout + r.stderr


@pytest.fixture
def packaged_daemon(root: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    if shutil.which("virsh") is None or subprocess.run(
            ["virsh", "-c", "qemu:///system", "version"], capture_output=True,
            timeout=30).returncode != 0:
        pytest.skip("no libvirtd answers on qemu:///system: run deploy/setup-host")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Serves no VM (a glob nothing matches): other users' guests on this machine are left
    # alone. The config is the conffile the package ships.
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, str(root / "usr/sbin/aerated"), "--uri", "qemu:///system",
         "--config", str(root / "etc/aerate/aerated.toml"), "--run-dir", str(run_dir),
         "--metrics", "off", "--vm", "aerate-package-test-serves-nothing-*"],
        env=packaged_env(root), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        yield proc, run_dir
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_installed_aerated_serves_aeratectl_against_the_local_libvirtd(
        root: Path, packaged_daemon: tuple[subprocess.Popen[str], Path]) -> None:
    proc, run_dir = packaged_daemon
    deadline = time.monotonic() + 60
    answer = None
    while time.monotonic() < deadline and proc.poll() is None:
        r = run(root, "aeratectl", "--run-dir", str(run_dir), "status", "--json")
        if r.returncode == 0:
            answer = json.loads(r.stdout)
            break
        time.sleep(0.5)
    out = "" if proc.poll() is None else proc.communicate()[0]
    assert answer is not None, f"aeratectl never got a status; aerated said:\n{out}"
    assert answer["ok"] is True
    r = run(root, "aeratectl", "--run-dir", str(run_dir), "status")
    assert r.returncode == 0, r.stdout + r.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


#: Debian 11 (bullseye): Python 3.9, systemd 247. What the three packages depend on there is
#: installed in the cached tree, so the install below needs no network.
BULLSEYE_DEPENDS = ["python3", "python3-libvirt", "python3-prometheus-client", "python3-toml"]


def test_packages_install_and_run_on_debian_11(debs: dict[str, Path], tmp_path: Path) -> None:
    cached = image.ensure_chroot("bullseye", BULLSEYE_DEPENDS)
    root = tmp_path / "bullseye"
    subprocess.run(["cp", "-a", "--reflink=auto", str(cached), str(root)], check=True)
    (root / "root/debs").mkdir()
    for deb in debs.values():
        shutil.copy2(deb, root / "root/debs")

    def chroot(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(image.in_chroot(root, ["env", "-i", *(
            f"{k}={v}" for k, v in image._guest_env().items()), *argv]),
            capture_output=True, text=True, timeout=300)

    r = chroot("sh", "-c", "dpkg -i /root/debs/python3-aerate_*.deb /root/debs/aerate-agent_*.deb"
               " /root/debs/aerated_*.deb")
    assert r.returncode == 0, r.stdout + r.stderr
    assert chroot("python3", "--version").stdout.startswith("Python 3.9")
    assert chroot("aerate-agent", "--version").stdout.strip() == f"aerate-agent {__version__}"
    assert chroot("aeratectl", "--version").stdout.strip() == f"aeratectl {__version__}"
    r = chroot("aerated", "--help")
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr
    # No tomllib on 3.9, no python3-tomli in bullseye: the shipped config parses with toml.
    r = chroot("python3", "-c", "from aerate.host import config; "
               "print(config.toml_parser()[0].__module__, "
               "config.parse(open('/etc/aerate/aerated.toml').read()).defaults)")
    assert r.stdout.split() == ["toml.decoder", "{}"], r.stdout + r.stderr
    assert (root / image.AGENT_WANTS).is_symlink()
