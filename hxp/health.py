"""Health results and the readiness gate's decisions (pure: probing happens in hxp.io.probes)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from hxp import promtext
from hxp.endpoints import LOOPBACK, address_of, netloc, reach_health
from hxp.errors import InputError
from hxp.graph import DependencyGraph
from hxp.metric_names import (
    GENERATION_TOKENS,
    KV_USAGE,
    KV_USAGE_V0,
    REQUEST_SUCCESS,
    RUNNING,
    WAITING,
)
from hxp.plan import ObservedUnit
from hxp.spec import HealthSpec, ModelSpec, Stack
from hxp.units import UnitInstance, expand_units, slot_instances


class Status(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ProbeResult:
    """One check of one endpoint."""

    ok: bool
    check: str
    reason: str
    latency: float = 0.0


class Verdict(StrEnum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ReadinessGate:
    """Decides when a freshly started unit is ready, or has failed, from successive probes.

    Failures inside `start_period` do not count; after it, `retries` failures at least
    `interval` apart fail the gate (probes may come faster: readiness is noticed early, but
    failures are counted on the spec's own clock). A unit whose process is gone fails at once.
    One success makes it ready.
    """

    health: HealthSpec
    verdict: Verdict = Verdict.PENDING
    failures: int = 0
    attempts: int = 0
    last: ProbeResult | None = None
    history: list[ProbeResult] = field(default_factory=list)
    counted_at: float | None = None

    def observe(self, result: ProbeResult, elapsed: float, running: bool = True) -> Verdict:
        self.verdict = self._decide(result, elapsed, running)
        return self.verdict

    def give_up(self, reason: str) -> Verdict:
        self.last = ProbeResult(False, self.last.check if self.last else "readiness", reason)
        self.verdict = Verdict.FAILED
        return self.verdict

    def _decide(self, result: ProbeResult, elapsed: float, running: bool) -> Verdict:
        self.attempts += 1
        self.last = result
        self.history.append(result)
        if not running:
            self.last = ProbeResult(False, result.check, "the process is not running")
            return Verdict.FAILED
        if result.ok:
            return Verdict.READY
        spaced = self.counted_at is None or elapsed - self.counted_at >= self.health.interval
        if elapsed >= self.health.start_period and spaced:
            self.failures += 1
            self.counted_at = elapsed
            if self.failures >= self.health.retries:
                return Verdict.FAILED
        return Verdict.PENDING

    @property
    def deadline(self) -> float:
        """Seconds after which the gate gives up whatever the probes say (a safety net)."""
        h = self.health
        return h.start_period + (h.retries + 1) * (h.interval + h.timeout) + 5.0

    def explain(self) -> str:
        if self.last is None:
            return "never probed"
        return (
            f"{self.last.check} failed {self.failures} time(s) after the start period "
            f"({self.attempts} probes): {self.last.reason}"
        )


# ================================================================ health sweeps
# The sweep's decisions, all pure: what to check on each instance, how one probe's answer
# becomes a layer's status, and how layers, replicas, dependencies and successive sweeps
# combine into a unit's health. hxp.io.sweep does the probing; flows/health.py and
# `hxp health` share it.

_RANK = {Status.HEALTHY: 0, Status.UNKNOWN: 1, Status.DEGRADED: 2, Status.UNHEALTHY: 3}
_MARK = {Status.HEALTHY: "✓", Status.DEGRADED: "~", Status.UNHEALTHY: "✗", Status.UNKNOWN: "?"}


def worst(statuses: Iterable[Status]) -> Status:
    """The worst of some statuses (unhealthy > degraded > unknown > healthy)."""
    return max(statuses, key=_RANK.__getitem__, default=Status.UNKNOWN)


class Layer(StrEnum):
    """What one check looks at."""

    BACKEND = "backend"  # the backend's own view: process alive, container health, systemd state
    HTTP = "http"
    TCP = "tcp"
    COMMAND = "command"
    LIVENESS = "liveness"  # a model's /health (its declared http check)
    READINESS = "readiness"  # /v1/models lists the served name
    SYNTHETIC = "synthetic"  # a one-token completion, unless real traffic succeeded lately
    SATURATION = "saturation"  # vllm:num_requests_waiting, vllm:kv_cache_usage_perc
    PROGRESS = "progress"  # requests running while vllm:generation_tokens_total stands still


@dataclass(frozen=True)
class LayerResult:
    """One layer of one instance, as one sweep saw it: status, why, how fast, when."""

    instance: str
    layer: Layer
    status: Status
    reason: str
    latency: float = 0.0
    at: float = 0.0
    # Numbers a later sweep needs (the success counter behind the synthetic check).
    data: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class SweepSettings:
    """The knobs of a sweep: flow parameters of `health-sweep`, options of `hxp health`."""

    flap_threshold: int = 2  # consecutive sweeps that must agree before a state changes
    min_healthy_share: float = 0.5  # replicas serving below this share: the unit is unhealthy
    slow_fraction: float = 0.5  # an answer slower than this share of the timeout: degraded
    synthetic_window: float = 300.0  # real traffic this recent replaces the synthetic completion
    waiting_degraded: float = 10.0  # vllm:num_requests_waiting at or above: degraded
    kv_cache_degraded: float = 0.95  # vllm:kv_cache_usage_perc at or above: degraded
    concurrency: int = 200  # network calls in flight at once
    observe: bool = True  # ask the backends (the backend layer); off: endpoints only
    host_timeout: float = 2.0  # seconds a host's reachability connect (its sshd) may take

    def __post_init__(self) -> None:
        problems = [
            f"{name} {value!r}: {rule}"
            for name, value, ok, rule in (
                ("flap_threshold", self.flap_threshold, 1 <= self.flap_threshold <= 100, "1-100"),
                (
                    "min_healthy_share",
                    self.min_healthy_share,
                    0 < self.min_healthy_share <= 1,
                    "in (0, 1]",
                ),
                ("slow_fraction", self.slow_fraction, 0 < self.slow_fraction <= 1, "in (0, 1]"),
                ("synthetic_window", self.synthetic_window, self.synthetic_window >= 0, ">= 0"),
                ("waiting_degraded", self.waiting_degraded, self.waiting_degraded > 0, "> 0"),
                (
                    "kv_cache_degraded",
                    self.kv_cache_degraded,
                    0 < self.kv_cache_degraded <= 1,
                    "in (0, 1]",
                ),
                ("concurrency", self.concurrency, 1 <= self.concurrency <= 10_000, "1-10000"),
                ("host_timeout", self.host_timeout, 0.05 <= self.host_timeout <= 60, "0.05-60"),
            )
            if not ok
        ]
        if problems:
            raise InputError("invalid health sweep setting: " + "; ".join(problems))


# ---------------------------------------------------------------- what to check


@dataclass(frozen=True)
class HttpProbe:
    layer: Layer
    url: str
    expect_status: int = 200
    body_contains: str | None = None


@dataclass(frozen=True)
class TcpProbe:
    layer: Layer
    host: str
    port: int


@dataclass(frozen=True)
class CommandProbe:
    """A health command, run on the unit's host (locally, or through the host's runner)."""

    layer: Layer
    argv: tuple[str, ...]


#: A model whose requests run while its generated-token counter stands still this long is
#: stalled (the default of a model's `health.stall_window`).
STALL_WINDOW_DEFAULT = 60.0


@dataclass(frozen=True)
class ModelProbe:
    """The model layers behind liveness: readiness, saturation, progress and synthetic."""

    base_url: str
    served_name: str
    stall_window: float = STALL_WINDOW_DEFAULT


Probe = HttpProbe | TcpProbe | CommandProbe | ModelProbe


@dataclass(frozen=True)
class InstanceChecks:
    """Everything one sweep checks on one instance."""

    instance: str
    unit: str
    kind: str
    host: str
    port: int | None  # the port the gateway routes to (its `http` port, else its first)
    timeout: float
    probes: tuple[Probe, ...]
    address: str = LOOPBACK  # its host's address (hxp.endpoints)

    @property
    def server(self) -> str | None:
        """`address:port` as the gateway routes to it; None without a port."""
        return None if self.port is None else netloc(self.address, self.port)


def sweep_instances(
    stack: Stack,
    observed: Mapping[str, ObservedUnit] | None,
    expanded: Sequence[UnitInstance] | None = None,
) -> list[UnitInstance]:
    """The instances a sweep checks: every replica, in whichever blue-green slot runs.

    A routed unit's replica runs in slot 0 or slot 1 (both during a blue-green switch); the
    slot that exists is checked, and slot 0 stands for a replica that runs in neither.
    `expanded`: expand_units(stack), when the caller has it already.
    """
    routed = set(stack.gateway.routes) if stack.gateway is not None else set()
    out: list[UnitInstance] = []
    by_unit: dict[str, list[UnitInstance]] = {}
    for inst in expanded if expanded is not None else expand_units(stack):
        by_unit.setdefault(inst.unit, []).append(inst)
    for unit, instances in by_unit.items():
        if unit not in routed or observed is None:
            out.extend(instances)
            continue
        for blue, green in zip(instances, slot_instances(stack, unit, 1), strict=True):
            running = [i for i in (blue, green) if i.name in observed]
            out.extend(running or [blue])
    return out


def plan_checks(
    stack: Stack,
    observed: Mapping[str, ObservedUnit] | None,
    blind: Mapping[str, str] | None = None,
    expanded: Sequence[UnitInstance] | None = None,
    asleep: Collection[str] = (),
) -> list[InstanceChecks]:
    """What to probe on each instance. An instance its backend does not see running gets no
    network probes (its backend layer says why); a docker unit's health command runs inside
    its container (Docker's HEALTHCHECK), so it reaches the sweep through the backend layer.
    Instances on a `blind` host (its backend could not be asked) are probed all the same.
    A model replica `asleep` (`hxp sleep`) gets its liveness check only: vLLM's /health
    answers while it sleeps, while a completion would fail on purpose."""
    out: list[InstanceChecks] = []
    blind = blind or {}
    for inst in sweep_instances(stack, observed, expanded):
        seen = observed.get(inst.name) if observed is not None else None
        present = observed is None or inst.host in blind or (seen is not None and seen.running)
        health = reach_health(inst.health, inst.host_spec)  # loopback: the unit's host
        probes: list[Probe] = []
        if present and health is not None:
            first = Layer.LIVENESS if inst.kind == "model" else Layer.HTTP
            if health.http is not None:
                probes.append(
                    HttpProbe(
                        first, health.http.url, health.http.expect_status, health.http.body_contains
                    )
                )
            if health.tcp is not None:
                probes.append(TcpProbe(Layer.TCP, health.tcp.host, health.tcp.port))
            if health.command is not None and inst.host_spec.backend != "docker":
                probes.append(CommandProbe(Layer.COMMAND, tuple(health.command)))
        if present and isinstance(inst.spec, ModelSpec) and inst.name not in asleep:
            port = dict(inst.ports)["http"]
            address = address_of(inst.host_spec)
            if health is not None and health.http is not None:
                address = urlsplit(health.http.url).hostname or address
            window = health.stall_window if health is not None else STALL_WINDOW_DEFAULT
            probes.append(
                ModelProbe(
                    f"http://{netloc(address, port)}", inst.spec.served_name or inst.unit, window
                )
            )
        out.append(
            InstanceChecks(
                instance=inst.name,
                unit=inst.unit,
                kind=inst.kind,
                host=inst.host,
                port=inst.route_port,
                timeout=health.timeout if health is not None else 2.0,
                probes=tuple(probes),
                address=address_of(inst.host_spec),
            )
        )
    return out


# ---------------------------------------------------------------- one answer -> one layer


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def failed(instance: str, layer: Layer, reason: str, latency: float, at: float) -> LayerResult:
    """A probe that got no usable answer (refused, timed out, garbled)."""
    return LayerResult(instance, layer, Status.UNHEALTHY, reason, latency, at)


def _timed(
    instance: str,
    layer: Layer,
    what: str,
    latency: float,
    timeout: float,
    settings: SweepSettings,
    at: float,
) -> LayerResult:
    limit = timeout * settings.slow_fraction
    if latency > limit:
        return LayerResult(
            instance,
            layer,
            Status.DEGRADED,
            f"{what} in {_ms(latency)} (slow: over {_ms(limit)})",
            latency,
            at,
        )
    return LayerResult(instance, layer, Status.HEALTHY, f"{what} in {_ms(latency)}", latency, at)


def http_result(
    instance: str,
    probe: HttpProbe,
    code: int,
    body: bytes | None,
    latency: float,
    timeout: float,
    settings: SweepSettings,
    at: float,
) -> LayerResult:
    """An HTTP answer: the expected status, the body match if asked, then the latency."""
    if code != probe.expect_status:
        return failed(
            instance,
            probe.layer,
            f"{probe.url}: status {code}, expected {probe.expect_status}",
            latency,
            at,
        )
    if probe.body_contains is not None and (
        body is None or probe.body_contains.encode() not in body
    ):
        return failed(
            instance, probe.layer, f"{probe.url}: body lacks {probe.body_contains!r}", latency, at
        )
    return _timed(instance, probe.layer, f"status {code}", latency, timeout, settings, at)


def tcp_result(
    instance: str,
    probe: TcpProbe,
    latency: float,
    timeout: float,
    settings: SweepSettings,
    at: float,
) -> LayerResult:
    """A TCP connection that was accepted."""
    return _timed(
        instance,
        probe.layer,
        f"connected to {probe.host}:{probe.port}",
        latency,
        timeout,
        settings,
        at,
    )


def command_result(
    instance: str,
    probe: CommandProbe,
    returncode: int,
    stderr_tail: str,
    latency: float,
    timeout: float,
    settings: SweepSettings,
    at: float,
) -> LayerResult:
    """A health command that ran: exit code 0 is healthy."""
    if returncode != 0:
        tail = f": {stderr_tail}" if stderr_tail else ""
        return failed(
            instance, probe.layer, f"{probe.argv[0]} exit code {returncode}{tail}", latency, at
        )
    return _timed(
        instance, probe.layer, f"{probe.argv[0]} exit code 0", latency, timeout, settings, at
    )


# systemd states (ActiveState/SubState, as describe_state writes them) that are not simply
# "not running": a reload keeps serving; a start in progress is not known to work yet.
_SYSTEMD_NOT_RUNNING = {
    "reloading/": Status.DEGRADED,
    "activating/start-pre": Status.UNKNOWN,
    "activating/start,": Status.UNKNOWN,
    "activating/start-post": Status.UNKNOWN,
}


def backend_result(instance: str, seen: ObservedUnit | None, at: float) -> LayerResult:
    """The backend's own view of an instance (hxp.backends observe()).

    Process: alive or not. Docker: the container's state and its HEALTHCHECK (`starting` is
    unknown). systemd: ActiveState/SubState (`active/running` is healthy).
    """
    layer = Layer.BACKEND
    if seen is None or not seen.exists:
        return LayerResult(instance, layer, Status.UNHEALTHY, "not deployed", 0.0, at)
    detail = seen.detail or ("running" if seen.running else "not running")
    if not seen.running:
        for prefix, status in _SYSTEMD_NOT_RUNNING.items():
            if (detail + ",").startswith(prefix):
                return LayerResult(instance, layer, status, detail, 0.0, at)
        return LayerResult(instance, layer, Status.UNHEALTHY, f"not running ({detail})", 0.0, at)
    if seen.healthy is False:
        return LayerResult(instance, layer, Status.UNHEALTHY, detail, 0.0, at)
    if seen.healthy is None:
        return LayerResult(instance, layer, Status.UNKNOWN, detail, 0.0, at)
    return LayerResult(instance, layer, Status.HEALTHY, detail, 0.0, at)


# The only /metrics families the sweep reads (how each combines across label sets).
_HIGHEST = {KV_USAGE, KV_USAGE_V0}  # the others add up
_FAMILIES = frozenset({WAITING, KV_USAGE, KV_USAGE_V0, REQUEST_SUCCESS})
_PROGRESS = (RUNNING, GENERATION_TOKENS)


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """The saturation and success families from a vLLM /metrics page, summed over label sets
    (KV-cache usage: the highest). Other families are skipped unparsed (hxp.promtext.select):
    a page is ~20 KB. Lines that do not parse and values that are not finite are left out."""
    out: dict[str, float] = {}
    for name, values in promtext.sample_values(text, _FAMILIES).items():
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            out[name] = max(finite) if name in _HIGHEST else sum(finite)
    if KV_USAGE not in out and KV_USAGE_V0 in out:
        out[KV_USAGE] = out[KV_USAGE_V0]
    out.pop(KV_USAGE_V0, None)
    return out


def parse_progress_metrics(text: str) -> dict[str, float]:
    """vllm:num_requests_running and vllm:generation_tokens_total from a /metrics page, each
    summed over its label sets (the progress layer's reading)."""
    out: dict[str, float] = {}
    for name, values in promtext.sample_values(text, _PROGRESS).items():
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            out[name] = sum(finite)
    return out


def saturation_result(
    instance: str,
    metrics: Mapping[str, float],
    settings: SweepSettings,
    latency: float,
    at: float,
) -> LayerResult:
    """Queueing and KV-cache pressure: degraded (still serving, but slowly), never unhealthy."""
    layer = Layer.SATURATION
    waiting, usage = metrics.get(WAITING), metrics.get(KV_USAGE)
    if waiting is None and usage is None:
        return LayerResult(
            instance, layer, Status.UNKNOWN, f"/metrics has no {WAITING} or {KV_USAGE}", latency, at
        )
    problems, facts = [], []
    if waiting is not None:
        facts.append(f"{waiting:.0f} waiting")
        if waiting >= settings.waiting_degraded:
            problems.append(f"{waiting:.0f} requests waiting (>= {settings.waiting_degraded:g})")
    if usage is not None:
        facts.append(f"KV cache {usage:.0%} used")
        if usage >= settings.kv_cache_degraded:
            problems.append(f"KV cache {usage:.0%} used (>= {settings.kv_cache_degraded:.0%})")
    if problems:
        return LayerResult(instance, layer, Status.DEGRADED, "; ".join(problems), latency, at)
    return LayerResult(instance, layer, Status.HEALTHY, ", ".join(facts), latency, at)


def progress_result(
    instance: str,
    metrics: Mapping[str, float],
    previous: Mapping[str, float],
    window: float,
    latency: float,
    at: float,
) -> LayerResult:
    """Forward progress: requests running while vllm:generation_tokens_total has not moved
    for `window` seconds is a stalled engine (unhealthy: vLLM's /health still answers 200).

    Nothing running (idle) or a counter that moved (however full the queue) is progress. The
    counter is known to have stood still since the reading before the one that last saw it
    move (it moved at some moment in between): a stall is seen at the first sweep that finds
    the counter unchanged at least `window` after that reading, so within the window plus one
    sweep interval (when sweeps come at least once a window). Its readings
    are carried from sweep to sweep in the layer's data (`progress_*`, and `stalled` 1/0,
    which the supervisor reads)."""
    layer = Layer.PROGRESS
    running, tokens = metrics.get(RUNNING), metrics.get(GENERATION_TOKENS)
    if running is None or tokens is None:
        why = f"/metrics has no {RUNNING} or {GENERATION_TOKENS}"
        return LayerResult(instance, layer, Status.UNKNOWN, why, latency, at, (("stalled", 0.0),))
    last_at, last_tokens = previous.get("progress_at"), previous.get("progress_tokens")
    moved_at = previous.get("progress_moved")
    moving = True
    if running <= 0 or last_at is None or last_tokens is None or moved_at is None:
        moved_at = at  # idle, or a first reading
    elif tokens != last_tokens:  # moved since the last reading (or restarted: a new counter)
        moved_at = last_at
    else:
        moving = False
    still = at - moved_at
    stalled = not moving and running > 0 and still >= window
    data = (
        ("progress_at", at),
        ("progress_moved", moved_at),
        ("progress_tokens", tokens),
        ("stalled", 1.0 if stalled else 0.0),
    )
    if stalled:
        why = (
            f"stalled: {running:.0f} request(s) running, {GENERATION_TOKENS} stuck at "
            f"{tokens:.0f} for {still:.0f}s (window {window:g}s)"
        )
        return LayerResult(instance, layer, Status.UNHEALTHY, why, latency, at, data)
    if running <= 0:
        return LayerResult(instance, layer, Status.HEALTHY, "idle", latency, at, data)
    why = f"{running:.0f} running, {GENERATION_TOKENS} at {tokens:.0f}"
    return LayerResult(instance, layer, Status.HEALTHY, why, latency, at, data)


def stalled(health: InstanceHealth) -> bool:
    """Whether an instance's last sweep found it stalled (its progress layer unhealthy)."""
    return health.status is Status.UNHEALTHY and dict(health.data).get("stalled") == 1.0


def readiness_result(
    instance: str, code: int, body: bytes, served_name: str, latency: float, at: float
) -> LayerResult:
    """/v1/models must answer 200 and list the served name."""
    layer = Layer.READINESS
    if code != 200:
        return failed(instance, layer, f"/v1/models: status {code}", latency, at)
    try:
        data = json.loads(body)
        names = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
    except (ValueError, AttributeError, TypeError):
        return failed(instance, layer, "/v1/models: not a JSON model list", latency, at)
    if served_name not in names:
        return failed(
            instance, layer, f"/v1/models lists {names}, not {served_name!r}", latency, at
        )
    return LayerResult(
        instance, layer, Status.HEALTHY, f"serves {served_name!r} ({_ms(latency)})", latency, at
    )


def synthetic_skip(
    previous: Mapping[str, float], success_total: float | None, now: float, window: float
) -> str | None:
    """Why the synthetic completion can be skipped (real requests succeeded since a reading
    taken within the window), or None: run it."""
    if success_total is None or "success_total" not in previous or "success_at" not in previous:
        return None
    age = now - previous["success_at"]
    served = success_total - previous["success_total"]
    if served > 0 and 0 <= age <= window:
        return f"skipped: {served:.0f} real request(s) succeeded in the last {age:.0f}s"
    return None


def synthetic_result(
    instance: str,
    code: int,
    body: bytes,
    latency: float,
    timeout: float,
    settings: SweepSettings,
    at: float,
) -> LayerResult:
    """A one-token completion: 200 with choices."""
    layer = Layer.SYNTHETIC
    if code != 200:
        return failed(instance, layer, f"one-token completion: status {code}", latency, at)
    try:
        choices = json.loads(body).get("choices")
    except (ValueError, AttributeError):
        choices = None
    if not choices:
        return failed(
            instance, layer, "one-token completion: no choices in the answer", latency, at
        )
    return _timed(instance, layer, "one-token completion", latency, timeout, settings, at)


def synthetic_unanswered(
    instance: str, why: str, timed_out: bool, waiting: float | None, latency: float, at: float
) -> LayerResult:
    """A one-token completion that got no answer. Timed out behind a queue the saturation
    layer sees, the server is slow, not dead: degraded. Otherwise unhealthy."""
    if timed_out and waiting:
        return LayerResult(
            instance,
            Layer.SYNTHETIC,
            Status.DEGRADED,
            f"one-token completion: {why}, queued behind {waiting:.0f} waiting request(s)",
            latency,
            at,
        )
    return failed(instance, Layer.SYNTHETIC, f"one-token completion: {why}", latency, at)


# ---------------------------------------------------------------- combining


def combine_layers(results: Sequence[LayerResult]) -> tuple[Status, str]:
    """An instance's status from its layers: the worst one wins; a layer that could not tell
    (unknown) makes an otherwise healthy instance degraded; all unknown is unknown."""
    if not results:
        return Status.UNKNOWN, "nothing to check (no health checks, backend not observed)"
    statuses = [r.status for r in results]
    bad = worst(statuses)
    if bad is Status.HEALTHY:
        return Status.HEALTHY, ", ".join(r.layer.value for r in results) + " ok"
    reason = "; ".join(f"{r.layer}: {r.reason}" for r in results if r.status is bad)
    if bad is Status.UNKNOWN and any(s is Status.HEALTHY for s in statuses):
        return Status.DEGRADED, reason
    return bad, reason


def combine_replicas(
    replicas: Sequence[tuple[str, Status, str]], min_share: float
) -> tuple[Status, str]:
    """A unit's status from its replicas' (name, status, reason).

    All healthy: healthy. At least `min_share` of them serving (healthy or degraded):
    degraded. Fewer: unhealthy. All unknown: unknown. One replica: its own status.
    """
    n = len(replicas)
    if n == 0:
        return Status.UNKNOWN, "no instance"
    if n == 1:
        return replicas[0][1], replicas[0][2]
    healthy = sum(1 for _, s, _ in replicas if s is Status.HEALTHY)
    serving = sum(1 for _, s, _ in replicas if s in (Status.HEALTHY, Status.DEGRADED))
    if healthy == n:
        return Status.HEALTHY, f"{n}/{n} replicas healthy"
    bad = [(name, s, why) for name, s, why in replicas if s is not Status.HEALTHY]
    detail = "; ".join(f"{name} {s}: {why}" for name, s, why in bad[:3])
    if len(bad) > 3:
        detail += f"; {len(bad) - 3} more"
    if all(s is Status.UNKNOWN for _, s, _ in replicas):
        return Status.UNKNOWN, detail
    if serving and serving / n >= min_share:
        return Status.DEGRADED, f"{healthy}/{n} replicas healthy: {detail}"
    return (
        Status.UNHEALTHY,
        f"{serving}/{n} replicas serving (below {min_share:.0%}): {detail}",
    )


def apply_dependencies(
    own: Mapping[str, tuple[Status, str]], depends_on: Mapping[str, Sequence[str]]
) -> dict[str, tuple[Status, str]]:
    """A unit whose dependency is unhealthy (directly or further down) is at best degraded,
    and its reason names that dependency. Units not in `own` are ignored. The result lists
    the units in dependency order (dependencies first)."""
    graph = DependencyGraph({u: [d for d in depends_on.get(u, ()) if d in own] for u in own})
    roots: dict[str, dict[str, str]] = {}  # unit -> {unhealthy unit: the dependency it is via}
    out: dict[str, tuple[Status, str]] = {}
    for unit in graph.order():
        mine: dict[str, str] = {}
        for dep in graph.dependencies(unit):
            if own[dep][0] is Status.UNHEALTHY:
                mine.setdefault(dep, dep)
            for root in roots[dep]:
                mine.setdefault(root, dep)
        roots[unit] = mine
        status, reason = own[unit]
        if not mine or status is Status.UNHEALTHY:
            out[unit] = (status, reason)
            continue
        names = [r if via == r else f"{r} (via {via})" for r, via in sorted(mine.items())]
        why = f"dependency {', '.join(names)} {'is' if len(names) == 1 else 'are'} unhealthy"
        out[unit] = (
            Status.DEGRADED,
            why if status is Status.HEALTHY else f"{why}; {reason}",
        )
    return out


@dataclass(frozen=True)
class Damped:
    """A state that changes only after `threshold` consecutive sweeps agree on a new one."""

    status: Status
    since: float
    pending: Status | None = None
    count: int = 0


def damp(previous: Damped | None, seen: Status, now: float, threshold: int) -> Damped:
    """Flap damping: the first result sets the state; later, a different status must be seen
    `threshold` times in a row (any interruption starts the count again)."""
    if previous is None:
        return Damped(seen, now)
    if seen is previous.status:
        return Damped(previous.status, previous.since)
    count = previous.count + 1 if previous.pending is seen else 1
    if count >= threshold:
        return Damped(seen, now)
    return Damped(previous.status, previous.since, seen, count)


@dataclass(frozen=True)
class InstanceHealth:
    """One instance after a sweep: its damped status and what this sweep saw."""

    instance: str
    unit: str
    status: Status  # damped: what routing and the unit's health use
    seen: Status  # this sweep's own verdict
    reason: str
    since: float
    checked_at: float
    pending: Status | None = None
    count: int = 0
    port: int | None = None
    ejected: bool = False  # taken out of the gateway's upstream by a sweep
    data: tuple[tuple[str, float], ...] = ()
    layers: tuple[LayerResult, ...] = ()
    server: str | None = None  # `address:port` the gateway routes to (hxp.endpoints)

    @property
    def damped(self) -> Damped:
        return Damped(self.status, self.since, self.pending, self.count)


@dataclass(frozen=True)
class UnitRecord:
    """A unit's last recorded health (the store keeps one per unit, for transitions)."""

    unit: str
    status: Status
    reason: str
    since: float
    checked_at: float


@dataclass(frozen=True)
class UnitHealth:
    """A unit's composite health: its replicas, then its dependencies."""

    unit: str
    kind: str
    status: Status
    reason: str
    since: float
    own: Status  # before the dependency rule
    replicas: tuple[InstanceHealth, ...]

    def layers(self) -> dict[str, Status]:
        """Each layer's worst status across the unit's replicas."""
        out: dict[str, list[Status]] = {}
        for replica in self.replicas:
            for layer in replica.layers:
                out.setdefault(layer.layer.value, []).append(layer.status)
        return {name: worst(statuses) for name, statuses in out.items()}


@dataclass(frozen=True)
class Transition:
    """A unit's health changed (after damping)."""

    unit: str
    before: Status | None
    after: Status
    reason: str

    @property
    def event(self) -> str:
        """The Prefect event name for this change."""
        if self.after is Status.UNHEALTHY:
            return "hxp.health.unhealthy"
        if self.after is Status.HEALTHY or self.before is Status.UNHEALTHY:
            return "hxp.health.recovered"
        return f"hxp.health.{self.after.value}"


def transitions(
    previous: Mapping[str, UnitRecord], units: Sequence[UnitHealth]
) -> list[Transition]:
    """Units whose status differs from the last recorded one. A unit seen for the first time
    changes only when it is not healthy (healthy is what everyone assumed)."""
    out = []
    for unit in units:
        before = previous.get(unit.unit)
        if before is None and unit.status is Status.HEALTHY:
            continue
        if before is not None and before.status is unit.status:
            continue
        out.append(
            Transition(unit.unit, before.status if before else None, unit.status, unit.reason)
        )
    return out


# ---------------------------------------------------------------- routing


@dataclass(frozen=True)
class Replica:
    """A replica as routing sees it."""

    instance: str
    port: str | int  # the server the gateway routes to (`address:port`; a bare port: local)
    status: Status  # damped
    ejected: bool  # taken out by an earlier sweep


@dataclass(frozen=True)
class RouteDecision:
    """How a sweep changes one routed unit's upstream, and what it refused to do."""

    unit: str
    before: tuple[str | int, ...]
    after: tuple[str | int, ...]
    removed: tuple[str, ...] = ()
    restored: tuple[str, ...] = ()
    alert: str = ""

    @property
    def changed(self) -> bool:
        return set(self.before) != set(self.after)


def plan_route(unit: str, live: Sequence[str | int], replicas: Sequence[Replica]) -> RouteDecision:
    """Take unhealthy replicas out of the upstream and put back the ones a sweep took out that
    are healthy (or degraded: still serving) again. Never leaves the upstream without a
    replica that may serve: when every one in it is unhealthy, nothing is removed and the
    decision carries an alert instead. Ports that belong to no checked replica (a deploy's
    business) are left alone."""
    before = tuple(live)
    by_port = {r.port: r for r in replicas}
    serving = (Status.HEALTHY, Status.DEGRADED)
    remove = [p for p in before if p in by_port and by_port[p].status is Status.UNHEALTHY]
    restore = [r for r in replicas if r.ejected and r.port not in before and r.status in serving]
    after = [p for p in before if p not in remove] + [r.port for r in restore]
    alert = ""
    if remove and not after:
        names = ", ".join(by_port[p].instance for p in remove)
        alert = (
            f"every replica of {unit} behind the gateway is unhealthy ({names}); "
            "none was taken out (the gateway keeps its last replica)"
        )
        after, remove = list(before), []
    return RouteDecision(
        unit=unit,
        before=before,
        after=tuple(after),
        removed=tuple(by_port[p].instance for p in remove),
        restored=tuple(r.instance for r in restore),
        alert=alert,
    )


# ---------------------------------------------------------------- hosts


class HostState(StrEnum):
    """Whether a host of the fleet answers at all (a host-level state, beside the units')."""

    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class HostHealth:
    """One addressed host after a sweep: reachable, or unreachable and why."""

    host: str
    address: str
    state: HostState
    reason: str
    instances: tuple[str, ...] = ()


#: The instance data key that marks an instance taken down with its unreachable host: the next
#: sweep that finds the host answering takes the instance's own verdict at once (no damping).
HOST_DOWN_KEY = "host_unreachable"

_NETWORK_LAYERS = frozenset(Layer) - {Layer.BACKEND}


def unreachable_hosts(
    checks: Sequence[InstanceChecks],
    results: Sequence[LayerResult],
    connect_failed: Mapping[str, str],
) -> dict[str, str]:
    """The hosts that are `unreachable`: their reachability connect failed (`connect_failed`:
    host -> why) AND no network probe of any instance on them got an answer (each is
    unhealthy, or unknown as a metrics probe that could not tell; a host whose sshd is down but
    whose units answer is not unreachable). A host with nothing to probe is judged
    by its connect alone. Returns host -> reason."""
    on_host: dict[str, set[str]] = {}
    for c in checks:
        on_host.setdefault(c.host, set()).add(c.instance)
    out = {}
    for host, why in connect_failed.items():
        mine = on_host.get(host, set())
        probes = [r for r in results if r.instance in mine and r.layer in _NETWORK_LAYERS]
        if not any(r.status in (Status.HEALTHY, Status.DEGRADED) for r in probes):
            answered = f"; {len(probes)} probe(s) failed" if probes else ""
            out[host] = f"{why}{answered}"
    return out


# ---------------------------------------------------------------- one sweep, end to end


@dataclass
class SweepReport:
    """What one sweep found and did."""

    stack: str
    at: float
    status: Status
    units: list[UnitHealth]
    transitions: list[Transition]
    routes: list[RouteDecision] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # alerts and steps left out, for people
    seconds: float = 0.0
    hosts: list[HostHealth] = field(default_factory=list)  # addressed hosts that were checked

    @property
    def unreachable(self) -> list[HostHealth]:
        return [h for h in self.hosts if h.state is HostState.UNREACHABLE]

    @property
    def instances(self) -> list[InstanceHealth]:
        return [r for u in self.units for r in u.replicas]

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "status": self.status.value,
            "seconds": round(self.seconds, 3),
            "units": {u.unit: {"status": u.status.value, "reason": u.reason} for u in self.units},
            "instances": {i.instance: i.status.value for i in self.instances},
            "hosts": {
                h.host: {"address": h.address, "state": h.state.value, "reason": h.reason}
                for h in self.hosts
            },
            "transitions": [
                {
                    "unit": t.unit,
                    "event": t.event,
                    "before": t.before.value if t.before else None,
                    "after": t.after.value,
                    "reason": t.reason,
                }
                for t in self.transitions
            ],
            "routes": [
                {
                    "unit": r.unit,
                    "before": list(r.before),
                    "after": list(r.after),
                    "removed": list(r.removed),
                    "restored": list(r.restored),
                    "alert": r.alert,
                }
                for r in self.routes
            ],
            "notes": list(self.notes),
        }


def stack_status(units: Sequence[UnitHealth]) -> Status:
    """The stack's status: its worst unit (unknown beside known units counts as degraded)."""
    if not units:
        return Status.UNKNOWN
    statuses = [u.status for u in units]
    bad = worst(statuses)
    if bad is Status.UNKNOWN and any(s is not Status.UNKNOWN for s in statuses):
        return Status.DEGRADED
    return bad


def exit_code(status: Status) -> int:
    """`hxp health`: 0 healthy, 1 degraded (or unknown), 2 unhealthy."""
    return {Status.HEALTHY: 0, Status.UNHEALTHY: 2}.get(status, 1)


def _data_of(
    results: Sequence[LayerResult], previous: InstanceHealth | None
) -> tuple[tuple[str, float], ...]:
    data = dict(previous.data) if previous is not None else {}
    for r in results:
        data.update(r.data)
    return tuple(sorted(data.items()))


def evaluate_sweep(
    stack: Stack,
    checks: Sequence[InstanceChecks],
    results: Sequence[LayerResult],
    observed: Mapping[str, ObservedUnit] | None,
    previous: Mapping[str, InstanceHealth],
    previous_units: Mapping[str, UnitRecord],
    settings: SweepSettings,
    now: float,
    blind: Mapping[str, str] | None = None,
    reach: Mapping[str, tuple[str, str]] | None = None,
) -> SweepReport:
    """Layers -> instances (damped) -> units (replicas, then dependencies) -> transitions.

    `blind`: hosts whose backend could not be asked (host -> why): their backend layer is
    unknown. `reach`: the addressed hosts whose reachability was checked, host -> (address,
    why its connect failed, or "" when it answered). A host that is unreachable
    (unreachable_hosts) takes every instance on it to unhealthy in this sweep, without flap
    damping (the host itself said no, and every probe agreed); when it answers again, those
    instances take their own verdict in that sweep, again without damping."""
    by_instance: dict[str, list[LayerResult]] = {c.instance: [] for c in checks}
    blind = blind or {}
    reach = reach or {}
    down = unreachable_hosts(checks, results, {h: why for h, (_, why) in reach.items() if why})
    if observed is not None:
        for c in checks:
            if c.host in blind:
                why = f"host {c.host} not observed: {blind[c.host]}"
                by_instance[c.instance].append(
                    LayerResult(c.instance, Layer.BACKEND, Status.UNKNOWN, why, 0.0, now)
                )
            else:
                by_instance[c.instance].append(
                    backend_result(c.instance, observed.get(c.instance), now)
                )
    for r in results:
        by_instance.setdefault(r.instance, []).append(r)
    per_unit: dict[str, list[InstanceHealth]] = {}
    kinds: dict[str, str] = {}
    for c in checks:
        layers = by_instance[c.instance]
        seen, reason = combine_layers(layers)
        before = previous.get(c.instance)
        data = dict(_data_of(layers, before))
        was_down = data.pop(HOST_DOWN_KEY, 0.0) > 0
        if c.host in down:
            seen = Status.UNHEALTHY
            reason = f"host {c.host} ({reach[c.host][0]}) unreachable: {down[c.host]}"
            kept = before is not None and before.status is Status.UNHEALTHY
            state = Damped(Status.UNHEALTHY, before.since if before and kept else now)
            data[HOST_DOWN_KEY] = 1.0
        elif was_down:  # its host answers again: no damping on the way back either
            state = Damped(seen, now)
        else:
            state = damp(before.damped if before else None, seen, now, settings.flap_threshold)
        if state.status is not seen:
            reason = (
                f"still {state.status} ({seen} {state.count}/{settings.flap_threshold} "
                f"before it changes): {reason}"
            )
        per_unit.setdefault(c.unit, []).append(
            InstanceHealth(
                instance=c.instance,
                unit=c.unit,
                status=state.status,
                seen=seen,
                reason=reason,
                since=state.since,
                checked_at=now,
                pending=state.pending,
                count=state.count,
                port=c.port,
                server=c.server,
                ejected=before.ejected if before is not None else False,
                data=tuple(sorted(data.items())),
                layers=tuple(layers),
            )
        )
        kinds[c.unit] = c.kind
    own = {
        unit: combine_replicas(
            [(i.instance, i.status, i.reason) for i in insts], settings.min_healthy_share
        )
        for unit, insts in per_unit.items()
    }
    final = apply_dependencies(own, stack.dependencies())  # in dependency order
    units = []
    for unit in final:
        status, reason = final[unit]
        last = previous_units.get(unit)
        since = last.since if last is not None and last.status is status else now
        units.append(
            UnitHealth(
                unit, kinds[unit], status, reason, since, own[unit][0], tuple(per_unit[unit])
            )
        )
    on_host: dict[str, list[str]] = {}
    for c in checks:
        on_host.setdefault(c.host, []).append(c.instance)
    hosts = [
        HostHealth(
            host,
            address,
            HostState.UNREACHABLE if host in down else HostState.REACHABLE,
            down.get(host, "") or (f"sshd: {why}; its units answer" if why else ""),
            tuple(on_host.get(host, ())),
        )
        for host, (address, why) in sorted(reach.items())
    ]
    return SweepReport(
        stack=stack.stack,
        at=now,
        status=stack_status(units),
        units=units,
        transitions=transitions(previous_units, units),
        hosts=hosts,
    )


# ---------------------------------------------------------------- presenting


def layer_marks(layers: Mapping[str, Status]) -> str:
    """`backend ✓ liveness ✗ …`: each layer with a mark for its status."""
    return " ".join(f"{name} {_MARK[status]}" for name, status in layers.items())


def health_rows(report: SweepReport) -> list[dict[str, str]]:
    """The report as table rows: one per unit, then one per replica of a replicated unit."""
    rows = []
    for unit in report.units:
        latency = max((ly.latency for r in unit.replicas for ly in r.layers), default=0.0)
        rows.append(
            {
                "unit": unit.unit,
                "instance": unit.replicas[0].instance if len(unit.replicas) == 1 else "",
                "status": unit.status.value,
                "layers": layer_marks(unit.layers()),
                "latency_ms": f"{latency * 1000:.0f}",
                "reason": unit.reason,
            }
        )
        if len(unit.replicas) > 1:
            for r in unit.replicas:
                slowest = max((ly.latency for ly in r.layers), default=0.0)
                rows.append(
                    {
                        "unit": "",
                        "instance": r.instance + (" (out of the gateway)" if r.ejected else ""),
                        "status": r.status.value,
                        "layers": layer_marks({ly.layer.value: ly.status for ly in r.layers}),
                        "latency_ms": f"{slowest * 1000:.0f}",
                        "reason": r.reason,
                    }
                )
    return rows


def table_fingerprint(rows: Sequence[Mapping[str, str]]) -> int:
    """What a health table says, latencies aside: a table with the same fingerprint as the
    last one published tells nothing new (hxp.health.table_due)."""
    return hash(
        tuple((r["unit"], r["instance"], r["status"], r["layers"], r["reason"]) for r in rows)
    )


TABLE_EVERY = 300.0  # seconds: an unchanged table is published again this often


def table_due(
    fingerprint: int, last: tuple[int, float] | None, now: float, every: float = TABLE_EVERY
) -> bool:
    """Publish the sweep's table artifact? When it says something the last one published did
    not (`last`: its fingerprint and time), or the last is `every` seconds old (its
    latencies then refresh). A sweep of 1,000 healthy units that changed nothing saves the
    rows and the request."""
    return last is None or last[0] != fingerprint or now - last[1] >= every


def health_markdown(report: SweepReport, table_since: float | None = None) -> str:
    """A short summary for the Prefect UI: the verdict, what changed, what was done.
    `table_since`: the time of the table artifact when this sweep did not publish one."""
    counts: dict[str, int] = {}
    for u in report.units:
        counts[u.status.value] = counts.get(u.status.value, 0) + 1
    lines = [
        f"# Health of stack `{report.stack}`: **{report.status.value}**",
        "",
        ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f" ({len(report.instances)} instances, {report.seconds:.2f}s)",
    ]
    if report.unreachable:
        lines += ["", "## Unreachable hosts", ""]
        lines += [
            f"- `{h.host}` ({h.address}) **unreachable**: {h.reason} "
            f"({len(h.instances)} instance(s))"
            for h in report.unreachable
        ]
    problems = [u for u in report.units if u.status is not Status.HEALTHY]
    if problems:
        lines += ["", "## Not healthy", ""]
        lines += [f"- `{u.unit}` **{u.status.value}**: {u.reason}" for u in problems[:50]]
        if len(problems) > 50:
            lines.append(f"- … and {len(problems) - 50} more (see the table artifact)")
    if report.transitions:
        lines += ["", "## Changes", ""]
        lines += [
            f"- `{t.unit}`: {t.before.value if t.before else 'new'} → **{t.after.value}** "
            f"(`{t.event}`): {t.reason}"
            for t in report.transitions
        ]
    routed = [r for r in report.routes if r.changed or r.alert]
    if routed:
        lines += ["", "## Gateway", ""]
        for r in routed:
            if r.removed:
                lines.append(f"- `{r.unit}`: took {', '.join(r.removed)} out of the upstream")
            if r.restored:
                lines.append(f"- `{r.unit}`: put {', '.join(r.restored)} back into the upstream")
            if r.alert:
                lines.append(f"- **ALERT** `{r.unit}`: {r.alert}")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    if table_since is not None:
        when = time.strftime("%H:%M:%S UTC", time.gmtime(table_since))
        lines += ["", f"The table artifact is unchanged since {when} (latencies as then)."]
    return "\n".join(lines) + "\n"
