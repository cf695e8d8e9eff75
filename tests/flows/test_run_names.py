"""Flow run names come from one place (flows.naming): `<action>-<stack>[-<units>]`."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.usefixtures("prefect_server")]


def _named_runs(stack_file: str, units: list[str] | None) -> tuple[str, str, str]:
    from prefect import flow
    from prefect.runtime import flow_run

    from flows.naming import stack_run_name

    @flow(name="restart-stack", flow_run_name=stack_run_name())
    def by_flow_name(stack_files: list[str], units: list[str] | None = None) -> str:
        return str(flow_run.name)

    @flow(name="x", flow_run_name=stack_run_name("down", "-monitoring"))
    def by_action(stack_files: list[str], units: list[str] | None = None) -> str:
        return str(flow_run.name)

    @flow(name="stop-service", flow_run_name=stack_run_name())
    def one_service(stack_files: list[str], service: str) -> str:
        return str(flow_run.name)

    return (
        by_flow_name([stack_file], units),
        by_action([stack_file], units),
        one_service([stack_file], "web"),
    )


def test_a_run_is_named_after_the_stack_and_its_units(tmp_path: Path) -> None:
    path = tmp_path / "whatever.yaml"
    path.write_text("stack: shop\nhosts: {local: {backend: process}}\n")
    assert _named_runs(str(path), ["api", "web"]) == (
        "restart-shop-api+web",
        "down-shop-monitoring-api+web",
        "stop-shop-web",
    )
    assert _named_runs(str(path), None)[:2] == ("restart-shop", "down-shop-monitoring")


def test_a_file_that_does_not_parse_names_the_run_after_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("stack: [unclosed\n")
    assert _named_runs(str(path), None)[0] == "restart-broken.yaml"
