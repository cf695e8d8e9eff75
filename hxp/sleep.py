"""Sleep mode (pure): which models may sleep, and the GPU memory a sleeping replica frees.

vLLM's sleep levels (docs/features/sleep_mode.md, vllm/entrypoints/serve/sleep/api_router.py):

- level 1: the weights are offloaded to CPU RAM and the KV cache is discarded. The replica
  frees its weights and its KV cache on each GPU and holds its weights in host memory.
- level 2: the weights and the KV cache are both discarded (only buffers are kept). It frees
  the same GPU memory and holds (almost) nothing in host memory; waking needs the weights again.

What is *not* freed at either level: the CUDA context, the CUDA-graph pool and PyTorch's
non-torch memory (vLLM PR #11743: "cudagraph memory pool is not released"); the GPU stays
reserved for the replica (hxp.store's reservations), the freed bytes are recorded beside it.

Sizes per GPU: the weights from the model's config.json when one is given, else from its name
(hxp.startup); the KV cache as vLLM measured it at start (hxp.calibration) when known, else its
upper bound: gpu_memory_utilization x the GPU's memory minus the weights.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

from hxp.errors import SleepModeError, UnknownUnitError
from hxp.plan import Plan
from hxp.resources import GIB
from hxp.spec import ModelSpec, Stack
from hxp.startup import start_grace


class SleepLevel(IntEnum):
    """vLLM's `POST /sleep?level=N`."""

    OFFLOAD_WEIGHTS = 1  # weights to CPU RAM, KV cache discarded
    DISCARD_ALL = 2  # weights and KV cache discarded


@dataclass(frozen=True)
class SleepRelease:
    """What one sleeping replica gives back, per GPU it holds (None: size unknown)."""

    level: SleepLevel
    gpus: tuple[int, ...]
    weights_bytes_per_gpu: int | None
    kv_bytes_per_gpu: int | None
    kv_basis: str  # "measured", "upper bound" or "unknown"

    @property
    def freed_bytes_per_gpu(self) -> int | None:
        """GPU memory freed on each of its GPUs: the weights and the KV cache, at both levels."""
        if self.weights_bytes_per_gpu is None or self.kv_bytes_per_gpu is None:
            return None
        return self.weights_bytes_per_gpu + self.kv_bytes_per_gpu

    @property
    def host_bytes(self) -> int | None:
        """Host (CPU) memory the offloaded weights take: level 1 only."""
        if self.level is SleepLevel.DISCARD_ALL:
            return 0
        if self.weights_bytes_per_gpu is None:
            return None
        return self.weights_bytes_per_gpu * max(1, len(self.gpus))

    def explain(self) -> str:
        def gib(n: int | None) -> str:
            return "unknown" if n is None else f"{n / GIB:.2f} GiB"

        where = f"GPU {','.join(map(str, self.gpus))}" if self.gpus else "no GPU held"
        what = (
            "weights offloaded to CPU RAM, KV cache discarded"
            if self.level is SleepLevel.OFFLOAD_WEIGHTS
            else "weights and KV cache discarded"
        )
        return (
            f"level {int(self.level)} ({what}): frees {gib(self.freed_bytes_per_gpu)} per GPU "
            f"(weights {gib(self.weights_bytes_per_gpu)}, KV cache {gib(self.kv_bytes_per_gpu)} "
            f"{self.kv_basis}) on {where}; host memory {gib(self.host_bytes)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": int(self.level),
            "gpus": list(self.gpus),
            "weights_bytes_per_gpu": self.weights_bytes_per_gpu,
            "kv_bytes_per_gpu": self.kv_bytes_per_gpu,
            "kv_basis": self.kv_basis,
            "freed_bytes_per_gpu": self.freed_bytes_per_gpu,
            "host_bytes": self.host_bytes,
        }


def sleeping_model(stack: Stack, name: str) -> ModelSpec:
    """The model `name` if it may sleep; SleepModeError naming the field otherwise."""
    if name not in stack.models:
        if name in stack.services:
            raise SleepModeError(f"{name!r} is a service: only models sleep (models.<name>)")
        raise UnknownUnitError(f"no model {name!r} in stack {stack.stack!r}")
    model = stack.models[name]
    if not model.sleep_mode:
        raise SleepModeError(
            f"model {name!r} has not opted in to sleep mode: set models.{name}.sleep_mode: true "
            "(it restarts the model with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1)"
        )
    return model


def sleep_release(
    model: ModelSpec,
    level: SleepLevel,
    gpus: tuple[int, ...],
    gpu_total_bytes: Mapping[int, int],
    measured_kv_bytes: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> SleepRelease:
    """What a replica of `model` on `gpus` frees at `level` (hxp.sleep's module docstring)."""
    grace = start_grace(model, config)
    weights = None if grace.weights_gib_per_gpu is None else int(grace.weights_gib_per_gpu * GIB)
    if measured_kv_bytes is not None:
        return SleepRelease(level, gpus, weights, measured_kv_bytes, "measured")
    totals = [gpu_total_bytes[g] for g in gpus if g in gpu_total_bytes]
    if weights is None or not totals or len(totals) != len(gpus):
        return SleepRelease(level, gpus, weights, None, "unknown")
    budget = int(model.vllm.gpu_memory_utilization * min(totals))
    return SleepRelease(level, gpus, weights, max(0, budget - weights), "upper bound")


def refuse_asleep(
    action: str,
    units: Collection[str],
    asleep: Mapping[str, str],
    otherwise: str = "restart only the other units",
) -> None:
    """SleepModeError naming every model among `units` with a replica asleep (`asleep`:
    instance -> model). A restart would start it awake (vLLM always starts awake) behind the
    operator's back, and put it back to sleep would be a guess: the operator wakes it first."""
    models = sorted({unit for unit in asleep.values() if unit in units})
    if not models:
        return
    names = ", ".join(repr(m) for m in models)
    wakes = "; ".join(f"`hxp wake {m}`" for m in models)
    raise SleepModeError(
        f"{action} refused: model {names} is asleep (hxp sleep), and a restart would start it "
        f"awake. Run {wakes} first, or {otherwise}; nothing was changed"
    )


def plan_asleep(plan: Plan, asleep: Mapping[str, str]) -> Plan:
    """The plan saying what an apply does to replicas asleep (`asleep`: instance -> model):
    one left alone stays asleep (its no-op says so); one the apply changes (its spec changed)
    is replaced by a new revision that starts awake and serves, which a warning says."""
    if not asleep:
        return plan
    noops = tuple(
        replace(n, reason=f"{n.reason}; asleep: left asleep (`hxp wake {n.unit}` serves it)")
        if n.instance in asleep
        else n
        for n in plan.noops
    )
    woken = sorted(
        {
            (a.unit, a.replaces or a.instance)
            for a in plan.actions
            if a.instance in asleep or a.replaces in asleep
        }
    )
    warnings = tuple(
        f"{instance} is asleep and its spec changed: the new revision starts awake and serves "
        f"behind the gateway (`hxp sleep {unit}` afterwards to put it back)"
        for unit, instance in woken
    )
    return replace(plan, noops=noops, warnings=plan.warnings + warnings)


__all__ = [
    "SleepLevel",
    "SleepRelease",
    "plan_asleep",
    "refuse_asleep",
    "sleep_release",
    "sleeping_model",
]
