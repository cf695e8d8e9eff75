"""deploy-monitoring end to end with real processes: two simulator models deployed by
deploy-stack, then Prometheus, Alertmanager and a Pushgateway deployed by deploy-monitoring;
every target up; a stopped model's alert reaches a local webhook and resolves on restart; a
second run changes nothing; a changed rule is reloaded, not restarted."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hxp.backends.base import Remove, Start, Stop, UnitRef
from hxp.backends.process import ProcessBackend
from tests.support.monitoring import Webhook, monitored_stack, webhook_receiver

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Path, dict[str, int], Path, Webhook]]:
    state = tmp_path / "state"
    with webhook_receiver() as hook:
        path, ports = monitored_stack(tmp_path, hook.url)
        yield path, ports, state, hook
    backend = ProcessBackend(state)
    for stack in ("mon", "mon-monitoring"):
        for name in backend.observe(stack):
            backend.apply(Remove(UnitRef(stack, name, name)))


def deploy_units(path: Path, state: Path) -> dict[str, Any]:
    from flows.deploy import deploy_stack

    return deploy_stack([str(path)], state_dir=str(state))


def deploy_monitoring(path: Path, state: Path, **kw: Any) -> dict[str, Any]:
    from flows.monitoring import deploy_monitoring as flow

    return flow([str(path)], state_dir=str(state), verify_timeout=30.0, **kw)


def test_alert_reaches_webhook_and_resolves(env) -> None:  # type: ignore[no-untyped-def]
    path, ports, state, hook = env
    deploy_units(path, state)
    first = deploy_monitoring(path, state)
    assert first["units_changed"] is True
    assert first["reloaded"] == []  # just started on the new files
    assert sorted(first["units"]) == ["alertmanager", "prometheus", "pushgateway"]
    jobs = sorted(t.split("/")[0] for t in first["targets_up"])
    assert jobs == ["chat", "coder", "hxp-alertmanager", "hxp-prometheus", "hxp-pushgateway"]
    assert set(first["rule_groups"]) == {"hxp-mon-recording", "hxp-mon-alerts"}
    assert first["alertmanagers"], first
    assert first["urls"]["prometheus"] == f"http://127.0.0.1:{ports['prometheus']}"

    backend = ProcessBackend(state)
    ref = UnitRef("mon", "chat", "chat")
    backend.apply(Stop(ref, grace_seconds=5))
    fired = wait_for(
        lambda: hook.has("HxpUnitDown", "firing", unit="chat", stack="mon", severity="critical"),
        45,
        "HxpUnitDown for chat at the webhook",
    )
    assert not hook.has("HxpUnitDown", "firing", unit="coder")
    backend.apply(Start(ref))
    resolved = wait_for(
        lambda: hook.has("HxpUnitDown", "resolved", unit="chat"),
        60,
        "HxpUnitDown for chat resolved at the webhook",
    )
    print(f"alert fired after {fired:.1f}s, resolved after {resolved:.1f}s")

    again = deploy_monitoring(path, state)
    assert again["units_changed"] is False
    assert again["changed_files"] == []
    assert again["reloaded"] == []

    # A changed threshold reaches Prometheus by reload: same process, new rule.
    pid_before = _prometheus_pid(state)
    changed = deploy_monitoring(path, state, overrides=["monitoring.alerts.queue_waiting=7"])
    assert changed["reloaded"] == ["prometheus"]
    assert changed["units_changed"] is False
    assert _prometheus_pid(state) == pid_before
    rules = httpx.get(f"http://127.0.0.1:{ports['prometheus']}/api/v1/rules").json()
    exprs = [r["query"] for g in rules["data"]["groups"] for r in g["rules"]]
    assert any(e.startswith("vllm:num_requests_waiting") and e.endswith("> 7") for e in exprs)


def _prometheus_pid(state: Path) -> int:
    import json

    sup = state / "process" / "mon-monitoring" / "prometheus" / "supervisor.json"
    pid: int = json.loads(sup.read_text())["child_pid"]
    return pid
