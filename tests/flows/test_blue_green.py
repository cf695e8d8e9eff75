"""Blue-green model migration behind the nginx gateway, under load: no request may fail.

The model servers are hxp-vllm-sim, the development double of vLLM; nginx is real.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from hxp.backends.base import Remove, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.config import load_config
from hxp.errors import DeployError
from hxp.io.gateway import NginxGateway
from hxp.store import Store
from tests.support.loadgen import BackgroundLoad
from tests.support.stacks import free_port, free_range

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
REQUESTS = 10_000


@pytest.fixture
def fleet(tmp_path: Path):  # type: ignore[no-untyped-def]
    base, gateway = free_range(4), free_port()
    path = tmp_path / "fleet.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            stack: bg
            hosts:
              local: {{backend: process}}
            models:
              chat:
                host: local
                engine: simulator
                python: {sys.executable}
                model: hxp-sim/chat
                revision: r1
                served_name: chat
                replicas: 2
                port: {base}
                simulator_args: [--latency-ms, "2", --tokens-per-second, "2000"]
                health:
                  http: {{url: "http://127.0.0.1:{base}/health"}}
                  interval: 500ms
                  timeout: 1s
                  retries: 3
                  start_period: 10s
            gateway:
              host: local
              routes: {{chat: {gateway}}}
              drain_timeout: 10s
            """
        )
    )
    state = tmp_path / "state"
    yield path, state, f"http://127.0.0.1:{gateway}"
    stack = load_config([path], {}).stack
    assert stack.gateway is not None
    NginxGateway(state, "bg", stack.gateway).stop()
    backend = ProcessBackend(state)
    for name in backend.observe("bg"):
        backend.apply(Remove(UnitRef("bg", name, name)))


def deploy(files: list[Path], state: Path) -> dict:  # type: ignore[type-arg]
    from flows.deploy import deploy_stack

    return deploy_stack([str(f) for f in files], state_dir=str(state))


def overlay(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def test_new_revision_moves_in_under_load_without_a_failed_request(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, state, url = fleet
    assert deploy([path], state)["changed"]
    assert sorted(ProcessBackend(state).observe("bg")) == ["chat-0", "chat-1"]

    load = BackgroundLoad(url, "chat", REQUESTS, concurrency=32).start()
    time.sleep(1.0)
    v2 = overlay(tmp_path, "v2", "models:\n  chat:\n    revision: r2\n")
    result = deploy([path, v2], state)
    moved = load.join()

    assert [a["kind"] for a in result["plan"]["actions"]] == ["replace", "replace"]
    assert moved.sent == REQUESTS
    assert moved.failed == 0, moved.errors
    print(f"\n{moved.sent} requests at {moved.rate:.0f}/s during the migration, 0 failed")
    seen = ProcessBackend(state).observe("bg")
    assert sorted(seen) == ["chat-0-g", "chat-1-g"]
    want = load_config([path, v2], {}).stack
    from hxp.config import unit_config_hash

    assert {o.config_hash for o in seen.values()} == {unit_config_hash(want, "chat")}
    events = [e["message"] for e in Store(state).events("bg") if e["kind"] == "blue-green"]
    assert len(events) == 2
    # Moving back to slot 0 works the same way, and a re-apply changes nothing.
    assert deploy([path, v2], state)["changed"] is False


def test_a_revision_that_never_gets_ready_leaves_the_old_one_serving(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, state, url = fleet
    deploy([path], state)
    good = ProcessBackend(state).observe("bg")
    load = BackgroundLoad(url, "chat", REQUESTS, concurrency=32).start()
    time.sleep(1.0)
    bad = overlay(
        tmp_path,
        "bad",
        "models:\n  chat:\n    revision: r3\n    simulator_args: [--never-ready]\n"
        "    health: {start_period: 2s}\n",
    )
    with pytest.raises(DeployError) as err:
        deploy([path, bad], state)
    result = load.join()
    assert result.failed == 0, result.errors
    assert result.sent == REQUESTS
    assert "never became ready" in str(err.value)
    assert "new slot removed; the old one kept serving" in str(err.value)
    now = ProcessBackend(state).observe("bg")
    assert {k: v.config_hash for k, v in now.items()} == {k: v.config_hash for k, v in good.items()}
    last = Store(state).deploys("bg")[0]
    assert last.status == "failed"
    assert last.result is not None
    assert last.result["failed_unit"] == "chat"
