"""Moves and stops against a simulator that shuts down as vLLM 0.33 does (issue 16, item 1):
on SIGTERM every request it still holds ends with finish_reason "abort" (`--shutdown-timeout 0`,
vLLM's default), so only hxp's drain before the SIGTERM keeps requests whole. The other
zero-failure tests use the default pin (0.11.0), whose engine stops first and cuts them."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from hxp.store import Store
from tests.support.loadgen import BackgroundLoad
from tests.support.stacks import SIM_ARGS, free_port, free_range, sim_fleet, tear_down_fleet

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
REQUESTS = 10_000
#: vLLM 0.33 aborting everything on SIGTERM (hxp would pass its stop_timeout otherwise).
ABORTING = 'models:\n  chat:\n    vllm: {version: "0.33.0"}\n'


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def deploy(files: list[Path], state: Path) -> dict[str, Any]:
    from flows.deploy import deploy_stack

    result: dict[str, Any] = deploy_stack([str(f) for f in files], state_dir=str(state))
    return result


def test_blue_green_against_an_aborting_vllm_fails_no_request(tmp_path: Path) -> None:
    base, gateway = free_range(4), free_port()
    args = (*SIM_ARGS, "--shutdown-timeout", "0")
    path = sim_fleet(tmp_path / "fleet.yaml", "sd", base, gateway, simulator_args=args)
    state = tmp_path / "state"
    files = [path, write(tmp_path, "v033", ABORTING)]
    try:
        deploy(files, state)
        load = BackgroundLoad(f"http://127.0.0.1:{gateway}", "chat", REQUESTS, 32).start()
        time.sleep(1.0)
        result = deploy([*files, write(tmp_path, "r2", "models:\n  chat:\n    revision: r2\n")],
                        state)  # fmt: skip
        moved = load.join()
        assert [a["kind"] for a in result["plan"]["actions"]] == ["replace", "replace"]
        print(f"\n{moved.sent} requests at {moved.rate:.0f}/s against vLLM 0.33, 0 failed")
        assert moved.sent == REQUESTS
        assert moved.failed == 0, moved.errors
    finally:
        tear_down_fleet(path, state, "sd")


def test_a_stop_past_its_drain_cap_cuts_streams_and_says_how_many(tmp_path: Path) -> None:
    from flows.lifecycle import stop_stack

    base, gateway = free_range(2), free_port()
    args = ("--latency-ms", "2", "--tokens-per-second", "20", "--shutdown-timeout", "0")
    path = sim_fleet(tmp_path / "fleet.yaml", "sc", base, gateway, replicas=1, revision=None,
                     simulator_args=args)  # fmt: skip
    state = tmp_path / "state"
    files = [path, write(tmp_path, "v033", ABORTING)]
    last: list[dict[str, Any]] = []
    try:
        deploy(files, state)

        def stream() -> None:
            body = {"model": "chat", "prompt": "x", "max_tokens": 1000, "ignore_eos": True,
                    "stream": True}  # fmt: skip
            with httpx.stream("POST", f"http://127.0.0.1:{gateway}/v1/completions", json=body,
                              timeout=60) as reply:  # fmt: skip
                events = [json.loads(x[6:]) for x in reply.iter_lines() if x.startswith("data: {")]
            last.append(events[-1]["choices"][0])

        streams = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
        for s in streams:
            s.start()
        time.sleep(1.0)
        result = stop_stack([str(f) for f in files], state_dir=str(state), drain_timeout=1.0)
        for s in streams:
            s.join(30)
    finally:
        tear_down_fleet(path, state, "sc")
    line = json.dumps(result)
    assert "2 request(s) still in flight after the 1s drain cap: cut by the stop" in line, line
    assert [c["finish_reason"] for c in last] == ["abort", "abort"]  # as vLLM cuts them
    cut = [e["message"] for e in Store(state).events("sc") if e["kind"] == "drain-cut"]
    assert len(cut) == 1
    assert cut[0].startswith("chat: 2 request(s) still in flight")
