"""The shipped dashboard: generated from one source, importable (fixed uid, a datasource
variable, every query on it). Its queries are run against real Prometheus in test_e2e.py."""

from __future__ import annotations

import json

from dashboards.generate import OUTPUT, UID, dashboard, render


def test_committed_dashboard_is_what_the_generator_makes() -> None:
    assert OUTPUT.read_text() == render(), "run: python -m dashboards.generate"


def test_dashboard_has_a_fixed_uid_and_variables() -> None:
    board = json.loads(OUTPUT.read_text())
    assert board["uid"] == UID
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "namespace", "service", "pod"]
    assert board["templating"]["list"][0]["query"] == "prometheus"


def test_every_panel_uses_the_datasource_variable_and_has_a_unique_place() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert "dnsprobe_" in target["expr"]
    places = {(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels}
    assert len(places) == len(panels)
