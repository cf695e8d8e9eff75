"""No secret value escapes: a stack with `secret_env: {HF_TOKEN: hf-token}` is rendered for every
target and deployed on the process backend while the resolver holds a known token; the token
must not appear in any rendered file, any file under the state directory but the instance's
0600 secrets file, the logs, the plan JSON or (for the flow) Prefect's logs and artifacts."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import pytest
import yaml

from hxp.backends import observe_all
from hxp.backends.base import Remove, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.backends.supervisor import SECRETS_FILE
from hxp.config import ConfigSnapshot, build_config, parse_document
from hxp.plan import plan_stack
from hxp.render import K8S_KUSTOMIZATION, TARGETS, render_stack, write_files
from hxp.store import Store
from tests.support.secret_stack import (
    BLOCK,
    TOKEN,
    files_containing,
    secret_stack_data,
    write_private,
)
from tests.support.stacks import free_port


def effective_config(port: int, block: str = BLOCK):  # type: ignore[no-untyped-def]
    text = yaml.safe_dump(secret_stack_data(port, block), sort_keys=False)
    return build_config([parse_document(text, "sec.yaml")], environ={})


def serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("target", TARGETS)
def test_no_rendered_file_holds_a_secret(target: str, tmp_path: Path) -> None:
    stack = effective_config(free_port()).stack
    files = render_stack(stack, target)  # type: ignore[arg-type]
    assert files
    reference = {  # how each target points at the secret instead of holding it
        "systemd": "EnvironmentFile=/etc/hxp/sec/",
        "compose": '"./secrets/api.env"',
        "k8s": f'name: "{BLOCK}"',
    }[target]
    for f in files:
        assert TOKEN not in f.content, f.path
        if f.path == K8S_KUSTOMIZATION:
            continue  # lists the other files; no unit, so no secret reference of its own
        assert reference in f.content, f.path
    write_files(files, tmp_path / "out")
    assert files_containing(tmp_path / "out", TOKEN) == []


@pytest.fixture
def state(tmp_path: Path):  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    write_private(state / "secrets" / BLOCK, TOKEN + "\n")
    yield state
    backend = ProcessBackend(state)
    for name in backend.observe("sec"):
        backend.apply(Remove(UnitRef("sec", name, name)))


def test_a_deploy_leaks_the_secret_nowhere(
    state: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.logging import disable_run_logger

    import tasks.secrets
    from tasks.deploy import apply_unit
    from tasks.instances import RunContext

    monkeypatch.setattr(tasks.secrets, "prefect_api_configured", lambda: False)
    caplog.set_level(logging.DEBUG)
    port = free_port()
    effective = effective_config(port)
    stack = effective.stack
    store = Store(state)
    plan = plan_stack(stack, observe_all(stack, state), effective.content_hash, {"api"})
    plan_json = json.dumps(plan.to_dict())
    deploy_id = store.begin_deploy("sec", "deploy", effective.content_hash, plan.to_dict())
    store.save_snapshot(ConfigSnapshot.of(effective))
    ctx = RunContext(stack, str(state), deploy_id, effective.content_hash)
    actions = [a for a in plan.actions if a.unit == "api"]
    with disable_run_logger():
        outcome = apply_unit.fn(ctx, "api", "local", actions)
    assert outcome.ok, outcome.reason
    assert serving(port)  # the program got the token (it checks its digest)
    store.finish_deploy(deploy_id, "succeeded", {"units": {"api": outcome.revision}})

    assert TOKEN not in plan_json
    assert TOKEN not in caplog.text
    assert TOKEN not in "\n".join(ProcessBackend(state).logs(UnitRef("sec", "api", "api")))
    assert TOKEN not in json.dumps(store.events("sec"))
    leaks = files_containing(state, TOKEN, skip=frozenset({SECRETS_FILE, BLOCK}))
    assert leaks == []
    # The only copies: the operator's source file and the instance's 0600 secrets file.
    assert files_containing(state, TOKEN) == [
        "process/sec/api/secrets.env",
        f"secrets/{BLOCK}",
    ]


def test_a_secret_in_a_world_readable_file_fails_the_unit_without_starting_it(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.logging import disable_run_logger

    import tasks.secrets
    from tasks.deploy import apply_unit
    from tasks.instances import RunContext, UnitDeployError

    monkeypatch.setattr(tasks.secrets, "prefect_api_configured", lambda: False)
    (state / "secrets" / BLOCK).chmod(0o644)
    effective = effective_config(free_port())
    store = Store(state)
    plan = plan_stack(effective.stack, {}, effective.content_hash, {"api"})
    deploy_id = store.begin_deploy("sec", "deploy", effective.content_hash)
    ctx = RunContext(effective.stack, str(state), deploy_id, effective.content_hash)
    with disable_run_logger(), pytest.raises(UnitDeployError) as info:
        apply_unit.fn(ctx, "api", "local", list(plan.actions))
    reason = info.value.outcome.reason
    assert reason.startswith("services.api.secret_env.HF_TOKEN: ")
    assert "mode 0644" in reason
    assert TOKEN not in reason
    assert info.value.outcome.applied == []
    assert ProcessBackend(state).observe("sec") == {}


@pytest.mark.slow
def test_the_deploy_flow_leaks_no_secret_to_prefect(prefect_server: str, state: Path) -> None:
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    from flows.deploy import deploy_stack

    block = "hxp-leak-test-token"
    Secret(value=TOKEN).save(block, overwrite=True)  # resolved through Prefect, not a file
    (state / "secrets" / BLOCK).unlink()
    port = free_port()
    data = secret_stack_data(port, block)
    del data["models"]  # the model's host is a systemd machine this test does not have
    del data["hosts"]["gpu"]
    stack_file = state.parent / "sec.yaml"
    stack_file.write_text(yaml.safe_dump(data, sort_keys=False))
    result = deploy_stack([str(stack_file)], state_dir=str(state))
    assert result["changed"] is True
    assert serving(port)
    assert TOKEN not in json.dumps(result["plan"])
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(), limit=200)
            if any("waiting for readiness" in log.message for log in logs):
                break
            # Logs reach the API in batches, a moment after the flow ends.
            assert time.monotonic() < deadline, "the flow's logs never reached the API"
            time.sleep(0.5)
        artifacts = client.read_artifacts(limit=200)
    assert artifacts
    assert not [log.message for log in logs if TOKEN in log.message]
    assert not [a.key for a in artifacts if TOKEN in json.dumps(a.data, default=str)]
    assert files_containing(state, TOKEN) == ["process/sec/api/secrets.env"]
