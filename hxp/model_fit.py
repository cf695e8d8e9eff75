"""A stack's model as a question for the GPU calculator (pure): the FitRequest that `hxp fit -f`
and `hxp status` ask of hxp.resources, from the model's `vllm:` settings and the GPUs one replica
gets on its host (as discovered or declared)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast, get_args

from hxp.errors import InputError
from hxp.gpu_alloc import GpuInfo
from hxp.resources import GIB, FitRequest, GpuMemory, PerformanceMode
from hxp.spec import ModelSpec
from hxp.vllm import replica_gpus


@dataclass(frozen=True)
class EngineFlags:
    """The calculator-relevant vLLM flags a model passes through `vllm.extra_args`."""

    performance_mode: PerformanceMode | None = None
    enable_chunked_prefill: bool | None = None


def engine_flags(extra_args: Sequence[str], where: str) -> EngineFlags:
    """`--performance-mode MODE` (or `=MODE`) and `--[no-]enable-chunked-prefill` in `extra_args`;
    the last one given wins, as on vLLM's own command line."""
    mode: str | None = None
    chunked: bool | None = None
    args = list(extra_args)
    for i, arg in enumerate(args):
        if arg == "--performance-mode":
            mode = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith("--performance-mode="):
            mode = arg.partition("=")[2]
        elif arg == "--enable-chunked-prefill":
            chunked = True
        elif arg == "--no-enable-chunked-prefill":
            chunked = False
    modes = get_args(PerformanceMode)
    if mode is not None and mode not in modes:
        raise InputError(f"{where}: --performance-mode {mode!r} is not one of {', '.join(modes)}")
    return EngineFlags(cast("PerformanceMode | None", mode), chunked)


def replica_devices(
    model: ModelSpec, name: str, devices: Sequence[GpuInfo], host_note: str = ""
) -> tuple[GpuMemory, ...]:
    """The GPUs one replica of `model` runs on: the ones it lists (replica 0's slice), else as
    many of the host's as its tensor x pipeline size needs (`auto`: the host's GPUs shared out
    over its replicas, for the calculator to pick the smallest TP that fits). Total memory and
    name only: what the model's own replicas use now is no reason for it not to fit."""
    where = f"models.{name}"
    if not devices:
        raise InputError(
            f"{where}: host {model.host!r} has no GPUs, none discovered and none declared under "
            f"hosts.{model.host}.gpus{f' ({host_note})' if host_note else ''}; declare them, "
            "or ask ad hoc with --gpus and --gpu-memory-gib"
        )
    by_index = {d.index: d for d in devices}
    listed = replica_gpus(model, 0)
    if listed is not None:
        missing = [i for i in listed if i not in by_index]
        if missing:
            raise InputError(f"{where}.gpus: host {model.host!r} has no GPU {missing}")
        chosen = [by_index[i] for i in listed]
    else:
        ordered = [by_index[i] for i in sorted(by_index)]
        tp = model.vllm.tensor_parallel_size
        if tp == "auto":
            count = max(1, len(ordered) // model.replicas)
        else:
            count = tp * model.vllm.pipeline_parallel_size
            if count > len(ordered):
                raise InputError(
                    f"{where}.vllm: tensor x pipeline parallel size needs {count} GPUs; host "
                    f"{model.host!r} has {len(ordered)}"
                )
        chosen = ordered[:count]
    return tuple(GpuMemory(d.total_bytes / GIB, None, d.name) for d in chosen)


def fit_request_for(
    model: ModelSpec,
    name: str,
    config: Mapping[str, Any],
    gpus: Sequence[GpuMemory],
    **overrides: Any,
) -> FitRequest:
    """The calculator's request for one replica of the stack's model `name`; `overrides` (the
    FitRequest's own field names) win over the stack, as a flag on `hxp fit`'s command line."""
    v = model.vllm
    flags = engine_flags(v.extra_args, f"models.{name}.vllm.extra_args")
    tp = v.tensor_parallel_size
    if tp == "auto" and isinstance(model.gpus, list) and model.gpus:
        tp = model.gpus_per_replica() // v.pipeline_parallel_size or 1
    values: dict[str, Any] = {
        "config": config,
        "gpus": tuple(gpus),
        "max_model_len": v.max_model_len,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": v.pipeline_parallel_size,
        "dtype": v.dtype,
        "quantization": v.quantization,
        "kv_cache_dtype": v.kv_cache_dtype,
        "max_num_seqs": v.max_num_seqs,
        "max_num_batched_tokens": v.max_num_batched_tokens,
        "vllm_version": v.version,
        "enforce_eager": v.enforce_eager,
        "performance_mode": flags.performance_mode or "balanced",
        "enable_chunked_prefill": flags.enable_chunked_prefill,
    }
    values.update({k: val for k, val in overrides.items() if val is not None})
    return FitRequest(**values)
