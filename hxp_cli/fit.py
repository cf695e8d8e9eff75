"""`hxp fit`: will a model fit on these GPUs under vLLM, and with how much KV cache."""

from __future__ import annotations

import argparse
import json
from typing import Any


def tp_arg(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return value


def cmd_fit(args: argparse.Namespace) -> int:
    from hxp.resources import FitRequest, GpuMemory, fit, load_model_config, misfit_message

    tp = args.tensor_parallel_size
    request = FitRequest(
        config=load_model_config(args.config),
        gpus=(GpuMemory(args.gpu_memory_gib, args.gpu_free_gib, args.gpu_name),) * args.gpus,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size="auto" if tp == "auto" else int(tp),
        pipeline_parallel_size=args.pipeline_parallel_size,
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        vllm_version=args.vllm_version,
        enforce_eager=args.enforce_eager,
    )
    result = fit(request)
    message = misfit_message(result, request)
    if args.json:
        print(json.dumps({**result.to_dict(), "message": message}, indent=2, sort_keys=True))
    else:
        print(result.explain())
        print(message)
    return 0 if result.fits else 1


def register_fit(sub: Any) -> None:
    p = sub.add_parser(
        "fit",
        help="will a model fit on these GPUs under vLLM, and with how much KV cache",
        description="Exit 0 if it fits, 1 if it does not, 2 on bad input.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the model's config.json")
    p.add_argument("--gpus", type=int, required=True, metavar="N", help="number of GPUs")
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        required=True,
        metavar="G",
        help="total memory per GPU in GiB, as torch reports it (e.g. 79.19 on an H100)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, required=True, metavar="U")
    p.add_argument("--max-model-len", type=int, required=True, metavar="L")
    p.add_argument(
        "--tensor-parallel-size",
        type=tp_arg,
        default="auto",
        metavar="T|auto",
        help="'auto' picks the smallest size that fits (default)",
    )
    p.add_argument("--pipeline-parallel-size", type=int, default=1, metavar="P")
    p.add_argument("--dtype", default="auto", metavar="D")
    p.add_argument(
        "--quantization",
        default=None,
        metavar="Q",
        help="override config.json's quantization_config (e.g. fp8)",
    )
    p.add_argument("--kv-cache-dtype", default="auto", metavar="K")
    p.add_argument("--max-num-seqs", type=int, default=None, metavar="S")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="B")
    p.add_argument("--vllm-version", default="0.11.0", metavar="V")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument(
        "--gpu-free-gib",
        type=float,
        default=None,
        metavar="F",
        help="memory free on each GPU before vLLM starts (default: all of it)",
    )
    p.add_argument(
        "--gpu-name",
        default=None,
        metavar="NAME",
        help="e.g. 'NVIDIA A100-SXM4-80GB' (vLLM's batch defaults exclude A100s)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_fit)
