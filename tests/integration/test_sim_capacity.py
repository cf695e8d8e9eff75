"""The simulator under load: real HTTP requests against the real `hxp-vllm-sim` process.

Offered load beyond capacity grows `vllm:num_requests_waiting`, raises `vllm:kv_cache_usage_perc`
and lengthens time to first token; an engine token budget slows decoding as more requests run;
the KV capacity comes from the calculator for the model and GPU the double pretends to be, and
the start-up lines are worded as the imitated vLLM version words them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from hxp.calibration import parse_startup_log
from hxp.resources import FitRequest, GpuMemory, fit
from tests.support.model_configs import LLAMA_31_8B

pytestmark = pytest.mark.slow

PROMPT = " ".join(["word"] * 99)  # + a distinct first word: 100 tokens, no prefix-cache hits
_UNIQUE = itertools.count()


@dataclass
class Sim:
    proc: subprocess.Popen[str]
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def sim(*args: str) -> Iterator[Sim]:
    """`python -m hxp.sim.vllm` on a free port, ready; its stderr lines in `log`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hxp.sim.vllm", "--port", "0", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log: list[str] = []
    ready = threading.Event()
    port: list[int] = []

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line.rstrip())
            if (m := re.search(r"bound 127\.0\.0\.1:(\d+)", line)) is not None:
                port.append(int(m.group(1)))
            if "(ready)" in line:
                ready.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert ready.wait(20), f"the simulator did not start: {log}"
        yield Sim(proc, port[0], log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reader.join(5)


def gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


async def one_request(client: httpx.AsyncClient, max_tokens: int, i: int) -> tuple[float, float]:
    """Streamed completion: (time to first token, end-to-end) as the client sees them."""
    body = {"model": "hxp-sim/fake-model", "prompt": f"w{i} {PROMPT}",
            "max_tokens": max_tokens, "stream": True, "ignore_eos": True}  # fmt: skip
    start = time.monotonic()
    first: float | None = None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: {") and first is None:
                first = time.monotonic() - start
    assert first is not None
    return first, time.monotonic() - start


async def load(url: str, n: int, max_tokens: int, samples: list[str]) -> list[tuple[float, float]]:
    """`n` concurrent requests; /metrics scraped while they run (into `samples`)."""
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        tasks = [
            asyncio.create_task(one_request(client, max_tokens, next(_UNIQUE))) for _ in range(n)
        ]
        await asyncio.sleep(0.3)
        while not all(t.done() for t in tasks):
            samples.append((await client.get("/metrics")).text)
            await asyncio.sleep(0.1)
        return [t.result() for t in tasks]


def test_offered_load_beyond_kv_capacity_queues_fills_the_cache_and_delays_first_tokens() -> None:
    # 64 KV blocks; each request holds 100 prompt + 40 output = 140 tokens, 9 blocks: seven fit.
    args = ("--kv-cache-tokens", "1024", "--latency-ms", "10", "--tokens-per-second", "50",
            "--max-model-len", "512")  # fmt: skip
    with sim(*args) as s:
        light: list[str] = []
        light_times = asyncio.run(load(s.url, 2, 40, light))
        heavy: list[str] = []
        heavy_times = asyncio.run(load(s.url, 21, 40, heavy))
        after = httpx.get(s.url + "/metrics").text
    light_waiting = max(gauge(t, "vllm:num_requests_waiting") for t in light)
    light_usage = max(gauge(t, "vllm:kv_cache_usage_perc") for t in light)
    heavy_waiting = max(gauge(t, "vllm:num_requests_waiting") for t in heavy)
    heavy_usage = max(gauge(t, "vllm:kv_cache_usage_perc") for t in heavy)
    heavy_running = max(gauge(t, "vllm:num_requests_running") for t in heavy)
    assert light_waiting == 0
    assert light_usage == pytest.approx(2 * 9 / 64)
    assert heavy_running == 7, "only seven requests' KV fits at once"
    assert heavy_waiting >= 10, "the rest wait, as in vLLM's scheduler"
    assert heavy_usage == pytest.approx(7 * 9 / 64)
    assert heavy_usage > 0.9
    light_ttft = max(t for t, _ in light_times)
    heavy_ttft = sorted(t for t, _ in heavy_times)
    assert light_ttft < 0.3
    # Three waves of seven: the last wave waits two full requests (2 x 40 / 50 s = 1.6 s).
    assert heavy_ttft[-1] > 1.4 > 5 * light_ttft
    assert gauge(after, "vllm:num_requests_waiting") == 0
    assert gauge(after, "vllm:kv_cache_usage_perc") == 0


def test_max_num_seqs_caps_running_and_the_rest_wait() -> None:
    args = ("--max-concurrency", "3", "--latency-ms", "10", "--tokens-per-second", "50")
    with sim(*args) as s:
        samples: list[str] = []
        asyncio.run(load(s.url, 9, 30, samples))
    assert max(gauge(t, "vllm:num_requests_running") for t in samples) == 3
    assert max(gauge(t, "vllm:num_requests_waiting") for t in samples) >= 5


def test_engine_token_budget_slows_each_request_as_more_run() -> None:
    args = ("--engine-tokens-per-second", "200", "--tokens-per-second", "100",
            "--latency-ms", "5")  # fmt: skip
    with sim(*args) as s:
        alone = asyncio.run(load(s.url, 1, 40, []))[0][1]
        together = asyncio.run(load(s.url, 8, 40, []))
    # Alone: 100 prompt tokens / 200 tok/s of prefill, then 10 ms per token (its own rate).
    # Eight at once share the 200 tok/s: 8 x 100 / 200 = 4 s of prefill (the first token
    # waits for it), then 8 / 200 = 40 ms per token each.
    assert 0.8 < alone < 1.3
    ttft = min(first for first, _ in together)
    slowest = max(e2e for _, e2e in together)
    assert 3.8 < ttft < 4.6
    assert 5.2 < slowest < 6.5


def _llama_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_31_8B))
    return path


def test_kv_capacity_comes_from_the_calculator_and_is_logged_as_the_version_does(
    tmp_path: Path,
) -> None:
    config = _llama_config(tmp_path)
    expected = fit(
        FitRequest(
            config=LLAMA_31_8B,
            gpus=(GpuMemory(80.0, None, "NVIDIA H100 80GB HBM3"),),
            max_model_len=8192,
            gpu_memory_utilization=0.9,
            tensor_parallel_size=1,
            vllm_version="0.19.1",
        )
    )
    common = ("--model-config", str(config), "--gpu-memory-gib", "80", "--gpu-name",
              "NVIDIA H100 80GB HBM3", "--max-model-len", "8192")  # fmt: skip
    with sim(*common, "--version", "0.19.1") as old:
        kv = [line for line in old.log if "KV cache" in line or "concurrency" in line]
    assert any(
        line.endswith(f"GPU KV cache size: {expected.kv_cache_tokens:,} tokens") for line in kv
    )
    assert any("Maximum concurrency for 8,192 tokens per request" in line for line in kv)
    measured = parse_startup_log(old.log)
    assert measured is not None
    assert measured.kv_cache_tokens == expected.kv_cache_tokens
    assert measured.available_kv_gib == pytest.approx(expected.available_kv_gib_per_gpu, abs=0.006)
    with sim(*common, "--version", "0.33.0", "--kv-skew", "0.9") as new:
        (line,) = [x for x in new.log if "KV cache size" in x]
        assert ", Maximum concurrency for 8,192 tokens per request: " in line  # one line
        skewed = parse_startup_log(new.log)
    assert skewed is not None
    assert skewed.kv_cache_tokens is not None
    assert skewed.kv_cache_tokens < 0.92 * expected.kv_cache_tokens
    pinned = 20 * (1 << 30)
    with sim(*common, "--version", "0.33.0", "--kv-cache-memory-bytes", str(pinned)) as fixed:
        assert any("as specified by kv_cache_memory_bytes" in x for x in fixed.log)
        got = parse_startup_log(fixed.log)
    assert got is not None
    assert got.available_kv_gib == pytest.approx(20.0)
    assert (
        got.kv_cache_tokens == 20 * (1 << 30) // (128 * 1024 * 16) * 16
    )  # Llama-3.1-8B: 128 KiB/token


def test_a_config_that_does_not_fit_is_refused_naming_the_flag(tmp_path: Path) -> None:
    config = _llama_config(tmp_path)
    for args, flag in (
        (("--model-config", str(config), "--gpu-memory-gib", "16"), "--model-config"),
        (("--model-config", str(tmp_path / "missing.json")), "--model-config"),
        (("--kv-skew", "0"), "--kv-skew"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "hxp.sim.vllm", "--port", "0", *args],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert flag in proc.stderr
        assert "Traceback" not in proc.stderr
