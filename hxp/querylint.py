"""Query lint: every metric a rule or dashboard reads must be served by someone we know.

The known series come from hxp.metric_names, the one table of names: the families of the vLLM
release a model is pinned at (`vllm_source`: the recorded exposition hxp/data/metrics/
vllm-<version>.prom where one exists, else the table, which the simulator imitating that
release serves, a test checks) and the `hxp` exporter's (hxp.io.telemetry registers the same
table's `hxp_*` families; the fleet series); from the other recorded expositions
(dcgm-exporter); from the series Prometheus makes itself (`up`, `ALERTS`, ...) and from the
stack's own recording rules.
A name nobody exposes (a typo, `vllm:num_preemptions` without `_total`, a renamed family)
fails the build with the place it was found.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hxp import promtext
from hxp.errors import PromQLSyntaxError
from hxp.metric_names import SUFFIXES, exporter_series, vllm_series
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


@dataclass(frozen=True)
class MetricSource:
    """Who serves which series names."""

    name: str
    series: frozenset[str]


def exposition_series(text: str) -> set[str]:
    """Every series name a Prometheus text exposition serves or declares (by its TYPE)."""
    names: set[str] = set()
    for name, family in promtext.parse(text).items():
        base = name.removesuffix("_total") if family.type == "counter" else name
        suffixes = SUFFIXES.get(family.type, ("",))
        names.update(f"{base}{s}" for s in suffixes)
        names.update(sample.name for sample in family.samples)
    return names


def simulator_source() -> MetricSource:
    """What the vLLM simulator's /metrics serves by default: the reference release's families
    (hxp.metric_names, the table the simulator builds its registry from)."""
    return MetricSource("vLLM simulator /metrics", vllm_series())


VLLM_FIXTURE = "vllm-{version}.prom"


def vllm_source(version: str, directory: Path = FIXTURES) -> MetricSource:
    """What a vLLM server of `version` serves (after its first requests): the recorded
    exposition of that release if hxp ships one, else hxp.metric_names' table for it."""
    path = directory / VLLM_FIXTURE.format(version=version)
    if path.is_file():
        return MetricSource(f"fixture {path.name}", frozenset(exposition_series(path.read_text())))
    return MetricSource(f"vLLM {version} (simulator table)", vllm_series(version, lazy=True))


def exporter_source() -> MetricSource:
    """`hxp exporter`'s families: every hxp_* one (with _total/_bucket/... suffixes) and the
    fleet:* gauges the aggregation flow publishes through it."""
    return MetricSource("hxp exporter /metrics", exporter_series())


def fixture_sources(directory: Path = FIXTURES) -> list[MetricSource]:
    """Recorded expositions shipped with hxp (a real vLLM release, dcgm-exporter)."""
    return [
        MetricSource(f"fixture {p.name}", frozenset(exposition_series(p.read_text())))
        for p in sorted(directory.glob("*.prom"))
    ]


def other_fixture_sources(directory: Path = FIXTURES) -> list[MetricSource]:
    """The recorded expositions of everything but vLLM (dcgm-exporter)."""
    return [s for s in fixture_sources(directory) if not s.name.startswith("fixture vllm-")]


def stack_sources(versions: Iterable[str]) -> list[MetricSource]:
    """Who serves what for a stack whose models are pinned at `versions`: those releases'
    vLLM families, the exporter, the other fixtures, Prometheus itself."""
    return [
        *(vllm_source(v) for v in versions),
        exporter_source(),
        *other_fixture_sources(),
        MetricSource("Prometheus (synthetic series)", PROMETHEUS_SYNTHETIC),
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
