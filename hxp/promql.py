"""Which metrics a PromQL expression reads: a small, pure tokenizer (no Prometheus needed).

It is not a full PromQL parser (promtool does that, see hxp.io.monitoring); it knows enough of
the grammar to tell a metric name from a function, an aggregation, a keyword, a label name in
`by (...)`, a string, a duration or a Grafana variable, and it rejects what is plainly broken
(unbalanced brackets, an unknown function, an unterminated string).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hxp.errors import PromQLSyntaxError

__all__ = ["AGGREGATIONS", "FUNCTIONS", "PromQLSyntaxError", "metric_names"]

# Prometheus 2.42: promql/parser/functions.go
_FUNCTION_LIST = """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time days_in_month day_of_month day_of_week
    day_of_year deg delta deriv exp floor histogram_count histogram_sum histogram_fraction
    histogram_quantile holt_winters hour idelta increase irate label_join label_replace ln
    log10 log2 last_over_time max_over_time min_over_time minute month pi
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin
    sinh sort sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time
    timestamp vector year
"""
FUNCTIONS = frozenset(_FUNCTION_LIST.split())
AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile"}
)
BINARY_KEYWORDS = frozenset({"and", "or", "unless", "atan2"})
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_NUMBER_WORDS = frozenset({"inf", "nan"})

_IDENT_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_NUMBER_RE = re.compile(
    r"0[xX][0-9a-fA-F]+|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
    r"(?:(?:ms|[smhdwy])(?:[0-9]+(?:ms|[smhdwy]))*)?"
)
_VARIABLE_RE = re.compile(r"\$(?:\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")
_OPERATORS = ("==", "!=", "<=", ">=", "=~", "!~", "+", "-", "*", "/", "%", "^", "<", ">", "@")
_CLOSE = {"(": ")", "[": "]", "{": "}"}


@dataclass(frozen=True)
class _Token:
    kind: str  # ident, number, string, variable, op, open, close, comma, selector
    text: str
    pos: int


def _string_end(expr: str, start: int) -> int:
    quote = expr[start]
    i = start + 1
    while i < len(expr):
        c = expr[i]
        if c == "\\" and quote != "`":
            i += 2
            continue
        if c == quote:
            return i + 1
        if c == "\n" and quote != "`":
            break
        i += 1
    raise PromQLSyntaxError(f"unterminated string starting at offset {start}")


def _unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    body = text[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def _skip_brackets(expr: str, start: int) -> int:
    """From `[` to just past its `]` (a range or subquery: durations, steps, variables)."""
    end = expr.find("]", start)
    if end < 0:
        raise PromQLSyntaxError(f"unclosed '[' at offset {start}")
    return end + 1


def _selector(expr: str, start: int) -> tuple[int, str | None]:
    """From `{` to just past its `}`; returns the `__name__="..."` value when there is one."""
    i = start + 1
    name: str | None = None
    pending_label: str | None = None
    pending_op: str | None = None
    while i < len(expr):
        c = expr[i]
        if c.isspace() or c == ",":
            i += 1
        elif c == "}":
            return i + 1, name
        elif c in "\"'`":
            end = _string_end(expr, i)
            if pending_label == "__name__" and pending_op == "=":
                name = _unquote(expr[i:end])
            pending_label = pending_op = None
            i = end
        elif expr.startswith(("=~", "!~", "!="), i):
            pending_op = expr[i : i + 2]
            i += 2
        elif c == "=":
            pending_op = "="
            i += 1
        elif m := _IDENT_RE.match(expr, i):
            pending_label = m.group()
            i = m.end()
        else:
            raise PromQLSyntaxError(f"unexpected {c!r} in label matchers at offset {i}")
    raise PromQLSyntaxError(f"unclosed '{{' at offset {start}")


def _tokens(expr: str) -> list[_Token]:
    out: list[_Token] = []
    i = 0
    while i < len(expr):
        c = expr[i]
        if c.isspace():
            i += 1
        elif c == "#":
            end = expr.find("\n", i)
            i = len(expr) if end < 0 else end
        elif c in "\"'`":
            end = _string_end(expr, i)
            out.append(_Token("string", expr[i:end], i))
            i = end
        elif c == "[":
            i = _skip_brackets(expr, i)
            out.append(_Token("range", "[]", i))
        elif c == "{":
            end, name = _selector(expr, i)
            out.append(_Token("selector", name or "", i))
            i = end
        elif c in "()":
            out.append(_Token("open" if c == "(" else "close", c, i))
            i += 1
        elif c == ",":
            out.append(_Token("comma", c, i))
            i += 1
        elif c == "$":
            m = _VARIABLE_RE.match(expr, i)
            if m is None:
                raise PromQLSyntaxError(f"unexpected '$' at offset {i}")
            out.append(_Token("variable", m.group(), i))
            i = m.end()
        elif (m := _NUMBER_RE.match(expr, i)) and not (c == "." and not m.group()[1:]):
            out.append(_Token("number", m.group(), i))
            i = m.end()
        elif m := _IDENT_RE.match(expr, i):
            out.append(_Token("ident", m.group(), i))
            i = m.end()
        else:
            op = next((o for o in _OPERATORS if expr.startswith(o, i)), None)
            if op is None:
                raise PromQLSyntaxError(f"unexpected {c!r} at offset {i}")
            out.append(_Token("op", op, i))
            i += len(op)
    return out


def _check_balance(tokens: list[_Token]) -> None:
    depth = 0
    for tok in tokens:
        if tok.kind == "open":
            depth += 1
        elif tok.kind == "close":
            depth -= 1
            if depth < 0:
                raise PromQLSyntaxError(f"unmatched ')' at offset {tok.pos}")
    if depth:
        raise PromQLSyntaxError("unclosed '('")


def metric_names(expr: str) -> set[str]:
    """Every metric name an expression selects (`foo`, `foo{...}`, `{__name__="foo"}`)."""
    tokens = _tokens(expr)
    if not tokens:
        raise PromQLSyntaxError("empty expression")
    _check_balance(tokens)
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.kind == "selector":
            if tok.text:
                names.add(tok.text)
            i += 1
            continue
        if tok.kind != "ident":
            i += 1
            continue
        word = tok.text
        lower = word.lower()
        if lower in GROUPING:
            i += 1
            if i < len(tokens) and tokens[i].kind == "open":  # a list of label names
                while i < len(tokens) and tokens[i].kind != "close":
                    i += 1
                i += 1
            continue
        if lower in BINARY_KEYWORDS or lower in ("bool", "offset") or lower in _NUMBER_WORDS:
            i += 1
            continue
        if word in ("start", "end") and i > 0 and tokens[i - 1].text == "@":
            i += 1
            continue
        if (
            word in AGGREGATIONS
            and nxt is not None
            and (nxt.kind == "open" or nxt.text.lower() in ("by", "without"))
        ):
            i += 1
            continue
        if nxt is not None and nxt.kind == "open":
            if word not in FUNCTIONS:
                raise PromQLSyntaxError(f"unknown function {word!r} at offset {tok.pos}")
            i += 1
            continue
        names.add(word)
        i += 1
    return names
