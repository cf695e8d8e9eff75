"""Accuracy of the resource calculator against real vLLM startup logs (tests/data/vllm_logs).

For every case: the calculator's weights, available KV memory, KV-cache tokens and concurrency
against what vLLM logged, and its fits/does-not-fit verdict against what happened. The last line
is `BENCH calculator ratio=<mean |KV-token error| / 10%> target=1.0`: lower is better, and 1.0
means the mean KV-token error is the issue's 10% bar.

Run: .venv/bin/python bench/calculator.py
"""

from __future__ import annotations

import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.vllm_log_cases import FAILED, Scored, load_cases, score  # noqa: E402

KV_BAR = 0.10
WEIGHTS_BAR = 0.03


def pct(err: float | None) -> str:
    return "-" if err is None else f"{err * 100:+.1f}%"


def num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def row(s: Scored) -> str:
    c, r, logged = s.case, s.result, s.case["logged"]
    derived = " (derived)" if logged.get("kv_cache_tokens_derived") else ""
    verdict = "fits" if r.fits else "no fit"
    mark = "ok" if s.verdict_ok else ("known miss" if s.known_miss else "WRONG")
    return (
        f"| {c['case']} | {c['vllm_version']} | {s.outcome} | {verdict} ({mark}) "
        f"| {num(logged.get('weights_gib'), '.2f')} / {r.weights_gib_per_gpu:.2f} "
        f"| {pct(s.weights_err)} "
        f"| {num(logged.get('available_kv_gib'), '.2f')} / {r.available_kv_gib_per_gpu:.2f} "
        f"| {pct(s.available_err)} "
        f"| {num(logged.get('kv_cache_tokens'), ',')}{derived} / {r.kv_cache_tokens:,} "
        f"| {pct(s.tokens_err)} | {pct(s.concurrency_err)} |"
    )


def main() -> None:
    scored = [score(c) for c in load_cases()]
    print(f"# resource calculator vs {len(scored)} real vLLM startup logs")
    print(f"machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}")
    print()
    print(
        "| case | vLLM | outcome | verdict | weights GiB log / pred | err "
        "| avail KV GiB log / pred | err | KV tokens log / pred | err | concurrency err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in scored:
        print(row(s))
    tokens = [abs(s.tokens_err) for s in scored if s.tokens_err is not None]
    weights = [abs(s.weights_err) for s in scored if s.weights_err is not None]
    within = sum(e <= KV_BAR for e in tokens)
    w_within = sum(e <= WEIGHTS_BAR for e in weights)
    failed = [s for s in scored if s.outcome in FAILED]
    wrong_fits = [s for s in failed if s.result.fits]
    wrong_misfits = [s for s in scored if s.outcome == "started" and not s.result.fits]
    mean_kv = statistics.fmean(tokens)
    print()
    print(
        f"KV-cache tokens within ±10%: {within}/{len(tokens)} ({within / len(tokens):.0%}); "
        f"mean |error| {mean_kv:.1%}, median {statistics.median(tokens):.1%}, "
        f"max {max(tokens):.1%}"
    )
    print(
        f"weights within ±3%: {w_within}/{len(weights)}; mean |error| "
        f"{statistics.fmean(weights):.1%}, max {max(weights):.1%}"
    )
    print(
        f"failed starts (kv_too_small / no_kv_memory / oom): {len(failed)}; "
        f"predicted 'fits' for {len(wrong_fits)}: {[s.case['case'] for s in wrong_fits]}"
    )
    print(f"started but predicted 'does not fit': {[s.case['case'] for s in wrong_misfits]}")
    for s in scored:
        if s.known_miss:
            print(f"known miss {s.case['case']}: {s.known_miss}")
    print(f"BENCH calculator ratio={mean_kv / KV_BAR:.2f} target=1.0")


if __name__ == "__main__":
    main()
