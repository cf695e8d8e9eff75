"""KV-cache calibration in the deploy: pin the measured memory before a model starts, record
what vLLM logged after its first successful start (hxp.calibration holds the rules)."""

from __future__ import annotations

import time
from dataclasses import replace

from hxp.backends.base import Backend, UnitRef
from hxp.calibration import (
    GIB,
    Calibration,
    calibration_key,
    kv_estimate,
    parse_startup_log,
    pinned_instance,
)
from hxp.errors import InputError
from hxp.plan import Plan
from hxp.resources import FitRequest, GpuMemory, fit, load_model_config
from hxp.sim.capacity import capacity_parser, resolve_capacity
from hxp.spec import ModelSpec, Stack
from hxp.store import Store
from hxp.units import UnitInstance, expand_units

#: How far back in a fresh instance's log the start-up lines are looked for.
LOG_LINES = 5000


def pin(store: Store, inst: UnitInstance) -> UnitInstance:
    """`inst` with --kv-cache-memory-bytes pinned to its combination's measurement (if any)."""
    key = calibration_key(inst)
    if key is None:
        return inst
    return pinned_instance(inst, store.kv_calibration(key))


def record_start(store: Store, backend: Backend, inst: UnitInstance) -> Calibration | None:
    """After a model instance became ready: store what its start-up log says about the KV
    cache, if its combination has no measurement yet. Returns the stored measurement."""
    key = calibration_key(inst)
    if key is None or store.kv_calibration(key) is not None:
        return None
    measured = parse_startup_log(backend.logs(UnitRef.of(inst), LOG_LINES))
    if measured is None or measured.kv_cache_tokens is None:
        return None
    calibration = Calibration(
        key=key,
        kv_cache_tokens=measured.kv_cache_tokens,
        # 0: the log has no memory line (vLLM before 0.9.1): shown, never pinned
        available_kv_bytes=measured.available_kv_bytes or 0,
        max_concurrency=measured.max_concurrency,
        measured_at=time.time(),
        instance=inst.name,
    )
    return calibration if store.record_kv_calibration(calibration) else None


def note_start(
    store: Store, backend: Backend, inst: UnitInstance, deploy_id: int | None = None
) -> Calibration | None:
    """`record_start`, and an event `kv-calibrated` saying what was stored."""
    measured = record_start(store, backend, inst)
    if measured is not None:
        message = (
            f"{inst.name}: KV cache measured for {measured.key.describe()}: "
            f"{measured.kv_cache_tokens:,} tokens, {measured.available_kv_bytes} bytes per GPU"
        )
        store.add_event(inst.stack, "kv-calibrated", message, inst.unit, deploy_id)
    return measured


def _sim_prediction(inst: UnitInstance) -> tuple[int | None, float | None]:
    """The calculator's KV tokens and memory for a simulator model given --model-config
    (what the double would get with no skew); (None, None) otherwise."""
    spec = inst.spec
    if not isinstance(spec, ModelSpec) or spec.engine != "simulator":
        return None, None
    try:
        ns = capacity_parser().parse_known_args(list(inst.argv))[0]
    except SystemExit:
        return None, None
    if ns.model_config is None:
        return None, None
    try:
        cap = resolve_capacity(
            version=spec.vllm.version,
            max_model_len=spec.vllm.max_model_len or ns.max_model_len,
            model_config=ns.model_config,
            gpu_memory_gib=ns.gpu_memory_gib,
            gpu_name=ns.gpu_name,
            gpu_memory_utilization=ns.gpu_memory_utilization,
            tensor_parallel_size=ns.tensor_parallel_size,
            kv_skew=1.0,
            kv_cache_memory_bytes=None,
            kv_cache_tokens=None,
        )
    except InputError:
        return None, None
    return cap.kv_cache_tokens, cap.available_kv_bytes / GIB


def _vllm_prediction(inst: UnitInstance) -> tuple[int | None, float | None, str]:
    """The calculator's KV tokens and memory per GPU for a vLLM model with `hf_config`, on the
    GPU the host declares for it; (None, None, why) where that cannot be computed."""
    spec = inst.spec
    if not isinstance(spec, ModelSpec) or spec.hf_config is None:
        return None, None, ""
    gpus = {g.index: g for g in inst.host_spec.gpus}
    chosen = [gpus[i] for i in inst.gpus or () if i in gpus] or inst.host_spec.gpus[:1]
    if not chosen:
        return None, None, f"no prediction: host {inst.host} declares no gpus"
    gpu = chosen[0]
    v = spec.vllm
    tp = spec.tensor_parallel()
    try:
        result = fit(
            FitRequest(
                config=load_model_config(spec.hf_config),
                gpus=(GpuMemory(gpu.memory_gib, None, gpu.name),) * (tp * v.pipeline_parallel_size),
                max_model_len=v.max_model_len,
                gpu_memory_utilization=v.gpu_memory_utilization,
                tensor_parallel_size=tp,
                pipeline_parallel_size=v.pipeline_parallel_size,
                dtype=v.dtype,
                quantization=v.quantization,
                kv_cache_dtype=v.kv_cache_dtype,
                max_num_seqs=v.max_num_seqs,
                max_num_batched_tokens=v.max_num_batched_tokens,
                vllm_version=v.version,
                enforce_eager=v.enforce_eager,
            )
        )
    except InputError as exc:
        return None, None, f"no prediction: {exc}"
    return result.kv_cache_tokens, result.available_kv_gib_per_gpu, ""


def annotate_plan(plan: Plan, stack: Stack, store: Store) -> Plan:
    """The plan with each model's KV cache: predicted (the calculator, where a config.json is
    known: `hf_config`, or a simulator's --model-config), measured (the store) and the pin."""
    estimates = []
    for inst in expand_units(stack):
        if inst.kind != "model" or inst.replica != 0:
            continue
        key = calibration_key(inst)
        if key is None:
            continue
        tokens, gib = _sim_prediction(inst)
        why = ""
        if tokens is None:
            tokens, gib, why = _vllm_prediction(inst)
        estimate = kv_estimate(inst, store.kv_calibration(key), tokens, gib)
        if estimate is not None:
            note = "; ".join(n for n in (estimate.note, why) if n)
            estimates.append(replace(estimate, note=note))
    return replace(plan, kv_cache=tuple(estimates))
