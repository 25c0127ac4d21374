"""The tunables table: parsing, bounds, layering, and the errors an operator sees."""

from __future__ import annotations

import pytest

from aerate.agent import settings as s

pytestmark = pytest.mark.unit


def test_defaults_follow_the_seed() -> None:
    d = s.defaults()
    assert (d["min_order"], d["hwm"], d["capacity"], d["delay_ms"]) == (9, 32, 32, 100)
    assert d["enabled"] is True and d["mode"] == "auto"


@pytest.mark.parametrize("text, value", [("16", 16), (" 16 ", 16)])
def test_text_values_are_typed(text: str, value: int) -> None:
    assert s.coerce("hwm", text) == value


@pytest.mark.parametrize("text, value", [("on", True), ("False", False), ("1", True)])
def test_bool_words(text: str, value: bool) -> None:
    assert s.coerce("enabled", text) is value


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("hwm", "0", "outside"),
        ("hwm", "many", "not a valid int"),
        ("min_order", 8, "outside"),
        ("mode", "fast", "not one of"),
        ("enabled", "maybe", "not a valid bool"),
        ("hwm", True, "must be an integer"),
        ("nosuch", 1, "unknown setting 'nosuch'"),
    ],
)
def test_bad_values_name_the_origin_and_the_fix(name: str, value: object, message: str) -> None:
    with pytest.raises(s.SettingError) as e:
        s.coerce(name, value, origin="/etc/aerate/aerated.toml [defaults]")
    assert message in str(e.value) and "/etc/aerate/aerated.toml" in str(e.value)


def test_layers_later_wins_and_guest_view_filters_host_keys() -> None:
    merged = s.layered([{"hwm": 8, "floor": 0.7}, {"hwm": 4}])
    assert merged["hwm"] == 4 and merged["floor"] == 0.7 and merged["capacity"] == 32
    view = s.guest_view(merged)
    assert "floor" not in view and "mode" not in view and view["hwm"] == 4


def test_assignments() -> None:
    assert s.parse_assignments(["hwm=16", "psi_threshold=2.5"]) == {"hwm": 16,
                                                                     "psi_threshold": 2.5}
    with pytest.raises(s.SettingError, match="not key=value"):
        s.parse_assignments(["hwm"])


def test_every_row_is_documented_and_its_default_valid() -> None:
    for row in s.TABLE:
        assert row.help, row.name
        assert s.coerce(row.name, row.default) == row.default
    assert len(s.describe()) == len(s.TABLE)
