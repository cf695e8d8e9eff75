"""hxp-vllm-sim behaves like the vLLM release it imitates (`--version`): its metric families,
/ping and /load, the `usage` object and the max_tokens check (issue 16 items 5-7). Every gate
names the vLLM file and the releases it was read at."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import httpx
import pytest

from hxp import metric_names
from hxp.querylint import exposition_series
from hxp.sim.vllm import SimConfig, SimMetrics, SimServer, usage_body

BASE = SimConfig(port=0, model="org/m", latency_ms=1, tokens_per_second=5000, max_model_len=64)


@contextmanager
def running(config: SimConfig) -> Iterator[httpx.Client]:
    server = SimServer(config, on_crash=lambda: None)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.run(install_signal_handlers=False)), daemon=True
    )
    thread.start()
    assert server.listening.wait(10), "the simulator did not start"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            yield client
    finally:
        server.stop_threadsafe()
        thread.join(10)


def page_names(version: str) -> set[str]:
    body, _ = SimMetrics("m", 4096, version).render("text/plain")
    return {n for n in exposition_series(body.decode()) if n.startswith("vllm:")}


# ------------------------------------------------------------------------------ metric names


def test_0_10_1_has_time_per_output_token_and_the_gpu_twins_but_no_itl() -> None:
    """vllm/v1/metrics/loggers.py at 0.10.1: vllm:time_per_output_token_seconds is the only
    inter-token histogram; vllm:gpu_cache_usage_perc and gpu_prefix_cache_* are shown."""
    names = page_names("0.10.1")
    assert "vllm:time_per_output_token_seconds_bucket" in names
    assert "vllm:inter_token_latency_seconds_bucket" not in names
    assert {"vllm:gpu_cache_usage_perc", "vllm:gpu_prefix_cache_hits_total"} <= names
    assert "vllm:cache_config_info" in names
    assert "vllm:estimated_flops_per_gpu_total" not in names


def test_0_11_shows_both_inter_token_names_0_12_to_0_14_hide_the_old_0_15_drops_it() -> None:
    """loggers.py: 0.11.0 creates both; 0.12.0-0.14.1 create the old one only under
    `if self.show_hidden_metrics:`; 0.15.0 not at all."""
    old = "vllm:time_per_output_token_seconds_bucket"
    new = "vllm:inter_token_latency_seconds_bucket"
    assert {old, new} <= page_names("0.11.0")
    for version in ("0.12.0", "0.13.0", "0.14.1", "0.15.0", "0.16.0"):
        names = page_names(version)
        assert new in names, version
        assert old not in names, version
    change = metric_names.CHANGED["vllm:time_per_output_token_seconds"]
    assert (change.hidden, change.gone) == ("0.12.0", "0.15.0")


def test_estimated_mfu_counters_from_0_17_and_render_time_at_0_34_after_a_request() -> None:
    """vllm/v1/metrics/perf.py PerfMetricsProm (created unconditionally from 0.17.0, absent
    from 0.16.0); vllm/renderers/metrics.py (0.34.0, registered lazily)."""
    assert "vllm:estimated_read_bytes_per_gpu_total" not in page_names("0.16.0")
    assert "vllm:estimated_read_bytes_per_gpu_total" in page_names("0.17.0")
    metrics = SimMetrics("m", 4096, "0.34.0")
    before, _ = metrics.render("text/plain")
    assert b"vllm:request_render_duration_seconds" not in before
    metrics.rendered("chat", 0.002)
    after, _ = metrics.render("text/plain")
    assert (
        b'vllm:request_render_duration_seconds_bucket{le="0.0025",model_name="m",'
        b'request_type="chat"} 1.0' in after
    )
    at_33 = SimMetrics("m", 4096, "0.33.0")
    at_33.rendered("chat", 0.002)
    assert b"render_duration" not in at_33.render("text/plain")[0]


@pytest.mark.parametrize("version", ["0.10.1", "0.11.0", "0.16.0", "0.34.0"])
def test_the_page_serves_exactly_the_families_of_its_version(version: str) -> None:
    metrics = SimMetrics("m", 4096, version)
    metrics.rendered("completion", 0.001)
    body, _ = metrics.render("text/plain")
    served = {n for n in exposition_series(body.decode()) if n.startswith("vllm:")}
    assert served == metric_names.vllm_series(version, lazy=True)


def test_the_old_twins_carry_the_same_values() -> None:
    metrics = SimMetrics("m", 4096, "0.10.1")
    metrics.kv_usage.set(0.25)
    metrics.h_itl.observe(0.03)
    body = metrics.render("text/plain")[0].decode()
    assert 'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25' in body
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25' in body
    assert 'vllm:time_per_output_token_seconds_count{engine="0",model_name="m"} 1.0' in body


def test_name_at_resolves_the_inter_token_histogram() -> None:
    assert metric_names.name_at(metric_names.ITL, "0.10.1") == (
        "vllm:time_per_output_token_seconds"
    )
    assert metric_names.name_at(metric_names.ITL, "0.11.0") == metric_names.ITL
    assert metric_names.name_at(metric_names.KV_USAGE, "0.10.1") == metric_names.KV_USAGE
    assert metric_names.name_at("vllm:no_such_family", "0.34.0") == "vllm:no_such_family"


# ------------------------------------------------------------------------------ endpoints


def test_ping_answers_like_health_on_get_and_post() -> None:
    """vllm/entrypoints/serve/sagemaker/api_router.py (0.34.0): GET and POST /ping return
    health(); 0.10.1 and 0.11.0 route the same in openai/api_server.py."""
    with running(BASE) as client:
        assert client.get("/ping").status_code == 200
        assert client.post("/ping").status_code == 200
        assert client.put("/ping").status_code == 405
    with running(replace(BASE, never_ready=True)) as client:
        assert client.get("/health").status_code == 503
        assert client.get("/ping").status_code == 503
        assert client.post("/ping").status_code == 503


def test_load_counts_in_flight_requests_only_when_tracking() -> None:
    """vllm/entrypoints/serve/instrumentator/basic.py (0.34.0): /load always answers
    {"server_load": N}; serve/utils/api_utils.py load_aware_call moves N only with
    --enable-server-load-tracking, from a request's start to the end of its response."""
    slow = replace(BASE, tokens_per_second=20, max_model_len=4096)
    for tracking, expected in ((False, 0), (True, 1)):
        with running(replace(slow, server_load_tracking=tracking)) as client:
            assert client.get("/load").json() == {"server_load": 0}
            with client.stream(
                "POST",
                "/v1/completions",
                json={"prompt": "x", "max_tokens": 40, "ignore_eos": True, "stream": True},
            ) as stream:
                lines = stream.iter_lines()
                next(lines)
                assert client.get("/load").json() == {"server_load": expected}
                assert "data: [DONE]" in list(lines)
            assert client.get("/load").json() == {"server_load": 0}


# ------------------------------------------------------------------------------ responses


def test_usage_as_each_release_serialises_it() -> None:
    """UsageInfo: prompt_tokens_details None and shown up to 0.33.0; completion_tokens_details
    from 0.28.0 (absent at 0.27.0); a None prompt_tokens_details left out from 0.34.0
    (`exclude_if`, vllm/entrypoints/serve/engine/protocol.py)."""
    base = {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}
    assert usage_body(3, 2, "0.27.0") == {**base, "prompt_tokens_details": None}
    assert usage_body(3, 2, "0.33.0") == {
        **base,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    assert usage_body(3, 2, "0.34.0") == {**base, "completion_tokens_details": None}


@pytest.mark.parametrize("chat", [False, True])
def test_a_0_34_answer_has_completion_details_and_no_null_prompt_details(chat: bool) -> None:
    with running(replace(BASE, version="0.34.0")) as client:
        if chat:
            payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            body = client.post("/v1/chat/completions", json=payload).json()
        else:
            body = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).json()
    assert "prompt_tokens_details" not in body["usage"]
    assert body["usage"]["completion_tokens_details"] is None


def test_max_tokens_beyond_the_context_is_lowered_from_0_32_and_refused_before() -> None:
    """vllm/renderers/params.py TokenizeParams.max_input_tokens: `max_total_tokens` at 0.32.0
    (get_max_tokens() lowers max_tokens to max_model_len - prompt), `max_total_tokens -
    max_output_tokens` at 0.31.0 (a 400)."""
    payload = {"prompt": [1] * 60, "max_tokens": 10, "ignore_eos": True}
    with running(replace(BASE, version="0.32.0")) as client:
        body = client.post("/v1/completions", json=payload).json()
        assert body["usage"]["completion_tokens"] == 4
        assert body["choices"][0]["finish_reason"] == "length"
        too_long = client.post("/v1/completions", json={"prompt": [1] * 64, "max_tokens": 1})
        assert too_long.status_code == 400
    with running(replace(BASE, version="0.31.0")) as client:
        refused = client.post("/v1/completions", json=payload)
        assert refused.status_code == 400
        assert "maximum context length is 64 tokens" in refused.json()["error"]["message"]


def test_a_version_that_is_no_release_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from hxp.sim.vllm import parse_config

    with pytest.raises(SystemExit) as exc:
        parse_config(["--version", "latest"], {})
    assert exc.value.code == 2
    assert "--version must be a vLLM release such as 0.34.0, got 'latest'" in (
        capsys.readouterr().err
    )
    assert parse_config(["--version", "0.10.1"], {}).version == "0.10.1"
    tracking = parse_config([], {"HXP_VLLM_SIM_SERVER_LOAD_TRACKING": "1"})
    assert tracking.server_load_tracking is True


def test_families_outside_the_engine_loggers_are_known_names() -> None:
    """Declaring vllm:cache_config_info or an MFU counter is no 'misspelt name' warning."""
    from hxp.metrics import check_metric_name

    for name in (
        "vllm:cache_config_info",
        "vllm:estimated_flops_per_gpu_total",
        "vllm:estimated_flops_per_gpu",
        "vllm:request_render_duration_seconds",
    ):
        assert check_metric_name(name, "0.34.0") is None, name  # fmt: skip
    assert metric_names.exposed_name("vllm:estimated_flops_per_gpu") == (
        "vllm:estimated_flops_per_gpu_total"
    )
    issue = check_metric_name("vllm:estimated_flops_per_gpux", "0.34.0")
    assert issue is not None
    assert "misspelt" in issue.message


@pytest.mark.parametrize(
    ("name", "version", "words"),
    [
        ("vllm:engine_sleep_state", "0.11.0", "first exposed in 0.12.0"),
        ("vllm:request_render_duration_seconds", "0.33.0", "first exposed in 0.34.0"),
        ("vllm:estimated_flops_per_gpu_total", "0.16.0", "first exposed in 0.17.0"),
        ("vllm:prompt_tokens_recomputed", "0.20.0", "not exposed by default since 0.20.0"),
    ],
)
def test_a_family_outside_its_releases_is_reported(name: str, version: str, words: str) -> None:
    from hxp.metrics import check_metric_name

    issue = check_metric_name(name, version)
    assert issue is not None
    assert issue.severity == "warning"
    assert words in issue.message
    assert check_metric_name(name, "0.19.1" if "recomputed" in name else "0.34.0") is None
