"""Small stacks on the process backend with ports the OS hands out, for deploy tests."""

from __future__ import annotations

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
