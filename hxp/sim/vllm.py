"""hxp-vllm-sim: a DEVELOPMENT DOUBLE of vLLM's OpenAI-compatible server. It is NOT vLLM.

It loads no model and computes nothing. Replies are deterministic fake tokens, paced by the
configured latency and token rate, so tests and the demo can exercise everything around a vLLM
fleet (start-up gates, health sweeps, /metrics aggregation, load balancing, blue-green drains)
without a GPU. The HTTP surface, the response shapes and the Prometheus metric names, types,
labels and buckets follow vLLM (see `VLLM_REFERENCE` and `VLLM_METRICS`); all behind them is
simulated. The server is hand-written HTTP/1.1 on asyncio streams (keep-alive, Content-Length,
chunked bodies, SSE streaming) so it needs nothing beyond the project's own dependencies.

Behaviour copied from vLLM, and the choices where the double differs:
- Start-up: vLLM binds its port before loading the model and listens only once loaded, so a
  client sees "connection refused" until then. The double does the same for `--startup-delay`.
- `/health`: 200 with an empty body; 503 with an empty body when unhealthy (vLLM's answer once
  its engine is dead). `--never-ready` listens at once but answers 503 forever (a server that
  never loads at all is `--startup-delay` with a large value); `--fail-health-after N` turns
  /health to 503 N seconds after start. Only /health changes in these modes: completions,
  /metrics and /version keep answering, so a test can tell a health check from a traffic check.
- `--crash-after N`: the process exits with code 1, N seconds after start, whatever it is doing.
- SIGTERM/SIGINT, as the vLLM version in `--version` does it (vLLM 0.18.0's
  entrypoints/launcher.py and v1/engine/core.py `_handle_shutdown`): from 0.18.0 the server
  keeps listening while its engine shuts down; with `--shutdown-timeout` 0 (vLLM's default)
  every running and waiting request is aborted at once: a stream ends with a chunk whose
  finish_reason is "abort", a non-streamed request answers 200 with finish_reason "abort" (what
  vLLM's abort outputs become). A new request meanwhile is rejected the same way (vLLM's
  `_reject_add_in_shutdown`). With a timeout N > 0 running requests may finish for N seconds;
  past N the engine is killed and their connections are cut. Then the double stops listening and
  exits 0. Before 0.18.0 the engine stops before the HTTP server: listening stops at once and
  every in-flight connection is cut (`--shutdown-timeout` is ignored; vLLM had no such flag). A
  signal during the start-up delay exits 0 at once.
- `--stall-after N`: N seconds after start the engine stops making progress (the stalled
  engines of vLLM issues #39863 and #51663): running requests get no more tokens, new ones
  queue behind them, while /health still answers 200 and /metrics keeps answering.
- Scheduling: at most `--max-concurrency` requests run (vLLM's max_num_seqs) and their prompt
  plus output must fit in the KV cache; the rest wait, first come first served. The KV cache is
  sized by hxp.sim.capacity (the calculator for `--model-config`, or `--kv-cache-tokens`) and
  `--engine-tokens-per-second` is a token budget the running requests share (docs/operations.md
  "The simulator under load").
- `--error-rate`: that fraction of generation requests fails after prefill with vLLM's 500
  answer and counts as finished_reason="error"; `--preempt-rate`: that fraction is preempted
  once and pays its prefill twice. Both draw from `--seed`, so runs repeat.
- `--version`: the double imitates that vLLM release where behaviour differs by release: the
  metric families it registers (hxp.metric_names.vllm_families: 0.10.1's
  `vllm:time_per_output_token_seconds` and gpu_* twins, 0.34's render-time histogram, ...),
  the `usage` object (USAGE_*_SINCE) and max_tokens beyond the context (lowered from 0.32.0,
  a 400 before: MAX_TOKENS_CLAMPED_SINCE). /metrics negotiates its format from the Accept
  header as vLLM's does. /ping (GET, POST) answers as /health; /load reports
  {"server_load": N}, N counting in-flight generation requests with
  `--enable-server-load-tracking` and 0 without.
- Metrics are recorded per request event, not per engine step as vLLM does, except
  `vllm:generation_tokens_total`, which grows with every token (a stall detector reads it);
  ITL observations of a non-streamed request are its mean interval. Not simulated: LoRA,
  speculative decoding, KV connectors, multi-modal inputs, the instrumentator's `http_*`
  families, logprobs, stop strings, tools; `vllm:cache_config_info` carries the labels of
  `CACHE_CONFIG_LABELS` only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import logging
import os
import random
import re
import signal
import sys
import threading
import time
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Literal, cast
from urllib.parse import parse_qs

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from hxp import metric_names
from hxp.sim.capacity import add_capacity_args, capacity_from_args

log = logging.getLogger("hxp-vllm-sim")

#: Where the names, types, labels and buckets were copied from (hxp.metric_names keeps the
#: families; the bucket bounds are below).
VLLM_REFERENCE = metric_names.VLLM_REFERENCE
VLLM_REFERENCE_VERSION = metric_names.VLLM_REFERENCE_VERSION

# Bucket families, as in vllm/v1/metrics/buckets.py.
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TIME_TO_FIRST_TOKEN_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS: tuple[float, ...] = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
)  # fmt: skip
REQUEST_PARAMS_N_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20)
REQUEST_NUM_PREEMPTIONS_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 5, 10, 20)
# vllm/renderers/metrics.py (0.34.0): vllm:request_render_duration_seconds.
RENDER_DURATION_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip

BucketFamily = Literal[
    "request_latency",
    "time_to_first_token",
    "inter_token_latency",
    "iteration_tokens",
    "request_params_n",
    "request_num_preemptions",
    "request_tokens",
    "render_duration",
]
MetricKind = Literal["counter", "gauge", "histogram"]


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: vLLM's token-count buckets."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


def histogram_buckets(family: BucketFamily, max_model_len: int) -> list[float]:
    """The bucket bounds vLLM uses for a family (without custom overrides)."""
    static: dict[str, tuple[float, ...]] = {
        "request_latency": REQUEST_LATENCY_BUCKETS,
        "time_to_first_token": TIME_TO_FIRST_TOKEN_BUCKETS,
        "inter_token_latency": INTER_TOKEN_LATENCY_BUCKETS,
        "iteration_tokens": ITERATION_TOKENS_BUCKETS,
        "request_params_n": REQUEST_PARAMS_N_BUCKETS,
        "request_num_preemptions": REQUEST_NUM_PREEMPTIONS_BUCKETS,
        "render_duration": RENDER_DURATION_BUCKETS,
    }
    if family == "request_tokens":
        return build_1_2_5_buckets(max_model_len)
    return list(static[family])


@dataclass(frozen=True)
class MetricSpec:
    """One vLLM metric family the double exposes, named as vLLM passes it to prometheus_client.

    Counters are exposed with a `_total` suffix: `vllm:prompt_tokens` is scraped as
    `vllm:prompt_tokens_total`.
    """

    name: str
    kind: MetricKind
    doc: str
    labels: tuple[str, ...] = ("model_name", "engine")
    buckets: BucketFamily | None = None


def _spec(f: metric_names.Family) -> MetricSpec:
    return MetricSpec(
        f.registered, f.kind, f.help, f.labels, cast("BucketFamily | None", f.buckets)
    )


#: The reference release's per-request families: hxp.metric_names.VLLM (vLLM 0.34's without
#: optional features: LoRA, KV connectors, spec decode, watermarking, NaN checks, KV residency
#: sampling), named as passed to prometheus_client. What the double registers follows the
#: version it imitates (`metric_names.vllm_families`): `vllm:cache_config_info`, the MFU
#: counters and the render-time histogram too, and an older release's own names.
VLLM_METRICS: tuple[MetricSpec, ...] = tuple(_spec(f) for f in metric_names.VLLM)

#: Label values vLLM pre-creates (vllm/v1/engine FINISH_REASON_STRINGS and loggers.py).
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
WAITING_REASONS = ("capacity", "deferred")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
PROMPT_TOKEN_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
CACHE_HIT_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")

FinishReason = Literal["stop", "length", "abort", "error"]


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """What the double serves and how it misbehaves."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "hxp-sim/fake-model"
    served_model_names: tuple[str, ...] = ()
    version: str = f"{VLLM_REFERENCE_VERSION}+hxp.sim"
    max_model_len: int = 4096
    startup_delay: float = 0.0
    latency_ms: float = 20.0
    tokens_per_second: float = 100.0
    max_concurrency: int = 256
    kv_cache_tokens: int = 65536
    slow_factor: float = 1.0
    error_rate: float = 0.0
    preempt_rate: float = 0.0
    never_ready: bool = False
    crash_after: float | None = None
    fail_health_after: float | None = None
    shutdown_timeout: float = 0.0
    stall_after: float | None = None
    keep_alive_timeout: float = 5.0
    seed: int = 0
    # Capacity model (hxp.sim.capacity): engine-wide token budget and the start-up KV lines.
    engine_tokens_per_second: float = 0.0
    kv_log_lines: tuple[str, ...] = ()
    server_load_tracking: bool = False
    # Sleep mode: vLLM registers /sleep, /wake_up and /is_sleeping only with
    # VLLM_SERVER_DEV_MODE=1 in its environment; the engine can sleep only with
    # --enable-sleep-mode.
    enable_sleep_mode: bool = False
    dev_mode: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """Served model names; the first labels the metrics, as in vLLM."""
        return self.served_model_names or (self.model,)


ENV_PREFIX = "HXP_VLLM_SIM_"
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hxp-vllm-sim",
        description=(
            "DEVELOPMENT DOUBLE of a vLLM OpenAI-compatible server, for tests and demos. "
            "It is NOT vLLM: it loads no model and answers with deterministic fake tokens. "
            "Endpoints: /health /ping /load /version /metrics /v1/models /v1/completions "
            "/v1/chat/completions (and /sleep /wake_up /is_sleeping with --enable-sleep-mode and "
            f"{DEV_MODE_ENV}=1, as in vLLM); behaviour and metric names follow --version. Every "
            "option "
            "can also be set in the environment as "
            f"{ENV_PREFIX}<OPTION> (e.g. {ENV_PREFIX}STARTUP_DELAY=5; lists comma-separated)."
        ),
    )
    d = SimConfig()
    add = parser.add_argument
    add("--host", default=d.host, help="address to bind (default %(default)s)")
    add("--port", type=int, default=d.port, help="port to bind; 0 picks one (default %(default)s)")
    add("--model", default=d.model, help="model path/id it pretends to serve (%(default)s)")
    add(
        "--served-model-name",
        dest="served_model_name",
        nargs="+",
        action="extend",
        default=None,
        help="name(s) the API answers to; repeatable; default: --model",
    )
    add("--version", default=d.version, help="what /version reports (default %(default)s)")
    add("--max-model-len", type=int, default=d.max_model_len, help="context length (%(default)s)")
    add(
        "--startup-delay",
        type=float,
        default=d.startup_delay,
        help="seconds bound but not listening, like vLLM loading a model (%(default)s)",
    )
    add("--latency-ms", type=float, default=d.latency_ms, help="prefill time per request")
    add(
        "--tokens-per-second",
        type=float,
        default=d.tokens_per_second,
        help="decode rate per request; 0 = instant (default %(default)s)",
    )
    add(
        "--max-concurrency",
        type=int,
        default=d.max_concurrency,
        help="requests running at once; more wait (vLLM max_num_seqs, default %(default)s)",
    )
    add_capacity_args(parser)
    add("--slow-factor", type=float, default=d.slow_factor, help="multiplies prefill and decode")
    add("--error-rate", type=float, default=d.error_rate, help="fraction of requests failing 500")
    add("--preempt-rate", type=float, default=d.preempt_rate, help="fraction preempted once")
    add("--never-ready", action="store_true", help="listen, but /health answers 503 forever")
    add("--crash-after", type=float, default=None, help="exit with code 1 N seconds after start")
    add("--fail-health-after", type=float, default=None, help="/health 503 from N s after start")
    add(
        "--shutdown-timeout",
        type=float,
        default=d.shutdown_timeout,
        help="on SIGTERM, seconds to let in-flight requests finish, as vLLM >= 0.18 does; "
        "0 aborts them (vLLM's default, %(default)s); ignored for --version before 0.18",
    )
    add("--stall-after", type=float, default=None, help="engine stops making progress after N s")
    add("--keep-alive-timeout", type=float, default=d.keep_alive_timeout, help="idle seconds")
    add("--seed", type=int, default=d.seed, help="seed of the error and preemption draws")
    add(
        "--enable-sleep-mode",
        dest="enable_sleep_mode",
        action="store_true",
        help="allow POST /sleep?level=1|2 and /wake_up, as vLLM's flag does (the endpoints "
        f"exist only with {DEV_MODE_ENV}=1 in the environment, as in vLLM)",
    )
    add(
        "--enable-server-load-tracking",
        dest="server_load_tracking",
        action="store_true",
        help="count in-flight generation requests in /load, as vLLM's flag does",
    )
    return parser


def _apply_env(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Defaults from HXP_VLLM_SIM_<DEST>; the command line still wins."""
    for action in parser._actions:
        key = ENV_PREFIX + action.dest.upper()
        if action.dest == "help" or key not in environ:
            continue
        raw = environ[key]
        value: object
        if isinstance(action, argparse._StoreTrueAction):
            value = raw.strip().lower() in ("1", "true", "yes", "on")
        elif action.nargs == "+":
            value = [part.strip() for part in raw.split(",") if part.strip()]
        elif action.type is not None:
            try:
                value = action.type(raw)  # type: ignore[operator]
            except ValueError:
                parser.error(f"{key}={raw!r} is not a valid {action.dest}")
        else:
            value = raw
        parser.set_defaults(**{action.dest: value})


def parse_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> SimConfig:
    parser = build_parser()
    _apply_env(parser, environ)
    ns = parser.parse_args(argv)
    checks = [
        (0 <= ns.port <= 65535, "--port must be 0..65535"),
        (ns.max_model_len >= 2, "--max-model-len must be at least 2"),
        (ns.startup_delay >= 0, "--startup-delay must be >= 0"),
        (ns.latency_ms >= 0, "--latency-ms must be >= 0"),
        (ns.tokens_per_second >= 0, "--tokens-per-second must be >= 0"),
        (ns.max_concurrency >= 1, "--max-concurrency must be >= 1"),
        (ns.kv_cache_tokens is None or ns.kv_cache_tokens >= 1, "--kv-cache-tokens must be >= 1"),
        (ns.slow_factor > 0, "--slow-factor must be > 0"),
        (0 <= ns.error_rate <= 1, "--error-rate must be within 0..1"),
        (0 <= ns.preempt_rate <= 1, "--preempt-rate must be within 0..1"),
        (ns.crash_after is None or ns.crash_after >= 0, "--crash-after must be >= 0"),
        (ns.fail_health_after is None or ns.fail_health_after >= 0, "bad --fail-health-after"),
        (ns.shutdown_timeout >= 0, "--shutdown-timeout must be >= 0"),
        (ns.stall_after is None or ns.stall_after >= 0, "--stall-after must be >= 0"),
        (ns.keep_alive_timeout > 0, "--keep-alive-timeout must be > 0"),
        (
            re.match(r"\d+\.\d+", ns.version) is not None,
            f"--version must be a vLLM release such as 0.34.0, got {ns.version!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    capacity, kv_lines = capacity_from_args(parser, ns)
    return SimConfig(
        host=ns.host,
        port=ns.port,
        model=ns.model,
        served_model_names=tuple(ns.served_model_name or ()),
        version=ns.version,
        max_model_len=ns.max_model_len,
        startup_delay=ns.startup_delay,
        latency_ms=ns.latency_ms,
        tokens_per_second=ns.tokens_per_second,
        max_concurrency=ns.max_concurrency,
        kv_cache_tokens=capacity,
        slow_factor=ns.slow_factor,
        error_rate=ns.error_rate,
        preempt_rate=ns.preempt_rate,
        never_ready=ns.never_ready,
        crash_after=ns.crash_after,
        fail_health_after=ns.fail_health_after,
        shutdown_timeout=ns.shutdown_timeout,
        stall_after=ns.stall_after,
        keep_alive_timeout=ns.keep_alive_timeout,
        seed=ns.seed,
        engine_tokens_per_second=ns.engine_tokens_per_second,
        kv_log_lines=kv_lines,
        server_load_tracking=ns.server_load_tracking,
        enable_sleep_mode=ns.enable_sleep_mode,
        dev_mode=_env_flag(environ.get(DEV_MODE_ENV, "")),
    )


def _env_flag(raw: str) -> bool:
    """vLLM's reading of VLLM_SERVER_DEV_MODE: `bool(int(value))`; anything else is off."""
    try:
        return bool(int(raw))
    except ValueError:
        return False


# --- fake tokens (pure) --------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_VOCAB = (
    "simulated", "token", "from", "the", "hxp", "development", "double", "not", "a", "real",
    "model", "lorem", "ipsum", "dolor", "sit", "amet", "vllm", "stand", "in", "reply", "text",
    "is", "deterministic", "and", "paced", "by", "configured", "latency", "with", "no", "gpu",
    "behind", "it",
)  # fmt: skip
PREFIX_BLOCK = 16


def count_tokens(text: str) -> int:
    """Fake tokenizer: words and punctuation marks, at least one token (the BOS)."""
    return max(1, len(_TOKEN_RE.findall(text)))


def fake_output(
    seed: int, max_tokens: int, ignore_eos: bool
) -> tuple[tuple[str, ...], FinishReason]:
    """The tokens a prompt 'generates' and why it stops: its natural length is 8..64 tokens."""
    natural = 8 + seed % 57
    stops = not ignore_eos and max_tokens > natural
    count = natural if stops else max_tokens
    words = [_VOCAB[(seed + 7 * i) % len(_VOCAB)] for i in range(count)]
    tokens = [(" " + w) if i else w.capitalize() for i, w in enumerate(words)]
    if stops:
        tokens[-1] = "."
    return tuple(tokens), "stop" if stops else "length"


def _seed_of(value: object) -> int:
    return zlib.crc32(json.dumps(value, sort_keys=True, default=str).encode())


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


# --- metrics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishedStats:
    """What vLLM records when a request finishes (vllm/v1/metrics/stats.py)."""

    finish_reason: FinishReason
    e2e: float
    queued: float
    prefill: float
    decode: float
    inference: float
    prompt_tokens: int
    cached_tokens: int
    generation_tokens: int
    num_preemptions: int
    max_tokens_param: int | None


class _Absent:
    """A family the imitated release does not have: every update is dropped."""

    def labels(self, *args: object, **kwargs: object) -> _Absent:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


_ABSENT = _Absent()


class _Tee:
    """One update to several series (a family and its older twin, as vLLM sets both)."""

    def __init__(self, *children: Any) -> None:
        self._children = tuple(c for c in children if not isinstance(c, _Absent))

    def inc(self, amount: float = 1) -> None:
        for child in self._children:
            child.inc(amount)

    def set(self, value: float) -> None:
        for child in self._children:
            child.set(value)

    def observe(self, value: float) -> None:
        for child in self._children:
            child.observe(value)


class SimMetrics:
    """vLLM's metric families in a registry of their own, with the double's label values."""

    def __init__(
        self,
        model_name: str,
        max_model_len: int,
        version: str = VLLM_REFERENCE_VERSION,
        cache_info: Mapping[str, str] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.model_name = model_name
        self.version = version
        self._max_model_len = max_model_len
        self.families: dict[str, Counter | Gauge | Histogram] = {}
        self._lazy = {f.registered: _spec(f) for f in metric_names.vllm_families(version) if f.lazy}
        for f in metric_names.vllm_families(version, lazy=False):
            self._register(_spec(f))
        me = (model_name, "0")
        self.running = self._gauge("vllm:num_requests_running").labels(*me)
        self.waiting = self._gauge("vllm:num_requests_waiting").labels(*me)
        waiting_by = self._gauge("vllm:num_requests_waiting_by_reason")
        for reason in WAITING_REASONS:
            waiting_by.labels(*me, reason).set(0)
        self.waiting_capacity = waiting_by.labels(*me, "capacity")
        sleep = self._gauge("vllm:engine_sleep_state")
        self.sleep_state = {state: sleep.labels(*me, state) for state in SLEEP_STATES}
        self.set_sleep_level(0)
        # Before 0.11 vLLM sets the gpu_* twins of these with the same values.
        self.kv_usage = _Tee(
            self._gauge("vllm:kv_cache_usage_perc").labels(*me),
            self._gauge("vllm:gpu_cache_usage_perc").labels(*me),
        )
        self.prefix_queries = _Tee(
            self._counter("vllm:prefix_cache_queries").labels(*me),
            self._counter("vllm:gpu_prefix_cache_queries").labels(*me),
        )
        self.prefix_hits = _Tee(
            self._counter("vllm:prefix_cache_hits").labels(*me),
            self._counter("vllm:gpu_prefix_cache_hits").labels(*me),
        )
        self._counter("vllm:prompt_tokens_recomputed").labels(*me)
        for name in (
            "vllm:estimated_flops_per_gpu",
            "vllm:estimated_read_bytes_per_gpu",
            "vllm:estimated_write_bytes_per_gpu",
        ):
            self._counter(name).labels(*me)
        if "vllm:cache_config_info" in self.families:
            info = {label: "None" for label in metric_names.CACHE_CONFIG_LABELS}
            info.update(cache_info or {}, engine="0")
            self._gauge("vllm:cache_config_info").labels(**info).set(1)
        for name in (
            "vllm:external_prefix_cache_queries",
            "vllm:external_prefix_cache_hits",
            "vllm:mm_cache_queries",
            "vllm:mm_cache_hits",
        ):
            self._counter(name).labels(*me)
        self.preemptions = self._counter("vllm:num_preemptions").labels(*me)
        self.prompt_tokens = self._counter("vllm:prompt_tokens").labels(*me)
        by_source = self._counter("vllm:prompt_tokens_by_source")
        for source in PROMPT_TOKEN_SOURCES:
            by_source.labels(*me, source)
        self.prompt_computed = by_source.labels(*me, "local_compute")
        self.prompt_local_hit = by_source.labels(*me, "local_cache_hit")
        self.prompt_cached = self._counter("vllm:prompt_tokens_cached").labels(*me)
        cached_by = self._counter("vllm:prompt_tokens_cached_by_source")
        for source in CACHE_HIT_SOURCES:
            cached_by.labels(*me, source)
        self.prompt_cached_device = cached_by.labels(*me, "device")
        self.generation_tokens = self._counter("vllm:generation_tokens").labels(*me)
        success = self._counter("vllm:request_success")
        self.success = {reason: success.labels(*me, reason) for reason in FINISH_REASONS}
        rejections = self._counter("vllm:admission_rejections")
        for reason in ADMISSION_REASONS:
            rejections.labels(model_name, reason)
        h = self._histograms(me)
        self.h_prompt, self.h_generation = (
            h["request_prompt_tokens"],
            h["request_generation_tokens"],
        )
        self.h_iteration = h["iteration_tokens_total"]
        self.h_max_generation = h["request_max_num_generation_tokens"]
        self.h_n, self.h_max_tokens = h["request_params_n"], h["request_params_max_tokens"]
        self.h_ttft = h["time_to_first_token_seconds"]
        # vllm:time_per_output_token_seconds (up to 0.14) records the same intervals as ITL.
        self.h_itl = _Tee(h["inter_token_latency_seconds"], h["time_per_output_token_seconds"])
        self.h_tpot = h["request_time_per_output_token_seconds"]
        self.h_e2e, self.h_queue = h["e2e_request_latency_seconds"], h["request_queue_time_seconds"]
        self.h_inference = h["request_inference_time_seconds"]
        self.h_prefill = h["request_prefill_time_seconds"]
        self.h_decode = h["request_decode_time_seconds"]
        self.h_preemptions = h["request_num_preemptions"]
        self.h_kv_computed = h["request_prefill_kv_computed_tokens"]

    def set_sleep_level(self, level: int) -> None:
        """vllm:engine_sleep_state as vLLM's record_sleep_state sets it: awake=1 while awake;
        asleep, weights_offloaded=1 at level 1 and discard_all=1 at level 2."""
        self.sleep_state["awake"].set(1 if level == 0 else 0)
        self.sleep_state["weights_offloaded"].set(1 if level == 1 else 0)
        self.sleep_state["discard_all"].set(1 if level == 2 else 0)

    def _register(self, spec: MetricSpec) -> Counter | Gauge | Histogram:
        family: Counter | Gauge | Histogram
        labels = list(spec.labels)
        if spec.kind == "counter":
            family = Counter(spec.name, spec.doc, labels, registry=self.registry)
        elif spec.kind == "gauge":
            family = Gauge(spec.name, spec.doc, labels, registry=self.registry)
        else:
            assert spec.buckets is not None
            bounds = histogram_buckets(spec.buckets, self._max_model_len)
            family = Histogram(spec.name, spec.doc, labels, registry=self.registry, buckets=bounds)
        self.families[spec.name] = family
        return family

    def _gauge(self, name: str) -> Gauge:
        """The family, or a stand-in that records nothing when the imitated release lacks it."""
        family = self.families.get(name, _ABSENT)
        assert isinstance(family, Gauge | _Absent)
        return cast("Gauge", family)

    def _counter(self, name: str) -> Counter:
        family = self.families.get(name, _ABSENT)
        assert isinstance(family, Counter | _Absent)
        return cast("Counter", family)

    def _histograms(self, me: tuple[str, str]) -> dict[str, Histogram]:
        out: dict[str, Histogram] = {}
        for f in metric_names.VLLM_ALL:
            if f.kind != "histogram" or f.lazy:
                continue
            family = self.families.get(f.name)
            child = family.labels(*me) if isinstance(family, Histogram) else _ABSENT
            out[f.name.removeprefix("vllm:")] = cast("Histogram", child)
        return out

    def rendered(self, request_type: str, seconds: float) -> None:
        """vllm:request_render_duration_seconds (0.34): registered at the first request."""
        spec = self._lazy.get("vllm:request_render_duration_seconds")
        if spec is None:
            return
        family = self.families.get(spec.name) or self._register(spec)
        assert isinstance(family, Histogram)
        family.labels(self.model_name, request_type).observe(seconds)

    def finished(self, stats: FinishedStats) -> None:
        self.success[stats.finish_reason].inc()  # generation_tokens: counted per token (run)
        self.h_e2e.observe(stats.e2e)
        self.h_queue.observe(stats.queued)
        self.h_prefill.observe(stats.prefill)
        self.h_inference.observe(stats.inference)
        self.h_decode.observe(stats.decode)
        self.h_preemptions.observe(stats.num_preemptions)
        self.h_kv_computed.observe(stats.prompt_tokens - stats.cached_tokens)
        self.h_prompt.observe(stats.prompt_tokens)
        self.h_generation.observe(stats.generation_tokens)
        gen = stats.generation_tokens
        self.h_tpot.observe(stats.decode / (gen - 1) if gen > 1 else 0.0)
        if stats.max_tokens_param:
            self.h_max_tokens.observe(stats.max_tokens_param)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The page in the format the Accept header negotiates, as vLLM's /metrics does (it
        mounts prometheus_client's `make_asgi_app`, which calls `choose_encoder(accept)`).

        With prometheus-client 0.26, an OpenMetrics request without `escaping=allow-utf-8`
        (Prometheus 2.42's default Accept header) gets `escaping=underscores`: the samples of
        `vllm:num_requests_running` arrive as `vllm_num_requests_running` while HELP/TYPE
        keep the colon. hxp's scrape jobs for vLLM pin the text format or rename the samples
        back (hxp.monitoring.VLLM_SCRAPE_FIXES).
        """
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


# --- the simulated engine ------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One engine request: a prompt and the fake output it will produce."""

    index: int
    prompt_tokens: int
    prompt_key: int
    tokens: tuple[str, ...]
    finish_reason: FinishReason
    max_tokens_param: int | None


OnToken = Callable[[Job, int], Awaitable[None]]


class RequestAborted(Exception):
    """The client went away while its request was running."""


class EngineAborted(Exception):
    """The engine aborted the request (shutdown): it finishes with reason "abort"."""


#: How often a stalled engine looks whether it has been told to abort.
STALL_POLL_S = 0.05


class SimEngine:
    """A FIFO scheduler with vLLM's gauges: slots (max_num_seqs) and KV-cache tokens."""

    def __init__(self, config: SimConfig, metrics: SimMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.running = 0
        self.prefilling = 0
        self.kv_used = 0
        self._queue: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._prefix: OrderedDict[int, None] = OrderedDict()
        self._rng = random.Random(config.seed)  # noqa: S311 - a simulation, not crypto
        self.prefill_s = config.latency_ms / 1000.0 * config.slow_factor
        tps = config.tokens_per_second
        self.itl_s = config.slow_factor / tps if tps > 0 else 0.0
        self.started = time.monotonic()
        self.shutting_down = False  # new requests are rejected (aborted) at admission
        self.aborting = False  # running requests are aborted at their next step

    def begin_shutdown(self, abort: bool) -> None:
        """vLLM >= 0.18 on SIGTERM: reject new requests; with `abort`, abort all others."""
        self.shutting_down = True
        if abort:
            self.abort_all()

    def abort_all(self) -> None:
        """Abort every running and waiting request (vLLM's finish_requests(None, ABORTED))."""
        self.aborting = True
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(EngineAborted())
        self._publish()

    def reset_kv_cache(self) -> None:
        """Sleep discards the KV cache: the prefix cache starts empty after a wake."""
        self._prefix.clear()

    @property
    def busy(self) -> int:
        """Requests running or waiting."""
        return self.running + len(self._queue)

    def stalled(self) -> bool:
        after = self.config.stall_after
        return after is not None and time.monotonic() - self.started >= after

    async def _step(self, seconds: float) -> None:
        """An engine step of `seconds`; EngineAborted once aborted; a stalled engine never
        finishes a step (until aborted)."""
        if seconds > 0:
            await asyncio.sleep(seconds)
        while self.stalled() and not self.aborting:
            await asyncio.sleep(STALL_POLL_S)
        if self.aborting:
            raise EngineAborted()

    async def _prefill_budget(self, tokens: int) -> None:
        """Prefill `tokens` out of the engine's token budget, shared fairly (in 10 ms steps)
        by the prompts being prefilled at the same time."""
        budget = self.config.engine_tokens_per_second / self.config.slow_factor
        if budget <= 0 or tokens <= 0:
            return
        self.prefilling += 1
        try:
            left = float(tokens)
            while left > 0:
                rate = budget / self.prefilling
                began = time.monotonic()
                await asyncio.sleep(min(0.01, left / rate))
                left -= rate * (time.monotonic() - began)  # wall time: a busy host stays fair
        finally:
            self.prefilling -= 1

    def _interval(self) -> float:
        """One decode step: the per-request rate, or the running requests' share of the
        engine's token budget when that is slower (every running request decodes each step)."""
        budget = self.config.engine_tokens_per_second
        shared = self.running * self.config.slow_factor / budget if budget > 0 else 0.0
        return max(self.itl_s, shared)

    def draw_error(self) -> bool:
        return self.config.error_rate > 0 and self._rng.random() < self.config.error_rate

    def _fits(self, need: int) -> bool:
        if self.running >= self.config.max_concurrency:
            return False
        return self.running == 0 or self.kv_used + need <= self.config.kv_cache_tokens

    def _publish(self) -> None:
        self.metrics.running.set(self.running)
        self.metrics.waiting.set(len(self._queue))
        self.metrics.waiting_capacity.set(len(self._queue))
        self.metrics.kv_usage.set(min(1.0, self.kv_used / self.config.kv_cache_tokens))

    def _take(self, need: int) -> None:
        self.running += 1
        self.kv_used += need

    def _release(self, need: int) -> None:
        self.running -= 1
        self.kv_used -= need
        while self._queue and self._fits(self._queue[0][0]):
            granted, future = self._queue.popleft()
            self._take(granted)
            future.set_result(None)
        self._publish()

    async def _admit(self, need: int) -> None:
        if self.shutting_down or self.aborting:
            raise EngineAborted()
        if not self._queue and self._fits(need):
            self._take(need)
            self._publish()
            return
        entry = (need, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        self._publish()
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self._release(need)
            else:
                self._queue.remove(entry)
                self._publish()
            raise

    def _cached_tokens(self, job: Job) -> int:
        """Prefix-cache hit: a prompt seen before is cached in whole blocks but its last token."""
        hit = job.prompt_key in self._prefix
        self._prefix[job.prompt_key] = None
        self._prefix.move_to_end(job.prompt_key)
        if len(self._prefix) > 4096:
            self._prefix.popitem(last=False)
        return (job.prompt_tokens - 1) // PREFIX_BLOCK * PREFIX_BLOCK if hit else 0

    async def run(self, job: Job, *, fail: bool, on_token: OnToken | None) -> FinishReason:
        """Queue, prefill, decode; record vLLM's per-request stats. Returns the finish reason."""
        m = self.metrics
        arrival = time.monotonic()
        # Whole 16-token blocks, as vLLM's KV-cache manager allocates them.
        need = -(-(job.prompt_tokens + len(job.tokens)) // PREFIX_BLOCK) * PREFIX_BLOCK
        try:
            await self._admit(need)
        except EngineAborted:
            return "abort"
        scheduled = time.monotonic()
        first = last = scheduled
        generated = preemptions = cached = 0
        reason: FinishReason = job.finish_reason
        try:
            cached = self._cached_tokens(job)
            m.prefix_queries.inc(job.prompt_tokens)
            m.prefix_hits.inc(cached)
            m.prompt_cached_device.inc(cached)
            await self._step(self.prefill_s)
            await self._prefill_budget(job.prompt_tokens - cached)
            if self.config.preempt_rate > 0 and self._rng.random() < self.config.preempt_rate:
                preemptions = 1
                m.preemptions.inc()
                await self._step(self.prefill_s)
            m.prompt_tokens.inc(job.prompt_tokens)
            m.prompt_computed.inc(job.prompt_tokens - cached)
            m.prompt_local_hit.inc(cached)
            m.prompt_cached.inc(cached)
            m.h_iteration.observe(job.prompt_tokens - cached + 1)
            first = last = time.monotonic()
            m.h_ttft.observe(first - arrival)
            if fail:
                reason = "error"
                return reason
            # vLLM counts generated tokens at every engine step, not when a request ends.
            generated = 1
            m.generation_tokens.inc()
            if on_token is not None:
                await on_token(job, 0)
                for i in range(1, len(job.tokens)):
                    await self._step(self._interval())
                    now = time.monotonic()
                    m.h_itl.observe(now - last)
                    last = now
                    generated += 1
                    m.generation_tokens.inc()
                    await on_token(job, i)
            elif len(job.tokens) > 1:
                for _ in range(1, len(job.tokens)):
                    await self._step(self._interval())
                    generated += 1
                    m.generation_tokens.inc()
                last = time.monotonic()
                mean = (last - first) / (len(job.tokens) - 1)
                for _ in range(len(job.tokens) - 1):
                    m.h_itl.observe(mean)
            return reason
        except EngineAborted:
            reason = "abort"
            return reason
        except (ConnectionError, RequestAborted, asyncio.CancelledError):
            reason = "abort"
            raise
        finally:
            end = time.monotonic()
            last = last if generated else end
            self._release(need)
            m.finished(
                FinishedStats(
                    finish_reason=reason,
                    e2e=end - arrival,
                    queued=scheduled - arrival,
                    prefill=first - scheduled,
                    decode=last - first,
                    inference=last - scheduled,
                    prompt_tokens=job.prompt_tokens,
                    cached_tokens=cached,
                    generation_tokens=generated,
                    num_preemptions=preemptions,
                    max_tokens_param=job.max_tokens_param,
                )
            )


# --- HTTP/1.1 ------------------------------------------------------------------------------

MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
SERVER_HEADER = "hxp-vllm-sim (development double, not vLLM)"


class HttpError(Exception):
    """A request the server cannot read; answered, then the connection is closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiError(Exception):
    """An OpenAI-style error answer, in vLLM's ErrorResponse shape."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, Any]:
        error = {"message": str(self), "type": self.err_type, "param": self.param}
        return {"error": {**error, "code": self.status}}


@dataclass
class HttpRequest:
    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes = b""
    query: str = ""  # what followed `?` in the target

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


def parse_head(head: bytes) -> HttpRequest:
    """Request line and headers of one request (the bytes up to and without CRLFCRLF)."""
    lines = head.split(b"\r\n")
    while lines and not lines[0]:
        lines.pop(0)
    if not lines:
        raise HttpError(400, "empty request")
    parts = lines[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, "HTTP version not supported")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise HttpError(400, "malformed header line")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise HttpError(400, "conflicting Content-Length")
            if key != "content-length":
                headers[key] = headers[key] + ", " + text
        else:
            headers[key] = text
    path, _, query = target.partition("?")
    return HttpRequest(method, path, version, headers, query=query)


class Connection:
    """One client connection: reads requests, writes responses, remembers whether it is busy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.busy = False
        self.close_after = False
        self._write_lock = asyncio.Lock()

    async def read_body(self, req: HttpRequest) -> None:
        te = req.headers.get("transfer-encoding")
        cl = req.headers.get("content-length")
        if te is not None and cl is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if te is not None and te.lower() != "chunked":
            raise HttpError(501, f"transfer-encoding {te!r} not supported")
        if cl is not None and (not cl.isdigit() or int(cl) > MAX_BODY):
            raise HttpError(413 if cl.isdigit() else 400, "bad or too large Content-Length")
        if (te or cl) and req.headers.get("expect", "").lower() == "100-continue":
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if cl is not None:
            req.body = await self.reader.readexactly(int(cl))
        elif te is not None:
            req.body = await self._read_chunked()

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = await self.reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HttpError(400, "bad chunk size") from None
            if size == 0:
                while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise HttpError(413, "body too large")
            body += await self.reader.readexactly(size)
            if await self.reader.readexactly(2) != b"\r\n":
                raise HttpError(400, "bad chunk terminator")

    def _head(self, req: HttpRequest | None, status: int, headers: list[tuple[str, str]]) -> bytes:
        phrase = HTTPStatus(status).phrase
        version = "HTTP/1.0" if req is not None and req.version == "HTTP/1.0" else "HTTP/1.1"
        out = [f"{version} {status} {phrase}", f"date: {_http_date()}", f"server: {SERVER_HEADER}"]
        out += [f"{k}: {v}" for k, v in headers]
        if self.close_after:
            out.append("connection: close")
        elif version == "HTTP/1.0":
            out.append("connection: keep-alive")
        return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")

    async def send(
        self,
        req: HttpRequest | None,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        headers = [("content-length", str(len(body)))]
        if content_type is not None:
            headers.append(("content-type", content_type))
        headers += list(extra)
        head = self._head(req, status, headers)
        if req is not None and req.method == "HEAD":
            body = b""
        self.writer.write(head + body)
        await self.writer.drain()

    async def send_json(self, req: HttpRequest, status: int, payload: object) -> None:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        await self.send(req, status, body, "application/json")

    async def start_stream(self, req: HttpRequest, content_type: str) -> bool:
        """Send the head of a streamed answer; True when chunked (HTTP/1.1)."""
        chunked = req.version == "HTTP/1.1"
        if not chunked:
            self.close_after = True
        headers = [("content-type", content_type)]
        if chunked:
            headers.append(("transfer-encoding", "chunked"))
        async with self._write_lock:
            self.writer.write(self._head(req, 200, headers))
            await self.writer.drain()
        return chunked

    async def send_part(self, data: bytes, chunked: bool) -> None:
        async with self._write_lock:
            if self.writer.is_closing():
                raise RequestAborted("client went away")
            self.writer.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            await self.writer.drain()

    async def end_stream(self, chunked: bool) -> None:
        if chunked:
            async with self._write_lock:
                self.writer.write(b"0\r\n\r\n")
                await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


# --- the OpenAI-compatible API -------------------------------------------------------------


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Invalid JSON body: {exc}", "BadRequestError") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object", "BadRequestError")
    return data


def _int_param(data: Mapping[str, Any], name: str, default: int | None, low: int) -> int | None:
    value = data.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ApiError(400, f"{name} must be an integer >= {low}, got {value!r}.",
                       "BadRequestError", name)  # fmt: skip
    return value


def _bool_param(data: Mapping[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be a boolean", "BadRequestError", name)
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request."""

    chat: bool
    model: str
    prompts: tuple[tuple[int, int], ...]  # (prompt tokens, seed) per prompt
    n: int
    max_tokens: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool
    jobs: tuple[Job, ...]


#: From this release a prompt that fits but leaves less room than `max_tokens` gets
#: `max_tokens` lowered to `max_model_len - prompt` instead of a 400: vllm/renderers/params.py
#: TokenizeParams.max_input_tokens returns `max_total_tokens` at 0.32.0 ("max_output_tokens is
#: *not* subtracted here ... clamping ... is handled by get_max_tokens()") and
#: `max_total_tokens - max_output_tokens` at 0.31.0 (and 0.20.0 to 0.29.0; at 0.19.1 the
#: check was vllm/entrypoints/openai/engine/serving.py's _validate_input).
MAX_TOKENS_CLAMPED_SINCE = "0.32.0"


def parse_generation(data: Mapping[str, Any], chat: bool, config: SimConfig) -> GenerationRequest:
    """Validate a generation request the way vLLM answers bad ones (400/404 ErrorResponse)."""
    model = data.get("model")
    if model is None:
        model = config.names[0]
    if not isinstance(model, str) or model not in config.names:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if chat:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty array", "BadRequestError",
                           "messages")  # fmt: skip
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise ApiError(400, "each message needs a string role", "BadRequestError", "messages")
        texts = [_content_text(m.get("content")) for m in messages]
        tokens = sum(count_tokens(t) + 4 for t in texts) + 3
        prompts: tuple[tuple[int, int], ...] = ((tokens, _seed_of(messages)),)
        max_tokens = _int_param(data, "max_completion_tokens", None, 1)
        if max_tokens is None:
            max_tokens = _int_param(data, "max_tokens", None, 1)
    else:
        prompts = _completion_prompts(data.get("prompt"))
        max_tokens = _int_param(data, "max_tokens", 16, 1)
    n = _int_param(data, "n", 1, 1) or 1
    if n > 128:
        raise ApiError(400, "n must be at most 128 in the simulator", "BadRequestError", "n")
    stream = _bool_param(data, "stream")
    options = data.get("stream_options")
    if options is not None and not stream:
        raise ApiError(400, "Stream options can only be defined when `stream=True`.",
                       "BadRequestError", "stream_options")  # fmt: skip
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    ignore_eos = _bool_param(data, "ignore_eos")
    jobs: list[Job] = []
    clamps = metric_names.version_key(config.version) >= metric_names.version_key(
        MAX_TOKENS_CLAMPED_SINCE
    )
    for p, (prompt_tokens, seed) in enumerate(prompts):
        limit = config.max_model_len - prompt_tokens
        wanted = max_tokens
        if clamps and limit >= 1 and wanted is not None:
            # get_max_tokens(): min(max_model_len - prompt, max_tokens); only a prompt that
            # leaves no room at all is refused.
            wanted = min(wanted, limit)
        if (wanted or 1) > limit:
            asked = prompt_tokens + (wanted or 1)
            raise ApiError(
                400,
                f"This model's maximum context length is {config.max_model_len} tokens. "
                f"However, you requested {asked} tokens ({prompt_tokens} in the messages, "
                f"{wanted or 1} in the completion). Please reduce the length of the "
                "messages or completion.",
                "BadRequestError",
                "max_tokens" if wanted else "messages",
            )
        for c in range(n):
            out, reason = fake_output(seed + c, wanted or limit, ignore_eos)
            jobs.append(Job(p * n + c, prompt_tokens, seed, out, reason, wanted))
    return GenerationRequest(
        chat, model, prompts, n, max_tokens, stream, include_usage, ignore_eos, tuple(jobs)
    )


def _completion_prompts(prompt: object) -> tuple[tuple[int, int], ...]:
    def is_ids(value: object) -> bool:
        return (
            isinstance(value, list)
            and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
        )

    if isinstance(prompt, str):
        return ((count_tokens(prompt), _seed_of(prompt)),)
    if is_ids(prompt):
        assert isinstance(prompt, list)
        return ((len(prompt), _seed_of(prompt)),)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return tuple((count_tokens(p), _seed_of(p)) for p in prompt)
        if all(is_ids(p) for p in prompt):
            return tuple((len(p), _seed_of(p)) for p in prompt)
    raise ApiError(
        400,
        "prompt must be a string, an array of strings, an array of token ids "
        "or an array of token-id arrays",
        "BadRequestError",
        "prompt",
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


#: From this release `UsageInfo` has `completion_tokens_details` (None without a reasoning
#: parser): vllm/entrypoints/openai/engine/protocol.py at 0.28.0, absent at 0.27.0.
USAGE_COMPLETION_DETAILS_SINCE = "0.28.0"
#: From this release a None `prompt_tokens_details` is left out of the answer
#: (`Field(default=None, exclude_if=lambda value: value is None)`,
#: vllm/entrypoints/serve/engine/protocol.py at 0.34.0; a plain None field at 0.33.0).
USAGE_PROMPT_DETAILS_OMITTED_SINCE = "0.34.0"


def usage_body(prompt_tokens: int, completion_tokens: int, version: str) -> dict[str, Any]:
    """`usage` of a non-streamed answer as vLLM `version` serialises UsageInfo (model_dump,
    no reasoning parser, no --enable-prompt-tokens-details)."""
    at = metric_names.version_key(version)
    usage: dict[str, Any] = dict(_usage(prompt_tokens, completion_tokens))
    if at < metric_names.version_key(USAGE_PROMPT_DETAILS_OMITTED_SINCE):
        usage["prompt_tokens_details"] = None
    if at >= metric_names.version_key(USAGE_COMPLETION_DETAILS_SINCE):
        usage["completion_tokens_details"] = None
    return usage


def completion_body(
    gen: GenerationRequest, rid: str, created: int, version: str = VLLM_REFERENCE_VERSION
) -> dict[str, Any]:
    """The non-streamed answer, in vLLM's CompletionResponse / ChatCompletionResponse shape."""
    choices: list[dict[str, Any]] = []
    for job in gen.jobs:
        text = "".join(job.tokens)
        common = {"logprobs": None, "finish_reason": job.finish_reason, "stop_reason": None}
        if gen.chat:
            message = {"role": "assistant", "content": text, "refusal": None,
                       "annotations": None, "audio": None, "function_call": None,
                       "reasoning": None}  # fmt: skip
            choices.append({"index": job.index, "message": message, **common})
        else:
            choices.append({"index": job.index, "text": text, **common,
                            "prompt_logprobs": None})  # fmt: skip
    prompt_tokens = sum(p for p, _ in gen.prompts)
    completion_tokens = sum(len(job.tokens) for job in gen.jobs)
    return {
        "id": rid,
        "object": "chat.completion" if gen.chat else "text_completion",
        "created": created,
        "model": gen.model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage_body(prompt_tokens, completion_tokens, version),
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


# --- the server ----------------------------------------------------------------------------


Handler = Callable[[HttpRequest, Connection], Awaitable[None]]


def _exit_crashed() -> None:
    log.error("simulated crash (--crash-after): exiting with code 1")
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(1)


class SimServer:
    """The double's process: binds, 'loads', listens, serves, drains on SIGTERM."""

    def __init__(self, config: SimConfig, *, on_crash: Callable[[], None] = _exit_crashed) -> None:
        self.config = config
        self.metrics = SimMetrics(config.names[0], config.max_model_len, config.version)
        self.server_load = 0
        self.engine = SimEngine(config, self.metrics)
        self.port = config.port
        self.listening = threading.Event()
        self._on_crash = on_crash
        self._conns: set[Connection] = set()
        self._draining = False
        self._started = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._routes: dict[str, tuple[str, Handler]] = {
            "/health": ("GET", self._health),
            "/ping": ("GET POST", self._health),
            "/load": ("GET", self._load),
            "/version": ("GET", self._version),
            "/metrics": ("GET", self._metrics),
            "/v1/models": ("GET", self._models),
            "/v1/completions": ("POST", self._completions),
            "/v1/chat/completions": ("POST", self._chat),
        }
        self.sleep_level = 0  # 0: awake; 1 or 2: asleep at that level
        if config.dev_mode:  # vLLM: only in development mode (VLLM_SERVER_DEV_MODE=1)
            self._routes["/sleep"] = ("POST", self._sleep)
            self._routes["/wake_up"] = ("POST", self._wake_up)
            self._routes["/is_sleeping"] = ("GET", self._is_sleeping)
            self._routes["/collective_rpc"] = ("POST", self._collective_rpc)
            self._routes["/reset_prefix_cache"] = ("POST", self._reset_prefix_cache)
        self.weights_discarded = False  # after a level-2 sleep, until reload_weights

    # lifecycle

    def request_shutdown(self) -> None:
        """Begin a stop (the SIGTERM path); call from the server's own loop."""
        if self._shutdown is not None and not self._shutdown.is_set():
            self._shutdown.set()

    def _engine_stops_first(self) -> bool:
        """Whether the imitated vLLM predates 0.18.0, whose engine stops before its server."""
        match = re.match(r"(\d+)\.(\d+)", self.config.version)
        return match is not None and (int(match[1]), int(match[2])) < (0, 18)

    async def _engine_shutdown(self) -> None:
        """vLLM >= 0.18: the engine rejects new requests, aborts (timeout 0) or lets the
        running ones finish for the timeout; past it, it is killed (connections cut below)."""
        timeout = self.config.shutdown_timeout
        busy = self.engine.busy
        if timeout == 0:
            log.info("shutdown requested (timeout=0): aborting %d request(s)", busy)
        else:
            log.info("shutdown requested: draining %d in-flight request(s) (timeout=%gs)",
                     busy, timeout)  # fmt: skip
        self.engine.begin_shutdown(abort=timeout == 0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout if timeout > 0 else ENGINE_EXIT_S):
                while self.engine.busy or self._busy():
                    await asyncio.sleep(0.01)

    def stop_threadsafe(self) -> None:
        """Begin a graceful stop from another thread (tests that run the server in a thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.request_shutdown)

    def _busy(self) -> int:
        return sum(1 for c in self._conns if c.busy)

    async def run(self, *, install_signal_handlers: bool = True) -> int:
        """Serve until asked to stop; the process exit code."""
        loop = self._loop = asyncio.get_running_loop()
        self._shutdown = asyncio.Event()
        self._idle = asyncio.Event()
        self._started = self.engine.started = time.monotonic()
        try:
            # Bound but not listening (start_serving=False) until "loaded", as vLLM does.
            server = await asyncio.start_server(
                self._serve_connection,
                self.config.host,
                self.config.port,
                limit=MAX_HEAD,
                backlog=2048,
                start_serving=False,
            )
        except OSError as exc:
            log.error("cannot bind %s:%s: %s", self.config.host, self.config.port, exc)
            return 1
        self.port = server.sockets[0].getsockname()[1]
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_shutdown)
        if self.config.crash_after is not None:
            loop.call_later(self.config.crash_after, self._on_crash)
        names = ", ".join(self.config.names)
        log.warning("DEVELOPMENT DOUBLE of a vLLM server, not vLLM: no model is loaded")
        log.info("bound %s:%d for %s; loading for %.1fs", self.config.host, self.port, names,
                 self.config.startup_delay)  # fmt: skip
        for line in self.config.kv_log_lines:  # as the imitated vLLM version words them
            log.info("%s", line)
        if self.config.startup_delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.startup_delay):
                    await self._shutdown.wait()
            if self._shutdown.is_set():
                server.close()
                log.info("stopped during start-up")
                return 0
        await server.start_serving()
        log.info("listening on http://%s:%d (ready)", self.config.host, self.port)
        self.listening.set()
        await self._shutdown.wait()
        if self._engine_stops_first():
            log.info("shutdown requested: the engine stops first, cutting %d request(s)",
                     self._busy())  # fmt: skip
        else:
            await self._engine_shutdown()  # still listening meanwhile, as vLLM is
        self._draining = True
        server.close()
        for conn in list(self._conns):
            if not conn.busy:
                conn.close()
        if self._busy():
            log.warning("shutdown: cutting %d connection(s)", self._busy())
        for conn in list(self._conns):
            conn.writer.transport.abort()
        log.info("stopped")
        return 0

    def _healthy(self) -> bool:  # a stalled engine still answers 200, as vLLM's does
        if self.config.never_ready:
            return False
        after = self.config.fail_health_after
        return after is None or time.monotonic() - self._started < after

    # connections

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = Connection(reader, writer)
        self._conns.add(conn)
        try:
            await self._requests(conn)
        except (ConnectionError, asyncio.IncompleteReadError, RequestAborted):
            pass
        except asyncio.CancelledError:
            if not self._draining:
                raise
        finally:
            self._conns.discard(conn)
            conn.close()
            if self._idle is not None:
                self._idle.set()

    async def _requests(self, conn: Connection) -> None:
        while not self._draining:
            try:
                async with asyncio.timeout(self.config.keep_alive_timeout):
                    head = await conn.reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    await self._bad_request(conn, HttpError(400, "incomplete request"))
                return
            except asyncio.LimitOverrunError:
                await self._bad_request(conn, HttpError(431, "request head too large"))
                return
            conn.busy = True
            try:
                req = parse_head(head[:-4])
                await conn.read_body(req)
                conn.close_after = not req.keep_alive or self._draining
                await self._dispatch(req, conn)
            except HttpError as exc:
                await self._bad_request(conn, exc)
                return
            except (ConnectionError, asyncio.IncompleteReadError, RequestAborted):
                raise
            except Exception:
                log.exception("bug in the simulator while answering %s", head[:80])
                await self._bad_request(conn, HttpError(500, "simulator bug, see its log"))
                return
            finally:
                conn.busy = False
            if conn.close_after or self._draining:
                return

    async def _bad_request(self, conn: Connection, exc: HttpError) -> None:
        conn.close_after = True
        body = json.dumps({"detail": str(exc)}).encode()
        with contextlib.suppress(ConnectionError):
            await conn.send(None, exc.status, body, "application/json")

    async def _dispatch(self, req: HttpRequest, conn: Connection) -> None:
        # vLLM mounts its metrics app at ^/metrics(.*)$
        path = "/metrics" if req.path.startswith("/metrics") else req.path
        route = self._routes.get(path)
        if route is None:
            await conn.send_json(req, 404, {"detail": "Not Found"})
        elif req.method not in route[0].split() and not (
            req.method == "HEAD" and "GET" in route[0].split()
        ):
            await conn.send(req, 405, b'{"detail":"Method Not Allowed"}', "application/json",
                            [("allow", ", ".join(route[0].split()))])  # fmt: skip
        else:
            try:
                await route[1](req, conn)
            except ApiError as exc:
                await conn.send_json(req, exc.status, exc.body())

    # endpoints

    async def _health(self, req: HttpRequest, conn: Connection) -> None:
        await conn.send(req, 200 if self._healthy() else 503)

    async def _version(self, req: HttpRequest, conn: Connection) -> None:
        await conn.send_json(req, 200, {"version": self.config.version})

    async def _load(self, req: HttpRequest, conn: Connection) -> None:
        # vLLM: always routed; the count moves only with --enable-server-load-tracking.
        await conn.send_json(req, 200, {"server_load": self.server_load})

    async def _metrics(self, req: HttpRequest, conn: Connection) -> None:
        body, content_type = self.metrics.render(req.headers.get("accept", ""))
        extra: list[tuple[str, str]] = []
        if "gzip" in req.headers.get("accept-encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            extra.append(("content-encoding", "gzip"))
        await conn.send(req, 200, body, content_type, extra)

    async def _models(self, req: HttpRequest, conn: Connection) -> None:
        created = int(time.time())
        permission = {
            "object": "model_permission", "created": created, "allow_create_engine": False,
            "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
            "allow_view": True, "allow_fine_tuning": False, "organization": "*", "group": None,
            "is_blocking": False,
        }  # fmt: skip
        cards = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": self.config.model,
                "parent": None,
                "max_model_len": self.config.max_model_len,
                "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", **permission}],
            }
            for name in self.config.names
        ]
        await conn.send_json(req, 200, {"object": "list", "data": cards})

    async def _sleep(self, req: HttpRequest, conn: Connection) -> None:
        """POST /sleep?level=1|2[&mode=abort|wait]: vLLM answers 200 with no body once the
        engine sleeps. Level 1 offloads the weights to CPU RAM and discards the KV cache, level
        2 discards both. mode=abort (vLLM's default) aborts requests in flight; wait lets them
        finish first. New requests are refused from the start (see _refuse_asleep)."""
        if not self.config.enable_sleep_mode:
            # vLLM registers the route in development mode whatever the flag; its engine has
            # then no sleep-mode allocator. The double refuses instead of pretending to sleep.
            raise ApiError(
                400, "sleep mode is not enabled (--enable-sleep-mode)", "BadRequestError"
            )
        params = parse_qs(req.query)
        level, mode = params.get("level", ["1"])[0], params.get("mode", ["abort"])[0]
        if level not in ("1", "2"):
            raise ApiError(400, f"level must be 1 or 2, got {level!r}", "BadRequestError")
        if mode not in ("abort", "wait"):
            raise ApiError(400, f"mode must be abort or wait, got {mode!r}", "BadRequestError")
        self.sleep_level = int(level)
        self.weights_discarded = self.weights_discarded or self.sleep_level == 2
        if self.engine.busy:
            log.info("sleep (level %s, mode %s): %d request(s) in flight", level, mode,
                     self.engine.busy)  # fmt: skip
            if mode == "abort":
                self.engine.abort_all()
            while self.engine.busy:
                await asyncio.sleep(0.01)
            self.engine.aborting = False
        self.engine.reset_kv_cache()
        self.metrics.set_sleep_level(self.sleep_level)
        log.info("asleep at level %d", self.sleep_level)
        await conn.send(req, 200)

    async def _wake_up(self, req: HttpRequest, conn: Connection) -> None:
        """POST /wake_up: 200 with no body once awake (tags= for a partial wake are not
        modelled: the double always wakes everything)."""
        if self.sleep_level:
            log.info("waking up from level %d", self.sleep_level)
        self.sleep_level = 0
        self.metrics.set_sleep_level(0)
        await conn.send(req, 200)

    async def _collective_rpc(self, req: HttpRequest, conn: Connection) -> None:
        """POST /collective_rpc {"method": ...}: only `reload_weights` is modelled (what a
        wake from level 2 needs); vLLM answers 200 with no body when the workers return None."""
        method = _json_object(req.body).get("method")
        if method is None:
            raise ApiError(400, "Missing 'method' in request body", "BadRequestError")
        if method != "reload_weights":
            raise ApiError(400, f"hxp-vllm-sim models no collective_rpc {method!r}",
                           "BadRequestError")  # fmt: skip
        if self.sleep_level:
            raise ApiError(400, "the model is sleeping: wake it up first", "BadRequestError")
        self.weights_discarded = False
        log.info("weights reloaded")
        await conn.send(req, 200)

    async def _reset_prefix_cache(self, req: HttpRequest, conn: Connection) -> None:
        self.engine.reset_kv_cache()
        await conn.send(req, 200)

    async def _is_sleeping(self, req: HttpRequest, conn: Connection) -> None:
        await conn.send_json(req, 200, {"is_sleeping": self.sleep_level > 0})

    def _refuse_asleep(self) -> None:
        """A generation request while asleep. vLLM does not guard it (its engine runs on
        unmapped memory: issue #15483, a CUDA illegal-access crash; the 503 guard of PR
        #16536 was never merged); the double fails it with 503 rather than serve."""
        if self.sleep_level:
            raise ApiError(
                503,
                f"the model is sleeping (level {self.sleep_level}): POST /wake_up first",
                "ServiceUnavailableError",
            )
        if self.weights_discarded:
            # vLLM would answer from discarded weights (garbage); the double fails instead.
            raise ApiError(
                500,
                "the weights were discarded by a level-2 sleep: POST /collective_rpc "
                '{"method": "reload_weights"} first',
                "InternalServerError",
            )

    async def _completions(self, req: HttpRequest, conn: Connection) -> None:
        await self._generate(req, conn, chat=False)

    async def _chat(self, req: HttpRequest, conn: Connection) -> None:
        await self._generate(req, conn, chat=True)

    async def _generate(self, req: HttpRequest, conn: Connection, *, chat: bool) -> None:
        self._refuse_asleep()
        # vLLM's load_aware_call counts a request from its start to its response's end.
        tracking = self.config.server_load_tracking
        self.server_load += tracking
        try:
            await self._generate_counted(req, conn, chat=chat)
        finally:
            self.server_load -= tracking

    async def _generate_counted(self, req: HttpRequest, conn: Connection, *, chat: bool) -> None:
        started = time.perf_counter()
        gen = parse_generation(_json_object(req.body), chat, self.config)
        self.metrics.rendered("chat" if chat else "completion", time.perf_counter() - started)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        fail = self.engine.draw_error()
        if gen.stream:
            await self._stream(req, conn, gen, rid, created, fail)
            return
        reasons = await asyncio.gather(
            *(self.engine.run(job, fail=fail, on_token=None) for job in gen.jobs)
        )
        self._parent_stats(gen)
        if "error" in reasons:
            raise _internal_error()
        if "abort" in reasons:  # what vLLM answers for an aborted request: no tokens kept
            jobs = tuple(
                replace(job, tokens=(), finish_reason="abort") if why == "abort" else job
                for job, why in zip(gen.jobs, reasons, strict=True)
            )
            gen = replace(gen, jobs=jobs)
        await conn.send_json(req, 200, completion_body(gen, rid, created, self.config.version))

    def _parent_stats(self, gen: GenerationRequest) -> None:
        for p in range(len(gen.prompts)):
            children = gen.jobs[p * gen.n : (p + 1) * gen.n]
            self.metrics.h_n.observe(gen.n)
            self.metrics.h_max_generation.observe(max(len(j.tokens) for j in children))

    async def _stream(
        self,
        req: HttpRequest,
        conn: Connection,
        gen: GenerationRequest,
        rid: str,
        created: int,
        fail: bool,
    ) -> None:
        obj = "chat.completion.chunk" if gen.chat else "text_completion"
        started: list[bool] = []  # [chunked] once the head is sent
        role_sent: set[int] = set()

        def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            payload: dict[str, Any] = {"id": rid, "object": obj, "created": created,
                                       "model": gen.model, "choices": choices}  # fmt: skip
            if usage is not None:
                payload["usage"] = usage
            text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
            return b"data: " + text.encode() + b"\n\n"

        async def on_token(job: Job, i: int) -> None:
            if not started:
                started.append(await conn.start_stream(req, "text/event-stream; charset=utf-8"))
            last = i == len(job.tokens) - 1
            finish = job.finish_reason if last else None
            common: dict[str, Any] = {
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            choice: dict[str, Any]
            if gen.chat:
                if job.index not in role_sent:
                    role_sent.add(job.index)
                    first = {"index": job.index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}  # fmt: skip
                    await conn.send_part(event([first]), started[0])
                choice = {"index": job.index, "delta": {"content": job.tokens[i]}, **common}
            else:
                choice = {"index": job.index, "text": job.tokens[i], **common}
            await conn.send_part(event([choice]), started[0])

        try:
            async with asyncio.TaskGroup() as group:
                runs = [
                    group.create_task(self.engine.run(job, fail=fail, on_token=on_token))
                    for job in gen.jobs
                ]
        except* (ConnectionError, RequestAborted):
            raise RequestAborted("client went away") from None
        finally:
            self._parent_stats(gen)
        aborted = [job for job, run in zip(gen.jobs, runs, strict=True) if run.result() == "abort"]
        if aborted and not started:
            started.append(await conn.start_stream(req, "text/event-stream; charset=utf-8"))
        for job in aborted:  # vLLM's last chunk of an aborted request
            common = {"logprobs": None, "finish_reason": "abort", "stop_reason": None}
            if gen.chat:
                choice = {"index": job.index, "delta": {"content": ""}, **common}
            else:
                choice = {"index": job.index, "text": "", **common}
            await conn.send_part(event([choice]), started[0])
        if not started:
            raise _internal_error()
        if gen.include_usage:
            prompt_tokens = sum(p for p, _ in gen.prompts)
            completion_tokens = sum(len(job.tokens) for job in gen.jobs)
            await conn.send_part(event([], _usage(prompt_tokens, completion_tokens)), started[0])
        await conn.send_part(b"data: [DONE]\n\n", started[0])
        await conn.end_stream(started[0])


#: How long an aborting engine (shutdown timeout 0) may take to send its abort outputs.
ENGINE_EXIT_S = 2.0


def _internal_error() -> ApiError:
    return ApiError(
        500,
        "simulated engine error (--error-rate); hxp-vllm-sim is a development double",
        "InternalServerError",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hxp-vllm-sim` and `python -m hxp.sim.vllm`."""
    config = parse_config(argv, os.environ)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s hxp-vllm-sim: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return asyncio.run(SimServer(config).run())


if __name__ == "__main__":
    sys.exit(main())
