"""Realistic vLLM `/metrics` pages in the exact exposition of vLLM 0.33 (or 0.10.1), for
fixtures and the aggregation benchmark.

The families, help texts, labels and buckets are vLLM's (via hxp.sim.vllm.VLLM_METRICS, itself
copied from vllm/v1/metrics/loggers.py at 0.33.0); the page is rendered by prometheus-client as
vLLM's server does: counters with `_total` and a `_created` gauge family, histograms with
`_bucket`/`_count`/`_sum`, Python/process collectors first, prometheus-fastapi-instrumentator's
`http_*` families last. Values are given, or drawn from a seed; `_created` and process values
are fixed so a page is reproducible byte for byte.

Regenerate the fixtures: .venv/bin/python -m tests.support.vllm_pages tests/data/vllm_metrics
"""

from __future__ import annotations

import bisect
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.exposition import generate_latest

from hxp.sim.vllm import (
    FINISH_REASONS,
    VLLM_METRICS,
    histogram_buckets,
)

Obs = Sequence[tuple[float, int]]  # (observed value, how many times)

HIGHR_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    1.5,
    2,
    2.5,
    3,
    3.5,
    4,
    4.5,
    5,
    7.5,
    10,
    30,
    60,
)


@dataclass
class PageSpec:
    """What one replica has counted since it started."""

    model: str = "chat"
    start_time: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    success: dict[str, int] = field(default_factory=lambda: {"stop": 0})
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: Obs = ()
    itl: Obs = ()
    e2e: Obs = ()
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    max_model_len: int = 4096
    extra_labels: dict[str, str] = field(default_factory=dict)  # on the token counters


def _observe(h: Histogram, obs: Obs) -> None:
    """`times` observations of each value at once (what `times` calls of observe() do)."""
    for value, times in obs:
        bucket = bisect.bisect_left(h._upper_bounds, value)
        h._buckets[bucket].inc(times)
        h._sum.inc(value * times)


def _legacy_families() -> list[tuple[str, str, str, tuple[str, ...], tuple[float, ...] | None]]:
    """vLLM 0.10.1's families (vllm/v1/metrics/loggers.py @005a810bc40f): name, kind, help,
    labels, buckets (None: from the bucket family of the same histogram at 0.33)."""
    me = ("model_name", "engine")
    return [
        ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
         me, None),
        ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
         me, None),
        ("vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage. 1 means 100 percent usage."
         "DEPRECATED: Use vllm:kv_cache_usage_perc instead.", me, None),
        ("vllm:gpu_prefix_cache_queries", "counter", "GPU prefix cache queries, in terms of "
         "number of queriedtokens. DEPRECATED: Use vllm:prefix_cache_queries instead.", me, None),
        ("vllm:gpu_prefix_cache_hits", "counter", "GPU prefix cache hits, in terms of number of "
         "cached tokens. DEPRECATED: Use vllm:prefix_cache_hits instead.", me, None),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
         me, None),
        ("vllm:prefix_cache_queries", "counter",
         "Prefix cache queries, in terms of number of queried tokens.", me, None),
        ("vllm:prefix_cache_hits", "counter",
         "Prefix cache hits, in terms of number of cached tokens.", me, None),
        ("vllm:num_preemptions", "counter", "Cumulative number of preemption from the engine.",
         me, None),
        ("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.", me, None),
        ("vllm:generation_tokens", "counter", "Number of generation tokens processed.", me, None),
        ("vllm:request_success", "counter", "Count of successfully processed requests.",
         (*me, "finished_reason"), None),
        ("vllm:request_prompt_tokens", "histogram", "Number of prefill tokens processed.",
         me, None),
        ("vllm:request_generation_tokens", "histogram", "Number of generation tokens processed.",
         me, None),
        ("vllm:iteration_tokens_total", "histogram",
         "Histogram of number of tokens per engine_step.", me, None),
        ("vllm:request_max_num_generation_tokens", "histogram",
         "Histogram of maximum number of requested generation tokens.", me, None),
        ("vllm:request_params_n", "histogram", "Histogram of the n request parameter.", me, None),
        ("vllm:request_params_max_tokens", "histogram",
         "Histogram of the max_tokens request parameter.", me, None),
        ("vllm:time_to_first_token_seconds", "histogram",
         "Histogram of time to first token in seconds.", me, None),
        ("vllm:time_per_output_token_seconds", "histogram",
         "Histogram of time per output token in seconds.", me, None),
        ("vllm:time_per_prefill_token_request_seconds", "histogram",
         "Time spent per token during prefill  phase in seconds", me,
         (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)),
        ("vllm:e2e_request_latency_seconds", "histogram",
         "Histogram of e2e request latency in seconds.", me, None),
        ("vllm:request_queue_time_seconds", "histogram",
         "Histogram of time spent in WAITING phase for request.", me, None),
        ("vllm:request_inference_time_seconds", "histogram",
         "Histogram of time spent in RUNNING phase for request.", me, None),
        ("vllm:request_prefill_time_seconds", "histogram",
         "Histogram of time spent in PREFILL phase for request.", me, None),
        ("vllm:request_decode_time_seconds", "histogram",
         "Histogram of time spent in DECODE phase for request.", me, None),
    ]  # fmt: skip


_BUCKET_FAMILY = {spec.name: spec.buckets for spec in VLLM_METRICS}


def _families(
    version: str,
) -> list[tuple[str, str, str, tuple[str, ...], tuple[float, ...] | None]]:
    if version.startswith("0.10"):
        return _legacy_families()
    return [(s.name, s.kind, s.doc, s.labels, None) for s in VLLM_METRICS]


def render_page(spec: PageSpec, version: str = "0.33") -> str:
    """The text of `GET /metrics` of a vLLM replica that counted `spec`."""
    registry = CollectorRegistry()
    me = (spec.model, "0")
    finished = sum(spec.success.values())
    families: dict[str, Counter | Gauge | Histogram] = {}
    token_labels = tuple(sorted(spec.extra_labels))
    for name, kind, doc, labels, buckets in _families(version):
        if name in ("vllm:prompt_tokens", "vllm:generation_tokens"):
            labels = (*labels, *token_labels)
        if kind == "counter":
            families[name] = Counter(name, doc, labels, registry=registry)
        elif kind == "gauge":
            families[name] = Gauge(name, doc, labels, registry=registry)
        else:
            bucket_family = _BUCKET_FAMILY.get(
                name.replace("time_per_output_token", "inter_token_latency")
            )
            bounds = buckets or histogram_buckets(
                bucket_family or "request_latency", spec.max_model_len
            )
            families[name] = Histogram(name, doc, labels, buckets=bounds, registry=registry)
    tokens = (*me, *(spec.extra_labels[k] for k in token_labels))

    def fam(name: str) -> Counter | Gauge | Histogram | None:
        return families.get(name)

    for name, family in families.items():
        if name in ("vllm:request_success",):
            for reason in FINISH_REASONS:
                family.labels(*me, reason)
        elif name == "vllm:num_requests_waiting_by_reason":
            for reason in ("capacity", "deferred"):
                family.labels(*me, reason)
        elif name == "vllm:engine_sleep_state":
            for state in ("awake", "weights_offloaded", "discard_all"):
                family.labels(*me, state).set(1 if state == "awake" else 0)
        elif name in ("vllm:prompt_tokens_by_source",):
            for source in ("local_compute", "local_cache_hit", "external_kv_transfer"):
                family.labels(*me, source)
        elif name == "vllm:prompt_tokens_cached_by_source":
            for source in ("device", "host", "p2p", "disk", "external_unspecified"):
                family.labels(*me, source)
        elif name == "vllm:admission_rejections":
            for reason in ("max_num_queued_reqs", "max_num_queued_tokens"):
                family.labels(spec.model, reason)
        elif name in ("vllm:prompt_tokens", "vllm:generation_tokens"):
            family.labels(*tokens)
        else:
            family.labels(*me)
    for reason, n in spec.success.items():
        families["vllm:request_success"].labels(*me, reason).inc(n)  # type: ignore[union-attr]
    _inc(fam("vllm:prompt_tokens"), tokens, spec.prompt_tokens)
    _inc(fam("vllm:generation_tokens"), tokens, spec.generation_tokens)
    _inc(fam("vllm:num_preemptions"), me, spec.preemptions)
    for prefix in ("vllm:", "vllm:gpu_"):
        _inc(fam(f"{prefix}prefix_cache_queries"), me, spec.prefix_queries)
        _inc(fam(f"{prefix}prefix_cache_hits"), me, spec.prefix_hits)
    _inc(fam("vllm:prompt_tokens_cached"), me, spec.prefix_hits)
    by_source = fam("vllm:prompt_tokens_by_source")
    if by_source is not None:
        by_source.labels(*me, "local_compute").inc(spec.prompt_tokens - spec.prefix_hits)  # type: ignore[union-attr]
        by_source.labels(*me, "local_cache_hit").inc(spec.prefix_hits)  # type: ignore[union-attr]
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        value = spec.running if name.endswith("running") else spec.waiting
        families[name].labels(*me).set(value)  # type: ignore[union-attr]
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        if name in families:
            families[name].labels(*me).set(spec.kv_usage)  # type: ignore[union-attr]
    itl_name = next(
        n
        for n in families
        if n.endswith(("inter_token_latency_seconds", "time_per_output_token_seconds"))
    )
    for name, obs in (
        ("vllm:time_to_first_token_seconds", spec.ttft),
        (itl_name, spec.itl),
        ("vllm:e2e_request_latency_seconds", spec.e2e),
    ):
        _observe(families[name].labels(*me), obs)  # type: ignore[arg-type]
    if finished:
        per_request_prompt = max(1, spec.prompt_tokens // finished)
        per_request_gen = max(1, spec.generation_tokens // finished)
        for name, value in (
            ("vllm:request_prompt_tokens", per_request_prompt),
            ("vllm:request_generation_tokens", per_request_gen),
            ("vllm:request_max_num_generation_tokens", per_request_gen),
            ("vllm:request_params_n", 1),
            ("vllm:request_params_max_tokens", 256),
            ("vllm:request_prefill_kv_computed_tokens", per_request_prompt),
            ("vllm:request_num_preemptions", 0),
        ):
            if name in families:
                _observe(families[name].labels(*me), ((value, finished),))  # type: ignore[arg-type]
        for name in ("vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds"):
            _observe(families[name].labels(*me), ((0.05, finished),))  # type: ignore[arg-type]
        for name in (
            "vllm:request_inference_time_seconds",
            "vllm:request_decode_time_seconds",
            "vllm:request_time_per_output_token_seconds",
        ):
            if name in families:
                _observe(families[name].labels(*me), ((0.9, finished),))  # type: ignore[arg-type]
        _observe(families["vllm:iteration_tokens_total"].labels(*me), ((64, finished * 4),))  # type: ignore[arg-type]
    _cache_info(registry, version)
    _http_families(registry, finished)
    text = generate_latest(registry).decode()
    created = f"{spec.start_time + 42.123456:.10e}"
    text = re.sub(r"^(\S+_created(?:\{[^}]*\})?) \S+$", rf"\1 {created}", text, flags=re.M)
    return _runtime_header(spec.start_time) + text


def _inc(family: Counter | Gauge | Histogram | None, labels: Sequence[str], n: float) -> None:
    if family is not None and n:
        family.labels(*labels).inc(n)  # type: ignore[union-attr]


def _cache_info(registry: CollectorRegistry, version: str) -> None:
    labels = {
        "block_size": "16", "cache_dtype": "auto", "calculate_kv_scales": "False",
        "cpu_offload_gb": "0", "enable_prefix_caching": "True", "engine": "0",
        "gpu_memory_utilization": "0.9", "is_attention_free": "False",
        "num_cpu_blocks": "None", "num_gpu_blocks": "27034", "num_gpu_blocks_override": "None",
        "prefix_caching_hash_algo": "sha256" if version.startswith("0.33") else "builtin",
        "sliding_window": "None",
    }  # fmt: skip
    info = Gauge(
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        sorted(labels),
        registry=registry,
    )
    info.labels(**labels).set(1)


def _http_families(registry: CollectorRegistry, finished: int) -> None:
    """prometheus-fastapi-instrumentator's defaults, as vLLM's API server exposes them."""
    requests = Counter(
        "http_requests_total",
        "Total number of requests by method, status and handler.",
        ["handler", "method", "status"],
        registry=registry,
    )
    req_size = Summary(
        "http_request_size_bytes",
        "Content length of incoming requests by "
        "handler. Only value of header is respected. Otherwise ignored. No "
        "percentile calculated. ",
        ["handler"],
        registry=registry,
    )
    resp_size = Summary(
        "http_response_size_bytes",
        "Content length of outgoing responses by "
        "handler. Only value of header is respected. Otherwise ignored. No "
        "percentile calculated. ",
        ["handler"],
        registry=registry,
    )
    highr = Histogram(
        "http_request_duration_highr_seconds",
        "Latency with many buckets but no "
        "API specific labels. Made for more accurate percentile calculations. ",
        buckets=HIGHR_BUCKETS,
        registry=registry,
    )
    duration = Histogram(
        "http_request_duration_seconds",
        "Latency with only few buckets by "
        "handler. Made to be only used if aggregation by handler is important. ",
        ["handler", "method"],
        buckets=(0.1, 0.5, 1),
        registry=registry,
    )
    for handler, method, n, size, seconds in (
        ("/v1/completions", "POST", finished, 310, 0.9),
        ("/health", "GET", 120, 0, 0.001),
        ("/metrics", "GET", 40, 0, 0.004),
    ):
        if not n:
            continue
        requests.labels(handler, method, "2xx").inc(n)
        for _ in range(min(n, 50)):
            req_size.labels(handler).observe(size)
            resp_size.labels(handler).observe(size * 2)
            highr.observe(seconds)
            duration.labels(handler, method).observe(seconds)


def _runtime_header(start: float) -> str:
    return (
        "# HELP python_gc_objects_collected_total Objects collected during gc\n"
        "# TYPE python_gc_objects_collected_total counter\n"
        'python_gc_objects_collected_total{generation="0"} 21874.0\n'
        'python_gc_objects_collected_total{generation="1"} 5023.0\n'
        'python_gc_objects_collected_total{generation="2"} 1412.0\n'
        "# HELP python_gc_objects_uncollectable_total Uncollectable objects found during GC\n"
        "# TYPE python_gc_objects_uncollectable_total counter\n"
        'python_gc_objects_uncollectable_total{generation="0"} 0.0\n'
        'python_gc_objects_uncollectable_total{generation="1"} 0.0\n'
        'python_gc_objects_uncollectable_total{generation="2"} 0.0\n'
        "# HELP python_gc_collections_total Number of times this generation was collected\n"
        "# TYPE python_gc_collections_total counter\n"
        'python_gc_collections_total{generation="0"} 2391.0\n'
        'python_gc_collections_total{generation="1"} 217.0\n'
        'python_gc_collections_total{generation="2"} 13.0\n'
        "# HELP python_info Python platform information\n"
        "# TYPE python_info gauge\n"
        'python_info{implementation="CPython",major="3",minor="12",patchlevel="11",'
        'version="3.12.11"} 1.0\n'
        "# HELP process_virtual_memory_bytes Virtual memory size in bytes.\n"
        "# TYPE process_virtual_memory_bytes gauge\n"
        "process_virtual_memory_bytes 4.4431872e+10\n"
        "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
        "# TYPE process_resident_memory_bytes gauge\n"
        "process_resident_memory_bytes 3.146170368e+09\n"
        "# HELP process_start_time_seconds Start time of the process since unix epoch in "
        "seconds.\n"
        "# TYPE process_start_time_seconds gauge\n"
        f"process_start_time_seconds {start:.10e}\n"
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
        "# TYPE process_cpu_seconds_total counter\n"
        "process_cpu_seconds_total 412.37\n"
        "# HELP process_open_fds Number of open file descriptors.\n"
        "# TYPE process_open_fds gauge\n"
        "process_open_fds 87.0\n"
        "# HELP process_max_fds Maximum number of open file descriptors.\n"
        "# TYPE process_max_fds gauge\n"
        "process_max_fds 1.048576e+06\n"
    )


def random_spec(seed: int, model: str, minutes: float = 30.0) -> PageSpec:
    """A replica that has served traffic for a while, drawn from `seed` (for the benchmark)."""
    rng = random.Random(seed)
    requests = int(rng.uniform(2, 6) * 60 * minutes)
    ttft = [(rng.lognormvariate(-2.5, 0.8), 1) for _ in range(60)]
    itl = [(rng.lognormvariate(-3.5, 0.4), 1) for _ in range(60)]
    e2e = [(rng.lognormvariate(1.0, 0.7), 1) for _ in range(60)]
    scale = max(1, requests // 60)
    return PageSpec(
        model=model,
        start_time=1_767_225_600.0 + seed,
        success={
            "stop": int(requests * 0.9),
            "length": int(requests * 0.08),
            "abort": requests // 100,
            "error": requests // 500,
        },
        prompt_tokens=requests * rng.randint(200, 1200),
        generation_tokens=requests * rng.randint(50, 400),
        ttft=[(v, scale) for v, _ in ttft],
        itl=[(v, scale * 50) for v, _ in itl],
        e2e=[(v, scale) for v, _ in e2e],
        running=rng.randint(0, 64),
        waiting=rng.randint(0, 10),
        kv_usage=round(rng.uniform(0.05, 0.95), 4),
        preemptions=rng.randint(0, 20),
        prefix_queries=requests * 300,
        prefix_hits=requests * 90,
    )


# ------------------------------------------------------------------------------ the fixtures

T0, T1 = 0, 30  # seconds: the fixtures' two scrapes are 30 s apart

FIXTURES: dict[str, tuple[PageSpec, str]] = {
    # chat-0 at t0, and 30 s later: +100 requests, hand-checked quantiles (tests/unit).
    "v0.33_chat-0_t0.txt": (PageSpec(
        model="chat", success={"stop": 45, "length": 5}, prompt_tokens=6000,
        generation_tokens=3000, ttft=((0.03, 40), (0.07, 10)), itl=((0.02, 2900),),
        e2e=((1.2, 50),), running=3, waiting=0, kv_usage=0.12, prefix_queries=6000,
        prefix_hits=1500,
    ), "0.33"),
    "v0.33_chat-0_t1.txt": (PageSpec(
        model="chat", success={"stop": 135, "length": 13, "abort": 1, "error": 1},
        prompt_tokens=18000, generation_tokens=9000,
        ttft=((0.03, 40), (0.07, 10), (0.015, 10), (0.03, 60), (0.05, 20), (0.09, 8), (0.3, 2)),
        itl=((0.02, 2900), (0.02, 3000), (0.06, 2000), (0.2, 1000)),
        e2e=((1.2, 50), (0.9, 50), (1.2, 40), (3.0, 10)), running=7, waiting=2, kv_usage=0.31,
        prefix_queries=18000, prefix_hits=4500,
    ), "0.33"),
    "v0.33_chat-1_t0.txt": (PageSpec(
        model="chat", start_time=1_767_225_660.0, success={"stop": 20}, prompt_tokens=2000,
        generation_tokens=1000, ttft=((0.03, 20),), itl=((0.02, 980),), e2e=((1.2, 20),),
        running=1, waiting=0, kv_usage=0.05,
    ), "0.33"),
    "v0.33_chat-1_t1.txt": (PageSpec(
        model="chat", start_time=1_767_225_660.0, success={"stop": 120}, prompt_tokens=8000,
        generation_tokens=4000, ttft=((0.03, 20), (0.03, 50), (0.2, 50)),
        itl=((0.02, 980), (0.02, 3000)), e2e=((1.2, 20), (1.2, 100)), running=5, waiting=1,
        kv_usage=0.45,
    ), "0.33"),
    # chat-1 restarted between t1 and t2: a new process start time, counters from zero.
    "v0.33_chat-1_t2_restarted.txt": (PageSpec(
        model="chat", start_time=1_767_225_800.0, success={"stop": 6}, prompt_tokens=600,
        generation_tokens=300, ttft=((0.03, 6),), itl=((0.02, 294),), e2e=((1.2, 6),),
        running=0, waiting=0, kv_usage=0.02,
    ), "0.33"),
    # A vLLM 0.10.1 replica: ITL still named vllm:time_per_output_token_seconds.
    "v0.10.1_legacy_t0.txt": (PageSpec(
        model="legacy", success={"stop": 10}, prompt_tokens=1000, generation_tokens=500,
        ttft=((0.03, 10),), itl=((0.04, 490),), e2e=((2.0, 10),), kv_usage=0.2,
    ), "0.10.1"),
    "v0.10.1_legacy_t1.txt": (PageSpec(
        model="legacy", success={"stop": 40}, prompt_tokens=4000, generation_tokens=2000,
        ttft=((0.03, 40),), itl=((0.04, 490), (0.04, 1000), (0.12, 500)), e2e=((2.0, 40),),
        kv_usage=0.25,
    ), "0.10.1"),
}  # fmt: skip


def write_fixtures(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, (spec, version) in FIXTURES.items():
        path = directory / name
        path.write_text(render_page(spec, version))
        out.append(path)
    return out


if __name__ == "__main__":
    for written in write_fixtures(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(f"{written} {written.stat().st_size} bytes")
