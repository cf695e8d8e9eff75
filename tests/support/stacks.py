"""Small stacks on the process backend with ports the OS hands out, for deploy tests."""

from __future__ import annotations

import json
import random
import socket
import sys
import textwrap
from pathlib import Path

_rng = random.Random()


def free_port() -> int:
    """A port below the kernel's ephemeral range (32768-60999 here), free when asked.

    Ports the OS hands out for port 0 come from the ephemeral range, which outgoing
    connections of parallel tests also use: a server started there later can find its port
    taken. Below the range only servers compete.
    """
    for _ in range(500):
        port = _rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000")


def free_range(n: int) -> int:
    """A base port with `n` free ports after it, below the ephemeral range (see free_port)."""
    for _ in range(500):
        base = _rng.randrange(20000, 32000 - n)
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range between 20000 and 32000")


#: The bake window of the stacks these helpers write: short, since the tests that use them do
#: not test the bake (tests/flows/test_bake.py does, with the defaults); every deploy still
#: watches its changed instances this long before committing.
SHORT_BAKE = "500ms"


def web_stack(tmp: Path, name: str = "t", extra: str = "") -> tuple[Path, dict[str, int]]:
    """db <- cache <- api, each a Python HTTP server with an HTTP readiness check."""
    ports = {"db": free_port(), "cache": free_port(), "api": free_port()}
    py = sys.executable
    text = (
        textwrap.dedent(
            f"""\
        stack: {name}
        hosts:
          local: {{backend: process}}
        deploy: {{bake: {SHORT_BAKE}}}
        services:
          db:
            host: local
            command: [{py}, -m, http.server, "{ports["db"]}", --bind, 127.0.0.1]
            ports: {{http: {ports["db"]}}}
            env: {{VERSION: "1"}}
            health:
              http: {{url: "http://127.0.0.1:{ports["db"]}/"}}
              interval: 500ms
              timeout: 500ms
              retries: 3
              start_period: 5s
          cache:
            host: local
            command: [{py}, -m, http.server, "{ports["cache"]}", --bind, 127.0.0.1]
            ports: {{http: {ports["cache"]}}}
            depends_on: [db]
            env: {{VERSION: "1"}}
            health:
              tcp: {{port: {ports["cache"]}}}
              interval: 500ms
              timeout: 500ms
              retries: 3
              start_period: 5s
          api:
            host: local
            command: [{py}, -m, http.server, "{ports["api"]}", --bind, 127.0.0.1]
            ports: {{http: {ports["api"]}}}
            depends_on: [cache]
            env: {{VERSION: "1"}}
            health:
              http: {{url: "http://127.0.0.1:{ports["api"]}/"}}
              interval: 500ms
              timeout: 500ms
              retries: 3
              start_period: 5s
        """
        )
        + extra
    )
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path, ports


SIM_ARGS = ("--latency-ms", "2", "--tokens-per-second", "2000")


def sim_fleet(
    path: Path,
    stack: str,
    base: int,
    gateway: int,
    *,
    replicas: int = 2,
    revision: str | None = "r1",
    simulator_args: tuple[str, ...] = SIM_ARGS,
    stop_timeout: str | None = None,
    drain_timeout: str = "10s",
    gpus: int = 0,
) -> Path:
    """Write a stack of one routed `hxp-vllm-sim` model `chat` (replicas on base, base+1, ...)
    behind the nginx gateway on `gateway`. With `gpus`, the host declares that many 80 GiB GPUs
    and each replica claims one (`simulator_gpus: 1`)."""
    host = "{backend: process}"
    if gpus:
        declared = ", ".join(f"{{index: {i}, memory_gib: 80}}" for i in range(gpus))
        host = f"{{backend: process, gpus: [{declared}]}}"
    lines = [
        f"stack: {stack}",
        "hosts:",
        f"  local: {host}",
        f"deploy: {{bake: {SHORT_BAKE}}}",
        "models:",
        "  chat:",
        "    host: local",
        "    engine: simulator",
        *(["    simulator_gpus: 1"] if gpus else []),
        f"    python: {sys.executable}",
        "    model: hxp-sim/chat",
        *([f"    revision: {revision}"] if revision else []),
        "    served_name: chat",
        f"    replicas: {replicas}",
        f"    port: {base}",
        *([f"    stop_timeout: {stop_timeout}"] if stop_timeout else []),
        f"    simulator_args: {json.dumps(list(simulator_args))}",
        "    health:",
        f'      http: {{url: "http://127.0.0.1:{base}/health"}}',
        "      interval: 500ms",
        "      timeout: 1s",
        "      retries: 3",
        "      start_period: 10s",
        "gateway:",
        "  host: local",
        f"  routes: {{chat: {gateway}}}",
        f"  drain_timeout: {drain_timeout}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def tear_down_fleet(path: Path, state: Path, stack: str) -> None:
    """Stop a sim_fleet's gateway and remove every instance the process backend runs for it."""
    from hxp.backends.base import Remove, UnitRef
    from hxp.backends.process import ProcessBackend
    from hxp.config import load_config
    from hxp.io.gateway import NginxGateway

    spec = load_config([path], {}).stack
    assert spec.gateway is not None
    NginxGateway(state, stack, spec.gateway).stop()
    backend = ProcessBackend(state)
    for name in backend.observe(stack):
        backend.apply(Remove(UnitRef(stack, name, name)))
