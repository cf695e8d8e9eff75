"""Print what GPU discovery finds on this machine, and where a small model would be placed.

    .venv/bin/python bench/gpu_check.py [--declare-gib 80 ...] [--hold-gib 20]

Without an NVIDIA driver (no NVML) it says so and falls back to the GPUs given with
--declare-gib (default: none), exactly as a deploy with `gpus: auto` would.

With --hold-gib N (and PyTorch with CUDA present) it also checks discovery against a real
workload: a second process takes N GiB on GPU 0, discovery must list that process and the lower
free memory, and the calculator's start check (the one a rolling restart's surge asks) must
refuse a vLLM start that needs more than what is left. It measures the CUDA context PyTorch
costs on the GPU too (the calculator assumes CONTEXT_GIB_SINGLE).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hxp.errors import GpuAllocationError
from hxp.gpu_alloc import GpuInfo, choose_gpus
from hxp.io.gpus import describe, discover_gpus
from hxp.spec import GpuSpec, HostSpec, ModelSpec

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
    parser.add_argument(
        "--hold-gib",
        type=float,
        default=0.0,
        help="hold this much memory on GPU 0 from a second process and discover again",
    )
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
    if args.hold_gib and found.source == "nvml" and found.devices:
        return held_check(host, args.hold_gib, args.utilization)
    return 0


_HOLDER = """
import sys, time, torch
x = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda:0")
torch.cuda.synchronize()
print("held", flush=True)
time.sleep(600)
"""

_CONTEXT = """
import pynvml, torch
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
before = pynvml.nvmlDeviceGetMemoryInfo(h).used
torch.zeros(1, device="cuda:0")
torch.cuda.synchronize()
after = pynvml.nvmlDeviceGetMemoryInfo(h).used
print((after - before - torch.cuda.memory_reserved(0)) / 2**30)
"""


_TOTALS = """
import pynvml, torch
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
v1 = pynvml.nvmlDeviceGetMemoryInfo(h)
v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
free, total = torch.cuda.mem_get_info(0)
print(v1.total, v2.total, v2.reserved, total)
"""


def held_check(host: HostSpec, gib: float, utilization: float) -> int:
    """Discovery and the start check while another process holds `gib` GiB on GPU 0."""
    import subprocess

    from hxp.resources import CONTEXT_GIB_SINGLE, GpuMemory, start_refusal

    context = subprocess.run(
        [sys.executable, "-c", _CONTEXT], capture_output=True, text=True, check=False
    )
    if context.returncode != 0:
        print(f"CUDA context: not measured ({context.stderr.strip().splitlines()[-1:]})")
        return 1
    print(
        f"CUDA context (PyTorch, outside its allocator): {float(context.stdout):.2f} GiB "
        f"(the calculator assumes {CONTEXT_GIB_SINGLE:.2f})"
    )
    totals = subprocess.run(
        [sys.executable, "-c", _TOTALS], capture_output=True, text=True, check=False
    )
    before = discover_gpus("local", host).devices[0]
    if totals.returncode == 0:
        v1, v2, reserved, cuda = (int(x) for x in totals.stdout.split())
        print(
            f"total memory: NVML v1 {v1 / 2**30:.3f} GiB, NVML v2 {v2 / 2**30:.3f} - reserved "
            f"{reserved / 2**30:.3f}, CUDA {cuda / 2**30:.3f}, "
            f"discovery {before.total_bytes / 2**30:.3f}"
            f" ({'matches CUDA' if before.total_bytes == cuda else 'differs from CUDA'})"
        )
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(gib)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != "held":
            print("holder process failed to take the memory")
            return 1
        during = discover_gpus("local", host).devices[0]
        gib_b = 1024**3
        drop = ((before.free_bytes or 0) - (during.free_bytes or 0)) / gib_b
        listed = [p for p in during.processes if p.pid == holder.pid]
        print(
            f"while pid {holder.pid} holds {gib:g} GiB: free {(before.free_bytes or 0) / gib_b:.2f}"
            f" -> {(during.free_bytes or 0) / gib_b:.2f} GiB (drop {drop:.2f}); processes listed: "
            + ", ".join(
                f"{p.pid} ({(p.used_bytes or 0) / gib_b:.2f} GiB)" for p in during.processes
            )
        )
        memory = GpuMemory(
            total_gib=during.total_bytes / gib_b,
            free_gib=(during.free_bytes or 0) / gib_b,
            name=during.name,
        )
        why = start_refusal(memory, utilization)
        print(f"start check at gpu_memory_utilization {utilization:g}: {why or 'can start'}")
        ok = bool(listed) or not during.processes  # some drivers hide other PIDs (containers)
        ok = ok and drop >= gib * 0.98
        wanted = memory.free_gib < memory.total_gib * utilization
        ok = ok and (why is not None) == wanted
        print(f"held-memory check: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        holder.kill()
        holder.wait()


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
