"""hxp.promtext, the one parser of the Prometheus text format: the same samples as
prometheus-client's parser on real-format pages, escapes, grouping, strict and lenient modes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hxp import promtext
from hxp.metric_names import KV_USAGE, PROMPT_TOKENS, TTFT, WAITING

ROOT = Path(__file__).parents[2]
PAGES = [
    *sorted((ROOT / "tests" / "data" / "vllm_metrics").glob("*.txt")),
    *sorted((ROOT / "hxp" / "data" / "metrics").glob("*.prom")),
]


def _reference(text: str) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    """Every sample as prometheus-client reads it (NaN as a string, to compare)."""
    out = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.add((s.name, tuple(sorted(s.labels.items())), repr(float(s.value))))
    return out  # type: ignore[return-value]


def _ours(text: str) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    out = set()
    for family in promtext.parse(text).values():
        for s in family.samples:
            out.add((s.name, tuple(sorted(s.labels)), repr(s.value)))
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_same_samples_as_prometheus_client(path: Path) -> None:
    text = path.read_text()
    assert _ours(text) == _reference(text)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_same_families_and_types_as_prometheus_client(path: Path) -> None:
    text = path.read_text()
    theirs = {}
    for f in text_string_to_metric_families(text):
        # prometheus-client drops a counter's _total from the family name; we keep it
        name = f"{f.name}_total" if f"# TYPE {f.name}_total counter" in text else f.name
        theirs[name] = "untyped" if f.type == "unknown" else f.type  # its name for untyped
    ours = {name: f.type for name, f in promtext.parse(text).items()}
    assert ours == theirs


def test_groups_histogram_parts_under_their_type_line() -> None:
    text = (
        "# HELP h Latency.\n# TYPE h histogram\n"
        'h_bucket{le="0.5"} 1\nh_bucket{le="+Inf"} 3\nh_count 3\nh_sum 2.5\n'
        "# TYPE c_total counter\nc_total 7\nc_created 1.7e9\n"
    )
    families = promtext.parse(text)
    assert families["h"].type == "histogram"
    assert [s.name for s in families["h"].samples] == ["h_bucket", "h_bucket", "h_count", "h_sum"]
    assert families["h"].samples[1].labels == (("le", "+Inf"),)
    assert families["c_total"].samples == [promtext.Sample("c_total", (), 7.0)]
    assert families["c_created"].type == "untyped"  # no TYPE line of its own


def test_label_values_with_escapes_braces_and_commas() -> None:
    line = r'm{a="x\"y",b="1}2,3",c="back\\slash",d="new\nline"} 4 1700000000000'
    sample = promtext.parse_sample(line)
    assert sample.labels == (("a", 'x"y'), ("b", "1}2,3"), ("c", "back\\slash"), ("d", "new\nline"))
    assert sample.value == 4.0


@pytest.mark.parametrize(
    ("value", "want"), [("NaN", math.nan), ("+Inf", math.inf), ("-Inf", -math.inf), ("1e3", 1e3)]
)
def test_special_values(value: str, want: float) -> None:
    got = promtext.parse_sample(f"m {value}").value
    assert (math.isnan(got) and math.isnan(want)) or got == want


@pytest.mark.parametrize(
    "line",
    ["<html>not metrics</html>", "m 1_000", 'm{a="1" 2', "m{a=1} 2", "m", "1m 2", 'm{a="x} 1'],
)
def test_strict_mode_rejects_what_is_not_the_format(line: str) -> None:
    with pytest.raises(ValueError, match="sample"):
        promtext.parse(f"ok 1\n{line}\n")


def test_lenient_mode_skips_bad_lines_and_keeps_the_rest() -> None:
    text = f'{WAITING} x\n<html>\n{WAITING}{{engine="0"}} 2\n{WAITING}{{engine="1"}} 3\n'
    assert promtext.sample_values(text, {WAITING}) == {WAITING: [2.0, 3.0]}


def test_select_keeps_only_named_blocks_and_parse_reads_only_them() -> None:
    text = (ROOT / "tests" / "data" / "vllm_metrics" / "v0.33_chat-0_t1.txt").read_text()
    families = promtext.parse(text, {TTFT, PROMPT_TOKENS, KV_USAGE})
    assert set(families) == {TTFT, PROMPT_TOKENS, KV_USAGE}
    assert len(families[TTFT].samples) == 23 + 2  # 23 buckets, _count, _sum


def test_crlf_and_blank_lines() -> None:
    text = f"# TYPE {WAITING} gauge\r\n\r\n{WAITING} 5\r\n"
    assert promtext.sample_values(text, {WAITING}) == {WAITING: [5.0]}
