"""Where the gateway may run (hxp.spec) and how hxp drives it there (hxp.io.gateway): on this
machine, on an agent host, or on any host reached over SSH through that host's runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hxp.backends.runners import RunResult, SshRunner
from hxp.errors import BackendError
from hxp.io.gateway import NginxGateway, is_master, stack_gateway
from hxp.spec import Stack

KEY = __file__  # an existing file stands in for the key and known_hosts


def stack(gw: dict[str, Any], **gateway: Any) -> Stack:
    return Stack.model_validate(
        {
            "stack": "g",
            "hosts": {"gw": gw, "m": {"backend": "process"}},
            "services": {"web": {"host": "m", "command": ["web"], "ports": {"http": 9000}}},
            "gateway": {"host": "gw", "routes": {"web": 8080}, **gateway},
        }
    )


SSH = {"runner": "ssh", "address": "198.18.0.2", "ssh_key": KEY, "known_hosts": KEY}


@pytest.mark.parametrize(
    "gw",
    [
        {"backend": "process"},  # this machine
        {"backend": "process", "address": "198.18.0.2"},  # an agent host runs it itself
        {"backend": "docker", **SSH},
        {"backend": "systemd", **SSH},
        {"backend": "systemd"},  # a local systemd host: this machine
    ],
    ids=["local", "agent", "docker-over-ssh", "systemd-over-ssh", "local-systemd"],
)
def test_the_gateway_runs_on_any_host_hxp_reaches(gw: dict[str, Any]) -> None:
    bind = {"bind": "0.0.0.0"} if gw.get("runner") == "ssh" else {}
    assert stack(gw, **bind).gateway is not None


@pytest.mark.parametrize(
    "gw",
    [
        {"backend": "docker", "address": "198.18.0.2"},  # engine reached, but no way to run nginx
        {"backend": "systemd", "runner": "docker-exec", "container": "c"},
    ],
    ids=["docker-without-ssh", "docker-exec"],
)
def test_a_gateway_host_hxp_cannot_run_nginx_on_is_refused_by_name(gw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=r"gateway.host: hxp cannot run nginx on host 'gw'"):
        stack(gw)


def test_a_remote_gateway_must_listen_beyond_its_loopback() -> None:
    with pytest.raises(ValidationError, match=r"gateway.bind: 127.0.0.1 on host 'gw' \(198"):
        stack({"backend": "docker", **SSH})
    assert stack({"backend": "docker", **SSH}, bind="198.18.0.2").gateway is not None


def test_the_gateway_is_driven_through_its_hosts_runner(tmp_path: Path) -> None:
    local = stack_gateway(stack({"backend": "process"}), tmp_path)
    assert local.runner is None
    assert local.nginx_prefix == str(tmp_path / "gateway" / "g")
    remote = stack_gateway(stack({"backend": "docker", **SSH}, bind="0.0.0.0"), tmp_path)
    assert isinstance(remote.runner, SshRunner)
    assert remote.runner.address == "198.18.0.2"
    assert remote.nginx_prefix == "/var/lib/hxp-gateway/g"  # nginx's files there
    assert remote.upstreams_file == tmp_path / "gateway" / "g" / "upstreams.json"  # map here
    chosen = stack({"backend": "docker", **SSH}, bind="0.0.0.0", directory="/srv/gw/")
    assert stack_gateway(chosen, tmp_path).nginx_prefix == "/srv/gw"


class NoNginx:
    """A host without nginx: every command succeeds and prints nothing."""

    description = "ssh root@198.18.0.9:22"

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def run(
        self, argv: list[str], input: bytes | None = None, check: bool = True, timeout: Any = None
    ) -> RunResult:
        self.commands.append(argv)
        return RunResult(0, b"", b"")

    def write_file(self, path: str, content: str, mode: int) -> None:
        raise AssertionError("nothing is written before nginx is found")

    def read_file(self, path: str) -> str | None:
        return None


def test_a_gateway_host_without_nginx_is_named(tmp_path: Path) -> None:
    spec = stack({"backend": "docker", **SSH}, bind="0.0.0.0").gateway
    assert spec is not None
    runner = NoNginx()
    gateway = NginxGateway(tmp_path, "g", spec, runner, host="gw")
    with pytest.raises(BackendError, match=r"host gw \(ssh root@198.18.0.9:22\): nginx is not"):
        gateway.apply({"web": ["198.18.0.3:9000"]})
    # read the map there, looked for nginx, changed nothing
    assert [c[2].split()[0] for c in runner.commands] == ["cat", "command"]
    assert gateway.servers() == {}


@pytest.mark.parametrize(
    ("cmdline", "ours"),
    [
        ("nginx: master process /usr/sbin/nginx -p /srv/gw/ -c /srv/gw/nginx.conf", True),
        ("nginx: master process /usr/sbin/nginx -p /srv/gw2/ -c /srv/gw2/nginx.conf", False),
        ("nginx: worker process", False),
        ("/usr/bin/python3 -p /srv/gw/", False),  # a pid reused by another program
        ("", False),
    ],
)
def test_the_remote_master_is_recognised_by_its_prefix(cmdline: str, ours: bool) -> None:
    assert is_master(cmdline, "/srv/gw") is ours
