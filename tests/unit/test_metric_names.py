"""hxp.metric_names is the one table of names: what the simulator and the exporter actually put
on their pages is what it says, and it stays a leaf (no project imports)."""

from __future__ import annotations

import ast
from pathlib import Path

from prometheus_client import generate_latest

from hxp import metric_names
from hxp.querylint import exposition_series

ROOT = Path(__file__).parents[2]


def test_the_simulator_serves_exactly_the_vllm_table() -> None:
    from hxp.sim.vllm import SimMetrics

    body, _ = SimMetrics("chat", 4096).render("text/plain")
    served = {n for n in exposition_series(body.decode()) if n.startswith("vllm:")}
    assert served == metric_names.vllm_series()


def test_the_simulator_page_has_the_tables_types_help_and_labels() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from hxp.sim.vllm import SimMetrics

    body, _ = SimMetrics("chat", 4096).render("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for family in metric_names.VLLM:
        seen = families[family.registered]
        assert (seen.type, seen.documentation) == (family.kind, family.help), family.name
        labels = {k for s in seen.samples for k in s.labels if k != "le"}
        assert labels <= set(family.labels), family.name


def test_the_exporter_registers_exactly_the_hxp_table() -> None:
    from hxp.io.telemetry import REGISTRY

    served = exposition_series(generate_latest(REGISTRY).decode())
    assert served == frozenset().union(*(f.series() for f in metric_names.HXP))
    assert metric_names.exporter_series() >= served | set(metric_names.FLEET_SERIES)


def test_counter_series_carry_total_and_created() -> None:
    family = metric_names.HXP_DEPLOYS
    assert family.registered == "hxp_deploys"
    assert family.series() == {"hxp_deploys_total", "hxp_deploys_created"}


def test_the_names_module_imports_nothing_of_the_project() -> None:
    tree = ast.parse((ROOT / "hxp" / "metric_names.py").read_text())
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    project = ("hxp", "tasks", "flows", "blocks")
    assert not {m for m in imported if m.split(".")[0] in project}, imported


def test_every_fleet_name_the_aggregator_writes_is_in_the_table() -> None:
    """A built-in fleet:* name written out in hxp/metrics.py must be one FLEET_SERIES lists
    (else it would be published with the help text of a declared series)."""
    tree = ast.parse((ROOT / "hxp" / "metrics.py").read_text())
    written = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("fleet:")
        and node.value != "fleet:"
    }
    assert len(written) >= 10
    assert written <= set(metric_names.FLEET_SERIES), written - set(metric_names.FLEET_SERIES)
