"""Sleep and wake under load: two models behind the real nginx gateway on the process backend
(hxp-vllm-sim as vLLM), continuous load on both. Sleeping one leaves the other untouched (0
failed requests); requests to the sleeping one get a clear 503 at once, never hang; after a
wake it is back in the gateway only once a completion succeeded, and serves again."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from hxp.config import load_config
from hxp.errors import LifecycleError
from hxp.io.gateway import NginxGateway
from hxp.lifecycle import State
from hxp.store import Store
from tests.support.loadgen import Answer, ContinuousLoad
from tests.support.stacks import SHORT_BAKE, SIM_ARGS, free_port, free_range, tear_down_fleet

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
STACK = "slp"


def _model(name: str, port: int, sleep_mode: bool) -> list[str]:
    return [
        f"  {name}:",
        "    host: local",
        "    engine: simulator",
        f"    python: {sys.executable}",
        f"    model: hxp-sim/{name}-0.5B",  # a size in the name: weights to record
        f"    served_name: {name}",
        f"    port: {port}",
        f"    sleep_mode: {'true' if sleep_mode else 'false'}",
        f"    simulator_args: {json.dumps(list(SIM_ARGS))}",
        "    health:",
        f'      http: {{url: "http://127.0.0.1:{port}/health"}}',
        "      interval: 500ms",
        "      timeout: 1s",
        "      retries: 3",
        "      start_period: 10s",
    ]


@pytest.fixture
def two_models(tmp_path: Path):  # type: ignore[no-untyped-def]
    base, chat_gw, code_gw = free_range(4), free_port(), free_port()
    lines = [
        f"stack: {STACK}",
        "hosts:",
        "  local: {backend: process}",
        f"deploy: {{bake: {SHORT_BAKE}}}",
        "models:",
        *_model("chat", base, sleep_mode=True),
        *_model("code", base + 2, sleep_mode=False),
        "gateway:",
        "  host: local",
        f"  routes: {{chat: {chat_gw}, code: {code_gw}}}",
        "  drain_timeout: 10s",
    ]
    path = tmp_path / "stack.yaml"
    path.write_text("\n".join(lines) + "\n")
    state = tmp_path / "state"
    yield path, state, f"http://127.0.0.1:{chat_gw}", f"http://127.0.0.1:{code_gw}"
    tear_down_fleet(path, state, STACK)


def deploy(path: Path, state: Path) -> None:
    from flows.deploy import deploy_stack

    assert deploy_stack([str(path)], state_dir=str(state))["changed"]


def routes(path: Path, state: Path) -> dict[str, list[str]]:
    stack = load_config([path], {}).stack
    assert stack.gateway is not None
    return NginxGateway(state, STACK, stack.gateway).servers()


def statuses(answers: list[Answer]) -> dict[int, int]:
    out: dict[int, int] = {}
    for a in answers:
        out[a.status] = out.get(a.status, 0) + 1
    return out


def test_sleep_and_wake_under_load(two_models, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from flows.lifecycle import sleep_model, wake_model
    from hxp.health import SweepSettings
    from hxp.io import sleep as sleep_api
    from hxp.io.sweep import sweep_stack

    path, state, chat_url, code_url = two_models
    deploy(path, state)
    before = routes(path, state)
    assert len(before["chat"]) == 1
    assert len(before["code"]) == 1

    # What happens, in order, while the wake runs: completions tried and gateway edits.
    seen: list[tuple[str, Any]] = []
    real_probe, real_add = sleep_api.probe_model_api, NginxGateway.add

    async def probe(base: str, served: str, timeout: float):  # type: ignore[no-untyped-def]
        result = await real_probe(base, served, timeout)
        seen.append(("completion", result.ok))
        return result

    def add(self, unit, *servers):  # type: ignore[no-untyped-def]
        seen.append(("add", unit))
        return real_add(self, unit, *servers)

    monkeypatch.setattr(sleep_api, "probe_model_api", probe)
    monkeypatch.setattr(NginxGateway, "add", add)

    code_load = ContinuousLoad(code_url, "code", concurrency=8).start()
    chat_load = ContinuousLoad(chat_url, "chat", concurrency=4).start()
    time.sleep(1.0)

    slept = sleep_model(str(path), "chat", state_dir=str(state), level=1)
    asleep_at = time.monotonic()
    assert slept["ok"], slept
    assert routes(path, state)["chat"] == []
    assert routes(path, state)["code"] == before["code"]
    store = Store(state)
    rows = store.lifecycle(STACK)
    assert rows["chat"].state is State.SLEEPING
    assert rows["code"].state is State.RUNNING
    held = store.sleeping(STACK)["chat"]
    assert held["level"] == 1
    assert held["host_bytes"] == held["weights_bytes_per_gpu"] > 0  # the weights in CPU RAM
    with httpx.Client(timeout=5) as c:
        assert c.get(
            f"http://127.0.0.1:{before['chat'][0].rsplit(':', 1)[1]}/is_sleeping"
        ).json() == {"is_sleeping": True}

    from hxp_cli import main

    assert main(["status", "-f", str(path), "--state-dir", str(state), "--json"]) == 0
    shown = {row["instance"]: row["model"] for row in json.loads(capsys.readouterr().out)}
    assert shown["chat"]["health"] == "sleeping"
    assert shown["code"]["health"] != "sleeping"
    assert shown["chat"]["gateway"] == "out"

    # `hxp start` leaves it asleep (only `hxp wake` serves it again).
    from flows.lifecycle import start_stack

    started = start_stack(str(path), units=["chat"], state_dir=str(state))
    assert "asleep" in started["units"]["chat"]["instances"]["chat"]
    assert routes(path, state)["chat"] == []

    time.sleep(2.0)  # requests to the sleeping model meanwhile: each a fast 503
    # A health sweep neither fails it nor puts it back behind the gateway.
    report = sweep_stack(load_config([path], {}).stack, state, SweepSettings())
    chat_health = next(u for u in report.units if u.unit == "chat")
    assert chat_health.status.value != "unhealthy", chat_health
    assert routes(path, state)["chat"] == []
    assert Store(state).lifecycle(STACK)["chat"].state is State.SLEEPING
    asleep_until = time.monotonic()

    seen.clear()
    woke = wake_model(str(path), "chat", state_dir=str(state))
    awake_at = time.monotonic()
    assert woke["ok"], woke
    time.sleep(1.0)
    code_answers, chat_answers = code_load.stop(), chat_load.stop()

    # The other model: every request served, none failed, none slow.
    assert len(code_answers) > 100
    assert statuses(code_answers) == {200: len(code_answers)}, statuses(code_answers)
    assert not any(a.aborted for a in code_answers)

    # The sleeping one: a clear 503 from the gateway at once, never a hang.
    during = [a for a in chat_answers if asleep_at <= a.at < asleep_until]
    assert len(during) > 20
    assert statuses(during) == {503: len(during)}, statuses(during)
    assert max(a.seconds for a in during) < 0.5, max(a.seconds for a in during)
    assert all(a.seconds < 5.0 for a in chat_answers)  # nothing hung, before or after

    # Back in the gateway only once a completion succeeded, and serving again.
    first_add = seen.index(("add", "chat"))
    assert ("completion", True) in seen[:first_add], seen
    assert routes(path, state)["chat"] == before["chat"]
    assert Store(state).lifecycle(STACK)["chat"].state is State.RUNNING
    assert "chat" not in Store(state).sleeping(STACK)
    after = [a for a in chat_answers if a.at >= awake_at]
    assert after
    assert statuses(after) == {200: len(after)}, statuses(after)


def test_a_wake_that_serves_no_completion_stays_out_of_the_gateway(  # type: ignore[no-untyped-def]
    two_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.lifecycle import sleep_model, wake_model
    from hxp.health import ProbeResult
    from hxp.io import sleep as sleep_api

    path, state, chat_url, _ = two_models
    deploy(path, state)
    assert sleep_model(str(path), "chat", state_dir=str(state), level=2)["ok"]
    assert Store(state).sleeping(STACK)["chat"]["host_bytes"] == 0  # level 2: nothing kept

    async def never(base: str, served: str, timeout: float) -> ProbeResult:
        return ProbeResult(False, f"completion {base}", "status 500", 0.0)

    monkeypatch.setattr(sleep_api, "probe_model_api", never)
    with pytest.raises(LifecycleError) as err:
        wake_model(str(path), "chat", state_dir=str(state))
    assert "no completion succeeded" in str(err.value)
    assert routes(path, state)["chat"] == []
    assert Store(state).lifecycle(STACK)["chat"].state is State.FAILED
    with httpx.Client(timeout=5) as c:
        answer = c.post(f"{chat_url}/v1/completions", json={"model": "chat", "prompt": "x"})
    assert answer.status_code == 503


def test_a_level_2_wake_reloads_the_weights_before_it_serves(two_models) -> None:  # type: ignore[no-untyped-def]
    """Level 2 discards the weights: the wake reloads them (the simulator fails every
    completion until then, so without the reload the wake's completion check fails)."""
    from flows.lifecycle import sleep_model, wake_model

    path, state, chat_url, _ = two_models
    deploy(path, state)
    assert sleep_model(str(path), "chat", state_dir=str(state), level=2)["ok"]
    assert wake_model(str(path), "chat", state_dir=str(state))["ok"]
    with httpx.Client(timeout=5) as c:
        answer = c.post(f"{chat_url}/v1/completions", json={"model": "chat", "prompt": "x"})
    assert answer.status_code == 200
    assert Store(state).lifecycle(STACK)["chat"].state is State.RUNNING


def test_a_model_that_did_not_opt_in_is_refused_with_exit_2(two_models, capsys) -> None:  # type: ignore[no-untyped-def]
    from hxp_cli import main

    path, state, _, _ = two_models
    for command in ("sleep", "wake"):
        code = main([command, "-f", str(path), "--state-dir", str(state), "code"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "'code'" in err
        assert "models.code.sleep_mode" in err


def _child_pid(state: Path, instance: str) -> int:
    from hxp.backends.process import ProcessBackend

    sup = json.loads(
        (ProcessBackend(state).root / STACK / instance / "supervisor.json").read_text()
    )
    return int(sup["child_pid"])


def test_restart_apply_and_a_crash_of_a_sleeping_model(two_models, capsys) -> None:  # type: ignore[no-untyped-def]
    """A restart of a sleeping model is refused (exit 2, naming it and `hxp wake`, nothing
    changed); an apply of the same stack leaves it asleep and says so; a crash while asleep
    is a crash (not `stopped`): status says so, the supervisor restarts it awake, gated, back
    behind the gateway, and an event tells the operator it no longer sleeps."""
    import os
    import signal

    from flows.deploy import deploy_stack
    from flows.lifecycle import sleep_model, supervise_stack
    from hxp.backends.process import ProcessBackend
    from hxp.lifecycle import SLEEP_LOST
    from hxp_cli import main

    path, state, chat_url, _ = two_models
    deploy(path, state)
    before = routes(path, state)
    assert sleep_model(str(path), "chat", state_dir=str(state))["ok"]
    pid = _child_pid(state, "chat")

    for rolling in ([], ["--rolling"]):
        argv = ["restart", "-f", str(path), "--state-dir", str(state), *rolling, "chat"]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, err
        assert "refused: model 'chat' is asleep" in err
        assert "`hxp wake chat` first" in err
        assert Store(state).lifecycle(STACK)["chat"].state is State.SLEEPING
        assert _child_pid(state, "chat") == pid  # not restarted
        assert routes(path, state)["chat"] == []

    again = deploy_stack([str(path)], state_dir=str(state))
    assert again["changed"] is False
    reasons = {n["instance"]: n["reason"] for n in again["plan"]["noops"]}
    assert "asleep: left asleep (`hxp wake chat` serves it)" in reasons["chat"]
    assert "asleep" not in reasons["code"]
    assert Store(state).lifecycle(STACK)["chat"].state is State.SLEEPING
    assert routes(path, state)["chat"] == []

    # The sleeping replica crashes; its backend restarts it (awake: vLLM always starts so).
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = ProcessBackend(state).observe(STACK).get("chat")
        if seen is not None and seen.running and (seen.restarts or 0) >= 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the process backend did not restart the crashed replica")
    capsys.readouterr()
    assert main(["status", "-f", str(path), "--state-dir", str(state), "--json"]) == 0
    shown = {row["instance"]: row["model"] for row in json.loads(capsys.readouterr().out)}
    assert shown["chat"]["health"] == "crashed", shown["chat"]

    report = supervise_stack(str(path), state_dir=str(state))
    assert "chat" in report["restarted"], report
    assert Store(state).lifecycle(STACK)["chat"].state is State.RUNNING
    assert "chat" not in Store(state).sleeping(STACK)
    assert routes(path, state)["chat"] == before["chat"]
    events = [e["message"] for e in Store(state).events(STACK) if e["kind"] == "sleep-lost"]
    assert len(events) == 1
    assert SLEEP_LOST in events[0]
    with httpx.Client(timeout=5) as c:
        answer = c.post(f"{chat_url}/v1/completions", json={"model": "chat", "prompt": "x"})
    assert answer.status_code == 200


def test_an_apply_that_changes_a_sleeping_model_starts_it_awake_and_says_so(two_models) -> None:  # type: ignore[no-untyped-def]
    from flows.deploy import deploy_stack
    from flows.lifecycle import sleep_model

    path, state, chat_url, _ = two_models
    deploy(path, state)
    assert sleep_model(str(path), "chat", state_dir=str(state))["ok"]
    text = path.read_text()
    changed = text.replace("      interval: 500ms", "      interval: 400ms", 1)
    assert changed != text
    path.write_text(changed)
    result = deploy_stack([str(path)], state_dir=str(state))
    assert result["changed"] is True
    warnings = result["plan"].get("warnings", [])
    assert any(w.startswith("chat is asleep and its spec changed") for w in warnings), warnings
    assert "chat" in result["units"]
    store = Store(state)
    assert store.asleep(STACK) == {}
    assert store.sleeping(STACK) == {}
    assert {r.state for r in store.lifecycle(STACK).values()} == {State.RUNNING}
    assert len(routes(path, state)["chat"]) == 1
    with httpx.Client(timeout=5) as c:
        answer = c.post(f"{chat_url}/v1/completions", json={"model": "chat", "prompt": "x"})
    assert answer.status_code == 200
