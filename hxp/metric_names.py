"""Every metric name hxp reads or publishes, in one place: vLLM's families and their renames,
the `fleet:*` series the aggregation publishes, and the `hxp_*` families of the exporter.

A leaf: it imports nothing of the project, so anything may import it (the simulator builds its
registry from `VLLM`, hxp.io.telemetry its families from `HXP`, hxp.metrics and hxp.health read
the same names, the stack model checks declared names against `FLEET_SERIES`, the query lint
learns every served series from here). A name is written once, here.

Names are as exposed on a `/metrics` page (text format 0.0.4): a counter carries its `_total`
suffix (`vllm:prompt_tokens_total`); `Family.registered` is the name without it, as passed to
prometheus-client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

#: Series a family of each kind puts on a page besides itself (prometheus-client 0.26, text
#: format 0.0.4: a counter's `_created` and a histogram's `_created` are gauges of their own).
SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gauge": ("",),
    "unknown": ("",),
    "untyped": ("",),
}


@dataclass(frozen=True)
class Family:
    """One metric family: its exposed name, type, help text and label names.

    `buckets`: for a vLLM histogram, which of vLLM's bucket families its bounds come from
    (vllm/v1/metrics/buckets.py; the bounds themselves are the simulator's business).
    `since`: the first vLLM release that exposes it by default (`VLLM_OLDEST` for a family
    every checked release has); `gone`: the first release that no longer does (hidden behind
    `--show-hidden-metrics-for-version`, or removed); `lazy`: registered at its first
    observation, so absent from a page until then.
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: str | None = None
    since: str | None = None
    gone: str | None = None
    lazy: bool = False

    def exposed_at(self, version: str) -> bool:
        """Whether a vLLM server of `version` exposes the family by default."""
        at = version_key(version)
        if self.since is not None and at < version_key(self.since):
            return False
        return self.gone is None or at < version_key(self.gone)

    @property
    def registered(self) -> str:
        """The name given to prometheus-client (a counter without `_total`)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name

    def series(self) -> frozenset[str]:
        """Every sample name the family puts on a page."""
        base = self.registered
        return frozenset(f"{base}{suffix}" for suffix in SUFFIXES[self.kind])


# --------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------

#: Where the vLLM tables below were copied from.
VLLM_REFERENCE = (
    "vLLM 0.34.0 (PyPI wheel vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64): "
    "vllm/v1/metrics/loggers.py PrometheusStatLogger.__init__, vllm/v1/metrics/perf.py "
    "PerfMetricsProm, vllm/renderers/metrics.py and vllm/v1/metrics/buckets.py"
)
VLLM_REFERENCE_VERSION = "0.34.0"
#: The oldest release whose families were checked (the wheels of 0.10.1, 0.11.0, 0.12.0,
#: 0.13.0, 0.14.0, 0.14.1, 0.15.0, 0.15.1, 0.16.0, 0.17.0, 0.18.0, 0.19.0, 0.19.1, 0.20.0,
#: 0.22.0, 0.23.0, 0.24.0, 0.25.0, 0.26.0, 0.27.0, 0.28.0, 0.29.0, 0.30.0, 0.31.0, 0.32.0,
#: 0.33.0 and 0.34.0 were read). A version older than this is answered with its families.
VLLM_OLDEST = "0.10.1"

_ME = ("model_name", "engine")

#: Every family vLLM 0.34's PrometheusStatLogger creates without optional features (LoRA, KV
#: connectors, spec decode, watermarking, NaN checks, KV residency sampling), and without the
#: families of `VLLM_MORE`; exposed names, help texts and labels as vLLM 0.34 writes them.
#: `since` is the first release whose loggers.py creates it unconditionally (the releases
#: listed at `VLLM_OLDEST` were read; a family appearing between two of them is dated by
#: the later one).
VLLM: tuple[Family, ...] = (
    # Scheduler state
    Family("vllm:num_requests_running", "gauge",
           "Number of requests in model execution batches.", _ME),
    Family("vllm:num_requests_waiting", "gauge",
           "Number of requests waiting to be processed.", _ME),
    Family("vllm:num_requests_waiting_by_reason", "gauge",
           "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
           "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, "
           "KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
           (*_ME, "reason"), since="0.20.0"),
    Family("vllm:engine_sleep_state", "gauge",
           "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine "
           "is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep "
           "level 2.", (*_ME, "sleep_state"), since="0.12.0"),
    Family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
           _ME),
    # Caches
    Family("vllm:prefix_cache_queries_total", "counter",
           "Prefix cache queries, in terms of number of queried tokens.", _ME),
    Family("vllm:prefix_cache_hits_total", "counter",
           "Prefix cache hits, in terms of number of cached tokens.", _ME),
    Family("vllm:external_prefix_cache_queries_total", "counter",
           "External prefix cache queries from KV connector cross-instance cache sharing, "
           "in terms of number of queried tokens.", _ME, since="0.12.0"),
    Family("vllm:external_prefix_cache_hits_total", "counter",
           "External prefix cache hits from KV connector cross-instance cache sharing, in "
           "terms of number of cached tokens.", _ME, since="0.12.0"),
    Family("vllm:mm_cache_queries_total", "counter",
           "Multi-modal cache queries, in terms of number of queried items.", _ME,
           since="0.12.0"),
    Family("vllm:mm_cache_hits_total", "counter",
           "Multi-modal cache hits, in terms of number of cached items.", _ME,
           since="0.12.0"),
    # Counters
    Family("vllm:num_preemptions_total", "counter",
           "Cumulative number of preemption from the engine.", _ME),
    Family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", _ME),
    Family("vllm:prompt_tokens_by_source_total", "counter",
           "Number of prompt tokens by source.", (*_ME, "source"), since="0.16.0"),
    Family("vllm:prompt_tokens_cached_total", "counter",
           "Number of cached prompt tokens (local + external).", _ME, since="0.16.0"),
    Family("vllm:prompt_tokens_cached_by_source_total", "counter",
           "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), "
           "host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
           "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + "
           "vllm:external_prefix_cache_hits.", (*_ME, "source"), since="0.32.0"),
    Family("vllm:generation_tokens_total", "counter",
           "Number of generation tokens processed.", _ME),
    Family("vllm:request_success_total", "counter",
           "Count of successfully processed requests.", (*_ME, "finished_reason")),
    Family("vllm:admission_rejections_total", "counter",
           "Number of admission attempts rejected by a queue limit, by reason.",
           ("model_name", "reason"), since="0.32.0"),
    # Histograms of counts
    Family("vllm:request_prompt_tokens", "histogram", "Number of prefill tokens processed.",
           _ME, "request_tokens"),
    Family("vllm:request_generation_tokens", "histogram",
           "Number of generation tokens processed.", _ME, "request_tokens"),
    Family("vllm:iteration_tokens_total", "histogram",
           "Histogram of number of tokens per engine_step.", _ME, "iteration_tokens"),
    Family("vllm:request_max_num_generation_tokens", "histogram",
           "Histogram of maximum number of requested generation tokens.", _ME,
           "request_tokens"),
    Family("vllm:request_params_n", "histogram", "Histogram of the n request parameter.",
           _ME, "request_params_n"),
    Family("vllm:request_params_max_tokens", "histogram",
           "Histogram of the max_tokens request parameter.", _ME, "request_tokens"),
    # Histograms of timing intervals
    Family("vllm:time_to_first_token_seconds", "histogram",
           "Histogram of time to first token in seconds.", _ME, "time_to_first_token"),
    Family("vllm:inter_token_latency_seconds", "histogram",
           "Histogram of inter-token latency in seconds.", _ME, "inter_token_latency",
           since="0.11.0"),
    Family("vllm:request_time_per_output_token_seconds", "histogram",
           "Histogram of time_per_output_token_seconds per request.", _ME,
           "inter_token_latency", since="0.11.0"),
    Family("vllm:e2e_request_latency_seconds", "histogram",
           "Histogram of e2e request latency in seconds.", _ME, "request_latency"),
    Family("vllm:request_queue_time_seconds", "histogram",
           "Histogram of time spent in WAITING phase for request.", _ME, "request_latency"),
    Family("vllm:request_inference_time_seconds", "histogram",
           "Histogram of time spent in RUNNING phase for request.", _ME, "request_latency"),
    Family("vllm:request_prefill_time_seconds", "histogram",
           "Histogram of time spent in PREFILL phase for request.", _ME, "request_latency"),
    Family("vllm:request_decode_time_seconds", "histogram",
           "Histogram of time spent in DECODE phase for request.", _ME, "request_latency"),
    Family("vllm:request_num_preemptions", "histogram",
           "Histogram of the number of times a request was preempted.", _ME,
           "request_num_preemptions", since="0.30.0"),
    Family("vllm:request_prefill_kv_computed_tokens", "histogram",
           "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
           _ME, "request_tokens", since="0.13.0"),
)  # fmt: skip

#: Exposed name -> type of every family in `VLLM`.
VLLM_FAMILIES: dict[str, Kind] = {f.name: f.kind for f in VLLM}

#: The label names of `vllm:cache_config_info`: one per CacheConfig field (`metrics_info()`
#: is `{key: str(value) for key, value in self.__dict__.items()}`, so the set follows the
#: release; these are the ones every checked release has) plus `engine`.
CACHE_CONFIG_LABELS = (
    "block_size", "cache_dtype", "calculate_kv_scales", "cpu_offload_gb",
    "enable_prefix_caching", "engine", "gpu_memory_utilization", "is_attention_free",
    "num_cpu_blocks", "num_gpu_blocks", "num_gpu_blocks_override", "prefix_caching_hash_algo",
    "sliding_window",
)  # fmt: skip

#: Families every vLLM server exposes besides `VLLM`'s, outside PrometheusStatLogger's
#: per-request families: the cache-config info gauge (log_metrics_info), the MFU counters
#: (vllm/v1/metrics/perf.py PerfMetricsProm, created unconditionally in
#: PrometheusStatLogger.__init__ from 0.17.0, absent from 0.16.0), and the render-time
#: histogram (vllm/renderers/metrics.py, new in 0.34.0, absent from 0.33.0; registered at the
#: first rendered request, labels model_name and request_type chat/completion).
VLLM_MORE: tuple[Family, ...] = (
    Family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig",
           CACHE_CONFIG_LABELS),
    Family("vllm:estimated_flops_per_gpu_total", "counter",
           "Estimated number of floating point operations per GPU (for Model Flops "
           "Utilization calculations).", _ME, since="0.17.0"),
    Family("vllm:estimated_read_bytes_per_gpu_total", "counter",
           "Estimated number of bytes read from memory per GPU (for Model Flops Utilization "
           "calculations).", _ME, since="0.17.0"),
    Family("vllm:estimated_write_bytes_per_gpu_total", "counter",
           "Estimated number of bytes written to memory per GPU (for Model Flops Utilization "
           "calculations).", _ME, since="0.17.0"),
    Family("vllm:request_render_duration_seconds", "histogram",
           "Time spent rendering a request, including chat templating, tokenization, and "
           "multimodal preprocessing.", ("model_name", "request_type"), "render_duration",
           since="0.34.0", lazy=True),
)  # fmt: skip

#: Families older releases expose by default and the reference does not (help texts as the
#: last release that showed them by default wrote them). Sources: loggers.py at 0.10.1
#: (gpu_* shown, 'Deprecated in 0.9'), 0.11.0 (gpu_* behind `if self.show_hidden_metrics`;
#: time_per_output_token shown, 'Deprecated in 0.11 - Renamed as
#: vllm:inter_token_latency_seconds'), 0.12.0 (gpu_* absent; time_per_output_token behind
#: `if self.show_hidden_metrics`, 'TODO: remove in 0.13.0', still so in 0.13.0, 0.14.0 and
#: 0.14.1), 0.15.0 (time_per_output_token absent); prompt_tokens_recomputed from 0.16.0
#: (absent from 0.15.1) to 0.19.1, absent from 0.20.0.
VLLM_RETIRED: tuple[Family, ...] = (
    Family("vllm:gpu_cache_usage_perc", "gauge",
           "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use "
           "vllm:kv_cache_usage_perc instead.", _ME, gone="0.11.0"),
    Family("vllm:gpu_prefix_cache_queries_total", "counter",
           "GPU prefix cache queries, in terms of number of queriedtokens. DEPRECATED: Use "
           "vllm:prefix_cache_queries instead.", _ME, gone="0.11.0"),
    Family("vllm:gpu_prefix_cache_hits_total", "counter",
           "GPU prefix cache hits, in terms of number of cached tokens. DEPRECATED: Use "
           "vllm:prefix_cache_hits instead.", _ME, gone="0.11.0"),
    Family("vllm:time_per_output_token_seconds", "histogram",
           "Histogram of time per output token in seconds.DEPRECATED: Use "
           "vllm:inter_token_latency_seconds instead.", _ME, "inter_token_latency",
           gone="0.12.0"),
    Family("vllm:prompt_tokens_recomputed_total", "counter",
           "Number of cached tokens recomputed for forward pass.", _ME, since="0.16.0",
           gone="0.20.0"),
)  # fmt: skip

#: Every family of every checked release, by default (no optional feature enabled).
VLLM_ALL: tuple[Family, ...] = VLLM + VLLM_MORE + VLLM_RETIRED
#: Exposed name -> type of every family in `VLLM_ALL`.
VLLM_KNOWN: dict[str, Kind] = {f.name: f.kind for f in VLLM_ALL}

# The families hxp itself reads (aggregation, health sweep, drain, monitoring rules).
PROCESS_START = "process_start_time_seconds"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_V0 = "vllm:gpu_cache_usage_perc"  # vLLM before the V1 engine (see VLLM_NAME_CHANGES)
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
REQUEST_SUCCESS = "vllm:request_success_total"
TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
E2E = "vllm:e2e_request_latency_seconds"


@dataclass(frozen=True)
class NameChange:
    """A vLLM metric that was renamed or dropped, and the releases where that happened.

    `deprecated`: first release whose help text says DEPRECATED (still exposed);
    `hidden`: first release that exposes it only with `--show-hidden-metrics-for-version`;
    `gone`: first release known not to expose it at all.
    """

    old: str
    new: str | None
    gone: str
    source: str
    deprecated: str | None = None
    hidden: str | None = None


_LOGGERS_0_10 = "vllm/v1/metrics/loggers.py @005a810bc40f (0.10.x): 'Deprecated in 0.9 - Renamed'"
_LOGGERS_0_11 = (
    "vllm/v1/metrics/loggers.py, 0.11 series: 'Deprecated in 0.9.2 ... With 0.11.x you can "
    "enable with --show-hidden-metrics-for-version=0.10 ... TODO: remove in 0.12.0'; absent "
    "from the 0.12 series"
)
_ITL_SOURCE = (
    "vllm/v1/metrics/loggers.py: 0.10.1 has only vllm:time_per_output_token_seconds; 0.11.0 "
    "adds vllm:inter_token_latency_seconds ('Deprecated in 0.11 - Renamed as "
    "vllm:inter_token_latency_seconds'); 0.12.0, 0.13.0, 0.14.0 and 0.14.1 create the old "
    "name only under `if self.show_hidden_metrics:` ('TODO: remove in 0.13.0'); 0.15.0 does "
    "not create it (PyPI wheels)"
)
_V0_SOURCE = (
    "docs/design/metrics.md 'Deprecated Metrics' (V0-engine only; V1 default since 0.8.0, "
    "V0 removed in 0.11.0)"
)

#: Renamed and removed vLLM metric names (exposed names). Read from vLLM's own source; see
#: docs/monitoring.md for the citations in full.
VLLM_NAME_CHANGES: tuple[NameChange, ...] = (
    NameChange(KV_USAGE_V0, KV_USAGE, "0.12.0",
               f"{_LOGGERS_0_10}; {_LOGGERS_0_11}", deprecated="0.9.2", hidden="0.11.0"),
    NameChange("vllm:gpu_prefix_cache_queries_total", "vllm:prefix_cache_queries_total",
               "0.12.0", f"{_LOGGERS_0_10}; {_LOGGERS_0_11}", deprecated="0.9.2",
               hidden="0.11.0"),
    NameChange("vllm:gpu_prefix_cache_hits_total", "vllm:prefix_cache_hits_total", "0.12.0",
               f"{_LOGGERS_0_10}; {_LOGGERS_0_11}", deprecated="0.9.2", hidden="0.11.0"),
    NameChange("vllm:time_per_output_token_seconds", ITL,
               "0.15.0", _ITL_SOURCE, deprecated="0.11.0", hidden="0.12.0"),
    NameChange("vllm:avg_prompt_throughput_toks_per_s", PROMPT_TOKENS, "0.7.2",
               "deprecated by vllm#2764, removed by vllm#12383 (vllm#13218: gone in 0.7.2)"),
    NameChange("vllm:avg_generation_throughput_toks_per_s", GENERATION_TOKENS,
               "0.7.2",
               "deprecated by vllm#2764, removed by vllm#12383 (vllm#13218: gone in 0.7.2)"),
    NameChange("vllm:gpu_prefix_cache_hit_rate", "vllm:prefix_cache_hits_total", "0.11.0",
               _V0_SOURCE),
    NameChange("vllm:cpu_prefix_cache_hit_rate", None, "0.11.0", _V0_SOURCE),
    NameChange("vllm:num_requests_swapped", None, "0.11.0", _V0_SOURCE),
    NameChange("vllm:cpu_cache_usage_perc", None, "0.11.0", _V0_SOURCE),
    NameChange("vllm:time_in_queue_requests", "vllm:request_queue_time_seconds", "0.11.0",
               _V0_SOURCE),
    NameChange("vllm:tokens_total", None, "0.11.0", _V0_SOURCE),
    NameChange("vllm:model_forward_time_milliseconds", None, "0.11.0", _V0_SOURCE),
    NameChange("vllm:model_execute_time_milliseconds", None, "0.11.0", _V0_SOURCE),
)  # fmt: skip

#: Old exposed name -> its change; new exposed name -> the rename that introduced it.
CHANGED: dict[str, NameChange] = {c.old: c for c in VLLM_NAME_CHANGES}
INTRODUCED_AS_RENAME: dict[str, NameChange] = {
    c.new: c for c in VLLM_NAME_CHANGES if c.new and c.deprecated
}


def version_key(version: str) -> tuple[int, ...]:
    """`0.11.0` -> (0, 11, 0); suffixes (`rc1`, `+cu124`) are ignored."""
    parts: list[int] = []
    for piece in version.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts + [0] * (3 - len(parts)))


def exposed_name(name: str) -> str:
    """A family as it appears on a page: `vllm:prompt_tokens` -> `vllm:prompt_tokens_total`."""
    if name in VLLM_KNOWN or name in CHANGED:
        return name
    if f"{name}_total" in VLLM_KNOWN or f"{name}_total" in CHANGED:
        return f"{name}_total"
    return name


def aliases(name: str) -> tuple[str, ...]:
    """A family and the older names the same series had (read when the new one is absent)."""
    return (name, *(c.old for c in VLLM_NAME_CHANGES if c.new == name and c.deprecated))


def vllm_families(version: str, *, lazy: bool = True) -> tuple[Family, ...]:
    """The families a vLLM server of `version` exposes by default (no optional feature on);
    `lazy=False` leaves out those registered only at their first observation."""
    if version_key(version) < version_key(VLLM_OLDEST):
        version = VLLM_OLDEST
    return tuple(f for f in VLLM_ALL if f.exposed_at(version) and (lazy or not f.lazy))


def name_at(name: str, version: str) -> str:
    """The name vLLM `version` exposes the series `name` under: `name` itself, or the older
    name of a rename when `version` predates the new one (`vllm:inter_token_latency_seconds`
    at 0.10.1 is `vllm:time_per_output_token_seconds`). Unknown names are returned as given."""
    exposed = {f.name for f in vllm_families(version)}
    if name in exposed:
        return name
    return next((old for old in aliases(name)[1:] if old in exposed), name)


# --------------------------------------------------------------------------------------------
# what hxp publishes
# --------------------------------------------------------------------------------------------

#: Prefixes of the series hxp publishes (never accepted as input names).
PUBLISHED_PREFIXES = ("fleet:", "hxp_")

#: Published fleet series: name -> help. Every one carries `stack` and `model` (`model=""` is
#: the whole fleet: an empty label is an absent one in PromQL). A declared series `NAME` of a
#: stack's `metrics.series` is published as `fleet:NAME` beside these.
FLEET_SERIES: dict[str, str] = {
    "fleet:request_rate": "Finished requests per second (every finish reason).",
    "fleet:success_ratio": "Share of finished requests that ended with stop, length or "
    "repetition (not abort or error).",
    "fleet:prompt_tokens_per_second": "Prompt (prefill) tokens processed per second.",
    "fleet:generation_tokens_per_second": "Generated tokens per second.",
    "fleet:ttft_seconds": "Time to first token quantile over the window.",
    "fleet:inter_token_latency_seconds": "Inter-token latency quantile over the window.",
    "fleet:e2e_latency_seconds": "End-to-end request latency quantile over the window.",
    "fleet:requests_waiting": "Requests waiting to be scheduled (queue depth), summed.",
    "fleet:requests_running": "Requests in model execution batches, summed.",
    "fleet:kv_cache_usage_mean": "KV-cache usage (0-1), mean over replicas.",
    "fleet:kv_cache_usage_max": "KV-cache usage (0-1), the fullest replica.",
    "fleet:targets": "Replica /metrics endpoints by state (up, down).",
    "fleet:window_seconds": "Mean length of the rate window (time since the previous scrape).",
    "fleet:cost_per_hour": "Token cost per hour at the configured price per million tokens.",
    "fleet:label_tokens_per_second": "Tokens per second by the value of a declared label.",
    "fleet:label_cost_per_hour": "Token cost per hour by the value of a declared label.",
}
#: Help of a `fleet:NAME` series declared in a stack's `metrics.series`.
DECLARED_SERIES_HELP = "A series declared in metrics.series."

#: The orchestrator's own families (hxp.io.telemetry registers them; `hxp exporter` serves
#: them rebuilt from the store).
HXP_DEPLOYS = Family(
    "hxp_deploys_total", "counter",
    "Deploy runs by outcome (succeeded, failed, interrupted, no-change).",
    ("stack", "kind", "outcome"),
)  # fmt: skip
HXP_DEPLOY_SECONDS = Family(
    "hxp_deploy_duration_seconds", "histogram", "Wall time of deploy runs.", ("stack", "kind")
)
HXP_UNIT_DEPLOY_SECONDS = Family(
    "hxp_unit_deploy_duration_seconds", "histogram",
    "Wall time of applying one unit (actions plus readiness gate).",
    ("stack", "unit", "outcome"),
)  # fmt: skip
HXP_ROLLBACKS = Family(
    "hxp_rollbacks_total", "counter",
    "Units rolled back, by the class of the failure that caused it.",
    ("stack", "unit", "reason_class"),
)  # fmt: skip
HXP_UNIT_HEALTH = Family(
    "hxp_unit_health", "gauge",
    "Health of a unit per layer: 1 healthy, 0.5 degraded, 0 unhealthy, -1 unknown.",
    ("stack", "unit", "layer"),
)  # fmt: skip
HXP_LIFECYCLE_STATE = Family(
    "hxp_unit_lifecycle_state", "gauge",
    "1 for the unit's current lifecycle state, 0 for the others.", ("stack", "unit", "state"),
)  # fmt: skip
HXP_SWEEP_SECONDS = Family(
    "hxp_health_sweep_duration_seconds", "histogram", "Wall time of a health sweep.", ("stack",)
)
HXP_AGGREGATION_SECONDS = Family(
    "hxp_metrics_aggregation_duration_seconds", "histogram",
    "Wall time of a metrics aggregation run.", ("stack",),
)  # fmt: skip
HXP_ERRORS = Family(
    "hxp_errors_total", "counter",
    "Errors by class (transient, permanent, input) and where they happened.",
    ("stack", "where", "error_class"),
)  # fmt: skip
HXP_AGGREGATED_AT = Family(
    "hxp_metrics_aggregation_timestamp_seconds", "gauge",
    "When the last metrics aggregation of the stack finished (Unix time): alert when it stops.",
    ("stack",),
)  # fmt: skip
HXP_AUTOSCALE_DECISIONS = Family(
    "hxp_autoscale_decisions_total", "counter",
    "Autoscaler decisions by action (scale_up, scale_down, hold, stale, blocked).",
    ("stack", "model", "action"),
)  # fmt: skip
HXP_AUTOSCALE_REPLICAS = Family(
    "hxp_autoscale_replicas", "gauge",
    "The replica count the autoscaler chose for a model.", ("stack", "model"),
)  # fmt: skip

HXP: tuple[Family, ...] = (
    HXP_DEPLOYS,
    HXP_DEPLOY_SECONDS,
    HXP_UNIT_DEPLOY_SECONDS,
    HXP_ROLLBACKS,
    HXP_UNIT_HEALTH,
    HXP_LIFECYCLE_STATE,
    HXP_SWEEP_SECONDS,
    HXP_AGGREGATION_SECONDS,
    HXP_ERRORS,
    HXP_AGGREGATED_AT,
    HXP_AUTOSCALE_DECISIONS,
    HXP_AUTOSCALE_REPLICAS,
)


def vllm_series(version: str = VLLM_REFERENCE_VERSION, *, lazy: bool = False) -> frozenset[str]:
    """Every `vllm:*` sample name a vLLM server of `version` (and the simulator imitating it)
    puts on its page from the start (`lazy=True`: also after its first requests)."""
    return frozenset().union(*(f.series() for f in vllm_families(version, lazy=lazy)))


def exporter_series() -> frozenset[str]:
    """Every sample name `hxp exporter` serves: the `hxp_*` families and the fleet series."""
    return frozenset().union(*(f.series() for f in HXP), FLEET_SERIES)
