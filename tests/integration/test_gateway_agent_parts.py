"""The gateway sync of one part of a dispatched deploy: the part run by host a's agent cannot
see host b's processes (they are local to b's machine), so it must leave b's replicas in the
gateway as they are, instead of taking them out as not running. Real nginx, a real process
backend (the part's own units), the task's function called as the deploy calls it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hxp.io.gateway import NginxGateway, stack_gateway
from hxp.spec import Stack
from hxp.units import expand_units
from tasks.deploy import agent_hosts_elsewhere, sync_gateway
from tasks.instances import RunContext, route_server
from tests.support.render_data import stack_from_data
from tests.support.stacks import free_port


def two_agent_stack() -> Stack:
    data: dict[str, Any] = {
        "version": 2,
        "stack": "parts",
        "hosts": {
            "a": {"backend": "process", "work_pool": "pool-a"},
            "b": {"backend": "process", "work_pool": "pool-b"},
        },
        "services": {
            "web-a": {
                "host": "a",
                "command": ["sleep", "60"],
                "ports": {"http": free_port()},
            },
            "web-b": {
                "host": "b",
                "command": ["sleep", "60"],
                "ports": {"http": free_port()},
            },
        },
        "gateway": {
            "host": "a",
            "routes": {"web-a": free_port(), "web-b": free_port()},
        },
    }
    return stack_from_data(data)


@pytest.fixture
def part(tmp_path: Path) -> Iterator[tuple[RunContext, NginxGateway]]:
    stack = two_agent_stack()
    ctx = RunContext(stack, str(tmp_path / "state"))
    gateway = stack_gateway(stack, ctx.state_dir)
    yield ctx, gateway
    gateway.stop()


def test_a_part_keeps_the_replicas_of_another_agent_host_in_the_gateway(
    part: tuple[RunContext, NginxGateway],
) -> None:
    ctx, gateway = part
    servers = {i.unit: route_server(i) for i in expand_units(ctx.stack)}
    assert agent_hosts_elsewhere(ctx.stack, ["a"]) == {"b"}
    # what b's own part put there (its replica runs on b's machine)
    gateway.apply({"web-a": [], "web-b": [servers["web-b"]]})

    # a's part: nothing of a runs (here: nothing was started), b's replica is not seen from here
    written = sync_gateway.fn(ctx, ["a"])
    assert written == {"web-a": [], "web-b": [servers["web-b"]]}
    assert gateway.servers()["web-b"] == [servers["web-b"]]

    # without `here` (a run that sees every host) the same view takes b's replica out: what
    # the part did before it was told which hosts it sees
    assert sync_gateway.fn(ctx)["web-b"] == []


def test_a_part_leaves_a_gateway_on_another_agent_host_to_that_hosts_part(
    part: tuple[RunContext, NginxGateway],
) -> None:
    """b's part (its agent runs on b's machine) must not start the gateway of host a on its own
    machine: a gateway with a local runner runs wherever the run driving it runs."""
    ctx, gateway = part
    assert sync_gateway.fn(ctx, ["b"]) == {}
    assert not gateway.running
    assert gateway.servers() == {}
