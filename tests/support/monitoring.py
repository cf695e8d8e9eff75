"""A monitored stack of simulator models on the process backend, and a webhook receiver."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.stacks import free_port


@dataclass
class Webhook:
    """Alertmanager's webhook notifications as they arrive (a list of the JSON bodies)."""

    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert of every notification: labels plus the notification's status."""
        with self.lock:
            bodies = list(self.received)
        return [a for body in bodies for a in body.get("alerts", [])]

    def has(self, alertname: str, status: str, **labels: str) -> bool:
        return any(
            a["labels"].get("alertname") == alertname
            and a["status"] == status
            and all(a["labels"].get(k) == v for k, v in labels.items())
            for a in self.alerts()
        )


@contextmanager
def webhook_receiver() -> Iterator[Webhook]:
    """A local HTTP server that records what Alertmanager posts to it."""
    port = free_port()
    hook = Webhook(f"http://127.0.0.1:{port}/alerts")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with hook.lock:
                hook.received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()


def monitored_stack(tmp: Path, webhook_url: str, name: str = "mon") -> tuple[Path, dict[str, int]]:
    """Two simulator models plus Prometheus, Alertmanager and a Pushgateway, short timings."""
    ports = {
        "chat": free_port(),
        "coder": free_port(),
        "prometheus": free_port(),
        "alertmanager": free_port(),
        "pushgateway": free_port(),
    }
    py = sys.executable
    text = textwrap.dedent(
        f"""\
        stack: {name}
        hosts:
          local: {{backend: process}}
        models:
          chat:
            host: local
            model: hxp-sim/chat
            engine: simulator
            python: {py}
            port: {ports["chat"]}
            health:
              http: {{url: "http://127.0.0.1:{ports["chat"]}/health"}}
              interval: 200ms
              timeout: 1s
              retries: 50
          coder:
            host: local
            model: hxp-sim/coder
            engine: simulator
            python: {py}
            port: {ports["coder"]}
            health:
              http: {{url: "http://127.0.0.1:{ports["coder"]}/health"}}
              interval: 200ms
              timeout: 1s
              retries: 50
        monitoring:
          prometheus:
            host: local
            port: {ports["prometheus"]}
            scrape_interval: 500ms
            evaluation_interval: 500ms
          alertmanager:
            host: local
            port: {ports["alertmanager"]}
            group_wait: 500ms
            group_interval: 1s
            repeat_interval: 1h
            receivers:
              - {{name: hook, type: webhook, url: "{webhook_url}"}}
          pushgateway:
            host: local
            port: {ports["pushgateway"]}
          alerts:
            down_for: 1s
            saturation_for: 1s
            window: 1m
          slo: {{ttft_p95: 2s, e2e_p99: 30s}}
        """
    )
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path, ports
