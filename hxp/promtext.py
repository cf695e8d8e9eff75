"""The Prometheus text exposition format (0.0.4), parsed: the one parser of `/metrics` pages.

Pure, no project imports. Used by the aggregation (hxp.metrics: counters, gauges, histograms
with labels), the health sweep (hxp.health: a few families summed) and the drain wait
(hxp.io.probes), and by the query lint (hxp.querylint: the names a recorded exposition serves).

Cost is most of a scrape (TOOLING.md: prometheus-client's parser takes ~6 ms a 20 KB vLLM page),
so a page is first cut down to the families a reader needs (`select`: one `str.split` on the
`# HELP` lines, no per-line work for the families left out), then each remaining sample line is
read with one regular expression. Labels are parsed only when the line has any.

Grouping follows prometheus-client's text parser: a `# TYPE` line opens a family and names the
samples that belong to it (`_bucket`/`_count`/`_sum` of a histogram, ...); a sample that belongs
to none is a family of its own, `untyped`. Unlike prometheus-client, a family keeps the name of
its TYPE line (a counter's `_total` stays) and values are always floats.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple

Labels = tuple[tuple[str, str], ...]

_LABEL = r'[ \t]*[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*"(?:[^"\\\n]|\\.)*"[ \t]*'
_SAMPLE = re.compile(
    rf"([a-zA-Z_:][a-zA-Z0-9_:]*)"  # name
    rf"(?:[ \t]*\{{((?:{_LABEL},)*(?:{_LABEL})?)\}}[ \t]*|[ \t]+)"  # {labels} or a blank
    r"(\S+)"  # value
    r"(?:[ \t]+\S+)?[ \t]*\Z"  # timestamp (ignored)
)
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")
_UNESCAPED = {"n": "\n", "\\": "\\", '"': '"'}

#: Sample-name suffixes a family of each type owns (prometheus-client's text parser).
_OWNED: dict[str, tuple[str, ...]] = {
    "summary": ("_count", "_sum", ""),
    "histogram": ("_count", "_sum", "_bucket"),
}
_PART_SUFFIXES = ("_bucket", "_count", "_sum")


class Sample(NamedTuple):
    name: str
    labels: Labels  # in page order
    value: float


@dataclass(slots=True)
class MetricFamily:
    """One family: its name (from its TYPE/HELP line, or its only sample's name), type, samples."""

    name: str
    type: str = "untyped"
    samples: list[Sample] = field(default_factory=list)


def select(text: str, names: Collection[str]) -> str:
    """Only the blocks (`# HELP`/`# TYPE` and samples) of the named families of a page.

    A page without HELP lines is cut by sample name instead (slower, still correct): a sample
    is kept when its name, or its name without `_bucket`/`_count`/`_sum`, is one of `names`.
    """
    if not text.startswith("# HELP ") and "\n# HELP " not in text:
        return _select_lines(text, names)
    out: list[str] = []
    blocks = text.split("\n# HELP ")
    first = blocks[0]
    if first.startswith("# HELP "):
        blocks[0] = first[7:]
    else:
        blocks = blocks[1:]
    for block in blocks:
        end = len(block)
        for stop in (" ", "\n"):
            at = block.find(stop, 0, end)
            if at != -1:
                end = at
        if block[:end] in names:
            out.append("# HELP ")
            out.append(block if block.endswith("\n") else block + "\n")
    return "".join(out)


def _select_lines(text: str, names: Collection[str]) -> str:
    keep: list[str] = []
    for line in text.splitlines():
        if line.startswith("# TYPE ") or line.startswith("# HELP "):
            name = line.split(" ", 3)[2] if line.count(" ") >= 2 else ""
        elif line and not line.startswith("#"):
            name = re.split(r"[{\s]", line, maxsplit=1)[0]
            for suffix in _PART_SUFFIXES:
                if name.endswith(suffix) and name[: -len(suffix)] in names:
                    name = name[: -len(suffix)]
        else:
            continue
        if name in names:
            keep.append(line)
    return "\n".join(keep) + ("\n" if keep else "")


def parse_labels(raw: str) -> Labels:
    """`a="1",b="x\\"y"` -> (("a", "1"), ("b", 'x"y')); the text must already be well formed."""
    pairs = _LABEL_PAIR.findall(raw)
    if "\\" in raw:
        return tuple((k, _ESCAPE.sub(_unescape, v) if "\\" in v else v) for k, v in pairs)
    return tuple(pairs)


def _unescape(match: re.Match[str]) -> str:
    char = match.group(1)
    return _UNESCAPED.get(char, "\\" + char)


def parse_sample(line: str) -> Sample:
    """One sample line. Raises ValueError when it is not one."""
    match = _SAMPLE.match(line)
    if match is None:
        raise ValueError(f"not a Prometheus sample line: {line[:120]!r}")
    name, raw, value = match.groups()
    if "_" in value:  # float() would take 1_000; the format does not
        raise ValueError(f"invalid sample value {value!r} in {line[:120]!r}")
    return Sample(name, parse_labels(raw) if raw else (), float(value))


def parse(
    text: str, names: Collection[str] | None = None, *, strict: bool = True
) -> dict[str, MetricFamily]:
    """The families of a page (only `names`, pre-filtered with `select`, when given).

    strict: a line that is not the text format raises ValueError (text that is no exposition
    at all, an HTML error page, fails loudly); otherwise it is skipped, as a reader that only
    sums a few gauges wants.
    """
    if names is not None:
        text = select(text, names)
    out: dict[str, MetricFamily] = {}
    current: MetricFamily | None = None
    owned: tuple[str, ...] = ()
    for line in text.split("\n"):
        if not line or line[0] in " \t\r" or line[-1] in " \t\r":
            line = line.strip()
            if not line:
                continue
        if line[0] == "#":
            parts = line.split(None, 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                continue
            name = parts[2]
            if current is None or current.name != name:
                current = out.get(name) or out.setdefault(name, MetricFamily(name))
                owned = (name,)
            if parts[1] == "TYPE":
                if len(parts) < 4:
                    if strict:
                        raise ValueError(f"TYPE line without a type: {line[:120]!r}")
                    continue
                current.type = parts[3].strip()
                owned = tuple(name + s for s in _OWNED.get(current.type, ("",)))
            continue
        try:
            sample = parse_sample(line)
        except ValueError:
            if strict:
                raise
            continue
        if sample.name in owned:
            assert current is not None
            current.samples.append(sample)
        else:
            current, owned = None, ()
            family = out.get(sample.name) or out.setdefault(sample.name, MetricFamily(sample.name))
            family.samples.append(sample)
    return out


def sample_values(text: str, names: Collection[str]) -> dict[str, list[float]]:
    """Each named family's sample values (samples named as the family: gauges, counters).

    Lenient: lines that do not parse are skipped. For readers that add up or take the highest
    of a few families (the health sweep's saturation, the drain wait).
    """
    out: dict[str, list[float]] = {}
    for name, family in parse(text, names, strict=False).items():
        values = [s.value for s in family.samples if s.name == name]
        if values:
            out[name] = values
    return out
