"""The gateway after its nginx master was SIGKILLed (OOM killer, an operator's kill -9): the
workers it leaves behind keep the gateway's port, so a plain restart could not listen. The next
route change stops them and starts a new master that routes as asked. Real nginx (found by the
fault campaign's nginx-killed fault)."""

from __future__ import annotations

import os
import signal
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
    gw = NginxGateway(
        tmp_path / "state", "killed", GatewaySpec(host="local", routes={"chat": port})
    )
    yield gw, f"http://127.0.0.1:{port}"
    gw.stop()
    gw.reap_orphans()


def test_a_route_change_after_the_master_was_killed_restarts_the_gateway(
    gateway: tuple[NginxGateway, str],
) -> None:
    gw, url = gateway
    body = {"model": "chat", "prompt": "hi", "max_tokens": 1}
    with (
        running(SimConfig(port=0, served_model_names=("chat",))) as (one, _),
        running(SimConfig(port=0, served_model_names=("chat",))) as (two, _),
    ):
        gw.apply({"chat": [one.port]})
        old = gw.master_pid()
        assert old is not None
        workers = gw._workers(old)
        assert workers
        os.kill(old, signal.SIGKILL)
        time.sleep(0.2)
        assert gw.master_pid() is None
        assert any(Path(f"/proc/{w}").exists() for w in workers)  # orphans hold the port

        gw.swap("chat", one.port, two.port)

        new = gw.master_pid()
        assert new is not None
        assert new != old
        assert not any(_alive(w) for w in workers)
        assert gw.servers() == {"chat": [f"127.0.0.1:{two.port}"]}
        with httpx.Client(timeout=5) as client:
            for _ in range(5):
                assert client.post(f"{url}/v1/completions", json=body).status_code == 200
        two_served = _requests(two.port)
        assert two_served >= 5


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _requests(port: int) -> int:
    page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in page.splitlines():
        if line.startswith("vllm:request_success_total"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)
