"""A routed simulator model with `autoscale` behind the real nginx gateway, and the autoscaler
run in a loop the way `hxp autoscale` runs it: for the acceptance tests and bench/autoscale.py.

The model servers are hxp-vllm-sim (the development double of vLLM) with its capacity model:
`vllm.max_num_seqs` slots per replica, a fixed prefill time per request; requests beyond the
slots wait (vllm:num_requests_waiting), as in vLLM. Intervals are compressed (seconds, not
minutes); the code path is the one a scheduled flow runs.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.stacks import SHORT_BAKE

#: Slots (max_num_seqs) of one replica and the prefill time of one request: one replica
#: serves about SLOTS / PREFILL_S requests per second.
SLOTS = 4
PREFILL_MS = 250


def autoscale_fleet(
    path: Path,
    stack: str,
    base: int,
    gateway: int,
    *,
    max_replicas: int = 3,
    gpus: int = 0,
    interval: str = "1s",
    scale_up_after: str = "2s",
    scale_down_after: str = "3s",
    cooldown: str = "2s",
    threshold: float = 1.0,
    target: str = "queue_per_replica",
    sleep_mode: bool = False,
    simulator_args: tuple[str, ...] = (),
) -> Path:
    """Write the stack: model `chat`, min 1 / max `max_replicas`, a `target` (default queue
    per replica), `sleep_mode` as given. With `gpus`, the host declares that many 80 GiB GPUs
    and each replica claims one."""
    host = "{backend: process}"
    if gpus:
        declared = ", ".join(f"{{index: {i}, memory_gib: 80}}" for i in range(gpus))
        host = f"{{backend: process, gpus: [{declared}]}}"
    args = ["--latency-ms", str(PREFILL_MS), "--tokens-per-second", "2000", *simulator_args]
    lines = [
        f"stack: {stack}",
        f"deploy: {{bake: {SHORT_BAKE}}}",  # the tests time scale-ups, not the bake window
        "hosts:",
        f"  local: {host}",
        "models:",
        "  chat:",
        "    host: local",
        "    engine: simulator",
        *(["    simulator_gpus: 1"] if gpus else []),
        f"    python: {sys.executable}",
        "    model: hxp-sim/chat",
        "    revision: r1",
        "    served_name: chat",
        f"    port: {base}",
        f"    vllm: {{max_num_seqs: {SLOTS}}}",
        f"    sleep_mode: {'true' if sleep_mode else 'false'}",
        f"    simulator_args: {args!r}".replace("'", '"'),
        "    health:",
        f'      http: {{url: "http://127.0.0.1:{base}/health"}}',
        "      interval: 200ms",
        "      timeout: 1s",
        "      retries: 3",
        "      start_period: 10s",
        "    autoscale:",
        "      min_replicas: 1",
        f"      max_replicas: {max_replicas}",
        f"      target: {target}",
        f"      threshold: {threshold}",
        f"      scale_up_after: {scale_up_after}",
        f"      scale_down_after: {scale_down_after}",
        f"      cooldown: {cooldown}",
        f"      interval: {interval}",
        "gateway:",
        "  host: local",
        f"  routes: {{chat: {gateway}}}",
        "  drain_timeout: 10s",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Autoscaler:
    """The autoscale flow every `interval` seconds in a thread (what `hxp autoscale` does),
    keeping every pass's decisions and when the gateway's route changed."""

    path: Path
    state: Path
    stack: str
    interval: float = 1.0
    passes: list[tuple[float, list[dict[str, Any]]]] = field(default_factory=list)
    routes: list[tuple[float, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def once(self) -> list[dict[str, Any]]:
        from flows.autoscale import autoscale

        result = autoscale([str(self.path)], state_dir=str(self.state))
        decisions: list[dict[str, Any]] = result["decisions"]
        self.passes.append((time.monotonic(), decisions))
        return decisions

    def start(self) -> Autoscaler:
        def loop() -> None:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self.once()
                except Exception as exc:  # kept for the test to show
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120)

    def actions(self, *kinds: str) -> list[dict[str, Any]]:
        return [d for _, ds in self.passes for d in ds if d["action"] in kinds]


def live_ports(state: Path, stack: str, path: Path) -> list[int]:
    """The ports the gateway sends the model's traffic to now."""
    from hxp.config import load_config
    from hxp.io.gateway import NginxGateway

    spec = load_config([path], {}).stack
    assert spec.gateway is not None
    return list(NginxGateway(state, stack, spec.gateway).live().get("chat", []))


def wait_for(predicate: Any, timeout: float, step: float = 0.1) -> float | None:
    """Seconds until `predicate()` held, or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(step)
    return None
