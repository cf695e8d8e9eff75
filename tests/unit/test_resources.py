"""The resource calculator: hand-checkable formulas, real vLLM startup logs, and `hxp fit`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from hxp.errors import InputError
from hxp.resources import (
    GIB,
    FitRequest,
    GpuMemory,
    ModelConfigError,
    UnsupportedModelError,
    blocks_per_request,
    capture_sizes,
    engine_profile,
    fit,
    kv_bytes_per_token,
    kv_heads_per_gpu,
    kv_layout,
    misfit_message,
    model_shape,
    valid_tensor_parallel_sizes,
    weight_bytes,
)
from hxp_cli import main
from tests.support.model_configs import LLAMA_31_8B
from tests.support.vllm_log_cases import load_cases, score, to_request

LLAMA_31_70B: dict[str, Any] = {
    **LLAMA_31_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
DEEPSEEK_V3: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 129280,
    "max_position_embeddings": 163840,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
}
H100 = GpuMemory(79.19)


def request(config: dict[str, Any], gpus: int = 1, gib: float = 79.19, **kw: Any) -> FitRequest:
    kw.setdefault("vllm_version", "0.19.0")
    kw.setdefault("max_model_len", 8192)
    return FitRequest(config=config, gpus=(GpuMemory(gib),) * gpus, **kw)


# --- KV cache per token ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tp", "expected"),
    [
        pytest.param(1, 131072, id="tp1-8-kv-heads"),
        pytest.param(2, 65536, id="tp2-halves"),
        pytest.param(8, 16384, id="tp8-one-head-each"),
        pytest.param(16, 16384, id="tp16-replicates-heads"),
    ],
)
def test_llama_31_8b_kv_bytes_per_token(tp: int, expected: int) -> None:
    # 2 (K,V) x 32 layers x 8 KV heads x 128 x 2 B = 131072 at TP=1.
    assert kv_bytes_per_token(model_shape(LLAMA_31_8B), tp) == expected


def test_kv_heads_are_replicated_when_tp_exceeds_them() -> None:
    shape = model_shape(LLAMA_31_8B)
    assert [kv_heads_per_gpu(shape, tp) for tp in (1, 2, 4, 8, 16, 32)] == [8, 4, 2, 1, 1, 1]


def test_fp8_kv_cache_halves_the_bytes() -> None:
    shape = model_shape(LLAMA_31_8B)
    assert kv_bytes_per_token(shape, 1, "fp8") == 65536
    assert kv_bytes_per_token(shape, 1, "fp8_e5m2") == 65536


def test_head_dim_falls_back_to_hidden_over_heads() -> None:
    assert model_shape(LLAMA_31_8B).head_dim == 128
    assert model_shape({**LLAMA_31_8B, "head_dim": 64}).head_dim == 64


@pytest.mark.parametrize("tp", [1, 8, 16])
def test_mla_caches_one_latent_per_layer_not_split_by_tp(tp: int) -> None:
    # DeepSeek-V3: (kv_lora_rank 512 + qk_rope_head_dim 64) x 2 B x 61 layers.
    shape = model_shape(DEEPSEEK_V3)
    assert kv_bytes_per_token(shape, tp) == 61 * 576 * 2 == 70272
    assert kv_bytes_per_token(shape, tp, "fp8") == 35136


def test_deepseek_v3_weights_per_gpu_at_tp8() -> None:
    # 671B parameters (without the MTP layer) in fp8 with 128x128 block scales: ~80 GiB per GPU.
    w = weight_bytes(model_shape(DEEPSEEK_V3), tp=8)
    assert 76 < w.gib < 82


def test_multimodal_text_config_is_read() -> None:
    case = next(c for c in load_cases() if c["case"] == "llmd_v019_gemma3_27b_h100_tp1")
    shape = model_shape(case["config"])
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (62, 16, 128)
    assert shape.layer_kinds.count("sliding") == 52
    assert shape.layer_kinds.count("full") == 10
    assert shape.vision is not None
    assert shape.tie_embeddings


def test_gemma3_hybrid_groups_match_vllm() -> None:
    # vLLM logs "Add 8 padding layers" for gemma-3-27b: 1 full group + 6 sliding groups of 10.
    case = next(c for c in load_cases() if c["case"] == "llmd_v019_gemma3_27b_h100_tp1")
    shape = model_shape(case["config"])
    layout = kv_layout(shape.layer_kinds, hybrid=True)
    assert (layout.group_size, len(layout.groups), layout.padding_layers) == (10, 7, 8)
    # One 8192-token request: 512 full blocks + 6 sliding groups x (1024 - 1 + 8192 capped)/16+1.
    assert blocks_per_request(layout, 8192, 16, shape.sliding_window, 8192) == 512 + 6 * 513


def test_sliding_window_capped_below_max_model_len() -> None:
    layout = kv_layout(("sliding", "full"), hybrid=True)
    assert blocks_per_request(layout, 131072, 16, 1024, 2048) == 8192 + (3071 // 16 + 1) + 1


# --- weights ---------------------------------------------------------------------------------


def test_llama_31_8b_weights() -> None:
    # 8.03B parameters x 2 B plus the rotary cache = the 14.99 GiB vLLM logs.
    shape = model_shape(LLAMA_31_8B)
    assert weight_bytes(shape, 1).gib == pytest.approx(14.99, abs=0.01)
    assert weight_bytes(shape, 2).gib == pytest.approx(7.51, abs=0.03)


@pytest.mark.parametrize(
    ("quant", "bytes_per_param"),
    [
        pytest.param({"quant_method": "awq", "bits": 4, "group_size": 128}, 0.5 + 2.5 / 128),
        pytest.param({"quant_method": "gptq", "bits": 8, "group_size": 128}, 1 + 3 / 128),
        pytest.param({"quant_method": "fp8"}, 1.0),
        pytest.param({"quant_method": "fp8", "weight_block_size": [128, 128]}, 1 + 4 / 16384),
        pytest.param(
            {"quant_method": "bitsandbytes", "load_in_4bit": True}, 0.5 + 4 / 64, id="bnb4"
        ),
    ],
)
def test_quantized_linear_bytes(quant: dict[str, Any], bytes_per_param: float) -> None:
    shape = model_shape({**LLAMA_31_8B, "quantization_config": quant})
    assert shape.quant.bytes_per_param == pytest.approx(bytes_per_param)
    # Embeddings and lm_head stay in 16 bits: 2 x 128256 x 4096 x 2 B = 1.96 GiB.
    assert weight_bytes(shape, 1).gib > 1.96


def test_runtime_fp8_quantization_flag() -> None:
    # llm-d v0.19 log: Llama-3.1-8B with --quantization fp8 loads 8.49 GiB.
    shape = model_shape(LLAMA_31_8B, quantization="fp8")
    assert weight_bytes(shape, 1).gib == pytest.approx(8.49, rel=0.03)


# --- tensor parallelism and max_model_len ----------------------------------------------------


def test_valid_tensor_parallel_sizes_divide_the_heads() -> None:
    shape = model_shape({**LLAMA_31_8B, "num_attention_heads": 40, "head_dim": 128})
    assert valid_tensor_parallel_sizes(shape, 16) == [1, 2, 4, 8]
    assert valid_tensor_parallel_sizes(model_shape(LLAMA_31_8B), 16) == [1, 2, 4, 8, 16]


@pytest.mark.parametrize(("max_len", "tp"), [(8192, 2), (65536, 4)])
def test_auto_picks_the_smallest_tp_that_fits(max_len: int, tp: int) -> None:
    result = fit(request(LLAMA_31_70B, gpus=8, max_model_len=max_len))
    assert result.fits
    assert result.tensor_parallel_size == tp
    assert "needs 131.4 GiB for weights at TP=1" in result.explain()


def test_misfit_says_what_is_needed_and_what_would_fit() -> None:
    req = request(LLAMA_31_70B, gpus=4, gib=80.0, tensor_parallel_size=1)
    result = fit(req)
    assert not result.fits
    message = misfit_message(result, req)
    assert message.startswith("needs 131.4 GiB for weights at TP=1; largest GPU offers 72.0 GiB")
    assert "; TP=2 fits with" in message
    assert message.endswith("KV tokens")


def test_largest_max_model_len_is_the_kv_capacity() -> None:
    result = fit(request(LLAMA_31_8B, gib=24.0, max_model_len=131072, tensor_parallel_size=1))
    assert not result.fits
    assert result.max_model_len_that_fits == result.num_gpu_blocks * 16
    assert fit(request(LLAMA_31_8B, gib=24.0, max_model_len=result.max_model_len_that_fits)).fits
    bigger = result.max_model_len_that_fits + 1
    assert not fit(request(LLAMA_31_8B, gib=24.0, max_model_len=bigger)).fits


def test_cudagraph_reserve_is_in_the_budget_from_0_21_unless_eager() -> None:
    old = fit(request(LLAMA_31_8B, vllm_version="0.19.0"))
    new = fit(request(LLAMA_31_8B, vllm_version="0.21.0"))
    eager = fit(request(LLAMA_31_8B, vllm_version="0.21.0", enforce_eager=True))
    graphs = new.stages[0].reserve.cudagraph_gib
    assert graphs > 0.2
    assert new.available_kv_gib_per_gpu == pytest.approx(old.available_kv_gib_per_gpu - graphs)
    assert eager.available_kv_gib_per_gpu == pytest.approx(old.available_kv_gib_per_gpu)


def test_little_memory_outside_the_budget_is_a_misfit() -> None:
    result = fit(request(LLAMA_31_8B, gib=24.0, gpu_memory_utilization=0.99, max_model_len=4096))
    assert not result.fits
    assert "outside gpu_memory_utilization" in result.reasons[0]


def test_free_memory_below_the_request_is_a_misfit() -> None:
    req = FitRequest(
        config=LLAMA_31_8B, gpus=(GpuMemory(79.19, free_gib=60.0),), vllm_version="0.19.0"
    )
    assert any("vLLM refuses to start" in r for r in fit(req).reasons)


def test_explain_shows_the_arithmetic() -> None:
    text = fit(request(LLAMA_31_8B)).explain()
    assert "2 (K,V) x 8 KV heads x 128 x 2 B = 4,096 B/layer x 32 layers = 131,072 B" in text
    assert "79.19 GiB x 0.90 = 71.27 GiB" in text


# --- errors name the field -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error", "field"),
    [
        pytest.param(
            {k: v for k, v in LLAMA_31_8B.items() if k != "num_hidden_layers"},
            ModelConfigError,
            "num_hidden_layers",
            id="missing-layers",
        ),
        pytest.param({**LLAMA_31_8B, "hidden_size": "4096"}, ModelConfigError, "hidden_size"),
        pytest.param(
            {"model_type": "gemma3", "text_config": {"num_hidden_layers": 2}},
            ModelConfigError,
            "text_config.hidden_size",
            id="nested-missing",
        ),
        pytest.param(
            {**LLAMA_31_8B, "quantization_config": {"quant_method": "mxfp4"}},
            UnsupportedModelError,
            "quantization_config.quant_method",
            id="mxfp4",
        ),
        pytest.param(
            {**LLAMA_31_8B, "num_hidden_layers": 2, "layer_types": ["linear_attention"] * 2},
            UnsupportedModelError,
            "layer_types",
            id="linear-attention",
        ),
        pytest.param(
            {**LLAMA_31_8B, "attention_chunk_size": 8192},
            UnsupportedModelError,
            "attention_chunk_size",
            id="llama4-chunked",
        ),
        pytest.param(
            {**LLAMA_31_8B, "num_key_value_heads": 5},
            ModelConfigError,
            "num_key_value_heads",
            id="kv-heads-do-not-divide",
        ),
    ],
)
def test_config_errors_name_the_field(
    config: dict[str, Any], error: type[InputError], field: str
) -> None:
    with pytest.raises(error, match=field.replace(".", r"\.")):
        fit(request(config))


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"vllm_version": "latest"}, "vllm_version"),
        ({"tensor_parallel_size": 3}, "tensor_parallel_size"),
        ({"tensor_parallel_size": 4}, "tensor_parallel_size"),  # more than the one GPU
        ({"kv_cache_dtype": "int4"}, "kv_cache_dtype"),
        ({"dtype": "fp6"}, "dtype"),
        ({"vllm_version": "0.12.0", "engine": "v0"}, "engine"),
    ],
)
def test_request_errors_name_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError, match=field):
        fit(request(LLAMA_31_8B, **kw))


# --- real vLLM startup logs (tests/data/vllm_logs) -------------------------------------------


def _case_params() -> list[Any]:
    params = []
    for case in load_cases():
        marks = []
        if case.get("known_miss"):
            marks.append(pytest.mark.xfail(reason=case["known_miss"], strict=True))
        params.append(pytest.param(case, id=case["case"], marks=marks))
    return params


@pytest.mark.parametrize("case", _case_params())
def test_real_vllm_log(case: dict[str, Any]) -> None:
    s = score(case)
    if s.tokens_err is not None:
        assert abs(s.tokens_err) <= 0.10, f"KV tokens off by {s.tokens_err:+.1%}"
    if s.weights_err is not None:
        assert abs(s.weights_err) <= 0.03, f"weights off by {s.weights_err:+.1%}"
    assert s.verdict_ok, f"predicted fits={s.result.fits}, vLLM: {s.outcome}: {s.result.reasons}"


def test_enough_real_cases_and_an_oom_among_them() -> None:
    cases = load_cases()
    assert len(cases) >= 10
    assert any(c["logged"]["outcome"] == "oom" for c in cases)
    assert all(c["source"]["url"].startswith("https://github.com/") for c in cases)


# --- hxp fit ---------------------------------------------------------------------------------


@pytest.fixture
def llama_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_31_8B))
    return path


def _fit_argv(config: Path, *extra: str, gib: str = "79.19") -> list[str]:
    return [
        "fit", "--config", str(config), "--gpus", "1", "--gpu-memory-gib", gib,
        "--gpu-memory-utilization", "0.9", "--max-model-len", "8192", "--vllm-version", "0.19.0",
        *extra,
    ]  # fmt: skip


def test_cli_fit_exit_codes(llama_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_fit_argv(llama_config)) == 0
    assert "fits at TP=1 with" in capsys.readouterr().out
    assert main(_fit_argv(llama_config, gib="12")) == 1
    assert "needs 15.0 GiB for weights at TP=1" in capsys.readouterr().out
    assert main(_fit_argv(llama_config.with_name("missing.json"))) == 2
    assert main(_fit_argv(llama_config, "--kv-cache-dtype", "int3")) == 2
    with pytest.raises(SystemExit) as exc:
        main(_fit_argv(llama_config, "--tensor-parallel-size", "two"))
    assert exc.value.code == 2


def test_cli_fit_json(llama_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_fit_argv(llama_config, "--json", "--kv-cache-dtype", "fp8")) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "fits", "tensor_parallel_size", "weights_gib_per_gpu", "kv_bytes_per_token_per_gpu",
        "reserve_gib_per_gpu", "available_kv_gib_per_gpu", "kv_cache_tokens", "max_concurrency",
        "max_model_len_that_fits", "explain",
    ):  # fmt: skip
        assert key in out
    assert out["kv_bytes_per_token_per_gpu"] == 65536
    assert out["kv_cache_tokens"] * 65536 <= out["available_kv_gib_per_gpu"] * GIB


def test_cli_rejects_a_config_that_is_not_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(_fit_argv(bad)) == 2
    assert "not a JSON config.json" in capsys.readouterr().err


def test_float32_dtype_doubles_weights_and_kv() -> None:
    # llm-d v0.19 log: Llama-3.1-8B with --dtype float32 loads 29.98 GiB.
    shape = model_shape(LLAMA_31_8B, dtype="float32")
    assert weight_bytes(shape, 1).gib == pytest.approx(29.98, rel=0.01)
    assert kv_bytes_per_token(shape, 1) == 2 * 131072


# --- CUDA graphs captured outside the budget (vLLM < 0.20.0) ----------------------------------


def _qwen3_moe_on_a10s(**kw: Any) -> FitRequest:
    case = next(c for c in load_cases() if c["case"] == "i17469_qwen3_30b_a3b_4xa10_v085")
    return dataclasses.replace(to_request(case), **kw)


def test_capture_sizes_follow_the_version() -> None:
    def sizes(version: str, seqs: int, engine: Any = "auto") -> list[int]:
        req = request(LLAMA_31_8B, vllm_version=version, max_num_seqs=seqs, engine=engine)
        return capture_sizes(engine_profile(req, model_shape(LLAMA_31_8B), 8192))

    # 0.8/0.9 V1 capture 67 sizes whatever max_num_seqs is (vllm#17469: "even max-num-seqs 1")
    assert sizes("0.8.5", 1) == [1, 2, 4, *range(8, 513, 8)]
    assert len(sizes("0.9.2", 256)) == 67
    assert sizes("0.10.1", 16) == [1, 2, 4, 8, 16, 24, 32]
    assert sizes("0.11.0", 256)[-3:] == [480, 496, 512]
    assert sizes("0.7.3", 64, engine="v0") == [1, 2, 4, *range(8, 65, 8)]


def test_nccl_all_reduces_in_graphs_make_tp4_over_pcie_a_misfit() -> None:
    over_pcie = fit(_qwen3_moe_on_a10s())
    assert not over_pcie.fits
    (reason,) = over_pcie.reasons
    assert "CUDA graphs" in reason
    assert "enforce_eager" in reason
    assert "NCCL all-reduces over PCIe" in over_pcie.explain()
    # The same GPUs with NVLink use vLLM's custom all-reduce: the graphs stay small.
    nvlink = fit(_qwen3_moe_on_a10s(nvlink=True))
    assert nvlink.stages[0].reserve.cudagraph_gib < 1.0 < over_pcie.stages[0].reserve.cudagraph_gib
    assert nvlink.fits
    # The reporter's workaround: eager mode starts (and the KV cache is the same size).
    eager = fit(_qwen3_moe_on_a10s(enforce_eager=True))
    assert eager.fits
    assert eager.kv_cache_tokens == over_pcie.kv_cache_tokens


def test_graphs_counted_in_the_budget_from_0_20_0_shrink_the_kv_cache() -> None:
    # vllm/envs.py: VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS defaults to "0" in 0.19.1 and to
    # "1" from 0.20.0 (this test said 0.20.0/0.21.0 before the wheels were checked).
    old = fit(_qwen3_moe_on_a10s(vllm_version="0.19.1"))
    new = fit(_qwen3_moe_on_a10s(vllm_version="0.20.0"))
    assert new.stages[0].reserve.cudagraph_in_budget
    assert not old.stages[0].reserve.cudagraph_in_budget
    assert new.kv_cache_tokens < old.kv_cache_tokens
