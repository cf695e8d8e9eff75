"""Unreachable hosts in the composite health (hxp.health), where a host is reached
(hxp.endpoints), and the reachability connect itself against real sockets (hxp.io.reach)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from hxp.endpoints import hosts_touched, reach_target
from hxp.health import (
    HOST_DOWN_KEY,
    HostState,
    Layer,
    LayerResult,
    Status,
    SweepSettings,
    evaluate_sweep,
    plan_checks,
    unreachable_hosts,
)
from hxp.io.reach import connect, preflight, reach_hosts
from tests.support.render_data import stack_from_data

H, U = Status.HEALTHY, Status.UNHEALTHY
S = SweepSettings(flap_threshold=3, observe=False)


def _stack(a: str = "198.18.0.2", b: str = "198.18.0.3") -> Any:
    health = {"http": {"url": "http://127.0.0.1:9000/health"}, "timeout": "500ms"}
    return stack_from_data(
        {
            "stack": "hd",
            "hosts": {
                "gw": {},
                "m1": {"address": a},
                "m2": {"address": b, "ssh_port": 2222},
            },
            "deploy": {"bake": "500ms"},
            "gateway": {"host": "gw", "routes": {"api": 9900}},
            "services": {
                "api": {
                    "host": "m1",
                    "command": ["/bin/true"],
                    "ports": {"http": 9000},
                    "health": health,
                },
                "other": {"host": "m2", "command": ["/bin/true"], "ports": {"http": 9000}},
                "local": {"host": "gw", "command": ["/bin/true"]},
            },
        }
    )


def _live(instance: str, status: Status) -> LayerResult:
    return LayerResult(instance, Layer.HTTP, status, f"http {status}", 0.01, 1.0)


def test_reach_target_and_touched_hosts() -> None:
    stack = _stack()
    assert reach_target(stack.hosts["m1"]) == ("198.18.0.2", 22)
    assert reach_target(stack.hosts["m2"]) == ("198.18.0.3", 2222)
    assert reach_target(stack.hosts["gw"]) is None  # this machine
    assert reach_target(_stack(a="127.0.0.1").hosts["m1"]) is None  # loopback too
    assert hosts_touched(stack) == ["gw", "m1", "m2"]
    assert hosts_touched(stack, ["other"]) == ["m2"]
    assert hosts_touched(stack, ["api"]) == ["gw", "m1"]  # routed: the gateway's host too


def test_unreachable_needs_a_failed_connect_and_every_probe_failing() -> None:
    stack = _stack()
    checks = plan_checks(stack, None)
    failing = [_live("api", U)]
    assert unreachable_hosts(checks, failing, {"m1": "connection refused"}) == {
        "m1": "connection refused; 1 probe(s) failed"
    }
    # a metrics probe that could not tell counts as failed, too
    unknown = LayerResult("api", Layer.SATURATION, Status.UNKNOWN, "no answer", 0.5, 1.0)
    assert unreachable_hosts(checks, [*failing, unknown], {"m1": "refused"}) == {
        "m1": "refused; 2 probe(s) failed"
    }
    # sshd down but the unit answers: the host is not unreachable
    assert unreachable_hosts(checks, [_live("api", H)], {"m1": "connection refused"}) == {}
    # probes fail but the connect worked: the units' own business, not the host's
    assert unreachable_hosts(checks, failing, {}) == {}
    # a host with nothing to probe is judged by its connect alone
    assert unreachable_hosts(checks, [], {"m2": "no route to host"}) == {"m2": "no route to host"}


def test_an_unreachable_host_takes_its_instances_down_in_one_sweep_and_back_in_one() -> None:
    stack = _stack()
    checks = plan_checks(stack, None)
    ok = [_live("api", H), _live("other", H)]
    first = evaluate_sweep(
        stack, checks, ok, None, {}, {}, S, 1.0, reach={"m1": ("198.18.0.2", "")}
    )
    assert {i.instance: i.status for i in first.instances}["api"] is H
    assert [(h.host, h.state) for h in first.hosts] == [("m1", HostState.REACHABLE)]
    previous = {i.instance: i for i in first.instances}
    units = {}

    dead = [_live("api", U), _live("other", H)]
    reach = {"m1": ("198.18.0.2", "no answer within 1s (ssh port 22)"), "m2": ("198.18.0.3", "")}
    down = evaluate_sweep(stack, checks, dead, None, previous, units, S, 2.0, reach=reach)
    api = {i.instance: i for i in down.instances}["api"]
    # flap_threshold 3, yet unhealthy in this one sweep: the host said no and every probe agreed
    assert api.status is U
    assert api.reason.startswith("host m1 (198.18.0.2) unreachable: no answer within 1s")
    assert dict(api.data)[HOST_DOWN_KEY] == 1.0
    assert [(h.host, h.state) for h in down.unreachable] == [("m1", HostState.UNREACHABLE)]
    assert down.unreachable[0].instances == ("api",)
    assert down.to_dict()["hosts"]["m1"]["state"] == "unreachable"
    assert "Unreachable hosts" in __import__("hxp.health").health.health_markdown(down)

    previous = {i.instance: i for i in down.instances}
    back = evaluate_sweep(
        stack, checks, ok, None, previous, units, S, 3.0, reach={"m1": ("198.18.0.2", "")}
    )
    api = {i.instance: i for i in back.instances}["api"]
    assert api.status is H  # again without waiting for 3 sweeps
    assert HOST_DOWN_KEY not in dict(api.data)
    assert back.unreachable == []

    # an ordinary failure (host answers) is still damped
    previous = {i.instance: i for i in back.instances}
    flaky = [_live("api", U), _live("other", H)]
    later = evaluate_sweep(
        stack, checks, flaky, None, previous, units, S, 4.0, reach={"m1": ("198.18.0.2", "")}
    )
    assert {i.instance: i for i in later.instances}["api"].status is H


def test_host_timeout_setting_is_checked() -> None:
    from hxp.errors import InputError

    with pytest.raises(InputError, match="host_timeout"):
        SweepSettings(host_timeout=0)


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_connect_answers_and_refuses() -> None:
    """(A dead link's timeout is exercised on the fleet lab: traffic here stays on loopback.)"""
    with _listener() as s:
        port = s.getsockname()[1]
        assert connect("h", "127.0.0.1", port, 1.0).ok
    refused = connect("h", "127.0.0.1", port, 1.0)  # closed now
    assert (refused.ok, refused.reason) == (False, f"connection refused (ssh port {port})")


def test_preflight_checks_only_addressed_hosts() -> None:
    stack = _stack(a="127.0.0.1", b="::1")
    assert reach_hosts(stack) == {}  # loopback: this machine, never checked
    assert preflight(stack) == []
    assert preflight(_stack(), ["local"]) == []  # only the gateway host's units: nothing remote
