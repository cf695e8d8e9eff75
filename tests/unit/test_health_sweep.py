"""The health sweep's pure decisions, table-driven: layers, replicas, dependencies, damping,
transitions, routing, the model layers' parsers, and what each instance gets checked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hxp.backends.docker import observed_from_attrs
from hxp.backends.systemd import describe_state, is_running
from hxp.errors import InputError
from hxp.health import (
    CommandProbe,
    Damped,
    HttpProbe,
    InstanceHealth,
    Layer,
    LayerResult,
    ModelProbe,
    Replica,
    Status,
    SweepSettings,
    TcpProbe,
    Transition,
    UnitRecord,
    apply_dependencies,
    backend_result,
    combine_layers,
    combine_replicas,
    command_result,
    damp,
    evaluate_sweep,
    exit_code,
    health_markdown,
    health_rows,
    http_result,
    parse_vllm_metrics,
    plan_checks,
    plan_route,
    readiness_result,
    saturation_result,
    stack_status,
    synthetic_result,
    synthetic_skip,
    synthetic_unanswered,
    table_due,
    table_fingerprint,
    transitions,
)
from hxp.io.probes import parse_header_line, parse_status_line
from hxp.plan import ObservedUnit
from hxp.store import Store
from tests.support.render_data import stack_from_data

H, D, U, K = Status.HEALTHY, Status.DEGRADED, Status.UNHEALTHY, Status.UNKNOWN
S = SweepSettings()


def lr(layer: Layer, status: Status, reason: str = "r") -> LayerResult:
    return LayerResult("x", layer, status, reason)


# ---------------------------------------------------------------- layers -> instance


@pytest.mark.parametrize(
    ("layers", "want", "reason_has"),
    [
        pytest.param([], K, "nothing to check", id="no-layers"),
        pytest.param([(Layer.BACKEND, H), (Layer.HTTP, H)], H, "backend, http ok", id="all-ok"),
        pytest.param([(Layer.BACKEND, H), (Layer.HTTP, U)], U, "http: r", id="one-down"),
        pytest.param([(Layer.LIVENESS, H), (Layer.SATURATION, D)], D, "saturation", id="slow"),
        pytest.param([(Layer.BACKEND, K), (Layer.HTTP, H)], D, "backend", id="unknown+ok"),
        pytest.param([(Layer.BACKEND, K), (Layer.HTTP, K)], K, "backend", id="all-unknown"),
        pytest.param([(Layer.HTTP, U), (Layer.SYNTHETIC, K)], U, "http", id="unknown+down"),
        pytest.param([(Layer.HTTP, D), (Layer.TCP, U)], U, "tcp", id="worst-wins"),
    ],
)
def test_combine_layers(layers: list[tuple[Layer, Status]], want: Status, reason_has: str) -> None:
    status, reason = combine_layers([lr(layer, s) for layer, s in layers])
    assert status is want
    assert reason_has in reason


# ---------------------------------------------------------------- replicas -> unit


@pytest.mark.parametrize(
    ("statuses", "share", "want", "reason_has"),
    [
        pytest.param([], 0.5, K, "no instance", id="none"),
        pytest.param([U], 0.5, U, "why-0", id="single-is-itself"),
        pytest.param([D], 0.5, D, "why-0", id="single-degraded"),
        pytest.param([H, H, H], 0.5, H, "3/3 replicas healthy", id="all-healthy"),
        pytest.param([H, H, U], 0.5, D, "2/3 replicas healthy: r-2 unhealthy", id="one-of-3"),
        pytest.param([H, U, U], 0.5, U, "1/3 replicas serving (below 50%)", id="two-of-3"),
        pytest.param([H, U, U], 0.3, D, "1/3 replicas healthy", id="two-of-3-low-bar"),
        pytest.param([D, D], 0.5, D, "0/2 replicas healthy", id="all-saturated"),
        pytest.param([U, U], 0.5, U, "0/2 replicas serving", id="all-down"),
        pytest.param([K, K], 0.5, K, "r-0 unknown", id="all-unknown"),
        pytest.param([H, K], 0.5, D, "1/2 replicas healthy", id="half-unknown"),
        pytest.param([U, U, U, U, H], 0.5, U, "1 more", id="long-reason-cut"),
    ],
)
def test_combine_replicas(
    statuses: list[Status], share: float, want: Status, reason_has: str
) -> None:
    replicas = [(f"r-{i}", s, f"why-{i}") for i, s in enumerate(statuses)]
    status, reason = combine_replicas(replicas, share)
    assert status is want
    assert reason_has in reason


# ---------------------------------------------------------------- dependencies


@pytest.mark.parametrize(
    ("own", "deps", "want"),
    [
        pytest.param(
            {"db": U, "api": H},
            {"api": ["db"]},
            {"db": (U, "own"), "api": (D, "dependency db is unhealthy")},
            id="direct",
        ),
        pytest.param(
            {"db": U, "cache": H, "api": H},
            {"cache": ["db"], "api": ["cache"]},
            {
                "cache": (D, "dependency db is unhealthy"),
                "api": (D, "dependency db (via cache) is unhealthy"),
            },
            id="transitive-names-the-root",
        ),
        pytest.param(
            {"db": U, "api": U},
            {"api": ["db"]},
            {"api": (U, "own")},
            id="unhealthy-stays-unhealthy",
        ),
        pytest.param(
            {"db": U, "api": D},
            {"api": ["db"]},
            {"api": (D, "dependency db is unhealthy; own")},
            id="degraded-keeps-its-reason",
        ),
        pytest.param(
            {"db": D, "api": H},
            {"api": ["db"]},
            {"api": (H, "own")},
            id="degraded-dependency-does-not-spread",
        ),
        pytest.param(
            {"a": U, "b": U, "api": H},
            {"api": ["a", "b"]},
            {"api": (D, "dependency a, b are unhealthy")},
            id="two-dependencies",
        ),
        pytest.param(
            {"api": H},
            {"api": ["gone"]},
            {"api": (H, "own")},
            id="dependency-not-swept",
        ),
    ],
)
def test_apply_dependencies(
    own: dict[str, Status], deps: dict[str, list[str]], want: dict[str, tuple[Status, str]]
) -> None:
    out = apply_dependencies({u: (s, "own") for u, s in own.items()}, deps)
    for unit, expected in want.items():
        assert out[unit] == expected


# ---------------------------------------------------------------- flapping


@pytest.mark.parametrize(
    ("seen", "threshold", "want"),
    [
        pytest.param("H", 2, "H", id="first-result-counts-at-once"),
        pytest.param("HU", 2, "HH", id="one-failure-is-not-enough"),
        pytest.param("HUU", 2, "HHU", id="two-in-a-row-change-it"),
        pytest.param("HUHUHU", 2, "HHHHHH", id="flapping-is-damped"),
        pytest.param("HUUHH", 2, "HHUUH", id="recovery-needs-two-too"),
        pytest.param("HUU", 1, "HUU", id="threshold-1-follows-every-result"),
        pytest.param("HUUU", 3, "HHHU", id="threshold-3"),
        pytest.param("HUDU", 2, "HHHH", id="a-different-status-restarts-the-count"),
        pytest.param("HDD", 2, "HHD", id="degraded-too"),
    ],
)
def test_damp(seen: str, threshold: int, want: str) -> None:
    letters = {"H": H, "U": U, "D": D}
    state: Damped | None = None
    got = ""
    for t, letter in enumerate(seen):
        state = damp(state, letters[letter], float(t), threshold)
        got += next(k for k, v in letters.items() if v is state.status)
    assert got == want


def test_damp_since_moves_only_on_a_change() -> None:
    state = damp(None, H, 1.0, 2)
    state = damp(state, U, 2.0, 2)
    assert (state.status, state.since, state.pending, state.count) == (H, 1.0, U, 1)
    state = damp(state, U, 3.0, 2)
    assert (state.status, state.since, state.pending, state.count) == (U, 3.0, None, 0)


# ---------------------------------------------------------------- transitions and events


@pytest.mark.parametrize(
    ("before", "after", "event"),
    [
        pytest.param(None, U, "hxp.health.unhealthy", id="new-unhealthy"),
        pytest.param(None, D, "hxp.health.degraded", id="new-degraded"),
        pytest.param(H, U, "hxp.health.unhealthy", id="went-down"),
        pytest.param(D, U, "hxp.health.unhealthy", id="got-worse"),
        pytest.param(U, H, "hxp.health.recovered", id="recovered"),
        pytest.param(U, D, "hxp.health.recovered", id="partly-recovered"),
        pytest.param(D, H, "hxp.health.recovered", id="back-to-healthy"),
        pytest.param(H, D, "hxp.health.degraded", id="degraded"),
        pytest.param(H, K, "hxp.health.unknown", id="unknown"),
    ],
)
def test_transition_events(before: Status | None, after: Status, event: str) -> None:
    assert Transition("u", before, after, "why").event == event


def _unit(name: str, status: Status) -> Any:
    from hxp.health import UnitHealth

    return UnitHealth(name, "service", status, "why", 0.0, status, ())


def test_transitions_only_for_changes_and_new_trouble() -> None:
    previous = {
        "same": UnitRecord("same", U, "x", 0.0, 0.0),
        "changed": UnitRecord("changed", H, "x", 0.0, 0.0),
    }
    units = [_unit("same", U), _unit("changed", D), _unit("new-ok", H), _unit("new-bad", U)]
    got = [(t.unit, t.before, t.after) for t in transitions(previous, units)]
    assert got == [("changed", H, D), ("new-bad", None, U)]


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize(
    ("live", "replicas", "after", "removed", "restored", "alert"),
    [
        pytest.param(
            [1, 2, 3], [("a", 1, H, False), ("b", 2, U, False), ("c", 3, H, False)],
            (1, 3), ("b",), (), False, id="unhealthy-leaves",
        ),
        pytest.param(
            [1, 3], [("a", 1, H, False), ("b", 2, H, True), ("c", 3, H, False)],
            (1, 3, 2), (), ("b",), False, id="recovered-returns",
        ),
        pytest.param(
            [1, 3], [("a", 1, H, False), ("b", 2, D, True), ("c", 3, H, False)],
            (1, 3, 2), (), ("b",), False, id="degraded-still-serves",
        ),
        pytest.param(
            [1, 3], [("a", 1, H, False), ("b", 2, U, True), ("c", 3, H, False)],
            (1, 3), (), (), False, id="still-unhealthy-stays-out",
        ),
        pytest.param(
            [1, 3], [("a", 1, H, False), ("b", 2, H, False), ("c", 3, H, False)],
            (1, 3), (), (), False, id="not-ours-to-add",
        ),
        pytest.param(
            [1], [("a", 1, U, False), ("b", 2, U, True)],
            (1,), (), (), True, id="never-the-last-one",
        ),
        pytest.param(
            [1, 2], [("a", 1, U, False), ("b", 2, U, False)],
            (1, 2), (), (), True, id="all-unhealthy-none-removed",
        ),
        pytest.param(
            [1], [("a", 1, U, False), ("b", 2, H, True)],
            (2,), ("a",), ("b",), False, id="swap-with-a-recovered-one",
        ),
        pytest.param(
            [1, 9], [("a", 1, U, False)],
            (9,), ("a",), (), False, id="unknown-port-kept",
        ),
        pytest.param(
            [1, 2], [("a", 1, K, False), ("b", 2, U, False)],
            (1,), ("b",), (), False, id="unknown-is-not-removed",
        ),
    ],
)  # fmt: skip
def test_plan_route(
    live: list[int],
    replicas: list[tuple[str, int, Status, bool]],
    after: tuple[int, ...],
    removed: tuple[str, ...],
    restored: tuple[str, ...],
    alert: bool,
) -> None:
    d = plan_route("chat", live, [Replica(*r) for r in replicas])
    assert (d.after, d.removed, d.restored, bool(d.alert)) == (after, removed, restored, alert)
    if alert:
        assert "keeps its last replica" in d.alert
        assert not d.changed


# ---------------------------------------------------------------- backend layer


def _props(active: str, sub: str, **extra: str) -> dict[str, str]:
    return {"LoadState": "loaded", "ActiveState": active, "SubState": sub, **extra}


@pytest.mark.parametrize(
    ("props", "want", "reason_has"),
    [
        pytest.param(_props("active", "running", NRestarts="0"), H, "active/running", id="up"),
        pytest.param(
            _props("activating", "auto-restart", NRestarts="3", ExecMainStatus="1"),
            U, "activating/auto-restart, restarts 3, last exit status 1", id="crash-loop",
        ),
        pytest.param(
            _props("failed", "failed", Result="exit-code", ExecMainStatus="2"),
            U, "failed/failed", id="failed",
        ),
        pytest.param(_props("inactive", "dead"), U, "inactive/dead", id="stopped"),
        pytest.param(_props("reloading", "reload"), D, "reloading/reload", id="reloading"),
        pytest.param(_props("activating", "start"), K, "activating/start", id="starting"),
        pytest.param(_props("activating", "start-pre"), K, "start-pre", id="start-pre"),
        pytest.param(
            {"LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead"},
            U, "not loaded", id="unit-file-gone",
        ),
    ],
)  # fmt: skip
def test_backend_layer_from_systemd_state(
    props: dict[str, str], want: Status, reason_has: str
) -> None:
    """ActiveState/SubState as the systemd backend's observe() reports them."""
    seen = ObservedUnit(
        "web", True, running=is_running(props), healthy=is_running(props),
        detail=describe_state(props),
    )  # fmt: skip
    result = backend_result("web", seen, 1.0)
    assert result.status is want
    assert reason_has in result.reason


def _container(status: str, health: str | None, **state: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"Status": status, **state}
    if health is not None:
        body["Health"] = {"Status": health}
    return {
        "Name": "/hxp-s-web",
        "Config": {"Labels": {"hxp.stack": "s", "hxp.instance": "web"}},
        "State": body,
        "RestartCount": 0,
    }


@pytest.mark.parametrize(
    ("attrs", "want", "reason_has"),
    [
        pytest.param(_container("running", "healthy"), H, "health healthy", id="healthy"),
        pytest.param(_container("running", None), H, "running", id="no-healthcheck"),
        pytest.param(_container("running", "starting"), K, "health starting", id="starting"),
        pytest.param(_container("running", "unhealthy"), U, "health unhealthy", id="unhealthy"),
        pytest.param(_container("exited", None, ExitCode=137), U, "exit code 137", id="exited"),
    ],
)
def test_backend_layer_from_docker_state(
    attrs: dict[str, Any], want: Status, reason_has: str
) -> None:
    seen = observed_from_attrs(attrs, "box")
    assert seen is not None
    result = backend_result("web", seen, 1.0)
    assert result.status is want
    assert reason_has in result.reason


@pytest.mark.parametrize(
    ("seen", "want", "reason_has"),
    [
        pytest.param(None, U, "not deployed", id="absent"),
        pytest.param(
            ObservedUnit("w", True, True, True, detail="running, restarts 0"), H, "running",
            id="process-up",
        ),
        pytest.param(
            ObservedUnit("w", True, False, False, detail="exited, restarts 5, last exit code 1"),
            U, "not running (exited, restarts 5", id="process-down",
        ),
    ],
)  # fmt: skip
def test_backend_layer_process(seen: ObservedUnit | None, want: Status, reason_has: str) -> None:
    result = backend_result("w", seen, 1.0)
    assert result.status is want
    assert reason_has in result.reason


# ---------------------------------------------------------------- network layers


HTTP = HttpProbe(Layer.HTTP, "http://127.0.0.1:1/h")
BODY = HttpProbe(Layer.HTTP, "http://127.0.0.1:1/h", 200, "ok")


@pytest.mark.parametrize(
    ("probe", "code", "body", "latency", "want", "reason_has"),
    [
        pytest.param(HTTP, 200, None, 0.01, H, "status 200 in 10 ms", id="ok"),
        pytest.param(HTTP, 503, None, 0.01, U, "status 503, expected 200", id="503"),
        pytest.param(HTTP, 200, None, 1.5, D, "slow: over 1000 ms", id="slow"),
        pytest.param(BODY, 200, b"all ok here", 0.01, H, "status 200", id="body-match"),
        pytest.param(BODY, 200, b"nope", 0.01, U, "body lacks 'ok'", id="body-mismatch"),
        pytest.param(
            HttpProbe(Layer.HTTP, "http://x/", 204), 204, None, 0.01, H, "204", id="expect-204"
        ),
    ],
)
def test_http_result(
    probe: HttpProbe,
    code: int,
    body: bytes | None,
    latency: float,
    want: Status,
    reason_has: str,
) -> None:
    result = http_result("x", probe, code, body, latency, 2.0, S, 1.0)
    assert result.status is want
    assert reason_has in result.reason
    assert result.latency == latency


@pytest.mark.parametrize(
    ("code", "tail", "latency", "want", "reason_has"),
    [
        pytest.param(0, "", 0.01, H, "pg_isready exit code 0", id="ok"),
        pytest.param(2, "no response", 0.01, U, "exit code 2: no response", id="failed"),
        pytest.param(0, "", 1.9, D, "slow", id="slow"),
    ],
)
def test_command_result(
    code: int, tail: str, latency: float, want: Status, reason_has: str
) -> None:
    probe = CommandProbe(Layer.COMMAND, ("pg_isready", "-q"))
    result = command_result("x", probe, code, tail, latency, 2.0, S, 1.0)
    assert result.status is want
    assert reason_has in result.reason


def _sim_metrics_page(waiting: int, usage: float, successes: int) -> str:
    """A /metrics page as the vLLM double renders it (vLLM 0.33's families and labels)."""
    from hxp.sim.vllm import SimMetrics

    metrics = SimMetrics("chat", 4096)
    metrics.waiting.set(waiting)
    metrics.kv_usage.set(usage)
    success = metrics.families["vllm:request_success"]
    for reason, n in (("stop", successes - 1), ("length", 1)):
        success.labels("chat", "0", reason).inc(n)  # type: ignore[union-attr]
    body, _ = metrics.render("text/plain")
    return body.decode()


def test_parse_vllm_metrics_reads_only_what_it_needs() -> None:
    page = _sim_metrics_page(waiting=3, usage=0.42, successes=17)
    assert "vllm:num_requests_waiting_by_reason" in page  # a prefix that must not be summed
    assert parse_vllm_metrics(page) == {
        "vllm:num_requests_waiting": 3.0,
        "vllm:kv_cache_usage_perc": 0.42,
        "vllm:request_success_total": 17.0,
    }


@pytest.mark.parametrize(
    ("text", "want"),
    [
        pytest.param(
            'vllm:gpu_cache_usage_perc{model_name="m"} 0.7\n',
            {"vllm:kv_cache_usage_perc": 0.7},
            id="v0-kv-name",
        ),
        pytest.param(
            'vllm:kv_cache_usage_perc{engine="0"} 0.2\nvllm:kv_cache_usage_perc{engine="1"} 0.9\n'
            'vllm:num_requests_waiting{engine="0"} 2\nvllm:num_requests_waiting{engine="1"} 5\n',
            {"vllm:kv_cache_usage_perc": 0.9, "vllm:num_requests_waiting": 7.0},
            id="two-engines-max-kv-sum-waiting",
        ),
        pytest.param(
            'vllm:num_requests_waiting{model_name="a b}"} 4 1700000000000\n',
            {"vllm:num_requests_waiting": 4.0},
            id="brace-in-label-and-timestamp",
        ),
        pytest.param("vllm:num_requests_waiting NaN\nvllm:num_requests_waiting x\n", {}, id="junk"),
        pytest.param("", {}, id="empty"),
    ],
)
def test_parse_vllm_metrics_cases(text: str, want: dict[str, float]) -> None:
    assert parse_vllm_metrics(text) == want


@pytest.mark.parametrize(
    ("metrics", "want", "reason_has"),
    [
        pytest.param({}, K, "no vllm:num_requests_waiting", id="no-families"),
        pytest.param(
            {"vllm:num_requests_waiting": 0, "vllm:kv_cache_usage_perc": 0.1},
            H, "0 waiting, KV cache 10% used", id="idle",
        ),
        pytest.param(
            {"vllm:num_requests_waiting": 12}, D, "12 requests waiting (>= 10)", id="queueing"
        ),
        pytest.param(
            {"vllm:num_requests_waiting": 0, "vllm:kv_cache_usage_perc": 0.97},
            D, "KV cache 97% used (>= 95%)", id="kv-full",
        ),
    ],
)  # fmt: skip
def test_saturation_result(metrics: dict[str, float], want: Status, reason_has: str) -> None:
    result = saturation_result("x", metrics, S, 0.01, 1.0)
    assert result.status is want
    assert reason_has in result.reason


@pytest.mark.parametrize(
    ("code", "body", "want", "reason_has"),
    [
        pytest.param(200, b'{"object":"list","data":[{"id":"chat"}]}', H, "serves", id="listed"),
        pytest.param(200, b'{"data":[{"id":"other"}]}', U, "lists ['other'], not 'chat'", id="not"),
        pytest.param(200, b"<html>", U, "not a JSON model list", id="html"),
        pytest.param(200, b"[]", U, "not a JSON model list", id="json-list"),
        pytest.param(503, b"", U, "/v1/models: status 503", id="503"),
    ],
)
def test_readiness_result(code: int, body: bytes, want: Status, reason_has: str) -> None:
    result = readiness_result("x", code, body, "chat", 0.01, 1.0)
    assert result.status is want
    assert reason_has in result.reason


@pytest.mark.parametrize(
    ("previous", "total", "now", "skip"),
    [
        pytest.param({}, 10.0, 100.0, False, id="first-sweep-runs-it"),
        pytest.param({"success_total": 10.0, "success_at": 90.0}, 10.0, 100.0, False, id="idle"),
        pytest.param({"success_total": 10.0, "success_at": 90.0}, 14.0, 100.0, True, id="traffic"),
        pytest.param(
            {"success_total": 10.0, "success_at": 0.0}, 14.0, 400.0, False, id="reading-too-old"
        ),
        pytest.param(
            {"success_total": 10.0, "success_at": 90.0}, 3.0, 100.0, False, id="counter-reset"
        ),
        pytest.param({"success_total": 10.0, "success_at": 90.0}, None, 100.0, False, id="no-page"),
    ],
)
def test_synthetic_skip(
    previous: dict[str, float], total: float | None, now: float, skip: bool
) -> None:
    reason = synthetic_skip(previous, total, now, window=300.0)
    assert (reason is not None) is skip
    if skip:
        assert reason is not None
        assert "4 real request(s) succeeded in the last 10s" in reason


@pytest.mark.parametrize(
    ("code", "body", "want"),
    [
        pytest.param(200, b'{"choices":[{"text":"a"}]}', H, id="ok"),
        pytest.param(200, b'{"choices":[]}', U, id="no-choices"),
        pytest.param(500, b'{"error":{}}', U, id="500"),
        pytest.param(200, b"garbage", U, id="not-json"),
    ],
)
def test_synthetic_result(code: int, body: bytes, want: Status) -> None:
    assert synthetic_result("x", code, body, 0.01, 2.0, S, 1.0).status is want


@pytest.mark.parametrize(
    ("timed_out", "waiting", "want", "reason_has"),
    [
        pytest.param(True, 12.0, D, "queued behind 12 waiting request(s)", id="slow-in-a-queue"),
        pytest.param(True, 0.0, U, "no answer", id="timed-out-idle"),
        pytest.param(True, None, U, "no answer", id="timed-out-no-metrics"),
        pytest.param(False, 12.0, U, "no answer", id="refused"),
    ],
)
def test_synthetic_unanswered(
    timed_out: bool, waiting: float | None, want: Status, reason_has: str
) -> None:
    result = synthetic_unanswered("x", "no answer within 2s", timed_out, waiting, 2.0, 1.0)
    assert result.status is want
    assert reason_has in result.reason


@pytest.mark.parametrize(
    ("line", "code"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\n", 200, id="ok"),
        pytest.param(b"HTTP/1.0 503 Service Unavailable\r\n", 503, id="http10"),
        pytest.param(b"HTTP/1.1 204\r\n", 204, id="no-phrase"),
    ],
)
def test_parse_status_line(line: bytes, code: int) -> None:
    assert parse_status_line(line) == code


@pytest.mark.parametrize(
    "line",
    [b"", b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 abc\r\n", b"HTTP/1.1 999 x\r\n", b"garbage"],
)
def test_parse_status_line_refuses_garbage(line: bytes) -> None:
    with pytest.raises(ValueError, match="status"):
        parse_status_line(line)


def test_parse_header_line() -> None:
    assert parse_header_line(b"Content-Length:  12\r\n") == ("content-length", "12")
    with pytest.raises(ValueError, match="header"):
        parse_header_line(b"no colon here\r\n")


# ---------------------------------------------------------------- settings and verdicts


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flap_threshold": 0},
        {"min_healthy_share": 0},
        {"min_healthy_share": 1.5},
        {"concurrency": 0},
        {"kv_cache_degraded": 2},
        {"synthetic_window": -1},
    ],
)
def test_bad_settings_are_input_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InputError, match=next(iter(kwargs))):
        SweepSettings(**kwargs)


@pytest.mark.parametrize(
    ("units", "status", "code"),
    [
        pytest.param([H, H], H, 0, id="healthy"),
        pytest.param([H, D], D, 1, id="degraded"),
        pytest.param([H, K], D, 1, id="unknown-among-known"),
        pytest.param([K], K, 1, id="all-unknown"),
        pytest.param([D, U], U, 2, id="unhealthy"),
        pytest.param([], K, 1, id="empty"),
    ],
)
def test_stack_status_and_exit_code(units: list[Status], status: Status, code: int) -> None:
    got = stack_status([_unit(f"u{i}", s) for i, s in enumerate(units)])
    assert got is status
    assert exit_code(got) == code


# ---------------------------------------------------------------- what gets checked


def _stack(extra: dict[str, Any] | None = None) -> Any:
    data: dict[str, Any] = {
        "stack": "s",
        "hosts": {"local": {"backend": "process"}, "box": {"backend": "docker"}},
        "services": {
            "db": {
                "host": "box",
                "image": "postgres:16",
                "ports": {"pg": 5432},
                "health": {"command": ["pg_isready"], "tcp": {"port": 5432}},
            },
            "api": {
                "host": "local",
                "command": ["api"],
                "ports": {"http": 8080},
                "depends_on": ["db"],
                "health": {
                    "http": {"url": "http://127.0.0.1:8080/h", "body_contains": "ok"},
                    "command": ["true"],
                    "timeout": "3s",
                },
            },
            "bare": {"host": "local", "command": ["sleep", "9"]},
        },
        "models": {
            "chat": {
                "host": "local",
                "engine": "simulator",
                "model": "org/chat",
                "served_name": "chat-v1",
                "replicas": 2,
                "port": 9000,
            }
        },
        "gateway": {"host": "local", "routes": {"chat": 9100}},
    }
    data.update(extra or {})
    return stack_from_data(data)


def _running(*names: str) -> dict[str, ObservedUnit]:
    return {n: ObservedUnit(n, True, True, True) for n in names}


def test_plan_checks_per_kind_of_unit() -> None:
    stack = _stack()
    checks = {c.instance: c for c in plan_checks(stack, None)}
    assert sorted(checks) == ["api", "bare", "chat-0", "chat-1", "db"]
    # docker: the health command runs inside the container (HEALTHCHECK -> backend layer)
    assert checks["db"].probes == (TcpProbe(Layer.TCP, "127.0.0.1", 5432),)
    assert checks["api"].probes == (
        HttpProbe(Layer.HTTP, "http://127.0.0.1:8080/h", 200, "ok"),
        CommandProbe(Layer.COMMAND, ("true",)),
    )
    assert checks["api"].timeout == 3.0
    assert checks["bare"].probes == ()
    assert checks["chat-1"].probes == (
        HttpProbe(Layer.LIVENESS, "http://127.0.0.1:9001/health"),
        ModelProbe("http://127.0.0.1:9001", "chat-v1"),
    )
    assert checks["chat-1"].port == 9001


def test_plan_checks_follows_the_running_blue_green_slot() -> None:
    stack = _stack()
    # replica 0 moved to slot 1 (port 9000 + 2), replica 1 is mid-switch (both run)
    seen = _running("db", "api", "bare", "chat-0-g", "chat-1", "chat-1-g")
    checks = {c.instance: c for c in plan_checks(stack, seen)}
    assert sorted(checks) == ["api", "bare", "chat-0-g", "chat-1", "chat-1-g", "db"]
    assert checks["chat-0-g"].port == 9002


def test_plan_checks_skips_network_probes_of_what_does_not_run() -> None:
    stack = _stack()
    seen = _running("api")
    seen["db"] = ObservedUnit("db", True, running=False, healthy=False, detail="exited")
    checks = {c.instance: c for c in plan_checks(stack, seen)}
    assert checks["db"].probes == ()
    assert checks["chat-0"].probes == ()
    assert checks["api"].probes != ()
    # a host whose backend could not be asked: probe anyway
    blind = {c.instance: c for c in plan_checks(stack, seen, {"box": "engine down"})}
    assert blind["db"].probes != ()


def _result(instance: str, layer: Layer, status: Status) -> LayerResult:
    return LayerResult(instance, layer, status, f"{layer} {status}", 0.01, 5.0)


def test_evaluate_sweep_end_to_end() -> None:
    stack = _stack()
    seen = _running("db", "api", "bare", "chat-0", "chat-1")
    checks = plan_checks(stack, seen)
    results = [
        _result("db", Layer.TCP, U),
        _result("api", Layer.HTTP, H),
        _result("chat-0", Layer.LIVENESS, H),
        _result("chat-1", Layer.LIVENESS, U),
    ]
    report = evaluate_sweep(stack, checks, results, seen, {}, {}, S, 5.0)
    units = {u.unit: u for u in report.units}
    assert next(u.unit for u in report.units) in ("bare", "chat", "db")  # dependencies first
    assert units["db"].status is U
    assert units["api"].status is D
    assert units["api"].reason == "dependency db is unhealthy"
    assert units["api"].own is H
    assert units["chat"].status is D  # 1 of 2 replicas healthy, share 0.5
    assert units["chat"].layers() == {"backend": H, "liveness": U}
    assert report.status is U
    assert [(t.unit, t.after) for t in report.transitions] == [("chat", D), ("db", U), ("api", D)]
    rows = health_rows(report)
    assert [r["instance"] for r in rows if r["unit"] == ""] == ["chat-0", "chat-1"]
    text = health_markdown(report)
    assert "**unhealthy**" in text
    assert "`db` **unhealthy**" in text


def test_table_is_published_when_it_says_something_new() -> None:
    stack = _stack()
    seen = _running("db", "api", "bare", "chat-0", "chat-1")
    checks = plan_checks(stack, seen)
    healthy = [_result("db", Layer.TCP, H), _result("api", Layer.HTTP, H)]
    rows = health_rows(evaluate_sweep(stack, checks, healthy, seen, {}, {}, S, 5.0))
    slower = [dict(r, latency_ms="999") for r in rows]
    assert table_fingerprint(slower) == table_fingerprint(rows)  # latencies alone: same
    down = [_result("db", Layer.TCP, U), _result("api", Layer.HTTP, H)]
    changed = health_rows(evaluate_sweep(stack, checks, down, seen, {}, {}, S, 5.0))
    assert table_fingerprint(changed) != table_fingerprint(rows)
    fp = table_fingerprint(rows)
    assert table_due(fp, None, 100.0)  # nothing published yet
    assert not table_due(fp, (fp, 100.0), 160.0)
    assert table_due(table_fingerprint(changed), (fp, 100.0), 101.0)
    assert table_due(fp, (fp, 100.0), 100.0 + 300.0)  # refreshed every 5 minutes
    report = evaluate_sweep(stack, checks, healthy, seen, {}, {}, S, 5.0)
    assert "unchanged since 00:01:40 UTC" in health_markdown(report, table_since=100.0)
    assert "unchanged since" not in health_markdown(report)


def test_evaluate_sweep_damps_against_the_previous_sweep() -> None:
    stack = _stack({"services": {"api": {"host": "local", "command": ["x"]}}, "gateway": None})
    checks = plan_checks(stack, _running("api", "chat-0", "chat-1"))
    first = evaluate_sweep(stack, checks, [], _running("api", "chat-0", "chat-1"), {}, {}, S, 1.0)
    assert {u.unit: u.status for u in first.units} == {"api": H, "chat": H}
    previous = {i.instance: i for i in first.instances}
    units = {u.unit: UnitRecord(u.unit, u.status, u.reason, u.since, 1.0) for u in first.units}
    down = _running("chat-0", "chat-1")  # api stopped
    second = evaluate_sweep(stack, checks, [], down, previous, units, S, 2.0)
    api = second.instances[0] if second.instances[0].unit == "api" else second.instances[-1]
    assert (api.status, api.seen, api.count) == (H, U, 1)
    assert "still healthy (unhealthy 1/2 before it changes)" in api.reason
    assert second.transitions == []
    previous = {i.instance: i for i in second.instances}
    third = evaluate_sweep(stack, checks, [], down, previous, units, S, 3.0)
    assert [(t.unit, t.before, t.after) for t in third.transitions] == [("api", H, U)]


def test_store_keeps_the_health_state_between_sweeps(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inst = InstanceHealth(
        instance="chat-1",
        unit="chat",
        status=H,
        seen=U,
        reason="still healthy",
        since=1.0,
        checked_at=2.0,
        pending=U,
        count=1,
        port=9001,
        ejected=True,
        data=(("success_at", 2.0), ("success_total", 7.0)),
    )
    unit = _unit("chat", D)
    store.save_health("s", [inst], [unit], [("chat", "health", "healthy -> degraded: why")])
    instances, units = store.health_state("s")
    assert instances == {"chat-1": inst}
    assert units["chat"].status is D
    assert [e["message"] for e in store.events("s")] == ["healthy -> degraded: why"]
    store.set_ejected("s", ["chat-1"], False)
    assert store.health_state("s")[0]["chat-1"].ejected is False
    store.save_health("s", [], [])  # the next sweep's state replaces the last one
    assert store.health_state("s") == ({}, {})


def test_report_serialises() -> None:
    stack = _stack({"gateway": None})
    seen = _running("db", "api", "bare", "chat-0", "chat-1")
    report = evaluate_sweep(stack, plan_checks(stack, seen), [], seen, {}, {}, S, 1.0)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["status"] == "healthy"
    assert set(data["instances"]) == {"db", "api", "bare", "chat-0", "chat-1"}
