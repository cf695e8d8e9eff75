"""The real vLLM startup logs under tests/data/vllm_logs, as FitRequests and scored predictions.

Shared by tests/unit/test_resources.py and bench/calculator.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hxp.resources import FitRequest, FitResult, GpuMemory, fit

CASES_DIR = Path(__file__).resolve().parents[1] / "data" / "vllm_logs"
FAILED = {"kv_too_small", "no_kv_memory", "oom"}


def load_cases() -> list[dict[str, Any]]:
    """Every case file, sorted by name."""
    cases = []
    for path in sorted(CASES_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert data["case"] == path.stem, f"{path.name}: case must match the file name"
        cases.append(data)
    return cases


def to_request(case: dict[str, Any]) -> FitRequest:
    """The FitRequest a case's flags describe."""
    r = case["request"]
    gpu = GpuMemory(float(r["gpu_memory_gib"]), name=r.get("gpu_name"))
    gpus = (gpu,) * int(r["gpus"])
    return FitRequest(
        config=case["config"],
        gpus=gpus,
        max_model_len=r.get("max_model_len"),
        gpu_memory_utilization=float(r["gpu_memory_utilization"]),
        tensor_parallel_size=r.get("tensor_parallel_size", "auto"),
        pipeline_parallel_size=int(r.get("pipeline_parallel_size", 1)),
        dtype=str(r.get("dtype", "auto")),
        quantization=r.get("quantization"),
        kv_cache_dtype=str(r.get("kv_cache_dtype", "auto")),
        max_num_seqs=r.get("max_num_seqs"),
        max_num_batched_tokens=r.get("max_num_batched_tokens"),
        vllm_version=str(case["vllm_version"]),
        enforce_eager=bool(r.get("enforce_eager", False)),
        engine=r.get("engine", "auto"),
        usage_context=r.get("usage_context", "api_server"),
        performance_mode=r.get("performance_mode", "balanced"),
        enable_chunked_prefill=r.get("enable_chunked_prefill"),
    )


def _err(predicted: float, logged: float | None) -> float | None:
    if logged is None or logged == 0:
        return None
    return (predicted - logged) / logged


@dataclass(frozen=True)
class Scored:
    """One case's prediction against its log."""

    case: dict[str, Any]
    result: FitResult
    weights_err: float | None
    available_err: float | None
    tokens_err: float | None
    concurrency_err: float | None
    verdict_ok: bool

    @property
    def outcome(self) -> str:
        return str(self.case["logged"]["outcome"])

    @property
    def known_miss(self) -> str | None:
        return self.case.get("known_miss")


def score(case: dict[str, Any]) -> Scored:
    """Run the calculator on a case and compare with what vLLM logged."""
    result = fit(to_request(case))
    logged = case["logged"]
    started = logged["outcome"] == "started"
    return Scored(
        case=case,
        result=result,
        weights_err=_err(result.weights_gib_per_gpu, logged.get("weights_gib")),
        available_err=_err(result.available_kv_gib_per_gpu, logged.get("available_kv_gib")),
        tokens_err=_err(result.kv_cache_tokens, logged.get("kv_cache_tokens")),
        concurrency_err=_err(result.max_concurrency, logged.get("max_concurrency")),
        verdict_ok=result.fits == started,
    )
