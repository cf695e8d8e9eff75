"""Print what GPU discovery finds on this machine, and where a small model would be placed.

    .venv/bin/python bench/gpu_check.py [--declare-gib 80 ...]

Without an NVIDIA driver (no NVML) it says so and falls back to the GPUs given with
--declare-gib (default: none), exactly as a deploy with `gpus: auto` would.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hxp.errors import GpuAllocationError
from hxp.gpu_alloc import GpuInfo, choose_gpus
from hxp.spec import GpuSpec, HostSpec, ModelSpec
from tasks.gpus import describe, discover_gpus

SMALL_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
# Its config.json (the fields the memory calculator reads), as published on the Hub.
SMALL_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--declare-gib",
        type=float,
        action="append",
        default=[],
        help="declare a GPU of this many GiB for the fallback (repeatable)",
    )
    parser.add_argument("--utilization", type=float, default=0.9)
    args = parser.parse_args(argv)
    host = HostSpec(
        gpus=[GpuSpec(index=i, memory_gib=gib) for i, gib in enumerate(args.declare_gib)]
    )
    found = discover_gpus("local", host)
    print(f"GPU discovery: {len(found.devices)} GPU(s) from {found.source}")
    if found.note:
        print(f"  note: {found.note}")
    for line in describe(found):
        print(f"  {line}")
        for d in found.devices:
            if line.startswith(f"GPU {d.index}:"):
                for p in d.processes:
                    used = f"{p.used_bytes / 1024**3:.1f} GiB" if p.used_bytes else "?"
                    print(f"    pid {p.pid}: {used}")
    model = ModelSpec(
        host="local",
        model=SMALL_MODEL,
        vllm={"gpu_memory_utilization": args.utilization, "tensor_parallel_size": 1},  # type: ignore[arg-type]
    )
    calculator_view(found.devices, args.utilization)
    try:
        chosen = choose_gpus(found.devices, [], model, 1, "bench", "small", "models.small")
        print(
            f"placement of {SMALL_MODEL} (gpu_memory_utilization {args.utilization:g}): "
            f"GPU {chosen[0]}"
        )
    except GpuAllocationError as exc:
        print(f"placement of {SMALL_MODEL}: none ({exc})")
    return 0


def calculator_view(devices: list[GpuInfo], utilization: float) -> None:
    """hxp.resources' verdict for the small model on the first GPU found (when it exists)."""
    try:
        from hxp import resources
    except ImportError:
        return
    if not devices:
        print("memory calculator: no GPU to evaluate the model on")
        return
    d = devices[0]
    gib = 1024**3
    gpu = resources.GpuMemory(
        total_gib=d.total_bytes / gib,
        free_gib=None if d.free_bytes is None else d.free_bytes / gib,
        name=d.name,
    )
    try:
        result = resources.fit(
            resources.FitRequest(
                config=SMALL_CONFIG, gpus=(gpu,), gpu_memory_utilization=utilization
            )
        )
    except Exception as exc:  # the calculator's own input errors
        print(f"memory calculator: {type(exc).__name__}: {exc}")
        return
    verdict = "fits" if result.fits else "does NOT fit"
    print(
        f"memory calculator: {SMALL_MODEL} {verdict} on GPU {d.index}: "
        f"{result.weights_gib_per_gpu:.2f} GiB weights, "
        f"{result.available_kv_gib_per_gpu:.2f} GiB KV cache, "
        f"{result.kv_cache_tokens} tokens, max concurrency {result.max_concurrency:.1f}"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
