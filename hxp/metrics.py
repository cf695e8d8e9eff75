"""Fleet metrics from vLLM `/metrics` pages: pre-filter, parse, quantiles, rates, name checks.

Pure: fetching happens in hxp.io.scrape, the previous scrape of every target is kept in the
store, the aggregate-metrics flow publishes. Parsing dominates the cost of a scrape (a vLLM page
is 20-40 KB, two dozen histogram families), so a page is cut down to the families we aggregate
*before* it is parsed (hxp.promtext, the project's one parser of the text format). The names
read here (vLLM's families and renames, the published `fleet:*` series) are hxp.metric_names'.

Semantics follow Prometheus so that the published `fleet:*` series read like the PromQL an
operator would write:
- a rate is the counter's increase over the window between two scrapes divided by its length;
  a counter that went down (a restarted replica) counts its new value as the increase, as
  `rate()` does, and a changed `process_start_time_seconds` marks a restart even when the new
  value has already passed the old one;
- a quantile is `histogram_quantile()` (Prometheus 2.42, promql/quantile.go) over the bucket
  increases of the window, summed across replicas: linear interpolation inside the bucket, the
  lowest bucket starting at 0, a quantile in the +Inf bucket answered with the largest finite
  bound, no answer without observations.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hxp import promtext
from hxp.endpoints import address_of
from hxp.errors import FailureClass
from hxp.metric_names import (
    CHANGED,
    E2E,
    GENERATION_TOKENS,
    INTRODUCED_AS_RENAME,
    ITL,
    KV_USAGE,
    PROCESS_START,
    PROMPT_TOKENS,
    REQUEST_SUCCESS,
    RUNNING,
    TTFT,
    VLLM_ALL,
    VLLM_KNOWN,
    VLLM_REFERENCE_VERSION,
    WAITING,
    aliases,
    exposed_name,
    version_key,
)
from hxp.metric_names import FLEET_SERIES as FLEET_SERIES  # re-exported: its old home
from hxp.metric_names import VLLM_FAMILIES as VLLM_FAMILIES  # re-exported
from hxp.metric_names import VLLM_NAME_CHANGES as VLLM_NAME_CHANGES  # re-exported
from hxp.metric_names import Kind as Kind  # re-exported
from hxp.metric_names import NameChange as NameChange  # re-exported
from hxp.spec import MetricsSpec, SeriesSpec, Stack

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class MetricIssue:
    """Something the operator should know about the metrics of a run."""

    severity: Severity
    message: str
    target: str | None = None

    def __str__(self) -> str:
        where = f"{self.target}: " if self.target else ""
        return f"{self.severity}: {where}{self.message}"


def summarize(issues: Sequence[MetricIssue], show: int = 4) -> list[MetricIssue]:
    """One issue per (severity, message), naming its targets (the first few and a count)."""
    groups: dict[tuple[Severity, str], list[str]] = {}
    for issue in issues:
        groups.setdefault((issue.severity, issue.message), []).append(issue.target or "")
    out: list[MetricIssue] = []
    for (severity, message), targets in groups.items():
        named = [t for t in targets if t]
        if not named:
            out.append(MetricIssue(severity, message))
            continue
        shown = ", ".join(named[:show])
        more = f" and {len(named) - show} more" if len(named) > show else ""
        out.append(MetricIssue(severity, message, f"{shown}{more}"))
    return out


def check_metric_name(name: str, version: str) -> MetricIssue | None:
    """What is wrong with using vLLM family `name` against a server of `version`, if anything."""
    exposed = exposed_name(name)
    at = version_key(version)
    change = CHANGED.get(exposed)
    if change is not None:
        instead = f"; use {change.new}" if change.new else " (no replacement)"
        if at >= version_key(change.gone):
            return MetricIssue(
                "error",
                f"{exposed} is not exposed by vLLM {version}: gone since {change.gone}"
                f"{instead} [{change.source}]",
            )
        if change.hidden and at >= version_key(change.hidden):
            return MetricIssue(
                "warning",
                f"{exposed} is hidden in vLLM {version} (deprecated in "
                f"{change.deprecated}; shown only with --show-hidden-metrics-for-version), "
                f"removed in {change.gone}{instead}",
            )
        if change.deprecated and at >= version_key(change.deprecated):
            return MetricIssue(
                "warning",
                f"{exposed} is deprecated since vLLM {change.deprecated} and "
                f"removed in {change.gone}{instead}",
            )
        return None
    renamed = INTRODUCED_AS_RENAME.get(exposed)
    if renamed is not None and renamed.deprecated and at < version_key(renamed.deprecated):
        return MetricIssue(
            "warning",
            f"{exposed} first appears in vLLM {renamed.deprecated}; vLLM {version} "
            f"exposes {renamed.old}",
        )
    if exposed.startswith("vllm:") and exposed not in VLLM_KNOWN:
        return MetricIssue(
            "warning",
            f"{exposed} is not in the vLLM {VLLM_REFERENCE_VERSION} reference table "
            "(an optional feature's metric, or a misspelt name)",
        )
    family = next((f for f in VLLM_ALL if f.name == exposed), None)
    if family is not None and not family.exposed_at(version):
        when = (
            f"first exposed in {family.since}"
            if family.since and at < version_key(family.since)
            else f"not exposed by default since {family.gone}"
        )
        return MetricIssue("warning", f"{exposed} is not exposed by vLLM {version} ({when})")
    return None


# --------------------------------------------------------------------------------------------
# pre-filter and parse
# --------------------------------------------------------------------------------------------

LabelKey = tuple[tuple[str, str], ...]

#: The families the built-in fleet series need (with their older names).
BUILTIN_FAMILIES: tuple[str, ...] = (
    RUNNING, WAITING, KV_USAGE, PROMPT_TOKENS, GENERATION_TOKENS, REQUEST_SUCCESS, TTFT, ITL, E2E,
)  # fmt: skip
#: finished_reason values that count as a success (vLLM: stop, length, abort, error, repetition).
SUCCESS_REASONS = frozenset({"stop", "length", "repetition"})
QUANTILES = (0.5, 0.95, 0.99)


def wanted_families(spec: MetricsSpec | None = None) -> frozenset[str]:
    """Every family an aggregation reads: built-ins, their old names, declared series."""
    names = {PROCESS_START}
    for family in BUILTIN_FAMILIES:
        names.update(aliases(family))
    if spec is not None:
        for series in spec.series.values():
            names.update(aliases(exposed_name(series.family)))
    return frozenset(names)


def select_families(text: str, names: frozenset[str]) -> str:
    """Only the blocks (`# HELP`/`# TYPE` and samples) of the named families of a page.

    A page without HELP lines is cut by sample-name prefix instead (slower, still correct).
    """
    return promtext.select(text, names)


@dataclass(frozen=True)
class Histogram:
    """One histogram series: ascending upper bounds (the last +Inf) and cumulative counts."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    sum: float = 0.0

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0


@dataclass
class Page:
    """The families of one target's page that an aggregation reads."""

    counters: dict[str, dict[LabelKey, float]] = field(default_factory=dict)
    gauges: dict[str, dict[LabelKey, float]] = field(default_factory=dict)
    histograms: dict[str, dict[LabelKey, Histogram]] = field(default_factory=dict)
    started: float | None = None

    def families(self) -> set[str]:
        return set(self.counters) | set(self.gauges) | set(self.histograms)

    def label_names(self, family: str) -> set[str]:
        series: Iterable[LabelKey] = (
            self.counters.get(family) or self.gauges.get(family) or self.histograms.get(family)
        ) or ()
        return {k for key in series for k, _ in key}


def _key(labels: Iterable[tuple[str, str]], drop: str | None = None) -> LabelKey:
    return tuple(sorted((k, v) for k, v in labels if k != drop))


def parse_page(text: str, wanted: frozenset[str] | None = None) -> Page:
    """Parse a page (pre-filtered to `wanted` when given) with hxp.promtext.

    Raises ValueError on text that is not the Prometheus exposition format.
    """
    page = Page()
    for name, family in promtext.parse(text, wanted).items():
        kind = family.type
        if kind == "counter":
            total = name if name.endswith("_total") else f"{name}_total"
            values = page.counters.setdefault(total, {})
            for s in family.samples:
                if s.name == name:
                    values[_key(s.labels)] = s.value
        elif kind in ("gauge", "untyped", "unknown"):
            if name == PROCESS_START:
                page.started = family.samples[0].value if family.samples else None
                continue
            gauges = page.gauges.setdefault(name, {})
            for s in family.samples:
                gauges[_key(s.labels)] = s.value
        elif kind == "histogram":
            buckets: dict[LabelKey, list[tuple[float, float]]] = {}
            sums: dict[LabelKey, float] = {}
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    le = next((v for k, v in s.labels if k == "le"), "+Inf")
                    buckets.setdefault(_key(s.labels, "le"), []).append((float(le), s.value))
                elif s.name.endswith("_sum"):
                    sums[_key(s.labels)] = s.value
            out = page.histograms.setdefault(name, {})
            for key, pairs in buckets.items():
                pairs.sort()
                out[key] = Histogram(
                    tuple(b for b, _ in pairs), tuple(c for _, c in pairs), sums.get(key, 0.0)
                )
    return page


# --------------------------------------------------------------------------------------------
# histogram_quantile
# --------------------------------------------------------------------------------------------


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs.

    NaN without a +Inf bucket, with fewer than two buckets or without observations.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(buckets, key=lambda b: b[0])
    if not ordered or not math.isinf(ordered[-1][0]):
        return math.nan
    coalesced: list[list[float]] = []
    for bound, count in ordered:
        if coalesced and coalesced[-1][0] == bound:
            coalesced[-1][1] += count
        else:
            coalesced.append([bound, count])
    highest = -math.inf
    for bucket in coalesced:  # ensureMonotonic
        if bucket[1] > highest:
            highest = bucket[1]
        elif bucket[1] < highest:
            bucket[1] = highest
    if len(coalesced) < 2:
        return math.nan
    observations = coalesced[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(coalesced) - 1) if coalesced[i][1] >= rank), None)
    if b is None:
        return coalesced[-2][0]
    if b == 0 and coalesced[0][0] <= 0:
        return coalesced[0][0]
    start, end, count = 0.0, coalesced[b][0], coalesced[b][1]
    if b > 0:
        start = coalesced[b - 1][0]
        count -= coalesced[b - 1][1]
        rank -= coalesced[b - 1][1]
    if count == 0:
        return math.nan
    return start + (end - start) * (rank / count)


# --------------------------------------------------------------------------------------------
# baselines and windows (the previous scrape, kept in the store)
# --------------------------------------------------------------------------------------------


def series_key(family: str, key: LabelKey, part: str = "") -> str:
    """A stable text key for one counter or histogram part: `family{a="1"}le=0.5`."""
    labels = ",".join(f'{k}="{v}"' for k, v in key)
    return f"{family}{{{labels}}}{part}"


@dataclass(frozen=True)
class Baseline:
    """A target's counters and histograms as last scraped."""

    at: float
    started: float | None
    values: dict[str, float]

    @classmethod
    def of(cls, page: Page, at: float) -> Baseline:
        values: dict[str, float] = {}
        for family, series in page.counters.items():
            for key, value in series.items():
                values[series_key(family, key)] = value
        for family, hseries in page.histograms.items():
            for key, h in hseries.items():
                for bound, count in zip(h.bounds, h.counts, strict=True):
                    values[series_key(family, key, f"le={bound!r}")] = count
                values[series_key(family, key, "sum")] = h.sum
        return cls(at, page.started, values)

    def to_json(self) -> dict[str, object]:
        return {"at": self.at, "started": self.started, "values": self.values}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Baseline:
        at, started, values = data["at"], data.get("started"), data.get("values") or {}
        assert isinstance(at, int | float)
        assert isinstance(values, dict)
        return cls(float(at), float(started) if isinstance(started, int | float) else None, values)


@dataclass
class Window:
    """Increases of one target's counters and histograms between two scrapes."""

    seconds: float
    counters: dict[str, dict[LabelKey, float]]
    histograms: dict[str, dict[LabelKey, Histogram]]
    reset: bool = False  # a counter went down, or the process start time changed


def window(previous: Baseline, page: Page, at: float) -> Window | None:
    """The increases since `previous` (None when no time has passed)."""
    seconds = at - previous.at
    if seconds <= 0:
        return None
    restarted = (
        previous.started is not None
        and page.started is not None
        and abs(previous.started - page.started) > 0.5
    )
    reset = restarted
    old = previous.values
    # A family the previous scrape did not read (a series declared since) has no window yet.
    known = {key.split("{", 1)[0] for key in old}
    counters: dict[str, dict[LabelKey, float]] = {}
    for family, series in page.counters.items():
        if family not in known and not restarted:
            continue
        out = counters.setdefault(family, {})
        for key, value in series.items():
            before = None if restarted else old.get(series_key(family, key))
            if before is None:  # restarted, or a series born inside the window
                out[key] = value
            elif value >= before:
                out[key] = value - before
            else:
                out[key], reset = value, True
    histograms: dict[str, dict[LabelKey, Histogram]] = {}
    for family, hseries in page.histograms.items():
        if family not in known and not restarted:
            continue
        hout = histograms.setdefault(family, {})
        for key, h in hseries.items():
            before_counts = [old.get(series_key(family, key, f"le={b!r}")) for b in h.bounds]
            before_sum = old.get(series_key(family, key, "sum"))
            fresh = restarted or any(c is None for c in before_counts) or before_sum is None
            if not fresh and any(
                now < (prev or 0.0) for now, prev in zip(h.counts, before_counts, strict=True)
            ):
                fresh, reset = True, True
            if fresh:
                hout[key] = h
            else:
                hout[key] = Histogram(
                    h.bounds,
                    tuple(
                        now - (prev or 0.0)
                        for now, prev in zip(h.counts, before_counts, strict=True)
                    ),
                    h.sum - (before_sum or 0.0),
                )
    return Window(seconds, counters, histograms, reset)


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One model replica's `/metrics` endpoint."""

    name: str
    model: str
    url: str
    version: str


@dataclass(frozen=True)
class Scrape:
    """What one target answered: a parsed page, or why there is none."""

    at: float
    page: Page | None = None
    error: str = ""
    error_class: Literal["transient", "permanent", ""] = ""


@dataclass(frozen=True)
class FleetSample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass
class ModelFigures:
    """One model's (or, with model "", the fleet's) aggregated figures."""

    model: str
    targets: int = 0
    up: int = 0
    windows: int = 0
    window_seconds: float | None = None
    request_rate: float | None = None
    success_ratio: float | None = None
    prompt_tps: float | None = None
    generation_tps: float | None = None
    ttft: dict[float, float] = field(default_factory=dict)
    itl: dict[float, float] = field(default_factory=dict)
    e2e_p95: float | None = None
    waiting: float | None = None
    running: float | None = None
    kv_mean: float | None = None
    kv_max: float | None = None
    cost_per_hour: float | None = None
    custom: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, object]:
        """A table-artifact row: rounded figures, '-' where there is none."""

        def r(v: float | None, digits: int = 3) -> object:
            return "-" if v is None or math.isnan(v) else round(v, digits)

        return {
            "model": self.model or "(fleet)",
            "up": f"{self.up}/{self.targets}",
            "req/s": r(self.request_rate),
            "success": r(self.success_ratio),
            "prompt tok/s": r(self.prompt_tps, 1),
            "gen tok/s": r(self.generation_tps, 1),
            "ttft p50/p95/p99": "/".join(str(r(self.ttft.get(q))) for q in QUANTILES),
            "itl p50/p95/p99": "/".join(str(r(self.itl.get(q))) for q in QUANTILES),
            "e2e p95": r(self.e2e_p95),
            "waiting": r(self.waiting, 0),
            "running": r(self.running, 0),
            "kv mean/max": f"{r(self.kv_mean)}/{r(self.kv_max)}",
            "cost/h": r(self.cost_per_hour, 4),
        }


@dataclass
class Aggregation:
    """Everything one aggregation run found."""

    stack: str
    figures: list[ModelFigures]
    samples: list[FleetSample]
    issues: list[MetricIssue]
    baselines: dict[str, Baseline]
    errors: Counter[tuple[str, str]]  # (where, error class) -> count


@dataclass
class _Part:
    """One target's contribution: its gauges now and its window since the last scrape."""

    target: Target
    page: Page
    win: Window | None


def _first(page: Page, family: str, kind: Literal["counters", "gauges", "histograms"]) -> str:
    """The name under which the page has a family (itself or an older alias), else ''."""
    store: Mapping[str, object] = getattr(page, kind)
    return next((n for n in aliases(family) if n in store), "")


def _sum_counter(win: Window, page: Page, family: str, match: Mapping[str, str]) -> float | None:
    name = _first(page, family, "counters")
    if not name:
        return None
    series = win.counters.get(name, {})
    return sum(v for k, v in series.items() if _matches(k, match))


def _matches(key: LabelKey, match: Mapping[str, str]) -> bool:
    if not match:
        return True
    labels = dict(key)
    return all(labels.get(k) == v for k, v in match.items())


def _merge(hists: Iterable[Histogram]) -> tuple[Histogram | None, int]:
    """Bucket-wise sum of histograms with the most common bounds; how many were left out."""
    items = list(hists)
    if not items:
        return None, 0
    common = Counter(h.bounds for h in items).most_common(1)[0][0]
    same = [h for h in items if h.bounds == common]
    counts = [0.0] * len(common)
    total_sum = 0.0
    for h in same:
        for i, c in enumerate(h.counts):
            counts[i] += c
        total_sum += h.sum
    return Histogram(common, tuple(counts), total_sum), len(items) - len(same)


def _quantiles(hist: Histogram | None, qs: Sequence[float]) -> dict[float, float]:
    if hist is None or hist.count <= 0:
        return {}
    pairs = list(zip(hist.bounds, hist.counts, strict=True))
    out = {q: histogram_quantile(q, pairs) for q in qs}
    return {q: v for q, v in out.items() if not math.isnan(v)}


def _window_hists(parts: Sequence[_Part], family: str, match: Mapping[str, str]) -> list[Histogram]:
    out: list[Histogram] = []
    for p in parts:
        if p.win is None:
            continue
        name = _first(p.page, family, "histograms")
        out.extend(h for k, h in p.win.histograms.get(name, {}).items() if _matches(k, match))
    return out


def _gauges(parts: Sequence[_Part], family: str, match: Mapping[str, str]) -> list[float]:
    """One value per target: the sum of its matching series."""
    out: list[float] = []
    for p in parts:
        name = _first(p.page, family, "gauges")
        if name:
            out.append(sum(v for k, v in p.page.gauges[name].items() if _matches(k, match)))
    return out


def _rate(parts: Sequence[_Part], family: str, match: Mapping[str, str]) -> float | None:
    rates = []
    for p in parts:
        if p.win is None:
            continue
        total = _sum_counter(p.win, p.page, family, match)
        if total is not None:
            rates.append(total / p.win.seconds)
    return sum(rates) if rates else None


def _figures(model: str, targets: int, parts: Sequence[_Part], spec: MetricsSpec) -> ModelFigures:
    fig = ModelFigures(model, targets=targets, up=len(parts))
    windows = [p for p in parts if p.win is not None]
    fig.windows = len(windows)
    if windows:
        fig.window_seconds = sum(p.win.seconds for p in windows if p.win) / len(windows)
    fig.request_rate = _rate(parts, REQUEST_SUCCESS, {})
    finished = ok = 0.0
    for p in windows:
        assert p.win is not None
        name = _first(p.page, REQUEST_SUCCESS, "counters")
        for key, value in p.win.counters.get(name, {}).items():
            finished += value
            if dict(key).get("finished_reason") in SUCCESS_REASONS:
                ok += value
    fig.success_ratio = ok / finished if finished > 0 else None
    fig.prompt_tps = _rate(parts, PROMPT_TOKENS, {})
    fig.generation_tps = _rate(parts, GENERATION_TOKENS, {})
    fig.ttft = _quantiles(_merge(_window_hists(parts, TTFT, {}))[0], QUANTILES)
    fig.itl = _quantiles(_merge(_window_hists(parts, ITL, {}))[0], QUANTILES)
    fig.e2e_p95 = _quantiles(_merge(_window_hists(parts, E2E, {}))[0], (0.95,)).get(0.95)
    waiting, running, kv = (_gauges(parts, f, {}) for f in (WAITING, RUNNING, KV_USAGE))
    fig.waiting = sum(waiting) if waiting else None
    fig.running = sum(running) if running else None
    fig.kv_mean = sum(kv) / len(kv) if kv else None
    fig.kv_max = max(kv) if kv else None
    prompt_price, gen_price = spec.prices()
    if (prompt_price is not None or gen_price is not None) and (
        fig.prompt_tps is not None or fig.generation_tps is not None
    ):
        fig.cost_per_hour = (
            (
                (fig.prompt_tps or 0.0) * (prompt_price or 0.0)
                + (fig.generation_tps or 0.0) * (gen_price or 0.0)
            )
            * 3600
            / 1e6
        )
    for name, series in spec.series.items():
        figure = _custom(parts, series)
        if figure is not None:
            fig.custom[name] = figure
    return fig


def _custom(parts: Sequence[_Part], series: SeriesSpec) -> float | None:
    family = exposed_name(series.family)
    match = series.match
    if series.op == "rate":
        return _rate(parts, family, match)
    if series.op in ("sum", "avg", "max", "min"):
        values = _gauges(parts, family, match)
        if not values:
            return None
        if series.op == "sum":
            return sum(values)
        if series.op == "avg":
            return sum(values) / len(values)
        return max(values) if series.op == "max" else min(values)
    q = float(series.op[1:]) / 100
    merged, _ = _merge(_window_hists(parts, family, match))
    return _quantiles(merged, (q,)).get(q)


def _label_tokens(
    parts: Sequence[_Part], label: str
) -> dict[tuple[str, str], float]:  # (value, kind) -> tokens/s
    out: dict[tuple[str, str], float] = {}
    for p in parts:
        if p.win is None:
            continue
        for family, kind in ((PROMPT_TOKENS, "prompt"), (GENERATION_TOKENS, "generation")):
            for key, value in p.win.counters.get(_first(p.page, family, "counters"), {}).items():
                labels = dict(key)
                if label in labels:
                    slot = (labels[label], kind)
                    out[slot] = out.get(slot, 0.0) + value / p.win.seconds
    return out


def _samples(stack: str, fig: ModelFigures, spec: MetricsSpec) -> list[FleetSample]:
    base = (("model", fig.model), ("stack", stack))
    out: list[FleetSample] = []

    def add(name: str, value: float | None, *extra: tuple[str, str]) -> None:
        if value is not None and not math.isnan(value):
            out.append(FleetSample(name, tuple(sorted((*base, *extra))), float(value)))

    add("fleet:request_rate", fig.request_rate)
    add("fleet:success_ratio", fig.success_ratio)
    add("fleet:prompt_tokens_per_second", fig.prompt_tps)
    add("fleet:generation_tokens_per_second", fig.generation_tps)
    for q, v in fig.ttft.items():
        add("fleet:ttft_seconds", v, ("quantile", repr(q)))
    for q, v in fig.itl.items():
        add("fleet:inter_token_latency_seconds", v, ("quantile", repr(q)))
    add("fleet:e2e_latency_seconds", fig.e2e_p95, ("quantile", "0.95"))
    add("fleet:requests_waiting", fig.waiting)
    add("fleet:requests_running", fig.running)
    add("fleet:kv_cache_usage_mean", fig.kv_mean)
    add("fleet:kv_cache_usage_max", fig.kv_max)
    add("fleet:targets", float(fig.up), ("state", "up"))
    add("fleet:targets", float(fig.targets - fig.up), ("state", "down"))
    add("fleet:window_seconds", fig.window_seconds)
    add("fleet:cost_per_hour", fig.cost_per_hour, ("currency", spec.currency))
    for name, value in fig.custom.items():
        add(f"fleet:{name}", value)
    return out


def aggregate(
    stack: Stack,
    targets: Sequence[Target],
    scrapes: Mapping[str, Scrape],
    baselines: Mapping[str, Baseline],
) -> Aggregation:
    """Per-model and fleet-wide figures from this run's scrapes and the previous baselines.

    A target without a page (dead, timed out, not running) is reported and left out; a target
    without a usable baseline contributes its gauges but no rates or quantiles this run.
    """
    spec = stack.metrics or MetricsSpec()
    issues: list[MetricIssue] = []
    errors: Counter[tuple[str, str]] = Counter()
    new_baselines: dict[str, Baseline] = {}
    parts: dict[str, list[_Part]] = {}
    expected: Counter[str] = Counter(t.model for t in targets)
    for target in targets:
        scrape = scrapes.get(target.name)
        if scrape is None or scrape.page is None:
            why = scrape.error if scrape is not None else "not scraped"
            issues.append(MetricIssue("warning", f"down, left out: {why}", target.name))
            if scrape is not None and scrape.error_class:
                errors[("scrape", scrape.error_class)] += 1
            continue
        page = scrape.page
        new_baselines[target.name] = Baseline.of(page, scrape.at)
        previous = baselines.get(target.name)
        win: Window | None = None
        if previous is None:
            issues.append(MetricIssue(
                "info", "first scrape: rates and quantiles start with the next run", target.name
            ))  # fmt: skip
        elif scrape.at - previous.at > spec.stale_after:
            issues.append(MetricIssue(
                "info", f"previous scrape is {scrape.at - previous.at:.0f}s old (stale_after "
                f"{spec.stale_after:.0f}s): no rates this run", target.name
            ))  # fmt: skip
        else:
            win = window(previous, page, scrape.at)
            if win is not None and win.reset:
                issues.append(MetricIssue(
                    "info", "counters reset (replica restarted): new values count as the "
                    "increase, as Prometheus rate() does", target.name
                ))  # fmt: skip
        for family in BUILTIN_FAMILIES:
            if not any(a in page.families() for a in aliases(family)):
                issues.append(MetricIssue("warning", f"exposes no {family}", target.name))
        parts.setdefault(target.model, []).append(_Part(target, page, win))
    issues.extend(_declared_checks(stack, targets, parts))
    figures: list[ModelFigures] = []
    samples: list[FleetSample] = []
    everyone: list[_Part] = []
    for model in sorted(expected):
        model_parts = parts.get(model, [])
        everyone.extend(model_parts)
        fig = _figures(model, expected[model], model_parts, spec)
        figures.append(fig)
        samples.extend(_samples(stack.stack, fig, spec))
        samples.extend(_label_samples(stack.stack, model, model_parts, spec))
        issues.extend(_bucket_mismatches(model, model_parts))
        if not model_parts:
            issues.append(MetricIssue("warning", f"model {model}: no replica answered"))
    fleet = _figures("", sum(expected.values()), everyone, spec)
    figures.append(fleet)
    samples.extend(_samples(stack.stack, fleet, spec))
    samples.extend(_label_samples(stack.stack, "", everyone, spec))
    return Aggregation(stack.stack, figures, samples, issues, new_baselines, errors)


def _bucket_mismatches(model: str, parts: Sequence[_Part]) -> list[MetricIssue]:
    """Replicas whose latency buckets differ from the majority's (left out of the quantiles)."""
    out: list[MetricIssue] = []
    for family in (TTFT, ITL, E2E):
        hists = _window_hists(parts, family, {})
        _, left_out = _merge(hists)
        if left_out:
            out.append(MetricIssue(
                "warning", f"model {model}: {left_out} of {len(hists)} {family} series have other "
                "bucket bounds than the rest; left out of its quantiles"
            ))  # fmt: skip
    return out


def _label_samples(
    stack: str, model: str, parts: Sequence[_Part], spec: MetricsSpec
) -> list[FleetSample]:
    out: list[FleetSample] = []
    prompt_price, gen_price = spec.prices()
    for label in spec.per_label:
        cost: dict[str, float] = {}
        for (value, kind), tps in sorted(_label_tokens(parts, label).items()):
            labels = {"stack": stack, "model": model, "label": label, "value": value, "kind": kind}
            out.append(FleetSample("fleet:label_tokens_per_second", _sorted(labels), tps))
            price = prompt_price if kind == "prompt" else gen_price
            if price is not None:
                cost[value] = cost.get(value, 0.0) + tps * price * 3600 / 1e6
        for value, per_hour in sorted(cost.items()):
            labels = {"stack": stack, "model": model, "label": label, "value": value,
                      "currency": spec.currency}  # fmt: skip
            out.append(FleetSample("fleet:label_cost_per_hour", _sorted(labels), per_hour))
    return out


def _sorted(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def _declared_checks(
    stack: Stack, targets: Sequence[Target], parts: Mapping[str, Sequence[_Part]]
) -> list[MetricIssue]:
    """Declared series and labels that no answering target exposes; names vLLM renamed."""
    spec = stack.metrics
    if spec is None:
        return []
    issues: list[MetricIssue] = []
    pages = [p.page for ps in parts.values() for p in ps]
    versions = sorted({t.version for t in targets})
    for name, series in sorted(spec.series.items()):
        family = exposed_name(series.family)
        for version in versions:
            problem = check_metric_name(family, version)
            if problem is not None:
                issues.append(MetricIssue(problem.severity, f"metrics.series.{name}: {problem}"))
        if pages and not any(a in page.families() for page in pages for a in aliases(family)):
            issues.append(MetricIssue(
                "warning", f"metrics.series.{name}: no target exposes {family}"
            ))  # fmt: skip
        elif pages and series.match:
            found = {k for page in pages for a in aliases(family) for k in page.label_names(a)}
            absent = sorted(set(series.match) - found)
            if absent:
                issues.append(MetricIssue(
                    "warning", f"metrics.series.{name}: no target's {family} has label(s) "
                    f"{', '.join(absent)}"
                ))  # fmt: skip
    for label in spec.per_label:
        labelled = any(
            label in page.label_names(a)
            for page in pages
            for family in (PROMPT_TOKENS, GENERATION_TOKENS)
            for a in aliases(family)
        )
        if pages and not labelled:
            issues.append(MetricIssue(
                "warning", f"metrics.per_label: no target labels {PROMPT_TOKENS} or "
                f"{GENERATION_TOKENS} with {label!r}"
            ))  # fmt: skip
    return issues


def targets_of(stack: Stack, instances: Iterable[tuple[str, str, str, int]]) -> list[Target]:
    """Targets from (instance, model, address, port) tuples of model replicas."""
    out = []
    for instance, model, address, port in instances:
        host = f"[{address}]" if ":" in address else address
        version = stack.models[model].vllm.version
        out.append(Target(instance, model, f"http://{host}:{port}/metrics", version))
    return out


# --------------------------------------------------------------------------------------------
# orchestrator series derived from the store (deploy outcomes, rollbacks, lifecycle)
# --------------------------------------------------------------------------------------------

#: The values of the `reason_class` label: a deploy failure's class (hxp.errors.FailureClass),
#: set where the failure happened and kept in the deploy record.
FAILURE_CLASSES = tuple(c.value for c in FailureClass)

#: Only for deploy records written before the class was recorded: their reason text.
_LEGACY_FAILURE_TEXT: tuple[tuple[FailureClass, str], ...] = (
    (FailureClass.INTERRUPTED, r"^interrupted$|orchestrator stopped"),
    (FailureClass.READINESS, r"never became ready"),
    (FailureClass.VERIFY, r"was ready, then"),
    (FailureClass.CRASHED, r"is not running|stopped after it was ready|stopped within"),
    (FailureClass.APPLY, r"^(create|update|start|replace|remove) \S+ failed"),
    (FailureClass.SECRET, r"(?i)secret"),
    (FailureClass.RESOURCES, r"(?i)\bGPUs?\b"),
)


def failure_class(reason: str) -> str:
    """The class of a failure recorded without one (a deploy record from before classes were
    recorded), from its reason text; new records carry their FailureClass."""
    for failure, pattern in _LEGACY_FAILURE_TEXT:
        if re.search(pattern, reason):
            return failure.value
    return FailureClass.OTHER.value


def recorded_failure_class(result: Mapping[str, Any]) -> str:
    """The `reason_class` of a failed deploy record: its recorded class, else (an older
    record) the class its reason text reads as."""
    recorded = result.get("reason_class")
    if recorded in FAILURE_CLASSES:
        return str(recorded)
    return failure_class(str(result.get("reason", "")))


def error_class(failure: str) -> str:
    """transient, permanent or input: for `hxp_errors_total{error_class}`."""
    known = failure in FAILURE_CLASSES
    return FailureClass(failure).error_class if known else "permanent"


LIFECYCLE_STATES = ("deploying", "running", "rolled-back", "failed", "stopped", "removed")
_REVISION_STATE = {
    "applied": "deploying",
    "ready": "deploying",
    "good": "running",
    "rolled-back": "rolled-back",
}


def lifecycle_state(revision_status: str, has_good: bool, last_event: str | None) -> str:
    """A unit's lifecycle state from its newest revision and any later stop/remove event."""
    if last_event in ("down", "stopped", "stop"):
        return "stopped"
    if last_event == "removed":
        return "removed"
    if last_event in ("started", "start"):
        return "running"
    state = _REVISION_STATE.get(revision_status, "deploying")
    if state == "rolled-back" and not has_good:
        return "failed"
    return state


def replica_targets(stack: Stack, running: set[str] | None = None) -> tuple[list[Target], set[str]]:
    """Every model replica's target, and the ones not running.

    `running`: instance names the backends see running (None: take every declared replica).
    For a model behind the gateway both blue-green slots are candidates; a replica counts as
    not running when neither of its slots runs.
    """
    from hxp.units import expand_units, slot_instances

    targets: list[Target] = []
    down: set[str] = set()
    routed = set(stack.gateway.routes) if stack.gateway is not None else set()
    for model in sorted(stack.models):
        slots = [expand_units(stack, {model})]
        if model in routed:
            slots.append(slot_instances(stack, model, 1))
        for replica in zip(*slots, strict=True):
            live = [i for i in replica if running is None or i.name in running]
            if running is None:
                live = live[:1]  # slot 0, as declared
            for inst in live or [replica[0]]:
                address = address_of(inst.host_spec)
                target = targets_of(stack, [(inst.name, model, address, dict(inst.ports)["http"])])
                targets.extend(target)
                if not live:
                    down.add(inst.name)
    return targets, down
