"""Query lint: every metric a rule or dashboard reads must be served by someone we know.

The known series come from recorded `/metrics` expositions: the vLLM simulator's (generated
from its own registry, so it cannot drift from what it serves), the `hxp` exporter's registry
(hxp.io.telemetry), the fixtures under hxp/data/metrics (vLLM 0.11.0, dcgm-exporter), the
series Prometheus makes itself (`up`, `ALERTS`, ...) and the stack's own recording rules.
A name nobody exposes (a typo, `vllm:num_preemptions` without `_total`, a renamed family)
fails the build with the place it was found.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from hxp.errors import PromQLSyntaxError
from hxp.promql import metric_names

FIXTURES = Path(__file__).resolve().parent / "data" / "metrics"

# Series Prometheus writes itself for every scrape and every alert.
PROMETHEUS_SYNTHETIC = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
        "ALERTS",
        "ALERTS_FOR_STATE",
    }
)

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gauge": ("",),
    "unknown": ("",),
}


@dataclass(frozen=True)
class MetricSource:
    """Who serves which series names."""

    name: str
    series: frozenset[str]


def exposition_series(text: str) -> set[str]:
    """Every series name a Prometheus text exposition serves or declares (by its TYPE)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(f"{family.name}{s}" for s in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def simulator_source() -> MetricSource:
    """The vLLM simulator's /metrics, rendered from the same registry it serves."""
    from hxp.sim.vllm import SimMetrics

    body, _ = SimMetrics("lint/model", 4096).render("text/plain")
    return MetricSource("vLLM simulator /metrics", frozenset(exposition_series(body.decode())))


def exporter_source() -> MetricSource:
    """`hxp exporter`'s families: every hxp_* one (with _total/_bucket/... suffixes) and the
    fleet:* gauges the aggregation flow publishes through it."""
    from prometheus_client import generate_latest

    from hxp.io.telemetry import REGISTRY

    series = exposition_series(generate_latest(REGISTRY).decode())
    try:
        from hxp.metrics import FLEET_SERIES
    except ImportError:  # pragma: no cover - the aggregation module is part of hxp
        FLEET_SERIES = {}
    series.update(FLEET_SERIES)
    return MetricSource("hxp exporter /metrics", frozenset(series))


def fixture_sources(directory: Path = FIXTURES) -> list[MetricSource]:
    """Recorded expositions shipped with hxp (a real vLLM release, dcgm-exporter)."""
    return [
        MetricSource(f"fixture {p.name}", frozenset(exposition_series(p.read_text())))
        for p in sorted(directory.glob("*.prom"))
    ]


def default_sources() -> list[MetricSource]:
    return [
        simulator_source(),
        exporter_source(),
        *fixture_sources(),
        MetricSource("Prometheus (synthetic series)", PROMETHEUS_SYNTHETIC),
    ]


def _hint(name: str, known: set[str]) -> str:
    for candidate in (f"{name}_total", f"{name}_bucket", name.removesuffix("_total")):
        if candidate != name and candidate in known:
            return f" (did you mean {candidate!r}?)"
    return ""


def lint_queries(
    queries: Iterable[tuple[str, str]],
    sources: Iterable[MetricSource],
    recorded: Iterable[str] = (),
) -> list[str]:
    """Problems, one line each: an expression that does not parse, a series nobody serves."""
    source_list = list(sources)
    known = set().union(*(s.series for s in source_list), recorded)
    served_by = ", ".join(s.name for s in source_list)
    problems: list[str] = []
    for where, expr in queries:
        try:
            names = metric_names(expr)
        except PromQLSyntaxError as exc:
            problems.append(f"{where}: {exc} in {expr!r}")
            continue
        for name in sorted(names - known):
            problems.append(
                f"{where}: series {name!r} is served by none of: {served_by}, "
                f"recording rules{_hint(name, known)}"
            )
    return problems
