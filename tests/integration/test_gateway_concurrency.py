"""Route changes on one gateway from many threads and from two processes at once (a real nginx):
every change survives, in the upstream map and in the config nginx runs.

Deploy and lifecycle workers edit routes on threads of one process while the health sweep's
failover edits them from another process; each edit reads the map, changes one unit's ports
and writes it back, so edits that are not serialized drop each other's routes.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hxp.io.gateway import NginxGateway, nginx_binary
from hxp.spec import GatewaySpec
from tests.support.stacks import free_port

THREADS = 12
PER_PROCESS = 8
# Upstream ports need not listen: nginx -t and a reload do not connect to them.
BASE = 41000

CHILD = """
import sys, threading, time
from pathlib import Path
from hxp.io.gateway import NginxGateway
from hxp.spec import GatewaySpec

state, chat, web, first, count, go = sys.argv[1:7]
routes = {"chat": int(chat), "web": int(web)}
gateway = NginxGateway(state, "race", GatewaySpec(host="local", routes=routes))
Path(f"{go}.{first}").touch()  # imported: ready to go
while not Path(go).exists():
    time.sleep(0.001)
threads = [
    threading.Thread(target=gateway.add, args=("web" if i % 2 else "chat", int(first) + i))
    for i in range(int(count))
]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[NginxGateway]:
    nginx_binary()  # nginx is installed (scripts/install-system-deps.sh)
    spec = GatewaySpec(host="local", routes={"chat": free_port(), "web": free_port()})
    gw = NginxGateway(tmp_path / "state", "race", spec)
    gw.apply({"chat": [BASE], "web": [BASE + 1]})  # nginx runs: every edit is a reload
    assert gw.running
    yield gw
    gw.stop()


def servers(gateway: NginxGateway, unit: str) -> set[int]:
    """The ports of the unit's upstream in the config nginx runs now."""
    text = gateway.conf.read_text()
    block = text.split(f"upstream hxp_{unit} {{", 1)[1].split("}", 1)[0]
    return {
        int(line.split("127.0.0.1:", 1)[1].split()[0])
        for line in block.splitlines()
        if line.strip().startswith("server 127.0.0.1:") and " down;" not in line
    }


def run_all(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_route_changes_from_many_threads_all_survive(gateway: NginxGateway) -> None:
    added = [BASE + 100 + i for i in range(THREADS)]
    removed = BASE  # taken out of chat while the others are put in
    threads = [threading.Thread(target=gateway.add, args=("chat", p)) for p in added]
    threads.append(threading.Thread(target=gateway.remove, args=("chat", removed)))
    threads.append(threading.Thread(target=gateway.swap, args=("web", BASE + 1, BASE + 99)))
    run_all(threads)

    assert sorted(gateway.live()["chat"]) == added
    assert gateway.live()["web"] == [BASE + 99]
    assert servers(gateway, "chat") == set(added)
    assert servers(gateway, "web") == {BASE + 99}
    assert not list(gateway.prefix.glob("*.new"))  # each write's temporary file is gone


def test_route_changes_from_three_processes_and_their_threads_all_survive(
    gateway: NginxGateway, tmp_path: Path
) -> None:
    spec = gateway.spec
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(gateway.prefix.parent.parent),
                str(spec.routes["chat"]),
                str(spec.routes["web"]),
                str(first),
                str(PER_PROCESS),
                str(go),
            ],
            cwd=Path(__file__).resolve().parents[2],
        )
        for first in (BASE + 200, BASE + 300)
    ]
    mine = [BASE + 400 + i for i in range(PER_PROCESS)]  # this process edits chat meanwhile
    threads = [threading.Thread(target=gateway.add, args=("chat", p)) for p in mine]
    deadline = time.monotonic() + 60
    while not all(Path(f"{go}.{f}").exists() for f in (BASE + 200, BASE + 300)):
        assert time.monotonic() < deadline, "the child processes did not start"
        time.sleep(0.01)
    go.touch()  # all three processes edit the routes at once
    run_all(threads)
    for child in children:
        assert child.wait(timeout=120) == 0

    firsts = (BASE + 200, BASE + 300)
    want_chat = {BASE, *mine} | {f + i for f in firsts for i in range(0, PER_PROCESS, 2)}
    want_web = {BASE + 1} | {f + i for f in firsts for i in range(1, PER_PROCESS, 2)}
    assert set(gateway.live()["chat"]) == want_chat
    assert set(gateway.live()["web"]) == want_web
    assert servers(gateway, "chat") == want_chat
    assert servers(gateway, "web") == want_web
