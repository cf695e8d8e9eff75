"""Will a model fit on these GPUs under vLLM, and how much KV cache will it get?

Pure arithmetic over a Hugging Face ``config.json``; :func:`load_model_config` is the only I/O.
The KV-cache arithmetic follows vLLM's own code (``vllm/v1/kv_cache_interface.py`` page sizes,
``vllm/v1/core/kv_cache_utils.py`` block counts, hybrid groups and concurrency,
``vllm/v1/worker/gpu_worker.py`` ``determine_available_memory``). The activation and overhead
reserve cannot be read from a config: it is an estimate whose constants are calibrated on real
vLLM startup logs (``tests/data/vllm_logs``; errors per case in ``docs/benchmarks.md``).

What vLLM does, and what this module mirrors:

* ``requested = total_memory x gpu_memory_utilization`` per GPU; vLLM refuses to start when the
  free memory is below it.
* ``available_kv = requested - weights - torch_peak_increase - non_torch_increase``, where the
  peak comes from a profile run of ``max_num_batched_tokens`` tokens plus a dummy sampler run
  over ``min(max_num_seqs, max_num_batched_tokens)`` sequences. From vLLM 0.20.0 the estimated
  CUDA-graph memory is subtracted too (``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS``, default on
  from 0.20.0, off in 0.19.1); before that graphs are captured after the KV cache is allocated
  and must fit in the memory left outside ``gpu_memory_utilization``.
* ``num_blocks = available_kv // page_bytes // layers_per_group`` with 16-token pages.

Behaviour that changed between vLLM releases is decided by :data:`VERSION_GATES`, one entry per
change, each citing the file and line of vLLM's released wheels on both sides of the change
(docs/benchmarks.md prints the same table). The V0 engine is modelled from 0.6.4, where its
profile uses PyTorch's allocated peak; older V0 releases are refused
(:class:`UnmodelledEngineError`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from hxp.errors import InputError

GIB = 1 << 30
DEFAULT_BLOCK_SIZE = 16

# Reserve constants (see module docstring). Each is an estimate; docs/benchmarks.md shows how well
# they do on real logs.
#: Bytes per (sequence x vocab) element at the peak of vLLM's dummy sampler run: the logits, their
#: float32 copy and the top-k/top-p work tensors. With PyTorch's sort-based top-k/top-p the
#: peak is about 36 B (V0 logs: vllm#10511 H100 1.26 GiB, vllm#13882 1.42 GiB; V1 0.9.2:
#: the last pipeline stage of vllm#20665 holds 0.8 GiB less than the first). With FlashInfer's
#: sampler (shipped in the 0.8.x images) and in recent V1 (0.19 H100 logs: torch peak 1.89-3.99
#: GiB over 1024 x 128k-262k logits) it is about 15.5 B. vLLM 0.12-0.18 are not measured here.
SAMPLER_BYTES_SORT = 36.0
SAMPLER_BYTES_LEAN = 15.5
#: Non-torch memory that grows during profiling (cuBLAS/attention workspaces), one GPU.
NON_TORCH_GIB_SINGLE = 0.25
#: The same with tensor parallelism over NVLink: NCCL/custom all-reduce and symmetric-memory
#: buffers (about 2.1 GiB per H100 in vLLM 0.19 logs, TP=2 and TP=4).
NON_TORCH_GIB_TP_NVLINK = 2.1
#: The same with tensor parallelism over PCIe, where custom all-reduce is mostly disabled.
NON_TORCH_GIB_TP_PCIE = 0.35
#: V0 0.6.5-0.6.6 counted as non-torch everything the GPU held beyond the baseline taken at
#: device init, the weights and PyTorch's allocated bytes, so PyTorch's reserved-but-free pool
#: and the start-up buffers land here: 1.79 GiB on one H100 and 3.58 GiB per GPU at TP=2 in
#: vllm#10511 (the PR that introduced that accounting). Fitted on that one log; 0.7.0 went back
#: to a snapshot baseline (0.03-0.39 GiB in the 0.7-0.9 logs).
NON_TORCH_GIB_V0_065_SINGLE = 1.79
NON_TORCH_GIB_V0_065_TP = 3.58
#: CUDA context plus what NCCL allocates before vLLM's first memory snapshot: used outside the
#: utilization budget (0.51 GiB on an H100 in vLLM 0.19 logs; lmcache3430 started with only
#: 0.56 GiB outside the budget). PyTorch 2.11 / CUDA 13 alone took 0.60 GiB on an H100
#: (``bench/gpu_check.py --hold-gib``, docs/benchmarks.md): newer stacks may need more.
CONTEXT_GIB_SINGLE = 0.5
CONTEXT_GIB_MULTI = 0.6
#: CUDA-graph pool estimate: a first capture plus a per-graph, per-layer cost (vLLM 0.19-0.21
#: "Estimated ... CUDA graph memory" lines: 0.52 GiB for 36 layers, 1.05 GiB for 62 layers).
CUDAGRAPH_FIRST_GIB = 0.17
CUDAGRAPH_PIECEWISE_MIB_PER_LAYER = 0.2
CUDAGRAPH_FULL_MIB_PER_LAYER = 0.1
#: Memory outside PyTorch that each NCCL all-reduce captured into a CUDA graph holds, when
#: tensor parallelism runs over PCIe on more than two GPUs (vLLM's custom all-reduce refuses
#: "more than two PCIe-only GPUs", so every layer's two all-reduces go through NCCL inside the
#: graphs). Lower bound from QwenLM/Qwen3#1387 (4 x A10, TP=4, vLLM 0.8.5, Qwen3-30B-A3B): the
#: process held 21.94 GiB of which PyTorch 15.84 GiB when capture ran out of memory, i.e. about
#: 5.5 GiB beyond the CUDA context over at most 67 graphs x 48 layers x 2 all-reduces (0.87 MiB
#: each). vllm#17469 (same model and GPUs at utilization 0.90) ran out the same way with only
#: 1.6 GiB to spare; vLLM's own start-up warning of that era said graphs "can take additional
#: 1~3 GiB memory per GPU".
NCCL_GRAPH_MIB_PER_ALLREDUCE = 1.0

Engine = Literal["auto", "v0", "v1"]
UsageContext = Literal["api_server", "llm_class"]
PerformanceMode = Literal["balanced", "interactivity", "throughput"]
LayerKind = Literal["full", "sliding"]

_FP8_KV = {"fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc"}
_DTYPE_BYTES = {
    "half": 2,
    "float16": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float": 4,
    "float32": 4,
    "fp32": 4,
}
# Fields or values that mean an architecture this calculator does not model.
_UNSUPPORTED_FIELDS = {
    "attention_chunk_size": "chunked local attention (Llama 4)",
    "hybrid_override_pattern": "hybrid Mamba layers",
    "block_configs": "per-layer block configs (Nemotron-NAS)",
    "ssm_cfg": "state-space (Mamba) layers",
    "mamba_d_state": "state-space (Mamba) layers",
    "linear_attn_config": "linear attention layers",
    "full_attention_interval": "linear-attention hybrid layers",
}
_SUPPORTED_QUANT = ("fp8", "awq", "gptq", "bitsandbytes", "compressed-tensors", "modelopt")
_REJECTED_QUANT = {
    "mxfp4": "MXFP4 (gpt-oss) weights are repacked differently per GPU backend",
    "nvfp4": "NVFP4 weights",
    "modelopt_fp4": "NVFP4 weights",
    "gguf": "GGUF files (sizes come from the file, not the config)",
    "hqq": "HQQ",
    "exl2": "EXL2",
    "auto_round": "AutoRound",
}


class ModelConfigError(InputError):
    """config.json lacks a field the calculator needs, or holds a value it cannot use."""


class UnsupportedModelError(ModelConfigError):
    """The model uses a feature the calculator does not model; the message names the field."""


class FitRequestError(InputError):
    """A fit request's own values (GPUs, utilization, lengths, versions) are out of range."""


class UnmodelledEngineError(FitRequestError):
    """The vLLM version sizes its KV cache in a way the calculator does not model: refused
    rather than answered with a confident wrong number."""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuMemory:
    """One GPU as vLLM sees it: total memory and, when known, the memory free before start."""

    total_gib: float
    free_gib: float | None = None
    name: str | None = None


@dataclass(frozen=True)
class FitRequest:
    """A model config plus the engine settings and GPUs to test it against."""

    config: Mapping[str, Any]
    gpus: tuple[GpuMemory, ...]
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int | Literal["auto"] = "auto"
    pipeline_parallel_size: int = 1
    dtype: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    vllm_version: str = "0.11.0"
    enforce_eager: bool = False
    engine: Engine = "auto"
    usage_context: UsageContext = "api_server"
    block_size: int = DEFAULT_BLOCK_SIZE
    nvlink: bool | None = None
    sampler_bytes_per_logit: float | None = None
    #: vLLM's ``--performance-mode`` (from 0.17.0); ``throughput`` doubles the batch defaults.
    performance_mode: PerformanceMode = "balanced"
    #: ``--enable-chunked-prefill``; None: vLLM's default for the version (V0: on only for
    #: max_model_len > 32K without sliding window or multimodal input).
    enable_chunked_prefill: bool | None = None


# ---------------------------------------------------------------------------------------------
# Model shape, read from config.json
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoeShape:
    num_experts: int
    top_k: int
    expert_intermediate: int
    shared_intermediate: int  # total intermediate size of the shared expert(s); 0 if none
    shared_gate: bool  # Qwen-MoE's sigmoid gate on the shared expert


@dataclass(frozen=True)
class MlaShape:
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class VisionShape:
    params: int
    tokens_per_item: int
    patches_per_item: int
    hidden: int
    intermediate: int


@dataclass(frozen=True)
class QuantScheme:
    """How the decoder's linear layers are stored; embeddings, norms and routers stay in dtype."""

    name: str
    bytes_per_param: float
    detail: str


@dataclass(frozen=True)
class ModelShape:
    """The numbers vLLM's memory use depends on, normalized across config dialects."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    max_model_len: int
    intermediate_size: int
    moe_layers: frozenset[int]
    moe: MoeShape | None
    mla: MlaShape | None
    layer_kinds: tuple[LayerKind, ...]
    sliding_window: int | None
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    norms_per_layer: int
    rotary_dim: int
    config_dtype: str
    dtype_bytes: int
    quant: QuantScheme
    vision: VisionShape | None

    @property
    def is_hybrid(self) -> bool:
        return "sliding" in self.layer_kinds and "full" in self.layer_kinds


def load_model_config(path: str | Path) -> dict[str, Any]:
    """Read a Hugging Face config.json (the module's only I/O)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelConfigError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{p}: not a JSON config.json: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelConfigError(f"{p}: config.json must be a JSON object")
    return data


def _get(cfg: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    return None


def _pos_int(
    cfg: Mapping[str, Any], names: Sequence[str], where: str, default: int | None = None
) -> int:
    value = _get(cfg, *names)
    if value is None:
        if default is not None:
            return default
        raise ModelConfigError(f"{where}{names[0]}: missing from config.json")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelConfigError(f"{where}{names[0]}: expected a positive integer, got {value!r}")
    return value


def _text_config(cfg: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    for key in ("text_config", "llm_config", "language_config"):
        sub = cfg.get(key)
        if isinstance(sub, Mapping):
            return sub, f"{key}."
    return cfg, ""


def model_shape(
    config: Mapping[str, Any], quantization: str | None = None, dtype: str = "auto"
) -> ModelShape:
    """Normalize a config.json (plain or multimodal with ``text_config``) into a ModelShape."""
    text, where = _text_config(config)
    for fld, what in _UNSUPPORTED_FIELDS.items():
        if _get(text, fld) is not None or _get(config, fld) is not None:
            raise UnsupportedModelError(f"{where}{fld}: {what} is not supported by the calculator")
    model_type = str(_get(text, "model_type") or _get(config, "model_type") or "unknown")
    num_layers = _pos_int(text, ("num_hidden_layers", "n_layer", "num_layers"), where)
    hidden = _pos_int(text, ("hidden_size", "n_embd", "d_model"), where)
    heads = _pos_int(text, ("num_attention_heads", "n_head"), where)
    kv_heads = _pos_int(text, ("num_key_value_heads",), where, default=heads)
    if _get(text, "multi_query") is True:
        kv_heads = 1
    if heads % kv_heads:
        raise ModelConfigError(
            f"{where}num_key_value_heads: {kv_heads} does not divide num_attention_heads {heads}"
        )
    head_dim = _pos_int(text, ("head_dim",), where, default=0) or 0
    if not head_dim:
        if hidden % heads:
            raise ModelConfigError(
                f"{where}head_dim: missing and hidden_size {hidden} is not a multiple of "
                f"num_attention_heads {heads}"
            )
        head_dim = hidden // heads
    vocab = _pos_int(text, ("vocab_size",), where)
    if _get(config, "vocab_size") is not None and where:
        vocab = max(vocab, _pos_int(config, ("vocab_size",), ""))

    tie_default = model_type.startswith("gemma")
    tie_raw = _get(config, "tie_word_embeddings")
    if tie_raw is None:
        tie_raw = _get(text, "tie_word_embeddings")
    tie = tie_default if tie_raw is None else bool(tie_raw)

    mla = _mla_shape(text, where)
    moe, moe_layers = _moe_shape(text, where, num_layers)
    intermediate = _pos_int(
        text, ("intermediate_size", "ffn_hidden_size", "n_inner"), where, default=4 * hidden
    )
    if moe is not None and len(moe_layers) == num_layers:
        intermediate = 0
    kinds, window = _layer_kinds(text, where, model_type, num_layers)
    rotary_dim = (
        mla.qk_rope_head_dim
        if mla
        else int(head_dim * float(_get(text, "partial_rotary_factor") or 1.0))
    )
    config_dtype = str(
        _get(config, "torch_dtype", "dtype") or _get(text, "torch_dtype", "dtype") or "bfloat16"
    )
    qkv_bias = bool(_get(text, "qkv_bias", "attention_bias")) or model_type in {
        "qwen2",
        "qwen2_moe",
        "qwen2_vl",
        "qwen2_5_vl",
    }
    o_bias = bool(_get(text, "attention_bias")) and model_type not in {"qwen2", "qwen2_moe"}
    qk_norm = model_type.startswith(("qwen3", "gemma3", "olmo2"))
    norms = 4 if model_type.startswith(("gemma2", "gemma3")) else 2
    quant = _quant_scheme(config, text, quantization, dtype)
    return ModelShape(
        model_type=model_type,
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_embeddings=tie,
        max_model_len=_derived_max_len(text, where),
        intermediate_size=intermediate,
        moe_layers=frozenset(moe_layers),
        moe=moe,
        mla=mla,
        layer_kinds=kinds,
        sliding_window=window,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        norms_per_layer=norms,
        rotary_dim=max(rotary_dim, 1),
        config_dtype=config_dtype,
        dtype_bytes=_weight_dtype_bytes(dtype),
        quant=quant,
        vision=_vision_shape(config, hidden),
    )


def _mla_shape(text: Mapping[str, Any], where: str) -> MlaShape | None:
    if _get(text, "kv_lora_rank") is None:
        return None
    q_lora = _get(text, "q_lora_rank")
    return MlaShape(
        kv_lora_rank=_pos_int(text, ("kv_lora_rank",), where),
        q_lora_rank=None if q_lora is None else _pos_int(text, ("q_lora_rank",), where),
        qk_nope_head_dim=_pos_int(text, ("qk_nope_head_dim",), where),
        qk_rope_head_dim=_pos_int(text, ("qk_rope_head_dim",), where),
        v_head_dim=_pos_int(text, ("v_head_dim",), where),
    )


def _moe_shape(
    text: Mapping[str, Any], where: str, num_layers: int
) -> tuple[MoeShape | None, set[int]]:
    experts = _get(text, "n_routed_experts", "num_experts", "num_local_experts")
    if experts is None or experts == 0:
        return None, set()
    n_experts = _pos_int(text, ("n_routed_experts", "num_experts", "num_local_experts"), where)
    top_k = _pos_int(text, ("num_experts_per_tok", "experts_per_token", "moe_topk"), where)
    expert_i = _pos_int(text, ("moe_intermediate_size", "intermediate_size"), where)
    shared = 0
    if _get(text, "n_shared_experts"):
        shared = _pos_int(text, ("n_shared_experts",), where) * expert_i
    shared_qwen = _get(text, "shared_expert_intermediate_size")
    if shared_qwen:
        shared = _pos_int(text, ("shared_expert_intermediate_size",), where)
    layers: set[int] = set()
    first_dense = _get(text, "first_k_dense_replace") or 0
    freq = _get(text, "moe_layer_freq") or 1
    step = _get(text, "decoder_sparse_step") or 1
    mlp_only = set(_get(text, "mlp_only_layers") or [])
    for i in range(num_layers):
        if i < int(first_dense) or i in mlp_only:
            continue
        if (i - int(first_dense)) % int(freq) or (i + 1) % int(step):
            continue
        layers.add(i)
    moe = MoeShape(
        num_experts=n_experts,
        top_k=top_k,
        expert_intermediate=expert_i,
        shared_intermediate=shared,
        shared_gate=bool(shared_qwen),
    )
    return moe, layers


def _layer_kinds(
    text: Mapping[str, Any], where: str, model_type: str, num_layers: int
) -> tuple[tuple[LayerKind, ...], int | None]:
    window_raw = _get(text, "sliding_window")
    window = window_raw if isinstance(window_raw, int) and window_raw > 0 else None
    types = _get(text, "layer_types")
    if isinstance(types, list) and types:
        if len(types) != num_layers:
            raise ModelConfigError(
                f"{where}layer_types: {len(types)} entries for {num_layers} layers"
            )
        kinds: list[LayerKind] = []
        for t in types:
            if t == "full_attention":
                kinds.append("full")
            elif t == "sliding_attention":
                kinds.append("sliding")
            else:
                raise UnsupportedModelError(
                    f"{where}layer_types: layer type {t!r} is not supported "
                    "(only full_attention and sliding_attention)"
                )
        if "sliding" in kinds and window is None:
            raise ModelConfigError(f"{where}sliding_window: layer_types has sliding layers")
        return tuple(kinds), window if "sliding" in kinds else None
    none: tuple[tuple[LayerKind, ...], int | None] = (_kinds(num_layers, lambda i: False), None)
    if window is None or _get(text, "use_sliding_window") is False:
        return none
    if model_type.startswith("gemma3"):
        pattern = int(_get(text, "sliding_window_pattern") or 6)
        return _kinds(num_layers, lambda i: (i + 1) % pattern != 0), window
    if model_type.startswith("gemma2"):
        return _kinds(num_layers, lambda i: i % 2 == 0), window
    if model_type.startswith("qwen2") and _get(text, "use_sliding_window"):
        first = int(_get(text, "max_window_layers") or 0)
        return _kinds(num_layers, lambda i: i >= first), window
    if model_type in {"mistral", "mixtral", "mistral3"}:
        return _kinds(num_layers, lambda i: True), window
    return none


def _kinds(num_layers: int, sliding: Callable[[int], bool]) -> tuple[LayerKind, ...]:
    full: LayerKind = "full"
    window: LayerKind = "sliding"
    return tuple(window if sliding(i) else full for i in range(num_layers))


def _derived_max_len(text: Mapping[str, Any], where: str) -> int:
    base = _pos_int(
        text, ("max_position_embeddings", "n_positions", "seq_length"), where, default=4096
    )
    scaling = _get(text, "rope_scaling")
    if isinstance(scaling, Mapping):
        kind = scaling.get("rope_type") or scaling.get("type")
        factor = scaling.get("factor")
        original = scaling.get("original_max_position_embeddings")
        if kind == "yarn" and isinstance(factor, int | float) and isinstance(original, int):
            return int(original * factor)
    return base


def _vision_shape(config: Mapping[str, Any], text_hidden: int) -> VisionShape | None:
    vc = config.get("vision_config")
    if not isinstance(vc, Mapping):
        return None
    hidden = _get(vc, "hidden_size", "embed_dim", "width")
    depth = _get(vc, "num_hidden_layers", "depth", "layers")
    if not isinstance(hidden, int) or not isinstance(depth, int):
        return None
    inter = _get(vc, "intermediate_size", "mlp_dim")
    if not isinstance(inter, int):
        ratio = float(_get(vc, "mlp_ratio") or 4.0)
        inter = int(hidden * ratio)
    patch = int(_get(vc, "patch_size") or 14)
    image = int(_get(vc, "image_size") or 448)
    patches = max(1, (image // patch) ** 2)
    tokens = int(_get(config, "mm_tokens_per_image") or patches)
    per_layer = 4 * hidden * hidden + 2 * hidden * inter + 4 * hidden
    params = (
        depth * per_layer + patches * hidden + 3 * patch * patch * hidden + hidden * text_hidden
    )
    return VisionShape(
        params=params,
        tokens_per_item=tokens,
        patches_per_item=patches,
        hidden=hidden,
        intermediate=inter,
    )


def _quant_scheme(
    config: Mapping[str, Any], text: Mapping[str, Any], override: str | None, dtype: str
) -> QuantScheme:
    qc = config.get("quantization_config") or text.get("quantization_config")
    if qc is not None and not isinstance(qc, Mapping):
        raise ModelConfigError("quantization_config: expected an object")
    method = (override or (qc.get("quant_method") if qc else None) or "none").lower()
    if method in _REJECTED_QUANT:
        raise UnsupportedModelError(
            f"quantization_config.quant_method: {method!r} ({_REJECTED_QUANT[method]}) is not "
            f"supported; supported: {', '.join(_SUPPORTED_QUANT)}"
        )
    if method == "none":
        nbytes = _weight_dtype_bytes(dtype)
        return QuantScheme("none", float(nbytes), f"{nbytes} B/param")
    qc = qc or {}
    if method in {"fp8", "fbgemm_fp8", "ptpc_fp8"}:
        block = qc.get("weight_block_size")
        if isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block):
            return QuantScheme(
                "fp8",
                1.0 + 4.0 / (block[0] * block[1]),
                f"fp8 weights, {block[0]}x{block[1]} block scales",
            )
        return QuantScheme("fp8", 1.0, "fp8 weights, per-tensor scales")
    if method == "modelopt":
        algo = str(
            qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo") or "FP8"
        )
        if "FP4" in algo.upper():
            raise UnsupportedModelError(
                f"quantization_config.quant_algo: {algo!r} (NVFP4) is not supported"
            )
        return QuantScheme("fp8", 1.0, "fp8 weights (ModelOpt)")
    if method in {"awq", "awq_marlin", "gptq", "gptq_marlin"}:
        bits = int(qc.get("bits") or qc.get("w_bit") or 4)
        group = int(qc.get("group_size") or qc.get("q_group_size") or 128)
        if bits not in (2, 3, 4, 8):
            raise UnsupportedModelError(f"quantization_config.bits: {bits} is not supported")
        per_group = 2.0 + bits / 8.0  # fp16 scale + packed zero point per group
        overhead = per_group / group if group > 0 else 0.0
        kind = "awq" if method.startswith("awq") else "gptq"
        return QuantScheme(
            kind, bits / 8.0 + overhead, f"int{bits} weights, group {group}, fp16 scales"
        )
    if method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return QuantScheme("bitsandbytes", 1.0, "int8 weights (bitsandbytes)")
        double = bool(qc.get("bnb_4bit_use_double_quant"))
        absmax = 1.0 / 64 + 4.0 / (64 * 256) if double else 4.0 / 64
        return QuantScheme(
            "bitsandbytes",
            0.5 + absmax,
            "4-bit weights, 64-block absmax" + (" (double quant)" if double else ""),
        )
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise UnsupportedModelError(
        f"quantization_config.quant_method: {method!r} is not supported; supported: "
        f"{', '.join(_SUPPORTED_QUANT)}"
    )


def _compressed_tensors(qc: Mapping[str, Any]) -> QuantScheme:
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ModelConfigError("quantization_config.config_groups: missing for compressed-tensors")
    first = next(iter(groups.values()))
    weights = first.get("weights") if isinstance(first, Mapping) else None
    if not isinstance(weights, Mapping):
        raise ModelConfigError("quantization_config.config_groups.*.weights: missing")
    bits = int(weights.get("num_bits") or 8)
    kind = str(weights.get("type") or "int")
    strategy = str(weights.get("strategy") or "tensor")
    if kind == "float" and bits == 4:
        raise UnsupportedModelError(
            "quantization_config.config_groups.*.weights: 4-bit float (NVFP4) is not supported"
        )
    if bits not in (4, 8):
        raise UnsupportedModelError(
            f"quantization_config.config_groups.*.weights.num_bits: {bits} is not supported"
        )
    overhead = 0.0
    if strategy == "group":
        group = int(weights.get("group_size") or 128)
        overhead = (2.0 + (bits / 8.0 if not weights.get("symmetric", True) else 0.0)) / group
    elif strategy == "block":
        block = weights.get("block_structure") or [128, 128]
        overhead = 4.0 / (int(block[0]) * int(block[1]))
    return QuantScheme(
        "compressed-tensors", bits / 8.0 + overhead, f"{kind}{bits} weights, {strategy} scales"
    )


def _weight_dtype_bytes(dtype: str) -> int:
    name = dtype.lower()
    if name == "auto":
        # vLLM serves float32 checkpoints in 16 bits unless --dtype float32 is given.
        return 2
    if name not in _DTYPE_BYTES:
        raise FitRequestError(f"dtype: {dtype!r} is not one of auto, {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


# ---------------------------------------------------------------------------------------------
# Weights and KV-cache bytes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightBreakdown:
    """Per-GPU weight bytes of one pipeline stage."""

    quantized_params: float
    other_params: float
    bytes: float

    @property
    def gib(self) -> float:
        return self.bytes / GIB


def kv_heads_per_gpu(shape: ModelShape, tp: int) -> int:
    """KV heads one GPU stores: split over TP, replicated when TP exceeds them (vLLM)."""
    return max(1, shape.num_kv_heads // tp)


def kv_bytes_per_token_per_layer(shape: ModelShape, tp: int, kv_cache_dtype: str = "auto") -> int:
    """Bytes one token takes in one layer's KV cache on one GPU (AttentionSpec page / block)."""
    elem = _kv_elem_bytes(shape, kv_cache_dtype)
    if shape.mla is not None:
        # MLA caches one latent (kv_lora_rank + rope dims) per token, not split by TP.
        return (shape.mla.kv_lora_rank + shape.mla.qk_rope_head_dim) * elem
    return 2 * kv_heads_per_gpu(shape, tp) * shape.head_dim * elem


def kv_bytes_per_token(
    shape: ModelShape, tp: int, kv_cache_dtype: str = "auto", pp: int = 1
) -> int:
    """Bytes per token per GPU over the layers of the largest pipeline stage (all layers full)."""
    layers = max(_stage_layers(shape.num_layers, pp))
    return layers * kv_bytes_per_token_per_layer(shape, tp, kv_cache_dtype)


def _kv_elem_bytes(shape: ModelShape, kv_cache_dtype: str) -> int:
    name = kv_cache_dtype.lower()
    if name in _FP8_KV:
        return 1
    if name == "auto":
        return shape.dtype_bytes  # the KV cache takes the model's dtype
    if name in {"bfloat16", "float16", "half"}:
        return 2
    raise FitRequestError(
        f"kv_cache_dtype: {kv_cache_dtype!r} is not supported (auto, {', '.join(sorted(_FP8_KV))})"
    )


def _stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, as vLLM's get_pp_indices splits them."""
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    return parts


def weight_bytes(shape: ModelShape, tp: int, pp: int = 1, stage: int = 0) -> WeightBreakdown:
    """Weight bytes on one GPU of pipeline ``stage``: parameter counts x bytes per parameter."""
    h = shape.hidden_size
    parts = _stage_layers(shape.num_layers, pp)
    start = sum(parts[:stage])
    layers = range(start, start + parts[stage])
    q_params = 0.0
    o_params = 0.0
    for i in layers:
        lin, other = _layer_params(shape, i, tp)
        q_params += lin
        o_params += other
    vocab = math.ceil(shape.vocab_size / 64) * 64
    first, last = stage == 0, stage == pp - 1
    if first:
        o_params += vocab * h / tp
        if shape.vision is not None:
            o_params += shape.vision.params / tp
    if last:
        o_params += h
        if not shape.tie_embeddings or pp > 1:
            o_params += vocab * h / tp
    o_params += shape.max_model_len * shape.rotary_dim  # rotary cos/sin cache
    if shape.quant.name == "none":
        total = q_params + o_params
        return WeightBreakdown(0.0, total, total * shape.quant.bytes_per_param)
    return WeightBreakdown(
        q_params, o_params, q_params * shape.quant.bytes_per_param + o_params * shape.dtype_bytes
    )


def _layer_params(shape: ModelShape, layer: int, tp: int) -> tuple[float, float]:
    """(linear-layer params, other params) of one decoder layer on one GPU."""
    h = shape.hidden_size
    lin = 0.0
    other = float(shape.norms_per_layer * h)
    if shape.mla is not None:
        m = shape.mla
        qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            lin += h * shape.num_heads * qk_dim / tp
        else:
            lin += h * m.q_lora_rank + m.q_lora_rank * shape.num_heads * qk_dim / tp
            other += m.q_lora_rank
        lin += h * (m.kv_lora_rank + m.qk_rope_head_dim)
        lin += m.kv_lora_rank * shape.num_heads * (m.qk_nope_head_dim + m.v_head_dim) / tp
        lin += shape.num_heads * m.v_head_dim * h / tp
        other += m.kv_lora_rank
    else:
        hd = shape.head_dim
        q = shape.num_heads * hd / tp
        kv = 2 * kv_heads_per_gpu(shape, tp) * hd
        lin += h * (q + kv) + q * h
        if shape.qkv_bias:
            other += q + kv
        if shape.o_bias:
            other += h
        if shape.qk_norm:
            other += 2 * hd
    moe = shape.moe
    if moe is not None and layer in shape.moe_layers:
        lin += moe.num_experts * 3 * h * moe.expert_intermediate / tp
        lin += 3 * h * moe.shared_intermediate / tp
        other += h * moe.num_experts + (h if moe.shared_gate else 0)
    else:
        lin += 3 * h * shape.intermediate_size / tp
    return lin, other


# ---------------------------------------------------------------------------------------------
# Engine behaviour by version
# ---------------------------------------------------------------------------------------------


def parse_vllm_version(text: str) -> tuple[int, int, int]:
    """'0.8.5', 'v0.11.0', '0.10.1rc2' -> (0, 8, 5)."""
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise FitRequestError(f"vllm_version: cannot read {text!r}; expected e.g. 0.11.0")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


@dataclass(frozen=True)
class VersionGate:
    """One change in vLLM's behaviour that moves the numbers, and where vLLM's source shows it.

    ``since`` is the first released version with the new behaviour; ``source`` cites the file and
    line in that release's wheel, ``before`` the last release without it (as
    ``file @ version Lline: what it does``).
    """

    name: str
    since: tuple[int, int, int]
    what: str
    source: str
    before: str

    @property
    def since_text(self) -> str:
        return ".".join(map(str, self.since))


#: Every version gate of the calculator, checked against vLLM's released wheels (PyPI).
VERSION_GATES: tuple[VersionGate, ...] = (
    VersionGate(
        "v0_profile_allocated_peak",
        (0, 6, 4),
        "V0 sizes the KV cache from PyTorch's allocated peak plus non-torch memory; older V0 "
        "used the free memory after the profile run (PyTorch's cached pool included), which "
        "the calculator does not model: those versions are refused",
        "vllm/worker/worker.py @ 0.6.4 L201: peak_memory = memory_stats()"
        '["allocated_bytes.all.peak"]',
        "vllm/worker/worker.py @ 0.6.3 L228-231: peak_memory = init_gpu_memory - "
        "free_gpu_memory after profile_run",
    ),
    VersionGate(
        "v0_profile_init_baseline",
        (0, 6, 5),
        "V0 non-torch memory is what the GPU holds beyond the device-init baseline, the weights "
        "and PyTorch's allocated bytes (PyTorch's reserved pool included); 0.6.4 counted the "
        "memory outside PyTorch's allocator after empty_cache (the CUDA context)",
        "vllm/worker/worker.py @ 0.6.5 L198: memory_profiling(baseline_memory_in_bytes="
        "total_gpu_memory - self.init_gpu_memory, ...)",
        "vllm/worker/worker.py @ 0.6.4 L211: non_torch_allocations = total_allocated_bytes - "
        "torch_allocated_bytes",
    ),
    VersionGate(
        "v0_profile_snapshot_baseline",
        (0, 7, 0),
        "V0 measures against a MemorySnapshot taken at device init (the 0.7-0.10 logs show "
        "0.03-0.39 GiB non-torch)",
        "vllm/worker/worker.py @ 0.7.0 L160: self.baseline_snapshot = MemorySnapshot()",
        "vllm/worker/worker.py @ 0.6.6 L198: memory_profiling(baseline_memory_in_bytes=...)",
    ),
    VersionGate(
        "v0_chunked_prefill_2048",
        (0, 7, 0),
        "V0 with chunked prefill profiles 2048 tokens (512 before)",
        "vllm/config.py @ 0.7.0 L1460: max_num_batched_tokens = 2048",
        "vllm/config.py @ 0.6.4 L1114: max_num_batched_tokens = 512",
    ),
    VersionGate(
        "v1_default",
        (0, 8, 0),
        "the V1 engine is the default",
        'vllm/envs.py @ 0.8.0 L522-523: VLLM_USE_V1 defaults to "1"',
        'vllm/envs.py @ 0.7.3 L503-504: VLLM_USE_V1 defaults to "0"',
    ),
    VersionGate(
        "v1_falls_back_to_v0_before_ampere",
        (0, 8, 0),
        "with the default engine, GPUs of compute capability < 8.0 (Volta, Turing, Pascal) "
        "fall back to V0",
        "vllm/engine/arg_utils.py @ 0.8.0 L1471-1477: Compute Capability < 8.0 -> "
        "_raise_or_fallback",
        "vllm/engine/arg_utils.py @ 0.7.3: V0 is the default engine",
    ),
    VersionGate(
        "v1_max_num_seqs_by_gpu",
        (0, 8, 4),
        "V1's default max_num_seqs is 1024 only on the large-GPU tier and 256 elsewhere; "
        "0.8.0-0.8.3 used 1024 on every GPU (so the profile's sampler ran over 1024 rows)",
        "vllm/engine/arg_utils.py @ 0.8.4 L1675-1682: default_max_num_seqs = 1024 (H100/H200) "
        "else 256",
        "vllm/engine/arg_utils.py @ 0.8.3 L1669: default_max_num_seqs = 1024",
    ),
    VersionGate(
        "large_gpu_by_memory",
        (0, 8, 5),
        "GPUs of 70 GiB or more get the large batch defaults (API server 8192 tokens, "
        "1024 sequences); before, the large defaults went by the names H100/H200",
        "vllm/engine/arg_utils.py @ 0.8.5 L1596: if device_memory >= 70 * GiB_bytes",
        'vllm/engine/arg_utils.py @ 0.8.4 L1669: if "h100" in device_name or "h200" in device_name',
    ),
    VersionGate(
        "large_gpu_not_a100",
        (0, 9, 0),
        "A100s are kept out of the 70 GiB tier",
        'vllm/engine/arg_utils.py @ 0.9.0 L1495: device_memory >= 70 * GiB_bytes and "a100" '
        "not in device_name",
        "vllm/engine/arg_utils.py @ 0.8.5 L1596: device_memory >= 70 * GiB_bytes",
    ),
    VersionGate(
        "hybrid_kv_cache_manager",
        (0, 9, 1),
        "V1 keeps sliding-window layers in their own KV-cache groups (the hybrid KV cache "
        "manager, on by default); before, they were cached as full attention",
        "vllm/config.py @ 0.9.1 L2120: disable_hybrid_kv_cache_manager: bool = False; "
        "vllm/v1/core/kv_cache_utils.py @ 0.9.1 L739: _get_kv_cache_config_uniform_page_size",
        "vllm/config.py @ 0.9.0: no hybrid KV cache manager",
    ),
    VersionGate(
        "v1_on_pre_ampere",
        (0, 10, 2),
        "the compute-capability fallback is gone: the default engine is V1 on every GPU",
        "vllm/engine/arg_utils.py @ 0.10.2 _is_v1_supported_oracle: no compute-capability check",
        "vllm/engine/arg_utils.py @ 0.10.1.1 L1396-1404: Compute Capability < 8.0 -> "
        "_raise_or_fallback",
    ),
    VersionGate(
        "full_and_piecewise_cudagraphs",
        (0, 11, 0),
        "decode batches are also captured as full CUDA graphs (FULL_AND_PIECEWISE)",
        "vllm/config/__init__.py @ 0.11.0 L361-366: cudagraph_mode = "
        "CUDAGraphMode.FULL_AND_PIECEWISE",
        "vllm/config/__init__.py @ 0.10.2 L3393: CUDAGraphMode.PIECEWISE",
    ),
    VersionGate(
        "v0_removed",
        (0, 11, 0),
        "the V0 engine is gone",
        "vllm/worker/ @ 0.11.0: only __init__.py and worker_base.py",
        "vllm/worker/worker.py @ 0.10.2: the V0 worker",
    ),
    VersionGate(
        "performance_mode",
        (0, 17, 0),
        "--performance-mode throughput doubles the default max_num_batched_tokens and max_num_seqs",
        'vllm/engine/arg_utils.py @ 0.17.0 L2128: if self.performance_mode == "throughput"',
        "vllm/engine/arg_utils.py @ 0.16.0: no performance_mode",
    ),
    VersionGate(
        "cudagraph_memory_in_budget",
        (0, 20, 0),
        "the estimated CUDA-graph memory is subtracted inside gpu_memory_utilization",
        "vllm/envs.py @ 0.20.0 L1724-1726: VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS defaults "
        'to "1"; vllm/v1/worker/gpu_worker.py @ 0.20.0 L399-403, L421-425',
        "vllm/envs.py @ 0.19.1 L1654-1656: VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS defaults "
        'to "0"',
    ),
    VersionGate(
        "kv_tokens_from_concurrency",
        (0, 20, 1),
        "the logged KV-cache size is int(max_concurrency x max_model_len) for every layout",
        "vllm/v1/core/kv_cache_utils.py @ 0.20.1 L1706: num_tokens = int(max_concurrency * "
        "max_model_len)",
        "vllm/v1/core/kv_cache_utils.py @ 0.20.0 L1694-1698: num_blocks // len(kv_cache_groups) "
        "* min_block_size",
    ),
    VersionGate(
        "gpu_160gib_tier",
        (0, 28, 0),
        "GPUs of 160 GiB or more get 16384 batched tokens for the API server too (1024 sequences)",
        "vllm/engine/arg_utils.py @ 0.28.0 L2582: if device_memory >= 160 * GiB_bytes",
        "vllm/engine/arg_utils.py @ 0.27.1: no 160 GiB tier",
    ),
    VersionGate(
        "gb10_small_tier",
        (0, 33, 0),
        "GB10 (DGX Spark, compute capability 12.1) is kept out of the 70 GiB tier",
        "vllm/engine/arg_utils.py @ 0.33.0 L2963, L2984-2987: is_gb10 = "
        "is_device_capability((12, 1)) ... and not is_gb10",
        "vllm/engine/arg_utils.py @ 0.32.0: no GB10 check",
    ),
)
_GATES = {g.name: g for g in VERSION_GATES}


def gate_open(name: str, version: tuple[int, int, int]) -> bool:
    """Whether ``version`` has the behaviour of :data:`VERSION_GATES` entry ``name``."""
    return version >= _GATES[name].since


#: GPU names (as torch reports them) of compute capability below 8.0: Volta, Turing, Pascal.
_PRE_AMPERE = re.compile(
    r"v100|\bt4\b|p100|\bp40\b|\bp4\b|titan (?:rtx|v\b|xp)|rtx 20\d\d|gtx 1[0-6]\d\d|"
    r"quadro (?:rtx|gv|gp)|\bt[46]00\b|rtx [468]000\b(?! ada)"
)


def pre_ampere(gpu: GpuMemory) -> bool:
    """Whether the GPU's name says compute capability < 8.0 (unknown names count as newer)."""
    return bool(_PRE_AMPERE.search((gpu.name or "").lower()))


@dataclass(frozen=True)
class EngineProfile:
    """The version-dependent behaviour that changes the numbers."""

    version: tuple[int, int, int]
    v1: bool
    hybrid_allocator: bool
    cudagraph_in_budget: bool
    new_token_log: bool
    max_num_seqs: int
    profile_tokens: int
    large_gpu_defaults: bool
    sampler_bytes_per_logit: float
    #: FULL_AND_PIECEWISE graphs (decode batches also captured whole): the default from 0.11.
    full_cudagraphs: bool = False
    #: V0 only: the profile batch is chunked (max_num_batched_tokens below max_model_len).
    chunked_prefill: bool = True


def _batch_defaults(req: FitRequest, version: tuple[int, int, int]) -> tuple[int, int, str]:
    """V1's default (max_num_batched_tokens, max_num_seqs) for the smallest GPU, and its tier
    (``vllm/engine/arg_utils.py`` get_batch_defaults; see :data:`VERSION_GATES`)."""
    gpu = min(req.gpus, key=lambda g: g.total_gib)
    name = (gpu.name or "").lower()
    api = req.usage_context == "api_server"
    tier = "small"
    if gate_open("gpu_160gib_tier", version) and gpu.total_gib >= 160:
        tier = "160"
    elif gate_open("large_gpu_by_memory", version):
        if gpu.total_gib >= 70:
            tier = "70"
            if gate_open("large_gpu_not_a100", version) and "a100" in name:
                tier = "small"
            if gate_open("gb10_small_tier", version) and "gb10" in name:
                tier = "small"
    elif "h100" in name or "h200" in name:
        tier = "h100-name"
    if tier == "160":
        tokens, seqs = 16384, 1024
    elif tier in ("70", "h100-name"):
        tokens, seqs = (8192 if api else 16384), 1024
    else:
        tokens = 2048 if api else 8192
        seqs = 256 if gate_open("v1_max_num_seqs_by_gpu", version) else 1024
    if req.performance_mode == "throughput":
        tokens, seqs = tokens * 2, seqs * 2
    return tokens, seqs, tier


def engine_profile(req: FitRequest, shape: ModelShape, max_model_len: int) -> EngineProfile:
    """Resolve the engine (V0/V1), its defaults and the features of this vLLM version."""
    version = parse_vllm_version(req.vllm_version)
    v1 = gate_open("v1_default", version) if req.engine == "auto" else req.engine == "v1"
    if (
        v1
        and req.engine == "auto"
        and not gate_open("v1_on_pre_ampere", version)
        and any(pre_ampere(g) for g in req.gpus)
    ):
        v1 = False  # vLLM 0.8.0-0.10.1 falls back to V0 below compute capability 8.0
    elif (
        req.engine == "v1"
        and gate_open("v1_default", version)
        and not gate_open("v1_on_pre_ampere", version)
        and any(pre_ampere(g) for g in req.gpus)
    ):
        name = next(g.name for g in req.gpus if pre_ampere(g))
        raise FitRequestError(
            f"engine: vLLM {req.vllm_version} runs V1 only on compute capability >= 8.0; "
            f"{name} is older (vLLM refuses VLLM_USE_V1=1 there; the default engine falls "
            "back to V0)"
        )
    if v1 and version < (0, 7, 0):
        raise FitRequestError(f"engine: the V1 engine does not exist in vLLM {req.vllm_version}")
    if not v1 and gate_open("v0_removed", version):
        raise FitRequestError(f"engine: vLLM {req.vllm_version} has no V0 engine")
    if not v1 and not gate_open("v0_profile_allocated_peak", version):
        g = _GATES["v0_profile_allocated_peak"]
        raise UnmodelledEngineError(
            f"vllm_version: vLLM {req.vllm_version} (V0 engine) sized its KV cache from the free "
            "memory left after the profile run, PyTorch's cached pool included "
            "(vllm/worker/worker.py determine_num_available_blocks up to 0.6.3); the calculator "
            f"models V0 only from {g.since_text} and "
            "cannot predict this version: pin vLLM >= "
            f"{g.since_text}, or measure a real start-up"
        )
    if req.performance_mode != "balanced" and not gate_open("performance_mode", version):
        raise FitRequestError(
            f"performance_mode: vLLM {req.vllm_version} has no --performance-mode "
            f"(from {_GATES['performance_mode'].since_text})"
        )
    chunked = True
    if v1:
        tokens, seqs, tier = _batch_defaults(req, version)
        large = tier != "small"
    else:
        large = False
        seqs = 256
        long_context = max_model_len > 32768
        chunked = (
            req.enable_chunked_prefill
            if req.enable_chunked_prefill is not None
            else long_context and shape.vision is None and shape.sliding_window is None
        )
        if chunked:
            tokens = 2048 if gate_open("v0_chunked_prefill_2048", version) else 512
        else:
            tokens = max(max_model_len, 2048)
        if shape.vision is not None:
            tokens = max(tokens, 5120)
    return EngineProfile(
        version=version,
        v1=v1,
        hybrid_allocator=v1 and gate_open("hybrid_kv_cache_manager", version),
        cudagraph_in_budget=v1
        and gate_open("cudagraph_memory_in_budget", version)
        and not req.enforce_eager,
        new_token_log=v1 and gate_open("kv_tokens_from_concurrency", version),
        max_num_seqs=req.max_num_seqs or seqs,
        profile_tokens=req.max_num_batched_tokens or tokens,
        large_gpu_defaults=large,
        sampler_bytes_per_logit=req.sampler_bytes_per_logit or _sampler_bytes(v1, version),
        full_cudagraphs=v1 and gate_open("full_and_piecewise_cudagraphs", version),
        chunked_prefill=chunked,
    )


def _sampler_bytes(v1: bool, version: tuple[int, int, int]) -> float:
    """Peak bytes per logit of the profile's sampler run (see SAMPLER_BYTES_SORT)."""
    if not v1 or (0, 9, 0) <= version < (0, 12, 0):
        return SAMPLER_BYTES_SORT
    return SAMPLER_BYTES_LEAN


# ---------------------------------------------------------------------------------------------
# Reserve: profile peak, non-torch memory, CUDA graphs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reserve:
    """Memory vLLM sets aside on one GPU before sizing the KV cache, and what it is made of."""

    activation_gib: float
    forward_gib: float
    sampler_gib: float
    encoder_gib: float
    non_torch_gib: float
    cudagraph_gib: float
    cudagraph_in_budget: bool

    @property
    def total_gib(self) -> float:
        graphs = self.cudagraph_gib if self.cudagraph_in_budget else 0.0
        return self.activation_gib + self.non_torch_gib + graphs


def forward_bytes_per_token(shape: ModelShape, tp: int) -> float:
    """Peak activation bytes per token of one decoder layer's forward (MLP or attention)."""
    h = shape.hidden_size
    b = 2.0
    if shape.moe is not None and shape.moe_layers:
        n = shape.moe.expert_intermediate / tp
        mlp = shape.moe.top_k * (max(2 * n, h) + n) + 3 * shape.moe.shared_intermediate / tp
    else:
        mlp = 3 * shape.intermediate_size / tp
    if shape.intermediate_size and shape.moe is not None:
        mlp = max(mlp, 3 * shape.intermediate_size / tp)
    if shape.mla is not None:
        m = shape.mla
        attn = (
            shape.num_heads
            / tp
            * (
                2 * (m.qk_nope_head_dim + m.qk_rope_head_dim)
                + m.qk_nope_head_dim
                + 2 * m.v_head_dim
            )
        )
    else:
        q = shape.num_heads / tp
        attn = (2 * q + 2 * kv_heads_per_gpu(shape, tp)) * shape.head_dim
    return b * (max(mlp, attn) + 4 * h)


def cudagraph_gib(
    layers: int,
    eng: EngineProfile,
    tp: int = 1,
    nvlink: bool = True,
) -> float:
    """Estimated CUDA-graph memory on one GPU (empirical, see the constants above): the graph
    pool, plus what NCCL all-reduces captured in the graphs hold when TP > 2 runs over PCIe."""
    sizes = capture_sizes(eng)
    full = [s for s in sizes if s <= eng.max_num_seqs] if eng.full_cudagraphs else []
    mib = (
        len(sizes) * CUDAGRAPH_PIECEWISE_MIB_PER_LAYER * layers
        + len(full) * CUDAGRAPH_FULL_MIB_PER_LAYER * layers
    )
    if tp > 2 and not nvlink:
        mib += len(sizes) * layers * 2 * NCCL_GRAPH_MIB_PER_ALLREDUCE
    return CUDAGRAPH_FIRST_GIB + mib / 1024


def capture_sizes(eng: EngineProfile) -> list[int]:
    """The batch sizes vLLM captures CUDA graphs for, by version (``vllm/config``).

    V0: 1, 2, 4, then steps of 8 up to ``min(max_num_seqs, 256)``. V1 before 0.10: 1, 2, 4,
    then steps of 8 up to 512 whatever ``max_num_seqs`` is (``cuda_graph_sizes`` = [512]);
    0.10: up to ``min(2 x max_num_seqs, 512)``; from 0.11 steps of 16 above 256. V1 drops
    sizes above ``max_num_batched_tokens``.
    """
    if not eng.v1:
        top = min(eng.max_num_seqs, 256)
        return [s for s in [1, 2, 4, *range(8, 257, 8)] if s <= top]
    if eng.version < (0, 10, 0):
        sizes = [1, 2, 4, *range(8, 513, 8)]
    elif eng.version < (0, 11, 0):
        sizes = [1, 2, 4, *range(8, min(2 * eng.max_num_seqs, 512) + 1, 8)]
    else:
        top = min(2 * eng.max_num_seqs, 512)
        sizes = [s for s in [1, 2, 4, *range(8, 257, 8), *range(272, 513, 16)] if s <= top]
    return [s for s in sizes if s <= eng.profile_tokens]


def reserve_for_stage(
    shape: ModelShape,
    eng: EngineProfile,
    tp: int,
    pp: int,
    stage: int,
    layers: int,
    nvlink: bool,
    enforce_eager: bool,
) -> Reserve:
    """The reserve on one GPU of ``stage``."""
    tokens = eng.profile_tokens
    fwd = tokens * forward_bytes_per_token(shape, tp) / GIB
    sampler = 0.0
    if stage == pp - 1:
        seqs = min(eng.max_num_seqs, tokens)
        sampler = (
            seqs * shape.vocab_size * eng.sampler_bytes_per_logit + tokens * shape.hidden_size * 2
        ) / GIB
    encoder = 0.0
    if shape.vision is not None and stage == 0:
        v = shape.vision
        items = max(1, tokens // max(v.tokens_per_item, 1))
        if not eng.v1:
            items = min(items, eng.max_num_seqs)
        # fc1 output and its activation are alive together, plus the residual stream.
        encoder = items * v.patches_per_item * (2 * v.intermediate + 4 * v.hidden) * 2 / GIB
    if (
        not eng.v1
        and gate_open("v0_profile_init_baseline", eng.version)
        and not gate_open("v0_profile_snapshot_baseline", eng.version)
    ):
        non_torch = NON_TORCH_GIB_V0_065_TP if tp * pp > 1 else NON_TORCH_GIB_V0_065_SINGLE
    elif tp > 1:
        non_torch = NON_TORCH_GIB_TP_NVLINK if nvlink else NON_TORCH_GIB_TP_PCIE
    elif pp > 1:
        non_torch = 0.1
    else:
        non_torch = NON_TORCH_GIB_SINGLE
    graphs = 0.0 if enforce_eager else cudagraph_gib(layers, eng, tp, nvlink)
    return Reserve(
        activation_gib=max(fwd, sampler, encoder),
        forward_gib=fwd,
        sampler_gib=sampler,
        encoder_gib=encoder,
        non_torch_gib=non_torch,
        cudagraph_gib=graphs,
        cudagraph_in_budget=eng.cudagraph_in_budget,
    )


# ---------------------------------------------------------------------------------------------
# KV-cache blocks, tokens and concurrency (vllm/v1/core/kv_cache_utils.py)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KvLayout:
    """How a stage's layers are grouped into KV-cache groups sharing one block pool."""

    group_size: int  # layers sharing one page per block (the divisor of the pool)
    groups: tuple[LayerKind, ...]  # the kind of each group
    padding_layers: int


def kv_layout(kinds: Sequence[LayerKind], hybrid: bool) -> KvLayout:
    """Group layers the way ``_get_kv_cache_groups_uniform_page_size`` does."""
    full = sum(1 for k in kinds if k == "full")
    sliding = len(kinds) - full
    if not hybrid or full == 0 or sliding == 0:
        kind: LayerKind = "sliding" if hybrid and full == 0 else "full"
        return KvLayout(len(kinds), (kind,), 0)
    small, big = min(full, sliding), max(full, sliding)
    size = big if big < small * 1.5 else small
    groups: list[LayerKind] = []
    padding = 0
    counts: tuple[tuple[LayerKind, int], ...] = (("full", full), ("sliding", sliding))
    for kind_, count in counts:
        n = math.ceil(count / size)
        groups.extend([kind_] * n)
        padding += n * size - count
    return KvLayout(size, tuple(groups), padding)


def blocks_per_request(
    layout: KvLayout, max_model_len: int, block: int, window: int | None, batched_tokens: int
) -> int:
    """Blocks one request of ``max_model_len`` tokens needs (max_memory_usage_bytes / page)."""
    total = 0
    for kind in layout.groups:
        if kind == "sliding" and window is not None:
            tokens = min(window - 1 + batched_tokens, max_model_len)
            total += math.ceil(tokens / block) + 1
        else:
            total += math.ceil(max_model_len / block)
    return total


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageResult:
    """One pipeline stage (the same on each of its TP ranks)."""

    stage: int
    layers: int
    weights_gib: float
    reserve: Reserve
    budget_gib: float
    available_kv_gib: float
    num_blocks: int
    layout: KvLayout


@dataclass(frozen=True)
class FitResult:
    """The outcome: does it fit, with what TP, and how much KV cache does each GPU get."""

    fits: bool
    tensor_parallel_size: int
    pipeline_parallel_size: int
    weights_gib_per_gpu: float
    kv_bytes_per_token_per_gpu: int
    reserve_gib_per_gpu: float
    available_kv_gib_per_gpu: float
    kv_cache_tokens: int
    num_gpu_blocks: int
    max_concurrency: float
    max_model_len: int
    max_model_len_that_fits: int
    reasons: tuple[str, ...]
    warnings: tuple[str, ...]
    stages: tuple[StageResult, ...]
    lines: tuple[str, ...] = field(repr=False)
    tp_candidates: tuple[tuple[int, str], ...] = ()

    def explain(self) -> str:
        """The arithmetic behind the verdict, one step per line."""
        return "\n".join(self.lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``hxp fit --json`` prints)."""
        worst = min(self.stages, key=lambda s: s.available_kv_gib)
        r = worst.reserve
        return {
            "fits": self.fits,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "weights_gib_per_gpu": round(self.weights_gib_per_gpu, 3),
            "kv_bytes_per_token_per_gpu": self.kv_bytes_per_token_per_gpu,
            "reserve_gib_per_gpu": round(self.reserve_gib_per_gpu, 3),
            "reserve_breakdown_gib": {
                "activation_peak": round(r.activation_gib, 3),
                "forward": round(r.forward_gib, 3),
                "sampler": round(r.sampler_gib, 3),
                "multimodal_encoder": round(r.encoder_gib, 3),
                "non_torch": round(r.non_torch_gib, 3),
                "cudagraph": round(r.cudagraph_gib, 3),
                "cudagraph_in_budget": r.cudagraph_in_budget,
            },
            "available_kv_gib_per_gpu": round(self.available_kv_gib_per_gpu, 3),
            "kv_cache_tokens": self.kv_cache_tokens,
            "num_gpu_blocks": self.num_gpu_blocks,
            "max_concurrency": round(self.max_concurrency, 2),
            "max_model_len": self.max_model_len,
            "max_model_len_that_fits": self.max_model_len_that_fits,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "explain": self.explain(),
        }


# ---------------------------------------------------------------------------------------------
# The calculation
# ---------------------------------------------------------------------------------------------


def valid_tensor_parallel_sizes(shape: ModelShape, limit: int) -> list[int]:
    """TP sizes vLLM accepts: they divide the attention heads, and KV heads split or replicate."""
    sizes = []
    for tp in range(1, limit + 1):
        if shape.num_heads % tp:
            continue
        if shape.mla is None and tp % shape.num_kv_heads and shape.num_kv_heads % tp:
            continue
        sizes.append(tp)
    return sizes


def _check_request(req: FitRequest) -> None:
    if not req.gpus:
        raise FitRequestError("gpus: at least one GPU is needed")
    for i, g in enumerate(req.gpus):
        if not g.total_gib > 0:
            raise FitRequestError(f"gpus[{i}].total_gib: must be positive, got {g.total_gib}")
        if g.free_gib is not None and not 0 <= g.free_gib <= g.total_gib:
            raise FitRequestError(f"gpus[{i}].free_gib: must be between 0 and total_gib")
    if not 0 < req.gpu_memory_utilization <= 1:
        raise FitRequestError(
            f"gpu_memory_utilization: must be in (0, 1], got {req.gpu_memory_utilization}"
        )
    if req.pipeline_parallel_size < 1:
        raise FitRequestError("pipeline_parallel_size: must be at least 1")
    if req.tensor_parallel_size != "auto" and req.tensor_parallel_size < 1:
        raise FitRequestError("tensor_parallel_size: must be at least 1 or 'auto'")
    if req.max_model_len is not None and req.max_model_len < 1:
        raise FitRequestError("max_model_len: must be positive")
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        value = getattr(req, name)
        if value is not None and value < 1:
            raise FitRequestError(f"{name}: must be positive")
    if req.block_size not in (8, 16, 32, 64, 128, 256):
        raise FitRequestError(f"block_size: {req.block_size} is not a vLLM block size")


def fit(req: FitRequest) -> FitResult:
    """Evaluate a request; with ``tensor_parallel_size='auto'`` pick the smallest TP that fits."""
    _check_request(req)
    shape = model_shape(req.config, req.quantization, req.dtype)
    max_len = req.max_model_len or shape.max_model_len
    pp = req.pipeline_parallel_size
    limit = len(req.gpus) // pp
    if limit < 1:
        raise FitRequestError(
            f"pipeline_parallel_size: {pp} stages need {pp} GPUs, {len(req.gpus)} given"
        )
    if req.tensor_parallel_size != "auto":
        tp = req.tensor_parallel_size
        if tp * pp > len(req.gpus):
            raise FitRequestError(
                f"tensor_parallel_size: TP={tp} x PP={pp} needs {tp * pp} GPUs, "
                f"{len(req.gpus)} given"
            )
        if tp not in valid_tensor_parallel_sizes(shape, tp):
            raise FitRequestError(
                f"tensor_parallel_size: {tp} does not divide num_attention_heads "
                f"{shape.num_heads} (and num_key_value_heads {shape.num_kv_heads} must divide "
                "it or be divisible by it)"
            )
        return _evaluate(req, shape, tp, max_len)
    candidates = valid_tensor_parallel_sizes(shape, limit)
    if not candidates:
        raise FitRequestError(
            f"gpus: no tensor-parallel size up to {limit} divides num_attention_heads "
            f"{shape.num_heads}"
        )
    tried: list[tuple[int, str]] = []
    first: FitResult | None = None
    for tp in candidates:
        result = _evaluate(req, shape, tp, max_len)
        first = first or result
        if result.fits:
            if not tried:
                return result
            lines = [
                *result.lines,
                f"smallest tensor-parallel size that fits: TP={tp} "
                f"(valid sizes up to {limit}: {', '.join(map(str, candidates))})",
                *(f"  TP={t}: {why}" for t, why in tried),
            ]
            return replace(result, tp_candidates=(*tried, (tp, "fits")), lines=tuple(lines))
        tried.append((tp, result.reasons[0] if result.reasons else "does not fit"))
    assert first is not None
    lines = [
        *first.lines,
        f"no tensor-parallel size up to {limit} GPU(s) fits "
        f"(valid sizes: {', '.join(map(str, candidates))}):",
        *(f"  TP={t}: {why}" for t, why in tried),
    ]
    return replace(first, tp_candidates=tuple(tried), lines=tuple(lines))


def free_memory_refusal(gpu: GpuMemory, gpu_memory_utilization: float) -> str | None:
    """vLLM's first check: it refuses to start when the free memory is below
    `gpu_memory_utilization` x total. The reason, or None when the GPU passes it."""
    budget = gpu.total_gib * gpu_memory_utilization
    if gpu.free_gib is not None and gpu.free_gib < budget:
        return (
            f"free memory {gpu.free_gib:.2f} GiB is below the requested {budget:.2f} GiB "
            f"({gpu_memory_utilization:.2f} x {gpu.total_gib:.2f} GiB); vLLM refuses to start"
        )
    return None


def start_refusal(gpu: GpuMemory, gpu_memory_utilization: float, world: int = 1) -> str | None:
    """Why one more vLLM engine could not start on this GPU, judged before any model config
    is known: the free-memory check, and room for the CUDA context outside the budget. None
    when it can start (what a rolling restart's surge asks of each spare GPU)."""
    refusal = free_memory_refusal(gpu, gpu_memory_utilization)
    if refusal is not None:
        return refusal
    budget = gpu.total_gib * gpu_memory_utilization
    outside = (gpu.free_gib if gpu.free_gib is not None else gpu.total_gib) - budget
    context = CONTEXT_GIB_MULTI if world > 1 else CONTEXT_GIB_SINGLE
    if outside < context:
        return (
            f"the CUDA context (~{context:.2f} GiB) needs memory outside "
            f"gpu_memory_utilization; only {outside:.2f} GiB is left"
        )
    return None


def _evaluate(req: FitRequest, shape: ModelShape, tp: int, max_len: int) -> FitResult:
    pp = req.pipeline_parallel_size
    world = tp * pp
    gpus = req.gpus[:world]
    gpu = min(
        gpus, key=lambda g: (g.free_gib if g.free_gib is not None else g.total_gib, g.total_gib)
    )
    util = req.gpu_memory_utilization
    nvlink = req.nvlink if req.nvlink is not None else gpu.total_gib >= 70
    eng = engine_profile(req, shape, max_len)
    block = req.block_size
    per_layer = kv_bytes_per_token_per_layer(shape, tp, req.kv_cache_dtype)
    budget = gpu.total_gib * util
    stage_layers = _stage_layers(shape.num_layers, pp)
    hybrid = eng.hybrid_allocator and shape.is_hybrid
    all_sliding = eng.hybrid_allocator and "full" not in shape.layer_kinds
    stages: list[StageResult] = []
    start = 0
    for s, n in enumerate(stage_layers):
        kinds = (
            shape.layer_kinds[start : start + n]
            if (hybrid or all_sliding)
            else _kinds(n, lambda i: False)
        )
        start += n
        w = weight_bytes(shape, tp, pp, s)
        res = reserve_for_stage(shape, eng, tp, pp, s, n, nvlink, req.enforce_eager)
        avail = budget - w.gib - res.total_gib
        layout = kv_layout(kinds, hybrid or all_sliding)
        page = block * per_layer * layout.group_size
        blocks = max(0, int(avail * GIB // page)) if avail > 0 else 0
        stages.append(StageResult(s, n, w.gib, res, budget, avail, blocks, layout))
    worst = min(stages, key=lambda st: st.num_blocks)
    num_blocks = worst.num_blocks
    layout = worst.layout
    window = shape.sliding_window if (hybrid or all_sliding) else None
    per_req = blocks_per_request(layout, max_len, block, window, eng.profile_tokens)
    concurrency = num_blocks / per_req if per_req else 0.0
    if eng.new_token_log:
        # vLLM >= 0.20.1 logs int(max_concurrency x max_model_len) whatever the layout.
        tokens = int(concurrency * max_len)
    else:
        tokens = num_blocks // len(layout.groups) * block
    if not eng.v1:
        concurrency = tokens / max_len
    kv_token_bytes = kv_bytes_per_token(shape, tp, req.kv_cache_dtype, pp)

    reasons: list[str] = []
    warnings: list[str] = []
    heaviest = max(stages, key=lambda st: st.weights_gib)
    if heaviest.weights_gib >= budget:
        largest = max(g.total_gib for g in req.gpus)
        reasons.append(
            f"needs {heaviest.weights_gib:.1f} GiB for weights at TP={tp}"
            f"{f' PP={pp}' if pp > 1 else ''}; largest GPU offers {largest * util:.1f} GiB at "
            f"utilization {util:.2f}"
        )
    elif worst.available_kv_gib <= 0 or num_blocks == 0:
        reasons.append(
            f"no memory left for the KV cache at TP={tp}: {budget:.1f} GiB budget - "
            f"{worst.weights_gib:.1f} GiB weights - {worst.reserve.total_gib:.1f} GiB reserve = "
            f"{worst.available_kv_gib:.2f} GiB"
        )
    elif per_req > num_blocks:
        reasons.append(
            f"max_model_len {max_len:,} needs {per_req:,} KV blocks per request at TP={tp}; only "
            f"{num_blocks:,} fit ({worst.available_kv_gib:.2f} GiB available for the KV cache)"
        )
    refusal = free_memory_refusal(gpu, util)
    if refusal is not None:
        reasons.append(refusal)
    outside = (gpu.free_gib if gpu.free_gib is not None else gpu.total_gib) - budget
    context = CONTEXT_GIB_MULTI if world > 1 else CONTEXT_GIB_SINGLE
    graphs = 0.0 if (eng.cudagraph_in_budget or req.enforce_eager) else worst.reserve.cudagraph_gib
    if outside < context + graphs:
        what = f"the CUDA context (~{context:.2f} GiB)"
        if graphs:
            what += f" and CUDA graphs (~{graphs:.2f} GiB, captured after the KV cache)"
        fix = "; enforce_eager skips the capture" if graphs else ""
        lower = (gpu.total_gib - context - graphs) / gpu.total_gib
        if graphs and lower > 0 and gpu.free_gib is None:
            fix += f" (or gpu_memory_utilization <= {math.floor(lower * 100) / 100:.2f})"
        reasons.append(
            f"{what} need memory outside gpu_memory_utilization; only {outside:.2f} GiB is left "
            f"({gpu.total_gib:.2f} GiB x (1 - {util:.2f})){fix}"
        )
    elif outside < context + graphs + 0.5:
        warnings.append(
            f"only {outside - context - graphs:.2f} GiB headroom outside gpu_memory_utilization"
        )
    if req.engine == "auto" and not eng.v1 and gate_open("v1_default", eng.version):
        warnings.append(
            f"vLLM {req.vllm_version} falls back to the V0 engine on {gpu.name} (compute "
            "capability < 8.0): V0's profile run and block arithmetic apply"
        )
    if eng.v1 and not hybrid and shape.is_hybrid and not eng.hybrid_allocator:
        warnings.append(
            "sliding-window layers are cached as full attention before vLLM "
            f"{_GATES['hybrid_kv_cache_manager'].since_text}"
        )
    fits = not reasons
    best_len = _largest_len(req, shape, tp, max_len, num_blocks, layout, window, eng)
    result_weights = heaviest.weights_gib
    lines = _explain_lines(
        req,
        shape,
        tp,
        eng,
        stages,
        worst,
        gpu,
        budget,
        per_layer,
        num_blocks,
        tokens,
        per_req,
        concurrency,
        max_len,
        best_len,
        reasons,
        warnings,
        nvlink,
    )
    return FitResult(
        fits=fits,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        weights_gib_per_gpu=result_weights,
        kv_bytes_per_token_per_gpu=kv_token_bytes,
        reserve_gib_per_gpu=max(st.reserve.total_gib for st in stages),
        available_kv_gib_per_gpu=min(st.available_kv_gib for st in stages),
        kv_cache_tokens=tokens,
        num_gpu_blocks=num_blocks,
        max_concurrency=concurrency,
        max_model_len=max_len,
        max_model_len_that_fits=best_len,
        reasons=tuple(reasons),
        warnings=tuple(warnings),
        stages=tuple(stages),
        lines=tuple(lines),
    )


def _largest_len(
    req: FitRequest,
    shape: ModelShape,
    tp: int,
    max_len: int,
    num_blocks: int,
    layout: KvLayout,
    window: int | None,
    eng: EngineProfile,
) -> int:
    """Largest max_model_len (up to the model's limit) whose request fits in the KV cache."""
    limit = max(shape.max_model_len, max_len)
    block = req.block_size

    def blocks_for(length: int) -> int:
        if eng.v1:
            return num_blocks
        # V0 profiles max(max_model_len, 2048) tokens, so the reserve moves with the length.
        r = _evaluate_blocks_v0(req, shape, tp, length)
        return r

    def ok(length: int) -> bool:
        blocks = blocks_for(length)
        return blocks_per_request(layout, length, block, window, eng.profile_tokens) <= blocks

    if not ok(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _evaluate_blocks_v0(req: FitRequest, shape: ModelShape, tp: int, length: int) -> int:
    pp = req.pipeline_parallel_size
    gpus = req.gpus[: tp * pp]
    gpu = min(gpus, key=lambda g: g.total_gib)
    eng = engine_profile(req, shape, length)
    per_layer = kv_bytes_per_token_per_layer(shape, tp, req.kv_cache_dtype)
    nvlink = req.nvlink if req.nvlink is not None else gpu.total_gib >= 70
    blocks = []
    for s, n in enumerate(_stage_layers(shape.num_layers, pp)):
        w = weight_bytes(shape, tp, pp, s)
        res = reserve_for_stage(shape, eng, tp, pp, s, n, nvlink, req.enforce_eager)
        avail = gpu.total_gib * req.gpu_memory_utilization - w.gib - res.total_gib
        blocks.append(max(0, int(avail * GIB // (req.block_size * per_layer * n))))
    return min(blocks)


def _explain_lines(
    req: FitRequest,
    shape: ModelShape,
    tp: int,
    eng: EngineProfile,
    stages: list[StageResult],
    worst: StageResult,
    gpu: GpuMemory,
    budget: float,
    per_layer: int,
    num_blocks: int,
    tokens: int,
    per_req: int,
    concurrency: float,
    max_len: int,
    best_len: int,
    reasons: list[str],
    warnings: list[str],
    nvlink: bool,
) -> list[str]:
    pp = req.pipeline_parallel_size
    attn = (
        f"MLA latent {shape.mla.kv_lora_rank}+{shape.mla.qk_rope_head_dim}"
        if shape.mla
        else f"{shape.num_heads} heads / {shape.num_kv_heads} KV heads x {shape.head_dim}"
    )
    moe = (
        f", MoE {shape.moe.num_experts} experts top-{shape.moe.top_k} on "
        f"{len(shape.moe_layers)} layers"
        if shape.moe
        else ""
    )
    sliding = shape.layer_kinds.count("sliding")
    lines = [
        f"model: {shape.model_type}, {shape.num_layers} layers, hidden {shape.hidden_size}, "
        f"{attn}{moe}, vocab {shape.vocab_size:,}"
        + (f", {sliding} sliding-window layers (window {shape.sliding_window})" if sliding else ""),
        f"weights: {shape.quant.name} ({shape.quant.detail}); KV cache dtype {req.kv_cache_dtype}",
        f"engine: vLLM {'.'.join(map(str, eng.version))} {'V1' if eng.v1 else 'V0'}; "
        f"profile run of {eng.profile_tokens:,} tokens, max_num_seqs {eng.max_num_seqs}"
        + ("" if eng.v1 else f" ({'chunked' if eng.chunked_prefill else 'no chunked'} prefill)")
        + (
            f"; performance_mode {req.performance_mode}"
            if req.performance_mode != "balanced"
            else ""
        )
        + ("; enforce_eager" if req.enforce_eager else ""),
        f"parallel: TP={tp} x PP={pp} = {tp * pp} of {len(req.gpus)} GPU(s); "
        f"GPU {gpu.total_gib:.2f} GiB"
        + (f" ({gpu.free_gib:.2f} GiB free)" if gpu.free_gib is not None else "")
        + (", NVLink" if nvlink and tp > 1 else ""),
        f"budget per GPU: {gpu.total_gib:.2f} GiB x {req.gpu_memory_utilization:.2f} = "
        f"{budget:.2f} GiB",
    ]
    elem = _kv_elem_bytes(shape, req.kv_cache_dtype)
    if shape.mla:
        kv_expr = (
            f"({shape.mla.kv_lora_rank} + {shape.mla.qk_rope_head_dim}) latent x {elem} B "
            "(one latent per layer, not split by TP)"
        )
    else:
        heads = kv_heads_per_gpu(shape, tp)
        note = " (replicated: TP exceeds KV heads)" if tp > shape.num_kv_heads else ""
        kv_expr = f"2 (K,V) x {heads} KV heads{note} x {shape.head_dim} x {elem} B"
    for st in stages:
        prefix = f"stage {st.stage}: " if pp > 1 else ""
        r = st.reserve
        graphs = f" + CUDA graphs {r.cudagraph_gib:.2f}" if r.cudagraph_in_budget else ""
        lines += [
            f"{prefix}weights per GPU: {st.weights_gib:.2f} GiB ({st.layers} layers)",
            f"{prefix}KV per token per GPU: {kv_expr} = {per_layer:,} B/layer x {st.layers} "
            f"layers = {per_layer * st.layers:,} B",
            f"{prefix}reserve: activation peak {r.activation_gib:.2f} GiB (max of forward "
            f"{r.forward_gib:.2f}, sampler {r.sampler_gib:.2f}, encoder {r.encoder_gib:.2f}) + "
            f"non-torch {r.non_torch_gib:.2f}{graphs} = {r.total_gib:.2f} GiB",
            f"{prefix}available KV: {budget:.2f} - {st.weights_gib:.2f} - {r.total_gib:.2f} = "
            f"{st.available_kv_gib:.2f} GiB -> {st.num_blocks:,} blocks of {req.block_size} tokens"
            + (
                f" ({len(st.layout.groups)} groups of {st.layout.group_size} layers, "
                f"{st.layout.padding_layers} padding)"
                if len(st.layout.groups) > 1
                else ""
            ),
        ]
    if not worst.reserve.cudagraph_in_budget and not req.enforce_eager:
        nccl = tp > 2 and not nvlink
        lines.append(
            f"CUDA graphs: ~{worst.reserve.cudagraph_gib:.2f} GiB captured after the KV cache, "
            "outside the utilization budget (vLLM < 0.20.0)"
            + (
                f"; {len(capture_sizes(eng))} graphs x {worst.layers} layers x 2 NCCL "
                "all-reduces over PCIe included"
                if nccl
                else ""
            )
        )
    lines += [
        f"KV cache: {num_blocks:,} blocks = {tokens:,} tokens",
        f"max concurrency at {max_len:,} tokens: {num_blocks:,} / {per_req:,} blocks per request "
        f"= {concurrency:.2f}x",
        f"largest max_model_len that fits: {best_len:,}",
    ]
    lines += [f"warning: {w}" for w in warnings]
    if reasons:
        lines += [f"does not fit: {r}" for r in reasons]
    else:
        lines.append(f"fits: TP={tp} with {tokens:,} KV tokens")
    return lines


def misfit_message(result: FitResult, req: FitRequest) -> str:
    """One line for an operator: what is needed, what is there, and what would fit."""
    if result.fits:
        failed = [why for tp, why in result.tp_candidates if why != "fits"]
        tokens = (
            f"{result.kv_cache_tokens:,} KV tokens "
            f"({result.max_concurrency:.2f}x at {result.max_model_len:,})"
        )
        tp = result.tensor_parallel_size
        return (
            f"{failed[0]}; TP={tp} fits with {tokens}"
            if failed
            else f"fits at TP={tp} with {tokens}"
        )
    message = result.reasons[0] if result.reasons else "does not fit"
    if req.tensor_parallel_size == "auto":
        return message
    shape = model_shape(req.config, req.quantization, req.dtype)
    for tp in valid_tensor_parallel_sizes(shape, len(req.gpus) // req.pipeline_parallel_size):
        if tp == result.tensor_parallel_size:
            continue
        other = _evaluate(req, shape, tp, result.max_model_len)
        if other.fits:
            return f"{message}; TP={tp} fits with {other.kv_cache_tokens:,} KV tokens"
    return message
