"""Host config file and per-VM metadata (S6): parsed, validated, errors that say what to fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aerate.host import config as c

pytestmark = pytest.mark.unit


def test_layers_defaults_then_vm_section() -> None:
    cfg = c.parse('[defaults]\nhwm = 16\nmode = "punch"\n[vm.web01]\nreserve_mib = 512\n',
                  "/etc/aerate/aerated.toml")
    assert cfg.layers_for("web01") == [{"hwm": 16, "mode": "punch"}, {"reserve_mib": 512}]
    assert cfg.layers_for("other") == [{"hwm": 16, "mode": "punch"}, {}]


@pytest.mark.parametrize(
    "text, message",
    [
        ("[defaults\n", "not valid TOML"),
        ("[defaults]\nhwm = 0\n", "[defaults]: hwm=0 is outside"),
        ("[defaults]\nhwn = 3\n", "unknown setting 'hwn'"),
        ("[vm.a]\nmode = 'fast'\n", "[vm.a]: mode='fast' is not one of"),
        ("[globals]\n", "unknown section"),
    ],
)
def test_bad_files_name_file_key_and_reason(text: str, message: str) -> None:
    with pytest.raises(c.ConfigError) as e:
        c.parse(text, "/etc/aerate/aerated.toml")
    assert message in str(e.value) and "/etc/aerate/aerated.toml" in str(e.value)


def test_missing_file_means_builtin_defaults(tmp_path: object) -> None:
    cfg = c.load("/nonexistent/aerated.toml")
    assert cfg.defaults == {} and cfg.per_vm == {}


def test_metadata_roundtrip_and_namespaced_form() -> None:
    values = {"hwm": 8, "enabled": False, "psi_threshold": 2.5}
    xml = c.metadata_to_xml(values)
    assert c.metadata_from_xml(xml, "vm1") == values
    # libvirt hands the element back with aerate's namespace on it.
    ns = ('<aerate:settings xmlns:aerate="urn:x-aerate:settings:1">'
          '<aerate:setting name="hwm">4</aerate:setting></aerate:settings>')
    assert c.metadata_from_xml(ns, "vm1") == {"hwm": 4}
    assert c.metadata_from_xml(None, "vm1") == {}


def test_corrupt_metadata_names_the_vm() -> None:
    with pytest.raises(c.ConfigError, match="VM vm7"):
        c.metadata_from_xml("<settings><setting name='hwm'>lots</setting></settings>", "vm7")
    with pytest.raises(c.ConfigError, match="VM vm7: aerate metadata is not XML"):
        c.metadata_from_xml("<settings", "vm7")


def test_host_scope_keys_never_come_from_metadata() -> None:
    xml = '<settings><setting name="vhost_user_trusted">true</setting></settings>'
    with pytest.raises(c.ConfigError, match="host-scope setting, read only from the host"):
        c.metadata_from_xml(xml, "web01")
    # In the host file they are fine.
    cfg = c.parse("[vm.web01]\nvhost_user_trusted = true\n")
    assert cfg.layers_for("web01")[1] == {"vhost_user_trusted": True}


def test_stored_entries_are_kept_as_text_whatever_they_say() -> None:
    xml = '<settings><setting name="hwmm">3</setting><setting name="hwm">x</setting></settings>'
    assert c.metadata_entries(xml, "vm") == {"hwmm": "3", "hwm": "x"}
    assert c.metadata_entries(None, "vm") == {}


def test_below_python_3_11_tomli_or_toml_parse_and_without_them_the_error_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts on Python 3.9/3.10 (Debian 11, Ubuntu 22.04, RHEL 9) have no tomllib."""
    import sys
    import tomllib
    import types
    monkeypatch.setitem(sys.modules, "tomllib", None)  # what Python < 3.11 has: no tomllib
    # MOCK: the stdlib module stands in for tomli, the package tomllib was taken from (same
    # API); tomli itself is not installed in the test venv.
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    assert c.parse("[defaults]\nhwm = 8\n").defaults == {"hwm": 8}
    monkeypatch.setitem(sys.modules, "tomli", None)
    # MOCK: toml (python3-toml on Debian 11) is not installed here either: a stand-in with
    # its names, backed by tomllib.
    toml = types.ModuleType("toml")
    toml.loads = tomllib.loads  # type: ignore[attr-defined]
    toml.TomlDecodeError = tomllib.TOMLDecodeError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "toml", toml)
    assert c.parse("[defaults]\nhwm = 9\n").defaults == {"hwm": 9}
    with pytest.raises(c.ConfigError, match="not valid TOML"):
        c.parse("[defaults\n")
    monkeypatch.setitem(sys.modules, "toml", None)
    with pytest.raises(c.ConfigError, match="python3-toml"):
        c.parse("[defaults]\nhwm = 8\n")


BAD_AT_LINE = """\
# aerated.toml
[defaults]
hwm = 16

[vm."web 01"]
reserve_mib = 512
mode = "sometimes"

[vm.db]
delay_ms = "soon"
"""


@pytest.mark.parametrize(
    "text, where, allowed",
    [
        (BAD_AT_LINE, "/etc/aerate/aerated.toml:7: [vm.web 01]: mode='sometimes' is not one "
                      "of auto, punch, balloon, off", ""),
        (BAD_AT_LINE.replace('"sometimes"', '"off"'),
         "/etc/aerate/aerated.toml:10: [vm.db]: delay_ms='soon' is a string; write it "
         "without quotes", "; allowed: an integer from "),
        # TOML has types: a quoted number is a mistake to point out, not a number.
        ("[defaults]\nhwm = \"16\"\n",
         "/etc/aerate/aerated.toml:2: [defaults]: hwm='16' is a string; write it without "
         "quotes", "; allowed: an integer from 1 "),
        ("[defaults]\nenabled = \"yes\"\n",
         "/etc/aerate/aerated.toml:2: [defaults]: enabled='yes' is a string",
         "; allowed: true or false"),
        ("[defaults]\nhwm = 16\nenabled = 1\n",
         "/etc/aerate/aerated.toml:3: [defaults]: enabled=1 must be true or false",
         "; allowed: true or false"),
        ("[defaults]\nhwm = 16\n[vm.a]\n'hwm' = 0\n",
         "/etc/aerate/aerated.toml:4: [vm.a]: hwm=0 is outside", "; allowed: an integer from 1 "),
        ("[defaults]\n\nhwm = = 3\n", "/etc/aerate/aerated.toml:3: not valid TOML", ""),
    ],
)
def test_an_error_names_the_file_line_key_and_allowed_values(
        text: str, where: str, allowed: str) -> None:
    with pytest.raises(c.ConfigError) as e:
        c.parse(text, "/etc/aerate/aerated.toml")
    assert str(e.value).startswith(where), str(e.value)
    assert allowed in str(e.value)


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """``aerated --check-config`` as an operator runs it: the real program."""
    return subprocess.run([sys.executable, "-m", "aerate.host.daemon", "--check-config",
                           "--config", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)


def test_check_config_refuses_a_malformed_file_with_file_line_key(tmp_path: Path) -> None:
    path = tmp_path / "aerated.toml"
    path.write_text("[defaults]\nhwm = 16\ncapacity = -4\n")
    got = check_config(path)
    assert got.returncode == 1 and got.stdout == ""
    assert got.stderr.startswith(f"aerated: {path}:3: [defaults]: capacity=-4 is outside")
    assert "allowed: an integer from" in got.stderr
    missing = check_config(tmp_path / "none.toml")
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_check_config_passes_a_good_file_with_a_one_line_summary(tmp_path: Path) -> None:
    path = tmp_path / "aerated.toml"
    path.write_text("[defaults]\nhwm = 16\n[vm.web01]\nmode = 'off'\nreserve_mib = 64\n")
    got = check_config(path)
    assert got.returncode == 0, got.stderr
    assert got.stdout == (f"{path}: OK: 1 setting(s) in [defaults], 1 [vm.NAME] "
                          "section(s): web01 (2)\n")
