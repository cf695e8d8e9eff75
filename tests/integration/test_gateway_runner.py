"""The gateway driven through a command runner (a real nginx): what hxp does on a gateway host
reached over SSH, every step a command through the host's runner; here the runner is a local
one, so the same scripts run without a lab (tests/integration/test_fleet_gateway.py runs them
over SSH on the fleet lab). The upstream map lives there too, with a lock there, so that the
deploy parts of several machines (agents) edit one map; a copy stays on each machine's side."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hxp.backends.runners import LocalRunner
from hxp.io.gateway import NginxGateway, nginx_binary
from hxp.spec import GatewaySpec
from tests.support.stacks import free_port

BASE = 41000  # upstream ports need not listen: nginx -t and a reload do not connect to them


def workers(master: int) -> set[int]:
    """The master's children (the runner is local: its /proc is this machine's)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == master:
            found.add(int(stat.parent.name))
    return found


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[NginxGateway]:
    nginx_binary()  # nginx is installed (scripts/install-system-deps.sh)
    spec = GatewaySpec(
        host="gw",
        routes={"chat": free_port(), "web": free_port()},
        directory=str(tmp_path / "there"),
    )
    gw = NginxGateway(tmp_path / "state", "rgw", spec, LocalRunner(), host="gw")
    yield gw
    gw.stop()


def test_start_reload_stop_and_clear_through_the_runner(gateway: NginxGateway) -> None:
    there = Path(gateway.nginx_prefix)
    assert not gateway.running
    gateway.apply({"chat": [f"127.0.0.1:{BASE}"], "web": []})
    pid = gateway.master_pid()
    assert pid is not None
    assert (there / "nginx.conf").read_text() == gateway.conf.read_text()  # the copy here
    assert f"127.0.0.1:{BASE}" in (there / "nginx.conf").read_text()
    before = workers(pid)
    assert gateway.add("chat", f"127.0.0.1:{BASE + 1}") == [
        f"127.0.0.1:{BASE}",
        f"127.0.0.1:{BASE + 1}",
    ]
    assert gateway.master_pid() == pid  # a graceful reload, not a restart
    assert workers(pid) - before  # the new workers were waited for
    assert f"127.0.0.1:{BASE + 1}" in (there / "nginx.conf").read_text()
    assert not list(there.glob("*.new"))
    # nginx answers on the route (an upstream that does not listen: 502 from nginx itself)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.spec.routes["chat"], timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().status == 502
    assert gateway.stop()
    assert not gateway.running
    gateway.clear()
    assert sorted(p.name for p in there.iterdir()) == ["gateway.lock", "logs", "nginx.conf"]
    assert gateway.servers() == {}


def test_a_config_nginx_rejects_changes_nothing_there(gateway: NginxGateway) -> None:
    gateway.apply({"chat": [f"127.0.0.1:{BASE}"], "web": []})
    before = (Path(gateway.nginx_prefix) / "nginx.conf").read_text()
    with pytest.raises(Exception, match="rejected by nginx -t on host gw"):
        gateway.add("web", "[::1::]:1")  # not an address nginx accepts
    assert (Path(gateway.nginx_prefix) / "nginx.conf").read_text() == before
    assert "web" not in gateway.servers() or gateway.servers()["web"] == []
    assert not list(Path(gateway.nginx_prefix).glob("*.new"))
    assert gateway.running


def test_route_changes_from_many_threads_through_the_runner_all_survive(
    gateway: NginxGateway,
) -> None:
    gateway.apply({"chat": [f"127.0.0.1:{BASE}"], "web": [f"127.0.0.1:{BASE + 1}"]})
    added = [f"127.0.0.1:{BASE + 100 + i}" for i in range(8)]
    threads = [threading.Thread(target=gateway.add, args=("chat", s)) for s in added]
    threads.append(threading.Thread(target=gateway.remove, args=("chat", f"127.0.0.1:{BASE}")))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(gateway.servers()["chat"]) == sorted(added)
    text = (Path(gateway.nginx_prefix) / "nginx.conf").read_text()
    assert all(f"server {s} " in text for s in added)
    assert f"server 127.0.0.1:{BASE} " not in text


def test_hxp_urls_names_a_remote_gateway_at_its_hosts_address(tmp_path: Path) -> None:
    """`hxp urls` reads the gateway's address from its host (no lab needed: nothing is reached)."""
    key = tmp_path / "key"
    key.write_text("not used\n")
    stack = tmp_path / "stack.yaml"
    stack.write_text(
        "stack: urls\n"
        "hosts:\n"
        f"  gw: {{backend: docker, runner: ssh, address: 198.18.0.2, ssh_key: {key}, "
        f"known_hosts: {key}}}\n"
        "  local: {backend: process}\n"
        "services:\n"
        "  web: {host: local, command: [web], ports: {http: 9000}}\n"
        "gateway: {host: gw, bind: 0.0.0.0, routes: {web: 18090}}\n"
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API") and k != "HXP_DIR"
    }
    env.update(HXP_STATE_DIR=str(tmp_path / "state"), HXP_WARM_RUNNER="0")
    done = subprocess.run(
        [sys.executable, "-m", "hxp_cli", "urls", "-f", str(stack)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Gateway web: http://198.18.0.2:18090/" in " ".join(done.stdout.split()), done.stdout


def test_two_machines_editing_one_remote_gateway_keep_each_others_routes(
    gateway: NginxGateway, tmp_path: Path
) -> None:
    """Two machines (two state directories: the agents of two model hosts) edit the routes of
    one gateway on a third host at once, each its own unit. Each edit starts from the map on
    the gateway's host and is written only while that map is still the one it read, so
    neither drops the other's servers (with the map kept on each machine's side, the second
    machine's first edit wrote a map holding only its own unit)."""
    other = NginxGateway(tmp_path / "other", "rgw", gateway.spec, LocalRunner(), host="gw")
    gateway.apply({"chat": [f"127.0.0.1:{BASE}"], "web": []})
    assert other.add("web", f"127.0.0.1:{BASE + 1}") == [f"127.0.0.1:{BASE + 1}"]
    assert (
        gateway.servers()
        == other.servers()
        == {
            "chat": [f"127.0.0.1:{BASE}"],
            "web": [f"127.0.0.1:{BASE + 1}"],
        }
    )

    chat = [f"127.0.0.1:{BASE + 100 + i}" for i in range(6)]
    web = [f"127.0.0.1:{BASE + 200 + i}" for i in range(6)]
    threads = [threading.Thread(target=gateway.add, args=("chat", s)) for s in chat]
    threads += [threading.Thread(target=other.add, args=("web", s)) for s in web]
    threads.append(threading.Thread(target=other.remove, args=("chat", f"127.0.0.1:{BASE}")))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = {"chat": sorted(chat), "web": sorted([f"127.0.0.1:{BASE + 1}", *web])}
    for machine in (gateway, other):
        assert {u: sorted(ss) for u, ss in machine.servers().items()} == want
    text = (Path(gateway.nginx_prefix) / "nginx.conf").read_text()
    assert all(f"server {s} " in text for s in [*chat, *web])
    assert f"server 127.0.0.1:{BASE} " not in text
    # a whole-map write keeps what the caller says it cannot see (the other machine's unit)
    written = gateway.apply({"chat": chat[:1], "web": []}, keep=lambda unit, _server: unit == "web")
    assert sorted(written["web"]) == want["web"]
    assert other.servers()["chat"] == chat[:1]
