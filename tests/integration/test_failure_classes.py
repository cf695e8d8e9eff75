"""A unit's failure is classified where it happens (FailureClass on the outcome), on the process
backend: a unit that never becomes ready, one that stops as it starts, one that passes its gate
and then stops before the deploy commits."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from hxp.backends import observe_all
from hxp.backends.base import Remove, Stop, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.config import ConfigSnapshot, build_config, parse_document
from hxp.errors import FailureClass
from hxp.plan import StepKind, plan_stack
from hxp.store import Store
from tasks.deploy import apply_unit, verify_units
from tasks.instances import RunContext, UnitDeployError
from tests.support.stacks import free_port


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    yield state
    backend = ProcessBackend(state)
    for name in backend.observe("fc"):
        backend.apply(Remove(UnitRef("fc", name, name)))


def run(state: Path, command: list[str], health: str) -> tuple[RunContext, list]:  # type: ignore[type-arg]
    port = free_port()
    text = textwrap.dedent(
        f"""\
        stack: fc
        hosts:
          local: {{backend: process}}
        services:
          api:
            host: local
            command: {command!r}
            ports: {{http: {port}}}
        """
    ) + textwrap.indent(health.format(port=port), "    ")
    effective = build_config([parse_document(text, "fc.yaml")], environ={})
    store = Store(state)
    plan = plan_stack(effective.stack, observe_all(effective.stack, state), "h", {"api"})
    deploy_id = store.begin_deploy("fc", "deploy", effective.content_hash, plan.to_dict())
    store.save_snapshot(ConfigSnapshot.of(effective))
    return RunContext(effective.stack, str(state), deploy_id, effective.content_hash), list(
        plan.actions
    )


FAST_HTTP = """\
health:
  http: {{url: "http://127.0.0.1:{port}/"}}
  interval: 200ms
  timeout: 200ms
  retries: 2
  start_period: 1s
"""


def test_a_unit_that_never_answers_fails_readiness(state: Path) -> None:
    ctx, actions = run(state, [sys.executable, "-c", "import time; time.sleep(60)"], FAST_HTTP)
    with disable_run_logger(), pytest.raises(UnitDeployError) as info:
        apply_unit.fn(ctx, "api", "local", actions)
    assert info.value.outcome.failure is FailureClass.READINESS
    assert info.value.outcome.applied == [("api", StepKind.CREATE)]


def test_a_unit_that_stops_as_it_starts_has_crashed(state: Path) -> None:
    ctx, actions = run(state, [sys.executable, "-c", "raise SystemExit(3)"], "")
    with disable_run_logger(), pytest.raises(UnitDeployError) as info:
        apply_unit.fn(ctx, "api", "local", actions)
    assert info.value.outcome.failure is FailureClass.CRASHED


def test_a_unit_that_stops_after_its_gate_fails_verification_as_crashed(state: Path) -> None:
    ctx, actions = run(state, [sys.executable, "-c", "import time; time.sleep(60)"], "")
    with disable_run_logger():
        outcome = apply_unit.fn(ctx, "api", "local", actions)
        assert outcome.ok
        assert outcome.failure is FailureClass.OTHER  # nothing failed (the default)
        ProcessBackend(state).apply(Stop(UnitRef("fc", "api", "api"), 2.0))
        failed = verify_units.fn(ctx, [outcome])
    assert failed is not None
    assert failed.failure is FailureClass.CRASHED
    assert "stopped after it was ready" in failed.reason
