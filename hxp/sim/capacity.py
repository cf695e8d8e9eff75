"""The simulator's capacity: how many KV-cache tokens the vLLM it imitates would get.

``hxp-vllm-sim`` pretends to be a vLLM of some version serving some model on some GPU. With
``--model-config`` (the model's config.json) the KV-cache size comes from the resource
calculator (``hxp.resources.fit``) for that model, GPU (``--gpu-memory-gib``, ``--gpu-name``),
``--gpu-memory-utilization``, ``--tensor-parallel-size`` and ``--max-model-len``, times
``--kv-skew`` (default 1: a test makes the "measured" memory differ from the prediction, as a
real start-up does). ``--kv-cache-memory-bytes`` stands for vLLM's flag: the memory is taken as
given (no profiling) and the tokens follow from it. Without a config the double assumes
DEFAULT_KV_BYTES_PER_TOKEN. ``--kv-cache-tokens`` overrides everything (tests).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from hxp.calibration import BLOCK_TOKENS, GIB, VersionTuple, startup_kv_lines
from hxp.errors import InputError
from hxp.resources import CONTEXT_GIB_SINGLE as CONTEXT_GIB
from hxp.resources import FitRequest, GpuMemory, fit, load_model_config

#: KV bytes per token when no config.json is given: Llama-3-8B in bf16 (32 layers x 8 KV
#: heads x 128 x K and V x 2 bytes).
DEFAULT_KV_BYTES_PER_TOKEN = 131072
DEFAULT_KV_CACHE_TOKENS = 65536


@dataclass(frozen=True)
class SimCapacity:
    kv_cache_tokens: int
    available_kv_bytes: int
    max_concurrency: float
    pinned: bool
    source: str
    free_gib: float | None = None  # what a pinned start reports as the GPU's free memory


def parse_version(text: str) -> VersionTuple:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        return (0, 34, 0)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


def _blocks_tokens(kv_bytes: int, bytes_per_token: float) -> int:
    blocks = int(kv_bytes // (bytes_per_token * BLOCK_TOKENS))
    return max(0, blocks) * BLOCK_TOKENS


def resolve_capacity(
    *,
    version: str,
    max_model_len: int,
    model_config: str | None,
    gpu_memory_gib: float,
    gpu_name: str | None,
    gpu_memory_utilization: float,
    tensor_parallel_size: int,
    kv_skew: float,
    kv_cache_memory_bytes: int | None,
    kv_cache_tokens: int | None,
) -> SimCapacity:
    """The double's KV capacity; InputError naming the flag when the inputs do not fit."""
    pinned = kv_cache_memory_bytes is not None
    if model_config is None:
        if kv_cache_tokens is not None:
            tokens, source = kv_cache_tokens, "--kv-cache-tokens"
            avail = tokens * DEFAULT_KV_BYTES_PER_TOKEN
        elif kv_cache_memory_bytes is not None:
            avail = kv_cache_memory_bytes
            tokens = _blocks_tokens(avail, DEFAULT_KV_BYTES_PER_TOKEN)
            source = "--kv-cache-memory-bytes at 128 KiB per token"
        else:
            tokens, source = DEFAULT_KV_CACHE_TOKENS, "default"
            avail = tokens * DEFAULT_KV_BYTES_PER_TOKEN
        return SimCapacity(tokens, avail, tokens / max_model_len, pinned, source)
    config = load_model_config(Path(model_config))
    request = FitRequest(
        config=config,
        gpus=(GpuMemory(gpu_memory_gib, None, gpu_name),) * tensor_parallel_size,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
        vllm_version=".".join(map(str, parse_version(version))),
    )
    result = fit(request)
    base = result.available_kv_gib_per_gpu * GIB
    if base <= 0 or result.num_gpu_blocks == 0:
        raise InputError(
            f"--model-config: {model_config} leaves no KV-cache memory on a "
            f"{gpu_memory_gib:g} GiB GPU at utilization {gpu_memory_utilization:g}: "
            + "; ".join(result.reasons)
        )
    if kv_cache_memory_bytes is not None:
        avail = kv_cache_memory_bytes
        source = "calculator, --kv-cache-memory-bytes"
    else:
        avail = int(base * kv_skew)
        source = f"calculator x {kv_skew:g}" if kv_skew != 1 else "calculator"
    layout = min(result.stages, key=lambda st: st.num_blocks).layout
    if avail == int(base):
        tokens = result.kv_cache_tokens
    elif len(layout.groups) == 1:  # one KV-cache group: whole 16-token pages of every layer
        tokens = _blocks_tokens(avail, result.kv_bytes_per_token_per_gpu)
    else:  # hybrid groups: the calculator's tokens scale with the pages
        blocks = int(result.num_gpu_blocks * avail / base)
        tokens = int(result.kv_cache_tokens * blocks / result.num_gpu_blocks)
    if kv_cache_tokens is not None:
        tokens, source = kv_cache_tokens, "--kv-cache-tokens"
    if tokens < max_model_len:
        raise InputError(
            f"--max-model-len: {max_model_len} is larger than the {tokens} tokens the KV cache "
            "holds (vLLM refuses to start)"
        )
    free = gpu_memory_gib - CONTEXT_GIB
    return SimCapacity(tokens, avail, tokens / result.max_model_len, pinned, source, free)


def kv_log_lines(capacity: SimCapacity, version: str, max_model_len: int) -> list[str]:
    """The start-up lines the imitated vLLM version prints for this capacity."""
    return startup_kv_lines(
        parse_version(version),
        capacity.available_kv_bytes,
        capacity.kv_cache_tokens,
        max_model_len,
        capacity.max_concurrency,
        pinned=capacity.pinned,
        free_gib=capacity.free_gib,
    )


def add_capacity_args(parser: argparse.ArgumentParser) -> None:
    """The double's capacity flags (vLLM's own spelling where vLLM has the flag)."""
    add = parser.add_argument
    add("--kv-cache-tokens", type=int, default=None,
        help="KV capacity in tokens; overrides the calculator (default: from --model-config, "
        f"else {DEFAULT_KV_CACHE_TOKENS})")  # fmt: skip
    add(
        "--model-config",
        default=None,
        metavar="FILE",
        help="config.json of the model it pretends to serve: KV capacity from the calculator",
    )
    add(
        "--gpu-memory-gib", type=float, default=80.0, help="GPU it pretends to run on (%(default)s)"
    )
    add("--gpu-name", default=None, help="that GPU's name, as nvidia-smi prints it")
    add("--gpu-memory-utilization", type=float, default=0.9, help="as vLLM's (%(default)s)")
    add("--tensor-parallel-size", type=int, default=1, help="as vLLM's (%(default)s)")
    add("--kv-cache-memory-bytes", type=int, default=None,
        help="as vLLM's (from 0.10.2): KV memory per GPU, taken as given")  # fmt: skip
    add("--kv-skew", type=float, default=1.0,
        help="measured KV memory / the calculator's prediction (default %(default)s)")  # fmt: skip
    add("--engine-tokens-per-second", type=float, default=0.0,
        help="token budget of the whole engine, shared by running requests; 0: none")  # fmt: skip


def capacity_from_args(
    parser: argparse.ArgumentParser, ns: argparse.Namespace
) -> tuple[int, tuple[str, ...]]:
    """KV tokens and the start-up lines, or a usage error naming the flag (exit 2)."""
    checks = [
        (ns.gpu_memory_gib > 0, "--gpu-memory-gib must be > 0"),
        (0 < ns.gpu_memory_utilization <= 1, "--gpu-memory-utilization must be within (0, 1]"),
        (ns.tensor_parallel_size >= 1, "--tensor-parallel-size must be >= 1"),
        (ns.kv_skew > 0, "--kv-skew must be > 0"),
        (ns.kv_cache_memory_bytes is None or ns.kv_cache_memory_bytes > 0,
         "--kv-cache-memory-bytes must be > 0"),
        (ns.engine_tokens_per_second >= 0, "--engine-tokens-per-second must be >= 0"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            parser.error(message)
    try:
        capacity = resolve_capacity(
            version=ns.version,
            max_model_len=ns.max_model_len,
            model_config=ns.model_config,
            gpu_memory_gib=ns.gpu_memory_gib,
            gpu_name=ns.gpu_name,
            gpu_memory_utilization=ns.gpu_memory_utilization,
            tensor_parallel_size=ns.tensor_parallel_size,
            kv_skew=ns.kv_skew,
            kv_cache_memory_bytes=ns.kv_cache_memory_bytes,
            kv_cache_tokens=ns.kv_cache_tokens,
        )
    except InputError as exc:
        message = str(exc)
        parser.error(message if message.startswith("--") else f"--model-config: {message}")
    lines = kv_log_lines(capacity, ns.version, ns.max_model_len)
    return capacity.kv_cache_tokens, tuple(lines)


def capacity_parser() -> argparse.ArgumentParser:
    """A parser of the capacity flags alone (with --max-model-len), for reading a double's argv."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--max-model-len", type=int, default=4096)
    add_capacity_args(parser)
    return parser
