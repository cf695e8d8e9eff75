"""`hxp fit`: will a model fit on these GPUs under vLLM, and with how much KV cache.

Two ways to ask: from the stack (`hxp fit -f stack.yaml [MODEL]`: the model's `vllm:` settings,
its config.json from the Hugging Face cache, the GPUs of its host as discovered or declared),
or ad hoc (`--config FILE --gpus N --gpu-memory-gib G ...`). A flag given with `-f` wins over the
stack's value.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hxp_cli.common import add_stack_args, files, load

#: Flags that override the stack's value (None: not given); their FitRequest field names.
OVERRIDES = {
    "max_model_len": "max_model_len",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "dtype": "dtype",
    "quantization": "quantization",
    "kv_cache_dtype": "kv_cache_dtype",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "vllm_version": "vllm_version",
    "enforce_eager": "enforce_eager",
    "performance_mode": "performance_mode",
    "enable_chunked_prefill": "enable_chunked_prefill",
}
#: Ad hoc defaults (the calculator's own) for what the stack would otherwise say.
AD_HOC_DEFAULTS: dict[str, Any] = {
    "tensor_parallel_size": "auto",
    "pipeline_parallel_size": 1,
    "dtype": "auto",
    "kv_cache_dtype": "auto",
    "vllm_version": "0.11.0",
    "enforce_eager": False,
    "performance_mode": "balanced",
}
AD_HOC_REQUIRED = ("gpus", "gpu_memory_gib", "gpu_memory_utilization", "max_model_len")


def tp_arg(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {field: getattr(args, flag) for flag, field in OVERRIDES.items()}
    tp = values["tensor_parallel_size"]
    if tp is not None and tp != "auto":
        values["tensor_parallel_size"] = int(tp)
    return values


def host_devices(stack: Any, host_name: str) -> tuple[list[Any], str]:
    """The host's GPUs: NVML on this machine for a local host, else (or without a driver) the
    ones declared under `hosts.<name>.gpus`; and where they came from."""
    from hxp.gpu_alloc import declared_gpus

    host = stack.hosts[host_name]
    declared = declared_gpus(host)
    if host.runner != "local":
        return declared, f"declared (host {host_name!r} is reached by {host.runner})"
    from hxp.io.gpus import NvmlProbe

    try:
        found = NvmlProbe().devices()
    except Exception as exc:  # no library, no driver, no device nodes
        return declared, f"declared (NVML unavailable: {type(exc).__name__})"
    return found, "discovered (NVML)"


@dataclass(frozen=True)
class StackFit:
    """One model of a stack, put to the calculator."""

    model: str
    config_path: Path
    gpu_source: str
    request: Any  # hxp.resources.FitRequest
    result: Any  # hxp.resources.FitResult


def model_config(spec: Any, name: str, explicit: str | None = None) -> Path:
    """The model's config.json: `explicit`, else the Hugging Face cache on this machine."""
    from hxp.errors import InputError
    from hxp.io.hf_cache import model_config_path

    if explicit:
        return Path(explicit)
    found, looked = model_config_path(spec.model, spec.revision, os.environ, spec.env)
    if found is None:
        at = f"@{spec.revision}" if spec.revision else ""
        raise InputError(
            f"models.{name}.model: no config.json of {spec.model}{at} in the Hugging Face cache "
            f"(looked in {', '.join(str(p) for p in looked)}); download it "
            "(`hf download MODEL config.json`) or pass --config FILE"
        )
    return found


def fit_stack_model(
    stack: Any,
    name: str,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    gpus: tuple[Any, ...] | None = None,
) -> StackFit:
    """Put the stack's model `name` to the calculator (see the module docstring)."""
    from hxp.model_fit import fit_request_for, replica_devices
    from hxp.resources import fit, load_model_config

    spec = stack.models[name]
    path = model_config(spec, name, config_file)
    source = "given (--gpus, --gpu-memory-gib)"
    if gpus is None:
        devices, source = host_devices(stack, spec.host)
        gpus = replica_devices(spec, name, devices, source)
    request = fit_request_for(spec, name, load_model_config(path), gpus, **(overrides or {}))
    return StackFit(name, path, source, request, fit(request))


def _ad_hoc(args: argparse.Namespace) -> int:
    from hxp.errors import InputError
    from hxp.resources import FitRequest, GpuMemory, fit, load_model_config, misfit_message

    missing = [f"--{k.replace('_', '-')}" for k in AD_HOC_REQUIRED if getattr(args, k) is None]
    if missing:
        raise InputError(
            f"hxp fit --config needs {', '.join(missing)} (or take them from a stack: "
            "hxp fit -f stack.yaml [MODEL])"
        )
    values = {k: v for k, v in _overrides(args).items() if v is not None}
    request = FitRequest(
        config=load_model_config(args.config),
        gpus=(GpuMemory(args.gpu_memory_gib, args.gpu_free_gib, args.gpu_name),) * args.gpus,
        **{**AD_HOC_DEFAULTS, **values},
    )
    result = fit(request)
    message = misfit_message(result, request)
    if args.json:
        print(json.dumps({**result.to_dict(), "message": message}, indent=2, sort_keys=True))
    else:
        print(result.explain())
        print(message)
    return 0 if result.fits else 1


def _given_gpus(args: argparse.Namespace) -> tuple[Any, ...] | None:
    from hxp.errors import InputError
    from hxp.resources import GpuMemory

    if args.gpus is None and args.gpu_memory_gib is None:
        return None
    if args.gpus is None or args.gpu_memory_gib is None:
        raise InputError("--gpus and --gpu-memory-gib go together (or leave both to the stack)")
    one = GpuMemory(args.gpu_memory_gib, args.gpu_free_gib, args.gpu_name)
    gpus: tuple[Any, ...] = (one,) * args.gpus
    return gpus


def cmd_fit(args: argparse.Namespace) -> int:
    from hxp.errors import InputError
    from hxp.resources import misfit_message

    if args.config and not args.files and not args.model:
        return _ad_hoc(args)
    if (
        not args.files
        and not os.environ.get("HXP_STACK_FILE")
        and not Path(files(args)[0]).exists()
    ):
        raise InputError(
            f"hxp fit: no {files(args)[0]} here; ask from a stack (hxp fit -f STACK [MODEL]) or "
            "ad hoc (hxp fit --config config.json --gpus N --gpu-memory-gib G "
            "--gpu-memory-utilization U --max-model-len L)"
        )
    stack = load(args).stack
    if args.model is not None and args.model not in stack.models:
        known = ", ".join(sorted(stack.models)) or "none"
        raise InputError(
            f"{', '.join(files(args))}: no model {args.model!r} in stack {stack.stack!r} "
            f"(models: {known})"
        )
    names = [args.model] if args.model else sorted(stack.models)
    if not names:
        raise InputError(f"{', '.join(files(args))}: stack {stack.stack!r} has no models")
    if args.config and len(names) > 1:
        raise InputError("--config with a stack of several models: name the MODEL it is for")
    gpus = _given_gpus(args)
    fits = [fit_stack_model(stack, n, args.config, _overrides(args), gpus) for n in names]
    if args.json:
        print(
            json.dumps(
                {
                    f.model: {
                        **f.result.to_dict(),
                        "message": misfit_message(f.result, f.request),
                        "config": str(f.config_path),
                        "gpus": f.gpu_source,
                    }
                    for f in fits
                },
                indent=2,
                sort_keys=True,
            )
        )
    else:
        for f in fits:
            spec = stack.models[f.model]
            gpus_text = ", ".join(
                f"{g.name or 'GPU'} {g.total_gib:.1f} GiB" for g in f.request.gpus
            )
            print(f"== {f.model}: {spec.model} on {spec.host}")
            print(f"config.json: {f.config_path}")
            print(f"GPUs per replica: {len(f.request.gpus)} x ({gpus_text}), {f.gpu_source}")
            print(f.result.explain())
            print(misfit_message(f.result, f.request))
    return 0 if all(f.result.fits for f in fits) else 1


def register_fit(sub: Any) -> None:
    p = sub.add_parser(
        "fit",
        help="will a model fit on these GPUs under vLLM, and with how much KV cache",
        description="From the stack: hxp fit -f stack.yaml [MODEL] (settings from the model, "
        "GPUs from its host; a flag given here wins). Ad hoc: hxp fit --config FILE --gpus N "
        "--gpu-memory-gib G --gpu-memory-utilization U --max-model-len L. "
        "Exit 0 if it fits, 1 if it does not, 2 on bad input.",
    )
    add_stack_args(p)
    p.add_argument("model", nargs="?", metavar="MODEL", help="a model of the stack (default: all)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the model's config.json (with -f: instead of the Hugging Face cache's)",
    )
    p.add_argument("--gpus", type=int, metavar="N", help="number of GPUs")
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        metavar="G",
        help="total memory per GPU in GiB, as torch reports it (e.g. 79.19 on an H100)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, metavar="U")
    p.add_argument("--max-model-len", type=int, metavar="L")
    p.add_argument(
        "--tensor-parallel-size",
        type=tp_arg,
        metavar="T|auto",
        help="'auto' picks the smallest size that fits (ad hoc default)",
    )
    p.add_argument("--pipeline-parallel-size", type=int, metavar="P")
    p.add_argument("--dtype", metavar="D")
    p.add_argument(
        "--quantization",
        metavar="Q",
        help="override config.json's quantization_config (e.g. fp8)",
    )
    p.add_argument("--kv-cache-dtype", metavar="K")
    p.add_argument("--max-num-seqs", type=int, metavar="S")
    p.add_argument("--max-num-batched-tokens", type=int, metavar="B")
    p.add_argument("--vllm-version", metavar="V", help="ad hoc default 0.11.0")
    p.add_argument("--enforce-eager", action="store_true", default=None)
    p.add_argument(
        "--performance-mode",
        choices=["balanced", "interactivity", "throughput"],
        help="vLLM's --performance-mode (0.17.0 on); throughput doubles the batch defaults",
    )
    chunked = p.add_mutually_exclusive_group()
    chunked.add_argument(
        "--enable-chunked-prefill",
        dest="enable_chunked_prefill",
        action="store_true",
        default=None,
        help="as vLLM's flag (default: vLLM's for the version)",
    )
    chunked.add_argument(
        "--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false"
    )
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
