"""A route whose replicas are all out of the gateway (asleep, stopped, draining) answers a clear
503 at once; it never hangs and never passes as a 502 from a dead upstream. Real nginx."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hxp.io.gateway import NginxGateway
from hxp.sim.vllm import SimConfig
from hxp.spec import GatewaySpec
from tests.support.stacks import free_port
from tests.unit.test_vllm_sim import running


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[NginxGateway, str]]:
    port = free_port()
    gw = NginxGateway(tmp_path / "state", "empty", GatewaySpec(host="local", routes={"chat": port}))
    yield gw, f"http://127.0.0.1:{port}"
    gw.stop()


def test_an_empty_route_answers_503_at_once_and_serves_again_once_a_replica_is_back(
    gateway: tuple[NginxGateway, str],
) -> None:
    gw, url = gateway
    with running(SimConfig(port=0, served_model_names=("chat",))) as (server, _):
        gw.apply({"chat": [server.port]})
        body = {"model": "chat", "prompt": "hi", "max_tokens": 1}
        with httpx.Client(timeout=5) as client:
            assert client.post(f"{url}/v1/completions", json=body).status_code == 200
            gw.remove("chat", server.port)
            assert gw.servers()["chat"] == []
            # From the moment remove() returns: the old worker no longer takes connections.
            for _ in range(20):
                start = time.monotonic()
                answer = client.post(f"{url}/v1/completions", json=body)
                took = time.monotonic() - start
                assert answer.status_code == 503, answer.text
                assert took < 0.5, took
            error = answer.json()["error"]
            assert error["type"] == "ServiceUnavailableError"
            assert "no replica of chat is serving" in error["message"]
            assert answer.headers["retry-after"] == "5"
            gw.add("chat", server.port)
            assert client.post(f"{url}/v1/completions", json=body).status_code == 200
