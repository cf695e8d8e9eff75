"""The PromQL metric-name extractor: table-driven, with the cases the rules and dashboards use."""

from __future__ import annotations

import re

import pytest

from hxp.errors import PromQLSyntaxError
from hxp.promql import metric_names

CASES = [
    ("plain", "up", {"up"}),
    ("comparison", "up == 0", {"up"}),
    (
        "selector",
        'vllm:num_requests_waiting{stack="a", unit=~"x|y"} > 10',
        {"vllm:num_requests_waiting"},
    ),
    (
        "rate in aggregation",
        'sum by (stack, unit) (rate(vllm:request_success_total{stack="d"}[5m]))',
        {"vllm:request_success_total"},
    ),
    ("aggregation modifier after", "max(x) by (host) == 0", {"x"}),
    (
        "quantile over buckets",
        "histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m])))",
        {"a_bucket"},
    ),
    (
        "grafana variable",
        "sum(rate(a_total[$__rate_interval])) / sum(rate(b_total[${interval}]))",
        {"a_total", "b_total"},
    ),
    ("absent with and on", 'absent(m{job="j"}) and on () (max(up{job="j"}) == 1)', {"m", "up"}),
    ("group_left", "a * on (instance) group_left (model) b", {"a", "b"}),
    ("unless offset", "x unless x offset 5m", {"x"}),
    ("name matcher", '{__name__="foo", a="b"}', {"foo"}),
    ("name regex matcher is not a name", '{__name__=~"foo.*"}', set()),
    ("strings are not names", 'label_replace(up, "dst", "$1", "instance", "(.*):.*")', {"up"}),
    ("label value looks like a metric", 'up{job="rate"}', {"up"}),
    ("bool and numbers", "a > bool 1e3 + Inf - NaN", {"a"}),
    ("count_values", 'count_values("version", build_info)', {"build_info"}),
    ("subquery", "max_over_time(rate(a_total[1m])[10m:1m])", {"a_total"}),
    ("at modifier", "x @ start()", {"x"}),
    (
        "recording rule name",
        "unit:vllm_time_to_first_token_seconds:p95 > 2",
        {"unit:vllm_time_to_first_token_seconds:p95"},
    ),
    ("keyword-named aggregation without parens", "topk(3, sum without (instance) (a))", {"a"}),
    ("comment", "a # b\n+ c", {"a", "c"}),
]


@pytest.mark.parametrize(
    ("expr", "names"), [(e, n) for _, e, n in CASES], ids=[c[0] for c in CASES]
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


BAD = [
    ("unclosed paren", "sum(rate(a[5m])", "unclosed '('"),
    ("extra paren", "a)", "unmatched ')'"),
    ("unknown function", "ratez(a[5m])", "unknown function 'ratez'"),
    ("unterminated string", 'a{b="c}', "unterminated string"),
    ("unclosed range", "rate(a[5m)", "unclosed '['"),
    ("empty", "  ", "empty expression"),
    ("stray character", "a ; b", "unexpected ';'"),
]


@pytest.mark.parametrize(("expr", "message"), [(e, m) for _, e, m in BAD], ids=[b[0] for b in BAD])
def test_broken_expressions_are_errors(expr: str, message: str) -> None:
    with pytest.raises(PromQLSyntaxError, match=re.escape(message)):
        metric_names(expr)
