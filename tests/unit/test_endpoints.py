"""How the orchestrator reaches hosts and units (hxp.endpoints): one answer, used by the
gateway, the readiness gates, the sweep's probes, Prometheus targets and `hxp status`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from hxp.endpoints import (
    base_url,
    endpoint,
    netloc,
    reach_health,
    reach_url,
    server,
    worker_absence,
)
from hxp.gateway import render_gateway
from hxp.health import (
    HttpProbe,
    Layer,
    ModelProbe,
    Replica,
    Status,
    TcpProbe,
    plan_checks,
    plan_route,
)
from hxp.monitoring import scrape_jobs
from hxp.spec import GatewaySpec, HealthSpec, HostSpec, HttpCheck, TcpCheck
from hxp.units import expand_units
from tests.support.render_data import stack_from_data

ROOT = Path(__file__).resolve().parents[2]


def _stack() -> Any:
    return stack_from_data(
        {
            "stack": "fleet",
            "hosts": {
                "local": {"backend": "process"},
                "gpu-a": {"backend": "process", "address": "198.18.0.11"},
                "gpu-b": {"backend": "docker", "address": "198.18.0.12"},
                "v6": {"backend": "process", "address": "fd00::7"},
            },
            "services": {
                "web": {
                    "host": "gpu-b",
                    "image": "nginx:1.27",
                    "ports": {"http": 8080},
                    "health": {"http": {"url": "http://localhost:8080/"}, "tcp": {"port": 8080}},
                },
                "ext": {
                    "host": "gpu-a",
                    "command": ["ext"],
                    "ports": {"http": 7000},
                    "health": {"http": {"url": "http://10.9.9.9:7000/h"}},
                },
            },
            "models": {
                name: {
                    "host": host,
                    "engine": "simulator",
                    "model": "org/chat",
                    "replicas": 2,
                    "port": port,
                }
                for name, host, port in (
                    ("near", "local", 9000),
                    ("far", "gpu-a", 9010),
                    ("six", "v6", 9020),
                )
            },
            "gateway": {"host": "local", "routes": {"near": 9100, "far": 9101, "six": 9102}},
        }
    )


def test_a_units_endpoint_is_its_hosts_address_and_port_and_local_stays_loopback() -> None:
    units = {i.name: i for i in expand_units(_stack())}
    assert endpoint(units["near-0"]) == ("127.0.0.1", 9000)
    assert endpoint(units["far-1"]) == ("198.18.0.11", 9011)
    assert server(units["far-1"]) == "198.18.0.11:9011"
    assert server(units["six-0"]) == "[fd00::7]:9020"
    assert base_url(units["web"]) == "http://198.18.0.12:8080"


def test_a_server_on_a_host_reached_by_address_listens_beyond_loopback() -> None:
    units = {i.name: i for i in expand_units(_stack())}
    near, far = units["near-0"].argv, units["far-0"].argv
    assert near[near.index("--host") + 1] == "127.0.0.1"  # unchanged for a local host
    assert far[far.index("--host") + 1] == "0.0.0.0"


@pytest.mark.parametrize(
    ("url", "address", "want"),
    [
        ("http://127.0.0.1:8000/health", "198.18.0.5", "http://198.18.0.5:8000/health"),
        ("http://localhost/x?y=1", "198.18.0.5", "http://198.18.0.5/x?y=1"),
        ("http://[::1]:81/", "fd00::1", "http://[fd00::1]:81/"),
        ("http://u:p@127.0.0.1:81/", "10.0.0.2", "http://u:p@10.0.0.2:81/"),
        ("http://10.1.1.1:8000/health", "198.18.0.5", "http://10.1.1.1:8000/health"),
        ("http://127.0.0.1:8000/health", None, "http://127.0.0.1:8000/health"),
    ],
)
def test_a_loopback_check_url_goes_to_the_units_host(
    url: str, address: str | None, want: str
) -> None:
    assert reach_url(url, HostSpec(address=address)) == want


def test_reach_health_moves_http_and_tcp_checks_and_keeps_the_command() -> None:
    health = HealthSpec(
        http=HttpCheck(url="http://127.0.0.1:1/h"),
        tcp=TcpCheck(port=2),
        command=["pg_isready"],
    )
    moved = reach_health(health, HostSpec(address="198.18.0.9"))
    assert moved is not None
    assert moved.http is not None
    assert moved.tcp is not None
    assert (moved.http.url, moved.tcp.host, moved.command) == (
        "http://198.18.0.9:1/h",
        "198.18.0.9",
        ["pg_isready"],
    )
    assert reach_health(health, HostSpec()) is health


def test_the_gateway_routes_to_host_addresses() -> None:
    spec = GatewaySpec(host="local", routes={"far": 9101, "near": 9100})
    text = render_gateway("fleet", spec, {"far": ["198.18.0.11:9010"], "near": [9000]}, "/p")
    servers = re.findall(r"^\s*server (\S+) max_fails=0;", text, re.M)
    assert servers == ["198.18.0.11:9010", "127.0.0.1:9000"]  # a bare port is local


def test_the_sweep_probes_units_at_their_hosts_address() -> None:
    checks = {c.instance: c for c in plan_checks(_stack(), None)}
    far = checks["far-1"]
    assert far.server == "198.18.0.11:9011"
    assert far.probes[0] == HttpProbe(Layer.LIVENESS, "http://198.18.0.11:9011/health", 200, None)
    assert ModelProbe("http://198.18.0.11:9011", "far") in far.probes
    assert checks["near-0"].server == "127.0.0.1:9000"
    assert TcpProbe(Layer.TCP, "198.18.0.12", 8080) in checks["web"].probes
    assert HttpProbe(Layer.HTTP, "http://198.18.0.12:8080/", 200, None) in checks["web"].probes
    # a check the operator aimed elsewhere is left as written
    assert checks["ext"].probes[0].url == "http://10.9.9.9:7000/h"  # type: ignore[union-attr]


def test_routing_tells_replicas_on_two_hosts_with_one_port_apart() -> None:
    live = ["198.18.0.11:9000", "198.18.0.12:9000"]
    replicas = [
        Replica("a", "198.18.0.11:9000", Status.UNHEALTHY, False),
        Replica("b", "198.18.0.12:9000", Status.HEALTHY, False),
    ]
    decision = plan_route("chat", live, replicas)
    assert decision.after == ("198.18.0.12:9000",)
    assert decision.removed == ("a",)


def test_prometheus_scrapes_units_by_address() -> None:
    stack = stack_from_data(
        {
            "stack": "m",
            "hosts": {"mon": {"address": "198.18.0.2"}, "gpu": {"address": "198.18.0.3"}},
            "models": {
                "chat": {"host": "gpu", "engine": "simulator", "model": "o/c", "port": 9000}
            },
            "monitoring": {"prometheus": {"host": "mon", "port": 9090}},
        }
    )
    targets = [t.address for job in scrape_jobs(stack) for t in job.targets]
    assert netloc("198.18.0.3", 9000) in targets


REACHING = ("hxp/io/probes.py", "hxp/io/sweep.py", "hxp/io/gateway.py", "hxp/gateway.py")
REACHING += ("hxp/health.py", "hxp/metrics.py", "hxp/monitoring.py", "tasks/instances.py")
REACHING += ("tasks/deploy.py", "tasks/lifecycle.py")


@pytest.mark.parametrize("path", REACHING)
def test_only_hxp_endpoints_decides_that_a_host_is_loopback(path: str) -> None:
    """The modules that reach units name no loopback address of their own."""
    text = (ROOT / path).read_text()
    assert "127.0.0.1" not in text, path
    assert '"localhost"' not in text, path


@pytest.mark.parametrize(
    ("workers", "why"),
    [
        ([("w1", "ONLINE", 990.0, 30.0)], None),
        ([("w1", "OFFLINE", 995.0, 30.0), ("w2", "ONLINE", 950.0, 30.0)], None),
        (
            [("w1", "ONLINE", 900.0, 30.0)],
            "no worker of work pool p is online (last heartbeat 100s",
        ),
        ([("w1", "ONLINE", 900.0, 60.0)], None),  # its own interval: 3 x 60 s
        ([("w1", "OFFLINE", 999.0, 30.0)], "no worker of work pool p is online (last heartbeat 1s"),
        ([("w1", "ONLINE", None, None)], "no worker of work pool p is online"),
        ([], "no worker has ever polled work pool p"),
    ],
)
def test_worker_absence(workers: list[Any], why: str | None) -> None:
    got = worker_absence("p", workers, 1000.0)
    assert got == why if why is None else got is not None and got.startswith(why)
