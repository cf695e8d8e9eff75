"""hxp.metrics against captured-format vLLM pages (tests/data/vllm_metrics): pre-filter, parse,
histogram_quantile checked by hand, rates with counter resets, dead and stale targets, vLLM's
renamed metric names, the stack's `metrics:` section."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hxp.metrics import (
    E2E,
    ITL,
    PROMPT_TOKENS,
    TTFT,
    VLLM_FAMILIES,
    Baseline,
    Page,
    Scrape,
    Target,
    aggregate,
    aliases,
    check_metric_name,
    failure_class,
    histogram_quantile,
    lifecycle_state,
    parse_page,
    replica_targets,
    select_families,
    wanted_families,
    window,
)
from hxp.spec import Stack
from hxp.store import Store
from tests.support.vllm_pages import FIXTURES, render_page

DATA = Path(__file__).parents[1] / "data" / "vllm_metrics"
WANTED = wanted_families()
T0 = 1_000_000.0
T1 = T0 + 30  # the fixtures' second scrape, 30 s later


def text(name: str) -> str:
    return (DATA / name).read_text()


def page(name: str) -> Page:
    return parse_page(text(name), WANTED)


def stack(metrics: dict[str, Any] | None = None, replicas: int = 2, **extra: Any) -> Stack:
    data: dict[str, Any] = {
        "stack": "s",
        "hosts": {"local": {"backend": "process"}},
        "models": {
            "chat": {
                "host": "local",
                "model": "org/chat",
                "engine": "simulator",
                "replicas": replicas,
                "port": 18000,
                "vllm": {"version": "0.33.0"},
            },
        },
        **extra,
    }
    if metrics is not None:
        data["metrics"] = metrics
    return Stack.model_validate(data)


CHAT = [Target("chat-0", "chat", "http://x:1/metrics", "0.33.0"),
        Target("chat-1", "chat", "http://x:2/metrics", "0.33.0")]  # fmt: skip


def two_replicas(metrics: dict[str, Any] | None = None, **pages: str) -> Any:
    """Aggregate chat-0 and chat-1 from t0 baselines to t1 pages (or the pages given)."""
    declared = stack(metrics)
    wanted = wanted_families(declared.metrics)
    baselines = {
        "chat-0": Baseline.of(parse_page(text("v0.33_chat-0_t0.txt"), wanted), T0),
        "chat-1": Baseline.of(parse_page(text("v0.33_chat-1_t0.txt"), wanted), T0),
    }
    now = {
        "chat-0": pages.get("chat_0", text("v0.33_chat-0_t1.txt")),
        "chat-1": pages.get("chat_1", text("v0.33_chat-1_t1.txt")),
    }
    scrapes = {k: Scrape(T1, parse_page(v, wanted)) for k, v in now.items()}
    return aggregate(declared, CHAT, scrapes, baselines)


def fleet(result: Any, name: str, **labels: str) -> float:
    want = {"stack": "s", "model": "chat", **labels}
    hits = [s.value for s in result.samples if s.name == name and dict(s.labels) == want]
    assert len(hits) == 1, (name, want, [s for s in result.samples if s.name == name])
    return float(hits[0])


# ------------------------------------------------------------------------------ fixtures


def test_fixtures_are_current() -> None:
    """The committed pages are what tests/support/vllm_pages.py renders (regenerate: see it)."""
    for name, (spec, version) in FIXTURES.items():
        assert text(name) == render_page(spec, version), name


def test_fixture_is_vllm_033_exposition() -> None:
    page_text = text("v0.33_chat-0_t1.txt")
    assert "# TYPE vllm:prompt_tokens_total counter" in page_text
    assert "# TYPE vllm:prompt_tokens_created gauge" in page_text
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="chat"}' in (
        page_text
    )
    assert "vllm:time_to_first_token_seconds_count{" in page_text
    assert "vllm:time_to_first_token_seconds_sum{" in page_text
    for family in VLLM_FAMILIES:
        assert f"# TYPE {family} " in page_text, family


def test_reference_table_matches_the_simulator() -> None:
    from hxp.sim.vllm import VLLM_METRICS

    exposed = {s.name + ("_total" if s.kind == "counter" else ""): s.kind for s in VLLM_METRICS}
    assert exposed == VLLM_FAMILIES


# ------------------------------------------------------------------------------ pre-filter, parse


def test_select_families_keeps_only_the_named_blocks() -> None:
    cut = select_families(text("v0.33_chat-0_t1.txt"), frozenset({TTFT, PROMPT_TOKENS}))
    names = {line.split()[2] for line in cut.splitlines() if line.startswith("# TYPE")}
    assert names == {TTFT, PROMPT_TOKENS}
    assert "vllm:prompt_tokens_created" not in cut  # the _created family is its own block
    assert len(cut) < len(text("v0.33_chat-0_t1.txt")) / 8


def test_select_families_without_help_lines() -> None:
    bare = "\n".join(
        line for line in text("v0.33_chat-0_t1.txt").splitlines() if not line.startswith("# ")
    )
    cut = select_families(bare, frozenset({PROMPT_TOKENS, TTFT}))
    assert 'vllm:prompt_tokens_total{engine="0",model_name="chat"} 18000.0' in cut
    assert cut.count("vllm:time_to_first_token_seconds_bucket") == 23
    assert "vllm:generation_tokens_total" not in cut


def test_parse_page_reads_counters_gauges_histograms_and_start_time() -> None:
    p = page("v0.33_chat-0_t1.txt")
    me = (("engine", "0"), ("model_name", "chat"))
    assert p.started == 1_767_225_600.0
    assert p.counters[PROMPT_TOKENS][me] == 18000
    assert p.gauges["vllm:kv_cache_usage_perc"][me] == pytest.approx(0.31)
    ttft = p.histograms[TTFT][me]
    assert ttft.bounds[-1] == math.inf
    assert ttft.count == 150
    assert ttft.sum == pytest.approx(40 * 0.03 + 10 * 0.07 + 10 * 0.015 + 60 * 0.03 + 20 * 0.05
                                     + 8 * 0.09 + 2 * 0.3)  # fmt: skip
    assert "vllm:request_params_n" not in p.histograms  # filtered out before parsing


def test_parse_rejects_foreign_text() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the parser's own message
        parse_page("<html>not metrics</html>\n")


# ------------------------------------------------------------------------------ quantiles


def test_quantiles_of_a_cumulative_fixture_by_hand() -> None:
    """chat-0 at t0: TTFT 40 x 0.03 s (le 0.04) and 10 x 0.07 s (le 0.08), 50 in all."""
    h = page("v0.33_chat-0_t0.txt").histograms[TTFT][(("engine", "0"), ("model_name", "chat"))]
    pairs = list(zip(h.bounds, h.counts, strict=True))
    # p50: rank 25 falls in (0.02, 0.04] holding 40: 0.02 + 0.02 * 25/40
    assert histogram_quantile(0.5, pairs) == pytest.approx(0.0325)
    # p95: rank 47.5 falls in (0.06, 0.08] (cum 40 -> 50): 0.06 + 0.02 * 7.5/10
    assert histogram_quantile(0.95, pairs) == pytest.approx(0.075)
    # p99: rank 49.5: 0.06 + 0.02 * 9.5/10
    assert histogram_quantile(0.99, pairs) == pytest.approx(0.079)


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        pytest.param(0.5, [(1.0, 0), (2.0, 10), (math.inf, 10)], 1.5, id="interpolates"),
        pytest.param(0.5, [(1.0, 10), (math.inf, 10)], 0.5, id="first-bucket-starts-at-0"),
        pytest.param(0.99, [(1.0, 1), (2.0, 1), (math.inf, 10)], 2.0, id="inf-bucket-is-max"),
        pytest.param(0.5, [(1.0, 1), (2.0, 2)], math.nan, id="no-inf-bucket"),
        pytest.param(0.5, [(1.0, 0), (math.inf, 0)], math.nan, id="no-observations"),
        pytest.param(0.5, [(math.inf, 4)], math.nan, id="one-bucket"),
        pytest.param(-0.1, [(1.0, 1), (math.inf, 1)], -math.inf, id="q-below-0"),
        pytest.param(1.1, [(1.0, 1), (math.inf, 1)], math.inf, id="q-above-1"),
        pytest.param(0.5, [(-1.0, 5), (0.0, 8), (math.inf, 10)], -1.0, id="negative-first-bound"),
        pytest.param(0.5, [(2.0, 10), (1.0, 4), (math.inf, 10)], 1 + 1 / 6, id="unsorted-input"),
        pytest.param(0.5, [(1.0, 6), (2.0, 4), (math.inf, 10)], 5 / 6, id="non-monotonic-fixed"),
        pytest.param(0.5, [(1.0, 2), (1.0, 2), (math.inf, 8)], 1.0, id="duplicate-bounds-merge"),
    ],
)
def test_histogram_quantile_follows_prometheus(
    q: float, buckets: list[tuple[float, float]], expected: float
) -> None:
    got = histogram_quantile(q, buckets)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected)


def test_window_quantiles_by_hand() -> None:
    """chat-0 between t0 and t1 gained 100 TTFTs: 10 x 0.015, 60 x 0.03, 20 x 0.05, 8 x 0.09,
    2 x 0.3. Bucket increases (cumulative): le .02:10 .04:70 .06:90 .08:90 .1:98 .25:98 .5:100."""
    win = window(Baseline.of(page("v0.33_chat-0_t0.txt"), T0), page("v0.33_chat-0_t1.txt"), T1)
    assert win is not None
    assert win.seconds == 30
    assert not win.reset
    h = win.histograms[TTFT][(("engine", "0"), ("model_name", "chat"))]
    pairs = list(zip(h.bounds, h.counts, strict=True))
    assert h.count == 100
    assert histogram_quantile(0.5, pairs) == pytest.approx(0.02 + 0.02 * 40 / 60)  # 0.0333
    assert histogram_quantile(0.95, pairs) == pytest.approx(0.08 + 0.02 * 5 / 8)  # 0.0925
    assert histogram_quantile(0.99, pairs) == pytest.approx(0.25 + 0.25 * 1 / 2)  # 0.375


# ------------------------------------------------------------------------------ aggregation


def test_two_replicas_rates_ratios_and_merged_quantiles() -> None:
    result = two_replicas()
    # requests: chat-0 +100 (stop 90, length 8, abort 1, error 1), chat-1 +100 stop; 30 s
    assert fleet(result, "fleet:request_rate") == pytest.approx(200 / 30)
    assert fleet(result, "fleet:success_ratio") == pytest.approx(198 / 200)
    assert fleet(result, "fleet:prompt_tokens_per_second") == pytest.approx((12000 + 6000) / 30)
    assert fleet(result, "fleet:generation_tokens_per_second") == pytest.approx(9000 / 30)
    # TTFT increases summed over both: le .02:10 .04:120 .06:140 .08:140 .1:148 .25:198 .5:200
    assert fleet(result, "fleet:ttft_seconds", quantile="0.5") == pytest.approx(
        0.02 + 0.02 * 90 / 110
    )
    assert fleet(result, "fleet:ttft_seconds", quantile="0.95") == pytest.approx(
        0.1 + 0.15 * 42 / 50
    )
    assert fleet(result, "fleet:ttft_seconds", quantile="0.99") == pytest.approx(0.25)
    # ITL chat-0: 3000 x .02, 2000 x .06, 1000 x .2; chat-1: 3000 x .02 -> 9000 in all:
    # le .025:6000 .075:8000 .2:9000 -> p50 .01 + .015 * 4500/6000; p99 .15 + .05 * 910/1000
    assert fleet(result, "fleet:inter_token_latency_seconds", quantile="0.5") == pytest.approx(
        0.01 + 0.015 * 4500 / 6000
    )
    assert fleet(result, "fleet:inter_token_latency_seconds", quantile="0.99") == pytest.approx(
        0.15 + 0.05 * 910 / 1000
    )
    # e2e: chat-0 50 x 0.9 (le 1), 40 x 1.2 (le 1.5), 10 x 3.0 (le 5); chat-1 100 x 1.2:
    # le 1:50 1.5:190 5:200 -> p95 rank 190 is the top of (1, 1.5]
    assert fleet(result, "fleet:e2e_latency_seconds", quantile="0.95") == pytest.approx(1.5)
    assert fleet(result, "fleet:requests_waiting") == 3
    assert fleet(result, "fleet:requests_running") == 12
    assert fleet(result, "fleet:kv_cache_usage_mean") == pytest.approx((0.31 + 0.45) / 2)
    assert fleet(result, "fleet:kv_cache_usage_max") == pytest.approx(0.45)
    assert fleet(result, "fleet:targets", state="up") == 2
    assert fleet(result, "fleet:targets", state="down") == 0
    # the fleet-wide series (model="") equal the one model's here
    assert fleet(result, "fleet:request_rate", model="") == pytest.approx(200 / 30)
    assert not [i for i in result.issues if i.severity != "info"]


def test_counter_reset_mid_series_gives_no_negative_rate() -> None:
    """chat-1 restarted between t1 and t2: its counters start again from 0."""
    before = Baseline.of(page("v0.33_chat-1_t1.txt"), T1)
    after = page("v0.33_chat-1_t2_restarted.txt")
    win = window(before, after, T1 + 30)
    assert win is not None
    assert win.reset
    one = [Target("chat-1", "chat", "http://x:2/metrics", "0.33.0")]
    result = aggregate(stack(replicas=1), one, {"chat-1": Scrape(T1 + 30, after)},
                       {"chat-1": before})  # fmt: skip
    rate = fleet(result, "fleet:request_rate")
    assert rate == pytest.approx(6 / 30)  # the new value is the increase, as rate() does
    assert all(s.value >= 0 for s in result.samples if "per_second" in s.name or "rate" in s.name)
    assert any("counters reset" in i.message for i in result.issues)


def test_counter_reset_without_start_time_is_caught_per_series() -> None:
    drop = "process_start_time_seconds"
    strip = lambda t: "\n".join(ln for ln in t.splitlines() if drop not in ln) + "\n"  # noqa: E731
    before = parse_page(strip(text("v0.33_chat-1_t1.txt")), WANTED)
    after = parse_page(strip(text("v0.33_chat-1_t2_restarted.txt")), WANTED)
    assert before.started is None
    win = window(Baseline.of(before, T1), after, T1 + 30)
    assert win is not None
    assert win.reset
    me = (("engine", "0"), ("model_name", "chat"))
    assert win.counters[PROMPT_TOKENS][me] == 600  # not 600 - 8000
    assert win.histograms[TTFT][me].count == 6


def test_dead_target_is_reported_and_left_out() -> None:
    baselines = {
        "chat-0": Baseline.of(page("v0.33_chat-0_t0.txt"), T0),
        "chat-1": Baseline.of(page("v0.33_chat-1_t0.txt"), T0),
    }
    scrapes = {
        "chat-0": Scrape(T1, page("v0.33_chat-0_t1.txt")),
        "chat-1": Scrape(T1, None, "connection refused", "transient"),
    }
    result = aggregate(stack(), CHAT, scrapes, baselines)
    assert fleet(result, "fleet:request_rate") == pytest.approx(100 / 30)  # chat-0 alone
    assert fleet(result, "fleet:targets", state="down") == 1
    assert fleet(result, "fleet:requests_running") == 7
    dead = [i for i in result.issues if i.target == "chat-1"]
    assert dead
    assert "connection refused" in dead[0].message
    assert dead[0].severity == "warning"
    assert "chat-1" not in result.baselines  # its old baseline stays in the store
    assert result.errors == {("scrape", "transient"): 1}


def test_first_scrape_gives_gauges_but_no_rates() -> None:
    result = aggregate(stack(replicas=1), CHAT[:1], {"chat-0": Scrape(T0, page(
        "v0.33_chat-0_t0.txt"))}, {})  # fmt: skip
    names = {s.name for s in result.samples}
    assert "fleet:requests_running" in names
    assert "fleet:request_rate" not in names
    assert "fleet:ttft_seconds" not in names
    assert any("first scrape" in i.message for i in result.issues)


def test_stale_baseline_gives_no_rates() -> None:
    old = Baseline.of(page("v0.33_chat-0_t0.txt"), T1 - 3600)
    now = {"chat-0": Scrape(T1, page("v0.33_chat-0_t1.txt"))}
    result = aggregate(stack({"stale_after": "5m"}, replicas=1), CHAT[:1], now, {"chat-0": old})
    assert "fleet:request_rate" not in {s.name for s in result.samples}
    assert any("3600s old" in i.message for i in result.issues)


def test_no_requests_in_the_window_gives_no_quantile() -> None:
    same = page("v0.33_chat-0_t1.txt")
    result = aggregate(stack(replicas=1), CHAT[:1], {"chat-0": Scrape(T1 + 30, same)},
                       {"chat-0": Baseline.of(same, T1)})  # fmt: skip
    assert fleet(result, "fleet:request_rate") == 0
    assert "fleet:ttft_seconds" not in {s.name for s in result.samples}
    assert "fleet:success_ratio" not in {s.name for s in result.samples}


def test_vllm_0_10_itl_is_read_under_its_old_name() -> None:
    """vLLM 0.10.1 exposes ITL as vllm:time_per_output_token_seconds: +1000 x 0.04 s (le .05)
    and +500 x 0.12 s (le .15) between t0 and t1."""
    before, after = page("v0.10.1_legacy_t0.txt"), page("v0.10.1_legacy_t1.txt")
    assert ITL not in after.histograms
    assert "vllm:time_per_output_token_seconds" in after.histograms
    target = [Target("legacy", "legacy", "http://x:3/metrics", "0.10.1")]
    legacy = Stack.model_validate({
        "stack": "s", "hosts": {"local": {}},
        "models": {"legacy": {"host": "local", "model": "org/m", "engine": "simulator",
                              "vllm": {"version": "0.10.1"}}},
    })  # fmt: skip
    result = aggregate(legacy, target, {"legacy": Scrape(T1, after)},
                       {"legacy": Baseline.of(before, T0)})  # fmt: skip
    itl = {
        dict(s.labels)["quantile"]: s.value
        for s in result.samples
        if s.name == "fleet:inter_token_latency_seconds" and dict(s.labels)["model"]
    }
    assert itl["0.5"] == pytest.approx(0.025 + 0.025 * 750 / 1000)
    assert itl["0.95"] == pytest.approx(0.1 + 0.05 * 425 / 500)
    assert itl["0.99"] == pytest.approx(0.1 + 0.05 * 485 / 500)
    assert not [i for i in result.issues if "exposes no" in i.message]


# ------------------------------------------------------------------------------ declared metrics


def test_price_per_label_and_custom_series() -> None:
    result = two_replicas(
        {
            "price_per_million_tokens": 0.5,
            "per_label": ["model_name"],
            "series": {
                "preemption_rate": {"family": "vllm:num_preemptions"},
                "waiting_for_capacity": {
                    "family": "vllm:num_requests_waiting_by_reason",
                    "op": "sum",
                    "match": {"reason": "capacity"},
                },
                "e2e_p50": {"family": E2E, "op": "p50"},
            },
        }
    )
    # (600 prompt + 300 generated) tok/s x 0.5 per 1M x 3600 s
    assert fleet(result, "fleet:cost_per_hour", currency="USD") == pytest.approx(1.62)
    assert fleet(result, "fleet:label_tokens_per_second", label="model_name", value="chat",
                 kind="prompt") == pytest.approx(600)  # fmt: skip
    assert fleet(result, "fleet:label_cost_per_hour", label="model_name", value="chat",
                 currency="USD") == pytest.approx(1.62)  # fmt: skip
    assert fleet(result, "fleet:preemption_rate") == 0
    assert fleet(result, "fleet:waiting_for_capacity") == 0
    assert fleet(result, "fleet:e2e_p50") == pytest.approx(1.0 + 0.5 * 50 / 140)
    assert not [i for i in result.issues if i.severity != "info"]


def test_tokens_per_tenant_when_a_proxy_labels_the_counters() -> None:
    def tenant(page_text: str, who: str) -> str:
        for family in ("vllm:prompt_tokens_total{", "vllm:generation_tokens_total{"):
            page_text = page_text.replace(family, f'{family}tenant="{who}",')
        return page_text

    baselines = {
        "chat-0": Baseline.of(parse_page(tenant(text("v0.33_chat-0_t0.txt"), "acme"), WANTED), T0),
        "chat-1": Baseline.of(parse_page(tenant(text("v0.33_chat-1_t0.txt"), "globex"), WANTED),
                              T0),
    }  # fmt: skip
    scrapes = {
        "chat-0": Scrape(T1, parse_page(tenant(text("v0.33_chat-0_t1.txt"), "acme"), WANTED)),
        "chat-1": Scrape(T1, parse_page(tenant(text("v0.33_chat-1_t1.txt"), "globex"), WANTED)),
    }
    spec = {"per_label": ["tenant"], "price_per_million_prompt_tokens": 1.0,
            "price_per_million_generation_tokens": 2.0, "currency": "EUR"}  # fmt: skip
    result = aggregate(stack(spec), CHAT, scrapes, baselines)
    assert fleet(result, "fleet:label_tokens_per_second", label="tenant", value="acme",
                 kind="generation") == pytest.approx(6000 / 30)  # fmt: skip
    assert fleet(result, "fleet:label_tokens_per_second", label="tenant", value="globex",
                 kind="prompt") == pytest.approx(6000 / 30)  # fmt: skip
    # acme: 400 prompt tok/s x 1 + 200 generated x 2 per 1M, per hour
    assert fleet(result, "fleet:label_cost_per_hour", label="tenant", value="acme",
                 currency="EUR") == pytest.approx((400 + 400) * 3600 / 1e6)  # fmt: skip


def test_declared_metric_no_target_exposes_is_reported() -> None:
    result = two_replicas(
        {
            "per_label": ["tenant"],
            "series": {
                "spec_accept": {"family": "vllm:spec_decode_num_accepted_tokens"},
                "old_kv": {"family": "vllm:gpu_cache_usage_perc", "op": "max"},
                "by_lora": {
                    "family": "vllm:num_requests_running",
                    "op": "sum",
                    "match": {"lora": "x"},
                },
            },
        }
    )
    messages = [str(i) for i in result.issues]
    assert any("spec_accept: no target exposes vllm:spec_decode_num_accepted_tokens_total" in m
               or "spec_accept: no target exposes vllm:spec_decode_num_accepted_tokens" in m
               for m in messages)  # fmt: skip
    assert any("per_label: no target labels" in m and "'tenant'" in m for m in messages)
    assert any("by_lora: no target's vllm:num_requests_running has label(s) lora" in m
               for m in messages)  # fmt: skip
    old = [m for m in messages if "old_kv" in m and "gone since 0.12.0" in m]
    assert old
    assert "use vllm:kv_cache_usage_perc" in old[0]
    assert "fleet:spec_accept" not in {s.name for s in result.samples}


# ------------------------------------------------------------------------------ vLLM names


@pytest.mark.parametrize(
    ("name", "version", "severity", "words"),
    [
        ("vllm:gpu_cache_usage_perc", "0.9.1", None, ""),
        ("vllm:gpu_cache_usage_perc", "0.9.2", "warning", "deprecated since vLLM 0.9.2"),
        ("vllm:gpu_cache_usage_perc", "0.11.0", "warning", "hidden in vLLM 0.11.0"),
        ("vllm:gpu_cache_usage_perc", "0.12.0", "error", "use vllm:kv_cache_usage_perc"),
        ("vllm:gpu_prefix_cache_queries", "0.12.1", "error", "vllm:prefix_cache_queries_total"),
        ("vllm:time_per_output_token_seconds", "0.10.1", None, ""),
        ("vllm:time_per_output_token_seconds", "0.11.0", "warning", "deprecated since"),
        ("vllm:time_per_output_token_seconds", "0.12.0", "warning", "hidden"),
        (
            "vllm:time_per_output_token_seconds",
            "0.33.0",
            "error",
            "use vllm:inter_token_latency_seconds",
        ),
        (
            "vllm:inter_token_latency_seconds",
            "0.10.1",
            "warning",
            "exposes vllm:time_per_output_token_seconds",
        ),
        ("vllm:inter_token_latency_seconds", "0.33.0", None, ""),
        (
            "vllm:avg_generation_throughput_toks_per_s",
            "0.8.0",
            "error",
            "vllm:generation_tokens_total",
        ),
        ("vllm:num_requests_swapped", "0.11.0", "error", "no replacement"),
        ("vllm:prompt_tokens", "0.33.0", None, ""),
        ("vllm:kv_cache_usge_perc", "0.33.0", "warning", "misspelt"),
        ("http_requests_total", "0.33.0", None, ""),
    ],
)
def test_metric_names_against_the_version_table(
    name: str, version: str, severity: str | None, words: str
) -> None:
    issue = check_metric_name(name, version)
    if severity is None:
        assert issue is None
    else:
        assert issue is not None
        assert issue.severity == severity
        assert words in issue.message


def test_aliases_list_the_old_names() -> None:
    assert aliases("vllm:kv_cache_usage_perc") == (
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    )
    assert "vllm:time_per_output_token_seconds" in aliases(ITL)


# ------------------------------------------------------------------------------ the spec section


@pytest.mark.parametrize(
    ("metrics", "words"),
    [
        ({"per_label": ["__name__"]}, "invalid label name"),
        ({"per_label": ["le"]}, "histogram/summary"),
        ({"per_label": ["tenant", "tenant"]}, "twice"),
        ({"price_per_million_tokens": -1}, "greater than or equal"),
        ({"currency": "dollars"}, "pattern"),
        ({"series": {"x": {"family": "fleet:request_rate"}}}, "not inputs"),
        ({"series": {"x": {"family": "vllm:ok", "op": "median"}}}, "op"),
        ({"series": {"request_rate": {"family": "vllm:num_preemptions"}}}, "built-in"),
        ({"series": {"Bad-Name": {"family": "vllm:num_preemptions"}}}, "invalid series name"),
        ({"series": {"x": {"family": "vllm:x\nrm -rf"}}}, "invalid metric name"),
        ({"scrape_timeout": "0s"}, "positive"),
        ({"unknown": 1}, "Extra inputs"),
    ],
)
def test_metrics_section_is_validated(metrics: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        stack(metrics)


def test_metrics_section_defaults_and_prices() -> None:
    spec = stack({"price_per_million_tokens": 0.5, "price_per_million_generation_tokens": 2})
    assert spec.metrics is not None
    assert spec.metrics.prices() == (0.5, 2.0)
    assert spec.metrics.stale_after == 300
    assert stack().metrics is None


def test_wanted_families_add_declared_series_and_old_names() -> None:
    spec = stack({"series": {"p": {"family": "vllm:num_preemptions"}}}).metrics
    wanted = wanted_families(spec)
    assert "vllm:num_preemptions_total" in wanted
    assert "vllm:gpu_cache_usage_perc" in wanted
    assert "process_start_time_seconds" in wanted


# ------------------------------------------------------------------- targets, store facts


def test_replica_targets_with_and_without_observation() -> None:
    s = stack(replicas=2)
    targets, down = replica_targets(s)
    assert [(t.name, t.url) for t in targets] == [
        ("chat-0", "http://127.0.0.1:18000/metrics"),
        ("chat-1", "http://127.0.0.1:18001/metrics"),
    ]
    assert down == set()
    targets, down = replica_targets(s, running={"chat-1"})
    assert down == {"chat-0"}
    routed = stack(replicas=2, gateway={"host": "local", "routes": {"chat": 19000}})
    targets, down = replica_targets(routed, running={"chat-0-g", "chat-1"})
    assert sorted(t.name for t in targets) == ["chat-0-g", "chat-1"]
    assert {t.url for t in targets} >= {"http://127.0.0.1:18002/metrics"}


@pytest.mark.parametrize(
    ("reason", "cls"),
    [
        ("api-0 never became ready: http http://x failed 3 time(s)", "readiness"),
        ("api is not running (exit code 1)", "crashed"),
        ("api stopped after it was ready (gone)", "crashed"),
        ("api was ready, then http http://x failed: status 500", "verify"),
        ("create api failed: port in use", "apply"),
        ("services.api.secret_env.TOKEN: Prefect Secret block 'x' not found", "secret"),
        ("host 'gpu-01': GPU 0 by s/m already reserved", "resources"),
        ("interrupted", "interrupted"),
        ("RuntimeError: boom", "other"),
    ],
)
def test_failure_classes(reason: str, cls: str) -> None:
    assert failure_class(reason) == cls


def test_lifecycle_states() -> None:
    assert lifecycle_state("good", True, None) == "running"
    assert lifecycle_state("applied", False, None) == "deploying"
    assert lifecycle_state("rolled-back", True, None) == "rolled-back"
    assert lifecycle_state("rolled-back", False, None) == "failed"
    assert lifecycle_state("good", True, "down") == "stopped"
    assert lifecycle_state("good", True, "removed") == "removed"


def test_store_keeps_baselines_and_drops_targets_gone_from_the_stack(tmp_path: Path) -> None:
    store = Store(tmp_path)
    b = Baseline.of(page("v0.33_chat-0_t0.txt"), T0)
    sample = ["fleet:request_rate", [["model", ""], ["stack", "s"]], 1.0]
    both = {"chat-0": b.to_json(), "chat-9": b.to_json()}
    store.save_aggregation(
        "s", both, ["chat-0", "chat-9"], [sample], 0.2, [0.1, 0.5, 1.0], {"scrape|transient": 2}
    )
    store.save_aggregation("s", {}, ["chat-0"], [], 0.05, [0.1, 0.5, 1.0], {"scrape|transient": 1})
    kept = store.metric_baselines("s")
    assert list(kept) == ["chat-0"]  # chat-9 left the stack; chat-0 (dead now) keeps its own
    assert Baseline.from_json(kept["chat-0"]) == b
    state = store.aggregation_state("s")
    assert state is not None
    assert state["runs"] == 2
    assert state["seconds_buckets"] == {0.1: 1, 0.5: 2, 1.0: 2}
    assert state["errors"] == {"scrape|transient": 3}


def test_summarize_groups_the_same_message_across_targets() -> None:
    from hxp.metrics import MetricIssue, summarize

    issues = [MetricIssue("info", "first scrape", f"t-{i}") for i in range(6)]
    issues.append(MetricIssue("warning", "model m: no replica answered"))
    grouped = summarize(issues)
    assert [str(i) for i in grouped] == [
        "info: t-0, t-1, t-2, t-3 and 2 more: first scrape",
        "warning: model m: no replica answered",
    ]


def test_a_newly_declared_series_has_no_window_on_its_first_run() -> None:
    """Its counter's whole value is not an increase: the previous scrape did not read it."""
    declared = stack({"series": {"preemptions": {"family": "vllm:num_preemptions"}}})
    before = Baseline.of(page("v0.33_chat-0_t0.txt"), T0)  # read without the new family
    after = parse_page(text("v0.33_chat-0_t1.txt"), wanted_families(declared.metrics))
    win = window(before, after, T1)
    assert win is not None
    assert "vllm:num_preemptions_total" not in win.counters
    assert PROMPT_TOKENS in win.counters


def test_replica_with_other_buckets_is_left_out_of_quantiles_and_reported() -> None:
    """chat-1 with a TTFT bucket bound renamed (0.25 -> 0.3): it cannot be summed bucket-wise."""
    odd = lambda t: t.replace(  # noqa: E731
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.25"',
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.3"',
    )
    baselines = {
        "chat-0": Baseline.of(page("v0.33_chat-0_t0.txt"), T0),
        "chat-1": Baseline.of(parse_page(odd(text("v0.33_chat-1_t0.txt")), WANTED), T0),
    }
    scrapes = {
        "chat-0": Scrape(T1, page("v0.33_chat-0_t1.txt")),
        "chat-1": Scrape(T1, parse_page(odd(text("v0.33_chat-1_t1.txt")), WANTED)),
    }
    result = aggregate(stack(), CHAT, scrapes, baselines)
    # chat-0's own TTFT increases alone (see test_window_quantiles_by_hand)
    assert fleet(result, "fleet:ttft_seconds", quantile="0.95") == pytest.approx(0.0925)
    assert any("1 of 2 vllm:time_to_first_token_seconds series" in i.message for i in result.issues)
