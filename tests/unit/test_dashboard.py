"""The Grafana dashboard (deploy/grafana/aerate.json) asks only for what aerated exports.

The names come from a real render of the metrics: the real daemon over daemon_sim's MOCK
of libvirtd with a punch, a balloon, an unmanaged and a refused VM (metrics_page.py), so
a renamed or dropped series turns this red, not a hand-kept list."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from metrics_page import everything
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "aerate.json"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


def exported() -> dict[str, set[str]]:
    """Every sample name of a full render, with its label names."""
    async def render() -> str:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            return (await everything(d))[0]
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(asyncio.run(render())):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def parse(expr: str) -> tuple[set[str], dict[str, set[str]], set[str] | None]:
    """PromQL ``expr`` -> (metric names, label names matched per metric, grouping labels:
    None when the expression keeps every label)."""
    grouping: set[str] | None = None
    for m in _GROUPING.finditer(expr):
        if m.group(1) in ("by", "without"):
            labels = {x.strip() for x in m.group(2).split(",") if x.strip()}
            grouping = labels if m.group(1) == "by" else grouping
    matched: dict[str, set[str]] = {}
    for m in _SELECTOR.finditer(expr):
        matched.setdefault(m.group(1), set()).update(
            _MATCHER.findall(_STRING.sub('""', m.group(2))))
    bare = _GROUPING.sub(" ", re.sub(r"\{[^}]*\}", " ", re.sub(r"\[[^]]*\]", " ",
                                                               _STRING.sub('""', expr))))
    names = set()
    for m in _IDENT.finditer(bare):
        follows = bare[m.end():].lstrip()[:1]
        if follows != "(" and m.group() not in _KEYWORDS \
                and not re.fullmatch(r"\d+[smhdwy]?", m.group()):
            names.add(m.group())
    return names, matched, grouping


def queries(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, expression, legend format) of every target, nested rows included."""
    out = []
    stack = list(dash["panels"])
    while stack:
        p = stack.pop()
        stack.extend(p.get("panels", []))
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"], t.get("legendFormat", "")))
    return out


def test_the_parser_finds_names_and_labels() -> None:
    names, matched, grouping = parse(
        'sum by (vm) (rate(aerate_x_total{vm=~"$vm", a!="b{c}"}[5m])) / on(vm) aerate_y > 1')
    assert names == {"aerate_x_total", "aerate_y"}
    assert matched == {"aerate_x_total": {"vm", "a"}} and grouping == {"vm"}


def test_every_metric_and_label_the_dashboard_uses_is_exported() -> None:
    dash = json.loads(DASHBOARD.read_text())
    have = exported()
    assert any(n.endswith("_total") for n in have) and "aerate_balloon_target_bytes" in have
    used: set[str] = set()
    for title, expr, legend in queries(dash):
        names, matched, grouping = parse(expr)
        assert names, f"{title}: no metric in {expr!r}"
        for name in names:
            assert name in have, f"{title}: {name} is not exported (expr {expr!r})"
        for name, labels in matched.items():
            assert labels <= have[name], f"{title}: {name} has no label {labels - have[name]}"
        kept = grouping if grouping is not None else set().union(*(have[n] for n in names))
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            assert label in kept, f"{title}: legend {{{{{label}}}}} is not a label of {expr!r}"
        used |= names
    for var in dash["templating"]["list"]:
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else str(q)
        for metric, label in re.findall(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", q):
            assert metric in have and label in have[metric], q
    # The panels the dashboard promises (README "Metrics").
    for name in ("aerate_backing_allocated_bytes", "aerate_discard_verified_bytes_total",
                 "aerate_discarded_bytes_total", "aerate_vms_refused",
                 "aerate_balloon_actual_bytes", "aerate_balloon_target_bytes",
                 "aerate_host_pressure", "aerate_effective_setting", "aerate_session_running",
                 "aerate_libvirt_connected"):
        assert name in used, f"no panel shows {name}"


def test_panels_are_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in dash["templating"]["list"]}
    for p in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + \
            p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"] and p.get("description"), p["title"]
            for t in p["targets"]:
                for var in re.findall(r"\$(\w+)", t["expr"]):
                    assert var in names, f"{p['title']}: ${var} is not a dashboard variable"
