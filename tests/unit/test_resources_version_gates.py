"""Every version gate of the resource calculator (hxp.resources.VERSION_GATES), one test each.

Each test names the vLLM file and the releases on both sides of the change, as read in vLLM's
released wheels; the gate table carries the line numbers. A new gate without a test here, or
without a row in docs/benchmarks.md, fails test_every_gate_has_a_test_and_a_doc_row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from hxp.resources import (
    VERSION_GATES,
    EngineProfile,
    FitRequest,
    FitRequestError,
    GpuMemory,
    UnmodelledEngineError,
    engine_profile,
    fit,
    model_shape,
)
from hxp_cli import main
from tests.support.model_configs import LLAMA_31_8B
from tests.support.vllm_log_cases import load_cases

ROOT = Path(__file__).resolve().parents[2]


def profile(
    version: str,
    gib: float = 79.19,
    name: str | None = None,
    config: dict[str, Any] | None = None,
    max_model_len: int = 8192,
    **kw: Any,
) -> EngineProfile:
    cfg = config or LLAMA_31_8B
    req = FitRequest(
        config=cfg,
        gpus=(GpuMemory(gib, name=name),),
        vllm_version=version,
        max_model_len=max_model_len,
        **kw,
    )
    return engine_profile(req, model_shape(cfg), max_model_len)


def batch(version: str, gib: float = 79.19, name: str | None = None, **kw: Any) -> tuple[int, int]:
    p = profile(version, gib, name, **kw)
    return p.profile_tokens, p.max_num_seqs


# --- V0 ---------------------------------------------------------------------------------------


def test_gate_v0_profile_allocated_peak_vllm_worker_py_0_6_3_refused_0_6_4_modelled() -> None:
    # vllm/worker/worker.py @ 0.6.3: peak = init free - free after profile_run (PyTorch's cached
    # pool included); @ 0.6.4: allocated_bytes.all.peak. Only the latter is modelled.
    with pytest.raises(UnmodelledEngineError, match=r"vllm_version: vLLM 0\.6\.3 \(V0 engine\)"):
        fit(FitRequest(config=LLAMA_31_8B, gpus=(GpuMemory(23.58),), vllm_version="0.6.3"))
    assert not profile("0.6.4").v1
    assert fit(
        FitRequest(
            config=LLAMA_31_8B, gpus=(GpuMemory(23.58),), vllm_version="0.6.4", max_model_len=8192
        )
    ).fits
    # An explicit V0 on a V1-era release before 0.11 is modelled; a V0 the calculator cannot
    # model is refused whatever asks for it.
    with pytest.raises(UnmodelledEngineError, match=r"pin vLLM >= 0\.6\.4"):
        profile("0.5.5", engine="v0")


def test_gate_v0_refusal_is_exit_2_from_hxp_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_31_8B))
    argv = [
        "fit", "--config", str(config), "--gpus", "1", "--gpu-memory-gib", "23.58",
        "--gpu-memory-utilization", "0.9", "--max-model-len", "8192", "--vllm-version", "0.6.3",
    ]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "calculator models V0 only from 0.6.4" in captured.err
    assert "Traceback" not in captured.err
    assert "fits" not in captured.out


def _v0_reserve(version: str, gpus: int = 1) -> float:
    req = FitRequest(
        config=LLAMA_31_8B,
        gpus=(GpuMemory(79.22),) * gpus,
        vllm_version=version,
        max_model_len=8192,
        tensor_parallel_size=gpus,
    )
    return fit(req).stages[0].reserve.non_torch_gib


def test_gate_v0_profile_init_baseline_vllm_worker_py_0_6_4_vs_0_6_5() -> None:
    # vllm/worker/worker.py @ 0.6.4: non-torch = GPU used - PyTorch allocated after empty_cache;
    # @ 0.6.5: memory_profiling against the device-init baseline, PyTorch's reserved pool
    # included (vllm#10511 logged 1.79 GiB on one H100, 3.58 GiB per GPU at TP=2).
    assert _v0_reserve("0.6.4") == pytest.approx(0.25)
    assert _v0_reserve("0.6.5") == pytest.approx(1.79)
    assert _v0_reserve("0.6.6", gpus=2) == pytest.approx(3.58)


def test_gate_v0_profile_snapshot_baseline_vllm_worker_py_0_6_6_vs_0_7_0() -> None:
    # vllm/worker/worker.py @ 0.7.0: baseline_snapshot = MemorySnapshot() at device init.
    assert _v0_reserve("0.6.6") == pytest.approx(1.79)
    assert _v0_reserve("0.7.0") == pytest.approx(0.25)


def test_gate_v0_chunked_prefill_2048_vllm_config_py_0_6_4_vs_0_7_0() -> None:
    # vllm/config.py SchedulerConfig: chunked prefill profiles 512 tokens @ 0.6.4, 2048 @ 0.7.0.
    long = {"max_model_len": 65536}
    assert profile("0.6.4", **long).profile_tokens == 512
    assert profile("0.7.0", **long).profile_tokens == 2048
    # Up to 32K there is no chunked prefill: the dummy batch is max(max_model_len, 2048).
    assert profile("0.7.3", max_model_len=20000).profile_tokens == 20000
    assert profile("0.7.3", max_model_len=1024).profile_tokens == 2048


def test_v0_long_context_is_not_chunked_with_sliding_window_or_images() -> None:
    # vllm/engine/arg_utils.py @ 0.6.4 L1004-1013 and @ 0.7.3 L1171-1186: chunked prefill is
    # the default for max_model_len > 32K only without a sliding window and multimodal input.
    sliding = {**LLAMA_31_8B, "model_type": "mistral", "sliding_window": 4096}
    p = profile("0.7.3", config=sliding, max_model_len=65536)
    assert (p.chunked_prefill, p.profile_tokens) == (False, 65536)
    gemma3 = next(c for c in load_cases() if c["case"] == "llmd_v019_gemma3_27b_h100_tp1")
    p = profile("0.7.3", config=gemma3["config"], max_model_len=40000)
    assert (p.chunked_prefill, p.profile_tokens) == (False, 40000)
    # The flag wins either way.
    assert profile("0.7.3", max_model_len=65536, enable_chunked_prefill=False).profile_tokens == (
        65536
    )
    assert profile("0.7.3", max_model_len=8192, enable_chunked_prefill=True).profile_tokens == 2048
    # A 64K dummy batch leaves far less KV cache than the 2048-token chunk would.
    unchunked = fit(
        FitRequest(
            config=sliding,
            gpus=(GpuMemory(79.19),),
            vllm_version="0.7.3",
            max_model_len=65536,
        )
    )
    chunked = fit(
        FitRequest(
            config=sliding,
            gpus=(GpuMemory(79.19),),
            vllm_version="0.7.3",
            max_model_len=65536,
            enable_chunked_prefill=True,
        )
    )
    assert unchunked.stages[0].reserve.activation_gib > 5 * chunked.stages[0].reserve.activation_gib
    assert "(no chunked prefill)" in unchunked.explain()


def test_gate_v1_default_vllm_envs_py_0_7_3_vs_0_8_0() -> None:
    # vllm/envs.py: VLLM_USE_V1 defaults to "0" @ 0.7.3 and to "1" @ 0.8.0.
    assert not profile("0.7.3").v1
    assert profile("0.8.0").v1


def test_gate_v1_falls_back_to_v0_before_ampere_vllm_arg_utils_py_0_7_3_vs_0_8_0() -> None:
    # vllm/engine/arg_utils.py @ 0.8.0 _is_v1_supported_oracle: compute capability < 8.0 ->
    # _raise_or_fallback: the default engine is V0 there, and an explicit V1 is refused.
    for name in (
        "Tesla T4",
        "Tesla V100-SXM2-16GB",
        "NVIDIA GeForce RTX 2080 Ti",
        "Quadro RTX 8000",
    ):
        assert not profile("0.8.0", gib=14.58, name=name).v1, name
    for name in ("NVIDIA L4", "NVIDIA A10G", "NVIDIA RTX 6000 Ada Generation", "NVIDIA RTX A6000"):
        assert profile("0.8.0", gib=22.05, name=name).v1, name
    assert not profile("0.7.3", gib=14.58, name="Tesla T4").v1
    with pytest.raises(FitRequestError, match=r"engine: vLLM 0\.9\.2 runs V1 only on compute"):
        profile("0.9.2", gib=14.58, name="Tesla T4", engine="v1")
    result = fit(
        FitRequest(
            config=LLAMA_31_8B,
            gpus=(GpuMemory(31.73, name="Tesla V100S-PCIE-32GB"),),
            vllm_version="0.9.2",
            max_model_len=8192,
        )
    )
    assert "falls back to the V0 engine on Tesla V100S-PCIE-32GB" in result.warnings[0]
    assert "engine: vLLM 0.9.2 V0; profile run of 8,192 tokens" in result.explain()


def test_gate_hybrid_kv_cache_manager_vllm_config_py_0_9_0_vs_0_9_1() -> None:
    # vllm/config.py @ 0.9.1: disable_hybrid_kv_cache_manager defaults to False, and
    # vllm/v1/core/kv_cache_utils.py groups full and sliding-window layers; 0.9.0 has neither.
    gemma3 = next(c for c in load_cases() if c["case"] == "llmd_v019_gemma3_27b_h100_tp1")
    kw: dict[str, Any] = {
        "config": gemma3["config"],
        "gpus": (GpuMemory(79.19),),
        "max_model_len": 32768,
    }
    old = fit(FitRequest(vllm_version="0.9.0", **kw))
    new = fit(FitRequest(vllm_version="0.9.1", **kw))
    assert len(old.stages[0].layout.groups) == 1
    assert "cached as full attention before vLLM 0.9.1" in old.warnings[-1]
    assert len(new.stages[0].layout.groups) == 7
    assert new.max_concurrency > 2 * old.max_concurrency


def test_gate_v1_on_pre_ampere_vllm_arg_utils_py_0_10_1_1_vs_0_10_2() -> None:
    # @ 0.10.1.1 L1396-1404 the compute-capability check is still there; @ 0.10.2 it is gone.
    assert not profile("0.10.1.1", gib=14.58, name="Tesla T4").v1
    assert profile("0.10.2", gib=14.58, name="Tesla T4").v1
    assert profile("0.10.2", gib=14.58, name="Tesla T4", engine="v1").v1


def test_gate_v0_removed_vllm_worker_0_10_2_vs_0_11_0() -> None:
    # vllm/worker/worker.py exists @ 0.10.2; @ 0.11.0 vllm/worker/ holds only worker_base.py.
    assert not profile("0.10.2", engine="v0").v1
    with pytest.raises(FitRequestError, match=r"engine: vLLM 0\.11\.0 has no V0 engine"):
        profile("0.11.0", engine="v0")


# --- V1 batch defaults (vllm/engine/arg_utils.py get_batch_defaults) --------------------------


def test_gate_v1_max_num_seqs_by_gpu_vllm_arg_utils_py_0_8_3_vs_0_8_4() -> None:
    # @ 0.8.3: default_max_num_seqs = 1024 on every GPU; @ 0.8.4: 1024 on H100/H200, else 256.
    assert batch("0.8.0", gib=22.05) == (2048, 1024)
    assert batch("0.8.3", gib=22.05) == (2048, 1024)
    assert batch("0.8.4", gib=22.05) == (2048, 256)
    # The profile's sampler runs over min(max_num_seqs, max_num_batched_tokens) rows: four
    # times the logits on a 24 GB card in 0.8.0-0.8.3.
    kw: dict[str, Any] = {"config": LLAMA_31_8B, "gpus": (GpuMemory(22.05),), "max_model_len": 8192}
    old = fit(FitRequest(vllm_version="0.8.3", **kw)).stages[0].reserve
    new = fit(FitRequest(vllm_version="0.8.4", **kw)).stages[0].reserve
    assert old.sampler_gib > 3.5 * new.sampler_gib


def test_gate_large_gpu_by_memory_vllm_arg_utils_py_0_8_4_vs_0_8_5() -> None:
    # @ 0.8.4: "h100"/"h200" in the device name -> 8192 API-server tokens and 1024 sequences.
    assert batch("0.8.4") == (2048, 256)
    assert batch("0.8.4", name="NVIDIA H100 80GB HBM3") == (8192, 1024)
    assert batch("0.8.0", name="NVIDIA H100 80GB HBM3") == (8192, 1024)
    # @ 0.8.5: device_memory >= 70 GiB -> 8192 tokens and 1024 sequences, A100s included.
    assert batch("0.8.5") == (8192, 1024)
    assert batch("0.8.5", gib=79.15, name="NVIDIA A100-SXM4-80GB") == (8192, 1024)
    assert batch("0.8.5", gib=44.39) == (2048, 256)


def test_gate_large_gpu_not_a100_vllm_arg_utils_py_0_8_5_vs_0_9_0() -> None:
    # @ 0.9.0: ... and "a100" not in device_name.
    assert batch("0.9.0", gib=79.15, name="NVIDIA A100-SXM4-80GB") == (2048, 256)
    assert batch("0.9.0", gib=79.19, name="NVIDIA H100 80GB HBM3") == (8192, 1024)


def test_gate_gpu_160gib_tier_vllm_arg_utils_py_0_27_1_vs_0_28_0() -> None:
    # @ 0.28.0: device_memory >= 160 GiB -> 16384 tokens for the API server too; absent @ 0.27.1.
    b200 = {"gib": 178.36, "name": "NVIDIA B200"}
    assert batch("0.27.1", **b200) == (8192, 1024)
    assert batch("0.28.0", **b200) == (16384, 1024)
    assert batch("0.28.0", usage_context="llm_class", **b200) == (16384, 1024)
    # An H200 (139.8 GiB) stays in the 70 GiB tier.
    assert batch("0.28.0", gib=139.8, name="NVIDIA H200") == (8192, 1024)


def test_gate_gb10_small_tier_vllm_arg_utils_py_0_32_0_vs_0_33_0() -> None:
    # @ 0.33.0: is_gb10 = is_device_capability((12, 1)) keeps DGX Spark on the small tier.
    spark = {"gib": 119.7, "name": "NVIDIA GB10"}
    assert batch("0.32.0", **spark) == (8192, 1024)
    assert batch("0.33.0", **spark) == (2048, 256)


def test_gate_performance_mode_vllm_arg_utils_py_0_16_0_vs_0_17_0() -> None:
    # @ 0.17.0: performance_mode == "throughput" doubles both defaults; no such flag @ 0.16.0.
    with pytest.raises(FitRequestError, match=r"performance_mode: vLLM 0\.16\.0 has no"):
        batch("0.16.0", performance_mode="throughput")
    assert batch("0.17.0", performance_mode="throughput") == (16384, 2048)
    assert batch("0.17.0", gib=23.58, performance_mode="throughput") == (4096, 512)
    assert batch("0.28.0", gib=178.36, performance_mode="throughput") == (32768, 2048)
    assert batch("0.17.0", performance_mode="interactivity") == (8192, 1024)
    # Values the operator set are not doubled.
    p = profile("0.17.0", performance_mode="throughput", max_num_batched_tokens=4096)
    assert (p.profile_tokens, p.max_num_seqs) == (4096, 2048)


# --- CUDA graphs and the logged KV-cache size -------------------------------------------------


def test_gate_full_and_piecewise_cudagraphs_vllm_config_init_py_0_10_2_vs_0_11_0() -> None:
    # vllm/config/__init__.py: PIECEWISE @ 0.10.2, FULL_AND_PIECEWISE @ 0.11.0.
    assert not profile("0.10.2").full_cudagraphs
    assert profile("0.11.0").full_cudagraphs


def test_gate_cudagraph_memory_in_budget_vllm_envs_py_0_19_1_vs_0_20_0() -> None:
    # vllm/envs.py: VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS defaults to "0" @ 0.19.1, "1" @
    # 0.20.0 (vllm/v1/worker/gpu_worker.py then subtracts the estimate from the KV budget).
    assert not profile("0.19.1").cudagraph_in_budget
    assert profile("0.20.0").cudagraph_in_budget
    assert not profile("0.20.0", enforce_eager=True).cudagraph_in_budget
    before = fit(FitRequest(config=LLAMA_31_8B, gpus=(GpuMemory(79.19),), vllm_version="0.19.1"))
    after = fit(FitRequest(config=LLAMA_31_8B, gpus=(GpuMemory(79.19),), vllm_version="0.20.0"))
    graphs = after.stages[0].reserve.cudagraph_gib
    assert after.available_kv_gib_per_gpu == pytest.approx(before.available_kv_gib_per_gpu - graphs)


def test_gate_kv_tokens_from_concurrency_vllm_kv_cache_utils_py_0_20_0_vs_0_20_1() -> None:
    # vllm/v1/core/kv_cache_utils.py _report_kv_cache_config: @ 0.20.0 num_blocks //
    # len(groups) * block; @ 0.20.1 int(max_concurrency * max_model_len), for every layout.
    gemma3 = next(c for c in load_cases() if c["case"] == "llmd_v019_gemma3_27b_h100_tp1")
    kw: dict[str, Any] = {
        "config": gemma3["config"],
        "gpus": (GpuMemory(79.19),),
        "max_model_len": 32768,
    }
    old = fit(FitRequest(vllm_version="0.20.0", **kw))
    new = fit(FitRequest(vllm_version="0.20.1", **kw))
    groups = len(old.stages[0].layout.groups)
    assert groups == 7
    assert old.kv_cache_tokens == old.num_gpu_blocks // groups * 16
    assert new.num_gpu_blocks == old.num_gpu_blocks
    assert new.kv_cache_tokens == int(new.max_concurrency * 32768)
    # At 32K a request needs 2048 full-attention blocks but only 577 per windowed group.
    assert new.kv_cache_tokens > 2 * old.kv_cache_tokens
    # One full-attention group: the same formula, so a length that is not a multiple of the
    # 16-token block logs fewer tokens than num_blocks x 16.
    odd = {"config": LLAMA_31_8B, "gpus": (GpuMemory(79.19),), "max_model_len": 20001}
    old1 = fit(FitRequest(vllm_version="0.20.0", **odd))
    new1 = fit(FitRequest(vllm_version="0.20.1", **odd))
    assert old1.kv_cache_tokens == old1.num_gpu_blocks * 16
    assert new1.kv_cache_tokens == int(new1.num_gpu_blocks / 1251 * 20001)
    assert new1.kv_cache_tokens < new1.num_gpu_blocks * 16


# --- the table itself -------------------------------------------------------------------------


def test_every_gate_has_a_test_and_a_doc_row() -> None:
    names = {g.name for g in VERSION_GATES}
    assert len(names) == len(VERSION_GATES)
    tests = set(re.findall(r"^def test_gate_(\w+?)_vllm_", Path(__file__).read_text(), re.M))
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    for gate in VERSION_GATES:
        since = gate.since_text
        assert gate.name in tests, f"{gate.name}: no test_gate_{gate.name}_vllm_... test"
        assert f"@ {since}" in gate.source, f"{gate.name}: source must cite release {since}"
        assert "vllm/" in gate.source, gate.name
        assert "vllm/" in gate.before, gate.name
        assert f"`{gate.name}`" in doc, f"{gate.name}: no row in docs/benchmarks.md"
        assert gate.source in doc, f"{gate.name}: docs/benchmarks.md must cite {gate.source}"
    # The table is in release order.
    assert [g.since for g in VERSION_GATES] == sorted(g.since for g in VERSION_GATES)
