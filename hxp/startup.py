"""How long a model server may take to start before its readiness checks count: the default
`health.start_period` of a model, scaled from the size of the weights one GPU loads.

    grace = clamp(BASE_SECONDS + SECONDS_PER_GIB x weights_gib_per_gpu,
                  MIN_SECONDS, MAX_SECONDS)

* ``BASE_SECONDS`` (90 s): what every vLLM start pays whatever the model: the process and CUDA
  context (5-10 s), engine start-up and the memory-profiling forward pass (10-20 s),
  ``torch.compile`` of the model graph (20-60 s cold in vLLM V1 logs, a few seconds once its
  cache is warm) and CUDA-graph capture (5-30 s).
* ``SECONDS_PER_GIB`` (10 s/GiB, about 100 MiB/s): a conservative read rate for the weights: a
  cold read from network storage or a spinning/SATA disk, or a page cache that was dropped.
  Local NVMe reads at 1-3 GiB/s, so the margin also covers safetensors deserialisation and
  weight post-processing (fp8/AWQ repacking) after the read. It does not cover a first
  download from the Hub at slow network speed: pre-fetch large models, or set
  ``health.start_period`` yourself.
* The weights are those one GPU holds (``hxp.resources.weight_bytes`` of the largest pipeline
  stage at the model's tensor-parallel size): tensor-parallel ranks load their shards side by
  side, so wall time follows the per-GPU share, not the model's total.
* ``MIN_SECONDS`` (120 s): a small model still gets two minutes (first-run kernel JIT builds,
  a busy host). ``MAX_SECONDS`` (1800 s): past half an hour a start is stuck, or the operator
  knows better and sets ``health.start_period``.

Where the weight size comes from:

1. a ``config.json`` the caller passes (``start_grace(model, config)``):
   ``hxp.resources.model_shape`` + ``weight_bytes``;
2. else the parameter count in the model's name (``Qwen2.5-0.5B-Instruct``: 0.5 B,
   ``Llama-3.1-70B``: 70 B, ``Mixtral-8x7B``: 56 B, ``SmolLM-135M``: 0.135 B), at 2 bytes per
   parameter (1 for fp8, 0.5 for 4-bit AWQ/GPTQ/bitsandbytes, 4 for float32), split over
   ``tensor_parallel_size x pipeline_parallel_size`` GPUs. This is what unit expansion uses:
   the core reads no files, so a stack renders the same on every machine;
3. otherwise ``DEFAULT_SECONDS`` (600 s), the grace every model had before.

An operator's own ``health`` block wins: these defaults apply only to a model without one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from hxp.errors import InputError
from hxp.resources import GIB, model_shape, weight_bytes
from hxp.spec import ModelSpec

BASE_SECONDS = 90.0
SECONDS_PER_GIB = 10.0
MIN_SECONDS = 120.0
MAX_SECONDS = 1800.0
DEFAULT_SECONDS = 600.0

#: Bytes per parameter for a name-based estimate, by `vllm.quantization` or a word in the name.
_QUANT_BYTES = {"fp8": 1.0, "awq": 0.5, "gptq": 0.5, "bitsandbytes": 0.5, "int4": 0.5}
_DTYPE_BYTES = {"float32": 4.0, "float": 4.0, "fp32": 4.0}
_PARAMS_RE = re.compile(
    r"(?<![A-Za-z0-9.])(?:(\d{1,3})x)?(\d{1,4}(?:\.\d{1,3})?)([BbMm])(?![A-Za-z0-9])"
)

Basis = Literal["config", "name", "default"]


@dataclass(frozen=True)
class StartGrace:
    """A model's default start period and what it was computed from."""

    seconds: float
    basis: Basis
    weights_gib_per_gpu: float | None = None

    def explain(self) -> str:
        if self.weights_gib_per_gpu is None:
            return f"{self.seconds:.0f}s (model size unknown: the default)"
        return (
            f"{self.seconds:.0f}s for {self.weights_gib_per_gpu:.1f} GiB of weights per GPU "
            f"(from the {'config.json' if self.basis == 'config' else 'model name'})"
        )


def params_from_name(model_id: str) -> float | None:
    """The parameter count (billions) a model's name states, the largest when it names several;
    None when it names none. `A3B`-style active counts are not sizes and are skipped."""
    name = model_id.rsplit("/", 1)[-1]
    best: float | None = None
    for m in _PARAMS_RE.finditer(name):
        count = float(m.group(2)) * (int(m.group(1)) if m.group(1) else 1)
        billions = count / 1000 if m.group(3) in "Mm" else count
        if billions > 0 and (best is None or billions > best):
            best = billions
    return best


def _bytes_per_param(model: ModelSpec) -> float:
    quant = (model.vllm.quantization or "").lower()
    if quant in _QUANT_BYTES:
        return _QUANT_BYTES[quant]
    name = model.model.lower()
    for word, size in _QUANT_BYTES.items():
        if word in name:
            return size
    return _DTYPE_BYTES.get(model.vllm.dtype.lower(), 2.0)


def _gpus_per_replica(model: ModelSpec) -> tuple[int, int]:
    return model.tensor_parallel(), model.vllm.pipeline_parallel_size


def weights_gib_from_config(model: ModelSpec, config: Mapping[str, Any]) -> float | None:
    """Weight GiB on one GPU of the largest pipeline stage, per the resource calculator;
    None when the calculator cannot read this config."""
    tp, pp = _gpus_per_replica(model)
    try:
        shape = model_shape(config, model.vllm.quantization, model.vllm.dtype)
        if pp > shape.num_layers:
            return None
        return max(weight_bytes(shape, tp, pp, stage).bytes for stage in range(pp)) / GIB
    except (InputError, ArithmeticError, LookupError, TypeError, ValueError):
        return None


def weights_gib_from_name(model: ModelSpec) -> float | None:
    """Weight GiB on one GPU estimated from the parameter count in the model's name."""
    billions = params_from_name(model.model)
    if billions is None:
        return None
    tp, pp = _gpus_per_replica(model)
    return billions * 1e9 * _bytes_per_param(model) / (tp * pp) / GIB


def grace_for(weights_gib_per_gpu: float) -> float:
    """The formula of the module docstring."""
    raw = BASE_SECONDS + SECONDS_PER_GIB * weights_gib_per_gpu
    return float(min(MAX_SECONDS, max(MIN_SECONDS, round(raw))))


def start_grace(model: ModelSpec, config: Mapping[str, Any] | None = None) -> StartGrace:
    """A model's default start period: from `config` (its config.json) when given and
    readable, else from the parameter count in its name, else the default."""
    if config is not None:
        gib = weights_gib_from_config(model, config)
        if gib is not None:
            return StartGrace(grace_for(gib), "config", gib)
    gib = weights_gib_from_name(model)
    if gib is not None:
        return StartGrace(grace_for(gib), "name", gib)
    return StartGrace(DEFAULT_SECONDS, "default")


def model_start_period(model: ModelSpec) -> StartGrace:
    """The start period a model without its own `health` block gets (from its name)."""
    return start_grace(model)


__all__ = [
    "BASE_SECONDS",
    "DEFAULT_SECONDS",
    "MAX_SECONDS",
    "MIN_SECONDS",
    "SECONDS_PER_GIB",
    "StartGrace",
    "grace_for",
    "model_start_period",
    "params_from_name",
    "start_grace",
    "weights_gib_from_config",
    "weights_gib_from_name",
]
