"""Files the Debian packages ship that are generated, not written: from the settings table
(agent/settings.py) and the programs' own argument parsers, so they cannot drift apart.

``python3 -m aerate.deploy.packaging DIR`` (debian/rules runs it) writes into DIR:

- ``aerated.toml``: the host config file, every setting of the table commented out with
  its default, bounds and meaning (installed as the conffile /etc/aerate/aerated.toml);
- ``completions/aeratectl``, ``completions/aerated``: bash completion, ``set`` keys and
  their choices from the table;
- ``aerated.8``, ``aeratectl.1``, ``aerate-agent.8``: man pages from the parsers' options
  (and the table, for the two host programs);
- ``bin/aerated``, ``bin/aeratectl``, ``bin/aerate-agent``: launchers for the
  ``[project.scripts]`` of pyproject.toml.

``build_packages`` runs ``dpkg-buildpackage -b`` on a copy of a source tree (the image build
and tests/host/test_packages.py use it). Build tooling: it is not part of any package.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from aerate import __version__
from aerate.agent import settings as table
from aerate.host import ctl
from aerate.host.config import toml_parser

REPO = Path(__file__).resolve().parent.parent
#: Program -> (man section, where the package installs it).
PROGRAMS = {"aerated": ("8", "/usr/sbin"), "aeratectl": ("1", "/usr/bin"),
            "aerate-agent": ("8", "/usr/sbin")}
#: The binary packages debian/control builds, in build order.
PACKAGES = ("python3-aerate", "aerate-agent", "aerated")


class PackagingError(RuntimeError):
    """The packages cannot be built; the message names the step and its output."""


# --------------------------------------------------------------------------- parsers


class _Grabbed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def parser_of(main: Callable[[list[str]], int]) -> argparse.ArgumentParser:
    """The argument parser a program's ``main`` builds, taken at its ``parse_args`` call
    (before ``main`` does anything else), so the man page and completion describe exactly
    the options the program accepts."""
    def grab(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Grabbed(self)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        try:
            main([])
        except _Grabbed as g:
            return g.parser
    raise PackagingError(f"{main.__module__}.main returned without parsing arguments")


def programs() -> dict[str, argparse.ArgumentParser]:
    """Each program's parser (imports the host side: libvirt and prometheus_client)."""
    from aerate.agent import service
    from aerate.host import ctl, daemon
    return {"aerated": parser_of(daemon.main), "aeratectl": parser_of(ctl.main),
            "aerate-agent": parser_of(service.main)}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return {c.dest: c.help or "" for c in a._choices_actions}
    return {}


# --------------------------------------------------------------------------- config file


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"%s"' % value
    return repr(value)


def _bounds(s: table.Setting) -> str:
    if s.choices:
        return "one of " + ", ".join(s.choices)
    if s.type is bool:
        return "true or false"
    lo = "" if s.lo is None else _toml_value(s.type(s.lo))
    hi = "" if s.hi is None else _toml_value(s.type(s.hi))
    return f"{s.type.__name__} in [{lo}, {hi}]"


def _wrap(text: str, prefix: str, width: int = 88) -> list[str]:
    lines: list[str] = []
    line = prefix
    for word in text.replace("%%", "%").split():
        if len(line) + len(word) + 1 > width and line.strip("# "):
            lines.append(line.rstrip())
            line = prefix
        line += word + " "
    lines.append(line.rstrip())
    return lines


def host_config() -> str:
    """The text of /etc/aerate/aerated.toml: every setting, commented, at its default."""
    out = [
        "# aerated's host configuration (aerated(8)). Every setting is shown commented out",
        "# at its built-in default; uncomment and change what this host needs, then run",
        "# 'systemctl reload aerated' (or 'aeratectl reload').",
        "#",
        "# Layers, later wins: built-in defaults < this file's [defaults] < its [vm.NAME]",
        "# sections < a VM's libvirt metadata < 'aeratectl set VM KEY=VALUE'. Scope 'host'",
        "# settings are read from this file only, never from a VM's metadata (it travels",
        "# with the domain's XML). Generated from aerate's settings table, version "
        + __version__ + ".",
        "",
        "[defaults]",
    ]
    for s in table.TABLE:
        out.append("")
        out += _wrap(f"{s.help} (scope {s.scope}; {_bounds(s)})", "# ")
        out.append(f"#{s.name} = {_toml_value(s.default)}")
    out += ["", "# One VM (its libvirt name) differs from the defaults:", "#[vm.web01]",
            "#reserve_mib = 512", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- completion


def bash_completion(name: str, parser: argparse.ArgumentParser) -> str:
    """A bash completion script for program ``name``."""
    opts = " ".join(o for a in _options(parser) for o in a.option_strings)
    subs = _subcommands(parser)
    fn = "_" + name.replace("-", "_")
    lines = [f"# bash completion for {name} (generated from its parser and aerate's settings "
             "table)", f"{fn}() {{", "    local cur=${COMP_WORDS[COMP_CWORD]}",
             "    local prev=${COMP_WORDS[COMP_CWORD-1]}", '    local cmd="" i']
    lines += ["    case $prev in",
              "        --config|--run-dir|--port) COMPREPLY=($(compgen -f -- \"$cur\")); "
              "return ;;", "    esac"]
    if subs:
        keys = " ".join(f"{s.name}=" for s in table.TABLE)
        lines += ["    for ((i = 1; i < COMP_CWORD; i++)); do",
                  "        case ${COMP_WORDS[i]} in -*) ;; *) cmd=${COMP_WORDS[i]}; break ;; "
                  "esac", "    done", '    case $cmd in',
                  f'        "") COMPREPLY=($(compgen -W "{" ".join(subs)} {opts}" -- "$cur"))'
                  " ;;"]
        for sub, sp in subs.items():
            sopts = " ".join(o for a in _options(sp) for o in a.option_strings)
            if sub == "set":
                lines += ["        set)",
                          "            if [[ $cur == *=* ]]; then",
                          "                case ${cur%%=*} in"]
                for s in table.TABLE:
                    values = s.choices or (("true", "false") if s.type is bool else ())
                    if values:
                        words = " ".join(f"{s.name}={v}" for v in values)
                        lines.append(f'                    {s.name}) COMPREPLY=($(compgen -W '
                                     f'"{words}" -- "$cur")) ;;')
                lines += ["                esac",
                          "            elif ((i + 1 == COMP_CWORD)); then",
                          "                COMPREPLY=($(compgen -W \"$(virsh -q list --all "
                          "--name 2>/dev/null)\" -- \"$cur\"))",
                          "            else",
                          f'                compopt -o nospace; COMPREPLY=($(compgen -W "{keys}"'
                          ' -- "$cur"))',
                          "            fi ;;"]
            else:
                lines.append(f'        {sub}) COMPREPLY=($(compgen -W "{sopts}" -- "$cur")) ;;')
        lines.append("    esac")
    else:
        lines.append(f'    COMPREPLY=($(compgen -W "{opts}" -- "$cur"))')
    lines += ["}", f"complete -F {fn} {name}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- man pages


def _roff(text: str) -> str:
    out = text.replace("\\", "\\e").replace("-", "\\-").replace("%%", "%")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in out.splitlines())


def _option_items(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for a in _options(parser):
        if a.help == argparse.SUPPRESS:
            continue
        names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in a.option_strings)
        if a.nargs != 0:
            names += " \\fI" + _roff(str(a.metavar or a.dest.upper())) + "\\fR"
        text = a.help or ""
        if a.default not in (None, [], False, argparse.SUPPRESS) and "%(default)" not in text:
            text = (text + f" (default: {a.default})").strip()
        out += [".TP", names, _roff(text.replace("%(prog)s", parser.prog))]
    return out


_DESCRIPTIONS = {
    "aerated": (
        "aerated runs on a KVM host. It talks to every VM's aerate-agent over a "
        "virtio-serial port (org.aerate.agent.0), reads the free guest memory the agents "
        "report and gives it back to the host: it punches holes in shared guest memory "
        "(memfd, hugetlbfs, shared files) or inflates the VM's balloon for private memory. "
        "It refuses whatever it cannot prove safe to discard (see the README's refusal "
        "list) and says why in aeratectl status. It runs as a systemd notify service "
        "(aerated.service); systemctl reload re-reads the host config file."),
    "aeratectl": (
        "aeratectl talks to aerated over its control socket (in the run directory): it "
        "shows every VM aerated serves, their state, what was reclaimed and why something "
        "is refused, and changes settings of a live VM (persisted in its libvirt "
        "metadata)."),
    "aerate-agent": (
        "aerate-agent runs inside a KVM guest. It isolates free memory blocks of the "
        "guest's page allocator in an arena of held pages, reports their guest-physical "
        "ranges to aerated on the host and returns them once the host acknowledged them or "
        "their lease ran out. systemd starts it when the host gives the guest the port "
        "org.aerate.agent.0 (udev rule 99-aerate-agent.rules) and stops it when the port "
        "goes."),
}

_FILES = {
    "aerated": [("/etc/aerate/aerated.toml", "host settings (SETTINGS below)"),
                ("/run/aerate/aerated.sock", "control socket aeratectl talks to"),
                ("/lib/systemd/system/aerated.service", "the systemd unit")],
    "aeratectl": [("/run/aerate/aerated.sock", "aerated's control socket")],
    "aerate-agent": [("/dev/virtio-ports/org.aerate.agent.0", "the port to the host"),
                     ("/dev/hugepages/aerate-agent-arena", "held pages (survive a restart)"),
                     ("/run/aerate-agent", "the hugetlb budget record"),
                     ("/lib/systemd/system/aerate-agent.service", "the systemd unit"),
                     ("/lib/udev/rules.d/99-aerate-agent.rules", "starts it with the port")],
}


def man_page(name: str, parser: argparse.ArgumentParser) -> str:
    """The man page of program ``name`` (roff)."""
    section = PROGRAMS[name][0]
    summary = {"aerated": "aerate host daemon: reclaims memory that KVM guests report free",
               "aeratectl": "inspect and tune the VMs aerated serves",
               "aerate-agent": "aerate guest agent: reports free guest memory to the host"}
    out = [f'.TH {name.upper()} {section} "" "aerate {__version__}" "aerate"',
           ".SH NAME", f"{_roff(name)} \\- {_roff(summary[name])}",
           ".SH SYNOPSIS", ".nf", _roff(parser.format_usage().replace("usage: ", "").strip()),
           ".fi", ".SH DESCRIPTION", _roff(_DESCRIPTIONS[name]), ".SH OPTIONS",
           *_option_items(parser)]
    subs = _subcommands(parser)
    if subs:
        helps = _subcommand_help(parser)
        out.append(".SH COMMANDS")
        for sub, sp in subs.items():
            usage = sp.format_usage().replace("usage: ", "").strip()
            out += [".TP", f"\\fB{_roff(usage)}\\fR", _roff(helps.get(sub, ""))]
            out += [".RS", *_option_items(sp), ".RE"] if _option_items(sp) else []
    if name != "aerate-agent":
        out += [".SH SETTINGS",
                _roff("Every setting, its type and bounds, its default and its scope: "
                      "'guest' settings are sent to the agent, 'vm' settings are aerated's "
                      "own for one VM, 'host' settings come from the host config file "
                      "only.")]
        for s in table.TABLE:
            out += [".TP", f"\\fB{_roff(s.name)}\\fR = {_roff(_toml_value(s.default))}",
                    _roff(f"{s.help} (scope {s.scope}; {_bounds(s)})")]
    else:
        out += [".SH SETTINGS",
                _roff("The host sends the agent its settings (aeratectl(1) lists them); "
                      "--set gives one until the host does.")]
    out.append(".SH FILES")
    for path, what in _FILES[name]:
        out += [".TP", f"\\fI{_roff(path)}\\fR", _roff(what)]
    see = {"aerated": "aeratectl(1), aerate-agent(8), systemctl(1)",
           "aeratectl": "aerated(8), aerate-agent(8)",
           "aerate-agent": "aerated(8), aeratectl(1), systemd.service(5)"}[name]
    out += [".SH SEE ALSO", _roff(see), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- launchers


def scripts(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """``[project.scripts]``: program name -> ``module:function``."""
    # host/config.py's fallback chain, not tomllib: Python 3.9 has none, and the unit tier
    # imports this module.
    loads, _ = toml_parser()
    doc = loads(pyproject.read_text())
    found: dict[str, str] = doc["project"]["scripts"]
    return found


def launcher(target: str) -> str:
    """A launcher for ``module:function`` run by the system's python3."""
    module, _, func = target.partition(":")
    return (f"#!/usr/bin/python3\nimport sys\n\nfrom {module} import {func}\n\n"
            f"sys.exit({func}())\n")


def generate(out: Path) -> list[Path]:
    """Write every generated file into ``out``; return their paths."""
    parsers = programs()
    if set(parsers) != set(scripts()) or set(parsers) != set(PROGRAMS):
        raise PackagingError(f"programs {sorted(parsers)} differ from pyproject's scripts "
                             f"{sorted(scripts())}")
    files: dict[str, str] = {"aerated.toml": host_config()}
    for name, parser in parsers.items():
        files[f"{name}.{PROGRAMS[name][0]}"] = man_page(name, parser)
        if name == "aeratectl":
            # aeratectl's own (``aeratectl completion``): it knows that set/reset take only
            # the keys a VM's metadata may hold.
            files[f"completions/{name}"] = ctl.bash_completion()
        elif name != "aerate-agent":
            files[f"completions/{name}"] = bash_completion(name, parser)
        files[f"bin/{name}"] = launcher(scripts()[name])
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if rel.startswith("bin/") else 0o644)
        written.append(path)
    return written


# --------------------------------------------------------------------------- build


#: What a copy of the tree leaves out anywhere, and in debian/ (an earlier build's output).
_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info",
                                 "__pycache__", ".*_cache", ".hypothesis", "*.pyc")
_BUILD_LEFTOVERS = {"generated", "files", "debhelper-build-stamp", ".debhelper", "tmp",
                    *PACKAGES}


def snapshot(src: Path, dest: Path) -> None:
    """Copy the source tree without .git, venvs, caches and build leftovers."""
    debian = (src / "debian").resolve()

    def ignore(where: str, names: list[str]) -> set[str]:
        skip = set(_IGNORE(where, names))
        if Path(where).resolve() == debian:
            skip |= {n for n in names if n in _BUILD_LEFTOVERS
                     or n.endswith((".substvars", ".debhelper", ".debhelper.log"))}
        return skip

    shutil.copytree(src, dest, ignore=ignore, symlinks=True)


def build_packages(src: Path, out: Path, timeout: float = 900) -> dict[str, Path]:
    """``dpkg-buildpackage -b -us -uc`` on a copy of ``src``; the .debs moved to ``out``.

    Returns package name -> .deb. PackagingError names the missing tool or the failed step
    with the tail of its output.
    """
    if shutil.which("dpkg-buildpackage") is None or shutil.which("dh") is None:
        raise PackagingError("dpkg-buildpackage/dh not found: apt install dpkg-dev debhelper "
                             "dh-python (deploy/setup-host does it)")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aerate-deb-") as tmp:
        tree = Path(tmp) / "aerate"
        snapshot(src, tree)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
        proc = subprocess.run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=tree, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", timeout=timeout, check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-40:])
            raise PackagingError(f"dpkg-buildpackage failed (exit {proc.returncode}):\n{tail}")
        debs: dict[str, Path] = {}
        for deb in Path(tmp).glob("*.deb"):
            dest = out / deb.name
            shutil.move(str(deb), dest)
            debs[deb.name.split("_", 1)[0]] = dest
    if set(debs) != set(PACKAGES):
        raise PackagingError(f"dpkg-buildpackage built {sorted(debs)}, expected {PACKAGES}")
    return debs


@contextlib.contextmanager
def built(src: Path = REPO) -> Iterator[dict[str, Path]]:
    """The packages of ``src``, built into a temporary directory for the ``with`` block."""
    with tempfile.TemporaryDirectory(prefix="aerate-debs-") as tmp:
        yield build_packages(src, Path(tmp))


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m aerate.deploy.packaging DIR``: write the generated files into DIR."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python3 -m aerate.deploy.packaging DIR", file=sys.stderr)
        return 2
    for path in generate(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
