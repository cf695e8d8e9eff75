"""The vLLM expositions under hxp/data/metrics that the query lint checks monitoring against:
one per vLLM release hxp renders monitoring for in its tests (0.10.1, 0.11.0, 0.16.0, 0.34.0).

Each is the `vllm:*` part of the page hxp-vllm-sim serves while imitating that release, after a
chat and a completion request, with every histogram cut to its first and `+Inf` buckets. The
simulator registers its families from hxp.metric_names, whose per-release table was read from
vllm/v1/metrics/loggers.py, perf.py and renderers/metrics.py of the PyPI wheels; the release's
own names (vllm:time_per_output_token_seconds at 0.10.1, the gpu_* twins) are there.

Regenerate: .venv/bin/python -m tests.support.metric_fixtures hxp/data/metrics
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hxp.querylint import VLLM_FIXTURE
from hxp.sim.vllm import FinishedStats, SimMetrics

VERSIONS = ("0.10.1", "0.11.0", "0.16.0", "0.34.0")
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
_CREATED = re.compile(r"_created\{[^}]*\} [0-9.e+]+$")


def render_fixture(version: str) -> str:
    metrics = SimMetrics(MODEL, 8192, version, cache_info={"block_size": "16"})
    for request_type, prompt, generated in (("chat", 42, 17), ("completion", 9, 16)):
        metrics.rendered(request_type, 0.0004)
        metrics.prompt_tokens.inc(prompt)
        metrics.h_ttft.observe(0.031)
        for _ in range(generated - 1):
            metrics.h_itl.observe(0.012)
        metrics.generation_tokens.inc(generated)  # the engine counts each token as it runs
        metrics.finished(
            FinishedStats("stop", 0.3, 0.001, 0.03, 0.27, 0.3, prompt, 0, generated, 0, 64)
        )
    metrics.kv_usage.set(0.0412)
    body, _ = metrics.render("text/plain; version=0.0.4")
    lines = [
        f"# vLLM {version} /metrics as hxp-vllm-sim imitates it (after a chat and a completion"
        " request), vllm:* families only,",
        "# histograms cut to their first and +Inf buckets. Families from hxp.metric_names (read"
        " from the vLLM wheel); regenerate:",
        "# .venv/bin/python -m tests.support.metric_fixtures hxp/data/metrics",
    ]
    seen_bucket: set[str] = set()
    for line in body.decode().splitlines():
        name = line.split(" ")[2] if line.startswith("# ") else line.split("{")[0].split(" ")[0]
        if not name.startswith("vllm:"):
            continue
        if _CREATED.search(line):
            line = re.sub(r" [0-9.e+]+$", " 1.7672256e+09", line)
        if "_bucket{" in line and 'le="+Inf"' not in line:
            series = name + re.sub(r'le="[^"]*",?', "", line.split("{", 1)[1].split("}")[0])
            if series in seen_bucket:
                continue
            seen_bucket.add(series)
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_fixtures(directory: Path) -> list[Path]:
    out = []
    for version in VERSIONS:
        path = directory / VLLM_FIXTURE.format(version=version)
        path.write_text(render_fixture(version))
        out.append(path)
    return out


if __name__ == "__main__":
    for written in write_fixtures(Path(sys.argv[1])):
        print(written, written.stat().st_size, "bytes")
