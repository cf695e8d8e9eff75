"""A unit declared on several hosts (`hosts: [a, b]`): one unit per host, one gateway route over
all of them (hxp.spec.spread_hosts, hxp.gateway.gateway_routes)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hxp.config import load_config, unit_config_hash
from hxp.errors import StackValidationError
from hxp.gateway import render_gateway
from hxp.plan import plan_stack
from hxp.spec import Stack
from hxp.units import expand_units

M1, M2 = "198.18.0.21", "198.18.0.22"


def data(**chat: Any) -> dict[str, Any]:
    model = {
        "hosts": ["m1", "m2"],
        "model": "hxp-sim/chat",
        "engine": "simulator",
        "replicas": 2,
        "port": 9000,
        **chat,
    }
    return {
        "stack": "fleet",
        "hosts": {
            "gw": {"backend": "process"},
            "m1": {"backend": "process", "address": M1},
            "m2": {"backend": "process", "address": M2},
        },
        "models": {"chat": model},
        "services": {"web": {"host": "gw", "command": ["web"], "depends_on": ["chat"]}},
        "gateway": {"host": "gw", "routes": {"chat": 18000}},
    }


def test_a_unit_on_two_hosts_is_one_unit_per_host_with_its_replicas() -> None:
    stack = Stack.model_validate(data())
    assert list(stack.models) == ["chat-m1", "chat-m2"]
    assert [(m.host, m.part_of, m.replicas) for m in stack.models.values()] == [
        ("m1", "chat", 2),
        ("m2", "chat", 2),
    ]
    placed = sorted((i.name, i.host, i.ports) for i in expand_units(stack, {"chat-m1", "chat-m2"}))
    assert placed == [
        ("chat-m1-0", "m1", (("http", 9000),)),
        ("chat-m1-1", "m1", (("http", 9001),)),
        ("chat-m2-0", "m2", (("http", 9000),)),
        ("chat-m2-1", "m2", (("http", 9001),)),
    ]
    # what names the declared unit names every part: the route, a dependency, an operator
    assert stack.gateway is not None
    assert stack.gateway.routes == {"chat-m1": 18000, "chat-m2": 18000}
    assert stack.services["web"].depends_on == ["chat-m1", "chat-m2"]
    assert stack.unit_names("chat") == ["chat-m1", "chat-m2"]
    assert stack.unit_names("chat-m2") == ["chat-m2"]
    # the stack as stored (a deploy's snapshot) reads back the same
    assert Stack.model_validate(stack.model_dump(mode="json")) == stack


def test_a_part_hashes_as_the_same_unit_declared_on_its_host_alone() -> None:
    stack = Stack.model_validate(data())
    assert {m.served_name for m in stack.models.values()} == {"chat"}  # the declared name
    alone = data(host="m1", served_name="chat")
    del alone["models"]["chat"]["hosts"]
    plain = Stack.model_validate(alone)  # `part_of` is not in the hash: nothing that runs
    assert unit_config_hash(stack, "chat-m1") == unit_config_hash(plain, "chat")
    assert unit_config_hash(stack, "chat-m2") != unit_config_hash(stack, "chat-m1")  # its host


def test_a_plan_places_each_part_on_its_host() -> None:
    stack = Stack.model_validate(data())
    plan = plan_stack(stack, {}, "h")
    creates = sorted((a.instance, a.host) for a in plan.actions if a.unit.startswith("chat"))
    assert creates == [
        ("chat-m1-0", "m1"),
        ("chat-m1-1", "m1"),
        ("chat-m2-0", "m2"),
        ("chat-m2-1", "m2"),
    ]


def test_one_route_balances_over_the_replicas_of_every_host() -> None:
    stack = Stack.model_validate(data())
    assert stack.gateway is not None
    names = {u: s.part_of for u, s in stack.units().items() if s.part_of}
    live = {"chat-m1": [f"{M1}:9000", f"{M1}:9001"], "chat-m2": [f"{M2}:9000"]}
    text = render_gateway("fleet", stack.gateway, live, "/p", names=names)
    assert re.findall(r"listen (\S+) ", text) == ["127.0.0.1:18000"]
    assert re.findall(r"^\s*upstream (\S+) ", text, re.M) == ["hxp_chat"]
    assert re.findall(r"^\s*server (\S+) max_fails=0;", text, re.M) == [
        f"{M1}:9000",
        f"{M1}:9001",
        f"{M2}:9000",
    ]
    # no replica on any host: the route answers 503 naming the declared unit
    empty = render_gateway("fleet", stack.gateway, {}, "/p", names=names)
    assert "no replica of chat is serving now" in empty


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"host": "m1"}, r"models\.chat\.hosts: give `host` \(one host\) or `hosts`, not both"),
        ({"hosts": []}, r"models\.chat\.hosts: expected a non-empty list of host names"),
        ({"hosts": "m1"}, r"models\.chat\.hosts: expected a non-empty list"),
        ({"hosts": ["m1", "m1"]}, r"models\.chat\.hosts: a host is listed twice"),
        ({"hosts": ["m1", "m9"]}, r"models\.chat\.hosts: unknown host\(s\) \['m9'\]"),
    ],
)
def test_bad_hosts_are_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Stack.model_validate(data(**change))


def test_a_part_name_taken_by_another_unit_is_refused() -> None:
    taken = data()
    taken["services"]["chat-m2"] = {"host": "gw", "command": ["x"]}
    with pytest.raises(ValidationError, match=r"services\.chat-m2: name already used by the part"):
        Stack.model_validate(taken)


def test_models_and_services_cannot_share_a_route() -> None:
    mixed = data()
    mixed["gateway"]["routes"]["web"] = 18000
    with pytest.raises(ValidationError, match=r"gateway\.routes: port 18000 is shared by models"):
        Stack.model_validate(mixed)


def test_a_port_clash_of_two_routes_with_another_unit_is_still_found() -> None:
    clash = data()
    clash["services"]["web"]["ports"] = {"http": 18000}  # on gw, where nginx listens
    with pytest.raises(ValidationError, match=r"port 18000 on host 'gw' already used by"):
        Stack.model_validate(clash)


def test_a_problem_in_a_part_points_at_the_declared_units_lines(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "stack: s\n"
        "hosts:\n"
        "  m1: {backend: process, address: 198.18.0.21}\n"
        "  m2: {backend: process, address: 198.18.0.22}\n"
        "models:\n"
        "  chat:\n"
        "    hosts: [m1, m2]\n"
        "    model: x/y\n"
        "    port: 99999\n"
    )
    with pytest.raises(StackValidationError) as caught:
        load_config([path], {})
    text = str(caught.value)
    assert f"{path}:9 models.chat-m1.port" in text, text


def test_a_gateway_on_an_agent_host_routes_only_that_hosts_units() -> None:
    """An agent host's nginx is driven by the deploy part its own worker runs; the part of
    another host cannot reach it, so such a stack is refused when it is read."""
    agents = data()
    for name in ("m1", "m2"):
        agents["hosts"][name]["work_pool"] = f"pool-{name}"
    agents["gateway"]["host"] = "m1"
    agents["gateway"]["bind"] = "0.0.0.0"
    with pytest.raises(ValidationError, match=r"gateway\.host: the gateway runs on agent host"):
        Stack.model_validate(agents)
    del agents["models"]["chat"]["hosts"]
    agents["models"]["chat"]["host"] = "m1"  # its own host's units alone: allowed
    assert Stack.model_validate(agents).gateway is not None
