"""prefect.yaml without a server: every deployment names a flow that loads, its parameters
fit the flow's parameter schema (the UI form), every trigger template has a default, the
frequent flows run without a heartbeat, and CI release payloads become safe overrides."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hxp.config import load_config
from hxp.errors import InputError, UnknownUnitError

ROOT = Path(__file__).parents[2]
CONFIG = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = CONFIG["deployments"]
TEMPLATE = re.compile(r"\{\{(.*?)\}\}")


def _id(d: dict[str, Any]) -> str:
    return f"{d['entrypoint'].rsplit(':', 1)[1]}/{d['name']}"


@pytest.fixture(scope="module")
def flows(monkeypatch_module: pytest.MonkeyPatch) -> dict[str, Any]:
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch_module.setenv("HXP_FLOW_HEARTBEAT", "on")  # no process-wide side effect here
    return {
        d["entrypoint"]: load_flow_from_entrypoint(str(ROOT / d["entrypoint"])) for d in DEPLOYMENTS
    }


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_names_are_unique_per_flow(flows: dict[str, Any]) -> None:
    names = [(flows[d["entrypoint"]].name, d["name"]) for d in DEPLOYMENTS]
    assert len(names) == len(set(names)), names
    assert {
        "deploy-stack",
        "deploy-service",
        "deploy-monitoring",
        "rollback",
        "health-sweep",
        "aggregate-metrics",
        "start-stack",
        "stop-stack",
        "restart-stack",
        "restart-service",
        "finish-interrupted",
    } <= {n for n, _ in names}


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_id)
def test_parameters_fit_the_flow_form(deployment: dict[str, Any], flows: dict[str, Any]) -> None:
    from prefect.utilities.callables import parameter_schema

    flow = flows[deployment["entrypoint"]]
    schema = parameter_schema(flow).model_dump_for_openapi()
    assert schema["properties"], "the UI would show no form"
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"{flow.name}: parameter {name} has no docstring entry"
    flow.validate_parameters(deployment.get("parameters", {}))
    for trigger in deployment.get("triggers", []):
        assert set(trigger.get("parameters", {})) <= set(schema["properties"])


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_id)
def test_every_trigger_template_has_a_default(deployment: dict[str, Any]) -> None:
    for trigger in deployment.get("triggers", []):
        for name, value in trigger.get("parameters", {}).items():
            for expression in TEMPLATE.findall(str(value)):
                assert "| default(" in expression, f"{name}: {expression}"


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_id)
def test_runs_that_must_not_overlap_are_limited(deployment: dict[str, Any]) -> None:
    assert deployment.get("concurrency_limit"), "every deployment limits its own overlap"
    if deployment.get("schedules"):
        assert deployment["entrypoint"].startswith("flows/frequent.py:")
        assert deployment["work_pool"]["work_queue_name"] == "frequent"
        assert deployment["concurrency_limit"]["collision_strategy"] == "CANCEL_NEW"


def test_schedules_are_the_documented_intervals() -> None:
    intervals = {_id(d): [s["interval"] for s in d.get("schedules", [])] for d in DEPLOYMENTS}
    assert intervals["health_sweep/every-30s"] == [30]
    assert intervals["aggregate_metrics/every-15s"] == [15]


def test_triggers_listen_for_the_documented_events() -> None:
    expected = {
        "deploy_service/ci-release": ["hxp.ci.release"],
        "restart_service/recover": ["hxp.health.unhealthy"],
        "finish_interrupted/reconcile": ["prefect.flow-run.Failed", "prefect.flow-run.Crashed"],
    }
    found = {_id(d): t["expect"] for d in DEPLOYMENTS for t in d.get("triggers", [])}
    assert found == expected


def test_frequent_flows_run_without_a_heartbeat() -> None:
    code = (
        "import flows.frequent\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().flows.heartbeat_frequency)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HXP_FLOW_HEARTBEAT"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip().splitlines()[-1] == "None", out.stderr


# ---------------------------------------------------------------- CI release payloads

STACK = ROOT / "examples" / "demo" / "stack.yaml"


def test_release_overrides_for_a_service_and_a_model() -> None:
    from flows.deploy import release_overrides

    stack = load_config([str(STACK)], environ={}).stack
    model = sorted(stack.models)[0]
    assert release_overrides(stack, "api", None, None, "1.2.3") == [
        "services.api.env.HXP_RELEASE_VERSION=1.2.3"
    ]
    assert release_overrides(stack, model, None, "abc123", None) == [
        f"models.{model}.revision=abc123"
    ]
    with pytest.raises(InputError, match="models only"):
        release_overrides(stack, "api", None, "abc123", None)
    with pytest.raises(UnknownUnitError):
        release_overrides(stack, "nope", "img:1", None, None)


@pytest.mark.parametrize("image", ["x; rm -rf /", "img:1 --privileged", "$(id)"])
def test_a_hostile_release_image_is_refused_before_anything_runs(image: str) -> None:
    from flows.deploy import release_overrides

    stack = load_config([str(STACK)], environ={}).stack
    overrides = release_overrides(stack, "api", image, None, None)
    with pytest.raises(InputError, match="image"):
        load_config([str(STACK)], environ={}, overrides=overrides)
